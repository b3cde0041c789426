"""Step caches: reuse work between denoising steps.

* UNets (SD1.5, SDXL): :mod:`fastgen.caches.deepcache` — DeepCache-style high-level feature reuse
  (``"deepcache:3"``, :class:`DeepCacheConfig`).
* DiTs (SD3, FLUX, PixArt, Sana, Lumina2, DiT): :mod:`fastgen.caches.blockcache` — first-block-change
  residual cache like FirstBlockCache/DBCache, optional first-order extrapolation (``"blockcache:0.08"``,
  :class:`BlockCacheConfig`).

Both patch through diffusers hooks (no copied ``forward``), take the step index from the pipeline call,
keep their state per call and per denoiser call within a step, and report what they reused in
``fastgen.summary(pipe)["last_call"]["deepcache" | "blockcache"]``. Anchors for benchmarking (diffusers'
FirstBlockCache/TaylorSeer with the cache context supplied, the DeepCache package) are in
:mod:`fastgen.bench.anchors`.

>>> import fastgen
>>> from fastgen.testing import tiny_pipeline
>>> pipe = fastgen.accelerate(tiny_pipeline("sd"), "deepcache:3")            # doctest: +SKIP
>>> pipe("a red circle", num_inference_steps=9).images                       # doctest: +SKIP
>>> fastgen.summary(pipe)["last_call"]["deepcache"]["cached_steps"]          # doctest: +SKIP
[1, 2, 4, 5, 7, 8]
"""

from __future__ import annotations

from .blockcache import BlockCacheConfig, apply_blockcache, remove_blockcache
from .deepcache import DeepCacheConfig, apply_deepcache, deepcache_full_steps, remove_deepcache, unet_branches

__all__ = ["DeepCacheConfig", "apply_deepcache", "remove_deepcache", "deepcache_full_steps", "unet_branches",
           "BlockCacheConfig", "apply_blockcache", "remove_blockcache"]
