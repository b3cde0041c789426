"""Generate the parts of ``docs/`` that come from the code, and check that they are current.

Two kinds of text are generated, both only from the technique registry (:func:`fastgen.list_techniques`),
the adapter families (:data:`fastgen.adapters.ADAPTERS`) and the config dataclasses' docstrings:

* ``docs/support-matrix.md``: technique x family, with each technique's example recipe, what it cannot
  stack with, and its page.
* In each technique page ``docs/techniques/<name>.md``, the block between
  ``<!-- BEGIN GENERATED: config:<name> -->`` and ``<!-- END GENERATED -->``: the recipe, families and
  stacking rules, and a table of the config fields (name, type, default, range, description) parsed from
  the config class docstring's ``Attributes:`` / ``Args:`` / ``Important args:`` / ``Args to tinker with:``
  sections. Everything outside the markers is hand-written and kept as it is.

Benchmark anchors (techniques whose ``help`` starts with ``"anchor:"``) share one page,
``docs/techniques/anchors.md``, with one generated block each.

Regenerate with ``python -m fastgen.docgen`` (or ``fastgen docs``); ``--check`` exits 1 and lists the stale
files instead of writing. Nothing here hard-codes the list of techniques.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

from .registry import list_techniques

__all__ = [
    "support_matrix", "config_fields", "parse_field_docs", "undocumented_fields", "families", "page_for",
    "render", "write", "check", "main", "BEGIN", "END", "REGENERATE",
]

#: Opening marker of a generated block (``.format(key=...)``); the block runs to :data:`END`.
BEGIN = "<!-- BEGIN GENERATED: {key} -->"
#: Closing marker of a generated block.
END = "<!-- END GENERATED -->"
#: The command that rewrites the generated files.
REGENERATE = "python -m fastgen.docgen"

_SECTION = re.compile(r"^(args|arguments|attributes|fields|parameters|important args|args to tinker with):$",
                      re.IGNORECASE)
_ENTRY = re.compile(r"^([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*(?:\([^)]*\))?:(?:\s+(.*))?$")
_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")
_UNDOCUMENTED = "**undocumented**"


# --------------------------------------------------------------------------------------------------
# config fields
# --------------------------------------------------------------------------------------------------

def _md(text: str) -> str:
    """Docstring text (reST-ish) to one line of Markdown that is safe inside a table cell."""
    text = _ROLE.sub(r"``\1``", text)
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace("|", "\\|")


def parse_field_docs(config_cls: type) -> dict[str, str]:
    """``{field name: description}`` from the class docstring's argument sections.

    An entry is ``name: text`` (or ``a, b: text`` for several fields) at the first indentation inside an
    ``Attributes:``, ``Args:``, ``Important args:`` or ``Args to tinker with:`` section; deeper-indented
    lines continue it. A section ends at a line indented no deeper than its header.
    """
    doc = inspect.getdoc(config_cls) or ""
    out: dict[str, str] = {}
    header_indent: int | None = None
    entry_indent: int | None = None
    current: list[str] = []
    text: list[str] = []

    def flush():
        if current:
            desc = " ".join(text)
            for name in current:
                out.setdefault(name, desc)

    for raw in doc.split("\n"):
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if header_indent is not None and stripped and indent <= header_indent:
            flush()
            current, text, header_indent, entry_indent = [], [], None, None
        if header_indent is None:
            if _SECTION.match(stripped):
                header_indent, entry_indent = indent, None
            continue
        if not stripped:
            continue
        if entry_indent is None:
            entry_indent = indent
        m = _ENTRY.match(stripped) if indent == entry_indent else None
        if m:
            flush()
            current = [n.strip() for n in m.group(1).split(",")]
            text = [m.group(2) or ""]
        elif current:
            text.append(stripped)
    flush()
    return out


def undocumented_fields(config_cls: type) -> list[str]:
    """The dataclass fields of ``config_cls`` that its docstring does not describe."""
    docs = parse_field_docs(config_cls)
    return [f.name for f in dataclasses.fields(config_cls) if not docs.get(f.name, "").strip()]


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    return f"`{value!r}`".replace("|", "\\|")


def _range(desc: str) -> str:
    """The value range a description states (``Range 0.3-0.6``, ``range 2-8``), or an em dash."""
    m = re.search(r"\b[Rr]ange:?\s+(.+?)(?=;|\.\s|\.$|,\s|$)", desc)
    if not m:
        return "—"
    r = m.group(1).strip()
    if r.endswith(")") and r.count(")") > r.count("("):
        r = r[:-1]
    balanced = r.count("(") == r.count(")") and r.count("`") % 2 == 0
    return r if balanced and len(r) <= 40 else "see description"


def config_fields(config_cls: type) -> str:
    """A Markdown table of ``config_cls``'s dataclass fields: name, type, default, range, description.

    Fields the docstring does not describe are listed with the description ``**undocumented**``.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass; a technique's config_cls must be a dataclass")
    docs = parse_field_docs(config_cls)
    rows = ["| field | type | default | range | description |", "|---|---|---|---|---|"]
    fields = dataclasses.fields(config_cls)
    if not fields:
        return "This technique has no settings."
    for f in fields:
        desc = _md(docs.get(f.name, ""))
        rows.append(f"| `{f.name}` | `{_md(_type_name(f.type))}` | {_default(f)} | "
                    f"{_range(desc) if desc else '—'} | {desc or _UNDOCUMENTED} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# support matrix
# --------------------------------------------------------------------------------------------------

def families() -> list[str]:
    """The adapter families, in the adapters' order (the support matrix's columns)."""
    from .adapters import ADAPTERS

    return [a.family for a in ADAPTERS]


def page_for(technique) -> str:
    """The docs page of a technique, relative to ``docs/``: ``techniques/<name>.md``; benchmark anchors
    (``help`` starting with ``"anchor:"``) share ``techniques/anchors.md``."""
    if (technique.help or "").strip().lower().startswith("anchor:"):
        return "techniques/anchors.md"
    return f"techniques/{technique.name}.md"


def _stacking(t) -> str:
    inc = dict(getattr(t, "incompatible", None) or {})
    parts = []
    if "*" in inc:
        others = tuple(getattr(t, "stacks_with", ()) or ())
        parts.append("runs alone" + (f" (except with {', '.join(f'`{o}`' for o in others)})" if others else ""))
        inc.pop("*")
    if inc:
        parts.append("not with " + ", ".join(f"`{k}`" for k in sorted(inc)))
    return "; ".join(parts) or "stacks with the rest"


def _families_of(t) -> tuple[str, ...] | None:
    fams = getattr(t, "families", None)
    return None if fams is None else tuple(fams)


def support_matrix() -> str:
    """``docs/support-matrix.md``: technique x family from the registry, with recipes and stacking rules."""
    fams = families()
    techs = list_techniques()
    lines = [
        "# Support matrix",
        "",
        f"<!-- generated by `{REGENERATE}` from the technique registry; do not edit by hand -->",
        "",
        "Which technique the registry allows on which pipeline family (✓). A technique registered with",
        "`families=None` is allowed on every family; its own check may still refuse a pipeline, and the",
        "technique's page says when. `var` is next-scale AR (`fastgen.ar`), the others are diffusers families.",
        "",
        "| technique | " + " | ".join(fams) + " |",
        "|---|" + "---|" * len(fams),
    ]
    for t in techs:
        allowed = _families_of(t)
        cells = ["✓" if allowed is None or f in allowed else "" for f in fams]
        lines.append(f"| [`{t.name}`]({page_for(t)}) | " + " | ".join(cells) + " |")
    lines += ["", "## Recipes and stacking", "",
              "| technique | example recipe | what it does | stacking |", "|---|---|---|---|"]
    for t in techs:
        example = f"`{t.example}`" if t.example else "—"
        lines.append(f"| [`{t.name}`]({page_for(t)}) | {example} | {_md(t.help or '')} | {_stacking(t)} |")
    reasons = [(t.name, k, v) for t in techs for k, v in sorted((getattr(t, "incompatible", None) or {}).items())]
    if reasons:
        lines += ["", "## Why they do not stack", ""]
        for name, other, why in reasons:
            who = "every other technique" if other == "*" else f"`{other}`"
            lines.append(f"- `{name}` with {who}: {_md(why)}")
    lines += ["", f"Regenerate with `{REGENERATE}`; `tests/test_docs.py` fails when this page is stale.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# technique pages
# --------------------------------------------------------------------------------------------------

def _config_path(cls: type) -> str:
    top = sys.modules.get("fastgen") or importlib.import_module("fastgen")
    if getattr(top, cls.__name__, None) is cls:
        return f"fastgen.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _block(t) -> str:
    fams = _families_of(t)
    fam_text = "all" if fams is None else ", ".join(f"`{f}`" for f in fams)
    head = [
        BEGIN.format(key=f"config:{t.name}"),
        f"<!-- generated by `{REGENERATE}` from the registry and the config docstring; edit those, not this -->",
        "",
        f"- **Recipe:** `{t.example or t.name}` · **config:** `{_config_path(t.config_cls)}`",
        f"- **Families:** {fam_text} ([support matrix](../support-matrix.md))",
        f"- **Stacking:** {_stacking(t)}",
        f"- **What it does:** {_md(t.help or '')}",
        "",
        config_fields(t.config_cls),
        END,
    ]
    return "\n".join(head)


def _skeleton(page: str, techs: list) -> str:
    """A new page for techniques that have none yet: the generated blocks and headings to fill in."""
    title = "Benchmark anchors" if page.endswith("anchors.md") else f"`{techs[0].name}`"
    return "\n".join([
        f"# {title}", "",
        "## When to use it", "", "TO WRITE: when this technique pays off, and what it costs.", "",
        "## Config", "", *[_block(t) + "\n" for t in techs],
        "## Measured results", "", "TO WRITE: each number with the command that reproduces it.", "",
        "## Pitfalls", "", "TO WRITE.", "",
    ])


def _fill(text: str, t) -> str:
    key = f"config:{t.name}"
    start = text.find(BEGIN.format(key=key))
    if start < 0:  # a page without this technique's block: append it
        return text.rstrip("\n") + "\n\n" + _block(t) + "\n"
    end = text.find(END, start)
    if end < 0:
        raise ValueError(f"generated block {key!r} has no closing {END!r}; add it after the block and rerun")
    return text[:start] + _block(t) + text[end + len(END):]


def _default_out_dir() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return repo / "docs" if (repo / "pyproject.toml").exists() else Path.cwd() / "docs"


def render(out_dir: str | Path | None = None) -> dict[str, str]:
    """What the generated files should contain: ``{path relative to out_dir: text}``.

    ``support-matrix.md`` in full, and every technique page with its generated blocks filled in (the
    hand-written rest is read from ``out_dir``; a missing page gets a skeleton with the headings to fill).
    """
    out = Path(out_dir) if out_dir is not None else _default_out_dir()
    files = {"support-matrix.md": support_matrix()}
    pages: dict[str, list] = {}
    for t in list_techniques():
        pages.setdefault(page_for(t), []).append(t)
    for page, techs in pages.items():
        path = out / page
        text = path.read_text(encoding="utf-8") if path.exists() else _skeleton(page, techs)
        for t in techs:
            text = _fill(text, t)
        files[page] = text
    return files


def write(out_dir: str | Path | None = None) -> list[str]:
    """Write :func:`render`'s files under ``out_dir``; returns the paths that changed."""
    out = Path(out_dir) if out_dir is not None else _default_out_dir()
    changed = []
    for rel, text in render(out).items():
        path = out / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(rel)
    return changed


def check(out_dir: str | Path | None = None) -> list[str]:
    """The generated files under ``out_dir`` that are missing or differ from :func:`render` (empty: current)."""
    out = Path(out_dir) if out_dir is not None else _default_out_dir()
    return [rel for rel, text in render(out).items()
            if not (out / rel).exists() or (out / rel).read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.docgen [--check] [--out DIR]``: write the generated docs, or check them."""
    p = argparse.ArgumentParser(prog="python -m fastgen.docgen",
                                description="Regenerate docs/support-matrix.md and the generated blocks of "
                                            "docs/techniques/*.md from the technique registry.")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the stale files")
    p.add_argument("--out", default=None, help="the docs folder (default: the repository's docs/)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else _default_out_dir()
    if args.check:
        stale = check(out)
        if stale:
            sys.stdout.write(f"stale generated docs in {out}:\n" + "".join(f"  {s}\n" for s in stale)
                             + f"regenerate with: {REGENERATE}" + (f" --out {args.out}" if args.out else "") + "\n")
            return 1
        sys.stdout.write(f"generated docs in {out} are up to date\n")
        return 0
    changed = write(out)
    sys.stdout.write(("wrote " + ", ".join(changed) if changed else "nothing to change") + f" in {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
