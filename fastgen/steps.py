"""``steps:N`` — run the pipeline's own sampler with fewer steps.

Not an accelerator in itself: it is the control every cache and sampler must beat ("a cache must beat
simply running fewer steps", DESIGN.md §6), so ``fastgen bench --control`` adds a ``steps:N`` row at the
latency of each candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .api import apply_technique, remove_technique
from .adapters import DIFFUSION_FAMILIES
from .registry import Technique, register_technique

__all__ = ["StepsConfig", "apply_steps", "remove_steps"]

_NAME = "steps"


@dataclass(frozen=True)
class StepsConfig:
    """Override ``num_inference_steps`` of every call.

    Attributes:
        num_inference_steps: steps to run (default 8). Speed scales ~linearly with it; quality falls as it
            shrinks. Sensible range 2-50.
    """

    num_inference_steps: int = 8

    def __post_init__(self):
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")


def _install(pipe, state, config: StepsConfig) -> StepsConfig:
    return config  # nothing to patch: the per-call hook sets the step count


def _uninstall(pipe, state, config: StepsConfig) -> None:
    pass


def _on_call(pipe, config: StepsConfig, kwargs: dict) -> dict:
    return {**kwargs, "num_inference_steps": config.num_inference_steps}


def apply_steps(pipe, config: StepsConfig | None = None):
    """Make every call of ``pipe`` run ``config.num_inference_steps`` steps. Returns ``pipe``."""
    return apply_technique(pipe, _NAME, config)


def remove_steps(pipe):
    """Undo :func:`apply_steps` (no-op if not applied). Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def _parse(args: str | None) -> StepsConfig:
    if args is None:
        return StepsConfig()
    return StepsConfig(int(args))


register_technique(Technique(
    name=_NAME, config_cls=StepsConfig, parse=_parse, install=_install, uninstall=_uninstall, on_call=_on_call,
    to_string=lambda c: f"steps:{c.num_inference_steps}", families=DIFFUSION_FAMILIES,
    help="the pipeline's own sampler at N steps (the control row every accelerator must beat)", example="steps:8",
))
