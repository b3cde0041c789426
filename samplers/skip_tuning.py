"""Skip-Tuning: training-free scaling of a UNet's encoder→decoder skip connections.

Ma, Xue, et al., "The Surprising Effectiveness of Skip-Tuning in Diffusion Sampling" (ICML 2024,
arXiv 2402.15170): multiplying the skip features ``h_i`` a UNet decoder receives from its encoder by
``rho_i < 1`` improves few-step samples (EDM ImageNet-64 FID 1.75 at 19 NFE). ``rho`` is interpolated
linearly over the skips, from ``rho_bottom`` at the deepest (lowest resolution) to ``rho_top`` at the
outermost (full resolution). The best values depend on the model and the step count, hence
:func:`search_skip_tuning`, which scores a small grid on a handful of prompts.

How: a diffusers ``ModelHook`` on each ``unet.up_blocks[i]`` scales the ``res_hidden_states_tuple``
keyword the UNet passes it; nothing of the UNet's code is copied, ``remove_skip_tuning`` takes the hooks
off and the pipeline is bit-exact again. UNet pipelines only (SD1.5/SD2, SDXL); DiTs have no skips.

>>> fastgen.accelerate(pipe, "skip-tuning:0.9,1.0+sampler:unipc@8")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.api import apply_technique, remove_technique
from fastgen.hooks import HookBase, HookSet, uninstall_hooks
from fastgen.registry import Technique, register_technique
from fastgen.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["SkipTuningConfig", "apply_skip_tuning", "remove_skip_tuning", "skip_scales", "search_skip_tuning"]

_NAME = "skip-tuning"
_HOOK = "fastgen_skip_tuning"
FAMILIES = ("sd", "sdxl")


@dataclass(frozen=True)
class SkipTuningConfig:
    """Skip-connection scales, linear from the deepest skip (``rho_bottom``) to the outermost (``rho_top``).

    Attributes:
        rho_top: scale of the full-resolution skips (default 0.9). Lower shifts detail from the encoder's
            copy to the decoder's own prediction. Sensible range 0.7-1.0; 1.0 with ``rho_bottom=1`` is a
            no-op. No speed effect: it changes quality at a given step count.
        rho_bottom: scale of the deepest skips (default 1.0). Range 0.8-1.05.
    """

    rho_top: float = 0.9
    rho_bottom: float = 1.0

    def __post_init__(self):
        for k in ("rho_top", "rho_bottom"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 2.0:
                raise ValueError(f"SkipTuningConfig.{k} must be a scale in (0, 2], got {v!r}")

    def to_string(self) -> str:
        return f"{_NAME}:{self.rho_top:g},{self.rho_bottom:g}"


def _parse(arg: str | None) -> SkipTuningConfig:
    if not arg or not arg.strip():
        return SkipTuningConfig()
    parts = [p.strip() for p in arg.split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise RecipeError(f"skip-tuning takes 'RHO_TOP[,RHO_BOTTOM]' (e.g. 'skip-tuning:0.9,1.0'), got {arg!r}") from None
    if len(vals) > 2:
        raise RecipeError(f"skip-tuning takes at most two scales (top, bottom), got {arg!r}")
    return SkipTuningConfig(*vals)


def _up_blocks(pipe) -> list[torch.nn.Module]:
    unet = getattr(pipe, "unet", None)
    blocks = getattr(unet, "up_blocks", None)
    if blocks is None:
        raise UnsupportedPipelineError(f"skip-tuning scales a UNet's skip connections; {type(pipe).__name__} has no "
                                       f"UNet with up_blocks (families: {', '.join(FAMILIES)})")
    return list(blocks)


def _skips_per_block(block) -> int:
    return len(getattr(block, "resnets", [])) or 1


def skip_scales(pipe, config: SkipTuningConfig) -> list[list[float]]:
    """The scale of every skip tensor, per up block, in the order each block consumes its tuple.

    The UNet pops skips from the end of its encoder list: ``up_blocks[0]`` takes the deepest ones and the
    last up block the full-resolution ones; within a block's tuple the last element is consumed first
    (deepest). Skip ``k`` of ``K`` in consumption order gets ``rho_bottom + (rho_top - rho_bottom) * k / (K-1)``.
    """
    blocks = _up_blocks(pipe)
    counts = [_skips_per_block(b) for b in blocks]
    total = sum(counts)
    scales: list[list[float]] = []
    k = 0
    for n in counts:
        consumed = []
        for _ in range(n):
            f = k / max(1, total - 1)
            consumed.append(config.rho_bottom + (config.rho_top - config.rho_bottom) * f)
            k += 1
        scales.append(list(reversed(consumed)))  # tuple order: the last element is consumed first
    return scales


class _SkipScaleHook(HookBase):
    def __init__(self, scales: list[float]):
        super().__init__()
        self.scales = scales

    def pre_forward(self, module, *args, **kwargs):
        res = kwargs.get("res_hidden_states_tuple")
        if res is None:
            raise RuntimeError("skip-tuning: the up block was called without res_hidden_states_tuple= (a UNet "
                               "forward this diffusers version does not have); remove skip-tuning")
        if len(res) != len(self.scales):
            raise RuntimeError(f"skip-tuning: the up block got {len(res)} skips, expected {len(self.scales)}")
        kwargs["res_hidden_states_tuple"] = tuple(h if s == 1.0 else h * s for h, s in zip(res, self.scales))
        return args, kwargs


def _check(pipe, adapter, config: SkipTuningConfig) -> None:
    skip_scales(pipe, config)  # raises before anything is patched


def _install(pipe, st, config: SkipTuningConfig) -> HookSet:
    handle = HookSet()
    for block, s in zip(_up_blocks(pipe), skip_scales(pipe, config)):
        handle.add(block, _SkipScaleHook(s), _HOOK)
    return handle


def _summary(pipe, handle: HookSet) -> dict:
    return {"scaled_up_blocks": len(handle.entries)}


def apply_skip_tuning(pipe, config: SkipTuningConfig | None = None):
    """Scale ``pipe``'s UNet skip connections (see the module docstring); safe to call twice. Returns ``pipe``."""
    return apply_technique(pipe, _NAME, config)


def remove_skip_tuning(pipe):
    """Take the skip scales off (bit-exact). Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def search_skip_tuning(pipe, prompts: Sequence[str], score: Callable[[list[str], Any], float], *,
                       rho_top: Sequence[float] = (0.8, 0.85, 0.9, 0.95, 1.0),
                       rho_bottom: Sequence[float] = (0.95, 1.0), call_kwargs: dict[str, Any] | None = None,
                       seeds: Sequence[int] | None = None) -> tuple[SkipTuningConfig, list[dict[str, Any]]]:
    """Pick the skip scales that maximise ``score(prompts, images)`` on a handful of prompts.

    Args:
        pipe: a UNet pipeline with the sampler and step count to tune for already set (``call_kwargs``
            carries ``num_inference_steps``, ``guidance_scale``, sizes).
        prompts: 8-32 prompts; ``seeds`` one per prompt (default 0, 1, ...).
        score: higher is better; e.g. the zoo evaluator's overall score
            (``lambda p, im: fastgen.zoo.evaluate.score(p, im)["overall"]``) or minus the error against a
            many-step run.
        rho_top / rho_bottom: the grid (the no-op 1.0, 1.0 is always included).

    Returns:
        ``(best config, rows)``; every row has ``rho_top``, ``rho_bottom``, ``score``. Ties go to the config
        closest to the no-op.
    """
    import numpy as np

    from fastgen.utils.logging import quiet_diffusers

    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    grid = sorted({(1.0, 1.0)} | {(float(t), float(b)) for t in rho_top for b in rho_bottom})
    rows = []
    for t, b in grid:
        cfg = SkipTuningConfig(t, b)
        apply_skip_tuning(pipe, cfg)
        try:
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            with torch.no_grad(), quiet_diffusers():
                out = pipe(list(prompts), generator=gens, output_type="np", **(call_kwargs or {})).images
        finally:
            remove_skip_tuning(pipe)
        imgs = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        rows.append({"rho_top": t, "rho_bottom": b, "score": float(score(list(prompts), imgs))})
        logger.info("skip-tuning %.2f,%.2f: score %.4f", t, b, rows[-1]["score"])
    best = max(rows, key=lambda r: (r["score"], -abs(1 - r["rho_top"]) - abs(1 - r["rho_bottom"])))
    return SkipTuningConfig(best["rho_top"], best["rho_bottom"]), rows


register_technique(Technique(
    name=_NAME, config_cls=SkipTuningConfig, parse=_parse, install=_install, uninstall=uninstall_hooks,
    check=_check, summary=_summary,
    to_string=lambda c: c.to_string(), families=FAMILIES,
    help="Skip-Tuning: scale a UNet's skip connections (training-free quality at few steps; no speed change)",
    example="skip-tuning:0.9,1.0",
))


def main(argv: list[str] | None = None) -> int:
    """``fastgen experiment skip-tuning shapes-unet --steps 8 [--sampler ddim] [--prompts 32] [--eval 200]``: search
    the scales on calibration prompts with the zoo evaluator, then score no-op vs best on held-out prompts."""
    import json
    import sys

    from fastgen.utils.commands import CommandParser

    p = CommandParser(prog="fastgen experiment skip-tuning",
                      description="Search Skip-Tuning's skip scales on a UNet zoo model's calibration prompts with the "
                                  "exact evaluator,\nthen score no-op vs the best scales on held-out prompts.",
                      example="fastgen experiment skip-tuning shapes-unet --steps 8 --sampler ddim --prompts 32 "
                              "--eval 200")
    p.add_argument("model", help="a UNet zoo model (shapes-unet)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampler", default=None, help="a samplers.list() name (default: the model's own)")
    p.add_argument("--prompts", type=int, default=32, help="calibration prompts for the search (default 32)")
    p.add_argument("--eval", type=int, default=200, help="held-out prompts for the final comparison (0: none)")
    p.add_argument("--json", default=None, help="write the grid and the evaluation here")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    from fastgen import zoo
    from fastgen.zoo import evaluate
    from fastgen.zoo.evaluate import evaluate_pipeline

    from ._calibration import zoo_pipeline_and_prompts

    pipe, prompts = zoo_pipeline_and_prompts(a.model, a.sampler, a.prompts, a.threads)
    kw = {**zoo.call_kwargs(a.model), "num_inference_steps": a.steps}
    best, rows = search_skip_tuning(pipe, prompts, lambda ps, im: evaluate.score(ps, im)["overall"], call_kwargs=kw)
    out: dict[str, Any] = {"model": a.model, "steps": a.steps, "sampler": a.sampler, "grid": rows,
                           "best": best.to_string()}
    sys.stdout.write(f"grid on {a.prompts} calibration prompts: " + ", ".join(
        f"{r['rho_top']:g},{r['rho_bottom']:g}={r['score']:.3f}" for r in rows) + "\n")
    if a.eval:
        for label, cfg in (("no-op", None), (best.to_string(), best)):
            if cfg is not None:
                apply_skip_tuning(pipe, cfg)
            try:
                r = evaluate_pipeline(pipe, a.model, n=a.eval, steps=a.steps)
            finally:
                remove_skip_tuning(pipe)
            out[label] = {k: r[k] for k in ("overall", "single", "counting", "relation") if k in r}
            sys.stdout.write(f"{label}: held-out score {r['overall']:.3f} (single {r.get('single', float('nan')):.3f}) "
                             f"on {a.eval} prompts at {a.steps} steps\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
