"""samplers: few-step samplers for diffusers pipelines under short names.

diffusers already ships DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095), UniPC (Zhao et al. 2023,
arXiv 2302.04867), DDIM (Song et al. 2021) and the flow-matching Euler/Heun schedulers. This module does
not rewrite them: it configures the right one for the pipeline's family (flow sigmas and the model's
shift for flow-matching models; the training betas for epsilon models), and exposes it under a short
name and the recipe string ``"sampler:NAME@STEPS"``. Two training-free flow samplers that diffusers does
not have live in :mod:`samplers.flow`: FlowTurbo's pseudo corrector and On-device Sora's Linear
Proportional Leap.

>>> import samplers
>>> samplers.list()                                      # doctest: +SKIP
['ddim', 'dpm++2m', 'dpm++2m-karras', 'euler', 'heun', 'lpl', 'pseudo-corrector', 'unipc']
>>> samplers.apply_sampler(pipe, "dpm++2m", steps=8)       # doctest: +SKIP
>>> samplers.remove_sampler(pipe)                        # the original scheduler object comes back
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastgen.adapters import DIFFUSION_FAMILIES
from fastgen.api import apply_technique, handle_of, remove_technique
from fastgen.hooks import HookBase, add_hook, remove_hook
from fastgen.registry import Technique, register_technique
from fastgen.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["SamplerConfig", "list", "apply_sampler", "set_sampler", "remove_sampler", "make_scheduler", "is_flow_scheduler"]

_NAME = "sampler"
_list = list  # ``list`` is exported as the registry listing below


def is_flow_scheduler(scheduler) -> bool:
    """True when ``scheduler`` integrates a flow-matching (velocity) model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = scheduler.config
    return (
        isinstance(scheduler, FlowMatchEulerDiscreteScheduler)  # incl. samplers.flow's pseudo-corrector and LPL
        or type(scheduler).__name__.startswith("FlowMatch")
        or bool(cfg.get("use_flow_sigmas", False))
        or cfg.get("prediction_type") == "flow_prediction"
    )


def _flow_kwargs(orig) -> dict:
    cfg = orig.config
    kw = {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
          "flow_shift": float(cfg.get("shift", cfg.get("flow_shift", 1.0)) or 1.0)}
    if cfg.get("use_dynamic_shifting", False):
        kw.update(use_dynamic_shifting=True, time_shift_type="exponential")
    return kw


def _eps_kwargs(orig) -> dict:
    cfg = orig.config
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "timestep_spacing", "steps_offset")
    return {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}


def _dpmpp2m(orig, karras: bool = False):
    from diffusers import DPMSolverMultistepScheduler

    if is_flow_scheduler(orig):
        if karras:
            raise ValueError("dpm++2m-karras is for epsilon/v models; flow models use 'dpm++2m' (flow sigmas)")
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **_flow_kwargs(orig))
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras,
                                       lower_order_final=True, **_eps_kwargs(orig))


def _unipc(orig):
    from diffusers import UniPCMultistepScheduler

    if is_flow_scheduler(orig):
        kw = _flow_kwargs(orig)
        kw.pop("time_shift_type", None)
        return UniPCMultistepScheduler(solver_order=2, **kw)
    return UniPCMultistepScheduler(solver_order=2, **_eps_kwargs(orig))


def _euler(orig):
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow_scheduler(orig):
        if isinstance(orig, FlowMatchEulerDiscreteScheduler):
            return FlowMatchEulerDiscreteScheduler.from_config(orig.config)
        kw = _flow_kwargs(orig)
        return FlowMatchEulerDiscreteScheduler(shift=kw["flow_shift"], use_dynamic_shifting=kw.get("use_dynamic_shifting", False))
    return EulerDiscreteScheduler(**_eps_kwargs(orig))


def _heun(orig):
    from diffusers import FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler

    if is_flow_scheduler(orig):
        if orig.config.get("use_dynamic_shifting", False):
            raise ValueError("heun has no dynamic-shift support in diffusers; use 'dpm++2m' or 'euler' for this model")
        return FlowMatchHeunDiscreteScheduler(shift=_flow_kwargs(orig)["flow_shift"])
    return HeunDiscreteScheduler(**_eps_kwargs(orig))


def _flow_only(cls_name: str, sampler: str):
    def build(orig, **kw):
        from . import flow

        if not is_flow_scheduler(orig):
            raise ValueError(f"{sampler} is for flow-matching models (SD3, FLUX, Sana, Lumina2); "
                             f"{type(orig).__name__} drives an epsilon/v model: use 'dpm++2m' or 'unipc'")
        return getattr(flow, cls_name).from_config(_euler(orig).config, **kw)

    return build


def _ddim(orig):
    from diffusers import DDIMScheduler

    if is_flow_scheduler(orig):
        raise ValueError("ddim is for epsilon/v models; use 'euler' or 'dpm++2m' for flow-matching models")
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_eps_kwargs(orig))


_SAMPLERS: dict[str, tuple[Callable, str]] = {
    "euler": (_euler, "Euler (flow: FlowMatchEuler with the model's shift)"),
    "heun": (_heun, "Heun 2nd order (2 model calls per step)"),
    "ddim": (_ddim, "DDIM, eta=0 (epsilon models)"),
    "dpm++2m": (_dpmpp2m, "DPM-Solver++(2M), flow sigmas for flow models"),
    "dpm++2m-karras": (lambda o: _dpmpp2m(o, karras=True), "DPM-Solver++(2M) with Karras sigmas (epsilon models)"),
    "unipc": (_unipc, "UniPC-2M (bh2), flow sigmas for flow models"),
    "pseudo-corrector": (_flow_only("FlowPseudoCorrectorScheduler", "pseudo-corrector"),
                         "FlowTurbo pseudo corrector: Heun-quality flow steps at 1 model call per step"),
    "lpl": (_flow_only("FlowLPLScheduler", "lpl"),
            "Linear Proportional Leap: flow Euler that leaps to the end once velocities settle"),
}


def list() -> _list[str]:  # noqa: A001 - the documented registry call is samplers.list()
    """Names of the registered samplers."""
    return sorted(_SAMPLERS)


def make_scheduler(name: str, original_scheduler):
    """Build the diffusers scheduler for sampler ``name``, configured for the model ``original_scheduler`` drives."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; registered samplers: {', '.join(list())}")
    return _SAMPLERS[name][0](original_scheduler)


#: Families whose pipelines pass custom ``sigmas`` to the scheduler on every call (Lumina2Pipeline): a scheduler
#: whose ``set_timesteps`` takes none fails there at call time, so it is refused when set.
ALWAYS_SIGMAS = ("lumina2",)


def _check_takes_sigmas(pipe, name: str, scheduler) -> None:
    import inspect

    from fastgen.adapters import get_adapter

    if get_adapter(pipe).family in ALWAYS_SIGMAS and "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        ok = [n for n in list() if n in ("euler", "unipc", "pseudo-corrector", "lpl")]
        raise ValueError(f"{type(pipe).__name__} passes custom sigmas to its scheduler on every call and {name}'s "
                         f"{type(scheduler).__name__} takes none; use " + ", ".join(f"'{n}'" for n in ok))


@dataclass(frozen=True)
class SamplerConfig:
    """Swap the pipeline's scheduler for a registered sampler.

    Attributes:
        name: a name from :func:`list` (default ``"dpm++2m"``). 2nd-order multistep solvers keep quality at
            8-12 steps where Euler/DDIM need 25-50.
        steps: if set, every call runs this many steps (overrides ``num_inference_steps``); the main
            speed knob (latency ~ steps). Sensible range 4-20; None keeps the caller's value.
    """

    name: str = "dpm++2m"
    steps: int | None = None

    def __post_init__(self):
        if self.name not in _SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; registered samplers: {', '.join(list())}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")


_SKIP_HOOK = "fastgen_lpl_skip"


class _LeapSkipHook(HookBase):
    """Denoiser hook: once the scheduler has leapt to the end, return the cached output instead of running."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.fn_ref = None
        self.cached = None
        self.skipped = 0

    def new_forward(self, module, *args, **kwargs):
        if self.scheduler.leaped and self.cached is not None:
            self.skipped += 1
            return self.cached
        self.cached = self.fn_ref.original_forward(*args, **kwargs)
        return self.cached


@dataclass
class _Installed:
    original: object  # the pipeline's own scheduler, put back on uninstall
    config: SamplerConfig
    skip: _LeapSkipHook | None = None
    denoiser: object = None


def _install(pipe, st, config: SamplerConfig) -> _Installed:
    original = pipe.scheduler
    new = make_scheduler(config.name, original)
    _check_takes_sigmas(pipe, config.name, new)
    handle = _Installed(original, config)
    if hasattr(new, "leaped"):
        handle.skip, handle.denoiser = _LeapSkipHook(new), st.adapter.denoiser(pipe)
        add_hook(handle.denoiser, handle.skip, _SKIP_HOOK)
    pipe.scheduler = new
    logger.info("sampler %s (%s) on %s", config.name, type(new).__name__, type(pipe).__name__)
    return handle


def _uninstall(pipe, st, handle: _Installed) -> None:
    if handle.skip is not None:
        remove_hook(handle.denoiser, _SKIP_HOOK)
    pipe.scheduler = handle.original


def _on_call(pipe, handle: _Installed, kwargs: dict) -> dict:
    if handle.skip is not None:
        handle.skip.cached, handle.skip.skipped = None, 0
    if handle.config.steps is not None:
        kwargs = {**kwargs, "num_inference_steps": handle.config.steps}
    return kwargs


def apply_sampler(pipe, config: SamplerConfig | str | None = None, steps: int | None = None):
    """Use a few-step sampler on ``pipe``: a :class:`SamplerConfig`, or a sampler name (optionally forcing
    ``steps`` per call). Safe to call twice. Returns ``pipe``.

    The original scheduler object is kept and put back by :func:`remove_sampler`.
    """
    if config is None or isinstance(config, str):
        config = SamplerConfig(config or "dpm++2m", steps)
    return apply_technique(pipe, _NAME, config)


def set_sampler(pipe, name: str | SamplerConfig = "dpm++2m", steps: int | None = None):
    """Deprecated spelling of :func:`apply_sampler` (the verbs are ``apply_x``/``remove_x`` everywhere)."""
    import warnings

    warnings.warn("fastgen.samplers.set_sampler is deprecated; use fastgen.samplers.apply_sampler (same arguments)",
                  DeprecationWarning, stacklevel=2)
    return apply_sampler(pipe, name, steps)


def remove_sampler(pipe):
    """Put the original scheduler back (no-op when no sampler is set). Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def _parse(args: str | None) -> SamplerConfig:
    if not args:
        return SamplerConfig()
    name, _, steps = args.partition("@")
    if steps and not steps.strip().isdigit():
        raise ValueError(f"steps after '@' must be an integer, got {steps!r}")
    return SamplerConfig(name.strip().lower(), int(steps) if steps else None)


def _summary(pipe, handle: _Installed) -> dict:
    out = {"scheduler": type(pipe.scheduler).__name__}
    if handle.skip is not None:
        out.update(leap_step=pipe.scheduler.leap_step, denoiser_calls_skipped=handle.skip.skipped)
    return out


def _check(pipe, adapter, config: SamplerConfig) -> None:
    current = handle_of(pipe, _NAME)  # replacing a sampler: the new one is built from the pipeline's own
    _check_takes_sigmas(pipe, config.name, make_scheduler(config.name, current.original if current else pipe.scheduler))


register_technique(Technique(
    name=_NAME, config_cls=SamplerConfig, parse=_parse, install=_install, uninstall=_uninstall, on_call=_on_call,
    check=_check, summary=_summary,
    to_string=lambda c: f"sampler:{c.name}" + (f"@{c.steps}" if c.steps else ""), families=DIFFUSION_FAMILIES,
    help="few-step sampler: " + ", ".join(list()), example="sampler:dpm++2m@8",
))
