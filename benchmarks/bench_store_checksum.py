"""What checking the feature store's files costs (issue 30: at most 2% of an analysis).

    python benchmarks/bench_store_checksum.py            # CPU: an entry of SiT-S/2 size (13 × 2,000 × 384, 5 t);
                                                         # a real analysis of 200 images × 2 t
    python benchmarks/bench_store_checksum.py --n 10000 --blocks 28 --dim 1152 --model SiT-XL/2 --analyze-n 10000 \
        --analyze-t 0 0.1 0.25 0.5 0.75 --encoder dinov2-vit-l --device cuda --workers 8       # XL/2 on a GPU

Printed, everything measured in this run:
1. digests of one merged blocks.npy held in memory: CRC-32 (zlib, what the store uses), Adler-32, SHA-256 and
   BLAKE2b, in GB/s;
2. an analysis-like read of a cached entry: every block at every t copied from its memmap into memory, as the
   probes and metrics read them, against the check of every file of the entry as a new process does it (each
   file read and checksummed once; later reads in the process only stat it): ratio check ÷ read;
3. a real analysis (`compare` of one checkpoint, set up as bench_analyze does: the model with open gates, a
   random-weight encoder), first into an empty store, then again with everything cached (probes, metrics and
   report only, the smallest denominator; the process's record of checked files cleared, as in a new process),
   with the seconds spent computing CRC-32s inside each: ratio checksums ÷ analysis.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from bench_analyze import SHARED, open_gated_checkpoint
from bench_cknna import best_time

import repa_probe.store as store
from repa_probe.commands import AnalyzeConfig, compare
from repa_probe.store import FeatureStore, t_part


def synthetic_entry(root: Path, n: int, blocks: int, dim: int, ts: list[float], batch: int = 256) -> store.Entry:
    """An entry of random float32 features laid out as capture writes them, chunks merged by the store."""
    rng = np.random.default_rng(0)
    entry = FeatureStore(root).entry("blocks", {"bench": [n, blocks, dim]}, np.arange(n) % 10, np.arange(n),
                                     row_axes={"blocks": 1})
    for t in ts:
        for first in range(0, n, batch):
            rows = np.arange(first, min(first + batch, n))
            entry.write_chunk(t_part(t), rows, {"blocks": rng.standard_normal((len(rows), blocks, dim), np.float32),
                                                "raw": rng.standard_normal((len(rows), 192), np.float32)})
        entry.merge(t_part(t))
    return entry


def digests(path: Path, repeat: int) -> None:
    data = path.read_bytes()
    print(f"digests of {path.name} ({len(data) / 1e6:.0f} MB, in memory):")
    for name, fn in (("CRC-32 (zlib; the store's)", zlib.crc32), ("Adler-32 (zlib)", zlib.adler32),
                     ("SHA-256", lambda b: hashlib.sha256(b).digest()),
                     ("BLAKE2b", lambda b: hashlib.blake2b(b).digest())):
        seconds, _ = best_time(lambda fn=fn: fn(data), repeat)
        print(f"  {name:<28}{len(data) / seconds / 1e9:>7.2f} GB/s")


def read_vs_check(entry: store.Entry, ts: list[float], repeat: int) -> None:
    parts = [t_part(t) for t in ts]

    def read():                                        # what the analysis reads: every block at every t
        for part in parts:
            merged = np.load(entry.part_dir(part) / "blocks.npy", mmap_mode="r")
            for b in range(merged.shape[0]):
                np.array(merged[b])
            np.array(np.load(entry.part_dir(part) / "raw.npy", mmap_mode="r"))

    def check():                                       # what a new process checks once per file
        store._verified.clear()
        entry.verify(parts)
        _ = entry.labels, entry.ids

    size = sum(f.stat().st_size for f in entry.path.rglob("*.npy"))
    read_s, _ = best_time(read, repeat)
    check_s, _ = best_time(check, repeat)
    print(f"cached entry, {size / 1e6:.0f} MB ({len(parts)} t): read every block {read_s:.3f} s, check every file "
          f"{check_s:.3f} s: ratio check / read = {check_s / read_s:.3f}")


def analysis(work: Path, args: argparse.Namespace) -> None:
    spent = [0.0]
    crc32 = store._crc32

    def timed_crc32(path, *a):
        start = time.perf_counter()
        try:
            return crc32(path, *a)
        finally:
            spent[0] += time.perf_counter() - start

    store._crc32 = timed_crc32
    _, ckpt = open_gated_checkpoint(args.model, work / "model.pt")
    config = AnalyzeConfig(data=args.data, n=args.analyze_n, ts=tuple(args.analyze_t), encoders=[args.encoder],
                           encoder_random_init=True, bootstrap=args.bootstrap, num_workers=args.workers,
                           device=args.device, cache=str(work / "cache"), quiet=True)
    for run in ("empty store", "all cached"):
        store._verified.clear()
        spent[0], start = 0.0, time.perf_counter()
        compare([str(ckpt)], config, str(work / "report"))
        total = time.perf_counter() - start
        print(f"analysis, {run}: {total:.1f} s, of which CRC-32s {spent[0]:.3f} s: ratio = {spent[0] / total:.4f}")
    store._crc32 = crc32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="images of the synthetic entry")
    p.add_argument("--blocks", type=int, default=12, help="blocks of the synthetic entry (it stores blocks + 1)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--t", type=float, nargs="+", default=[0, 0.1, 0.25, 0.5, 0.75])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default="SiT-S/2", help="the real analysis's model")
    p.add_argument("--encoder", default="vit_small_patch16_224", help="its encoder (random weights)")
    p.add_argument("--analyze-n", type=int, default=200)
    p.add_argument("--analyze-t", type=float, nargs="+", default=[0, 0.5])
    p.add_argument("--bootstrap", type=int, default=20)
    p.add_argument("--data", default=str(SHARED / "test"), help="the analysis's images (ImageFolder)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_store_checksum-"))
    try:
        entry = synthetic_entry(work / "synthetic", args.n, args.blocks + 1, args.dim, args.t)
        digests(entry.part_dir(t_part(args.t[0])) / "blocks.npy", args.repeat)
        read_vs_check(entry, args.t, args.repeat)
        analysis(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
