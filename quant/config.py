"""QALoRA's settings: :class:`QALoRAConfig` (how a denoiser is quantized) and :class:`LayerSpec` (one layer's plan).

The layer-name patterns :data:`DEFAULT_KEEP_FP`, :data:`MODULATION_LAYERS` and :data:`FIRST_LAST_LAYERS`
say which layers stay full precision or run at W8A8 by default (:func:`quant.plan_layers` applies them).
See :mod:`quant.qalora` for the method.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from fastgen.errors import RecipeError
from fastgen.prompts import check_calibration_prompts

__all__ = ["QALoRAConfig", "LayerSpec", "DEFAULT_KEEP_FP", "MODULATION_LAYERS", "FIRST_LAST_LAYERS"]

#: Glob patterns (``fnmatch`` on the denoiser's qualified module names) of layers kept in full precision
#: by default: time/class/text/position/patch embeddings, and UNet shortcut convs (whose input, after the
#: skip concatenation, is bimodal: Q-Diffusion; EfficientDM keeps them FP too).
DEFAULT_KEEP_FP: tuple[str, ...] = (
    "time_embedding.*", "time_embed.*", "*timestep_embedder.*", "time_text_embed.*", "time_caption_embed.*",
    "add_embedding.*", "class_embedding.*", "*.emb.*",
    "context_embedder", "caption_projection.*", "encoder_hid_proj*", "*text_embedder*",
    "pos_embed.*", "patch_embed.*", "x_embedder",
    "*conv_shortcut",
    "guidance_proj",  # distill.models.GuidanceSD3Transformer2DModel's guidance-weight embedding
)

#: adaLN / timestep-modulation projections (SD3/FLUX ``norm1.linear``, PixArt ``adaln_single.linear``, DiT
#: ``proj_out_1``, UNet ``time_emb_proj``, ...). Kept FP unless ``quantize_modulation=True``. In DiTs they
#: hold about a third of each block's weights, so W4 memory savings need them quantized.
MODULATION_LAYERS: tuple[str, ...] = (
    "*norm1.linear", "*norm1_context.linear", "norm_out.linear", "norm_out.linear_1", "*.norm.linear",
    "adaln_single.linear", "proj_out_1", "*time_emb_proj",
)

#: First and last layers of the supported denoisers (exact top-level names): quantized at W8A8 without
#: LoRA by default (EfficientDM's ``set_first_last_layer_to_8bit``). Patch embeddings are FP (above).
FIRST_LAST_LAYERS: tuple[str, ...] = ("conv_in", "conv_out", "proj_out", "proj_out_2", "norm_out.linear_2")


@dataclass(frozen=True)
class QALoRAConfig:
    """How a denoiser is quantized (EfficientDM QALoRA; the fine-tune settings are in ``quant.FinetuneConfig``).

    Attributes:
        w_bits: weight bits (default 8; range 2-8). Per-output-channel symmetric signed steps.
            EfficientDM reports W8A8, W4A8, W4A4 and W2A8; W4 needs the fine-tune to stay close to FP.
        a_bits: activation bits (default 8; range 2-8), or ``None`` for weight-only quantization. Per-tensor
            steps (a table per timestep, see ``per_timestep_act``). Mobile NPUs run A8 (or A16).
        rank: LoRA rank of every quantized layer (default 32, as EfficientDM; 0 = no LoRA, i.e. plain PTQ).
            Capped at ``min(in_features, out_features)`` per layer. Sensible 4-64.
        lora_alpha: LoRA scaling is ``lora_alpha / rank``; ``None`` (default) means a scaling of 1, as in
            EfficientDM (the per-layer learning rates of the fine-tune set the update size).
        per_timestep_act: one activation step size (and zero point) per calibrated timestep (default True;
            EfficientDM's TALSQ); the row is picked from the real timestep of each call, an unseen timestep
            uses the nearest calibrated one. False: one step per layer for all timesteps.
        act_symmetric: activations signed symmetric (zero point 0) if True; default False: unsigned
            ``[0, 2^b-1]`` with a learned integer zero point (suits post-GELU/SiLU inputs).
        weight_init: ``"mse"`` (default; per-channel clipping ratio minimising the L2.4 error, LAPQ /
            EfficientDM) or ``"max"`` (per-channel max).
        act_init: ``"mse"`` (default) or ``"max"`` for the activation ranges captured at calibration.
        keep_fp: glob patterns of layers kept in full precision (default :data:`DEFAULT_KEEP_FP`; add
            your own with ``DEFAULT_KEEP_FP + ("down_blocks.0.*",)``).
        quantize_modulation: also quantize the adaLN / timestep-modulation projections
            (:data:`MODULATION_LAYERS`; default False: FP).
        eight_bit: glob patterns of layers quantized at W8A8 (A8 only if ``a_bits`` is set) without LoRA
            (default :data:`FIRST_LAST_LAYERS`; ``()`` quantizes them like the others).
        calib_samples: activation values kept per layer and timestep for the ``"mse"`` search (default 2048).
        seed: seed of the LoRA ``A`` initialisation and of the calibration subsampling (default 0).
        calibration_prompts: what the ``qalora:`` recipe's quick calibration runs on (no effect on speed;
            quality follows how well they match your real prompts): None (default) = 4 prompts of
            :func:`fastgen.prompts.default_prompts` (generic text-to-image prompts; a zoo model's own world;
            class labels for DiT), a tuple of your prompts, or a path to a text file of one prompt per line
            (recipe option ``prompts=FILE``). Not stored in saved files.
    """

    w_bits: int = 8
    a_bits: int | None = 8
    rank: int = 32
    lora_alpha: float | None = None
    per_timestep_act: bool = True
    act_symmetric: bool = False
    weight_init: str = "mse"
    act_init: str = "mse"
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    quantize_modulation: bool = False
    eight_bit: tuple[str, ...] = FIRST_LAST_LAYERS
    calib_samples: int = 2048
    seed: int = 0
    calibration_prompts: str | tuple[str, ...] | None = None

    def __post_init__(self):
        def bits_ok(b):
            return isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8

        if not bits_ok(self.w_bits):
            raise ValueError(f"w_bits must be an integer in 2..8, got {self.w_bits!r}")
        if self.a_bits is not None and not bits_ok(self.a_bits):
            raise ValueError(f"a_bits must be an integer in 2..8 or None (weight-only), got {self.a_bits!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"rank must be an integer >= 0 (0 = no LoRA, plain PTQ), got {self.rank!r}")
        if self.lora_alpha is not None and not float(self.lora_alpha) > 0:
            raise ValueError(f"lora_alpha must be > 0 or None, got {self.lora_alpha!r}")
        for k in ("weight_init", "act_init"):
            if getattr(self, k) not in ("mse", "max"):
                raise ValueError(f"{k} must be 'mse' or 'max', got {getattr(self, k)!r}")
        for k in ("keep_fp", "eight_bit"):
            v = getattr(self, k)
            if isinstance(v, str) or not all(isinstance(p, str) for p in v):
                raise ValueError(f"{k} must be a tuple of glob patterns, got {v!r}")
            object.__setattr__(self, k, tuple(v))
        if not isinstance(self.calib_samples, int) or self.calib_samples < 16:
            raise ValueError(f"calib_samples must be an integer >= 16, got {self.calib_samples!r}")
        object.__setattr__(self, "calibration_prompts", check_calibration_prompts(self.calibration_prompts))

    @property
    def bits(self) -> str:
        """``"w4a8"`` style label (``"w4a16"`` for weight-only)."""
        return f"w{self.w_bits}a{self.a_bits or 16}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_fp"], d["eight_bit"] = list(self.keep_fp), list(self.eight_bit)
        d.pop("calibration_prompts")  # an input of the recipe's calibration, not a property of the quantized model
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QALoRAConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown QALoRAConfig fields {unknown}")
        d = dict(d)
        for k in ("keep_fp", "eight_bit"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_string(cls, args: str | None) -> "QALoRAConfig":
        """Parse recipe arguments: ``"w4a8"``, ``"w8a8,r16"``, ``"w4a16"`` (weight-only), options
        ``rN`` (rank), ``flat`` (one activation step for all timesteps), ``sym`` (symmetric activations),
        ``max``/``mse`` (init of both), ``mod`` (quantize modulation layers), ``no8`` (first/last layers at
        the given bits too: ``eight_bit=()``), ``prompts=FILE`` (calibration prompts, one per line). ``None`` gives the defaults."""
        if args is None or not args.strip():
            return cls()
        raw_parts = [p.strip() for p in args.split(",") if p.strip()]
        parts = [p.lower() for p in raw_parts]
        m = re.fullmatch(r"w(\d+)a(\d+|fp)", parts[0])
        if not m:
            raise RecipeError(f"expected the bits first, like 'w4a8' or 'w8a8' (w4a16 = weight-only), got {parts[0]!r}")
        a = m.group(2)
        kw: dict[str, Any] = {"w_bits": int(m.group(1)), "a_bits": None if a in ("16", "fp") else int(a)}
        for raw, p in zip(raw_parts[1:], parts[1:]):
            if p.startswith("prompts="):
                kw["calibration_prompts"] = raw.split("=", 1)[1]
            elif p[:1] == "r" and p[1:].isdigit():
                kw["rank"] = int(p[1:])
            elif p == "flat":
                kw["per_timestep_act"] = False
            elif p == "sym":
                kw["act_symmetric"] = True
            elif p in ("max", "mse"):
                kw["weight_init"] = kw["act_init"] = p
            elif p == "mod":
                kw["quantize_modulation"] = True
            elif p == "no8":
                kw["eight_bit"] = ()
            else:
                raise RecipeError(f"unknown qalora option {p!r}; options: rN (LoRA rank), flat, sym, max|mse, mod, no8, "
                                  "prompts=FILE (calibration prompts, one per line)")
        try:
            return cls(**kw)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def to_string(self) -> str:
        """Inverse of :meth:`from_string` for the fields it covers (e.g. ``"w4a8,r16"``)."""
        d = QALoRAConfig()
        s = [self.bits]
        if self.rank != d.rank:
            s.append(f"r{self.rank}")
        if not self.per_timestep_act:
            s.append("flat")
        if self.act_symmetric:
            s.append("sym")
        if self.weight_init == self.act_init == "max":
            s.append("max")
        if self.quantize_modulation:
            s.append("mod")
        if not self.eight_bit:
            s.append("no8")
        if isinstance(self.calibration_prompts, str):
            s.append(f"prompts={self.calibration_prompts}")
        return ",".join(s)


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized: ``kind`` (``"linear"``/``"conv2d"``), bits, LoRA rank, weight shape."""

    kind: str
    w_bits: int
    a_bits: int | None
    rank: int
    shape: tuple[int, ...]

    @property
    def bits(self) -> str:
        return f"w{self.w_bits}a{self.a_bits or 16}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "w_bits": self.w_bits, "a_bits": self.a_bits, "rank": self.rank,
                "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerSpec":
        return cls(str(d["kind"]), int(d["w_bits"]), None if d["a_bits"] is None else int(d["a_bits"]),
                   int(d.get("rank", 0)), tuple(int(v) for v in d["shape"]))

