"""The ``fastgen`` command: ``demo``, ``bench``, ``info``.

Errors in what the user typed (unknown recipe, model, bad sizes) print one line and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Sequence

import numpy as np
import torch

from .errors import FastgenError
from .utils.logging import get_logger

logger = get_logger(__name__)

DEMO_RECIPE = "sampler:dpm++2m@8"
DEFAULT_MODEL = "tiny-sd3"


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise FastgenError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def _device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastgenError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return name


def _settings(args):
    from .bench import BenchSettings

    height, width = args.height, args.width
    if getattr(args, "tokens", None):
        from .testing import KINDS, bench_resolution

        kind = args.model.split("-", 1)[-1]
        if kind not in KINDS:
            raise FastgenError("--tokens works with tiny-*/bench-* models; give --height/--width for others")
        height, width = bench_resolution(kind, args.tokens, size="bench" if args.model.startswith("bench-") else "tiny")
    elif height is None and args.model.startswith(("tiny-", "bench-")):
        from .testing import _SPECS

        kind = args.model.split("-", 1)[-1]
        if kind in _SPECS and not _SPECS[kind].class_conditional:
            height, width = _SPECS[kind].tiny_hw
    kw = dict(steps=args.steps, height=height, width=width or height, guidance_scale=args.guidance_scale,
              repeats=args.repeats, warmup=args.warmup, seeds=tuple(args.seeds))
    if args.prompt:
        kw["prompts"] = tuple(args.prompt)
    elif args.model.endswith("-dit"):
        kw["prompts"] = ("circle", "square", "triangle")
    return BenchSettings(control=getattr(args, "control", False), **kw)


def _load(args):
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = _device(args.device), _dtype(args.dtype)
    # tiny/bench pipelines are built on CPU in float32: only move what needs moving
    return load_model(args.model, device=None if device == "cpu" else device, dtype=None if dtype == torch.float32 else dtype)


def _add_common(p: argparse.ArgumentParser, default_steps: int) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name (tiny-<kind>, bench-<kind>), a local diffusers folder or a hub id (default {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int, default=default_steps, help="baseline num_inference_steps")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); class name for class-conditional models")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; one image per prompt and seed")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="image tokens (1024, 4096) for tiny-/bench- models")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed paired rounds per recipe")
    p.add_argument("--warmup", type=int, default=0, help="extra untimed calls per recipe (the quality pass warms up)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")


def cmd_bench(args) -> int:
    from .bench import benchmark, markdown_table, plot_pareto, write_json, write_markdown
    from .registry import parse_recipe

    recipes = args.recipe or ["baseline"]
    for r in recipes:
        parse_recipe(r)  # fail fast, before loading anything
    settings = _settings(args)
    pipe = _load(args)
    rows = benchmark(pipe, recipes, settings, model_name=args.model, progress=not args.no_progress)
    table = markdown_table(rows)
    sys.stdout.write(table)
    if args.json:
        write_json(rows, args.json)
    if args.markdown:
        write_markdown(rows, args.markdown)
    if args.plot:
        plot_pareto(rows, args.plot)
    return 0


def _grid(rows_of_images: list[tuple[str, np.ndarray]], path: str, scale: int = 4) -> None:
    from PIL import Image, ImageDraw

    label_w = 170
    n = max(len(ims) for _, ims in rows_of_images)
    h, w = rows_of_images[0][1].shape[1:3]
    cell_h, cell_w = h * scale, w * scale
    grid = Image.new("RGB", (label_w + n * (cell_w + 4), len(rows_of_images) * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, ims) in enumerate(rows_of_images):
        y = r * (cell_h + 4)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black")
        for c, im in enumerate(ims):
            tile = Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8))
            grid.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_w + c * (cell_w + 4), y))
    grid.save(path)


def cmd_demo(args) -> int:
    from .bench import benchmark, markdown_table, write_json
    from .registry import parse_recipe

    parse_recipe(args.recipe)
    if args.model == DEFAULT_MODEL:
        sys.stderr.write(f"fastgen demo: running on the tiny random-weight pipeline {DEFAULT_MODEL!r} "
                         "(no trained default model is shipped yet); images are noise-like, speed ratios are real.\n")
    settings = _settings(args)
    pipe = _load(args)
    os.makedirs(args.out, exist_ok=True)
    rows = benchmark(pipe, ["baseline", args.recipe], settings, model_name=args.model, progress=not args.no_progress,
                     keep_images=True)
    grid_rows = [(r["recipe"], r.pop("images")) for r in rows]
    _grid(grid_rows, os.path.join(args.out, "grid.png"))
    write_json(rows, os.path.join(args.out, "results.json"))
    table = markdown_table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    sys.stdout.write(table)
    sys.stdout.write(f"\nwrote {args.out}/grid.png, results.json, results.md\n")
    return 0


def cmd_info(args) -> int:
    import diffusers
    import transformers

    from . import __version__
    from .adapters import supported_pipelines
    from .registry import list_techniques

    extras = {"app": ["gradio"], "quant": ["torchao"], "mobile": ["executorch", "onnx", "onnxruntime"],
              "gpu": ["xformers"], "anchors": ["tomesd", "DeepCache", "cache_dit"]}
    info = {
        "fastgen": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
        "threads": torch.get_num_threads(),
        "extras": {e: {m: importlib.util.find_spec(m) is not None for m in mods} for e, mods in extras.items()},
        "techniques": {t.name: t.help for t in list_techniques()},
        "pipelines": supported_pipelines(),
    }
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        for k, v in info.items():
            sys.stdout.write(f"{k}: {v}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description="Make diffusers image generators faster, and measure it.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="baseline vs an accelerated recipe on the default model: table + image grid")
    _add_common(p, default_steps=28)
    p.add_argument("--recipe", default=DEMO_RECIPE, help=f"accelerated recipe (default {DEMO_RECIPE})")
    p.add_argument("--out", default="fastgen-demo", help="output folder for grid.png and results")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmark recipes side by side (JSON, Markdown, Pareto plot)")
    _add_common(p, default_steps=28)
    p.add_argument("--recipe", action="append", help="recipe string (repeatable), e.g. 'sampler:dpm++2m@8'")
    p.add_argument("--json", help="write rows as JSON here")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--plot", help="write the speed/quality Pareto PNG here")
    p.add_argument("--control", action="store_true", help="add fewer-steps control rows at equal latency")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="versions, devices, installed extras, registered techniques")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FastgenError as e:
        sys.stderr.write(f"fastgen: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fastgen: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
