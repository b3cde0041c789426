"""Learned-step-size (LSQ) fake quantizers for weights and activations.

LSQ (Esser et al., *Learned Step Size Quantization*, ICLR 2020, arXiv 1902.08153) trains the step size
``s`` of a uniform quantizer together with the network: the forward pass is

    x_q = (clamp(round(x / s) + z, q_min, q_max) - z) * s

and gradients pass through ``round`` unchanged (straight-through estimator, STE), so ``d x_q / d x`` is 1
inside the clipping range and 0 outside, and ``d x_q / d s`` is ``round(x/s) - x/s`` inside and the
clipped level outside. LSQ scales the step-size gradient by ``g = 1 / sqrt(N * q_max)`` (``N``: elements
that share the step) so that step sizes learn at the pace of the weights; with Adam the per-layer learning
rates of :mod:`quant.trainer` do that job as well.

Two quantizers:

* :class:`WeightQuantizer`: symmetric, signed (``[-2^(b-1), 2^(b-1) - 1]``), one step per output channel.
  Its forward is bit-identical to the integer form ``int_repr`` returns (``w_int * scale``), which is
  what a real int kernel computes.
* :class:`ActQuantizer`: one step per tensor; asymmetric unsigned (``[0, 2^b - 1]`` with an integer zero
  point, EfficientDM/LSQ+ style; default, it suits post-GELU/SiLU inputs) or symmetric signed. It holds a
  **table** of ``(step, zero point)`` rows, one per calibrated timestep (EfficientDM's TALSQ); the caller
  passes the row ``index`` (an ``int``, or one index per sample as a ``LongTensor``).

Step sizes are initialised from data by :func:`weight_scales` (per-channel max or an Lp-error search over
clipping ratios, LAPQ-style as in EfficientDM) and :func:`act_range_to_qparams` /
:func:`search_act_qparams`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = [
    "round_ste", "grad_scale", "qrange", "fake_quant", "WeightQuantizer", "ActQuantizer", "weight_scales",
    "act_range_to_qparams", "search_act_qparams", "MIN_STEP",
]

#: Smallest step size a quantizer uses (steps are clamped to it; avoids division by zero on all-zero rows).
MIN_STEP = 1e-8
#: Clipping ratios tried by the "mse" scale search (EfficientDM tries 1.0 down to 0.2 in 0.01 steps).
_CLIP_GRID = torch.linspace(0.2, 1.0, 41)
#: Lp norm of the scale search (2.4, as in LAPQ / EfficientDM's "mse" init).
_SEARCH_P = 2.4


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.clone()  # forward is the identity, bit for bit

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` (half to even) whose gradient is the identity (straight-through estimator)."""
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass (bit-exact); multiplies the gradient by ``scale`` (LSQ's ``g``)."""
    return _GradScale.apply(x, float(scale))


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit quantizer: ``[-2^(b-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def fake_quant(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int,
               ste: bool = True) -> torch.Tensor:
    """``(clamp(round(x / step) + zero_point, qmin, qmax) - zero_point) * step`` (STE through the rounding).

    ``step`` and ``zero_point`` broadcast against ``x``; ``zero_point`` must hold integers.
    """
    r = round_ste(x / step) if ste else torch.round(x / step)
    q = torch.clamp(r + zero_point, qmin, qmax)
    return (q - zero_point) * step


def _lp_error(a: torch.Tensor, b: torch.Tensor, dim) -> torch.Tensor:
    return (a - b).abs().pow(_SEARCH_P).mean(dim=dim)


def weight_scales(w: torch.Tensor, bits: int, method: str = "mse") -> torch.Tensor:
    """Per-output-channel step sizes of a symmetric signed ``bits``-bit quantizer for weight ``w`` (dim 0 = out).

    ``"max"``: ``max|w_c| / q_max``. ``"mse"``: the clipping ratio (of :data:`_CLIP_GRID`, 0.2 to 1) of
    ``max|w_c|`` minimising the per-channel L2.4 quantization error (LAPQ / EfficientDM).
    """
    if method not in ("max", "mse"):
        raise ValueError(f"weight init must be 'max' or 'mse', got {method!r}")
    qmin, qmax = qrange(bits, True)
    w2 = w.detach().float().reshape(w.shape[0], -1)
    amax = w2.abs().amax(dim=1).clamp_min(MIN_STEP * qmax)
    if method == "max":
        return amax / qmax
    best = amax / qmax
    best_err = torch.full_like(amax, float("inf"))
    for ratio in _CLIP_GRID.tolist():
        s = (amax * ratio / qmax).clamp_min(MIN_STEP)
        err = _lp_error(fake_quant(w2, s[:, None], 0.0, qmin, qmax, ste=False), w2, 1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def act_range_to_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, float]:
    """``(step, zero_point)`` of a quantizer covering ``[lo, hi]`` (the range is widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        _, qmax = qrange(bits, True)
        return max(max(-lo, hi) / qmax, MIN_STEP), 0.0
    _, qmax = qrange(bits, False)
    step = max((hi - lo) / qmax, MIN_STEP)
    zp = float(min(max(round(-lo / step), 0), qmax))
    return step, zp


def search_act_qparams(samples: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool,
                       method: str = "mse") -> tuple[float, float]:
    """``(step, zero_point)`` for activations with observed range ``[lo, hi]``.

    ``"max"``: cover the full range. ``"mse"``: shrink the range by the ratio (0.2 to 1) that minimises the
    L2.4 error on ``samples`` (a random subset of the observed values).
    """
    if method not in ("max", "mse"):
        raise ValueError(f"activation init must be 'max' or 'mse', got {method!r}")
    if method == "max" or samples.numel() == 0:
        return act_range_to_qparams(lo, hi, bits, symmetric)
    x = samples.detach().float().flatten()
    qmin, qmax = qrange(bits, symmetric)
    best, best_err = act_range_to_qparams(lo, hi, bits, symmetric), float("inf")
    for ratio in _CLIP_GRID.tolist():
        s, z = act_range_to_qparams(lo * ratio, hi * ratio, bits, symmetric)
        err = float(_lp_error(fake_quant(x, torch.tensor(s), z, qmin, qmax, ste=False), x, 0))
        if err < best_err:
            best, best_err = (s, z), err
    return best


class WeightQuantizer(nn.Module):
    """Symmetric signed per-output-channel LSQ quantizer of a weight tensor (dim 0 = output channels).

    Args:
        bits: 2..8.
        channels: number of output channels (one learned step each).
    """

    def __init__(self, bits: int, channels: int):
        super().__init__()
        self.bits = int(bits)
        self.qmin, self.qmax = qrange(self.bits, True)
        self.step = nn.Parameter(torch.ones(channels))

    @torch.no_grad()
    def init_from(self, w: torch.Tensor, method: str = "mse") -> None:
        """Set the steps from ``w`` (see :func:`weight_scales`)."""
        assert w.shape[0] == self.step.numel(), (tuple(w.shape), self.step.numel())
        self.step.copy_(weight_scales(w, self.bits, method).to(self.step))

    def _step(self, w: torch.Tensor) -> torch.Tensor:
        s = self.step
        if s.requires_grad and torch.is_grad_enabled():
            s = grad_scale(s, 1.0 / math.sqrt(w[0].numel() * self.qmax))
        return s.clamp_min(MIN_STEP).view(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``w`` (float32 math; same dtype as ``w``)."""
        wf = w.float()
        ste = torch.is_grad_enabled() and (wf.requires_grad or self.step.requires_grad)
        return fake_quant(wf, self._step(wf), 0.0, self.qmin, self.qmax, ste=ste).to(w.dtype)

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_int int8, scale float32 [out])`` with ``w_int * scale`` equal to :meth:`forward` bit for bit."""
        wf = w.float()
        s = self.step.detach().float().clamp_min(MIN_STEP)
        sv = s.view(-1, *([1] * (wf.dim() - 1)))
        w_int = torch.clamp(torch.round(wf / sv), self.qmin, self.qmax).to(torch.int8)
        return w_int, s.clone()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.step.numel()}, range=[{self.qmin}, {self.qmax}]"


class ActQuantizer(nn.Module):
    """Per-tensor LSQ activation quantizer with a table of ``(step, zero point)`` rows (one per timestep).

    Args:
        bits: 2..8.
        symmetric: signed symmetric (zero point 0) if True; else unsigned ``[0, 2^b - 1]`` with a learned
            integer zero point (rounded with the STE, clamped to the range).
        rows: table length (0 = not calibrated yet; :meth:`set_table` fills it).
    """

    def __init__(self, bits: int, symmetric: bool = False, rows: int = 0):
        super().__init__()
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        self.step = nn.Parameter(torch.ones(rows))
        self.zero_point = nn.Parameter(torch.zeros(rows), requires_grad=not self.symmetric)

    @property
    def rows(self) -> int:
        return self.step.numel()

    @torch.no_grad()
    def set_table(self, step: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Replace the table (new Parameters: build optimizers afterwards)."""
        step = torch.as_tensor(step, dtype=torch.float32, device=self.step.device).flatten()
        zp = torch.zeros_like(step) if zero_point is None else torch.as_tensor(
            zero_point, dtype=torch.float32, device=self.step.device).flatten()
        assert step.shape == zp.shape, (step.shape, zp.shape)
        self.step = nn.Parameter(step.clone())
        self.zero_point = nn.Parameter(zp.clone(), requires_grad=not self.symmetric)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(step float32 [rows], zero point int32 [rows])`` as the forward pass uses them."""
        s = self.step.detach().float().clamp_min(MIN_STEP)
        z = torch.clamp(torch.round(self.zero_point.detach().float()), self.qmin if self.symmetric else 0, self.qmax)
        if self.symmetric:
            z = torch.zeros_like(z)
        return s.clone(), z.to(torch.int32)

    def forward(self, x: torch.Tensor, index: int | torch.Tensor | None = 0) -> torch.Tensor:
        """Fake-quantize ``x`` with table row ``index`` (an int, or a LongTensor with one row per sample)."""
        if self.rows == 0:
            raise RuntimeError("this activation quantizer is not calibrated (empty step table): run "
                               "quant.calibrate(pipe, calibration) first, or load a quantized checkpoint")
        if index is None:
            if self.rows != 1:
                raise RuntimeError(f"no timestep row selected for a {self.rows}-row activation table: call the "
                                   "denoiser with its timestep argument (the QALoRA hook reads it)")
            index = 0
        grad = torch.is_grad_enabled() and (x.requires_grad or self.step.requires_grad)
        s, z = self.step, self.zero_point
        if grad and s.requires_grad:
            s = grad_scale(s, 1.0 / math.sqrt(max(1, x[0].numel()) * self.qmax))
        s = s.clamp_min(MIN_STEP)
        if self.symmetric:
            z = torch.zeros_like(z)
        else:
            z = torch.clamp(round_ste(z) if grad else torch.round(z), 0, self.qmax)
        if isinstance(index, torch.Tensor) and index.dim() > 0:
            if index.numel() != x.shape[0]:
                raise RuntimeError(f"per-sample timestep rows ({index.numel()}) do not match the activation "
                                   f"batch ({tuple(x.shape)}); give every sample of a denoiser call the same timestep")
            shape = (-1,) + (1,) * (x.dim() - 1)
            s, z = s[index].view(shape), z[index].view(shape)
        else:
            s, z = s[int(index)], z[int(index)]
        xf = x.float()
        return fake_quant(xf, s, z, self.qmin, self.qmax, ste=grad).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, rows={self.rows}"
