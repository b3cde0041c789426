"""Small file helpers shared by the trainers (zoo, ar, distill, quant)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["torch_save_atomic", "load_checkpoint", "check_same_config"]


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


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The dict saved by :func:`torch_save_atomic` at ``path``, or ``None`` when there is no such file
    (a fresh run). Loads with ``weights_only=False``: only open checkpoints your own runs wrote."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)


def _as_json(d: Any) -> Any:
    # tuples -> lists, non-JSON values -> str, so a config saved as a dict compares equal to asdict() now
    return json.loads(json.dumps(d, default=str))


def check_same_config(saved: Mapping[str, Any], now: Mapping[str, Any], *, free: Iterable[str] = (),
                      defaults: Mapping[str, Any] | None = None, what: str = "settings") -> None:
    """Refuse to resume a run whose checkpoint was made with other settings.

    ``saved`` is the config stored in the checkpoint, ``now`` this run's (both ``asdict`` dicts). Keys in
    ``free`` (run length, cadences, device) may differ. ``defaults`` fills keys the checkpoint predates
    (fields added to the config later), so old checkpoints stay resumable. Raises ``ValueError`` listing
    every differing key as ``{key: (checkpoint, now)}``.
    """
    saved_j = _as_json({**(defaults or {}), **dict(saved)})
    now_j = _as_json(dict(now))
    free = set(free)
    diff = {k: (saved_j.get(k), v) for k, v in now_j.items() if k not in free and saved_j.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume: the checkpoint was made with different {what} (checkpoint vs now): {diff}")
