"""The SRA view (findings/similarity.py): one model's block × block linear CKA at each t and t × t CKA of each
block. Symmetric with a unit diagonal, invariant as linear CKA is, equal to the pairwise metric, and in a real
`analyze` report (self_similarity.csv and two heatmap pages) with the values of the model's own tokens."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import hooked_tokens, randomize_, run_cli, tiny_config
from repa_probe import metrics as M
from repa_probe.capture import make_dataset, noisy_input
from repa_probe.checkpoints import save_checkpoint
from repa_probe.data import to_model_space
from repa_probe.families import load_checkpoint
from repa_probe.findings.similarity import self_similarity, similarity_table
from repa_probe.models import SiT

TS, BLOCKS = [0.0, 0.3, 0.8], [0, 1, 2, 3]


def features(seed: int = 0) -> np.ndarray:
    """[T, B, N, D]: blocks of one residual stream (each the last plus noise), so that they differ but resemble."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(len(TS), len(BLOCKS), 40, 12)), axis=1)
    return x + 0.5 * np.cumsum(rng.normal(size=(len(TS), 1, 40, 12)), axis=0)


def test_both_views_are_symmetric_with_a_unit_diagonal_and_equal_the_pairwise_metric():
    x = features()
    s = self_similarity(x, TS, BLOCKS)
    assert s.by_t.shape == (3, 4, 4) and s.by_block.shape == (4, 3, 3)
    for view in (s.by_t, s.by_block):
        np.testing.assert_allclose(view, view.transpose(0, 2, 1), atol=1e-12)
        np.testing.assert_allclose(np.diagonal(view, axis1=1, axis2=2), 1.0, atol=1e-9)
        off = ~np.eye(view.shape[1], dtype=bool)
        assert (view[:, off] < 1 - 1e-6).all()
    assert s.by_t[2, 1, 3] == pytest.approx(M.cka(x[2, 1], x[2, 3]), abs=1e-12)
    assert s.by_block[1, 0, 2] == pytest.approx(M.cka(x[0, 1], x[2, 1]), abs=1e-12)


def test_linear_cka_is_invariant_to_rotations_without_the_clamp_and_to_scale_with_it():
    x = features(1)
    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    scale = rng.uniform(0.1, 10, size=(3, 4, 1, 1))
    plain = self_similarity(x, TS, BLOCKS, clamp=False)
    rotated = self_similarity(x @ q, TS, BLOCKS, clamp=False)
    np.testing.assert_allclose(rotated.by_t, plain.by_t, atol=1e-10)
    np.testing.assert_allclose(rotated.by_block, plain.by_block, atol=1e-10)
    clamped, scaled = self_similarity(x, TS, BLOCKS), self_similarity(scale * x, TS, BLOCKS)
    np.testing.assert_allclose(scaled.by_t, clamped.by_t, atol=1e-10)
    np.testing.assert_allclose(scaled.by_block, clamped.by_block, atol=1e-10)


def test_the_table_holds_each_pair_of_either_view_once():
    s = self_similarity(features(), TS, BLOCKS)
    table = similarity_table({"m": s})
    assert len(table) == 3 * 16 + 4 * 6                   # T·B² block pairs, B·T·(T − 1) pairs of distinct t
    assert not table.duplicated(["t", "block", "t_other", "block_other"]).any()
    row = table[(table["t"] == 0.8) & (table["block"] == 2) & (table["t_other"] == 0.0) & (table["block_other"] == 2)]
    assert row["value"].item() == s.by_block[2, 2, 0]


def test_analyze_reports_the_sra_view_of_the_models_own_tokens(tmp_path, cifar_dir):
    n, ts = 30, (0.0, 0.6)
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    path = save_checkpoint(tmp_path / "m.pt", cfg, randomize_(SiT(cfg), seed=5).state_dict(), meta={"mode": "pixels"})
    r = run_cli("analyze", path, "--data", cifar_dir / "test", "--n", n, "--t", "0,0.6", "--encoder", "test_vit",
                "--encoder-random-init", "--no-probe", "--bootstrap", 0, "--null", 0, "--k", 5, "--cache",
                tmp_path / "cache", "--quiet", "--out", tmp_path / "out", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "out" / "self_similarity.csv")
    assert set(table["checkpoint"]) == {"m"} and len(table) == 2 * 16 + 4 * 2
    pages = {p.name.split("_", 1)[1] for p in (tmp_path / "out" / "figures").iterdir()}
    assert {"layer_similarity_m.png", "noise_similarity_m.png"} <= pages

    ckpt = load_checkpoint(path)
    data = make_dataset(cifar_dir / "test", 16, n, 0, False)
    images, ids = torch.stack([data[i][0] for i in range(len(data))]), torch.as_tensor(data.ids)
    pooled = []
    for t in ts:
        x_t, timestep = noisy_input(ckpt.convention, to_model_space(images, "pixels"), ids, t, 0)
        pooled.append([h.mean(1).numpy() for h in hooked_tokens(ckpt.model.eval(), x_t, timestep,
                                                                 torch.full((n,), 10))[0]])
    for row in table.itertuples():
        a = pooled[ts.index(row.t)][row.block]
        b = pooled[ts.index(row.t_other)][row.block_other]
        assert row.value == pytest.approx(M.cka(a, b), abs=1e-6)
