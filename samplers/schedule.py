"""Optimised timestep schedules: search the N sampling times that best reproduce a many-step run.

Align Your Steps (Sabour, Fidler, Kreis 2024, arXiv 2404.14507) showed that the N times a few-step solver
visits matter as much as the solver: the stock spacings (linear in t, Karras, shifted flow sigmas) are
hand-made, and a schedule optimised for the model and solver beats them at equal steps. AYS minimises a
bound on the KL divergence between the true and the discretised SDE; here, in that spirit but simpler and
solver-agnostic, we minimise what the user sees: the mean squared error of the N-step sample's final
latent against the same prompts and seeds integrated with ``reference_steps`` steps (the ODE's end point as
well as the model can tell), on a handful of calibration prompts. The search is a bracketed coordinate
descent over the interior times (each time moves part of the way towards a neighbour, the move shrinks
when a sweep finds nothing better), so the schedule stays strictly decreasing and the first time (pure
noise) is kept.

The schedule is what the pipeline's scheduler takes as custom input: ``sigmas=`` for flow-matching
schedulers (FlowMatchEuler and the samplers derived from it; the values are before the scheduler's shift,
exactly as a user would pass them) and ``timesteps=`` for epsilon schedulers that accept them (Euler,
DPM-Solver++). The search measures the pipeline's real output through the same argument, so whatever the
scheduler does with the values, the tuned ones are the best found for that scheduler.

>>> from samplers.schedule import search_schedule, Schedule           # doctest: +SKIP
>>> sch = search_schedule(pipe, steps=8, prompts=prompts)            # doctest: +SKIP
>>> sch.save("mmdit-euler8.json"); pipe(p, **Schedule.load("mmdit-euler8.json").call_kwargs())  # doctest: +SKIP
>>> fastgen.accelerate(pipe, "schedule:shapes-mmdit-euler8")          # a shipped schedule  # doctest: +SKIP

``fastgen experiment schedule-search shapes-mmdit --steps 8 --out mmdit-euler8.json --eval 200`` searches on the
zoo model and reports the evaluator's score of the default and the tuned schedule on held-out prompts.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fastgen.errors import RecipeError
from fastgen.api import apply_technique, remove_technique
from fastgen.registry import Technique, register_technique
from fastgen.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["Schedule", "ScheduleConfig", "search_schedule", "schedule_kwarg", "apply_schedule", "remove_schedule",
           "shipped_schedules", "schedules_for", "SCHEDULES_DIR"]

_NAME = "schedule"
#: Tuned schedules shipped with fastgen (``schedule:<file stem>``).
SCHEDULES_DIR = Path(__file__).parent / "schedules"


def schedule_kwarg(scheduler) -> str:
    """``"sigmas"`` (flow-matching schedulers) or ``"timesteps"`` (epsilon schedulers) — the custom-schedule
    argument the pipeline forwards to ``scheduler.set_timesteps``; a ValueError when it takes neither."""
    from . import is_flow_scheduler

    params = set(inspect.signature(scheduler.set_timesteps).parameters)
    flow = is_flow_scheduler(scheduler)
    if flow and "sigmas" in params:
        return "sigmas"
    if not flow and "timesteps" in params:
        return "timesteps"
    raise ValueError(f"{type(scheduler).__name__} takes no custom {'sigmas' if flow else 'timesteps'} in set_timesteps; "
                     "a tuned schedule needs one that does: 'euler' (flow or epsilon), 'pseudo-corrector', 'lpl' or "
                     "'dpm++2m' (epsilon)")


@dataclass
class Schedule:
    """A tuned N-step schedule and how it was found.

    Attributes:
        kwarg: the pipeline argument it is passed as (``"sigmas"`` or ``"timesteps"``).
        values: the N times, strictly decreasing.
        scheduler: class name of the scheduler it was tuned with (another one may integrate it differently).
        model: the model it was tuned on (a zoo name or path), for reports.
        loss / default_loss: calibration MSE against the reference of the tuned and of the stock N-step schedule.
        reference_steps, prompts: the reference's step count and the number of calibration prompts.
    """

    kwarg: str
    values: list[float]
    scheduler: str = ""
    model: str | None = None
    loss: float | None = None
    default_loss: float | None = None
    reference_steps: int | None = None
    prompts: int | None = None
    history: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.kwarg not in ("sigmas", "timesteps"):
            raise ValueError(f"Schedule.kwarg must be 'sigmas' or 'timesteps', got {self.kwarg!r}")
        v = [float(x) for x in self.values]
        if len(v) < 1 or any(b >= a for a, b in zip(v, v[1:])) or any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError(f"a schedule's values must be finite, >= 0 and strictly decreasing, got {self.values!r}")
        if self.kwarg == "sigmas" and v[0] > 1.0:
            raise ValueError(f"flow sigmas must lie in (0, 1], got a first value of {v[0]}")
        self.values = [int(round(x)) for x in v] if self.kwarg == "timesteps" else v

    @property
    def steps(self) -> int:
        return len(self.values)

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the pipeline call: ``{kwarg: values}`` (the step count follows from them)."""
        return {self.kwarg: list(self.values)}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no schedule file at {path}; shipped schedules: {shipped_schedules()}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a schedule JSON file ({e})") from None
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown or "kwarg" not in data or "values" not in data:
            raise ValueError(f"{path} is not a fastgen schedule (needs 'kwarg' and 'values'; unknown keys {sorted(unknown)})")
        return cls(**data)


def shipped_schedules() -> list[str]:
    """Names of the schedules shipped in :data:`SCHEDULES_DIR` (``schedule:<name>``)."""
    return sorted(p.stem for p in SCHEDULES_DIR.glob("*.json"))


def schedules_for(pipe) -> list[tuple[str, int]]:
    """``(name, steps)`` of the shipped schedules tuned on the zoo model ``pipe`` was loaded from."""
    from fastgen import zoo

    model = zoo.name_of(pipe)
    if model is None:
        return []
    out = []
    for name in shipped_schedules():
        sch = Schedule.load(SCHEDULES_DIR / f"{name}.json")
        if sch.model == model:
            out.append((name, sch.steps))
    return out


# --------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------


def _default_values(pipe, steps: int, kwarg: str) -> list[float]:
    """The stock N-step schedule in the argument's own space: for FlowMatch schedulers the values they space
    before their shift (``linspace(sigma_max, sigma_min, N)``), else ``linspace(1, 1/N, N)`` flow sigmas;
    epsilon timesteps as the scheduler sets them."""
    import copy

    if kwarg == "sigmas":
        sch = pipe.scheduler
        hi, lo = float(getattr(sch, "sigma_max", 1.0)), float(getattr(sch, "sigma_min", 1.0 / steps))
        if type(sch).__name__.startswith("FlowMatch"):  # FlowMatchEuler spaces its (shifted) training range
            return [hi + (lo - hi) * i / (steps - 1) for i in range(steps)]
        return [1.0 - i / steps for i in range(steps)]

    sch = copy.deepcopy(pipe.scheduler)
    sch.set_timesteps(steps)
    return [float(t) for t in sch.timesteps]


def _latents(pipe, prompts, seeds, call_kwargs, **kw) -> torch.Tensor:
    from fastgen.utils.logging import quiet_diffusers

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    args: dict[str, Any] = {"class_labels": list(prompts)} if "class_labels" in inspect.signature(
        type(pipe).__call__).parameters else {"prompt": list(prompts)}
    with torch.no_grad(), quiet_diffusers():
        out = pipe(**args, generator=gens, output_type="latent", **call_kwargs, **kw)
    return out.images.float()


def search_schedule(pipe, steps: int, prompts: Sequence, seeds: Sequence[int] | None = None, *,
                    reference_steps: int = 50, call_kwargs: dict[str, Any] | None = None, sweeps: int = 8,
                    init: Sequence[float] | None = None, model: str | None = None, progress: bool = True) -> Schedule:
    """Find the ``steps``-step schedule whose samples best match ``reference_steps``-step samples.

    Args:
        pipe: a diffusers pipeline, with the sampler to tune already set (``samplers.set_sampler``).
        steps: N, the schedule's step count (2-50).
        prompts: calibration prompts (class labels for class-conditional pipelines); 8-16 are enough: the
            loss is averaged over them and the schedule has only N-1 free values.
        seeds: one seed per prompt (default 0, 1, ...).
        reference_steps: the reference run's step count with the pipeline's stock schedule (default 50).
        call_kwargs: other pipeline arguments (guidance_scale, height/width, the zoo's call kwargs).
        sweeps: coordinate-descent sweeps (default 8; each is at most 2(N-1) N-step runs).
        init: starting values (default: the stock N-step schedule).

    Returns:
        the best :class:`Schedule` found, with its loss and the stock schedule's loss.
    """
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or not 2 <= steps <= 50:
        raise ValueError(f"steps must be an integer in [2, 50], got {steps!r}")
    if reference_steps <= steps:
        raise ValueError(f"reference_steps ({reference_steps}) must exceed steps ({steps})")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("search_schedule needs calibration prompts (8-16)")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    kw = dict(call_kwargs or {})
    for k in ("num_inference_steps", "sigmas", "timesteps", "output_type", "generator", "prompt"):
        kw.pop(k, None)
    kwarg = schedule_kwarg(pipe.scheduler)
    t0 = time.time()
    ref = _latents(pipe, prompts, seeds, kw, num_inference_steps=reference_steps)
    scale = ref.pow(2).mean().item() or 1.0
    evals = 0

    def loss(values: list[float]) -> float:
        nonlocal evals
        evals += 1
        out = _latents(pipe, prompts, seeds, kw, **{kwarg: list(values)})
        return (out - ref).pow(2).mean().item() / scale

    default_loss = loss(_default_values(pipe, steps, kwarg)) if init is None else None
    vals = [float(v) for v in (init or _default_values(pipe, steps, kwarg))]
    if len(vals) != steps:
        raise ValueError(f"init has {len(vals)} values for {steps} steps")
    Schedule(kwarg, vals)  # validates
    best = default_loss if default_loss is not None else loss(vals)
    history = [best]
    frac = 0.5
    integer = kwarg == "timesteps"
    bar = tqdm(range(sweeps), desc=f"schedule search ({steps} steps)", disable=not progress)
    for _ in bar:
        improved = False
        for i in range(1, steps):
            hi = vals[i - 1]
            lo = vals[i + 1] if i + 1 < steps else 0.0
            for target in (hi, lo):
                v = vals[i] + frac * (target - vals[i])
                if integer:
                    v = float(round(v))
                if not lo < v < hi or (integer and v == vals[i]) or v == vals[i]:
                    continue
                cand = vals[:i] + [v] + vals[i + 1:]
                c = loss(cand)
                if c < best:
                    vals, best, improved = cand, c, True
                    break
        history.append(best)
        bar.set_postfix(loss=f"{best:.4g}", move=frac)
        if not improved:
            frac *= 0.5
            if frac < 1 / 64:
                break
    sch = Schedule(kwarg, vals, scheduler=type(pipe.scheduler).__name__, model=model, loss=best,
                   default_loss=default_loss, reference_steps=reference_steps, prompts=len(prompts), history=history)
    logger.info("schedule search: %d-step %s loss %.4g (stock %s) after %d runs in %.0fs", steps, kwarg, best,
                f"{default_loss:.4g}" if default_loss is not None else "n/a", evals, time.time() - t0)
    return sch


# --------------------------------------------------------------------------------------------------
# The "schedule:NAME|PATH" recipe
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleConfig:
    """Sample on a tuned schedule.

    Attributes:
        source: a shipped schedule's name (:func:`shipped_schedules`, e.g. ``"shapes-mmdit-euler8"``) or a path
            to a schedule JSON written by :meth:`Schedule.save`. The schedule fixes the step count (its
            length) whatever ``num_inference_steps`` the call passes.
    """

    source: str

    def schedule(self) -> Schedule:
        p = SCHEDULES_DIR / f"{self.source}.json"
        return Schedule.load(p if p.exists() else self.source)


def _parse(arg: str | None) -> ScheduleConfig:
    if not arg or not arg.strip():
        raise RecipeError(f"schedule needs a name or a path: 'schedule:NAME' (shipped: {shipped_schedules()}) or "
                          "'schedule:path/to/schedule.json'")
    return ScheduleConfig(arg.strip())


def _on_call(pipe, sch: Schedule, kwargs: dict) -> dict:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("sigmas", "timesteps")}
    kwargs["num_inference_steps"] = sch.steps
    return {**kwargs, **sch.call_kwargs()}


def _check(pipe, adapter, config: ScheduleConfig) -> None:
    sch = config.schedule()
    kwarg = schedule_kwarg(pipe.scheduler)
    if kwarg != sch.kwarg:
        raise ValueError(f"schedule {config.source!r} holds {sch.kwarg} but {type(pipe.scheduler).__name__} takes "
                         f"{kwarg}; it was tuned for {sch.scheduler or 'another scheduler'}")


def _install(pipe, st, config: ScheduleConfig) -> Schedule:
    sch = config.schedule()
    if sch.scheduler and sch.scheduler != type(pipe.scheduler).__name__:
        logger.warning("schedule %s was tuned with %s; the pipeline samples with %s", config.source, sch.scheduler,
                       type(pipe.scheduler).__name__)
    return sch


def _uninstall(pipe, st, sch: Schedule) -> None:
    pass  # nothing patched: the per-call hook passes the schedule


def apply_schedule(pipe, config: ScheduleConfig | str):
    """Sample ``pipe`` on a tuned schedule (a shipped name or a JSON path); safe to call twice. Returns ``pipe``.

    Raises:
        FileNotFoundError / ValueError: no such schedule, or the pipeline's scheduler takes no custom
            schedule of that kind (the message names samplers that do).
    """
    config = ScheduleConfig(config) if isinstance(config, str) else config
    return apply_technique(pipe, _NAME, config)


def remove_schedule(pipe):
    """Stop using the tuned schedule (no-op when none is set). Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def _summary(pipe, sch: Schedule) -> dict:
    return {"steps": sch.steps, sch.kwarg: sch.values}


def _families():
    from fastgen.adapters import DIFFUSION_FAMILIES

    return DIFFUSION_FAMILIES


register_technique(Technique(
    name=_NAME, config_cls=ScheduleConfig, parse=_parse, install=_install, uninstall=_uninstall, on_call=_on_call,
    check=_check, to_string=lambda c: f"{_NAME}:{c.source}", summary=_summary, families=_families(),
    help="a tuned N-step timestep schedule (searched against a many-step run; samplers.schedule)",
    example="schedule:shapes-mmdit-euler8", order=1,
    incompatible={"steps": "a schedule fixes the step count itself (its length)"},
))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``fastgen experiment schedule-search MODEL --out FILE [...]``: search a tuned schedule (see ``--help``)."""
    from fastgen.utils.commands import CommandParser

    p = CommandParser(prog="fastgen experiment schedule-search",
                      description="Search a tuned N-step timestep schedule for a zoo model against a many-step run "
                                  "(the schedule: recipe loads it)\nand, with --eval, score the stock and the tuned "
                                  "schedule on held-out prompts.",
                      example="fastgen experiment schedule-search shapes-mmdit --steps 8 --out mmdit-euler8.json "
                              "--eval 200")
    p.add_argument("model", help="a zoo model (shapes-mmdit, shapes-unet)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampler", default=None, help="a samplers.list() name to tune (default: the model's own)")
    p.add_argument("--reference", type=int, default=50, help="reference step count (default 50)")
    p.add_argument("--prompts", type=int, default=16, help="calibration prompts (default 16)")
    p.add_argument("--sweeps", type=int, default=8)
    p.add_argument("--eval", type=int, default=0, help="held-out prompts to score stock vs tuned on (0: none)")
    p.add_argument("--out", required=True, help="where to write the schedule JSON")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    import fastgen
    from fastgen import zoo
    from fastgen.zoo.evaluate import evaluate_pipeline

    from ._calibration import zoo_pipeline_and_prompts

    pipe, prompts = zoo_pipeline_and_prompts(a.model, a.sampler, a.prompts, a.threads)
    sch = search_schedule(pipe, a.steps, prompts, reference_steps=a.reference, call_kwargs=zoo.call_kwargs(a.model),
                          sweeps=a.sweeps, model=a.model)
    sch.save(a.out)
    sys.stdout.write(f"wrote {a.out}: {sch.kwarg} {[round(v, 4) for v in sch.values]} (loss {sch.loss:.4g}, stock "
                     f"{sch.default_loss:.4g})\n")
    if a.eval:
        from fastgen.bench.metrics import psnr

        ref = evaluate_pipeline(pipe, a.model, n=a.eval, steps=a.reference, return_images=True)
        sys.stdout.write(f"reference {a.reference} steps: score {ref['overall']:.3f} "
                         f"single {ref.get('single', float('nan')):.3f}\n")
        for label, extra in ((f"stock {a.steps} steps", None), ("tuned", sch)):
            if extra is not None:
                fastgen.accelerate(pipe, f"schedule:{Path(a.out)}")
            try:
                r = evaluate_pipeline(pipe, a.model, n=a.eval, steps=a.steps, return_images=True)
            finally:
                if extra is not None:
                    fastgen.remove(pipe, "schedule")
            db = psnr(ref["images"], r["images"])
            sys.stdout.write(f"{label}: score {r['overall']:.3f} single {r.get('single', float('nan')):.3f}, "
                             f"PSNR vs {a.reference} steps {db:.2f} dB\n")
    return 0
