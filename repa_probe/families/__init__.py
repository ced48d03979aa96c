"""Model families: every kind of diffusion transformer repa-probe can load, run and analyse.

`load_checkpoint(path)` reads a file safely (checkpoints.read_checkpoint) and hands it to the first
registered family that recognises it. Capture, analysis and sampling speak only the protocol of
`families.base.ModelFamily`, through the `LoadedCheckpoint` it returns (its `family` and `anatomy`).

    lightningdit.py  LightningDiT (hustvl): SwiGLU, RMSNorm, RoPE blocks on VA-VAE latents
    sit.py        SiT / DiT / REPA checkpoints (official releases, REPA's training dicts, ours)
    repae.py      REPA-E: SiT trained end to end with its VAE; latent BatchNorm folded into the VAE
    diffusers.py  diffusers model folders (DiT, PixArt, SD3 and Flux transformers)
    module.py     any nn.Module described in Python (repa_probe.analyze), not registered

A new family is one file defining a ModelFamily subclass and calling `register_family` (docs/families.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from repa_probe.checkpoints import LoadedCheckpoint, read_checkpoint
from repa_probe.errors import UserError
from repa_probe.families import sit  # noqa: I001 (within one priority, families are offered in import order)
from repa_probe.families import lightningdit
from repa_probe.families import repae
from repa_probe.families import diffusers
from repa_probe.families.base import FAMILIES, Anatomy, InputSpace, ModelFamily, register_family
from repa_probe.noise import get_convention
from repa_probe.runtime import latest_in_run

__all__ = ["FAMILIES", "Anatomy", "InputSpace", "ModelFamily", "register_family", "load_checkpoint", "sit", "diffusers",
           "lightningdit", "repae",
           "inspect_rows", "detect_family"]


def detect_family(obj: object, path: Path) -> ModelFamily:
    """The first registered family that recognises the checkpoint object read from `path`."""
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    if not obj:
        raise UserError(f"'{path}' is an empty state dict")
    for family in FAMILIES.values():
        if family.recognise(obj, path):
            return family
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        first = next(iter(tensors))
        raise UserError(f"'{path}' is not a DiT/SiT state dict or any model family repa-probe knows "
                        f"({', '.join(FAMILIES)}): missing key 'x_embedder.proj.weight'; its first key is '{first}' "
                        f"with shape {list(tensors[first].shape)}")
    raise UserError(f"'{path}' is a dict but not a checkpoint: expected tensors, or 'model'/'ema' entries "
                    f"(found keys {sorted(map(str, obj))[:5]})")


def load_checkpoint(path: str | os.PathLike, convention: str | None = None, weights: str = "ema",
                    device: str | torch.device = "cpu", heads: int | None = None,
                    text_embeddings: str | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint → model (eval mode) + config + provenance + family + anatomy.

    convention: a registered time convention ("sit", "dit", "repa") overriding detection (official SiT and
    DiT files have identical keys and shapes, so for them it comes from this flag, else from the official
    file name, else it is assumed and the assumption is recorded in provenance.warnings).
    weights: "ema" (default, where the file has both) or "model". heads: the attention heads, where the
    weights cannot tell (a custom width without qk-norm). text_embeddings: a prompt's embeddings file for
    text-conditioned models (diffusers.py), else they get zero text conditioning (and their reports say so).
    """
    if convention is not None:
        get_convention(convention)
    if weights not in ("ema", "model"):
        raise UserError(f"--weights {weights!r} must be 'ema' or 'model'")
    path = Path(latest_in_run(path))               # a run folder or a diffusers model folder: its weights file
    obj = read_checkpoint(path)
    family = detect_family(obj, path)
    ckpt = family.load(obj, path, convention=convention, weights=weights, device=device, heads=heads)
    if text_embeddings:
        family.condition(ckpt, text_embeddings)
    for name, p in ckpt.model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise UserError(f"checkpoint '{path}' has NaN or infinite weights ('{name}', {ckpt.provenance.weights} "
                            f"weights): the run diverged or the file is damaged; use an earlier checkpoint")
    return ckpt


def inspect_rows(ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
    """What `repa-probe inspect` prints: (field, value) rows."""
    p, a = ckpt.provenance, ckpt.anatomy
    n_params = sum(t.numel() for t in ckpt.model.parameters())
    rows = [("file", p.path), ("format", p.format), ("family", p.family or ckpt.family.name), ("weights", p.weights)]
    rows += ckpt.family.describe_rows(ckpt)
    rows += [("parameters", f"{n_params:,} ({n_params / 1e6:.1f}M)"),
             ("input space", f"{a.input.kind}, {a.input.channels}×{a.input.size}² "
                             f"({a.input.image_size}px images{', VAE ' + str(a.input.vae) if a.input.vae else ''})"),
             ("time convention", f"{p.convention} ({p.convention_source}): {ckpt.convention.describe()}"),
             ("encoders", ", ".join(p.encoders) or "-"),
             ("training step", "-" if p.step is None else f"{p.step:,}"),
             ("sha256", p.sha256[:16])]
    rows += [("WARNING", w) for w in p.warnings]
    return rows
