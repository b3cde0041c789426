"""``gd`` — run a guidance-distilled student in place of the teacher's denoiser (one call per step).

A student trained by :mod:`distill.guidance` (Meng et al., "On Distillation of Guided Diffusion Models",
CVPR 2023) takes the guidance weight as an input, so the pipeline needs one denoiser pass over ``B``
samples per step instead of classifier-free guidance's ``2B``. This technique makes that a recipe that
stacks with the others (``"gd+sampler:unipc@16+int8"``) on the *teacher's* pipeline, with the teacher's
call unchanged (same ``guidance_scale``):

* **UNets** (SD, SDXL): the student is a ``UNet2DConditionModel`` with ``time_cond_proj_dim``; the stock
  pipelines then feed it the guidance embedding and stop batching CFG by themselves, so swapping the
  component is all.
* **SD3**: the student is a :class:`distill.models.GuidanceSD3Transformer2DModel`. The SD3 pipeline always
  batches CFG as ``[uncond; cond]`` when ``guidance_scale > 1``; a diffusers ``ModelHook`` on the student
  runs it on the conditional half only, with ``guidance = the call's guidance_scale``, and returns that
  prediction twice, so the pipeline's ``uncond + g (cond - uncond)`` is exactly the student's output.

``remove_gd`` puts the teacher's own module object back (bit-exact). Because the denoiser is swapped, the
other applied techniques are taken off and put back on the new denoiser whenever ``gd`` comes or goes
(``accelerate`` also orders ``gd`` first within one recipe, so that costs nothing there).

>>> fastgen.accelerate(pipe, "gd")                 # a zoo teacher: its shipped student   # doctest: +SKIP
>>> fastgen.accelerate(pipe, "gd:runs/gd-mmdit/pipeline+sampler:unipc@16")                # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgen.errors import FastgenError
from fastgen.api import apply_technique, remove_technique
from fastgen.hooks import HookBase, add_hook, remove_hook
from fastgen.registry import Technique, register_technique
from fastgen.utils.logging import get_logger

__all__ = ["GDConfig", "apply_gd", "remove_gd", "find_student"]

logger = get_logger(__name__)

_NAME = "gd"
_HOOK = "fastgen_gd_half_batch"
FAMILIES = ("sd", "sdxl", "sd3")


@dataclass(frozen=True)
class GDConfig:
    """Which guidance-distilled student replaces the denoiser.

    Args:
        student: folder of a student pipeline saved by ``python -m fastgen.distill.guidance`` (its
            ``pipeline/``), or a zoo student name (``"shapes-mmdit-gd"``). ``None`` (default): the zoo
            student of the zoo teacher the pipeline was loaded from. Speed: about 2x per step (one denoiser
            pass instead of CFG's two); quality: the student's (docs/results/distillation.md).
    """

    student: str | None = None


def _pipe_path(pipe) -> Path | None:
    p = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return Path(str(p)).resolve() if p else None


def find_student(pipe, config: GDConfig) -> Path:
    """The student folder for ``pipe``: ``config.student`` (a folder or zoo name), else the shipped zoo
    student of the zoo teacher ``pipe`` was loaded from. Raises :class:`FastgenError` saying what to pass."""
    from fastgen import zoo

    if config.student is not None:
        if config.student in zoo.STUDENTS:
            path = zoo.weights_path(config.student)
        else:
            path = Path(config.student).expanduser()
        if not (path / "model_index.json").exists():
            raise FastgenError(f"gd: {config.student!r} is not a student pipeline folder (no model_index.json "
                               f"in {path}); pass the pipeline/ folder written by `python -m fastgen.distill.guidance`")
        return path
    here = _pipe_path(pipe)
    for student, teacher in zoo.STUDENTS.items():
        if not student.endswith("-gd"):
            continue
        if here is not None and here == zoo.weights_path(teacher).resolve():
            path = zoo.weights_path(student)
            if not (path / "model_index.json").exists():
                raise FastgenError(f"gd: the zoo student {student!r} of {teacher!r} is not installed ({path})")
            return path
    raise FastgenError("gd: this pipeline is not a zoo teacher with a shipped student; name the student: "
                       "'gd:PATH' with PATH the pipeline/ folder of a `python -m fastgen.distill.guidance` run")


def _load_student(path: Path, attr: str, like: torch.nn.Module) -> torch.nn.Module:
    from fastgen import zoo

    zoo.check_weights(path)
    spec = json.loads((path / "model_index.json").read_text())
    if attr not in spec:
        raise FastgenError(f"gd: {path} has no {attr!r} component; its pipeline does not match this one")
    library, cls_name = spec[attr]
    cls = zoo._component_class(library, cls_name)
    student = cls.from_pretrained(str(path / attr), local_files_only=True, torch_dtype=like.dtype)
    if student.device != like.device:
        student = student.to(like.device)
    student.eval()
    student.requires_grad_(False)
    procs = getattr(like, "attn_processors", None)
    if procs is not None and set(procs) == set(student.attn_processors):
        student.set_attn_processor(dict(procs))  # e.g. the zoo's exact collapsed-zero-token attention
    return student


def _check_student(student: torch.nn.Module, teacher: torch.nn.Module, family: str, path: Path) -> None:
    if family == "sd3":
        from .models import GuidanceSD3Transformer2DModel

        if not isinstance(student, GuidanceSD3Transformer2DModel):
            raise FastgenError(f"gd: {path}/transformer is a {type(student).__name__}, not a guidance-distilled "
                               f"GuidanceSD3Transformer2DModel")
    elif getattr(student.config, "time_cond_proj_dim", None) is None:
        raise FastgenError(f"gd: {path}/unet has no guidance input (time_cond_proj_dim); it is not a "
                           f"guidance-distilled student")
    for key in ("sample_size", "in_channels", "out_channels", "patch_size"):
        a, b = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if a != b:
            raise FastgenError(f"gd: the student's {key} is {a}, the pipeline's denoiser has {b}: "
                               f"{path} was distilled from another model")


class _CondHalfHook(HookBase):
    """SD3: run the student on the conditional half of a CFG batch with the call's guidance scale.

    Kept outside the other techniques' hooks on the student (``fastgen_outer``), so that caches and RAS see
    the halved batch on every call."""

    fastgen_outer = True

    def __init__(self, pipe):
        super().__init__()
        self.pipe = pipe
        self.halved = 0

    def new_forward(self, module, *args, **kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        n = x.shape[0]
        g = float(getattr(self.pipe, "guidance_scale", 1.0) or 1.0)
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if not cfg or n % 2:
            # no CFG batching: the teacher's call would be unguided (g <= 1) -> the student at g = 1
            return self.fn_ref.original_forward(*args, guidance=max(g, 1.0) if cfg else 1.0, **kwargs)
        from fastgen.guidance import cond_half, repeat_output

        self.halved += 1
        out = self.fn_ref.original_forward(*cond_half(args, n), guidance=g, **cond_half(kwargs, n))
        return repeat_output(out)


def _install(pipe, st, config: GDConfig) -> dict:
    """Swap the student in (the core has lifted every other technique off and puts them back on it)."""
    attr = "transformer" if st.adapter.family == "sd3" else "unet"
    teacher = getattr(pipe, attr)
    path = find_student(pipe, config)
    student = _load_student(path, attr, teacher)
    _check_student(student, teacher, st.adapter.family, path)
    setattr(pipe, attr, student)  # pipe.components / offloading see the same attribute
    hook = None
    if st.adapter.family == "sd3":
        hook = _CondHalfHook(pipe)
        add_hook(student, hook, _HOOK)
    logger.info("gd: %s.%s <- %s", type(pipe).__name__, attr, path)
    return {"attr": attr, "teacher": teacher, "student": student, "hook": hook, "path": str(path)}


def _uninstall(pipe, st, saved: dict) -> None:
    if saved["hook"] is not None:
        remove_hook(saved["student"], _HOOK)
    setattr(pipe, saved["attr"], saved["teacher"])


def apply_gd(pipe, config: GDConfig | None = None):
    """Swap in the guidance-distilled student (see the module docstring); returns ``pipe``. Safe to call twice."""
    return apply_technique(pipe, _NAME, config)


def remove_gd(pipe):
    """Put the teacher's denoiser back (no-op if ``gd`` is not applied). Returns ``pipe``."""
    return remove_technique(pipe, _NAME)


def _summary(pipe, saved: dict) -> dict:
    hook = saved["hook"]
    return {"student": saved["path"], "half_batch_calls": hook.halved if hook is not None else None}


def _parse(args: str | None) -> GDConfig:
    text = (args or "").strip()
    return GDConfig(student=text or None)


def _to_string(c: GDConfig) -> str:
    return "gd" if c.student is None else f"gd:{c.student}"


def _check(pipe, adapter, config: GDConfig) -> None:
    find_student(pipe, config)  # a missing student is reported before anything is patched


_CFG_CLASH = "gd already runs one conditional pass per step; cfg-interval has nothing left to skip"

register_technique(Technique(
    name=_NAME, config_cls=GDConfig, parse=_parse, to_string=_to_string, install=_install, uninstall=_uninstall,
    check=_check, families=FAMILIES, summary=_summary, order=-10, replaces_denoiser=True,
    help="swap in a guidance-distilled student: one denoiser pass per step instead of CFG's two",
    example="gd",
    incompatible={"cfg-interval": _CFG_CLASH},
))
