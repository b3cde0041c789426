"""distill: guidance distillation (stage 1 + progressive), LCM, sCM on tiny real diffusers classes (CPU)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from fastgen.distill.trainer import DistillTrainer, step_generator, student_pipeline
from fastgen.distill.consistency import (
    LCMConfig,
    LCMTrainer,
    SCMConfig,
    SCMTrainer,
    flow_to_trigflow,
    jvp_attention,
    lcm_boundary_scalings,
    scm_call_kwargs,
    trigflow_consistency,
    trigflow_to_flow_time,
)
from fastgen.distill.guidance import GuidanceConfig, GuidanceTrainer, ProgressiveTrainer, call_kwargs_for
from fastgen.distill.models import GuidanceSD3Transformer2DModel, guidance_embedding
from fastgen.errors import UnsupportedPipelineError
from fastgen.hooks import get_state

TINY = {
    "shapes-mmdit": dict(hidden=32, layers=1, heads=2, text_hidden=16, text_layers=1),
    "shapes-unet": dict(blocks=(32, 32), heads=2, text_hidden=16, text_layers=1),
}
#: Small everything: a 4-sample teacher pool drawn with 2 teacher steps, batch 4, no eval, no progress bar.
FAST = dict(steps=4, batch=4, pool_size=4, pool_steps=2, pool_refresh=1000, progress=False, eval_prompts=0,
            ckpt_every=0, log_every=0, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give zero-initialised layers (adaLN-zero, output projections) random values so that an untrained
    teacher's output, and its conditional/unconditional difference, are not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _zoo(name: str):
    from fastgen.zoo.builders import build_pipeline

    pipe = build_pipeline(name, TINY[name])
    model = pipe.transformer if name == "shapes-mmdit" else pipe.unet
    _perturb(model)
    with torch.no_grad():  # a stronger text path, so that CFG changes the output clearly
        for n, p in model.named_parameters():
            if "attn2.to_v" in n:
                p.mul_(5.0)
    if name == "shapes-unet":  # an untrained teacher's 2-step DDIM samples explode; keep the test pool bounded
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True, clip_sample_range=2.0)
    return pipe


@pytest.fixture(scope="module")
def unet_teacher():
    return _zoo("shapes-unet")


@pytest.fixture(scope="module")
def mmdit_teacher():
    return _zoo("shapes-mmdit")


@pytest.fixture
def teacher(request, unet_teacher, mmdit_teacher):
    return {"shapes-unet": unet_teacher, "shapes-mmdit": mmdit_teacher}[request.param]


def _fixed_batch(tr: DistillTrainer) -> None:
    """Make every step of ``tr`` draw the random numbers (hence the batch) of step 0."""
    tr.generator = lambda step, stream=0: step_generator(tr.cfg.seed, 0, stream)


def _count_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _inputs(tr: DistillTrainer, b: int = 3):
    """(x, t, cond) at which to compare models."""
    fam = tr.family
    x0, cond, _ = tr.pool.batch(0, b, torch.Generator().manual_seed(1))
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.9, 0.5, 0.2])[:b] if fam.is_flow else torch.tensor([900, 500, 100])[:b]
    return x, t, cond


# --------------------------------------------------------------------------------------------------
# Guidance distillation
# --------------------------------------------------------------------------------------------------


def test_guidance_embedding_matches_diffusers_pipelines():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 0.5, 4.0, 11.0])
    for dim in (256, 32, 7):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), ref)


@pytest.mark.parametrize("teacher", ["shapes-unet", "shapes-mmdit"], indirect=True)
def test_guidance_student_at_init_equals_conditional_teacher(teacher, tmp_path):
    tr = GuidanceTrainer(teacher, GuidanceConfig(**FAST), tmp_path, zoo_name=_name(teacher))
    x, t, cond = _inputs(tr)
    with torch.no_grad():
        ref = tr.family.predict(tr.teacher_model, x, t, cond)
        for g in (1.0, 3.0, 9.0):
            out = tr.family.predict(tr.student, x, t, cond, guidance=torch.full((x.shape[0],), g))
            assert torch.equal(out, ref), g
        # and the CFG target really differs from the conditional output (the test below is not vacuous)
        _, _, uncond = tr.pool.batch(0, x.shape[0], torch.Generator().manual_seed(1))
        cfg = tr.family.cfg_predict(tr.teacher_model, x, t, cond, uncond, torch.full((x.shape[0],), 5.0))
    assert (cfg - ref).abs().max() > 1e-4


def _name(pipe) -> str:
    return "shapes-mmdit" if hasattr(pipe, "transformer") else "shapes-unet"


@pytest.mark.parametrize("teacher", ["shapes-unet", "shapes-mmdit"], indirect=True)
def test_guidance_training_reduces_loss_on_fixed_batch(teacher, tmp_path):
    cfg = GuidanceConfig(**{**FAST, "lr": 1e-3, "ema_decay": 0.0})
    tr = GuidanceTrainer(teacher, cfg, tmp_path, zoo_name=_name(teacher))
    _fixed_batch(tr)
    losses = [tr.train_step() for _ in range(6)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] > 0
    assert min(losses[-2:]) < 0.7 * losses[0], losses


@pytest.mark.parametrize("teacher", ["shapes-unet", "shapes-mmdit"], indirect=True)
def test_saved_guidance_student_loads_and_calls_denoiser_once_per_step(teacher, tmp_path):
    from fastgen import distill  # noqa: F401  (the SD3 student class must be importable: it is, via distill.models)
    from diffusers import DiffusionPipeline

    cfg = GuidanceConfig(**{**FAST, "steps": 1, "lr": 1e-3, "ema_decay": 0.5})
    tr = GuidanceTrainer(teacher, cfg, tmp_path, zoo_name=_name(teacher))
    tr.run(save=True, final_eval=False)
    path = tmp_path / "pipeline"
    meta = json.loads((path / "fastgen_zoo.json").read_text())
    assert meta["distill"]["method"] == "guidance" and meta["model"] == _name(teacher)
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe) is type(teacher)
    model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    if hasattr(pipe, "transformer"):
        assert isinstance(model, GuidanceSD3Transformer2DModel)
    else:
        assert model.config.time_cond_proj_dim == cfg.guidance_embed_dim
    calls = _count_calls(model)
    kw = call_kwargs_for(pipe, guidance_scale=4.0, num_inference_steps=3)
    extra = {"max_sequence_length": 2} if hasattr(pipe, "transformer") else {}
    with torch.no_grad():
        out = pipe("a red circle", **kw, height=32, width=32, output_type="np", **extra,
                   generator=torch.Generator().manual_seed(0)).images
    assert calls[0] == 3
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out)).all()
    # the loaded student is the trained EMA, not the teacher
    exported = tr.export_model()
    for (n, a), (_, b) in zip(sorted(exported.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), n


def test_guidance_sd3_weight_reaches_the_student_through_joint_attention_kwargs(mmdit_teacher, tmp_path):
    tr = GuidanceTrainer(mmdit_teacher, GuidanceConfig(**FAST), tmp_path, zoo_name="shapes-mmdit")
    st = tr.student
    with torch.no_grad():
        st.guidance_proj.weight.normal_()
        x, t, cond = _inputs(tr)
        ts = t * 1000
        a = st(x, cond["ctx"], cond["pooled"], ts, guidance=3.0).sample
        b = st(x, cond["ctx"], cond["pooled"], ts, joint_attention_kwargs={"guidance_scale": 3.0}).sample
        st.default_guidance_scale = 3.0
        c = st(x, cond["ctx"], cond["pooled"], ts).sample
        d = st(x, cond["ctx"], cond["pooled"], ts, guidance=7.0).sample
    assert torch.equal(a, b) and torch.equal(a, c)
    assert (a - d).abs().max() > 1e-4


def test_saved_sd3_guidance_student_goes_through_the_zoo_loader(mmdit_teacher, tmp_path):
    """The zoo's loader (used for shipped students like shapes-mmdit-gd) checks the custom class's tensors,
    loads it as GuidanceSD3Transformer2DModel, and names the file and tensor when one is mis-shaped."""
    from safetensors.torch import load_file, save_file

    from fastgen import zoo
    from fastgen.distill.models import GuidanceSD3Transformer2DModel

    tr = GuidanceTrainer(mmdit_teacher, GuidanceConfig(**FAST), tmp_path, zoo_name="shapes-mmdit")
    with torch.no_grad():
        tr.student.guidance_proj.weight.normal_()
    path = tr.save(tmp_path / "student")
    pipe = zoo.load_pipeline(path)
    assert type(pipe.transformer) is GuidanceSD3Transformer2DModel
    assert torch.equal(pipe.transformer.guidance_proj.weight, tr.export_model().guidance_proj.weight)
    wfile = path / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(wfile)
    sd["guidance_proj.weight"] = sd["guidance_proj.weight"][:, :-1].contiguous()
    save_file(sd, wfile)
    with pytest.raises(zoo.WeightsError, match="guidance_proj.weight"):
        zoo.load_pipeline(path)


def test_zoo_student_without_weights_names_the_distill_command(monkeypatch, tmp_path):
    from fastgen import zoo

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    assert zoo.world_of("shapes-mmdit-gd") == "shapes-mmdit"
    with pytest.raises(zoo.WeightsNotFoundError, match="fastgen train guidance --teacher shapes-mmdit"):
        zoo.load_default("shapes-mmdit-gd")
    with pytest.raises(zoo.WeightsNotFoundError, match="--init-student runs/gd-unet/pipeline"):
        zoo.load_default("shapes-unet-lcm")  # the two-stage LCM recipe is named


@pytest.mark.parametrize("teacher", ["shapes-mmdit", "shapes-unet"], indirect=True)
def test_gd_recipe_runs_the_student_once_per_step_and_removes_bit_exactly(teacher, tmp_path):
    """``gd:PATH`` on the teacher pipeline, called as the teacher is (guidance_scale=4): one student call of
    batch 1 per step, the same images as the student pipeline called directly, and remove restores the
    teacher module object and its images bit-exactly."""
    import fastgen
    from diffusers import DiffusionPipeline

    cfg = GuidanceConfig(**{**FAST, "steps": 1, "lr": 1e-3, "ema_decay": 0.5})
    tr = GuidanceTrainer(teacher, cfg, tmp_path, zoo_name=_name(teacher))
    tr.run(save=True, final_eval=False)
    with torch.no_grad():  # a student whose guidance input matters
        m = tr.export_model()
        (m.guidance_proj if hasattr(m, "guidance_proj") else m.time_embedding.cond_proj).weight.normal_(0, 0.5)
    path = tr.save(tmp_path / "student", pipe=student_pipeline(teacher, m, copy.deepcopy(teacher.scheduler)))
    is_sd3 = hasattr(teacher, "transformer")
    attr = "transformer" if is_sd3 else "unet"
    extra = {"max_sequence_length": 2} if is_sd3 else {}

    def run(pipe, **kw):
        with torch.no_grad():
            return pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0), **extra, **kw).images

    teacher_module = getattr(teacher, attr)
    base = run(teacher, guidance_scale=4.0)
    fastgen.accelerate(teacher, "sampler:euler@3+gd:" + str(path))  # gd goes first whatever the order
    assert list(get_state(teacher).applied) == ["gd", "sampler"]
    student = getattr(teacher, attr)
    assert student is not teacher_module
    shapes = []
    first = student.pos_embed if is_sd3 else student.conv_in  # inside the hooks: sees what really runs
    first.register_forward_pre_hook(lambda mod, a: shapes.append(a[0].shape[0]))
    fast = run(teacher, guidance_scale=4.0)
    assert shapes == [1, 1, 1]  # one pass of batch 1 per step (CFG would be 2)
    direct = DiffusionPipeline.from_pretrained(path)
    if is_sd3:
        direct.transformer.set_attn_processor(dict(teacher_module.attn_processors))
    direct.scheduler = copy.deepcopy(teacher.scheduler)
    kw = call_kwargs_for(direct, guidance_scale=4.0, num_inference_steps=3)
    kw.pop("num_inference_steps")
    want = run(direct, **kw)
    assert abs(fast - want).max() < 1e-5
    assert abs(fast - base).max() > 1e-3
    fastgen.remove(teacher)
    assert getattr(teacher, attr) is teacher_module and get_state(teacher) is None
    assert (run(teacher, guidance_scale=4.0) == base).all()
    # applied after another technique, or removed alone: the others move onto the new denoiser
    fastgen.accelerate(teacher, "sampler:euler@3")
    fastgen.accelerate(teacher, "gd:" + str(path))
    assert list(get_state(teacher).applied) == ["gd", "sampler"]
    assert abs(run(teacher, guidance_scale=4.0) - want).max() < 1e-5
    fastgen.remove(teacher, "gd")
    assert list(get_state(teacher).applied) == ["sampler"] and getattr(teacher, attr) is teacher_module
    fastgen.remove(teacher)
    assert (run(teacher, guidance_scale=4.0) == base).all()
    if is_sd3:  # a cache hooked on the student after gd sees the halved batch (gd's hook stays outermost)
        fastgen.accelerate(teacher, "gd:" + str(path))
        fastgen.accelerate(teacher, "ras:0.5")
        out = run(teacher, guidance_scale=4.0)
        assert torch.isfinite(torch.from_numpy(out)).all()
        assert get_state(teacher).last_call["steps_run"] == 3
        fastgen.remove(teacher)
        assert (run(teacher, guidance_scale=4.0) == base).all()


def test_gd_recipe_errors_name_what_to_pass(mmdit_teacher, tmp_path):
    import fastgen
    from fastgen.errors import FastgenError

    with pytest.raises(FastgenError, match="gd:PATH"):
        fastgen.accelerate(mmdit_teacher, "gd")  # not loaded from the zoo folder: no shipped student to find
    with pytest.raises(FastgenError, match="not a student pipeline folder"):
        fastgen.accelerate(mmdit_teacher, f"gd:{tmp_path}")
    assert get_state(mmdit_teacher) is None  # nothing half-patched


def test_guidance_sdxl_student_equals_teacher_and_runs_one_call_per_step(tmp_path):
    from fastgen.testing import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    cfg = GuidanceConfig(**{**FAST, "steps": 1, "ema_decay": 0.0, "pool_steps": 1})
    tr = GuidanceTrainer(pipe, cfg, tmp_path, prompts=["a red circle", "a blue square"])
    x, t, cond = _inputs(tr, 2)
    with torch.no_grad():
        assert torch.equal(tr.family.predict(tr.student, x, t, cond, guidance=torch.tensor([3.0, 6.0])),
                           tr.family.predict(tr.teacher_model, x, t, cond))
    tr.train_step()
    student = tr.export_pipeline()
    calls = _count_calls(student.unet)
    with torch.no_grad():
        student("a red circle", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="latent")
    assert calls[0] == 2


@pytest.mark.parametrize("teacher", ["shapes-unet", "shapes-mmdit"], indirect=True)
def test_progressive_round_target_is_two_teacher_steps_in_one(teacher, tmp_path):
    """One student step (with the saved scheduler) from z_t using the target lands on the round teacher's
    two-step result, and a round reduces its loss on a fixed batch and saves an N-step pipeline."""
    from diffusers import DDIMScheduler

    gcfg = GuidanceConfig(**FAST)
    stage1 = GuidanceTrainer(teacher, gcfg, tmp_path / "s1", zoo_name=_name(teacher))
    with torch.no_grad():  # a stage-1 student that actually uses w
        _perturb_new(stage1.student)
    cfg = GuidanceConfig(**{**FAST, "lr": 1e-4, "ema_decay": 0.0})
    pt = ProgressiveTrainer(teacher, cfg, tmp_path / "r1", round_teacher=stage1.export_model(), student_steps=2,
                            zoo_name=_name(teacher))
    ex = pt.targets(0)
    if pt.family.is_flow:
        sh = (-1, 1, 1, 1)
        landed = ex["z_t"] + (ex["p"] - ex["t"]).view(sh) * ex["target"]
        sched = pt.student_scheduler()
        sched.set_timesteps(2)
        assert set(ex["t"].tolist()) <= set(sched.sigmas[:-1].tolist())
    else:
        sched = pt.student_scheduler()
        assert isinstance(sched, DDIMScheduler)
        sched.set_timesteps(2)
        landed = torch.stack([sched.step(ex["target"][i:i + 1], int(ex["t"][i]), ex["z_t"][i:i + 1]).prev_sample[0]
                              for i in range(ex["z_t"].shape[0])])
    torch.testing.assert_close(landed, ex["z_p"], atol=2e-4, rtol=1e-4)
    _fixed_batch(pt)
    losses = [pt.train_step() for _ in range(6)]
    assert min(losses[-2:]) < 0.7 * losses[0], losses
    pipe = pt.export_pipeline()
    assert pt.call_kwargs()["num_inference_steps"] == 2
    calls = _count_calls(pipe.transformer if pt.family.is_flow else pipe.unet)
    with torch.no_grad():
        pipe("a red circle", **pt.call_kwargs(), height=32, width=32, output_type="latent",
             **({"max_sequence_length": 2} if pt.family.is_flow else {}))
    assert calls[0] == 2


def _perturb_new(model):
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():
        if "cond_proj" in n or "guidance_proj" in n:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------------
# LCM
# --------------------------------------------------------------------------------------------------


def test_lcm_boundary_condition_matches_lcm_scheduler():
    from diffusers import LCMScheduler

    t = torch.tensor([0, 19, 39, 499, 999])
    c_skip, c_out = lcm_boundary_scalings(t)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0  # f(x, 0) = x
    sched = LCMScheduler()
    for i, ti in enumerate(t.tolist()):
        a, b = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert abs(float(a) - float(c_skip[i])) < 1e-6 and abs(float(b) - float(c_out[i])) < 1e-6


def test_lcm_student_is_identity_at_t0(unet_teacher, tmp_path):
    tr = LCMTrainer(unet_teacher, LCMConfig(**FAST), tmp_path, zoo_name="shapes-unet")
    x, _, cond = _inputs(tr)
    with torch.no_grad():
        f0 = tr.f(tr.student, x, torch.zeros(3, dtype=torch.long), cond, torch.full((3,), 3.0))
    torch.testing.assert_close(f0, x, atol=0, rtol=0)


def test_lcm_steps_finite_and_decreasing_on_fixed_batch(unet_teacher, tmp_path):
    cfg = LCMConfig(**{**FAST, "lr": 1e-4, "ema_decay": 0.95})
    tr = LCMTrainer(unet_teacher, cfg, tmp_path, zoo_name="shapes-unet")
    _fixed_batch(tr)
    losses = [tr.train_step() for _ in range(6)]
    assert all(math.isfinite(v) for v in losses) and losses[0] > 0
    assert min(losses[-2:]) < 0.7 * losses[0], losses


def test_lcm_saved_with_lcm_scheduler_runs_four_steps_one_call_each(unet_teacher, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    cfg = LCMConfig(**{**FAST, "steps": 1})
    tr = LCMTrainer(unet_teacher, cfg, tmp_path, zoo_name="shapes-unet")
    tr.run(final_eval=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == cfg.num_ddim_timesteps
    calls = _count_calls(pipe.unet)
    kw = tr.call_kwargs()
    assert kw == {"num_inference_steps": 4, "guidance_scale": 5.0}
    with torch.no_grad():
        img = pipe("a red circle", **kw, height=32, width=32, output_type="np").images
    assert calls[0] == 4 and torch.isfinite(torch.from_numpy(img)).all()


def test_lcm_from_guidance_distilled_teacher_one_teacher_call_and_keeps_its_w_input(unet_teacher, tmp_path):
    """A guidance-distilled UNet teacher (``time_cond_proj_dim``) gives its guided target in one call, and
    the student starts as an exact copy of it (the w input is trained, not a zero-initialised new layer)."""
    from diffusers import DiffusionPipeline

    gd = GuidanceTrainer(unet_teacher, GuidanceConfig(**{**FAST, "steps": 2, "lr": 1e-3}), tmp_path / "gd",
                         zoo_name="shapes-unet")
    gd.run(final_eval=False)
    gd_pipe = DiffusionPipeline.from_pretrained(tmp_path / "gd" / "pipeline")
    tr = LCMTrainer(gd_pipe, LCMConfig(**{**FAST, "steps": 2}), tmp_path / "lcm", zoo_name="shapes-unet")
    assert tr.teacher_takes_guidance and tr.new_layer_prefixes() == ()
    x, t, cond = _inputs(tr)
    g = torch.tensor([2.0, 5.0, 9.0])
    calls = _count_calls(tr.teacher_model)
    with torch.no_grad():
        x0_g, e_g = tr.teacher_guided(x, t, cond, None, g)
        assert calls[0] == 1
        want = tr.family.predict(tr.teacher_model, x, t, cond, guidance=g)
        student = tr.family.predict(tr.student, x, t, cond, guidance=g)
    torch.testing.assert_close(e_g, want.float(), atol=0, rtol=0)
    torch.testing.assert_close(student, want, atol=0, rtol=0)
    tr.run(final_eval=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "lcm" / "pipeline")
    n = _count_calls(pipe.unet)
    with torch.no_grad():
        pipe("a red circle", **tr.call_kwargs(), height=32, width=32, output_type="np")
    assert n[0] == 4  # 4 LCM steps, one UNet call each (the w input replaces CFG batching)
    with pytest.raises(UnsupportedPipelineError, match="guidance-distilled teacher.*guidance_embed"):
        LCMTrainer(gd_pipe, LCMConfig(**{**FAST, "guidance_embed": False}), tmp_path / "x", zoo_name="shapes-unet")


def test_lcm_init_student_from_a_guidance_student_keeps_cfg_targets(unet_teacher, tmp_path):
    from fastgen.zoo.builders import save_pipeline

    gd = GuidanceTrainer(unet_teacher, GuidanceConfig(**{**FAST, "steps": 1, "lr": 1e-3}), tmp_path / "gd",
                         zoo_name="shapes-unet")
    gd.run(final_eval=False)
    cfg = LCMConfig(**{**FAST, "steps": 1, "init_student": str(tmp_path / "gd" / "pipeline")})
    tr = LCMTrainer(unet_teacher, cfg, tmp_path / "lcm", zoo_name="shapes-unet")
    assert not tr.teacher_takes_guidance and tr.new_layer_prefixes() == ()
    want = gd.export_pipeline().unet.state_dict()
    for k, v in tr.student.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=0, rtol=0)
    x, t, cond = _inputs(tr)
    _, uncond = tr.family.encode(["a red circle"] * 3)
    calls = _count_calls(tr.teacher_model)
    with torch.no_grad():
        tr.teacher_guided(x, t, cond, uncond, torch.full((3,), 5.0))
    assert calls[0] == 1  # one batched CFG call (uncond + cond) of the CFG teacher
    tr.run(final_eval=False)
    plain = save_pipeline(unet_teacher, tmp_path / "plain")  # a UNet without the w input
    with pytest.raises(ValueError, match="time_cond_proj_dim=None.*needs 256"):
        LCMTrainer(unet_teacher, LCMConfig(**{**FAST, "init_student": str(plain)}), tmp_path / "x", zoo_name="shapes-unet")
    with pytest.raises(FileNotFoundError, match="neither a pipeline folder with a unet/ nor a UNet folder"):
        LCMTrainer(unet_teacher, LCMConfig(**{**FAST, "init_student": str(tmp_path / "nowhere")}), tmp_path / "x",
                   zoo_name="shapes-unet")
    from fastgen.distill.models import unet_with_guidance_input
    from fastgen.testing import tiny_pipeline

    other = unet_with_guidance_input(tiny_pipeline("sd").unet)  # right w input, another architecture
    other.save_pretrained(tmp_path / "other_unet")
    with pytest.raises(ValueError, match="not the teacher's architecture"):
        LCMTrainer(unet_teacher, LCMConfig(**{**FAST, "init_student": str(tmp_path / "other_unet")}), tmp_path / "x",
                   zoo_name="shapes-unet")


def test_phased_lcm_edges_training_and_saved_ddim_sampler_is_the_chain_of_phase_maps(unet_teacher, tmp_path):
    """Phased consistency (``phases=P``): each grid point maps to its phase's lower edge; the saved
    trailing DDIM scheduler's P steps are exactly the chain of the student's phase maps from the noise."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    with pytest.raises(ValueError, match="divisor of num_ddim_timesteps"):
        LCMConfig(**{**FAST, "phases": 3}).check()
    cfg = LCMConfig(**{**FAST, "phases": 4, "num_ddim_timesteps": 20, "lr": 1e-3, "ema_decay": 0.5})
    tr = LCMTrainer(unet_teacher, cfg, tmp_path, zoo_name="shapes-unet")
    t = torch.tensor([999, 750, 749, 500, 250, 249, 49, 0])
    assert tr.phase_edge(t).tolist() == [749, 749, 499, 499, 249, -1, -1, -1]
    _fixed_batch(tr)
    losses = [tr.train_step() for _ in range(4)]
    assert all(math.isfinite(v) for v in losses) and min(losses[-2:]) < losses[0], losses
    tr.save(pipe=tr.export_pipeline())
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(pipe.scheduler, DDIMScheduler) and tr.call_kwargs()["num_inference_steps"] == 4
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(int(a[1].flatten()[0])))
    noise = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = pipe("a red circle", **tr.call_kwargs(), height=32, width=32, latents=noise.clone(),
                   output_type="latent").images
        assert seen == [999, 749, 499, 249]
        cond, _ = tr.family.encode(["a red circle"])
        x = noise.clone()
        g = torch.full((1,), tr.call_kwargs()["guidance_scale"])
        for ti in [999, 749, 499, 249]:
            x = tr.f(pipe.unet, x, torch.tensor([ti]), cond, g)
    torch.testing.assert_close(got.float(), x, atol=1e-5, rtol=1e-4)


def test_lcm_lora_trains_only_adapters_and_exports_fused_and_lora(unet_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    cfg = LCMConfig(**{**FAST, "steps": 2, "lora_rank": 4, "lr": 1e-3, "ema_decay": 0.0, "guidance_embed": False})
    tr = LCMTrainer(unet_teacher, cfg, tmp_path, zoo_name="shapes-unet")
    names = [n for n, p in tr.student.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    tr.run(final_eval=False)
    assert tr.call_kwargs()["guidance_scale"] == 1.0
    x, t, cond = _inputs(tr)
    fused = tr.export_model()
    assert not any("lora" in n for n, _ in fused.named_parameters())
    with torch.no_grad():
        want = tr.family.predict(tr.student.eval(), x, t, cond)
        torch.testing.assert_close(tr.family.predict(fused, x, t, cond), want, atol=1e-5, rtol=1e-4)
        # the LoRA alone loads on the teacher with diffusers' load_lora_weights
        lora_pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
        base = copy.deepcopy(unet_teacher.unet)
        lora_pipe.unet = base
        lora_pipe.load_lora_weights(str(tmp_path / "lora"))
        torch.testing.assert_close(tr.family.predict(lora_pipe.unet, x, t, cond), want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# sCM
# --------------------------------------------------------------------------------------------------


def test_flow_to_trigflow_conversion_is_exact():
    """With the exact velocity v = eps - x0 the converted output is TrigFlow's cos(t) eps - sin(t) x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g,
                                                                                      dtype=torch.float64)
    t = torch.tensor([1e-3, 0.4, 1.0, 1.5], dtype=torch.float64)
    sh = (-1, 1, 1, 1)
    x_unit = torch.cos(t).view(sh) * x0 + torch.sin(t).view(sh) * eps  # x_t / sigma_data

    def v_fn(x_s, s):
        torch.testing.assert_close(x_s, (1 - s.view(sh)) * x0 + s.view(sh) * eps)  # the flow state
        return eps - x0

    F_out = flow_to_trigflow(v_fn, x_unit, t)
    torch.testing.assert_close(F_out, torch.cos(t).view(sh) * eps - torch.sin(t).view(sh) * x0, atol=1e-12, rtol=0)
    # the consistency function is the flow x0 prediction, and the identity at t = 0
    sd = 0.5
    torch.testing.assert_close(trigflow_consistency(sd * x_unit, t, F_out, sd), sd * x0, atol=1e-12, rtol=0)
    z = torch.randn(2, 3, 4, 4, generator=g)
    assert torch.equal(trigflow_consistency(z, torch.zeros(2), torch.randn_like(z)), z)
    assert float(trigflow_to_flow_time(torch.tensor(0.0))) == 0.0
    assert abs(float(trigflow_to_flow_time(torch.tensor(math.pi / 2))) - 1.0) < 1e-6


def test_scm_jvp_matches_finite_differences(mmdit_teacher, tmp_path):
    tr = SCMTrainer(mmdit_teacher, SCMConfig(**FAST), tmp_path, zoo_name="shapes-mmdit")
    model = copy.deepcopy(tr.student).double()
    x, _, cond = _inputs(tr, 2)
    cond = {k: v.double() for k, v in cond.items()}
    x = x.double()
    t = torch.tensor([0.7, 1.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    vx, vt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.tensor([0.3, -0.2], dtype=torch.float64)
    fn = lambda xu, tt: tr.trig_F(model, xu, tt, cond, None)  # noqa: E731
    with torch.no_grad(), jvp_attention():
        y, dy = torch.func.jvp(fn, (x, t), (vx, vt))
        h = 1e-4  # (the time embedding runs in float32 inside diffusers: not smaller)
        fd = (fn(x + h * vx, t + h * vt) - fn(x - h * vx, t - h * vt)) / (2 * h)
    torch.testing.assert_close(y, fn(x, t))
    assert dy.abs().max() > 1e-3
    torch.testing.assert_close(dy, fd, atol=2e-3 * float(dy.abs().max()), rtol=0)


def test_scm_steps_finite_and_decreasing_on_fixed_batch(mmdit_teacher, tmp_path):
    cfg = SCMConfig(**{**FAST, "lr": 1e-3, "tangent_warmup": 1, "grad_clip": 1.0})
    tr = SCMTrainer(mmdit_teacher, cfg, tmp_path, zoo_name="shapes-mmdit")
    _fixed_batch(tr)
    losses = [tr.train_step() for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    mse = [h["mse"] for h in tr.history]
    assert all(math.isfinite(v) and v > 0 for v in mse)


def test_scm_student_samples_in_one_and_two_steps(mmdit_teacher, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    cfg = SCMConfig(**{**FAST, "steps": 2, "eval_every": 1, "eval_prompts": 3, "eval_steps": 2})
    tr = SCMTrainer(mmdit_teacher, cfg, tmp_path, zoo_name="shapes-mmdit")
    tr.run()  # evaluates with fastgen.zoo.evaluate.evaluate_pipeline at step 1 and at the end
    assert [e["step"] for e in tr.evals] == [1, 2] and tr.evals[-1]["n"] == 3 and tr.evals[-1]["steps"] == 2
    rows = [json.loads(r) for r in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert sum("eval" in r for r in rows) == 2
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.scheduler.config.shift_terminal is None  # the evaluation's scheduler is not what is saved
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    calls = _count_calls(pipe.transformer)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    for steps in (1, 2):
        calls[0] = 0
        with torch.no_grad():
            pipe("a red circle", **scm_call_kwargs(steps), height=32, width=32, output_type="latent",
                 max_sequence_length=2)
        assert calls[0] == steps
    assert seen[0] == 1000.0 and abs(seen[2] - 1000.0 * 0.78266) < 0.1  # s = 1, then s_mid (t = 1.3)
    # evaluation's 2-step scheduler (no sigmas argument) hits the same grid; another mid_t moves it
    for mid_t, s_mid in ((1.3, 0.78266), (math.atan(9.0), 0.9)):
        tr.cfg.mid_t = mid_t
        tr.prepare_eval_pipeline(pipe)
        pipe.scheduler.set_timesteps(2)
        torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([1.0, s_mid, 0.0]), atol=1e-4, rtol=0)
        assert abs(scm_call_kwargs(2, mid_t)["sigmas"][1] - s_mid) < 1e-4


def test_scm_from_guidance_distilled_teacher_one_teacher_call_and_keeps_its_g_input(mmdit_teacher, tmp_path):
    """A guidance-distilled SD3 teacher gives its guided velocity in one call at g, the student starts as an
    exact copy with the teacher's default g, the pool is not guided twice, and the saved student runs one
    transformer call per step at that g."""
    from diffusers import DiffusionPipeline

    from fastgen.distill.models import GuidanceSD3Transformer2DModel

    gd = GuidanceTrainer(mmdit_teacher, GuidanceConfig(**{**FAST, "steps": 2, "lr": 1e-3}), tmp_path / "gd",
                         zoo_name="shapes-mmdit")
    gd.run(final_eval=False)
    gd_pipe = DiffusionPipeline.from_pretrained(tmp_path / "gd" / "pipeline")
    gd_pipe.transformer.default_guidance_scale = 4.0
    tr = SCMTrainer(gd_pipe, SCMConfig(**{**FAST, "steps": 2}), tmp_path / "scm", zoo_name="shapes-mmdit")
    assert tr.teacher_takes_guidance and tr.new_layer_prefixes() == () and tr.teacher_g == 4.0
    assert tr.pool.guidance == 1.0  # the teacher's own g guides the pool samples
    assert isinstance(tr.student, GuidanceSD3Transformer2DModel) and tr.student.default_guidance_scale == 4.0
    x, t, cond = _inputs(tr)
    with torch.no_grad():
        a = tr.family.predict(tr.student, x, t, cond, guidance=torch.full((3,), 4.0))
        b = tr.family.predict(tr.teacher_model, x, t, cond, guidance=torch.full((3,), 4.0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    calls = _count_calls(tr.teacher_model)
    _fixed_batch(tr)
    loss = tr.train_step()
    assert math.isfinite(loss) and calls[0] == 1  # one guided teacher call per step, no CFG pair
    tr.run(final_eval=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "scm" / "pipeline")
    assert pipe.transformer.default_guidance_scale == 4.0
    n = _count_calls(pipe.transformer)
    with torch.no_grad():
        pipe("a red circle", **tr.call_kwargs(), height=32, width=32, output_type="latent", max_sequence_length=2)
    assert n[0] == 1


def test_scm_ladd_term_trains_heads_on_frozen_teacher_features(mmdit_teacher, tmp_path):
    """adv_weight > 0 adds LADD: the generator term reaches the student through the frozen teacher, the
    heads get their own hinge step, the teacher does not move, and the checkpoint keeps the heads."""
    cfg = SCMConfig(**{**FAST, "lr": 1e-3, "tangent_warmup": 1, "adv_weight": 0.5, "adv_lr": 1e-2,
                       "adv_blocks": (0, -1)})
    tr = SCMTrainer(mmdit_teacher, cfg, tmp_path, zoo_name="shapes-mmdit")
    assert tr.adv_blocks == (0,) and list(tr.disc.keys()) == ["0"] and all(p not in set(tr.params) for p in tr.disc.parameters())
    teacher0 = {k: v.clone() for k, v in tr.teacher_model.state_dict().items()}
    heads0 = {k: v.clone() for k, v in tr.disc.state_dict().items()}
    _fixed_batch(tr)
    tr.train_step()
    h = tr.history[-1]
    assert math.isfinite(h["g_adv"]) and math.isfinite(h["d_loss"]) and h["d_loss"] > 0
    assert any(not torch.equal(v, tr.disc.state_dict()[k]) for k, v in heads0.items())
    assert all(torch.equal(v, tr.teacher_model.state_dict()[k]) for k, v in teacher0.items())
    # the generator term alone has a gradient on the student's weights (through the teacher's features)
    tr.student.zero_grad(set_to_none=True)
    x0, cond, _ = tr.pool.batch(0, 2, torch.Generator().manual_seed(0))
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    t = torch.full((2,), 1.4)
    F = tr.trig_F(tr.student, x_t / 0.5, t, cond, None)
    tr.adversarial_g_loss(trigflow_consistency(x_t, t, F) / 0.5, x0, cond, None,
                          torch.Generator().manual_seed(2)).backward()
    grads = [p.grad for p in tr.student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in tr.teacher_model.parameters())
    # the heads learn to tell the teacher's samples from the student's on a fixed batch
    d = [tr.history[-1]["d_loss"]]
    for _ in range(4):
        tr.train_step()
        d.append(tr.history[-1]["d_loss"])
    assert d[-1] < d[0], d
    tr.save_checkpoint()
    assert "disc" in torch.load(tr.checkpoint_path, weights_only=False)["extra"]
    with pytest.raises(ValueError, match="adv_blocks"):
        SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "adv_weight": 0.5, "adv_blocks": (0, 1)}), tmp_path / "x",
                   zoo_name="shapes-mmdit")
    with pytest.raises(ValueError, match="adv_weight >= 0"):
        SCMConfig(**{**FAST, "adv_weight": -0.1}).check()
    with pytest.raises(ValueError, match="adv_t_min"):
        SCMConfig(**{**FAST, "adv_weight": 0.5, "adv_t_min": 2.0}).check()


def test_scm_init_student_starts_from_a_saved_student(mmdit_teacher, unet_teacher, tmp_path):
    first = SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "steps": 2, "lr": 1e-3}), tmp_path / "a",
                       zoo_name="shapes-mmdit")
    first.run(final_eval=False)
    saved = first.export_model().state_dict()
    tr = SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "init_student": str(tmp_path / "a" / "pipeline")}),
                    tmp_path / "b", zoo_name="shapes-mmdit")
    assert tr.new_layer_prefixes() == ()
    assert all(torch.equal(v, tr.student.state_dict()[k]) for k, v in saved.items())
    assert any(not torch.equal(v, tr.teacher_model.state_dict()[k]) for k, v in saved.items())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "init_student": str(tmp_path / "nothing")}), tmp_path / "c",
                   zoo_name="shapes-mmdit")
    with pytest.raises(ValueError, match="architecture"):  # a g-input student where this run makes a plain one
        SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "init_student": str(tmp_path / "a" / "pipeline"),
                                               "guidance_embed": True}), tmp_path / "d", zoo_name="shapes-mmdit")


@pytest.mark.parametrize("edge", [0.0, 0.5])
def test_scm_tangent_is_cos_times_df_dt_along_the_ode(edge):
    """g = cos(t - e) df/dt for f = cos(t - e) x_t - sin(t - e) sd F (plain sCM: e = 0; phased: e = the edge),
    checked against central differences of f along the ODE direction."""
    from fastgen.distill.consistency import scm_tangent

    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 4, 4)
    a, b = torch.randn(shape[1:], generator=g, dtype=torch.float64), torch.randn(shape[1:], generator=g, dtype=torch.float64)
    sh = (-1, 1, 1, 1)
    F_fn = lambda xu, tt: torch.tanh(a * xu + b * tt.view(sh))  # noqa: E731  (a smooth stand-in for the student)
    x_t = torch.randn(shape, generator=g, dtype=torch.float64)
    dxdt = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 1.2], dtype=torch.float64)
    e = torch.full_like(t, edge)
    sd = 0.5
    F_minus, grad = scm_tangent(F_fn, x_t, t, e, dxdt, sd, r=1.0)
    torch.testing.assert_close(F_minus, F_fn(x_t / sd, t))

    def f(x, tt):
        return torch.cos(tt - e).view(sh) * x - torch.sin(tt - e).view(sh) * sd * F_fn(x / sd, tt)

    h = 1e-5
    dfdt = (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    torch.testing.assert_close(grad, torch.cos(t - e).view(sh) * dfdt, atol=1e-7, rtol=1e-6)


def test_scm_phased_two_step_student(mmdit_teacher, tmp_path):
    from fastgen.distill.consistency import distill_consistency

    with pytest.raises(ValueError, match="eval_steps=2"):
        SCMConfig(**{**FAST, "phased": True}).check()
    cfg = SCMConfig(**{**FAST, "phased": True, "eval_steps": 2, "mid_t": 1.1, "lr": 1e-3, "tangent_warmup": 1,
                       "steps": 2})
    tr = SCMTrainer(mmdit_teacher, cfg, tmp_path / "a", zoo_name="shapes-mmdit")
    tr.run(final_eval=False)
    assert all(math.isfinite(h["loss"]) for h in tr.history)
    s_mid = float(trigflow_to_flow_time(torch.tensor(1.1)))
    assert abs(tr.call_kwargs()["sigmas"][1] - s_mid) < 1e-6  # the 2-step call passes through the phase edge
    with pytest.raises(ValueError, match="phase edge"):  # mid_t is a training setting for a phased run
        SCMTrainer(mmdit_teacher, SCMConfig(**{**vars(cfg), "mid_t": 1.2}), tmp_path / "a",
                   zoo_name="shapes-mmdit").resume()
    with pytest.raises(ValueError, match="phase edge"):
        distill_consistency(mmdit_teacher, "scm", cfg, tmp_path / "b", zoo_name="shapes-mmdit", choose_mid_t_prompts=2)


def test_scm_choose_mid_t_picks_a_candidate_on_calibration_prompts(mmdit_teacher, tmp_path):
    from fastgen.distill.consistency import choose_mid_t, distill_consistency

    tr = SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "steps": 1, "eval_steps": 2}), tmp_path, zoo_name="shapes-mmdit")
    tr.run(final_eval=False)
    pipe = tr.export_pipeline()
    mid_t, rows = choose_mid_t(pipe, "shapes-mmdit", sigmas=(0.7, 0.9), n=2)
    assert [r["sigma"] for r in rows] == [0.7, 0.9] and all(0 <= r["score"] <= 1 for r in rows)
    best = max(rows, key=lambda r: r["score"])
    assert mid_t == best["mid_t"]
    assert abs(float(trigflow_to_flow_time(torch.tensor(mid_t))) - best["sigma"]) < 1e-6
    assert pipe.scheduler.config.shift_terminal is None  # the candidates' schedulers are not left behind
    with pytest.raises(ValueError, match="intermediate"):
        choose_mid_t(pipe, "shapes-mmdit", sigmas=(1.2,), n=1)
    with pytest.raises(ValueError, match="mid_t"):
        SCMConfig(**{**FAST, "mid_t": 2.0}).check()
    with pytest.raises(ValueError, match="eval_steps=2"):  # 1-step students have no intermediate time
        distill_consistency(mmdit_teacher, "scm", SCMConfig(**FAST), tmp_path / "x", zoo_name="shapes-mmdit",
                            choose_mid_t_prompts=2)


def test_teacher_pool_is_deterministic_and_independent_of_chunking(mmdit_teacher, tmp_path):
    a = GuidanceTrainer(mmdit_teacher, GuidanceConfig(**{**FAST, "pool_batch": 4}), tmp_path, zoo_name="shapes-mmdit")
    b = GuidanceTrainer(mmdit_teacher, GuidanceConfig(**{**FAST, "pool_batch": 3}), tmp_path, zoo_name="shapes-mmdit")
    (xa, ca, ua, pa), (xb, cb, ub, pb) = a.pool.pool(0), b.pool.pool(0)
    assert pa == pb and len(pa) == 4
    torch.testing.assert_close(xa, xb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ca["pooled"], cb["pooled"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ua["pooled"], ub["pooled"], atol=1e-6, rtol=1e-6)  # the unconditional side too
    assert a.pool.pool(1)[3] != pa  # the next pool has new prompts


# --------------------------------------------------------------------------------------------------
# Checkpoints: kill and resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["guidance", "lcm", "scm", "scm-ladd"])
def test_kill_resume_gives_identical_loss_curve(method, unet_teacher, mmdit_teacher, tmp_path):
    make = {
        "guidance": lambda out: GuidanceTrainer(unet_teacher, GuidanceConfig(**{**FAST, "lr": 1e-3, "pool_refresh": 2}),
                                                out, zoo_name="shapes-unet"),
        "lcm": lambda out: LCMTrainer(unet_teacher, LCMConfig(**{**FAST, "lr": 1e-4, "pool_refresh": 2}), out,
                                      zoo_name="shapes-unet"),
        "scm": lambda out: SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "lr": 1e-3, "pool_refresh": 2,
                                                                  "tangent_warmup": 3}), out, zoo_name="shapes-mmdit"),
        "scm-ladd": lambda out: SCMTrainer(mmdit_teacher, SCMConfig(**{**FAST, "lr": 1e-3, "pool_refresh": 2,
                                                                       "adv_weight": 0.5, "adv_lr": 1e-2}),
                                           out, zoo_name="shapes-mmdit"),
    }[method]
    straight = make(tmp_path / "a")
    straight.run(steps=4, save=False, final_eval=False)
    first = make(tmp_path / "b")
    first.run(steps=2, save=False, final_eval=False)  # writes checkpoint.pt at the end; the process "dies"
    del first
    second = make(tmp_path / "b")
    assert second.resume() and second.step == 2
    second.run(steps=4, save=False, final_eval=False)
    assert [h["loss"] for h in second.history] == [h["loss"] for h in straight.history]
    for (n, a), (_, b) in zip(sorted(second.student.state_dict().items()), sorted(straight.student.state_dict().items())):
        assert torch.equal(a, b), n
    if method == "scm-ladd":  # the discriminator heads and their optimiser resume too
        assert [h["d_loss"] for h in second.history] == [h["d_loss"] for h in straight.history]
        for n, a in straight.disc.state_dict().items():
            assert torch.equal(a, second.disc.state_dict()[n]), n


def test_resume_refuses_changed_settings(unet_teacher, tmp_path):
    tr = GuidanceTrainer(unet_teacher, GuidanceConfig(**{**FAST, "steps": 1}), tmp_path, zoo_name="shapes-unet")
    tr.run(save=False, final_eval=False)
    other = GuidanceTrainer(unet_teacher, GuidanceConfig(**{**FAST, "lr": 0.5}), tmp_path, zoo_name="shapes-unet")
    with pytest.raises(ValueError, match="lr"):
        other.resume()


def test_checkpoint_write_is_atomic(unet_teacher, tmp_path, monkeypatch):
    tr = GuidanceTrainer(unet_teacher, GuidanceConfig(**{**FAST, "steps": 1}), tmp_path, zoo_name="shapes-unet")
    tr.run(save=False, final_eval=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


# --------------------------------------------------------------------------------------------------
# Options, errors, CLI
# --------------------------------------------------------------------------------------------------


def test_bf16_and_gradient_checkpointing_steps_run(unet_teacher, tmp_path):
    cfg = GuidanceConfig(**{**FAST, "mixed_precision": "bf16", "gradient_checkpointing": True})
    tr = GuidanceTrainer(unet_teacher, cfg, tmp_path, zoo_name="shapes-unet")
    assert tr.student.is_gradient_checkpointing
    assert math.isfinite(tr.train_step())


def test_scm_on_epsilon_unet_says_use_lcm(unet_teacher, tmp_path):
    with pytest.raises(UnsupportedPipelineError, match=r"StableDiffusionPipeline \(UNet2DConditionModel\).*LCM"):
        SCMTrainer(unet_teacher, SCMConfig(**FAST), tmp_path, zoo_name="shapes-unet")


def test_lcm_on_flow_model_says_use_scm(mmdit_teacher, tmp_path):
    with pytest.raises(UnsupportedPipelineError, match=r"StableDiffusion3Pipeline \(SD3Transformer2DModel\).*sCM"):
        LCMTrainer(mmdit_teacher, LCMConfig(**FAST), tmp_path, zoo_name="shapes-mmdit")


def test_unsupported_pipeline_class_is_named(tmp_path):
    from fastgen.testing import tiny_pipeline

    pipe = tiny_pipeline("pixart")
    with pytest.raises(UnsupportedPipelineError, match="PixArtSigmaPipeline.*StableDiffusionPipeline"):
        GuidanceTrainer(pipe, GuidanceConfig(**FAST), tmp_path, prompts=["a red circle"])


def test_non_zoo_teacher_needs_prompts(tmp_path):
    from fastgen.testing import tiny_pipeline

    with pytest.raises(ValueError, match="--prompts"):
        GuidanceTrainer(tiny_pipeline("sd"), GuidanceConfig(**FAST), tmp_path)


def test_guidance_teacher_must_use_cfg(tmp_path):
    from fastgen.testing import tiny_pipeline

    pipe = tiny_pipeline("sd", unet={"time_cond_proj_dim": 32})
    with pytest.raises(ValueError, match="guidance-distilled already"):
        GuidanceTrainer(pipe, GuidanceConfig(**FAST), tmp_path, prompts=["a"])


def test_cli_guidance_and_scm_on_a_saved_teacher_folder(unet_teacher, mmdit_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    from fastgen.distill import consistency, guidance
    from fastgen.zoo.builders import save_pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square left of a green triangle\n")
    common = ["--steps", "2", "--batch", "2", "--pool-size", "2", "--pool-steps", "1", "--eval-prompts", "0",
              "--no-progress", "--prompts", str(prompts), "--threads", "1"]
    unet_dir = save_pipeline(unet_teacher, tmp_path / "unet_teacher")
    assert guidance.main(["--teacher", str(unet_dir), "--output", str(tmp_path / "gd"), *common,
                          "--progressive-rounds", "1", "--progressive-start-steps", "4",
                          "--progressive-steps-per-round", "1"]) == 0
    student = DiffusionPipeline.from_pretrained(tmp_path / "gd" / "student")  # stage 1 + one halving round
    assert student.unet.config.time_cond_proj_dim == 256
    meta = json.loads((tmp_path / "gd" / "student" / "fastgen_zoo.json").read_text())["distill"]
    assert meta["method"] == "progressive" and meta["call_kwargs"]["num_inference_steps"] == 2
    assert (tmp_path / "gd" / "round1" / "checkpoint.pt").exists()
    with pytest.raises(SystemExit, match="--resume"):
        guidance.main(["--teacher", str(unet_dir), "--output", str(tmp_path / "gd"), *common])
    assert guidance.main(["--teacher", str(unet_dir), "--output", str(tmp_path / "gd"), *common, "--resume",
                          "--steps", "3"]) == 0
    assert torch.load(tmp_path / "gd" / "checkpoint.pt", weights_only=False)["step"] == 3
    sd3_dir = save_pipeline(mmdit_teacher, tmp_path / "sd3_teacher")
    assert consistency.main(["--method", "scm", "--teacher", str(sd3_dir), "--output", str(tmp_path / "scm"),
                             *common, "--max-sequence-length", "2"]) == 0
    assert (tmp_path / "scm" / "pipeline" / "model_index.json").exists()
    with pytest.raises(UnsupportedPipelineError, match="sCM"):
        consistency.main(["--method", "lcm", "--teacher", str(sd3_dir), "--output", str(tmp_path / "x"), *common])


@pytest.mark.gpu
def test_every_method_runs_on_cuda_in_bf16(tmp_path):
    """CUDA + bf16 autocast: a few steps of each method, finite losses, and the sCM JVP under math SDPA."""
    gpu = {**FAST, "device": "cuda", "mixed_precision": "bf16", "steps": 2}
    unet, mmdit = _zoo("shapes-unet"), _zoo("shapes-mmdit")
    runs = [GuidanceTrainer(unet, GuidanceConfig(**gpu), tmp_path / "g", zoo_name="shapes-unet"),
            LCMTrainer(unet, LCMConfig(**gpu), tmp_path / "l", zoo_name="shapes-unet"),
            SCMTrainer(mmdit, SCMConfig(**gpu), tmp_path / "s", zoo_name="shapes-mmdit")]
    for tr in runs:
        assert tr.device.type == "cuda"
        tr.run(final_eval=False)
        assert all(math.isfinite(h["loss"]) for h in tr.history)


def test_cli_flags_parse_int_and_float_tuples():
    import argparse

    from fastgen.distill.cli import add_common_args, config_from_args

    ap = argparse.ArgumentParser()
    add_common_args(ap, SCMConfig())
    args = ap.parse_args(["--teacher", "t", "--output", "o", "--adv-blocks", "1", "-1", "--betas", "0.8", "0.9",
                          "--adv-weight", "0.5", "--init-student", "runs/x/pipeline"])
    cfg = config_from_args(SCMConfig, args)
    assert cfg.adv_blocks == (1, -1) and cfg.betas == (0.8, 0.9) and cfg.adv_weight == 0.5
    assert cfg.init_student == "runs/x/pipeline"
    assert config_from_args(SCMConfig, ap.parse_args(["--teacher", "t", "--output", "o"])).adv_blocks == ()
