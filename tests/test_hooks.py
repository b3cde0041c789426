import torch

from fastgen.hooks import add_hook, remove_hook


class _AddOne:
    _is_stateful = False

    def __init__(self):
        self.fn_ref = None

    def initialize_hook(self, module):
        return module

    def deinitalize_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output + 1

    def reset_state(self, module):
        return module


def test_add_remove_hook_leaves_module_as_found():
    m = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    ref = m(x)
    keys = set(m.__dict__)
    add_hook(m, _AddOne(), "plus")
    assert torch.allclose(m(x), ref + 1)
    add_hook(m, _AddOne(), "plus")  # same name replaces, does not stack
    assert torch.allclose(m(x), ref + 1)
    remove_hook(m, "plus")
    assert torch.equal(m(x), ref) and set(m.__dict__) == keys
    remove_hook(m, "plus")  # no-op


def test_remove_keeps_a_registry_someone_else_made():
    from diffusers.hooks import HookRegistry

    m = torch.nn.Linear(3, 3)
    HookRegistry.check_if_exists_or_initialize(m)
    add_hook(m, _AddOne(), "plus")
    remove_hook(m, "plus")
    assert hasattr(m, "_diffusers_hook") and "forward" not in m.__dict__


def test_step_counter_stays_outermost():
    """A technique hook added on the denoiser after attach() already sees the current step index."""
    import fastgen
    from fastgen.hooks import attach, detach_if_empty
    from fastgen.testing import default_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("sd3")
    st = attach(pipe)
    seen = []

    class Probe(_AddOne):
        def post_forward(self, module, output):
            return output

        def pre_forward(self, module, *args, **kwargs):
            seen.append(st.call.step_index)
            return args, kwargs

    add_hook(pipe.transformer, Probe(), "probe")
    pipe(**default_call_kwargs(pipe, steps=3), height=32, width=32, output_type="np")
    assert seen == [0, 1, 2]
    remove_hook(pipe.transformer, "probe")
    detach_if_empty(pipe)
    assert fastgen.summary(pipe)["recipe"] == "baseline" and not hasattr(pipe.transformer, "_diffusers_hook")


class _Replace(_AddOne):
    """A new_forward hook (diffusers drops these when a hook below them is removed naively)."""

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs) * 10

    def post_forward(self, module, output):
        return output


def test_removing_a_lower_hook_keeps_new_forward_hooks_above():
    m = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    ref = m(x)
    add_hook(m, _AddOne(), "plus")
    add_hook(m, _Replace(), "times")
    assert torch.allclose(m(x), (ref + 1) * 10)
    remove_hook(m, "plus")
    assert torch.allclose(m(x), ref * 10)
    remove_hook(m, "times")
    assert torch.equal(m(x), ref) and not hasattr(m, "_diffusers_hook")


def test_a_recipe_that_changes_the_step_count_drops_the_calls_own_sigmas(caplog):
    """A zoo student's default call passes its own 2-step ``sigmas``; ``steps:4`` must run 4 steps, not be
    silently overridden by that grid."""
    import fastgen
    from fastgen.testing import default_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("sd3")
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    kw = {**default_call_kwargs(pipe, steps=2), "sigmas": [1.0, 0.9], "guidance_scale": 1.0, "output_type": "latent"}
    pipe(**kw)
    assert len(seen) == 2
    mid = seen[1]  # sigma 0.9 (through the scheduler's shift)
    fastgen.accelerate(pipe, "steps:4")
    seen.clear()
    with caplog.at_level("WARNING", logger="fastgen"):
        pipe(**kw)
    assert len(seen) == 4 and "sigmas (2 values) no longer fit" in caplog.text
    seen.clear()
    pipe(**{**kw, "sigmas": [1.0, 0.9, 0.6, 0.3]})  # a grid that fits the new count is kept
    assert len(seen) == 4 and seen[1] == mid
    fastgen.remove(pipe)
