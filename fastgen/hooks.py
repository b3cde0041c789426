"""Hook plumbing shared by every technique.

Two mechanisms, both reversible:

* **Module hooks** go through diffusers' own ``HookRegistry``/``ModelHook`` (so they coexist with
  diffusers' caches, group offloading and layerwise casting). :func:`add_hook`/:func:`remove_hook` also
  tidy up after themselves: once the last hook is gone the module is left exactly as it was found.
* **Call wrapping**: a pipeline's ``__call__`` can only be changed on its class, so :func:`attach` swaps
  ``pipe.__class__`` for a subclass with the *same name* whose ``__call__`` opens a fresh per-call state,
  lets the applied techniques adjust the call's keyword arguments, and records what happened. The
  original class is kept and restored by :func:`detach_if_empty` (``isinstance`` and ``save_pretrained``
  are unaffected while attached).
* **Step index**: a hook on the denoiser (kept outermost) counts the call's denoiser forwards and distinct
  timesteps into ``get_state(pipe).call`` (:class:`CallState`). Techniques read ``call.step_index`` there:
  the step comes from the call itself, never from looking the timestep up in the schedule.

Per-pipeline state lives on the pipeline object (``pipe._fastgen``), never in module globals, so two
patched pipelines in one process do not interfere, and every call starts clean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .adapters import Adapter, get_adapter
from .utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["CallState", "PipelineState", "HookBase", "add_hook", "remove_hook", "attach", "detach_if_empty", "get_state",
           "retarget_step_counter", "HookSet", "uninstall_hooks"]

_STATE_ATTR = "_fastgen"
_COUNTER_HOOK = "fastgen_step_counter"


def _splice_out(registry, name: str) -> None:
    """Remove hook ``name`` from a diffusers ``HookRegistry`` without breaking the hooks above it.

    diffusers' ``remove_hook`` of a hook that is not the outermost rewires the next hook's ``forward``
    and so drops a ``new_forward`` hook sitting above it. Here the hooks above are taken off first
    (each is outermost when removed) and registered again afterwards, in their order.
    """
    order = list(registry._hook_order)
    above = [(n, registry.hooks[n]) for n in order[order.index(name) + 1:]]
    for n, _ in reversed(above):
        registry.remove_hook(n, recurse=False)
    registry.remove_hook(name, recurse=False)
    for n, hook in above:
        registry.register_hook(hook, n)


def add_hook(module: torch.nn.Module, hook, name: str) -> None:
    """Register ``hook`` (a diffusers ``ModelHook``) on ``module`` under ``name`` (replacing one of that name).

    fastgen's step counter, if present on ``module``, is kept outermost so that every other hook already
    sees the current call's step index in its ``pre_forward``. Hooks whose class sets ``fastgen_outer =
    True`` (those that change the batch every other hook should see, like ``gd``'s conditional half) stay
    outside every hook registered after them, just inside the counter. Hooks whose class sets
    ``fastgen_inner = True`` (a ``new_forward`` that replaces the module's computation, like the
    ``executorch`` runtime) go innermost, under the hooks already there.
    """
    from diffusers.hooks import HookRegistry

    created = getattr(module, "_diffusers_hook", None) is None
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if created:
        module._fastgen_created_registry = True
    if name in registry.hooks:
        _splice_out(registry, name)
    if getattr(hook, "fastgen_inner", False):  # replaces the module's own forward: every other hook wraps it
        below = [(n, registry.hooks[n]) for n in registry._hook_order]
        for n, _ in reversed(below):
            registry.remove_hook(n, recurse=False)
        registry.register_hook(hook, name)
        for n, h in below:
            registry.register_hook(h, n)
    else:
        registry.register_hook(hook, name)
    for other in [n for n, h in registry.hooks.items() if n != name and getattr(h, "fastgen_outer", False)]:
        h = registry.hooks[other]
        _splice_out(registry, other)
        registry.register_hook(h, other)
    counter = registry.hooks.get(_COUNTER_HOOK)
    if counter is not None and name != _COUNTER_HOOK:
        _splice_out(registry, _COUNTER_HOOK)
        registry.register_hook(counter, _COUNTER_HOOK)


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove hook ``name`` from ``module``; if fastgen created the registry and it is now empty, drop it."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    if name in registry.hooks:
        _splice_out(registry, name)
    if not registry.hooks:
        fwd = module.__dict__.get("forward")
        if getattr(fwd, "__func__", None) is type(module).forward:
            del module.forward  # the registry left the plain bound method on the instance
        if module.__dict__.pop("_fastgen_created_registry", False):
            del module._diffusers_hook


class HookSet:
    """The hooks one technique installed, as its ``install`` handle: :meth:`add` registers a hook (through
    :func:`add_hook`) and remembers it, :meth:`remove_all` takes them all off again (newest first).
    ``state`` carries the technique's own runtime object (for its ``on_call``/``summary``)."""

    def __init__(self, state: Any = None):
        self.state = state
        self.entries: list[tuple[torch.nn.Module, str]] = []

    def add(self, module: torch.nn.Module, hook, name: str) -> None:
        add_hook(module, hook, name)
        self.entries.append((module, name))

    def remove_all(self) -> None:
        for module, name in reversed(self.entries):
            remove_hook(module, name)
        self.entries.clear()


def uninstall_hooks(pipe, state, handle: HookSet) -> None:
    """A technique ``uninstall`` for techniques whose handle is a :class:`HookSet`."""
    handle.remove_all()


@dataclass
class CallState:
    """What the current (or last) pipeline call did; reset at the start of every call.

    ``step_index`` counts distinct timesteps seen by the denoiser in this call (0-based, -1 before the
    first), so techniques never look the timestep up in the schedule (which breaks on repeated or
    custom timesteps). ``denoiser_calls`` counts forwards (CFG run as two calls counts two).
    """

    kwargs: dict = field(default_factory=dict)
    num_inference_steps: int | None = None
    step_index: int = -1
    denoiser_calls: int = 0
    last_timestep: float | None = None
    latency_s: float | None = None
    records: dict[str, Any] = field(default_factory=dict)

    def on_denoiser_call(self, timestep) -> None:
        self.denoiser_calls += 1
        if timestep is None:
            self.step_index += 1
            return
        if isinstance(timestep, torch.Tensor):
            t = float(timestep.flatten()[0]) if timestep.numel() else None
        else:
            t = float(timestep)
        if t != self.last_timestep:
            self.step_index += 1
            self.last_timestep = t

    def as_dict(self) -> dict:
        out = {
            "num_inference_steps": self.num_inference_steps,
            "steps_run": self.step_index + 1,
            "denoiser_calls": self.denoiser_calls,
            "latency_s": self.latency_s,
        }
        out.update(self.records)
        return out


@dataclass
class PipelineState:
    """Everything fastgen keeps on a patched pipeline (``pipe._fastgen``)."""

    adapter: Adapter
    base_class: type
    applied: dict[str, Any] = field(default_factory=dict)  # technique name -> config, in order applied
    saved: dict[str, Any] = field(default_factory=dict)  # technique name -> what its remove needs
    call_hooks: dict[str, Callable[[Any, dict], dict]] = field(default_factory=dict)
    call: CallState = field(default_factory=CallState)
    last_call: dict | None = None
    counter_on: torch.nn.Module | None = None
    busy: int = 0  # > 0 while the core runs a technique's install/uninstall (see fastgen.api.adopt)


class HookBase:
    """The diffusers ``ModelHook`` protocol with its no-op defaults, for fastgen's own hooks.

    Same methods as ``diffusers.hooks.ModelHook`` (which :func:`add_hook` registers through ``HookRegistry``),
    without importing ``diffusers.hooks`` when fastgen is imported (it pulls in every quantization backend
    transformers knows). Subclasses override ``pre_forward``/``post_forward`` or define ``new_forward``.
    """

    _is_stateful = False

    def __init__(self):
        self.fn_ref = None

    def initialize_hook(self, module):
        return module

    def deinitalize_hook(self, module):  # diffusers' spelling
        return module

    def detach_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output

    def reset_state(self, module):
        return module


class _StepCounterHook(HookBase):
    """A diffusers ``ModelHook`` on the denoiser that feeds :class:`CallState` (timestep -> step index)."""

    def __init__(self, state: PipelineState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        t = kwargs.get("timestep", kwargs.get("timesteps"))
        if t is None and len(args) > 1:
            t = args[1]
        self.state.call.on_denoiser_call(t)
        return args, kwargs


_WRAPPED_CLASSES: dict[type, type] = {}


def _drop_stale_grid(kwargs: dict, steps_asked) -> dict:
    """A technique changed the step count of a call that also passed its own ``sigmas``/``timesteps`` grid
    (a zoo student's default call does): the pipeline would follow the grid and ignore the new count, so
    drop a grid whose length no longer matches (logged)."""
    n = kwargs.get("num_inference_steps")
    if n is None or n == steps_asked:
        return kwargs
    for key in ("sigmas", "timesteps"):
        grid = kwargs.get(key)
        if grid is not None and len(grid) != n:
            logger.warning("a recipe set num_inference_steps=%s; the call's %s (%d values) no longer fit and are "
                           "dropped", n, key, len(grid))
            kwargs = {k: v for k, v in kwargs.items() if k != key}
    return kwargs


def _wrapped_class(base: type) -> type:
    """A subclass of ``base`` with the same name whose ``__call__`` runs fastgen's per-call bookkeeping."""
    if base in _WRAPPED_CLASSES:
        return _WRAPPED_CLASSES[base]
    original_call = base.__call__

    def __call__(self, *args, **kwargs):
        st: PipelineState | None = getattr(self, _STATE_ATTR, None)
        if st is None:  # detached while a subclass instance lingers
            return original_call(self, *args, **kwargs)
        st.call = CallState()
        steps_asked = kwargs.get("num_inference_steps")
        for name, fn in list(st.call_hooks.items()):
            kwargs = fn(self, kwargs)
        kwargs = _drop_stale_grid(kwargs, steps_asked)
        st.call.kwargs = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}
        st.call.num_inference_steps = kwargs.get("num_inference_steps")
        t0 = time.perf_counter()
        out = original_call(self, *args, **kwargs)
        st.call.latency_s = time.perf_counter() - t0
        st.last_call = st.call.as_dict()
        return out

    __call__.__doc__ = original_call.__doc__
    __call__.__wrapped__ = original_call
    cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__, "_fastgen_base": base})
    cls.__qualname__ = base.__qualname__
    _WRAPPED_CLASSES[base] = cls
    return cls


def get_state(pipe) -> PipelineState | None:
    """The fastgen state of ``pipe``, or None when nothing is applied."""
    return getattr(pipe, _STATE_ATTR, None)


def attach(pipe) -> PipelineState:
    """Make ``pipe`` patchable: per-pipeline state, call wrapper and the denoiser's step counter. Idempotent."""
    st = get_state(pipe)
    if st is not None:
        return st
    adapter = get_adapter(pipe)
    base = type(pipe)
    st = PipelineState(adapter=adapter, base_class=base)
    denoiser = adapter.denoiser(pipe)
    add_hook(denoiser, _StepCounterHook(st), _COUNTER_HOOK)
    st.counter_on = denoiser
    setattr(pipe, _STATE_ATTR, st)
    pipe.__class__ = _wrapped_class(base)
    return st


def retarget_step_counter(pipe) -> None:
    """Move the step counter onto ``pipe``'s current denoiser (after a technique swapped the denoiser)."""
    st = get_state(pipe)
    if st is None:
        return
    denoiser = st.adapter.denoiser(pipe)
    if st.counter_on is denoiser:
        return
    if st.counter_on is not None:
        remove_hook(st.counter_on, _COUNTER_HOOK)
    add_hook(denoiser, _StepCounterHook(st), _COUNTER_HOOK)
    st.counter_on = denoiser


def detach_if_empty(pipe) -> None:
    """Undo :func:`attach` once no technique is applied any more."""
    st = get_state(pipe)
    if st is None or st.applied:
        return
    if st.counter_on is not None:
        remove_hook(st.counter_on, _COUNTER_HOOK)
    pipe.__class__ = st.base_class
    delattr(pipe, _STATE_ATTR)
