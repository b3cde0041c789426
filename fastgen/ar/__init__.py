"""Next-scale autoregressive image generation: a clean-room VAR (Tian et al., "Visual Autoregressive
Modeling: Scalable Image Generation via Next-Scale Prediction", NeurIPS 2024) that loads the released
checkpoints (``vae_ch160v4096z32.pth``, ``var_d{16,20,24,30,36}.pth``) unchanged.

* :mod:`fastgen.ar.vqvae` -- the multi-scale residual VQ-VAE (tokeniser) and its config.
* :mod:`fastgen.ar.var` -- the transformer (teacher forcing, KV-cached sampling with ramped CFG).
* :mod:`fastgen.ar.checkpoints` -- reading the released checkpoints (:func:`load_official`), trainer and
  NVlabs-HMAR layouts, with every mismatch named (:class:`CheckpointError`).
* :mod:`fastgen.ar.scale_hooks` -- the per-scale hook interface through which accelerators change
  :meth:`VAR.sample`'s next-scale loop.
* :mod:`fastgen.ar.pipeline` -- :class:`VARPipeline` (``pipe(class_labels).images``, in/out-painting,
  ``save_pretrained``/``from_pretrained``).
* HMAR mode (Kumbong et al., CVPR 2025): ``VARConfig(markov=True, mask_layers=0|n)`` -- block-diagonal
  (Markovian) scale conditioning without a KV cache, and MaskGIT-style refinement inside a scale
  (``sample(..., hmar_steps={scale: n})``).
* :mod:`fastgen.ar.accel` -- acceleration through ``fastgen.accelerate`` (family ``"var"``): ``var-attn``,
  ``fastvar`` (token pruning), ``code`` (draft/refine with a small VAR), ``cfg-share``.
* :mod:`fastgen.ar.train` -- ``fastgen train var vae|var|export`` (the zoo's ``digits-var``).

Speed/quality of recipes on ``digits-var`` and the VAR-d16 speed probe: ``fastgen experiment var-eval``
(:mod:`fastgen.bench.experiments.var_eval`).
"""

from __future__ import annotations

from .checkpoints import CheckpointError, infer_var_config, infer_vqvae_config, load_official, read_checkpoint
from .var import KVCache, VAR, VARConfig, VARSample, sample_top_k_top_p
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
