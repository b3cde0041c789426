"""Plain post-training quantization (PTQ): the baseline QALoRA is compared against.

Same quantizers, same layer selection and the same data-free calibration as QALoRA (activation ranges
from the FP model's own trajectories, per timestep by default), but no LoRA and no fine-tune: weight step
sizes come from the weights (per-channel min-max, or the clipping that minimises the L2.4 error: "mse"),
activation step sizes from the captured ranges (min-max or "mse" clipping). With
``per_timestep_act=False`` it is the naive one-scale-per-layer PTQ that Q-Diffusion and PTQD improve on.

Example::

    pipe = quant.apply_ptq(pipe, quant.PTQConfig(w_bits=8, a_bits=8), prompts=["a red circle"],
                           num_inference_steps=20)
    quant.remove_ptq(pipe)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .calibration import CalibrationSet, calibrate, capture_calibration
from .apply import apply_qalora, remove_qalora
from .config import DEFAULT_KEEP_FP, FIRST_LAST_LAYERS, QALoRAConfig

__all__ = ["PTQConfig", "apply_ptq", "remove_ptq", "quantize"]

_METHODS = {"minmax": "max", "max": "max", "mse": "mse"}


@dataclass(frozen=True)
class PTQConfig:
    """Post-training quantization settings (the fields mean what they mean in :class:`~quant.QALoRAConfig`).

    Attributes:
        w_bits: weight bits (default 8; 2-8), per output channel, symmetric.
        a_bits: activation bits (default 8; 2-8) or None (weight-only), per tensor.
        method: ``"mse"`` (default; clipping ratio minimising the L2.4 error, for weights and activations)
            or ``"minmax"`` (full observed range).
        per_timestep_act: one activation step per calibrated timestep (default True, like QALoRA, so that
            the fine-tune is the only difference); False: one step per layer (naive PTQ).
        act_symmetric, keep_fp, quantize_modulation, eight_bit: as in :class:`~quant.QALoRAConfig`.
    """

    w_bits: int = 8
    a_bits: int | None = 8
    method: str = "mse"
    per_timestep_act: bool = True
    act_symmetric: bool = False
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    quantize_modulation: bool = False
    eight_bit: tuple[str, ...] = FIRST_LAST_LAYERS

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"method must be 'minmax' or 'mse', got {self.method!r}")
        self.to_qalora()  # validates the rest

    def to_qalora(self) -> QALoRAConfig:
        """The equivalent :class:`~quant.QALoRAConfig` (rank 0)."""
        m = _METHODS[self.method]
        return QALoRAConfig(w_bits=self.w_bits, a_bits=self.a_bits, rank=0, per_timestep_act=self.per_timestep_act,
                            act_symmetric=self.act_symmetric, weight_init=m, act_init=m, keep_fp=self.keep_fp,
                            quantize_modulation=self.quantize_modulation, eight_bit=self.eight_bit)


def apply_ptq(pipe, config: PTQConfig | None = None, calibration: CalibrationSet | None = None,
              prompts: Sequence | None = None, **capture_kwargs: Any):
    """Quantize ``pipe``'s denoiser with plain PTQ, calibrated on ``calibration`` (or on a capture of the FP
    pipeline on ``prompts`` with ``capture_kwargs``, see :func:`quant.capture_calibration`). Returns ``pipe``;
    undo with :func:`remove_ptq` (bit-exact)."""
    config = config or PTQConfig()
    if not isinstance(config, PTQConfig):
        raise TypeError(f"apply_ptq expects a PTQConfig, got {type(config).__name__}")
    qcfg = config.to_qalora()
    if calibration is None and qcfg.a_bits is not None:
        calibration = capture_calibration(pipe, prompts, **capture_kwargs)
    apply_qalora(pipe, qcfg)
    if qcfg.a_bits is not None:
        calibrate(pipe, calibration)
    return pipe


def remove_ptq(pipe):
    """Undo :func:`apply_ptq` (the same as :func:`quant.remove_qalora`)."""
    return remove_qalora(pipe)


def quantize(pipe, config: QALoRAConfig | PTQConfig | str | None = None, *, checkpoint: str | None = None,
             calibration: CalibrationSet | None = None, prompts: Sequence | None = None, **capture_kwargs: Any):
    """One call for a quantized pipeline (what a ``"qalora:w4a8"`` recipe maps to).

    With ``checkpoint`` (a file of :func:`quant.save`, e.g. a fine-tuned QALoRA model), load it, checking
    that it matches ``config`` when given. Otherwise apply ``config`` (LoRA left at zero, i.e. PTQ) and
    calibrate it data-free on ``calibration`` or on a capture of ``prompts`` (default prompts when None).
    """
    if isinstance(config, str) or (config is None and checkpoint is None):
        config = QALoRAConfig.from_string(config)
    if isinstance(config, PTQConfig):
        config = config.to_qalora()
    if checkpoint is not None:
        from .io import load

        return load(pipe, checkpoint, expect=config)
    if calibration is None and config.a_bits is not None:
        calibration = capture_calibration(pipe, prompts, **capture_kwargs)
    apply_qalora(pipe, config)
    if config.a_bits is not None:
        calibrate(pipe, calibration)
    return pipe
