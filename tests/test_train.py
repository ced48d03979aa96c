"""The bundled trainer on real CIFAR-10 images: tiny SiTs, a tiny random timm ViT as REPA's teacher,
real subprocesses (SIGKILL + resume), real torchrun on gloo."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pypdf import PdfReader

from conftest import ONE_THREAD, REPO, run_cli
from repa_probe.checkpoints import read_checkpoint
from repa_probe.families import load_checkpoint
from repa_probe.data import ImageDataset
from repa_probe.encoders import load_encoder
from repa_probe.models import ModelConfig
from repa_probe.train.loss import training_loss
from repa_probe.train.trainer import (ResumableShardSampler, TrainConfig, draw_step_randomness, init_model,
                                      sit_sha256, train)

STEPS = 30
ENCODER = "test_vit"   # timm's 6-block width-64 ViT/16, random weights (explicitly flagged)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_flags(data: Path, out: Path, **overrides) -> list[str]:
    """CLI flags of a 3-block width-64 SiT/2 on 16×16 CIFAR pixels (64 tokens)."""
    flags = {"--data": data, "--image-size": 16, "--model": "SiT-S/2", "--depth": 3, "--width": 64, "--heads": 4,
             "--projector-dim": 64, "--batch": 16, "--lr": 1e-3, "--ema-decay": 0.9, "--workers": 0, "--log-every": 5,
             "--out": out, **overrides}
    args = [str(a) for kv in flags.items() for a in kv if a is not None]
    return args + ["--qk-norm", "--quiet"]


def repa_flags(coeff: float = 0.5) -> list[str]:
    return ["--encoder", ENCODER, "--encoder-random-init", "--repa-depth", "1", "--repa-coeff", str(coeff)]


def tiny_config(data: Path, out: Path, repa_coeff: float, **overrides) -> TrainConfig:
    cfg = dict(data=str(data), image_size=16, model="SiT-S/2", depth=3, width=64, heads=4, qk_norm=True,
               projector_dim=64, encoders=[ENCODER], encoder_random_init=True, repa_depth=1, repa_coeff=repa_coeff,
               batch=16, steps=STEPS, lr=1e-3, ema_decay=0.9, num_workers=0, log_every=5, ckpt_every=STEPS,
               out=str(out), progress=False)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def analysis(**knobs) -> "AnalyzeConfig":
    """The in-training analysis's config: its defaults (TrainConfig().analysis) with these knobs."""
    return dataclasses.replace(TrainConfig().analysis, **knobs)


def log_rows(run: Path, event: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def training_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint's model, EMA and optimizer state, by a flat name."""
    obj = read_checkpoint(path)
    out = {f"model.{k}": v for k, v in obj["model"].items()}
    out.update({f"ema.{k}": v for k, v in obj["ema"].items()})
    for i, state in obj["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in state.items()})
    return out


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    """A vanilla and a REPA run, identical but for --repa-coeff (in-process: the library function)."""
    root = tmp_path_factory.mktemp("runs")
    data = cifar_dir / "test"
    paths = {}
    for name, coeff, extra in (("vanilla", 0.0, {}), ("repa", 0.5, {}),
                               ("irepa", 0.5, dict(projector="conv", spatial_norm="zscore"))):
        paths[name] = train(tiny_config(data, root / name, coeff, **extra))
    return {name: path.parents[1] for name, path in paths.items()} | {"data": data}


def test_tiny_vanilla_and_repa_runs_train_and_checkpoints_load(runs):
    for name in ("vanilla", "repa"):
        rows = log_rows(runs[name])
        assert [r["step"] for r in rows] == [1, 5, 10, 15, 20, 25, 30]
        assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_denoise"], r["grad_norm"]])).all() for r in rows)
        ckpt = load_checkpoint(runs[name] / "checkpoints" / f"{STEPS:07d}.pt")
        assert ckpt.provenance.format == "repa-probe" and ckpt.provenance.step == STEPS
        assert ckpt.meta["mode"] == "pixels" and ckpt.meta["image_size"] == 16 and ckpt.config.num_classes == 10
    repa = log_rows(runs["repa"])
    assert repa[-1]["loss_repa"] < repa[0]["loss_repa"] - 0.2          # the alignment term is being learnt
    assert all(r["loss_repa"] == 0 for r in log_rows(runs["vanilla"]))
    vanilla = load_checkpoint(runs["vanilla"] / "checkpoints" / f"{STEPS:07d}.pt")
    aligned = load_checkpoint(runs["repa"] / "checkpoints" / f"{STEPS:07d}.pt")
    assert vanilla.config.z_dims == [] and vanilla.provenance.repa_coeff == 0.0
    assert aligned.config.z_dims == [64] and aligned.provenance.encoders == [ENCODER]
    assert aligned.meta["repa_depth"] == 1 and aligned.provenance.repa_coeff == 0.5


def test_vanilla_and_repa_runs_see_identical_inputs_and_sit_init(runs):
    vanilla, repa, irepa = (log_rows(runs[name]) for name in ("vanilla", "repa", "irepa"))
    assert [r["inputs_sha256"] for r in vanilla] == [r["inputs_sha256"] for r in repa] == \
        [r["inputs_sha256"] for r in irepa]                                            # ids, t, ε, label drop
    init = {name: log_rows(runs[name], "start")[0]["sit_init_sha256"] for name in ("vanilla", "repa", "irepa")}
    assert init["vanilla"] == init["repa"] == init["irepa"]
    assert irepa[-1]["loss_repa"] < irepa[0]["loss_repa"] - 0.2
    conv = load_checkpoint(runs["irepa"] / "checkpoints" / f"{STEPS:07d}.pt")
    assert (conv.config.projector, conv.config.projector_kernel, conv.config.z_dims) == ("conv", 3, [64])
    config = ModelConfig.from_dict(read_checkpoint(runs["repa"] / "checkpoints" / f"{STEPS:07d}.pt")["config"])
    assert sit_sha256(init_model(config, seed=0)) == init["repa"]      # recomputed from scratch
    assert sit_sha256(init_model(config, seed=1)) != init["repa"]


@pytest.mark.parametrize("name", ["repa", "irepa"])
def test_first_logged_loss_equals_hand_computation_on_the_first_batch(runs, name):
    """Step 1's logged loss is the initial model's loss on batch 1: recompute it here from the images. For
    iREPA the projection is a 3×3 convolution of block 1's tokens laid out on their 8×8 grid, and the
    teacher's tokens are z-scored over each image's tokens with α = 0.6 (iREPA's spatial normalisation)."""
    path = runs[name] / "checkpoints" / f"{STEPS:07d}.pt"
    config = ModelConfig.from_dict(read_checkpoint(path)["config"])
    dataset = ImageDataset(runs["data"], 16)
    ids = ResumableShardSampler(len(dataset), 16, 0, 1, seed=0, start_step=0, total_steps=1).global_batch_indices(0)
    images = torch.stack([dataset[i][0] for i in ids.tolist()])
    labels = torch.tensor([dataset[i][1] for i in ids.tolist()])
    t, noise, drop = draw_step_randomness(torch.Generator(), 0, 0, 16, (3, 16, 16), "uniform", 0.1)
    y = torch.where(drop, 10, labels)
    x = images.float() / 127.5 - 1
    tokens = load_encoder(ENCODER, random_init=True).encode(images.float() / 255, grid=8)[0]     # (16, 64, 64)

    model = init_model(config, seed=0).train()
    with torch.no_grad():
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        out, (z,) = model(x_t, t, y, return_zs=True)
        if name == "irepa":
            assert config.projector == "conv" and config.projector_kernel == 3
            h, c = model.embed(x_t, t, y)
            grid = model.blocks[0](h, c).reshape(16, 8, 8, 64).permute(0, 3, 1, 2)      # row-major token grid
            conv = model.projectors[0].conv
            z_hand = F.conv2d(grid, conv.weight, conv.bias, padding=1).permute(0, 2, 3, 1).reshape(16, 64, -1)
            torch.testing.assert_close(z, z_hand, rtol=1e-5, atol=1e-6)
            tokens = (tokens - 0.6 * tokens.mean(1, keepdim=True)) / (tokens.std(1, keepdim=True) + 1e-6)
        mse = ((out - (noise - x)) ** 2).mean()
        cos = (z * tokens).sum(-1) / (z.norm(dim=-1) * tokens.norm(dim=-1))
        expected = mse - 0.5 * cos.mean()
        loss, parts = training_loss(model, x, y, t, noise, [tokens], 0.5)
        align = parts["repa"]
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(align, -cos.mean(), atol=1e-6)
    first = log_rows(runs[name])[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert first["loss_denoise"] == pytest.approx(mse.item(), abs=1e-5)


def test_label_dropout_feeds_the_null_class(runs):
    """At init adaLN-Zero hides the labels (step 1's loss cannot see them); afterwards only the rows of
    labels actually fed get gradients, so the null row (10) moves iff dropped labels reach the model."""
    obj = read_checkpoint(runs["repa"] / "checkpoints" / f"{STEPS:07d}.pt")
    init = init_model(ModelConfig.from_dict(obj["config"]), seed=0).state_dict()
    key = "y_embedder.embedding_table.weight"
    moved = (obj["model"][key] != init[key]).any(dim=1)
    assert moved[10] and moved[:10].all()


def test_repa_loss_is_minus_cosine_averaged_over_tokens_samples_and_encoders():
    config = ModelConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                         num_classes=4, z_dims=[8, 16], projector_dim=24, encoder_depth=1)
    model = init_model(config, seed=3)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t, y = torch.rand(4, generator=g), torch.tensor([0, 1, 2, 4])
    targets = [torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 16, generator=g) + 0.5]
    _, zs = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t, y, return_zs=True)
    cosines = [F.cosine_similarity(z.double(), tgt.double(), dim=-1).mean() for z, tgt in zip(zs, targets)]
    align = training_loss(model, x, y, t, noise, targets, 1.0)[1]["repa"]
    assert align.item() == pytest.approx(-(cosines[0] + cosines[1]).item() / 2, abs=1e-5)


def test_resume_after_sigkill_is_bitwise_identical(cifar_dir, tmp_path):
    data = cifar_dir / "test"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = repa_flags() + ["--ckpt-every", "6"]
    result = run_cli("train", *tiny_flags(data, straight, **{"--steps": 12}), *common, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr

    proc = subprocess.Popen([sys.executable, "-m", "repa_probe", "train",
                             *tiny_flags(data, killed, **{"--steps": 100_000}), *common],
                            cwd=REPO, env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    half = killed / "checkpoints" / f"{6:07d}.pt"
    deadline = time.time() + 300
    while not half.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint at step 6 after 300 s"
        time.sleep(0.05)
    assert proc.poll() is None                       # still training when killed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    result = run_cli("train", *tiny_flags(data, killed, **{"--steps": 12, "--resume": half}), *common, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr

    a, b = (training_state(run / "checkpoints" / f"{12:07d}.pt") for run in (straight, killed))
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ after resume, e.g. {unequal[:3]}"
    assert [r["step"] for r in log_rows(straight)] == [1, 5, 10, 12]
    assert [r["step"] for r in log_rows(killed)] == [1, 5, 7, 10, 12]   # the killed run's rows past 6 are gone
    assert log_rows(killed)[-1]["loss"] == log_rows(straight)[-1]["loss"]   # both average steps 11 and 12


def test_torchrun_two_processes_match_one_process(cifar_dir, tmp_path):
    data = cifar_dir / "test"
    one, two = tmp_path / "one", tmp_path / "two"
    # REPA switched off after step 2 (DDP goes on without the projectors) and SRA composed with it (a head used
    # outside DDP's forward, an EMA teacher; per-sample terms, so 1 and 2 processes agree)
    flags = repa_flags() + ["--ckpt-every", "4", "--align-until", "2", "--self-align", "0.5",
                            "--self-align-blocks", "1,3"]
    env = {**os.environ, **ONE_THREAD}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "repa_probe", "train", *tiny_flags(data, two, **{"--steps": 4}), *flags],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("train", *tiny_flags(data, one, **{"--steps": 4}), *flags, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr

    files = {run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) for run in (one, two)}
    assert files[one] == files[two] == ["checkpoints/0000004.pt", "config.json", "log.jsonl"]
    assert [r["world_size"] for r in log_rows(two, "start")] == [2]
    assert [r["inputs_sha256"] for r in log_rows(one)] == [r["inputs_sha256"] for r in log_rows(two)]
    a, b = (training_state(run / "checkpoints" / f"{4:07d}.pt") for run in (one, two))
    assert a.keys() == b.keys()
    # Two processes sum the gradients in another order than one (all-reduce). Adam divides by √v + ε, so a weight
    # whose gradient cancels to rounding level (ε = 1e-8) can move by a fraction of lr on that rounding alone
    # (measured: 2 elements of 288,652 beyond 1e-6, the largest 1.5e-5 on an AMD EPYC, 1e-7 elsewhere). A split
    # batch, an unsynchronised term or a switch-off on one rank only moves most weights by ~lr (1e-3).
    d = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
    assert (d > 1e-6).float().mean() < 1e-4, f"{(d > 1e-6).sum()} of {d.numel()} values differ by over 1e-6"
    assert d.max() < 1e-4, f"1 vs 2 processes differ by {d.max():.3g} at {worst} (a tenth of lr at most)"


def test_export_repa_layout_loads_back_as_repa_train(runs, tmp_path):
    src = runs["repa"] / "checkpoints" / f"{STEPS:07d}.pt"
    out = tmp_path / "repa.pt"
    result = run_cli("export-repa", src, out, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(out, weights_only=True)
    assert set(obj) == {"model", "ema", "opt", "args", "steps"} and obj["steps"] == STEPS
    args = obj["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.encoder_depth, args.enc_type, args.proj_coeff, args.cfg_prob, args.path_type) == \
        (1, ENCODER, 0.5, 0.1, "linear")
    ours, theirs = load_checkpoint(src), load_checkpoint(out)
    assert theirs.provenance.format == "repa-train" and theirs.provenance.step == STEPS
    assert theirs.config == ours.config
    assert all(torch.equal(v, theirs.model.state_dict()[k]) for k, v in ours.model.state_dict().items())


def test_analysis_while_training_writes_tidy_rows(cifar_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(cifar_dir / "train", run, 0.5, steps=4, analyze_every=4, log_every=4,
                      analysis=analysis(data=str(cifar_dir / "test"), n=60, ts=(0.0, 0.5), blocks=(1, 3)))
    train(cfg)
    rows = [json.loads(line) for line in (run / "analysis.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 4}
    assert {(r["metric"], r["encoder"]) for r in rows} == {("probe_top1", None), ("cknna", ENCODER)}
    assert len(rows) == 2 * 2 * 2 * 2                                   # steps × metrics × t × blocks
    assert {r["block"] for r in rows} == {1, 3} and {r["t"] for r in rows} == {0.0, 0.5}
    assert all(set(r) >= {"step", "block", "t", "metric", "encoder", "value"} for r in rows)
    assert all(-1 <= r["value"] <= 1 for r in rows)
    at_init = {r["value"] for r in rows if r["step"] == 0 and r["metric"] == "probe_top1" and r["t"] == 0.0}
    assert len(at_init) == 1                          # adaLN-Zero: every block of the untrained net is the same

    # the trajectory report reads that log as it is (no intervals in it), probe shown in percent
    r = run_cli("trajectory", run, "--source", "log", "--data", cifar_dir / "test", "--out", tmp_path / "traj")
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "traj" / "results.csv")
    assert len(res) == len(rows) and res["ci_low"].isna().all() and set(res["step"]) == {0, 4}
    page1 = PdfReader(tmp_path / "traj" / "report.pdf").pages[0].extract_text()
    probe0 = next(r["value"] for r in rows if r["step"] == 0 and r["metric"] == "probe_top1" and r["t"] == 0.0)
    assert f"{100 * probe0:.3g} at step 0" in page1

    # the log's numbers are analyze's: the same images, split, noise, measures and code (the trainer's teacher
    # runs in fp32, so analyze is told the same)
    r = run_cli("analyze", run / "checkpoints" / "0000004.pt", "--data", cifar_dir / "test", "--n", 60, "--t", "0,0.5",
                "--encoder", ENCODER, "--encoder-random-init", "--encoder-precision", "fp32", "--bootstrap", 0,
                "--no-baselines", "--seed", 0,
                "--cache", tmp_path / "cache", "--quiet", "--out", tmp_path / "analyze", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    full = pd.read_csv(tmp_path / "analyze" / "results.csv").fillna({"encoder": ""})
    full = full.set_index(["block", "t", "metric", "encoder"])["value"]
    logged = [row for row in rows if row["step"] == 4]
    # the trainer fits its 4 probes in one batch, analyze its 8: BLAS promises no bitwise equality across batch
    # shapes, and a probe may differ by one of its 12 test images (tests/test_probe.py: assert_same_probe)
    for row in logged:
        tol = 1 / 12 + 1e-9 if row["metric"] == "probe_top1" else 1e-6
        assert full[(row["block"], row["t"], row["metric"], row["encoder"] or "")] == pytest.approx(row["value"],
                                                                                                   abs=tol)
    assert len({row["value"] for row in logged if row["metric"] == "cknna"}) > 1     # not a constant by accident


@pytest.mark.parametrize("case", ["missing data", "unknown model", "unwritable out"])
def test_train_bad_input_is_one_line_exit_2(case, cifar_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    flags = {"missing data": tiny_flags(tmp_path / "nope", tmp_path / "o") + repa_flags(),
             "unknown model": tiny_flags(cifar_dir / "test", tmp_path / "o", **{"--model": "SiT-Q/2"}) + repa_flags(),
             "unwritable out": tiny_flags(cifar_dir / "test", blocker / "run") + repa_flags()}[case]
    result = run_cli("train", *flags, env=ONE_THREAD)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repa-probe: error:"), result.stderr
    assert {"missing data": "--data", "unknown model": "SiT-Q/2", "unwritable out": "--out"}[case] in lines[0]


@pytest.mark.parametrize("flags, needle", [
    ({}, "--encoder"),                                                           # λ > 0 without a teacher
    ({"--repa-coeff": 0.5, "--encoder": ENCODER, "--repa-depth": 5}, "--repa-depth 5"),
    ({"--repa-coeff": 0, "--width": 60, "--heads": 7}, "--heads"),
    ({"--repa-coeff": 0, "--model": "DiT-S/2"}, "SiT"),
    ({"--repa-coeff": 0, "--batch": 0}, "--batch"),
    ({"--repa-coeff": 0, "--projector": "conv", "--projector-kernel": 2}, "--projector-kernel 2 must be odd"),
    ({"--repa-coeff": 0, "--align-until": 5}, "--align-until 5 switches off an alignment term"),
    ({"--repa-coeff": 0, "--dispersive": 0.25, "--dispersive-block": 4}, "--dispersive-block 4 is not a block"),
    ({"--repa-coeff": 0, "--dispersive-variant": "hinge"}, "--dispersive-variant"),
    ({"--repa-coeff": 0, "--self-align": 0.5, "--self-align-blocks": "1,4"}, "--self-align-blocks 1,4"),
    ({"--repa-coeff": 0, "--self-align": 0.5, "--self-align-blocks": "2"}, "give two blocks"),
])
def test_train_rejects_bad_settings_before_loading_anything(flags, needle, cifar_dir, tmp_path, capsys):
    from repa_probe.cli import main
    assert main(["train", *tiny_flags(cifar_dir / "test", tmp_path / "o", **{"--steps": 1, **flags})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_latent_mode_trains_on_vae_latents_and_samples_decode(cifar_dir, tmp_path):
    """--latents VAE (a tiny random 8×-downsampling AutoencoderKL): 32-px images → 4×4×4 latents, the teacher
    sees the raw images at the SiT's 2×2 token grid, and `sample` decodes through the run's VAE."""
    from test_data import save_tiny_vae
    vae = save_tiny_vae(tmp_path / "vae")
    run = tmp_path / "run"
    last = train(tiny_config(cifar_dir / "test", run, 0.5, mode="latents", vae=str(vae), image_size=32, steps=3,
                             log_every=1))
    ckpt = load_checkpoint(last)
    assert (ckpt.config.in_channels, ckpt.config.input_size) == (4, 4) and ckpt.meta["mode"] == "latents"
    assert all(r["loss_repa"] < 0 for r in log_rows(run))
    out = tmp_path / "grid.png"
    result = run_cli("sample", last, "--n", 4, "--steps", 2, "--out", out, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as im:
        assert im.size == (2 + 2 * 34, 2 + 2 * 34)                  # 2×2 decoded 32-px images + gutters


def test_compiled_model_gives_the_eager_training_loss_and_gradients(cifar_dir):
    """`train --compile` runs the loss through torch.compile(model): on real images with real REPA targets
    (the bundled CIFAR encoder) it must give the eager loss and gradients up to rounding."""
    from conftest import randomize_, tiny_config
    from repa_probe.models import SiT
    from repa_probe.train.loss import training_loss
    encoder = load_encoder("cifar-ssl-resnet")
    dataset = ImageDataset(cifar_dir / "test", 16, indices=list(range(8)))
    images = torch.stack([dataset[i][0] for i in range(8)])
    targets = [encoder.encode(images.float() / 255, 8)[0]]
    model = randomize_(SiT(tiny_config(z_dims=[encoder.embed_dim])))
    g = torch.Generator().manual_seed(0)
    x, t, noise = images.float() / 127.5 - 1, torch.rand(8, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    y = torch.arange(8) % 10
    results = []
    for net in (model, torch.compile(model)):
        model.zero_grad()
        loss, parts = training_loss(net, x, y, t, noise, targets, repa_coeff=0.5)
        loss.backward()
        results.append((torch.stack([loss, parts["denoise"], parts["repa"]]).detach(),
                        torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (eager, eager_grad), (compiled, compiled_grad) = results
    assert eager[2] != 0                                         # the REPA term is really in the loss
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_progress_bar_shows_the_loss_average_and_img_s_of_every_step(cifar_dir, tmp_path):
    """The bar (forced to draw at every step) shows after step n the moving average (decay 0.9) of steps
    1..n's losses, and a rate from step 2 on (step 1 also paid for the start-up): not the last log row's,
    which a 5-step log interval left on screen for 5 steps. The per-step losses come from the same run
    logged at every step (training on the CPU is bit-reproducible)."""
    data, steps = cifar_dir / "test", 8
    train(tiny_config(data, tmp_path / "every", 0.5, steps=steps, log_every=1))
    losses = [(r["loss"], r["loss_repa"]) for r in log_rows(tmp_path / "every")]
    flags = [f for f in tiny_flags(data, tmp_path / "bar", **{"--steps": steps}) if f != "--quiet"]
    result = run_cli("train", *flags, *repa_flags(), env={**ONE_THREAD, "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"})
    assert result.returncode == 0, result.stderr
    shown = {int(m[1]): (float(m[2]), float(m[3]), m[4]) for m in
             re.finditer(rf"(\d+)/{steps} \[[^\]]*?, loss=([-\d.]+), repa=([-\d.]+)(?:, img_s=(\d+))?\]", result.stderr)}
    assert sorted(shown) == list(range(1, steps + 1)), result.stderr
    average = None
    for step, (loss, repa) in enumerate(losses, 1):
        average = (loss, repa) if average is None else tuple(0.9 * a + 0.1 * v for a, v in zip(average, (loss, repa)))
        assert shown[step][:2] == pytest.approx(average, abs=1.5e-4), f"step {step}"
        assert (shown[step][2] is None) == (step == 1)
