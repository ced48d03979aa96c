"""Checkpoint files: safe reading with integrity checks, our own format, and what a loaded one carries.

Every file goes through torch.load(weights_only=True) with exactly one extra allowed class,
argparse.Namespace (REPA's training dicts hold their args as one): a pickle that would import or execute
anything else is refused. A .pt file is a zip archive; its CRCs are checked before it is read (torch
does not), so flipped bytes are an error naming the file, not silently wrong weights. Our own files also
carry the sha256 of their weights, checked on load. Which model family a checkpoint belongs to, and how
it becomes a model, is the families' business (repa_probe/families/); docs/checkpoints.md lists the
formats that load.

Our format (written by the trainer): a weights-only .pt {format: "repa-probe", version, config, meta, ema,
[model, optimizer, ...]}, or a .safetensors file of the EMA weights with config and meta as JSON metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from repa_probe.errors import UserError
from repa_probe.noise import Convention, get_convention
from repa_probe.runtime import atomic_write, state_dict_sha256, torch_save_atomic


FORMAT_TAG = "repa-probe"
FORMAT_VERSION = 1


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
    family: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedCheckpoint:
    """A model ready to analyse: the module (eval mode), its family's config, provenance, our meta ({} for
    other formats), the family that runs it and its anatomy."""
    model: torch.nn.Module
    config: Any
    provenance: Provenance
    meta: dict
    family: Any                    # a families.base.ModelFamily (not imported here: families build on this module)
    anatomy: Any = None            # its families.base.Anatomy

    def __post_init__(self):
        if self.anatomy is None:
            self.anatomy = self.family.anatomy(self.model, self.meta)

    @property
    def convention(self) -> Convention:
        return get_convention(self.provenance.convention)


UNTRAINED_INIT = "init, zero-initialised linears: PyTorch default"   # names the baseline's init (and its cache key)


def as_untrained(ckpt: LoadedCheckpoint, model: torch.nn.Module) -> LoadedCheckpoint:
    """`model`, freshly initialised with ckpt's architecture, as ckpt's untrained baseline (families' `untrained`).
    Every Linear its init leaves at zero (adaLN-Zero's modulation, the final layer) gets PyTorch's default Linear
    init instead, each its own draw from the (seeded) global generator: with zero gates every block would be the
    identity and the baseline the patch embedding at every block (docs/statistics.md)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.any() and (m.bias is None or not m.bias.any()):
            m.reset_parameters()
    prov = Provenance(path="<untrained>", format="untrained", weights=UNTRAINED_INIT,
                      convention=ckpt.provenance.convention,
                      convention_source=ckpt.provenance.convention_source,
                      sha256=state_dict_sha256(model.state_dict(), ordered=True), family=ckpt.family.name)
    return LoadedCheckpoint(model=model.eval().to(next(ckpt.model.parameters()).device), config=ckpt.config,
                            provenance=prov, meta=dict(ckpt.meta), family=ckpt.family, anatomy=ckpt.anatomy)


#################################################################################
#                               Safe reading                                    #
#################################################################################

def read_checkpoint(path: str | os.PathLike) -> object:
    """torch.load(weights_only=True) (or safetensors) after an integrity check; every failure is one
    UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist: check the path")
    if path.is_dir():
        raise UserError(f"checkpoint '{path}' is a directory: pass a .pt or .safetensors file")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint '{path}' is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint '{path}' is empty (0 bytes): the download or save did not finish")
    obj = _read_safetensors(path) if _is_safetensors(path) else _read_torch(path)
    _verify_weights(obj, path)
    return obj


def _read_torch(path: Path) -> object:
    if zipfile.is_zipfile(path):
        _check_zip(path)
    return safe_torch_load(path, f"checkpoint '{path}'")


def safe_torch_load(path: Path, what: str) -> object:
    """torch.load(weights_only=True), allowing argparse.Namespace as well, with every failure one UserError
    that starts with `what` (e.g. "checkpoint 'x.pt'") and names what a refused pickle would have imported."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "Detected pickle protocol N" on garbage input
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        if blocked:
            raise UserError(
                f"refused to load {what}: its pickle would import '{blocked.group(1)}', which is not plain tensor "
                f"data (repa-probe loads weights with torch.load(weights_only=True) only); if you trust the file, "
                f"re-save just its state dict with torch.save(sd, new_path)") from None
        raise UserError(f"{what} is not a PyTorch file (its bytes are not a readable pickle)") from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "central directory" in str(e):
            raise UserError(f"{what} is truncated or corrupt (not a complete torch zip archive): download or copy it "
                            f"again") from None
        raise UserError(f"could not read {what}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # garbage bytes trip the unpickler in many ways (EOFError, IndexError, KeyError, ...)
        raise UserError(f"{what} is truncated or corrupt, or not a PyTorch file ({type(e).__name__}): download "
                        f"or copy it again") from None


def _check_zip(path: Path) -> None:
    """Every member's CRC-32 (one read of the file): torch.load itself never checks them."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(f"checkpoint '{path}' is truncated or corrupt ({e}): download or copy it again") from None
    if bad is not None:
        raise UserError(f"checkpoint '{path}' is corrupt: the CRC of its part '{bad}' does not match its bytes "
                        f"(a damaged download or disk); download or copy it again")


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
    try:
        return {"format": FORMAT_TAG, "version": int(meta.get("version", 1)), "config": json.loads(meta["config"]),
                "meta": json.loads(meta.get("meta", "{}")), "ema": tensors}
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint '{path}' has unreadable repa-probe metadata ({e})") from None


def _verify_weights(obj: object, path: Path) -> None:
    """Our files record the sha256 of their EMA weights; a mismatch means the file was damaged."""
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_TAG):
        return
    expected = (obj.get("meta") or {}).get("weights_sha256")
    if expected and isinstance(obj.get("ema"), dict) and state_dict_sha256(obj["ema"], ordered=True) != expected:
        raise UserError(f"checkpoint '{path}' is corrupt: its weights do not match the checksum recorded when it "
                        f"was saved; copy it again or use an earlier checkpoint")


#################################################################################
#                                 Our own format                                #
#################################################################################

def save_checkpoint(path: str | os.PathLike, config, ema: dict, *, model: dict | None = None,
                    meta: dict | None = None, **extra) -> Path:
    """Write our format atomically (temp file in the same folder, then rename).

    `config` is the family's config (anything with to_dict()). `.safetensors`: EMA weights + JSON metadata
    (config, meta), for sharing; otherwise a weights-only-loadable .pt: {format, version, config, meta, ema,
    model, **extra}, where extra may hold optimizer state, RNG states and the data position (tensors and
    plain data only). meta is plain data (convention, step, encoders, repa_coeff, data, mode, ...); the sha256
    of the EMA weights is added, and checked on every load.
    """
    path = Path(path)
    meta = dict(meta or {})
    meta.setdefault("convention", "repa")
    meta["weights_sha256"] = state_dict_sha256(ema, ordered=True)
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
        torch_save_atomic(path, obj)
    return path


@contextlib.contextmanager
def compiled_blocks(ckpt: LoadedCheckpoint, enabled: bool = True) -> Iterator[None]:
    """Within: every block's forward runs torch.compile'd (the capture hooks stay outside it, eager); the
    blocks get their own forward back on exit. A compiler that cannot run here is one UserError line."""
    blocks = list(ckpt.family.blocks(ckpt.model)) if enabled else []
    saved = [b.__dict__.get("forward") for b in blocks]
    for b in blocks:
        b.forward = torch.compile(b.forward)
    try:
        yield
    except Exception as e:
        if enabled and type(e).__name__ in ("InductorError", "BackendCompilerFailed"):   # e.g. no C++ compiler
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--compile: torch.compile cannot compile here ({why[:200]}); run without --compile") \
                from None
        raise
    finally:
        for b, forward in zip(blocks, saved):
            del b.forward
            if forward is not None:
                b.forward = forward
