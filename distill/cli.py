"""Command-line plumbing of the distillation trainers (``fastgen train guidance|consistency`` and
``python -m fastgen.distill.guidance|consistency``; each method's ``main`` builds its parser with these).

* :func:`add_common_args`: ``--teacher``, ``--output``, ``--resume``, ``--threads``, ``--prompts`` and one flag
  per field of the method's config dataclass (help text from the field docstrings, :func:`field_docs`);
  :func:`config_from_args` turns the parsed arguments back into the config.
* :func:`setup_cli_logging`, :func:`check_fresh_or_resume`: the common start of a run.
* :func:`run_cli`: runs a ``main`` and reports a bad teacher, setting or checkpoint in one line on stderr
  (exit status 2); ``fastgen.cli`` wraps the distillation subcommands in it.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch

from fastgen.utils.logging import log_to_stderr_with_time

from .trainer import DistillConfig

__all__ = ["add_common_args", "field_docs", "argparse_bool", "config_from_args", "setup_cli_logging",
           "check_fresh_or_resume", "run_cli"]


def add_common_args(ap, defaults: DistillConfig) -> None:
    """Add ``--teacher``, ``--output``, ``--resume`` and one flag per :class:`DistillConfig` field."""
    ap.add_argument("--teacher", required=True,
                    help="zoo name (shapes-mmdit, shapes-unet) or a local diffusers pipeline folder")
    ap.add_argument("--output", "--out", dest="output", required=True,
                    help="run folder: checkpoint.pt, history.jsonl, pipeline/ (the student), lora/")
    ap.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--prompts", dest="prompts_file", default=None, help="training prompts file (one per line)")
    docs = field_docs(type(defaults))
    choices = {"mixed_precision": ("no", "bf16", "fp16"), "t_sampling": ("uniform", "logit-normal")}
    for f in fields(defaults):
        if f.name in ("prompts_file",):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        helptext = (docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)").strip()
        if isinstance(default, bool):
            ap.add_argument(flag, dest=f.name, action=argparse_bool(), default=default, help=helptext)
        elif isinstance(default, tuple) and "tuple[int" in str(f.type):
            ap.add_argument(flag, dest=f.name, type=int, nargs="*", default=default, help=helptext)
        elif isinstance(default, tuple):
            ap.add_argument(flag, dest=f.name, type=float, nargs=len(default), default=default, help=helptext)
        else:
            typ = _field_type(f, default)
            ap.add_argument(flag, dest=f.name, type=typ, default=default, help=helptext,
                            choices=choices.get(f.name))


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings (a string literal right after a field) of a dataclass and its bases."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def _field_type(f, default):
    if default is not None:
        return type(default)
    ann = str(f.type)
    if "int" in ann:
        return int
    if "float" in ann:
        return float
    return str


def config_from_args(cls: type, args) -> DistillConfig:
    kw = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    for k, v in kw.items():
        if isinstance(v, list):
            kw[k] = tuple(v)
    return cls(**kw)


def setup_cli_logging(threads: int | None) -> None:
    log_to_stderr_with_time()
    if threads:
        torch.set_num_threads(int(threads))


def check_fresh_or_resume(out: str | os.PathLike, resume: bool) -> None:
    if not resume and (Path(out) / "checkpoint.pt").exists():
        raise SystemExit(f"{out}/checkpoint.pt exists: pass --resume to continue it or choose another --output")


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI ``main``; a bad teacher, setting or checkpoint is reported in one line (exit status 2)."""
    import sys

    from fastgen.errors import FastgenError

    try:
        return main()
    except (FastgenError, ValueError, FileNotFoundError, NotImplementedError, FloatingPointError) as e:
        sys.stderr.write(f"distill: error: {e}\n")
        return 2
