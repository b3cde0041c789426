"""The ``executorch`` recipe (quant/mobile.py): the denoiser runs as an ExecuTorch program — the mobile target.

Parsing, stacking rules and the hook order run everywhere; the export/runtime tests need the ``mobile`` extra
(executorch) and skip without it (CI does not install it).
"""

import importlib.util

import numpy as np
import pytest
import torch

import fastgen
from fastgen.errors import IncompatibleTechniquesError, MissingExtraError, RecipeError
from fastgen.hooks import HookBase, add_hook, remove_hook
from fastgen.testing import default_call_kwargs, tiny_pipeline
from fastgen.quant.mobile import ExecuTorchConfig, _parse

HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH, reason="needs the mobile extra (pip install 'fastgen[mobile]')")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_parse_and_round_trip():
    assert _parse(None) == ExecuTorchConfig(bits=8)
    assert _parse("fp32") == ExecuTorchConfig(bits=0)
    assert _parse("w4,g64") == ExecuTorchConfig(bits=4, group_size=64)
    for c in (ExecuTorchConfig(), ExecuTorchConfig(bits=0), ExecuTorchConfig(bits=4, group_size=16)):
        assert fastgen.parse_recipe(c.to_string()) == [c]
    with pytest.raises(RecipeError, match="unknown option 'w3'.*w8 \\(default\\), w4, fp32"):
        _parse("w3")
    with pytest.raises(ValueError, match="bits must be 8, 4"):
        ExecuTorchConfig(bits=6)


def test_techniques_inside_the_denoiser_cannot_stack():
    pipe = tiny_pipeline("sd3")
    for other in ("blockcache:0.1", "tome:0.5", "ras:0.5", "int8"):
        with pytest.raises(IncompatibleTechniquesError, match="fixed exported program.*steps, sampler, schedule, cfg-interval"):
            fastgen.accelerate(pipe, f"{other}+executorch")
    assert fastgen.summary(pipe)["recipe"] == "baseline"


@pytest.mark.skipif(HAS_EXECUTORCH, reason="executorch is installed")
def test_missing_extra_is_named():
    pipe = tiny_pipeline("sd3")
    with pytest.raises(MissingExtraError, match="mobile"):
        fastgen.accelerate(pipe, "steps:2+executorch")
    assert fastgen.summary(pipe)["recipe"] == "baseline"


class _Tag(HookBase):
    def __init__(self, log, tag, inner=False):
        super().__init__()
        self.log, self.tag = log, tag
        self.fastgen_inner = inner

    def pre_forward(self, module, *args, **kwargs):
        self.log.append(self.tag)
        return args, kwargs


def test_inner_hook_goes_under_the_hooks_already_there():
    lin = torch.nn.Linear(2, 2)
    log: list[str] = []
    add_hook(lin, _Tag(log, "outer"), "a")
    add_hook(lin, _Tag(log, "inner", inner=True), "b")
    lin(torch.zeros(1, 2))
    assert log == ["outer", "inner"]
    remove_hook(lin, "b")
    remove_hook(lin, "a")
    assert "forward" not in lin.__dict__ and not hasattr(lin, "_diffusers_hook")


def _images(pipe, **kw):
    return np.stack([np.asarray(im, dtype=np.float64) for im in pipe(**default_call_kwargs(pipe, steps=3), **kw).images])


@needs_executorch
@pytest.mark.parametrize("kind", ["sd3", "sd"])
def test_fp32_program_matches_pytorch_and_remove_restores(kind):
    pipe = tiny_pipeline(kind)
    ref = _images(pipe)
    fastgen.accelerate(pipe, "executorch:fp32")
    out = _images(pipe)
    s = fastgen.summary(pipe)["last_call"]["executorch"]
    assert s["samples"] == 2 * s["calls"] == 2 * 3  # the CFG batch runs sample by sample through one program
    (prog,) = s["programs"]
    assert prog["rel_err"] < 1e-4 and prog["quantized_layers"] == 0
    assert np.abs(out - ref).max() <= 2  # uint8 images: rounding only
    again = _images(pipe)  # the program is reused, not re-exported
    assert len(fastgen.summary(pipe)["last_call"]["executorch"]["programs"]) == 1
    assert np.array_equal(again, out)
    fastgen.remove(pipe)
    assert np.array_equal(_images(pipe), ref)
    fastgen.accelerate(pipe, "executorch:fp32")  # re-applied on unchanged weights: the same program, no export
    assert np.array_equal(_images(pipe), out)
    assert fastgen.summary(pipe)["last_call"]["executorch"]["programs"] == [prog]
    fastgen.remove(pipe)


@needs_executorch
def test_int8_program_stacks_with_step_techniques():
    pipe = tiny_pipeline("sd3")
    ref = _images(pipe)
    fastgen.accelerate(pipe, "cfg-interval:0.5+executorch:w8")
    out = _images(pipe)
    s = fastgen.summary(pipe)["last_call"]
    # cfg-interval's conditional-only steps reach the program as batch 1: same program, fewer samples
    assert s["executorch"]["samples"] < 2 * s["executorch"]["calls"]
    (prog,) = s["executorch"]["programs"]
    assert prog["quantized_layers"] > 0 and prog["rel_err"] < 0.2
    assert np.isfinite(out).all() and out.shape == ref.shape
    fastgen.remove(pipe)
    assert np.array_equal(_images(pipe), ref)
