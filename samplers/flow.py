"""Training-free samplers for flow-matching models, as diffusers schedulers.

Convention (diffusers' FlowMatchEuler): ``x_sigma = (1 - sigma) x0 + sigma * noise``, the model predicts the
velocity ``v = noise - x0``, sigma runs from ~1 (noise) to 0 (data) and an Euler step is
``x_next = x + (sigma_next - sigma) * v``. Both schedulers subclass ``FlowMatchEulerDiscreteScheduler``, so
the pipeline's shift, dynamic shifting and custom sigmas all keep working.

* :class:`FlowPseudoCorrectorScheduler` — FlowTurbo's pseudo corrector (Zhao et al., "FlowTurbo: Towards
  Real-time Flow-Based Image Generation with Velocity Refiner", NeurIPS 2024): Heun's trapezoid update at
  one model call per step, by reusing the velocity evaluated at the previous predictor point as the
  velocity of the current point.
* :class:`FlowLPLScheduler` — Linear Proportional Leap (Kim et al., "On-device Sora", arXiv 2502.04363):
  Euler steps while the trajectory still bends; once the cosine similarity of consecutive velocities stops
  improving (the path has become straight), leap to the end with one linear step ``x0 = x - sigma * v``.
  The denoiser calls of the skipped steps are not run (``samplers`` installs a hook that returns the
  cached output once the scheduler has leapt).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

__all__ = ["FlowPseudoCorrectorScheduler", "FlowLPLScheduler"]


class _FlowBase(FlowMatchEulerDiscreteScheduler):
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        # explicit signature: pipelines inspect it to decide whether custom sigmas/timesteps are accepted
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu,
                              timesteps=timesteps)
        self._reset()

    def _reset(self) -> None:  # per-call state
        pass

    def _begin(self, timestep) -> int:
        if self.step_index is None:
            self._init_step_index(timestep)
        return self.step_index

    def _out(self, prev: torch.Tensor, dtype: torch.dtype, return_dict: bool):
        self._step_index += 1
        prev = prev.to(dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class FlowPseudoCorrectorScheduler(_FlowBase):
    """Heun-quality flow steps at one model call per step (FlowTurbo's pseudo corrector).

    State per call: ``x_i`` (the corrected point) and ``d_i`` (its velocity). Each step receives the velocity
    evaluated at the predictor point ``x~_i = x_{i-1} + dt_{i-1} d_{i-1}`` that the previous step returned,
    corrects ``x_i = x_{i-1} + dt_{i-1} / 2 (d_{i-1} + v(x~_i))``, takes ``d_i = v(x~_i)`` (the pseudo part:
    no second model call at ``x_i``), and returns the next predictor ``x_i + dt_i d_i``. The last step
    (to sigma = 0) is therefore corrected and then finished with Euler, like FlowTurbo's final step.
    The latents a step callback sees are predictor points; the final output is a corrected point.
    """

    def _reset(self) -> None:
        self._x: torch.Tensor | None = None
        self._d: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        i = self._begin(timestep)
        v = model_output.to(torch.float32)
        sigmas = self.sigmas
        if i == 0 or self._x is None:
            x = sample.to(torch.float32)
        else:
            x = self._x + (sigmas[i] - sigmas[i - 1]) / 2 * (self._d + v)
        self._x, self._d = x, v
        return self._out(x + (sigmas[i + 1] - sigmas[i]) * v, sample.dtype, return_dict)


class FlowLPLScheduler(_FlowBase):
    """Flow Euler with a Linear Proportional Leap to the end once the velocity field has settled.

    Leap rule (``configure_lpl(min_fraction, patience, tol)``):
        lpl_min_fraction: never leap before this fraction of the steps has run (default 0.5; the reference
            uses step >= 14 of 30). Lower = faster, riskier. Range 0.3-0.8.
        lpl_patience: leap after this many consecutive steps whose velocity cosine similarity does not
            beat the best so far by more than ``lpl_tol`` (default 3; range 1-5).
        lpl_tol: improvement that counts (default 1e-3).

    After the leap ``leaped`` is True, ``leap_step`` holds the step index and later steps return the
    sample unchanged.
    """

    # LPL settings are plain attributes (not scheduler config), so from_config() keeps FlowMatchEuler's
    # own config (shift, dynamic shifting) intact; set them with configure_lpl().
    lpl_min_fraction: float = 0.5
    lpl_patience: int = 3
    lpl_tol: float = 1e-3
    leaped: bool = False
    leap_step: int | None = None

    def configure_lpl(self, min_fraction: float = 0.5, patience: int = 3, tol: float = 1e-3) -> "FlowLPLScheduler":
        """Set the leap rule (see the class docstring); returns self."""
        if not 0.0 <= min_fraction <= 1.0:
            raise ValueError(f"lpl_min_fraction must be in [0, 1], got {min_fraction}")
        if patience < 1:
            raise ValueError(f"lpl_patience must be >= 1, got {patience}")
        self.lpl_min_fraction, self.lpl_patience, self.lpl_tol = min_fraction, patience, tol
        return self

    def _reset(self) -> None:
        self.leaped = False
        self.leap_step: int | None = None
        self._prev_v: torch.Tensor | None = None
        self._best = -2.0
        self._stale = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        i = self._begin(timestep)
        if self.leaped:
            return self._out(sample, sample.dtype, return_dict)
        v = model_output.to(torch.float32)
        x = sample.to(torch.float32)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        n = len(self.sigmas) - 1
        if self._prev_v is not None:
            cos = torch.nn.functional.cosine_similarity(v.flatten(1), self._prev_v.flatten(1), dim=1).min().item()
            if cos > self._best + self.lpl_tol:
                self._best, self._stale = cos, 0
            else:
                self._stale += 1
        self._prev_v = v
        if sigma_next > 0 and i + 1 >= self.lpl_min_fraction * n and self._stale >= self.lpl_patience:
            self.leaped, self.leap_step = True, i
            return self._out(x - sigma * v, sample.dtype, return_dict)  # one linear step to sigma = 0
        return self._out(x + (sigma_next - sigma) * v, sample.dtype, return_dict)
