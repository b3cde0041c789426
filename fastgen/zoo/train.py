"""Recipes that train the zoo's default text-to-image pipelines on the shapes world, from scratch, on a CPU.

Run (in the background; one torch thread unless ``--threads`` says otherwise)::

    fastgen train zoo shapes-mmdit --out runs/shapes-mmdit [--minutes 100] [--steps N] [--batch 64] [--resume]
    fastgen train zoo shapes-unet  --out runs/shapes-unet  ...

What is trained (both 32x32 px, :mod:`fastgen.zoo.shapes` images drawn on the fly with seeds >=
:data:`~fastgen.zoo.shapes.TRAIN_SEED_START`, so the held-out evaluation images are never seen):

``shapes-mmdit``
    ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` (patch 2 -> 256 image tokens, adaLN-zero
    initialisation, RMS qk-norm) trained with the rectified-flow loss (``x_t = (1 - t) x_0 + t eps``,
    target ``eps - x_0``, logit-normal ``t``) and sampled with ``FlowMatchEulerDiscreteScheduler``; two
    small ``CLIPTextModelWithProjection`` text encoders trained jointly; ``text_encoder_3`` is a stub whose
    output is exactly zero (:func:`~fastgen.zoo.builders.zero_t5`): the same as ``text_encoder_3=None``, but
    the folder loads with a plain ``DiffusionPipeline.from_pretrained(path)``.
``shapes-unet``
    ``StableDiffusionPipeline``: a ``UNet2DConditionModel`` trained with the DDPM epsilon loss (linear
    betas, the pixel-space schedule), sampled with ``DDIMScheduler``; one small ``CLIPTextModel``.

Both use the same tokenizer (:func:`~fastgen.zoo.builders.word_tokenizer`, a byte-level BPE ``CLIPTokenizer``
over the world's words, 16 tokens long) and the same fixed **pixel-space** ``AutoencoderKL``
(:func:`~fastgen.zoo.builders.identity_vae`): one block, no downsampling, with weights set by hand so that
``encode`` is the per-channel standardisation of the pixels and ``decode`` its exact inverse (error < 1e-4).
Nothing of the VAE is trained. Prompts are dropped to ``""`` with probability ``cfg_dropout`` (10 %) so
classifier-free guidance works.

The 256 all-zero "T5" tokens that ``StableDiffusion3Pipeline`` appends when ``text_encoder_3`` is None
(or the zero outputs of the T5 stub) are identical all through the transformer, so training (and the periodic evaluation) uses one such
token whose attention logit is raised by ``log(256)``
(:class:`~fastgen.zoo.attention.CollapsedZerosJointAttnProcessor`): mathematically the same model as the
pipeline's default call, at half the cost.

Checkpoints (``OUT/checkpoint.pt``: weights, EMA, optimizer, step, elapsed time, eval history) are
written atomically every ``ckpt_minutes``; the random draws of step ``k`` depend only on ``(seed, k)``,
so ``--resume`` continues exactly as an uninterrupted run would. Every ``eval_minutes`` (and at the end)
the EMA weights are put in a pipeline, scored on ``eval_prompts`` held-out prompts
(``shapes.sample_prompts(n, EVAL_SEED)``) with :func:`fastgen.zoo.evaluate.score` at the model's default
steps and guidance, and saved to ``OUT/pipeline`` (safetensors; ``OUT/best_pipeline`` keeps the best
score, ``OUT/history.jsonl`` every evaluation). ``--export DST`` copies ``OUT/best_pipeline`` to ``DST``
(e.g. ``fastgen/zoo/weights/shapes-mmdit``).

Layout: this module holds the training loop (:class:`TrainConfig`, :class:`Trainer`, the differentiable text
encoding :func:`encode_sd3`/:func:`encode_sd`) and its command line (:func:`main`); the architectures, the
tokenizer, the VAE and the pipeline folders are in :mod:`fastgen.zoo.builders`, the evaluation
(:func:`~fastgen.zoo.evaluate.evaluate_pipeline`) in :mod:`fastgen.zoo.evaluate`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastgen.utils.commands import CommandParser
from fastgen.utils.io import Resumable, check_same_config, swap_in_dir
from fastgen.utils.logging import get_logger, log_to_stderr_with_time
from fastgen.zoo import MODELS, shapes
from fastgen.zoo.builders import ARCH, build_pipeline, check_model, export_pipeline, save_pipeline, set_collapsed_zeros
from fastgen.zoo.evaluate import evaluate_pipeline

__all__ = ["TrainConfig", "Trainer", "encode_sd3", "encode_sd", "cooldown_factor", "main"]

logger = get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# Text encoding exactly as the pipelines do it (differentiable)
# --------------------------------------------------------------------------------------------------


def _ids(tok, prompts: list[str]) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode_sd3(pipe, prompts: list[str], zero_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled)`` as ``StableDiffusion3Pipeline.encode_prompt`` builds them (clip_skip None,
    no T5), with ``zero_tokens`` all-zero T5 tokens; gradients flow into both text encoders."""
    hs, pooled = [], []
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = te(_ids(tok, prompts).to(te.device), output_hidden_states=True)
        pooled.append(out[0])
        hs.append(out.hidden_states[-2])
    clip = torch.cat(hs, -1)
    dim = pipe.transformer.config.joint_attention_dim
    clip = F.pad(clip, (0, dim - clip.shape[-1]))
    zeros = clip.new_zeros(clip.shape[0], zero_tokens, dim)
    return torch.cat([clip, zeros], 1), torch.cat(pooled, -1)


def encode_sd(pipe, prompts: list[str]) -> torch.Tensor:
    """``prompt_embeds`` as ``StableDiffusionPipeline.encode_prompt`` builds them (no attention mask)."""
    return pipe.text_encoder(_ids(pipe.tokenizer, prompts).to(pipe.text_encoder.device))[0]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint; ``--resume`` checks it)."""

    model: str = "shapes-mmdit"
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    t_sampling: str = "logit-normal"  # or "uniform" (flow matching only)
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weight (UNet epsilon loss only; 0 = plain MSE)
    seed: int = 0
    size: int = 32
    arch: dict[str, Any] = field(default_factory=dict)


class Trainer(Resumable):
    """One training run of a zoo model (see the module docstring).

    Args:
        cfg: the run's :class:`TrainConfig`.
        out: output folder (``checkpoint.pt``, ``pipeline/``, ``best_pipeline/``, ``history.jsonl``).
    """

    def __init__(self, cfg: TrainConfig, out: str | os.PathLike):
        check_model(cfg.model)
        self.cfg = cfg
        self.out = Path(out)
        self.arch = {**ARCH[cfg.model], **cfg.arch}
        self.pipe = build_pipeline(cfg.model, self.arch, seed=cfg.seed, size=cfg.size)
        self.is_sd3 = cfg.model == "shapes-mmdit"
        p = self.pipe
        names = ("transformer", "text_encoder", "text_encoder_2") if self.is_sd3 else ("unet", "text_encoder")
        self.modules = torch.nn.ModuleDict({k: getattr(p, k) for k in names})
        self.modules.train()
        self.ema = copy.deepcopy(self.modules).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.modules.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        if self.is_sd3:
            set_collapsed_zeros(p.transformer, True)
        else:
            from diffusers import DDPMScheduler

            train_sched = DDPMScheduler.from_config(p.scheduler.config)
            self.alphas_cumprod = train_sched.alphas_cumprod.float()
        self.step = 0
        self.elapsed = 0.0
        self.lr_scale = 1.0  # set by run()'s cooldown
        self.history: list[dict[str, Any]] = []
        self.best = -1.0

    # ---- one optimisation step --------------------------------------------------------------------

    def batch(self, step: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
        """The data and the random generator of ``step`` (deterministic from ``(seed, step)``)."""
        cfg = self.cfg
        imgs, prompts = shapes.sample(cfg.batch, shapes.TRAIN_SEED_START + cfg.seed * 10**7 + step, cfg.size)
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + step)
        drop = torch.rand(len(prompts), generator=g) < cfg.cfg_dropout
        prompts = ["" if d else pr for pr, d in zip(prompts, drop.tolist())]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            lat = self.pipe.vae.encode(x).latent_dist.mode()
            sf, sh = self.pipe.vae.config.scaling_factor, self.pipe.vae.config.shift_factor or 0.0
            lat = (lat - sh) * sf if self.is_sd3 else lat * sf
        return lat, prompts, g

    def loss(self, step: int) -> torch.Tensor:
        x0, prompts, g = self.batch(step)
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=g)
        if self.is_sd3:
            if self.cfg.t_sampling == "logit-normal":
                t = torch.sigmoid(torch.randn(b, generator=g))
            elif self.cfg.t_sampling == "uniform":
                t = torch.rand(b, generator=g)
            else:
                raise ValueError(f"t_sampling must be 'logit-normal' or 'uniform', got {self.cfg.t_sampling!r}")
            tt = t.view(-1, 1, 1, 1)
            xt = (1 - tt) * x0 + tt * noise
            ctx, pooled = encode_sd3(self.pipe, prompts, zero_tokens=1)
            pred = self.pipe.transformer(xt, encoder_hidden_states=ctx, pooled_projections=pooled,
                                         timestep=t * 1000.0, return_dict=False)[0]
            return F.mse_loss(pred, noise - x0)
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=g)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        ctx = encode_sd(self.pipe, prompts)
        pred = self.pipe.unet(xt, t, encoder_hidden_states=ctx, return_dict=False)[0]
        if not self.cfg.snr_gamma:
            return F.mse_loss(pred, noise)
        # Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556), epsilon form: weight min(SNR, gamma) / SNR
        snr = (ab / (1 - ab)).view(-1)
        w = torch.clamp(snr, max=self.cfg.snr_gamma) / snr
        return (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    def train_step(self) -> float:
        """Run one optimisation step (lr warm-up, grad clipping, EMA update); returns the loss."""
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup)) * self.lr_scale
        for gr in self.opt.param_groups:
            gr["lr"] = lr
        loss = self.loss(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.modules.parameters(), cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.modules.parameters()):
                e.lerp_(p, 1.0 - decay)
        self.step += 1
        return float(loss.detach())

    # ---- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "fastgen-zoo-train-v1", "config": asdict(self.cfg), "step": self.step, "elapsed": self.elapsed,
            "model": self.modules.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "history": self.history, "best": self.best, "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        # fields added to TrainConfig after the checkpoint was written take their defaults
        check_same_config(sd["config"], asdict(self.cfg), defaults=asdict(TrainConfig()))
        self.modules.load_state_dict(sd["model"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        self.step, self.elapsed = int(sd["step"]), float(sd["elapsed"])
        self.history, self.best = list(sd["history"]), float(sd["best"])
        torch.set_rng_state(sd["torch_rng"])

    def resumed_message(self) -> str:
        return f"at step {self.step} ({self.elapsed / 60:.1f} min trained)"

    def init_from(self, path: str | os.PathLike) -> None:
        """Start from the weights of a saved zoo pipeline folder (e.g. the shipped ``fastgen/zoo/weights/<name>``
        or another run's ``best_pipeline``) instead of a checkpoint: weights and EMA are set to the folder's,
        the optimizer starts fresh, and the step and elapsed-time counters continue from the folder's
        ``fastgen_zoo.json`` (so the data stream continues with unseen seeds). Use it when the run's
        ``checkpoint.pt`` is gone; prefer ``--resume`` when it exists (exact continuation).
        """
        from fastgen import zoo

        path = Path(path)
        meta_file = path / "fastgen_zoo.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        if meta.get("model", self.cfg.model) != self.cfg.model:
            raise ValueError(f"--init-from {path}: that folder holds {meta['model']!r}, this run trains {self.cfg.model!r}")
        if meta.get("arch") is not None and meta["arch"] != json.loads(json.dumps(self.arch, default=str)):
            raise ValueError(f"--init-from {path}: architecture {meta['arch']} differs from this run's {self.arch}; "
                             f"pass the same --arch overrides")
        pipe = zoo.load_pipeline(path)
        for k, m in self.modules.items():
            src = getattr(pipe, k).state_dict()
            m.load_state_dict(src)
            self.ema[k].load_state_dict(src)
        ev = meta.get("eval", {})
        self.step = int(ev.get("step", 0))
        self.elapsed = float(ev.get("minutes", 0.0)) * 60.0
        logger.info("initialised from %s (step %d, %.1f min trained before)", path, self.step, self.elapsed / 60)

    # ---- pipelines ------------------------------------------------------------------------------------

    def ema_pipeline(self):
        """A pipeline holding copies of the EMA weights (default attention processors, eval mode)."""
        pipe = build_pipeline(self.cfg.model, self.arch, seed=self.cfg.seed, size=self.cfg.size)
        for k, m in self.ema.items():
            getattr(pipe, k).load_state_dict(m.state_dict())
            getattr(pipe, k).eval()
        return pipe

    def evaluate_and_save(self, n: int = 100) -> dict[str, Any]:
        """Score the EMA pipeline on ``n`` held-out prompts, save it to ``OUT/pipeline`` (and
        ``OUT/best_pipeline`` when it is the best so far), append to ``OUT/history.jsonl``."""
        pipe = self.ema_pipeline()
        res = evaluate_pipeline(pipe, self.cfg.model, n=n) if n > 0 else {"overall": float("nan")}
        row = {"step": self.step, "minutes": round(self.elapsed / 60, 2), **{k: v for k, v in res.items()}}
        self.history.append(row)
        save_pipeline(pipe, self.out / "pipeline", meta={"model": self.cfg.model, "eval": row,
                                                          "config": asdict(self.cfg), "arch": self.arch})
        overall = res["overall"]
        if n > 0 and overall == overall and overall > self.best:
            self.best = float(overall)
            _replace_dir(self.out / "pipeline", self.out / "best_pipeline")
        with open(self.out / "history.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        crit = " ".join(f"{k}={res[k]:.3f}" for k in ("color", "shape", "count", "position", "single", "counting",
                                                      "relation") if k in res)
        logger.info("eval step %d (%.1f min): overall=%.3f %s [%ss]", self.step, self.elapsed / 60, overall, crit,
                    res.get("seconds"))
        return row

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self, minutes: float | None = None, steps: int | None = None, ckpt_minutes: float = 5.0,
            eval_minutes: float = 15.0, eval_prompts: int = 100, log_every: int = 20,
            final_eval: bool = True, cooldown: float = 0.0) -> dict[str, Any]:
        """Train until ``minutes`` of training time (in total, resumed time included) or ``steps`` steps.

        ``cooldown`` decays the learning rate linearly to 5% of ``lr`` over the last that fraction of the
        budget (a warmup-stable-decay schedule: the loss drops markedly in the decay phase). Progress is the
        larger of ``elapsed / minutes`` and ``step / steps``; with a ``minutes`` budget it follows elapsed
        training time, so a resumed run then matches an uninterrupted one only up to step timing (with a
        ``steps`` budget alone it is exact).

        Returns:
            the last evaluation row (``{}`` when ``final_eval`` is False).
        """
        if minutes is None and steps is None:
            raise ValueError("give minutes or steps (or both)")
        self.out.mkdir(parents=True, exist_ok=True)
        last_ckpt = last_eval = self.elapsed
        losses: list[float] = []
        t_log = time.time()
        stop: list[int] = []
        restore = _on_stop_signals(lambda signum, frame: stop.append(signum))
        try:
            while not stop:
                if steps is not None and self.step >= steps:
                    break
                if minutes is not None and self.elapsed >= minutes * 60:
                    break
                self.lr_scale = cooldown_factor(_progress(self.elapsed / 60, minutes, self.step, steps), cooldown)
                t0 = time.time()
                losses.append(self.train_step())
                self.elapsed += time.time() - t0
                if self.step % log_every == 0:
                    dt = time.time() - t_log
                    logger.info("step %d  loss %.4f  %.2f s/step  %.1f min", self.step, float(np.mean(losses)),
                                dt / len(losses), self.elapsed / 60)
                    losses, t_log = [], time.time()
                if eval_minutes and self.elapsed - last_eval >= eval_minutes * 60:
                    self.evaluate_and_save(eval_prompts)
                    last_eval = self.elapsed
                    self.save_checkpoint()
                    last_ckpt = self.elapsed
                if ckpt_minutes and self.elapsed - last_ckpt >= ckpt_minutes * 60:
                    self.save_checkpoint()
                    last_ckpt = self.elapsed
        finally:
            restore()
        if stop:  # SIGTERM/SIGINT: keep everything up to the last finished step, skip the final evaluation
            self.save_checkpoint()
            logger.warning("stopped by signal %d at step %d; checkpoint saved, resume with --resume", stop[0], self.step)
            return {}
        row = self.evaluate_and_save(eval_prompts) if final_eval else {}
        self.save_checkpoint()
        return row


def _progress(elapsed_minutes: float, minutes: float | None, step: int, steps: int | None) -> float:
    """Fraction of the training budget used: the larger of the time and step fractions."""
    fr = [elapsed_minutes / minutes if minutes else 0.0, step / steps if steps else 0.0]
    return max(fr)


def cooldown_factor(progress: float, cooldown: float, floor: float = 0.05) -> float:
    """Learning-rate factor of the linear cooldown: 1 until ``1 - cooldown`` of the budget, then down to ``floor``."""
    if cooldown <= 0:
        return 1.0
    return float(min(1.0, max(floor, (1.0 - progress) / cooldown)))


def _on_stop_signals(handler) -> Any:
    """Route SIGTERM/SIGINT to ``handler`` (main thread only); returns a function that restores the old handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


def _replace_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    swap_in_dir(tmp, dst)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse_arch(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--arch expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = json.loads(v) if v[:1] in "[{0123456789-." or v in ("true", "false") else v
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def main(argv: list[str] | None = None) -> int:
    """``fastgen train zoo MODEL --out DIR [...]`` (see ``--help``)."""
    ap = CommandParser(prog="fastgen train zoo", description=__doc__.split("\n\n")[0],
                       example="fastgen train zoo shapes-mmdit --out runs/shapes-mmdit --minutes 100\n"
                               "fastgen train zoo shapes-mmdit --out runs/shapes-mmdit --export fastgen/zoo/weights/"
                               "shapes-mmdit")
    ap.add_argument("model", choices=[m for m in MODELS if m in ARCH])
    ap.add_argument("--out", required=True, help="run folder (checkpoint.pt, pipeline/, best_pipeline/, history)")
    ap.add_argument("--minutes", type=float, default=None, help="training time budget in total (default 170)")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many optimisation steps in total")
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    ap.add_argument("--cfg-dropout", type=float, default=TrainConfig.cfg_dropout)
    ap.add_argument("--t-sampling", default=TrainConfig.t_sampling, choices=("logit-normal", "uniform"))
    ap.add_argument("--snr-gamma", type=float, default=TrainConfig.snr_gamma,
                    help="Min-SNR-gamma weight of the UNet epsilon loss (0: plain MSE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", nargs="*", default=[], help="architecture overrides key=value (see ARCH)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--init-from", metavar="FOLDER", default=None,
                    help="start from a saved zoo pipeline's weights (e.g. the shipped one) when no checkpoint exists")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the cores are shared)")
    ap.add_argument("--cooldown", type=float, default=0.25,
                    help="decay the lr linearly to 5%% over the last this fraction of the budget (0: constant lr)")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--eval-minutes", type=float, default=15.0)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--export", metavar="DST", default=None,
                    help="do not train: copy OUT/best_pipeline to DST (e.g. fastgen/zoo/weights/MODEL)")
    ap.add_argument("--fp16", action="store_true", help="with --export: store float16 weights")
    ap.add_argument("--final", action="store_true",
                    help="with --export: copy OUT/pipeline (the weights at the end of the run) instead of "
                         "OUT/best_pipeline (the best periodic evaluation, which is picked on the held-out prompts)")
    args = ap.parse_args(argv)

    log_to_stderr_with_time()
    torch.set_num_threads(max(1, args.threads))

    if args.export:
        src = Path(args.out) / ("pipeline" if args.final else "best_pipeline")
        dst = export_pipeline(src, args.export, half=args.fp16)
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        logger.info("exported %s -> %s (%.1f MB)", src, dst, size / 1e6)
        return 0

    cfg = TrainConfig(model=args.model, batch=args.batch, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                      cfg_dropout=args.cfg_dropout, t_sampling=args.t_sampling, snr_gamma=args.snr_gamma, seed=args.seed,
                      arch=_parse_arch(args.arch))
    tr = Trainer(cfg, args.out)
    if args.resume and tr.resume():
        pass
    elif args.init_from:
        if (Path(args.out) / "checkpoint.pt").exists():
            raise SystemExit(f"{args.out}/checkpoint.pt exists: use --resume (exact) instead of --init-from")
        tr.init_from(args.init_from)
    elif args.resume:
        logger.info("no checkpoint in %s: starting from scratch", args.out)
    elif (Path(args.out) / "checkpoint.pt").exists():
        raise SystemExit(f"{args.out}/checkpoint.pt exists: pass --resume to continue it or choose another --out")
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in tr.modules.items()}
    logger.info("training %s: %s params, config %s", args.model, n_params, asdict(cfg))
    minutes = args.minutes if (args.minutes is not None or args.steps is not None) else 170.0
    row = tr.run(minutes=minutes, steps=args.steps, ckpt_minutes=args.ckpt_minutes, eval_minutes=args.eval_minutes,
                 eval_prompts=args.eval_prompts, cooldown=args.cooldown)
    if row:
        logger.info("done: step %d, %.1f min, overall %.3f; pipeline in %s", tr.step, tr.elapsed / 60,
                    row.get("overall", float("nan")), Path(args.out) / "pipeline")
    return 0
