"""Bad input, shared caches, killed runs: every case of the hardening review, each with a test that failed
before its fix. Real subprocesses for the CLI (one error line, exit 2), real files, real concurrent runs."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pypdf import PdfReader

from conftest import ONE_THREAD, REPO, randomize_, run_cli, tiny_config
from repa_probe.checkpoints import save_checkpoint
from repa_probe.errors import UserError
from repa_probe.families import load_checkpoint
from repa_probe.models import SiT
from repa_probe.runtime import atomic_write

ENCODER = "test_vit"


def one_error_line(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and needle in lines[0], r.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hard")
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    return save_checkpoint(d / "tiny.pt", cfg, randomize_(SiT(cfg)).state_dict(), meta={"mode": "pixels", "step": 5})


@pytest.fixture(scope="module")
def training_ckpt(tmp_path_factory) -> Path:
    """A training checkpoint of ours (model, optimizer, step): what export-repa takes."""
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    sd = randomize_(SiT(cfg)).state_dict()
    return save_checkpoint(tmp_path_factory.mktemp("train") / "0000001.pt", cfg, sd, model=sd,
                           meta={"mode": "pixels", "step": 1, "train_config": {"batch": 8}},
                           optimizer={"state": {}, "param_groups": []}, step=1)


def fast(tmp_path, cifar_dir, n=40):
    return ["--data", cifar_dir / "test", "--n", n, "--t", "0,0.5", "--encoder", ENCODER, "--encoder-random-init",
            "--bootstrap", 2, "--null", 2, "--quiet"]


# --------------------------------------------------------------------------- 1. a shared cache

def test_three_analyses_on_one_cache_at_once_all_succeed_agree_and_share_the_work(ckpt, cifar_dir, tmp_path):
    cache = tmp_path / "shared-cache"
    cmd = [sys.executable, "-m", "repa_probe", "analyze", ckpt, *fast(tmp_path, cifar_dir), "--batch-size", 8,
           "--cache", cache]
    procs = [subprocess.Popen([*map(str, cmd), "--out", str(tmp_path / f"out{i}")], cwd=REPO, env={**os.environ,
                              **ONE_THREAD}, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    tables = [pd.read_csv(tmp_path / f"out{i}" / "results.csv") for i in range(3)]
    for t in tables[1:]:
        pd.testing.assert_frame_equal(t, tables[0])
    computed = [json.loads((tmp_path / f"out{i}" / "summary.json").read_text())["cache"]["chunks_computed"]
                for i in range(3)]
    alone = tmp_path / "alone"
    r = run_cli("analyze", ckpt, *fast(tmp_path, cifar_dir), "--batch-size", 8, "--cache", tmp_path / "fresh",
                "--out", alone, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(pd.read_csv(alone / "results.csv"), tables[0])
    # nobody computed what another was computing: together they did one analysis' work (a batch whose
    # claim holder was slow to release may be counted at most once more)
    assert sum(computed) <= json.loads((alone / "summary.json").read_text())["cache"]["chunks_computed"] + 2
    assert not list(cache.rglob("chunk-*.npz")) and not list(cache.rglob("*.tmp")) and not list(
        cache.rglob("claims/batch-*"))


@pytest.mark.parametrize("holder", ["dead process", "reused pid", "this process's pid", "killed before writing"])
def test_an_abandoned_claim_is_taken_over(ckpt, cifar_dir, tmp_path, holder):
    """A claim whose holder died; one whose pid now belongs to another process (it started at another time);
    one naming our own pid (a restarted container's process reuses its predecessor's); and one left empty
    by a process killed between creating and writing it. A live holder's claim is respected."""
    import socket
    from repa_probe.capture import CaptureConfig, extract
    from repa_probe.runtime import process_start
    from repa_probe.store import CLAIM_WRITE_S, Entry
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = extract(load_checkpoint(ckpt), cifar_dir / "test", CaptureConfig(ts=(0.0,)), n=16, batch_size=8,
                    cache_dir=tmp_path / "c", quiet=True)
    entry = Path(first.path)
    (entry / "claims").mkdir(exist_ok=True)
    claim = entry / "claims" / "batch-000000000"
    host = socket.gethostname()
    def waited_forever(*_):
        raise TimeoutError("extract is still waiting for an abandoned claim")

    alive = subprocess.Popen(["sleep", "300"])
    try:
        start = process_start(alive.pid)
        assert start is not None                           # Linux: /proc tells when a process started
        claim.write_text(f"{host} {alive.pid} {start}\n")
        assert not Entry(entry).claim(0)                   # its holder lives
        claim.write_text({"dead process": f"{host} {dead.pid} -\n",
                          "reused pid": f"{host} {alive.pid} {int(start) - 1}\n",
                          "this process's pid": f"{host} {os.getpid()} {process_start(os.getpid())}\n",
                          "killed before writing": ""}[holder])
        if holder == "killed before writing":
            assert not Entry(entry).claim(0)               # just created: its creator may be writing it now
            os.utime(claim, (time.time() - CLAIM_WRITE_S - 1,) * 2)
        signal.signal(signal.SIGALRM, waited_forever)
        signal.alarm(120)
        again = extract(load_checkpoint(ckpt), cifar_dir / "test", CaptureConfig(ts=(0.0, 0.5)), n=16,
                        batch_size=8, cache_dir=tmp_path / "c", quiet=True)
    finally:
        signal.alarm(0)
        alive.kill()
        alive.wait()
    assert again.computed == 2 and np.isfinite(np.asarray(again.blocks)).all()
    assert not list((entry / "claims").iterdir())


def test_a_run_waiting_for_a_batch_another_process_holds_says_so_once_and_takes_it_over_when_that_one_dies(
        ckpt, cifar_dir, tmp_path):
    import socket
    from repa_probe.runtime import process_start
    args = [ckpt, "--data", cifar_dir / "test", "--n", 16, "--batch-size", 8, "--cache", tmp_path / "c"]
    r = run_cli("extract", *args, "--t", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    entry = Path(re.search(r"features: (\S+)", r.stdout).group(1))
    holder = subprocess.Popen(["sleep", "300"])
    try:
        (entry / "claims").mkdir(exist_ok=True)
        (entry / "claims" / "batch-000000000").write_text(
            f"{socket.gethostname()} {holder.pid} {process_start(holder.pid)}\n")
        proc = subprocess.Popen([sys.executable, "-m", "repa_probe", "extract", *map(str, args), "--t", "0,0.5"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not list(entry.glob("t=0.5/chunk-000000008-*.npz")):      # its own batch is done: now it waits
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(3)
        assert proc.poll() is None                                         # it waits while the holder lives
    finally:
        holder.kill()
        holder.wait()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert err.count("waiting for 1 batch(es) that other processes are computing") == 1, err
    assert "computed 2 chunk(s)" in out


# --------------------------------------------------------------------------- 2. the README's trajectory example

def test_trajectory_of_a_run_without_a_log_asks_for_data_in_one_line(ckpt, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "0000005.pt").write_bytes(ckpt.read_bytes())
    one_error_line(run_cli("trajectory", run, "--out", tmp_path / "traj"), "pass --data")


# --------------------------------------------------------------------------- 3. heads the weights cannot tell

def test_heads_are_never_guessed_silently(tmp_path, cifar_dir):
    cfg = tiny_config(qk_norm=False, num_heads=2, hidden_size=128, z_dims=[], encoder_depth=0)
    sd = randomize_(SiT(cfg)).state_dict()
    torch.save(sd, tmp_path / "custom.pt")
    one_error_line(run_cli("inspect", tmp_path / "custom.pt"), "pass --heads N")
    r = run_cli("inspect", tmp_path / "custom.pt", "--heads", 2)
    assert r.returncode == 0 and "128 / 3 / 2" in r.stdout
    one_error_line(run_cli("inspect", tmp_path / "custom.pt", "--heads", 3), "--heads 3")
    standard = SiT(tiny_config(qk_norm=False, hidden_size=384, depth=12, num_heads=6, z_dims=[], encoder_depth=0))
    torch.save(standard.state_dict(), tmp_path / "s.pt")
    r = run_cli("inspect", tmp_path / "s.pt")
    assert r.returncode == 0 and "attention heads ASSUMED to be 6" in r.stdout


# --------------------------------------------------------------------------- 4.–5. runs that already exist

def test_demo_refuses_a_folder_trained_with_other_settings(cifar_dir, tmp_path):
    out = tmp_path / "demo"
    (out / "runs" / "vanilla").mkdir(parents=True)
    (out / "runs" / "vanilla" / "config.json").write_text(json.dumps({"steps": 700, "data": str(cifar_dir / "train")}))
    one_error_line(run_cli("demo", "--data", cifar_dir, "--out", out, "--steps", 3, "--n", 40),
                   "holds a demo trained with other settings")


def test_branching_from_an_earlier_checkpoint_moves_the_later_ones_aside(cifar_dir, tmp_path):
    from test_train import tiny_flags
    run = tmp_path / "run"
    base = [*tiny_flags(cifar_dir / "test", run), "--repa-coeff", "0", "--ckpt-every", "2"]
    assert run_cli("train", *base, "--steps", 4, env=ONE_THREAD).returncode == 0
    r = run_cli("train", *base, "--steps", 3, env=ONE_THREAD)
    one_error_line(r, "already holds step 4, beyond --steps 3")
    r = run_cli("train", *base, "--steps", 3, "--resume", run / "checkpoints" / "0000002.pt", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["0000002.pt", "0000003.pt"]
    (moved,) = (run / "checkpoints").glob("superseded-0000002-*")
    assert [p.name for p in moved.glob("*.pt")] == ["0000004.pt"]        # moved, not lost
    r = run_cli("train", *base, "--steps", 3, env=ONE_THREAD)             # resumes this branch: nothing to do
    assert r.returncode == 0 and "0000003.pt" in r.stdout


# --------------------------------------------------------------------------- 6. and one line per bad flag

BAD_FLAGS = [
    (["train", "--depth", "0"], "--depth"), (["train", "--heads", "0"], "--heads"),
    (["train", "--image-size", "0"], "--image-size"), (["train", "--lr", "nan"], "--lr"),
    (["train", "--device", "cuda"], "--device"), (["train", "--device", "gpu0"], "--device"),
    (["analyze", "CK", "--t", "0.5,0.5"], "--t"), (["analyze", "CK", "--probe-n-train", "0"], "--probe-n-train"),
    (["analyze", "CK", "--batch-size", "0"], "--batch-size"), (["analyze", "CK", "--batch-size", "-4"], "--batch-size"),
    (["analyze", "CK", "--bootstrap", "-1"], "--bootstrap"), (["analyze", "CK", "--bootstrap", "1"], "--bootstrap 1"),
    (["analyze", "CK", "--k", "0"], "--k"),
    (["analyze", "CK", "--samples", "-1"], "--samples"), (["analyze", "CK", "--device", "cuda"], "--device"),
    (["analyze", "CK", "--device", "gpu0"], "--device"), (["sample", "CK", "--steps", "0"], "--steps"),
    (["analyze", "CK", "--seed", "-1"], "--seed"), (["analyze", "CK", "--n", "99999"], "--n 99999"),
]


@pytest.mark.parametrize("argv, flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_line_naming_it_before_any_work(argv, flag, ckpt, cifar_dir, tmp_path):
    argv = [str(ckpt) if a == "CK" else a for a in argv]
    need = {"train": ["--data", cifar_dir / "test", "--out", tmp_path / "run"],
            "analyze": ["--data", cifar_dir / "test", "--out", tmp_path / "rep"],
            "sample": ["--out", tmp_path / "s.png"]}[argv[0]]
    start = time.perf_counter()
    r = run_cli(*argv, *need)
    one_error_line(r, flag)
    assert time.perf_counter() - start < 60 and not (tmp_path / "rep").exists()


def test_n_too_few_for_k_is_one_line_naming_both_before_the_capture(ckpt, cifar_dir, tmp_path):
    """--n 20 with the default --k 10: a bootstrap subsample of 20 images keeps as few as 10 distinct ones
    (seed 0), too few for 10 neighbours. It used to fail after the capture, naming no flag."""
    r = run_cli("analyze", ckpt, *fast(tmp_path, cifar_dir, n=20), "--bootstrap", 20, "--cache", tmp_path / "c",
                "--out", tmp_path / "rep")
    one_error_line(r, "--n 20 is too few for --k 10: a bootstrap subsample (--bootstrap 20) keeps as few as 10")
    assert "pass --n 21 or more, a smaller --k, or --bootstrap 0" in r.stderr
    assert not list(tmp_path.glob("c/**/*.npy")) and not (tmp_path / "rep").exists()      # nothing computed


def test_read_only_places_are_one_line(ckpt, training_ckpt, cifar_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        one_error_line(run_cli("analyze", ckpt, *fast(tmp_path, cifar_dir), "--cache", ro / "cache", "--out",
                               tmp_path / "rep"), "--cache")
        one_error_line(run_cli("export-repa", training_ckpt, ro / "x.pt"), "choose a writable folder")
    finally:
        ro.chmod(0o755)


def test_root_may_write_anywhere_so_read_only_is_checked_by_what_the_os_says(ckpt, training_ckpt, cifar_dir,
                                                                             tmp_path):
    """As root (CI) chmod does not stop writes; a path under a regular file cannot be created by anyone."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_error_line(run_cli("analyze", ckpt, *fast(tmp_path, cifar_dir), "--cache", blocker / "cache", "--out",
                           tmp_path / "rep"), "--cache")
    one_error_line(run_cli("export-repa", training_ckpt, blocker / "x.pt"), "choose a writable folder")


def test_nothing_to_measure_is_said_before_any_forward_pass(ckpt, cifar_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((cifar_dir / "test" / "cat").iterdir())[:20]:
        (flat / f.name).write_bytes(f.read_bytes())
    start = time.perf_counter()
    one_error_line(run_cli("analyze", ckpt, "--data", flat, "--n", 20, "--out", tmp_path / "rep",
                           "--cache", tmp_path / "c"), "nothing to measure")
    assert not (tmp_path / "c").exists() and time.perf_counter() - start < 60


def test_nan_checkpoint_and_hostile_encoder_weights_are_named(ckpt, cifar_dir, tmp_path):
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    sd = randomize_(SiT(cfg)).state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    nan = save_checkpoint(tmp_path / "nan.pt", cfg, sd, meta={"mode": "pixels"})
    one_error_line(run_cli("analyze", nan, *fast(tmp_path, cifar_dir), "--out", tmp_path / "rep"),
                   "nan.pt' has NaN or infinite weights ('blocks.1.mlp.fc1.weight'")

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    r = run_cli("analyze", ckpt, "--data", cifar_dir / "test", "--n", 40, "--encoder",
                f"vit_tiny_patch16_224={tmp_path / 'evil.pth'}", "--out", tmp_path / "rep")
    one_error_line(r, "its pickle would import")
    assert r.stderr.strip().endswith("torch.save(sd, new_path)") and not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- 7. skipped images are reported

def test_skipped_images_are_listed_and_n_is_what_was_used(ckpt, cifar_dir, tmp_path):
    data = tmp_path / "data"
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        for f in sorted((cifar_dir / "test" / c).iterdir())[:20]:
            (data / c / f.name).write_bytes(f.read_bytes())
    bad = data / "cat" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    r = run_cli("analyze", ckpt, "--data", data, "--n", 41, "--t", "0", "--encoder", ENCODER, "--encoder-random-init",
                "--bootstrap", 2, "--null", 2, "--skip-bad-images", "--quiet", "--cache", tmp_path / "c",
                "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    assert "broken.jpg" in r.stdout
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert any("broken.jpg" in note for note in summary["notes"]) and summary["images"]["alignment"] == 40
    page2 = PdfReader(tmp_path / "rep" / "report.pdf").pages[1].extract_text()
    assert "broken.jpg" in page2 and "n = 40" in page2


# --------------------------------------------------------------------------- 8. damaged files

def test_flipped_bytes_in_a_checkpoint_are_caught(ckpt, tmp_path):
    damaged = tmp_path / "damaged.pt"
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    damaged.write_bytes(bytes(data))
    one_error_line(run_cli("inspect", damaged), "damaged.pt")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(damaged)


def test_our_checksum_catches_weights_changed_after_saving(tmp_path):
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    path = save_checkpoint(tmp_path / "w.safetensors", cfg, randomize_(SiT(cfg)).state_dict())
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["blocks.0.attn.qkv.weight"][0, 0] += 1.0          # a consistent file whose weights were edited
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(UserError, match="do not match the checksum"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- leftovers and permissions

def test_leftovers_of_killed_runs_are_cleaned_and_live_ones_kept(ckpt, cifar_dir, tmp_path):
    from repa_probe.runtime import HOST
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "rep"
    stale_report = tmp_path / f".rep.partial-{HOST}-{dead.pid}-abc123"
    live_report = tmp_path / f".rep.partial-{HOST}-{os.getpid()}-def456"
    for d in (stale_report, live_report):
        d.mkdir()
    r = run_cli("analyze", ckpt, *fast(tmp_path, cifar_dir), "--cache", tmp_path / "c", "--out", out)
    assert r.returncode == 0, r.stderr
    assert not stale_report.exists() and live_report.exists()

    from test_train import tiny_flags
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale_ckpt = run / "checkpoints" / f".0000002.pt.{HOST}-{dead.pid}.xyz.tmp"
    stale_ckpt.write_bytes(b"half a checkpoint")
    r = run_cli("train", *tiny_flags(cifar_dir / "test", run), "--repa-coeff", "0", "--steps", 2, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert not stale_ckpt.exists()


def test_files_follow_the_umask_so_shared_caches_stay_shared(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib
        import repa_probe.runtime as runtime
        importlib.reload(runtime)                      # FILE_MODE is read from the umask at import
        runtime.atomic_write(tmp_path / "f", lambda tmp: Path(tmp).write_text("x"))
        assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    finally:
        os.umask(old)
        importlib.reload(runtime)
    atomic_write(tmp_path / "g", lambda tmp: Path(tmp).write_text("x"))
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) & 0o044      # readable by others under this umask too
