"""The contract every registered technique keeps, on every family it claims (in the spirit of pruna's
per-algorithm tester). Cases come from the registry, so a new technique is covered without editing this file:

apply returns the user's pipeline; a call runs and ``summary`` shows the technique acted (its per-call
record, or an output that differs from the baseline: never a silent no-op); a second call with another
step count runs; ``remove`` restores the outputs bit-exactly and leaves no fastgen state; a bad config
(wrong type) and an unsupported family give one clear error and leave the pipeline untouched; a patched
pipeline does not change another pipeline of the same class in the same process.

Per-technique tests keep only what is specific to each technique.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import fastgen
import fastgen.zoo
from fastgen.api import apply_technique
from fastgen.errors import FastgenError, MissingExtraError, UnsupportedPipelineError
from fastgen.ar import VARPipeline
from fastgen.testing import KINDS, default_call_kwargs, tiny_pipeline, tiny_resolution

# Configs where the technique's example would be a no-op on tiny random-weight pipelines (few tokens)
# or needs a family-specific setting; (technique, family) -> recipe. Otherwise the technique's example.
RECIPES = {
    "tome": "tome:0.5,min_tokens=0",
    ("tome", "sdxl"): "tome:0.5,max_downsample=2,min_tokens=0",
    "var-attn": "var-attn:math",
    "code": "code:draft=4",
    "qalora": "qalora:w8a8",
    ("sampler", "lumina2"): "sampler:unipc@4",
}
# Techniques that need a shipped artifact: run them on the zoo model that ships it (family -> zoo name).
ZOO = {"gd": {"sd3": "shapes-mmdit"}, "code": {"var": "digits-var"}, "schedule": {"sd3": "shapes-mmdit"}}
# Extras a technique needs (skipped with the reason when absent).
EXTRAS = {"executorch": "executorch", "tomesd": "tomesd", "anchor-deepcache": "DeepCache", "anchor-cachedit": "cache_dit"}
# The diffusion families (tiny pipelines) and the next-scale AR family (the shipped digits-var: a VAR call takes
# class labels and has no step count, so "another step count" is another label there).
FAMILIES = tuple(KINDS) + ("var",)
# Cases the tiny pipeline cannot host (the technique refuses it with a clear error, checked here too).
TOO_SMALL = {("blockcache", "sana"): "must leave at least one block"}


def _cases():
    out = []
    for tech in fastgen.list_techniques():
        fams = tech.families if tech.families is not None else FAMILIES
        if tech.name in ZOO:
            fams = tuple(f for f in fams if f in ZOO[tech.name])
        for fam in fams:
            if fam not in FAMILIES:
                continue
            out.append(pytest.param(tech.name, fam, id=f"{tech.name}-{fam}"))
    return out


def _pipe(name: str, family: str, seed: int = 0):
    zoo = ZOO.get(name, {}).get(family)
    if zoo is not None:
        return fastgen.load_default(zoo)
    if family == "var":
        return fastgen.load_default("digits-var")
    return tiny_pipeline(family, seed=seed)


def _call(pipe, steps: int | None):
    if isinstance(pipe, VARPipeline):  # steps None: the contract call; otherwise another call (label = steps)
        label = 3 if steps is None else steps
        return np.asarray(pipe(class_labels=[label], generator=torch.Generator().manual_seed(0), output_type="np").images,
                          dtype=np.float32)
    kw = default_call_kwargs(pipe, steps=steps)
    family = fastgen.get_adapter(pipe).family
    hw = tiny_resolution(family) if family in KINDS and fastgen.zoo.name_of(pipe) is None else None
    if hw is not None:  # the tiny size (Sana's default is 1024 px: minutes per case on 2 CPU cores)
        kw.update(height=hw[0], width=hw[1])
    out = pipe(**kw, output_type="np")
    images = out.images if hasattr(out, "images") else out
    return np.asarray(images, dtype=np.float32)


def _config(tech, family):
    recipe = RECIPES.get((tech.name, family)) or RECIPES.get(tech.name) or tech.example or tech.name
    (cfg,) = fastgen.parse_recipe(recipe)
    return cfg


def _acted(pipe, name, out, base) -> bool:
    last = fastgen.summary(pipe)["last_call"] or {}
    return bool(last.get(name)) or out.shape != base.shape or not np.array_equal(out, base)


def _unsupported_family(tech):
    for fam in FAMILIES:
        if tech.families is not None and fam not in tech.families:
            return fam
    return None


@pytest.mark.parametrize("name, family", _cases())
def test_technique_contract(name, family):
    tech = fastgen.registry.get_technique(name)
    if name in EXTRAS:
        pytest.importorskip(EXTRAS[name], reason=f"{name} needs its extra")
    torch.manual_seed(0)
    pipe = _pipe(name, family)
    steps = 4 if family != "var" else None
    base = _call(pipe, steps)
    cfg = _config(tech, family)

    # bad config type: one clear error, nothing patched
    with pytest.raises(TypeError, match=f"{name} expects a {tech.config_cls.__name__}"):
        apply_technique(pipe, name, object())
    assert not hasattr(pipe, "_fastgen")

    if (name, family) in TOO_SMALL:
        with pytest.raises(ValueError, match=TOO_SMALL[name, family]):
            fastgen.accelerate(pipe, cfg)
        assert not hasattr(pipe, "_fastgen")
        pytest.skip(f"the tiny {family} pipeline is too small for {name}")
    try:
        assert fastgen.accelerate(pipe, cfg) is pipe
    except MissingExtraError as e:
        pytest.skip(str(e))
    assert name in fastgen.summary(pipe)["techniques"]
    out = _call(pipe, steps)
    assert np.isfinite(out).all()
    if not tech.help.startswith("anchor:"):  # anchors are other projects' code, run as published
        assert _acted(pipe, name, out, base), f"{name} on {family}: no per-call record and the output is unchanged"
    assert fastgen.accelerate(pipe, cfg) is pipe  # the same config again: safe
    _call(pipe, 3 if family != "var" else 7)  # another step count (VAR: another label)
    assert fastgen.summary(pipe)["last_call"] is not None

    # a second pipeline of the same class is not affected
    if name not in ZOO:
        other = _pipe(name, family)
        other_base = _call(other, steps)
        _call(pipe, steps)
        assert np.array_equal(_call(other, steps), other_base)
        assert not hasattr(other, "_fastgen")

    assert fastgen.remove(pipe) is pipe
    assert not hasattr(pipe, "_fastgen")
    assert np.array_equal(_call(pipe, steps), base), f"{name} on {family}: remove did not restore the output"


@pytest.mark.parametrize("name", [t.name for t in fastgen.list_techniques() if _unsupported_family(t)])
def test_unsupported_family_is_a_clear_error_and_leaves_the_pipeline_untouched(name):
    tech = fastgen.registry.get_technique(name)
    fam = _unsupported_family(tech)
    pipe = _pipe("", fam)
    scheduler = getattr(pipe, "scheduler", None)
    with pytest.raises((UnsupportedPipelineError, FastgenError), match=f"{name} does not support"):
        fastgen.accelerate(pipe, _config(tech, tech.families[0]))
    assert not hasattr(pipe, "_fastgen") and getattr(pipe, "scheduler", None) is scheduler


def test_every_registered_technique_has_an_entry_point():
    from fastgen.registry import technique_entry_points

    names = {ep.name for ep in technique_entry_points()}
    assert {t.name for t in fastgen.list_techniques()} <= names
    for ep in technique_entry_points():
        importlib.import_module(ep.value.split(":")[0])
