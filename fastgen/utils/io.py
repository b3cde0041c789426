"""Small file helpers shared by the trainers (zoo, ar, distill, quant)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["torch_save_atomic"]


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically: write ``<path>.tmp`` then ``os.replace`` it, so a crash mid-write
    never leaves a truncated checkpoint (the old one stays). Creates the parent folder."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
