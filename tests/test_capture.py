"""Capture: hooks equal a hand-written forward loop, seeded noise shared across checkpoints, resumable and
distributed extraction into the store, real CIFAR-10 end to end, no stale cache hits, latent models."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, randomize_, run_cli, tiny_config
from repa_probe.capture import CaptureConfig, capture_blocks, extract, make_dataset
from repa_probe.checkpoints import save_checkpoint
from repa_probe.families import load_checkpoint
from repa_probe.families.sit import as_checkpoint
from repa_probe.data import load_vae, to_model_space
from repa_probe.errors import UserError
from repa_probe.models import SiT
from repa_probe.noise import get_convention, seeded_noise
from repa_probe.store import Entry
from test_data import needs_diffusers, save_tiny_vae, small_tree


def save_tiny_checkpoint(path: Path, seed: int = 0, mode: str = "pixels", **overrides) -> Path:
    model = randomize_(SiT(tiny_config(**{"input_size": 32, **overrides})), seed=seed)
    return save_checkpoint(path, model.config, model.state_dict(), meta={"mode": mode})


def hand_forward(model, convention, x0, ids, t, seed):
    """The capture written out: seeded ε, the convention's input, embed, each block, mean over tokens."""
    noise = seeded_noise(ids, tuple(x0.shape[1:]), seed, salt=int(round(t * 1e6)))
    t_vec = torch.full((len(x0),), t)
    x_t = convention.model_input(x0, t_vec, noise)
    y = torch.full((len(x0),), model.config.num_classes)
    with torch.no_grad():
        h, c = model.embed(x_t, convention.timestep(t_vec), y)
        outputs = [h]
        for block in model.blocks:
            h = block(h, c)
            outputs.append(h)
    return x_t, outputs


def input_recorder(model):
    """A pre-hook on the patch embedding: records every input the model is fed."""
    seen = []
    handle = model.x_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    return seen, handle


@pytest.mark.parametrize("convention", ["repa", "dit"])
def test_hooks_equal_a_hand_written_forward_loop_bit_for_bit(convention):
    model = randomize_(SiT(tiny_config())).eval()
    conv = get_convention(convention)
    x0, ids = torch.randn(5, 3, 16, 16), torch.tensor([3, 9, 4, 100, 7])
    captured = {p: capture_blocks(as_checkpoint(model, conv.name), x0, None, ids, [0.0, 0.6], seed=4, pooling=p)
                for p in ("mean", "tokens", "grid:2")}
    assert captured["mean"].shape == (2, 4, 5, 64)               # [t, block 0..3, image, dim]
    assert captured["tokens"].shape == (2, 4, 5, 64, 64)
    assert captured["grid:2"].shape == (2, 4, 5, 64 * 4)
    for ti, t in enumerate([0.0, 0.6]):
        _, outputs = hand_forward(model, conv, x0, ids, t, seed=4)
        for b, h in enumerate(outputs):
            assert torch.equal(captured["mean"][ti, b], h.mean(dim=1))
            assert torch.equal(captured["tokens"][ti, b], h)
            quadrants = h.reshape(5, 2, 4, 2, 4, 64).mean(dim=(2, 4))        # (N, 2, 2, D): 4×4 tokens each
            torch.testing.assert_close(captured["grid:2"][ti, b], quadrants.permute(0, 3, 1, 2).flatten(1))
    picked = capture_blocks(as_checkpoint(model, conv.name), x0, None, ids, [0.6], seed=4, blocks=[3, 0])
    assert torch.equal(picked[0], captured["mean"][1, [3, 0]])


def test_same_seed_gives_identical_features_and_every_checkpoint_the_same_noisy_inputs():
    a, b = (randomize_(SiT(tiny_config()), seed=s).eval() for s in (0, 1))
    conv = get_convention("repa")
    x0, ids = torch.randn(6, 3, 16, 16), torch.arange(10, 16)
    seen_a, ha = input_recorder(a)
    seen_b, hb = input_recorder(b)
    fa = capture_blocks(as_checkpoint(a, conv.name), x0, None, ids, [0.5], seed=7)
    fb = capture_blocks(as_checkpoint(b, conv.name), x0, None, ids, [0.5], seed=7, batch_size=4)   # other batching too
    ha.remove(), hb.remove()
    assert torch.equal(seen_a[0], torch.cat(seen_b))                 # the same x_t, whatever the batches
    assert not torch.equal(fa, fb)                                    # but other weights, other features
    assert torch.equal(fa, capture_blocks(as_checkpoint(a, conv.name), x0, None, ids, [0.5], seed=7))
    assert not torch.equal(fa, capture_blocks(as_checkpoint(a, conv.name), x0, None, ids, [0.5], seed=8))
    x_t, _ = hand_forward(a, conv, x0, ids, 0.5, seed=7)
    assert torch.equal(seen_a[0], x_t)


def test_hooks_are_removed_and_mode_restored_after_an_exception_mid_capture():
    model = randomize_(SiT(tiny_config())).train()

    def explode(module, args, out):
        raise RuntimeError("boom in block 2")

    mine = model.blocks[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        capture_blocks(as_checkpoint(model, "repa"), torch.randn(2, 3, 16, 16), None, torch.arange(2), [0.5], seed=0)
    assert model.training
    assert len(model.blocks[0]._forward_pre_hooks) == 0
    assert [len(b._forward_hooks) for b in model.blocks] == [0, 1, 0]   # only our own hook is left
    mine.remove()


def test_real_cifar_images_flow_end_to_end_into_the_store(tmp_path, cifar_dir):
    ckpt_path = save_tiny_checkpoint(tmp_path / "tiny.pt")
    r = run_cli("extract", ckpt_path, "--data", cifar_dir / "test", "--n", 20, "--t", "0,0.5", "--batch-size", 8,
                "--cache", tmp_path / "cache", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "computed 6 chunk(s)" in r.stdout                          # 3 batches × 2 t
    entry = Entry(Path(re.search(r"features: (\S+)", r.stdout).group(1)))
    ckpt = load_checkpoint(ckpt_path)
    dataset = make_dataset(cifar_dir / "test", 32, n=20)
    assert np.array_equal(entry.ids, dataset.ids) and np.array_equal(entry.labels, dataset.labels)
    x0 = to_model_space(torch.stack([dataset[i][0] for i in range(20)]), "pixels")
    expected = capture_blocks(ckpt, x0, None, torch.from_numpy(dataset.ids), [0.0, 0.5],
                              seed=0, batch_size=8)
    for ti, part in enumerate(["t=0", "t=0.5"]):
        blocks = entry.array(part, "blocks")
        assert blocks.shape == (4, 20, 64)
        torch.testing.assert_close(torch.from_numpy(np.array(blocks)), expected[ti], rtol=1e-5, atol=1e-6)
        assert entry.array(part, "raw").shape == (20, 3 * 16 * 16)


def test_raw_baseline_is_the_model_input_pooled_per_patch(tmp_path, cifar_dir):
    ckpt = load_checkpoint(save_tiny_checkpoint(tmp_path / "tiny.pt"))
    features = extract(ckpt, cifar_dir / "test", CaptureConfig(ts=(0.5,)), n=4, cache_dir=tmp_path / "c", quiet=True)
    seen, handle = input_recorder(ckpt.model)
    dataset = make_dataset(cifar_dir / "test", 32, n=4)
    x0 = to_model_space(torch.stack([dataset[i][0] for i in range(4)]), "pixels")
    capture_blocks(ckpt, x0, None, torch.from_numpy(dataset.ids), [0.5], seed=0)
    handle.remove()
    patches = seen[0].reshape(4, 3, 16, 2, 16, 2).mean(dim=(3, 5)).flatten(1)   # (N, C·16·16)
    torch.testing.assert_close(torch.from_numpy(np.array(features.raw[0])), patches)


def wait_for(predicate, proc, timeout=240.0):
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"extraction ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() - start < timeout, "no chunk was written in time"
        time.sleep(0.005)


def test_killed_extraction_resumes_without_recomputing_and_matches_an_uninterrupted_run(tmp_path, cifar_dir):
    # wide enough that a chunk takes a noticeable time, so the kill lands mid-way
    ckpt_path = save_tiny_checkpoint(tmp_path / "wide.pt", hidden_size=128, depth=4, num_heads=4)
    cache = tmp_path / "cache"
    args = ["extract", str(ckpt_path), "--data", str(cifar_dir / "test"), "--n", "32", "--t", "0,0.5",
            "--batch-size", "4", "--cache", str(cache), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "repa_probe", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    chunks = lambda: list(cache.glob("blocks/*/t=*/chunk-*.npz"))
    try:
        wait_for(lambda: len(chunks()) >= 1, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(chunks())
    assert 1 <= done_before < 16
    assert not list(cache.glob("blocks/*/t=*/*.npy"))                 # nothing merged yet

    try:
        r = run_cli(*args, timeout=300)
    except subprocess.TimeoutExpired:
        left = {c.name: (c.read_text(), round(time.time() - c.stat().st_mtime))
                for c in cache.glob("blocks/*/claims/*")}
        pytest.fail(f"the resumed extraction did not end; claims (text, age in s) left by the killed one: {left}")
    assert r.returncode == 0, r.stderr
    computed = int(re.search(r"computed (\d+) chunk", r.stdout).group(1))
    assert computed == 16 - done_before                               # 8 batches × 2 t, minus what survived
    resumed = Entry(Path(re.search(r"features: (\S+)", r.stdout).group(1)))
    assert not chunks() and not list(cache.glob("blocks/*/t=*/.chunk*"))

    whole = extract(load_checkpoint(ckpt_path), cifar_dir / "test", CaptureConfig(ts=(0.0, 0.5)), n=32,
                    batch_size=4, cache_dir=tmp_path / "other", quiet=True)
    assert whole.computed == 16
    for ti, part in enumerate(["t=0", "t=0.5"]):
        np.testing.assert_allclose(resumed.array(part, "blocks"), whole.blocks[ti], rtol=1e-5, atol=1e-6)


def test_torchrun_two_processes_give_the_same_features_as_one(tmp_path, cifar_dir):
    ckpt_path = save_tiny_checkpoint(tmp_path / "tiny.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "repa_probe",
           "extract", str(ckpt_path), "--data", str(cifar_dir / "test"), "--num-images", "24", "--t", "0,0.25",
           "--batch-size", "4", "--cache", str(tmp_path / "cache"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"features: ", r.stdout)) == 1              # rank 0 alone reports (and merges)
    assert "computed 12 chunk(s)" in r.stdout                        # 6 batches × 2 t over both ranks
    entry = Entry(Path(re.search(r"features: (\S+)", r.stdout).group(1)))
    for part in ("t=0", "t=0.25"):
        assert entry.manifest["parts"][part]["ranks"] == [0, 1]      # both ranks computed chunks

    single = extract(load_checkpoint(ckpt_path), cifar_dir / "test", CaptureConfig(ts=(0.0, 0.25)), n=24,
                     batch_size=4, cache_dir=tmp_path / "single", quiet=True)
    for ti, part in enumerate(["t=0", "t=0.25"]):
        np.testing.assert_allclose(entry.array(part, "blocks"), single.blocks[ti], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(entry.array(part, "raw"), single.raw[ti])


def test_stale_cache_is_recomputed_never_served(tmp_path, cifar_dir):
    ckpt_path = save_tiny_checkpoint(tmp_path / "tiny.pt", seed=0)
    cache = tmp_path / "cache"

    def run(ts=(0.0,), seed=0, n=8, **kw):
        return extract(load_checkpoint(ckpt_path), cifar_dir / "test", CaptureConfig(ts=ts, seed=seed, **kw), n=n,
                       batch_size=4, cache_dir=cache, quiet=True)

    first = run()
    assert first.computed == 2
    again = run()
    assert again.computed == 0 and np.array_equal(again.blocks[0], first.blocks[0])
    more_t = run(ts=(0.0, 0.5))
    assert more_t.computed == 2                                       # only the new t
    assert more_t.path == first.path and np.array_equal(more_t.blocks[0], first.blocks[0])
    for changed in (run(seed=1), run(ts=(0.1,)), run(n=12), run(pooling="grid:2")):
        assert changed.computed > 0
    assert not np.array_equal(run(ts=(0.5,), seed=1).blocks[0], more_t.blocks[1])   # other noise (t=0 has none)
    save_tiny_checkpoint(ckpt_path, seed=1)                           # new weights, same file name
    new_weights = run()
    assert new_weights.computed == 2 and new_weights.path != first.path
    assert not np.array_equal(new_weights.blocks[0], first.blocks[0])


def test_unreadable_image_stops_extract_with_one_line_or_is_skipped(tmp_path, cifar_dir):
    root = small_tree(cifar_dir / "test", tmp_path / "data")
    bad = sorted((root / "cat").iterdir())[0]
    bad.write_bytes(b"\x00garbage" * 7)
    ckpt_path = save_tiny_checkpoint(tmp_path / "tiny.pt")
    r = run_cli("extract", ckpt_path, "--data", root, "--t", "0", "--batch-size", 2, "--workers", 1,
                "--cache", tmp_path / "cache", "--quiet")
    assert r.returncode == 2
    assert r.stderr.startswith("repa-probe: error: cannot read image") and str(bad) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    features = extract(load_checkpoint(ckpt_path), root, CaptureConfig(ts=(0.0,)), skip_bad=True,
                       cache_dir=tmp_path / "cache", quiet=True)
    assert features.manifest["skipped_images"] == [str(bad)]
    assert features.blocks.shape == (1, 4, 5, 64)


@needs_diffusers
def test_latent_model_captures_from_cached_vae_latents(tmp_path, cifar_dir):
    vae_dir = save_tiny_vae(tmp_path / "vae")
    ckpt = load_checkpoint(save_tiny_checkpoint(tmp_path / "latent.pt", mode="latents", in_channels=4,
                                                input_size=8))
    cache = tmp_path / "cache"
    features = extract(ckpt, cifar_dir / "test", CaptureConfig(ts=(0.25,)), n=6, vae=str(vae_dir), batch_size=4,
                       cache_dir=cache, quiet=True)
    [latents_file] = cache.glob("latents/*/all/latents.npy")
    latents = torch.from_numpy(np.load(latents_file))
    dataset = make_dataset(cifar_dir / "test", 64, n=6)                # latent models see 8·input_size pixels
    images = torch.stack([dataset[i][0] for i in range(6)])
    torch.testing.assert_close(latents, to_model_space(images, "latents", load_vae(vae_dir)), rtol=1e-5, atol=1e-6)
    expected = capture_blocks(ckpt, latents, None, torch.from_numpy(dataset.ids), [0.25],
                              seed=0, batch_size=4)
    torch.testing.assert_close(torch.from_numpy(np.asarray(features.blocks)), expected)
    stamp = latents_file.stat().st_mtime_ns
    extract(ckpt, cifar_dir / "test", CaptureConfig(ts=(0.5,)), n=6, vae=str(vae_dir), batch_size=4,
            cache_dir=cache, quiet=True)
    assert latents_file.stat().st_mtime_ns == stamp                   # latents came from the cache
    with pytest.raises(UserError, match="--vae"):
        extract(ckpt, cifar_dir / "test", n=6, vae=str(tmp_path / "no-vae"), cache_dir=cache, quiet=True)


def test_float16_overflow_found_on_the_writer_thread_stops_extract_with_one_line_and_stores_nothing(tmp_path,
                                                                                                  cifar_dir):
    """The float16 range check runs where the chunk is written (a background thread): its UserError must
    still reach the caller, and no chunk of the overflowing batch may be stored."""
    ckpt = as_checkpoint(randomize_(SiT(tiny_config(input_size=32)), std=3.0))   # block outputs reach ~1e11
    config = CaptureConfig(ts=(0.5,), dtype="float16")
    with pytest.raises(UserError, match="float16 range"):
        extract(ckpt, cifar_dir / "test", config, n=8, batch_size=4, cache_dir=tmp_path / "c", quiet=True)
    entry_dirs = list((tmp_path / "c" / "blocks").iterdir())
    assert len(entry_dirs) == 1
    entry = Entry(entry_dirs[0])
    assert len(entry.pending("t=0.5")) == 8 and not list((entry.path / "claims").iterdir())


def test_compiled_blocks_give_the_eager_features_cached_apart_and_the_model_back_unchanged(tmp_path, cifar_dir):
    ckpt = load_checkpoint(save_tiny_checkpoint(tmp_path / "tiny.pt", input_size=32))
    eager = extract(ckpt, cifar_dir / "test", CaptureConfig(ts=(0.5,)), n=8, batch_size=8, cache_dir=tmp_path / "c",
                    quiet=True)
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = extract(ckpt, cifar_dir / "test", CaptureConfig(ts=(0.5,), compile=True), n=8, batch_size=8,
                       cache_dir=tmp_path / "c", quiet=True)
    assert counters["stats"]["unique_graphs"] >= 1                               # dynamo really compiled
    assert compiled.computed == 1 and compiled.path != eager.path                # its own cache entry
    torch.testing.assert_close(torch.from_numpy(np.asarray(compiled.blocks)), torch.from_numpy(np.asarray(eager.blocks)),
                               rtol=1e-4, atol=1e-5)
    assert np.array_equal(np.asarray(compiled.raw), np.asarray(eager.raw))       # the input side is not compiled
    assert all("forward" not in b.__dict__ for b in ckpt.model.blocks)           # the blocks' own forward is back


def test_compile_without_a_working_cxx_compiler_is_one_clear_line(tmp_path, cifar_dir):
    ckpt_path = save_tiny_checkpoint(tmp_path / "tiny.pt", input_size=32)
    r = run_cli("extract", ckpt_path, "--data", cifar_dir / "test", "--n", 8, "--t", "0.5", "--batch-size", 8,
                "--cache", tmp_path / "cache", "--compile", "--quiet",
                env={"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert r.returncode != 0
    assert "--compile: torch.compile cannot compile here" in r.stderr and "run without --compile" in r.stderr
    assert "Traceback" not in r.stderr
