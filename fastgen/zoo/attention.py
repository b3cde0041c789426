"""Exact fast attention for the zoo's SD3 pipeline: many identical all-zero "T5" tokens collapsed into few.

``StableDiffusion3Pipeline`` appends ``max_sequence_length`` (default 256) all-zero "T5" tokens to the 16
CLIP tokens when there is no T5 encoder (``shapes-mmdit`` ships the exact-zero stub :func:`fastgen.zoo.builders.zero_t5`).
Those tokens are identical at the input (the context embedder maps each to its bias) and stay identical
through every block (same input, same per-token maps), so in the joint attention they are ``n``
copies of one key/value. Attending to ``m`` copies whose logits are raised by ``log(n / m)`` gives the
same softmax weights, hence the same model, for any ``m >= 1``:
``shapes-mmdit`` is trained with ``m = 1`` (``n = 256``) and :func:`fastgen.zoo.load_default` installs
:class:`CollapsedZerosJointAttnProcessor`, so that calls with ``max_sequence_length=2`` (the zoo's
:func:`~fastgen.zoo.call_kwargs`) give the images of the plain 256-token call at about a quarter of the
sequence length (64 image + 18 context tokens instead of 64 + 272). A call with the default
``max_sequence_length=256`` through this processor is the plain call exactly (``m = n``, no bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["SD3_ZERO_TOKENS", "CollapsedZerosJointAttnProcessor", "use_collapsed_zeros"]

#: Number of all-zero "T5" tokens StableDiffusion3Pipeline appends by default (``max_sequence_length``).
SD3_ZERO_TOKENS = 256


class CollapsedZerosJointAttnProcessor:
    """``JointAttnProcessor2_0`` for a context whose tokens after the first ``n_text`` are ``m`` copies of
    one zero token standing for ``n`` of them (``m`` is read from the context length on every call).

    Args:
        n: how many zero tokens the model means (the pipeline default, 256).
        n_text: how many real text (CLIP) tokens start the context (the zoo tokenizer's 16).
    """

    def __init__(self, n: int = SD3_ZERO_TOKENS, n_text: int = 16):
        if n < 1 or n_text < 0:
            raise ValueError(f"CollapsedZerosJointAttnProcessor needs n >= 1 and n_text >= 0, got n={n}, n_text={n_text}")
        self.n, self.n_text = int(n), int(n_text)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("CollapsedZerosJointAttnProcessor needs the joint (context) stream")
        B = hidden_states.shape[0]
        m = encoder_hidden_states.shape[1] - self.n_text
        if not 1 <= m <= self.n:
            raise ValueError(
                f"CollapsedZerosJointAttnProcessor: the context has {encoder_hidden_states.shape[1]} tokens, i.e. {m} zero "
                f"tokens after the {self.n_text} text tokens; call the pipeline with 1 <= max_sequence_length <= {self.n}"
            )
        q_BHLD, k_BHLD, v_BHLD = (self._split(p(hidden_states), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q_BHLD = attn.norm_q(q_BHLD)
        if attn.norm_k is not None:
            k_BHLD = attn.norm_k(k_BHLD)
        n_img = hidden_states.shape[1]
        cq, ck, cv = (self._split(p(encoder_hidden_states), attn.heads)
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q_BHLD, k_BHLD, v_BHLD = torch.cat([q_BHLD, cq], 2), torch.cat([k_BHLD, ck], 2), torch.cat([v_BHLD, cv], 2)
        mask = None
        if m != self.n:
            bias_L = torch.zeros(k_BHLD.shape[2], dtype=q_BHLD.dtype, device=q_BHLD.device)
            bias_L[-m:] = math.log(self.n / m)
            mask = bias_L.expand(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=mask, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(B, -1, out.shape[1] * out.shape[3]).to(q_BHLD.dtype)
        hidden_states, encoder_hidden_states = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states

    @staticmethod
    def _split(t_BLC: torch.Tensor, heads: int) -> torch.Tensor:
        B, L, C = t_BLC.shape
        return t_BLC.view(B, L, heads, C // heads).transpose(1, 2)


def use_collapsed_zeros(transformer, on: bool = True, n_text: int = 16) -> None:
    """Install :class:`CollapsedZerosJointAttnProcessor` on every attention of an ``SD3Transformer2DModel``
    (``on=False`` puts diffusers' ``JointAttnProcessor2_0`` back)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(CollapsedZerosJointAttnProcessor(n_text=n_text) if on else JointAttnProcessor2_0())
