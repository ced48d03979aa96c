"""Run and report folders are locked: a second process on a folder a live process holds stops at once with
one line naming the holder and changes nothing there; a folder whose holder was killed (kill -9) is taken
over. Real processes: a training run, a helper holding a folder through the package's own API, the CLI."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ONE_THREAD, REPO, run_cli
from repa_probe.errors import UserError
from repa_probe.runtime import LOCK_NAME, hold_folder
from test_train import log_rows, repa_flags, tiny_flags

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder`: modification time and content."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, **ONE_THREAD},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def refused(result: subprocess.CompletedProcess, holder: int) -> str:
    """The one error line of a command refused because process `holder` holds its folder."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("repa-probe: error: --out ") and "is in use by another process" in lines[0]
    assert f"pid {holder} on {socket.gethostname()}" in lines[0], lines[0]
    return lines[0]


def test_second_train_on_a_live_run_stops_at_once_and_a_killed_runs_folder_is_taken_over(cifar_dir, tmp_path):
    data, run = cifar_dir / "test", tmp_path / "run"
    first = start("-m", "repa_probe", "train", *tiny_flags(data, run, **{"--steps": 100_000}), "--repa-coeff", "0")
    wait_for(lambda: (run / "log.jsonl").is_file() and log_rows(run), first, "training step")
    first.send_signal(signal.SIGSTOP)             # still holds the folder, but writes nothing while we look
    try:
        before = snapshot(run)
        # the case: λ 0.5 on the folder of a running λ 0 (an identical run takes the same path)
        line = refused(run_cli("train", *tiny_flags(data, run, **{"--steps": 4}), *repa_flags(0.5), env=ONE_THREAD),
                       first.pid)
        assert "train" in line and str(run) in line
        assert snapshot(run) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    held = json.loads((run / LOCK_NAME).read_text())            # the killed run's lock file stays behind ...
    assert held["pid"] == first.pid and held["host"] == socket.gethostname()

    result = run_cli("train", *tiny_flags(data, run, **{"--steps": 4}), "--repa-coeff", "0", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr                # ... and the next run takes the folder over
    assert (run / "checkpoints" / "0000004.pt").is_file() and not (run / LOCK_NAME).exists()
    assert [r["step"] for r in log_rows(run)] == [1, 4]         # the killed run's rows are gone, none twice


def test_analysis_commands_refuse_a_held_report_folder_and_take_over_a_killed_holders(tmp_path, cifar_dir):
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.csv").write_text("an earlier report\n")
    helper = start("-c", "import sys, time\nfrom repa_probe.runtime import hold_folder\n"
                         "with hold_folder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)", str(out))
    try:
        assert helper.stdout.readline() == "held\n"
        before = snapshot(out)
        data = ["--data", cifar_dir / "test", "--out", out]
        for command in (["analyze", tmp_path / "a.pt"], ["trajectory", tmp_path / "run"]):   # analyze is compare
            refused(run_cli(*command, *data), helper.pid)
            assert snapshot(out) == before
    finally:
        helper.send_signal(signal.SIGKILL)
        helper.communicate()
    with hold_folder(out):                                      # the kernel released the dead helper's lock
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]


def test_one_process_cannot_hold_a_folder_twice_and_release_leaves_no_trace(tmp_path):
    folder = tmp_path / "new" / "run"
    with hold_folder(folder):
        with pytest.raises(UserError, match="already in use by this process"):
            with hold_folder(tmp_path / "new" / ".." / "new" / "run"):
                pass
        assert (folder / LOCK_NAME).is_file()
    assert not folder.exists()                                   # created for nothing: removed again
    with hold_folder(folder):
        (folder / "log.jsonl").write_text("{}\n")
    assert [p.name for p in folder.iterdir()] == ["log.jsonl"]
    with pytest.raises(UserError, match=r"^--out '.*' is not writable \(Not a directory\)"):
        with hold_folder(folder / "log.jsonl" / "run"):
            pass


def test_a_filesystem_without_locks_gets_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """(NFS without a lock daemon answers ENOLCK; no such filesystem here, so lockf says it.)"""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with hold_folder(tmp_path / "run"):
        (tmp_path / "run" / "log.jsonl").write_text("{}\n")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("repa-probe: warning: cannot lock --out") and "No locks" in err[0]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["log.jsonl"]
