"""fastgen's comparison app: baseline vs accelerated, same prompt and seed, measured on the chosen target.

``fastgen app`` serves a Gradio page: pick a model (the zoo's trained
defaults, a tiny pipeline of any family, or a local diffusers folder / hub id typed in), a prompt (a class
name for class-conditional models), seed, steps, CFG, a baseline recipe and an accelerated recipe, and a
target. It shows both images side by side, latency, paired speedup, peak memory, same-seed PSNR/SSIM, the
exact evaluator's per-criterion verdict on zoo models, and a Pareto plot of every recipe this browser
session has measured. "Find fastest recipe" runs :func:`fastgen.tune.tune` on the target.

The compute functions (:func:`compare`, :func:`find_fastest`) do not import gradio, so they are tested
without it. Concurrency: pipelines are cached per (model, device) in a :class:`PipelineCache`; every
request takes that pipeline's lock and applies and removes its recipes inside it (``fastgen.remove``
restores bit-exactly), so two users never see each other's patches mid-call. Per-session results live in
``gr.State``.

gradio is the ``app`` extra: ``pip install "fastgen[app]"``.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastgen.api import accelerate, remove, summary
from fastgen.errors import FastgenError, RecipeError
from fastgen.registry import list_techniques, parse_recipe, recipe_string
from fastgen.prompts import GENERIC_PROMPTS
from fastgen.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["compare", "find_fastest", "PipelineCache", "build_app", "launch", "TARGETS", "MOBILE_MESSAGE",
           "TargetUnavailableError", "is_mobile", "recipe_on_target", "MOBILE_DEFAULT", "model_choices", "recipe_choices", "target_choices", "model_defaults",
           "pareto_plot"]

#: target label -> torch device (mobile runs on this CPU, the denoiser through the ExecuTorch runtime)
TARGETS: dict[str, str | None] = {"CPU": "cpu", "GPU (CUDA)": "cuda", "mobile (ExecuTorch)": "cpu"}
MOBILE_MESSAGE = ('not available: the mobile target runs the denoiser as an ExecuTorch program (the `executorch` '
                  'recipe), which needs the mobile extra: pip install "fastgen[mobile]". Use CPU or GPU.')
#: What the mobile target adds to a recipe that does not choose its own ``executorch`` program.
MOBILE_DEFAULT = "executorch:fp32"
#: Prompts "Find fastest recipe" screens on for models without an evaluator (generic text-to-image prompts; a zoo
#: model screens on its own held-out prompts).
TUNE_PROMPTS = GENERIC_PROMPTS[:4]
_APP_EXTRA_HINT = 'pip install "fastgen[app]"'


class TargetUnavailableError(FastgenError):
    """The chosen target cannot run here (no CUDA GPU, or the mobile runtime is not built)."""


# --------------------------------------------------------------------------------------------------
# Choices and defaults
# --------------------------------------------------------------------------------------------------

def target_choices() -> list[str]:
    """CPU; GPU when torch sees CUDA; mobile always (without the mobile extra, selecting it says what to install)."""
    return [t for t in TARGETS if t != "GPU (CUDA)" or torch.cuda.is_available()]


def is_mobile(target: str | None) -> bool:
    """Whether ``target`` is the mobile (ExecuTorch) target."""
    return (target or "").strip().lower().startswith("mobile")


def resolve_target(target: str) -> str:
    """The torch device of a target label (``"CPU"``, ``"GPU (CUDA)"``, ``"mobile (ExecuTorch)"``; also
    ``"cpu"``/``"cuda"``/``"gpu"``/``"mobile"``). Mobile runs on this CPU (see :func:`recipe_on_target`)."""
    key = (target or "CPU").strip().lower()
    if is_mobile(key):
        import importlib.util

        if importlib.util.find_spec("executorch") is None:
            raise TargetUnavailableError(MOBILE_MESSAGE)
        return "cpu"
    if key in ("cpu",):
        return "cpu"
    if key.startswith(("gpu", "cuda")):
        if not torch.cuda.is_available():
            raise TargetUnavailableError("the GPU target needs a CUDA GPU and torch sees none here; use CPU")
        return "cuda"
    raise TargetUnavailableError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def recipe_on_target(recipe: str, target: str | None) -> str:
    """``recipe`` as run on ``target``: on mobile the denoiser runs as an ExecuTorch program, so a recipe that does
    not pick its own (``executorch:w8``, ``executorch:w4``, ``executorch:fp32``) gets :data:`MOBILE_DEFAULT`
    (float32, so baseline and accelerated compare the same program precision unless one asks for int)."""
    if not is_mobile(target):
        return recipe
    configs = parse_recipe(recipe)
    from fastgen.registry import technique_for_config

    if any(technique_for_config(c).name == "executorch" for c in configs):
        return recipe
    return recipe_string(configs + parse_recipe(MOBILE_DEFAULT))


def _zoo_names() -> list[str]:
    from fastgen import zoo

    return [m for m in zoo.list() if m not in zoo.AR_MODELS]


def _is_zoo(model: str) -> bool:
    return model in _zoo_names()


def model_choices() -> list[str]:
    """The zoo defaults (trained weights installed or not), then a tiny pipeline of every family."""
    from fastgen.testing import KINDS

    return _zoo_names() + [f"tiny-{k}" for k in KINDS]


def default_model() -> str:
    """The zoo's default model when its weights are installed, else ``tiny-sd3`` (as the CLI)."""
    from fastgen.models import default_model as _default

    return _default()


def _class_conditional_name(model: str) -> bool:
    from fastgen.testing import KINDS, is_class_conditional

    kind = model.split("-", 1)[-1]
    return model.startswith(("tiny-", "bench-")) and kind in KINDS and is_class_conditional(kind)


def model_defaults(model: str) -> dict[str, Any]:
    """UI defaults for ``model``: ``steps``, ``cfg`` (None = the pipeline's own), ``prompt``, ``class_conditional``."""
    if _is_zoo(model):
        from fastgen import zoo

        d = zoo.call_kwargs(model)
        return {"steps": d["num_inference_steps"], "cfg": d.get("guidance_scale"),
                "prompt": "a red circle left of a blue square", "class_conditional": False}
    if _class_conditional_name(model):
        return {"steps": 8, "cfg": None, "prompt": "circle", "class_conditional": True}
    return {"steps": 8, "cfg": None, "prompt": GENERIC_PROMPTS[0], "class_conditional": False}


def recipe_choices(steps: int = 28) -> list[str]:
    """Recipe suggestions from the registry: every technique's example and its searched grid values."""
    from fastgen.tune import SEARCH_SPACE

    out = ["baseline"]
    for tech in list_techniques():
        grid = SEARCH_SPACE.get(tech.name)
        items = ([tech.example] if tech.example else []) + (grid(steps, (0.5, 0.25), None) if grid else [])
        for r in items:
            try:
                norm = recipe_string(parse_recipe(r))
            except FastgenError:
                continue
            if norm not in out:
                out.append(norm)
    return out


# --------------------------------------------------------------------------------------------------
# Pipelines shared between requests
# --------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while a request uses the pipeline
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    pipe: Any = None


class PipelineCache:
    """Pipelines loaded once per (model, device), least recently used dropped beyond ``max_models``.

    ``get`` returns the entry; callers hold ``entry.lock`` for the whole time they use ``entry.pipe``
    (apply a recipe, call, remove it). A dropped entry stays valid for a request already holding it.
    """

    def __init__(self, max_models: int = 3, loader: Callable[[str, str], Any] | None = None):
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.max_models = max_models
        self._loader = loader or self._load
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    @staticmethod
    def _load(model: str, device: str):
        from fastgen.models import load_model

        return load_model(model, device=None if device == "cpu" else device)

    def get(self, model: str, device: str) -> _Entry:
        key = (model, device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_models:
                self._entries.popitem(last=False)
        with entry.load_lock:
            if entry.pipe is None:
                try:
                    entry.pipe = self._loader(model, device)
                except BaseException:
                    with self._lock:
                        if self._entries.get(key) is entry:
                            del self._entries[key]
                    raise
        return entry

    def keys(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._entries)


DEFAULT_CACHE = PipelineCache()


# --------------------------------------------------------------------------------------------------
# Compute (no gradio)
# --------------------------------------------------------------------------------------------------

def _norm_recipe(text: str | None, what: str) -> str:
    try:
        return recipe_string(parse_recipe(text if text is not None else "baseline"))
    except RecipeError as e:
        raise RecipeError(f"{what}: {e}") from None


def _settings(model: str, pipe, steps: int, cfg: float | None, prompts: Sequence[str], seeds: Sequence[int],
              repeats: int):
    from fastgen.bench import BenchSettings

    height = width = None
    extra: dict[str, Any] = {}
    if _is_zoo(model):
        from fastgen import zoo

        d = zoo.call_kwargs(model)
        height, width = d["height"], d["width"]
        extra = zoo.extra_call_kwargs(model, steps)
        if cfg is None:
            cfg = d.get("guidance_scale")
    elif model.startswith(("tiny-", "bench-")) and not _class_conditional_name(model):
        from fastgen.testing import KINDS, tiny_resolution

        kind = model.split("-", 1)[-1]
        if kind in KINDS:
            height, width = tiny_resolution(kind)
    return BenchSettings(steps=int(steps), prompts=tuple(prompts), seeds=tuple(int(s) for s in seeds), height=height,
                         width=width, guidance_scale=None if cfg is None else float(cfg), repeats=int(repeats),
                         warmup=0, extra_call_kwargs=extra)


def _check_prompt(pipe, prompt: str) -> None:
    from fastgen.adapters import get_adapter

    if get_adapter(pipe).conditioning == "class":
        labels = getattr(pipe, "labels", None) or {}
        if not (prompt.isdigit() or prompt in labels):
            some = ", ".join(sorted(labels)[:12]) + (" ..." if len(labels) > 12 else "")
            raise FastgenError(f"{type(pipe).__name__} is class-conditional: enter a class name or id, not {prompt!r}"
                               + (f"; classes: {some}" if some else ""))


def _check_applies(pipe, recipe: str, what: str) -> None:
    """Raise a clear error when ``recipe`` cannot run on ``pipe`` (the pipeline is left unpatched)."""
    if recipe == "baseline":
        return
    try:
        accelerate(pipe, recipe)
    except FastgenError as e:
        raise type(e)(f"{what} {recipe!r}: {e}") from None
    except (ValueError, TypeError, NotImplementedError) as e:
        raise FastgenError(f"{what} {recipe!r} cannot run on {type(pipe).__name__}: {e}") from None
    finally:
        remove(pipe)


def _parse_cfg(text) -> float | None:
    """The CFG field: empty = the model's default, else a number >= 0."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise FastgenError(f"CFG scale must be a number (or empty for the model's default), got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise FastgenError(f"CFG scale must be a number >= 0, got {text!r}")
    return v


def _u8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.nan_to_num(image), 0, 1) * 255).round().astype(np.uint8)


def _verdict(model: str, prompt: str, images: dict[str, np.ndarray]) -> dict | None:
    """The zoo evaluator's per-criterion verdict for each image, or None for models without one."""
    if not _is_zoo(model):
        return None
    from fastgen.zoo import evaluate, shapes

    try:
        shapes.parse_prompt(prompt)
    except ValueError as e:
        return {"note": f"no exact verdict: {e}"}
    out: dict[str, Any] = {}
    for name, img in images.items():
        r = evaluate.score_one(prompt, img)
        out[name] = {k: r[k] for k in ("overall", "color", "shape", "count", "position")}
        out[name]["detected"] = [f"{d['color']} {d['shape']}" for d in r.get("detected", [])]
    return out


def _public_row(row: dict, model: str) -> dict:
    keep = ("recipe", "latency_s", "speedup", "peak_mem_mb", "psnr", "ssim", "steps", "denoiser_calls", "device",
            "error")
    return {"model": model, **{k: row.get(k) for k in keep if k in row}}


def compare(
    model: str,
    prompt: str,
    seed: int,
    steps: int,
    cfg: float | None,
    baseline_recipe: str,
    recipe: str,
    target: str = "CPU",
    *,
    repeats: int = 2,
    cache: PipelineCache | None = None,
    progress: Callable[[float, str], None] | None = None,
    tqdm_progress: bool = False,
) -> dict:
    """Generate ``prompt`` with the same seed under ``baseline_recipe`` and ``recipe`` and measure both.

    Runs :func:`fastgen.bench.benchmark` (quality pass, then ``repeats`` interleaved timed rounds) on the
    cached pipeline for (model, target device), holding that pipeline's lock throughout.

    Returns:
        dict with ``baseline_image``/``image`` (uint8 HxWx3), ``baseline_latency_s``, ``latency_s``,
        ``speedup`` (paired median ratio when the baseline recipe is ``baseline``, else the ratio of
        medians), ``baseline_peak_mem_mb``, ``peak_mem_mb``, ``psnr``/``ssim`` of the accelerated image
        against the baseline recipe's (same seed), ``verdict`` (zoo models: the evaluator's per-criterion
        booleans for each image; None otherwise), ``rows`` (every benchmark row, for the Pareto plot),
        the normalised ``baseline_recipe``/``recipe`` and what was run (``model, device, prompt, seed,
        steps, steps_run``, ``warnings``).

    Raises:
        RecipeError: a malformed recipe (the message says which field). TargetUnavailableError: the
        target cannot run here. FastgenError: a recipe that does not apply to this model, an unknown
        model, a bad prompt/class.
    """
    from fastgen.bench import benchmark, psnr, ssim

    def report(frac: float, what: str) -> None:
        if progress is not None:
            progress(frac, what)

    model = (model or "").strip()
    if not model:
        raise FastgenError("choose a model: a zoo name, tiny-<kind>, a local diffusers folder or a hub id")
    prompt = (prompt or "").strip()
    if not prompt:
        raise FastgenError("enter a prompt (a class name for class-conditional models)")
    device = resolve_target(target)
    base_r = recipe_on_target(_norm_recipe(baseline_recipe, "baseline recipe"), target)
    cand_r = recipe_on_target(_norm_recipe(recipe, "accelerated recipe"), target)
    if steps is None or int(steps) < 1:
        raise FastgenError(f"steps must be a positive integer, got {steps!r}")
    if seed is None or int(seed) < 0:
        raise FastgenError(f"seed must be an integer >= 0, got {seed!r}")
    if int(repeats) < 1:
        raise FastgenError(f"repeats must be >= 1, got {repeats!r}")
    cache = cache or DEFAULT_CACHE
    report(0.02, f"loading {model} on {device}")
    entry = cache.get(model, device)
    report(0.1, "waiting for the pipeline (another request is using it)" if entry.lock.locked() else "benchmarking")
    with entry.lock:
        pipe = entry.pipe
        remove(pipe)  # a pipeline in the cache is unpatched between requests; make sure
        try:
            _check_prompt(pipe, prompt)
            _check_applies(pipe, base_r, "baseline recipe")
            _check_applies(pipe, cand_r, "accelerated recipe")
            settings = _settings(model, pipe, steps, cfg, [prompt], [seed], repeats)
            report(0.15, "benchmarking")
            recipes = [r for r in dict.fromkeys([base_r, cand_r]) if r != "baseline"]
            rows = benchmark(pipe, recipes, settings, model_name=model, progress=tqdm_progress, keep_images=True)
        finally:
            remove(pipe)
        assert summary(pipe)["recipe"] == "baseline", "the cached pipeline must be left unpatched"
    report(0.95, "scoring")
    by_name = {r["recipe"]: r for r in rows}
    b, c = by_name[base_r], by_name[cand_r]
    b_img, c_img = b["images"][:1], c["images"][:1]
    if base_r == "baseline":
        speedup = c["speedup"]
        p, s = c["psnr"], c["ssim"]
    else:
        speedup = round(b["latency_s"] / c["latency_s"], 3)
        p, s = round(psnr(b_img, c_img), 3), round(ssim(b_img, c_img), 5)
    images = {"baseline": _u8(b_img[0]), "accelerated": _u8(c_img[0])}
    warnings = [f"{r['recipe']}: {r['error']}" for r in (b, c) if r.get("error")]
    result = {
        "model": model, "device": device, "target": target, "prompt": prompt, "seed": int(seed), "steps": int(steps),
        "guidance_scale": settings.guidance_scale, "baseline_recipe": base_r, "recipe": cand_r,
        "baseline_image": images["baseline"], "image": images["accelerated"],
        "baseline_latency_s": b["latency_s"], "latency_s": c["latency_s"], "speedup": speedup,
        "baseline_peak_mem_mb": b["peak_mem_mb"], "peak_mem_mb": c["peak_mem_mb"], "psnr": p, "ssim": s,
        "baseline_steps_run": b.get("steps"), "steps_run": c.get("steps"),
        "verdict": _verdict(model, prompt, images), "warnings": warnings,
        "rows": [_public_row(r, model) for r in rows],
    }
    report(1.0, "done")
    return result


def find_fastest(
    model: str,
    budget: str,
    steps: int,
    cfg: float | None,
    target: str = "CPU",
    *,
    max_trials: int = 12,
    cache: PipelineCache | None = None,
    progress: Callable[[float, str], None] | None = None,
):
    """Run :func:`fastgen.tune.tune` for ``model`` on ``target`` under ``budget``; returns its TuneResult.

    Zoo models screen on held-out prompts of their world and may use ``score`` budgets; other models
    use fixed prompts and ``psnr``/``ssim`` budgets. Holds the pipeline's lock for the whole search.
    """
    from fastgen.tune import TuneConfig, parse_budget, tune

    b = parse_budget(budget)
    device = resolve_target(target)
    if is_mobile(target):
        raise FastgenError("the recipe search times on CPU or GPU; on the mobile target compare a recipe by hand "
                           "(each mobile run exports ExecuTorch programs, too slow to search over)")
    model = (model or "").strip()
    if not model:
        raise FastgenError("choose a model first")
    quality_fn = None
    prompts: Sequence[str] = TUNE_PROMPTS
    n_confirm = 4
    if _is_zoo(model):
        from fastgen.zoo import shapes
        from fastgen.zoo.evaluate import score as zoo_score

        quality_fn = zoo_score
        n_confirm = 8
        prompts = shapes.sample_prompts(n_confirm, shapes.EVAL_SEED)
    elif _class_conditional_name(model):
        prompts = ("circle", "square", "triangle")
    cache = cache or DEFAULT_CACHE
    if progress is not None:
        progress(0.0, f"loading {model} on {device}")
    entry = cache.get(model, device)
    with entry.lock:
        pipe = entry.pipe
        remove(pipe)
        try:
            settings = _settings(model, pipe, steps, cfg, prompts, [0], 1)
            cfg_t = TuneConfig(max_trials=int(max_trials), screen_prompts=2, confirm_top=2, confirm_prompts=n_confirm,
                               confirm_repeats=2)
            return tune(pipe, settings, b, config=cfg_t, model_name=model, quality_fn=quality_fn, progress=progress)
        finally:
            remove(pipe)


def pareto_plot(history: list[dict], model: str, path: str) -> str | None:
    """Plot speedup vs PSNR of ``model``'s rows in ``history`` (latest per recipe) to ``path``; None if empty."""
    from fastgen.bench import plot_pareto

    latest: dict[str, dict] = {}
    for row in history:
        if row.get("model") == model and row.get("speedup") is not None:
            latest[row["recipe"]] = row
    if not latest:
        return None
    return plot_pareto(list(latest.values()), path, quality="psnr")


# --------------------------------------------------------------------------------------------------
# Formatting for the page
# --------------------------------------------------------------------------------------------------

def _fmt_psnr(v) -> str:
    if v is None:
        return "-"
    return "inf dB (identical)" if math.isinf(v) else f"{v:.2f} dB"


def _verdict_markdown(verdict: dict | None) -> str:
    if verdict is None:
        return "_No exact evaluator for this model (the zoo models `shapes-mmdit`/`shapes-unet` have one)._"
    if "note" in verdict:
        return f"_{verdict['note']}_"
    mark = lambda v: "-" if v is None else ("pass" if v else "FAIL")  # noqa: E731
    lines = ["| criterion | baseline | accelerated |", "|---|---|---|"]
    for k in ("overall", "color", "shape", "count", "position"):
        lines.append(f"| {k} | {mark(verdict['baseline'][k])} | {mark(verdict['accelerated'][k])} |")
    lines.append(f"| detected | {', '.join(verdict['baseline']['detected']) or 'nothing'} | "
                 f"{', '.join(verdict['accelerated']['detected']) or 'nothing'} |")
    return "\n".join(lines)


def _summary_markdown(r: dict) -> str:
    head = (f"**{r['recipe']}** vs **{r['baseline_recipe']}** on `{r['model']}` ({r['device']}), seed {r['seed']}, "
            f"{r['steps']} steps requested (ran {r['baseline_steps_run']} vs {r['steps_run']}): "
            f"**{r['speedup']:.2f}x**, PSNR {_fmt_psnr(r['psnr'])}, SSIM {r['ssim']:.4f}.")
    warn = "".join(f"\n\n**Warning:** {w}" for w in r["warnings"])
    return head + warn + "\n\n" + _verdict_markdown(r["verdict"])


def _upscale(img: np.ndarray, target: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale of small images for display (32 px images are unreadable otherwise)."""
    h, w = img.shape[:2]
    k = max(1, target // max(h, w))
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1) if k > 1 else img


def _tune_markdown(res) -> str:
    from fastgen.tune import format_result

    best = res.best
    head = (f"### Fastest within `{res.budget}`: `{best['recipe']}` — {best['speedup']:.2f}x"
            if best.get("found") else f"### No recipe beat the baseline within `{res.budget}`")
    return head + "\n\n" + format_result(res)


# --------------------------------------------------------------------------------------------------
# The Gradio UI
# --------------------------------------------------------------------------------------------------

def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home from a local benchmark app
    try:
        import gradio as gr
    except ImportError as e:
        raise FastgenError(f"the fastgen app needs gradio, which is not installed: {_APP_EXTRA_HINT}") from e
    return gr


def _theme(gr):
    # system fonts: the default theme fetches web fonts from the internet, which an offline machine cannot
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=fonts, font_mono=["ui-monospace", "monospace"])


def _major(gr) -> int:
    try:
        return int(gr.__version__.split(".")[0])
    except ValueError:
        return 0


def build_app(model: str | None = None, *, steps: int | None = None, repeats: int = 2,
              cache: PipelineCache | None = None, concurrency: int = 2, max_trials: int = 12):
    """Build the Gradio Blocks app (not launched).

    Args:
        model: initial model (default: the zoo default if its weights are installed, else ``tiny-sd3``).
        steps: initial baseline steps (default: the model's default).
        repeats: timed paired rounds per comparison.
        cache: the :class:`PipelineCache` shared by all sessions (default: the module's).
        concurrency: requests served at once (each still waits for its pipeline's lock).
        max_trials: default trial cap of "Find fastest recipe".
    """
    gr = _gradio()
    cache = cache or DEFAULT_CACHE
    model = model or default_model()
    d = model_defaults(model)
    steps = int(steps or d["steps"])
    plot_dir = tempfile.mkdtemp(prefix="fastgen-app-")
    has_slider = hasattr(gr, "ImageSlider")
    blocks_kw: dict[str, Any] = {"title": "fastgen: baseline vs accelerated", "analytics_enabled": False}
    if _major(gr) < 6:
        blocks_kw["theme"] = _theme(gr)

    def progress_fn(gp):
        return lambda frac, what: gp(frac, desc=what)

    def ui_error(e: BaseException):
        if isinstance(e, FastgenError):
            return gr.Error(str(e))
        logger.exception("fastgen app: request failed")
        return gr.Error(f"{type(e).__name__}: {e}")

    with gr.Blocks(**blocks_kw) as demo:
        demo._fastgen_launch_kw = {} if _major(gr) < 6 else {"theme": _theme(gr)}
        history = gr.State([])
        gr.Markdown("## fastgen — baseline vs accelerated\nSame prompt, same seed; latency measured on the target "
                    "with paired interleaved rounds; quality as same-seed PSNR/SSIM (and the exact evaluator on "
                    "zoo models).")
        with gr.Row():
            model_in = gr.Dropdown(model_choices(), value=model, label="model", allow_custom_value=True, scale=2,
                                   info="zoo default, tiny-<family>, or type a local diffusers folder / hub id",
                                   elem_id="fastgen-model")
            target_in = gr.Radio(target_choices(), value="CPU", label="target", elem_id="fastgen-target")
        target_note = gr.Markdown("", elem_id="fastgen-target-note")
        with gr.Row():
            prompt_in = gr.Textbox(d["prompt"], label="class" if d["class_conditional"] else "prompt", scale=3,
                                   elem_id="fastgen-prompt")
            seed_in = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="fastgen-seed")
            steps_in = gr.Number(steps, label="steps", precision=0, minimum=1, elem_id="fastgen-steps")
            cfg_in = gr.Textbox("" if d["cfg"] is None else f"{d['cfg']:g}", label="CFG scale",
                                placeholder="model default", elem_id="fastgen-cfg")
        with gr.Row():
            choices = recipe_choices(steps)
            base_in = gr.Dropdown(choices, value="baseline", label="baseline recipe", allow_custom_value=True,
                                  elem_id="fastgen-baseline-recipe")
            recipe_in = gr.Dropdown(choices, value="sampler:dpm++2m@8" if "sampler:dpm++2m@8" in choices else choices[-1],
                                    label="accelerated recipe", allow_custom_value=True, elem_id="fastgen-recipe",
                                    info="pick or type, e.g. 'sampler:dpm++2m@8+blockcache:0.08'")
        recipe_note = gr.Markdown("", elem_id="fastgen-recipe-note")
        run_btn = gr.Button("Generate and compare", variant="primary", elem_id="fastgen-generate")
        with gr.Row():
            base_img = gr.Image(label="baseline", format="png", interactive=False, elem_id="fastgen-baseline-image")
            accel_img = gr.Image(label="accelerated", format="png", interactive=False, elem_id="fastgen-accel-image")
        if has_slider:
            slider = gr.ImageSlider(label="baseline | accelerated (drag)", format="png", interactive=False,
                                    elem_id="fastgen-slider")
        else:
            slider = gr.Image(label="difference |baseline - accelerated| x4", format="png", interactive=False,
                              elem_id="fastgen-slider")
        with gr.Row():
            out_lat_b = gr.Textbox(label="baseline latency", interactive=False, elem_id="fastgen-baseline-latency")
            out_lat = gr.Textbox(label="accelerated latency", interactive=False, elem_id="fastgen-latency")
            out_speed = gr.Textbox(label="speedup", interactive=False, elem_id="fastgen-speedup")
            out_mem = gr.Textbox(label="peak memory (baseline / accelerated)", interactive=False,
                                 elem_id="fastgen-memory")
            out_psnr = gr.Textbox(label="PSNR (same seed)", interactive=False, elem_id="fastgen-psnr")
            out_ssim = gr.Textbox(label="SSIM (same seed)", interactive=False, elem_id="fastgen-ssim")
        out_what = gr.Textbox(label="this result", interactive=False, elem_id="fastgen-result")
        out_md = gr.Markdown("", elem_id="fastgen-summary")
        with gr.Row():
            pareto = gr.Image(label="this session: speed vs quality (Pareto front)", format="png", interactive=False,
                              elem_id="fastgen-pareto")
            hist_box = gr.Textbox(label="recipes measured in this session", interactive=False, lines=3,
                                  elem_id="fastgen-history")
        with gr.Accordion("Find fastest recipe (hardware-aware search on the target)", open=False,
                          elem_id="fastgen-tune-panel"):
            with gr.Row():
                budget_in = gr.Textbox("score>=0.97*baseline" if _is_zoo(model) else "psnr>=30", label="quality budget",
                                       info="'score>=0.97*baseline' (zoo models), 'psnr>=30', 'ssim>=0.9'",
                                       elem_id="fastgen-budget")
                trials_in = gr.Slider(2, 48, value=max_trials, step=1, label="max trials", elem_id="fastgen-trials")
            tune_btn = gr.Button("Find fastest recipe", elem_id="fastgen-tune")
            tune_md = gr.Markdown("", elem_id="fastgen-tune-result")

        # ---- events ----
        def on_model(m):
            dd = model_defaults((m or "").strip())
            label = "class" if dd["class_conditional"] else "prompt"
            cfg = "" if dd["cfg"] is None else f"{dd['cfg']:g}"
            return (gr.update(value=dd["prompt"], label=label), gr.update(value=dd["steps"]), gr.update(value=cfg),
                    gr.update(value="score>=0.97*baseline" if _is_zoo(m) else "psnr>=30"))

        model_in.change(on_model, model_in, [prompt_in, steps_in, cfg_in, budget_in], queue=False)

        def on_target(t):
            try:
                dev = resolve_target(t)
            except TargetUnavailableError as e:
                return f"**{t}**: {e}"
            if is_mobile(t):
                return (f"runs on `{dev}` with the denoiser as an ExecuTorch XNNPACK program (exported on the first "
                        f"run; a recipe without `executorch:w8|w4|fp32` gets `+{MOBILE_DEFAULT}`)")
            return f"runs on `{dev}`" + (f" ({torch.cuda.get_device_name(0)})" if dev == "cuda" else "")

        target_in.change(on_target, target_in, target_note, queue=False)

        def on_recipe(r, which):
            try:
                configs = parse_recipe(r or "baseline")
            except RecipeError as e:
                return f"**Error** in the {which} recipe: {e}"
            if not configs:
                return ""
            from fastgen.registry import technique_for_config

            return f"{which}: `{recipe_string(configs)}` — " + "; ".join(
                technique_for_config(c).help for c in configs)

        recipe_in.change(lambda r: on_recipe(r, "accelerated"), recipe_in, recipe_note, queue=False)
        base_in.change(lambda r: on_recipe(r, "baseline"), base_in, recipe_note, queue=False)

        def validate(m, p, seed, st, cfg, br, r, t):
            """Fast checks before queueing: a bad input fails here and the last results stay on the page."""
            try:
                _parse_cfg(cfg)
                _norm_recipe(br, "baseline recipe")
                _norm_recipe(r, "accelerated recipe")
                resolve_target(t)
                if not (m or "").strip() or not (p or "").strip():
                    raise FastgenError("choose a model and enter a prompt (a class name for class-conditional models)")
                if st is None or int(st) < 1 or seed is None or int(seed) < 0:
                    raise FastgenError("steps must be >= 1 and seed >= 0")
            except Exception as e:  # noqa: BLE001 - shown in the page (a toast; the last results stay)
                raise ui_error(e) from e

        def run(m, p, seed, st, cfg, br, r, t, hist, progress=gr.Progress(track_tqdm=True)):
            try:
                res = compare(m, p, seed, st, _parse_cfg(cfg), br, r, t, repeats=repeats, cache=cache,
                              progress=progress_fn(progress), tqdm_progress=True)
            except Exception as e:  # noqa: BLE001 - shown in the page
                raise ui_error(e) from e
            hist = list(hist or []) + res["rows"]
            plot = pareto_plot(hist, res["model"], os.path.join(plot_dir, f"pareto-{uuid.uuid4().hex}.png"))
            bi, ai = _upscale(res["baseline_image"]), _upscale(res["image"])
            third = (bi, ai) if has_slider else _upscale(
                np.clip(np.abs(res["baseline_image"].astype(int) - res["image"].astype(int)) * 4, 0, 255).astype(np.uint8))
            seen = list(dict.fromkeys(f"{row['model']}: {row['recipe']}" for row in hist))
            return (bi, ai, third, f"{res['baseline_latency_s']:.4f} s", f"{res['latency_s']:.4f} s",
                    f"{res['speedup']:.3f}x", f"{res['baseline_peak_mem_mb']:.1f} / {res['peak_mem_mb']:.1f} MB",
                    _fmt_psnr(res["psnr"]), f"{res['ssim']:.4f}",
                    f"seed {res['seed']} | {res['recipe']} vs {res['baseline_recipe']} | {res['model']} on {res['device']}",
                    _summary_markdown(res), plot, "\n".join(seen), hist)

        inputs = [model_in, prompt_in, seed_in, steps_in, cfg_in, base_in, recipe_in, target_in]
        run_btn.click(validate, inputs, None, queue=False).success(
                      run, inputs + [history],
                      [base_img, accel_img, slider, out_lat_b, out_lat, out_speed, out_mem, out_psnr, out_ssim, out_what,
                       out_md, pareto, hist_box, history], concurrency_limit=concurrency, concurrency_id="fastgen-compute")

        def run_tune(m, budget, st, cfg, t, n, hist, progress=gr.Progress()):
            try:
                res = find_fastest(m, budget, st, _parse_cfg(cfg), t, max_trials=int(n), cache=cache,
                                   progress=progress_fn(progress))
            except Exception as e:  # noqa: BLE001 - shown in the page
                raise ui_error(e) from e
            last: dict[str, dict] = {}
            for tr in res.trials:
                if not tr.get("error"):
                    last[tr["recipe"]] = tr
            hist = list(hist or []) + [{"model": m.strip(), **{k: v for k, v in tr.items()}} for tr in last.values()]
            plot = pareto_plot(hist, m.strip(), os.path.join(plot_dir, f"pareto-{uuid.uuid4().hex}.png"))
            seen = list(dict.fromkeys(f"{row['model']}: {row['recipe']}" for row in hist))
            best = res.best["recipe"] if res.best.get("found") else gr.update()
            return _tune_markdown(res), best, plot, "\n".join(seen), hist

        tune_btn.click(run_tune, [model_in, budget_in, steps_in, cfg_in, target_in, trials_in, history],
                       [tune_md, recipe_in, pareto, hist_box, history], concurrency_limit=concurrency,
                       concurrency_id="fastgen-compute")
    demo.queue(default_concurrency_limit=concurrency)
    return demo


def launch(model: str | None = None, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           *, block: bool = True, **build_kw):
    """Build and serve the app; returns the Blocks (``block=False`` returns at once, serving in a thread)."""
    demo = build_app(model, **build_kw)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
                **launch_kwargs(demo))
    return demo


def launch_kwargs(demo) -> dict:
    """Extra ``demo.launch`` keyword arguments this gradio version needs (gradio 6 takes the theme there)."""
    return dict(getattr(demo, "_fastgen_launch_kw", {}))

