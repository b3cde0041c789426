"""Reading and converting checkpoints of next-scale AR models: the official VAR release
(``vae_ch160v4096z32.pth``, ``var_d{16,20,24,30,36}.pth``), its trainer's ``ar-ckpt-*.pth``, the NVlabs HMAR
layout and fastgen's own safetensors folders.

* :func:`read_checkpoint` unwraps the usual containers (``{"trainer": {"var_wo_ddp": ...}}``, ``{"model": ...}``,
  ``module.``/``_orig_mod.`` prefixes) and renames an NVlabs-HMAR state dict (:func:`hmar_official_to_fastgen`).
* :func:`infer_var_config` / :func:`infer_vqvae_config` read the architecture off the tensors.
* :func:`load_state_dict_checked` / :func:`build_and_load` load with every missing, unexpected or mis-shaped
  tensor named in one :class:`CheckpointError` (a strict load builds on the meta device: no random init).
* :func:`load_official` puts it together: ``(vae, var)`` from the release files, checked against an expected
  depth, schedule or full :class:`~fastgen.ar.var.VARConfig`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from fastgen.errors import FastgenError
from fastgen.utils.logging import get_logger

from .var import VAR, VARConfig, block_causal_buffers
from .vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VQVAE, VQVAEConfig

logger = get_logger(__name__)

__all__ = [
    "CheckpointError", "read_checkpoint", "hmar_official_to_fastgen", "HMAR_KEY_MAP", "infer_var_config",
    "infer_vqvae_config", "load_state_dict_checked", "build_and_load", "load_official", "load_module",
    "DERIVED_BUFFERS",
]


class CheckpointError(FastgenError, ValueError):
    """A checkpoint does not match the model: wrong architecture, missing/unexpected/mis-shaped tensors."""


#: Buffers that are recomputed from the config; a checkpoint may omit them.
DERIVED_BUFFERS = re.compile(
    r"^(lvl_1L|attn_bias_for_masking|(mask_)?blocks\.\d+\.attn\.zero_k_bias|quantize\.ema_vocab_hit_SV)$")

_PRESETS = {PATCH_NUMS_256: "256 px", PATCH_NUMS_512: "512 px"}
_PREFIXES = ("module.", "_orig_mod.")


def _describe_pn(pns: Sequence[int], downsample: int = 16) -> str:
    pns = tuple(pns)
    L = sum(p * p for p in pns)
    name = _PRESETS.get(pns, f"{pns[-1] * downsample} px")
    return f"patch_nums {pns} ({len(pns)} scales, L={L}, {name})"


def read_checkpoint(src: str | os.PathLike | Mapping[str, Any], kind: str = "var", *,
                    weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Load a state dict of ``kind`` ``"var"`` or ``"vae"`` from a ``.pth``/``.pt``/``.safetensors`` file
    or an in-memory dict, unwrapping the usual containers: the official trainer's
    ``{"trainer": {"var_wo_ddp": ..., "vae_local": ...}}``, ``{"model": ...}``, ``{"state_dict": ...}``,
    ``{"var_wo_ddp"|"var"|"vae_local"|"vae": ...}``, and ``module.``/``_orig_mod.`` key prefixes."""
    if kind not in ("var", "vae"):
        raise ValueError(f"kind must be 'var' or 'vae', got {kind!r}")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=weights_only)
            except Exception as e:  # unpickling of non-tensor objects refused by weights_only
                raise CheckpointError(
                    f"could not read {path} with torch.load(weights_only={weights_only}): {e}. If the file comes "
                    "from a source you trust (e.g. a trainer checkpoint with pickled arguments), pass "
                    "weights_only=False.") from e
        where = str(path)
    else:
        obj, where = src, "the given dict"
    marker = "head.weight" if kind == "var" else "quantize.embedding.weight"
    nested = (("var_wo_ddp", "var", "model", "state_dict", "module", "ema") if kind == "var"
              else ("vae_local", "vae", "model", "state_dict", "module"))
    for _ in range(4):  # unwrap up to a few container levels
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
        keys = {_strip(k) for k in obj}
        if marker in keys:
            break
        if kind == "var" and any(k.startswith(("base_blocks.", "ns_blocks.")) for k in keys):
            obj = hmar_official_to_fastgen({_strip(k): v for k, v in obj.items()})
            break
        if "trainer" in obj and isinstance(obj["trainer"], Mapping):
            obj = obj["trainer"]
            continue
        inner = next((obj[k] for k in nested if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            top = sorted(map(str, obj))[:20]
            raise CheckpointError(f"{where}: no {kind.upper()} state dict found (looked for {marker!r} at the top "
                                  f"level and under 'trainer', {', '.join(repr(k) for k in nested)}); "
                                  f"top-level keys: {top}")
        obj = inner
    else:
        raise CheckpointError(f"{where}: no {kind.upper()} state dict found")
    sd = {_strip(k): v for k, v in obj.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: non-tensor entries in the state dict: {bad[:10]}")
    return sd


#: How the NVlabs HMAR release splits the trunk (``base_blocks`` shared by a next-scale branch ``ns_*`` and a
#: mask branch ``mask_*``) maps onto fastgen's HMAR layout (``VARConfig(markov=True, mask_layers=n)``):
#: ``base_blocks.i`` -> ``blocks.i``; ``ns_blocks.j`` -> ``blocks.{n_base + j}``; ``ns_head.*`` -> ``head.*``;
#: ``ns_head_nm.*`` -> ``head_nm.*``; ``word_embed_bias`` -> ``word_embed.bias``; ``mask_blocks.*``,
#: ``mask_head.*``, ``mask_head_nm.*`` and ``mask_embed`` keep their names. Written from the key list in
#: the HMAR paper's code description, not checked against a released file (none is available offline):
#: anything it does not map is named by the strict loader.
HMAR_KEY_MAP = (("ns_head_nm.", "head_nm."), ("ns_head.", "head."), ("word_embed_bias", "word_embed.bias"))


def hmar_official_to_fastgen(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an NVlabs-HMAR-layout state dict to fastgen's HMAR layout (see :data:`HMAR_KEY_MAP`)."""
    n_base = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"base_blocks\.(\d+)\.", k))), default=-1)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if (m := re.match(r"base_blocks\.(\d+)\.(.*)", k)):
            k = f"blocks.{m.group(1)}.{m.group(2)}"
        elif (m := re.match(r"ns_blocks\.(\d+)\.(.*)", k)):
            k = f"blocks.{n_base + int(m.group(1))}.{m.group(2)}"
        else:
            for a, b in HMAR_KEY_MAP:
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
        out[k] = v
    if "word_embed.bias" not in out and "word_embed.weight" in out:
        out["word_embed.bias"] = out["word_embed.weight"].new_zeros(out["word_embed.weight"].shape[0])
    return out


def _strip(key: Any) -> str:
    key = str(key)
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def infer_var_config(sd: Mapping[str, torch.Tensor], patch_nums: Sequence[int] | None = None,
                     **overrides: Any) -> VARConfig:
    """Read the architecture off a VAR state dict: depth (highest ``blocks.N``), width/vocabulary
    (``head.weight``), ``Cvae`` (``word_embed``), classes (``class_emb`` rows - 1), heads
    (``scale_mul_1H11``; without it, the official rule heads = depth), MLP ratio, ``shared_aln``,
    ``attn_l2_norm`` and HMAR mode (``markov``: a ``mask_embed`` tensor or a stored block-diagonal
    ``attn_bias_for_masking``; ``mask_layers``: the number of ``mask_blocks.N``; an HMAR checkpoint with
    neither, i.e. a next-scale-only one, reads as VAR: pass ``markov=True`` as an override or a full
    ``config`` to :func:`load_official`). ``patch_nums`` defaults to the
    official schedule with the checkpoint's number of positions (256 or 512 px); a given one is checked
    against ``pos_1LC``/``lvl_embed``."""
    need = ["head.weight", "word_embed.weight", "class_emb.weight", "pos_1LC", "lvl_embed.weight", "pos_start"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a VAR checkpoint: missing {missing}")
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not block_ids:
        raise CheckpointError("not a VAR checkpoint: no 'blocks.N.*' tensors")
    depth = max(block_ids) + 1
    V, C = sd["head.weight"].shape
    L, K, first_l = sd["pos_1LC"].shape[1], sd["lvl_embed.weight"].shape[0], sd["pos_start"].shape[1]
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if attn_l2_norm else None
    shared_aln = "shared_ada_lin.1.weight" in sd or "blocks.0.ada_gss" in sd
    fc1 = sd.get("blocks.0.ffn.fc1.weight")
    mlp_ratio = fc1.shape[0] / C if fc1 is not None else 4.0
    if patch_nums is None:
        cands = [p for p in _PRESETS if sum(x * x for x in p) == L and len(p) == K and p[0] ** 2 == first_l]
        if not cands:
            raise CheckpointError(f"checkpoint has {L} positions over {K} scales, which matches no official "
                                  f"schedule; pass patch_nums explicitly")
        patch_nums = cands[0]
    patch_nums = tuple(int(p) for p in patch_nums)
    exp_L = sum(p * p for p in patch_nums)
    if (exp_L, len(patch_nums), patch_nums[0] ** 2) != (L, K, first_l):
        ckpt_pn = next((p for p in _PRESETS if sum(x * x for x in p) == L and len(p) == K), None)
        has = _describe_pn(ckpt_pn) if ckpt_pn else f"{L} positions over {K} scales"
        raise CheckpointError(f"wrong resolution: checkpoint has {has}, config expects {_describe_pn(patch_nums)}")
    # HMAR: a mask token (and maybe a mask branch), or a stored block-diagonal training mask
    mask_layers = None
    if "mask_embed" in sd:
        mask_layers = len({int(m.group(1)) for k in sd if (m := re.match(r"mask_blocks\.(\d+)\.", k))})
    markov = mask_layers is not None
    bias = sd.get("attn_bias_for_masking")
    if bias is not None and tuple(bias.shape[-2:]) == (L, L) and L > first_l:
        markov = markov or bool(torch.isinf(bias[..., -1, 0]).all())  # last token cannot see the first: HMAR
    kw = dict(depth=depth, patch_nums=patch_nums, vocab_size=V, Cvae=sd["word_embed.weight"].shape[1],
              num_classes=sd["class_emb.weight"].shape[0] - 1, embed_dim=C,
              num_heads=heads if heads is not None else depth, mlp_ratio=mlp_ratio,
              shared_aln=shared_aln, attn_l2_norm=attn_l2_norm, markov=markov, mask_layers=mask_layers)
    kw.update(overrides)
    return VARConfig(**kw)


def infer_vqvae_config(sd: Mapping[str, torch.Tensor], patch_nums: Sequence[int] = PATCH_NUMS_256,
                       **overrides: Any) -> VQVAEConfig:
    """Read the VQ-VAE architecture off its state dict (width, ``ch_mult``, blocks per level, attention,
    codebook, phi sharing). ``quant_resi`` and ``norm_groups`` are not stored and default to the release
    values (0.5, 32) unless overridden."""
    need = ["quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a VAR VQ-VAE checkpoint: missing {missing}")
    V, Cvae = sd["quantize.embedding.weight"].shape
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    nrb = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    last = levels[-1] if levels else 0
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        share = len({k.split(".")[3] for k in sd if k.startswith("quantize.quant_resi.qresi_ls.")})
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in sd):
        share = 1
    else:
        share = 0
    kw: dict[str, Any] = dict(
        vocab_size=V, z_channels=Cvae, ch=ch, in_channels=in_ch, ch_mult=ch_mult, num_res_blocks=nrb,
        using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in sd, using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        quant_conv_ks=sd["quant_conv.weight"].shape[-1], share_quant_resi=share, patch_nums=tuple(patch_nums))
    if share == 0 and not any(k.startswith("quantize.quant_resi.") for k in sd):
        kw["quant_resi"] = 0.0
    kw.update(overrides)
    groups = kw.get("norm_groups", 32)
    widths = sorted({ch} | {ch * m for m in ch_mult})
    if any(w % groups for w in widths):
        raise CheckpointError(f"the VQ-VAE's conv widths {widths} are not divisible by {groups} GroupNorm groups "
                              "(the release's value; the number is not stored in the checkpoint): pass "
                              "vae_config=VQVAEConfig(..., norm_groups=N) with the value it was trained with")
    return VQVAEConfig(**kw)


def _compare_configs(expected: VARConfig, got: VARConfig) -> None:
    checks = [("depth", expected.depth, got.depth), ("width (embed_dim)", expected.width, got.width),
              ("heads", expected.heads, got.heads), ("vocab_size", expected.vocab_size, got.vocab_size),
              ("Cvae", expected.Cvae, got.Cvae), ("num_classes", expected.num_classes, got.num_classes),
              ("shared_aln", expected.shared_aln, got.shared_aln),
              ("attn_l2_norm", expected.attn_l2_norm, got.attn_l2_norm),
              ("mlp_ratio", expected.mlp_ratio, got.mlp_ratio), ("markov (HMAR)", expected.markov, got.markov),
              ("mask_layers", expected.mask_layers, got.mask_layers)]
    bad = [f"checkpoint has {n} {g}, config expects {e}" for n, e, g in checks if e != g]
    if tuple(expected.patch_nums) != tuple(got.patch_nums):
        bad.append(f"wrong resolution: checkpoint has {_describe_pn(got.patch_nums)}, config expects "
                   f"{_describe_pn(expected.patch_nums)}")
    if bad:
        raise CheckpointError("VAR checkpoint does not match the config: " + "; ".join(bad))


def load_state_dict_checked(module: nn.Module, sd: Mapping[str, torch.Tensor], name: str = "model", *,
                            strict: bool = True, copy: bool = True) -> None:
    """Load ``sd`` into ``module`` after checking it: missing, unexpected and mis-shaped tensors are
    listed by name in one :class:`CheckpointError` (``strict=False`` logs them instead and loads the
    rest). Derived buffers (:data:`DERIVED_BUFFERS`) may be absent or differently shaped. A module built on
    the meta device adopts the tensors of ``sd`` (copies of them with ``copy``)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not DERIVED_BUFFERS.match(k)]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape) and not DERIVED_BUFFERS.match(k)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if shape:
        problems.append(f"shape mismatches ({len(shape)}): {shape}")
    if problems:
        msg = f"{name} checkpoint does not match the model: " + "; ".join(problems)
        if strict:
            raise CheckpointError(msg)
        logger.warning("%s (loading the matching tensors, strict=False)", msg)
    load = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:  # built on the meta device: adopt the checkpoint's tensors (cast to the model's dtype)
        load = {k: v.to(own[k].dtype, copy=copy) for k, v in load.items()}
    module.load_state_dict(load, strict=False, assign=on_meta)
    if on_meta:
        _materialize_derived(module)


def _materialize_derived(module: nn.Module) -> None:
    # buffers that the checkpoint did not provide are recomputed (they are functions of the config)
    for mod in module.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if isinstance(mod, VAR) and name in ("lvl_1L", "attn_bias_for_masking"):
                lvl_1L, bias = block_causal_buffers(mod.patch_nums, markov=mod.config.markov)
                mod._buffers[name] = lvl_1L if name == "lvl_1L" else bias
            elif name in ("zero_k_bias", "ema_vocab_hit_SV"):
                mod._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
            else:
                raise RuntimeError(f"buffer {name!r} of {type(mod).__name__} was not in the checkpoint")
    left = [n for n, t in module.state_dict().items() if t.is_meta]
    if left:  # cannot happen after the strict checks; kept as a guard
        raise CheckpointError(f"tensors not loaded from the checkpoint: {left}")


def build_and_load(factory: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], name: str = "model", *,
                   strict: bool = True, copy: bool = True) -> nn.Module:
    """Build ``factory()`` and load ``sd`` into it. With ``strict`` the model is built on the meta device and
    takes the checkpoint's tensors directly (no random init, no second copy: VAR-d30 loads in seconds);
    with ``strict=False`` it is built normally so that tensors absent from ``sd`` keep their init. Pass
    ``copy=False`` when ``sd`` is not used elsewhere (e.g. just read from a file) to share its memory."""
    if not strict:
        module = factory()
        load_state_dict_checked(module, sd, name, strict=False)
        return module
    with torch.device("meta"):
        module = factory()
    load_state_dict_checked(module, sd, name, strict=True, copy=copy)
    return module


def load_official(
    vae_ckpt: str | os.PathLike | Mapping[str, Any] | None,
    var_ckpt: str | os.PathLike | Mapping[str, Any], *,
    depth: int | None = None, patch_nums: Sequence[int] | None = None, config: VARConfig | None = None,
    vae_config: VQVAEConfig | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    strict: bool = True, weights_only: bool = True,
) -> tuple[VQVAE, VAR]:
    """Build and load the official VAR release (or a checkpoint of its trainer).

    Args:
        vae_ckpt: ``vae_ch160v4096z32.pth`` (or a dict); ``None`` takes the VAE from a trainer checkpoint
            ``var_ckpt`` that holds ``trainer.vae_local``.
        var_ckpt: ``var_d{16,20,24,30,36}.pth``, ``ar-ckpt-*.pth`` or a dict.
        depth: expected depth; a different checkpoint raises "checkpoint has depth X, config expects Y".
        patch_nums: expected schedule (default: inferred, 256 or 512 px); a mismatch raises
            "wrong resolution: ...".
        config: full expected :class:`VARConfig` (every architecture field is compared).
        vae_config: VQ-VAE config (default: inferred from the tensors with the release's ``quant_resi``).
        device, dtype: where to put the models.
        strict: raise on missing/unexpected/mis-shaped tensors (default), else log and load the rest.
        weights_only: passed to ``torch.load``.

    Returns:
        ``(vae, var)`` in eval mode, with ``vae`` attached to ``var``.
    """
    var_sd = read_checkpoint(var_ckpt, "var", weights_only=weights_only)
    exp_pn = tuple(config.patch_nums) if config is not None else (tuple(patch_nums) if patch_nums else None)
    if config is not None and patch_nums is not None and tuple(patch_nums) != exp_pn:
        raise ValueError(f"patch_nums {tuple(patch_nums)} disagrees with config.patch_nums {exp_pn}")
    # with an expected schedule, a checkpoint of another length raises "wrong resolution: ..."
    got = infer_var_config(var_sd, patch_nums=exp_pn)
    if depth is not None and depth != got.depth:
        raise CheckpointError(f"checkpoint has depth {got.depth}, config expects depth {depth} "
                              f"(width {got.width} vs {64 * depth})")
    if config is not None:
        _compare_configs(config, got)
        got = replace(config)
    if vae_ckpt is None:
        if isinstance(var_ckpt, Mapping):
            vae_src: Any = var_ckpt
        else:
            vae_src = torch.load(str(var_ckpt), map_location="cpu", weights_only=weights_only)
        vae_sd = read_checkpoint(vae_src, "vae", weights_only=weights_only)
    else:
        vae_sd = read_checkpoint(vae_ckpt, "vae", weights_only=weights_only)
    vcfg = vae_config or infer_vqvae_config(vae_sd, patch_nums=got.patch_nums)
    if tuple(vcfg.patch_nums) != tuple(got.patch_nums):
        vcfg = replace(vcfg, patch_nums=tuple(got.patch_nums))
    if (vcfg.vocab_size, vcfg.z_channels) != (got.vocab_size, got.Cvae):
        raise CheckpointError(f"VQ-VAE has vocab {vcfg.vocab_size} and Cvae {vcfg.z_channels}, the VAR checkpoint "
                              f"expects vocab {got.vocab_size} and Cvae {got.Cvae}")
    # tensors read from files are adopted without a copy; a caller's in-memory dict is copied
    vae_copy = isinstance(vae_ckpt, Mapping) or (vae_ckpt is None and isinstance(var_ckpt, Mapping))
    vae = build_and_load(lambda: VQVAE(vcfg), vae_sd, "VQ-VAE", strict=strict, copy=vae_copy)
    var = build_and_load(lambda: VAR(got, init=False), var_sd, "VAR", strict=strict,
                         copy=isinstance(var_ckpt, Mapping))
    _check_buffers(var, var_sd)
    vae.eval().requires_grad_(False)
    var.eval().requires_grad_(False)
    vae.to(device=device, dtype=dtype)
    var.to(device=device, dtype=dtype)
    var.attach_vae(vae)
    logger.info("loaded VAR-d%d (C=%d, %s) and its VQ-VAE", got.depth, got.width, _describe_pn(got.patch_nums))
    return vae, var


def _check_buffers(var: VAR, sd: Mapping[str, torch.Tensor]) -> None:
    # the stored scale-index buffer must agree with the schedule (catches same-L, different-K orderings)
    if "lvl_1L" in sd and tuple(sd["lvl_1L"].shape) == tuple(var.lvl_1L.shape):
        if not torch.equal(sd["lvl_1L"].to(var.lvl_1L), var.lvl_1L):
            raise CheckpointError(f"wrong resolution: the checkpoint's scale layout (lvl_1L) differs from "
                                  f"{_describe_pn(var.patch_nums)}")


def load_module(folder: str | os.PathLike) -> torch.nn.Module:
    """Load a :class:`~fastgen.ar.vqvae.VQVAE` or :class:`~fastgen.ar.var.VAR` from a component folder
    (``config.json`` + ``model.safetensors``, as :func:`fastgen.ar.train.save_module` writes it and
    ``VARPipeline.save_pretrained`` lays out ``vae/`` and ``var/``), in eval mode without gradients."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    kind = cfg.get("_class_name")
    if kind == "VQVAE":
        c = VQVAEConfig.from_dict(cfg)
        m = build_and_load(lambda: VQVAE(c), read_checkpoint(folder / "model.safetensors", "vae"), "VQ-VAE", copy=False)
    elif kind == "VAR":
        c = VARConfig.from_dict(cfg)
        m = build_and_load(lambda: VAR(c, init=False), read_checkpoint(folder / "model.safetensors", "var"), "VAR",
                           copy=False)
    else:
        raise ValueError(f"{folder / 'config.json'}: _class_name {kind!r} is neither 'VQVAE' nor 'VAR'")
    return m.eval().requires_grad_(False)
