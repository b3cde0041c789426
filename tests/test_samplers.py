"""Samplers: integrator accuracy on an exact flow (Gaussian data), and pipeline behaviour on tiny classes."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import fastgen
from fastgen import samplers
from fastgen.samplers.flow import FlowLPLScheduler, FlowPseudoCorrectorScheduler
from fastgen.testing import default_call_kwargs, tiny_pipeline

MU, S = 1.5, 0.3  # data ~ N(MU, S^2): the flow ODE maps noise z exactly to MU + S z


def _velocity(x, sigma):
    a2 = (1 - sigma) ** 2 * S**2 + sigma**2
    return (sigma - (1 - sigma) * S**2) / a2 * (x - (1 - sigma) * MU) - MU


def _integrate(scheduler, steps, z):
    scheduler.set_timesteps(steps)
    x, calls = z.clone(), 0
    for t in scheduler.timesteps:
        sigma = float(t) / scheduler.config.num_train_timesteps
        x = scheduler.step(_velocity(x, sigma), t, x).prev_sample
        calls += 1
    return x, calls


@pytest.mark.parametrize("steps", [4, 8])
def test_pseudo_corrector_beats_euler_at_equal_calls(steps):
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    exact = MU + S * z
    euler, n_e = _integrate(FlowMatchEulerDiscreteScheduler(shift=1.0), steps, z)
    pc, n_p = _integrate(FlowPseudoCorrectorScheduler(shift=1.0), steps, z)
    assert n_e == n_p == steps
    err_e, err_p = (euler - exact).abs().max().item(), (pc - exact).abs().max().item()
    assert err_p < 0.5 * err_e, (err_p, err_e)


def test_lpl_leaps_on_a_straight_path_and_lands_on_the_data():
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    v_const = torch.full_like(z, 0.7)  # a perfectly straight path: x_sigma = x1 + (sigma - 1) v
    sched = FlowLPLScheduler(shift=1.0).configure_lpl(min_fraction=0.3, patience=2)
    sched.set_timesteps(20)
    x = z.clone()
    for t in sched.timesteps:
        x = sched.step(v_const, t, x).prev_sample
    assert sched.leaped and sched.leap_step == 5  # >= 30% of 20 steps and 2 stale comparisons
    torch.testing.assert_close(x, z - v_const)  # exact endpoint after one linear leap
    sched.set_timesteps(20)  # state is per call
    assert not sched.leaped and sched.leap_step is None
    with pytest.raises(ValueError, match="lpl_patience"):
        FlowLPLScheduler().configure_lpl(patience=0)


def test_lpl_without_a_leap_is_plain_euler_and_a_leap_returns_the_x0_prediction():
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    euler, _ = _integrate(FlowMatchEulerDiscreteScheduler(shift=1.0), 12, z)
    never, _ = _integrate(FlowLPLScheduler(shift=1.0).configure_lpl(min_fraction=1.0), 12, z)
    torch.testing.assert_close(never, euler)
    sched = FlowLPLScheduler(shift=1.0).configure_lpl(min_fraction=0.0, patience=1, tol=1.0)
    leapt, _ = _integrate(sched, 12, z)
    # the first comparison (step 1) always counts as an improvement, so with patience 1 the leap comes at
    # step 2: x0 = x_2 - sigma_2 v(x_2, sigma_2), the flow's denoised estimate at that point
    sig = [float(v) for v in sched.sigmas]
    x = z
    for i in range(2):
        x = x + (sig[i + 1] - sig[i]) * _velocity(x, sig[i])
    assert sched.leap_step == 2
    torch.testing.assert_close(leapt, x - sig[2] * _velocity(x, sig[2]))


def test_lpl_skips_real_denoiser_calls_and_reports_it():
    pipe = tiny_pipeline("sd3")
    fastgen.accelerate(pipe, "sampler:lpl@12")
    pipe.scheduler.configure_lpl(min_fraction=0.25, patience=1, tol=1.0)  # force a leap on random weights
    assert pipe.scheduler.config.shift == 3.0  # the model's own shift is kept
    calls = []
    handle = pipe.transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    out = pipe(**default_call_kwargs(pipe, steps=30), height=32, width=32, output_type="np").images
    handle.remove()
    rec = fastgen.summary(pipe)["last_call"]["sampler"]
    assert np.isfinite(out).all() and rec["scheduler"] == "FlowLPLScheduler"
    assert rec["leap_step"] is not None and rec["denoiser_calls_skipped"] == 12 - rec["leap_step"] - 1
    assert len(calls) == rec["leap_step"] + 1  # blocks ran only up to the leap
    fastgen.remove(pipe)
    assert not hasattr(pipe.transformer, "_diffusers_hook") and "forward" not in pipe.transformer.__dict__


@pytest.mark.parametrize("name", ["pseudo-corrector", "lpl"])
def test_flow_samplers_run_on_flow_pipelines_and_refuse_epsilon_ones(name):
    for kind in ("sd3", "flux"):
        pipe = tiny_pipeline(kind)
        ref = pipe(**default_call_kwargs(pipe, steps=4), height=32, width=32, output_type="np").images
        fastgen.accelerate(pipe, f"sampler:{name}@4")
        out = pipe(**default_call_kwargs(pipe, steps=4), height=32, width=32, output_type="np").images
        assert np.isfinite(out).all() and out.shape == ref.shape
        fastgen.remove(pipe)
        np.testing.assert_array_equal(pipe(**default_call_kwargs(pipe, steps=4), height=32, width=32, output_type="np").images, ref)
    with pytest.raises(ValueError, match="flow-matching models"):
        fastgen.accelerate(tiny_pipeline("sd"), f"sampler:{name}")


def test_registry_lists_the_flow_samplers():
    assert {"lpl", "pseudo-corrector"} <= set(samplers.list())


def test_sampler_table_on_the_shipped_model_scores_psnr_and_calls():
    """``fastgen experiment sampler-table``: the reference row is the model's own sampler (PSNR inf), a sampler that
    cannot drive the model is listed with the reason, Heun counts two calls per step but the last."""
    from fastgen import zoo
    from fastgen.bench.experiments.sampler_table import markdown, sampler_table

    if not (zoo.weights_path("shapes-mmdit") / "model_index.json").exists():
        pytest.skip("shapes-mmdit weights are not installed")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = sampler_table("shapes-mmdit", steps=(2, 3), reference=4, n=3, names=("euler", "ddim", "heun"))
    finally:
        torch.set_num_threads(n)
    ref, default = rows[0], rows[1]
    assert ref["steps"] == 4 and ref["calls"] == 4 and ref["psnr"] == float("inf")
    assert default["steps"] == zoo.DEFAULTS["shapes-mmdit"]["num_inference_steps"] and np.isfinite(default["psnr"])
    euler = [r for r in rows if r["sampler"] == "euler"]
    assert [r["calls"] for r in euler] == [2, 3] and all(np.isfinite(r["psnr"]) for r in euler)
    assert euler[1]["psnr"] > euler[0]["psnr"]  # closer to the 4-step reference with more steps
    assert [r["calls"] for r in rows if r["sampler"] == "heun"] == [3, 5]
    (ddim,) = [r for r in rows if r["sampler"] == "ddim"]
    assert "epsilon" in ddim["skipped"]
    assert "cannot drive this model" in markdown(rows)


def _integrate_registered(name, steps, z):
    """Run the registered sampler ``name`` (built for a shift-1 flow model) on the exact Gaussian-data velocity."""
    return _integrate(samplers.make_scheduler(name, FlowMatchEulerDiscreteScheduler(shift=1.0)), steps, z)[0]


@pytest.mark.parametrize("name", ["euler", "heun", "dpm++2m", "unipc", "pseudo-corrector"])
def test_registered_flow_samplers_converge_to_the_closed_form_endpoint(name):
    """Gaussian data: the flow ODE maps noise z exactly to MU + S z. Every registered flow sampler converges to
    it (first order for Euler, faster for the others), and each non-Euler one beats Euler at 8 steps. (LPL's
    closed form is the straight path above: its leap returns the posterior mean, which is exact only there.)"""
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    exact = MU + S * z
    errs = [(_integrate_registered(name, k, z) - exact).abs().max().item() for k in (4, 8, 50)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < (0.05 if name == "euler" else 0.015), errs
    if name != "euler":
        euler8 = (_integrate_registered("euler", 8, z) - exact).abs().max().item()
        assert errs[1] < 0.5 * euler8, (errs[1], euler8)


FLOW_ONLY, EPS_ONLY = {"pseudo-corrector", "lpl"}, {"ddim", "dpm++2m-karras"}


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux", "pixart", "sana", "lumina2", "dit"])
def test_every_sampler_runs_or_is_refused_clearly_on_every_family(kind):
    """Each registered sampler either drives the family's tiny pipeline to a finite image, or is refused before
    anything changes for the documented reason (a flow sampler on an epsilon model or the reverse; Heun with
    dynamic shifting; on Lumina2, which passes custom sigmas, a scheduler that takes none)."""
    pipe = tiny_pipeline(kind)
    flow = samplers.is_flow_scheduler(pipe.scheduler)
    dynamic = bool(pipe.scheduler.config.get("use_dynamic_shifting", False))
    for name in samplers.list():
        refused = ((name in FLOW_ONLY and not flow) or (name in EPS_ONLY and flow) or (name == "heun" and flow and dynamic)
                   or (kind == "lumina2" and name in ("dpm++2m", "heun")))  # Lumina2 always passes sigmas=
        if refused:
            with pytest.raises((ValueError, fastgen.FastgenError), match="use '"):
                fastgen.accelerate(pipe, f"sampler:{name}@2")
            assert fastgen.summary(pipe)["recipe"] == "baseline"
            continue
        fastgen.accelerate(pipe, f"sampler:{name}@2")
        try:
            out = pipe(**default_call_kwargs(pipe, steps=5), output_type="np").images
        finally:
            fastgen.remove(pipe)
        assert np.isfinite(out).all(), (kind, name)


def _eps_original():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False)


def _integrate_eps(name, steps, z, mu):
    """Run the registered epsilon sampler ``name`` (SD's scaled-linear betas) with the exact epsilon of point-mass
    data x0 = mu: eps(x_t) = (x_t - sqrt(ab) mu) / sqrt(1 - ab). Returns (output, ab at the first step)."""
    sch = samplers.make_scheduler(name, _eps_original())
    sch.set_timesteps(steps)
    x, ab_first = z * sch.init_noise_sigma, None
    for i, t in enumerate(sch.timesteps):
        if name == "ddim":
            ab = float(sch.alphas_cumprod[int(t)])
        else:  # the solver's own sigma for this step (Karras sigmas sit between integer timesteps)
            sigma = float(sch.sigmas[i if sch.step_index is None else sch.step_index])
            ab = 1.0 / (1.0 + sigma**2)
        ab_first = ab if ab_first is None else ab_first
        u = sch.scale_model_input(x, t)
        x = sch.step((u - ab**0.5 * mu) / (1 - ab) ** 0.5, t, x).prev_sample
    return x, ab_first


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpm++2m", "dpm++2m-karras", "unipc"])
def test_registered_epsilon_samplers_are_exact_on_point_mass_data(name):
    """For point-mass data the probability-flow ODE is linear in the solvers' own coordinates, so every epsilon
    sampler must land exactly on its closed-form endpoint at any step count: x0 = mu for the samplers that end at
    sigma = 0, and sqrt(ab_0) mu + sqrt(1 - ab_0) eps for DDIM, which stops at the first training timestep
    (``set_alpha_to_one=False``, as SD configures it)."""
    mu = 1.5
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    for steps in (3, 8):
        out, ab_first = _integrate_eps(name, steps, z, mu)
        eps = (z - ab_first**0.5 * mu) / (1 - ab_first) ** 0.5  # constant along the ODE for point-mass data
        if name == "ddim":
            ab_end = float(_eps_original().alphas_cumprod[0])
            exact = ab_end**0.5 * mu + (1 - ab_end) ** 0.5 * eps
        else:
            exact = torch.full_like(z, mu)
        assert (out - exact).abs().max().item() < 1e-3, (name, steps)
