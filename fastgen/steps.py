"""``steps:N`` — run the pipeline's own sampler with fewer steps.

Not an accelerator in itself: it is the control every cache and sampler must beat ("a cache must beat
simply running fewer steps", DESIGN.md §6), so ``fastgen bench --control`` adds a ``steps:N`` row at the
latency of each candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hooks import attach, detach_if_empty, get_state
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


def _on_call(pipe, kwargs: dict) -> dict:
    cfg: StepsConfig = get_state(pipe).applied[_NAME]
    return {**kwargs, "num_inference_steps": cfg.num_inference_steps}


def apply_steps(pipe, config: StepsConfig | None = None):
    """Make every call of ``pipe`` run ``config.num_inference_steps`` steps. Returns ``pipe``."""
    config = config or StepsConfig()
    if not isinstance(config, StepsConfig):
        raise TypeError(f"apply_steps expects a StepsConfig, got {type(config).__name__}")
    st = attach(pipe)
    st.applied[_NAME] = config
    st.call_hooks[_NAME] = _on_call
    return pipe


def remove_steps(pipe):
    """Undo :func:`apply_steps` (no-op if not applied). Returns ``pipe``."""
    st = get_state(pipe)
    if st is not None and _NAME in st.applied:
        del st.applied[_NAME]
        st.call_hooks.pop(_NAME, None)
        detach_if_empty(pipe)
    return pipe


def _parse(args: str | None) -> StepsConfig:
    if args is None:
        return StepsConfig()
    return StepsConfig(int(args))


register_technique(Technique(
    name=_NAME, config_cls=StepsConfig, parse=_parse, apply=apply_steps, remove=remove_steps,
    to_string=lambda c: f"steps:{c.num_inference_steps}", families=DIFFUSION_FAMILIES,
    help="the pipeline's own sampler at N steps (the control row every accelerator must beat)", example="steps:8",
))
