"""Exact, rule-based evaluator for the shapes world (a small GenEval), plus a fixed-feature Fréchet distance.

How an image is read (no learned weights; thresholds are for a 32 px image and scale with its size):

1. **Foreground** = pixels whose chroma (max - min channel, 0–255) is at least
   ``max(45, median border chroma + 30)``. Backgrounds of the world are neutral grey, so their chroma
   is ~0; object colours have chroma >= 170, and mixing them with grey (blur) keeps their hue.
2. **Objects**: each 8-connected foreground component is re-thresholded at half its own peak chroma
   (90th percentile), where the edge of a blurred object really is; the resulting components with area
   >= 12 px that keep >= 4 px after a 3x3 binary opening (drops speckle and thin halos/rings) are the
   objects; their holes are filled.
3. **Colour** = majority vote over the component's pixels of the nearest palette hue (red 0°, yellow
   ~52°, green ~128°, blue ~223°); pixels more than 45° from every palette hue vote ``"other"``.
4. **Shape** = the template (circle, square, upright triangle) with the component's area and centroid
   that overlaps it best (soft IoU, 4x4 supersampled templates); ``"other"`` if the best IoU is < 0.7
   (clean renders reach >= 0.88, blurred noisy ones >= 0.74; a 2:1 ellipse, an inverted triangle or a
   plus sign stay below 0.7).
5. **Position** uses component centroids: "A left of B" holds when ``x_B - x_A > 3.2 px`` and that
   offset is at least half the vertical offset (likewise for right of / above / below).

Criteria of one prompt (all booleans; :func:`score` averages them):

* ``color``: the requested colours are a sub-multiset of the detected colours;
* ``shape``: the requested shapes are a sub-multiset of the detected shapes;
* ``count``: the number of detected objects equals the number the prompt names (prompts describe the
  whole image, so extra objects fail);
* ``position`` (relation prompts only): some pair of distinct detected objects matching the two named
  objects (by colour and shape; by colour alone when no exact match exists) satisfies the relation;
* ``overall``: the detected (colour, shape) multiset equals the requested one exactly and, for relations,
  the relation holds with the exactly matching objects.

Limits (documented, by design):

* Objects that touch or overlap merge into one component (usually an ``"other"`` shape, failing count).
  Two same-colour objects closer than ~1 px after blurring merge as well.
* Only upright triangles count as triangles; rotated squares, ellipses, stars, etc. are judged by IoU
  with the three templates only. Hue classes are coarse: orange reads as red or yellow, cyan/purple as
  ``"other"`` or the nearest of blue/green/red. Objects with chroma < 45 (grey, white, black, very
  dark or washed out) or smaller than 12 px (at 32 px) are invisible to it.
* Blur: measured on 300 world images at 32 px, Gaussian blur up to sigma 1.3 px keeps overall at 1.0;
  sigma 1.6 gives 0.91 and sigma 2.0 gives 0.47 (squares and circles become indistinguishable), so
  mushy few-step outputs do lose score. Colour and position survive much stronger blur than shape.
* Backgrounds must be fairly neutral (a strong colour cast raises the foreground threshold) and
  textures with chroma > ~45 become objects. The evaluator cannot tell an image is "ugly": blotchy but
  correctly coloured, shaped and placed blobs pass. Use :func:`frechet_distance` for realism.

:func:`evaluate_pipeline` runs a zoo text-to-image pipeline on held-out prompts at fixed seeds and scores the
images with :func:`score` (the periodic evaluation of the zoo, distillation and QALoRA trainers). The module
imports only numpy and scipy; torch and diffusers are imported when a pipeline is evaluated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import linalg, ndimage

from fastgen.zoo import shapes as _shapes

__all__ = ["to_uint8_images", "detect", "score_one", "score", "frechet_distance", "features",
           "chance_baseline", "FEATURE_SPACE", "evaluate_pipeline"]

_CHROMA_MIN = 45.0
_CHROMA_OVER_BORDER = 30.0
_MIN_AREA = 12.0  # px at 32 px
_MIN_CORE = 4.0  # px at 32 px, after a 3x3 opening
_HUE_TOL = 45.0
_MIN_IOU = 0.7
_REL_MARGIN = 3.2  # px at 32 px


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of float RGB (..., 3)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60.0) % 360.0


_COLOR_NAMES = list(_shapes.COLORS)
_PALETTE_HUES = _hue(np.array([_shapes.COLORS[c] for c in _COLOR_NAMES], dtype=np.float64))


def to_uint8_images(images: Any) -> list[np.ndarray]:
    """Normalise images to a list of uint8 (H, W, 3) arrays.

    Accepts a list/tuple of PIL images or of (H, W, 3)/(3, H, W) arrays or tensors (uint8 0–255, or float
    in [0, 1]), or one 4-D array/tensor of shape (N, 3, H, W) or (N, H, W, 3) (float in [0, 1], or uint8).

    Raises:
        ValueError: on any other type, shape or value range (floats must lie in [0, 1]; [-1, 1] is rejected).
    """
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # torch tensor, without importing torch
        images = images.detach().cpu().float().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an image array must be 4-D (N,3,H,W) or (N,H,W,3), got shape {images.shape}")
        if images.shape[-1] != 3:
            if images.shape[1] != 3:
                raise ValueError(f"an image array must be (N,3,H,W) or (N,H,W,3), got shape {images.shape}")
            images = images.transpose(0, 2, 3, 1)
        return [_one_to_uint8(im, i) for i, im in enumerate(images)]
    if isinstance(images, (list, tuple)):
        return [_one_to_uint8(im, i) for i, im in enumerate(images)]
    raise ValueError(f"images must be a list of PIL images/arrays or a 4-D array/tensor, got {type(images).__name__}")


def _one_to_uint8(im: Any, i: int) -> np.ndarray:
    if hasattr(im, "convert") and hasattr(im, "size"):  # PIL image
        im = np.asarray(im.convert("RGB"))
    elif hasattr(im, "detach"):
        im = im.detach().cpu().float().numpy()
    if not isinstance(im, np.ndarray):
        raise ValueError(f"image {i}: expected a PIL image or array, got {type(im).__name__}")
    if im.ndim == 3 and im.shape[0] == 3 and im.shape[-1] != 3:  # one (3, H, W) image
        im = im.transpose(1, 2, 0)
    if im.ndim != 3 or im.shape[-1] != 3:
        raise ValueError(f"image {i}: expected shape (H, W, 3), got {im.shape}")
    if im.shape[0] < 8 or im.shape[1] < 8:
        raise ValueError(f"image {i}: too small ({im.shape[0]}x{im.shape[1]})")
    if im.dtype == np.uint8:
        return im
    if not np.issubdtype(im.dtype, np.floating):
        raise ValueError(f"image {i}: expected uint8 or float in [0, 1], got dtype {im.dtype}")
    if not np.isfinite(im).all():
        raise ValueError(f"image {i}: contains NaN or inf")
    lo, hi = float(im.min()), float(im.max())
    if lo < -0.02 or hi > 1.02:
        raise ValueError(f"image {i}: float values must lie in [0, 1], got [{lo:.3f}, {hi:.3f}] "
                         "(map [-1, 1] outputs with (x + 1) / 2 first)")
    return np.clip(np.rint(im * 255.0), 0, 255).astype(np.uint8)


_SUPERSAMPLE = 4


def _template(shape: str, h: int, w: int, cy: float, cx: float, area: float) -> np.ndarray:
    """Coverage (0..1, 4x4 supersampled) on an h x w grid of an upright template of the given area
    whose centroid is at (cy, cx) in pixel coordinates of that grid."""
    o = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    y = (np.arange(h)[:, None] + o).reshape(-1, 1)
    x = (np.arange(w)[:, None] + o).reshape(1, -1)
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= area / np.pi
    elif shape == "square":
        half = np.sqrt(area) / 2
        m = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # upright triangle of base = height = s; its centroid lies 2/3 of the way down
        s = np.sqrt(2 * area)
        top = cy - 2 * s / 3
        m = (y <= top + s) & (np.abs(x - cx) <= (y - top) / 2)
    return m.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3))


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best template by soft IoU (templates matched to the mask's area and centroid) and its IoU."""
    ys, xs = np.nonzero(mask)
    area, cy, cx = float(len(ys)), float(ys.mean()) + 0.5, float(xs.mean()) + 0.5
    best, best_iou = "other", 0.0
    for name in _shapes.SHAPES:
        t = _template(name, mask.shape[0], mask.shape[1], cy, cx, area)
        iou = float(np.minimum(mask, t).sum() / np.maximum(mask, t).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    return (best if best_iou >= _MIN_IOU else "other"), best_iou


def detect(image: Any) -> list[dict[str, Any]]:
    """Find the objects of one image.

    Returns:
        list of dicts with ``color``, ``shape``, centroid ``cx``/``cy`` (pixels), ``area`` (pixels) and
        ``iou`` (of the best shape template).
    """
    img = to_uint8_images([image])[0].astype(np.float32)
    h, w, _ = img.shape
    k2 = (h * w) / (32.0 * 32.0)
    chroma = img.max(-1) - img.min(-1)
    border = np.concatenate([chroma[0], chroma[-1], chroma[:, 0], chroma[:, -1]])
    thr = max(_CHROMA_MIN, float(np.median(border)) + _CHROMA_OVER_BORDER)
    eight = np.ones((3, 3), dtype=bool)
    hue_d = np.abs(_hue(img)[..., None] - _PALETTE_HUES)
    hue_d = np.minimum(hue_d, 360.0 - hue_d)
    cls = np.where(hue_d.min(-1) <= _HUE_TOL, hue_d.argmin(-1), len(_COLOR_NAMES))
    # Coarse components at the low threshold, then each refined at half its own peak chroma (the
    # half-maximum contour sits on the true edge of a blurred object and splits halo-bridged objects).
    fg = np.zeros_like(chroma, dtype=bool)
    coarse, n = ndimage.label(chroma >= thr, structure=eight)
    for lab, sl in enumerate(ndimage.find_objects(coarse), start=1):
        comp = coarse[sl] == lab
        peak = float(np.percentile(chroma[sl][comp], 90))
        fg[sl] |= comp & (chroma[sl] >= max(thr, 0.5 * peak))
    core = ndimage.binary_opening(fg, structure=eight)
    labels, n = ndimage.label(fg, structure=eight)
    out = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == lab
        if comp.sum() < _MIN_AREA * k2 or core[sl][comp].sum() < _MIN_CORE * k2:
            continue
        pad = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in sl)  # room for the templates
        comp = ndimage.binary_fill_holes(labels[pad] == lab)
        votes = np.bincount(cls[pad][comp], minlength=len(_COLOR_NAMES) + 1)
        shape, iou = _classify_shape(comp)
        ys, xs = np.nonzero(comp)
        out.append({
            "color": (_COLOR_NAMES + ["other"])[int(votes.argmax())],
            "shape": shape,
            "cx": float(xs.mean() + pad[1].start + 0.5),
            "cy": float(ys.mean() + pad[0].start + 0.5),
            "area": int(comp.sum()),
            "iou": round(iou, 3),
        })
    return out


def _relation(rel: str, a: dict, b: dict, margin: float) -> bool:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    along, cross = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along > margin and along >= 0.5 * abs(cross)


def _pair_ok(rel: str, objs: list[dict], a: _shapes.ObjectSpec, b: _shapes.ObjectSpec, exact: bool,
             margin: float) -> bool:
    def cands(o: _shapes.ObjectSpec) -> list[int]:
        hit = [i for i, d in enumerate(objs) if d["color"] == o.color and d["shape"] == o.shape]
        if hit or exact:
            return hit
        return [i for i, d in enumerate(objs) if d["color"] == o.color]

    return any(i != j and _relation(rel, objs[i], objs[j], margin) for i in cands(a) for j in cands(b))


def score_one(prompt: str, image: Any) -> dict[str, Any]:
    """Judge one image against one prompt.

    Returns:
        dict with ``kind`` (prompt type), booleans ``overall``, ``color``, ``shape``, ``count``,
        ``position`` (None unless the prompt is a relation) and ``detected`` (see :func:`detect`).
    """
    spec = _shapes.parse_prompt(prompt)
    img = to_uint8_images([image])[0]
    objs = detect(img)
    want = Counter((o.color, o.shape) for o in spec.objects)
    got = Counter((d["color"], d["shape"]) for d in objs)
    sub = lambda a, b: all(b[k] >= v for k, v in a.items())  # noqa: E731 - multiset inclusion
    res: dict[str, Any] = {
        "prompt": prompt,
        "kind": spec.kind,
        "color": sub(Counter(o.color for o in spec.objects), Counter(d["color"] for d in objs)),
        "shape": sub(Counter(o.shape for o in spec.objects), Counter(d["shape"] for d in objs)),
        "count": len(objs) == len(spec.objects),
        "position": None,
        "detected": objs,
    }
    overall = got == want
    if spec.relation is not None:
        margin = _REL_MARGIN * img.shape[1] / 32.0
        a, b = spec.objects
        res["position"] = _pair_ok(spec.relation, objs, a, b, exact=False, margin=margin)
        overall = overall and _pair_ok(spec.relation, objs, a, b, exact=True, margin=margin)
    res["overall"] = bool(overall)
    return res


def score(prompts: Sequence[str], images: Any) -> dict[str, float]:
    """Score images against their prompts (GenEval-style accuracies in [0, 1]).

    Args:
        prompts: prompts of the shapes grammar, one per image.
        images: list of PIL images or (H, W, 3) arrays, or a (N, 3, H, W)/(N, H, W, 3) array/tensor.

    Returns:
        dict with ``overall`` (fraction of prompts fully satisfied), per-criterion accuracies ``color``,
        ``shape``, ``count`` (over all prompts) and ``position`` (over relation prompts), per-type
        overall accuracies ``single``, ``counting``, ``relation`` (NaN when a type is absent), ``n`` and
        ``n_single``/``n_counting``/``n_relation``.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    imgs = to_uint8_images(images)
    prompts = list(prompts)
    if len(prompts) != len(imgs):
        raise ValueError(f"got {len(prompts)} prompts but {len(imgs)} images")
    if not prompts:
        raise ValueError("nothing to score: prompts and images are empty")
    rows = [score_one(p, im) for p, im in zip(prompts, imgs)]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    out: dict[str, float] = {"overall": mean([r["overall"] for r in rows])}
    for key in ("color", "shape", "count"):
        out[key] = mean([r[key] for r in rows])
    out["position"] = mean([r["position"] for r in rows if r["position"] is not None])
    for kind in ("single", "counting", "relation"):
        sel = [r["overall"] for r in rows if r["kind"] == kind]
        out[kind] = mean(sel)
        out[f"n_{kind}"] = len(sel)
    out["n"] = len(rows)
    return out


#: Identifier and description of the feature space used by :func:`frechet_distance`.
FEATURE_SPACE = (
    "shapes-fd-v1: every image is first area-resized to 32x32 RGB in [0, 1]; 127 dims = sqrt of its "
    "4x4x4 RGB colour histogram (64) + a fixed Gaussian random projection (numpy seed 0, N(0, 1/768)) "
    "of its 16x16 area downsample (32) + a projection (seed 1, N(0, 1/256)) of the gradient magnitude "
    "of that 16x16 grey image (16) + sqrt of histograms of its 32x32 gradient magnitude (7 bins) and "
    "chroma (8 bins)"
)
_GRAD_BINS = np.array([0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, np.inf])
_CHROMA_BINS = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, np.inf])
_FD_EPS = 1e-6
_PROJ_PIX = np.random.default_rng(0).normal(0.0, 1.0 / np.sqrt(768), (768, 32))
_PROJ_GRAD = np.random.default_rng(1).normal(0.0, 1.0 / np.sqrt(256), (256, 16))


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    """Area-average (integer factors) or nearest-neighbour resize of (H, W, C) to (side, side, C)."""
    h, w, c = img.shape
    if h % side == 0 and w % side == 0:
        return img.reshape(side, h // side, side, w // side, c).mean(axis=(1, 3))
    ys = ((np.arange(side) + 0.5) * h / side).astype(int)
    xs = ((np.arange(side) + 0.5) * w / side).astype(int)
    return img[ys][:, xs]


def _sqrt_hist(x: np.ndarray, bins: np.ndarray) -> np.ndarray:
    h = np.histogram(x, bins=bins)[0].astype(np.float64)
    return np.sqrt(h / h.sum())


def features(images: Any) -> np.ndarray:
    """Fixed, hand-made features (:data:`FEATURE_SPACE`) of a batch of images: array (N, 127)."""
    feats = []
    for im in to_uint8_images(images):
        x = _resize(im.astype(np.float64) / 255.0, 32)
        q = np.minimum((x * 4).astype(np.int64), 3)
        hist = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64)
        small = _resize(x, 16)
        gy, gx = np.gradient(small.mean(-1))
        gy32, gx32 = np.gradient(x.mean(-1))
        feats.append(np.concatenate([
            np.sqrt(hist / hist.sum()),
            small.ravel() @ _PROJ_PIX,
            np.hypot(gx, gy).ravel() @ _PROJ_GRAD,
            _sqrt_hist(np.hypot(gx32, gy32), _GRAD_BINS),
            _sqrt_hist(x.max(-1) - x.min(-1), _CHROMA_BINS),
        ]))
    return np.stack(feats)


def frechet_distance(images_a: Any, images_b: Any) -> float:
    """Fréchet distance between two image sets in the fixed feature space :data:`FEATURE_SPACE`.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with ``scipy.linalg.sqrtm`` (1e-6 is added
    to the covariance diagonals inside the square root, as always-on regularisation). Images of any
    size are accepted (features are computed on a 32x32 resize). Use the same number of images when comparing
    numbers (the estimate is biased upward for small sets; >= 200 per set is advisable).

    Raises:
        ValueError: if a set has fewer than 2 images or the inputs are not images.
    """
    fa, fb = features(images_a), features(images_b)
    if len(fa) < 2 or len(fb) < 2:
        raise ValueError(f"frechet_distance needs >= 2 images per set, got {len(fa)} and {len(fb)}")
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    eps = np.eye(len(sa)) * _FD_EPS  # histogram bins that never occur make the covariances singular
    covmean = np.real(linalg.sqrtm((sa + eps) @ (sb + eps)))
    return float(max(np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(covmean), 0.0))


def chance_baseline(n: int = 200, seed: int = _shapes.EVAL_SEED, size: int = 32) -> dict[str, float]:
    """Score real world images against shuffled prompts: the chance level of :func:`score`.

    Draws ``sample(n, seed, size)`` and pairs image ``i`` with the prompt of a random other item (a
    fixed derangement from ``seed``).
    """
    images, prompts = _shapes.sample(n, seed, size)
    rng = np.random.default_rng((seed, 0xC4A2CE))
    perm = rng.permutation(n)
    perm = np.roll(perm, 1)[np.argsort(perm)] if n > 1 else perm  # a derangement: perm[i] != i
    return score([prompts[j] for j in perm], images)


# --------------------------------------------------------------------------------------------------
# Scoring a pipeline on held-out prompts
# --------------------------------------------------------------------------------------------------

#: Zero tokens the fast evaluation call keeps (max_sequence_length; the tokenizer pads every prompt to 2).
_EVAL_ZERO_TOKENS = 2


def evaluate_pipeline(pipe, name: str, n: int = 100, seed: int = _shapes.EVAL_SEED, steps: int | None = None,
                      guidance: float | None = None, batch: int = 100, fast: bool = True,
                      return_images: bool = False) -> dict[str, Any]:
    """Score ``pipe`` on ``n`` held-out prompts (``shapes.sample_prompts(n, seed)``).

    Image ``i`` uses ``torch.Generator().manual_seed(i)``, so results do not depend on ``batch``.
    ``fast=True`` (SD3 only) runs the mathematically identical collapsed-zero-token call
    (:class:`~fastgen.zoo.attention.CollapsedZerosJointAttnProcessor`); the pipeline's own attention
    processors are restored after.

    Returns:
        :func:`score`'s dict plus ``steps``, ``guidance``, ``seconds``
        (and ``images``, a uint8 array, with ``return_images``).
    """
    import time

    import torch

    from fastgen.utils.logging import quiet_diffusers
    from fastgen.zoo import AR_MODELS, DEFAULTS, extra_call_kwargs
    from fastgen.zoo.builders import set_collapsed_zeros

    if name not in DEFAULTS or name in AR_MODELS:
        raise ValueError(f"evaluate_pipeline: {name!r} is not a shapes-world zoo model")
    d = DEFAULTS[name]  # a student (e.g. shapes-mmdit-gd) is scored with its own default call
    steps = int(steps or d["num_inference_steps"])
    guidance = float(d["guidance_scale"] if guidance is None else guidance)
    prompts = _shapes.sample_prompts(n, seed)
    is_sd3 = hasattr(pipe, "transformer") and pipe.transformer is not None
    extra: dict[str, Any] = {}
    sigmas = extra_call_kwargs(name, steps).get("sigmas")  # e.g. the sCM student's 2-step grid, at its step count
    if sigmas is not None:
        extra["sigmas"] = list(sigmas)
    saved_procs = pipe.transformer.attn_processors if is_sd3 else None
    if is_sd3 and fast:
        set_collapsed_zeros(pipe.transformer, True)
        extra["max_sequence_length"] = _EVAL_ZERO_TOKENS
    t0 = time.time()
    images = []
    try:
        with torch.no_grad(), quiet_diffusers():
            for i in range(0, n, batch):
                ps = prompts[i:i + batch]
                gens = [torch.Generator().manual_seed(j) for j in range(i, i + len(ps))]
                out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           height=d["height"], width=d["width"], output_type="np", **extra).images
                images.append(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8))
    finally:
        if is_sd3 and fast:
            pipe.transformer.set_attn_processor(saved_procs)
    imgs = np.concatenate(images)
    res: dict[str, Any] = dict(score(prompts, imgs))
    res.update(steps=steps, guidance=guidance, seconds=round(time.time() - t0, 1))
    if return_images:
        res["images"] = imgs
    return res
