"""Same-seed image quality against a reference: PSNR and SSIM (Wang et al. 2004), numpy only.

Images are float arrays in [0, 1], shape (H, W, C) or (N, H, W, C). SSIM uses the standard 11x11
Gaussian window (sigma 1.5), K1=0.01, K2=0.03, averaged over channels and pixels; on images smaller than
the window it falls back to the largest odd window that fits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["psnr", "ssim", "to_float_images"]


def to_float_images(images) -> np.ndarray:
    """PIL images / uint8 arrays / float arrays -> float64 array (N, H, W, C) in [0, 1]."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im) for im in images])
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C) or (H, W, C), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all images (inf when identical)."""
    a, b = to_float_images(a), to_float_images(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def _gauss_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    # separable valid-mode filter over axes 1 (H) and 2 (W) of (N, H, W, C)
    k = len(w)
    h = sum(w[i] * x[:, i : x.shape[1] - k + 1 + i] for i in range(k))
    return sum(w[i] * h[:, :, i : h.shape[2] - k + 1 + i] for i in range(k))


def ssim(a, b, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity over images, channels and positions (1.0 when identical)."""
    a, b = to_float_images(a), to_float_images(b)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {a.shape} and {b.shape}")
    win = min(win_size, a.shape[1], a.shape[2])
    win -= 1 - win % 2
    w = _gauss_window(win, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    s_aa = _filter(a * a, w) - mu_a**2
    s_bb = _filter(b * b, w) - mu_b**2
    s_ab = _filter(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)
    return float(np.mean(num / den))
