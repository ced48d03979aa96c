"""What every stage needs from the machine: device, precision, the torchrun process group, atomic file
writes, hashes, run-folder locks, and finding a run's checkpoints. One place for each, so the stages agree."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from repa_probe.errors import UserError


def stream_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for one named random stream at given keys (step, epoch, ...): independent streams."""
    text = "/".join([str(seed), stream, *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


#################################################################################
#                              Device and precision                             #
#################################################################################

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device | None = None, flag: str = "--device") -> torch.device:
    """The device to run on: `device` if given and usable, else cuda:LOCAL_RANK when a GPU is present, else
    the CPU. A device that does not exist here is a UserError naming the flag."""
    if device is None or device == "":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: no CUDA GPU is available here; use {flag} cpu") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"{flag} {device!r}: use cpu, cuda or cuda:N")
    return dev


def resolve_precision(precision: str, device: torch.device, flag: str = "--precision") -> str:
    """"auto" → bf16 on GPUs, fp32 elsewhere; anything else must be one of fp32, bf16, fp16."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in AUTOCAST_DTYPES:
        raise UserError(f"{flag} {precision!r}: use {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of a resolved precision (fp32 = off)."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


#################################################################################
#                            Process group (torchrun)                           #
#################################################################################

def init_distributed(device: torch.device | None = None) -> None:
    """Join the process group when launched by torchrun with several processes (WORLD_SIZE > 1): NCCL on
    GPUs, gloo on the CPU. A plain single-process run never touches torch.distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(device if device is not None and device.index is not None else local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_over_ranks_array(a: np.ndarray) -> np.ndarray:
    """The element-wise float64 sum of `a` over all ranks (`a` itself in one process)."""
    if not dist.is_initialized():
        return a
    total = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    total = total.cuda() if dist.get_backend() == "nccl" else total
    dist.all_reduce(total)
    return total.cpu().numpy()


def sum_over_ranks(k: int) -> int:
    if not dist.is_initialized():
        return k
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([k], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


#################################################################################
#                                 Atomic writes                                 #
#################################################################################

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()     # what open() would give a new file: shared caches stay shared
HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())   # as it appears in temporary names
# atomic_write's temporary files: .NAME.HOST-PID.<random>.tmp (whose process can be asked whether it still lives)
TMP_PATTERN = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where that cannot be read:
    with its pid, it names one process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` exists on this machine (and, given `start`, is the process that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: alive
        pass
    now = process_start(pid) if start else None
    return now is None or now == start


def owned_by_dead_process(name: str) -> bool:
    """A temporary name of ours (.NAME.HOST-PID.<random>.tmp, .OUT.partial-HOST-PID-<random>) whose writer on this
    host has died: safe to remove. Another host's or a live process's files are never touched."""
    m = TMP_PATTERN.fullmatch(name) or PARTIAL_PATTERN.fullmatch(name)
    return bool(m) and m.group("host") == HOST and not pid_alive(int(m.group("pid")))


PARTIAL_PATTERN = re.compile(r"\.(?P<name>.+)\.partial-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")


def tmp_prefix(name: str) -> str:
    """The prefix of a temporary file name for `name` that says which process wrote it."""
    return f".{name}.{HOST}-{os.getpid()}."


def partial_prefix(name: str) -> str:
    """The prefix of a temporary folder for report `name` that says which process wrote it."""
    return f".{name}.partial-{HOST}-{os.getpid()}-"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # disk full, quota reached, over the file-size limit


def no_space(folder: str | os.PathLike, e: BaseException) -> UserError | None:
    """The one line for a write in `folder` that failed for want of space: `e` or an exception it was raised
    while handling is an OSError with an errno in NO_SPACE (EFBIG: a file beyond `ulimit -f`); else None.
    The writers remove what they began (atomic_write's temporary file, a report's partial folder), so a
    rerun resumes from whole files."""
    while e is not None and not (isinstance(e, OSError) and e.errno in NO_SPACE):
        e = e.__cause__ or e.__context__          # torch's writer raises its own error while handling ENOSPC
    if e is None:
        return None
    return UserError(f"the disk holding '{folder}' is full ({e.strerror}): free space there or choose another "
                     f"folder, then run the command again (what was finished is kept)")


@contextlib.contextmanager
def no_space_is_one_line(folder: str | os.PathLike):
    """Raise no_space's UserError for a write in `folder` that fails for want of space."""
    try:
        yield
    except Exception as e:
        if (error := no_space(folder, e)) is None:
            raise
        raise error from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """write(tmp) into a temporary file beside `path`, then rename it over `path` (os.replace is atomic),
    so readers and resumed runs only ever see a whole file; the temporary file is removed on failure (and,
    after a kill -9, by the next process: remove_stale_tmp). The file gets the permissions of the umask, as
    a plain open() would. A full disk is one line (no_space_is_one_line)."""
    path = Path(path)
    with no_space_is_one_line(path.parent):
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def torch_save_atomic(path: str | os.PathLike, obj) -> Path:
    """torch.save through a Python file object: a full disk then raises OSError(ENOSPC), where torch's own
    writer, given a file name, says only "[enforce fail at inline_container.cc] unexpected pos"."""
    def save(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, save)


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and partial folders in `folder` whose writing process on this host has
    died (left by kill -9); → what was removed."""
    import shutil
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        if owned_by_dead_process(f.name):
            try:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
                removed.append(f)
            except FileNotFoundError:      # another process cleaned it first
                pass
    return removed


#################################################################################
#                                  Folder locks                                 #
#################################################################################

LOCK_NAME = ".repa-probe.lock"
_HELD: dict[str, int] = {}       # folders this process holds: real path → the lock file's descriptor


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold `folder` (a run or report folder, created if missing) for this process while the block runs.

    Another process asking for it stops at once with a UserError naming the holder, having changed nothing
    there. The lock is the kernel's (an fcntl record lock on FOLDER/.repa-probe.lock), so it ends with its
    process, kill -9 included, and the next process takes the folder over; the file only says who holds it
    (host, pid, start, command) for that message, and is removed on release, with the folder if this call
    created it and nothing was written into it. Record locks are per process: a forked DataLoader worker
    does not inherit it, and a second hold of the same folder in this process is refused here."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(folder, flag)
    except OSError as e:
        raise UserError(f"{flag} '{folder}' is not writable ({e.strerror or e}): choose another folder") from None
    try:
        yield folder
    finally:
        if fd is not None:
            del _HELD[os.path.realpath(folder)]
            (folder / LOCK_NAME).unlink(missing_ok=True)   # while still locked: see _lock's inode check
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):              # not empty: the run wrote something
                folder.rmdir()


def _lock(folder: Path, flag: str) -> int | None:
    """Lock FOLDER/.repa-probe.lock and describe this process in it; → its descriptor, or None (with a
    warning) on a filesystem without locks."""
    if os.path.realpath(folder) in _HELD:
        raise UserError(f"{flag} '{folder}' is already in use by this process: choose another {flag}")
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                path.unlink(missing_ok=True)
                print(f"repa-probe: warning: cannot lock {flag} '{folder}' ({e.strerror}): a second process "
                      f"writing there at the same time would not be stopped", file=sys.stderr)
                return None
            raise UserError(f"{flag} '{folder}' is in use by {_describe(holder)}: wait for it to end or stop "
                            f"it, or choose another {flag}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)          # its holder removed that file as we opened it: lock the one now at `path`
    pid = os.getpid()
    command = shlex.join(sys.argv)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": pid, "start": process_start(pid),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "command": command if len(command) <= 300 else command[:299] + "…"}).encode(), 0)
    _HELD[os.path.realpath(folder)] = fd
    return fd


def _describe(holder: bytes) -> str:
    """The holder's lock-file record as words. A record naming a dead process of this host is its
    predecessor's: the holder has locked the file but not yet written its own."""
    try:
        h = json.loads(holder)
        if h["host"] == socket.gethostname() and not pid_alive(h["pid"], h["start"]):
            raise ValueError
        return f"another process (pid {h['pid']} on {h['host']}, since {h['since']}: {h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process that is starting"


#################################################################################
#                                    Hashes                                     #
#################################################################################

def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 24) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def digest(obj) -> str:
    """Short sha256 of plain data, with keys sorted so equal dicts give equal keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor], skip: Callable[[str], bool] = lambda name: False,
                      ordered: bool = False) -> str:
    """sha256 over names and float32 bytes of a state dict's tensors (in key order, or sorted)."""
    h = hashlib.sha256()
    for name in (sorted(state_dict) if ordered else state_dict):
        if skip(name):
            continue
        h.update(name.encode())
        h.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


#################################################################################
#                                  Run folders                                  #
#################################################################################

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


def checkpoint_step(path: Path) -> int | None:
    """The step of a trainer checkpoint RUN/checkpoints/NNNNNNN.pt, else None."""
    return int(path.stem) if path.stem.isdigit() else None


def find_checkpoints(pattern: str | os.PathLike) -> list[Path]:
    """A run folder (its checkpoints/ or itself), a glob, or one file → checkpoint files, sorted."""
    import glob
    p = Path(pattern)
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        return sorted(f for f in folder.iterdir() if f.suffix in CHECKPOINT_SUFFIXES and f.is_file()
                      and not f.name.startswith("."))
    if p.is_file():
        return [p]
    return sorted(Path(f) for f in glob.glob(str(pattern)) if Path(f).suffix in CHECKPOINT_SUFFIXES)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """RUN_DIR/checkpoints/{step:07d}.pt with the highest step, or None."""
    folder = Path(run_dir) / "checkpoints"
    steps = [p for p in folder.glob("*.pt") if checkpoint_step(p) is not None] if folder.is_dir() else []
    return max(steps, key=checkpoint_step) if steps else None


def latest_in_run(arg: str | os.PathLike) -> str:
    """A checkpoint file as is; a training run folder → its checkpoint with the highest step (or, in a folder
    of other files, the last by name)."""
    if not Path(arg).is_dir():
        return str(arg)
    files = find_checkpoints(arg)
    if not files:
        raise UserError(f"'{arg}' is a folder without checkpoints: pass a .pt/.safetensors file or a training "
                        "run folder (RUN/checkpoints/*.pt)")
    return str(max(files, key=lambda f: (checkpoint_step(f) is not None, checkpoint_step(f) or 0, f.name)))

