"""Next-scale autoregressive image generation: a clean-room VAR (Tian et al., "Visual Autoregressive
Modeling: Scalable Image Generation via Next-Scale Prediction", NeurIPS 2024) that loads the released
checkpoints (``vae_ch160v4096z32.pth``, ``var_d{16,20,24,30,36}.pth``) unchanged.

* :mod:`fastgen.ar.vqvae` -- the multi-scale residual VQ-VAE (tokeniser) and its config.
* :mod:`fastgen.ar.var` -- the transformer (teacher forcing, KV-cached sampling with ramped CFG) and the
  checkpoint loader :func:`load_official`.
* :mod:`fastgen.ar.pipeline` -- :class:`VARPipeline` (``pipe(class_labels).images``, in/out-painting,
  ``save_pretrained``/``from_pretrained``).
"""

from __future__ import annotations

from .var import (
    CheckpointError,
    KVCache,
    VAR,
    VARConfig,
    VARSample,
    infer_var_config,
    infer_vqvae_config,
    load_official,
    read_checkpoint,
    sample_top_k_top_p,
)
from .vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAE, VQVAEConfig, phi_index

__all__ = [
    "VAR", "VARConfig", "VARSample", "KVCache", "VQVAE", "VQVAEConfig", "VARPipeline", "VARPipelineOutput",
    "load_official", "read_checkpoint", "infer_var_config", "infer_vqvae_config", "CheckpointError",
    "sample_top_k_top_p", "phi_index", "PATCH_NUMS_256", "PATCH_NUMS_512",
]


def __getattr__(name: str):
    # the pipeline imports diffusers (slow); load it on first use
    if name in ("VARPipeline", "VARPipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
