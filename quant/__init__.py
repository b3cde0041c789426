"""quant: EfficientDM-style QALoRA low-bit quantization of diffusers denoisers (fake quant + integer export).

* :func:`apply_qalora` / :func:`remove_qalora`: wrap the denoiser's ``Linear``/``Conv2d`` layers in
  quantized layers ``op(Q_a,t(x), Q_w(W + B A))`` (LoRA merged before quantization, LSQ step sizes,
  activation steps per timestep keyed by the call's real timestep); bit-exact removal.
* :func:`capture_calibration` / :func:`calibrate`: data-free calibration from the FP pipeline's own
  trajectories (prompts only).
* :func:`finetune_qalora` / :class:`QALoRATrainer`: the EfficientDM distillation fine-tune (LoRA + step
  sizes only); CLI ``fastgen train qalora``.
* :func:`apply_ptq` / :class:`PTQConfig`: the plain PTQ baseline; :func:`quantize`: one call (recipe use).
* :func:`merge`, :func:`save`, :func:`load`: integer weights + scales + per-timestep activation tables in
  safetensors.
* :func:`to_int8` / :func:`remove_int8`: **real int8 kernels** (``torch._int_mm`` or torchao) for the
  denoiser's Linear layers, dynamic or static with the learned per-timestep scales, ``torch.compile``'d
  (:mod:`quant.deploy`; speed: ``fastgen experiment int8``).
* :func:`export_executorch` / :func:`export_onnx`: mobile export (XNNPACK ``.pte`` with 8-bit dynamic
  activations and 8/4-bit weights; ONNX QDQ int8 and ``.ort``), run back and compared (:mod:`quant.export`).

Reference: He et al., *EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models*,
ICLR 2024 (arXiv 2310.03270). QALoRA itself is fake quantization in float; :mod:`quant.deploy` and
:mod:`quant.export` run the result on real integer kernels.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> the submodule defining them, imported lazily (importing fastgen.quant costs nothing until a name
# is used). ``quant.qalora`` only gathers names and runs the fine-tune CLI (``python -m fastgen.quant.qalora``):
# no quant module imports it, so running it as __main__ never imports it a second time.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["DEFAULT_PROMPTS", "CalibrationRecord", "CalibrationSet", "calibrate", "capture_calibration"],
                    "calibration"),
    **dict.fromkeys(["QuantCheckpointError", "load", "merge", "quantized_state", "read_header", "save"], "io"),
    **dict.fromkeys(["PTQConfig", "apply_ptq", "quantize", "remove_ptq"], "ptq"),
    **dict.fromkeys(["DEFAULT_KEEP_FP", "FIRST_LAST_LAYERS", "MODULATION_LAYERS", "LayerSpec", "QALoRAConfig"],
                    "config"),
    **dict.fromkeys(["QALoRALayer", "QuantContext"], "layers"),
    **dict.fromkeys(["apply_qalora", "is_quantized", "plan_layers", "qalora_layers", "qalora_state", "qalora_summary",
                     "quant_mode", "remove_qalora"], "apply"),
    "get_denoiser": "common",
    **dict.fromkeys(["ActQuantizer", "WeightQuantizer"], "quantizers"),
    **dict.fromkeys(["Int8Config", "Int8Linear", "to_int8", "remove_int8", "is_int8", "int8_summary", "weight_memory",
                     "capture_denoiser_inputs", "capture_denoiser_calls"], "deploy"),
    **dict.fromkeys(["ExportReport", "ExportError", "export_executorch", "export_onnx"], "export"),
    **dict.fromkeys(["FinetuneConfig", "QALoRATrainer", "distillation_error", "finetune_qalora"], "trainer"),
}


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .calibration import DEFAULT_PROMPTS, CalibrationRecord, CalibrationSet, calibrate, capture_calibration
    from .apply import (apply_qalora, is_quantized, plan_layers, qalora_layers, qalora_state, qalora_summary, quant_mode,
                        remove_qalora)
    from .common import get_denoiser
    from .config import DEFAULT_KEEP_FP, FIRST_LAST_LAYERS, MODULATION_LAYERS, LayerSpec, QALoRAConfig
    from .io import QuantCheckpointError, load, merge, quantized_state, read_header, save
    from .layers import QALoRALayer, QuantContext
    from .ptq import PTQConfig, apply_ptq, quantize, remove_ptq
    from .deploy import (Int8Config, Int8Linear, capture_denoiser_calls, capture_denoiser_inputs, int8_summary, is_int8,
                         remove_int8, to_int8, weight_memory)
    from .export import ExportError, ExportReport, export_executorch, export_onnx
    from .quantizers import ActQuantizer, WeightQuantizer
    from .trainer import FinetuneConfig, QALoRATrainer, distillation_error, finetune_qalora

__all__ = [
    "QALoRAConfig", "FinetuneConfig", "PTQConfig", "LayerSpec", "QALoRALayer", "QuantContext", "ActQuantizer",
    "WeightQuantizer", "CalibrationSet", "CalibrationRecord", "QALoRATrainer", "QuantCheckpointError",
    "apply_qalora", "remove_qalora", "is_quantized", "get_denoiser", "qalora_state", "plan_layers", "qalora_layers",
    "qalora_summary", "quant_mode", "capture_calibration", "calibrate", "finetune_qalora", "distillation_error",
    "apply_ptq", "remove_ptq", "quantize", "merge", "quantized_state", "save", "load", "read_header",
    "DEFAULT_KEEP_FP", "FIRST_LAST_LAYERS", "MODULATION_LAYERS", "DEFAULT_PROMPTS",
    "Int8Config", "Int8Linear", "to_int8", "remove_int8", "is_int8", "int8_summary", "weight_memory",
    "capture_denoiser_inputs", "capture_denoiser_calls", "ExportReport", "ExportError", "export_executorch",
    "export_onnx",
]

assert set(__all__) == set(_EXPORTS), sorted(set(__all__) ^ set(_EXPORTS))
