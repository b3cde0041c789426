"""``VARPipeline``: class-conditional image generation with VAR (Tian et al., NeurIPS 2024), with a
diffusers-like call (``pipe(class_labels).images``), zero-shot in/out-painting, and a self-contained
folder format (safetensors + JSON configs).

>>> pipe = VARPipeline.from_official("vae_ch160v4096z32.pth", "var_d16.pth")       # doctest: +SKIP
>>> images = pipe([207, 360], guidance_scale=4.0, seed=0).images                     # doctest: +SKIP
>>> pipe.save_pretrained("var-d16")                                                   # doctest: +SKIP
>>> VARPipeline.from_pretrained("var-d16")([207], seed=0).images[0]                   # doctest: +SKIP

In-painting (the official zero-shot editing): the given image is tokenised at every scale, and wherever
``mask`` is 1 ("keep") its tokens are teacher-forced while the model generates the rest. Note the mask
convention is VAR's, not diffusers': **1 = keep the image, 0 = generate**.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from fastgen.utils.logging import get_logger

from .checkpoints import build_and_load, load_official, read_checkpoint
from .scale_hooks import ScaleHooks
from .var import VAR, VARConfig
from .vqvae import VQVAE, VQVAEConfig

logger = get_logger(__name__)

__all__ = ["VARPipeline", "VARPipelineOutput", "edit_mask_per_scale"]

_INDEX = "model_index.json"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
#: Buffer names (last dotted part) recomputed from the config, not written by save_pretrained
NOT_SAVED = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


@dataclass
class VARPipelineOutput(BaseOutput):
    """Output of :class:`VARPipeline`.

    Attributes:
        images: list of PIL images, a ``(B, H, W, 3)`` float numpy array, or a ``(B, 3, H, W)`` tensor, all
            in ``[0, 1]`` (per ``output_type``).
        tokens: the sampled token maps, one ``(B, pn_k^2)`` long tensor per scale.
    """

    images: Any
    tokens: list[torch.Tensor] | None = None


def edit_mask_per_scale(mask_B1hw: torch.Tensor, patch_nums: Sequence[int], force_below: int = 4
                        ) -> list[torch.Tensor]:
    """Turn a keep-mask (``B x 1 x h x w`` in ``[0, 1]``, 1 = keep) into one boolean ``B x pn^2`` mask per
    scale, as VAR's zero-shot editing does: the mask is brought to the token grid of the last scale
    (area averaging), then bilinearly resized to each ``pn x pn`` and thresholded at 0.5. Scales with fewer
    than ``force_below`` tokens are kept entirely (the 1x1 scale in the official schedules)."""
    last = patch_nums[-1]
    m = mask_B1hw.float()
    if m.shape[-2:] != (last, last):
        m = F.interpolate(m, size=(last, last), mode="area" if m.shape[-1] >= last else "bilinear")
    out = []
    for pn in patch_nums:
        keep = F.interpolate(m, size=(pn, pn), mode="bilinear", align_corners=False) > 0.5
        if pn * pn < force_below:
            keep = torch.ones_like(keep)
        out.append(keep.flatten(1))
    return out


class VARPipeline:
    """VAR sampling pipeline: a :class:`~fastgen.ar.vqvae.VQVAE` and a :class:`~fastgen.ar.var.VAR`.

    Args:
        vae: the multi-scale VQ-VAE (its scales must equal the transformer's).
        var: the transformer.
    """

    def __init__(self, vae: VQVAE, var: VAR):
        var.attach_vae(vae)
        self.vae, self.var = vae, var
        self._progress_bar_config: dict[str, Any] = {}
        #: the folder this pipeline was loaded from (``from_pretrained``), else ``None``
        self.name_or_path: str | None = None

    # -- construction and persistence ------------------------------------------------------------------
    @classmethod
    def from_official(cls, vae_ckpt: str | os.PathLike | None, var_ckpt: str | os.PathLike, **kwargs: Any
                      ) -> "VARPipeline":
        """Load the released ``vae_ch160v4096z32.pth`` + ``var_d*.pth`` (or a trainer checkpoint); keyword
        arguments go to :func:`fastgen.ar.checkpoints.load_official` (``depth``, ``patch_nums``, ``device``, ...)."""
        vae, var = load_official(vae_ckpt, var_ckpt, **kwargs)
        return cls(vae, var)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``path/model_index.json`` and ``path/{vae,var}/{config.json,model.safetensors}``."""
        from safetensors.torch import save_file

        root = Path(path)
        for name, module in (("vae", self.vae), ("var", self.var)):
            sub = root / name
            sub.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()
                     if k.rsplit(".", 1)[-1] not in NOT_SAVED}
            tmp = sub / (_WEIGHTS + ".tmp")
            save_file(state, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, sub / _WEIGHTS)
            cfg = {"_class_name": type(module).__name__, **module.config.to_dict()}
            (sub / _CONFIG).write_text(json.dumps(cfg, indent=2))
        index = {"_class_name": type(self).__name__, "vae": ["fastgen.ar", "VQVAE"], "var": ["fastgen.ar", "VAR"]}
        (root / _INDEX).write_text(json.dumps(index, indent=2))
        logger.info("saved VARPipeline to %s", root)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, strict: bool = True) -> "VARPipeline":
        """Load a folder written by :meth:`save_pretrained`; tensors are checked against the configs and
        every missing/unexpected/mis-shaped one is named in the error."""
        root = Path(path)
        if not (root / _INDEX).is_file():
            raise FileNotFoundError(f"{root} is not a VARPipeline folder (no {_INDEX})")
        for sub in ("vae", "var"):
            for f in (_CONFIG, _WEIGHTS):
                if not (root / sub / f).is_file():
                    raise FileNotFoundError(f"{root / sub / f} is missing; the VARPipeline folder is incomplete")
        vcfg = VQVAEConfig.from_dict(json.loads((root / "vae" / _CONFIG).read_text()))
        tcfg = VARConfig.from_dict(json.loads((root / "var" / _CONFIG).read_text()))
        vae = build_and_load(lambda: VQVAE(vcfg), read_checkpoint(root / "vae" / _WEIGHTS, "vae"), "VQ-VAE",
                             strict=strict, copy=False)
        var = build_and_load(lambda: VAR(tcfg, init=False), read_checkpoint(root / "var" / _WEIGHTS, "var"), "VAR",
                             strict=strict, copy=False)
        pipe = cls(vae.eval().requires_grad_(False), var.eval().requires_grad_(False))
        pipe.name_or_path = str(root)
        return pipe.to(device=device, dtype=dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "VARPipeline":
        """Move both models (like ``DiffusionPipeline.to``); returns ``self``."""
        self.vae.to(device=device, dtype=dtype)
        self.var.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.var.device

    @property
    def dtype(self) -> torch.dtype:
        return self.var.head.weight.dtype

    @property
    def image_size(self) -> int:
        """Side length of the generated images in pixels."""
        return self.vae.config.image_size

    @property
    def num_classes(self) -> int:
        return self.var.num_classes

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the per-scale ``tqdm`` bar (e.g. ``disable=True``)."""
        self._progress_bar_config = dict(kwargs)

    # -- inputs ----------------------------------------------------------------------------------------
    def _labels(self, class_labels: int | Sequence[int] | torch.Tensor | None, n_per: int) -> torch.Tensor:
        if class_labels is None:
            labels = torch.tensor([self.num_classes])
        elif isinstance(class_labels, int):
            labels = torch.tensor([class_labels])
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).cpu()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        labels = torch.where(labels < 0, self.num_classes, labels)
        if int(labels.max()) > self.num_classes or int(labels.min()) < 0:
            raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}] (or be None/-1/{self.num_classes} "
                             f"for unconditional), got {labels.tolist()}")
        return labels.repeat_interleave(n_per).to(self.device)

    def prepare_image(self, image: Any) -> torch.Tensor:
        """PIL image(s), a numpy array (``HWC``/``BHWC``, uint8 or float in ``[0, 1]``) or a tensor
        (``3HW``/``B3HW`` in ``[0, 1]``) -> ``B x 3 x S x S`` float tensor in ``[0, 1]`` at the model's
        resolution (resized with antialiasing if needed)."""
        if isinstance(image, (list, tuple)):
            return torch.cat([self.prepare_image(im) for im in image])
        if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
            image = np.asarray(image.convert("RGB"))
        if isinstance(image, np.ndarray):
            arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"expected a (H, W, 3) or (B, H, W, 3) array, got shape {arr.shape}")
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            t = image.detach().float()
            if t.ndim == 3:
                t = t[None]
            if t.ndim != 4 or t.shape[1] != 3:
                raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(t.shape)}")
        else:
            raise ValueError(f"unsupported image type {type(image).__name__}; use PIL, numpy or torch")
        if not torch.isfinite(t).all():
            raise ValueError("image contains NaN or inf")
        if float(t.min()) < -0.02 or float(t.max()) > 1.02:
            raise ValueError(f"image values must lie in [0, 1], got [{float(t.min()):.3f}, {float(t.max()):.3f}]")
        s = self.image_size
        if t.shape[-2:] != (s, s):
            logger.warning("resizing the input image from %sx%s to the model's %dx%d", t.shape[-2], t.shape[-1], s, s)
            t = F.interpolate(t, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
        return t.clamp(0, 1)

    @staticmethod
    def prepare_mask(mask: Any) -> torch.Tensor:
        """PIL (grey), numpy or torch mask (``HW``, ``BHW`` or ``B1HW``; 1 = keep) -> ``B x 1 x H x W``."""
        if hasattr(mask, "convert") and hasattr(mask, "size"):
            mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask.astype(np.float32))
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"unsupported mask type {type(mask).__name__}; use PIL, numpy or torch")
        m = mask.detach().float()
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None]
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"expected a mask of shape (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
        if float(m.min()) < 0 or float(m.max()) > 1:
            raise ValueError("mask values must lie in [0, 1] (1 = keep the image, 0 = generate)")
        return m

    @torch.no_grad()
    def encode_tokens(self, image: Any) -> list[torch.Tensor]:
        """Tokenise image(s) (see :meth:`prepare_image`) at every scale: list of ``B x pn_k^2`` maps."""
        x = self.prepare_image(image).to(device=self.device, dtype=self.vae.quant_conv.weight.dtype)
        return self.vae.img_to_idxBl(x * 2 - 1)

    # -- call ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float = 4.0,
        top_k: int = 900,
        top_p: float = 0.96,
        seed: int | None = None,
        num_images_per_label: int = 1,
        output_type: str = "pil",
        *,
        generator: torch.Generator | None = None,
        more_smooth: bool = False,
        image: Any = None,
        mask: Any = None,
        return_dict: bool = True,
        hmar_steps: dict[int, int] | None = None,
        prune: Any = None,
        cfg_share: Any = None,
        refiner: Any = None,
        draft_scales: int | None = None,
        hooks: Any = None,
        stats: dict | None = None,
        callback_on_scale_end: Any = None,
    ) -> VARPipelineOutput | tuple:
        """Generate images.

        Args:
            class_labels: class index or list of them; ``None``/``-1`` = unconditional (the null class).
            guidance_scale: CFG strength ``cfg``; ramped linearly as ``cfg * k / (K - 1)`` over scales.
            top_k, top_p: sampling filters (0 disables); the defaults are the official demo's.
            seed: seed of a fresh generator on the model's device (reproducible); or pass ``generator``.
            num_images_per_label: samples per label.
            output_type: ``"pil"``, ``"np"`` (``B x H x W x 3``) or ``"pt"`` (``B x 3 x H x W``), in [0, 1].
            more_smooth: Gumbel-softmax smoothing of the code vectors (visualisation only).
            image, mask: zero-shot in/out-painting. ``image`` is tokenised at every scale and its tokens are
                kept where ``mask`` is 1 (VAR's convention: **1 = keep, 0 = generate**); one image for
                all samples, or one per label.
            return_dict: return a :class:`VARPipelineOutput` (else a tuple ``(images, tokens)``).
            hmar_steps: HMAR masked refinement ``{scale index: sub-steps}`` (HMAR models only).
            prune, cfg_share, refiner, draft_scales: acceleration (FastVAR pruning, CFG-pair sharing, CoDe
                draft/refine); usually set by ``fastgen.accelerate`` (see :mod:`fastgen.ar.accel`), turned
                into fresh per-call scale hooks (:func:`fastgen.ar.accel.scale_hooks`) of
                :meth:`fastgen.ar.var.VAR.sample`.
            hooks: further per-scale hooks (:class:`fastgen.ar.scale_hooks.ScaleHooks`, one or a sequence),
                run after those.
            stats: a dict that receives what ran at every scale.
            callback_on_scale_end: called as ``callback_on_scale_end(k, K)`` after each scale ``k``.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be >= 1, got {num_images_per_label}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if (image is None) != (mask is None):
            raise ValueError("in-painting needs both image and mask (mask: 1 = keep the image, 0 = generate)")
        labels = self._labels(class_labels, num_images_per_label)
        B, pns = labels.shape[0], self.var.patch_nums
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)

        input_tokens = keep = None
        if image is not None:
            toks = self.encode_tokens(image)
            m = self.prepare_mask(mask).to(self.device)
            n_labels = B // num_images_per_label
            toks = [self._fit_batch(t, B, n_labels, num_images_per_label, "image") for t in toks]
            keep = [self._fit_batch(k, B, n_labels, num_images_per_label, "mask")
                    for k in edit_mask_per_scale(m, pns)]
            input_tokens = toks

        bar = tqdm(total=len(pns), desc="VAR scales", **self._progress_bar_config)

        def on_scale(si: int, K: int) -> None:
            bar.update(1)
            if callback_on_scale_end is not None:
                callback_on_scale_end(si, K)

        scale_hooks: list[Any] = []
        if prune is not None or cfg_share is not None or refiner is not None:
            from .accel import scale_hooks as accel_hooks

            scale_hooks = accel_hooks(prune=prune, cfg_share=cfg_share, refiner=refiner, draft_scales=draft_scales)
        if hooks is not None:
            scale_hooks += [hooks] if isinstance(hooks, ScaleHooks) else list(hooks)
        try:
            out = self.var.sample(B, labels, cfg=guidance_scale, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                                  generator=generator, vae=self.vae, input_tokens=input_tokens, keep_masks=keep,
                                  step_callback=on_scale, hmar_steps=hmar_steps, hooks=scale_hooks, stats=stats)
        finally:
            bar.close()
        img = self.vae.fhat_to_img(out.f_hat.to(self.vae.post_quant_conv.weight.dtype)).float().add(1).mul(0.5)
        if not torch.isfinite(img).all():
            raise FloatingPointError("VARPipeline produced NaN/inf pixels (check the weights and the dtype; "
                                     "float16 may overflow, use float32 or bfloat16)")
        images: Any
        if output_type == "pt":
            images = img.cpu()
        else:
            arr = img.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            if output_type == "np":
                images = arr
            else:
                from PIL import Image

                images = [Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)) for a in arr]
        if not return_dict:
            return images, out.tokens
        return VARPipelineOutput(images=images, tokens=out.tokens)

    @staticmethod
    def _fit_batch(t: torch.Tensor, B: int, n_labels: int, n_per: int, what: str) -> torch.Tensor:
        if t.shape[0] == B:
            return t
        if t.shape[0] == 1:
            return t.expand(B, *t.shape[1:])
        if t.shape[0] == n_labels:
            return t.repeat_interleave(n_per, dim=0)
        raise ValueError(f"got {t.shape[0]} {what}s for {n_labels} labels x {n_per} images per label")
