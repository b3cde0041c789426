"""Token gather/scatter helpers shared by the token-level caches (RAS).

Everything works on *flat rows*: a ``[B, N, D]`` tensor is seen as ``[B*N, D]`` and a per-sample index
``idx [B, k]`` becomes the row list ``b*N + idx[b]`` (:func:`flat_rows`). ``index_select``/``index_copy_``
on contiguous rows are the cheapest gather/scatter PyTorch has on CPU and GPU, and they let every sample
of a batch keep its own token selection.

Patch layout: :func:`image_to_tokens`/:func:`tokens_to_image` convert a latent ``[B, C, H, W]`` to
tokens ``[B, h*w, p*p*C]`` (features ordered ``(p_row, p_col, C)``, row-major tokens) and back; with
``h=1`` the latter lays ``k`` selected tokens out as a one-token-high "strip" image, which a model whose
patch embedding is per patch processes exactly like the same patches inside the full grid.
"""

from __future__ import annotations

import torch

__all__ = ["flat_rows", "gather_rows", "scatter_rows", "scatter_rows_", "image_to_tokens", "tokens_to_image"]


def flat_rows(idx_BK: torch.Tensor, n: int) -> torch.Tensor:
    """Row numbers ``b*n + idx[b, j]`` of a ``[B, n, ...]`` tensor viewed as ``[B*n, ...]`` (shape ``[B*k]``)."""
    b = idx_BK.shape[0]
    offset = torch.arange(b, device=idx_BK.device, dtype=idx_BK.dtype)[:, None] * n
    return (idx_BK + offset).reshape(-1)


def gather_rows(x_BND: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """``x[b, idx[b]]`` for every sample: ``[B, N, *F]`` -> ``[B, k, *F]`` (``rows`` from :func:`flat_rows`)."""
    b, n = x_BND.shape[:2]
    feat = x_BND.shape[2:]
    return x_BND.reshape(b * n, *feat).index_select(0, rows).view(b, k, *feat)


def scatter_rows_(buf_BND: torch.Tensor, rows: torch.Tensor, x_BKD: torch.Tensor) -> torch.Tensor:
    """In place: ``buf[b, idx[b]] = x[b]``; ``buf`` must be contiguous. Returns ``buf``."""
    b, n = buf_BND.shape[:2]
    feat = buf_BND.shape[2:]
    buf_BND.view(b * n, *feat).index_copy_(0, rows, x_BKD.reshape(-1, *feat).to(buf_BND.dtype))
    return buf_BND


def scatter_rows(base_BND: torch.Tensor, rows: torch.Tensor, x_BKD: torch.Tensor) -> torch.Tensor:
    """A new tensor equal to ``base`` with ``[b, idx[b]]`` replaced by ``x[b]`` (``base`` is not modified)."""
    return scatter_rows_(base_BND.clone(memory_format=torch.contiguous_format), rows, x_BKD)


def image_to_tokens(x_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    """Patchify ``[B, C, H, W]`` into ``[B, (H/p)*(W/p), p*p*C]`` (features ``(p_row, p_col, C)``)."""
    b, c, hh, ww = x_BCHW.shape
    h, w = hh // p, ww // p
    return x_BCHW.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)


def tokens_to_image(t_BNF: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`image_to_tokens`: ``[B, h*w, p*p*C]`` -> ``[B, C, h*p, w*p]`` (``h=1``: a strip)."""
    b, n, f = t_BNF.shape
    c = f // (p * p)
    return t_BNF.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)
