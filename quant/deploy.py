"""Real int8 kernels for a diffusers denoiser's ``Linear`` layers: dynamic or static (learned) activations.

:func:`to_int8` swaps the denoiser's ``Linear`` layers for modules that compute with **int8 × int8 → int32
matrix multiplications** (``torch._int_mm``: oneDNN/VNNI on x86 CPUs, cuBLASLt on CUDA; or torchao's
``Int8Tensor``), not the fake quantization of :mod:`quant.qalora`:

* ``mode="dynamic"``: each call quantizes the activations per token (symmetric int8, the scale from the
  row's max), the weights are int8 per output channel. No calibration (torchao's
  ``Int8DynamicActivationInt8WeightConfig`` does the same).
* ``mode="static"``: the activations are quantized with the **learned per-tensor step sizes and zero
  points of a QALoRA/PTQ model, one row per calibrated timestep** (EfficientDM's TALSQ tables,
  He et al., ICLR 2024, arXiv 2310.03270). A hook on the denoiser reads each call's ``timestep`` and picks
  the nearest calibrated row, exactly as :mod:`quant.qalora` does; the integer GEMM then reproduces the
  fake-quantized QALoRA layer (``(x_q - z) s · W_int s_w``) up to float rounding, the zero point folded
  into a per-channel correction (``acc - z · Σ_k W_int``).

``from_qalora=True`` (default) takes the integer weights (LoRA folded in, learned per-channel scales;
4-bit weights run in the int8 kernel with values in [-8, 7]) and the activation tables from a pipeline that
:func:`quant.quantize`/:func:`quant.load`/:func:`quant.apply_qalora` quantized; otherwise the weights are
quantized here per output channel (absolute max). QALoRA ``Conv2d`` layers (UNets) stay fake-quantized:
there is no int8 convolution here.

``compile=True`` compiles the repeated transformer blocks (regional ``torch.compile``), which fuses the
activation quantization and the dequantization into the GEMM's neighbours: int8 only pays off compiled.
The original modules are kept outside the module tree: :func:`remove_int8` restores the denoiser
bit-exactly (QALoRA layers included), ``keep_original=False`` drops them for the real memory saving.

The recipe strings ``"int8"``, ``"int8:dynamic"``, ``"int8:static"`` (options ``torchao``, ``eager``)
go through :func:`fastgen.accelerate`; see :mod:`quant.recipe`. Measured speed: ``python -m
quant.bench_int8``.

Example::

    pipe = fastgen.load_default()
    quant.to_int8(pipe)                                   # dynamic int8, compiled blocks
    quant.quantize(pipe2, "w8a8"); quant.to_int8(pipe2, mode="static")   # learned per-timestep scales
    quant.remove_int8(pipe)                               # bit-exact FP32 again
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from fastgen.api import adopt, release
from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.hooks import add_hook, remove_hook
from fastgen.prompts import check_calibration_prompts
from fastgen.utils.logging import get_logger

from .apply import plan_layers, qalora_state
from .common import get_denoiser, parent_module, timestep_param, timestep_values
from .config import DEFAULT_KEEP_FP, QALoRAConfig
from .layers import QALoRALayer

logger = get_logger(__name__)

__all__ = ["Int8Config", "Int8Linear", "to_int8", "remove_int8", "is_int8", "int8_summary", "weight_memory",
           "capture_denoiser_inputs", "capture_denoiser_calls", "BACKENDS", "MODES", "Int8State", "int8_state",
           "compile_blocks", "require_torchao"]

MODES = ("dynamic", "static", "fp8")
BACKENDS = ("intmm", "torchao")
_STATE = "_fastgen_int8"
_HOOK = "fastgen_int8_rows"
#: Smallest activation scale of the dynamic quantizer (all-zero rows).
_EPS = 1e-8


@dataclass(frozen=True)
class Int8Config:
    """How :func:`to_int8` converts a denoiser.

    Attributes:
        mode: ``"dynamic"`` (default; per-token activation scales computed each call, no calibration),
            ``"static"`` (the QALoRA/PTQ per-timestep activation tables; needs a quantized pipeline) or
            ``"fp8"`` (CUDA GPUs with FP8 tensor cores, compute capability >= 8.9: torchao
            ``Float8DynamicActivationFloat8WeightConfig``).
        backend: ``"intmm"`` (default; this module's ``torch._int_mm`` layer: dynamic and static, fastest
            measured on CPU at small shapes) or ``"torchao"`` (torchao ``Int8Tensor`` weights; dynamic and
            static with one timestep row per call). fp8 always uses torchao.
        compile: ``torch.compile`` the repeated transformer blocks (default True; int8 is slower than
            fp32 eager on CPU without it). False: eager.
        from_qalora: take integer weights and activation tables from a QALoRA/PTQ-quantized pipeline
            (default True); False: quantize the FP weights here (the QALoRA layers' original modules).
        keep_fp: glob patterns of Linear layers left in float (default: QALoRA's
            :data:`~quant.DEFAULT_KEEP_FP`: embeddings, time/text projections).
        quantize_modulation: also convert the adaLN / timestep-modulation projections (default False: they
            see one token per sample, where an int8 GEMM has nothing to win).
        keep_original: keep the original modules for :func:`remove_int8` (default True). False frees them
            (the real weight-memory saving) and makes the conversion one-way.
        calibration_prompts: ``int8:static`` on a pipeline that is not quantized yet: what its quick W8A8
            calibration runs on (no effect on speed): None (default) = 4 prompts of
            :func:`fastgen.prompts.default_prompts` (generic; a zoo model's own world; DiT labels), a tuple
            of your prompts, or a prompt file of one per line (recipe option ``prompts=FILE``).
    """

    mode: str = "dynamic"
    backend: str = "intmm"
    compile: bool = True
    from_qalora: bool = True
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    quantize_modulation: bool = False
    keep_original: bool = True
    calibration_prompts: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        object.__setattr__(self, "calibration_prompts", check_calibration_prompts(self.calibration_prompts))

    @classmethod
    def from_string(cls, args: str | None) -> "Int8Config":
        """Recipe arguments: ``"dynamic"`` (default), ``"static"``, ``"fp8"``, then options ``torchao``,
        ``intmm``, ``eager`` (no compile), ``fp`` (ignore QALoRA weights), ``mod`` (quantize modulation),
        ``prompts=FILE`` (calibration prompts of ``static``, one per line)."""
        if args is None or not args.strip():
            return cls()
        kw: dict[str, Any] = {}
        for raw in (s.strip() for s in args.split(",") if s.strip()):
            p = raw.lower()
            if p.startswith("prompts="):
                kw["calibration_prompts"] = raw.split("=", 1)[1]
            elif p in MODES:
                kw["mode"] = p
            elif p in BACKENDS:
                kw["backend"] = p
            elif p == "eager":
                kw["compile"] = False
            elif p == "compile":
                kw["compile"] = True
            elif p == "fp":
                kw["from_qalora"] = False
            elif p == "mod":
                kw["quantize_modulation"] = True
            else:
                raise RecipeError(f"unknown int8 option {p!r}; use dynamic|static|fp8, torchao|intmm, eager, fp, mod, "
                                  "prompts=FILE (e.g. 'int8:static,eager')")
        try:
            return cls(**kw)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def to_string(self) -> str:
        d = Int8Config()
        s = [self.mode]
        if self.backend != d.backend:
            s.append(self.backend)
        if not self.compile:
            s.append("eager")
        if not self.from_qalora:
            s.append("fp")
        if self.quantize_modulation:
            s.append("mod")
        if isinstance(self.calibration_prompts, str):
            s.append(f"prompts={self.calibration_prompts}")
        return ",".join(s)


@torch.no_grad()
def capture_denoiser_calls(pipe, call_kwargs: dict[str, Any] | None = None, *, steps: int = 4,
                           stop_after: int | None = None) -> list[dict[str, Any]]:
    """The keyword arguments of the real denoiser calls of one ``steps``-step run of ``pipe`` with
    ``call_kwargs`` (default: :func:`fastgen.testing.default_call_kwargs`), tensors cloned,
    ``return_dict=False``; the run stops after ``stop_after`` calls when given.

    These are the example inputs of an export, its calibration data and the inputs of a per-call
    benchmark: with classifier-free guidance the batch is the doubled CFG batch (2 for one prompt)."""
    from fastgen.adapters import capture_denoiser_calls as capture
    from fastgen.testing import default_call_kwargs

    kw = dict(default_call_kwargs(pipe, steps=steps) if call_kwargs is None else call_kwargs)
    kw.setdefault("num_inference_steps", steps)
    calls = capture(pipe, kw, model=get_denoiser(pipe), stop_after=stop_after)
    if any(args for args, _ in calls):
        raise UnsupportedPipelineError(f"{type(pipe).__name__} calls its denoiser with positional arguments; "
                                       "pass the example inputs yourself")
    return [{**kwargs, "return_dict": False} for _, kwargs in calls]


def capture_denoiser_inputs(pipe, call_kwargs: dict[str, Any] | None = None, *, index: int = 1,
                            steps: int = 4) -> dict[str, Any]:
    """The keyword arguments of denoiser call ``index`` of a ``steps``-step run (see
    :func:`capture_denoiser_calls`; the run stops right after it)."""
    calls = capture_denoiser_calls(pipe, call_kwargs, steps=steps, stop_after=index + 1)
    if len(calls) <= index:
        raise RuntimeError(f"the pipeline made only {len(calls)} denoiser calls; cannot capture call {index}")
    return calls[index]


# --------------------------------------------------------------------------------------------------
# Timestep rows (static mode)
# --------------------------------------------------------------------------------------------------


class _Rows:
    """The activation-table row of the current denoiser call, shared by the static layers of one denoiser.

    ``index`` is a LongTensor (``[1]``: one row for the whole batch, ``[B]``: one per sample) that the
    compiled blocks read as a graph input, so a new timestep never recompiles.
    """

    def __init__(self, keys: list[float]):
        self.keys = list(keys)
        self.index = torch.zeros(1, dtype=torch.long)
        self._one = [torch.tensor([i], dtype=torch.long) for i in range(max(1, len(self.keys)))]
        self.trace: list[tuple[float, int, bool]] = []
        self.listeners: list[Any] = []

    def nearest(self, t: float) -> tuple[int, bool]:
        keys = self.keys
        if not keys:
            return 0, True
        i = bisect.bisect_left(keys, t)
        if i == len(keys) or (i > 0 and abs(keys[i - 1] - t) <= abs(keys[i] - t)):
            i -= 1
        return i, abs(keys[i] - t) <= 1e-5 * max(1.0, abs(t))

    def select(self, t) -> None:
        vals = timestep_values(t)
        if not vals:
            if len(self.keys) > 1:
                raise RuntimeError("int8 static mode needs the denoiser's timestep argument to pick the activation "
                                   "scales, but this call passed none")
            vals = [0.0]
        rows = [self.nearest(v) for v in vals]
        if len(self.trace) < 10_000:
            self.trace.append((vals[0], rows[0][0], rows[0][1]))
        if all(r[0] == rows[0][0] for r in rows):
            self.index = self._one[rows[0][0]]
        else:
            self.index = torch.tensor([r[0] for r in rows], dtype=torch.long)
        for fn in self.listeners:
            fn(self.index)


class _RowsHook(ModelHook):
    def __init__(self, rows: _Rows, position: int | None, name: str | None):
        super().__init__()
        self.rows, self.position, self.name = rows, position, name

    def pre_forward(self, module, *args, **kwargs):
        t = kwargs.get(self.name) if self.name is not None and self.name in kwargs else (
            args[self.position] if self.position is not None and len(args) > self.position else None)
        self.rows.select(t)
        return args, kwargs


# --------------------------------------------------------------------------------------------------
# The int8 layer (torch._int_mm)
# --------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with int8 activations and weights and an int32 accumulator (``torch._int_mm``).

    Weights: ``weight_int`` (int8 ``[out, in]``, stored transposed for the kernel) × ``weight_scale``
    (float32 per output channel). Activations: dynamic per-token symmetric int8, or (static) a table of
    per-tensor ``(act_scale, act_zero_point)`` rows picked by the shared timestep row (``rows``).
    Unsigned 8-bit tables (``[0, 255]`` with a zero point, QALoRA's default) are shifted by 128 into int8;
    the zero point is removed exactly in int32 with the weight's per-channel sums.
    """

    def __init__(self, name: str, weight_int: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                 act_scale: torch.Tensor | None = None, act_zero_point: torch.Tensor | None = None,
                 act_range: tuple[int, int] | None = None, rows: _Rows | None = None):
        super().__init__()
        assert weight_int.dtype == torch.int8 and weight_int.dim() == 2, (weight_int.dtype, weight_int.shape)
        out_f, in_f = weight_int.shape
        assert weight_scale.shape == (out_f,), (weight_scale.shape, out_f)
        self.layer_name = name
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.register_buffer("weight_t", weight_int.t().contiguous())  # [in, out]: _int_mm's right operand
        self.register_buffer("weight_scale", weight_scale.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.static = act_scale is not None
        if self.static:
            assert rows is not None and act_range is not None
            qmin, qmax = int(act_range[0]), int(act_range[1])
            shift = 128 if qmax > 127 else 0  # unsigned 8-bit -> int8
            self.qmin, self.qmax = qmin - shift, qmax - shift
            assert -128 <= self.qmin <= self.qmax <= 127, (act_range, shift)
            zp = act_zero_point.detach().to(torch.int32).flatten() - shift
            self.register_buffer("act_scale", act_scale.detach().float().flatten().contiguous())
            self.register_buffer("act_zero_point", zp.contiguous())
            self.has_zero_point = bool((zp != 0).any())
            self.register_buffer("weight_sum", weight_int.to(torch.int32).sum(1).contiguous())  # [out]
            self.__dict__["_rows"] = rows  # shared; not a submodule
        else:
            self.qmin, self.qmax = -127, 127

    @property
    def weight_int(self) -> torch.Tensor:
        return self.weight_t.t()

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        lead = x.shape[:-1]
        if self.static:
            idx = self.__dict__["_rows"].index.to(x.device)
            s, z = self.act_scale[idx], self.act_zero_point[idx]
            if idx.numel() > 1:  # one row per sample (mixed timesteps in one call)
                if x.dim() < 2 or x.shape[0] != idx.numel():
                    raise RuntimeError(f"{self.layer_name}: {idx.numel()} timestep rows for an input of shape "
                                       f"{tuple(x.shape)}; give every sample of a call the same timestep")
                view = (-1,) + (1,) * (x.dim() - 1)
                s, z = s.view(view), z.view(view)
            xq = torch.clamp(torch.round(xf / s) + z, self.qmin, self.qmax).to(torch.int8)
            acc = torch._int_mm(xq.reshape(-1, self.in_features), self.weight_t).view(*lead, self.out_features)
            if self.has_zero_point:
                acc = acc - z * self.weight_sum
            y = acc.float() * (s * self.weight_scale)
        else:
            s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / 127.0
            xq = torch.clamp(torch.round(xf / s), -127, 127).to(torch.int8)
            acc = torch._int_mm(xq.reshape(-1, self.in_features), self.weight_t).view(*lead, self.out_features)
            y = acc.float() * s * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def extra_repr(self) -> str:
        kind = f"static rows={self.act_scale.numel()}" if self.static else "dynamic"
        return f"name={self.layer_name!r}, in={self.in_features}, out={self.out_features}, {kind}"


# --------------------------------------------------------------------------------------------------
# torchao layers
# --------------------------------------------------------------------------------------------------


def require_torchao():
    """The ``torchao`` module, or a clear error naming the ``quant`` extra when it is not installed (its harmless
    CUDA-kernel load messages on CPU-only torch are silenced)."""
    from fastgen.errors import require_extra

    import logging
    import warnings

    # torchao logs failed loads of its CUDA kernels on CPU-only torch (harmless; its CPU paths work)
    lg = logging.getLogger("torchao")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return require_extra("torchao", "quant", "int8 with backend='torchao' (and fp8)")
    finally:
        lg.setLevel(old)


class _TorchaoLinear(nn.Module):
    """A Linear whose weight is a torchao ``Int8Tensor`` (int8 weights + per-channel scales, activation
    quantization dynamic per row or static per tensor). Static scales are copied in per call (one row)."""

    def __init__(self, name: str, weight_int, weight_scale, bias, *, act_scale=None, act_zero_point=None,
                 act_range=None, rows: _Rows | None = None):
        super().__init__()
        require_torchao()
        from torchao.quantization import PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows import Int8Tensor, QuantizeTensorToInt8Kwargs

        out_f, in_f = weight_int.shape
        self.layer_name = name
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.static = act_scale is not None
        kw: dict[str, Any] = {}
        if self.static:
            qmin, qmax = act_range
            shift = 128 if qmax > 127 else 0
            self.register_buffer("act_table", act_scale.detach().float().flatten().clone())
            self.register_buffer("zp_table", (act_zero_point.detach().to(torch.int32).flatten() - shift).clone())
            # torchao clamps static activations to [-128, 127]: exact for 8-bit tables only
            if (qmin - shift, qmax - shift) != (-128, 127) and (qmin, qmax) != (-128, 127):
                raise UnsupportedPipelineError(f"{name}: torchao static int8 supports 8-bit activation tables only "
                                               f"(got range {act_range}); use backend='intmm'")
            self._cur_s = torch.ones(1, 1, 1)
            self._cur_z = torch.zeros(1, 1, 1, dtype=torch.int8)
            kw = dict(act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerTensor(),
                                                                   mapping_type=MappingType.ASYMMETRIC),
                      act_quant_scale=self._cur_s, act_quant_zero_point=self._cur_z)
            rows.listeners.append(self._set_row)
        else:
            kw = dict(act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerRow(),
                                                                  mapping_type=MappingType.SYMMETRIC))
        w = Int8Tensor(weight_int.contiguous(), weight_scale.detach().float().view(-1, 1).contiguous(), [1, in_f],
                       torch.float32, **kw)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def _set_row(self, index: torch.Tensor) -> None:
        if index.numel() != 1:
            raise RuntimeError(f"{self.layer_name}: backend='torchao' static int8 takes one timestep per call; "
                               "use backend='intmm' for mixed timesteps in one batch")
        i = int(index[0])
        self._cur_s.fill_(float(self.act_table[i]))
        self._cur_z.fill_(int(self.zp_table[i]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x3 = x.float().reshape(1, -1, self.in_features)  # per-tensor static scale has the input's rank (3)
        y = F.linear(x3, self.weight, self.bias)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, in={self.in_features}, out={self.out_features}, torchao " + (
            "static" if self.static else "dynamic")


# --------------------------------------------------------------------------------------------------
# Convert / restore
# --------------------------------------------------------------------------------------------------


@dataclass
class Int8State:
    """What :func:`to_int8` keeps on the denoiser (:func:`int8_state`): the config, the replaced layers (name ->
    ``(parent, attribute, original, int8 module)``), the compiled blocks, the activation rows of static mode,
    the layers kept FP, where the weights came from, and ``extra`` (free for callers, e.g. the ``int8`` recipe)."""

    config: Int8Config
    layers: dict[str, tuple[nn.Module, str, nn.Module, nn.Module]]  # name -> (parent, attr, original, new)
    compiled: list[tuple[nn.Module, Any]]
    rows: _Rows | None
    kept: dict[str, str]
    source: str
    qalora_conv: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def int8_state(pipe_or_model) -> Int8State | None:
    """The :class:`Int8State` of a pipeline or denoiser converted by :func:`to_int8` (None when it is not)."""
    return getattr(get_denoiser(pipe_or_model), _STATE, None)


def is_int8(pipe_or_model) -> bool:
    """Whether :func:`to_int8` converted the pipeline's (or the module's) Linear layers."""
    return int8_state(pipe_or_model) is not None


def _absmax_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(_EPS)
    w_int = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return w_int, scale


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (regional compilation): the ``_repeated_blocks`` classes diffusers
    declares, else every ``ModuleList`` of >= 2 modules of one class."""
    names = set(getattr(model, "_repeated_blocks", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    out: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(b) for b in m}) == 1 and \
                any(isinstance(s, (nn.Linear, Int8Linear, _TorchaoLinear)) for s in m[0].modules()):
            out.extend(list(m))
            inside.update(id(s) for s in m.modules())
    return out


def compile_blocks(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """``torch.compile`` the repeated blocks of ``model`` in place (regional compilation; the whole model when it
    has none). Returns ``(module, previous _compiled_call_impl)`` pairs, which :func:`remove_int8` uses to undo it."""
    blocks = _repeated_blocks(model) or [model]
    done = []
    for b in blocks:
        done.append((b, getattr(b, "_compiled_call_impl", None)))
        b.compile()
    return done


def _sources(model: nn.Module, config: Int8Config) -> tuple[dict[str, dict[str, Any]], dict[str, str], str, int]:
    """name -> {weight_int, weight_scale, bias, act_*} for every Linear to convert; kept; source; #QALoRA convs."""
    qst = qalora_state(model)
    out: dict[str, dict[str, Any]] = {}
    if qst is not None and config.from_qalora:
        if config.mode == "static" and qst.config.a_bits is not None and not qst.ctx.calibrated:
            raise RuntimeError("the QALoRA activation tables are not calibrated: run quant.calibrate(pipe, calib) "
                               "(or quant.quantize / quant.load) before to_int8(mode='static')")
        n_conv = 0
        for name, (_, _, layer) in qst.layers.items():
            if layer.spec.kind != "linear":
                n_conv += 1
                continue
            w_int, scale = layer.int_repr()
            bias = layer.bias_q if layer.merged else layer.base.bias
            d: dict[str, Any] = {"weight_int": w_int, "weight_scale": scale, "bias": bias}
            if config.mode == "static" and layer.a_quant is not None:
                s, z = layer.a_quant.qparams()
                d.update(act_scale=s, act_zero_point=z, act_range=(layer.a_quant.qmin, layer.a_quant.qmax))
            out[name] = d
        return out, dict(qst.kept), f"qalora {qst.config.bits}", n_conv
    if config.mode == "static":
        raise UnsupportedPipelineError(
            "int8 static mode needs learned activation scales: quantize first with quant.quantize(pipe, 'w8a8') "
            "(data-free PTQ calibration) or quant.load(pipe, FILE) (a fine-tuned QALoRA file), or use "
            "mode='dynamic'" + (" (from_qalora=False ignores the QALoRA tables)" if qst is not None else ""))
    plan, kept = plan_layers(model, QALoRAConfig(w_bits=8, a_bits=8, rank=0, keep_fp=config.keep_fp,
                                                 quantize_modulation=config.quantize_modulation, eight_bit=()))
    modules = dict(model.named_modules())
    for name, spec in plan.items():
        if spec.kind != "linear":
            continue
        m = modules[name]
        base = m.base if isinstance(m, QALoRALayer) else m
        w_int, scale = _absmax_int8(base.weight)
        out[name] = {"weight_int": w_int, "weight_scale": scale, "bias": base.bias}
    return out, kept, "fp32 weights (absmax per channel)", 0


def to_int8(pipe_or_model, mode: str | Int8Config = "dynamic", *, from_qalora: bool = True, compile: bool = True,
            backend: str = "intmm", keep_original: bool = True, **config_kwargs: Any):
    """Convert the denoiser's ``Linear`` layers to real int8 kernels (see the module docstring).

    Args:
        pipe_or_model: a diffusers pipeline or its denoiser (optionally QALoRA/PTQ-quantized).
        mode: ``"dynamic"``, ``"static"`` or ``"fp8"``, or a full :class:`Int8Config` (then the keyword
            arguments are ignored).
        from_qalora, compile, backend, keep_original, config_kwargs: :class:`Int8Config` fields.

    Returns:
        ``pipe_or_model``. Calling it again first undoes the previous conversion.

    Raises:
        UnsupportedPipelineError: static mode on a pipeline without activation tables, fp8 without a GPU
            that has FP8, or a denoiser with no ``Linear`` layer to convert (the message says which layers
            were looked at).
        MissingExtraError: ``backend="torchao"``/fp8 without torchao (``pip install 'fastgen[quant]'``).
    """
    config = mode if isinstance(mode, Int8Config) else Int8Config(
        mode=mode, from_qalora=from_qalora, compile=compile, backend=backend, keep_original=keep_original,
        **config_kwargs)
    model = get_denoiser(pipe_or_model)
    if getattr(model, _STATE, None) is not None:
        remove_int8(model)
    if config.mode == "fp8":
        _to_fp8(model, config)
    else:
        _to_int8(model, config)
    if pipe_or_model is not model:  # called on a pipeline: fastgen.summary / fastgen.remove see it as "int8"
        adopt(pipe_or_model, "int8", config, False)
    return pipe_or_model


def _to_int8(model: nn.Module, config: Int8Config) -> None:
    if config.backend == "torchao":
        require_torchao()
    sources, kept, source, n_conv = _sources(model, config)
    if not sources:
        raise UnsupportedPipelineError(
            f"{type(model).__name__} has no Linear layer to convert to int8 (kept in float: "
            f"{', '.join(sorted(kept)[:8]) or 'none'}); int8 kernels here cover nn.Linear only")
    rows = None
    if config.mode == "static":
        qst = qalora_state(model)
        rows = _Rows(list(qst.ctx.keys) if qst.config.per_timestep_act else [])
    cls = _TorchaoLinear if config.backend == "torchao" else Int8Linear
    layers: dict[str, tuple[nn.Module, str, nn.Module, nn.Module]] = {}
    try:
        for name, d in sources.items():
            parent, attr = parent_module(model, name)
            original = getattr(parent, attr)
            dev = d["weight_int"].device
            act = {}
            if "act_scale" in d:
                act = dict(act_scale=d["act_scale"], act_zero_point=d["act_zero_point"], act_range=d["act_range"],
                           rows=rows)
            new = cls(name, d["weight_int"], d["weight_scale"], d["bias"], **act).to(dev)
            setattr(parent, attr, new)
            layers[name] = (parent, attr, original, new)
        if rows is not None:
            position, tname = timestep_param(model)
            if tname is None and len(rows.keys) > 1:
                raise UnsupportedPipelineError(f"{type(model).__name__}.forward has no timestep argument: per-timestep "
                                               "activation tables cannot be used (quantize with per_timestep_act=False)")
            add_hook(model, _RowsHook(rows, position, tname), _HOOK)
        compiled = compile_blocks(model) if config.compile else []
    except BaseException:
        for parent, attr, original, _ in reversed(list(layers.values())):
            setattr(parent, attr, original)
        remove_hook(model, _HOOK)
        raise
    st = Int8State(config, layers, compiled, rows, kept, source, n_conv)
    if not config.keep_original:
        for k, (parent, attr, _, new) in list(layers.items()):
            layers[k] = (parent, attr, None, new)
    setattr(model, _STATE, st)
    logger.info("int8 %s (%s) on %s: %d Linear layers from %s, %d kept float%s", config.mode, config.backend,
                type(model).__name__, len(layers), source, len(kept),
                f", {n_conv} QALoRA conv layers stay fake-quant" if n_conv else "")


def _to_fp8(model: nn.Module, config: Int8Config) -> None:
    dev = next(model.parameters()).device
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU"
        raise UnsupportedPipelineError(f"fp8 needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: "
                                       f"Ada, Hopper, Blackwell); the denoiser is on {where}. Use mode='dynamic' "
                                       "(int8) instead")
    require_torchao()
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    plan, kept = plan_layers(model, QALoRAConfig(w_bits=8, a_bits=8, rank=0, keep_fp=config.keep_fp,
                                                 quantize_modulation=config.quantize_modulation, eight_bit=()))
    layers = {}
    for name, spec in plan.items():
        if spec.kind != "linear":
            continue
        parent, attr = parent_module(model, name)
        original = getattr(parent, attr)
        new = nn.Linear(original.in_features, original.out_features, bias=original.bias is not None,
                        device=original.weight.device, dtype=original.weight.dtype)
        new.load_state_dict(original.state_dict())
        quantize_(new, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        setattr(parent, attr, new)
        layers[name] = (parent, attr, original, new)
    compiled = compile_blocks(model) if config.compile else []
    setattr(model, _STATE, Int8State(config, layers, compiled, None, kept, "fp32 weights (fp8 e4m3 per row)"))


def remove_int8(pipe_or_model):
    """Undo :func:`to_int8`: the original modules (float or QALoRA layers) go back, compilation and the
    timestep hook are removed; the denoiser is bit-exactly as before. No-op if not converted."""
    model = get_denoiser(pipe_or_model)
    st: Int8State | None = getattr(model, _STATE, None)
    if st is None:
        return pipe_or_model
    if not st.config.keep_original:
        raise RuntimeError("this denoiser was converted with keep_original=False: its float weights were dropped "
                           "and cannot be restored; reload the pipeline")
    for module, previous in reversed(st.compiled):
        module._compiled_call_impl = previous
    for parent, attr, original, _ in reversed(list(st.layers.values())):
        setattr(parent, attr, original)
    remove_hook(model, _HOOK)
    delattr(model, _STATE)
    if pipe_or_model is not model:
        release(pipe_or_model, "int8")
    return pipe_or_model


def weight_memory(pipe_or_model) -> dict[str, int]:
    """Bytes of the denoiser's weights as its forward uses them: ``{"total", "int8", "float"}`` (parameters and
    buffers of the module tree; originals kept for :func:`remove_int8` live outside it and are not counted;
    QALoRA layers count their float base weights, as their fake-quant forward uses them)."""
    model = get_denoiser(pipe_or_model)
    seen: set[int] = set()
    total = int8 = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total, int8
        inner = [t]
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
            names, _ = t.__tensor_flatten__()
            inner = [getattr(t, n) for n in names if getattr(t, n, None) is not None]
        for x in inner:
            if id(x) in seen:
                continue
            seen.add(id(x))
            b = x.numel() * x.element_size()
            total += b
            if x.dtype in (torch.int8, torch.uint8):
                int8 += b

    for _, p in model.named_parameters():
        add(p)
    for _, b in model.named_buffers():
        add(b)
    return {"total": total, "int8": int8, "float": total - int8}


def int8_summary(pipe_or_model) -> dict[str, Any] | None:
    """What :func:`to_int8` did: mode, backend, layers converted/kept, weight source, timestep rows used."""
    model = get_denoiser(pipe_or_model)
    st: Int8State | None = getattr(model, _STATE, None)
    if st is None:
        return None
    mem = weight_memory(model)
    out = {"mode": st.config.mode, "backend": st.config.backend, "compiled_modules": len(st.compiled),
           "layers_int8": len(st.layers), "layers_float": len(st.kept), "weights_from": st.source,
           "qalora_conv_fake_quant": st.qalora_conv, "weight_bytes": mem["total"], "int8_bytes": mem["int8"]}
    if st.rows is not None:
        out["timestep_rows"] = max(1, len(st.rows.keys))
        out["calls"] = len(st.rows.trace)
        out["fallbacks"] = sum(1 for *_, exact in st.rows.trace if not exact)
    return out

