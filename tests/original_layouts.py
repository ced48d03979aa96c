"""Write timm ViT weights in the layouts the original repositories publish, and run two originals' forwards.

Key names come from the original model definitions (facebookresearch/dinov2 ``DinoVisionTransformer``,
facebookresearch/mae ``models_mae``, facebookresearch/ijepa ``train.py`` checkpoints, facebookresearch/moco-v3
``main_moco.py`` checkpoints, openai/CLIP ``VisionTransformer``), read to learn the formats. The reference
forwards below are written from those architectures' descriptions, independently of timm's converters, so
that a converter that merely inverts a wrong mapping still fails.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

TINY = dict(embed_dim=64, depth=2, num_heads=2)  # a two-block width-64 analogue of any standard ViT


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a distinct random value (timm's init leaves layer scales at 1e-5, norms at 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("gamma"):
            p.copy_(0.5 + 0.1 * noise)
        elif p.ndim == 1:
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
        elif name.split(".")[-1] in ("cls_token", "reg_token", "pos_embed"):
            p.copy_(0.5 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def _tensors(model_or_sd) -> dict[str, Tensor]:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return {k: v.detach().clone() for k, v in sd.items()}


# --------------------------------------------------------------------------- DINOv2 (torch.hub files)

def dinov2_hub(model: nn.Module, *, swiglu: bool = False, seed: int = 1) -> dict[str, Tensor]:
    """``dinov2_vit*14[_reg4]_pretrain.pth``: the same block names as timm plus ``mask_token``; with
    registers, ``register_tokens`` and a pos_embed that has a CLS row (timm folds it into cls_token);
    ViT-g's SwiGLU MLP is ``mlp.w12`` (packed gate and value) and ``mlp.w3``."""
    sd, out = _tensors(model), {}
    dim = sd["cls_token"].shape[-1]
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(seed))
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    for k, v in sd.items():
        if swiglu:
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        out[k] = v
    out["mask_token"] = torch.zeros(1, dim)
    return out


@torch.no_grad()
def dinov2_reg_tokens(hub: dict[str, Tensor], trunk: nn.Module, x: Tensor, grid: int) -> Tensor:
    """DINOv2-with-registers' own token assembly from its hub layout, then ``trunk``'s blocks and norm:
    patches + resampled pos (CLS row kept apart, as REPA resamples), CLS + its pos first, registers next
    (no pos), ``x_norm_patchtokens`` = normed tokens after CLS and registers."""
    w, b = hub["patch_embed.proj.weight"], hub["patch_embed.proj.bias"]
    patches = F.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # (N, grid², D)
    pos = resample_abs_pos_embed(hub["pos_embed"], [grid, grid], num_prefix_tokens=1)
    cls = (hub["cls_token"] + pos[:, :1]).expand(len(x), -1, -1)
    regs = hub["register_tokens"].expand(len(x), -1, -1)
    h = torch.cat([cls, regs, patches + pos[:, 1:]], dim=1)
    for blk in trunk.blocks:
        h = blk(h)
    return trunk.norm(h)[:, 1 + regs.shape[1]:]


# --------------------------------------------------------------------------- MAE, I-JEPA, MoCo v3

def mae(model: nn.Module, *, decoder_dim: int = 32) -> dict:
    """``mae_pretrain_vit_*.pth`` / ``mae_visualize_vit_*.pth``: ``{'model': encoder + decoder keys}``."""
    sd = _tensors(model)
    dim = sd["cls_token"].shape[-1]
    sd.update({
        "mask_token": torch.zeros(1, 1, decoder_dim),
        "decoder_embed.weight": torch.randn(decoder_dim, dim), "decoder_embed.bias": torch.zeros(decoder_dim),
        "decoder_pos_embed": torch.zeros(1, sd["pos_embed"].shape[1], decoder_dim),
        "decoder_blocks.0.norm1.weight": torch.ones(decoder_dim), "decoder_norm.weight": torch.ones(decoder_dim),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, decoder_dim),
    })
    return {"model": sd}


def ijepa(model: nn.Module) -> dict:
    """``IN1K-vit.h.14-300e.pth.tar``: DDP-wrapped encoder, predictor and target encoder, optimiser, epoch."""
    enc = {f"module.{k}": v for k, v in _tensors(model).items()}
    predictor = {"module.predictor_embed.weight": torch.randn(8, 64), "module.mask_token": torch.zeros(1, 1, 8)}
    return {"encoder": enc, "target_encoder": {k: v + 1 for k, v in enc.items()}, "predictor": predictor,
            "opt": {"state": {}, "param_groups": []}, "epoch": 300, "loss": 0.1, "batch_size": 2048, "lr": 1e-3}


def mocov3(model: nn.Module, *, misnamed: bool = False) -> dict:
    """``vit-b-300ep.pth.tar``: ``{'state_dict': module.base_encoder.* (with its projection MLP as head.*),
    module.momentum_encoder.*, module.predictor.*}``; ``misnamed`` reproduces the blocks-13/14 naming bug
    of a released ViT-L file."""
    sd, out = _tensors(model), {}
    dim = sd["cls_token"].shape[-1]
    base = {**sd, "head.0.weight": torch.randn(16, dim), "head.1.running_mean": torch.zeros(16)}
    bug = [("blocks.13.norm1.", "blocks.13.norm13."), ("blocks.13.mlp.fc1.", "blocks.13.mlp.fc13."),
           ("blocks.14.norm2.", "blocks.14.norm14."), ("blocks.14.mlp.fc2.", "blocks.14.mlp.fc14.")]
    for k, v in base.items():
        for right, wrong in bug if misnamed else []:
            k = k.replace(right, wrong)
        out[f"module.base_encoder.{k}"] = v
        out[f"module.momentum_encoder.{k}"] = v * 0.5
    out["module.predictor.0.weight"] = torch.randn(16, 16)
    return {"epoch": 300, "arch": "vit_base", "state_dict": out, "optimizer": {"state": {}, "param_groups": []}}


# --------------------------------------------------------------------------- OpenAI CLIP

def openai_clip(model: nn.Module, *, proj_dim: int = 16) -> dict[str, Tensor]:
    """The state dict of OpenAI's ``CLIP`` (``ViT-L-14.pt``'s weights): image tower under ``visual.`` with
    ``conv1`` (no bias), ``class_embedding`` [D], ``positional_embedding`` [T, D], ``ln_pre``,
    ``transformer.resblocks.i.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
    ``ln_post``, ``proj`` [D, E]; plus the text tower's keys at the top level."""
    renames = [("blocks.", "transformer.resblocks."), ("norm1.", "ln_1."), ("norm2.", "ln_2."),
               ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
               ("attn.proj.", "attn.out_proj."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
    out = {}
    for k, v in _tensors(model).items():
        if k == "cls_token":
            k, v = "class_embedding", v.reshape(-1)
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        elif k == "patch_embed.proj.weight":
            k = "conv1.weight"
        elif k.startswith("norm_pre."):
            k = k.replace("norm_pre.", "ln_pre.")
        elif k.startswith("norm."):
            k = k.replace("norm.", "ln_post.")
        for old, new in renames:
            k = k.replace(old, new)
        out[f"visual.{k}"] = v
    dim = out["visual.class_embedding"].shape[0]
    out["visual.proj"] = torch.randn(dim, proj_dim)
    out.update({"positional_embedding": torch.zeros(77, 32), "text_projection": torch.randn(32, proj_dim),
                "logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.randn(100, 32),
                "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32), "ln_final.weight": torch.ones(32)})
    return out


@torch.no_grad()
def openai_clip_tokens(sd: dict[str, Tensor], x: Tensor, grid: int, num_heads: int) -> Tensor:
    """OpenAI CLIP's image transformer on its own weights, as REPA reads it: patch tokens of the last
    residual block, before ``ln_post`` and ``proj``. Pre-norm blocks, LayerNorm eps 1e-5, QuickGELU MLP."""
    v = {k.removeprefix("visual."): t for k, t in sd.items() if k.startswith("visual.")}
    dim = v["class_embedding"].shape[0]
    ln = lambda h, name: F.layer_norm(h, (dim,), v[f"{name}.weight"], v[f"{name}.bias"], eps=1e-5)
    h = F.conv2d(x, v["conv1.weight"], stride=v["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    pos = resample_abs_pos_embed(v["positional_embedding"][None], [grid, grid], num_prefix_tokens=1)
    h = torch.cat([v["class_embedding"].expand(len(x), 1, dim), h], dim=1) + pos
    h = ln(h, "ln_pre").transpose(0, 1)  # (T, N, D), as nn.MultiheadAttention wants
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in v:
        p = f"transformer.resblocks.{i}."
        a = ln(h, p + "ln_1")
        h = h + F.multi_head_attention_forward(
            a, a, a, dim, num_heads, v[p + "attn.in_proj_weight"], v[p + "attn.in_proj_bias"], None, None, False,
            0.0, v[p + "attn.out_proj.weight"], v[p + "attn.out_proj.bias"], training=False, need_weights=False)[0]
        m = F.linear(ln(h, p + "ln_2"), v[p + "mlp.c_fc.weight"], v[p + "mlp.c_fc.bias"])
        h = h + F.linear(m * torch.sigmoid(1.702 * m), v[p + "mlp.c_proj.weight"], v[p + "mlp.c_proj.bias"])
        i += 1
    return h.transpose(0, 1)[:, 1:]
