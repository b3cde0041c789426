"""quant: LSQ quantizers, EfficientDM QALoRA (apply/remove, per-timestep tables, calibration, fine-tune,
resume), the PTQ baseline, merge and the integer safetensors format. Tiny real diffusers classes, CPU."""

import json
import math

import numpy as np
import pytest
import torch

from fastgen import quant
from fastgen.errors import RecipeError
from fastgen.testing import default_call_kwargs, tiny_pipeline
from fastgen.quant.calibration import first_tensor, replay
from fastgen.quant.quantizers import ActQuantizer, WeightQuantizer, fake_quant, weight_scales
from fastgen.quant.trainer import FinetuneConfig, QALoRATrainer, main

ZOO_TINY = {"shapes-mmdit": dict(hidden=32, layers=1, heads=2, text_hidden=16, text_layers=1),
            "shapes-unet": dict(blocks=(32, 32), heads=2, text_hidden=16, text_layers=1)}
#: W4A8 with every block layer at 4 bits (the tiny models' first/last layers dominate their error otherwise)
W4A8 = quant.QALoRAConfig(w_bits=4, a_bits=8, rank=4, eight_bit=())
W8A8 = quant.QALoRAConfig(w_bits=8, a_bits=8, rank=4, eight_bit=())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pipe(kind):
    if kind in ZOO_TINY:
        from fastgen.zoo.builders import build_pipeline

        pipe = build_pipeline(kind, ZOO_TINY[kind])
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # untrained adaLN-zero: give it an output
            torch.manual_seed(1)
            for n, p in pipe.transformer.named_parameters() if kind == "shapes-mmdit" else []:
                if "norm" in n or "proj_out" in n:
                    p.add_(0.05 * torch.randn_like(p))
        return pipe
    return tiny_pipeline(kind)


def _size(pipe):
    return {} if type(pipe).__name__ == "DiTPipeline" else {"height": 16, "width": 16}


def _capture(pipe, prompts=None, steps=3, seed=0, **kw):
    if prompts is None:
        prompts = [0] if type(pipe).__name__ == "DiTPipeline" else ["a red circle left of a blue square"]
    return quant.capture_calibration(pipe, prompts, num_inference_steps=steps, batch_size=2, seed=seed,
                                     **_size(pipe), **kw)


def _call(pipe, steps=3, **extra):
    kw = default_call_kwargs(pipe, steps=steps)
    kw.update(_size(pipe))
    kw["output_type"] = "pt" if type(pipe).__name__ == "DiTPipeline" else "latent"
    kw.update(extra)
    with torch.no_grad():
        out = pipe(**kw).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def _snapshot(model):
    return {"dicts": {n: set(m.__dict__) for n, m in model.named_modules()},
            "modules": {n: id(m) for n, m in model.named_modules()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _assert_same(a, b):
    assert a["dicts"] == b["dicts"]
    assert a["modules"] == b["modules"]
    assert a["grad"] == b["grad"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def _err(pipe, calib):
    return quant.distillation_error(pipe, calib)["rel"]


# ---------------------------------------------------------------------------------------------- quantizers


def test_weight_quantizer_grid_int_repr_and_ste():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    for bits in (8, 4, 2):
        q = WeightQuantizer(bits, 6)
        q.init_from(w, "max")
        wq = q(w)
        s = q.step.detach().view(-1, 1, 1, 1)
        lv = (wq / s).detach()
        assert torch.allclose(lv, torch.round(lv), atol=1e-4)
        lv = torch.round(lv)
        assert lv.min() >= -(2 ** (bits - 1)) and lv.max() <= 2 ** (bits - 1) - 1
        assert torch.equal(q(wq), wq)  # idempotent
        w_int, scale = q.int_repr(w)
        assert w_int.dtype == torch.int8
        assert torch.equal(w_int.float() * scale.view(-1, 1, 1, 1), wq)  # the integer form is exact
        assert (wq - w).abs().max() <= s.max() * 0.5 + 1e-6  # max init: no clipping, error <= step/2
    # STE: d wq / d w = 1 inside the range, 0 where clipped; the step gets the LSQ gradient
    q = WeightQuantizer(4, 6)
    q.init_from(w, "max")
    with torch.no_grad():
        q.step.mul_(0.5)  # now some weights are clipped
    wr = w.clone().requires_grad_(True)
    q(wr).sum().backward()
    s = q.step.detach().view(-1, 1, 1, 1)
    inside = (torch.round(w / s) >= -8) & (torch.round(w / s) <= 7)  # the rounded level is in range
    assert torch.equal(wr.grad, inside.float())
    assert 0 < inside.float().mean() < 1
    # LSQ step gradient: sum(round(x/s) - x/s inside, clip level outside) * g, g = 1/sqrt(N * qmax)
    r = torch.clamp(torch.round(w / s), -8, 7)
    manual = torch.where(inside, r - w / s, r).sum(dim=(1, 2, 3)) / math.sqrt(w[0].numel() * 7)
    assert torch.allclose(q.step.grad, manual, atol=1e-5)


def test_weight_scales_mse_beats_max_at_low_bits():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    w[0, 0] = 8.0  # an outlier
    for bits in (4, 2):
        s_max, s_mse = weight_scales(w, bits, "max"), weight_scales(w, bits, "mse")
        e = [(fake_quant(w, s[:, None], 0.0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) - w).pow(2).sum()
             for s in (s_max, s_mse)]
        assert e[1] < e[0]


def test_act_quantizer_table_rows_zero_point_and_per_sample_rows():
    q = ActQuantizer(8, symmetric=False)
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(torch.zeros(2))
    q.set_table(torch.tensor([0.01, 0.1]), torch.tensor([128.0, 10.0]))
    x = torch.linspace(-1, 3, 50).view(2, 25)
    y0, y1 = q(x, 0), q(x, 1)
    assert not torch.equal(y0, y1)
    assert torch.equal(q(torch.zeros(3), 0), torch.zeros(3))  # zero is exact (integer zero point)
    assert torch.equal(y1, fake_quant(x, torch.tensor(0.1), torch.tensor(10.0), 0, 255))
    # one row per sample
    ys = q(x, torch.tensor([1, 0]))
    assert torch.equal(ys[0], y1[0]) and torch.equal(ys[1], y0[1])
    with pytest.raises(RuntimeError, match="do not match"):
        q(x, torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="no timestep row"):
        q(x, None)
    # STE gradients reach the step and the input
    xr = x.clone().requires_grad_(True)
    q(xr, 1).sum().backward()
    assert q.step.grad[1] != 0 and q.step.grad[0] == 0 and xr.grad.abs().sum() > 0
    sym = ActQuantizer(4, symmetric=True, rows=1)
    assert sym.qmin == -8 and sym.qmax == 7 and not sym.zero_point.requires_grad


# -------------------------------------------------------------------------------------------------- config


def test_config_recipe_strings_and_validation():
    c = quant.QALoRAConfig.from_string("w4a8")
    assert (c.w_bits, c.a_bits, c.rank, c.per_timestep_act) == (4, 8, 32, True)
    c = quant.QALoRAConfig.from_string("w4a16,r16,flat,sym,max,mod,no8")
    assert (c.a_bits, c.rank, c.per_timestep_act, c.act_symmetric, c.weight_init, c.quantize_modulation, c.eight_bit) \
        == (None, 16, False, True, "max", True, ())
    assert quant.QALoRAConfig.from_string(c.to_string()) == c
    assert quant.QALoRAConfig.from_dict(c.to_dict()) == c
    for bad in ("4a8", "w9a8", "w4a8,bogus"):
        with pytest.raises(RecipeError):
            quant.QALoRAConfig.from_string(bad)
    with pytest.raises(ValueError, match="w_bits"):
        quant.QALoRAConfig(w_bits=1)
    with pytest.raises(ValueError, match="keep_fp"):
        quant.QALoRAConfig(keep_fp="pos_embed.*")
    with pytest.raises(ValueError, match="method"):
        quant.PTQConfig(method="percentile")


def test_layer_plan_defaults():
    pipe = tiny_pipeline("sd3")
    q, kept = quant.plan_layers(pipe.transformer, quant.QALoRAConfig(w_bits=4))
    assert kept["pos_embed.proj"] == "keep_fp" and kept["context_embedder"] == "keep_fp"
    assert kept["time_text_embed.timestep_embedder.linear_1"] == "keep_fp"
    assert kept["transformer_blocks.0.norm1.linear"] == "modulation"
    assert q["proj_out"].bits == "w8a8" and q["proj_out"].rank == 0  # last layer: W8A8, no LoRA
    assert q["transformer_blocks.0.attn.to_q"].bits == "w4a8" and q["transformer_blocks.0.attn.to_q"].rank == 32
    q2, _ = quant.plan_layers(pipe.transformer, quant.QALoRAConfig(quantize_modulation=True, rank=8))
    assert q2["transformer_blocks.0.norm1.linear"].rank == 8
    unet = tiny_pipeline("sd").unet
    q3, kept3 = quant.plan_layers(unet, quant.QALoRAConfig(w_bits=4))
    assert q3["conv_in"].bits == q3["conv_out"].bits == "w8a8"
    assert kept3["time_embedding.linear_1"] == "keep_fp"
    assert all(s.kind == "conv2d" for n, s in q3.items() if n.endswith("conv1"))


# --------------------------------------------------------------------------------------- apply / remove


@pytest.mark.parametrize("kind", ["sd", "sd3", "pixart", "dit", "flux", "shapes-mmdit", "shapes-unet"])
def test_apply_remove_bit_exact_and_quantized_call(kind):
    pipe = _pipe(kind)
    model = quant.get_denoiser(pipe)
    ref = _call(pipe)
    before = _snapshot(model)
    calib = _capture(pipe, steps=2)
    quant.apply_qalora(pipe, quant.QALoRAConfig(w_bits=4, a_bits=8, rank=2))
    assert quant.is_quantized(pipe) and len(quant.qalora_layers(pipe)) > 3
    with pytest.raises(RuntimeError, match="not calibrated"):
        _call(pipe)
    quant.calibrate(pipe, calib)
    out = _call(pipe)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    with quant.quant_mode(pipe, "fp"):  # the teacher: the original modules, bit-exact
        assert torch.equal(_call(pipe), ref)
    quant.remove_qalora(pipe)
    assert not quant.is_quantized(pipe)
    _assert_same(before, _snapshot(model))
    assert torch.equal(_call(pipe), ref)


def test_peft_adapters_are_refused():
    from fastgen.errors import UnsupportedPipelineError
    from peft import LoraConfig

    pipe = tiny_pipeline("sd3")
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(UnsupportedPipelineError, match="fuse"):
        quant.apply_qalora(pipe, W4A8)
    assert not quant.is_quantized(pipe)


# ------------------------------------------------------------------------------------ per-timestep tables


def test_rows_follow_the_real_timestep_for_any_step_count_and_cfg():
    pipe = tiny_pipeline("sd3")
    calib = _capture(pipe, steps=4)  # CFG batched (guidance 7 default): one call per step
    assert len(calib) == 4 and calib.records[0].kwargs["hidden_states"].shape[0] == 2
    quant.apply_qalora(pipe, W8A8)
    quant.calibrate(pipe, calib)
    ctx = quant.qalora_state(pipe).ctx
    assert ctx.keys == sorted(calib.timesteps) and len(ctx.keys) == 4
    # same schedule, CFG on: every call finds its exact row
    ctx.reset_trace()
    _call(pipe, steps=4)
    assert [exact for _, _, exact in ctx.trace] == [True] * 4
    assert [ctx.keys[r] for _, r, _ in ctx.trace] == pytest.approx([t for t, _, _ in ctx.trace])
    # other step count, CFG off (batch 1): nearest calibrated timestep
    for steps, guidance, fallbacks in ((7, 1.0, 3), (2, 7.0, 0), (5, 7.0, 3)):
        ctx.reset_trace()
        _call(pipe, steps=steps, guidance_scale=guidance)
        assert len(ctx.trace) == steps
        for t, r, _ in ctx.trace:
            assert r == min(range(4), key=lambda i: abs(ctx.keys[i] - t))
        assert quant.qalora_summary(pipe)["fallbacks"] == sum(not e for _, _, e in ctx.trace) == fallbacks

    # the row really is picked by the timestep argument: spoil row 0 of every table
    rec = calib.records[-1]
    t_key = rec.timestep
    row = ctx.keys.index(t_key)
    model = pipe.transformer
    with torch.no_grad():
        good = first_tensor(replay(model, rec))
        for layer in quant.qalora_layers(pipe).values():
            layer.a_quant.step.data[(row + 1) % 4] *= 50.0
        assert torch.equal(first_tensor(replay(model, rec)), good)  # its own row is untouched
        other = dict(rec.kwargs, timestep=torch.full_like(rec.kwargs["timestep"], ctx.keys[(row + 1) % 4]))
        spoiled = first_tensor(model(**other))
        for layer in quant.qalora_layers(pipe).values():
            layer.a_quant.step.data[(row + 1) % 4] /= 50.0
        clean = first_tensor(model(**other))
        assert not torch.allclose(spoiled, clean, atol=1e-3)


def test_per_sample_timesteps_in_one_batch():
    pipe = tiny_pipeline("sd3")
    calib = _capture(pipe, steps=3)
    quant.apply_qalora(pipe, W4A8)
    quant.calibrate(pipe, calib)
    a, b = calib.records[0], calib.records[2]
    kw = {k: (torch.cat([a.kwargs[k][:1], b.kwargs[k][:1]]) if isinstance(a.kwargs[k], torch.Tensor) else a.kwargs[k])
          for k in a.kwargs}
    with torch.no_grad():
        both = first_tensor(pipe.transformer(**kw))
        ya = first_tensor(replay(pipe.transformer, a))[:1]
        yb = first_tensor(replay(pipe.transformer, b))[:1]
    assert torch.allclose(both, torch.cat([ya, yb]), atol=1e-5)


def test_flat_tables_and_weight_only():
    pipe = tiny_pipeline("sd3")
    calib = _capture(pipe, steps=3)
    quant.apply_qalora(pipe, quant.QALoRAConfig(w_bits=8, a_bits=8, rank=0, per_timestep_act=False))
    quant.calibrate(pipe, calib)
    assert all(layer.a_quant.rows == 1 for layer in quant.qalora_layers(pipe).values())
    assert _err(pipe, calib) < 0.05
    quant.apply_qalora(pipe, quant.QALoRAConfig(w_bits=4, a_bits=None, rank=0, eight_bit=()))
    assert all(layer.a_quant is None for layer in quant.qalora_layers(pipe).values())
    assert _err(pipe, calib) < 0.2  # no calibration needed for weight-only
    quant.remove_qalora(pipe)


# ------------------------------------------------------------------------------------------ accuracy


def test_w8a8_close_w4a8_farther_and_ptq_baseline():
    pipe = tiny_pipeline("sd3")
    calib = _capture(pipe, steps=3)
    errs = {}
    for name, cfg in (("w8a8", W8A8), ("w4a8", W4A8), ("w4a4", quant.QALoRAConfig(w_bits=4, a_bits=4, eight_bit=()))):
        quant.apply_qalora(pipe, cfg)
        quant.calibrate(pipe, calib)
        errs[name] = _err(pipe, calib)
    quant.remove_qalora(pipe)
    assert errs["w8a8"] < 0.02
    assert errs["w4a8"] > 2 * errs["w8a8"] and errs["w4a4"] > errs["w4a8"]
    # PTQ is QALoRA without LoRA: same error as the untrained QALoRA start; minmax is worse than mse at W4
    quant.apply_ptq(pipe, quant.PTQConfig(w_bits=4, a_bits=8, eight_bit=()), calibration=calib)
    assert _err(pipe, calib) == pytest.approx(errs["w4a8"], rel=1e-5)
    quant.apply_ptq(pipe, quant.PTQConfig(w_bits=4, a_bits=8, eight_bit=(), method="minmax"), calibration=calib)
    assert _err(pipe, calib) > errs["w4a8"]
    quant.remove_ptq(pipe)


def test_qalora_finetune_beats_ptq_at_w4():
    """A few QALoRA steps reduce the distillation error of the PTQ start on the training calls and on
    calls of other prompts and seeds (held out)."""
    pipe = tiny_pipeline("sd3")
    calib = _capture(pipe, steps=4, prompts=["a red circle"])
    hold = _capture(pipe, steps=4, prompts=["three green triangles"], seed=100)
    tr = quant.finetune_qalora(pipe, W4A8, calibration=calib, holdout=hold, steps=20, records_per_step=2,
                               lora_lr=0.1, progress=False)
    r = tr.report
    assert r["qalora_train"]["rel"] < 0.8 * r["ptq_train"]["rel"]
    assert r["qalora_holdout"]["rel"] < 0.85 * r["ptq_holdout"]["rel"]
    assert tr.history[-1]["loss"] < tr.history[0]["loss"]
    # only LoRA and step sizes were trained: the original weights are untouched
    for layer in quant.qalora_layers(pipe).values():
        assert not layer.base.weight.requires_grad
    quant.remove_qalora(pipe)
    ref = tiny_pipeline("sd3")
    for (n, p), (_, q) in zip(pipe.transformer.named_parameters(), ref.transformer.named_parameters()):
        assert torch.equal(p, q), n


def test_feature_loss_and_unet_conv_lora_train():
    pipe = tiny_pipeline("sd")
    calib = _capture(pipe, steps=2)
    tr = QALoRATrainer(pipe, W4A8, calib, finetune=FinetuneConfig(steps=2, records_per_step=1, feature_weight=1.0))
    tr.run(progress=False)
    assert len(tr.history) == 2 and all(math.isfinite(h["loss"]) for h in tr.history)
    conv = quant.qalora_layers(pipe)["mid_block.resnets.0.conv1"]
    assert conv.lora_B.weight.abs().sum() > 0  # the conv LoRA learned something
    quant.remove_qalora(pipe)


# ----------------------------------------------------------------------------------- checkpoints / resume


def test_resume_after_kill_gives_the_same_loss_curve(tmp_path):
    fc = FinetuneConfig(steps=6, records_per_step=1, lora_lr=0.1, ckpt_every=2)

    def run(out, kill_at=None):
        pipe = tiny_pipeline("sd3")
        calib = _capture(pipe, steps=3)
        tr = QALoRATrainer(pipe, W4A8, calib, out, fc)
        resumed = tr.resume()

        def cb(t, loss):
            if kill_at is not None and t.step == kill_at:
                raise KeyboardInterrupt

        try:
            tr.run(progress=False, callback=cb)
        except KeyboardInterrupt:
            pass
        return tr, resumed

    full, _ = run(tmp_path / "a")
    killed, _ = run(tmp_path / "b", kill_at=3)
    assert killed.step == 3
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2  # the kill came before the next checkpoint
    again, resumed = run(tmp_path / "b")
    assert resumed and again.step == 6
    assert [h["loss"] for h in again.history] == [h["loss"] for h in full.history]
    assert len((tmp_path / "b" / "history.jsonl").read_text().splitlines()) == 6
    for n, p in full.named_trainable.items():
        assert torch.equal(p, again.named_trainable[n]), n


def test_merge_save_load_round_trip_exact(tmp_path):
    pipe = tiny_pipeline("sd3")
    calib = _capture(pipe, steps=3)
    tr = QALoRATrainer(pipe, W4A8, calib, finetune=FinetuneConfig(steps=3, records_per_step=1, lora_lr=0.1))
    tr.run(progress=False)
    q = _call(pipe)
    path = quant.save(pipe, tmp_path / "q.safetensors")  # un-merged: merged on the fly
    tensors, header = quant.merge(pipe)
    assert all(layer.merged and layer.lora_A is None for layer in quant.qalora_layers(pipe).values())
    assert torch.equal(_call(pipe), q)  # folding the LoRA changes nothing
    name = "transformer_blocks.0.attn.to_q"
    w_int = tensors[f"{name}.weight_int"]
    assert w_int.dtype == torch.int8 and w_int.min() >= -8 and w_int.max() <= 7
    assert tensors[f"{name}.act_scale"].shape == (3,) and tensors[f"{name}.act_zero_point"].dtype == torch.int32
    assert tensors["timesteps"].tolist() == sorted(calib.timesteps)
    assert header["layers"][name]["w_bits"] == 4 and header["layers"][name]["weight_range"] == [-8, 7]
    assert "context_embedder" not in header["layers"] and header["kept_fp"]["context_embedder"] == "keep_fp"
    h = quant.read_header(path)
    assert h["bits"] == "w4a8" and h["denoiser"] == "SD3Transformer2DModel" and name in h["layers"]
    # a fresh FP pipeline of the same architecture + the file = the same quantized outputs, bit for bit
    fresh = tiny_pipeline("sd3")
    quant.load(fresh, path)
    assert torch.equal(_call(fresh), q)
    quant.load(fresh, path, expect="w4a8,r4,no8")  # matches: fine (ranks are folded in, not compared)
    assert torch.equal(_call(fresh, steps=5), _call(pipe, steps=5))  # other step counts agree too
    quant.remove_qalora(fresh)
    assert torch.equal(_call(fresh), _call(tiny_pipeline("sd3")))


def test_mismatched_checkpoint_is_refused_with_the_layer_named(tmp_path):
    pipe = tiny_pipeline("sd3")
    calib = _capture(pipe, steps=2)
    quant.apply_qalora(pipe, W4A8)
    quant.calibrate(pipe, calib)
    path = quant.save(pipe, tmp_path / "q.safetensors")

    other = tiny_pipeline("sd3")
    ref = _call(other)
    with pytest.raises(quant.QuantCheckpointError, match=r"layer 'transformer_blocks.0.attn.to_q': checkpoint w4a8, "
                                                          r"expected w8a8"):
        quant.load(other, path, expect=quant.QALoRAConfig(w_bits=8, eight_bit=()))
    keep = quant.QALoRAConfig(w_bits=4, eight_bit=(), keep_fp=quant.DEFAULT_KEEP_FP + ("*.ff.*",))
    with pytest.raises(quant.QuantCheckpointError, match=r"layer 'transformer_blocks.0.ff.net.0.proj': quantized in "
                                                          r"the checkpoint \(w4a8\) but the expected config keeps it"):
        quant.load(other, path, expect=keep)
    with pytest.raises(quant.QuantCheckpointError, match="per_timestep_act"):
        quant.load(other, path, expect=quant.QALoRAConfig(w_bits=4, eight_bit=(), per_timestep_act=False))
    # a pipeline already quantized with other bits: its config is the expectation, and it is left as it was
    quant.apply_qalora(other, quant.QALoRAConfig(w_bits=8, a_bits=None, eight_bit=()))
    with pytest.raises(quant.QuantCheckpointError, match="checkpoint w4a8, expected w8a16"):
        quant.load(other, path)
    assert quant.qalora_state(other).config.a_bits is None
    quant.remove_qalora(other)
    assert torch.equal(_call(other), ref)
    # another architecture / another shape
    with pytest.raises(quant.QuantCheckpointError, match="UNet2DConditionModel"):
        quant.load(tiny_pipeline("sd"), path)
    wide = tiny_pipeline("sd3", transformer={"attention_head_dim": 16})
    with pytest.raises(quant.QuantCheckpointError, match=r"layer '.*': checkpoint linear \[32, 32\], model linear \[64"):
        quant.load(wide, path)
    assert not quant.is_quantized(wide)
    with pytest.raises(quant.QuantCheckpointError, match="quant.save"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        quant.load(other, tmp_path / "plain.safetensors")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_tiny_run_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--model", "tiny:sd3", "--bits", "w4a8,r2", "--out", str(out), "--steps", "2", "--prompts", "1",
            "--calib-steps", "2", "--no-progress", "--ckpt-every", "1"]
    assert main(args) == 0
    for f in ("calibration.pt", "checkpoint.pt", "history.jsonl", "report.json", "quantized.safetensors"):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    assert report["bits"] == "w4a8" and report["steps"] == 2
    with pytest.raises(SystemExit, match="--resume"):
        main(args)
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 2


def test_qalora_recipe_through_fastgen_accelerate():
    """"qalora:w8a8" is a fastgen recipe: calibrates data-free, quantizes, summary shows it, remove is bit-exact."""
    import fastgen
    from fastgen.testing import default_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("sd3")
    kw = default_call_kwargs(pipe, steps=3)
    ref = pipe(**kw, output_type="np").images
    fastgen.accelerate(pipe, "qalora:w8a8")
    assert fastgen.summary(pipe)["recipe"] == "qalora:w8a8"
    out = pipe(**default_call_kwargs(pipe, steps=3), output_type="np").images
    assert 0 < np.abs(out - ref).max() < 0.1
    fastgen.accelerate(pipe, "qalora:w4a8")  # applying again replaces it
    assert fastgen.summary(pipe)["recipe"] == "qalora:w4a8"
    fastgen.remove(pipe)
    np.testing.assert_array_equal(pipe(**default_call_kwargs(pipe, steps=3), output_type="np").images, ref)


def test_bench_ptq_cli_on_a_tiny_run(tmp_path, capsys):
    """quant.bench_ptq reads a quant.qalora run folder and reports PSNR/score of PTQ and QALoRA against FP."""
    import json as _json

    from fastgen import zoo

    if not (zoo.weights_path("shapes-mmdit") / "model_index.json").exists():
        pytest.skip("shapes-mmdit weights are not installed")
    from fastgen.bench.experiments.ptq import main as bench_main
    from fastgen.quant.trainer import main as train_main

    run = tmp_path / "q"
    assert train_main(["--model", "shapes-mmdit", "--bits", "w4a8", "--out", str(run), "--steps", "1", "--prompts", "1",
                       "--batch", "1", "--calib-steps", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert bench_main(["--run", str(run), "--bits", "w4a8", "--n", "2"]) == 0
    res = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["psnr_db"]) == {"ptq", "qalora"} and all(v > 5 for v in res["psnr_db"].values())
    assert set(res["overall"]) == {"fp", "ptq", "qalora"}
