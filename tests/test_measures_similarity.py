"""The SRA view (self_similarity.py, a measure): one model's block × block linear CKA at each t and t × t CKA of each
block. Symmetric with a unit diagonal, invariant as linear CKA is, equal to the pairwise metric; its two curves are
entries of the matrices and equal linear CKA written here in numpy, on all images and on each subsample; and in a
real `analyze` report (results.csv's curves, self_similarity.csv and two heatmap pages) with the values of the
model's own tokens, and gone with --no-self-similarity."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import hooked_tokens, randomize_, run_cli, tiny_config
from repa_probe import metrics as M
from repa_probe import stats
from repa_probe.api import analyse
from repa_probe.capture import make_dataset, noisy_input
from repa_probe.checkpoints import save_checkpoint
from repa_probe.config import AnalyzeConfig
from repa_probe.data import to_model_space
from repa_probe.families import load_checkpoint
from repa_probe.findings.similarity import similarity_table
from repa_probe.self_similarity import self_similarity, subsample_summaries, summaries
from repa_probe.models import SiT

TS, BLOCKS = [0.0, 0.3, 0.8], [0, 1, 2, 3]


def features(seed: int = 0) -> np.ndarray:
    """[T, B, N, D]: blocks of one residual stream (each the last plus noise), so that they differ but resemble."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(len(TS), len(BLOCKS), 40, 12)), axis=1)
    return x + 0.5 * np.cumsum(rng.normal(size=(len(TS), 1, 40, 12)), axis=0)


def linear_cka(a: np.ndarray, b: np.ndarray, clamp: bool = True) -> float:
    """Biased linear CKA ‖AᵀB‖²_F / (‖AᵀA‖_F·‖BᵀB‖_F) of column-centred rows, after the alignment metrics'
    preprocessing: each entry clamped to the 95th percentile of |x| (numpy's interpolation), rows L2-normalised."""
    def prepared(x):
        x = np.asarray(x, dtype=np.float64)
        if clamp:
            tau = np.quantile(np.abs(x), 0.95)
            x = np.clip(x, -tau, tau)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x - x.mean(axis=0)
    a, b = prepared(a), prepared(b)
    return float(np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


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


def test_the_curves_are_entries_of_the_matrices_and_numpys_cka_at_the_lowest_t_given_anywhere():
    ts = [0.3, 0.0, 0.8]                                  # the lowest t is the second one given
    x = features(3)
    s = self_similarity(x, ts, BLOCKS)
    v = summaries(s)
    assert v["self_cka_prev"].shape == (3, 3) and v["self_cka_tmin"].shape == (2, 4)    # t = 0 itself left out
    for ti in range(3):
        for bi in range(1, 4):                            # block b against block b − 1, at the same t
            assert v["self_cka_prev"][ti, bi - 1] == s.by_t[ti, bi - 1, bi]
            assert v["self_cka_prev"][ti, bi - 1] == pytest.approx(linear_cka(x[ti, bi - 1], x[ti, bi]), abs=1e-12)
    for row, ti in enumerate((0, 2)):                     # block b at t = 0.3, 0.8 against block b at t = 0
        for bi in range(4):
            assert v["self_cka_tmin"][row, bi] == s.by_block[bi, ti, 1]
            assert v["self_cka_tmin"][row, bi] == pytest.approx(linear_cka(x[ti, bi], x[1, bi]), abs=1e-12)


def test_each_replicate_is_the_curves_on_its_subsample_of_the_images():
    x, ts = features(4), [0.3, 0.0, 0.8]
    draws = stats.subsamples(x.shape[2], 3, 0)
    reps = subsample_summaries(x, ts, draws)
    assert reps["self_cka_prev"].shape == (3, 3, 3) and reps["self_cka_tmin"].shape == (3, 2, 4)
    for r, rows in enumerate(draws):
        on_rows = summaries(self_similarity(x[:, :, rows], ts, BLOCKS))
        for m in on_rows:
            np.testing.assert_allclose(reps[m][r], on_rows[m], atol=1e-12)
        assert reps["self_cka_prev"][r, 2, 0] == pytest.approx(linear_cka(x[2, 0, rows], x[2, 1, rows]), abs=1e-12)
        assert reps["self_cka_tmin"][r, 0, 3] == pytest.approx(linear_cka(x[0, 3, rows], x[1, 3, rows]), abs=1e-12)
    assert not np.allclose(reps["self_cka_prev"][0], reps["self_cka_prev"][1])     # the subsamples differ


def test_the_curves_are_invariant_to_a_rotation_and_an_isotropic_scale():
    x = features(5)
    rng = np.random.default_rng(6)
    q = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    plain, rotated = (summaries(self_similarity(y, TS, BLOCKS, clamp=False)) for y in (x, x @ q))
    clamped, scaled = (summaries(self_similarity(y, TS, BLOCKS)) for y in (x, 7.5 * x))
    draws = stats.subsamples(x.shape[2], 2, 1)
    reps, reps_scaled = subsample_summaries(x, TS, draws), subsample_summaries(0.02 * x, TS, draws)
    for m in plain:
        np.testing.assert_allclose(rotated[m], plain[m], atol=1e-10)
        np.testing.assert_allclose(scaled[m], clamped[m], atol=1e-10)
        np.testing.assert_allclose(reps_scaled[m], reps[m], atol=1e-10)
    assert not np.allclose(plain["self_cka_prev"], clamped["self_cka_prev"], atol=1e-6)   # the clamp does act


def test_a_block_that_changes_nothing_and_a_t_that_moves_nothing_give_1():
    x = features(7)
    x[:, 2] = x[:, 1]                                     # block 2 repeats block 1
    x[2] = 3.0 * x[0]                                     # t = 0.8 repeats t = 0, scaled
    v = summaries(self_similarity(x, TS, BLOCKS))
    reps = subsample_summaries(x, TS, stats.subsamples(x.shape[2], 2, 0))
    for values in (v, *({m: r[i] for m, r in reps.items()} for i in range(2))):
        np.testing.assert_allclose(values["self_cka_prev"][:, 1], 1.0, atol=1e-12)
        np.testing.assert_allclose(values["self_cka_tmin"][1], 1.0, atol=1e-12)      # t = 0.8
        assert (values["self_cka_prev"][:, [0, 2]] < 1 - 1e-6).all() and (values["self_cka_tmin"][0] < 1 - 1e-6).all()


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
    common = ["--data", cifar_dir / "test", "--n", n, "--t", "0.6,0", "--encoder", "test_vit", "--encoder-random-init",
              "--no-probe", "--bootstrap", 3, "--null", 0, "--k", 5, "--cache", tmp_path / "cache", "--quiet"]
    r = run_cli("analyze", path, *common, "--out", tmp_path / "out", env={"OMP_NUM_THREADS": "1"})
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
        assert row.value == pytest.approx(linear_cka(a, b), abs=1e-6)

    res = pd.read_csv(tmp_path / "out" / "results.csv")
    curves = res[res["metric"].str.startswith("self_cka_")]
    assert set(curves["kind"]) == {"model"} and (curves["n"] == n).all() and curves["k"].isna().all()
    prev, tmin = (curves[curves["metric"] == m] for m in ("self_cka_prev", "self_cka_tmin"))
    assert sorted(prev["block"].unique()) == [1, 2, 3] and sorted(tmin["block"].unique()) == [0, 1, 2, 3]
    assert len(prev) == 2 * 3 and len(tmin) == 4 and set(tmin["t"]) == {0.6}        # t = 0 against itself: no row
    pair = table.set_index(["t", "block", "t_other", "block_other"])["value"]
    for row in prev.itertuples():
        assert row.value == pytest.approx(pair[(row.t, row.block - 1, row.t, row.block)], abs=1e-12)
        assert row.value == pytest.approx(linear_cka(pooled[ts.index(row.t)][row.block - 1],
                                                     pooled[ts.index(row.t)][row.block]), abs=1e-6)
    for row in tmin.itertuples():
        assert row.value == pytest.approx(pair[(row.t, row.block, 0.0, row.block)], abs=1e-12)
        assert row.value == pytest.approx(linear_cka(pooled[ts.index(row.t)][row.block], pooled[0][row.block]),
                                          abs=1e-6)
    assert ((curves["ci_low"] < curves["value"]) & (curves["value"] < curves["ci_high"])).all()

    r = run_cli("analyze", path, *common, "--no-self-similarity", "--out", tmp_path / "off",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "off" / "self_similarity.csv").exists()
    assert not any("similarity" in p.name for p in (tmp_path / "off" / "figures").iterdir())
    assert not pd.read_csv(tmp_path / "off" / "results.csv")["metric"].str.startswith("self_cka_").any()


def test_a_model_analysed_at_some_blocks_gets_no_sra_view(tmp_path, cifar_dir):
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    path = save_checkpoint(tmp_path / "m.pt", cfg, randomize_(SiT(cfg), seed=6).state_dict(), meta={"mode": "pixels"})
    config = AnalyzeConfig(data=str(cifar_dir / "test"), encoders=["test_vit"], ts=(0.0, 0.5), n=20, k=3,
                           encoder_random_init=True, probe=False, bootstrap=0, null=0, baselines=False, quiet=True,
                           blocks=(1, 3), cache=str(tmp_path / "cache"))         # as the trainer's analysis
    analysis = analyse([path], config)
    (model_result,) = analysis.results.models
    assert {c.metric for c in model_result.curves} == {"cknna"}
