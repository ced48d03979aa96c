"""Checkpoints: safe loading, format detection, config inference, and our own format.

Formats that load (DESIGN.md §3), all with DiT's parameter names:
  dit-official   bare EMA state dict (DiT-XL-2-256x256.pt), learn-sigma output, discrete VP time
  sit-official   bare EMA state dict (SiT-XL-2-256x256.pt), same keys and shapes as DiT, SiT time
  repa-last      REPA's released last.pt: bare state dict, no sigma, projectors
  repa-train     REPA training dict {model, ema, opt, args: argparse.Namespace, steps}
                 (older ones name blocks after the aligned depth: decoder_blocks.{j} = blocks.{j+depth})
  repa-probe     ours: plain-data config + weights (weights-only .pt, or .safetensors with JSON metadata)

Every file goes through torch.load(weights_only=True) with exactly one extra allowed class,
argparse.Namespace: a pickle that would import or execute anything else is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from repa_probe.errors import UserError
from repa_probe.models import REPA_DEPTH, SIZES, SiT, ModelConfig, size_name
from repa_probe.noise import CONVENTIONS, Convention

FORMAT_TAG = "repa-probe"
FORMAT_VERSION = 1
OFFICIAL_FILE_NAMES = {  # released file name pattern → time convention
    r"DiT-XL-2-(256|512)x(256|512)\.pt": "dit",
    r"SiT-XL-2-(256|512)x(256|512)\.pt": "sit",
}


@dataclass
class Provenance:
    """Where a model came from, recorded in every report."""
    path: str
    format: str
    weights: str                   # which weights were loaded: "ema", "model" or "state_dict"
    convention: str
    convention_source: str         # "flag", "checkpoint", "file name" or "assumed"
    step: int | None = None
    sha256: str = ""
    encoders: list[str] = field(default_factory=list)
    repa_coeff: float | None = None
    args: dict = field(default_factory=dict)   # REPA's argparse args, or our training meta
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedCheckpoint:
    model: SiT
    config: ModelConfig
    provenance: Provenance
    meta: dict                     # our format's meta (data mode, image size, ...); {} for others

    @property
    def convention(self) -> Convention:
        return Convention(self.provenance.convention)


#################################################################################
#                               Safe reading                                    #
#################################################################################

def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> object:
    """torch.load(weights_only=True) (or safetensors) with one clear UserError for every failure."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist: check the path")
    if path.is_dir():
        raise UserError(f"checkpoint '{path}' is a directory: pass a .pt or .safetensors file")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint '{path}' is empty (0 bytes): the download or save did not finish")
    if _is_safetensors(path):
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "Detected pickle protocol N" on garbage input
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        if blocked:
            raise UserError(
                f"refused to load '{path}': its pickle would import '{blocked.group(1)}', which is not plain "
                f"tensor data (repa-probe loads checkpoints with torch.load(weights_only=True) only); if you "
                f"trust the file, re-save just its state dict with torch.save(sd, new_path)") from None
        raise UserError(f"'{path}' is not a PyTorch checkpoint (its bytes are not a readable pickle)") from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "central directory" in str(e):
            raise UserError(f"checkpoint '{path}' is truncated or corrupt (not a complete torch zip archive): "
                            f"download or copy it again") from None
        raise UserError(f"could not read checkpoint '{path}': {str(e).splitlines()[0]}") from None
    except Exception as e:  # garbage bytes trip the unpickler in many ways (EOFError, IndexError, KeyError, ...)
        raise UserError(f"checkpoint '{path}' is truncated or corrupt, or not a PyTorch checkpoint "
                        f"({type(e).__name__}): download or copy it again") from None


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON header '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint '{path}' is a truncated or corrupt safetensors file ({e})") from None
    if meta.get("format") != FORMAT_TAG:
        return tensors  # a bare state dict in safetensors form
    return {"format": FORMAT_TAG, "version": int(meta.get("version", 1)), "config": json.loads(meta["config"]),
            "meta": json.loads(meta.get("meta", "{}")), "ema": tensors}


#################################################################################
#                          Format detection and loading                         #
#################################################################################

def load_checkpoint(path: str | os.PathLike, convention: str | None = None, weights: str = "ema",
                    device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load any supported checkpoint → model (eval mode) + config + provenance.

    convention: "sit" | "dit" | "repa" overrides detection (official SiT and DiT files have identical
    keys and shapes, so for them it comes from this flag, else from the official file name, else it is
    assumed and the assumption is recorded in provenance.warnings).
    weights: "ema" (default, where the file has both) or "model".
    """
    if convention is not None and convention not in CONVENTIONS:
        raise UserError(f"--convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    if weights not in ("ema", "model"):
        raise UserError(f"--weights {weights!r} must be 'ema' or 'model'")
    path = Path(path)
    obj = read_checkpoint(path)
    fmt, state_dict, chosen, hints, meta, step = _unpack(path, obj, weights)
    state_dict, renamed = _rename_legacy(state_dict, hints.get("encoder_depth"))
    config = config_from_state_dict(state_dict, path, hints)
    model = build_model(config, state_dict, path).to(device).eval()

    conv, source = _detect_convention(path, fmt, convention, meta)
    if fmt == "dit/sit-official":
        fmt = "dit-official" if conv == "dit" else "sit-official"
    warnings = []
    if source == "assumed":
        warnings.append(f"time convention ASSUMED to be '{conv}' ({Convention(conv).describe()}): the weights "
                        f"cannot tell SiT from DiT; pass --convention sit|dit|repa to be sure")
    if renamed:
        warnings.append("legacy REPA checkpoint: decoder_blocks.* renamed to blocks.*")
    if hints.get("encoder_depth_assumed") and config.z_dims:
        warnings.append(f"REPA depth not recorded; assumed block {config.encoder_depth}")
    args = hints.get("args", {})
    encoders = meta.get("encoders") or _split_encoders(args.get("enc_type"))
    coeff = meta.get("repa_coeff", args.get("proj_coeff"))
    prov = Provenance(path=str(path), format=fmt, weights=chosen, convention=conv, convention_source=source,
                      step=step, sha256=file_sha256(path), encoders=encoders, repa_coeff=coeff,
                      args=args or {k: v for k, v in meta.items() if _plain(v)}, warnings=warnings)
    return LoadedCheckpoint(model=model, config=config, provenance=prov, meta=meta)


def _unpack(path: Path, obj: object, weights: str):
    """→ (format, state_dict, which weights, config hints, our meta, step)."""
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    if obj.get("format") == FORMAT_TAG:
        sd, chosen = _choose(obj, weights, path)
        hints = {"config": obj["config"]}
        return FORMAT_TAG, sd, chosen, hints, dict(obj.get("meta", {})), obj.get("meta", {}).get("step")
    if "model" in obj or "ema" in obj:
        sd, chosen = _choose(obj, weights, path)
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        hints = {"args": {k: v for k, v in args.items() if _plain(v)}}
        if "encoder_depth" in args:
            hints["encoder_depth"] = int(args["encoder_depth"])
        if "num_heads" in args:   # not in REPA's own args; our export-repa writes it for custom sizes
            hints["num_heads"] = int(args["num_heads"])
        return "repa-train", sd, chosen, hints, {}, obj.get("steps")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not obj:
            raise UserError(f"'{path}' is an empty state dict")
        out_rows = _shape(obj, "final_layer.linear.weight")
        patch = _shape(obj, "x_embedder.proj.weight")
        if out_rows and patch and out_rows[0] == 2 * patch[1] * patch[2] * patch[3]:
            fmt = "dit/sit-official"
        else:
            fmt = "repa-last" if any(k.startswith("projectors.") for k in obj) else "bare-state-dict"
        return fmt, obj, "state_dict", {}, {}, None
    raise UserError(f"'{path}' is a dict but not a checkpoint: expected tensors, or 'model'/'ema' entries "
                    f"(found keys {sorted(map(str, obj))[:5]})")


def _choose(obj: dict, weights: str, path: Path) -> tuple[dict, str]:
    if weights in obj and isinstance(obj[weights], dict):
        return obj[weights], weights
    other = "model" if weights == "ema" else "ema"
    if isinstance(obj.get(other), dict):
        return obj[other], other
    raise UserError(f"'{path}' has no '{weights}' or '{other}' weights")


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
    return list(sd[key].shape) if key in sd else None


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

def config_from_state_dict(sd: dict, path: str | os.PathLike = "<state dict>", hints: dict | None = None) -> ModelConfig:
    """Infer the architecture from shapes: width, depth, heads, patch, channels, input size, classes,
    learn-sigma, qk-norm, projector dims. Heads cannot be read from shapes without qk-norm: the standard
    sizes' head counts are used (width/64 otherwise). `hints` (our config, REPA's args) take precedence."""
    hints = hints or {}
    if "config" in hints:
        try:
            return ModelConfig.from_dict(hints["config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"checkpoint '{path}' has an invalid config: {e}") from None
    if "x_embedder.proj.weight" not in sd or "pos_embed" not in sd:
        first = next(iter(sd))
        raise UserError(f"'{path}' is not a DiT/SiT state dict: missing key 'x_embedder.proj.weight'; its first "
                        f"key is '{first}' with shape {list(sd[first].shape)}")
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    depth = 1 + max((int(k.split(".")[1]) for k in sd if re.match(r"blocks\.\d+\.", k)), default=-1)
    if depth == 0:
        raise UserError(f"'{path}' is not a DiT/SiT state dict: it has no 'blocks.N.*' keys")
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    if qk_norm:
        heads = hidden // sd["blocks.0.attn.q_norm.weight"].shape[0]
    elif "num_heads" in hints:
        heads = hints["num_heads"]
    else:
        heads = next((h for d, n, h in SIZES.values() if (d, n) == (hidden, depth)), max(1, hidden // 64))
    out_rows = sd["final_layer.linear.weight"].shape[0] if "final_layer.linear.weight" in sd else patch * patch * in_ch
    z_dims, proj_dim, k = [], 2048, 0
    while f"projectors.{k}.4.weight" in sd:
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
                       z_dims=z_dims, projector_dim=proj_dim, encoder_depth=int(enc_depth or 0))


def build_model(config: ModelConfig, sd: dict, path: str | os.PathLike = "<state dict>") -> SiT:
    """Build on the meta device and load `sd` by assignment (no double memory, no wasted init);
    any missing, unexpected or mis-shaped key is one clear UserError naming the first such key."""
    try:
        with torch.device("meta"):
            model = SiT(config)
    except ValueError as e:
        raise UserError(f"'{path}': {e}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise UserError(f"'{path}' is not a complete DiT/SiT state dict: missing key '{missing[0]}' "
                        f"(expected shape {list(expected[missing[0]].shape)}; {len(missing)} missing in all)")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise UserError(f"'{path}' has unexpected key '{unexpected[0]}' with shape {list(sd[unexpected[0]].shape)} "
                        f"({len(unexpected)} unexpected in all): not a DiT/SiT architecture repa-probe knows")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise UserError(f"'{path}': key '{k}' has shape {list(sd[k].shape)}, expected {list(v.shape)} "
                            f"for {size_name(config)}")
    model.load_state_dict({k: sd[k].float() for k in expected}, assign=True)
    model.pos_embed.requires_grad_(False)
    return model


#################################################################################
#                                 Our own format                                #
#################################################################################

def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """write(tmp) into a temporary file beside `path`, then rename it over `path` (os.replace is atomic),
    so readers and resumed runs only ever see a whole file; the temporary file is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_checkpoint(path: str | os.PathLike, config: ModelConfig, ema: dict, *, model: dict | None = None,
                    meta: dict | None = None, **extra) -> Path:
    """Write our format atomically (temp file in the same folder, then rename).

    `.safetensors`: EMA weights + JSON metadata (config, meta) — for sharing.
    otherwise a weights-only-loadable .pt: {format, version, config, meta, ema, model, **extra}, where
    extra may hold optimizer state, RNG states and the data position (tensors and plain data only).
    meta is plain data: convention, step, encoders, repa_coeff, data, mode ("pixels"/"latents"), ...
    """
    path = Path(path)
    meta = dict(meta or {})
    meta.setdefault("convention", "repa")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        tensors = {k: v.detach().contiguous().cpu() for k, v in ema.items()}
        metadata = {"format": FORMAT_TAG, "version": str(FORMAT_VERSION), "config": json.dumps(config.to_dict()),
                    "meta": json.dumps(meta)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        obj = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "config": config.to_dict(), "meta": meta,
               "ema": ema, **({"model": model} if model is not None else {}), **extra}
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


def summary_rows(ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
    """What `repa-probe inspect` prints: (field, value) rows."""
    c, p = ckpt.config, ckpt.provenance
    n_params = sum(t.numel() for t in ckpt.model.parameters())
    proj = ", ".join(f"{c.hidden_size}→{c.projector_dim}→{z}" for z in c.z_dims) or "none"
    rows = [("file", p.path), ("format", p.format), ("weights", p.weights),
            ("architecture", size_name(c, "DiT" if p.convention == "dit" else "SiT")),
            ("width / depth / heads", f"{c.hidden_size} / {c.depth} / {c.num_heads}"),
            ("input", f"{c.in_channels}×{c.input_size}×{c.input_size}, patch {c.patch_size} → "
                      f"{c.num_patches} tokens"),
            ("classes", f"{c.num_classes} (+1 null)"), ("learn sigma", str(c.learn_sigma)),
            ("qk-norm", str(c.qk_norm)), ("parameters", f"{n_params:,} ({n_params / 1e6:.1f}M)"),
            ("time convention", f"{p.convention} ({p.convention_source}): {Convention(p.convention).describe()}"),
            ("REPA projectors", proj),
            ("REPA depth", str(c.encoder_depth) if c.z_dims else "-"),
            ("encoders", ", ".join(p.encoders) or "-"),
            ("training step", "-" if p.step is None else f"{p.step:,}"),
            ("sha256", p.sha256[:16])]
    rows += [("WARNING", w) for w in p.warnings]
    return rows
