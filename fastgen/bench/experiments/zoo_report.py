"""The quality table of a zoo model: evaluator scores at several step counts, the real-image and chance rows.

``fastgen experiment zoo-report shapes-mmdit [--path DIR] [--n 200] [--steps 4 8 16 28] [--json F]``

Every row generates ``n`` held-out prompts (``shapes.sample_prompts(n, EVAL_SEED)``, image ``i`` seeded
with ``i``) with the model's default sampler and guidance, scores them with
:func:`fastgen.zoo.evaluate.score`, and adds the Fréchet distance to ``n`` real held-out images and the
latency per image (batched generation, this machine, its threads). Two reference rows: the real
images of those prompts (the evaluator's ceiling) and the real images scored against shuffled prompts
(chance).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from fastgen.utils.commands import CommandParser
from fastgen.utils.logging import get_logger

__all__ = ["quality_table", "markdown", "main"]

logger = get_logger(__name__)

_COLS = ("overall", "color", "shape", "count", "position", "single", "counting", "relation", "fd")


def quality_table(name: str, path: str | None = None, n: int = 200, steps: tuple[int, ...] = (4, 8, 16, 28),
                  guidance: float | None = None) -> list[dict[str, Any]]:
    """Rows of the table (see the module docstring). ``path``: a pipeline folder (default: the shipped one)."""
    from fastgen import zoo
    from fastgen.zoo import evaluate, shapes
    from fastgen.zoo.evaluate import evaluate_pipeline

    pipe = zoo.load_pipeline(path) if path else zoo.load_default(name)
    prompts = shapes.sample_prompts(n, shapes.EVAL_SEED)
    real, real_prompts = shapes.sample(n, shapes.EVAL_SEED, zoo.DEFAULTS[name]["height"])
    assert list(real_prompts) == list(prompts), "sample() and sample_prompts() must agree on the held-out set"
    real = np.stack(real)
    rows: list[dict[str, Any]] = []
    evaluate_pipeline(pipe, name, n=2, steps=2, guidance=guidance)  # warm-up: first-call overheads out of the timing
    for k in steps:
        res = evaluate_pipeline(pipe, name, n=n, steps=k, guidance=guidance, return_images=True)
        imgs = res.pop("images")
        rows.append({"row": f"{k} steps", **res, "fd": round(evaluate.frechet_distance(imgs, real), 3),
                     "s_per_image": round(res["seconds"] / n, 4)})
    rows.append({"row": "real images", **evaluate.score(prompts, real), "fd": 0.0})
    shuffled = [prompts[i] for i in np.random.default_rng(0).permutation(n)]
    rows.append({"row": "chance (real images, shuffled prompts)", **evaluate.score(shuffled, real)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| | " + " | ".join(_COLS) + " | s/image |\n|---|" + "---|" * (len(_COLS) + 1) + "\n"
    fmt = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    return head + "".join(
        "| " + r["row"] + " | " + " | ".join(fmt(r.get(c)) for c in _COLS) + f" | {fmt(r.get('s_per_image'))} |\n"
        for r in rows)


def main(argv: list[str] | None = None) -> int:
    import torch

    from fastgen import zoo

    """``fastgen experiment zoo-report MODEL [...]`` (see ``--help``)."""
    ap = CommandParser(prog="fastgen experiment zoo-report", description=__doc__.split("\n\n")[0],
                       example="fastgen experiment zoo-report shapes-mmdit --n 200 --steps 4 8 16 28")
    ap.add_argument("model", choices=zoo.MODELS)
    ap.add_argument("--path", default=None, help="pipeline folder (default: the shipped weights)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 28])
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = quality_table(a.model, a.path, a.n, tuple(a.steps), a.guidance)
    sys.stdout.write(f"{a.model}: {a.n} held-out prompts, guidance "
                     f"{a.guidance if a.guidance is not None else zoo.DEFAULTS[a.model]['guidance_scale']}, "
                     f"{torch.get_num_threads()} threads\n\n" + markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)
    return 0

