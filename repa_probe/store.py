"""The feature store: per-image arrays on disk, computed once, resumable, never stale.

Layout under the cache root (``--cache DIR``; default ``$XDG_CACHE_HOME/repa-probe`` or
``~/.cache/repa-probe``)::

    <root>/<kind>/<key>/                 one entry; key = hash of its full fingerprint
        manifest.json                    fingerprint (plain data), n, per-part status and array shapes
        labels.npy, ids.npy              [N] int64: class label and stable image id of each row
        <part>/chunk-<first>-r<rank>.npz a finished batch: its row positions + rows of every array
        <part>/<array>.npy               the merged array (np.lib.format, read as a memmap)

kinds: ``blocks`` (model features; one part per noise level, ``t=0.25``, holding ``blocks``
[n_blocks+1, N, D] and the raw-input baseline ``raw`` [N, d_raw]), ``latents`` (SD-VAE latents of a data
subset, part ``all``) and ``encoder`` (target-encoder ``pooled`` [N, D] and optionally ``tokens``
[N, T, D], part ``all``).

Why a damaged file is never read as data: the manifest records every file's size and CRC-32 (labels, ids and
each merged array; the manifest itself carries the CRC-32 of its content) and chunks carry the zip CRC-32
of each member. A file is checked when it is read (a merged array once per process while its size, mtime
and inode are unchanged); one that fails (damaged, truncated, empty, missing) is named in one line on stderr,
moved aside as NAME.damaged-TIME and computed again. Entries of store version 1 (no checksums) are adopted
on first open: see _adopt.

Why it is safe to interrupt: every chunk is written to a temporary file and renamed into place
(os.replace is atomic), so a chunk file is either whole or absent; on restart only rows that no chunk
file covers are computed. When a part's chunks cover all N rows, rank 0 merges them into one .npy
(again temp file + rename), marks the part complete in the manifest, then deletes the chunks.

Why a hit is never stale: the key hashes everything that decides the numbers (checkpoint sha256, data
subset and preprocessing, seed, pooling, label mode, precision, storage dtype, VAE or encoder weights);
t is the part name. Adding a new t to an existing entry computes only that t.

Under torchrun every rank computes a contiguous share of the pending batches and writes its own chunk
files; rank 0 alone merges and writes the manifest.

A cache may be shared by several processes at once (users, GPUs, a notebook and a shell): each batch is
claimed before it is computed (a claim file created exclusively, naming its host and process; an abandoned
claim is taken over, see Entry._abandoned), so every process computes only what nobody else is computing,
then waits for the others' batches; creating an entry and merging a part
happen under the entry's file lock (released by the kernel if its holder is killed). Temporary files and
chunks left by a killed process are removed by the next one.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import socket
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from repa_probe.background import Prefetcher, Writer, host_copy
from repa_probe.data import make_loader
from repa_probe.errors import UserError
from repa_probe.runtime import (atomic_write, barrier, digest, init_distributed, no_space_is_one_line, pid_alive,
                                process_start, rank, remove_stale_tmp, sum_over_ranks, world_size, write_json_atomic)
from repa_probe.tokens import sample_cells, target_cells

MANIFEST = "manifest.json"
STORE_VERSION = 2             # 2: the manifest holds every file's CRC-32 (1: no checksums; adopted on open)
CLAIM_TIMEOUT_S = 1800.0      # a claim this old without its chunk is abandoned (another host's crashed run)
CLAIM_WRITE_S = 10.0          # a claim still empty this long after its creation: its creator was killed
POLL_S = 0.2


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/repa-probe``, else ``~/.cache/repa-probe``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "repa-probe"


def t_part(t: float) -> str:
    """Part name of a noise level; t is rounded to 1e-6, the resolution of the noise salt."""
    return f"t={round(float(t), 6):g}"


def write_npy_atomic(path: Path, array: np.ndarray) -> dict:
    """Write `array` atomically; → its checksum record (_record)."""
    def save(tmp):
        with open(tmp, "wb") as f:   # a file object: np.save would append .npy to a name
            np.save(f, array)
    return _record(atomic_write(path, save))


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock: two processes updating one manifest must not lose each other's edit."""
    try:
        f = open(path, "a")
    except OSError as e:
        raise UserError(f"--cache: cannot write in '{path.parent}' ({e.strerror}): use a writable --cache folder") \
            from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#################################################################################
#                                   Checksums                                   #
#################################################################################

class Damaged(UserError):
    """A store file that failed its check (damaged, truncated, empty or missing), already moved aside."""

    def __init__(self, path: Path, reason: str):
        self.path, self.note = path, f"damaged cache file '{path}' ({reason})"
        super().__init__(f"{self.note}: run the command again to compute it anew")


def _warn(e: Damaged) -> None:
    print(f"repa-probe: warning: {e.note}; computing it again", file=sys.stderr)


def _set_aside(path: Path, reason: str) -> Damaged:
    """Rename a damaged file NAME.damaged-TIME (kept for inspection, out of the store's way); → the error."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(path, aside)
        reason += f"; moved aside to {aside.name}"
    except FileNotFoundError:                  # missing, or another process moved it first
        pass
    return Damaged(path, reason)


def _crc32(path: Path, block: int = 1 << 24) -> str:
    """CRC-32 of a file (zlib's: several GB/s; it is there to find damage, not tampering)."""
    crc, buf = 0, bytearray(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(memoryview(buf)[:n], crc)
    return f"{crc:08x}"


_verified: dict[Path, tuple] = {}    # file → ((size, mtime_ns, inode, device), CRC-32) when this process checked it


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def _record(path: Path) -> dict:
    """What the manifest keeps to check a file we just wrote: its size and CRC-32."""
    crc = _crc32(path)
    _verified[path] = (_stat_key(path), crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def _check(path: Path, record: dict) -> None:
    """Raise Damaged, having moved the file aside, unless `path` has the size and CRC-32 of `record`. A file this
    process wrote or checked is not read again while its size, mtime and inode are unchanged."""
    try:
        key = _stat_key(path)
    except FileNotFoundError:
        raise Damaged(path, "missing") from None
    if _verified.get(path) == (key, record["crc32"]):
        return
    if key[0] != record["bytes"]:
        raise _set_aside(path, f"{key[0]:,} bytes instead of {record['bytes']:,}")
    if (crc := _crc32(path)) != record["crc32"]:
        raise _set_aside(path, f"CRC-32 {crc} instead of {record['crc32']}")
    _verified[path] = (key, crc)


def _damage(path: Path, record: dict) -> Damaged | None:
    """_check's verdict as a value (for a thread pool's map)."""
    try:
        _check(path, record)
    except Damaged as e:
        return e
    return None


def _content_crc(manifest: dict) -> str:
    return f"{zlib.crc32(json.dumps(manifest, sort_keys=True).encode()):08x}"


def _write_manifest(entry_path: Path, manifest: dict) -> None:
    """Write an entry's manifest with the CRC-32 of its content (as parsed JSON, keys sorted)."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "crc32"}, default=str))
    write_json_atomic(entry_path / MANIFEST, {**body, "crc32": _content_crc(body)})


def _read_manifest(entry_path: Path) -> dict:
    """An entry's manifest, checked (a version-1 manifest has no checksum to check); FileNotFoundError when there
    is none; Damaged (moved aside) when it does not parse or its CRC-32 differs."""
    path = entry_path / MANIFEST
    data = path.read_bytes()
    try:
        manifest = json.loads(data)
        crc = manifest.pop("crc32", None)
    except (ValueError, AttributeError):       # not JSON (truncated, damaged), or not an object
        raise _set_aside(path, "not a JSON manifest") from None
    if crc is None and manifest.get("version") == 1:
        return manifest
    if crc != _content_crc(manifest):
        raise _set_aside(path, f"CRC-32 {_content_crc(manifest)} instead of {crc}")
    return manifest


def _read_chunk(path: Path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Arrays `names` (default: all) of a chunk, each read whole, so that zip checks it against its CRC-32;
    Damaged (moved aside) when the chunk is damaged, truncated or empty."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in names or z.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError) as e:
        raise _set_aside(path, " ".join(f"{type(e).__name__}: {e}".split())) from None


#################################################################################
#                                    Entries                                    #
#################################################################################

_CHUNK = re.compile(r"chunk-(\d+)-r(\d+)\.npz")


class Entry:
    """One cached result: N rows (images), split into parts (e.g. noise levels), each a set of arrays.

    `row_axes` says where the image axis sits in each merged array (chunks always store rows first):
    ``{"blocks": 1}`` stores [n_blocks+1, N, D] from chunks of [B, n_blocks+1, D].
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.n = int(self.manifest["n"])
        self.row_axes: dict[str, int] = self.manifest.get("row_axes", {})

    def part_dir(self, part: str) -> Path:
        return self.path / part

    def reload(self) -> None:
        self.manifest = _read_manifest(self.path)

    def is_complete(self, part: str) -> bool:
        return bool(self.manifest["parts"].get(part, {}).get("complete"))

    def chunk_files(self, part: str) -> list[Path]:
        d = self.part_dir(part)
        return sorted(p for p in d.iterdir() if _CHUNK.fullmatch(p.name)) if d.is_dir() else []

    def pending(self, part: str) -> np.ndarray:
        """Row positions of `part` that no finished chunk holds yet (empty when the part is complete)."""
        while True:
            if self.is_complete(part):
                return np.zeros(0, dtype=np.int64)
            done = np.zeros(self.n, dtype=bool)
            try:
                for f in self.chunk_files(part):
                    try:
                        done[_read_chunk(f, ["positions"])["positions"]] = True
                    except Damaged as e:    # its rows are pending again
                        _warn(e)
                return np.flatnonzero(~done)
            except FileNotFoundError:       # another process merged the part and removed its chunks
                self.reload()

    def done(self, part: str, first: int) -> bool:
        """Whether the batch starting at row `first` is already in the store for `part` (cheap: no reads)."""
        if self.is_complete(part):
            return True
        d = self.part_dir(part)
        return d.is_dir() and any(d.glob(f"chunk-{first:09d}-r*.npz"))

    def write_chunk(self, part: str, positions: np.ndarray, arrays: dict[str, np.ndarray]) -> Path:
        """Save a finished batch (rows first in every array) atomically."""
        d = self.part_dir(part)
        with no_space_is_one_line(d.parent):
            d.mkdir(exist_ok=True)
        path = d / f"chunk-{int(positions[0]):09d}-r{rank()}.npz"
        def save(tmp):
            with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to a name
                np.savez(f, positions=np.asarray(positions, dtype=np.int64), **arrays)

        return atomic_write(path, save)

    def merge(self, part: str) -> bool:
        """Assemble a part's chunks into one .npy per array if they cover every row; → whether complete (not
        when a damaged chunk was found: it is moved aside, and its rows are pending again).
        Under the entry's lock, so concurrent processes merge once. Chunks that overlap (two processes with
        different batch sizes) hold the same rows computed the same way; any one of them serves."""
        with _locked(self.path / ".lock"):
            self.reload()
            if self.is_complete(part):
                self.clean(part)
                return True
            try:
                shapes, files = self._assemble(part)
            except Damaged as e:
                _warn(e)
                return False
            if shapes is None:
                return False
            chunks = [{"first": int(m.group(1)), "rank": int(m.group(2))}
                      for m in (_CHUNK.fullmatch(f.name) for f in files)]
            self.manifest["parts"][part] = {"complete": True, "arrays": shapes, "chunks": len(files),
                                            "ranks": sorted({c["rank"] for c in chunks}), "merged": time.time()}
            _write_manifest(self.path, self.manifest)
            self.clean(part)
        return True

    def _assemble(self, part: str) -> tuple[dict | None, list[Path]]:
        """Write each array of `part` from its chunks if they cover every row; → (each array's shape, dtype,
        row axis and checksum record, or None when rows are missing; the chunks read)."""
        files = self.chunk_files(part)
        covered = np.zeros(self.n, dtype=bool)
        for f in files:
            covered[_read_chunk(f, ["positions"])["positions"]] = True
        if not files or not covered.all():
            return None, files
        specs = {k: (v.shape[1:], v.dtype) for k, v in _read_chunk(files[0]).items() if k != "positions"}
        shapes = {}
        for name, (row_shape, dtype) in specs.items():
            axis = self.row_axes.get(name, 0)
            shape = (*row_shape[:axis], self.n, *row_shape[axis:])

            def assemble(tmp, name=name, axis=axis, shape=shape, dtype=dtype):
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                _allocate(tmp)
                for f in files:
                    z = _read_chunk(f, ["positions", name])
                    out[(slice(None),) * axis + (_as_index(z["positions"]),)] = np.moveaxis(z[name], 0, axis)
                out.flush()

            path = atomic_write(self.part_dir(part) / f"{name}.npy", assemble)
            shapes[name] = {"shape": list(shape), "dtype": np.dtype(dtype).name, "row_axis": axis, **_record(path)}
        return shapes, files

    def clean(self, part: str) -> None:
        """Remove what a complete part no longer needs: its chunks, and temporary files of dead writers."""
        for f in self.chunk_files(part):
            f.unlink(missing_ok=True)
        remove_stale_tmp(self.part_dir(part))

    # ----------------------------------------------------------------- claims
    def claim(self, first: int) -> bool:
        """Claim the batch starting at row `first` for this process (exclusive create); → whether we hold it.
        An abandoned claim (_abandoned) is taken over."""
        path = self.path / "claims" / f"batch-{first:09d}"
        with no_space_is_one_line(self.path):
            path.parent.mkdir(exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._abandoned(path):
                    return False
                try:                                   # one process wins the rename of an abandoned claim
                    os.rename(path, path.with_name(f".{path.name}.{os.getpid()}.abandoned"))
                    os.unlink(path.with_name(f".{path.name}.{os.getpid()}.abandoned"))
                except FileNotFoundError:
                    pass
                continue
            try:
                with no_space_is_one_line(path.parent), os.fdopen(fd, "w") as f:
                    f.write(f"{socket.gethostname()} {os.getpid()} {process_start(os.getpid()) or '-'}\n")
            except BaseException:
                path.unlink()                          # no empty claim to wait for
                raise
            return True
        return False

    def release(self, first: int) -> None:
        (self.path / "claims" / f"batch-{first:09d}").unlink(missing_ok=True)

    def _abandoned(self, path: Path) -> bool:
        """Whether a claim's holder is gone: on this host, its process has died, or its pid now belongs to
        another process (its start time differs) or to us (a claim we do not hold names a predecessor whose
        pid we reuse, as a restarted container's first process does); elsewhere, it is older than
        CLAIM_TIMEOUT_S. A claim without its host and pid, older than CLAIM_WRITE_S, was created by a process
        killed before it could write them."""
        try:
            text, age = path.read_text(), time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False                               # released this instant
        try:
            host, pid, *start = text.split()           # host pid start (the process's start time, or -)
            pid, start = int(pid), "".join(start).strip("-") or None
        except ValueError:
            return age > CLAIM_WRITE_S
        if host == socket.gethostname():
            return pid == os.getpid() or not pid_alive(pid, start)
        return age > CLAIM_TIMEOUT_S

    def verify(self, parts: Sequence[str]) -> None:
        """Check the merged arrays of the complete `parts` (_check), all at once on threads (reading and CRC-32
        release the GIL; one core checksums a few GB/s); a part with a damaged array is marked incomplete, so
        that fill computes it again."""
        records = {part: self.manifest["parts"][part] for part in parts if self.is_complete(part)}
        files = [(part, self.part_dir(part) / f"{name}.npy", spec)
                 for part, record in records.items() for name, spec in record["arrays"].items()]
        with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as pool:
            errors = list(pool.map(lambda file: _damage(*file[1:]), files))
        damaged = {part: records[part] for (part, _, _), e in zip(files, errors) if e is not None}
        for e in filter(None, errors):
            _warn(e)
        if damaged:
            with _locked(self.path / ".lock"):
                self.reload()
                for part, record in damaged.items():
                    if self.manifest["parts"].get(part) == record:     # not computed again meanwhile elsewhere
                        del self.manifest["parts"][part]
                _write_manifest(self.path, self.manifest)

    def array(self, part: str, name: str) -> np.ndarray:
        """A merged array, checked (_check), memory-mapped read-only."""
        if not self.is_complete(part):
            raise KeyError(f"{self.path}: part {part!r} is not complete")
        path = self.part_dir(part) / f"{name}.npy"
        _check(path, self.manifest["parts"][part]["arrays"][name])
        return np.load(path, mmap_mode="r")

    def _small(self, name: str) -> np.ndarray:
        _check(self.path / name, self.manifest["files"][name])
        return np.load(self.path / name)

    @property
    def labels(self) -> np.ndarray:
        return self._small("labels.npy")

    @property
    def ids(self) -> np.ndarray:
        return self._small("ids.npy")


def _allocate(path: str) -> None:
    """Reserve the disk space of a file made by open_memmap (sparse until its pages are written): a full disk
    then fails here with ENOSPC, not with SIGBUS when the memory map writes a page that has no room."""
    if hasattr(os, "posix_fallocate"):         # Linux; elsewhere a full disk may still end in SIGBUS
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def _adopt(entry_path: Path, manifest: dict) -> dict:
    """Bring a version-1 manifest (no checksums) to this version: a merged array that does not load with its
    recorded shape and dtype, or whose size is not what they need (truncated, empty), is moved aside and its
    part computed again; the others get their CRC-32 recorded now. Damage that kept the size cannot be seen
    in these: no checksum was written with them. Labels and ids are written again (entry())."""
    for part, record in list(manifest["parts"].items()):
        try:
            for name, spec in record.get("arrays", {}).items() if record.get("complete") else ():
                path = entry_path / part / f"{name}.npy"
                try:
                    a = np.load(path, mmap_mode="r")
                    whole = (list(a.shape), a.dtype.name, path.stat().st_size) == (spec["shape"], spec["dtype"],
                                                                                   a.offset + a.nbytes)
                except (OSError, ValueError, EOFError):
                    whole = False
                if not whole:
                    raise _set_aside(path, "not the size or shape its manifest records")
                spec.update(_record(path))
        except Damaged as e:
            _warn(e)
            del manifest["parts"][part]
    return {**manifest, "version": STORE_VERSION}


def _prepare(path: Path, new: dict, small: dict[str, np.ndarray]) -> None:
    """Under the entry's lock: write the manifest `new` unless a whole one is there (a damaged one is moved
    aside, a version-1 one adopted), and the small arrays (labels, ids) unless they are there and whole."""
    try:
        manifest = _read_manifest(path)
        changed = manifest["version"] == 1
        if changed:
            manifest = _adopt(path, manifest)
    except (FileNotFoundError, Damaged) as e:
        if isinstance(e, Damaged):
            _warn(e)
        manifest, changed = new, True
    files = manifest.setdefault("files", {})
    for name, values in small.items():
        try:
            _check(path / name, files[name])
        except (KeyError, Damaged) as e:             # a new or version-1 entry, or a damaged file
            if isinstance(e, Damaged):
                _warn(e)
            files[name], changed = write_npy_atomic(path / name, np.asarray(values, dtype=np.int64)), True
    if changed:
        _write_manifest(path, manifest)


def _as_index(positions: np.ndarray):
    """A slice when the positions are consecutive (a fast strided copy), else the positions themselves."""
    if len(positions) and positions[-1] - positions[0] + 1 == len(positions) and (np.diff(positions) == 1).all():
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


class FeatureStore:
    """The cache root. `entry(kind, fingerprint, ...)` opens (rank 0 creates) the entry for a fingerprint."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def check_writable(self) -> None:
        """Fail before any work if the cache cannot be written: one line naming --cache."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / f".write-test-{os.getpid()}", "w"):
                pass
            os.unlink(self.root / f".write-test-{os.getpid()}")
        except OSError as e:
            raise UserError(f"--cache '{self.root}' is not writable ({e.strerror}): pass a writable --cache "
                            f"folder") from None

    def entry(self, kind: str, fingerprint: dict, labels: np.ndarray, ids: np.ndarray,
              row_axes: dict[str, int] | None = None) -> Entry:
        """Open the entry of `fingerprint`, creating it (rank 0) or repairing it: a damaged manifest is moved
        aside and written anew (its merged parts are then computed again; chunks check themselves), damaged
        labels or ids are written again (the fingerprint decides them), a version-1 entry is adopted (_adopt)."""
        path = self.root / kind / digest(fingerprint)
        if rank() == 0:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--cache '{self.root}': cannot create '{path}' ({e.strerror}); pass a writable "
                                f"--cache folder") from None
            with _locked(path / ".lock"):               # another process may be creating it this instant
                _prepare(path, {"version": STORE_VERSION, "kind": kind, "fingerprint": fingerprint, "n": int(len(ids)),
                                "row_axes": row_axes or {}, "parts": {}, "created": time.time()},
                         {"labels.npy": labels, "ids.npy": ids})
        barrier()
        entry = Entry(path)
        if json.loads(json.dumps(fingerprint, default=str)) != entry.manifest["fingerprint"]:
            raise RuntimeError(f"{path}: the manifest's fingerprint differs from the requested one "
                               f"(hash collision or edited manifest); delete the folder")
        return entry


#################################################################################
#                       Filling an entry (resumable, sharded)                   #
#################################################################################

class _Rows(Dataset):
    """`dataset` indexed by row position; items gain their position: (x, label, id, position)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        return (*self.dataset[position], position)


Arrays = dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]]   # the rows, or a function that waits for them
Compute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str], Arrays]


class _ClaimedBatches(Sampler):
    """Batches of row positions (a fixed grid of `batch_size` rows), yielded only once this process holds
    their claim and some part still lacks them (another process may have computed them since we listed);
    the DataLoader loads just those. Remembers what it claimed, to release the claims."""

    def __init__(self, entry: Entry, batches: list[np.ndarray], parts: Sequence[str]):
        self.entry, self.batches, self.parts, self.claimed = entry, batches, parts, []

    def __iter__(self):
        for rows in self.batches:
            first = int(rows[0])
            if not self.entry.claim(first):
                continue
            self.claimed.append(first)
            self.entry.reload()
            if all(self.entry.done(part, first) for part in self.parts):
                self.entry.release(first)
                continue
            yield rows.tolist()

    def __len__(self) -> int:
        return len(self.batches)


def _write_batch(entry: Entry, chunks: list[tuple[str, np.ndarray, Arrays]], first: int) -> None:
    """Write one batch's chunks (on the writer thread), then release its claim."""
    for part, positions, arrays in chunks:
        entry.write_chunk(part, positions, arrays() if callable(arrays) else arrays)
    entry.release(first)


def fill(entry: Entry, parts: Sequence[str], dataset: Dataset, compute: Compute, *, batch_size: int,
         num_workers: int = 0, quiet: bool = False, desc: str = "") -> int:
    """Compute every missing (batch, part) chunk of `entry` and merge complete parts; → chunks computed.

    `dataset[position]` gives (x, label, id) for each row; `compute(x, labels, ids, part)` maps a batch to
    rows-first arrays, or to a function returning them (e.g. once a device → host copy has landed; it runs on
    the writer thread). The next batch loads on a background thread while this one computes, and chunks are
    written on another while the next batch computes; a batch's claim is released once its chunks are
    written, and an error of either thread is raised here.

    Batches are a fixed grid of row positions, dealt to ranks in contiguous runs, so a batch holds the same
    images whatever the number of ranks or the interruption history (features are bit-identical across 1 or
    N processes). Each image is loaded once for all its parts. Every batch is claimed first (see the module
    docstring): with other processes filling the same entry, each computes only unclaimed batches, then
    waits for the rest (saying so once on stderr, unless quiet).

    Merged arrays are checked first and chunks when merged: a damaged one is moved aside and computed again.
    """
    init_distributed()                 # under torchrun: the group the batches are dealt over (a no-op otherwise)
    if rank() == 0:
        entry.verify(parts)
    barrier()
    entry.reload()
    computed = 0
    for _ in range(3):                 # another round only when a damaged chunk was found (and moved aside)
        computed += _compute_missing(entry, parts, dataset, compute, batch_size, num_workers, quiet, desc)
        barrier()
        if rank() == 0:
            for part in parts:
                entry.merge(part)
        barrier()
        entry.reload()
        if all(entry.is_complete(part) for part in parts):
            return sum_over_ranks(computed)
    raise UserError(f"chunks written to '{entry.path}' were found damaged three times: check that disk, or use "
                    f"another --cache")


def _compute_missing(entry: Entry, parts: Sequence[str], dataset: Dataset, compute: Compute, batch_size: int,
                     num_workers: int, quiet: bool, desc: str) -> int:
    """fill's work: compute and write the chunks that no process has written; → how many this process wrote."""
    grid = [np.arange(s, min(s + batch_size, entry.n)) for s in range(0, entry.n, batch_size)]

    def todo() -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        pending = {part: entry.pending(part) for part in parts}
        rows = np.unique(np.concatenate([np.zeros(0, np.int64), *pending.values()]))
        return pending, [b for b in grid if np.isin(b, rows).any()]

    pending, batches = todo()
    barrier()   # every rank has listed the chunks before any rank writes new ones
    mine = [batches[i] for i in np.array_split(np.arange(len(batches)), world_size())[rank()]]
    computed, waiting = 0, False
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(len(b) for b in mine), unit="img", desc=desc, disable=quiet or rank() != 0 or not mine,
               dynamic_ncols=True)
    while mine:
        sampler = _ClaimedBatches(entry, mine, parts)
        writer = Writer()
        try:
            with Prefetcher(make_loader(_Rows(dataset), num_workers=num_workers, batch_sampler=sampler)) as batches:
                for x, labels, ids, rows in batches:
                    rows, chunks = rows.numpy(), []
                    for part in parts:
                        take = np.isin(rows, pending[part])
                        if take.any() and not entry.done(part, int(rows[0])):
                            sel = torch.from_numpy(np.flatnonzero(take))
                            arrays = compute(x, labels, ids, part) if take.all() else \
                                compute(x[sel], labels[sel], ids[sel], part)
                            chunks.append((part, rows[take], arrays))
                            computed += 1
                    writer.submit(functools.partial(_write_batch, entry, chunks, int(rows[0])))
                    bar.update(len(rows))
            writer.finish()
        finally:
            writer.finish(raise_error=False)   # no claim is released before its batch's chunks are written
            for first in sampler.claimed:
                entry.release(first)
        pending, left = todo()           # what others held: wait for it, or take it over if they died
        share = {int(b[0]) for b in mine}
        mine = left if world_size() == 1 else [b for b in left if int(b[0]) in share]
        if mine and not sampler.claimed:
            if not quiet and not waiting:
                tqdm.write(f"repa-probe: waiting for {len(mine)} batch(es) that other processes are computing "
                           f"(their claims: {entry.path / 'claims'})", file=sys.stderr)
            waiting = True
            time.sleep(POLL_S)
    bar.close()
    return computed


#################################################################################
#                                    Readers                                    #
#################################################################################

class Stacked:
    """Per-t memmaps seen as one array [n_t, ...] without copying them.

    Indexing with an integer first picks one memmap (``blocks[ti, b]`` reads only block b at t_i);
    any other index, or np.asarray(stacked), stacks the selected parts into memory.
    """

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = list(arrays)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.arrays), *self.arrays[0].shape)

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[0].dtype

    @property
    def ndim(self) -> int:
        return 1 + self.arrays[0].ndim

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            return self.arrays[first][rest]
        if first is Ellipsis:
            return np.asarray(self)[key]
        picked = range(len(self.arrays))[first] if isinstance(first, slice) else np.asarray(first).tolist()
        return np.stack([self.arrays[i][rest] for i in picked])

    def __array__(self, dtype=None, copy=None):
        out = np.stack(self.arrays)
        return out if dtype is None else out.astype(dtype)


@dataclass
class Features:
    """Model features of one (checkpoint, data subset, capture settings), as the metrics and probes read them.

    blocks [n_t, n_blocks+1, N, D]   index 0 = tokens entering block 1; i = output of block i (1-based)
                                      (D is g²·D for grid pooling; [.., N, T, D] for token pooling)
    raw    [n_t, N, C·(H/p)·(W/p)]    the model input x_t average-pooled per p×p patch (the thumbnail baseline)
    raw_pooled [n_t, N, C·p·p]        x_t's p×p patches mean-pooled over the grid, as the blocks are (baseline)
    labels [N], ids [N]               class label and stable image id of each row
    reduced {name: {array: ...}}      each token reduction captured (reductions.py): "blocks" [n_t, n_blocks+1,
                                      N, ...] and, for one applied to the thumbnail too, "raw" [n_t, N, ...];
                                      a projector reduction's "projected{k}" [n_t, N, ...], one per projector
    """
    blocks: Stacked
    raw: Stacked | None
    labels: np.ndarray
    ids: np.ndarray
    ts: list[float]
    path: Path
    manifest: dict
    computed: int = 0          # chunks (batch × t) computed by the call that returned this; 0 = all cached
    raw_pooled: Stacked | None = None
    reduced: dict[str, dict[str, Stacked]] = field(default_factory=dict)


def read_features(entry: Entry, ts: Sequence[float], computed: int = 0,
                  reduced: dict[str, list[str]] | None = None) -> Features:
    """The features of `entry` at `ts`; `reduced`: {reduction name: its part at each t} (capture.extract)."""
    parts = [t_part(t) for t in ts]
    missing = [p for p in [*parts, *(p for ps in (reduced or {}).values() for p in ps)] if not entry.is_complete(p)]
    if missing:
        raise KeyError(f"{entry.path}: {', '.join(missing)} not extracted yet")

    def stacked(parts: list[str], name: str) -> Stacked:
        return Stacked([entry.array(p, name) for p in parts])
    return Features(blocks=stacked(parts, "blocks"), raw=stacked(parts, "raw"), raw_pooled=stacked(parts, "raw_pooled"),
                    labels=entry.labels, ids=entry.ids, ts=[float(t) for t in ts], path=entry.path,
                    manifest=entry.manifest, computed=computed,
                    reduced={r: {name: stacked(ps, name) for name in entry.manifest["parts"][ps[0]]["arrays"]}
                             for r, ps in (reduced or {}).items()})


@dataclass
class ImageFeatures:
    """Per-image arrays of one part-less entry (latents, encoder features): name → memmap [N, ...]."""
    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    ids: np.ndarray
    path: Path
    fingerprint: dict = field(default_factory=dict)
    computed: int = 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def cache_image_features(store: FeatureStore, kind: str, fingerprint: dict, dataset: Dataset,
                         fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], *,
                         batch_size: int = 64, num_workers: int = 0, quiet: bool = False) -> ImageFeatures:
    """Cache `fn(images, ids)` (uint8 [B, 3, H, W], image ids [B] → a dict of [B, ...] tensors) for every image of an
    ImageDataset, once per (fingerprint, data subset). `fingerprint` must name everything that decides
    fn's output (weights hash, preprocessing); the data subset's fingerprint is added here."""
    key = {**fingerprint, "data": dataset.fingerprint()}
    entry = store.entry(kind, key, dataset.labels, dataset.ids)

    def compute(x, labels, ids, part):
        return host_copy({k: v.detach().float() for k, v in fn(x, ids).items()})

    computed = fill(entry, ["all"], dataset, compute, batch_size=batch_size, num_workers=num_workers,
                    quiet=quiet, desc=kind)
    names = entry.manifest["parts"]["all"]["arrays"]
    return ImageFeatures({k: entry.array("all", k) for k in names}, entry.labels, entry.ids, entry.path,
                         key, computed)


def encoder_features(store: FeatureStore, encoder, dataset: Dataset, grid: int, *, tokens: bool = False,
                     extras: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
                     cell_seed: int | None = None, batch_size: int = 64, num_workers: int = 0,
                     quiet: bool = False) -> ImageFeatures:
    """Target-encoder features of a data subset, cached by (encoder.fingerprint(grid), data, grid):
    ``pooled`` [N, D] (mean of patch tokens), with tokens=True ``tokens`` [N, grid², D], for each
    ``extras`` name its function of the tokens and the image ids → [N, ...] (a token reduction, e.g. the
    spatial measures, without keeping the tokens; a function's ``cache_key`` attribute, where it has one,
    stands for it in the key: the reduction's name and version), and with `cell_seed` the token at each image's sampled cell with its image's channel mean and std
    (``token``, ``token_mean``, ``token_std`` [N, D]; tokens.py).

    `encoder` is an `encoders.Encoder` (or anything with ``encode(images01, grid) -> (tokens, pooled)``
    and ``fingerprint(grid) -> str``)."""
    def fn(images, ids):
        return encode_batch(encoder, images, ids, grid, tokens=tokens, extras=extras, cell_seed=cell_seed)

    fingerprint = {"encoder": encoder.fingerprint(grid), "grid": grid, "tokens": tokens,
                   **({"extras": sorted(getattr(fn, "cache_key", name) for name, fn in extras.items())} if extras else {}),
                   **({"cell_seed": cell_seed} if cell_seed is not None else {})}
    return cache_image_features(store, "encoder", fingerprint, dataset, fn, batch_size=batch_size,
                                num_workers=num_workers, quiet=quiet)


def encode_batch(encoder, images: torch.Tensor, ids: torch.Tensor, grid: int, *, tokens: bool = False,
                 extras: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
                 cell_seed: int | None = None) -> dict[str, torch.Tensor]:
    """encoder_features' arrays of one batch of uint8 images [B, 3, H, W] with image ids [B]."""
    tok, pooled = encoder.encode(images.float() / 255, grid)   # encoders take [0, 1]
    cells = {} if cell_seed is None else target_cells(tok, sample_cells(ids, tok.shape[1], cell_seed))
    return {"pooled": pooled, **({"tokens": tok} if tokens else {}),
            **{name: fn(tok, ids) for name, fn in (extras or {}).items()}, **cells}
