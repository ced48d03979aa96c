"""REPA-E (End2End-Diffusion/REPA-E; Leng et al. 2025, "REPA-E: Unlocking VAE for End-to-End Tuning with Latent
Diffusion Transformers"): a SiT trained end to end with its VAE, and SiTs trained on the resulting E2E-VAE.

Files (a weights-only read allows their argparse.Namespace args):
  repae-train      train_repae.py: {model, ema, vae, discriminator, opt, opt_vae, opt_disc, args, steps};
                   `vae` is the jointly trained VAE, in latent-diffusion's (CompVis) AutoencoderKL layout
  repae-ldm-train  train_ldm_only.py, a SiT on a frozen E2E-VAE: {model, ema, opt, args, steps}
  repae-state-dict one of the SiT state dicts alone
The SiT state dicts have REPA's key names (models.py) plus the buffers of one BatchNorm2d(C, eps=1e-4,
affine=False): bn.running_mean, bn.running_var, bn.num_batches_tracked. Those three keys are what marks a
REPA-E file. args records model ("SiT-XL/2"), vae ("f8d4" | "f16d32"), encoder_depth, enc_type, proj_coeff,
path_type, prediction; without qk-norm the heads come from the model name (REPA-E's sizes are ours).

Time: path "linear", prediction "v": x_t = (1 − t)·x + t·ε fed t, target ε − x. That is our "repa" convention;
a file trained on the "cosine" path is refused unless --convention says how to feed it.

Latents: the SiT's own forward normalises the VAE latent z per channel with the BatchNorm before noising it,
x = (z − running_mean_c) / sqrt(running_var_c + 1e-4) (in training with the batch statistics, which the
running ones track and the EMA averages; REPA-E's sampler un-normalises with the EMA's running ones). A single
scale and shift cannot say this, and a family's forward cannot apply it (capture feeds x_t already noised in
model space), so, as for LightningDiT, the statistics are folded into the VAE's 1×1 quant convolutions: the
input space is "latents, scale 1, shift 0" of a VAE made by `export_vae`, which converts the checkpoint's own
VAE (or a given E2E-VAE) to a diffusers AutoencoderKL folder and folds the statistics in.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from repa_probe.checkpoints import (
    FORMAT_TAG,
    LoadedCheckpoint,
    read_checkpoint,
    safe_torch_load,
)
from repa_probe.errors import UserError
from repa_probe.families.base import Anatomy, InputSpace, choose_weights, register_family
from repa_probe.families.lightningdit import fold_latent_stats
from repa_probe.families.sit import SiTFamily
from repa_probe.models import SIZES

BN_EPS = 1e-4                                   # REPA-E's BatchNorm2d(eps=1e-4); not stored in the state dict
BN_KEYS = ("bn.running_mean", "bn.running_var")
DOWNSAMPLE = {"f8d4": 8, "f16d32": 16}           # REPA-E's --vae choices: 4 channels at /8, 32 channels at /16


def repae_state_dict(obj: object) -> bool:
    """Whether `obj` is a SiT state dict with REPA-E's latent BatchNorm."""
    return isinstance(obj, dict) and isinstance(obj.get("x_embedder.proj.weight"), torch.Tensor) and all(
        isinstance(obj.get(k), torch.Tensor) for k in BN_KEYS)


def looks_like_repae(obj: dict) -> bool:
    """Whether a checkpoint object is REPA-E's: a training dict whose weights, or a state dict that, carries
    the latent BatchNorm's running statistics."""
    if not isinstance(obj, dict) or obj.get("format") == FORMAT_TAG:
        return False
    return any(repae_state_dict(obj.get(k)) for k in ("ema", "model")) or repae_state_dict(obj)


def latent_stats(sd: dict, eps: float = BN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), C values each, of the BatchNorm in a REPA-E SiT state dict: the model's input is
    (z − mean) / std with std = sqrt(running_var + eps), as the BatchNorm computes it in eval mode."""
    mean, var = (sd[k].detach().double().reshape(-1) for k in BN_KEYS)
    return mean.float(), (var + eps).sqrt().float()


class RepaEFamily(SiTFamily):
    """REPA-E's SiT is REPA's SiT (same keys, blocks and projectors), loaded by the sit family's code once the
    BatchNorm's buffers are set aside; what differs is the input space (see the module docstring)."""
    name = "repae"
    description = "REPA-E (End2End-Diffusion/REPA-E): SiT trained end to end with its VAE, latent BatchNorm"

    def recognise(self, obj: dict, path: Path) -> bool:
        return looks_like_repae(obj)

    def load(self, obj: dict, path: Path, *, convention: str | None, weights: str,
             device: str | torch.device = "cpu", heads: int | None = None) -> LoadedCheckpoint:
        training = "model" in obj or "ema" in obj
        sd, chosen = choose_weights(obj, weights, path) if training else (obj, "state_dict")
        if not repae_state_dict(sd):
            raise UserError(f"'{path}': its '{chosen}' weights have no latent BatchNorm statistics "
                            f"({' and '.join(BN_KEYS)}), though its other weights do")
        args = _args(obj)
        _check_transport(args, path, convention)
        mean, std = latent_stats(sd)
        named = re.fullmatch(r"SiT-(\w+)/\d+", str(args.get("model", "")))
        if heads is None and named and named.group(1) in SIZES and "blocks.0.attn.q_norm.weight" not in sd:
            heads = SIZES[named.group(1)][2]
        base = super().load(_without_bn(obj), path, convention=convention or "repa", weights=weights,
                            device=device, heads=heads)

        arch = str(args.get("vae", ""))
        bundled = isinstance(obj.get("vae"), dict)
        meta = {"mode": "latents", "vae_arch": arch or None, "bundled_vae": bundled,
                "vae_ckpt": args.get("vae_ckpt") if not bundled else None,
                "downsample": DOWNSAMPLE.get(arch) or {4: 8, 32: 16}.get(int(mean.numel()), 8),
                "latent_mean": mean.tolist(), "latent_std": std.tolist(), "bn_eps": BN_EPS}
        prov = base.provenance
        prov.format = "repae-train" if bundled else "repae-ldm-train" if training else "repae-state-dict"
        prov.convention_source = "flag" if convention else "checkpoint"
        prov.warnings.append(_latent_note(path, meta))
        return LoadedCheckpoint(model=base.model, config=base.config, provenance=prov, meta=meta, family=self)

    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        """The sit family's anatomy, with latents of a VAE whose 1×1 quant convolutions hold the BatchNorm's
        statistics (scale 1, shift 0; `export_vae` makes one)."""
        c, meta = model.config, meta or {}
        space = InputSpace("latents", c.in_channels, c.input_size, int(meta.get("downsample", 8)), 1.0, 0.0, None)
        return replace(super().anatomy(model, meta), input=space)

    def describe_rows(self, ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
        m = ckpt.meta
        std = m.get("latent_std") or [float("nan")]
        vae = ("bundled (jointly trained, latent-diffusion layout)" if m.get("bundled_vae") else
               f"not in the file (trained on {m.get('vae_ckpt') or 'an E2E-VAE'})")
        norm = f"BatchNorm running statistics per channel, std {min(std):.3g}…{max(std):.3g}, fold into the VAE: " \
               "repae.export_vae"
        return super().describe_rows(ckpt) + [("VAE", f"{m.get('vae_arch') or '?'}, {vae}"),
                                              ("latent normalisation", norm)]


REPAE = register_family(RepaEFamily())


def _args(obj: dict) -> dict:
    args = obj.get("args")
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}


def _check_transport(args: dict, path: Path, convention: str | None) -> None:
    path_type, prediction = args.get("path_type", "linear"), args.get("prediction", "v")
    if convention is None and (path_type, prediction) != ("linear", "v"):
        raise UserError(f"'{path}' was trained with path {path_type!r}, prediction {prediction!r}: only the linear "
                        f"path with velocity prediction (the 'repa' convention) is known; pass --convention to say "
                        f"how it is fed")


def _without_bn(obj: dict) -> dict:
    """The checkpoint object with the BatchNorm's buffers taken out of its SiT state dicts."""
    def strip(sd):
        return {k: v for k, v in sd.items() if not k.startswith("bn.")} if isinstance(sd, dict) else sd
    if "model" in obj or "ema" in obj:
        return {k: strip(v) if k in ("model", "ema") else v for k, v in obj.items()}
    return strip(obj)


def _latent_note(path: Path, meta: dict) -> str:
    source = "" if meta["bundled_vae"] else f", vae='{meta.get('vae_ckpt') or 'THE_E2E_VAE'}'"
    return (f"REPA-E normalises VAE latents per channel with the SiT's BatchNorm statistics "
            f"((z - mean_c) / sqrt(var_c + {BN_EPS:g})) before noising them; pass a --vae with them folded in: "
            f"repa_probe.families.repae.export_vae('{path}', FOLDER{source}), then --vae FOLDER")


#################################################################################
#                   The VAE: latent-diffusion layout → diffusers                #
#################################################################################

_RENAMES = [  # latent-diffusion (CompVis) AutoencoderKL names → diffusers AutoencoderKL names
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(attentions\.\d+)\.(q|k|v)\.", r"\1.to_\2."),
    (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
]
_UP_PARTS = {"block": "resnets", "attn": "attentions", "upsample": "upsamplers.0"}


def ldm_vae_to_diffusers(sd: dict, what: str = "VAE"):
    """A latent-diffusion (CompVis) AutoencoderKL state dict, REPA-E's `vae` entry and e2e-*.pt files, as a
    diffusers AutoencoderKL (eval). The architecture is read from the shapes: levels and their widths,
    resnets per level, which levels have attention (REPA-E's f16d32 has it at the 16×16 level), latent
    channels; GroupNorm with 32 groups, as latent-diffusion fixes it."""
    from diffusers import AutoencoderKL
    levels = sum(1 for k in sd if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k))
    if not levels or "post_quant_conv.weight" not in sd:
        raise UserError(f"{what} is not a latent-diffusion AutoencoderKL state dict (no 'encoder.down.0.block.0.*' "
                        f"or 'post_quant_conv.weight')")
    widths = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    per_level = sum(1 for k in sd if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k))
    z = int(sd["post_quant_conv.weight"].shape[0])
    if sd["quant_conv.weight"].shape[0] != 2 * z:
        raise UserError(f"{what}: quant_conv gives {sd['quant_conv.weight'].shape[0]} channels, not 2×{z} "
                        f"(mean and log-variance): not a KL autoencoder")
    vae = AutoencoderKL(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]), out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        down_block_types=tuple("AttnDownEncoderBlock2D" if f"encoder.down.{i}.attn.0.q.weight" in sd else
                               "DownEncoderBlock2D" for i in range(levels)),
        up_block_types=tuple("AttnUpDecoderBlock2D" if f"decoder.up.{i}.attn.0.q.weight" in sd else
                             "UpDecoderBlock2D" for i in reversed(range(levels))),
        block_out_channels=tuple(widths), layers_per_block=per_level, latent_channels=z, norm_num_groups=32,
        scaling_factor=1.0)
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.", lambda m: (   # decoder levels run backwards
            f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.{_UP_PARTS[m.group(2)]}."), key)
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value[:, :, 0, 0] if ".attentions." in new and value.ndim == 4 else value  # 1×1 conv → linear
    expected = vae.state_dict()
    missing, unexpected = [k for k in expected if k not in out], [k for k in out if k not in expected]
    if missing or unexpected:
        raise UserError(f"{what} does not convert to a diffusers AutoencoderKL: "
                        f"{'missing' if missing else 'unexpected'} key '{(missing or unexpected)[0]}' "
                        f"({len(missing)} missing, {len(unexpected)} unexpected)")
    vae.load_state_dict({k: out[k].float() for k in expected})
    return vae.eval()


def export_vae(checkpoint: str | Path, folder: str | Path, *, vae: str | Path | None = None,
               weights: str = "ema") -> Path:
    """Write a diffusers AutoencoderKL folder whose posterior mean is exactly what the checkpoint's SiT is fed
    at t = 0: the VAE latent normalised by the SiT's BatchNorm statistics (taken from its `weights`, as REPA-E's
    generate.py takes the EMA's). Pass the folder as --vae; its decode undoes the normalisation.

    vae: None for the VAE inside a train_repae.py checkpoint; otherwise the E2E-VAE a train_ldm_only.py SiT was
    trained on: a file is REPA-E's state dict in latent-diffusion layout (e2e-vavae-400k.pt), anything else a
    diffusers folder or hub name (REPA-E/e2e-vavae-hf)."""
    from repa_probe.data import load_vae
    checkpoint = Path(checkpoint)
    obj = read_checkpoint(checkpoint)
    if not isinstance(obj, dict) or not looks_like_repae(obj):
        raise UserError(f"'{checkpoint}' is not a REPA-E checkpoint (no latent BatchNorm statistics)")
    sd = choose_weights(obj, weights, checkpoint)[0] if ("model" in obj or "ema" in obj) else obj
    mean, std = latent_stats(sd)
    if vae is None:
        if not isinstance(obj.get("vae"), dict):
            raise UserError(f"'{checkpoint}' holds no VAE (a train_ldm_only.py checkpoint): pass vae= the E2E-VAE its "
                            f"SiT was trained on (args.vae_ckpt: {_args(obj).get('vae_ckpt')!r})")
        model = ldm_vae_to_diffusers(obj["vae"], f"the VAE in '{checkpoint}'")
    elif Path(vae).is_file():                                    # REPA-E's own .pt: latent-diffusion layout
        model = ldm_vae_to_diffusers(safe_torch_load(Path(vae), f"VAE '{vae}'"), f"VAE '{vae}'")
    else:
        model = load_vae(vae)
    if model.post_quant_conv.in_channels != mean.numel():
        raise UserError(f"the VAE has {model.post_quant_conv.in_channels} latent channels, the SiT of "
                        f"'{checkpoint}' {mean.numel()}")
    fold_latent_stats(model, mean, std)
    model.register_to_config(scaling_factor=1.0, shift_factor=None)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder
