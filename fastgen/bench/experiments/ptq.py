"""Same-seed PSNR and evaluator score of PTQ vs QALoRA against FP, from a ``fastgen train qalora`` run folder.

``fastgen experiment ptq --run runs/q-w4a8 --bits w4a8 --n 64`` loads the zoo model, generates ``n``
held-out prompts (seed ``i`` for prompt ``i``) three times -- FP; PTQ (the run's calibration, no LoRA);
QALoRA (the run's ``quantized.safetensors``) -- and prints the PSNR of each quantized set against FP over
all images and the evaluator's overall score of each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fastgen.utils.commands import CommandParser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``fastgen experiment ptq --run DIR --bits BITS [...]`` (see ``--help``)."""
    ap = CommandParser(prog="fastgen experiment ptq", description=__doc__.split("\n\n")[0],
                       example="fastgen train qalora --model shapes-mmdit --bits w4a8 --out runs/q-w4a8 --steps 400\n"
                               "fastgen experiment ptq --run runs/q-w4a8 --bits w4a8 --n 64")
    ap.add_argument("--run", required=True, help="a `fastgen train qalora` run folder (calibration.pt, "
                                                 "quantized.safetensors)")
    ap.add_argument("--bits", required=True, help="the run's recipe arguments, e.g. w4a8")
    ap.add_argument("--model", default="shapes-mmdit", help="zoo model the run quantized")
    ap.add_argument("--n", type=int, default=64, help="held-out prompts")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fastgen import zoo
    from fastgen.bench import psnr
    from fastgen.zoo import evaluate, shapes

    from fastgen.quant import CalibrationSet, QALoRAConfig, apply_qalora, calibrate, load, remove_qalora

    run = Path(args.run)
    prompts = shapes.sample_prompts(args.n, shapes.EVAL_SEED)
    pipe = zoo.load_default(args.model)
    kw = zoo.call_kwargs(args.model)

    from fastgen.utils.logging import quiet_diffusers

    pipe.set_progress_bar_config(disable=True)

    def generate() -> list[np.ndarray]:
        with quiet_diffusers():  # no truncation notice per call
            return [np.asarray(pipe(p, generator=torch.Generator().manual_seed(i), **kw).images[0])
                    for i, p in enumerate(prompts)]

    fp = generate()
    apply_qalora(pipe, QALoRAConfig.from_string(args.bits))
    calibrate(pipe, CalibrationSet.load(run / "calibration.pt"))
    ptq = generate()
    remove_qalora(pipe)
    load(pipe, run / "quantized.safetensors", expect=args.bits)
    qalora = generate()
    res = {
        "n": args.n, "bits": args.bits,
        "psnr_db": {"ptq": float(psnr(np.stack(ptq), np.stack(fp))), "qalora": float(psnr(np.stack(qalora), np.stack(fp)))},
        "overall": {k: evaluate.score(prompts, v)["overall"] for k, v in (("fp", fp), ("ptq", ptq), ("qalora", qalora))},
    }
    sys.stdout.write(json.dumps(res) + "\n")
    return 0

