"""``fastgen tune``: find the fastest recipe within a quality budget, measured on the target hardware.

Hardware-aware in the sense of HAT/Once-for-All's "measure, don't count FLOPs": every candidate's speed
is the paired wall-clock ratio against the baseline from the benchmark runner (:func:`fastgen.bench.
benchmark`), on the device the pipeline lives on, not a FLOP or step-count proxy. A cache that saves
FLOPs but adds host syncs, or a token method that is slower than attention at small token counts, is
ranked by what it actually costs there.

The search (successive-halving style, Jamieson & Talwalkar 2016, arXiv 1502.07943):

1. **Candidates** come from the registered techniques that have a search grid in :data:`SEARCH_SPACE`
   (samplers at fewer steps ``sampler:NAME@N``, ``steps:N``, step caches ``deepcache:N`` /
   ``blockcache:...``, ``ras:r``, ``tome:r``, guidance intervals ``cfg-interval:f``, the guidance-distilled
   student ``gd`` where one is shipped for the pipeline), each filtered by what this pipeline's family supports:
   a candidate is applied and removed once (``fastgen.accelerate`` validates everything before patching),
   and those that raise ``UnsupportedPipelineError``/``ValueError`` are listed as skipped with the reason.
   Anchors (reference implementations) and techniques without a grid are not searched.
2. **Screening**: every single candidate runs on a few prompts, one timed round.
3. **Combinations**: the best screened step reducers (``sampler``/``steps``) that met the budget are
   paired with each other technique that met it, when the two stack; they are screened the same way.
4. **Confirmation**: the fastest ``confirm_top`` candidates that met the budget in screening are measured
   again on more prompts and more timed rounds; the best recipe is the fastest confirmed one that meets
   the budget (the baseline when none does).

Budgets (:func:`parse_budget`): ``"score>=0.97*baseline"`` (the exact evaluator's score of the zoo
models, relative to the baseline's), ``"score>=0.8"``, ``"psnr>=30"`` (same-seed PSNR against the
baseline, dB), ``"ssim>=0.9"``.

>>> from fastgen.tune import tune, TuneConfig          # doctest: +SKIP
>>> res = tune(pipe, BenchSettings(steps=28), "psnr>=30")  # doctest: +SKIP
>>> res.best["recipe"], res.best["speedup"]            # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from .api import accelerate, remove, summary
from .errors import FastgenError
from .registry import list_techniques, parse_recipe, recipe_string
from .utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["Budget", "BudgetError", "parse_budget", "TuneConfig", "TuneResult", "SEARCH_SPACE", "step_levels",
           "candidate_space", "tune", "STEP_REDUCERS"]


class BudgetError(FastgenError, ValueError):
    """A quality budget string does not follow the grammar."""


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------

_METRICS = ("score", "psnr", "ssim")
_BUDGET_RE = re.compile(
    r"^\s*(?P<metric>[a-z]+)\s*>=\s*(?P<value>[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(?P<rel>\*\s*baseline)?\s*$",
    re.IGNORECASE,
)
_BUDGET_FORMS = "'score>=0.97*baseline', 'score>=0.8', 'psnr>=30' or 'ssim>=0.9'"


@dataclass(frozen=True)
class Budget:
    """A quality floor a recipe must keep.

    Attributes:
        metric: ``"score"`` (exact evaluator score, zoo models only), ``"psnr"`` (dB, same-seed against the
            baseline images) or ``"ssim"`` (same-seed, in [0, 1]).
        threshold: the floor; with ``relative`` a fraction of the baseline's own value (score only).
        relative: the floor is ``threshold * baseline``.
    """

    metric: str
    threshold: float
    relative: bool = False

    def __post_init__(self):
        if self.metric not in _METRICS:
            raise BudgetError(f"unknown budget metric {self.metric!r}; use one of {', '.join(_METRICS)}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise BudgetError(f"budget threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.relative and self.metric != "score":
            raise BudgetError(f"{self.metric} is already measured against the baseline images (the baseline's own "
                              f"{self.metric} is perfect); give an absolute floor, e.g. 'psnr>=30' or 'ssim>=0.9'")
        if self.relative and self.threshold > 1.5:
            raise BudgetError(f"a relative budget is a fraction of the baseline's score (e.g. 0.97), got {self.threshold}")
        if self.metric == "ssim" and self.threshold > 1:
            raise BudgetError(f"SSIM is at most 1; got a floor of {self.threshold}")

    def __str__(self) -> str:
        return f"{self.metric}>={self.threshold:g}" + ("*baseline" if self.relative else "")

    def floor(self, baseline_row: dict) -> float:
        """The absolute floor for the rows measured beside ``baseline_row``."""
        if not self.relative:
            return self.threshold
        base = baseline_row.get(self.metric)
        if base is None or not math.isfinite(base):
            raise BudgetError(f"budget {self} needs the baseline's {self.metric}, which was not measured")
        return self.threshold * base

    def meets(self, row: dict, baseline_row: dict) -> bool:
        """Whether ``row`` (a benchmark row) keeps the budget; rows with an error or no value never do."""
        if row.get("error"):
            return False
        v = row.get(self.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        return float(v) >= self.floor(baseline_row) - 1e-12


def parse_budget(text: str | Budget) -> Budget:
    """Parse ``"METRIC>=VALUE"`` or ``"score>=FRACTION*baseline"`` strictly.

    Raises:
        BudgetError: naming the accepted forms.
    """
    if isinstance(text, Budget):
        return text
    if not isinstance(text, str):
        raise BudgetError(f"a budget is a string like {_BUDGET_FORMS}; got {type(text).__name__}")
    m = _BUDGET_RE.match(text)
    if m is None:
        raise BudgetError(f"cannot parse budget {text!r}; use {_BUDGET_FORMS}")
    metric = m.group("metric").lower()
    if metric not in _METRICS:
        raise BudgetError(f"unknown budget metric {metric!r} in {text!r}; use one of {', '.join(_METRICS)} "
                          f"({_BUDGET_FORMS})")
    return Budget(metric, float(m.group("value")), relative=m.group("rel") is not None)


# --------------------------------------------------------------------------------------------------
# The candidate space
# --------------------------------------------------------------------------------------------------

#: Techniques that reduce the number of denoiser steps; two of them never stack in one recipe.
STEP_REDUCERS = ("sampler", "steps", "schedule")
#: Samplers searched at fewer steps (those a family cannot use are filtered out by their own check).
SEARCHED_SAMPLERS = ("dpm++2m", "unipc", "pseudo-corrector")


def step_levels(steps: int, fractions: Sequence[float] = (0.5, 0.34, 0.25)) -> list[int]:
    """Fewer-steps levels below ``steps`` (descending, distinct, >= 1): ``28 -> [14, 10, 7]``."""
    if steps < 2:
        return []
    out = sorted({max(1, int(round(steps * f))) for f in fractions} - {steps}, reverse=True)
    return [n for n in out if n < steps]


def _grid_sampler(steps: int, fractions: Sequence[float], pipe=None) -> list[str]:
    return [f"sampler:{name}@{n}" for n in step_levels(steps, fractions) for name in SEARCHED_SAMPLERS]


#: technique name -> ``grid(steps, step_fractions, pipe) -> recipes``, mild to aggressive (``pipe`` is the pipeline
#: being tuned, or None when only suggestions are wanted). Techniques registered without an entry here (anchors,
#: trained or calibrated methods) are not searched; pass them in ``TuneConfig.extra`` to include a specific recipe.
SEARCH_SPACE: dict[str, Callable[[int, Sequence[float], Any], list[str]]] = {
    "sampler": _grid_sampler,
    "steps": lambda steps, fr, pipe: [f"steps:{n}" for n in step_levels(steps, fr)],
    "deepcache": lambda steps, fr, pipe: ["deepcache:2", "deepcache:3", "deepcache:5"],
    "blockcache": lambda steps, fr, pipe: ["blockcache:slow", "blockcache:medium", "blockcache:fast"],
    "ras": lambda steps, fr, pipe: ["ras:slow", "ras:medium", "ras:fast"],
    "tome": lambda steps, fr, pipe: ["tome:slow", "tome:medium", "tome:fast"],
    "cfg-interval": lambda steps, fr, pipe: ["cfg-interval:0.8", "cfg-interval:0.6", "cfg-interval:0.4"],
    # the guidance-distilled student shipped for a zoo teacher (skipped with the reason elsewhere)
    "gd": lambda steps, fr, pipe: ["gd"],
    # the tuned schedules shipped for this pipeline's zoo model (samplers/schedules)
    "schedule": lambda steps, fr, pipe: _shipped_schedules(pipe, steps),
}


def _shipped_schedules(pipe, steps: int) -> list[str]:
    """``schedule:NAME`` for every shipped schedule tuned on ``pipe``'s zoo model with fewer than ``steps`` steps."""
    if pipe is None:
        return []
    from fastgen.samplers.schedule import schedules_for

    return [f"schedule:{name}" for name, n in schedules_for(pipe) if n < steps]


def _techniques_of(recipe: str) -> list[str]:
    from .registry import technique_for_config

    return [technique_for_config(c).name for c in parse_recipe(recipe)]


def _applicable(pipe, recipe: str) -> str | None:
    """None when ``recipe`` applies to ``pipe``; else the reason. ``pipe`` is left unpatched.

    A combination is also applied one technique per call in both orders: some pairwise checks (RAS vs
    ToMe) only see techniques that are already applied, so one ``accelerate`` call with both passes them.
    """
    configs = parse_recipe(recipe)
    orders = [[configs]] + ([[[c] for c in configs], [[c] for c in reversed(configs)]] if len(configs) > 1 else [])
    for order in orders:
        try:
            for part in order:
                accelerate(pipe, *part)
        except (FastgenError, ValueError, TypeError, NotImplementedError) as e:  # e.g. gd: no student here
            return f"{type(e).__name__}: {e}"
        finally:
            remove(pipe)
    return None


def _round_robin(groups: list[list[str]]) -> list[str]:
    out = []
    for items in itertools.zip_longest(*groups):
        out.extend(x for x in items if x is not None)
    return out


def candidate_space(pipe, steps: int, *, step_fractions: Sequence[float] = (0.5, 0.34, 0.25),
                    extra: Sequence[str] = ()) -> tuple[list[str], list[dict]]:
    """Single-technique candidates for ``pipe`` at a baseline of ``steps`` steps.

    Returns ``(candidates, skipped)``: normalised recipe strings ordered round-robin over techniques (so a
    trial cap keeps every technique represented), and ``{"recipe", "reason"}`` for each grid entry this
    pipeline cannot use. ``pipe`` must be unpatched and is left unpatched.
    """
    if summary(pipe)["recipe"] != "baseline":
        raise FastgenError("candidate_space() needs an unpatched pipeline; call fastgen.remove(pipe) first")
    groups: list[list[str]] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for tech in list_techniques():
        grid = SEARCH_SPACE.get(tech.name)
        if grid is None:
            logger.debug("tune: technique %s has no search grid; not searched", tech.name)
            continue
        group = []
        for r in grid(steps, step_fractions, pipe):
            norm = recipe_string(parse_recipe(r))
            if norm in seen:
                continue
            seen.add(norm)
            why = _applicable(pipe, norm)
            if why is None:
                group.append(norm)
            else:
                skipped.append({"recipe": norm, "reason": why})
        if group:
            groups.append(group)
    out = _round_robin(groups)
    for r in extra:
        norm = recipe_string(parse_recipe(r))  # a bad extra recipe is the user's error: raise
        if norm == "baseline":
            continue
        if norm in out:  # already in the grid: screen it first
            out.remove(norm)
            out.insert(0, norm)
            continue
        if norm in seen:  # in the grid but not applicable here
            continue
        seen.add(norm)
        why = _applicable(pipe, norm)
        if why is None:
            out.insert(0, norm)
        else:
            skipped.append({"recipe": norm, "reason": why})
    return out, skipped


def combinations(pipe, passed: Sequence[dict], *, max_reducers: int = 2, limit: int | None = None) -> list[str]:
    """Two-technique recipes from screened single rows that met the budget (fastest first).

    Pairs each of the ``max_reducers`` fastest step reducers (``sampler``/``steps``) that met the budget
    with every other technique's passing candidates, and the other techniques with each other; only
    pairs that stack on this pipeline are kept.
    """
    rows = sorted(passed, key=lambda r: -(r.get("speedup") or 0))
    reducers = [r["recipe"] for r in rows if _techniques_of(r["recipe"])[0] in STEP_REDUCERS][:max_reducers]
    others = [r["recipe"] for r in rows if _techniques_of(r["recipe"])[0] not in STEP_REDUCERS]
    pairs = [(a, b) for a in reducers for b in others]
    pairs += list(itertools.combinations(others, 2))
    out = []
    for a, b in pairs:
        if not set(_techniques_of(a)).isdisjoint(_techniques_of(b)):  # e.g. two extra multi-technique recipes
            continue
        recipe = recipe_string(parse_recipe(f"{a}+{b}"))
        if recipe in out:
            continue
        if _applicable(pipe, recipe) is None:
            out.append(recipe)
        if limit is not None and len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------

@dataclass
class TuneConfig:
    """How much to search.

    Attributes:
        max_trials: distinct candidate recipes screened, singles and combinations together (default 24).
            Singles are ordered round-robin over techniques, so a cap keeps each represented; up to a
            quarter is kept for combinations. Range 2-100; the time is about ``max_trials`` x
            ``screen_prompts`` images plus one timed call each.
        screen_prompts: prompts per candidate while screening (default 2; the settings' first prompts).
        screen_repeats: timed paired rounds while screening (default 1).
        confirm_top: how many of the fastest screened candidates that met the budget are confirmed
            (default 3). 0 skips confirmation (the screening numbers decide).
        confirm_prompts: prompts per candidate when confirming (default 8, capped by the settings'
            prompts).
        confirm_repeats: timed paired rounds when confirming (default 3).
        combos: also screen two-technique combinations of candidates that met the budget (default True).
        step_fractions: fewer-steps levels for ``sampler:X@N``/``steps:N`` as fractions of the baseline
            steps (default 1/2, 1/3, 1/4).
        batch: recipes benchmarked in one runner call (each call re-measures the baseline beside them;
            a failing recipe costs its batch a retry one by one). Default 8.
        extra: more recipes to screen beside the grid (e.g. a distilled model's ``qalora:...``).
        screen_slack: for ``score`` budgets, a screened candidate within one image's worth of the floor
            (``1 / images screened``) still goes on to confirmation, since a score on 2-4 prompts moves in
            coarse steps (default True). The confirmed numbers alone decide the best recipe.
    """

    max_trials: int = 24
    screen_prompts: int = 2
    screen_repeats: int = 1
    confirm_top: int = 3
    confirm_prompts: int = 8
    confirm_repeats: int = 3
    combos: bool = True
    step_fractions: tuple[float, ...] = (0.5, 0.34, 0.25)
    batch: int = 8
    extra: tuple[str, ...] = ()
    screen_slack: bool = True

    def __post_init__(self):
        for name, lo in (("max_trials", 1), ("screen_prompts", 1), ("screen_repeats", 1), ("confirm_top", 0),
                         ("confirm_prompts", 1), ("confirm_repeats", 1), ("batch", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"TuneConfig.{name} must be an integer >= {lo}, got {v!r}")
        if not self.step_fractions or not all(0 < f < 1 for f in self.step_fractions):
            raise ValueError(f"step_fractions must be fractions in (0, 1), got {self.step_fractions!r}")


_TRIAL_KEYS = ("recipe", "stage", "speedup", "latency_s", "psnr", "ssim", "score", "score_ratio", "peak_mem_mb",
               "steps", "denoiser_calls", "n_images", "meets_budget", "error")


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        budget: the budget as a string. model, device: what was measured.
        baseline: the baseline's confirmed (or screened) trial.
        best: the fastest confirmed recipe within budget (``recipe, speedup, score_ratio, psnr, ssim,
            latency_s, meets_budget``); the baseline when nothing beat it.
        front: speed/quality Pareto front over every recipe's last measurement (fastest last).
        trials: every measurement (``stage`` = ``screen`` or ``confirm``), in order.
        skipped: grid recipes this pipeline cannot use, with the reason.
    """

    budget: str
    model: str
    device: str
    baseline: dict
    best: dict
    front: list[dict]
    trials: list[dict]
    skipped: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """The ``--json`` document: ``{"best", "front", "trials", ...}`` with JSON-safe numbers."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean({"best": self.best, "front": self.front, "trials": self.trials, "budget": self.budget,
                      "model": self.model, "device": self.device, "baseline": self.baseline, "skipped": self.skipped})

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)


def _trial(row: dict, base: dict, budget: Budget, stage: str) -> dict:
    t = {k: row.get(k) for k in _TRIAL_KEYS if k in row}
    t["stage"] = stage
    bs = base.get("score")
    t["score_ratio"] = (round(row["score"] / bs, 4) if row.get("score") is not None and bs else None)
    t["meets_budget"] = budget.meets(row, base)
    return t


def _pareto(trials: list[dict], metric: str) -> list[dict]:
    pts = [t for t in trials if not t.get("error") and t.get(metric) is not None and t.get("speedup") is not None]
    front, best_q = [], -math.inf
    for t in sorted(pts, key=lambda t: (-t["speedup"], -float(t[metric]))):
        q = float(t[metric])
        if q > best_q:
            front.append(t)
            best_q = q
    return sorted(front, key=lambda t: t["speedup"])


class _Runner:
    """Runs benchmark batches, re-trying a failed batch one recipe at a time."""

    def __init__(self, pipe, model_name, quality_fn, budget):
        self.pipe, self.model_name, self.quality_fn, self.budget = pipe, model_name, quality_fn, budget

    def run(self, recipes: list[str], settings, stage: str, batch: int, on_done: Callable[[int], None]) -> list[dict]:
        from .bench import benchmark

        out: list[dict] = []
        for i in range(0, len(recipes), batch):
            chunk = recipes[i:i + batch]
            try:
                rows = benchmark(self.pipe, chunk, settings, model_name=self.model_name, quality_fn=self.quality_fn,
                                 progress=False)
                groups = [(rows[0], rows[1:])]
            except FastgenError:
                raise
            except Exception as e:  # one broken recipe must not end the search: retry one by one
                logger.warning("tune: batch %s failed (%s); retrying one by one", chunk, e)
                groups = []
                for r in chunk:
                    try:
                        rows = benchmark(self.pipe, [r], settings, model_name=self.model_name,
                                         quality_fn=self.quality_fn, progress=False)
                        groups.append((rows[0], rows[1:]))
                    except Exception as e2:  # noqa: BLE001 - recorded as the trial's error
                        remove(self.pipe)
                        out.append({"recipe": r, "stage": stage, "error": f"{type(e2).__name__}: {e2}",
                                    "meets_budget": False})
            for base, rows in groups:
                out.extend(_trial(r, base, self.budget, stage) for r in rows)
                out.append(_trial(base, base, self.budget, stage))
            on_done(len(chunk))
        # one baseline entry per stage call (the first batch's); candidates keep their own batch's ratios
        bases = [t for t in out if t["recipe"] == "baseline"]
        out = [t for t in out if t["recipe"] != "baseline"]
        return (bases[:1] + out) if bases else out


def tune(
    pipe,
    settings=None,
    budget: str | Budget = "psnr>=30",
    *,
    config: TuneConfig | None = None,
    model_name: str = "",
    quality_fn: Callable[[list[str], np.ndarray], dict] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> TuneResult:
    """Search recipes for ``pipe`` and return the fastest within ``budget`` (see the module docstring).

    Args:
        pipe: an unpatched pipeline on the target device (it is left unpatched).
        settings: :class:`fastgen.bench.BenchSettings` of the baseline call (steps, size, guidance); its
            ``prompts`` are the pool screening and confirmation draw from (first N).
        budget: a :class:`Budget` or its string (:func:`parse_budget`).
        config: :class:`TuneConfig`.
        model_name: recorded in the result.
        quality_fn: ``quality_fn(prompts, uint8 images) -> {"overall": ...}`` (the zoo evaluator); needed
            for ``score`` budgets.
        progress: ``progress(fraction, description)`` called as trials finish.

    Raises:
        BudgetError: bad budget, or a ``score`` budget without ``quality_fn``.
    """
    from .bench import BenchSettings

    b = parse_budget(budget)
    cfg = config or TuneConfig()
    s = settings or BenchSettings()
    if b.metric == "score" and quality_fn is None:
        raise BudgetError(f"budget {b} needs a model with an exact evaluator (the zoo models shapes-mmdit, "
                          "shapes-unet); use a same-seed budget such as 'psnr>=30' or 'ssim>=0.9' for this model")
    if summary(pipe)["recipe"] != "baseline":
        raise FastgenError("tune() needs an unpatched pipeline; call fastgen.remove(pipe) first")
    prompts = list(s.prompts)
    screen_s = replace(s, prompts=tuple(prompts[:cfg.screen_prompts]), repeats=cfg.screen_repeats, control=False)
    confirm_s = replace(s, prompts=tuple(prompts[:cfg.confirm_prompts]), repeats=cfg.confirm_repeats, control=False)

    singles, skipped = candidate_space(pipe, s.steps, step_fractions=cfg.step_fractions, extra=cfg.extra)
    n_single = len(singles)
    if cfg.combos and n_single > 1:
        n_single = min(n_single, max(1, cfg.max_trials - max(1, cfg.max_trials // 4)))
    n_single = min(n_single, cfg.max_trials)
    singles = singles[:n_single]
    total = [max(1, cfg.max_trials + cfg.confirm_top)]
    done = [0]

    def on_done(n: int, what: str = "screening") -> None:
        done[0] += n
        if progress is not None:
            progress(min(1.0, done[0] / total[0]), f"tune: {what} ({done[0]} trials)")

    runner = _Runner(pipe, model_name, quality_fn, b)
    logger.info("tune: screening %d single-technique candidates for budget %s", len(singles), b)
    trials = runner.run(singles, screen_s, "screen", cfg.batch, on_done) if singles else []
    if not trials or trials[0]["recipe"] != "baseline":  # nothing measured beside it: the baseline alone
        trials = _baseline_only(pipe, screen_s, model_name, quality_fn, b) + trials
    base_screen = trials[0]
    screened = trials[1:]

    def promising(t: dict) -> bool:  # screening verdict: the budget, with slack for coarse scores
        if (t.get("speedup") or 0) <= 1.0 or t.get("error"):
            return False
        if t.get("meets_budget"):
            return True
        if b.metric == "score" and cfg.screen_slack and t.get("score") is not None:
            return t["score"] >= b.floor(base_screen) - 1.0 / max(1, t.get("n_images") or 1) - 1e-9
        return False

    if cfg.combos:
        room = cfg.max_trials - len(singles)
        passed = [t for t in screened if promising(t)]
        if room > 0 and len(passed) >= 2:
            combos = combinations(pipe, passed, limit=room)
            if combos:
                logger.info("tune: screening %d combinations", len(combos))
                more = runner.run(combos, screen_s, "screen", cfg.batch, lambda n: on_done(n, "combinations"))
                screened += [t for t in more if t["recipe"] != "baseline"]
    trials = [base_screen] + screened
    ranked = sorted((t for t in screened if promising(t)), key=lambda t: -t["speedup"])
    final: dict[str, dict] = {t["recipe"]: t for t in trials}
    if cfg.confirm_top and ranked:
        top = [t["recipe"] for t in ranked[:cfg.confirm_top]]
        logger.info("tune: confirming %s on %d prompts", top, len(confirm_s.prompts))
        confirmed = runner.run(top, confirm_s, "confirm", max(len(top), 1), lambda n: on_done(n, "confirming"))
        trials += confirmed
        final.update({t["recipe"]: t for t in confirmed})
        pool = [t for t in confirmed if t["recipe"] != "baseline"]
    else:
        pool = [t for t in ranked if t.get("meets_budget")]
    base = final["baseline"]
    winners = sorted((t for t in pool if t.get("meets_budget") and (t.get("speedup") or 0) > 1.0),
                     key=lambda t: -t["speedup"])
    pick = winners[0] if winners else base
    best = {k: pick.get(k) for k in ("recipe", "speedup", "score_ratio", "psnr", "ssim", "latency_s", "stage")}
    best["meets_budget"] = bool(pick.get("meets_budget"))
    best["found"] = bool(winners)
    front = _pareto(list(final.values()), b.metric)
    if progress is not None:
        progress(1.0, "tune: done")
    device = str(getattr(pipe, "device", "cpu"))
    return TuneResult(budget=str(b), model=model_name, device=device, baseline=base, best=best, front=front,
                      trials=trials, skipped=skipped)


def _baseline_only(pipe, s, model_name, quality_fn, b: Budget) -> list[dict]:
    from .bench import benchmark

    rows = benchmark(pipe, ["baseline"], s, model_name=model_name, quality_fn=quality_fn, progress=False)
    return [_trial(rows[0], rows[0], b, "screen")]


def format_result(res: TuneResult) -> str:
    """A short Markdown report of a :class:`TuneResult` (the CLI prints it)."""
    lines = [f"budget `{res.budget}` on {res.device} ({res.model or 'pipeline'}): "
             + (f"best `{res.best['recipe']}` at {res.best['speedup']:.2f}x" if res.best.get("found")
                else "no candidate beat the baseline within the budget"), "",
             "| recipe | stage | speedup | latency_s | psnr | ssim | score | in budget |", "|---|---|---|---|---|---|---|---|"]

    def f(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3f}"
        return str(v)

    for t in res.trials:
        lines.append(f"| {t['recipe']} | {t.get('stage')} | {f(t.get('speedup'))} | {f(t.get('latency_s'))} | "
                     f"{f(t.get('psnr'))} | {f(t.get('ssim'))} | {f(t.get('score'))} | "
                     f"{'yes' if t.get('meets_budget') else ('error' if t.get('error') else 'no')} |")
    if res.skipped:
        lines += ["", "not applicable here: " + ", ".join(f"`{s['recipe']}`" for s in res.skipped)]
    return "\n".join(lines) + "\n"
