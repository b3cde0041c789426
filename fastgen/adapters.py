"""Per-family adapters: where a pipeline keeps its denoiser, its blocks, patch size and latent grid.

Techniques never hard-code ``pipe.unet`` or ``pipe.transformer.transformer_blocks``: they ask the adapter.
A pipeline is matched by the names of the classes in its MRO, so subclasses (img2img variants, a user's
own subclass) are found too, and fastgen never has to import every pipeline class up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedPipelineError

__all__ = ["Adapter", "ADAPTERS", "DIFFUSION_FAMILIES", "get_adapter", "supported_pipelines", "capture_denoiser_calls"]


@dataclass(frozen=True)
class Adapter:
    """How fastgen sees one pipeline family.

    Attributes:
        family: short name (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``, ``"pixart"``, ``"sana"``, ``"lumina2"``, ``"dit"``,
            ``"var"``).
        pipeline_classes: diffusers pipeline class names of this family.
        denoiser_attr: attribute of the pipeline holding the denoiser (``"unet"`` or ``"transformer"``).
        denoiser_classes: accepted denoiser class names.
        block_lists: attributes of the denoiser holding its main transformer block lists (DiTs).
        prediction: ``"epsilon"`` or ``"flow"`` for the family's stock schedulers (the scheduler's own config wins);
            ``"tokens"`` for next-scale AR (no scheduler).
        conditioning: ``"text"`` or ``"class"``.
        packed: latents are packed 2x2 into tokens by the pipeline (FLUX).
    """

    family: str
    pipeline_classes: tuple[str, ...]
    denoiser_attr: str
    denoiser_classes: tuple[str, ...]
    block_lists: tuple[str, ...] = ()
    prediction: str = "flow"
    conditioning: str = "text"
    packed: bool = False

    @property
    def is_unet(self) -> bool:
        return self.denoiser_attr == "unet"

    def denoiser(self, pipe) -> torch.nn.Module:
        """The pipeline's denoiser module (UNet or transformer)."""
        return getattr(pipe, self.denoiser_attr)

    def blocks(self, pipe) -> list[tuple[str, torch.nn.Module]]:
        """``(qualified name, block)`` for the denoiser's transformer blocks, in execution order.

        DiTs: the entries of ``block_lists``. UNets: every ``BasicTransformerBlock`` (self+cross attention).
        """
        model = self.denoiser(pipe)
        if self.is_unet:
            return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
        out = []
        for attr in self.block_lists:
            for i, blk in enumerate(getattr(model, attr, None) or []):
                out.append((f"{attr}.{i}", blk))
        return out

    def patch_size(self, pipe) -> int:
        """Side of a square latent patch that becomes one token (UNets: 1; FLUX: 2 through packing)."""
        if self.packed:
            return 2
        if self.is_unet:
            return 1
        return int(getattr(self.denoiser(pipe).config, "patch_size", 1) or 1)

    def vae_scale_factor(self, pipe) -> int:
        """Pixels per latent pixel (the pipeline's own ``vae_scale_factor``, else derived from the VAE)."""
        f = getattr(pipe, "vae_scale_factor", None)
        if f is None:
            vae = getattr(pipe, "vae", None)
            blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
            f = 2 ** (len(blocks) - 1) if blocks else 8
        return int(f)

    def latent_grid(self, pipe, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of image tokens the denoiser sees for an image of ``height`` x ``width`` pixels."""
        f = self.vae_scale_factor(pipe) * self.patch_size(pipe)
        if height % f or width % f:
            raise ValueError(
                f"{type(pipe).__name__}: height and width must be multiples of {f} (VAE factor x patch), got {height}x{width}"
            )
        return height // f, width // f

    def default_size(self, pipe) -> tuple[int, int]:
        """The pipeline's own default (height, width) in pixels."""
        model = self.denoiser(pipe)
        s = getattr(model.config, "sample_size", 64)
        s = s[0] if isinstance(s, (tuple, list)) else s
        f = self.vae_scale_factor(pipe)
        return int(s) * f, int(s) * f


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"), "unet",
            ("UNet2DConditionModel",), prediction="epsilon"),
    Adapter("sd", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"), "unet",
            ("UNet2DConditionModel",), prediction="epsilon"),
    Adapter("sd3", ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"), "transformer",
            ("SD3Transformer2DModel",), ("transformer_blocks",)),
    Adapter("flux", ("FluxPipeline", "FluxImg2ImgPipeline"), "transformer", ("FluxTransformer2DModel",),
            ("transformer_blocks", "single_transformer_blocks"), packed=True),
    Adapter("pixart", ("PixArtSigmaPipeline", "PixArtAlphaPipeline"), "transformer", ("PixArtTransformer2DModel",),
            ("transformer_blocks",), prediction="epsilon"),
    Adapter("sana", ("SanaPipeline",), "transformer", ("SanaTransformer2DModel",), ("transformer_blocks",)),
    Adapter("lumina2", ("Lumina2Pipeline",), "transformer", ("Lumina2Transformer2DModel",), ("layers",)),
    Adapter("dit", ("DiTPipeline",), "transformer", ("DiTTransformer2DModel",), ("transformer_blocks",),
            prediction="epsilon", conditioning="class"),
    # next-scale AR (fastgen.ar.VARPipeline, not a diffusers pipeline): its "denoiser" is the VAR transformer;
    # only the techniques of fastgen.ar.accel (family "var") apply to it
    Adapter("var", ("VARPipeline",), "var", ("VAR",), ("blocks",), prediction="tokens", conditioning="class"),
)


#: Families of the diffusion pipelines (everything but next-scale AR): the reach of step-count and sampler
#: techniques.
DIFFUSION_FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS if a.prediction != "tokens")


def supported_pipelines() -> list[str]:
    """Names of the pipeline classes fastgen supports."""
    return [c for a in ADAPTERS for c in a.pipeline_classes]


def get_adapter(pipe) -> Adapter:
    """Return the :class:`Adapter` for ``pipe``.

    Raises:
        UnsupportedPipelineError: naming the pipeline (or denoiser) class and the supported ones.
    """
    mro = [c.__name__ for c in type(pipe).__mro__]
    for adapter in ADAPTERS:
        if any(name in mro for name in adapter.pipeline_classes):
            model = getattr(pipe, adapter.denoiser_attr, None)
            if model is None or not any(c.__name__ in adapter.denoiser_classes for c in type(model).__mro__):
                raise UnsupportedPipelineError(
                    f"{type(pipe).__name__} has a denoiser of class {type(model).__name__} in "
                    f"pipe.{adapter.denoiser_attr}; fastgen supports {', '.join(adapter.denoiser_classes)} there"
                )
            return adapter
    raise UnsupportedPipelineError(
        f"fastgen does not support {type(pipe).__name__}; supported pipelines: {', '.join(supported_pipelines())}"
    )


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_denoiser_calls(pipe, call_kwargs: dict, *, model: torch.nn.Module | None = None,
                           stop_after: int | None = None) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of the denoiser calls of one run of ``pipe(**call_kwargs)`` (latent output),
    tensors detached and cloned; the run stops after ``stop_after`` calls when given.

    ``model`` is the module whose calls are recorded (default: the adapter's denoiser). With batched
    classifier-free guidance every call carries the doubled batch. The inputs of an export or a per-call
    benchmark, calibration data, and what ``fastgen profile`` times.
    """
    model = model if model is not None else get_adapter(pipe).denoiser(pipe)
    seen: list[tuple[tuple, dict]] = []

    def clone(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    def hook(module, args, kwargs):
        seen.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
        if stop_after is not None and len(seen) >= stop_after:
            raise _Captured
        return None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**{**call_kwargs, "output_type": "latent"})
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen
