"""What every stage needs from the machine: device, precision, the torchrun process group, atomic file
writes, hashes, and finding a run's checkpoints. One place for each, so the stages agree."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from repa_probe.errors import UserError

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


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """write(tmp) into a temporary file beside `path`, then rename it over `path` (os.replace is atomic),
    so readers and resumed runs only ever see a whole file; the temporary file is removed on failure (and,
    after a kill -9, by the next process: remove_stale_tmp). The file gets the permissions of the umask, as
    a plain open() would."""
    path = Path(path)
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

