"""Benchmark recipes on one pipeline, side by side in one process (DESIGN.md §6).

1. Every recipe is parsed first (a bad one fails before any work).
2. Quality pass (also the warm-up): each recipe is applied, generates the same prompts with the same
   seeds, and is removed; peak memory is measured here. PSNR/SSIM are against the baseline's images;
   an optional ``quality_fn(prompts, images)`` adds exact scores (the default models' evaluator).
3. Timing pass: the recipes run interleaved (A B A B ...), applied and removed outside the timed region;
   latency is the median, speedup the median of per-round paired ratios against the baseline.
4. ``control=True`` adds, for every recipe faster than baseline, a ``steps:N`` row: the baseline sampler
   with the step count that would take the same time. A cache must beat simply running fewer steps.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..api import accelerate, remove, summary
from ..hooks import attach, detach_if_empty, get_state
from ..registry import parse_recipe, recipe_string
from ..prompts import GENERIC_PROMPTS
from ..utils.logging import get_logger
from .memory import PeakMemory
from .metrics import psnr, ssim
from .report import environment
from .timing import paired_ratio, paired_timing

logger = get_logger(__name__)

__all__ = ["BenchSettings", "benchmark", "call_kwargs"]

#: Quality-pass prompts of a user's pipeline when none are given (generic; ``fastgen bench`` passes a zoo model's
#: held-out prompts itself).
DEFAULT_PROMPTS = GENERIC_PROMPTS[:4]


@dataclass
class BenchSettings:
    """What to run for every recipe.

    Attributes:
        steps: ``num_inference_steps`` of the baseline (recipes such as ``sampler:x@N`` override it).
        prompts: prompts for the quality pass (class names or ids for class-conditional pipelines).
        seeds: one image per (prompt, seed).
        per_prompt_seeds: the image of prompt ``i`` uses seed ``seed + i`` (the zoo evaluator's convention,
            ``fastgen.zoo.evaluate.evaluate_pipeline``), so a score averages over many initial noises instead of
            reusing one noise for every prompt. ``fastgen bench`` turns it on for zoo models.
        height, width: image size in pixels (None: the pipeline's default).
        guidance_scale: None keeps the pipeline's default.
        repeats: timed rounds per recipe (median reported).
        warmup: extra untimed calls per recipe before timing (the quality pass already warms up).
        control: add the fewer-steps control rows.
        extra_call_kwargs: passed to every pipeline call.
    """

    steps: int = 28
    prompts: Sequence[str] = DEFAULT_PROMPTS
    seeds: Sequence[int] = (0,)
    per_prompt_seeds: bool = False
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    repeats: int = 3
    warmup: int = 0
    control: bool = False
    extra_call_kwargs: dict = field(default_factory=dict)


def call_kwargs(pipe, prompt: str, seed: int, s: BenchSettings) -> dict[str, Any]:
    """Keyword arguments for one seeded pipeline call returning float images (numpy, [0, 1])."""
    import inspect

    from ..adapters import get_adapter

    adapter = get_adapter(pipe)
    kw: dict[str, Any] = {"num_inference_steps": s.steps, "output_type": "np",
                          "generator": torch.Generator("cpu").manual_seed(seed)}
    if adapter.conditioning == "class":
        label = int(prompt) if str(prompt).isdigit() else pipe.get_label_ids([prompt])[0]
        kw["class_labels"] = [label]
    else:
        kw["prompt"] = prompt
        if s.height is not None:
            kw["height"] = s.height
        if s.width is not None:
            kw["width"] = s.width
        params = inspect.signature(type(pipe).__call__).parameters
        if "use_resolution_binning" in params:
            kw["use_resolution_binning"] = False
        if "clean_caption" in params:
            kw["clean_caption"] = False
    if s.guidance_scale is not None:
        kw["guidance_scale"] = s.guidance_scale
    kw.update(s.extra_call_kwargs)
    return kw


def _generate(pipe, s: BenchSettings, prompts: Sequence[str]) -> np.ndarray:
    images = []
    for i, prompt in enumerate(prompts):
        for seed in s.seeds:
            out = pipe(**call_kwargs(pipe, prompt, seed + i if s.per_prompt_seeds else seed, s)).images
            images.append(np.asarray(out[0], dtype=np.float32))
    return np.stack(images)


def benchmark(
    pipe,
    recipes: Sequence[str],
    settings: BenchSettings | None = None,
    *,
    model_name: str = "",
    quality_fn: Callable[[list[str], np.ndarray], dict] | None = None,
    progress: bool = True,
    keep_images: bool = False,
) -> list[dict]:
    """Benchmark ``recipes`` on ``pipe`` and return one flat dict per recipe (baseline first).

    Each row has ``recipe, model, device, dtype, threads, steps, latency_s, speedup, peak_mem_mb, psnr,
    ssim, denoiser_calls`` (plus ``score``/``score_*`` from ``quality_fn``, and the environment). The
    baseline is added as the reference when not listed. The pipeline is left unpatched. With
    ``keep_images`` each row also holds ``images``: the quality pass's float images (N, H, W, 3).
    """
    s = settings or BenchSettings()
    parsed = {}
    for r in recipes:
        parsed[recipe_string(parse_recipe(r))] = parse_recipe(r)  # normalised names; errors before any work
    if "baseline" in parsed:
        parsed = {"baseline": parsed.pop("baseline"), **parsed}
    else:
        parsed = {"baseline": [], **parsed}
    if summary(pipe)["recipe"] != "baseline":
        raise ValueError("benchmark() needs an unpatched pipeline; call fastgen.remove(pipe) first")
    rows = _run(pipe, parsed, s, model_name, quality_fn, progress, reference=None)
    if s.control:
        base = rows[0]
        ctrl = {}
        for row in rows[1:]:
            if row.get("speedup") and row["speedup"] > 1.05:
                n = max(1, round(base["steps"] / row["speedup"]))
                if n < base["steps"]:
                    ctrl[f"steps:{n}"] = parse_recipe(f"steps:{n}")
        ctrl = {k: v for k, v in ctrl.items() if k not in parsed}
        if ctrl:
            ref = rows[0]["_images"]
            more = _run(pipe, {"baseline": [], **ctrl}, s, model_name, quality_fn, progress, reference=ref)
            for r in more[1:]:
                r["control"] = True
            rows.extend(more[1:])
    for r in rows:
        images = r.pop("_images", None)
        if keep_images:
            r["images"] = images
    return rows


def _run(*args, **kwargs) -> list[dict]:
    from ..utils.logging import quiet_diffusers

    with quiet_diffusers():
        return _run_quiet(*args, **kwargs)


def _run_quiet(pipe, recipes: dict[str, list], s: BenchSettings, model_name: str, quality_fn, progress: bool,
         reference: np.ndarray | None) -> list[dict]:
    device = getattr(pipe, "device", torch.device("cpu"))
    dtype = getattr(pipe, "dtype", torch.float32)
    env = environment(device, dtype)
    prompts = list(s.prompts)
    n_calls = len(recipes) * (len(prompts) * len(s.seeds) + s.repeats + s.warmup)
    bar = tqdm(total=n_calls, desc="fastgen bench", disable=not progress)
    rows: list[dict] = []
    try:
        for name, configs in recipes.items():
            if configs:
                accelerate(pipe, *configs)
            else:
                attach(pipe)  # count denoiser calls of the baseline too (no technique applied)
            try:
                with PeakMemory(device) as mem:
                    images = _generate(pipe, s, prompts)
                last = get_state(pipe).last_call or {}
            finally:
                remove(pipe)
                detach_if_empty(pipe)
            bar.update(len(prompts) * len(s.seeds))
            row: dict[str, Any] = {"recipe": name, "model": model_name, **env,
                                   "steps": last.get("steps_run", s.steps), "denoiser_calls": last.get("denoiser_calls"),
                                   "peak_mem_mb": round(mem.peak_mb, 1), "n_images": len(images),
                                   "height": images.shape[1], "width": images.shape[2], "repeats": s.repeats,
                                   "_images": images}
            if not np.isfinite(images).all():
                row["error"] = "non-finite values (NaN/inf) in the output images"
                logger.warning("%s: %s", name, row["error"])
            if quality_fn is not None:
                q = quality_fn([p for p in prompts for _ in s.seeds], (np.clip(images, 0, 1) * 255).round().astype(np.uint8))
                row["score"] = q.get("overall")
                row.update({f"score_{k}": v for k, v in q.items() if k != "overall" and isinstance(v, (int, float))})
            rows.append(row)
        ref = reference if reference is not None else rows[0]["_images"]
        for row in rows:
            row["psnr"] = round(psnr(ref, row["_images"]), 3)
            row["ssim"] = round(ssim(ref, row["_images"]), 5)
        # timing: one image per call, recipes interleaved, applied/removed outside the timed region
        timed = {name: (lambda: pipe(**call_kwargs(pipe, prompts[0], s.seeds[0], s))) for name in recipes}
        times = paired_timing(
            timed, repeats=s.repeats, warmup=s.warmup, device=device,
            setup=lambda n: accelerate(pipe, *recipes[n]) if recipes[n] else None,
            teardown=lambda n: remove(pipe), progress=lambda: bar.update(1),
        )
    finally:
        bar.close()
        remove(pipe)
    base_times = times["baseline"]
    for row in rows:
        t = times[row["recipe"]]
        row["latency_s"] = round(statistics.median(t), 4)
        row["latency_min_s"] = round(min(t), 4)
        row["latency_max_s"] = round(max(t), 4)
        row["speedup"] = round(paired_ratio(base_times, t), 3)
    return rows
