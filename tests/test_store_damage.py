"""Issue 30: damaged store files and full disks. A damaged, truncated or empty file of the feature store is
named in one line, moved aside and computed again, and the run's numbers are the undamaged run's to the bit;
a full disk under --cache, analyze --out or train --out is one line naming the folder, exit 2, nothing
half-written, and a rerun with room resumes exactly. A tiny SiT, real CIFAR-10 images, the real CLI."""
from __future__ import annotations

import errno
import json
import resource
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CIFAR, ONE_THREAD, randomize_, run_cli, tiny_config
from repa_probe.capture import CaptureConfig, extract, make_dataset
from repa_probe.checkpoints import UNTRAINED_INIT, read_checkpoint, save_checkpoint
from repa_probe.data import ImageDataset
from repa_probe.encoders import load_encoder
from repa_probe.models import SiT
from repa_probe.runtime import no_space
from repa_probe.store import MANIFEST, FeatureStore, encoder_features

TS, N, BATCH = (0.0, 0.5), 32, 8
CIFAR_TEST = CIFAR / "test"
ENCODER = "vit_tiny_patch16_224"     # random weights (--encoder-random-init)
ANALYZE = ["--data", CIFAR_TEST, "--n", 40, "--t", "0,0.5", "--encoder", ENCODER, "--encoder-random-init",
           "--bootstrap", 3, "--quiet"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory, cifar_dir) -> Path:
    """A tiny checkpoint, its features in a fresh store (`cache`), and its analysis (`report`, with the cache
    `analyzed`): the undamaged references."""
    d = tmp_path_factory.mktemp("store_damage")
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    save_checkpoint(d / "model.pt", cfg, randomize_(SiT(cfg)).state_dict(),
                    meta={"step": 1, "mode": "pixels", "convention": "repa"})
    features(d, d / "cache")
    r = run_cli("analyze", d / "model.pt", *ANALYZE, "--cache", d / "analyzed", "--out", d / "report", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def reference(work) -> dict[str, np.ndarray]:
    return features(work, work / "cache")[0]


def features(work: Path, cache: Path, data=None) -> tuple[dict[str, np.ndarray], int]:
    """(every array extract gives, chunks computed) for the tiny checkpoint, 32 CIFAR test images, t = 0, 0.5."""
    f = extract(work / "model.pt", data or make_dataset(CIFAR_TEST, 16, n=N), CaptureConfig(ts=TS), batch_size=BATCH,
                cache_dir=cache, quiet=True)
    return {"blocks": np.asarray(f.blocks), "raw": np.asarray(f.raw), "raw_pooled": np.asarray(f.raw_pooled),
            "labels": f.labels, "ids": f.ids}, f.computed


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def entry_of(cache: Path, kind: str = "blocks", trained: bool = False) -> Path:
    """The one entry of `kind` in `cache` (trained: the blocks entry of the checkpoint, not of its untrained
    baseline, whose weights name its init)."""
    entries = [p.parent for p in (cache / kind).glob(f"*/{MANIFEST}")]
    if trained:
        entries = [e for e in entries
                   if json.loads((e / MANIFEST).read_text())["fingerprint"]["model"]["weights"] != UNTRAINED_INIT]
    assert len(entries) == 1, entries
    return entries[0]


def flip(path: Path, start: int, size: int) -> None:
    data = bytearray(path.read_bytes())
    data[start:start + size] = bytes(b ^ 0xFF for b in data[start:start + size])
    path.write_bytes(data)


def truncate(path: Path, keep: float) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def warned(stderr: str, *paths: Path) -> None:
    """stderr is one line per path, naming it as damaged and moved aside; its damaged bytes are kept beside it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == len(paths), stderr
    for path in paths:
        line = next(line for line in lines if f"'{path}'" in line)
        assert line.startswith("repa-probe: warning: damaged cache file") and "moved aside" in line, stderr
        assert len(list(path.parent.glob(f"{path.name}.damaged-*"))) == 1


#################################################################################
#                                 Damaged files                                 #
#################################################################################

@pytest.mark.parametrize("file, damage", [
    ("t=0.5/blocks.npy", lambda p: flip(p, 8192, 4096)),
    ("t=0.5/blocks.npy", lambda p: truncate(p, 0.6)),
    ("t=0.5/blocks.npy", lambda p: truncate(p, 0)),
    (MANIFEST, lambda p: truncate(p, 0.5)),
    ("labels.npy", lambda p: flip(p, 200, 8)),
], ids=["4 KiB flipped", "truncated", "zero bytes", "truncated manifest", "labels flipped"])
def test_a_damaged_file_is_named_moved_aside_and_computed_again(work, reference, tmp_path, capfd, file, damage):
    shutil.copytree(work / "cache", tmp_path / "cache")
    path = entry_of(tmp_path / "cache") / file
    damage(path)
    repaired, computed = features(work, tmp_path / "cache")
    assert_same(repaired, reference)
    warned(capfd.readouterr().err, path)
    # only what the file held is computed again: one t's batches, both t's for the manifest, none for labels
    assert computed == {MANIFEST: 2 * N // BATCH, "labels.npy": 0}.get(file, N // BATCH)
    assert features(work, tmp_path / "cache")[1] == 0 and not capfd.readouterr().err   # repaired for good


def test_a_damaged_chunk_of_an_interrupted_run_is_computed_again_by_the_rerun(work, reference, tmp_path):
    """Chunks carry the zip CRC-32 of each array: an interrupted run leaves chunks, one is damaged inside its
    blocks (its positions still read), and the rerun (the real CLI) computes that batch again."""
    class Interrupted(ImageDataset):
        def __getitem__(self, i):
            if i >= N // 2:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    with pytest.raises(KeyboardInterrupt):
        features(work, tmp_path / "cache", Interrupted(CIFAR_TEST, 16, make_dataset(CIFAR_TEST, 16, n=N).ids))
    chunk = entry_of(tmp_path / "cache") / "t=0.5" / f"chunk-{BATCH:09d}-r0.npz"
    with zipfile.ZipFile(chunk) as z:
        flip(chunk, z.getinfo("blocks.npy").header_offset + 200, 1024)
    r = run_cli("extract", work / "model.pt", "--data", CIFAR_TEST, "--n", N, "--t", "0,0.5", "--batch-size", BATCH,
                "--cache", tmp_path / "cache", "--quiet", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    warned(r.stderr, chunk)
    assert f"computed {2 * N // BATCH - 3} chunk(s)" in r.stdout      # 4 of 8 were left, 1 of them damaged
    assert_same(features(work, tmp_path / "cache")[0], reference)


def test_encoder_features_damaged_on_disk_are_computed_again(tmp_path, cifar_dir, capfd):
    encoder = load_encoder(ENCODER, random_init=True)
    store, dataset = FeatureStore(tmp_path), make_dataset(cifar_dir / "test", 32, n=12)
    reference = np.array(encoder_features(store, encoder, dataset, grid=2, batch_size=8, quiet=True)["pooled"])
    pooled = entry_of(tmp_path, "encoder") / "all" / "pooled.npy"
    flip(pooled, 1024, 2048)
    again = encoder_features(store, encoder, dataset, grid=2, batch_size=8, quiet=True)
    assert np.array_equal(again["pooled"], reference) and again.computed == 2
    warned(capfd.readouterr().err, pooled)


def test_an_entry_of_store_version_1_is_adopted_and_its_truncated_array_computed_again(work, reference, tmp_path,
                                                                                      capfd):
    """Entries written before checksums keep serving: their arrays are checked for the size their shape needs
    (a truncated one is set aside and computed again) and get their checksums recorded."""
    shutil.copytree(work / "cache", tmp_path / "cache")
    entry = entry_of(tmp_path / "cache")
    manifest = json.loads((entry / MANIFEST).read_text())
    for record in (manifest, *(spec for part in manifest["parts"].values() for spec in part["arrays"].values())):
        for key in ("crc32", "files", "bytes"):
            record.pop(key, None)
    (entry / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    truncate(entry / "t=0" / "raw.npy", 0.9)
    capfd.readouterr()
    adopted, computed = features(work, tmp_path / "cache")
    assert_same(adopted, reference)
    warned(capfd.readouterr().err, entry / "t=0" / "raw.npy")
    assert computed == N // BATCH
    assert json.loads((entry / MANIFEST).read_text())["version"] == 2
    flip(entry / "t=0.5" / "raw.npy", 4096, 64)                          # now checksummed: found
    assert_same(features(work, tmp_path / "cache")[0], reference)
    warned(capfd.readouterr().err, entry / "t=0.5" / "raw.npy")


def test_analyze_on_a_damaged_cache_gives_the_undamaged_numbers(work, tmp_path):
    """The issue's case: 4 KiB flipped in the model's cached blocks.npy and 2 KiB in the encoder's pooled.npy
    moved probe accuracy and CKNNA silently. Now each is named once and results.csv is the undamaged one."""
    shutil.copytree(work / "analyzed", tmp_path / "cache")
    blocks = entry_of(tmp_path / "cache", trained=True) / "t=0.5" / "blocks.npy"
    pooled = entry_of(tmp_path / "cache", "encoder") / "all" / "pooled.npy"
    flip(blocks, 8192, 4096)
    flip(pooled, 4096, 2048)
    r = run_cli("analyze", work / "model.pt", *ANALYZE, "--cache", tmp_path / "cache", "--out", tmp_path / "report",
                env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "report" / "results.csv"),
                                  pd.read_csv(work / "report" / "results.csv"), check_exact=True)
    warned(r.stderr, blocks, pooled)


#################################################################################
#                                   Full disks                                  #
#################################################################################

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_a_quota_and_the_file_size_limit_are_the_same_line(code):
    error = OSError(code, "no room")
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    wrapped.__context__ = error                              # as torch's writer raises it
    for e in (error, wrapped):
        assert str(no_space("/x/out", e)) == ("the disk holding '/x/out' is full (no room): free space there or "
                                              "choose another folder, then run the command again (what was "
                                              "finished is kept)")
    assert no_space("/x/out", OSError(errno.EACCES, "denied")) is None


class FullDisk:
    """A folder that fills up, for the CLI's subprocesses: a tmpfs of `tmpfs` bytes (ENOSPC; needs the right to
    mount), or a file-size limit of `fsize` bytes for the child (EFBIG, RLIMIT_FSIZE; any user)."""

    def __init__(self, kind: str, folder: Path):
        self.kind, self.folder, self.limit = kind, folder, None

    def fill_at(self, tmpfs: str, fsize: int) -> Path:
        self.folder.mkdir()
        if self.kind == "tmpfs":
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs}", "tmpfs", str(self.folder)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the RLIMIT_FSIZE case still runs")
        else:
            self.limit = fsize
        return self.folder

    def run(self, *args) -> subprocess.CompletedProcess:
        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.limit))   # Python ignores SIGXFSZ
        return run_cli(*args, env=ONE_THREAD, preexec_fn=limit if self.limit else None)

    def make_room(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.folder)], check=True)
        self.limit = None

    def close(self) -> None:
        if self.kind == "tmpfs" and self.folder.is_mount():
            subprocess.run(["umount", "-l", str(self.folder)], check=True)


@pytest.fixture(params=["tmpfs", "RLIMIT_FSIZE"])
def disk(request, tmp_path):
    full = FullDisk(request.param, tmp_path / "disk")
    yield full
    full.close()


def one_error(r: subprocess.CompletedProcess, folder: Path) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"repa-probe: error: the disk holding '{folder}") and " is full (" in lines[0], r.stderr


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and partial folders: what a failed write must not leave."""
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or ".partial-" in p.name]


def test_a_full_cache_is_one_line_and_the_rerun_resumes_exactly(work, reference, disk):
    cache = disk.fill_at(tmpfs="150k", fsize=30_000) / "cache"     # tmpfs: chunks fill it; limit: the merged arrays
    args = ("extract", work / "model.pt", "--data", CIFAR_TEST, "--n", N, "--t", "0,0.5", "--batch-size", BATCH,
            "--cache", cache, "--quiet")
    one_error(disk.run(*args), cache)
    assert not leftovers(cache)
    done = len(list(cache.rglob("chunk-*.npz")))
    disk.make_room()
    resumed, computed = features(work, cache)
    assert computed == 2 * N // BATCH - done
    assert_same(resumed, reference)


def test_a_full_report_folder_is_one_line_and_leaves_no_partial_report(work, disk):
    """The features come from the cache (on another disk); the report does not fit."""
    out = disk.fill_at(tmpfs="40k", fsize=20_000) / "report"
    flags = [*ANALYZE[:4], "--t", "0", *ANALYZE[6:]]                   # t = 0 alone: cached, and a shorter report
    one_error(disk.run("analyze", work / "model.pt", *flags, "--cache", work / "analyzed", "--out", out), out)
    assert not leftovers(out.parent) and not (out / "report.pdf").exists()


def train(out: Path) -> list:
    """`train` of a tiny vanilla SiT for 4 steps, a checkpoint every 2."""
    return ["train", "--data", CIFAR_TEST, "--image-size", 16, "--model", "SiT-S/2", "--depth", 3, "--width", 64,
            "--heads", 4, "--batch", 8, "--steps", 4, "--ckpt-every", 2, "--log-every", 1, "--workers", 0,
            "--repa-coeff", 0, "--out", out, "--quiet"]


@pytest.fixture(scope="module")
def trained(work) -> Path:
    assert run_cli(*train(work / "trained"), env=ONE_THREAD).returncode == 0
    return work / "trained" / "checkpoints" / "0000004.pt"


def test_a_full_run_folder_is_one_line_and_training_resumes_exactly(trained, disk):
    size = trained.stat().st_size
    out = disk.fill_at(tmpfs=f"{size * 3 // 2 // 1024}k", fsize=size // 2) / "run"   # tmpfs: one checkpoint fits
    one_error(disk.run(*train(out)), out / "checkpoints")
    assert not leftovers(out)
    disk.make_room()
    r = disk.run(*train(out))
    assert r.returncode == 0, r.stderr
    last, reference = (read_checkpoint(path) for path in (out / "checkpoints" / "0000004.pt", trained))
    for part in ("model", "ema"):
        for k, v in reference[part].items():
            assert torch.equal(last[part][k], v), (part, k)
