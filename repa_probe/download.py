"""Opt-in downloads: official checkpoints, encoder weights and CIFAR-10 for the demo, into the cache.

Nothing here runs unless asked (`--download`, `analyze(..., download=True)`, or the demo finding no data).
A download says what it fetches from where before it starts, shows a progress bar, resumes a partial file
(an HTTP range request), checks the file's checksum and only then moves it into place: a wrong checksum
leaves nothing in the cache. Where the publisher gives no checksum, the sha256 of the first complete
download is written beside the file (FILE.sha256) and every later use is checked against it.

$REPA_PROBE_MIRROR (a base URL) fetches every file by its name from a mirror instead of its origin.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from repa_probe.errors import UserError
from repa_probe.runtime import file_digest, partial_prefix, remove_stale_tmp

CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """A published file: where it lives, what to call it locally and how to check it."""
    url: str
    filename: str
    what: str
    sha256: str | None = None
    md5: str | None = None


CHECKPOINTS = {r.filename: r for r in (
    Remote("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", "DiT-XL-2-256x256.pt",
           "DiT-XL/2 256×256 (facebookresearch/DiT)"),
    Remote("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", "DiT-XL-2-512x512.pt",
           "DiT-XL/2 512×512 (facebookresearch/DiT)"),
    Remote("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
           "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=1", "SiT-XL-2-256x256.pt", "SiT-XL/2 256×256 (willisma/SiT)"),
    Remote("https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
           "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=1", "repa-last.pt",
           "REPA SiT-XL/2, 4M iterations (sihyun-yu/REPA)"),
)}
CIFAR10 = Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                 "CIFAR-10 (python batches, 163 MB)", md5="c58f30108f718f92721af3b95e74349a")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repa-probe"


def source_url(remote: Remote) -> str:
    mirror = os.environ.get("REPA_PROBE_MIRROR")
    return f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url


def check_file(remote: Remote, path: Path) -> None:
    """The file's checksum against the published one, else against the one recorded at its first download."""
    recorded = path.with_name(path.name + ".sha256")
    for algorithm, want in (("sha256", remote.sha256), ("md5", remote.md5),
                            ("sha256", recorded.read_text().split()[0] if recorded.is_file() else None)):
        if want and file_digest(path, algorithm) != want:
            raise UserError(f"'{path}' does not match its {algorithm} {want[:16]}…: the file is damaged or not "
                            f"{remote.what}; delete it and download again")


def fetch(remote: Remote, folder: str | os.PathLike, *, quiet: bool = False) -> Path:
    """`folder/remote.filename`, downloaded (resumed, checked) unless it is already there and checks out."""
    dest = Path(folder) / remote.filename
    if dest.is_file():
        check_file(remote, dest)
        return dest
    url = source_url(remote)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    have = part.stat().st_size if part.is_file() else 0
    print(f"repa-probe: downloading {remote.what} from {url} → {dest}" + (f" (resuming at {have:,} bytes)"
                                                                         if have else ""), file=sys.stderr)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:           # the server ignored the range: start again
                have = 0
            total = response.length + have if response.length is not None else None
            _stream(response, part, have, total, quiet, remote.filename)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:                        # the partial file is already complete
            pass
        else:
            raise UserError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        kept = f"; {part.stat().st_size:,} bytes kept in '{part}', run again to resume" if part.is_file() else ""
        raise UserError(f"downloading {url} failed ({getattr(e, 'reason', e)}){kept}") from None
    try:
        check_file(remote, part)
    except UserError:
        part.unlink()
        raise UserError(f"the download of {url} does not match its published checksum: nothing was kept; try "
                        f"again, or fetch the file yourself") from None
    if not (remote.sha256 or remote.md5):
        part.with_name(dest.name + ".sha256").write_text(f"{file_digest(part, 'sha256')}  {dest.name}\n")
    os.replace(part, dest)
    return dest


def _stream(response, part: Path, have: int, total: int | None, quiet: bool, name: str) -> None:
    from tqdm import tqdm
    with open(part, "ab" if have else "wb") as f, \
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, disable=quiet) as bar:
        for block in iter(lambda: response.read(CHUNK), b""):
            f.write(block)
            bar.update(len(block))
        if total is not None and f.tell() < total:
            raise ConnectionError(f"the connection closed after {f.tell():,} of {total:,} bytes")


def official_checkpoint(name: str, *, quiet: bool = False) -> Path:
    """An official checkpoint by its file name (CHECKPOINTS), from the cache or downloaded into it."""
    if name not in CHECKPOINTS:
        raise UserError(f"'{name}' is neither a file nor an official checkpoint repa-probe can download "
                        f"({', '.join(CHECKPOINTS)})")
    return fetch(CHECKPOINTS[name], cache_root() / "checkpoints", quiet=quiet)


#################################################################################
#                           CIFAR-10 for the demo                               #
#################################################################################

class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles of numpy arrays and lists: allow numpy's array rebuilding, nothing else."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def cifar10(root: str | os.PathLike | None = None, *, quiet: bool = False, remote: Remote = CIFAR10) -> Path:
    """CIFAR-10 as ImageFolder trees root/{train,test}/<class>/<index>.png, downloaded and converted once."""
    import numpy as np
    from PIL import Image

    root = Path(root) if root else cache_root() / "data" / "cifar10"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    archive = fetch(remote, cache_root() / "downloads", quiet=quiet)
    print(f"repa-probe: converting CIFAR-10 to PNG folders in {root} (once)", file=sys.stderr)
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root.parent)                   # what a killed conversion left
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(root.name), dir=root.parent))
    with tarfile.open(archive) as tar:
        def load(member: str) -> dict:
            f = tar.extractfile(f"cifar-10-batches-py/{member}")
            if f is None:
                raise UserError(f"'{archive}' has no {member}: not the CIFAR-10 python archive")
            return _ArraysOnly(f, encoding="latin1").load()
        classes = load("batches.meta")["label_names"]
        for split, batches in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
            index = 0
            for batch in batches:
                b = load(batch)
                images = np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                for image, label in zip(images, b["labels"]):
                    folder = tmp / split / classes[label]
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(folder / f"{index:05d}.png")
                    index += 1
    try:
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp)
        raise UserError(f"'{root}' exists but holds no train/ and test/ folders: remove it and run again") from None
    return root
