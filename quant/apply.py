"""Applying and removing QALoRA on a denoiser, the state it keeps there, and what it reports.

:func:`plan_layers` decides each layer's precision, :func:`apply_qalora` wraps the planned layers in
:class:`~quant.layers.QALoRALayer` and installs the timestep hook, :func:`remove_qalora` restores the
original modules bit-exactly. See :mod:`quant.qalora` for the method.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from fastgen.api import adopt, release
from fastgen.errors import UnsupportedPipelineError
from fastgen.hooks import add_hook, remove_hook
from fastgen.utils.logging import get_logger

from .common import get_denoiser, layer_kind, parent_module, timestep_param
from .config import MODULATION_LAYERS, LayerSpec, QALoRAConfig
from .layers import QALoRALayer, QuantContext, TimestepHook

logger = get_logger(__name__)

__all__ = ["QALoRAState", "apply_qalora", "remove_qalora", "is_quantized", "plan_layers", "quant_mode",
           "qalora_layers", "qalora_state", "require_qalora", "qalora_summary", "trainable_parameters"]

_STATE = "_fastgen_qalora"
_HOOK = "fastgen_qalora"


def _match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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
        kind = layer_kind(m)
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


@dataclass
class QALoRAState:
    """What :func:`apply_qalora` keeps on the denoiser (``qalora_state(pipe)``): the config, the shared
    :class:`~quant.layers.QuantContext`, the wrapped layers (name -> ``(parent, attribute, QALoRALayer)``),
    the layers kept FP (name -> reason), the parameters' original ``requires_grad`` flags and ``extra``
    (e.g. ``"loaded_from"``: the file :func:`quant.load` read)."""

    config: QALoRAConfig
    ctx: QuantContext
    layers: dict[str, tuple[nn.Module, str, QALoRALayer]]
    kept: dict[str, str]
    requires_grad: dict[str, bool]
    extra: dict[str, Any] = field(default_factory=dict)


def qalora_state(pipe_or_model) -> QALoRAState | None:
    """The QALoRA state of a pipeline or denoiser (None when not quantized)."""
    return getattr(get_denoiser(pipe_or_model), _STATE, None)


def is_quantized(pipe_or_model) -> bool:
    """Whether QALoRA (or PTQ, its rank-0 form) is applied to the pipeline or denoiser."""
    return qalora_state(pipe_or_model) is not None


def require_qalora(pipe_or_model) -> QALoRAState:
    """:func:`qalora_state`, raising a ``RuntimeError`` that says to call :func:`apply_qalora` first when QALoRA
    is not applied."""
    st = qalora_state(pipe_or_model)
    if st is None:
        raise RuntimeError("QALoRA is not applied to this pipeline: call quant.apply_qalora(pipe, config) first")
    return st


def qalora_layers(pipe_or_model) -> dict[str, QALoRALayer]:
    """Layer name -> :class:`QALoRALayer` of a quantized pipeline or denoiser."""
    return {n: t[2] for n, t in require_qalora(pipe_or_model).layers.items()}


def _install(model: nn.Module, config: QALoRAConfig, specs: dict[str, LayerSpec], kept: dict[str, str],
             init_weights: bool = True) -> QALoRAState:
    ctx = QuantContext(config.per_timestep_act)
    gen = torch.Generator().manual_seed(int(config.seed))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    layers: dict[str, tuple[nn.Module, str, QALoRALayer]] = {}
    try:
        for name, spec in specs.items():
            parent, attr = parent_module(model, name)
            base = getattr(parent, attr)
            if layer_kind(base) != spec.kind or tuple(base.weight.shape) != spec.shape:
                raise ValueError(f"layer {name!r}: expected a {spec.kind} with weight shape {list(spec.shape)}, "
                                 f"found {type(base).__name__} with {list(getattr(base, 'weight', torch.empty(0)).shape)}")
            layer = QALoRALayer(base, name, spec, ctx, act_symmetric=config.act_symmetric,
                                lora_alpha=config.lora_alpha, generator=gen)
            if init_weights:
                layer.w_quant.init_from(base.weight, config.weight_init)
            setattr(parent, attr, layer)
            layers[name] = (parent, attr, layer)
        position, tname = timestep_param(model)
        if tname is None and config.per_timestep_act and config.a_bits is not None:
            raise UnsupportedPipelineError(
                f"{type(model).__name__}.forward has no timestep argument; use per_timestep_act=False")
        add_hook(model, TimestepHook(ctx, position, tname), _HOOK)
    except BaseException:
        for parent, attr, layer in reversed(list(layers.values())):
            setattr(parent, attr, layer.base)
        raise
    st = QALoRAState(config, ctx, layers, kept, flags)
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
    if pipe_or_model is not model:  # called on a pipeline: fastgen.summary / fastgen.remove see it as "qalora"
        adopt(pipe_or_model, "qalora", config)
    return pipe_or_model


def remove_qalora(pipe_or_model):
    """Put the original modules back and drop the hook: the pipeline is bit-exactly as before
    :func:`apply_qalora` (parameters' ``requires_grad`` flags included). No-op if not applied."""
    model = get_denoiser(pipe_or_model)
    st: QALoRAState | None = getattr(model, _STATE, None)
    if st is None:
        return pipe_or_model
    for parent, attr, layer in reversed(list(st.layers.values())):
        setattr(parent, attr, layer.base)
    remove_hook(model, _HOOK)
    for n, p in model.named_parameters():
        if n in st.requires_grad:
            p.requires_grad_(st.requires_grad[n])
    delattr(model, _STATE)
    if pipe_or_model is not model:
        release(pipe_or_model, "qalora")
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
