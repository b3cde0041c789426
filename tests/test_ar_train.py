"""fastgen.ar.train (VQ-VAE and VAR stages, exact resume, export) and the digits scorer fastgen.zoo.digits.
Tiny architectures, a few steps each, CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastgen.ar import train as T
from fastgen.ar.pipeline import VARPipeline
from fastgen.zoo import digits

torch.set_num_threads(1)

TINY_VAE = {"ch": 8, "ch_mult": (1, 2, 4), "vocab_size": 32, "z_channels": 4, "norm_groups": 4,
            "patch_nums": (1, 2, 4, 8)}
TINY_VAR = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def test_digits_split_and_scorer():
    xt, yt = digits.load("train")
    xh, yh = digits.load("heldout")
    assert xt.shape == (1079, 32, 32) and xh.shape == (718, 32, 32) and 0 <= xt.min() and xt.max() <= 1
    assert sorted(set(yt.tolist())) == list(range(10))
    flat = {x.tobytes() for x in digits.load("all")[0]}
    assert len(flat) >= 1790  # (a handful of exact duplicates exist in the source data)
    assert np.array_equal(digits.load("heldout")[1], yh)  # deterministic
    ref = digits.reference_scores()  # real images the classifier never saw
    assert ref["accuracy"] >= 0.95 and ref["fid"] < 2.0
    s = digits.score(yh[:100], (digits.to_rgb(xh[:100]) * 255).astype(np.uint8))  # uint8 NHWC
    assert s["accuracy"] >= 0.95 and s["n"] == 100 and set(s) >= {"accuracy", "fid", "per_class"}
    wrong = digits.score((yh[:100] + 1) % 10, torch.from_numpy(digits.to_rgb(xh[:100])).permute(0, 3, 1, 2))
    assert wrong["accuracy"] < 0.1
    noise = digits.score(yh[:100], np.random.RandomState(0).rand(100, 32, 32, 3).astype(np.float32))
    assert noise["fid"] > 10 * s["fid"]
    with pytest.raises(ValueError, match="labels for"):
        digits.score(yh[:3], xh[:4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digits.score(yh[:2], xh[:2] * 2 - 1)


def _vae_run(tmp_path, steps, resume_at=None):
    cfg = T.VAETrainConfig(batch=4, total_steps=steps, warmup=2, restart_every=2, arch=TINY_VAE, limit=64)
    tr = T.VAETrainer(cfg, tmp_path)
    if resume_at is not None:
        tr.run(steps=resume_at, final_eval=False, progress=False)
        tr = T.VAETrainer(cfg, tmp_path)
        assert tr.resume() and tr.step == resume_at
    tr.run(steps=steps, eval_minutes=0, progress=False)
    return tr


def test_vae_stage_exact_resume_and_outputs(tmp_path):
    a = _vae_run(tmp_path / "a", 4)
    b = _vae_run(tmp_path / "b", 4, resume_at=2)
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
    assert (tmp_path / "a" / "checkpoint.pt").is_file() and not (tmp_path / "a" / "checkpoint.pt.tmp").exists()
    row = json.loads((tmp_path / "a" / "history.jsonl").read_text().splitlines()[-1])
    assert set(row) >= {"step", "rec_mse", "codes_used", "rec_accuracy", "rec_fid"} and row["step"] == 4
    vae = T.load_module(tmp_path / "a" / "vae")
    assert vae.config.patch_nums == (1, 2, 4, 8) and vae.config.image_size == 32
    with pytest.raises(ValueError, match="different settings"):
        T.VAETrainer(T.VAETrainConfig(batch=8, total_steps=4, arch=TINY_VAE), tmp_path / "a").resume()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    _vae_run(d, 2)
    return d


@pytest.mark.parametrize("arch", [TINY_VAR, {**TINY_VAR, "markov": True, "mask_layers": 0}])
def test_var_stage_resume_export_and_zoo_layout(vae_dir, tmp_path, arch):
    cfg = T.VARTrainConfig(vae=str(vae_dir), batch=4, total_steps=4, warmup=2, eval_n=10, arch=arch, limit=64)
    a = T.VARTrainer(cfg, tmp_path / "a")
    a.run(steps=4, eval_minutes=0, progress=False)
    b = T.VARTrainer(cfg, tmp_path / "b")
    b.run(steps=2, final_eval=False, progress=False)
    b = T.VARTrainer(cfg, tmp_path / "b")
    assert b.resume()
    b.run(steps=4, eval_minutes=0, progress=False)
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
    row = json.loads((tmp_path / "a" / "history.jsonl").read_text().splitlines()[-1])
    assert set(row) >= {"val_loss", "accuracy", "fid"}
    pipe = VARPipeline.from_pretrained(tmp_path / "a" / "best_pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.var.config.markov == bool(arch.get("markov")) and pipe.var.num_classes == 10
    out = pipe([0, 9], seed=0, output_type="np", hmar_steps={2: 2} if arch.get("markov") else None)
    assert out.images.shape == (2, 32, 32, 3)
    # export with a refiner (another run on the same VAE) in var_small/
    dst = T.export(tmp_path / "a", tmp_path / "shipped", refiner=tmp_path / "b")
    assert (dst / "var_small" / "config.json").is_file()
    assert VARPipeline.from_pretrained(dst).name_or_path == str(dst)


def test_cli(vae_dir, tmp_path):
    out = tmp_path / "run"
    args = ["var", "--vae", str(vae_dir), "--out", str(out), "--steps", "2", "--batch", "2", "--eval-n", "10",
            "--limit", "64", "--no-progress", "--arch", "depth=1", "embed_dim=32", "num_heads=2"]
    assert T.main(args) == 0
    with pytest.raises(SystemExit, match="pass --resume"):
        T.main(args)
    assert T.main(args + ["--resume"]) == 0  # already at its 2 steps: only the final evaluation
    assert T.main(["export", "--out", str(out), "--to", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model_index.json").is_file()
    with pytest.raises(FileNotFoundError, match="no VQ-VAE folder"):
        T.main(["var", "--vae", str(tmp_path), "--out", str(tmp_path / "x"), "--steps", "1"])


def test_zoo_digits_var():
    from fastgen import zoo

    if not (zoo.weights_path("digits-var") / "model_index.json").exists():
        with pytest.raises(zoo.WeightsNotFoundError, match="fastgen.ar.train"):
            zoo.load_default("digits-var")
        pytest.skip("digits-var weights are not installed")
    pipe = zoo.load_default("digits-var")
    assert isinstance(pipe, VARPipeline) and pipe.var.patch_nums == (1, 2, 3, 4, 6, 8) and pipe.image_size == 32
    assert (zoo.weights_path("digits-var") / "var_small" / "config.json").is_file()  # the CoDe refiner
    out = pipe(list(range(10)), seed=0, output_type="np", **zoo.call_kwargs("digits-var"))
    assert out.images.shape == (10, 32, 32, 3)
    assert digits.score(list(range(10)), out.images)["accuracy"] >= 0.8
    size = sum(f.stat().st_size for f in zoo.weights_path("digits-var").rglob("*") if f.is_file())
    assert size < 10e6
