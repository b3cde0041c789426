"""Train a VAR from scratch: first the multi-scale VQ-VAE, then the next-scale transformer.

Run (in the background; one torch thread unless ``--threads`` says otherwise; also works under
``accelerate launch -m fastgen.ar.train ...`` with one process)::

    fastgen train var vae --out runs/digits-vae [--data digits|IMAGE_DIR] [--steps N] [--minutes M] [--resume]
    fastgen train var var --vae runs/digits-vae --out runs/digits-var [--steps N] [--arch depth=4 ...] [--resume]
    fastgen train var export --out runs/digits-var --to fastgen/zoo/weights/digits-var [--refiner runs/digits-var-small]

The shipped ``digits-var`` (32.7 min of training on one shared CPU core, ``nice -n 10``, one thread)::

    fastgen train var vae --out runs/digits-vae --steps 1400 --eval-minutes 3            #  8.6 min
    fastgen train var var --vae runs/digits-vae --out runs/digits-var --steps 2200 --eval-minutes 8   # 17.1 min
    fastgen train var var --vae runs/digits-vae --out runs/digits-var-small --steps 2000 --stop-at 1495 \
        --eval-minutes 0 --arch depth=2 embed_dim=64 num_heads=2                                  #  7.0 min (CoDe refiner)
    fastgen train var export --out runs/digits-var --source pipeline --refiner runs/digits-var-small \
        --to fastgen/zoo/weights/digits-var

Data (``--data``): ``digits`` is scikit-learn's bundled handwritten digits (:mod:`fastgen.zoo.digits`: 8x8 grey
upsampled to 32 px, the fixed ``"train"`` split only; the ``"heldout"`` split is kept for scoring), or a
folder of images (``IMAGE_DIR/<class name>/*.png|jpg`` gives one class per sub-folder in sorted order;
images directly in ``IMAGE_DIR`` are one class), resized to ``--size`` pixels.

Stage ``vae`` (:class:`VAETrainer`): reconstruction MSE + the quantiser's VQ loss (codebook term and
``beta``-weighted commitment term at every scale, straight-through gradients; no perceptual or GAN loss).
The codebook is initialised from the first batch's residuals, and codes unused for a while (their
``ema_vocab_hit_SV`` usage below ``restart_below``) are restarted on random residual vectors of the batch
every ``restart_every`` steps during the first ``restart_until`` of the run, the usual cure for dead codes.

Stage ``var`` (:class:`VARTrainer`): the VQ-VAE is frozen and every training image is tokenised once;
the transformer is trained with teacher forcing under the block-causal mask (or the block-diagonal one of
HMAR with ``--arch markov=true``), cross-entropy over all ``L`` tokens, labels replaced by the null class
with probability ``cond_drop`` (for classifier-free guidance). AdamW, linear warm-up, cosine decay to
``total_steps`` (stored in the config, so resuming keeps the schedule), EMA of the weights.

Both stages write ``OUT/checkpoint.pt`` atomically (tmp + ``os.replace``) every ``--ckpt-minutes`` and on
SIGTERM/SIGINT; every random draw of step ``k`` is seeded by ``(seed, k)``, so ``--resume`` continues
exactly as an uninterrupted run would. Every ``--eval-minutes`` and at the end a row goes to
``OUT/history.jsonl`` (VAE: held-out reconstruction error, code usage, digit accuracy of the
reconstructions; VAR: held-out loss and, on digits, the :func:`fastgen.zoo.digits.score` of generated
samples) and the EMA model is saved (``OUT/vae`` or ``OUT/pipeline``; ``OUT/best_pipeline`` keeps the best
digit accuracy).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastgen.utils.commands import CommandParser
from fastgen.utils.io import Resumable, check_same_config
from fastgen.utils.logging import get_logger, log_to_stderr_with_time

from .checkpoints import load_module
from .var import VAR, VARConfig
from .vqvae import VQVAE, VQVAEConfig

logger = get_logger(__name__)

__all__ = ["ImageData", "load_data", "VAETrainConfig", "VARTrainConfig", "VAETrainer", "VARTrainer",
           "DIGITS_VAE_ARCH", "DIGITS_VAR_ARCH", "save_module", "load_module", "main"]

#: The digits-var tokenizer: 32 px -> 8x8 latent (4x down), 6 scales, 256 codes of dimension 8.
DIGITS_VAE_ARCH: dict[str, Any] = dict(vocab_size=256, z_channels=8, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                                       using_sa=False, using_mid_sa=False, norm_groups=8,
                                       patch_nums=(1, 2, 3, 4, 6, 8))
#: The digits-var transformer (1.27 M parameters).
DIGITS_VAR_ARCH: dict[str, Any] = dict(depth=4, embed_dim=128, num_heads=4, num_classes=10)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """Training images ``N x 3 x S x S`` in ``[-1, 1]`` and their labels (``N``, long)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


def load_data(spec: str, size: int = 32, split: str = "train") -> ImageData:
    """``"digits"`` (split ``"train"`` or ``"heldout"``) or an image folder (see the module docstring)."""
    if spec == "digits":
        from fastgen.zoo import digits

        x, y = digits.load(split)
        t = torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1).contiguous()
        if t.shape[-1] != size:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        return ImageData(t * 2 - 1, torch.from_numpy(y), 10, [str(i) for i in range(10)])
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {spec!r} is neither 'digits' nor an image folder")
    from PIL import Image

    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    groups = [(d.name, sorted(p for p in d.rglob("*") if p.suffix.lower() in exts)) for d in subdirs]
    groups = [(n, ps) for n, ps in groups if ps]
    if not groups:
        groups = [(root.name, sorted(p for p in root.iterdir() if p.suffix.lower() in exts))]
    if not groups[0][1]:
        raise FileNotFoundError(f"no images ({', '.join(sorted(exts))}) found in {root}")
    ims, labels = [], []
    for c, (_, paths) in enumerate(groups):
        for p in paths:
            im = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
            ims.append(np.asarray(im, dtype=np.float32) / 255.0)
            labels.append(c)
    t = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
    return ImageData(t * 2 - 1, torch.tensor(labels), len(groups), [n for n, _ in groups])


# --------------------------------------------------------------------------------------------------
# Saving single modules (the VARPipeline component layout: config.json + model.safetensors)
# --------------------------------------------------------------------------------------------------


def save_module(module: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` of a :class:`VQVAE` or :class:`VAR`
    (atomically: a tmp folder then ``os.replace``)."""
    from safetensors.torch import save_file

    from .pipeline import NOT_SAVED

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()
             if k.rsplit(".", 1)[-1] not in NOT_SAVED}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({"_class_name": type(module).__name__, **module.config.to_dict()},
                                                indent=2))
    _swap_dir(tmp, folder)
    return folder


def _swap_dir(tmp: Path, dst: Path) -> None:
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old)


def _copy_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    _swap_dir(tmp, dst)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@dataclass
class _Common:
    data: str = "digits"
    size: int = 32
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    total_steps: int = 2000
    min_lr_ratio: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ema_decay: float = 0.995
    seed: int = 0
    device: str = "cpu"
    arch: dict[str, Any] = field(default_factory=dict)
    limit: int = 0  # use only the first N training (and held-out evaluation) images; 0 = all (smoke tests)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class VAETrainConfig(_Common):
    """VQ-VAE stage. ``arch`` overrides :data:`DIGITS_VAE_ARCH` (any :class:`VQVAEConfig` field).

    Attributes (besides the optimiser's): ``restart_every`` (steps between dead-code restarts, 0 = never),
    ``restart_below`` (usage threshold: summed ``ema_vocab_hit_SV`` of a code), ``restart_until`` (fraction
    of ``total_steps`` after which codes are no longer restarted)."""

    stage: str = "vae"
    lr: float = 2e-3
    total_steps: int = 1200
    weight_decay: float = 0.0
    restart_every: int = 50
    restart_below: float = 0.03
    restart_until: float = 0.7


@dataclass
class VARTrainConfig(_Common):
    """VAR stage. ``arch`` overrides :data:`DIGITS_VAR_ARCH` (any :class:`VARConfig` field; ``patch_nums``,
    ``vocab_size`` and ``Cvae`` always come from the VAE). ``vae`` is the VAE run folder (``vae/`` inside)
    or a saved VQVAE folder. ``cond_drop``: label dropout for CFG. ``eval_*``: sampling settings of the
    periodic evaluation."""

    stage: str = "var"
    vae: str = ""
    lr: float = 1e-3
    weight_decay: float = 0.05
    cond_drop: float = 0.1
    label_smoothing: float = 0.0
    eval_cfg: float = 2.0
    eval_top_k: int = 0
    eval_top_p: float = 0.0
    eval_n: int = 200
    mask_loss_weight: float = 1.0


# --------------------------------------------------------------------------------------------------
# The common loop
# --------------------------------------------------------------------------------------------------


class _Trainer(Resumable):
    cfg: _Common
    model: torch.nn.Module

    def __init__(self, cfg: _Common, out: str | os.PathLike):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise NotImplementedError(
                "fastgen.ar.train trains in one process; multi-GPU data parallelism is not implemented "
                "(use `accelerate launch --num_processes 1 -m fastgen.ar.train ...` or plain `fastgen train var ...`)")
        self.cfg, self.out = cfg, Path(out)
        dev = cfg.device
        self.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else
                                   ("cpu" if dev == "auto" else dev))
        self.data = self._limit(load_data(cfg.data, cfg.size, "train"))
        self.step, self.elapsed = 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.best = -math.inf

    def _limit(self, data: "ImageData") -> "ImageData":
        n = self.cfg.limit
        if n and n < len(data.labels):
            return ImageData(data.images[:n], data.labels[:n], data.num_classes, data.class_names)
        return data

    # hooks of the subclasses
    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate_and_save(self) -> dict[str, Any]:
        raise NotImplementedError

    def _setup_optim(self) -> None:
        self.model.train()
        import copy

        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "embed" in n or "pos_" in n or "scale_mul" in n else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=self.cfg.lr, betas=tuple(self.cfg.betas))

    def _indices(self, step: int) -> tuple[torch.Tensor, torch.Generator]:
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + step)
        idx = torch.randint(0, len(self.data.labels), (self.cfg.batch,), generator=g)
        return idx, g

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        torch.manual_seed(int(cfg.seed) * 7_919 + self.step)  # drop-path etc.: a function of (seed, step)
        lr = cfg.lr_at(self.step)
        for gr in self.opt.param_groups:
            gr["lr"] = lr
        loss, logs = self.loss(self.step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {self.step}; lower --lr or check the data")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.after_step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)
        self.step += 1
        return {"loss": float(loss.detach()), "lr": lr, **logs}

    def after_step(self) -> None:
        pass

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": f"fastgen-ar-train-{self.cfg.stage}-v1", "config": asdict(self.cfg), "step": self.step,
                "elapsed": self.elapsed, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "history": self.history, "best": self.best}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        check_same_config(sd["config"], asdict(self.cfg))
        self.model.load_state_dict(sd["model"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        self.step, self.elapsed = int(sd["step"]), float(sd["elapsed"])
        self.history, self.best = list(sd["history"]), float(sd["best"])

    def resumed_message(self) -> str:
        return f"at step {self.step} ({self.elapsed / 60:.1f} min trained)"

    def _log_eval(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "history.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # ---- loop -------------------------------------------------------------------------------------------
    def run(self, minutes: float | None = None, steps: int | None = None, ckpt_minutes: float = 5.0,
            eval_minutes: float = 10.0, log_every: int = 50, final_eval: bool = True,
            progress: bool = True) -> dict[str, Any]:
        """Train until ``steps`` (default ``total_steps``) or ``minutes`` of training time in total."""
        from tqdm.auto import tqdm

        steps = self.cfg.total_steps if steps is None else steps
        self.out.mkdir(parents=True, exist_ok=True)
        last_ckpt = last_eval = self.elapsed
        stop: list[int] = []
        restore = _on_stop_signals(lambda signum, frame: stop.append(signum))
        bar = tqdm(total=steps, initial=min(self.step, steps), desc=f"{self.cfg.stage} training",
                   disable=not progress, mininterval=30.0, file=sys.stderr)
        acc: dict[str, list[float]] = {}
        try:
            while not stop and self.step < steps:
                if minutes is not None and self.elapsed >= minutes * 60:
                    break
                t0 = time.time()
                logs = self.train_step()
                self.elapsed += time.time() - t0
                bar.update(1)
                for k, v in logs.items():
                    acc.setdefault(k, []).append(v)
                if self.step % log_every == 0:
                    msg = "  ".join(f"{k} {np.mean(v):.4g}" for k, v in acc.items())
                    logger.info("step %d  %s  %.1f min", self.step, msg, self.elapsed / 60)
                    bar.set_postfix(loss=f"{np.mean(acc['loss']):.4f}")
                    acc = {}
                if eval_minutes and self.elapsed - last_eval >= eval_minutes * 60:
                    self.evaluate_and_save()
                    last_eval = self.elapsed
                    self.save_checkpoint()
                    last_ckpt = self.elapsed
                if ckpt_minutes and self.elapsed - last_ckpt >= ckpt_minutes * 60:
                    self.save_checkpoint()
                    last_ckpt = self.elapsed
        finally:
            bar.close()
            restore()
        if stop:
            self.save_checkpoint()
            logger.warning("stopped by signal %d at step %d; checkpoint saved, resume with --resume", stop[0], self.step)
            return {}
        row = self.evaluate_and_save() if final_eval else {}
        self.save_checkpoint()
        return row


def _on_stop_signals(handler) -> Any:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


# --------------------------------------------------------------------------------------------------
# Stage 1: the VQ-VAE
# --------------------------------------------------------------------------------------------------


def _residual_rows(quant, f_BChw: torch.Tensor) -> list[torch.Tensor]:
    """The vectors the quantiser matches at every scale (``N_k x Cvae`` each), with the current codebook."""
    pns, K = quant.patch_nums, len(quant.patch_nums)
    f_rest = f_BChw.detach().float().clone()
    B, C, H, _ = f_rest.shape
    rows = []
    for si, pn in enumerate(pns):
        r = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != K - 1 else f_rest
        z = r.permute(0, 2, 3, 1).reshape(-1, C)
        rows.append(z)
        idx = quant.nearest_code(z)
        h = quant._upsampled_phi(quant._embed_map(idx.view(B, pn * pn), pn), si, K, H)
        f_rest = f_rest - h
    return rows


class VAETrainer(_Trainer):
    """Trains the multi-scale VQ-VAE (see the module docstring)."""

    def __init__(self, cfg: VAETrainConfig, out: str | os.PathLike):
        super().__init__(cfg, out)
        arch = {**DIGITS_VAE_ARCH, **cfg.arch}
        self.vae_config = VQVAEConfig(**arch)
        if self.vae_config.image_size != cfg.size:
            raise ValueError(f"the VQ-VAE maps {self.vae_config.image_size} px images (last scale "
                             f"{self.vae_config.patch_nums[-1]} x {self.vae_config.downsample}x down), data is {cfg.size} px")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = VQVAE(self.vae_config).to(self.device)
        self._setup_optim()
        self.heldout = self._limit(load_data(cfg.data, cfg.size, "heldout")) if cfg.data == "digits" else None

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx, _ = self._indices(step)
        x, _ = self.data.batch(idx)
        x = x.to(self.device)
        if step == 0:
            self._init_codebook(x)
        rec, vq = self.model(x)
        mse = F.mse_loss(rec, x)
        self._last_x = x
        return mse + vq, {"mse": float(mse.detach()), "vq": float(vq.detach())}

    @torch.no_grad()
    def _init_codebook(self, x: torch.Tensor) -> None:
        quant = self.model.quantize
        f = self.model.img_to_f(x)
        rows = torch.cat([_residual_rows(quant, f)[0]] + [
            F.interpolate(f, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            for pn in quant.patch_nums])
        g = torch.Generator().manual_seed(int(self.cfg.seed) + 17)
        pick = torch.randint(0, rows.shape[0], (quant.vocab_size,), generator=g)
        quant.embedding.weight.copy_(rows[pick] + 0.01 * torch.randn(quant.vocab_size, rows.shape[1], generator=g))

    @torch.no_grad()
    def after_step(self) -> None:
        cfg: VAETrainConfig = self.cfg  # type: ignore[assignment]
        s = self.step + 1
        if not cfg.restart_every or s % cfg.restart_every or s > cfg.restart_until * cfg.total_steps:
            return
        quant = self.model.quantize
        usage = quant.ema_vocab_hit_SV.sum(0)
        dead = (usage < cfg.restart_below).nonzero().flatten()
        if dead.numel() == 0:
            return
        rows = torch.cat(_residual_rows(quant, self.model.img_to_f(self._last_x)))
        g = torch.Generator().manual_seed(int(cfg.seed) * 31 + s)
        pick = torch.randint(0, rows.shape[0], (dead.numel(),), generator=g)
        quant.embedding.weight[dead] = rows[pick]
        quant.ema_vocab_hit_SV[:, dead] = 1.0 / len(quant.patch_nums)
        logger.info("step %d: restarted %d unused codes", s, dead.numel())

    @torch.no_grad()
    def evaluate_and_save(self) -> dict[str, Any]:
        vae = self.ema.eval()
        row: dict[str, Any] = {"step": self.step, "minutes": round(self.elapsed / 60, 2)}
        ev = self.heldout or self.data
        x = ev.images[:512].to(self.device)
        rec = torch.cat([vae.img_to_reconstructed_img(x[i:i + 128]) for i in range(0, len(x), 128)])
        row["rec_mse"] = float(F.mse_loss(rec, x))
        toks = torch.cat([torch.cat(vae.img_to_idxBl(x[i:i + 128]), 1) for i in range(0, len(x), 128)])
        row["codes_used"] = int(toks.unique().numel())
        if self.cfg.data == "digits":
            from fastgen.zoo import digits

            s = digits.score(ev.labels[:512].numpy(), rec.add(1).mul(0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
            row["rec_accuracy"], row["rec_fid"] = round(s["accuracy"], 4), round(s["fid"], 3)
        self._log_eval(row)
        save_module(vae, self.out / "vae")
        logger.info("eval step %d: %s", self.step, row)
        return row


# --------------------------------------------------------------------------------------------------
# Stage 2: the transformer
# --------------------------------------------------------------------------------------------------


def _find_vae(spec: str) -> Path:
    p = Path(spec)
    for cand in (p, p / "vae", p / "best_pipeline" / "vae", p / "pipeline" / "vae"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FileNotFoundError(f"--vae {spec!r}: no VQ-VAE folder (config.json + model.safetensors) at it or in its "
                            f"vae/ sub-folder; train one with `fastgen train var vae --out DIR`")


class VARTrainer(_Trainer):
    """Trains the VAR transformer on the frozen VQ-VAE's tokens (see the module docstring)."""

    def __init__(self, cfg: VARTrainConfig, out: str | os.PathLike):
        super().__init__(cfg, out)
        if not cfg.vae:
            raise ValueError("the var stage needs --vae (the VQ-VAE run folder)")
        self.vae = load_module(_find_vae(cfg.vae)).to(self.device)
        vc = self.vae.config
        if vc.image_size != cfg.size:
            raise ValueError(f"the VQ-VAE maps {vc.image_size} px images, --size is {cfg.size}")
        arch = {**DIGITS_VAR_ARCH, **cfg.arch, "patch_nums": vc.patch_nums, "vocab_size": vc.vocab_size,
                "Cvae": vc.z_channels}
        arch.setdefault("num_classes", self.data.num_classes)
        if cfg.data != "digits" and "num_classes" not in cfg.arch:
            arch["num_classes"] = self.data.num_classes
        arch["cond_drop_rate"] = cfg.cond_drop
        self.var_config = VARConfig(**arch)
        if self.data.labels.max() >= self.var_config.num_classes:
            raise ValueError(f"the data has {self.data.num_classes} classes, the model {self.var_config.num_classes}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = VAR(self.var_config).to(self.device)
        self.model.cond_drop_rate = 0.0  # label dropout is drawn from the step's generator below
        self._setup_optim()
        self.tokens, self.inputs = self._tokenise(self.data)
        self.heldout = self._limit(load_data(cfg.data, cfg.size, "heldout")) if cfg.data == "digits" else None
        self.val = self._tokenise(self.heldout) if self.heldout is not None else None

    @torch.no_grad()
    def _tokenise(self, data: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
        toks, ins = [], []
        for i in range(0, len(data.labels), 256):
            idx = self.vae.img_to_idxBl(data.images[i:i + 256].to(self.device))
            toks.append(torch.cat(idx, 1))
            ins.append(self.vae.quantize.idxBl_to_var_input(idx))
        return torch.cat(toks), torch.cat(ins)

    def _ce(self, model: torch.nn.Module, labels: torch.Tensor, toks: torch.Tensor, ins: torch.Tensor) -> torch.Tensor:
        logits = model(labels, ins)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks.reshape(-1),
                               label_smoothing=self.cfg.label_smoothing)  # type: ignore[attr-defined]

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx, g = self._indices(step)
        labels = self.data.labels[idx]
        drop = torch.rand(len(idx), generator=g) < self.cfg.cond_drop  # type: ignore[attr-defined]
        labels = torch.where(drop, self.var_config.num_classes, labels).to(self.device)
        toks, ins = self.tokens[idx], self.inputs[idx]
        loss = self._ce(self.model, labels, toks, ins)
        if self.var_config.mask_layers is None:
            return loss, {}
        mask_loss = self._mask_loss(labels, toks, ins, g)
        w = self.cfg.mask_loss_weight  # type: ignore[attr-defined]
        return loss + w * mask_loss, {"nsp": float(loss.detach()), "mask": float(mask_loss.detach())}

    def _mask_loss(self, labels: torch.Tensor, toks: torch.Tensor, ins: torch.Tensor, g: torch.Generator
                   ) -> torch.Tensor:
        """HMAR stage-2 objective: a masking ratio ``p ~ U(0, 1)`` per batch, ``ceil(p * pn^2)`` random tokens
        of every scale masked, cross-entropy on the masked tokens of the mask branch."""
        from .var import scale_contributions

        B = toks.shape[0]
        p = float(torch.rand((), generator=g))
        ms_idx, ms_mask = [], []
        for (b, e) in self.var_config.begin_ends:
            n = e - b
            n_mask = max(1, math.ceil(p * n))
            order = torch.rand(B, n, generator=g).argsort(dim=1)
            ms_mask.append(torch.zeros(B, n, dtype=torch.bool).scatter_(1, order[:, :n_mask], True).to(self.device))
            ms_idx.append(toks[:, b:e])
        with torch.no_grad():
            cur = scale_contributions(self.vae.quantize, ms_idx, ms_mask)
        masked = torch.cat(ms_mask, 1)
        logits = self.model.forward_mask(labels, ins, cur, masked)
        return F.cross_entropy(logits[masked], toks[masked], label_smoothing=self.cfg.label_smoothing)  # type: ignore[attr-defined]

    def pipeline(self):
        """A :class:`~fastgen.ar.pipeline.VARPipeline` holding copies of the EMA weights."""
        import copy

        from .pipeline import VARPipeline

        var = copy.deepcopy(self.ema).eval()
        var.cond_drop_rate = self.var_config.cond_drop_rate
        pipe = VARPipeline(copy.deepcopy(self.vae).eval(), var)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def evaluate_and_save(self) -> dict[str, Any]:
        cfg: VARTrainConfig = self.cfg  # type: ignore[assignment]
        row: dict[str, Any] = {"step": self.step, "minutes": round(self.elapsed / 60, 2)}
        if self.val is not None:
            n = min(256, len(self.heldout.labels))
            row["val_loss"] = round(float(self._ce(self.ema, self.heldout.labels[:n].to(self.device),
                                                   self.val[0][:n], self.val[1][:n])), 4)
        pipe = self.pipeline()
        score = None
        if cfg.data == "digits" and cfg.eval_n > 0:
            from fastgen.zoo import digits

            labels = torch.arange(cfg.eval_n) % 10
            imgs = pipe(labels.tolist(), guidance_scale=cfg.eval_cfg, top_k=cfg.eval_top_k, top_p=cfg.eval_top_p,
                        seed=0, output_type="np").images
            s = digits.score(labels.numpy(), imgs)
            row.update(accuracy=round(s["accuracy"], 4), fid=round(s["fid"], 3), cfg=cfg.eval_cfg)
            score = s["accuracy"] - 1e-3 * s["fid"]  # accuracy first, the Fréchet distance breaks ties
        self._log_eval(row)
        tmp = self.out / "pipeline.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        pipe.save_pretrained(tmp)
        (tmp / "fastgen_train.json").write_text(json.dumps({"eval": row, "config": asdict(cfg)}, indent=1))
        _swap_dir(tmp, self.out / "pipeline")
        key = score if score is not None else -row.get("val_loss", 0.0)
        if key > self.best:
            self.best = float(key)
            _copy_dir(self.out / "pipeline", self.out / "best_pipeline")
        logger.info("eval step %d: %s", self.step, row)
        return row


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse_arch(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--arch expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            val = json.loads(v)
        except ValueError:
            val = v
        out[k] = tuple(val) if isinstance(val, list) else val
    return out


def export(run: str | os.PathLike, dst: str | os.PathLike, refiner: str | os.PathLike | None = None,
           source: str = "best_pipeline") -> Path:
    """Copy ``RUN/best_pipeline`` (or ``RUN/<source>``, e.g. ``pipeline``: the last evaluation) to ``dst``;
    with ``refiner`` (another VAR run on the same VQ-VAE) its ``best_pipeline``'s transformer goes to
    ``dst/var_small`` (the CoDe refiner, see :mod:`fastgen.ar.accel`)."""
    src = Path(run) / source
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{src} is not a VARPipeline folder; train with `fastgen train var var`")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if refiner is not None:
        rsrc = Path(refiner) / "best_pipeline"
        a = (src / "vae" / "model.safetensors").read_bytes()
        b = (rsrc / "vae" / "model.safetensors").read_bytes()
        if a != b:
            raise ValueError(f"the refiner run {refiner} was trained on another VQ-VAE than {run}")
        shutil.copytree(rsrc / "var", tmp / "var_small")
    _swap_dir(tmp, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    """``fastgen train var vae|var|export ...`` (see ``--help``; also ``accelerate launch -m fastgen.ar.train``)."""
    ap = CommandParser(prog="fastgen train var", description=__doc__.split("\n\n")[0],
                       example="fastgen train var vae --out runs/digits-vae --steps 1400\n"
                               "fastgen train var var --vae runs/digits-vae --out runs/digits-var --steps 2200\n"
                               "fastgen train var export --out runs/digits-var --to fastgen/zoo/weights/digits-var\n"
                               "accelerate launch --num_processes 1 -m fastgen.ar.train var --vae runs/digits-vae "
                               "--out runs/digits-var")
    ap.add_argument("stage", choices=("vae", "var", "export"))
    ap.add_argument("--out", required=True, help="run folder (checkpoint.pt, history.jsonl, vae/ or pipeline/)")
    ap.add_argument("--data", default="digits", help="'digits' or an image folder (default digits)")
    ap.add_argument("--vae", default="", help="var stage: the VQ-VAE run folder")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="total optimisation steps (the cosine schedule's length)")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this much training time in total")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop at this step (the schedule still runs to --steps; resume continues it)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--ema-decay", type=float, default=None)
    ap.add_argument("--cond-drop", type=float, default=None, help="var: label dropout for CFG (default 0.1)")
    ap.add_argument("--eval-cfg", type=float, default=None, help="var: guidance of the periodic evaluation")
    ap.add_argument("--eval-n", type=int, default=None, help="var: samples per evaluation (digits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (smoke tests; 0 = all)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--arch", nargs="*", default=[], help="architecture overrides key=value (JSON values)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (exactly)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--eval-minutes", type=float, default=10.0)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--to", default=None, help="export: destination folder (e.g. fastgen/zoo/weights/digits-var)")
    ap.add_argument("--refiner", default=None, help="export: a second (small) VAR run to ship as var_small")
    ap.add_argument("--source", default="best_pipeline", choices=("best_pipeline", "pipeline"),
                    help="export: the best evaluation (default) or the last one")
    args = ap.parse_args(argv)

    log_to_stderr_with_time()
    torch.set_num_threads(max(1, args.threads))

    if args.stage == "export":
        if not args.to:
            raise SystemExit("export needs --to DST")
        dst = export(args.out, args.to, args.refiner, args.source)
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        logger.info("exported %s -> %s (%.2f MB)", args.out, dst, size / 1e6)
        return 0

    cls = VAETrainConfig if args.stage == "vae" else VARTrainConfig
    kw: dict[str, Any] = dict(data=args.data, size=args.size, seed=args.seed, device=args.device,
                              arch=_parse_arch(args.arch), limit=args.limit)
    for name, val in (("total_steps", args.steps), ("batch", args.batch), ("lr", args.lr), ("warmup", args.warmup),
                      ("weight_decay", args.weight_decay), ("ema_decay", args.ema_decay)):
        if val is not None:
            kw[name] = val
    if args.stage == "var":
        kw["vae"] = args.vae
        for name, val in (("cond_drop", args.cond_drop), ("eval_cfg", args.eval_cfg), ("eval_n", args.eval_n)):
            if val is not None:
                kw[name] = val
    cfg = cls(**kw)
    tr: _Trainer = VAETrainer(cfg, args.out) if args.stage == "vae" else VARTrainer(cfg, args.out)  # type: ignore[arg-type]
    ckpt = Path(args.out) / "checkpoint.pt"
    if args.resume:
        if not tr.resume():
            logger.info("no checkpoint in %s: starting from scratch", args.out)
    elif ckpt.exists():
        raise SystemExit(f"{ckpt} exists: pass --resume to continue it or choose another --out")
    n = sum(p.numel() for p in tr.model.parameters())
    logger.info("training %s: %.2f M params, config %s", args.stage, n / 1e6, asdict(cfg))
    row = tr.run(minutes=args.minutes, steps=args.stop_at, ckpt_minutes=args.ckpt_minutes, eval_minutes=args.eval_minutes,
                 progress=not args.no_progress)
    logger.info("done: step %d, %.1f min; last evaluation %s", tr.step, tr.elapsed / 60, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
