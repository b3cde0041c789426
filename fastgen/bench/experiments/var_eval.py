"""Speed and quality of VAR acceleration recipes on the zoo's ``digits-var`` (or any class-conditional
VARPipeline over the digits), and a speed probe of VAR-d16-shaped models.

    fastgen experiment var-eval --recipes baseline fastvar:0.5 "cfg-share:2" "code:draft=4" --n 500
    fastgen experiment var-eval --cfg-sweep 0,1,2,3,4 --n 500
    fastgen experiment var-eval --d16 --images 1 [--recipes fastvar:0.5]   # random-weight VAR-d16 + VQ-VAE, 256 px

Protocol: every recipe is run in the same process as the baseline, on the same labels (``i % 10``) and
seeds (one per batch), batch by batch interleaved with a baseline run of the same batch (A B A B), after a
warm-up. Per-scale times come from ``callback_on_scale_end`` timestamps (the VQ-VAE decoding is in the
total latency only). Speed-ups are medians of the per-batch ratios; ``last2`` is the time of the last two
scales. Quality is :func:`fastgen.zoo.digits.score` of all images (intended-class accuracy and the
Fréchet distance to the real held-out digits in the classifier's feature space).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch

from fastgen.utils.commands import CommandParser
from fastgen.utils.logging import get_logger, log_to_stderr_with_time

__all__ = ["timed_call", "compare", "cfg_sweep", "d16_speed", "main"]

logger = get_logger(__name__)


def timed_call(pipe, labels: Sequence[int], seed: int, **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """One seeded call; returns images (``N x H x W x 3`` float) and ``{"total_s", "scale_s"}``."""
    marks: list[float] = []
    t0 = time.perf_counter()
    out = pipe(list(labels), seed=seed, output_type="np", callback_on_scale_end=lambda si, K: marks.append(
        time.perf_counter()), **kw)
    total = time.perf_counter() - t0
    scale_s = np.diff([t0] + marks).tolist()
    return out.images, {"total_s": total, "scale_s": scale_s}


def _apply(pipe, recipe: str) -> None:
    import fastgen

    fastgen.remove(pipe)
    if recipe != "baseline":
        fastgen.accelerate(pipe, recipe)


def compare(pipe, recipes: Sequence[str], n: int = 500, batch: int = 50, guidance: float = 2.0, top_k: int = 0,
            top_p: float = 0.0, seed: int = 0, last: int = 2) -> list[dict[str, Any]]:
    """Rows ``{"recipe", "accuracy", "fid", "ms_per_image", "last2_ms_per_image", "speedup", "speedup_last2",
    "token_fraction"}`` (see the module docstring)."""
    import fastgen
    from fastgen.zoo import digits

    labels = [i % 10 for i in range(n)]
    batches = [labels[i:i + batch] for i in range(0, n, batch)]
    kw = dict(guidance_scale=guidance, top_k=top_k, top_p=top_p)
    _apply(pipe, "baseline")
    timed_call(pipe, batches[0], seed, **kw)  # warm-up
    rows = []
    base_imgs: list[np.ndarray] | None = None
    for recipe in recipes:
        imgs, ratio, ratio2, tb, tc, lb, lc, frac = [], [], [], [], [], [], [], []
        for b, lab in enumerate(batches):
            _apply(pipe, "baseline")
            _, base = timed_call(pipe, lab, seed + b, **kw)
            _apply(pipe, recipe)
            im, cand = timed_call(pipe, lab, seed + b, **kw)
            if recipe != "baseline":
                rec = (fastgen.summary(pipe)["last_call"] or {}).get("var") or {}
                if rec.get("tokens_baseline"):
                    frac.append(rec["tokens_computed"] / rec["tokens_baseline"])
            imgs.append(im)
            tb.append(base["total_s"])
            tc.append(cand["total_s"])
            lb.append(sum(base["scale_s"][-last:]))
            lc.append(sum(cand["scale_s"][-last:]))
            ratio.append(tb[-1] / tc[-1])
            ratio2.append(lb[-1] / lc[-1])
        _apply(pipe, "baseline")
        all_imgs = np.concatenate(imgs)
        if recipe == "baseline":
            base_imgs = imgs
        s = digits.score(labels, all_imgs)
        row = {"recipe": recipe, "accuracy": round(s["accuracy"], 4), "fid": round(s["fid"], 3),
               "ms_per_image": round(1e3 * float(np.sum(tc)) / n, 3),
               "last2_ms_per_image": round(1e3 * float(np.sum(lc)) / n, 3),
               "speedup": round(float(np.median(ratio)), 3), "speedup_last2": round(float(np.median(ratio2)), 3),
               "token_fraction": round(float(np.mean(frac)), 3) if frac else 1.0}
        if base_imgs is not None and recipe != "baseline":
            row["same_as_baseline"] = float(np.mean([np.array_equal(a, c) for a, c in zip(base_imgs, imgs)]))
        rows.append(row)
        logger.info("%s", json.dumps(row))
    return rows


def cfg_sweep(pipe, scales: Sequence[float], n: int = 500, batch: int = 50, top_k: int = 0, top_p: float = 0.0,
              seed: int = 0) -> list[dict[str, Any]]:
    """Accuracy and Fréchet distance per guidance scale (same labels and seeds)."""
    from fastgen.zoo import digits

    labels = [i % 10 for i in range(n)]
    rows = []
    for g in scales:
        imgs = [timed_call(pipe, labels[i:i + batch], seed + b, guidance_scale=g, top_k=top_k, top_p=top_p)[0]
                for b, i in enumerate(range(0, n, batch))]
        s = digits.score(labels, np.concatenate(imgs))
        rows.append({"guidance_scale": g, "top_k": top_k, "top_p": top_p, "accuracy": round(s["accuracy"], 4),
                     "fid": round(s["fid"], 3)})
        logger.info("%s", json.dumps(rows[-1]))
    return rows


def d16_speed(images: int = 1, depth: int = 16, seed: int = 0, recipes: Sequence[str] = ("baseline",)
              ) -> dict[str, Any] | list[dict[str, Any]]:
    """KV-cached sampling speed of a random-weight VAR-d{depth} + the release-shaped VQ-VAE at 256 px
    (batch 1, CFG on: 2 rows), split into transformer and VQ-VAE decoding time; one row per recipe
    (a single dict for the baseline alone)."""
    from fastgen.ar.pipeline import VARPipeline
    from fastgen.ar.var import VAR, VARConfig
    from fastgen.ar.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(seed)
    with torch.device("meta"):
        vae, var = VQVAE(VQVAEConfig()), VAR(VARConfig(depth=depth), init=False)
    vae.to_empty(device="cpu")
    var.to_empty(device="cpu")
    with torch.no_grad():
        for m in (vae, var):
            for name, p in m.named_parameters():
                p.normal_(0, 0.02) if p.ndim > 1 else p.zero_()
        from fastgen.ar.var import block_causal_buffers

        var.lvl_1L.copy_(block_causal_buffers(var.patch_nums)[0])
        var.attn_bias_for_masking.zero_()
        for b in var.blocks:
            b.attn.zero_k_bias.zero_()
        vae.quantize.ema_vocab_hit_SV.zero_()
    pipe = VARPipeline(vae.eval(), var.eval())
    pipe.set_progress_bar_config(disable=True)
    out = []
    for recipe in recipes:
        _apply(pipe, recipe)
        rows = []
        for i in range(images):
            marks: list[float] = []
            t0 = time.perf_counter()
            pipe([i % 1000], seed=i, guidance_scale=4.0, top_k=900, top_p=0.96, output_type="np",
                 callback_on_scale_end=lambda si, K: marks.append(time.perf_counter()))
            t1 = time.perf_counter()
            rows.append({"total_s": t1 - t0, "transformer_s": marks[-1] - t0, "decode_s": t1 - marks[-1],
                         "last2_s": marks[-1] - marks[-3]})
        _apply(pipe, "baseline")
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        out.append({"recipe": recipe, "depth": depth, "params_m": round(sum(p.numel() for p in var.parameters()) / 1e6, 1),
                    "threads": torch.get_num_threads(), "images": images, **{k: round(v, 2) for k, v in med.items()},
                    "images_per_s": round(1.0 / med["total_s"], 4),
                    "transformer_images_per_s": round(1.0 / med["transformer_s"], 4)})
        logger.info("%s", json.dumps(out[-1]))
    return out[0] if len(out) == 1 else out


def main(argv: list[str] | None = None) -> int:
    """``fastgen experiment var-eval [--recipes ...] [--cfg-sweep ...] [--d16]`` (see ``--help``)."""
    ap = CommandParser(prog="fastgen experiment var-eval", description=__doc__.split("\n\n")[0],
                       example='fastgen experiment var-eval --recipes baseline fastvar:0.5 "cfg-share:2" --n 500\n'
                               "fastgen experiment var-eval --cfg-sweep 0,1,2,3,4 --n 500\n"
                               "fastgen experiment var-eval --d16 --images 1 --recipes fastvar:0.5")
    ap.add_argument("--model", default="digits-var", help="zoo name or a VARPipeline folder (default digits-var)")
    ap.add_argument("--recipes", nargs="*", default=None, help="recipes to compare with the baseline")
    ap.add_argument("--cfg-sweep", default=None, help="comma-separated guidance scales")
    ap.add_argument("--d16", action="store_true", help="speed of a random-weight VAR-d16 at 256 px instead")
    ap.add_argument("--images", type=int, default=1, help="--d16: images to time")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None, help="default: the zoo default")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    log_to_stderr_with_time()  # the per-recipe rows as they come
    torch.set_num_threads(args.threads)
    if args.d16:
        rows: Any = d16_speed(args.images, recipes=["baseline"] + [r for r in (args.recipes or []) if r != "baseline"])
    else:
        from pathlib import Path

        from fastgen import zoo

        if Path(args.model).is_dir():
            from fastgen.ar.pipeline import VARPipeline

            pipe = VARPipeline.from_pretrained(args.model)
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe = zoo.load_default(args.model)
        g = args.guidance if args.guidance is not None else zoo.DEFAULTS.get(args.model, {}).get("guidance_scale", 2.0)
        if args.cfg_sweep:
            rows = cfg_sweep(pipe, [float(x) for x in args.cfg_sweep.split(",")], args.n, args.batch, args.top_k,
                             args.top_p)
        else:
            recipes = ["baseline"] + [r for r in (args.recipes or []) if r != "baseline"]
            rows = compare(pipe, recipes, args.n, args.batch, g, args.top_k, args.top_p)
    from pathlib import Path

    text = json.dumps(rows, indent=1)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text)
    return 0

