"""quant.deploy (real int8 kernels: dynamic / static with QALoRA's per-timestep scales, the int8 recipe) and
quant.export (ExecuTorch .pte, ONNX QDQ), run back through their runtimes. Tiny real diffusers classes, CPU.
Speed is not tested here: ``fastgen experiment int8`` measures it."""

import importlib.util

import pytest
import torch
import torch.nn as nn

import fastgen
from fastgen import quant
from fastgen.cli import main as cli_main
from fastgen.errors import RecipeError, UnsupportedPipelineError
from fastgen.quant.deploy import Int8Config, Int8Linear, int8_state
from fastgen.quant.export import ExportError

TINY = dict(hidden=32, layers=1, heads=2, text_hidden=16, text_layers=1)
CALL = dict(prompt="a red circle", num_inference_steps=4, height=32, width=32, max_sequence_length=2)
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_ET = importlib.util.find_spec("executorch") is not None and HAS_TORCHAO


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pipe():
    from fastgen.zoo.builders import build_pipeline
    from fastgen.bench.experiments.int8 import _perturb_adaln

    pipe = build_pipeline("shapes-mmdit", TINY)
    _perturb_adaln(pipe.transformer)  # untrained adaLN-zero outputs 0
    return pipe


@pytest.fixture(scope="module")
def zoo():
    pipe = _pipe()
    return pipe, quant.capture_denoiser_inputs(pipe, CALL, index=1, steps=4)


def _run(pipe, inputs):
    with torch.no_grad():
        return pipe.transformer(**inputs)[0]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, ref):
    sd = model.state_dict()
    return set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


# --------------------------------------------------------------------------------------------------
# int8 kernels
# --------------------------------------------------------------------------------------------------


def test_int8_linear_is_integer_math():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    w_int = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    scale = torch.rand(48) * 0.01 + 1e-3
    layer = Int8Linear("x", w_int, scale, lin.bias)
    x = torch.randn(2, 5, 64)
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / s), -127, 127)
    expected = (xq @ w_int.float().t()) * s * scale + lin.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.weight_t.dtype == torch.int8


def test_dynamic_close_to_fp32_and_remove_bit_exact(zoo):
    pipe, inputs = zoo
    ref = _run(pipe, inputs)
    sd = _state(pipe.transformer)
    quant.to_int8(pipe, "dynamic", compile=False)
    s = quant.int8_summary(pipe)
    assert s["mode"] == "dynamic" and s["layers_int8"] > 0 and s["int8_bytes"] > 0
    assert any(isinstance(m, Int8Linear) for m in pipe.transformer.modules())
    mem = quant.weight_memory(pipe)
    y = _run(pipe, inputs)
    assert 0 < _rel(y, ref) < 0.05
    quant.remove_int8(pipe)
    assert not quant.is_int8(pipe) and not any(isinstance(m, Int8Linear) for m in pipe.transformer.modules())
    assert torch.equal(_run(pipe, inputs), ref) and _same_state(pipe.transformer, sd)
    assert mem["total"] < quant.weight_memory(pipe)["total"]


def test_static_uses_qalora_per_timestep_scales(zoo):
    pipe, inputs = zoo
    fp = _run(pipe, inputs)
    quant.quantize(pipe, quant.QALoRAConfig(w_bits=8, a_bits=8, rank=0, eight_bit=()),
                   prompts=["a red circle", "two blue squares"], num_inference_steps=4, height=32, width=32,
                   max_sequence_length=2)
    try:
        sd = _state(pipe.transformer)
        st = quant.qalora_state(pipe)
        assert len(st.ctx.keys) >= 4  # one activation row per calibrated timestep
        other = dict(inputs, timestep=torch.full_like(inputs["timestep"], st.ctx.keys[0]))
        fq, fq_other = _run(pipe, inputs), _run(pipe, other)
        quant.to_int8(pipe, "static", compile=False)
        y, y_other = _run(pipe, inputs), _run(pipe, other)
        # the integer GEMM reproduces QALoRA's fake quantization at each timestep (its own table row)
        assert _rel(y, fq) < 1e-5 and _rel(y_other, fq_other) < 1e-5
        rows = int8_state(pipe).rows
        assert [r for _, r, _ in rows.trace] == [st.ctx.nearest(float(inputs["timestep"][0]))[0], 0]
        layer = next(m for m in pipe.transformer.modules() if isinstance(m, Int8Linear))
        assert layer.static and layer.act_scale.numel() == len(st.ctx.keys)
        # another row's scales give another output: the tables are really used
        rows.select = lambda t: setattr(rows, "index", torch.tensor([len(st.ctx.keys) - 1]))
        assert _rel(_run(pipe, other), fq_other) > 1e-4
        del rows.select
        assert quant.int8_summary(pipe)["timestep_rows"] == len(st.ctx.keys)
        assert 0 < _rel(y, fp) < 0.1
        quant.remove_int8(pipe)
        assert torch.equal(_run(pipe, inputs), fq) and _same_state(pipe.transformer, sd)
    finally:
        quant.remove_int8(pipe)
        quant.remove_qalora(pipe)
    assert torch.equal(_run(pipe, inputs), fp)


def test_static_needs_tables_and_errors_are_clear(zoo):
    pipe, _ = zoo
    with pytest.raises(UnsupportedPipelineError, match="quant.quantize"):
        quant.to_int8(pipe, "static", compile=False)
    assert not quant.is_int8(pipe)
    with pytest.raises(UnsupportedPipelineError, match="fp8 needs a CUDA GPU"):
        quant.to_int8(pipe, "fp8", compile=False)
    with pytest.raises(UnsupportedPipelineError, match="no Linear layer"):
        quant.to_int8(nn.Sequential(nn.Conv2d(3, 3, 1)), "dynamic", compile=False)
    with pytest.raises(RecipeError, match="unknown int8 option"):
        fastgen.parse_recipe("int8:bogus")
    assert Int8Config.from_string("static,torchao,eager").to_string() == "static,torchao,eager"


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (extra 'quant')")
def test_torchao_backend(zoo):
    pipe, inputs = zoo
    ref = _run(pipe, inputs)
    quant.to_int8(pipe, "dynamic", compile=False, backend="torchao")
    try:
        assert 0 < _rel(_run(pipe, inputs), ref) < 0.05
    finally:
        quant.remove_int8(pipe)
    assert torch.equal(_run(pipe, inputs), ref)


def test_int8_recipes_through_accelerate(zoo):
    pipe, inputs = zoo
    ref = _run(pipe, inputs)
    sd = _state(pipe.transformer)
    for recipe in ("int8:dynamic,eager", "int8:static,eager"):
        fastgen.accelerate(pipe, recipe)
        assert fastgen.summary(pipe)["recipe"] == recipe
        y = _run(pipe, inputs)
        assert 0 < _rel(y, ref) < 0.1
        pipe(**{k: v for k, v in CALL.items() if k != "num_inference_steps"}, num_inference_steps=2,
             output_type="latent")
        assert fastgen.summary(pipe)["last_call"]["int8"]["layers_int8"] > 0
        fastgen.remove(pipe)
        assert not quant.is_int8(pipe) and not quant.is_quantized(pipe)  # static's own calibration is gone too
        assert torch.equal(_run(pipe, inputs), ref) and _same_state(pipe.transformer, sd)


@pytest.mark.slow
def test_compiled_int8_matches_eager_and_removes(zoo):
    pipe, inputs = zoo
    ref = _run(pipe, inputs)
    quant.to_int8(pipe, "dynamic", compile=False)
    eager = _run(pipe, inputs)
    quant.to_int8(pipe, "dynamic", compile=True)
    assert quant.int8_summary(pipe)["compiled_modules"] >= 1
    assert _rel(_run(pipe, inputs), eager) < 1e-4
    quant.remove_int8(pipe)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in pipe.transformer.modules())
    assert torch.equal(_run(pipe, inputs), ref)
    # static: the compiled blocks read the timestep row chosen per call (no stale row baked in)
    quant.quantize(pipe, "w8a8,r0,no8", prompts=["a red circle"], num_inference_steps=4, height=32, width=32,
                   max_sequence_length=2)
    try:
        keys = quant.qalora_state(pipe).ctx.keys
        calls = [dict(inputs, timestep=torch.full_like(inputs["timestep"], k)) for k in (keys[0], keys[-1])]
        quant.to_int8(pipe, "static", compile=False)
        eager = [_run(pipe, c) for c in calls]
        quant.to_int8(pipe, "static", compile=True)
        for c, e in zip(calls + calls, eager + eager):
            assert _rel(_run(pipe, c), e) < 1e-4
    finally:
        quant.remove_int8(pipe)
        quant.remove_qalora(pipe)


# --------------------------------------------------------------------------------------------------
# Mobile export
# --------------------------------------------------------------------------------------------------


class _Erfinv(nn.Module):
    def forward(self, x):
        return torch.special.erfinv(torch.tanh(x) * 0.5)


class _BadDenoiser(nn.Module):
    """A small denoiser with one layer (``post``) whose op no ExecuTorch kernel / ONNX op covers."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.post = _Erfinv()

    def forward(self, hidden_states, timestep, return_dict=False):
        return (self.post(self.proj(hidden_states)) * timestep[:, None, None],)


def _bad_inputs():
    return {"hidden_states": torch.randn(2, 8, 32), "timestep": torch.ones(2), "return_dict": False}


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxscript/onnxruntime not installed (extra 'mobile')")
def test_onnx_export_runs_in_onnxruntime(zoo, tmp_path):
    pipe, inputs = zoo
    rep = quant.export_onnx(pipe, tmp_path / "fp.onnx", qdq_int8=False, inputs=inputs, repeats=1)
    assert rep.rel_err < 1e-4 and rep.runtime_ms > 0
    rep = quant.export_onnx(pipe, tmp_path / "q.onnx", mode="static", inputs=inputs,
                            calibration=quant.capture_denoiser_calls(pipe, CALL, steps=4), repeats=1)
    assert rep.portable_ops.get("QuantizeLinear", 0) > 0 and rep.quantized_layers > 0
    assert 0 < rep.rel_err < 0.1 and (tmp_path / "q.fp32.onnx").exists()
    assert "onnx:" in rep.format()


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxscript/onnxruntime not installed (extra 'mobile')")
def test_onnx_unsupported_layer_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"erf_inv \(from layer 'post' \(_Erfinv\)\) has no ONNX translation"):
        quant.export_onnx(_BadDenoiser(), tmp_path / "bad.onnx", qdq_int8=False, inputs=_bad_inputs())


@pytest.mark.slow  # ~35 s on 2 cores: importing executorch's XNNPACK backend and lowering take most of it
@pytest.mark.skipif(not HAS_ET, reason="executorch/torchao not installed (extra 'mobile'; not installed in CI)")
def test_executorch_export_runs_and_names_unsupported_ops(zoo, tmp_path):
    pipe, inputs = zoo
    rep = quant.export_executorch(pipe, tmp_path / "m.pte", 8, inputs=inputs, repeats=1)
    assert (tmp_path / "m.pte").stat().st_size == rep.bytes > 0
    assert rep.quantized_layers > 0 and rep.delegate_segments > 0
    assert "aten::native_layer_norm" in rep.portable_ops  # XNNPACK cannot take it: portable kernel
    assert 0 < rep.rel_err < 0.05 and rep.runtime_ms > 0
    with pytest.raises(ExportError, match=r"aten::erfinv \(from layer 'post' \(_Erfinv\)\): it is not in the Core ATen op set"):
        quant.export_executorch(_BadDenoiser(), tmp_path / "bad.pte", 8, inputs=_bad_inputs())


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_export_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import fastgen.cli as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "executorch" else real(name, *a))
    rc = cli_main(["export", "--model", "tiny-sd3", "--target", "executorch", "--out", str(tmp_path / "m.pte")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'fastgen[mobile]'" in err and len(err.strip().splitlines()) == 1


def test_cli_export_int8_safetensors(capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    rc = cli_main(["export", "--model", "tiny-sd3", "--target", "int8", "--out", str(out), "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists() and "w8a8 integer safetensors" in text
    assert quant.read_header(out)["bits"] == "w8a8"
    assert "vs the quantized PyTorch model" in text
