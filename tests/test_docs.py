"""The docs tree stays in step with the code: README size, one page per technique, generated docs current,
config fields documented, relative links resolve, a model card in every weight folder."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import fastgen
from fastgen import docgen

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
WEIGHTS = ROOT / "fastgen" / "zoo" / "weights"


def test_readme_is_a_front_page_with_the_ci_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md must stay <= 200 lines; move detail into docs/"
    for cmd in ("pip install torch==2.13.0", 'pip install -e ".[dev,app]"', "fastgen demo",
                'python -m pytest -m "not slow and not gpu" -q --timeout 600'):
        assert cmd in text, f"README.md lost the command {cmd!r} (CI runs it, see .ci/run)"


def test_every_registered_technique_has_a_written_page():
    for t in fastgen.list_techniques():
        page = DOCS / docgen.page_for(t)
        assert page.exists(), f"{t.name}: no page {page}; run `python -m fastgen.docgen` and write it"
        text = page.read_text(encoding="utf-8")
        assert docgen.BEGIN.format(key=f"config:{t.name}") in text, f"{page} lacks the generated block of {t.name}"
        assert "TO WRITE" not in text, f"{page} still has skeleton placeholders"
        for heading in ("## When to use", "## Measured results", "## Pitfalls"):
            assert heading in text, f"{page} lacks the section {heading!r}"


def test_anchor_techniques_share_the_anchors_page():
    anchors = [t for t in fastgen.list_techniques() if t.help.startswith("anchor:")]
    assert anchors, "expected the benchmark anchors (help 'anchor: ...') to be registered"
    assert {docgen.page_for(t) for t in anchors} == {"techniques/anchors.md"}
    assert docgen.page_for(fastgen.registry.get_technique("tome")) == "techniques/tome.md"


def test_generated_docs_are_current():
    stale = docgen.check(DOCS)
    assert not stale, f"stale generated docs: {stale}; regenerate with `{docgen.REGENERATE}`"


def test_check_reports_the_support_matrix_when_families_change(monkeypatch):
    tech = fastgen.registry.get_technique("tome")
    assert "sd3" in tech.families
    changed = dataclasses.replace(tech, families=tuple(f for f in tech.families if f != "sd3"))
    real = fastgen.registry.list_techniques
    monkeypatch.setattr(docgen, "list_techniques",
                        lambda: [changed if t.name == "tome" else t for t in real()])
    stale = docgen.check(DOCS)
    assert "support-matrix.md" in stale
    assert "techniques/tome.md" in stale  # its block lists the families too


def test_check_and_main_on_a_fresh_folder(tmp_path, capsys):
    assert docgen.main(["--check", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "support-matrix.md" in out and docgen.REGENERATE in out
    assert docgen.main(["--out", str(tmp_path)]) == 0
    assert docgen.check(tmp_path) == []
    # hand-written text outside the markers survives a regeneration
    page = tmp_path / "techniques" / "tome.md"
    page.write_text(page.read_text().replace("TO WRITE.", "Mind the small models."))
    docgen.write(tmp_path)
    assert "Mind the small models." in page.read_text()


def test_config_fields_parses_docstring_sections_and_flags_gaps():
    @dataclasses.dataclass
    class Cfg:
        """Demo.

        Important args:
            a: the first (default 1). Range 1-4.

        Args to tinker with:
            b, c: two at once
                over two lines.
        """

        a: int = 1
        b: str = "x"
        c: float = 0.5
        d: bool = False

    docs = docgen.parse_field_docs(Cfg)
    assert docs["a"].startswith("the first") and docs["c"] == "two at once over two lines."
    assert docgen.undocumented_fields(Cfg) == ["d"]
    table = docgen.config_fields(Cfg)
    assert "| `a` | `int` | `1` | 1-4 |" in table
    assert "| `d` | `bool` | `False` | — | **undocumented** |" in table


@pytest.mark.parametrize("tech", fastgen.list_techniques(), ids=lambda t: t.name)
def test_every_config_field_is_documented(tech):
    missing = docgen.undocumented_fields(tech.config_cls)
    assert not missing, (f"{tech.config_cls.__name__} ({tech.name}): fields {missing} have no entry in the class "
                         "docstring's Attributes:/Args: section")


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files():
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted(WEIGHTS.glob("*/README.md"))]


def test_relative_links_resolve():
    broken = []
    for md in _markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_every_weight_folder_has_a_model_card():
    folders = [d for d in WEIGHTS.iterdir() if d.is_dir()]
    assert folders
    missing = [d.name for d in folders if not (d / "README.md").exists()]
    assert not missing, f"weight folders without a model card (README.md): {missing}"
