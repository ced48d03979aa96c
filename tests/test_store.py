"""Feature store: atomic chunks merged into memmaps, resumable pending sets, keys, the [t, block, N, D]
reader, and encoder features cached once per encoder and data subset."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from repa_probe.capture import make_dataset
from repa_probe.runtime import HOST
from repa_probe.store import (Entry, FeatureStore, Stacked, cache_image_features, default_cache_dir, digest,
                              encoder_features, fill, read_features)

N, L, D = 7, 3, 5


def make_entry(tmp_path: Path, fingerprint=None) -> Entry:
    return FeatureStore(tmp_path).entry("blocks", fingerprint or {"model": "m", "data": "d"}, np.arange(N) % 2,
                                        np.arange(N) + 100, row_axes={"blocks": 1})


def chunk(positions, seed):
    rng = np.random.default_rng(seed)
    return {"blocks": rng.standard_normal((len(positions), L, D)).astype(np.float32),
            "raw": rng.standard_normal((len(positions), 4)).astype(np.float32),
            "raw_pooled": rng.standard_normal((len(positions), 3)).astype(np.float32)}


def test_chunks_merge_into_memmaps_with_the_image_axis_where_asked(tmp_path):
    entry = make_entry(tmp_path)
    first, second = np.arange(0, 4), np.arange(4, N)
    a, b = chunk(first, 0), chunk(second, 1)
    entry.write_chunk("t=0.5", first, a)
    assert np.array_equal(entry.pending("t=0.5"), second)
    assert not entry.merge("t=0.5")                                   # incomplete parts are left alone
    entry.write_chunk("t=0.5", second, b)
    assert entry.pending("t=0.5").size == 0 and entry.merge("t=0.5")
    blocks = entry.array("t=0.5", "blocks")
    assert isinstance(blocks, np.memmap) and blocks.shape == (L, N, D)
    assert np.array_equal(blocks, np.concatenate([a["blocks"], b["blocks"]]).transpose(1, 0, 2))
    assert np.array_equal(entry.array("t=0.5", "raw"), np.concatenate([a["raw"], b["raw"]]))
    assert not entry.chunk_files("t=0.5")
    reopened = Entry(entry.path)
    assert reopened.is_complete("t=0.5") and not reopened.is_complete("t=0")
    assert np.array_equal(reopened.ids, np.arange(N) + 100)


def test_chunks_in_any_order_and_a_half_written_file_are_handled(tmp_path):
    entry = make_entry(tmp_path)
    odd, even = np.arange(1, N, 2), np.arange(0, N, 2)
    a, b = chunk(odd, 0), chunk(even, 1)
    entry.write_chunk("t=0", odd, a)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                       # a writer killed mid-write: its pid is gone
    (entry.part_dir("t=0") / f".chunk-000000000-r0.npz.{HOST}-{dead.pid}.k1ll3d.tmp").write_bytes(b"killed")
    assert np.array_equal(entry.pending("t=0"), even)                 # the temp file counts for nothing
    entry.write_chunk("t=0", even, b)
    assert entry.merge("t=0")
    raw = np.empty((N, 4), np.float32)
    raw[odd], raw[even] = a["raw"], b["raw"]
    assert np.array_equal(entry.array("t=0", "raw"), raw)
    assert not list(entry.part_dir("t=0").glob(".chunk*"))


def test_overlapping_chunks_of_two_processes_merge_into_one_array(tmp_path):
    """Two processes with other batch sizes may both write rows 3–4; those rows are computed the same way by
    both (here: the same values), and the merged array holds every row once."""
    entry = make_entry(tmp_path)
    values = chunk(range(N), 0)
    entry.write_chunk("t=0", np.arange(0, 5), {k: v[:5] for k, v in values.items()})
    entry.write_chunk("t=0", np.arange(3, N), {k: v[3:] for k, v in values.items()})
    assert entry.merge("t=0")
    assert np.array_equal(entry.array("t=0", "raw"), values["raw"]) and not entry.chunk_files("t=0")


def test_entry_key_covers_every_fingerprint_field_in_any_order(tmp_path):
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})
    base = make_entry(tmp_path, {"model": "m", "data": "d", "seed": 0})
    assert make_entry(tmp_path, {"data": "d", "seed": 0, "model": "m"}).path == base.path
    assert make_entry(tmp_path, {"model": "m", "data": "d", "seed": 1}).path != base.path


def test_reader_gives_t_block_image_dim_from_per_t_memmaps(tmp_path):
    entry = make_entry(tmp_path)
    parts = {}
    for seed, part in enumerate(["t=0", "t=0.25"]):
        parts[part] = chunk(range(N), seed)
        entry.write_chunk(part, np.arange(N), parts[part])
        entry.merge(part)
    features = read_features(entry, [0.0, 0.25])
    expected = np.stack([parts[p]["blocks"].transpose(1, 0, 2) for p in ["t=0", "t=0.25"]])
    assert features.blocks.shape == (2, L, N, D) and features.raw.shape == (2, N, 4)
    assert features.raw_pooled.shape == (2, N, 3)
    assert np.array_equal(np.asarray(features.blocks), expected)
    assert np.array_equal(features.blocks[1, 2], expected[1, 2])
    assert np.array_equal(features.blocks[:, 2], expected[:, 2])
    assert np.array_equal(features.blocks[[1, 0], 0, :3], expected[[1, 0], 0, :3])
    assert np.array_equal(features.labels, np.arange(N) % 2)
    with pytest.raises(KeyError, match="t=0.5"):
        read_features(entry, [0.5])
    assert isinstance(features.blocks, Stacked)


def test_image_features_of_a_timm_vit_are_computed_once_per_data_subset(tmp_path, cifar_dir):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4).eval()
    store = FeatureStore(tmp_path)

    def pooled(images, ids=None):
        with torch.no_grad():
            return {"pooled": vit.forward_features(images.float() / 255)[:, 1:].mean(1)}

    dataset = make_dataset(cifar_dir / "test", 32, n=6)
    first = cache_image_features(store, "encoder", {"encoder": "vit-tiny-random"}, dataset, pooled, batch_size=4)
    images = torch.stack([dataset[i][0] for i in range(6)])
    assert first.computed == 2 and first["pooled"].shape == (6, 192)
    torch.testing.assert_close(torch.from_numpy(np.array(first["pooled"])), pooled(images)["pooled"])
    again = cache_image_features(store, "encoder", {"encoder": "vit-tiny-random"}, dataset, pooled, batch_size=4)
    assert again.computed == 0 and again.path == first.path
    other = cache_image_features(store, "encoder", {"encoder": "vit-tiny-random"}, make_dataset(
        cifar_dir / "test", 32, n=8), pooled, batch_size=4)
    assert other.computed == 2 and other.path != first.path


def test_encoder_features_are_cached_by_encoder_fingerprint_and_grid(tmp_path, cifar_dir):
    encoders = pytest.importorskip("repa_probe.encoders")
    encoder = encoders.load_encoder("vit_tiny_patch16_224", random_init=True)
    store, dataset = FeatureStore(tmp_path), make_dataset(cifar_dir / "test", 32, n=5)
    feats = encoder_features(store, encoder, dataset, grid=2, tokens=True, batch_size=4)
    tokens, pooled = encoder.encode(torch.stack([dataset[i][0] for i in range(5)]).float() / 255, 2)
    torch.testing.assert_close(torch.from_numpy(np.array(feats["pooled"])), pooled)
    torch.testing.assert_close(torch.from_numpy(np.array(feats["tokens"])), tokens)
    assert encoder_features(store, encoder, dataset, grid=2, tokens=True).computed == 0
    assert encoder_features(store, encoder, dataset, grid=4).computed > 0


def test_default_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "repa-probe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "repa-probe"


def test_a_failed_chunk_write_is_raised_by_fill_leaves_no_chunk_or_claim_and_a_rerun_completes(tmp_path, cifar_dir):
    """Chunks are written on a background thread: its error must stop fill in the caller's thread, mark
    nothing done and release every claim, so that the next run computes exactly what is missing."""
    dataset = make_dataset(cifar_dir / "test", 32, n=10)
    entry = FeatureStore(tmp_path).entry("blocks", {"model": "m"}, dataset.labels, dataset.ids)
    def compute(x, labels, ids, part):
        return {"mean": x.float().mean(dim=(2, 3)).numpy()}

    entry.part_dir("t=0.5").write_text("a file where the part's folder goes")   # every chunk write fails
    with pytest.raises(FileExistsError):
        fill(entry, ["t=0", "t=0.5"], dataset, compute, batch_size=4, quiet=True)
    assert not list((entry.path / "claims").iterdir())
    assert len(entry.pending("t=0.5")) == 10                                  # nothing of the failed part is done
    missing_t0 = len(set(entry.pending("t=0") // 4))                          # batches of t=0 not written either
    entry.part_dir("t=0.5").unlink()
    assert fill(entry, ["t=0", "t=0.5"], dataset, compute, batch_size=4, quiet=True) == 3 + missing_t0
    images = torch.stack([dataset[i][0] for i in range(10)]).float()
    for part in ("t=0", "t=0.5"):
        assert np.array_equal(entry.array(part, "mean"), images.mean(dim=(2, 3)).numpy())
    assert fill(entry, ["t=0", "t=0.5"], dataset, compute, batch_size=4, quiet=True) == 0
