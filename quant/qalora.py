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
"""

from __future__ import annotations

import bisect
import contextlib
import fnmatch
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.hooks import add_hook, remove_hook
from fastgen.utils.logging import get_logger

from .quantizers import ActQuantizer, WeightQuantizer

logger = get_logger(__name__)

__all__ = [
    "QALoRAConfig", "QALoRALayer", "QuantContext", "LayerSpec", "DEFAULT_KEEP_FP", "MODULATION_LAYERS",
    "FIRST_LAST_LAYERS", "apply_qalora", "remove_qalora", "is_quantized", "plan_layers", "quant_mode",
    "get_denoiser", "qalora_layers", "qalora_state", "merge", "quantized_state", "qalora_summary",
    "trainable_parameters",
]

_STATE = "_fastgen_qalora"
_HOOK = "fastgen_qalora"

#: Glob patterns (``fnmatch`` on the denoiser's qualified module names) of layers kept in full precision
#: by default: time/class/text/position/patch embeddings, and UNet shortcut convs (whose input, after the
#: skip concatenation, is bimodal: Q-Diffusion; EfficientDM keeps them FP too).
DEFAULT_KEEP_FP: tuple[str, ...] = (
    "time_embedding.*", "time_embed.*", "*timestep_embedder.*", "time_text_embed.*", "time_caption_embed.*",
    "add_embedding.*", "class_embedding.*", "*.emb.*",
    "context_embedder", "caption_projection.*", "encoder_hid_proj*", "*text_embedder*",
    "pos_embed.*", "patch_embed.*", "x_embedder",
    "*conv_shortcut",
    "guidance_proj",  # distill.models.GuidanceSD3Transformer2DModel's guidance-weight embedding
)

#: adaLN / timestep-modulation projections (SD3/FLUX ``norm1.linear``, PixArt ``adaln_single.linear``, DiT
#: ``proj_out_1``, UNet ``time_emb_proj``, ...). Kept FP unless ``quantize_modulation=True``. In DiTs they
#: hold about a third of each block's weights, so W4 memory savings need them quantized.
MODULATION_LAYERS: tuple[str, ...] = (
    "*norm1.linear", "*norm1_context.linear", "norm_out.linear", "norm_out.linear_1", "*.norm.linear",
    "adaln_single.linear", "proj_out_1", "*time_emb_proj",
)

#: First and last layers of the supported denoisers (exact top-level names): quantized at W8A8 without
#: LoRA by default (EfficientDM's ``set_first_last_layer_to_8bit``). Patch embeddings are FP (above).
FIRST_LAST_LAYERS: tuple[str, ...] = ("conv_in", "conv_out", "proj_out", "proj_out_2", "norm_out.linear_2")

_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QALoRAConfig:
    """How a denoiser is quantized (EfficientDM QALoRA; the fine-tune settings are in ``quant.FinetuneConfig``).

    Attributes:
        w_bits: weight bits (default 8; range 2-8). Per-output-channel symmetric signed steps.
            EfficientDM reports W8A8, W4A8, W4A4 and W2A8; W4 needs the fine-tune to stay close to FP.
        a_bits: activation bits (default 8; range 2-8), or ``None`` for weight-only quantization. Per-tensor
            steps (a table per timestep, see ``per_timestep_act``). Mobile NPUs run A8 (or A16).
        rank: LoRA rank of every quantized layer (default 32, as EfficientDM; 0 = no LoRA, i.e. plain PTQ).
            Capped at ``min(in_features, out_features)`` per layer. Sensible 4-64.
        lora_alpha: LoRA scaling is ``lora_alpha / rank``; ``None`` (default) means a scaling of 1, as in
            EfficientDM (the per-layer learning rates of the fine-tune set the update size).
        per_timestep_act: one activation step size (and zero point) per calibrated timestep (default True;
            EfficientDM's TALSQ); the row is picked from the real timestep of each call, an unseen timestep
            uses the nearest calibrated one. False: one step per layer for all timesteps.
        act_symmetric: activations signed symmetric (zero point 0) if True; default False: unsigned
            ``[0, 2^b-1]`` with a learned integer zero point (suits post-GELU/SiLU inputs).
        weight_init: ``"mse"`` (default; per-channel clipping ratio minimising the L2.4 error, LAPQ /
            EfficientDM) or ``"max"`` (per-channel max).
        act_init: ``"mse"`` (default) or ``"max"`` for the activation ranges captured at calibration.
        keep_fp: glob patterns of layers kept in full precision (default :data:`DEFAULT_KEEP_FP`; add
            your own with ``DEFAULT_KEEP_FP + ("down_blocks.0.*",)``).
        quantize_modulation: also quantize the adaLN / timestep-modulation projections
            (:data:`MODULATION_LAYERS`; default False: FP).
        eight_bit: glob patterns of layers quantized at W8A8 (A8 only if ``a_bits`` is set) without LoRA
            (default :data:`FIRST_LAST_LAYERS`; ``()`` quantizes them like the others).
        calib_samples: activation values kept per layer and timestep for the ``"mse"`` search (default 2048).
        seed: seed of the LoRA ``A`` initialisation and of the calibration subsampling (default 0).
    """

    w_bits: int = 8
    a_bits: int | None = 8
    rank: int = 32
    lora_alpha: float | None = None
    per_timestep_act: bool = True
    act_symmetric: bool = False
    weight_init: str = "mse"
    act_init: str = "mse"
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    quantize_modulation: bool = False
    eight_bit: tuple[str, ...] = FIRST_LAST_LAYERS
    calib_samples: int = 2048
    seed: int = 0

    def __post_init__(self):
        def bits_ok(b):
            return isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8

        if not bits_ok(self.w_bits):
            raise ValueError(f"w_bits must be an integer in 2..8, got {self.w_bits!r}")
        if self.a_bits is not None and not bits_ok(self.a_bits):
            raise ValueError(f"a_bits must be an integer in 2..8 or None (weight-only), got {self.a_bits!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"rank must be an integer >= 0 (0 = no LoRA, plain PTQ), got {self.rank!r}")
        if self.lora_alpha is not None and not float(self.lora_alpha) > 0:
            raise ValueError(f"lora_alpha must be > 0 or None, got {self.lora_alpha!r}")
        for k in ("weight_init", "act_init"):
            if getattr(self, k) not in ("mse", "max"):
                raise ValueError(f"{k} must be 'mse' or 'max', got {getattr(self, k)!r}")
        for k in ("keep_fp", "eight_bit"):
            v = getattr(self, k)
            if isinstance(v, str) or not all(isinstance(p, str) for p in v):
                raise ValueError(f"{k} must be a tuple of glob patterns, got {v!r}")
            object.__setattr__(self, k, tuple(v))
        if not isinstance(self.calib_samples, int) or self.calib_samples < 16:
            raise ValueError(f"calib_samples must be an integer >= 16, got {self.calib_samples!r}")

    @property
    def bits(self) -> str:
        """``"w4a8"`` style label (``"w4a16"`` for weight-only)."""
        return f"w{self.w_bits}a{self.a_bits or 16}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_fp"], d["eight_bit"] = list(self.keep_fp), list(self.eight_bit)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QALoRAConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown QALoRAConfig fields {unknown}")
        d = dict(d)
        for k in ("keep_fp", "eight_bit"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_string(cls, args: str | None) -> "QALoRAConfig":
        """Parse recipe arguments: ``"w4a8"``, ``"w8a8,r16"``, ``"w4a16"`` (weight-only), options
        ``rN`` (rank), ``flat`` (one activation step for all timesteps), ``sym`` (symmetric activations),
        ``max``/``mse`` (init of both), ``mod`` (quantize modulation layers), ``no8`` (first/last layers at
        the given bits too: ``eight_bit=()``). ``None`` gives the defaults."""
        if args is None or not args.strip():
            return cls()
        parts = [p.strip().lower() for p in args.split(",") if p.strip()]
        m = re.fullmatch(r"w(\d+)a(\d+|fp)", parts[0])
        if not m:
            raise RecipeError(f"expected the bits first, like 'w4a8' or 'w8a8' (w4a16 = weight-only), got {parts[0]!r}")
        a = m.group(2)
        kw: dict[str, Any] = {"w_bits": int(m.group(1)), "a_bits": None if a in ("16", "fp") else int(a)}
        for p in parts[1:]:
            if p[:1] == "r" and p[1:].isdigit():
                kw["rank"] = int(p[1:])
            elif p == "flat":
                kw["per_timestep_act"] = False
            elif p == "sym":
                kw["act_symmetric"] = True
            elif p in ("max", "mse"):
                kw["weight_init"] = kw["act_init"] = p
            elif p == "mod":
                kw["quantize_modulation"] = True
            elif p == "no8":
                kw["eight_bit"] = ()
            else:
                raise RecipeError(f"unknown qalora option {p!r}; options: rN (LoRA rank), flat, sym, max|mse, mod, no8")
        try:
            return cls(**kw)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def to_string(self) -> str:
        """Inverse of :meth:`from_string` for the fields it covers (e.g. ``"w4a8,r16"``)."""
        d = QALoRAConfig()
        s = [self.bits]
        if self.rank != d.rank:
            s.append(f"r{self.rank}")
        if not self.per_timestep_act:
            s.append("flat")
        if self.act_symmetric:
            s.append("sym")
        if self.weight_init == self.act_init == "max":
            s.append("max")
        if self.quantize_modulation:
            s.append("mod")
        if not self.eight_bit:
            s.append("no8")
        return ",".join(s)


# --------------------------------------------------------------------------------------------------
# Which layers, at which precision
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized: ``kind`` (``"linear"``/``"conv2d"``), bits, LoRA rank, weight shape."""

    kind: str
    w_bits: int
    a_bits: int | None
    rank: int
    shape: tuple[int, ...]

    @property
    def bits(self) -> str:
        return f"w{self.w_bits}a{self.a_bits or 16}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "w_bits": self.w_bits, "a_bits": self.a_bits, "rank": self.rank,
                "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerSpec":
        return cls(str(d["kind"]), int(d["w_bits"]), None if d["a_bits"] is None else int(d["a_bits"]),
                   int(d.get("rank", 0)), tuple(int(v) for v in d["shape"]))


def _match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):  # includes diffusers' LoRACompatibleLinear
        return "linear"
    if isinstance(module, nn.Conv2d):  # includes LoRACompatibleConv
        return "conv2d"
    return None


def _check_no_adapters(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if hasattr(m, "base_layer") and hasattr(m, "lora_A"):
            raise UnsupportedPipelineError(
                f"{type(model).__name__} has a PEFT LoRA adapter at {name!r}: QALoRA merges its own LoRA into the "
                "weights before quantizing, so fuse and unload adapters first (pipe.fuse_lora(); "
                "pipe.unload_lora_weights())")
        if getattr(m, "lora_layer", None) is not None:
            raise UnsupportedPipelineError(
                f"{name!r} ({type(m).__name__}) has a LoRA layer attached: fuse it first (pipe.fuse_lora())")


def plan_layers(model: nn.Module, config: QALoRAConfig) -> tuple[dict[str, LayerSpec], dict[str, str]]:
    """Decide for every ``Linear``/``Conv2d`` of ``model`` what happens to it (a quantized model is planned
    as its original modules).

    Returns:
        ``(quantized, kept)``: layer name -> :class:`LayerSpec`, and layer name -> why it stays FP
        (``"keep_fp"``, ``"modulation"``, ``"grouped conv"``).
    """
    quantized: dict[str, LayerSpec] = {}
    kept: dict[str, str] = {}
    wrappers: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue  # inside a QALoRALayer: its original module is planned under the wrapper's name
        if isinstance(m, QALoRALayer):
            wrappers.append(name)
            m = m.base
        kind = _kind(m)
        if kind is None or not name:
            continue
        if _match(name, config.keep_fp):
            kept[name] = "keep_fp"
            continue
        if not config.quantize_modulation and _match(name, MODULATION_LAYERS):
            kept[name] = "modulation"
            continue
        if kind == "conv2d" and m.groups != 1:
            kept[name] = "grouped conv"
            continue
        w = m.weight
        if _match(name, config.eight_bit):
            spec = LayerSpec(kind, 8, 8 if config.a_bits is not None else None, 0, tuple(w.shape))
        else:
            fan_in = w[0].numel()
            rank = min(config.rank, w.shape[0], fan_in)
            spec = LayerSpec(kind, config.w_bits, config.a_bits, rank, tuple(w.shape))
        quantized[name] = spec
    return quantized, kept


# --------------------------------------------------------------------------------------------------
# Per-call context: mode and timestep row
# --------------------------------------------------------------------------------------------------


def _timestep_values(t) -> list[float]:
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.detach().flatten().tolist()] if t.numel() else []
    if isinstance(t, (list, tuple)):
        return [float(v) for v in t]
    return [float(t)]


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
        vals = _timestep_values(t)
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


class _TimestepHook(ModelHook):
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


def _timestep_param(model: nn.Module) -> tuple[int | None, str | None]:
    import inspect

    params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # drop self
    for i, p in enumerate(params):
        if p.name in _TIMESTEP_NAMES:
            return (i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None), p.name
    return None, None


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------


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
        kind = _kind(base)
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


# --------------------------------------------------------------------------------------------------
# Apply / remove
# --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    config: QALoRAConfig
    ctx: QuantContext
    layers: dict[str, tuple[nn.Module, str, QALoRALayer]]
    kept: dict[str, str]
    requires_grad: dict[str, bool]
    extra: dict[str, Any] = field(default_factory=dict)


def get_denoiser(pipe_or_model) -> nn.Module:
    """The denoiser of a pipeline (its ``transformer`` or ``unet``), or the module itself."""
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model
    try:
        from fastgen.adapters import get_adapter

        return get_adapter(pipe_or_model).denoiser(pipe_or_model)
    except UnsupportedPipelineError:
        for attr in ("transformer", "unet"):
            m = getattr(pipe_or_model, attr, None)
            if isinstance(m, nn.Module):
                return m
        raise


def qalora_state(pipe_or_model) -> _State | None:
    """The QALoRA state of a pipeline or denoiser (None when not quantized)."""
    return getattr(get_denoiser(pipe_or_model), _STATE, None)


def is_quantized(pipe_or_model) -> bool:
    return qalora_state(pipe_or_model) is not None


def _require(pipe_or_model) -> _State:
    st = qalora_state(pipe_or_model)
    if st is None:
        raise RuntimeError("QALoRA is not applied to this pipeline: call quant.apply_qalora(pipe, config) first")
    return st


def qalora_layers(pipe_or_model) -> dict[str, QALoRALayer]:
    """Layer name -> :class:`QALoRALayer` of a quantized pipeline or denoiser."""
    return {n: t[2] for n, t in _require(pipe_or_model).layers.items()}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        head, attr = name.rsplit(".", 1)
        return model.get_submodule(head), attr
    return model, name


def _install(model: nn.Module, config: QALoRAConfig, specs: dict[str, LayerSpec], kept: dict[str, str],
             init_weights: bool = True) -> _State:
    ctx = QuantContext(config.per_timestep_act)
    gen = torch.Generator().manual_seed(int(config.seed))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    layers: dict[str, tuple[nn.Module, str, QALoRALayer]] = {}
    try:
        for name, spec in specs.items():
            parent, attr = _parent(model, name)
            base = getattr(parent, attr)
            if _kind(base) != spec.kind or tuple(base.weight.shape) != spec.shape:
                raise ValueError(f"layer {name!r}: expected a {spec.kind} with weight shape {list(spec.shape)}, "
                                 f"found {type(base).__name__} with {list(getattr(base, 'weight', torch.empty(0)).shape)}")
            layer = QALoRALayer(base, name, spec, ctx, act_symmetric=config.act_symmetric,
                                lora_alpha=config.lora_alpha, generator=gen)
            if init_weights:
                layer.w_quant.init_from(base.weight, config.weight_init)
            setattr(parent, attr, layer)
            layers[name] = (parent, attr, layer)
        position, tname = _timestep_param(model)
        if tname is None and config.per_timestep_act and config.a_bits is not None:
            raise UnsupportedPipelineError(
                f"{type(model).__name__}.forward has no timestep argument; use per_timestep_act=False")
        add_hook(model, _TimestepHook(ctx, position, tname), _HOOK)
    except BaseException:
        for parent, attr, layer in reversed(list(layers.values())):
            setattr(parent, attr, layer.base)
        raise
    st = _State(config, ctx, layers, kept, flags)
    setattr(model, _STATE, st)
    return st


def apply_qalora(pipe_or_model, config: QALoRAConfig | None = None, *, specs: dict[str, LayerSpec] | None = None,
                 _init_weights: bool = True):
    """Wrap the denoiser's ``Linear``/``Conv2d`` layers in :class:`QALoRALayer` (see :class:`QALoRAConfig`).

    Weight step sizes are initialised from the weights right away (data-free); activation tables need
    :func:`quant.calibrate` (or :func:`quant.load`) before a quantized forward. Calling it again replaces
    the config (and drops the calibration). Returns ``pipe_or_model``.

    Args:
        pipe_or_model: a diffusers pipeline (its denoiser is quantized) or a denoiser module.
        config: the quantization settings (default ``QALoRAConfig()``, W8A8 rank 32).
        specs: explicit layer plan (name -> :class:`LayerSpec`) instead of the one derived from ``config``
            (used by :func:`quant.load`).

    Raises:
        UnsupportedPipelineError: unsupported pipeline, or PEFT/diffusers LoRA adapters still attached.
    """
    config = config or QALoRAConfig()
    if not isinstance(config, QALoRAConfig):
        raise TypeError(f"apply_qalora expects a QALoRAConfig, got {type(config).__name__}")
    model = get_denoiser(pipe_or_model)
    if getattr(model, _STATE, None) is not None:
        remove_qalora(model)
    _check_no_adapters(model)
    planned, kept = plan_layers(model, config)
    if specs is None:
        specs = planned
    else:
        kept = {n: r for n, r in kept.items() if n not in specs}
    _install(model, config, dict(specs), kept, init_weights=_init_weights)
    n8 = sum(1 for s in specs.values() if s.rank == 0 and s.w_bits == 8 and config.w_bits != 8)
    logger.info("qalora %s on %s: %d layers quantized (%d at W8A8 first/last), %d kept FP", config.bits,
                type(model).__name__, len(specs), n8, len(kept))
    return pipe_or_model


def remove_qalora(pipe_or_model):
    """Put the original modules back and drop the hook: the pipeline is bit-exactly as before
    :func:`apply_qalora` (parameters' ``requires_grad`` flags included). No-op if not applied."""
    model = get_denoiser(pipe_or_model)
    st: _State | None = getattr(model, _STATE, None)
    if st is None:
        return pipe_or_model
    for parent, attr, layer in reversed(list(st.layers.values())):
        setattr(parent, attr, layer.base)
    remove_hook(model, _HOOK)
    for n, p in model.named_parameters():
        if n in st.requires_grad:
            p.requires_grad_(st.requires_grad[n])
    delattr(model, _STATE)
    return pipe_or_model


@contextlib.contextmanager
def quant_mode(pipe_or_model, mode: str) -> Iterator[QuantContext]:
    """Run the quantized denoiser in ``mode`` (``"fp"``: the original FP modules, i.e. the teacher;
    ``"quant"``; ``"observe"``) inside the ``with`` block; no-op context if not quantized."""
    if mode not in ("fp", "quant", "observe"):
        raise ValueError(f"mode must be 'fp', 'quant' or 'observe', got {mode!r}")
    st = qalora_state(pipe_or_model)
    if st is None:
        yield None
        return
    old = st.ctx.mode
    st.ctx.mode = mode
    try:
        yield st.ctx
    finally:
        st.ctx.mode = old


def trainable_parameters(pipe_or_model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The parameters QALoRA trains, grouped: ``{"lora": [...], "weight_step": [...], "act_step": [...]}``
    with ``(layer.param name, parameter)`` entries in layer order."""
    out: dict[str, list[tuple[str, nn.Parameter]]] = {"lora": [], "weight_step": [], "act_step": []}
    for name, layer in qalora_layers(pipe_or_model).items():
        if layer.merged:
            continue
        if layer.rank:
            out["lora"] += [(f"{name}.lora_A.weight", layer.lora_A.weight), (f"{name}.lora_B.weight", layer.lora_B.weight)]
        out["weight_step"].append((f"{name}.w_quant.step", layer.w_quant.step))
        if layer.a_quant is not None:
            out["act_step"].append((f"{name}.a_quant.step", layer.a_quant.step))
            if not layer.a_quant.symmetric:
                out["act_step"].append((f"{name}.a_quant.zero_point", layer.a_quant.zero_point))
    return out


# --------------------------------------------------------------------------------------------------
# Merge and export of the integer form
# --------------------------------------------------------------------------------------------------

FORMAT = "fastgen-quant-v1"


def quantized_state(pipe_or_model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The integer form of a quantized denoiser, without changing it: ``(tensors, header)``.

    Tensors per quantized layer ``L``: ``L.weight_int`` (int8; values in the ``w_bits`` range),
    ``L.weight_scale`` (float32 ``[out]``; weight = ``weight_int * weight_scale``), ``L.bias`` (if any,
    float32), and with activation quantization ``L.act_scale`` (float32 ``[T]``) and ``L.act_zero_point``
    (int32 ``[T]``; ``x_int = clamp(round(x / act_scale[t]) + act_zero_point[t], range)``), row ``t``
    belonging to ``timesteps[t]`` (float64 ``[T]``, ascending; absent for ``per_timestep_act=False``).
    The header (JSON) holds the format, denoiser class, config and per-layer ``LayerSpec`` + act range.
    """
    model = get_denoiser(pipe_or_model)
    st = _require(model)
    if st.config.a_bits is not None and not st.ctx.calibrated:
        raise RuntimeError("the activation quantizers are not calibrated: run quant.calibrate(pipe, calibration) "
                           "before exporting")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, (_, _, layer) in st.layers.items():
        w_int, scale = layer.int_repr()
        tensors[f"{name}.weight_int"] = w_int.contiguous().cpu()
        tensors[f"{name}.weight_scale"] = scale.float().contiguous().cpu()
        bias = layer.bias_q if layer.merged else layer.base.bias
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float().contiguous().cpu()
        info = layer.spec.to_dict()
        if layer.a_quant is not None:
            s, z = layer.a_quant.qparams()
            tensors[f"{name}.act_scale"] = s.contiguous().cpu()
            tensors[f"{name}.act_zero_point"] = z.contiguous().cpu()
            info["act_symmetric"] = layer.a_quant.symmetric
            info["act_range"] = [layer.a_quant.qmin, layer.a_quant.qmax]
        info["weight_range"] = [layer.w_quant.qmin, layer.w_quant.qmax]
        layers[name] = info
    if st.config.per_timestep_act and st.ctx.calibrated:
        tensors["timesteps"] = torch.tensor(st.ctx.keys, dtype=torch.float64)
    header = {"format": FORMAT, "method": "qalora", "denoiser": type(model).__name__, "bits": st.config.bits,
              "config": st.config.to_dict(), "per_timestep_act": st.config.per_timestep_act,
              "timesteps": list(st.ctx.keys) if st.config.per_timestep_act else None, "layers": layers,
              "kept_fp": dict(st.kept)}
    return tensors, header


def merge(pipe_or_model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fold every LoRA into its weight and switch the layers to integer weights + scales, in place.

    The outputs do not change (bit-identical); the LoRA and weight-step parameters are dropped, so the
    model cannot be fine-tuned further (:func:`remove_qalora` still restores the FP model). Returns
    :func:`quantized_state` (the int8 weights, per-channel scales and per-timestep activation tables that
    a real-kernel deployment step consumes; save it with :func:`quant.save`).
    """
    for layer in qalora_layers(pipe_or_model).values():
        layer.merge_()
    return quantized_state(pipe_or_model)


def qalora_summary(pipe_or_model) -> dict[str, Any] | None:
    """What is quantized and which timestep rows the denoiser calls since the last ``ctx.reset_trace()``
    used (``fallbacks``: calls whose timestep was not calibrated and used the nearest row)."""
    st = qalora_state(pipe_or_model)
    if st is None:
        return None
    layers = [t[2] for t in st.layers.values()]
    n_q = sum(t.base.weight.numel() for t in layers)
    n_all = sum(p.numel() for n, p in get_denoiser(pipe_or_model).named_parameters() if ".lora_" not in n
                and "_quant." not in n)
    return {
        "bits": st.config.bits, "layers_quantized": len(layers), "layers_fp": len(st.kept),
        "eight_bit_layers": sum(1 for t in layers if t.spec.rank == 0 and t.spec.w_bits == 8 and st.config.w_bits != 8),
        "quantized_weight_fraction": round(n_q / max(1, n_all), 4),
        "merged": all(t.merged for t in layers) if layers else False,
        "calibrated_timesteps": len(st.ctx.keys) if st.config.per_timestep_act else (1 if st.ctx.calibrated else 0),
        "calls": len(st.ctx.trace), "fallbacks": sum(1 for _, _, exact in st.ctx.trace if not exact),
    }


if __name__ == "__main__":  # python -m fastgen.quant.qalora ... (the CLI lives in quant.trainer)
    from fastgen.quant.trainer import main as _main

    raise SystemExit(_main())
