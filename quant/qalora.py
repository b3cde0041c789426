"""EfficientDM-style QALoRA: low-bit fake quantization of a diffusers denoiser with LoRA merged before quantization.

EfficientDM (He et al., *EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models*,
ICLR 2024, arXiv 2310.03270) quantizes every ``Linear``/``Conv2d`` of the denoiser and recovers the
accuracy with a LoRA that is merged **into the weight before it is quantized**:

    y = conv_or_linear(Q_a,t(x), Q_w(W + B A))

so the deployed model is a plain low-bit model (the LoRA costs nothing at inference). ``Q_w`` is a
per-output-channel LSQ quantizer, ``Q_a,t`` a per-tensor LSQ activation quantizer whose step size (and
zero point) is looked up **per timestep** (TALSQ). Only ``A``, ``B`` and the step sizes are trained, by
distilling the full-precision (FP) denoiser on its own sampling trajectories (:mod:`quant.trainer`).

What this module does differently from the official code, on purpose:

* The timestep row of the activation tables is chosen from the **real timestep argument** of each
  denoiser call (a diffusers ``ModelHook`` on the denoiser reads ``timestep``), not from a call counter.
  Any step count, custom sigmas, CFG batched (one call) or separate (two calls) use the right rows. A
  timestep that was never calibrated uses the row of the **nearest calibrated timestep** (nearest in the
  units the denoiser receives: SD/SDXL/PixArt/DiT integer timesteps, SD3 ``sigma * 1000``, FLUX ``sigma``).
  EfficientDM subsamples its 100-step tables for fewer steps instead; nearest-row lookup gives the same
  rows for a subsampled schedule and also works for schedules that are not subsets.
* The original modules are kept inside the wrappers (frozen, untouched): :func:`remove_qalora` puts them
  back and the pipeline is bit-exactly what it was.
* The teacher is the same denoiser with quantization switched off (:func:`quant_mode`), not a copy.

What stays full precision by default (:class:`QALoRAConfig` says how to change it): time, class, text,
position and patch embeddings; adaLN / timestep modulation projections (``quantize_modulation``); UNet
shortcut convs; grouped convs; attention matmuls, softmax, norms and activations (never quantized: only
``Linear``/``Conv2d`` get quantizers). The first and last layers (``conv_in``/``conv_out``,
``proj_out``, ...) are quantized at W8A8 without LoRA, as in EfficientDM. Text encoders and the VAE are
not touched.

Example::

    from fastgen.testing import tiny_pipeline
    from fastgen import quant
    pipe = tiny_pipeline("sd3")
    calib = quant.capture_calibration(pipe, ["a red circle", "two blue squares"], num_inference_steps=8)
    quant.apply_qalora(pipe, quant.QALoRAConfig(w_bits=4, a_bits=8, rank=8))
    quant.calibrate(pipe, calib)
    image = pipe("a red circle", num_inference_steps=8).images[0]   # W4A8 fake-quant
    quant.remove_qalora(pipe)                                       # bit-exact FP pipeline again

The code lives in :mod:`quant.config` (:class:`QALoRAConfig`, :class:`LayerSpec`, the default layer patterns),
:mod:`quant.layers` (:class:`QALoRALayer`, :class:`QuantContext`), :mod:`quant.apply` (apply/remove, state,
summary), :mod:`quant.io` (merge, integer form, save/load) and :mod:`quant.trainer` (the fine-tune); this
module gathers the public names. ``python -m fastgen.quant.qalora ...`` runs the fine-tune's command line,
:func:`quant.trainer.main` (the quant modules never import this one, so running it as ``__main__`` imports
nothing twice).
"""


from .apply import (QALoRAState, apply_qalora, is_quantized, plan_layers, qalora_layers, qalora_state, qalora_summary,
                    quant_mode, remove_qalora, require_qalora, trainable_parameters)
from .common import get_denoiser
from .config import DEFAULT_KEEP_FP, FIRST_LAST_LAYERS, MODULATION_LAYERS, LayerSpec, QALoRAConfig
from .io import FORMAT, merge, quantized_state
from .layers import QALoRALayer, QuantContext

__all__ = [
    "QALoRAConfig", "QALoRALayer", "QuantContext", "LayerSpec", "DEFAULT_KEEP_FP", "MODULATION_LAYERS",
    "FIRST_LAST_LAYERS", "apply_qalora", "remove_qalora", "is_quantized", "plan_layers", "quant_mode",
    "get_denoiser", "qalora_layers", "qalora_state", "merge", "quantized_state", "qalora_summary",
    "trainable_parameters", "QALoRAState", "require_qalora", "FORMAT",
]

if __name__ == "__main__":  # python -m fastgen.quant.qalora ... (the command line is quant.trainer.main)
    from fastgen.quant.trainer import main

    raise SystemExit(main())
