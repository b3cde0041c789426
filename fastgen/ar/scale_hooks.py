"""The per-scale hook interface of :meth:`fastgen.ar.var.VAR.sample`.

The next-scale loop of ``VAR.sample`` is the plain VAR algorithm; what an accelerator changes in it goes
through a :class:`ScaleHooks` object called at fixed points of every scale ``k`` (the accelerators of
:mod:`fastgen.ar.accel` are such hooks: FastVAR token pruning, CoDe draft/refine, cfg-share)::

    begin(var, vae, B)                       once per call, before scale 0: reset per-call state, check
    handover(k) -> VAR | None                which model runs scales k.. (CoDe; asked for every k up front)
    plan(step)                               before scale k's tokens are built: step.uncond (run the
                                             unconditional rows?), step.keep_Bk (which tokens to compute)
    full_grid(step, h_RkC, cond_RD)          only if this hook set keep_Bk: hidden states and logits of the
        -> (h_RnC | None, logits_RnV)        whole pn x pn grid from the computed tokens
    on_logits(step, h_RnC, logits_RnV)       after the logits: guided B x n x V logits (None: the standard
        -> logits_BnV | None                 ramped CFG), and a chance to remember them for later scales
    on_tokens(step, idx_Bl) -> idx_Bl        after sampling (before HMAR refinement and editing)

Every method of the base class is the plain step, so a hook overrides only what it changes and
``ScaleHooks()`` is the baseline bit-exactly. Several hooks compose with :func:`as_hooks` (a
:class:`HookChain`): all are called in order; at most one may prune a scale, hand over at a scale or guide a
scale's logits. Hooks keep their per-call state on themselves, reset in ``begin``; a caller that runs calls
concurrently gives each call its own hook objects.

:class:`CondRowsCache` is the model-side half of skipping the unconditional rows: a view of a ``2B``-row KV
cache for a pass over the ``B`` conditional rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["ScaleStep", "ScaleHooks", "HookChain", "as_hooks", "CondRowsCache"]


@dataclass
class ScaleStep:
    """What :meth:`ScaleHooks.plan` sees of scale ``si`` and may change (``uncond``, ``keep_Bk``).

    Attributes:
        si, K: scale index and number of scales.
        pn: side length of the scale's token map (``pn * pn`` tokens).
        B: batch size (the conditional rows; ``2B`` rows run when ``uncond``).
        t: the scale's guidance weight ``cfg * si / (K - 1)``.
        model: the VAR that runs this scale.
        handed_over: ``model`` took over at this scale (its KV cache was just rebuilt from the earlier scales).
        in_BChw: the scale's continuous input (the running reconstruction at ``pn x pn``), ``None`` at scale 0.
        uncond: run the unconditional rows (default True); False leaves ``B`` rows and the hook that said so
            guides the logits in ``on_logits``.
        keep_Bk: sorted indices ``B x k`` of the tokens that run through the transformer (default ``None``:
            all); the hook that sets them builds the full grid in ``full_grid``.
    """

    si: int
    K: int
    pn: int
    B: int
    t: float
    model: Any
    handed_over: bool
    in_BChw: torch.Tensor | None
    uncond: bool = True
    keep_Bk: torch.Tensor | None = None


class ScaleHooks:
    """Base class of the per-scale hooks of ``VAR.sample`` (see the module docstring); every method is the
    plain VAR step."""

    def begin(self, var: Any, vae: Any, B: int) -> None:
        """A call of ``var.sample`` with ``vae`` and batch ``B`` starts: reset per-call state, raise on bad input."""

    def handover(self, si: int) -> Any:
        """The model that runs scales ``si, si + 1, ...`` if it changes at ``si`` (CoDe), else ``None``.
        Asked for every scale before scale 0, so it must not depend on what was sampled."""
        return None

    def plan(self, step: ScaleStep) -> None:
        """Before scale ``step.si``'s tokens are built: set ``step.uncond`` and/or ``step.keep_Bk``."""

    def full_grid(self, step: ScaleStep, h_RkC: torch.Tensor, cond_RD: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Hidden states (or ``None``) and float32 logits ``R x n x V`` of the whole grid of a scale whose
        ``keep_Bk`` this hook set; ``h_RkC`` are the final hidden states of the kept tokens (``R`` rows),
        ``cond_RD`` the rows' conditions (for ``step.model.get_logits``)."""
        raise NotImplementedError(f"{type(self).__name__} set keep_Bk but does not implement full_grid")

    def on_logits(self, step: ScaleStep, h_RnC: torch.Tensor | None, logits_RnV: torch.Tensor) -> torch.Tensor | None:
        """After scale ``step.si``'s logits (``R`` rows: conditional, then unconditional if ``step.uncond``):
        the guided ``B x n x V`` logits, or ``None`` for ``(1 + t) cond - t uncond``."""
        return None

    def on_tokens(self, step: ScaleStep, idx_Bl: torch.Tensor) -> torch.Tensor:
        """After sampling scale ``step.si``: the tokens ``B x n`` to keep (default: as sampled)."""
        return idx_Bl


class HookChain(ScaleHooks):
    """Several hooks called in order. At most one may hand over at a scale, prune a scale (set ``keep_Bk``)
    or return guided logits for a scale; two raise ``ValueError``."""

    def __init__(self, hooks: Sequence[ScaleHooks]):
        self.hooks = list(hooks)
        self._pruner: ScaleHooks | None = None

    def begin(self, var: Any, vae: Any, B: int) -> None:
        for h in self.hooks:
            h.begin(var, vae, B)

    def handover(self, si: int) -> Any:
        got = [m for m in (h.handover(si) for h in self.hooks) if m is not None]
        if len(got) > 1:
            raise ValueError(f"two scale hooks hand scale {si} to another model")
        return got[0] if got else None

    def plan(self, step: ScaleStep) -> None:
        self._pruner = None
        for h in self.hooks:
            before = step.keep_Bk
            h.plan(step)
            if step.keep_Bk is not before:
                if self._pruner is not None:
                    raise ValueError(f"two scale hooks prune scale {step.si}: {type(self._pruner).__name__} and "
                                     f"{type(h).__name__}")
                self._pruner = h

    def full_grid(self, step: ScaleStep, h_RkC: torch.Tensor, cond_RD: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        assert self._pruner is not None, "full_grid without a hook that set keep_Bk"
        return self._pruner.full_grid(step, h_RkC, cond_RD)

    def on_logits(self, step: ScaleStep, h_RnC: torch.Tensor | None, logits_RnV: torch.Tensor) -> torch.Tensor | None:
        out = None
        for h in self.hooks:
            got = h.on_logits(step, h_RnC, logits_RnV)
            if got is not None:
                if out is not None:
                    raise ValueError(f"two scale hooks guide the logits of scale {step.si}")
                out = got
        return out

    def on_tokens(self, step: ScaleStep, idx_Bl: torch.Tensor) -> torch.Tensor:
        for h in self.hooks:
            idx_Bl = h.on_tokens(step, idx_Bl)
        return idx_Bl


def as_hooks(hooks: ScaleHooks | Sequence[ScaleHooks] | None) -> ScaleHooks:
    """One :class:`ScaleHooks` from ``None`` (the plain step), a hook or a sequence of them."""
    if hooks is None:
        return ScaleHooks()
    if isinstance(hooks, ScaleHooks):
        return hooks
    hooks = list(hooks)
    bad = [type(h).__name__ for h in hooks if not isinstance(h, ScaleHooks)]
    if bad:
        raise TypeError(f"scale hooks must be fastgen.ar.scale_hooks.ScaleHooks instances, got {bad}")
    return hooks[0] if len(hooks) == 1 else HookChain(hooks)


class CondRowsCache:
    """A view of a ``2B``-row KV cache for a pass over the first ``R`` (conditional) rows only: the new K/V
    are written for both halves (the unconditional half gets copies, used only if a later scale runs the
    unconditional rows again) and the first ``R`` rows are attended."""

    def __init__(self, cache: Any, R: int):
        self.cache, self.R = cache, R

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reps = 2 if self.cache.k is None else self.cache.k.shape[0] // k.shape[0]
        k_all, v_all = self.cache.append(k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1))
        return k_all[:self.R], v_all[:self.R]

    @property
    def length(self) -> int:
        return self.cache.length
