"""The samplers' quality table on a zoo model: evaluator score and same-seed PSNR against a many-step reference.

``fastgen experiment sampler-table shapes-mmdit [--steps 4 6 8 12] [--reference 50] [--n 200] [--json F] [--markdown F]``

For every sampler of :func:`samplers.list` that can drive the model (the others are listed with the
reason) and every step count, it generates ``n`` held-out prompts (image ``i`` seeded with ``i``, the
evaluator's convention, so the numbers line up with ``fastgen experiment zoo-report``) through
``fastgen.accelerate(pipe, "sampler:NAME@K")``, and reports:

* ``score``: the exact evaluator's overall score (and the single-object score);
* ``psnr`` / ``ssim``: against the same prompts and seeds at ``reference`` steps of the model's own
  sampler (its best estimate of the ODE's end point);
* ``fd``: the Fréchet distance to ``n`` real held-out images;
* ``calls``: denoiser calls per image (Heun makes two per step; LPL skips its tail).

Two anchor rows are added: the model's own sampler at its default step count (the score a few-step
sampler must stay within 0.03 of) and at ``reference`` steps.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from fastgen.utils.commands import CommandParser
from fastgen.utils.logging import get_logger

__all__ = ["sampler_table", "markdown", "main"]

logger = get_logger(__name__)


def _run(pipe, name: str, n: int, steps: int, recipe: str | None) -> tuple[dict[str, Any], np.ndarray]:
    import fastgen
    from fastgen.hooks import attach, detach_if_empty, get_state
    from fastgen.zoo.evaluate import evaluate_pipeline

    if recipe:
        fastgen.accelerate(pipe, recipe)
    else:
        attach(pipe)  # count the calls of the model's own sampler too
    try:
        res = evaluate_pipeline(pipe, name, n=n, steps=steps, return_images=True)
        calls = (get_state(pipe).last_call or {}).get("denoiser_calls")
    finally:
        fastgen.remove(pipe)
        detach_if_empty(pipe)
    images = res.pop("images")
    return {**res, "calls": calls, "s_per_image": round(res["seconds"] / n, 4)}, images


def sampler_table(name: str, steps: tuple[int, ...] = (4, 6, 8, 12), reference: int = 50, n: int = 200,
                  names: tuple[str, ...] | None = None, path: str | None = None) -> list[dict[str, Any]]:
    """Rows of the table (see the module docstring); ``names`` defaults to every registered sampler."""
    from fastgen import samplers
    from fastgen import zoo
    from fastgen.bench.metrics import psnr, ssim
    from fastgen.errors import FastgenError
    from fastgen.zoo import evaluate, shapes
    from fastgen.zoo.evaluate import evaluate_pipeline

    pipe = zoo.load_pipeline(path) if path else zoo.load_default(name)
    real, _ = shapes.sample(n, shapes.EVAL_SEED, zoo.DEFAULTS[name]["height"])
    real = np.stack(real)
    evaluate_pipeline(pipe, name, n=2, steps=2)  # first-call overheads out of the timings
    own = type(pipe.scheduler).__name__
    default_steps = int(zoo.DEFAULTS[name]["num_inference_steps"])
    ref_row, ref = _run(pipe, name, n, reference, None)
    rows: list[dict[str, Any]] = []

    def add(sampler: str, k: int, res: dict, images: np.ndarray) -> None:
        rows.append({"sampler": sampler, "steps": k, "calls": res["calls"], "score": res["overall"],
                     "single": res["single"], "psnr": round(psnr(ref, images), 2), "ssim": round(ssim(ref, images), 4),
                     "fd": round(evaluate.frechet_distance(images, real), 3), "s_per_image": res["s_per_image"]})
        logger.info("%s@%d: score %.3f, PSNR %.2f dB", sampler, k, res["overall"], rows[-1]["psnr"])

    add(f"{own} (own, reference)", reference, ref_row, ref)
    if default_steps != reference:
        add(f"{own} (own, default)", default_steps, *_run(pipe, name, n, default_steps, None))
    for s in names or tuple(samplers.list()):
        for k in steps:
            try:
                add(s, k, *_run(pipe, name, n, k, f"sampler:{s}@{k}"))
            except (FastgenError, ValueError) as e:  # this sampler cannot drive this model
                rows.append({"sampler": s, "steps": k, "skipped": str(e)})
                logger.info("%s: skipped (%s)", s, e)
                break
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| sampler | steps | calls | score | single | PSNR dB | SSIM | FD | s/image |\n|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['sampler']} | – | – | cannot drive this model: {r['skipped']} | | | | | |")
            continue
        p = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['calls']} | {r['score']:.3f} | {r['single']:.3f} | {p} | "
                     f"{r['ssim']:.3f} | {r['fd']:.3f} | {r['s_per_image']:.3f} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from fastgen import zoo
    from fastgen.utils.logging import log_to_stderr_with_time

    """``fastgen experiment sampler-table MODEL [...]`` (see ``--help``)."""
    ap = CommandParser(prog="fastgen experiment sampler-table", description=__doc__.split("\n\n")[0],
                       example="fastgen experiment sampler-table shapes-mmdit --steps 4 6 8 12 --reference 50 --n 200")
    ap.add_argument("model", choices=[m for m in zoo.MODELS if m not in zoo.AR_MODELS])
    ap.add_argument("--path", default=None, help="pipeline folder (default: the shipped weights)")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8, 12])
    ap.add_argument("--reference", type=int, default=50, help="steps of the model's own sampler for the PSNR reference")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--samplers", nargs="+", default=None, help="default: all registered")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    log_to_stderr_with_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = sampler_table(args.model, tuple(args.steps), args.reference, args.n,
                         tuple(args.samplers) if args.samplers else None, args.path)
    md = f"`{args.model}`: {args.n} held-out prompts, PSNR/SSIM against {args.reference} steps of its own sampler\n\n"
    md += markdown(rows)
    sys.stdout.write(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0

