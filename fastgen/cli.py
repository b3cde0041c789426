"""The ``fastgen`` command: ``demo``, ``bench``, ``profile``, ``tune``, ``app``, ``export``, ``train``,
``experiment``, ``docs``, ``info``.

``fastgen train KIND ...`` and ``fastgen experiment NAME ...`` hand the rest of the command line to the
``main(argv)`` of the training module or research script (:data:`TRAIN`, :data:`EXPERIMENTS`); their
``--help`` is that module's. Errors in what the user typed (unknown recipe, model, bad sizes, a bad option)
print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import FastgenError
from .models import DEFAULT_MODEL, FALLBACK_MODEL, default_model
from .prompts import GENERIC_PROMPTS, resolve_prompts
from .utils.commands import CommandParser
from .utils.logging import get_logger

logger = get_logger(__name__)

DEMO_RECIPE = "sampler:dpm++2m@8"
#: The demo's recipe per zoo model where a better one ships (the tuned 8-step schedule: 3.2x at 0.590 vs 0.610;
#: the 4-step LCM student at 2 of its own steps: 0.595 vs 0.615 on 200 held-out prompts).
DEMO_RECIPES = {"shapes-mmdit": "schedule:shapes-mmdit-euler8", "shapes-unet-lcm": "steps:2"}
#: Held-out prompts the demo/bench score on a zoo model (``--prompts-n`` changes it).
ZOO_PROMPTS = 16


def _is_zoo(name: str) -> bool:
    from . import zoo

    if name in zoo.AR_MODELS:
        raise FastgenError(f"{name!r} is a next-scale AR model (VARPipeline): demo/bench run diffusers pipelines; "
                           f"evaluate it with `fastgen experiment var-eval --model {name}` (see the README's VAR section)")
    return name in zoo.list()


def _quality_fn(model: str):
    """The zoo's exact evaluator (:func:`fastgen.zoo.evaluate.score`) for a zoo model, else None."""
    if not _is_zoo(model):
        return None
    from .zoo.evaluate import score

    return score


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
        extra = zoo.extra_call_kwargs(args.model, args.steps)
        prompts = tuple(args.prompt) if args.prompt else tuple(shapes.sample_prompts(args.prompts_n, shapes.EVAL_SEED))
        return BenchSettings(
            steps=args.steps or d["num_inference_steps"], prompts=prompts, seeds=tuple(args.seeds),
            per_prompt_seeds=True,  # prompt i uses seed i: the same images the zoo report scores
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
        from .testing import KINDS, tiny_resolution

        kind = args.model.split("-", 1)[-1]
        if kind in KINDS and tiny_resolution(kind) is not None:
            height, width = tiny_resolution(kind)
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


def _recipes_settings_pipe(args):
    """``(recipes, settings, pipe)`` of a bench/profile command; the recipes are parsed before anything loads."""
    from .registry import parse_recipe

    recipes = args.recipe or ["baseline"]
    for r in recipes:
        parse_recipe(r)  # fail fast, before loading anything
    return recipes, _settings(args), _load(args)


def cmd_bench(args) -> int:
    from .bench import benchmark, markdown_table, plot_pareto, write_json, write_markdown

    recipes, settings, pipe = _recipes_settings_pipe(args)
    rows = benchmark(pipe, recipes, settings, model_name=args.model, progress=not args.no_progress,
                     quality_fn=_quality_fn(args.model))
    table = markdown_table(rows)
    sys.stdout.write(table)
    if args.json:
        write_json(rows, args.json)
    if args.markdown:
        write_markdown(rows, args.markdown)
    if args.plot:
        plot_pareto(rows, args.plot)
    return 0


def cmd_profile(args) -> int:
    import json

    from .bench.profile import markdown, profile_recipes
    from .bench.runner import call_kwargs

    recipes, settings, pipe = _recipes_settings_pipe(args)
    kw = call_kwargs(pipe, settings.prompts[0], settings.seeds[0], settings)
    rows = profile_recipes(pipe, recipes, kw, repeats=args.repeats)
    sys.stdout.write(markdown(rows, top=args.top))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
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

    args.recipe = args.recipe or DEMO_RECIPES.get(args.model, DEMO_RECIPE)
    parse_recipe(args.recipe)
    if args.model == FALLBACK_MODEL and default_model() == FALLBACK_MODEL:
        sys.stderr.write(f"fastgen demo: the weights of {DEFAULT_MODEL!r} are not installed; running on the tiny "
                         f"random-weight pipeline {FALLBACK_MODEL!r}: images are noise-like, speed ratios are real.\n")
    settings = _settings(args)
    pipe = _load(args)
    os.makedirs(args.out, exist_ok=True)
    rows = benchmark(pipe, ["baseline", args.recipe], settings, model_name=args.model, progress=not args.no_progress,
                     keep_images=True, quality_fn=_quality_fn(args.model))
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
               quality_fn=_quality_fn(args.model), progress=None if args.no_progress else progress)
    sys.stdout.write(format_result(res))
    if args.json:
        res.write_json(args.json)
        sys.stdout.write(f"\nwrote {args.json}\n")
    return 0


def cmd_app(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise FastgenError('the app needs gradio, which is not installed: pip install "fastgen[app]"')
    from fastgen.apps.app import launch  # the CLI is the front door; fastgen's library code never imports apps

    if args.threads:
        torch.set_num_threads(args.threads)
    launch(args.model, host=args.host, port=args.port, share=args.share == "yes")
    return 0


def _export_call_kwargs(args, pipe) -> dict:
    """The pipeline call whose denoiser inputs become the export's fixed example inputs."""
    from .testing import default_call_kwargs

    if _is_zoo(args.model):
        from . import zoo

        kw = zoo.call_kwargs(args.model)
        kw.update(prompt=args.prompt or "a red circle left of a blue square", num_inference_steps=4)
    else:
        kw = default_call_kwargs(pipe, args.prompt or GENERIC_PROMPTS[0], steps=4)
        kind = args.model.split("-", 1)[-1]
        if args.model.startswith(("tiny-", "bench-")):
            from .testing import KINDS, bench_resolution, tiny_resolution

            if kind in KINDS and tiny_resolution(kind) is not None:
                kw["height"], kw["width"] = (bench_resolution(kind, 1024) if args.model.startswith("bench-")
                                             else tiny_resolution(kind))
    if args.height:
        kw["height"] = args.height
    if args.width:
        kw["width"] = args.width
    return kw


def cmd_export(args) -> int:
    if args.bits not in (4, 8):
        raise FastgenError(f"--bits must be 8 or 4, got {args.bits}")
    need = {"executorch": [("executorch", "mobile"), ("torchao", "mobile")],
            "onnx": [("onnx", "mobile"), ("onnxscript", "mobile"), ("onnxruntime", "mobile")],
            "int8": []}[args.target]
    for mod, extra in need:  # before loading anything
        if importlib.util.find_spec(mod) is None:
            raise FastgenError(f"--target {args.target} needs {mod!r}, which is not installed: "
                               f"pip install 'fastgen[{extra}]'")
    if args.from_qalora and not os.path.exists(args.from_qalora):
        raise FastgenError(f"--from-qalora {args.from_qalora}: no such file")
    from fastgen import quant

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipe = _load(args)
    if args.from_qalora:
        quant.load(pipe, args.from_qalora)
    kw = _export_call_kwargs(args, pipe)
    check = not args.no_check
    if args.target == "executorch":
        rep = quant.export_executorch(pipe, args.out, args.bits, call_kwargs=kw, check=check)
    elif args.target == "onnx":
        rep = quant.export_onnx(pipe, args.out, qdq_int8=args.onnx_quant != "none",
                                mode="static" if args.onnx_quant == "none" else args.onnx_quant, ort=args.ort,
                                call_kwargs=kw, check=check)
    else:
        rep = _export_int8(pipe, args, kw, check)
    sys.stdout.write(rep.format() + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_dict(), f, indent=2)
    return 0


def _export_int8(pipe, args, kw: dict, check: bool):
    """--target int8: the integer safetensors (quant.save) of a QALoRA file or of a data-free W{bits}A8 PTQ,
    checked by running it on real int8 kernels (quant.to_int8 static, eager) against fp32 and fake quant."""
    import time

    from fastgen import quant
    from fastgen.quant.export import ExportReport, output_errors

    inputs = quant.capture_denoiser_inputs(pipe, kw, index=1, steps=4)
    den = quant.get_denoiser(pipe)
    notes = []
    with torch.no_grad():
        if quant.is_quantized(pipe):
            with quant.quant_mode(pipe, "fp"):
                ref = den(**inputs)[0]
            notes.append(f"weights and activation tables from {args.from_qalora}")
        else:
            ref = den(**inputs)[0]
            calib_kw = {k: v for k, v in kw.items() if k not in ("prompt", "num_inference_steps", "generator")}
            quant.quantize(pipe, quant.QALoRAConfig(w_bits=args.bits, a_bits=8, rank=0),
                           prompts=None if "class_labels" in kw else resolve_prompts(pipe, args.calibration_prompts, 4),
                           num_inference_steps=8, **calib_kw)
            notes.append(f"data-free W{args.bits}A8 PTQ ({args.calibration_prompts or '4 default prompts'}, 8 steps); "
                         "fine-tune with `fastgen train qalora` for better accuracy")
        path = quant.save(pipe, args.out)
        rep = ExportReport(target="int8", path=str(path), bytes=os.path.getsize(path),
                           quantization=quant.read_header(path)["bits"] + " integer safetensors",
                           inputs={k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                           quantized_layers=len(quant.read_header(path)["layers"]), notes=notes)
        if check:
            fq = den(**inputs)[0]
            quant.to_int8(pipe, "static", compile=False)
            y = den(**inputs)[0]
            rep.max_abs_err, rep.rel_err = output_errors(y, ref)
            rep.rel_err_vs_quant_model = output_errors(y, fq)[1]

            def med(fn):
                fn()
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                return sorted(ts)[2] * 1e3

            rep.runtime_ms = med(lambda: den(**inputs))
            quant.remove_int8(pipe)
            with quant.quant_mode(pipe, "fp"):
                rep.torch_ms = med(lambda: den(**inputs))
            rep.notes.append("latency: int8 static eager (no compile) vs fp32 eager; compiled numbers: "
                             "fastgen experiment int8")
    return rep


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


# --- fastgen train / experiment: the training modules' and research scripts' own main(argv) -------------------


@dataclass(frozen=True)
class Forward:
    """A subcommand that hands its arguments to ``MODULE.FUNCTION(argv) -> int`` (imported when it runs).

    ``runner``: ``"module:function"`` called as ``runner(lambda: main(argv))`` (the distillation modules' error
    wrapper); ``example``: printed after the module's ``--help`` when its parser shows none."""

    target: str
    help: str
    runner: str | None = None
    example: str | None = None

    def resolve(self, name: str):
        module, _, function = name.partition(":")
        return getattr(importlib.import_module(module), function or "main")

    def __call__(self, argv: list[str]) -> int:
        main = self.resolve(self.target)
        try:
            if self.runner:
                return self.resolve(self.runner)(lambda: main(argv))
            return main(argv)
        except SystemExit as e:
            if self.example and e.code in (0, None) and ("-h" in argv or "--help" in argv):
                sys.stdout.write("\nExample:\n  " + self.example.replace("\n", "\n  ") + "\n")
            raise


#: ``fastgen train KIND ...``. Distillation and VAR keep ``python -m`` for ``accelerate launch -m``.
TRAIN: dict[str, Forward] = {
    "zoo": Forward("fastgen.zoo.train:main", "train a zoo text-to-image model (shapes-mmdit, shapes-unet) from "
                                             "scratch on the shapes world, or export a run's weights"),
    "guidance": Forward("fastgen.distill.guidance:main", "guidance distillation (one forward per step instead of "
                                                         "CFG's two), optionally progressive halving of steps",
                        runner="fastgen.distill.cli:run_cli"),
    "consistency": Forward("fastgen.distill.consistency:main", "consistency distillation: LCM (UNets) or sCM "
                                                               "(flow MMDiTs) few-step students",
                           runner="fastgen.distill.cli:run_cli"),
    "qalora": Forward("fastgen.quant.trainer:main", "EfficientDM QALoRA: quantize a denoiser (W4A8, W8A8, ...) and "
                                                    "fine-tune it against its full-precision self"),
    "var": Forward("fastgen.ar.train:main", "train a next-scale AR model: the VQ-VAE (vae), the VAR (var), or "
                                            "export a run (export)"),
}

#: ``fastgen experiment NAME ...``: the research scripts behind the README's tables.
EXPERIMENTS: dict[str, Forward] = {
    "ras": Forward("fastgen.bench.experiments.ras:main", "RAS: FLOP-ideal speedup (flops), selection rules "
                                                         "(rules), RAS vs fewer steps at equal latency (pareto)"),
    "int8": Forward("fastgen.bench.experiments.int8:main", "per-denoiser-call latency of fp32 vs real int8 kernels "
                                                           "(eager and compiled)"),
    "ptq": Forward("fastgen.bench.experiments.ptq:main", "same-seed PSNR and score of PTQ vs QALoRA against FP, "
                                                         "from a `fastgen train qalora` run"),
    "sampler-table": Forward("fastgen.bench.experiments.sampler_table:main", "every sampler on a zoo model: score, "
                                                                             "PSNR/SSIM vs a many-step reference"),
    "zoo-report": Forward("fastgen.bench.experiments.zoo_report:main", "a zoo model's quality table: evaluator "
                                                                       "scores at several step counts"),
    "var-eval": Forward("fastgen.bench.experiments.var_eval:main", "speed and quality of VAR recipes on digits-var; "
                                                                   "the VAR-d16 speed probe"),
    "schedule-search": Forward("fastgen.samplers.schedule:main", "search a tuned N-step timestep schedule for a zoo "
                                                                 "model (the schedule: recipe)"),
    "skip-tuning": Forward("fastgen.samplers.skip_tuning:main", "search Skip-Tuning's skip scales on a UNet zoo "
                                                                "model and score them on held-out prompts"),
}

_FORWARDS = {"train": TRAIN, "experiment": EXPERIMENTS}


def cmd_docs(args) -> int:
    if importlib.util.find_spec("fastgen.docgen") is None:
        raise FastgenError("fastgen docs needs fastgen.docgen (the documentation generator), which this "
                           "installation does not have; update fastgen")
    from . import docgen

    return docgen.main(["--check"] if args.check else [])


def _forward_group(group: str, parser: argparse.ArgumentParser) -> None:
    """``fastgen train|experiment``: one listed sub-parser per kind (the arguments never reach them: :func:`main`
    hands ``fastgen GROUP KIND ...`` to the kind's ``main``)."""
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(_FORWARDS[group]) + "}")
    for name, fw in _FORWARDS[group].items():
        kinds.add_parser(name, help=fw.help, add_help=False)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fastgen", description="Make diffusers image generators faster, and measure it.",
        example="fastgen demo\nfastgen bench --model tiny-sd3 --recipe baseline --recipe sampler:dpm++2m@8\n"
                "fastgen train --help\nfastgen experiment --help")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="baseline vs an accelerated recipe on the default model: table + image grid",
                       description="Run the baseline and one accelerated recipe on the default model (or --model) "
                                   "and write a comparison table\nand an image grid (grid.png, results.json, "
                                   "results.md) to --out.",
                       example="fastgen demo\nfastgen demo --model tiny-sd3 --recipe sampler:dpm++2m@8 --out demo")
    _add_common(p)
    p.add_argument("--recipe", default=None, help="accelerated recipe (default: " + ", ".join(
        f"{r} on {m}" for m, r in DEMO_RECIPES.items()) + f", else {DEMO_RECIPE})")
    p.add_argument("--out", default="fastgen-demo", help="output folder for grid.png and results")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmark recipes side by side (JSON, Markdown, Pareto plot)",
                       description="Benchmark recipes side by side on one model: paired interleaved timing, peak "
                                   "memory, same-seed PSNR/SSIM\n(and the exact evaluator's score on zoo models).",
                       example="fastgen bench --model shapes-mmdit --recipe baseline --recipe ras:0.5 "
                               "--recipe sampler:dpm++2m@8 --json rows.json --plot pareto.png")
    _add_common(p)
    p.add_argument("--recipe", action="append", help="recipe string (repeatable), e.g. 'sampler:dpm++2m@8'")
    p.add_argument("--json", help="write rows as JSON here")
    p.add_argument("--markdown", help="write the Markdown table here")
    p.add_argument("--plot", help="write the speed/quality Pareto PNG here")
    p.add_argument("--control", action="store_true", help="add fewer-steps control rows at equal latency")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profile", help="one denoiser forward per recipe: time and self CPU time per op kind and "
                                       "op/shape (what a technique can win at best)",
                       description="Profile one denoiser forward per recipe: time and self CPU time per op kind and "
                                   "per op/shape\n(what a technique can win at best).",
                       example="fastgen profile --model bench-sd3 --tokens 4096 --recipe baseline --recipe tome:0.5")
    _add_common(p)
    p.add_argument("--recipe", action="append", help="recipe string (repeatable); the first is the reference")
    p.add_argument("--top", type=int, default=12, help="op rows shown per recipe")
    p.add_argument("--json", help="write every row (all ops) as JSON here")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("tune", help="search recipes for the fastest one within a quality budget, timed on the target",
                       description="Search the recipe space for the fastest recipe within a quality budget, timed on "
                                   "the target hardware:\nscreen candidates on a few prompts, confirm the best on "
                                   "--prompts-n.",
                       example="fastgen tune --model shapes-mmdit --budget 'score>=0.97*baseline' --json tuned.json")
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

    p = sub.add_parser("app", help="the Gradio comparison app (extra 'app')",
                       description="Serve the Gradio comparison app: baseline vs accelerated images for the same "
                                   "prompt and seed, latency,\nspeedup, memory, quality, and a Pareto plot "
                                   "(needs the 'app' extra: pip install \"fastgen[app]\").",
                       example="fastgen app --model shapes-mmdit --port 7860")
    p.add_argument("--model", default=None, help=f"initial model (default {DEFAULT_MODEL}; {FALLBACK_MODEL} if its "
                                                 "weights are not installed); others can be picked in the page")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", choices=("yes", "no"), default="no", help="gradio share link (needs internet)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("export", help="export the denoiser: ExecuTorch .pte (XNNPACK), ONNX (QDQ int8, .ort) or "
                                      "int8 safetensors; runs it back and compares with PyTorch",
                       description="Export the denoiser: an ExecuTorch .pte (XNNPACK), ONNX (QDQ int8, optionally "
                                   ".ort) or int8 safetensors;\nthen run the artifact back and compare it with "
                                   "PyTorch (--no-check skips that).",
                       example="fastgen export --model tiny-sd3 --target int8 --out denoiser.safetensors\n"
                               "fastgen export --model shapes-mmdit --target executorch --bits 8 --out mmdit.pte")
    p.add_argument("--model", default=None, help=f"as for bench (default {DEFAULT_MODEL}; {FALLBACK_MODEL} if its "
                                                 "weights are not installed)")
    p.add_argument("--target", required=True, choices=("executorch", "onnx", "int8"))
    p.add_argument("--bits", type=int, default=8, help="weight bits: 8 or 4 (activations: 8-bit)")
    p.add_argument("--out", required=True, help="output file (.pte, .onnx, .safetensors)")
    p.add_argument("--from-qalora", default=None, metavar="FILE",
                   help="a QALoRA/PTQ file of quant.save: export its integer weights (and scales)")
    p.add_argument("--onnx-quant", choices=("static", "dynamic", "none"), default="static",
                   help="onnx: onnxruntime quantization (static = QDQ int8 calibrated on the pipeline's own calls)")
    p.add_argument("--ort", action="store_true", help="onnx: also write the .ort (ONNX Runtime Mobile) file")
    p.add_argument("--prompt", default=None, help="prompt of the call whose denoiser inputs are exported")
    p.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="int8 without --from-qalora: calibrate on these prompts (one per line; default: "
                        "fastgen.prompts.default_prompts, generic text-to-image prompts for your model)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-check", action="store_true", help="do not run the artifact back")
    p.add_argument("--json", help="write the export report as JSON here")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="train a model: " + ", ".join(TRAIN),
                       description="Train a model. The rest of the command line goes to the trainer; "
                                   "`fastgen train KIND --help` lists its options.\nguidance, consistency and var "
                                   "also run under `accelerate launch -m fastgen.distill.guidance`,\n"
                                   "`-m fastgen.distill.consistency` and `-m fastgen.ar.train`.",
                       example="fastgen train zoo shapes-mmdit --out runs/shapes-mmdit --minutes 100\n"
                               "fastgen train consistency --method lcm --teacher shapes-unet --output runs/lcm\n"
                               "fastgen train guidance --help")
    _forward_group("train", p)

    p = sub.add_parser("experiment", help="run a research script: " + ", ".join(EXPERIMENTS),
                       description="Run a research script (the measurements behind the README's tables). The rest "
                                   "of the command line goes to it;\n`fastgen experiment NAME --help` lists its "
                                   "options.",
                       example="fastgen experiment ras flops --model bench-sd3 --tokens 4096 --ratios 0.5 0.25\n"
                               "fastgen experiment zoo-report shapes-mmdit --n 200\n"
                               "fastgen experiment int8 --help")
    _forward_group("experiment", p)

    p = sub.add_parser("docs", help="regenerate the generated docs (support matrix, config tables), or --check them",
                       description="Regenerate the generated parts of docs/ (the support matrix, each technique's "
                                   "config table) from the\ntechnique registry; --check only reports stale files "
                                   "(exit 1).",
                       example="fastgen docs\nfastgen docs --check")
    p.add_argument("--check", action="store_true", help="report stale generated files and exit 1; write nothing")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("info", help="versions, devices, installed extras, registered techniques",
                       description="Print versions, devices, installed extras, registered techniques and supported "
                                   "pipelines.",
                       example="fastgen info\nfastgen info --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def _run(fn, *args) -> int:
    """``fn(*args)``; a :class:`FastgenError` is one line on stderr (exit status 2), Ctrl-C exits with 130."""
    try:
        return fn(*args)
    except FastgenError as e:
        sys.stderr.write(f"fastgen: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fastgen: interrupted\n")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    from .utils.logging import quiet_import_noise

    quiet_import_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[1] in _FORWARDS.get(argv[0], {}):  # fastgen train|experiment KIND ...
        return _run(_FORWARDS[argv[0]][argv[1]], argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model", "") is None:
        args.model = default_model()
    return _run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
