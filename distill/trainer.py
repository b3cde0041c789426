"""The trainer machinery every distillation method of :mod:`fastgen.distill` builds on.

* :class:`DistillConfig`: the run's settings (optimiser, EMA, precision, LoRA, checkpoint/eval cadence,
  the teacher-sample pool); the method configs extend it.
* :class:`TeacherPool`: the **data-free** training states. Distillation needs clean latents ``x_0`` to
  noise; here they are the teacher's own CFG samples (``pipe(prompts, output_type="latent")``) for
  prompts drawn from :func:`fastgen.zoo.shapes.sample_prompts` (zoo teachers) or a prompts file. Pool
  ``k`` (``pool_size`` samples, used for ``pool_refresh`` steps) depends only on ``(seed, k)``, so it is
  regenerated, not stored, on resume.
* :class:`DistillTrainer`: the loop. One optimisation step's random draws depend only on
  ``(seed, step)`` (a fresh ``torch.Generator``, :func:`step_generator`), so a run killed and ``--resume``\\ d
  reproduces the uninterrupted loss curve exactly; checkpoints are written atomically (temp file +
  ``os.replace``); EMA of the trainable weights; optional LoRA through peft (:func:`add_lora`); mixed
  precision through ``torch.autocast``; gradient checkpointing through diffusers'
  ``enable_gradient_checkpointing``; periodic evaluation (:func:`fastgen.zoo.evaluate.evaluate_pipeline` for
  zoo teachers, or any callable); ``tqdm`` progress; export of the student as a pipeline of the teacher's
  class (:func:`student_pipeline`).
* :func:`load_teacher`: a zoo name (``shapes-mmdit``, ``shapes-unet``) or a local diffusers folder.

The teacher families (schedules, parametrisations) are in :mod:`fastgen.distill.schedule`; the command-line
plumbing in :mod:`fastgen.distill.cli`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from fastgen.utils.io import Resumable, check_same_config
from fastgen.utils.logging import get_logger, quiet_diffusers

from .models import GuidanceSD3Transformer2DModel, has_guidance_input
from .schedule import Family, UNetFamily, family_for

__all__ = [
    "DistillConfig", "TeacherPool", "DistillTrainer", "load_teacher", "read_prompts", "add_lora", "has_lora",
    "fused_copy", "init_student_folder", "shape_differences", "student_pipeline", "step_generator", "LORA_TARGETS",
]

logger = get_logger(__name__)

#: LoRA target modules per denoiser family (diffusers module names; matched as name suffixes by peft).
LORA_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
             "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """Settings shared by every distillation method (stored in the checkpoint; ``--resume`` checks them).

    Fields listed in :attr:`RESUME_FREE` (run length, cadences, device, progress) may change on resume.
    """

    steps: int = 1000
    """Optimisation steps in total (resumed steps included). Zoo students: 1k-10k; tests: 2-6."""
    batch: int = 16
    """Samples per step. 8-64 on the zoo models; larger is smoother but slower."""
    lr: float = 1e-5
    """AdamW learning rate (full weights 1e-6..1e-4; LoRA 1e-4..1e-3)."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    warmup: int = 0
    """Linear learning-rate warm-up steps."""
    ema_decay: float = 0.999
    """EMA of the trainable weights (0 disables; the exported student is the EMA when enabled). LCM
    uses this EMA as its target network (0.95 there)."""
    seed: int = 0
    """Every random draw of step k depends only on (seed, k)."""
    mixed_precision: str = "no"
    """"no" | "bf16" | "fp16": autocast of the forward passes (weights and optimiser stay float32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    lora_rank: int = 0
    """0: train all denoiser weights; r > 0: train a rank-r LoRA (peft) on attention/MLP/conv layers
    (plus any new guidance-embedding layer) and export the fused weights (and the LoRA alone when the
    student adds no layer)."""
    lora_alpha: float | None = None
    """LoRA alpha (default: = rank)."""
    pool_size: int = 256
    """Teacher samples per pool (the data-free training states)."""
    pool_refresh: int = 500
    """Steps each pool is used for before the next one is generated (the pool costs about
    pool_size * pool_steps * 2 teacher forwards; each sample is re-noised at a fresh time every use)."""
    pool_steps: int = 20
    """Teacher sampling steps (the pipeline's scheduler, with CFG) for the pool samples."""
    pool_batch: int = 32
    """Samples per teacher pipeline call while generating a pool (memory; results do not depend on it)."""
    pool_guidance: float | None = None
    """CFG scale (diffusers convention) of the pool samples (default: zoo default, else 5.0)."""
    height: int | None = None
    """Image height in pixels (default: the zoo default or the model's native size)."""
    width: int | None = None
    max_sequence_length: int | None = None
    """SD3 only: the T5 part's length in tokens (default: the zoo call's 2, else the pipeline's 256)."""
    prompts_file: str | None = None
    """One prompt per line; required for non-zoo teachers."""
    ckpt_every: int = 200
    """Write OUT/checkpoint.pt every this many steps (and at the end)."""
    eval_every: int = 0
    """Evaluate (and save OUT/pipeline) every this many steps (0: only at the end)."""
    eval_prompts: int = 100
    """Held-out prompts of the periodic zoo evaluation (0 disables evaluation)."""
    log_every: int = 20
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", ..."""
    progress: bool = True
    """Show a tqdm progress bar."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = ("steps", "ckpt_every", "eval_every", "eval_prompts", "log_every",
                                              "device", "progress", "eval_steps", "eval_guidance")

    def check(self) -> None:
        if self.steps < 0 or self.batch < 1:
            raise ValueError(f"steps must be >= 0 and batch >= 1, got steps={self.steps}, batch={self.batch}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if min(self.pool_size, self.pool_refresh, self.pool_steps, self.pool_batch) < 1:
            raise ValueError("pool_size, pool_refresh, pool_steps and pool_batch must be >= 1")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of ``step`` (and sub-stream ``stream``): depends only on its arguments."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) * 7 + int(stream))


# --------------------------------------------------------------------------------------------------
# Teachers, prompts and the data-free pool
# --------------------------------------------------------------------------------------------------


def load_teacher(spec: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """``(pipe, zoo_name_or_None)`` from a zoo name (``fastgen.zoo.load_default``) or a local diffusers folder."""
    from fastgen import zoo

    if spec in zoo.MODELS:
        return zoo.load_default(spec, device=device, dtype=dtype), spec
    path = Path(spec)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"--teacher {spec!r} is neither a zoo model ({', '.join(zoo.MODELS)}) nor a diffusers "
                                "folder with a model_index.json")
    meta = path / "fastgen_zoo.json"
    name = json.loads(meta.read_text()).get("model") if meta.exists() else None
    pipe = zoo.load_pipeline(path, device=device, dtype=dtype)
    return pipe, (name if name in zoo.MODELS else None)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def _index(c: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx.to(v.device)] for k, v in c.items()}


class TeacherPool:
    """Deterministic pools of teacher samples (clean latents) with their prompt encodings.

    Pool ``k`` is ``pool_size`` samples of ``pipe(prompts_k, num_inference_steps=steps,
    guidance_scale=guidance, output_type="latent")`` with per-sample generators seeded from ``(seed, k)``;
    it serves steps ``[k * refresh, (k + 1) * refresh)``. A step draws its batch (with replacement) from
    the pool with the step's generator.
    """

    def __init__(self, family: Family, prompts: Callable[[int, int], list[str]], size: int, refresh: int,
                 steps: int, guidance: float, seed: int, hw: tuple[int, int], chunk: int = 32):
        self.family, self.prompts, self.size, self.refresh = family, prompts, int(size), int(refresh)
        self.steps, self.guidance, self.seed, self.hw = int(steps), float(guidance), int(seed), hw
        self.chunk = int(chunk)
        self._k: int | None = None
        self._data: tuple[torch.Tensor, dict, dict, list[str]] | None = None

    def pool(self, k: int) -> tuple[torch.Tensor, dict, dict, list[str]]:
        if self._k == k and self._data is not None:
            return self._data
        prompts = self.prompts(k, self.size)
        pipe = self.family.pipe
        gens = [torch.Generator().manual_seed((self.seed * 100_003 + k) * 10_007 + i) for i in range(self.size)]
        t0 = time.time()
        parts, conds, unconds = [], [], []
        for i in range(0, self.size, self.chunk):
            ps = prompts[i:i + self.chunk]
            with torch.no_grad(), quiet_diffusers():  # not the same truncation warning on every chunk
                parts.append(pipe(ps, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                  generator=gens[i:i + self.chunk], height=self.hw[0], width=self.hw[1],
                                  output_type="latent", **self.family.call_extra()).images)
                c, u = self.family.encode(ps)
            conds.append(c)
            unconds.append(u)
        x0 = torch.cat(parts)
        if not torch.isfinite(x0).all():
            raise FloatingPointError(f"the teacher's pool-{k} samples contain NaN/inf ({self.family.describe()}, "
                                     f"{self.steps} steps, g={self.guidance}); check the teacher and its dtype")
        cond = {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
        uncond = {key: torch.cat([c[key] for c in unconds]) for key in unconds[0]}
        logger.info("teacher pool %d: %d samples (%d steps, g=%.2f) in %.1fs", k, self.size, self.steps,
                    self.guidance, time.time() - t0)
        self._k, self._data = k, (x0.float(), cond, uncond, prompts)
        return self._data

    def batch(self, step: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, dict, dict]:
        """``(x0, cond, uncond)`` for ``step`` (``n`` samples)."""
        x0, cond, uncond, _ = self.pool(step // self.refresh)
        idx = torch.randint(0, x0.shape[0], (n,), generator=g)
        return x0[idx.to(x0.device)], _index(cond, idx), _index(uncond, idx)


# --------------------------------------------------------------------------------------------------
# LoRA and pipelines
# --------------------------------------------------------------------------------------------------


def add_lora(model: torch.nn.Module, attr: str, rank: int, alpha: float | None = None,
             extra_trainable: tuple[str, ...] = ()) -> None:
    """Add a peft LoRA (``rank``, ``alpha``) to ``model`` in place: only the LoRA weights and the
    parameters whose names start with one of ``extra_trainable`` stay trainable."""
    from peft import LoraConfig

    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), init_lora_weights=True,
                     target_modules=LORA_TARGETS[attr])
    model.add_adapter(cfg)
    for n, p in model.named_parameters():
        if any(n.startswith(e) for e in extra_trainable):
            p.requires_grad_(True)


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def fused_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` without peft layers (LoRA fused into the base weights when present)."""
    m = copy.deepcopy(model)
    if has_lora(m):
        m.fuse_lora()
        m.unload_lora()
    return m.requires_grad_(False).eval()


def init_student_folder(path: str | os.PathLike, subfolder: str, what: str) -> Path:
    """The model folder that ``init_student=path`` names: ``path/subfolder`` of a pipeline folder, or
    ``path`` itself; ``FileNotFoundError`` when neither has a ``config.json``."""
    path = Path(path)
    folder = path / subfolder if (path / subfolder / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"init_student={str(path)!r} is neither a pipeline folder with a {subfolder}/ nor a "
                                f"{what} folder (no config.json)")
    return folder


def shape_differences(ref: torch.nn.Module, got: torch.nn.Module, skip_prefix: str | None = None) -> list:
    """Up to three ``(name, shape)`` entries in which the state dicts of ``ref`` and ``got`` differ (``got``'s
    keys starting with ``skip_prefix`` left out); empty when the architectures match."""
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in got.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
    return sorted(set(a.items()) ^ set(b.items()))[:3]


def student_pipeline(teacher_pipe, model: torch.nn.Module, scheduler=None):
    """A pipeline of the teacher's class sharing its text encoders/VAE, with ``model`` as denoiser."""
    fam = family_for(teacher_pipe)
    comps = dict(teacher_pipe.components)
    comps[fam.model_attr] = model
    if scheduler is not None:
        comps["scheduler"] = scheduler
    import inspect

    params = inspect.signature(type(teacher_pipe).__init__).parameters
    for k, v in teacher_pipe.config.items():  # non-module init arguments (requires_safety_checker, force_zeros_...)
        if k in params and k not in comps and not k.startswith("_"):
            comps[k] = v
    pipe = type(teacher_pipe)(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class DistillTrainer(Resumable):
    """Base class of the distillation trainers (see the module docstring for the guarantees).

    Subclasses set :attr:`method`, build the student in :meth:`build_student` (a module initialised from
    the teacher), define :meth:`loss`, :meth:`student_scheduler` and :meth:`call_kwargs` (how to call the
    saved student), and may add trainable helper modules to :attr:`aux`.

    Args:
        teacher: the teacher pipeline (frozen; its denoiser is never modified).
        cfg: the method's config.
        out: the run folder (``checkpoint.pt``, ``history.jsonl``, ``pipeline/``, ``lora/``).
        zoo_name: the zoo model the teacher is (enables prompt sampling and zoo evaluation).
        prompts: a prompt list for non-zoo teachers (default: ``cfg.prompts_file``).
        eval_fn: ``eval_fn(student_pipe) -> dict`` replacing the zoo evaluation.
    """

    method: ClassVar[str] = "base"

    def __init__(self, teacher, cfg: DistillConfig, out: str | os.PathLike, zoo_name: str | None = None,
                 prompts: list[str] | None = None, eval_fn: Callable[[Any], dict] | None = None):
        cfg.check()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise NotImplementedError(
                "distill trains in one process; multi-GPU data parallelism is not implemented "
                "(use `accelerate launch --num_processes 1 -m distill...` or plain `python -m distill...`)")
        self.cfg, self.out, self.zoo_name, self.eval_fn = cfg, Path(out), zoo_name, eval_fn
        dev = cfg.device
        self.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else
                                   ("cpu" if dev == "auto" else dev))
        self.teacher = teacher
        teacher.to(self.device)
        teacher.set_progress_bar_config(disable=True)
        msl = cfg.max_sequence_length
        if msl is None and zoo_name is not None:
            from fastgen.zoo import call_kwargs

            msl = call_kwargs(zoo_name).get("max_sequence_length")
        self.family = family_for(teacher, msl)
        self.check_family()
        self.teacher_model = self.family.model.requires_grad_(False).eval()
        self.hw = self._resolve_hw()
        if isinstance(self.family, UNetFamily):
            self.family.hw = self.hw
        self.pool = TeacherPool(self.family, self._prompt_fn(prompts), cfg.pool_size, cfg.pool_refresh,
                                cfg.pool_steps, self._pool_guidance(), cfg.seed, self.hw, chunk=cfg.pool_batch)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.student = self.build_student().to(self.device)
            self.aux = torch.nn.ModuleDict(self.build_aux()).to(self.device)
        self.new_layers = self.new_layer_prefixes()
        if cfg.lora_rank > 0:
            add_lora(self.student, self.family.model_attr, cfg.lora_rank, cfg.lora_alpha, self.new_layers)
        else:
            self.student.requires_grad_(True)
        if cfg.gradient_checkpointing:
            if not getattr(self.student, "_supports_gradient_checkpointing", False):
                raise ValueError(f"{type(self.student).__name__} does not support gradient checkpointing")
            self.student.enable_gradient_checkpointing()
        self.student.train()
        self.params = [p for p in self.student.parameters() if p.requires_grad] + list(self.aux.parameters())
        assert self.params, "nothing to train"
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if (cfg.mixed_precision == "fp16"
                                                                 and self.device.type == "cuda") else None
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    # ---- to be defined by the methods -------------------------------------------------------------

    def check_family(self) -> None:
        """Raise when the method does not fit the teacher's family."""

    def build_student(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_aux(self) -> dict[str, torch.nn.Module]:
        """Extra trainable modules kept in the checkpoint only (e.g. sCM's adaptive weighting)."""
        return {}

    def new_layer_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of layers the student adds to the teacher (trainable under LoRA too)."""
        return ()

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def student_scheduler(self):
        """The scheduler saved with the student."""
        return copy.deepcopy(self.teacher.scheduler)

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments a user passes to the saved pipeline (steps, guidance, ...)."""
        raise NotImplementedError

    def eval_settings(self) -> tuple[int, float]:
        """``(steps, guidance_scale)`` for ``evaluate_pipeline`` (after :meth:`prepare_eval_pipeline`)."""
        kw = self.call_kwargs()
        return int(kw["num_inference_steps"]), float(kw.get("guidance_scale", 1.0))

    def prepare_eval_pipeline(self, pipe) -> None:
        """Adjust an exported pipeline for ``evaluate_pipeline`` (which passes only steps and guidance)."""

    # ---- helpers ----------------------------------------------------------------------------------

    def _resolve_hw(self) -> tuple[int, int]:
        cfg = self.cfg
        if self.zoo_name is not None:
            from fastgen.zoo import DEFAULTS

            d = DEFAULTS[self.zoo_name]
            h, w = d["height"], d["width"]
        else:
            m = self.family.model
            s = int(m.config.sample_size) * int(self.teacher.vae_scale_factor)
            h = w = s
        return int(cfg.height or h), int(cfg.width or w)

    @property
    def teacher_takes_guidance(self) -> bool:
        """The teacher is guidance-distilled (:func:`~distill.models.has_guidance_input`): one call at ``g``
        gives its guided prediction."""
        return has_guidance_input(self.family.model)

    def _pool_guidance(self) -> float:
        if self.cfg.pool_guidance is not None:
            return float(self.cfg.pool_guidance)
        if isinstance(self.family.model, GuidanceSD3Transformer2DModel):
            return 1.0  # a guidance-distilled SD3 guides itself at its default_guidance_scale; CFG would guide twice
        if self.zoo_name is not None:
            from fastgen.zoo import DEFAULTS

            return float(DEFAULTS[self.zoo_name]["guidance_scale"])
        return 5.0

    def _prompt_fn(self, prompts: list[str] | None) -> Callable[[int, int], list[str]]:
        if prompts is None and self.cfg.prompts_file:
            prompts = read_prompts(self.cfg.prompts_file)
        seed = self.cfg.seed
        if prompts is not None:
            plist = list(prompts)

            def from_list(k: int, n: int) -> list[str]:
                g = torch.Generator().manual_seed(seed * 1_000_003 + 99_991 * (k + 1))
                return [plist[i] for i in torch.randint(0, len(plist), (n,), generator=g).tolist()]

            return from_list
        if self.zoo_name is None:
            raise ValueError(f"the teacher ({self.family.describe()}) is not a zoo model: give the training prompts "
                             "(--prompts FILE, one per line; or prompts=[...] in Python)")
        from fastgen.zoo import shapes

        def from_world(k: int, n: int) -> list[str]:
            return shapes.sample_prompts(n, shapes.TRAIN_SEED_START + seed * 1_000_000 + k)

        return from_world

    def autocast(self):
        mp = self.cfg.mixed_precision
        if mp == "no":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        return step_generator(self.cfg.seed, step, stream)

    def randn(self, shape, g: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(self.device)

    def rand(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.rand(n, generator=g).to(self.device)

    # ---- one step --------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def train_step(self) -> float:
        """One optimisation step (warm-up, clipping, EMA); returns the loss (before the update)."""
        cfg = self.cfg
        for gr in self.opt.param_groups:
            gr["lr"] = self.lr_at(self.step)
        self.student.train()
        loss, logs = self.loss(self.step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.method}: non-finite loss {float(loss)} at step {self.step} "
                                     f"({logs}); lower --lr or use --mixed-precision no")
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.update_ema()
        value = float(loss.detach())
        self.history.append({"step": self.step, "loss": value, **logs})
        self.step += 1
        return value

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema_decay
        for e, p in zip(self.ema.parameters(), self.student.parameters()):
            if p.requires_grad:
                e.lerp_(p.detach(), 1.0 - d)

    # ---- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": f"fastgen-distill-{self.method}-v1", "config": asdict(self.cfg), "step": self.step,
            "elapsed": self.elapsed, "student": self.student.state_dict(), "aux": self.aux.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(), "opt": self.opt.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "history": self.history, "evals": self.evals, "extra": self.extra_state(),
        }

    def extra_state(self) -> dict[str, Any]:
        """Method-specific values stored in the checkpoint (checked by :meth:`load_extra_state`)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Check/restore :meth:`extra_state` (raise ``ValueError`` on a mismatch)."""

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        fmt = f"fastgen-distill-{self.method}-v1"
        if sd.get("format") != fmt:
            raise ValueError(f"cannot resume: the checkpoint is {sd.get('format')!r}, this run is {fmt!r}")
        check_same_config(sd["config"], asdict(self.cfg), free=self.cfg.RESUME_FREE)
        self.load_extra_state(sd.get("extra", {}))
        self.student.load_state_dict(sd["student"])
        self.aux.load_state_dict(sd["aux"])
        if self.ema is not None:
            self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        if self.scaler is not None and sd.get("scaler") is not None:
            self.scaler.load_state_dict(sd["scaler"])
        self.step, self.elapsed = int(sd["step"]), float(sd["elapsed"])
        self.history, self.evals = list(sd["history"]), list(sd["evals"])

    @property
    def checkpoint_map_location(self):  # tensors straight to the training device
        return self.device

    # ---- export & evaluation -------------------------------------------------------------------------

    def export_model(self) -> torch.nn.Module:
        """The student to ship: EMA weights when enabled, LoRA fused, eval mode, no grad."""
        return fused_copy(self.ema if self.ema is not None else self.student)

    def export_pipeline(self):
        """A pipeline of the teacher's class with the exported student and :meth:`student_scheduler`."""
        return student_pipeline(self.teacher, self.export_model(), self.student_scheduler())

    def meta(self) -> dict[str, Any]:
        return {"model": self.zoo_name, "distill": {"method": self.method, "step": self.step,
                                                    "config": _jsonable(asdict(self.cfg)),
                                                    "call_kwargs": self.call_kwargs()}}

    def save(self, path: str | os.PathLike | None = None, pipe=None) -> Path:
        """Save the student pipeline (safetensors, atomically) to ``path`` (default ``OUT/pipeline``),
        plus ``OUT/lora`` (the LoRA alone, loadable on the teacher with ``load_lora_weights``) when the
        student is a LoRA that adds no layer."""
        from fastgen.zoo.builders import save_pipeline

        path = Path(path) if path is not None else self.out / "pipeline"
        pipe = pipe if pipe is not None else self.export_pipeline()
        save_pipeline(pipe, path, meta=self.meta())
        if has_lora(self.student) and not self.new_layers:
            self._save_lora(self.out / "lora")
        return path

    def _save_lora(self, path: Path) -> None:
        from peft.utils import get_peft_model_state_dict

        src = self.ema if self.ema is not None else self.student
        layers = get_peft_model_state_dict(src)  # peft key format, which load_lora_weights reads as is
        kw = {f"{self.family.model_attr}_lora_layers": layers}
        tmp = path.with_name(path.name + ".tmp")
        type(self.teacher).save_lora_weights(str(tmp), safe_serialization=True, **kw)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)

    def evaluate(self, pipe=None) -> dict[str, Any]:
        """Score the exported student (zoo teachers: ``evaluate_pipeline``; or ``eval_fn``)."""
        pipe = pipe if pipe is not None else self.export_pipeline()
        if self.eval_fn is not None:
            res = dict(self.eval_fn(pipe))
        elif self.zoo_name is not None and self.cfg.eval_prompts > 0:
            from fastgen.zoo.evaluate import evaluate_pipeline

            steps, guidance = self.eval_settings()
            # evaluate a sibling pipeline (same modules, own scheduler) so that evaluation-only settings
            # never reach the saved folder
            model = getattr(pipe, self.family.model_attr)
            eval_pipe = student_pipeline(self.teacher, model, copy.deepcopy(pipe.scheduler))
            old_g = getattr(model, "default_guidance_scale", None)
            try:
                self.prepare_eval_pipeline(eval_pipe)
                res = evaluate_pipeline(eval_pipe, self.zoo_name, n=self.cfg.eval_prompts, steps=steps,
                                        guidance=guidance)
            finally:
                if old_g is not None:
                    model.default_guidance_scale = old_g
        else:
            return {}
        row = {"step": self.step, **{k: v for k, v in res.items() if not hasattr(v, "shape")}}
        self.evals.append(row)
        self._log_row({"eval": row})
        logger.info("eval step %d: %s", self.step, {k: row[k] for k in list(row)[:8]})
        return row

    def _log_row(self, row: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "history.jsonl", "a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self, steps: int | None = None, save: bool = True, final_eval: bool = True) -> dict[str, Any]:
        """Train until ``steps`` (default ``cfg.steps``) in total; checkpoint every ``ckpt_every``, evaluate
        and save the pipeline every ``eval_every`` and at the end. Returns the last evaluation row."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        total = int(cfg.steps if steps is None else steps)
        self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, initial=min(self.step, total), disable=not cfg.progress, desc=f"distill {self.method}")
        row: dict[str, Any] = {}
        try:
            while self.step < total:
                t0 = time.time()
                loss = self.train_step()
                self.elapsed += time.time() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                if cfg.log_every and self.step % cfg.log_every == 0:
                    recent = self.history[-cfg.log_every:]
                    keys = [k for k in recent[-1] if k != "step" and all(k in h for h in recent)]
                    self._log_row({"step": self.step, **{k: sum(h[k] for h in recent) / len(recent) for k in keys},
                                   "minutes": round(self.elapsed / 60, 2)})
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < total:
                    pipe = self.export_pipeline()
                    row = self.evaluate(pipe)
                    if save:
                        self.save(pipe=pipe)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        self.save_checkpoint()
        pipe = self.export_pipeline()
        if final_eval:
            row = self.evaluate(pipe) or row
        if save:
            self.save(pipe=pipe)
        return row


def _jsonable(d: Any) -> Any:
    """Tuples -> lists recursively (configs compare equal after a torch.save round trip)."""
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d
