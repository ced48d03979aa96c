"""The dispersion measure (measures.py): what Dispersive Loss minimises, of each block's pooled features, on
seeded disjoint batches. Known answers on constructed features, the trainer's own loss on the same batch, and a
real `analyze` of a tiny SiT whose values are those of its own tokens, with an interval and the batch size as n."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist

from conftest import hooked_tokens, randomize_, run_cli, tiny_config
from repa_probe.capture import make_dataset, noisy_input
from repa_probe.checkpoints import save_checkpoint
from repa_probe.data import to_model_space
from repa_probe.families import load_checkpoint
from repa_probe.measures import DISPERSION_BATCH, dispersion, dispersion_batches
from repa_probe.models import SiT
from repa_probe.train.terms.dispersive import dispersive_loss


def by_hand(x: np.ndarray) -> float:
    """log mean_ij exp(−‖x_i − x_j‖² / D), from scipy's distances."""
    return float(np.log(np.mean(np.exp(-cdist(x, x, "sqeuclidean") / x.shape[1]))))


def test_a_collapsed_set_has_dispersion_zero():
    x = np.tile(np.random.default_rng(0).normal(size=(1, 16)), (128, 1))
    assert dispersion(x, dispersion_batches(np.arange(128), 64, [0])) == pytest.approx(0.0, abs=1e-12)


def test_two_points_and_their_scaling_have_the_closed_form():
    """Two rows at squared distance s·D: log((1 + e^(−s))/2), and e^(−a²s) once both are scaled by a."""
    x = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.0]])
    s = 6.0 / 4
    for a in (1.0, 0.5, 3.0):
        want = math.log((1 + math.exp(-a * a * s)) / 2)
        assert dispersion(a * x, np.array([[0, 1]])) == pytest.approx(want, rel=1e-6)


def test_it_is_the_mean_over_batches_of_the_trainers_loss_and_of_the_formula():
    x = np.random.default_rng(1).normal(size=(200, 12)).astype(np.float32)
    batches = dispersion_batches(np.arange(200), 64, [0, 5])
    assert batches.shape == (3, 64) and len(np.unique(batches)) == 192               # disjoint; 8 rows left out
    got = dispersion(x, batches)
    want = np.mean([dispersive_loss(torch.as_tensor(x[b])).item() for b in batches])
    assert got == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(np.mean([by_hand(x[b].astype(np.float64)) for b in batches]), rel=1e-5)
    assert got >= -math.log(64)


def test_pooled_dispersion_bounds_the_flattened_tokens_from_above():
    """‖mean z_i − mean z_j‖² ≤ mean over tokens of ‖z_it − z_jt‖² (Jensen), so the pooled features' value is at
    least the trainer's flattened-token value on the same batch."""
    tokens = torch.randn(32, 16, 8, generator=torch.Generator().manual_seed(2)) + torch.randn(32, 1, 8)
    assert dispersion(tokens.mean(1).numpy(), np.arange(32)[None]) >= dispersive_loss(tokens).item()


def test_dispersion_reaches_analyze_with_its_batch_size_and_an_interval(tmp_path, cifar_dir):
    n, t = 40, 0.5
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    path = save_checkpoint(tmp_path / "m.pt", cfg, randomize_(SiT(cfg), seed=4).state_dict(), meta={"mode": "pixels"})
    r = run_cli("analyze", path, "--data", cifar_dir / "test", "--n", n, "--t", t, "--encoder", "test_vit",
                "--encoder-random-init", "--no-probe", "--dispersion", "--bootstrap", 4, "--null", 0, "--k", 5,
                "--cache", tmp_path / "cache", "--quiet", "--out", tmp_path / "out", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    rows = res[res["metric"] == "dispersion"]
    assert {"model", "untrained", "raw-input", "raw-thumbnail"} == set(rows["kind"])
    model = rows[rows["kind"] == "model"].sort_values("block")
    size = int(model["n"].iloc[0])
    assert 10 < size < DISPERSION_BATCH                     # 40 images: the fewest any of the 4 subsamples holds
    assert any(f"batches of {size} images" in note for note in json.loads((tmp_path / "out" / "summary.json")
                                                                          .read_text())["notes"])
    assert ((model["ci_low"] <= model["value"]) & (model["value"] <= model["ci_high"])).all()
    assert (model["ci_high"] > model["ci_low"]).all()
    assert any(p.name.endswith("curves_dispersion.png") for p in (tmp_path / "out" / "figures").iterdir())

    ckpt = load_checkpoint(path)                            # the same features from the model's own tokens
    data = make_dataset(cifar_dir / "test", 16, n, 0, False)
    images, ids = torch.stack([data[i][0] for i in range(len(data))]), torch.as_tensor(data.ids)
    x_t, timestep = noisy_input(ckpt.convention, to_model_space(images, "pixels"), ids, t, 0)
    tokens, _ = hooked_tokens(ckpt.model.eval(), x_t, timestep, torch.full((n,), 10))
    batches = dispersion_batches(np.arange(n), size, [0, 8191])
    want = [dispersion(h.mean(1).numpy(), batches) for h in tokens]
    np.testing.assert_allclose(model["value"], want, rtol=1e-5)


def test_the_trainers_analysis_reports_the_dispersion_of_its_ema(cifar_dir, tmp_path):
    """`train --analyze-dispersion`: the rows of analysis.jsonl hold the EMA's dispersion at the blocks analysed."""
    from test_train import analysis, tiny_config as train_config
    from repa_probe.train.trainer import train
    run, n, t = tmp_path / "run", 40, 0.5
    train(train_config(cifar_dir / "train", run, 0.0, steps=2, analyze_every=2, log_every=2,
                       analysis=analysis(data=str(cifar_dir / "test"), n=n, ts=(t,), blocks=(1, 3), dispersion=True)))
    rows = pd.DataFrame([json.loads(line) for line in (run / "analysis.jsonl").read_text().splitlines()])
    rows = rows[(rows["step"] == 2) & (rows["metric"] == "dispersion")].sort_values("block")
    assert list(rows["block"]) == [1, 3]
    ckpt = load_checkpoint(run / "checkpoints" / "0000002.pt", weights="ema")
    data = make_dataset(cifar_dir / "test", 16, n, 0, False)
    images, ids = torch.stack([data[i][0] for i in range(len(data))]), torch.as_tensor(data.ids)
    x_t, timestep = noisy_input(ckpt.convention, to_model_space(images, "pixels"), ids, t, 0)
    tokens, _ = hooked_tokens(ckpt.model.eval(), x_t, timestep, torch.full((n,), 10))
    batches = dispersion_batches(np.arange(n), int(rows["n"].iloc[0]), [0, 8191])
    np.testing.assert_allclose(rows["value"], [dispersion(tokens[b].mean(1).numpy(), batches) for b in (1, 3)],
                               rtol=1e-5)
