"""Embedded default models of fastgen and the procedural worlds they are trained and scored on.

``fastgen.zoo.shapes`` is a procedural text-to-image world (coloured shapes, counts, relations) and
``fastgen.zoo.evaluate`` its exact, rule-based evaluator; ``fastgen.zoo.digits`` is scikit-learn's
handwritten digits and their scorer (a classifier trained on held-out digits), for the class-conditional
next-scale AR model ``digits-var`` (a :class:`fastgen.ar.VARPipeline`, trained by
``fastgen train var``). The trained pipelines ship as standard diffusers
folders under ``fastgen/zoo/weights/<name>/`` and load with :func:`load_default`; ``fastgen.zoo.train``
is the recipe that reproduces them (``fastgen train zoo <name> --out DIR``).

>>> import fastgen.zoo as zoo
>>> zoo.list()
['shapes-mmdit', 'shapes-unet', 'digits-var']
>>> pipe = zoo.load_default("shapes-mmdit")                       # doctest: +SKIP
>>> image = pipe("a red circle left of a blue square", **zoo.call_kwargs("shapes-mmdit")).images[0]  # doctest: +SKIP
"""

from __future__ import annotations

import builtins
import importlib
import sys
import json
from pathlib import Path
from typing import Any

from fastgen.errors import FastgenError
from fastgen.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "MODELS", "DEFAULTS", "WEIGHTS_DIR", "list", "load_default", "load_pipeline", "check_weights", "call_kwargs",
    "weights_path", "name_of", "WeightsNotFoundError", "WeightsError", "AR_MODELS", "STUDENTS", "world_of",
]

#: Distilled students shipped next to their teachers (``student -> teacher``), trained by ``distill/``.
#: They are scored on their teacher's world and prompts; the commands that train them are in the README.
STUDENTS: dict[str, str] = {"shapes-mmdit-gd": "shapes-mmdit", "shapes-mmdit-scm": "shapes-mmdit",
                            "shapes-unet-lcm": "shapes-unet"}

#: The zoo's model names (teachers first, then the distilled students).
MODELS: tuple[str, ...] = ("shapes-mmdit", "shapes-unet", "digits-var", *STUDENTS)
#: Zoo models that are next-scale AR pipelines (:class:`fastgen.ar.VARPipeline`), not diffusers folders.
AR_MODELS: tuple[str, ...] = ("digits-var",)

#: Default sampling settings per model: what the reported scores use (``call_kwargs`` turns them into
#: pipeline keyword arguments; ``sampler`` names the scheduler shipped in the folder).
DEFAULTS: dict[str, dict[str, Any]] = {
    "shapes-mmdit": {"num_inference_steps": 28, "guidance_scale": 5.0, "sampler": "flow-euler (shift 1.0)",
                     "height": 32, "width": 32, "max_sequence_length": 2},
    "shapes-unet": {"num_inference_steps": 50, "guidance_scale": 5.0, "sampler": "ddim", "height": 32, "width": 32},
    "digits-var": {"guidance_scale": 2.0, "top_k": 0, "top_p": 0.0, "height": 32, "width": 32},
    # guidance-distilled: one transformer call per step; guidance_scale=1 turns the pipeline's CFG batching
    # off and the student applies its own g (config default_guidance_scale = 5, the teacher's; another g:
    # joint_attention_kwargs={"guidance_scale": g})
    "shapes-mmdit-gd": {"num_inference_steps": 28, "guidance_scale": 1.0, "student_guidance_scale": 5.0,
                        "sampler": "flow-euler (shift 1.0)", "height": 32, "width": 32, "max_sequence_length": 2},
    # sCM consistency student, two-phase: 2 transformer calls per image (sigmas 1 -> 0.7827 -> 0, no CFG batch;
    # 0.7827 = sigma of TrigFlow t = 1.3, its training phase edge); 1 step: num_inference_steps=1 without sigmas
    "shapes-mmdit-scm": {"num_inference_steps": 2, "guidance_scale": 1.0, "sigmas": [1.0, 0.782708009805053],
                         "sampler": "two-phase sCM (flow-Euler shift 1 through sigma 0.7827)", "height": 32,
                         "width": 32, "max_sequence_length": 2},
    # LCM consistency student of shapes-unet (w-conditioned: guidance_scale feeds its w input through
    # time_cond_proj_dim, so the pipeline runs no CFG batch): 4 LCMScheduler steps, one UNet call each
    "shapes-unet-lcm": {"num_inference_steps": 4, "guidance_scale": 5.0, "sampler": "lcm (10-point grid)",
                        "height": 32, "width": 32},
}

#: How each student was made (shown in errors when its weights are missing).
_STUDENT_RECIPES: dict[str, str] = {
    "shapes-mmdit-scm": "fastgen train consistency --method scm --teacher shapes-mmdit --output runs/scm-mmdit "
                        "--steps 5000 --batch 32 --lr 5e-5 --warmup 100 --eval-every 500 --eval-steps 2 "
                        "--tangent-warmup 500 --choose-mid-t 500 && fastgen train consistency --method scm "
                        "--teacher shapes-mmdit --init-student runs/scm-mmdit/pipeline --output runs/scm-phased "
                        "--steps 1750 --batch 32 --lr 5e-5 --warmup 50 --eval-every 250 --eval-steps 2 "
                        "--tangent-warmup 1 --mid-t 1.3 --phased --pool-size 1024",
    "shapes-unet-lcm": "fastgen train guidance --teacher shapes-unet --output runs/gd-unet --steps 1000 --batch 32 "
                       "--lr 5e-5 --warmup 100 --eval-every 500 --eval-steps 8 && fastgen train consistency "
                       "--method lcm --teacher shapes-unet --init-student runs/gd-unet/pipeline --output runs/lcm-unet "
                       "--steps 1000 --batch 32 --lr 2e-6 --huber-c 0 --num-ddim-timesteps 10 --w-max 6 --eval-every 250",
    "shapes-mmdit-gd": "fastgen train guidance --teacher shapes-mmdit --output runs/gd-mmdit --steps 3000 "
                       "--batch 32 --lr 5e-5 --warmup 100 --t-sampling logit-normal",
}

#: Where the shipped weights live (one diffusers folder per model).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class WeightsNotFoundError(FastgenError, FileNotFoundError):
    """A zoo model's weights are not there (not trained/shipped yet, or the folder is incomplete)."""


class WeightsError(FastgenError, ValueError):
    """A weight file does not match its model config (missing tensor, wrong shape, unreadable file)."""


def list() -> builtins.list[str]:  # noqa: A001 - the public name is zoo.list()
    """The names of the zoo's models (``load_default`` accepts each)."""
    return builtins.list(MODELS)


def _check_name(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(MODELS)}")
    return name


def world_of(name: str) -> str:
    """The zoo model whose world, prompts and evaluator settings ``name`` uses (a student's teacher)."""
    return STUDENTS.get(_check_name(name), name)


def weights_path(name: str) -> Path:
    """The folder the shipped weights of ``name`` live in (it may not exist yet)."""
    return WEIGHTS_DIR / _check_name(name)


def name_of(pipe) -> str | None:
    """The zoo model ``pipe`` was loaded from (its ``name_or_path`` is that model's weights folder), or None."""
    path = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not path:
        return None
    here = Path(str(path)).resolve()
    for name in list():
        folder = weights_path(name)
        if folder.exists() and here == folder.resolve():
            return name
    return None


#: Keys of :data:`DEFAULTS` that are pipeline call arguments.
_CALL_KEYS = ("num_inference_steps", "guidance_scale", "sigmas", "height", "width", "max_sequence_length", "top_k",
              "top_p")


def call_kwargs(name: str) -> dict[str, Any]:
    """Pipeline keyword arguments for ``name``'s default call (steps, guidance, height, width and, for
    ``shapes-mmdit``, ``max_sequence_length=2``: with the collapsed-zero-token attention that
    :func:`load_default` installs, the same images as the plain 256-token call, see
    :mod:`fastgen.zoo.attention`)."""
    d = DEFAULTS[_check_name(name)]
    keys = ("guidance_scale", "top_k", "top_p") if name in AR_MODELS else _CALL_KEYS  # VARPipeline has no height/width
    return {k: d[k] for k in keys if k in d}


def extra_call_kwargs(name: str, steps: int | None = None) -> dict[str, Any]:
    """``name``'s default call arguments other than steps, guidance and size (``max_sequence_length``, a
    student's ``sigmas``); a ``sigmas`` grid is left out when ``steps`` differs from the default step count."""
    d = call_kwargs(name)
    out = {k: v for k, v in d.items() if k not in ("num_inference_steps", "guidance_scale", "height", "width")}
    if steps is not None and "num_inference_steps" in d and int(steps) != d["num_inference_steps"]:
        out.pop("sigmas", None)
    return out


# --------------------------------------------------------------------------------------------------
# Checking a folder against its configs before diffusers' loader sees it
# --------------------------------------------------------------------------------------------------

_WEIGHT_NAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def _tensor_files(folder: Path, library: str) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    stem = _WEIGHT_NAMES[library]
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise WeightsError(f"{index}: unreadable shard index ({e})") from e
        return {k: folder / v for k, v in weight_map.items()}
    if single.exists():
        return {k: single for k in _safetensors_shapes(single)}
    others = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    hint = f" (found {others}; fastgen loads safetensors only)" if others else ""
    raise WeightsNotFoundError(f"weight file {single} is missing{hint}")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    if not path.exists():
        raise WeightsNotFoundError(f"weight file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise WeightsError(f"weight file {path} is not a readable safetensors file: {e}") from e


def _expected_shapes(library: str, cls: type, folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, set]]:
    """Shapes of every tensor the model built from ``folder``'s config expects (built with empty weights),
    and for each tied parameter the set of its names (a file needs only one of them)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            if library == "diffusers":
                model = cls.from_config(cls.load_config(folder))
            else:
                model = cls(cls.config_class.from_pretrained(folder))
    except Exception as e:
        raise WeightsError(f"{folder}: cannot build {cls.__name__} from its config ({e})") from e
    groups: dict[int, set] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(n)
    tied = {n: g for g in groups.values() if len(g) > 1 for n in g}
    declared = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if isinstance(declared, dict):  # transformers >= 5: {tied name: source name}
        for a, b in declared.items():
            group = tied.get(a, {a}) | tied.get(b, {b})
            for n in group:
                tied[n] = group
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, tied


#: Top-level package names fastgen < 0.2 installed beside ``fastgen``; a folder saved then names its custom
#: classes by them (``"distill.models"``). They live under the ``fastgen`` namespace now.
_LEGACY_PACKAGES = ("samplers", "distill", "quant", "apps")


def legacy_library(library: str) -> str | None:
    """The current module for a ``model_index.json`` library saved by fastgen < 0.2 (``"distill.models"`` ->
    ``"fastgen.distill.models"``), or None when ``library`` is not such a name."""
    if isinstance(library, str) and library.split(".")[0] in _LEGACY_PACKAGES:
        return "fastgen." + library
    return None


def _component_class(library: str, cls_name: str) -> type | None:
    """The class a ``model_index.json`` entry names. Importing a custom module here (e.g.
    ``fastgen.distill.models`` of a guidance-distilled student) also registers it in ``sys.modules``, where
    diffusers' loader looks. A pre-0.2 name (``distill.models``) is read as its ``fastgen.`` module."""
    library = legacy_library(library) or library
    try:
        module = importlib.import_module(library)
    except ImportError as e:
        raise WeightsError(f"the pipeline needs the module {library!r} (for {cls_name}), which cannot be imported: "
                           f"{e}. fastgen's students need the `fastgen.distill` package of this project.") from e
    return getattr(module, cls_name, None)


def check_weights(path: str | Path) -> None:
    """Check that every model folder of a pipeline has its safetensors weights, every tensor its config
    expects, with the expected shape.

    Raises:
        WeightsNotFoundError: ``model_index.json`` or a weight file is missing (the message names it).
        WeightsError: a tensor is missing or mis-shaped, or a file is unreadable (the message names the
            file and the tensor, with both shapes).
    """
    import torch

    path = Path(path)
    index = path / "model_index.json"
    if not index.exists():
        raise WeightsNotFoundError(f"{index} is missing: {path} is not a diffusers pipeline folder")
    try:
        spec = json.loads(index.read_text())
    except ValueError as e:
        raise WeightsError(f"{index} is not valid JSON: {e}") from e
    for comp, val in spec.items():
        if comp.startswith("_") or not isinstance(val, (builtins.list, tuple)) or len(val) != 2 or val[0] is None:
            continue
        library, cls_name = val
        cls = _component_class(library, cls_name)
        if cls is None or not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # schedulers, tokenizers, processors
        if library not in _WEIGHT_NAMES:  # a custom class, e.g. distill.models.GuidanceSD3Transformer2DModel
            from diffusers import ModelMixin

            library = "diffusers" if issubclass(cls, ModelMixin) else "transformers"
        folder = path / comp
        if not (folder / "config.json").exists():
            raise WeightsNotFoundError(f"{folder / 'config.json'} is missing (component {comp!r}, {cls_name})")
        files = _tensor_files(folder, library)
        expected, tied = _expected_shapes(library, cls, folder)
        shapes: dict[str, tuple[int, ...]] = {}
        for f in sorted(set(files.values())):
            shapes.update(_safetensors_shapes(f))
        for name, want in expected.items():
            if name not in shapes and any(alias in shapes for alias in tied.get(name, ())):
                continue  # a tied weight stored under another of its names
            if name not in files or name not in shapes:
                where = files.get(name, next(iter(files.values()), folder))
                raise WeightsError(f"weight file {where}: tensor {name!r} (shape {builtins.list(want)}) is missing "
                                   f"({comp} is a {cls_name})")
            if shapes[name] != want:
                raise WeightsError(f"weight file {files[name]}: tensor {name!r} has shape {builtins.list(shapes[name])}, "
                                   f"but the config of {comp} ({cls_name}) expects {builtins.list(want)}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_pipeline(path: str | Path, device: Any = None, dtype: Any = None):
    """Check (:func:`check_weights`) and load a diffusers pipeline folder offline.

    A ``shapes-mmdit`` folder (its ``fastgen_zoo.json`` says so) gets the exact collapsed-zero-token
    attention (:mod:`fastgen.zoo.attention`), so :func:`call_kwargs`' ``max_sequence_length=2`` is fast
    and gives the default call's images.

    Args:
        path: the folder (``model_index.json`` at its root).
        device: where to put it (default CPU).
        dtype: torch dtype of the weights (default float32, whatever the stored dtype).
    """
    import torch
    from diffusers import DiffusionPipeline

    from ..utils.io import dtype_kwarg

    check_weights(path)
    # components a pre-0.2 folder names by an old top-level package (``"distill.models"``): diffusers resolves a
    # non-diffusers library from sys.modules, so the old name points at its ``fastgen.`` module while this
    # folder loads (and only then: a user's own ``distill`` package is not shadowed afterwards)
    aliases = {}
    spec = json.loads((Path(path) / "model_index.json").read_text())
    for comp, val in spec.items():
        if not comp.startswith("_") and isinstance(val, builtins.list) and len(val) == 2 and legacy_library(val[0]):
            logger.warning("%s names %r for %s, a module of fastgen < 0.2; loading it from %r. Change that entry of "
                           "model_index.json to %r (or save the pipeline again) so plain diffusers loads it too",
                           Path(path) / "model_index.json", val[0], comp, legacy_library(val[0]), legacy_library(val[0]))
            if _component_class(val[0], val[1]) is None:
                raise WeightsError(f"{Path(path) / 'model_index.json'} names {val[1]} in {val[0]!r}, which "
                                   f"{legacy_library(val[0])!r} does not define")
            if val[0] not in sys.modules:
                aliases[val[0]] = importlib.import_module(legacy_library(val[0]))
    sys.modules.update(aliases)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **dtype_kwarg(dtype or torch.float32))
    finally:
        for name in aliases:
            sys.modules.pop(name, None)
    pipe.set_progress_bar_config(disable=True)
    meta = Path(path) / "fastgen_zoo.json"
    if meta.exists() and json.loads(meta.read_text()).get("model") == "shapes-mmdit":
        from .attention import use_collapsed_zeros

        use_collapsed_zeros(pipe.transformer, True, n_text=pipe.tokenizer.model_max_length)
    if device is not None:
        pipe.to(device)
    return pipe


def load_default(name: str = "shapes-mmdit", device: Any = None, dtype: Any = None):
    """Load a trained default pipeline shipped in ``fastgen/zoo/weights/<name>/``.

    Args:
        name: one of :func:`list` (``"shapes-mmdit"``: StableDiffusion3Pipeline; ``"shapes-unet"``:
            StableDiffusionPipeline; ``"digits-var"``: :class:`fastgen.ar.VARPipeline`, called with class
            labels 0-9). Their default call settings are in :data:`DEFAULTS`.
        device: where to put the pipeline (default CPU).
        dtype: torch dtype (default float32).

    Raises:
        WeightsNotFoundError: the weights are not there (the message says how to train them).
        WeightsError: a weight file is damaged or does not match its config (names file and tensor).
    """
    folder = weights_path(name)
    if name in AR_MODELS:
        return _load_ar(name, folder, device, dtype)
    if not (folder / "model_index.json").exists() and name in STUDENTS:
        raise WeightsNotFoundError(
            f"the weights of zoo student {name!r} are not installed ({folder} has no model_index.json). Distill "
            f"them from {STUDENTS[name]!r} with `{_STUDENT_RECIPES[name]}`, then copy runs/<run>/pipeline to {folder}.")
    if not (folder / "model_index.json").exists():
        raise WeightsNotFoundError(
            f"the weights of zoo model {name!r} are not installed ({folder} has no model_index.json). "
            f"Train them with `fastgen train zoo {name} --out runs/{name}` (1–3 h on a CPU), then "
            f"`fastgen train zoo {name} --out runs/{name} --export {folder}`."
        )
    return load_pipeline(folder, device=device, dtype=dtype)


def _load_ar(name: str, folder: Path, device: Any, dtype: Any):
    """A next-scale AR zoo model: a ``VARPipeline.save_pretrained`` folder."""
    from fastgen.ar.pipeline import VARPipeline
    from fastgen.ar.checkpoints import CheckpointError

    if not (folder / "model_index.json").exists():
        raise WeightsNotFoundError(
            f"the weights of zoo model {name!r} are not installed ({folder} has no model_index.json). Train them "
            f"(about 35 min on one CPU core) with `fastgen train var vae --out runs/digits-vae --steps 1400` "
            f"and `fastgen train var var --vae runs/digits-vae --out runs/{name} --steps 2200`, then "
            f"`fastgen train var export --out runs/{name} --to {folder}`.")
    try:
        pipe = VARPipeline.from_pretrained(folder, device=device, dtype=dtype)
    except FileNotFoundError as e:
        raise WeightsNotFoundError(str(e)) from e
    except (CheckpointError, ValueError) as e:
        raise WeightsError(f"{folder}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe
