"""Small file helpers shared by the trainers (zoo, ar, distill, quant)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["torch_save_atomic", "load_checkpoint", "check_same_config", "Resumable", "swap_in_dir"]


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


def swap_in_dir(tmp: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Replace folder ``dst`` by the finished folder ``tmp`` (``dst`` moved aside first, deleted last), so a crash
    leaves either the old folder or the new one in place, never a half-written one. Returns ``dst``."""
    import shutil

    tmp, dst = Path(tmp), Path(dst)
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old)
    return dst


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


class Resumable:
    """Mixin for the trainers: ``save_checkpoint()`` writes ``state_dict()`` to ``OUT/checkpoint.pt``
    atomically and ``resume()`` loads it back through ``load_state_dict()`` when it exists.

    The class sets ``self.out`` (a ``Path``, or ``None`` for a run without a folder), ``state_dict()``,
    ``load_state_dict(sd)`` and optionally ``checkpoint_map_location`` and ``resumed_message()``.
    """

    out: Path | None
    checkpoint_map_location: Any = "cpu"

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - provided by the trainer
        raise NotImplementedError

    def load_state_dict(self, sd: dict[str, Any]) -> None:  # pragma: no cover - provided by the trainer
        raise NotImplementedError

    @property
    def checkpoint_path(self) -> Path:
        if self.out is None:
            raise RuntimeError(f"this {type(self).__name__} has no output folder")
        return Path(self.out) / "checkpoint.pt"

    def save_checkpoint(self) -> Path:
        """Write ``OUT/checkpoint.pt`` atomically (temp file, then ``os.replace``)."""
        return torch_save_atomic(self.state_dict(), self.checkpoint_path)

    def resumed_message(self) -> str:
        return f"at step {getattr(self, 'step', '?')}"

    def resume(self) -> bool:
        """Load ``OUT/checkpoint.pt`` if there is one; returns whether it did."""
        if self.out is None:
            return False
        sd = load_checkpoint(self.checkpoint_path, map_location=self.checkpoint_map_location)
        if sd is None:
            return False
        self.load_state_dict(sd)
        logging.getLogger(type(self).__module__).info("resumed %s %s", self.checkpoint_path, self.resumed_message())
        return True


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``from_pretrained``'s dtype keyword for the installed diffusers: ``dtype`` where it is understood
    (newer releases warn that ``torch_dtype`` is deprecated), else ``torch_dtype``."""
    try:
        from diffusers.pipelines import pipeline_utils
    except ImportError:  # pragma: no cover - diffusers is a core dependency
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}
