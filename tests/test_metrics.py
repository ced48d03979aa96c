"""Alignment metrics against references written here from the definitions (docs/metrics.md).

The references are deliberately naive: dense n x n masks, the centering matrix H, explicit loops.
"""

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from repa_probe import metrics, stats
from repa_probe.errors import UserError
from repa_probe.metrics import alignment, bootstrap_ci, cka, cknna, mutual_knn, similarity_matrix, svcca

KNN = metrics.METRICS["cknna"].part_key      # the kNN graph part, as FeatureKernel files it


# ----------------------------------------------------------------------------- references

def ref_preprocess(x: np.ndarray, clamp: bool = True) -> torch.Tensor:
    """platonic-rep preprocessing written with numpy: clip to the 95th percentile of |x|, unit rows."""
    x = np.asarray(x, dtype=np.float64)
    if clamp:
        tau = np.quantile(np.abs(x), 0.95)
        x = np.clip(x, -tau, tau)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def ref_hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012 eq. 5, literally: n x n matrices and an n x n x n product."""
    n = K.shape[0]
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    return ((Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
            - 2 * (Kt @ Lt).sum() / (n - 2)) / (n * (n - 3))


def ref_knn_mask(K: torch.Tensor, k: int) -> torch.Tensor:
    top = K.clone().fill_diagonal_(-math.inf).topk(k, dim=1).indices
    return torch.zeros_like(K).scatter_(1, top, 1.0)


def ref_cknna(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[float, float]:
    """platonic-rep's cknna(topk=k, unbiased=True): all masks dense, HSIC by matmul. O(n³).

    Returns (CKNNA, S(K, K))."""
    K, L = A @ A.T, B @ B.T

    def similarity(X, Y):
        mask = ref_knn_mask(X, k) * ref_knn_mask(Y, k)
        return ref_hsic_unbiased(mask * X, mask * Y)

    s_kk = similarity(K, K)
    value = similarity(K, L) / (torch.sqrt(s_kk * similarity(L, L)) + 1e-6)
    return float(value), float(s_kk)


def ref_cka_biased(A: torch.Tensor, B: torch.Tensor) -> float:
    n = A.shape[0]
    H = torch.eye(n, dtype=A.dtype) - 1.0 / n
    K, L = A @ A.T, B @ B.T

    def hsic(X, Y):
        return torch.trace(X @ H @ Y @ H)

    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def ref_cka_unbiased(A: torch.Tensor, B: torch.Tensor) -> float:
    K, L = A @ A.T, B @ B.T
    return float(ref_hsic_unbiased(K, L)
                 / (torch.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L)) + 1e-6))


def correlated_pair(n: int, d_a: int = 24, d_b: int = 40, seed: int = 0, dtype=np.float64):
    """Two views of shared structure with positive, outlier-prone activations (like GELU outputs)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    a = np.abs(z @ rng.normal(size=(8, d_a)) + 0.7 * rng.normal(size=(n, d_a))) ** 1.5
    b = z @ rng.normal(size=(8, d_b)) + 0.9 * rng.normal(size=(n, d_b)) + 2.0
    return a.astype(dtype), b.astype(dtype)


# ----------------------------------------------------------------------------- preprocessing

def test_clamp_threshold_is_numpys_95th_percentile_even_with_ties():
    rng = np.random.default_rng(14)
    for x in (rng.normal(size=(301, 7)), np.round(rng.normal(size=(50, 9)), 1),
              np.round(rng.normal(size=(40, 5)))):
        got = metrics.prepare_features(x, clamp=True, normalize=False).numpy()
        tau = np.quantile(np.abs(x), 0.95)
        np.testing.assert_allclose(got, np.clip(x, -tau, tau), rtol=0, atol=1e-12)
    unit = metrics.prepare_features(rng.normal(size=(10, 4)) * 100, clamp=False)
    np.testing.assert_allclose(np.linalg.norm(unit.numpy(), axis=1), 1.0)


def test_sampled_quantile_is_exact_with_ties_and_when_the_bracket_misses():
    """Above 2**18 entries the order statistics come from a sampled bracket; a 4-entry sample
    misses it most of the time and must fall back to the same exact answer."""
    rng = np.random.default_rng(15)
    cases = (np.abs(rng.standard_t(3, size=(1000, 300))),       # heavy tail, like activations
             np.round(rng.normal(size=(1100, 250)), 1),          # heavy ties at the quantile
             np.concatenate([np.zeros(270_000), rng.normal(size=30_000)]))  # q inside a tie
    for x in cases:
        assert x.size > 2**18
        for q in (0.5, 0.95, 0.999):
            for sample in (2**14, 4):
                got = float(metrics._quantile(torch.from_numpy(x), q, sample=sample))
                assert got == pytest.approx(np.quantile(x, q), rel=0, abs=1e-12), (q, sample)


def test_small_quantile_selects_from_the_nearer_side_exactly():
    """Up to 2**18 entries (a bootstrap subsample) one topk from the side nearer the rank: every rank,
    with ties and with one or two entries."""
    rng = np.random.default_rng(16)
    cases = (np.abs(rng.standard_t(3, size=(316, 384))), np.round(rng.normal(size=(40, 25)), 1),
             np.concatenate([np.zeros(900), rng.normal(size=100)]), np.array([3.0]), np.array([2.0, -1.0]))
    for x in cases:
        for q in (0.0, 0.05, 0.5, 0.95, 0.999, 1.0):
            got = float(metrics._quantile(torch.from_numpy(x), q))
            assert got == pytest.approx(np.quantile(x, q), rel=0, abs=1e-12), (x.shape, q)


# ----------------------------------------------------------------------------- CKNNA

@pytest.mark.parametrize("k", [1, 2, 5, 10, 37])
def test_cknna_matches_dense_platonic_rep_form(k):
    a, b = correlated_pair(300)
    expected, _ = ref_cknna(ref_preprocess(a), ref_preprocess(b), k)
    assert cknna(a, b, k=k) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("block", [7, 64, 299])
def test_cknna_is_independent_of_the_gram_block_size(block):
    a, b = correlated_pair(300, seed=1)
    expected, _ = ref_cknna(ref_preprocess(a), ref_preprocess(b), 10)
    got = alignment(b, a[None], metrics=("cknna",), k=10, block=block)["cknna"][0]
    assert got == pytest.approx(expected, abs=1e-9)


def ref_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition of the kNN graph, by sorting every row of x·xᵀ (float64): each row's k largest off-diagonal
    entries, of equal ones the lowest columns → (indices ascending, their values)."""
    g = np.asarray(x, dtype=np.float64) @ np.asarray(x, dtype=np.float64).T
    np.fill_diagonal(g, -np.inf)
    idx = np.sort(np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in g]), axis=1)
    return idx, np.take_along_axis(g, idx, axis=1)


def tied_features(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Small integers, so that every product is an exact integer and most rows tie at their k-th neighbour,
    and a few duplicated rows (two copies of an image)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
    x[[5, 17, 40]] = x[[3, 3, 22]]
    return x


@pytest.mark.parametrize("d", [6, metrics.HALF_GRAM_WIDTH])      # whole-row strips, and half the Gram
@pytest.mark.parametrize("block", [7, 32, None])
def test_knn_graph_takes_the_lowest_columns_of_equal_entries(d, block):
    x = tied_features(90, d)
    for k in (1, 4, 10):
        g = metrics.knn_graph(torch.from_numpy(x), k, block)
        idx, vals = ref_knn(x, k)
        np.testing.assert_array_equal(g.idx.numpy(), idx)
        np.testing.assert_array_equal(g.vals.numpy(), vals)


def subset_cases(n: int, seed: int) -> list[np.ndarray]:
    """Rows a kernel of n images is asked for: bootstrap subsamples, a class-balanced half, a permutation (a
    permuted target), a small subset whose rows mostly lack k candidates, and a classic bootstrap resample."""
    rng = np.random.default_rng(seed)
    return [*stats.subsamples(n, 3, seed), stats.halves(np.arange(n) % 3, seed)[0], rng.permutation(n),
            np.sort(rng.choice(n, 15, replace=False)), stats.resamples(n, 1, seed)[0]]


@pytest.mark.parametrize("clamp, normalize", [(True, True), (True, False), (False, False)])
def test_a_subsets_kernel_equals_a_fresh_kernel_of_its_rows(clamp, normalize):
    """FeatureKernel.subset derives the kNN graph from the full sample's candidates; it must be the graph a
    new kernel of those rows finds, ties, the subset's own clamp threshold and every metric included."""
    a, b = correlated_pair(160, seed=21)
    a[[7, 60]] = a[[2, 2]]                                 # duplicated images: exact ties
    a = np.round(a, 1)                                     # coarse values: more ties
    full = metrics.FeatureKernel.build(a, k=5, clamp=clamp, normalize=normalize)
    for rows in subset_cases(len(a), seed=22):
        fresh = metrics.FeatureKernel.build(a[rows], k=5, clamp=clamp, normalize=normalize)
        got = full.subset(rows)
        g, want = got.parts[KNN].graph, fresh.parts[KNN].graph
        np.testing.assert_array_equal(g.idx.numpy(), want.idx.numpy())
        np.testing.assert_allclose(g.vals.numpy(), want.vals.numpy(), rtol=0, atol=1e-12)
        target = metrics.FeatureKernel.build(b[rows], k=5, clamp=clamp, normalize=normalize)
        scores = metrics.pair_scores(got, target)
        for m, v in metrics.pair_scores(fresh, target).items():
            assert scores[m] == pytest.approx(v, abs=1e-12), (m, len(rows))


def test_subsets_of_float32_features_equal_fresh_kernels_whose_clamp_moves():
    """Float32 features with heavy tails: each subsample's clamp threshold differs from the full sample's, so
    its rows move, and the bound that certifies a row's candidates has to hold."""
    rng = np.random.default_rng(23)
    x = (rng.standard_t(2, size=(700, 24)) + rng.normal(size=(700, 1)) * 3).astype(np.float32)
    full = metrics.FeatureKernel.build(x, k=10, metrics=("cknna",))
    for rows in subset_cases(len(x), seed=24)[:5]:
        want = metrics.FeatureKernel.build(x[rows], k=10, metrics=("cknna",)).parts[KNN]
        got = full.subset(rows).parts[KNN]
        np.testing.assert_array_equal(got.graph.idx.numpy(), want.graph.idx.numpy())
        assert got.s_self == pytest.approx(want.s_self, rel=1e-12)


def test_a_subset_without_the_extreme_images_moves_rows_past_their_candidates():
    """Leaving out the images with the largest activations lowers the subset's clamp threshold, which moves
    its rows far enough to bring in neighbours from beyond their candidate lists: the bound on that movement
    must send those rows to a full computation (without it, a few of these rows get other neighbours)."""
    for seed in range(60):
        x = np.random.default_rng(seed).standard_t(1.5, size=(200, 3))
        rows = np.sort(np.argsort(np.abs(x).max(axis=1))[:(60, 100, 140)[seed % 3]])
        for k in (1, 2):
            got = metrics.FeatureKernel.build(x, k=k, metrics=("cknna",)).subset(rows).parts[KNN].graph
            want = metrics.FeatureKernel.build(x[rows], k=k, metrics=("cknna",)).parts[KNN].graph
            np.testing.assert_array_equal(got.idx.numpy(), want.idx.numpy())


def test_permuted_targets_reindex_a_prepared_target():
    a, b = correlated_pair(150, seed=25)
    target = metrics.FeatureKernel.build(b, k=6)
    source = metrics.FeatureKernel.build(a, k=6)
    rng = np.random.default_rng([4, 104729])                       # permuted_targets' own draws
    for permuted, features in zip(metrics.permuted_targets(target, 3, seed=4), metrics.permuted_targets(b, 3, 4, k=6)):
        fresh = metrics.FeatureKernel.build(b[rng.permutation(len(b))], k=6)
        for kernel in (permuted, features):
            np.testing.assert_array_equal(kernel.parts[KNN].graph.idx.numpy(), fresh.parts[KNN].graph.idx.numpy())
            got = metrics.pair_scores(source, kernel)
            for m, v in metrics.pair_scores(source, fresh).items():
                assert got[m] == pytest.approx(v, abs=1e-12), m


def test_alignment_scores_every_view_as_fresh_kernels_would():
    """One pass per source: the target, permuted targets (rows None) and subsamples' targets (rows given)."""
    a, b = correlated_pair(130, seed=26)
    sources = np.stack([a, a[:, ::-1] + 0.5 * np.abs(b[:, :24])]).reshape(2, 1, 130, 24)
    target = metrics.FeatureKernel.build(b, k=5)
    rows = subset_cases(130, seed=27)[:4]
    views = [(None, p) for p in metrics.permuted_targets(target, 2, seed=1)]
    views += [(r, target.subset(r)) for r in rows]
    values, other = alignment(target, sources, k=5, views=views)
    assert other["cknna"].shape == (len(views), 2, 1)
    for i in range(2):
        src = sources[i, 0]
        for m, v in metrics.pair_scores(metrics.FeatureKernel.build(src, k=5), target).items():
            assert values[m][i, 0] == pytest.approx(v, abs=1e-12)
        for p, (r, kernel) in enumerate(views):
            fresh = metrics.FeatureKernel.build(src if r is None else src[r], k=5)
            for m, v in metrics.pair_scores(fresh, kernel).items():
                assert other[m][p, i, 0] == pytest.approx(v, abs=1e-12), (m, p)


RANK_SCRIPT = """
import sys
import numpy as np
import torch
from repa_probe import metrics
from repa_probe.runtime import init_distributed, rank, shutdown_distributed

init_distributed(torch.device("cpu"))
data = np.load(sys.argv[1])
built, build = [], metrics.FeatureKernel.build.__func__

def counting(cls, feats, *args, **kw):      # which sources this rank prepares
    kernel = build(cls, feats, *args, **kw)
    built.append(args[-1] if args else kw.get("what"))
    return kernel

metrics.FeatureKernel.build = classmethod(counting)
target = build(metrics.FeatureKernel, data["target"], 5, what="target")
views = [(None, p) for p in metrics.permuted_targets(target, 2, seed=1)]
views += [(r, target.subset(r)) for r in (data["rows0"], data["rows1"])]
values, other = metrics.alignment(target, data["sources"], k=5, views=views, split=True)
mine = [what for what in built if what.startswith("sources")]
alone = metrics.alignment(target, data["sources"][:1], k=5) if rank() == 0 else {}   # one rank, unsplit
np.savez(sys.argv[2] + f"{rank()}.npz", built=np.array(mine), **{f"alone_{m}": v for m, v in alone.items()},
         **{f"value_{m}": v for m, v in values.items()}, **{f"view_{m}": v for m, v in other.items()})
shutdown_distributed()
"""


def test_torchrun_splits_the_sources_across_ranks_and_every_rank_gets_every_value(tmp_path):
    """alignment(split=True) under torchrun with two gloo processes: each rank prepares its own share of the
    3 t × 2 blocks, and both return exactly what one process does; without split one rank computes alone (a
    trainer's main rank) and is not left waiting for the other."""
    a, b = correlated_pair(90, seed=28, dtype=np.float32)
    rng = np.random.default_rng(29)
    sources = np.stack([a + s * rng.normal(size=a.shape) for s in (0.1, 0.5, 1.0, 2.0, 4.0, 8.0)]).astype(np.float32)
    rows = stats.subsamples(90, 2, seed=3)
    np.savez(tmp_path / "data.npz", target=b, sources=sources.reshape(3, 2, 90, 24), rows0=rows[0], rows1=rows[1])
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "rank.py"), str(tmp_path / "data.npz"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    shares = [list(out["built"]) for out in ranks]
    assert len(shares[0]) == len(shares[1]) == 3
    assert sorted(shares[0] + shares[1]) == [f"sources[{t}, {b}]" for t in range(3) for b in range(2)]
    target = metrics.FeatureKernel.build(b, 5, what="target")
    views = [(None, p) for p in metrics.permuted_targets(target, 2, seed=1)] + [(r, target.subset(r)) for r in rows]
    values, other = alignment(target, sources.reshape(3, 2, 90, 24), k=5, views=views)
    for out in ranks:
        for m in values:
            np.testing.assert_array_equal(out[f"value_{m}"], values[m])
            np.testing.assert_array_equal(out[f"view_{m}"], other[m])
            np.testing.assert_array_equal(ranks[0][f"alone_{m}"], values[m][:1])


def test_cknna_matches_dense_form_in_float32():
    a, b = correlated_pair(400, seed=2, dtype=np.float32)
    expected, _ = ref_cknna(ref_preprocess(a), ref_preprocess(b), 10)
    assert cknna(a, b, k=10) == pytest.approx(expected, abs=1e-5)


def test_cknna_equals_unbiased_cka_when_k_is_n_minus_1():
    a, b = correlated_pair(60, seed=3)
    assert cknna(a, b, k=59) == pytest.approx(cka(a, b, unbiased=True), abs=1e-6)


def test_cknna_of_features_with_themselves_is_one_up_to_the_epsilon():
    a, _ = correlated_pair(300, seed=4)
    _, s_kk = ref_cknna(ref_preprocess(a), ref_preprocess(a), 10)
    # S(K,K) / (S(K,K) + 1e-6): the epsilon is absolute, so the shortfall from 1 is 1e-6 / S(K,K)
    assert cknna(a, a, k=10) == pytest.approx(s_kk / (s_kk + 1e-6), abs=1e-9)
    assert cknna(a, a, k=10) > 1 - 1e-3


def test_cknna_is_invariant_to_rotation_and_isotropic_scaling():
    a, b = correlated_pair(250, seed=5)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(b.shape[1], b.shape[1])))
    base = cknna(a, b, k=10, clamp=False)
    # clamping is per coordinate, hence not rotation invariant: rotations are tested without it
    assert cknna(a, b @ q, k=10, clamp=False) == pytest.approx(base, abs=1e-9)
    assert cknna(a @ np.linalg.qr(np.random.default_rng(1).normal(size=(24, 24)))[0], b, k=10,
                 clamp=False) == pytest.approx(base, abs=1e-9)
    # scaling: with and without the clamp (its threshold scales with the data)
    assert cknna(7.5 * a, b, k=10) == pytest.approx(cknna(a, b, k=10), abs=1e-9)
    assert cknna(a, 0.01 * b, k=10, clamp=False) == pytest.approx(base, abs=1e-9)


def test_cknna_of_independent_gaussians_is_near_zero():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(2000, 64)).astype(np.float32)
    b = rng.normal(size=(2000, 64)).astype(np.float32)
    assert abs(cknna(a, b, k=10)) < 0.05


def hexagon(order):
    """Six unit vectors at 60° steps; row i sits at angle 60°·order[i]."""
    angles = np.deg2rad(60.0 * np.asarray(order, dtype=np.float64))
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_cknna_and_mutual_knn_on_a_hand_computed_six_point_example():
    # K: rows on the hexagon in order 0..5, so N_K(i) = {i−1, i+1} with K = cos 60° = 1/2.
    # L: rows 3 and 4 swapped on the hexagon, ring 0-1-2-4-3-5:
    #   N_L = {1,5}, {0,2}, {1,4}, {4,5}, {2,3}, {3,0}
    #   M = N_K ∩ N_L = {1,5}, {0,2}, {1}, {4}, {3}, {0}: 8 entries, all with their transpose.
    # Every masked entry is 1/2, so S(X, Y) = HSIC_u(M/2, M/2) = HSIC_u(M, M)/4 with
    #   HSIC_u(M, M) = [Σ MᵢⱼMⱼᵢ + (ΣM)²/(5·4) − 2·(1ᵀM)(M1)/4] / (6·3)
    #                = [8 + 64/20 − 2·(2·2 + 2·2 + 1 + 1 + 1 + 1)/4] / 18 = 5.2 / 18.
    # S(K, K): the ring R (12 entries, row and column sums 2): [12 + 144/20 − 2·24/4] / 18 = 0.4,
    # so S(K, K) = S(L, L) = 0.1 and CKNNA = (1.3/18) / (0.1 + 1e-6).
    a, b = hexagon([0, 1, 2, 3, 4, 5]), hexagon([0, 1, 2, 4, 3, 5])
    assert cknna(a, b, k=2, clamp=False) == pytest.approx((1.3 / 18) / (0.1 + 1e-6), abs=1e-12)
    # mutual kNN: |N_K(i) ∩ N_L(i)| = 2, 2, 1, 1, 1, 1 out of k = 2
    assert mutual_knn(a, b, k=2, clamp=False) == pytest.approx(8 / 12)


# ----------------------------------------------------------------------------- CKA, mutual kNN

@pytest.mark.parametrize("clamp", [True, False])
def test_cka_matches_centering_matrix_and_literal_hsic_u(clamp):
    a, b = correlated_pair(200, seed=7)
    pa, pb = ref_preprocess(a, clamp), ref_preprocess(b, clamp)
    assert cka(a, b, clamp=clamp) == pytest.approx(ref_cka_biased(pa, pb), abs=1e-10)
    assert cka(a, b, unbiased=True, clamp=clamp) == pytest.approx(ref_cka_unbiased(pa, pb),
                                                                  abs=1e-10)


def test_cka_of_features_constant_over_the_images_is_nan_not_a_crash():
    """A REG model's class token entering block 1 is the same vector for every image (fed 0)."""
    _, b = correlated_pair(50, seed=9)
    assert np.isnan(cka(np.ones((50, 24)), b)) and np.isnan(cka(b, np.zeros((50, 24))))


def test_cka_in_float32_is_close_to_float64():
    a, b = correlated_pair(500, seed=8)
    assert cka(a.astype(np.float32), b.astype(np.float32), unbiased=True) == pytest.approx(
        cka(a, b, unbiased=True), abs=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_mutual_knn_matches_brute_force_set_intersection(k):
    a, b = correlated_pair(150, seed=9)
    pa, pb = ref_preprocess(a).numpy(), ref_preprocess(b).numpy()
    total = 0
    for i in range(len(pa)):
        sim_a, sim_b = pa @ pa[i], pb @ pb[i]
        sim_a[i] = sim_b[i] = -np.inf
        total += len(set(np.argsort(-sim_a)[:k]) & set(np.argsort(-sim_b)[:k]))
    assert mutual_knn(a, b, k=k) == pytest.approx(total / (len(pa) * k), abs=1e-12)


# ----------------------------------------------------------------------------- batched API

def ref_svcca(A: np.ndarray, B: np.ndarray, dims: tuple[int, int] = (10, 10)) -> float:
    """platonic-rep's svcca with exact singular vectors: standardise columns, keep the top `dims` left
    singular vectors of each (numpy's SVD), fit scikit-learn's CCA between them, average the correlations of
    the canonical pairs."""
    from sklearn.cross_decomposition import CCA

    def top(x, r):
        x = (x - x.mean(0)) / (x.std(0, ddof=1) + 1e-8)
        return np.linalg.svd(x, full_matrices=False)[0][:, :r]

    ua, ub = top(np.asarray(A, np.float64), dims[0]), top(np.asarray(B, np.float64), dims[1])
    r = min(dims)
    xa, xb = CCA(n_components=r, max_iter=5000, tol=1e-6).fit(ua, ub).transform(ua, ub)
    return float(np.mean([np.corrcoef(xa[:, i], xb[:, i])[0, 1] for i in range(r)]))


def shared_signal(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature matrices (n × 64, n × 48) that share 8 of the 12 latent factors behind them, with a decaying
    spectrum: their top 10 directions carry the signal (correlated_pair's are mostly noise: SVCCA ≈ 0.11)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 12, generator=g, dtype=torch.float64) * torch.linspace(6, 2, 12, dtype=torch.float64)
    a = z @ torch.randn(12, 64, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 64, generator=g,
                                                                                     dtype=torch.float64)
    b = z[:, :8] @ torch.randn(8, 48, generator=g, dtype=torch.float64) + torch.randn(n, 48, generator=g,
                                                                                    dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("n", [600, 40])      # more images than dims (d × d Gram), and fewer (n × n)
def test_svcca_matches_exact_singular_vectors_and_sklearns_cca(n):
    a, b = shared_signal(n)
    ours = metrics.pair_scores(*(metrics.FeatureKernel.build(x, metrics=["svcca"], clamp=False, normalize=False)
                                 for x in (a, b)), ["svcca"])["svcca"]
    assert 0.3 < ours < 0.99
    assert ours == pytest.approx(ref_svcca(a.numpy(), b.numpy()), abs=1e-6)      # CCA stops at tol 1e-6
    pre = [ref_preprocess(x.numpy()) for x in (a, b)]             # and after the usual clamp + unit rows
    assert alignment(pre[1], pre[0][None], metrics=["svcca"], clamp=False, normalize=False)["svcca"][0] == \
        pytest.approx(ref_svcca(*(x.numpy() for x in pre)), abs=1e-6)
    assert alignment(b, a[None], metrics=["svcca"])["svcca"][0] == pytest.approx(
        ref_svcca(*(x.numpy() for x in pre)), abs=1e-6)


@pytest.mark.parametrize("n", [100, 40])
def test_svcca_of_features_spanning_three_directions_compares_those_three(n):
    """Directions without variance have arbitrary singular vectors: they are left out, not compared."""
    a, b = shared_signal(n, seed=3)
    g = torch.Generator().manual_seed(3)
    low = a @ torch.randn(64, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 64, generator=g,
                                                                                  dtype=torch.float64)
    assert svcca(low, low, clamp=False, normalize=False) == pytest.approx(1.0, abs=1e-9)
    assert svcca(low, b, clamp=False, normalize=False) == pytest.approx(
        ref_svcca(low.numpy(), b.numpy(), dims=(3, 10)), abs=1e-6)


def test_svcca_known_answers_self_scale_permutation_symmetry_and_independence():
    a, b = shared_signal(500, seed=1)

    def one(x, y):
        return svcca(x, y, clamp=False, normalize=False)

    assert one(a, a) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(2)
    scaled = a[:, torch.randperm(64, generator=g)] * torch.rand(64, generator=g, dtype=torch.float64).add(0.1)
    assert one(scaled, b) == pytest.approx(one(a, b), abs=1e-10)      # per-column scale and order do not count
    assert one(a, b) == pytest.approx(one(b, a), abs=1e-12)
    independent = [one(torch.randn(2000, 64, generator=g), torch.randn(2000, 48, generator=g)) for _ in range(3)]
    assert max(independent) < 0.15 < one(a, b)
    few = torch.randn(6, 64, generator=g, dtype=torch.float64)           # 6 images: 5 directions at most
    assert one(few, few) == pytest.approx(1.0, abs=1e-12)


def test_alignment_of_a_float16_memmap_stack_equals_each_pair(tmp_path):
    rng = np.random.default_rng(10)
    n = 120
    target = rng.normal(size=(n, 32)).astype(np.float32)
    stack = np.lib.format.open_memmap(tmp_path / "feats.npy", mode="w+", dtype=np.float16,
                                      shape=(2, 3, n, 16))
    for t in range(2):
        for blk in range(3):
            mix = (t + 1) * 0.3 * blk
            stack[t, blk] = (target[:, :16] * mix + rng.normal(size=(n, 16))).astype(np.float16)
    stack.flush()
    stack = np.load(tmp_path / "feats.npy", mmap_mode="r")
    got = alignment(target, stack, k=5)
    assert set(got) == {"cknna", "cka", "cka_unbiased", "mutual_knn", "svcca"}
    for t in range(2):
        for blk in range(3):
            src = np.asarray(stack[t, blk], dtype=np.float32)
            assert got["cknna"][t, blk] == pytest.approx(cknna(src, target, k=5), abs=1e-9)
            assert got["cka"][t, blk] == pytest.approx(cka(src, target), abs=1e-9)
            assert got["cka_unbiased"][t, blk] == pytest.approx(
                cka(src, target, unbiased=True), abs=1e-9)
            assert got["mutual_knn"][t, blk] == pytest.approx(mutual_knn(src, target, k=5))
            assert got["svcca"][t, blk] == pytest.approx(svcca(src, target), abs=1e-9)
    assert got["cka"].shape == (2, 3)


def test_alignment_reuses_a_prepared_target_and_accepts_tensors():
    a, b = correlated_pair(100, seed=11)
    target = metrics.FeatureKernel.build(torch.from_numpy(b), k=4)
    sources = torch.from_numpy(np.stack([a, a[:, ::-1].copy()]))
    got = alignment(target, sources, k=4)
    assert got["cknna"][1] == pytest.approx(cknna(a[:, ::-1], b, k=4), abs=1e-9)
    with pytest.raises(ValueError, match="prepared target has k=4"):
        alignment(target, sources, k=5)
    with pytest.raises(ValueError, match=r"\(clamp, normalize\)=\(True, True\); asked"):
        alignment(target, sources, k=4, clamp=False)


def test_similarity_matrix_equals_pairwise_metrics():
    a, b = correlated_pair(90, seed=12)
    blocks = [a, b, a + b[:, :24]]
    for metric in ("cknna", "cka", "cka_unbiased", "mutual_knn"):
        mat = similarity_matrix(blocks, metric=metric, k=6)
        for i, x in enumerate(blocks):
            for j, y in enumerate(blocks):
                one = alignment(y, x[None], metrics=(metric,), k=6)[metric][0]
                assert mat[i, j] == pytest.approx(one, abs=1e-9)
    cross = similarity_matrix(blocks[:2], [b, b], metric="cka")
    assert cross.shape == (2, 2) and cross[1, 0] == pytest.approx(1.0)


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    a, b = correlated_pair(300, seed=13)
    unbiased_cka = functools.partial(cka, unbiased=True)
    low, high = bootstrap_ci(unbiased_cka, a, b, n_boot=30, seed=0)
    assert low < unbiased_cka(a, b) < high
    assert (low, high) == bootstrap_ci(unbiased_cka, a, b, n_boot=30, seed=0)
    assert (low, high) != bootstrap_ci(unbiased_cka, a, b, n_boot=30, seed=1)


def test_bootstrap_duplicates_inflate_cknna_unless_deduplicated():
    a, b = correlated_pair(300, seed=13)
    plain_low, _ = bootstrap_ci(cknna, a, b, n_boot=20, seed=0, dedupe=False)
    dedup_low, dedup_high = bootstrap_ci(cknna, a, b, n_boot=20, seed=0)
    assert plain_low > cknna(a, b) + 0.05   # copies are shared neighbours on both sides
    assert dedup_high < plain_low
    assert abs(dedup_low - cknna(a, b)) < 0.03


def test_batched_bootstrap_equals_bootstrap_ci_pair_by_pair():
    a, b = correlated_pair(120, seed=16)
    rng = np.random.default_rng(17)
    sources = np.stack([a, a + rng.normal(size=a.shape), rng.normal(size=a.shape)])
    sources = sources.reshape(3, 1, 120, -1).astype(np.float16)   # the feature store's dtype
    target = b.astype(np.float32)
    pair_fns = {"cknna": functools.partial(cknna, k=5), "mutual_knn": functools.partial(mutual_knn, k=5),
                "cka_unbiased": functools.partial(cka, unbiased=True)}
    around = alignment(target, sources, metrics=tuple(pair_fns), k=5)
    got = metrics.bootstrap_alignment(target, sources, tuple(pair_fns), k=5, n_boot=7, seed=3,
                                      around=around)
    for m, fn in pair_fns.items():
        assert got[m].shape == (3, 1, 2)
        for i in range(3):
            want = bootstrap_ci(fn, sources[i, 0], target, n_boot=7, seed=3, around=around[m][i, 0])
            assert tuple(got[m][i, 0]) == pytest.approx(want, abs=1e-12)
            assert got[m][i, 0, 0] <= around[m][i, 0] <= got[m][i, 0, 1]


def test_metrics_and_probes_run_in_full_float32_even_when_tf32_is_on(monkeypatch):
    """The trainer turns TF32 on; its analysis while training must still get exact products."""
    from repa_probe.probe import linear_probe
    seen = []

    def spy(real):  # note the setting at every float32 product (float64 ones never use TF32)
        def call(x, *args, **kw):
            if x.dtype == torch.float32:
                seen.append(torch.get_float32_matmul_precision())
            return real(x, *args, **kw)
        return call

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy(torch.Tensor.__matmul__))
    monkeypatch.setattr(torch, "bmm", spy(torch.bmm))
    a, b = correlated_pair(60, seed=18, dtype=np.float32)   # float64 never uses TF32
    torch.set_float32_matmul_precision("high")
    try:
        cknna(a, b, k=5)
        cka(a, b)
        linear_probe(a[:40], np.arange(40) % 3, a[40:], np.arange(20) % 3)
        assert torch.get_float32_matmul_precision() == "high"   # restored
    finally:
        torch.set_float32_matmul_precision("highest")
    assert len(seen) > 10 and set(seen) == {"highest"}


# ----------------------------------------------------------------------------- bad input

def test_mismatched_image_counts_are_refused():
    a, b = correlated_pair(50)
    with pytest.raises(UserError, match=r"number of images \(50 vs 49\)"):
        cknna(a, b[:49])
    with pytest.raises(UserError, match="target has 50 images but sources have 49"):
        alignment(a, b[None, :49])


def test_k_must_be_below_the_number_of_images():
    a, b = correlated_pair(10)
    with pytest.raises(UserError, match=r"k=10 nearest neighbours needs 1 <= k <= n-1"):
        cknna(a, b, k=10)
    with pytest.raises(UserError, match=r"k=0"):
        mutual_knn(a, b, k=0)


def test_unbiased_hsic_needs_four_images():
    a, b = correlated_pair(3)
    with pytest.raises(UserError, match="n=3 images; cka_unbiased needs n >= 4"):
        cka(a, b, unbiased=True)
    assert cka(a, b) == pytest.approx(ref_cka_biased(ref_preprocess(a), ref_preprocess(b)))


def test_non_finite_features_and_unknown_metrics_are_refused():
    a, b = correlated_pair(20)
    a[3, 2] = np.nan
    with pytest.raises(UserError, match="NaN or inf"):
        cka(a, b)
    with pytest.raises(UserError, match="unknown alignment metric"):
        alignment(b, b[None], metrics=("cka", "nope"))
    with pytest.raises(UserError, match=r"2-D \(images, dims\)"):
        alignment(b[None], b[None])
