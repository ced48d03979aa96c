"""The SiT / DiT / REPA family: official DiT and SiT files, REPA's released and training checkpoints, ours.

Formats (all with DiT's parameter names; docs/checkpoints.md):
  dit-official   bare EMA state dict (DiT-XL-2-256x256.pt), learn-sigma output, discrete VP time
  sit-official   bare EMA state dict (SiT-XL-2-256x256.pt), same keys and shapes as DiT, SiT time
  repa-last      REPA's released last.pt: bare state dict, no sigma, projectors
  repa-train     REPA training dict {model, ema, opt, args: argparse.Namespace, steps}
                 (older ones name blocks after the aligned depth: decoder_blocks.{j} = blocks.{j+depth})
  repa-probe     ours: plain-data config + weights (weights-only .pt, or .safetensors with JSON metadata)

REG's checkpoints (Martinser/REG: the repa-train layout plus the class token's `cls_projectors2`, `wg_norm`,
`final_layer.linear_cls` and a pos_embed of T + 1 rows) and ours with --reg-cls load as the same SiT with its class
token; the analysis measures the image tokens as the model (`block_tokens`) and the class token as a source of its own
(`class_token`: the same model seen through its first token).

The architecture is read off the tensor shapes: width, depth, patch, channels, input size, classes,
learn-sigma, qk-norm, projector dims, REG's class-token width. The number of attention heads is not in the
shapes (unless qk-norm is on): it comes from the file's config or args, from `heads`, or from the standard sizes
(an assumption every report states); a custom width without any of these is refused rather than guessed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
from pathlib import Path

import torch
from torch import nn

from repa_probe.checkpoints import FORMAT_TAG, LoadedCheckpoint, Provenance, as_untrained
from repa_probe.data import DEFAULT_VAE, LATENT_SCALE, VAE_DOWNSAMPLE
from repa_probe.errors import UserError
from repa_probe.families.base import Anatomy, InputSpace, ModelFamily, assign_weights, choose_weights, register_family
from repa_probe.models import REPA_DEPTH, SIZES, ModelConfig, SiT, size_name
from repa_probe.noise import CONVENTIONS, get_convention
from repa_probe.runtime import file_sha256

OFFICIAL_FILE_NAMES = {  # released file name pattern → time convention
    r"DiT-XL-2-(256|512)x(256|512)\.pt": "dit",
    r"SiT-XL-2-(256|512)x(256|512)\.pt": "sit",
}


class SiTFamily(ModelFamily):
    name = "sit"
    description = "SiT / DiT / REPA (facebookresearch/DiT, willisma/SiT, sihyun-yu/REPA) and repa-probe's own"

    def recognise(self, obj: dict, path: Path) -> bool:
        if obj.get("format") == FORMAT_TAG:
            return (obj.get("meta") or {}).get("family", "sit") == self.name
        sd = obj.get("ema", obj.get("model", obj)) if ("ema" in obj or "model" in obj) else obj
        if isinstance(sd, dict) and "bn.running_mean" in sd:   # REPA-E's latent BatchNorm: families/repae.py
            return False
        return isinstance(sd, dict) and ("x_embedder.proj.weight" in sd or any(
            str(k).startswith(("blocks.", "decoder_blocks.")) for k in sd))

    def load(self, obj: dict, path: Path, *, convention: str | None, weights: str,
             device: str | torch.device = "cpu", heads: int | None = None) -> LoadedCheckpoint:
        fmt, state_dict, chosen, hints, meta, step = _unpack(path, obj, weights)
        state_dict, renamed = _rename_legacy(state_dict, hints.get("encoder_depth"))
        if heads is not None:
            hints["num_heads"] = heads
        config = config_from_state_dict(state_dict, path, hints)
        model = build_model(config, state_dict, path).to(device).eval()

        conv, source = _detect_convention(path, fmt, convention, meta)
        if fmt == "dit/sit-official":
            fmt = "dit-official" if conv == "dit" else "sit-official"
        warnings = []
        if source == "assumed":
            warnings.append(f"time convention ASSUMED to be '{conv}' ({get_convention(conv).describe()}): the "
                            f"weights cannot tell SiT from DiT; pass --convention sit|dit|repa to be sure")
        if hints.get("heads_assumed"):
            warnings.append(f"attention heads ASSUMED to be {config.num_heads} (the standard {size_name(config)}): "
                            f"the weights cannot tell; pass --heads N if the model was trained otherwise")
        if renamed:
            warnings.append("legacy REPA checkpoint: decoder_blocks.* renamed to blocks.*")
        if hints.get("encoder_depth_assumed") and config.z_dims:
            warnings.append(f"REPA depth not recorded; assumed block {config.encoder_depth}")
        args = hints.get("args", {})
        encoders = meta.get("encoders") or _split_encoders(args.get("enc_type"))
        coeff = meta.get("repa_coeff", args.get("proj_coeff"))
        prov = Provenance(path=str(path), format=fmt, weights=chosen, convention=conv, convention_source=source,
                          step=step, sha256=file_sha256(path), encoders=encoders, repa_coeff=coeff,
                          args=args or {k: v for k, v in meta.items() if _plain(v)}, warnings=warnings,
                          family=self.name)
        return LoadedCheckpoint(model=model, config=config, provenance=prov, meta=meta, family=self)

    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        c: ModelConfig = model.config
        latent = (meta or {}).get("mode", "pixels" if c.in_channels == 3 else "latents") == "latents"
        space = InputSpace("latents", c.in_channels, c.input_size, VAE_DOWNSAMPLE, LATENT_SCALE, 0.0,
                           (meta or {}).get("vae") or DEFAULT_VAE) if latent else \
            InputSpace("pixels", c.in_channels, c.input_size)
        return Anatomy(name=size_name(c), depth=c.depth, width=c.hidden_size,
                       grid=c.input_size // c.patch_size, patch_size=c.patch_size, input=space,
                       num_classes=c.num_classes, aligned_block=c.encoder_depth if c.z_dims else None)

    def input_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.selected(super().input_tokens(args, kwargs))

    def block_tokens(self, output: torch.Tensor) -> torch.Tensor:
        return self.selected(output)

    def selected(self, h: torch.Tensor) -> torch.Tensor:
        """The tokens analysed of a block's sequence: the image tokens, or in the class-token view its class token."""
        return image_tokens(h) if self.tokens == "image" else prefix_tokens(h)

    def class_token(self, ckpt: LoadedCheckpoint) -> LoadedCheckpoint | None:
        """A REG model seen through its class token (fed 0, as in every analysis): a copy of this family whose
        tokens are the prefix, on the same model object."""
        if not getattr(ckpt.config, "cls_token_dim", 0):
            return None
        view = copy.copy(self)
        view.tokens = "class token"
        return dataclasses.replace(ckpt, family=view)

    def untrained(self, ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
        """DiT's initialisation, seeded, with the adaLN-Zero gates given PyTorch's default init (as_untrained)."""
        torch.manual_seed(seed)
        return as_untrained(ckpt, SiT(ckpt.config))

    def describe_rows(self, ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
        c = ckpt.config
        proj = ", ".join(f"{c.hidden_size}→{c.projector_dim}→{z}" if c.projector == "mlp" else
                         f"conv {c.projector_kernel}×{c.projector_kernel} {c.hidden_size}→{z} (iREPA)"
                         for z in c.z_dims) or "none"
        return [("architecture", size_name(c, "DiT" if ckpt.provenance.convention == "dit" else "SiT")),
                ("width / depth / heads", f"{c.hidden_size} / {c.depth} / {c.num_heads}"),
                ("input", f"{c.in_channels}×{c.input_size}×{c.input_size}, patch {c.patch_size} → "
                          f"{c.num_patches} tokens"),
                ("classes", f"{c.num_classes} (+1 null)"), ("learn sigma", str(c.learn_sigma)),
                ("qk-norm", str(c.qk_norm)), ("REPA projectors", proj),
                ("REPA depth", str(c.encoder_depth) if c.z_dims else "-"),
                ("REG class token", f"{c.cls_token_dim}-d, first in the sequence (analysed: the image tokens as the "
                                    f"model, the class token as its own row, kind class-token)"
                                    if c.cls_token_dim else "-")]


SIT = register_family(SiTFamily())


def image_tokens(h: torch.Tensor) -> torch.Tensor:
    """A SiT block's image tokens (N, T, D): all its tokens, or, for a REG model, all but its class token, which
    comes first. The image grid is square and T + 1 never is, so the count tells the two apart."""
    side = math.isqrt(h.shape[1])
    return h[:, h.shape[1] - side * side:]


def prefix_tokens(h: torch.Tensor) -> torch.Tensor:
    """The tokens before a SiT block's image tokens (N, T' − T, D): REG's class token, (N, 1, D); none otherwise."""
    side = math.isqrt(h.shape[1])
    return h[:, :h.shape[1] - side * side]


def as_checkpoint(model: SiT, convention: str = "repa", meta: dict | None = None) -> LoadedCheckpoint:
    """An in-memory SiT (a trainer's EMA, a test's model) as a LoadedCheckpoint of this family."""
    prov = Provenance(path="<in memory>", format="in-memory", weights="as given", convention=convention,
                      convention_source="flag", family=SIT.name)
    return LoadedCheckpoint(model=model, config=model.config, provenance=prov, meta=dict(meta or {}), family=SIT)


#################################################################################
#                          Format detection and unpacking                       #
#################################################################################

def _unpack(path: Path, obj: dict, weights: str):
    """→ (format, state_dict, which weights, config hints, our meta, step)."""
    if obj.get("format") == FORMAT_TAG:
        sd, chosen = choose_weights(obj, weights, path)
        hints = {"config": obj["config"]}
        return FORMAT_TAG, sd, chosen, hints, dict(obj.get("meta", {})), obj.get("meta", {}).get("step")
    if "model" in obj or "ema" in obj:
        sd, chosen = choose_weights(obj, weights, path)
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        hints = {"args": {k: v for k, v in args.items() if _plain(v)}}
        if "encoder_depth" in args:
            hints["encoder_depth"] = int(args["encoder_depth"])
        if "num_heads" in args:   # not in REPA's own args; our export-repa writes it for custom sizes
            hints["num_heads"] = int(args["num_heads"])
        return "repa-train", sd, chosen, hints, {}, obj.get("steps")
    out_rows = _shape(obj, "final_layer.linear.weight")
    patch = _shape(obj, "x_embedder.proj.weight")
    if out_rows and patch and out_rows[0] == 2 * patch[1] * patch[2] * patch[3]:
        fmt = "dit/sit-official"
    else:
        fmt = "repa-last" if any(k.startswith("projectors.") for k in obj) else "bare-state-dict"
    return fmt, obj, "state_dict", {}, {}, None


def _detect_convention(path: Path, fmt: str, flag: str | None, meta: dict) -> tuple[str, str]:
    if flag:
        return flag, "flag"
    if meta.get("convention") in CONVENTIONS:
        return meta["convention"], "checkpoint"
    if fmt in ("repa-last", "repa-train"):
        return "repa", "checkpoint"
    for pattern, conv in OFFICIAL_FILE_NAMES.items():
        if re.fullmatch(pattern, path.name):
            return conv, "file name"
    return ("sit" if fmt == "dit/sit-official" else "repa"), "assumed"


def _split_encoders(enc_type) -> list[str]:
    return [e for e in str(enc_type).split(",") if e and e != "None"] if enc_type else []


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v))


def _shape(sd: dict, key: str) -> list[int] | None:
    return list(sd[key].shape) if key in sd and isinstance(sd[key], torch.Tensor) else None


def _rename_legacy(sd: dict, encoder_depth: int | None) -> tuple[dict, bool]:
    """Older REPA checkpoints: blocks.{i} for i < depth, decoder_blocks.{j} for the rest."""
    if not any(k.startswith("decoder_blocks.") for k in sd):
        return sd, False
    depth = encoder_depth or 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = {}
    for k, v in sd.items():
        m = re.match(r"decoder_blocks\.(\d+)\.(.*)", k)
        out[f"blocks.{int(m.group(1)) + depth}.{m.group(2)}" if m else k] = v
    return out, True


#################################################################################
#                        Config inference and model building                    #
#################################################################################

def config_from_state_dict(sd: dict, path: str | Path = "<state dict>", hints: dict | None = None) -> ModelConfig:
    """Infer the architecture from shapes: width, depth, heads, patch, channels, input size, classes,
    learn-sigma, qk-norm, projector dims. `hints` (our config, REPA's args, --heads) take precedence. Heads
    cannot be read from shapes without qk-norm: for a standard size they are assumed (hints['heads_assumed']
    is set, and the loader says so); for any other width the caller must say (--heads)."""
    hints = hints if hints is not None else {}
    if "config" in hints:
        try:
            config = ModelConfig.from_dict(hints["config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"checkpoint '{path}' has an invalid config: {e}") from None
        if "num_heads" in hints and hints["num_heads"] != config.num_heads:
            raise UserError(f"--heads {hints['num_heads']}: '{path}' records {config.num_heads} heads")
        return config
    if "x_embedder.proj.weight" not in sd or "pos_embed" not in sd:
        first = next(iter(sd))
        raise UserError(f"'{path}' is not a DiT/SiT state dict: missing key 'x_embedder.proj.weight'; its first "
                        f"key is '{first}' with shape {list(sd[first].shape)}")
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    cls_dim = int(sd["cls_projectors2.weight"].shape[1]) if "cls_projectors2.weight" in sd else 0   # REG
    tokens = sd["pos_embed"].shape[1] - (1 if cls_dim else 0)
    grid = int(round(tokens ** 0.5))
    depth = 1 + max((int(k.split(".")[1]) for k in sd if re.match(r"blocks\.\d+\.", k)), default=-1)
    if depth == 0:
        raise UserError(f"'{path}' is not a DiT/SiT state dict: it has no 'blocks.N.*' keys")
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    heads = _heads(sd, hidden, depth, qk_norm, hints, path)
    out_rows = sd["final_layer.linear.weight"].shape[0] if "final_layer.linear.weight" in sd else patch * patch * in_ch
    z_dims, proj_dim, k, kind, kernel = [], 2048, 0, "mlp", 3
    while f"projectors.{k}.4.weight" in sd or f"projectors.{k}.conv.weight" in sd:
        if f"projectors.{k}.conv.weight" in sd:                  # iREPA's convolution (z, D, k, k)
            w = sd[f"projectors.{k}.conv.weight"]
            z_dims.append(int(w.shape[0]))
            kind, kernel = "conv", int(w.shape[-1])
        else:
            z_dims.append(int(sd[f"projectors.{k}.4.weight"].shape[0]))
            proj_dim = int(sd[f"projectors.{k}.0.weight"].shape[0])
        k += 1
    enc_depth = hints.get("encoder_depth")
    if enc_depth is None and z_dims:
        std = next((s for s, (d, n, _) in SIZES.items() if (d, n) == (hidden, depth)), None)
        enc_depth = REPA_DEPTH[std] if std else max(1, depth // 3)
        hints["encoder_depth_assumed"] = True
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * hidden
    table = sd.get("y_embedder.embedding_table.weight")
    return ModelConfig(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                       depth=depth, num_heads=heads, mlp_ratio=mlp_hidden / hidden,
                       num_classes=(table.shape[0] - 1) if table is not None else 1000,
                       learn_sigma=out_rows == 2 * patch * patch * in_ch, qk_norm=qk_norm,
                       z_dims=z_dims, projector_dim=proj_dim, encoder_depth=int(enc_depth or 0), projector=kind,
                       projector_kernel=kernel, sra_head="ap_head.linear1.weight" in sd,   # SRA's head (its layout)
                       cls_token_dim=cls_dim)


def _heads(sd: dict, hidden: int, depth: int, qk_norm: bool, hints: dict, path) -> int:
    if qk_norm:
        heads = hidden // sd["blocks.0.attn.q_norm.weight"].shape[0]
        if hints.get("num_heads", heads) != heads:
            raise UserError(f"--heads {hints['num_heads']}: the qk-norm weights of '{path}' say {heads} heads")
        return heads
    if "num_heads" in hints:
        heads = int(hints["num_heads"])
        if heads <= 0 or hidden % heads:
            raise UserError(f"--heads {heads}: must be a positive divisor of the width {hidden} of '{path}'")
        return heads
    standard = next((h for d, n, h in SIZES.values() if (d, n) == (hidden, depth)), None)
    if standard is None:
        raise UserError(f"'{path}': cannot tell the number of attention heads of a width-{hidden}, {depth}-block "
                        f"model from its weights (not a standard SiT/DiT size, no qk-norm, none recorded): "
                        f"pass --heads N")
    hints["heads_assumed"] = True
    return standard


def build_model(config: ModelConfig, sd: dict, path: str | Path = "<state dict>") -> SiT:
    """A SiT of `config` holding `sd` (families.base.assign_weights: every key checked by name and shape)."""
    model = assign_weights(lambda: SiT(config), sd, path, "DiT/SiT", size_name(config))
    model.pos_embed.requires_grad_(False)
    return model
