"""DeepCache-style high-level feature reuse for UNets (SD1.5, SDXL): ``"deepcache:3"``.

Idea (Ma et al., *DeepCache*, CVPR 2024, arXiv 2312.00858): the deep part of a UNet changes slowly from
one denoising step to the next, the shallow skip branch does not. Every ``interval`` steps the full UNet
runs and the output of every module deeper than the chosen skip branch is kept; on the other steps only
the shallow part runs (``conv_in``, the down layers up to the branch, the up layers from the branch on,
``conv_out``) and the deep modules hand back their kept outputs.

How it is patched: a diffusers ``ModelHook`` with ``new_forward`` on every *deep* module (whole down /
up blocks, the mid block, and the resnets/attentions/down- or upsamplers of the one down and up block the
branch cuts through). On a reuse step the hook returns the kept output without running the module; on a
full step it runs the module and keeps its output. ``UNet2DConditionModel.forward`` and the block
forwards are never copied: the UNet's own code (ControlNet residuals, FreeU) runs unchanged on the
recomputed part.

Branch numbering: ``branch=b`` cuts the UNet at the ``b``-th skip connection counted from the shallowest
(0: ``conv_in``'s output, which feeds the last layer of the last up block). For UNets with two layers per
block (real SD1.5/SDXL) this is exactly DeepCache's ``cache_branch_id``. A higher branch recomputes more
and reuses less.

What DeepCache gets wrong and this does not: the step index comes from the pipeline call
(``get_state(pipe).call.step_index``), never from ``scheduler.timesteps.index(t)`` (which breaks on a
timestep passed as a keyword, on timesteps not in the schedule and on schedulers that repeat
timesteps); state is per call and per denoiser call within a step (cond/uncond run as separate calls get
separate caches; batched CFG is cached as a whole); a call with another ``num_inference_steps`` just
works; a batch or size change falls back to a full step instead of returning a wrong-shaped tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnsupportedPipelineError
from ..api import apply_technique, remove_technique
from ..hooks import HookBase, HookSet, uninstall_hooks
from ..registry import Technique, register_technique
from ..utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["DeepCacheConfig", "apply_deepcache", "remove_deepcache", "deepcache_full_steps", "unet_branches"]

_NAME = "deepcache"
_HOOK = "fastgen_deepcache"
_SCHEDULES = ("uniform", "quadratic")


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache feature reuse for SD/SDXL UNets.

    Attributes:
        interval: a full UNet step every ``interval`` steps (default 3); the steps in between reuse the deep
            features. 1 = no reuse (bit-exact baseline). Speed grows with it (a reuse step of SD1.5 at
            branch 0 costs ~15% of a full step, so N=3 -> ~2.2x, N=5 -> ~2.8x); quality drops with it.
            Sensible range 2-5 for 20-50 steps; at <= 10 steps prefer 2-3.
        branch: skip connection the UNet is cut at (default 0, the shallowest; see the module docstring).
            Higher = more recomputed per reuse step: slower, closer to baseline. Range 0 to
            ``len(unet_branches(unet)) - 1``; for SD1.5/SDXL this is DeepCache's ``cache_branch_id``.
        schedule: ``"uniform"`` (full step when ``step % interval == 0``; default) or ``"quadratic"``
            (DeepCache's non-uniform 1:N: the same number of full steps, ``ceil(steps / interval)``, packed
            densely around ``center`` and sparsely at the ends; helps at large intervals).
        center: where the quadratic schedule is densest, as a fraction of the call's steps (default 0.5;
            range 0-1). Ignored for ``"uniform"``.
        power: spacing exponent of the quadratic schedule (default 2.0 = quadratic; 1 = uniform spacing;
            range 1-3). Lowered automatically when it would put two full steps on one step.
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: float = 0.5
    power: float = 2.0

    def __post_init__(self):
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = no reuse), got {self.interval!r}")
        if not isinstance(self.branch, int) or isinstance(self.branch, bool) or self.branch < 0:
            raise ValueError(f"branch must be an integer >= 0 (0 = shallowest skip connection), got {self.branch!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= float(self.center) <= 1.0:
            raise ValueError(f"center is a fraction of the steps in [0, 1], got {self.center!r}")
        if not 1.0 <= float(self.power) <= 4.0:
            raise ValueError(f"power must be in [1, 4] (2 = quadratic), got {self.power!r}")

    @classmethod
    def preset(cls, name: str) -> "DeepCacheConfig":
        """``"slow"`` (interval 2), ``"medium"`` (3), ``"fast"`` (5); all at branch 0, uniform."""
        presets = {"slow": cls(interval=2), "medium": cls(interval=3), "fast": cls(interval=5)}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose slow, medium or fast")
        return presets[name]


def deepcache_full_steps(config: DeepCacheConfig, total_steps: int) -> list[int]:
    """The 0-based steps of a ``total_steps``-step call on which the full UNet runs."""
    t, n = int(total_steps), config.interval
    if t <= 0:
        return []
    if config.schedule == "uniform" or n == 1:
        return list(range(0, t, n))
    k = math.ceil(t / n)
    if k >= t:
        return list(range(t))
    if k == 1:
        return [0]
    c = config.center * (t - 1)
    p = float(config.power)
    while p > 1.0 + 1e-9:
        lo, hi = -(c ** (1.0 / p)), (t - 1 - c) ** (1.0 / p)
        xs = torch.linspace(lo, hi, k, dtype=torch.float64).tolist()
        idx = sorted({min(t - 1, max(0, int(round(c + math.copysign(abs(x) ** p, x))))) for x in xs})
        if len(idx) == k and idx[0] == 0:
            return idx
        p -= 0.05
    return sorted({int(round(i * (t - 1) / (k - 1))) for i in range(k)})


@dataclass
class _Unit:
    """One skip-connection producer (down side) or consumer (up side) of the UNet."""

    modules: tuple[torch.nn.Module, ...]
    index: int  # skip connection index it produces (down) or consumes (up)


def unet_branches(unet) -> dict:
    """The UNet's skip-connection layout: ``{"down": [[unit, ...] per down block], "up": [...], "n": N}``.

    ``N`` is the number of skip connections (valid branches are ``0 .. N-1``). Raises
    :class:`UnsupportedPipelineError` for a UNet whose blocks do not have the standard
    ``resnets``/``attentions``/``downsamplers``/``upsamplers`` layout.
    """
    down, up = [], []
    r = 0  # conv_in's output is skip connection 0
    for i, block in enumerate(unet.down_blocks):
        resnets = getattr(block, "resnets", None)
        if resnets is None:
            raise UnsupportedPipelineError(
                f"deepcache: down block {i} ({type(block).__name__}) has no 'resnets'; only the standard "
                "UNet2DConditionModel block layout (SD1.5/SDXL) is supported")
        attns = getattr(block, "attentions", None) or [None] * len(resnets)
        units = []
        for res, attn in zip(resnets, attns):
            r += 1
            units.append(_Unit(tuple(m for m in (res, attn) if m is not None), r))
        for ds in getattr(block, "downsamplers", None) or []:
            r += 1
            units.append(_Unit((ds,), r))
        down.append(units)
    end = r
    for i, block in enumerate(unet.up_blocks):
        resnets = getattr(block, "resnets", None)
        if resnets is None:
            raise UnsupportedPipelineError(
                f"deepcache: up block {i} ({type(block).__name__}) has no 'resnets'; only the standard "
                "UNet2DConditionModel block layout (SD1.5/SDXL) is supported")
        attns = getattr(block, "attentions", None) or [None] * len(resnets)
        units = [_Unit(tuple(x for x in (res, attn) if x is not None), end - m)
                 for m, (res, attn) in enumerate(zip(resnets, attns))]
        end -= len(resnets)
        up.append(units)
    if end != -1:
        raise UnsupportedPipelineError(
            f"deepcache: the up blocks of {type(unet).__name__} consume {r + 1 - (end + 1)} of {r + 1} skip "
            "connections; only the standard UNet2DConditionModel layout is supported")
    return {"down": down, "up": up, "n": r + 1}


def _deep_modules(unet, branch: int) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module whose output is reused on a reuse step at ``branch``."""
    lay = unet_branches(unet)
    if branch >= lay["n"]:
        raise ValueError(
            f"deepcache: branch {branch} does not exist; {type(unet).__name__} has {lay['n']} skip connections "
            f"(branches 0-{lay['n'] - 1}, 0 = shallowest = fastest)")
    out = []
    for i, (block, units) in enumerate(zip(unet.down_blocks, lay["down"])):
        if all(u.index > branch for u in units):
            out.append((f"down_blocks.{i}", block))
            continue
        for u in units:
            if u.index > branch:
                out.extend((f"down_blocks.{i}.{type(m).__name__}@{u.index}", m) for m in u.modules)
    if unet.mid_block is not None:
        out.append(("mid_block", unet.mid_block))
    for i, (block, units) in enumerate(zip(unet.up_blocks, lay["up"])):
        if all(u.index > branch for u in units):
            out.append((f"up_blocks.{i}", block))
            continue
        for u in units:
            if u.index > branch:
                out.extend((f"up_blocks.{i}.{type(m).__name__}@{u.index}", m) for m in u.modules)
    return out


class StepTracker:
    """Which denoiser call within the current step this is (0 = first; CFG run as two calls -> 0, 1)."""

    def __init__(self):
        self.step, self.sub = None, 0

    def advance(self, step: int) -> int:
        if step == self.step:
            self.sub += 1
        else:
            self.step, self.sub = step, 0
        return self.sub


class _DeepCacheState:
    """Per-pipeline runtime state; ``new_call`` empties it at the start of every pipeline call."""

    def __init__(self, pipe_state, config: DeepCacheConfig, n_modules: int):
        self.st = pipe_state
        self.config = config
        self.n_modules = n_modules
        self.new_call()

    def new_call(self) -> None:
        self.tracker = StepTracker()
        self.caches: dict[int, dict] = {}  # sub-call -> {hook key: output} of the last full step
        self.cache: dict = {}
        self.skipping = False
        self.full: set[int] | None = None
        self.record = {"interval": self.config.interval, "branch": self.config.branch,
                       "schedule": self.config.schedule, "full_steps": [], "cached_steps": [],
                       "calls_full": 0, "calls_reused": 0, "modules_reused": 0}
        self.st.call.records[_NAME] = self.record

    def _full_steps(self, scheduler) -> set[int]:
        """Full steps of this call (the number of steps is read off the scheduler's distinct timesteps)."""
        total = None
        ts = getattr(scheduler, "timesteps", None)
        if ts is not None and len(ts):
            vals = [float(t) for t in torch.as_tensor(ts).flatten().tolist()]
            total = 1 + sum(1 for a, b in zip(vals, vals[1:]) if a != b)
        if total is None:
            total = self.st.call.num_inference_steps or 50
        return set(deepcache_full_steps(self.config, total))

    def begin(self, scheduler, sample: torch.Tensor) -> None:
        if self.st.call.records.get(_NAME) is not self.record:  # the denoiser is called outside a pipeline call
            self.st.call.records[_NAME] = self.record
        step = max(self.st.call.step_index, 0)
        sub = self.tracker.advance(step)
        if self.config.schedule == "uniform":
            full = step % self.config.interval == 0
        else:
            if self.full is None:
                self.full = self._full_steps(scheduler)
            full = step in self.full
        cache = self.caches.setdefault(sub, {})
        key = (tuple(sample.shape), sample.dtype, sample.device)
        reuse = not full and cache.get("__input__") == key
        if not reuse:
            cache.clear()
            cache["__input__"] = key
        self.cache, self.skipping = cache, reuse
        rec = self.record
        if reuse:
            rec["calls_reused"] += 1
            if step not in rec["cached_steps"]:
                rec["cached_steps"].append(step)
        else:
            rec["calls_full"] += 1
            if step not in rec["full_steps"]:
                rec["full_steps"].append(step)

    def end(self) -> None:
        self.skipping = False


class _ControllerHook(HookBase):
    """On the UNet: decides, at every forward, whether this is a full or a reuse step."""

    def __init__(self, state: _DeepCacheState, pipe_scheduler_getter):
        super().__init__()
        self.state = state
        self.scheduler = pipe_scheduler_getter

    def pre_forward(self, module, *args, **kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        self.state.begin(self.scheduler(), sample)
        return args, kwargs

    def post_forward(self, module, output):
        self.state.end()
        return output


class _ReuseHook(HookBase):
    """On a deep module: keeps its output on full steps, hands it back without running on reuse steps."""

    def __init__(self, state: _DeepCacheState, key: str):
        super().__init__()
        self.state = state
        self.key = key

    def new_forward(self, module, *args, **kwargs):
        s = self.state
        if s.skipping:
            out = s.cache.get(self.key)
            if out is not None:
                s.record["modules_reused"] += 1
                return out
            raise RuntimeError(f"deepcache: no kept output for {self.key} on a reuse step (internal error)")
        out = self.fn_ref.original_forward(*args, **kwargs)
        s.cache[self.key] = out
        return out


def _check(pipe, adapter, config: DeepCacheConfig) -> None:
    _deep_modules(adapter.denoiser(pipe), config.branch)


def apply_deepcache(pipe, config: DeepCacheConfig | None = None):
    """Reuse the UNet's deep features between full steps (see :class:`DeepCacheConfig`). Returns ``pipe``.

    Calling it again replaces the config. ``fastgen.summary(pipe)["last_call"]["deepcache"]`` reports the
    full and reused steps of the last call.

    Raises:
        UnsupportedPipelineError: the pipeline has no SD/SDXL UNet (DiTs: use ``"blockcache"``).
        ValueError: the branch does not exist in this UNet.
    """
    return apply_technique(pipe, _NAME, config)


def _install(pipe, st, config: DeepCacheConfig) -> HookSet:
    unet = st.adapter.denoiser(pipe)
    deep = _deep_modules(unet, config.branch)
    state = _DeepCacheState(st, config, len(deep))
    handle = HookSet(state)
    for key, module in deep:
        handle.add(module, _ReuseHook(state, key), _HOOK)
    handle.add(unet, _ControllerHook(state, lambda: getattr(pipe, "scheduler", None)), _HOOK)
    logger.info("deepcache on %s: interval %d, branch %d, %d modules reused on cached steps",
                type(unet).__name__, config.interval, config.branch, len(deep))
    return handle


def _on_call(pipe, handle: HookSet, kwargs: dict) -> dict:
    handle.state.new_call()
    return kwargs


def remove_deepcache(pipe):
    """Undo :func:`apply_deepcache` (no-op if not applied), restoring the UNet bit-exactly. Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def _parse(args: str | None) -> DeepCacheConfig:
    if args is None:
        return DeepCacheConfig()
    parts = [p.strip() for p in args.split(",") if p.strip()]
    if not parts:
        return DeepCacheConfig()
    head = parts[0].lower()
    base = DeepCacheConfig.preset(head) if head in ("slow", "medium", "fast") else None
    kw: dict = {}
    if base is None:
        if not head.isdigit():
            raise ValueError(f"expected the interval (an integer) or a preset (slow|medium|fast), got {parts[0]!r}")
        kw["interval"] = int(head)
    else:
        kw["interval"] = base.interval
    for p in parts[1:]:
        key, eq, val = p.lower().partition("=")
        if eq:
            if key not in ("branch", "schedule", "center", "power"):
                raise ValueError(f"unknown option {key!r}; options: branch=B, schedule=uniform|quadratic, center=C, power=P")
            kw[key] = int(val) if key == "branch" else (val if key == "schedule" else float(val))
        elif key in ("quad", "quadratic"):
            kw["schedule"] = "quadratic"
        elif key == "uniform":
            kw["schedule"] = "uniform"
        elif key[:1] == "b" and key[1:].isdigit():
            kw["branch"] = int(key[1:])
        elif key[:1] == "c" and key[1:]:
            kw["center"] = float(key[1:])
        elif key[:1] == "p" and key[1:]:
            kw["power"] = float(key[1:])
        else:
            raise ValueError(f"unknown option {p!r}; options: bB (branch), quad|uniform, cC (center), pP (power)")
    return DeepCacheConfig(**kw)


def _to_string(c: DeepCacheConfig) -> str:
    s = f"deepcache:{c.interval}"
    if c.branch:
        s += f",b{c.branch}"
    if c.schedule == "quadratic":
        s += ",quad"
        if c.center != 0.5:
            s += f",c{c.center:g}"
        if c.power != 2.0:
            s += f",p{c.power:g}"
    return s


register_technique(Technique(
    name=_NAME, config_cls=DeepCacheConfig, parse=_parse, install=_install, uninstall=uninstall_hooks, on_call=_on_call,
    to_string=_to_string, check=_check, families=("sd", "sdxl"),
    family_hint=("deepcache reuses UNet skip-branch features and this pipeline has a transformer; use the DiT block "
                 "cache instead, e.g. 'blockcache:0.08'"),
    help="DeepCache UNet feature reuse: full UNet every N steps, shallow branch only in between",
    example="deepcache:3",
))
