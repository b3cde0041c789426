"""The ``qalora:…`` recipe: :func:`fastgen.accelerate` (and ``fastgen bench``/the app) quantize a pipeline's denoiser.

``"qalora:w8a8"``, ``"qalora:w4a8,r16"``, ``"qalora:w4a16"`` (weight-only): arguments are
:meth:`quant.QALoRAConfig.from_string`'s. Applying the recipe

* loads the fine-tuned QALoRA file shipped for the pipeline when there is one
  (``fastgen/zoo/weights/<zoo model>-<bits>.safetensors``; none ship yet), checking it against the config;
* otherwise runs a short data-free calibration (:func:`quant.capture_calibration` on the config's
  ``calibration_prompts`` — your prompts, or a prompt file with ``"qalora:w8a8,prompts=FILE"`` — else on
  :data:`CALIBRATION_PROMPTS` default prompts (:func:`calibration_prompts`: generic text-to-image prompts for
  your pipeline, the shapes world only for a zoo model), at :data:`CALIBRATION_STEPS` steps, before any timing) and applies
  plain PTQ with the config's bits (LoRA at zero). For the fine-tuned model run
  ``fastgen train qalora`` and load its file with :func:`quant.load`.

Everything is fake quantization in float (accuracy, not speed); ``fastgen.remove`` restores the
pipeline bit-exactly.

``"int8"``, ``"int8:dynamic"``, ``"int8:static"`` (options ``torchao``, ``eager``, ``fp``, ``mod``: see
:meth:`quant.Int8Config.from_string`) put **real int8 kernels** on the denoiser's Linear layers
(:func:`quant.to_int8`); ``"qalora:w8a8+int8:static"`` deploys a QALoRA model with its learned scales.
"""

from __future__ import annotations

from pathlib import Path
from fastgen.api import apply_technique, remove_technique
from fastgen.prompts import is_class_conditional, resolve_prompts
from fastgen.adapters import DIFFUSION_FAMILIES
from fastgen.registry import Technique, register_technique

from .deploy import Int8Config
from .qalora import QALoRAConfig, qalora_summary, remove_qalora

__all__ = ["CALIBRATION_PROMPTS", "CALIBRATION_STEPS", "calibration_prompts", "apply_qalora_recipe", "remove_qalora_recipe", "apply_int8_recipe",
           "remove_int8_recipe"]

_NAME = "qalora"
#: Prompts and steps of the recipe's quick calibration (when no fine-tuned file is shipped).
CALIBRATION_PROMPTS = 4
CALIBRATION_STEPS = 8


def _shipped_file(pipe, config: QALoRAConfig) -> Path | None:
    from fastgen import zoo

    name = zoo.name_of(pipe)
    if name is None:
        return None
    f = zoo.weights_path(name).parent / f"{name}-{config.bits}.safetensors"
    return f if f.exists() else None


def _install_qalora(pipe, st, config: QALoRAConfig) -> None:
    from .calibration import capture_calibration
    from .ptq import quantize

    shipped = _shipped_file(pipe, config)
    if shipped is not None:
        quantize(pipe, config, checkpoint=str(shipped))
    else:
        calib = None
        if config.a_bits is not None:
            calib = capture_calibration(pipe, calibration_prompts(pipe, config.calibration_prompts),
                                        num_inference_steps=CALIBRATION_STEPS, batch_size=CALIBRATION_PROMPTS)
        quantize(pipe, config, calibration=calib)


def _uninstall_qalora(pipe, st, handle: None) -> None:
    remove_qalora(pipe)


def apply_qalora_recipe(pipe, config: QALoRAConfig | None = None):
    """Quantize ``pipe``'s denoiser with ``config`` (see the module docstring); safe to call twice."""
    return apply_technique(pipe, _NAME, config)


def remove_qalora_recipe(pipe):
    """Undo :func:`apply_qalora_recipe` (bit-exact)."""
    return remove_technique(pipe, _NAME)


#: Seed of the shapes-grammar stream a zoo model's recipe calibration draws its prompts from (not the evaluator's).
ZOO_CALIBRATION_SEED = 123


def calibration_prompts(pipe, prompts) -> list | None:
    """What the recipes' quick calibration runs on: the config's ``calibration_prompts`` (a sequence or a prompt
    file) when set; else :data:`CALIBRATION_PROMPTS` prompts of :func:`fastgen.prompts.default_prompts`
    (a zoo model: its shapes world; others: generic text-to-image prompts) and, for a class-conditional
    pipeline, None (:func:`quant.capture_calibration`'s labels 0-7)."""
    if prompts is None and is_class_conditional(pipe):
        return None
    return resolve_prompts(pipe, prompts, CALIBRATION_PROMPTS, seed=ZOO_CALIBRATION_SEED)


register_technique(Technique(
    families=DIFFUSION_FAMILIES,  # a diffusers denoiser; a next-scale AR model (var) is not one
    name=_NAME, config_cls=QALoRAConfig, parse=QALoRAConfig.from_string, install=_install_qalora,
    uninstall=_uninstall_qalora, to_string=lambda c: f"{_NAME}:{c.to_string()}",
    summary=lambda pipe, handle: qalora_summary(pipe),
    help="low-bit quantization of the denoiser (EfficientDM QALoRA; fake-quant; PTQ-calibrated unless a "
         "fine-tuned file is shipped)",
    example="qalora:w8a8",
))


# --------------------------------------------------------------------------------------------------
# "int8": real int8 kernels (quant.deploy)
# --------------------------------------------------------------------------------------------------

_INT8 = "int8"


def _install_int8(pipe, st, config: Int8Config) -> bool:
    """Convert ``pipe``'s denoiser Linear layers to real int8 kernels (:func:`quant.to_int8`).

    ``int8:static`` on a pipeline that is not QALoRA/PTQ-quantized first runs the same quick data-free
    calibration as the ``qalora`` recipe (W8A8 PTQ, :data:`CALIBRATION_PROMPTS` prompts at
    :data:`CALIBRATION_STEPS` steps) and uses its per-timestep activation tables; after ``qalora:...`` in
    the same recipe (``"qalora:w8a8+int8:static"``) it uses that model's tables and integer weights.
    """
    from .calibration import capture_calibration
    from .deploy import int8_state, to_int8
    from .ptq import quantize
    from .qalora import is_quantized

    own = False
    if config.mode == "static" and not is_quantized(pipe):
        calib = capture_calibration(pipe, calibration_prompts(pipe, config.calibration_prompts),
                                    num_inference_steps=CALIBRATION_STEPS, batch_size=CALIBRATION_PROMPTS)
        quantize(pipe, QALoRAConfig(w_bits=8, a_bits=8, rank=0, eight_bit=()), calibration=calib)
        own = True
    try:
        to_int8(pipe, config)
    except BaseException:
        if own:
            remove_qalora(pipe)
        raise
    int8_state(pipe).extra["own_qalora"] = own
    return own


def _uninstall_int8(pipe, st, own: bool) -> None:
    """Undo :func:`_install_int8` (bit-exact; also removes the calibration it made itself)."""
    from .deploy import remove_int8

    remove_int8(pipe)
    if own:
        remove_qalora(pipe)


def apply_int8_recipe(pipe, config: Int8Config | None = None):
    """Convert ``pipe``'s denoiser Linear layers to real int8 kernels (see :func:`_install_int8`). Returns ``pipe``."""
    return apply_technique(pipe, _INT8, config)


def remove_int8_recipe(pipe):
    """Undo :func:`apply_int8_recipe` (bit-exact; also removes the calibration it made itself)."""
    return remove_technique(pipe, _INT8)


def _int8_summary(pipe, own: bool):
    from .deploy import int8_summary

    return int8_summary(pipe)


register_technique(Technique(
    families=DIFFUSION_FAMILIES,  # a diffusers denoiser; a next-scale AR model (var) is not one
    name=_INT8, config_cls=Int8Config, parse=Int8Config.from_string, install=_install_int8,
    uninstall=_uninstall_int8, to_string=lambda c: f"{_INT8}:{c.to_string()}", summary=_int8_summary,
    help="real int8 kernels for the denoiser's Linear layers (torch._int_mm / torchao; dynamic per-token or "
         "static learned per-timestep activation scales; torch.compile'd blocks)",
    example="int8:dynamic",
))
