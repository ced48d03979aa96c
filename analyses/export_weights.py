"""A report's checkpoints as small files that re-make it: each checkpoint's EMA weights in float16, with its
config and provenance, as NAME.safetensors (our format, loadable by every repa-probe command).

    python analyses/export_weights.py OUT_DIR RUN/checkpoints/0005000.pt [...] [--dtype float32]  # → OUT_DIR/<name>.safetensors

A deep CIFAR preset's EMA weights are 4.3 MB in float16. A report re-made from these files matches one made from
them; one made from the float32 training checkpoints differs by float16 rounding, so committed reports are made
from the exported files (their sha256 is in the report's provenance and in OUT_DIR/SHA256SUMS).
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from repa_probe.checkpoints import FORMAT_TAG, read_checkpoint, save_checkpoint


class _Config(dict):
    """The source file's config as saved (plain data): save_checkpoint asks for to_dict()."""

    def to_dict(self) -> dict:
        return dict(self)


def export(src: Path, dst: Path, dtype: torch.dtype = torch.float16) -> Path:
    obj = read_checkpoint(src)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_TAG):
        raise SystemExit(f"{src}: not a repa-probe checkpoint (only the trainer's own files are exported)")
    ema = {k: v.to(dtype) if v.is_floating_point() else v for k, v in obj["ema"].items()}
    meta = {**obj["meta"], "exported_from_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "exported_dtype": str(dtype).removeprefix("torch.")}
    return save_checkpoint(dst, _Config(obj["config"]), ema, meta=meta)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for the .safetensors files and SHA256SUMS")
    ap.add_argument("checkpoints", type=Path, nargs="+", help="our checkpoints; each is named after its file stem")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                    help="float32 keeps the EMA weights as analysed: a report made from the training checkpoint is "
                         "re-made to the digit (twice the size)")
    a = ap.parse_args()
    sums = []
    for src in a.checkpoints:
        path = export(src.resolve(), a.out / f"{src.stem}.safetensors", getattr(torch, a.dtype))
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
    (a.out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print("\n".join(sums))
