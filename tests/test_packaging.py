"""Packaging: one installed namespace (``fastgen.*``), every package listed, old weight folders still load.

The wheel itself is built and installed into a fresh venv by ``.ci/run`` (see :func:`test_ci_checks_the_wheel`):
too slow for a unit test, and it needs the package index.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TOP_LEVEL = {"fastgen": "fastgen", "samplers": "fastgen.samplers", "distill": "fastgen.distill",
             "quant": "fastgen.quant", "apps": "fastgen.apps"}


def source_packages() -> set[str]:
    """Installed names of every folder with an ``__init__.py`` under the five top-level source folders."""
    out = set()
    for folder, name in TOP_LEVEL.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" in rel or "weights" in rel:
                continue
            out.add(".".join((name, *rel)))
    return out


def test_every_package_is_listed_and_nothing_else():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {v: k for k, v in TOP_LEVEL.items()}
    listed = set(setuptools["packages"])
    missing, extra = source_packages() - listed, listed - source_packages()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml (a wheel would miss them): {missing}"
    assert not extra, f"listed in pyproject.toml but not a package folder: {extra}"
    assert all(p == "fastgen" or p.startswith("fastgen.") for p in listed), "only the fastgen namespace is installed"


def test_installed_namespace_maps_to_the_repository_folders():
    import fastgen.apps
    import fastgen.distill
    import fastgen.quant
    import fastgen.samplers

    for mod, folder in ((fastgen.samplers, "samplers"), (fastgen.distill, "distill"), (fastgen.quant, "quant"),
                        (fastgen.apps, "apps")):
        assert Path(mod.__file__).resolve().parent == ROOT / folder
    # (that site-packages holds no top-level samplers/distill/quant/apps is checked on the built wheel in .ci/run:
    # here the repository root is on sys.path, so the folders are importable under their own names anyway)


def test_technique_entry_points_name_installed_modules():
    eps = PYPROJECT["project"]["entry-points"]["fastgen.techniques"]
    for name, target in eps.items():
        module = target.split(":")[0]
        assert module.startswith("fastgen."), f"{name}: {target} is not in the fastgen namespace"
        __import__(module)


def test_ci_checks_the_wheel():
    """The acceptance check lives in CI: build the wheel, install it in a fresh venv, import every subpackage."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip wheel" in ci or "python -m build" in ci
    assert "fastgen.samplers" in ci and "site-packages" in ci


def test_pre_0_2_weight_folder_still_loads(tmp_path, caplog):
    """A folder whose model_index.json names ``distill.models`` (fastgen < 0.2) loads, with a warning saying what
    to change; the shipped folder names ``fastgen.distill.models``."""
    from fastgen import zoo

    src = zoo.weights_path("shapes-mmdit-gd")
    if not (src / "model_index.json").exists():
        pytest.skip("shapes-mmdit-gd weights are not shipped in this install")
    spec = json.loads((src / "model_index.json").read_text())
    assert spec["transformer"][0] == "fastgen.distill.models"
    old = tmp_path / "old-gd"
    shutil.copytree(src, old)
    spec["transformer"][0] = "distill.models"
    (old / "model_index.json").write_text(json.dumps(spec))
    log = logging.getLogger("fastgen")  # fastgen's logger tree does not propagate to the root: listen on it
    log.addHandler(caplog.handler)
    try:
        pipe = zoo.load_pipeline(old)
    finally:
        log.removeHandler(caplog.handler)
    assert type(pipe.transformer).__module__ == "fastgen.distill.models"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "distill.models" in msg and "fastgen.distill.models" in msg and "model_index.json" in msg
