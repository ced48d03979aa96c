"""Carry an ImageFolder tree to a machine without ../shared: pack its encoded image bytes into one .npz,
unpack it there into the same tree (byte-identical files, so every fingerprint and result matches).

    python analyses/pack_data.py pack ../shared/data/cifar10 gpu_pack/cifar10.npz      # ~54 MB
    python analyses/pack_data.py unpack gpu_pack/cifar10.npz /tmp/data/cifar10
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def pack(root: Path, out: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    names = np.array([str(p.relative_to(root)) for p in files])
    blobs = [np.frombuffer(p.read_bytes(), dtype=np.uint8) for p in files]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, names=names, offsets=offsets, data=np.concatenate(blobs))
    print(f"packed {len(files)} files, {offsets[-1] / 1e6:.1f} MB → {out}")


def unpack(archive: Path, root: Path) -> None:
    z = np.load(archive)
    names, offsets, data = z["names"], z["offsets"], z["data"]
    for i, name in enumerate(names):
        path = root / str(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[offsets[i]:offsets[i + 1]].tobytes())
    print(f"unpacked {len(names)} files → {root}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    a = p.parse_args()
    (pack if a.action == "pack" else unpack)(a.src, a.dst)
