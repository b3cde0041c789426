"""The library's import graph points one way: no import cycles, no importing another module's private names, and
the core never imports training, the app or the benchmark.

The graph is read from the source with ``ast`` (nothing is imported): every ``.py`` under ``fastgen/``,
``samplers/``, ``distill/``, ``quant/`` and ``apps/``, named as installed (``quant/io.py`` ->
``fastgen.quant.io``). Every ``import`` counts wherever it is written (module level, inside a function, under
``if TYPE_CHECKING:``): a function-level import still ties the two modules together.

Rules:

* **cycles**: no strongly connected group of two or more modules. An edge from a package to one of its own
  submodules (``fastgen.quant`` -> ``fastgen.quant.io``, a package re-exporting its parts) is left out of
  the cycle search, so a submodule may still import its package's public names.
* **private names**: ``from X import _name`` where ``_name`` is not a submodule of ``X`` and ``X`` is another
  module. A package importing a private name of its own submodule is cross-module too.
* **direction**: the core (``fastgen/__init__.py`` and the modules directly in ``fastgen/``, ``fastgen/caches/``,
  ``fastgen/ar/``) imports nothing from ``fastgen.distill``, ``fastgen.quant``, ``fastgen.zoo.train``,
  ``fastgen.apps`` or ``fastgen.bench``. The command-line front ends ``fastgen.cli`` and ``fastgen.tune``
  (which drive training, the app and the benchmark by design) are not core. The core reaches the optional
  techniques (quant's recipes, distill's ``gd``) only through the registry's plugin names, never an import.

``KNOWN`` lists the violations that other branches remove; the test fails on any violation not in it and on
any entry of it that no longer occurs, so the list can only shrink.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Source folder -> installed package name (pyproject's package-dir).
TOP_LEVEL = {"fastgen": "fastgen", "samplers": "fastgen.samplers", "distill": "fastgen.distill",
             "quant": "fastgen.quant", "apps": "fastgen.apps"}

#: Packages the core may not import (a module of them, or the package itself).
FORBIDDEN_FOR_CORE = ("fastgen.distill", "fastgen.quant", "fastgen.zoo.train", "fastgen.apps", "fastgen.bench")
#: Top-level fastgen modules that are front ends, not core (see the module docstring).
FRONT_ENDS = ("fastgen.cli", "fastgen.tune")

# Violations that belong to other branches and vanish when they merge. The lead empties this list at merge time;
# an entry that no longer occurs fails the test (delete it), so nothing can hide here.
KNOWN: set[str] = set()  # violations other branches were still to remove (empty since the merge)


# --------------------------------------------------------------------------------------------------
# Reading the graph
# --------------------------------------------------------------------------------------------------


def installed_name(name: str) -> str:
    """An absolute dotted name as installed: the repository's old top-level names map into ``fastgen``."""
    head, _, rest = name.partition(".")
    if head in TOP_LEVEL:
        return TOP_LEVEL[head] + ("." + rest if rest else "")
    return name


def library_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Installed module name -> (file, is a package ``__init__``) for every library ``.py`` under ``root``."""
    out: dict[str, tuple[Path, bool]] = {}
    for folder in TOP_LEVEL:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts.pop()
            out[installed_name(".".join(parts))] = (path, is_pkg)
    return out


def _known_prefix(name: str, modules) -> str | None:
    """``name`` or its longest dotted prefix that is a library module (None for third-party names)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    """The absolute module a ``from ... import`` in ``module`` names (``level`` dots, then ``target``)."""
    if level == 0:
        return installed_name(target or "")
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def read_graph(root: Path) -> tuple[dict[str, set[str]], set[str], dict[str, tuple[Path, bool]]]:
    """``(edges, private imports, modules)``: module -> library modules it imports, ``"M imports X._name"`` lines,
    and :func:`library_modules`."""
    modules = library_modules(root)
    edges: dict[str, set[str]] = defaultdict(set)
    private: set[str] = set()
    for mod, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _known_prefix(installed_name(alias.name), modules)
                    if target is not None and target != mod:
                        edges[mod].add(target)
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(mod, is_pkg, node.level, node.module)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in modules:  # "from pkg import submodule"
                        if sub != mod:
                            edges[mod].add(sub)
                        continue
                    target = _known_prefix(source, modules)
                    if target is None or target == mod:
                        continue
                    edges[mod].add(target)
                    name = alias.name
                    if name.startswith("_") and not name.startswith("__"):
                        private.add(f"{mod} imports {source}.{name}")
    return dict(edges), private, modules


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan, iterative), package -> own submodule
    edges left out."""
    graph = {m: sorted(t for t in ts if not t.startswith(m + ".")) for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return sorted(groups)


def is_core(module: str, root: Path, path: Path) -> bool:
    """``fastgen/__init__.py``, a ``fastgen/*.py`` file other than the front ends, or anything under
    ``fastgen/caches/`` or ``fastgen/ar/``."""
    rel = path.relative_to(root).parts
    if rel[0] != "fastgen" or module in FRONT_ENDS:
        return False
    return len(rel) == 2 or rel[1] in ("caches", "ar")


def _is_forbidden(target: str) -> bool:
    return any(target == f or target.startswith(f + ".") for f in FORBIDDEN_FOR_CORE)


def violations(root: Path) -> set[str]:
    """Every rule break of the library under ``root``, one line each (the format of :data:`KNOWN`)."""
    edges, private, modules = read_graph(root)
    out = {"cycle: " + ", ".join(group) for group in find_cycles(edges)}
    out |= {"private: " + p for p in private}
    out |= {f"direction: {m} -> {t}" for m, ts in edges.items() if is_core(m, root, modules[m][0])
            for t in ts if _is_forbidden(t)}
    return out


# --------------------------------------------------------------------------------------------------
# The checker itself catches what it should (a small tree with one break of each kind)
# --------------------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_each_kind_of_break(tmp_path):
    _write(tmp_path, {
        "fastgen/__init__.py": "",
        "fastgen/api.py": "def f():\n    from fastgen.bench import runner\n",  # core -> bench (function level)
        "fastgen/bench/__init__.py": "",
        "fastgen/bench/runner.py": "",
        "fastgen/caches/__init__.py": "",
        "fastgen/caches/a.py": "from .b import _helper\n",  # private across modules
        "fastgen/caches/b.py": "_helper = 1\n",
        "quant/__init__.py": "from .io import _secret\nfrom . import io\n",  # a package taking its submodule's private
        "quant/io.py": "_secret = 1\nfrom .qalora import x\n",
        "quant/qalora.py": "x = 1\nif __name__ == '__main__':\n    from fastgen.quant.trainer import main\n",
        "quant/trainer.py": "from .io import save\nfrom fastgen.quant import qalora\n",  # io -> qalora -> trainer -> io
        "apps/__init__.py": "",
        "apps/app.py": "import fastgen.cli\n",
        "fastgen/cli.py": "from fastgen.apps import app\nfrom fastgen.bench import runner\n",  # front end: may use bench
    })
    found = violations(tmp_path)
    assert found == {
        "cycle: fastgen.apps.app, fastgen.cli",
        "cycle: fastgen.quant.io, fastgen.quant.qalora, fastgen.quant.trainer",
        "private: fastgen.caches.a imports fastgen.caches.b._helper",
        "private: fastgen.quant imports fastgen.quant.io._secret",
        "direction: fastgen.api -> fastgen.bench.runner",
    }, sorted(found)


def test_checker_allows_the_legal_shapes(tmp_path):
    _write(tmp_path, {
        "fastgen/__init__.py": "from . import api\nfrom .api import run\n",
        "fastgen/api.py": "from fastgen import errors\nfrom . import _impl\nfrom ._impl import go as run\n",
        "fastgen/_impl.py": "def go(): ...\n",
        "fastgen/errors.py": "import fastgen\n",  # submodule -> its package: not a cycle of design
        "fastgen/zoo/__init__.py": "def f():\n    from fastgen.zoo import train\n",
        "fastgen/zoo/train.py": "import fastgen.distill.x\nimport torch\nfrom torch import _C\n",  # zoo is not core
        "distill/__init__.py": "",
        "distill/x.py": "from fastgen.api import run\n",
    })
    assert violations(tmp_path) == set()


# --------------------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library_violations() -> set[str]:
    return violations(ROOT)


def test_reads_the_whole_library():
    edges, _, modules = read_graph(ROOT)
    for name in ("fastgen", "fastgen.api", "fastgen.caches.tome", "fastgen.ar.var", "fastgen.samplers",
                 "fastgen.distill.recipe", "fastgen.quant.trainer", "fastgen.apps.app", "fastgen.zoo.train"):
        assert name in modules, name
    assert not any(m.split(".")[0] in ("samplers", "distill", "quant", "apps") for m in modules)
    # function-level imports count: the fine-tune CLI runs from quant.qalora's __main__ block
    assert "fastgen.quant.trainer" in edges["fastgen.quant.qalora"]


def test_no_new_violations(library_violations):
    new = sorted(library_violations - KNOWN)
    assert not new, "import-graph rule breaks (see this test's docstring for the rules):\n" + "\n".join(new)


def test_known_list_is_current(library_violations):
    gone = sorted(KNOWN - library_violations)
    assert not gone, "these KNOWN entries no longer occur; delete them from tests/test_import_graph.py:\n" + "\n".join(gone)
