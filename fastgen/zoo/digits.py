"""The handwritten-digits world of the zoo's ``digits-var``, and its scorer.

Data: scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1797 greyscale 8x8 images, 16
grey levels, classes 0-9; nothing is downloaded). Images are scaled to ``[0, 1]`` and upsampled
bilinearly to 32x32 px (:func:`load`). A **fixed split** (a permutation drawn with seed 0) holds out 40 %
of the images (718, ``"heldout"``); the other 1079 (``"train"``) are what the VAR is trained on.

Scorer (:func:`score`): a small MLP classifier (scikit-learn ``MLPClassifier``, one hidden layer of 128
ReLU units, ``random_state=0``) trained on the **held-out** images only, on a 16x16 area-downsampled grey
version of each image (the mean of the RGB channels). It trains in about a second on first use and is
kept for the process (:func:`classifier`). Measured: 97.6 % accuracy on the real ``"train"`` images,
which it never saw (:func:`reference_scores`).

* ``accuracy``: fraction of images the classifier assigns to the intended class.
* ``fid``: Fréchet distance between the classifier's hidden-layer features (128-d) of the images and of
  the real held-out images (``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``). The estimate is
  biased upward for small sets: compare numbers computed on the same number of images (>= 200 advised).

>>> from fastgen.zoo import digits
>>> x, y = digits.load("heldout"); x.shape, y.shape
((718, 32, 32), (718,))
>>> digits.score(y[:200], digits.to_rgb(x[:200]))["accuracy"] > 0.95   # doctest: +SKIP
True
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np

__all__ = ["SIZE", "SPLIT_SEED", "HELDOUT_FRACTION", "load", "to_rgb", "to_grey", "classifier", "features",
           "predict", "score", "frechet", "reference_scores", "real_stats"]

#: Side of the images in pixels.
SIZE = 32
#: Seed of the permutation that fixes the train / held-out split.
SPLIT_SEED = 0
#: Fraction of the 1797 digits held out (classifier training and the Fréchet reference).
HELDOUT_FRACTION = 0.4
#: Resolution the classifier reads (area-downsampled from the image).
_CLF_RES = 16


@lru_cache(maxsize=None)
def _all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x8 = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x32 = F.interpolate(x8, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(d.target))
    x32.setflags(write=False)
    return x32, d.target.astype(np.int64), perm


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split: ``"train"`` (1079), ``"heldout"`` (718) or ``"all"`` (1797).
    Images are float32 ``N x 32 x 32`` grey in ``[0, 1]`` (read-only copies are returned)."""
    x, y, perm = _all()
    n_hold = int(HELDOUT_FRACTION * len(y))
    if split == "train":
        idx = perm[n_hold:]
    elif split == "heldout":
        idx = perm[:n_hold]
    elif split == "all":
        idx = np.arange(len(y))
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return x[idx].copy(), y[idx].copy()


def to_rgb(grey_NHW: np.ndarray) -> np.ndarray:
    """Grey ``N x H x W`` in ``[0, 1]`` -> float32 ``N x H x W x 3`` (the channels repeated)."""
    return np.repeat(np.asarray(grey_NHW, dtype=np.float32)[..., None], 3, axis=-1)


def to_grey(images: Any) -> np.ndarray:
    """Images (uint8 or float ``[0, 1]``: ``N x H x W x 3``, ``N x 3 x H x W``, ``N x H x W`` grey, a tensor,
    or a list of PIL images/arrays) -> float32 grey ``N x 16 x 16`` in ``[0, 1]`` (channel mean, then area
    downsampling), the classifier's input."""
    import torch
    import torch.nn.functional as F

    if hasattr(images, "detach") and hasattr(images, "cpu"):
        images = images.detach().cpu().float().numpy()
    if isinstance(images, (list, tuple)):
        from .evaluate import to_uint8_images

        images = np.stack(to_uint8_images(list(images)))
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.ndim == 4:
        if arr.shape[-1] in (1, 3):
            arr = arr.mean(-1)
        elif arr.shape[1] in (1, 3):
            arr = arr.mean(1)
        else:
            raise ValueError(f"expected N x H x W x 3 or N x 3 x H x W images, got shape {arr.shape}")
    if arr.ndim != 3:
        raise ValueError(f"expected a batch of images (N x H x W [x 3]), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("images contain NaN or inf")
    if arr.min() < -0.02 or arr.max() > 1.02:
        raise ValueError(f"float images must lie in [0, 1], got [{arr.min():.3f}, {arr.max():.3f}]")
    t = torch.from_numpy(np.ascontiguousarray(arr))[:, None]
    if t.shape[-1] != _CLF_RES or t.shape[-2] != _CLF_RES:
        t = F.interpolate(t, size=(_CLF_RES, _CLF_RES), mode="area" if t.shape[-1] >= _CLF_RES else "bilinear")
    return t[:, 0].clamp(0, 1).numpy()


@lru_cache(maxsize=None)
def classifier():
    """The scorer's classifier, trained (deterministically, ~1 s) on the held-out split on first use."""
    from sklearn.neural_network import MLPClassifier

    x, y = load("heldout")
    clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=500, random_state=0)
    clf.fit(to_grey(x).reshape(len(x), -1), y)
    return clf


def features(images: Any) -> np.ndarray:
    """The classifier's hidden-layer activations (``N x 128``) of the images."""
    clf = classifier()
    g = to_grey(images).reshape(-1, _CLF_RES * _CLF_RES).astype(np.float64)
    return np.maximum(g @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def predict(images: Any) -> np.ndarray:
    """The classifier's class for each image."""
    clf = classifier()
    g = to_grey(images)
    return clf.predict(g.reshape(len(g), -1))


def frechet(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance of two feature sets (Gaussian fits; 1e-6 added to the covariance diagonals)."""
    from scipy import linalg

    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError(f"the Fréchet distance needs >= 2 samples per set, got {len(feats_a)} and {len(feats_b)}")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    sa, sb = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    eps = np.eye(len(sa)) * 1e-6
    covmean = np.real(linalg.sqrtm((sa + eps) @ (sb + eps)))
    return float(max(np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(covmean), 0.0))


@lru_cache(maxsize=None)
def real_stats() -> np.ndarray:
    """Hidden features of the real held-out images (the Fréchet reference)."""
    x, _ = load("heldout")
    return features(x)


def score(labels: Sequence[int] | np.ndarray, images: Any) -> dict[str, Any]:
    """Score generated digits against their intended classes.

    Args:
        labels: intended class of every image (``N`` ints in 0-9).
        images: ``N`` images (see :func:`to_grey` for the accepted formats), any size (resized to 16x16).

    Returns:
        ``{"accuracy", "fid", "n", "per_class"}``: intended-class accuracy, Fréchet distance to the real
        held-out digits in the classifier's feature space, the number of images and the accuracy per class.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    g = to_grey(images)
    if len(g) != len(labels):
        raise ValueError(f"got {len(labels)} labels for {len(g)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"digit labels must lie in 0-9, got {sorted(set(labels.tolist()))}")
    pred = predict(g)
    per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    return {"accuracy": float((pred == labels).mean()), "fid": frechet(features(g), real_stats()),
            "n": int(len(labels)), "per_class": per_class}


def reference_scores() -> dict[str, Any]:
    """The scorer on real images: the ``"train"`` split (never seen by the classifier) -- what a perfect
    generator of the training data would get."""
    x, y = load("train")
    return score(y, x)
