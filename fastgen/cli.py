"""The ``fastgen`` command: ``demo``, ``bench``, ``tune``, ``app``, ``info``.

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
#: The trained default model (``fastgen/zoo``); ``FALLBACK_MODEL`` when its weights are not installed.
DEFAULT_MODEL = "shapes-mmdit"
FALLBACK_MODEL = "tiny-sd3"
#: Held-out prompts the demo/bench score on a zoo model (``--prompts-n`` changes it).
ZOO_PROMPTS = 16


def _default_model() -> str:
    from . import zoo

    if (zoo.weights_path(DEFAULT_MODEL) / "model_index.json").exists():
        return DEFAULT_MODEL
    return FALLBACK_MODEL


def _is_zoo(name: str) -> bool:
    from . import zoo

    return name in zoo.list()


def _zoo_quality_fn(prompts: list[str], images: np.ndarray) -> dict:
    from .zoo import evaluate

    return evaluate.score(prompts, images)


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

    if _is_zoo(args.model):
        from . import zoo
        from .zoo import shapes

        d = zoo.call_kwargs(args.model)
        extra = {k: v for k, v in d.items() if k not in ("num_inference_steps", "guidance_scale", "height", "width")}
        prompts = tuple(args.prompt) if args.prompt else tuple(shapes.sample_prompts(args.prompts_n, shapes.EVAL_SEED))
        return BenchSettings(
            steps=args.steps or d["num_inference_steps"], prompts=prompts, seeds=tuple(args.seeds),
            height=args.height or d["height"], width=args.width or d["width"],
            guidance_scale=d["guidance_scale"] if args.guidance_scale is None else args.guidance_scale,
            repeats=args.repeats, warmup=args.warmup, control=getattr(args, "control", False), extra_call_kwargs=extra,
        )
    if args.steps is None:
        args.steps = 28
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


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"zoo model ({DEFAULT_MODEL}, shapes-unet), tiny-<kind>, bench-<kind>, a local diffusers folder "
                        f"or a hub id (default {DEFAULT_MODEL}; {FALLBACK_MODEL} if its weights are not installed)")
    p.add_argument("--steps", type=int, default=None,
                   help="baseline num_inference_steps (default: the zoo model's default, else 28)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); class name for class-conditional models")
    p.add_argument("--prompts-n", type=int, default=ZOO_PROMPTS,
                   help=f"zoo models: score this many held-out prompts (default {ZOO_PROMPTS})")
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
    rows = benchmark(pipe, recipes, settings, model_name=args.model, progress=not args.no_progress,
                     quality_fn=_zoo_quality_fn if _is_zoo(args.model) else None)
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
    if args.model == FALLBACK_MODEL and _default_model() == FALLBACK_MODEL:
        sys.stderr.write(f"fastgen demo: the weights of {DEFAULT_MODEL!r} are not installed; running on the tiny "
                         f"random-weight pipeline {FALLBACK_MODEL!r}: images are noise-like, speed ratios are real.\n")
    settings = _settings(args)
    pipe = _load(args)
    os.makedirs(args.out, exist_ok=True)
    rows = benchmark(pipe, ["baseline", args.recipe], settings, model_name=args.model, progress=not args.no_progress,
                     keep_images=True, quality_fn=_zoo_quality_fn if _is_zoo(args.model) else None)
    grid_rows = [(r["recipe"], r.pop("images")) for r in rows]
    _grid(grid_rows, os.path.join(args.out, "grid.png"))
    write_json(rows, os.path.join(args.out, "results.json"))
    table = markdown_table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    sys.stdout.write(table)
    sys.stdout.write(f"\nwrote {args.out}/grid.png, results.json, results.md\n")
    return 0


def cmd_tune(args) -> int:
    from .registry import parse_recipe
    from .tune import BudgetError, TuneConfig, format_result, parse_budget, tune

    zoo_model = _is_zoo(args.model)
    budget = parse_budget(args.budget or ("score>=0.97*baseline" if zoo_model else "psnr>=30"))  # before loading
    if budget.metric == "score" and not zoo_model:
        raise BudgetError(f"budget {budget} needs a model with an exact evaluator (shapes-mmdit, shapes-unet); "
                          f"{args.model!r} has none: use 'psnr>=N' or 'ssim>=N'")
    for r in args.candidate or []:
        parse_recipe(r)
    if args.target == "cuda" and not torch.cuda.is_available():
        raise FastgenError("--target cuda was asked for but torch sees no CUDA GPU; use --target cpu")
    args.device = args.target or args.device
    screen_prompts = args.screen_prompts or (4 if zoo_model else 2)  # zoo scores move in steps of 1/prompts
    config = TuneConfig(max_trials=args.max_trials, screen_prompts=screen_prompts, confirm_top=args.confirm_top,
                        confirm_prompts=args.prompts_n, confirm_repeats=args.repeats, combos=not args.no_combos,
                        extra=tuple(args.candidate or ()))
    settings = _settings(args)
    pipe = _load(args)
    def progress(frac: float, what: str) -> None:
        sys.stderr.write(f"\r{what} [{frac:4.0%}]")
        if frac >= 1.0:
            sys.stderr.write("\n")

    res = tune(pipe, settings, budget, config=config, model_name=args.model,
               quality_fn=_zoo_quality_fn if zoo_model else None, progress=None if args.no_progress else progress)
    sys.stdout.write(format_result(res))
    if args.json:
        res.write_json(args.json)
        sys.stdout.write(f"\nwrote {args.json}\n")
    return 0


def cmd_app(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise FastgenError('the app needs gradio, which is not installed: pip install "fastgen[app]"')
    from apps.app import launch  # the CLI is the front door; fastgen's library code never imports apps

    if args.threads:
        torch.set_num_threads(args.threads)
    launch(args.model, host=args.host, port=args.port, share=args.share == "yes")
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
    _add_common(p)
    p.add_argument("--recipe", default=DEMO_RECIPE, help=f"accelerated recipe (default {DEMO_RECIPE})")
    p.add_argument("--out", default="fastgen-demo", help="output folder for grid.png and results")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmark recipes side by side (JSON, Markdown, Pareto plot)")
    _add_common(p)
    p.add_argument("--recipe", action="append", help="recipe string (repeatable), e.g. 'sampler:dpm++2m@8'")
    p.add_argument("--json", help="write rows as JSON here")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--plot", help="write the speed/quality Pareto PNG here")
    p.add_argument("--control", action="store_true", help="add fewer-steps control rows at equal latency")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tune", help="search recipes for the fastest one within a quality budget, timed on the target")
    _add_common(p)
    p.add_argument("--target", choices=("cpu", "cuda"), default=None,
                   help="hardware to measure on (default: cuda when available, else cpu)")
    p.add_argument("--budget", default=None,
                   help="quality floor: 'score>=0.97*baseline' (zoo models; their default), 'score>=0.8', "
                        "'psnr>=30' (default for other models), 'ssim>=0.9'")
    p.add_argument("--json", help="write {best, front, trials} as JSON here")
    p.add_argument("--max-trials", type=int, default=24, help="candidate recipes screened (default 24)")
    p.add_argument("--screen-prompts", type=int, default=None,
                   help="prompts per candidate when screening (default: 4 on zoo models, else 2)")
    p.add_argument("--confirm-top", type=int, default=3, help="screened candidates confirmed on --prompts-n prompts")
    p.add_argument("--candidate", action="append", help="extra recipe to screen beside the grid (repeatable)")
    p.add_argument("--no-combos", action="store_true", help="screen single techniques only")
    for action in p._actions:  # tune confirms on fewer prompts than bench scores on
        if action.dest == "prompts_n":
            action.default, action.help = 8, "prompts the best candidates are confirmed on (zoo: held-out; default 8)"
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("app", help="the Gradio comparison app (extra 'app')")
    p.add_argument("--model", default=None, help=f"initial model (default {DEFAULT_MODEL}; {FALLBACK_MODEL} if its "
                                                 "weights are not installed); others can be picked in the page")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", choices=("yes", "no"), default="no", help="gradio share link (needs internet)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("info", help="versions, devices, installed extras, registered techniques")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model", "") is None:
        args.model = _default_model()
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
