"""The one ``fastgen`` command: every train kind and experiment has --help with an example, argument errors are one
line with exit status 2, and ``fastgen train/experiment`` hand their arguments to the module's own ``main``."""

import pytest

from fastgen import cli


def _help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_top_level_and_group_help_list_every_kind_with_an_example(capsys):
    out = _help(capsys, ["--help"])
    for name in ("demo", "bench", "profile", "tune", "app", "export", "train", "experiment", "docs", "info"):
        assert name in out
    assert "Example:" in out
    out = _help(capsys, ["train", "--help"])
    assert all(k in out for k in cli.TRAIN) and "Example:\n  fastgen train " in out
    out = _help(capsys, ["experiment", "--help"])
    assert all(k in out for k in cli.EXPERIMENTS) and "Example:\n  fastgen experiment " in out


@pytest.mark.parametrize("kind", sorted(cli.TRAIN))
def test_train_kind_help_says_what_it_does_with_an_example(capsys, kind):
    out = _help(capsys, ["train", kind, "--help"])
    assert "Example:" in out and f"fastgen train {kind} " in out.split("Example:")[1]
    assert "--" in out.split("Example:")[0]  # the module's own options


@pytest.mark.parametrize("name", sorted(cli.EXPERIMENTS))
def test_experiment_help_says_what_it_does_with_an_example(capsys, name):
    out = _help(capsys, ["experiment", name, "--help"])
    assert f"usage: fastgen experiment {name}" in out
    assert "Example:" in out and f"fastgen experiment {name} " in out.split("Example:")[1]


@pytest.mark.parametrize("argv", [
    ["train", "zoo", "shapes-mmdit"],                      # --out missing
    ["train", "zoo", "shapes-mmdit", "--out", "x", "--bogus"],
    ["train", "nonsense"],
    ["experiment", "ras", "flops", "--ratios", "x"],
    ["experiment", "zoo-report", "no-such-model"],
    ["bench", "--steps", "x"],
    ["train"],
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and ": error: " in err[0] and "--help" in err[0], err


def test_train_forwards_arguments_to_the_module_main(monkeypatch):
    from fastgen.zoo import train

    seen = []
    monkeypatch.setattr(train, "main", lambda argv=None: seen.append(argv) or 7)
    assert cli.main(["train", "zoo", "shapes-mmdit", "--out", "runs/x", "--steps", "3"]) == 7
    assert seen == [["shapes-mmdit", "--out", "runs/x", "--steps", "3"]]


def test_forwarded_fastgen_error_is_one_line_exit_2(monkeypatch, capsys):
    from fastgen.bench.experiments import ptq
    from fastgen.errors import FastgenError

    def boom(argv=None):
        raise FastgenError("no run folder here")

    monkeypatch.setattr(ptq, "main", boom)
    assert cli.main(["experiment", "ptq", "--run", "nowhere", "--bits", "w4a8"]) == 2
    assert capsys.readouterr().err.strip() == "fastgen: error: no run folder here"


def test_docs_without_docgen_is_one_line_exit_2(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "fastgen.docgen" else real(n, *a))
    assert cli.main(["docs", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fastgen.docgen" in err[0]


def test_docs_calls_docgen_main(monkeypatch):
    import importlib.util
    import sys
    import types

    fake = types.ModuleType("fastgen.docgen")
    seen = []
    fake.main = lambda argv=None: seen.append(argv) or 1
    monkeypatch.setitem(sys.modules, "fastgen.docgen", fake)
    import fastgen

    monkeypatch.setattr(fastgen, "docgen", fake, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "fastgen.docgen" else real(n, *a))
    assert cli.main(["docs", "--check"]) == 1 and seen == [["--check"]]


def test_app_and_cli_share_the_public_default_model(monkeypatch, tmp_path):
    import fastgen.zoo as zoo
    from fastgen.apps import app
    from fastgen.models import FALLBACK_MODEL, default_model

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "none")
    assert default_model() == FALLBACK_MODEL == app.default_model() == cli.FALLBACK_MODEL


def test_technique_refusal_in_bench_is_one_line_exit_2(capsys):
    """A technique that refuses the pipeline (a plain ValueError inside the sampler) is a fastgen error line."""
    assert cli.main(["bench", "--model", "tiny-sd3", "--recipe", "sampler:ddim@8", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastgen: error: sampler:") and "flow-matching" in err
