"""``cfg-interval`` — classifier-free guidance only on an interval of the sampling steps.

Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality
in Diffusion Models" (NeurIPS 2024, arXiv 2404.07724): guidance helps in the middle of the noise range and
does little, or harm, at the low-noise end. Outside the interval a step needs only the conditional
prediction, so it costs one denoiser pass over ``B`` samples instead of ``2B`` — about half a step's
compute.

How: a diffusers ``ModelHook`` on the denoiser. The pipelines batch CFG as ``[uncond; cond]`` (SD, SDXL,
SD3, PixArt, Sana). Outside the interval the hook runs the denoiser on the conditional half of every
batched input and returns that prediction twice. The pipeline's own ``uncond + g * (cond - uncond)`` then
gives exactly ``cond``. No pipeline code is copied, and ``remove_cfg_interval`` takes the hook off.

>>> import fastgen                                                 # doctest: +SKIP
>>> fastgen.accelerate(pipe, "cfg-interval:0.6")   # guide the first 60% of the steps  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RecipeError
from .api import apply_technique, remove_technique
from .hooks import HookBase, add_hook, get_state, remove_hook
from .registry import Technique, register_technique

__all__ = ["CFGIntervalConfig", "apply_cfg_interval", "remove_cfg_interval"]

_NAME = "cfg-interval"
_HOOK = "fastgen_cfg_interval"
#: Families whose pipelines batch CFG as [uncond; cond] through the denoiser (checked by tests).
FAMILIES = ("sd", "sdxl", "sd3", "pixart", "sana")


@dataclass(frozen=True)
class CFGIntervalConfig:
    """Guidance on steps ``[start, end)`` (fractions of the call's steps), conditional-only elsewhere.

    Attributes:
        end: guidance stops after this fraction of the steps (default 0.6). Lower is faster: a step
            without guidance costs about half. On the default MMDiT at 28 steps, 0.6 costs 0.2 of the
            steps' compute. Sensible range 0.3-1.0. Below about 0.3, colour and layout lose their
            guidance.
        start: guidance starts at this fraction (default 0.0). The paper also skips the first,
            highest-noise steps. On small models the layout is set there, so keep it at 0 unless
            measured. Range 0-0.3.
    """

    end: float = 0.6
    start: float = 0.0

    def __post_init__(self):
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"CFGIntervalConfig.{name} must be a fraction in [0, 1], got {v!r}")
        if self.start >= self.end:
            raise ValueError(f"CFGIntervalConfig: start ({self.start}) must be below end ({self.end}); "
                             f"for no guidance at all call the pipeline with guidance_scale=1")

    def guided(self, step_index: int, num_steps: int) -> bool:
        """Whether step ``step_index`` (0-based) of ``num_steps`` runs with guidance."""
        f = step_index / max(1, num_steps)
        return self.start <= f < self.end


def _default_guidance_scale(pipe) -> float:
    """The ``guidance_scale`` default of the pipeline's ``__call__`` signature (1.0 when it has none)."""
    p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return float(p.default) if p is not None and p.default is not inspect.Parameter.empty else 1.0


def _cfg_on(pipe, default_g: float) -> bool:
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    if isinstance(flag, bool):
        return flag
    # PixArt keeps it in a local variable: read the call's guidance_scale (or the signature default)
    st = get_state(pipe)
    g = st.call.kwargs.get("guidance_scale") if st is not None else None
    return float(default_g if g is None else g) > 1.0


def cond_half(x: Any, n: int) -> Any:
    """The conditional half of every tensor with batch ``n`` (nested in tuples, lists and dicts)."""
    if isinstance(x, torch.Tensor):
        return x[n // 2:] if x.ndim and x.shape[0] == n else x
    if isinstance(x, (list, tuple)):
        return type(x)(cond_half(v, n) for v in x)
    if isinstance(x, dict):
        return {k: cond_half(v, n) for k, v in x.items()}
    return x


def repeat_output(out: Any) -> Any:
    """A denoiser output (tensor, tuple or ``.sample`` dataclass) with its prediction concatenated to itself along
    the batch: the unguided half's result standing in for both CFG halves."""
    if isinstance(out, torch.Tensor):
        return torch.cat([out, out])
    if isinstance(out, tuple):
        return (repeat_output(out[0]),) + tuple(out[1:])
    if dataclasses.is_dataclass(out) and hasattr(out, "sample"):
        return dataclasses.replace(out, sample=repeat_output(out.sample))
    raise TypeError(f"cfg-interval: unexpected denoiser output {type(out).__name__}")


class _IntervalHook(HookBase):
    def __init__(self, pipe, config: CFGIntervalConfig):
        super().__init__()
        self.pipe, self.config = pipe, config
        self.default_g = _default_guidance_scale(pipe)  # read once, not per denoiser call
        self.skipped = 0  # unguided denoiser calls of the current (or last) pipeline call
        self._call = None

    def new_forward(self, module, *args, **kwargs):
        st = get_state(self.pipe)
        if st is not None and st.call is not self._call:  # a new pipeline call
            self._call, self.skipped = st.call, 0
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else 0
        ts = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        steps = (len(ts) if ts is not None else 0) or (st.call.num_inference_steps if st else None) or 1
        if (st is None or n < 2 or n % 2 or not _cfg_on(self.pipe, self.default_g)
                or self.config.guided(max(0, st.call.step_index), steps)):
            return self.fn_ref.original_forward(*args, **kwargs)
        self.skipped += 1
        return repeat_output(self.fn_ref.original_forward(*cond_half(args, n), **cond_half(kwargs, n)))


def _install(pipe, state, config: CFGIntervalConfig) -> tuple:
    denoiser = state.adapter.denoiser(pipe)
    hook = _IntervalHook(pipe, config)
    add_hook(denoiser, hook, _HOOK)
    return denoiser, hook


def _uninstall(pipe, state, handle: tuple) -> None:
    remove_hook(handle[0], _HOOK)


def apply_cfg_interval(pipe, config: CFGIntervalConfig | None = None):
    """Guide only the steps in ``[config.start, config.end)``; returns ``pipe``. Safe to call twice."""
    return apply_technique(pipe, _NAME, config)


def remove_cfg_interval(pipe):
    """Undo :func:`apply_cfg_interval` (no-op if not applied). Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def _summary(pipe, handle: tuple) -> dict:
    return {"unguided_calls": handle[1].skipped}


def _parse(args: str | None) -> CFGIntervalConfig:
    if args is None or not args.strip():
        return CFGIntervalConfig()
    text = args.strip()
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            return CFGIntervalConfig(start=float(a), end=float(b))
        return CFGIntervalConfig(end=float(text))
    except ValueError as e:
        raise RecipeError(f"cfg-interval: expected 'END' or 'START-END' as fractions of the steps "
                          f"(e.g. 'cfg-interval:0.6'), got {args!r} ({e})") from None


def _to_string(c: CFGIntervalConfig) -> str:
    return f"cfg-interval:{c.end:g}" if c.start == 0 else f"cfg-interval:{c.start:g}-{c.end:g}"


_CACHE_CLASH = "cfg-interval halves the denoiser batch on some steps; step caches keep per-batch state"

register_technique(Technique(
    name=_NAME, config_cls=CFGIntervalConfig, parse=_parse, install=_install, uninstall=_uninstall,
    to_string=_to_string, families=FAMILIES, summary=_summary,
    help="classifier-free guidance only on the first END fraction of the steps (conditional-only after)",
    example="cfg-interval:0.6",
    incompatible={"blockcache": _CACHE_CLASH, "deepcache": _CACHE_CLASH, "anchor-deepcache": _CACHE_CLASH,
                  "ras": _CACHE_CLASH, "diffusers-fbc": _CACHE_CLASH, "diffusers-taylorseer": _CACHE_CLASH},
))
