"""The quantized layer :class:`QALoRALayer` and the per-call :class:`QuantContext` its denoiser shares.

A :class:`TimestepHook` on the denoiser reads each call's real timestep and picks the activation-table row
(nearest calibrated timestep); the layers read the mode and the row from the context. See
:mod:`quant.qalora` for the method and :func:`quant.apply_qalora` for installing them.
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .common import layer_kind, timestep_values
from .config import LayerSpec
from .quantizers import ActQuantizer, WeightQuantizer

__all__ = ["QuantContext", "TimestepHook", "QALoRALayer"]


class QuantContext:
    """State shared by the quantized layers of one denoiser: the mode and the current timestep row.

    ``mode``: ``"quant"`` (fake-quantized forward), ``"fp"`` (the original modules, bit-exact: the
    teacher) or ``"observe"`` (FP forward that records activation ranges for calibration).
    ``keys``: the calibrated timesteps, ascending; row ``i`` of every activation table belongs to
    ``keys[i]``. ``trace``: ``(timestep, row, exact)`` of the denoiser calls since :meth:`reset_trace`.
    """

    def __init__(self, per_timestep: bool):
        self.per_timestep = bool(per_timestep)
        self.mode = "quant"
        self.keys: list[float] = []
        self.calibrated = False
        self.index: int | torch.Tensor | None = None
        self.trace: list[tuple[float, int, bool]] = []
        self.max_trace = 10_000
        self.observer = None

    def reset_trace(self) -> None:
        self.trace = []

    def nearest(self, t: float) -> tuple[int, bool]:
        """Row of the calibrated timestep nearest to ``t`` and whether it is (numerically) the same."""
        keys = self.keys
        i = bisect.bisect_left(keys, t)
        if i == len(keys) or (i > 0 and abs(keys[i - 1] - t) <= abs(keys[i] - t)):
            i -= 1
        return i, abs(keys[i] - t) <= 1e-5 * max(1.0, abs(t))

    def select(self, t) -> None:
        """Set the row for a denoiser call with timestep argument ``t`` (called by the denoiser hook)."""
        if self.mode == "fp":
            self.index = None
            return
        vals = timestep_values(t)
        if self.mode == "observe":
            self.index = self.observer.select(vals)
            return
        if not self.calibrated:
            self.index = None
            return
        if not self.per_timestep:
            self.index = 0
            if vals and len(self.trace) < self.max_trace:
                self.trace.append((vals[0], 0, True))
            return
        if not vals:
            raise RuntimeError("QALoRA per-timestep activation tables need the denoiser's timestep argument, "
                               "but this call passed none")
        rows = {}
        for v in vals:
            if v not in rows:
                rows[v] = self.nearest(v)
        if len(self.trace) < self.max_trace:
            r, exact = rows[vals[0]]
            self.trace.append((vals[0], r, exact))
        if len(rows) == 1:
            self.index = next(iter(rows.values()))[0]
        else:
            self.index = torch.tensor([rows[v][0] for v in vals], dtype=torch.long)


class TimestepHook(ModelHook):
    """Reads the denoiser's ``timestep`` argument before every forward and selects the table row."""

    def __init__(self, ctx: QuantContext, position: int | None, name: str | None):
        super().__init__()
        self.ctx = ctx
        self.position = position
        self.name = name

    def pre_forward(self, module, *args, **kwargs):
        t = None
        if self.name is not None and self.name in kwargs:
            t = kwargs[self.name]
        elif self.position is not None and len(args) > self.position:
            t = args[self.position]
        self.ctx.select(t)
        return args, kwargs



class QALoRALayer(nn.Module):
    """A quantized ``Linear``/``Conv2d``: ``op(Q_a,t(x), Q_w(W + scaling * B A), bias)``.

    The original module is kept as ``self.base`` (frozen by the trainer, never modified). LoRA weights
    follow PEFT's layout: ``lora_A.weight`` ``[r, in]`` (conv: ``[r, in, kh, kw]``, kaiming-uniform) and
    ``lora_B.weight`` ``[out, r]`` (conv: ``[out, r, 1, 1]``, zero), so ``B A`` starts at 0.
    After :meth:`merge_` the layer holds ``weight_int`` (int8) and ``weight_scale`` (float32 per output
    channel) instead, and computes ``op(Q_a,t(x), weight_int * weight_scale)``: bit-identical outputs.
    Attribute reads it does not know (``in_features``, ``kernel_size``, ``weight``, ...) go to ``base``.
    """

    def __init__(self, base: nn.Module, name: str, spec: LayerSpec, ctx: QuantContext, *,
                 act_symmetric: bool = False, lora_alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        kind = layer_kind(base)
        assert kind == spec.kind, (name, kind, spec.kind)
        assert tuple(base.weight.shape) == spec.shape, (name, tuple(base.weight.shape), spec.shape)
        self.base = base
        self.layer_name = name
        self.spec = spec
        self.__dict__["_ctx"] = ctx  # shared, not a submodule
        w = base.weight
        dev = w.device
        self.w_quant = WeightQuantizer(spec.w_bits, w.shape[0]).to(dev)
        self.a_quant = ActQuantizer(spec.a_bits, act_symmetric).to(dev) if spec.a_bits else None
        self.rank = spec.rank
        self.scaling = 1.0 if lora_alpha is None or not spec.rank else float(lora_alpha) / spec.rank
        self.merged = False
        if spec.rank:
            r = spec.rank
            if kind == "linear":
                self.lora_A = nn.utils.skip_init(nn.Linear, w.shape[1], r, bias=False, device=dev)
                self.lora_B = nn.utils.skip_init(nn.Linear, r, w.shape[0], bias=False, device=dev)
            else:
                self.lora_A = nn.utils.skip_init(nn.Conv2d, base.in_channels, r, base.kernel_size, stride=base.stride,
                                                 padding=base.padding, dilation=base.dilation, bias=False, device=dev)
                self.lora_B = nn.utils.skip_init(nn.Conv2d, r, base.out_channels, 1, bias=False, device=dev)
            with torch.no_grad():
                a = torch.empty(self.lora_A.weight.shape)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                self.lora_A.weight.copy_(a)
                self.lora_B.weight.zero_()
        else:
            self.lora_A = self.lora_B = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)

    @property
    def ctx(self) -> QuantContext:
        return self.__dict__["_ctx"]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in the shape of the base weight (float32)."""
        shape = self.base.weight.shape
        a = self.lora_A.weight.float().reshape(self.rank, -1)
        b = self.lora_B.weight.float().reshape(shape[0], self.rank)
        return (b @ a).reshape(shape) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B A`` before quantization (float32)."""
        w = self.base.weight.float()
        return w + self.delta_weight() if self.rank and not self.merged else w

    def quantized_weight(self) -> torch.Tensor:
        """The weight the quantized forward uses (float32, on the quantization grid)."""
        if self.merged:
            return self.weight_int.float() * self.weight_scale.view(-1, *([1] * (self.weight_int.dim() - 1)))
        return self.w_quant(self.merged_weight())

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias
        if self.merged and self.bias_q is not None:
            bias = self.bias_q.to(x.dtype)
        if self.spec.kind == "linear":
            return F.linear(x, w, bias)
        return self.base._conv_forward(x, w, bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.ctx
        if ctx.mode == "fp":
            return self.base(x, *args, **kwargs)
        if ctx.mode == "observe":
            ctx.observer.observe(self.layer_name, x, ctx.index)
            return self.base(x, *args, **kwargs)
        w = self.quantized_weight().to(x.dtype)
        if self.a_quant is not None:
            x = self.a_quant(x, ctx.index)
        return self._op(x, w)

    @torch.no_grad()
    def int_repr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight_int int8, weight_scale float32 [out])`` of the quantized weight (LoRA folded in)."""
        if self.merged:
            return self.weight_int.clone(), self.weight_scale.clone()
        return self.w_quant.int_repr(self.merged_weight())

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the LoRA into the weight and keep integer weights + scales (drops ``lora_*`` and ``w_quant``'s
        trainable step; the output does not change)."""
        if self.merged:
            return
        w_int, scale = self.int_repr()
        bias = self.base.bias
        self.load_merged(w_int, scale, None if bias is None else bias.detach().float().clone())

    @torch.no_grad()
    def load_merged(self, weight_int: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Switch to integer weights ``weight_int`` (int8, the base weight's shape) and per-output-channel
        ``weight_scale``; ``bias`` (float32) replaces the base bias in the quantized forward."""
        shape = tuple(self.base.weight.shape)
        if tuple(weight_int.shape) != shape or weight_int.dtype != torch.int8:
            raise ValueError(f"layer {self.layer_name!r}: integer weight must be int8 of shape {list(shape)}, got "
                             f"{weight_int.dtype} {list(weight_int.shape)}")
        if tuple(weight_scale.shape) != (shape[0],):
            raise ValueError(f"layer {self.layer_name!r}: weight scale must have shape [{shape[0]}], got "
                             f"{list(weight_scale.shape)}")
        dev = self.base.weight.device
        self.register_buffer("weight_int", weight_int.to(dev))
        self.register_buffer("weight_scale", weight_scale.float().to(dev))
        self.register_buffer("bias_q", None if bias is None else bias.float().to(dev))
        self.lora_A = self.lora_B = None
        self.w_quant.step.requires_grad_(False)
        self.merged = True

    def extra_repr(self) -> str:
        s = f"name={self.layer_name!r}, {self.spec.bits}, rank={self.rank}"
        return s + (", merged" if self.merged else "")

