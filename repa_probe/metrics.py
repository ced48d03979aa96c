"""Representation alignment between a model's features and a target encoder's (docs/metrics.md).

Every metric compares two feature matrices A (n x d_a) and B (n x d_b) for the same n images, in
the same order; the first four through their linear kernels K = A·Aᵀ and L = B·Bᵀ:

- CKNNA(k), centered kernel nearest-neighbour alignment (Huh et al. 2024, "The Platonic
  Representation Hypothesis", arXiv 2405.07987; the metric REPA reports, arXiv 2410.06940);
- CKA, biased (Kornblith et al. 2019, arXiv 1905.00414) and unbiased (HSIC_u of Song et al. 2012);
- mutual kNN, the fraction of shared k nearest neighbours (Huh et al. 2024);
- SVCCA (Raghu et al. 2017, arXiv 1706.05806): the mean canonical correlation between the top 10 singular
  directions of each (column-standardised) matrix.

The definitions match minyoungg/platonic-rep's ``metrics.py`` (its ``cknna(topk=k, unbiased=True)``,
``cka``, ``unbiased_cka``, ``mutual_knn`` and ``svcca``), but the computation is different: platonic-rep
builds n x n masks and multiplies n x n matrices (O(n³)); here the n x n Gram matrix is never held, only
its k largest entries per row (a kNN graph, O(n·k)), and every HSIC term is evaluated on that sparse
graph, while CKA is computed from the d_a x d_b cross-covariance of the features (O(n·d_a·d_b)). SVCCA
uses exact singular vectors and canonical correlations where platonic-rep uses randomised ones
(``torch.svd_lowrank``) and scikit-learn's iterative CCA.

The target side (encoder kernel, its kNN graph, its self-similarity) is the same for every block and
noise level: build one ``FeatureKernel`` for it and pass it to ``alignment`` for every source.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import stats
from .errors import UserError
from .registry import Registry
from .runtime import rank, sum_over_ranks_array, world_size

EPS = 1e-6  # platonic-rep's denominator guard, kept so values match theirs exactly
SVCCA_DIMS = 10   # the singular directions SVCCA keeps of each matrix (platonic-rep's cca_dim)
CANDIDATES = 4    # a kNN graph keeps each row's CANDIDATES·k nearest: a subsample's graph comes from them
HALF_GRAM_WIDTH = 512   # features this wide compute half of each Gram matrix (_top_candidates)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products in full precision inside (no TF32 or bf16 passes on GPUs).

    The trainer turns TF32 on for speed, and analysis while training runs in the same process; a
    TF32 Gram matrix (10-bit mantissa) would move near-tied nearest neighbours and the probe's
    gradients. Every metric and probe computation runs under this (also usable as a decorator);
    the previous setting is restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------------------------------------
#                                   Preprocessing
# ---------------------------------------------------------------------------------------------

def _default_device(x) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_tensor(x, device: torch.device) -> torch.Tensor:
    """A (possibly float16, possibly memory-mapped) array as a float32 tensor on ``device``.

    float64 input stays float64 (tests use it to compare against references to 1e-12)."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        dtype = np.float64 if x.dtype == np.float64 else np.float32
        # a read-only memmap is copied (torch cannot wrap it); float16 is converted here anyway
        x = x.astype(dtype, copy=x.dtype != dtype or not x.flags.writeable)
        x = torch.from_numpy(np.ascontiguousarray(x))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(device=device, dtype=dtype)


def _order_statistics(flat: torch.Tensor, r: int, sample: int = 2**14
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (r+1)-th and (r+2)-th smallest entries of a 1-D tensor (0-based ranks r, r+1), exact.

    A full selection over 50k images x 1152 dims touches 57M entries several times
    (``kthvalue``: ~65 ms for 3M on one core). Instead a seeded random sample brackets the two
    ranks between sample values a ≤ b; one counting pass gives the exact number of entries below
    a, and the few entries in [a, b] (a few percent) are sorted, which yields the exact order
    statistics. If the bracket misses (rare; a sample is only a guess) it falls back to
    ``kthvalue``, so the result never depends on the sample. Up to 2**18 entries (a bootstrap
    subsample's features, say) one partial selection of the side nearer the ranks is quicker: ``topk``."""
    n = flat.numel()
    r1 = min(r + 1, n - 1)
    if n <= 2**18:
        if n - r <= r1 + 1:                                   # ranks r..n−1: the largest n − r entries
            two = flat.topk(n - r, sorted=False).values.topk(min(2, n - r), largest=False).values
            return two[0], two[-1]
        two = flat.topk(r1 + 1, largest=False, sorted=False).values.topk(2).values   # ranks r1, r of 0..r1
        return two[1], two[0]
    if n > 4 * sample:
        gen = torch.Generator().manual_seed(0)
        s = flat[torch.randint(n, (sample,), generator=gen).to(flat.device)].sort().values
        p = r / max(n - 1, 1) * (sample - 1)
        w = 5.0 * math.sqrt(sample * 0.25) + 2.0          # ≥ 5 standard deviations of the rank
        a, b = s[max(0, math.floor(p - w))], s[min(sample - 1, math.ceil(p + w))]
        below = int((flat < a).sum())
        band = flat[(flat >= a) & (flat <= b)]
        if below <= r and r1 < below + band.numel():
            band = band.sort().values
            return band[r - below], band[r1 - below]
    return flat.kthvalue(r + 1).values, flat.kthvalue(r1 + 1).values


def _quantile(x: torch.Tensor, q: float, sample: int = 2**14) -> torch.Tensor:
    """q-quantile of all entries of x with linear interpolation (numpy's default), exact.

    ``torch.quantile`` refuses inputs above 2**24 entries (50k images x 1152 dims is 57M) and
    sorts all of them."""
    flat = x.flatten()
    h = q * (flat.numel() - 1)
    lo = math.floor(h)
    v_lo, v_hi = _order_statistics(flat, lo, sample)
    return v_lo if h == lo else v_lo + (h - lo) * (v_hi - v_lo)


def prepare_features(feats, clamp: bool = True, normalize: bool = True, q: float = 0.95,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Platonic-rep preprocessing of one feature matrix (n, d).

    clamp:     x ← clip(x, −τ, τ) with τ = q-quantile of |x| over all n·d entries of this matrix
               (removes the few huge activations that dominate dot products in transformers);
    normalize: x_i ← x_i / ‖x_i‖₂, so that K_ij = cos(x_i, x_j).
    Clamping is per coordinate, so it is not rotation invariant; it is scale invariant.
    (platonic-rep takes the quantile over a whole model's stack of layers at once and picks the
    order statistic without interpolation; docs/metrics.md takes one matrix at a time.)
    """
    device = torch.device(device) if device is not None else _default_device(feats)
    x = _to_tensor(feats, device)
    if clamp:
        tau = _quantile(x.abs(), q)
        x = x.clamp(-tau, tau)
    if normalize:
        x = F.normalize(x, dim=-1)
    return x


# ---------------------------------------------------------------------------------------------
#                      kNN graph of a linear kernel (the n x n Gram never held)
# ---------------------------------------------------------------------------------------------

@dataclass
class KnnGraph:
    """The k largest off-diagonal entries of each row of K = X·Xᵀ; of equal entries, the lower column index.

    idx[i]  = N(i), the k nearest neighbours of i (self excluded), sorted by index;
    vals[i] = K[i, N(i)], in float64 from the features as given (``_candidates``).
    """

    n: int
    k: int
    idx: torch.Tensor   # (n, k) int64
    vals: torch.Tensor  # (n, k) float64


def _merge_topk(best_v, best_i, r0, v, i, k):
    """Fold candidate (values, column indices) for rows r0.. into the running row-wise top-k."""
    r1 = r0 + v.shape[0]
    v = torch.cat([best_v[r0:r1], v], dim=1)
    i = torch.cat([best_i[r0:r1], i], dim=1)
    v, j = v.topk(k, dim=1)
    best_v[r0:r1] = v
    best_i[r0:r1] = i.gather(1, j)


@exact_float32()
def _top_candidates(x: torch.Tensor, c: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The c largest off-diagonal entries of each row of K = x·xᵀ (values, column indices), unordered, one
    strip of rows at a time. Which of several equal entries at the c-th place is kept is arbitrary.

    Wide features (d ≥ HALF_GRAM_WIDTH): K is symmetric, so the strip for rows I only multiplies the columns
    from I onwards, K[I, I ∪ later] (half the Gram FLOPs): its row-wise top-c serves the rows of I, and its
    column-wise top-c over the later columns hands each later row j its best candidates among I
    (K[j, I] = K[I, j]ᵀ). Narrower features: a top-c down the columns costs more than the products it saves,
    so each strip is K[I, :], whole rows. Memory is O(block·n + n·c): the n x n matrix is never formed.
    """
    n, half = x.shape[0], x.shape[1] >= HALF_GRAM_WIDTH
    if block is None:            # on the CPU a whole-row strip of about 2M entries stays in cache for its top-c
        block = 8192 if x.device.type == "cuda" else 1024 if half else max(64, 2**21 // n)
    half = half and n > block
    best_v = x.new_full((n, c), -math.inf)
    best_i = torch.zeros((n, c), dtype=torch.long, device=x.device)
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        c0 = r0 if half else 0
        g = x[r0:r1] @ x[c0:].T                  # K[I, c0:]: (|I|, n − c0)
        g[:, r0 - c0:].diagonal().fill_(-math.inf)   # N(i) excludes i
        v, i = g.topk(min(c, g.shape[1]), dim=1)
        if not half:
            best_v[r0:r1], best_i[r0:r1] = v, i
            continue
        _merge_topk(best_v, best_i, r0, v, i + r0, c)
        if r1 < n:                               # later rows j receive K[j, I] = K[I, j]
            v, i = g[:, r1 - r0:].topk(min(c, r1 - r0), dim=0)
            _merge_topk(best_v, best_i, r1, v.T, i.T + r0, c)
    return best_v, best_i


def _candidate_dots(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """K[i, cols[i, j]] = xᵢ·x_cols[i, j] for each row i (−inf where cols is −1); the columns of each row must be
    ascending (−1s anywhere). One sampled product over the candidates' sparsity pattern (SDDMM): gathering
    every candidate's row first costs 10-20 times as much."""
    valid = cols >= 0
    crow = torch.zeros(len(cols) + 1, dtype=torch.long, device=x.device)
    torch.cumsum(valid.sum(dim=1), 0, out=crow[1:])
    with warnings.catch_warnings():     # CSR tensors are "beta"; this pattern is valid (ascending, distinct)
        warnings.filterwarnings("ignore", "Sparse")
        pattern = torch.sparse_csr_tensor(crow, cols[valid], x.new_zeros(int(crow[-1])), size=(len(x), len(x)))
        dots = torch.sparse.sampled_addmm(pattern, x, x.T).values()
    return x.new_full(cols.shape, -math.inf).masked_scatter_(valid, dots)


def _rounding(d: int, dtype: torch.dtype, sq: torch.Tensor) -> float:
    """γ_d·max‖xᵢ‖² for rows of squared norms sq: no float dot product of two d-vectors of this dtype (summed in
    any order) is further from the exact one."""
    u = d * (2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24)
    return u / (1 - u) * float(sq.max())


@dataclass
class _Candidates:
    """Each row's c nearest columns (idx, ascending) with their similarities in float64 (vals) and their ranking
    (order: positions in vals, largest first), ``beyond``: what no other entry's exact similarity exceeds, and
    each row's squared norm."""

    vals: torch.Tensor     # (n, c) float64
    idx: torch.Tensor      # (n, c) int64
    order: torch.Tensor    # (n, c) int64
    beyond: torch.Tensor   # (n,) float64
    sq: torch.Tensor       # (n,) float64


def _candidates(x: torch.Tensor, c: int, block: int | None = None) -> _Candidates:
    """The c largest entries of each row found in x's own precision (``_top_candidates``), re-scored in float64
    (a float32 row's products are exact there, its sums nearly so), so that near-ties which float32 rounding
    decides arbitrarily are decided alike wherever the same pair is scored (a subsample, a permuted target)."""
    (n, d), x64 = x.shape, x.double()
    v, idx = _top_candidates(x, c, block)
    idx, sq = idx.sort(dim=1).values, x64.square().sum(dim=1)
    vals = _candidate_dots(x64, idx)
    beyond = v.min(dim=1).values.double() + _rounding(d, x.dtype, sq) + _rounding(d, torch.float64, sq)
    return _Candidates(vals, idx, vals.sort(dim=1, descending=True, stable=True).indices,
                       beyond if c < n - 1 else beyond.fill_(-math.inf), sq)


def _top(vals: torch.Tensor, k: int, order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of each row's candidates (columns ascending, −inf for none) are its k largest, of equal values at the
    k-th place the lowest columns (a mask), and the k-th largest value. ``order``: a likely ranking of each row's
    candidates (the full sample's, for a subsample), tried first: where exactly k values are at least its k-th,
    those are the k largest; the other rows are ranked anew (a topk costs several times as much)."""
    if order is None:
        kth = vals.topk(k, dim=1).values[:, -1:]
        above, same = vals > kth, vals == kth
        return above | (same & (same.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True))), kth.squeeze(1)
    ranked = vals.gather(1, order)
    valid = ranked > -math.inf
    kth = ranked.masked_fill(~valid | (valid.cumsum(dim=1) > k), math.inf).amin(dim=1, keepdim=True)
    keep, kth = vals >= kth, kth.squeeze(1)
    wrong = (keep.sum(dim=1) != k).nonzero().squeeze(1)
    if len(wrong):
        keep[wrong], kth[wrong] = _top(vals[wrong], k)
    return keep, kth


def _graph(x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int, bound: torch.Tensor,
           order: torch.Tensor | None = None) -> KnnGraph:
    """The kNN graph of x (float64) from candidate lists (vals, idx; columns ascending, −1 and −inf for none;
    ``order`` as for ``_top``), given for each row a bound that no entry missing from its list exceeds. A row
    whose k-th value does not beat the bound (its list may miss larger entries, or entries equal to its k-th)
    is computed from its whole row of x·xᵀ instead: rows the candidates cannot decide."""
    keep, kth = _top(vals, k, order)
    vals, idx = vals[keep].view(-1, k), idx[keep].view(-1, k)
    redo = (~(kth > bound)).nonzero().squeeze(1)
    if len(redo):
        g = x[redo] @ x.T
        g[torch.arange(len(redo), device=x.device), redo] = -math.inf
        keep, _ = _top(g, k)
        vals[redo], idx[redo] = g[keep].view(-1, k), keep.nonzero()[:, 1].view(-1, k)
    return KnnGraph(x.shape[0], k, idx, vals)


def knn_graph(x: torch.Tensor, k: int, block: int | None = None) -> KnnGraph:
    """Row-wise top-k of K = x·xᵀ, diagonal excluded: ``_candidates``, then ``_graph``."""
    c = _candidates(x, min(k + 1, x.shape[0] - 1), block)
    return _graph(x.double(), c.vals, c.idx, k, c.beyond, c.order)


def _subset_graph(x: torch.Tensor, c: _Candidates, rows: torch.Tensor, xs: torch.Tensor, k: int) -> KnnGraph:
    """The kNN graph of xs, the rows ``rows`` of the features x prepared on their own (their clamp threshold is
    theirs, so xs is not x[rows]), from x's candidates ``c`` instead of a new Gram matrix.

    A row's nearest neighbours among the rows are the first of its candidates that are among them, re-scored
    on xs. That is exact when the k-th of those beats every other row j, which a bound shows. No candidate's
    absent j has xᵢ·xⱼ above f = ``c.beyond``, and δᵢ = ‖xsᵢ − xᵢ‖ (x meaning x[rows] here) bounds how far
    each row moved, so xsᵢ·xsⱼ is at most
    - f + δᵢ‖xsⱼ‖ + ‖xᵢ‖δⱼ (the products' difference, term by term), and at most
    - (‖xsᵢ‖² + ‖xsⱼ‖² − (‖xᵢ − xⱼ‖ − δᵢ − δⱼ)²)/2 with ‖xᵢ − xⱼ‖² ≥ ‖xᵢ‖² + ‖xⱼ‖² − 2f (the distances'):
      for unit rows the second is smaller by about ‖xᵢ − xⱼ‖, which is small for near neighbours.
    Rows the bound does not clear (and rows with fewer than k candidates among the rows) are computed from
    their whole rows (``_graph``). CANDIDATES·k candidates hold 2.5k of a 0.63·n bootstrap subsample's rows
    on average: the k-th usually lies well inside.
    """
    (n, d), m = x.shape, xs.shape[0]
    pos = torch.full((n,), -1, dtype=torch.long, device=xs.device)
    pos[rows] = torch.arange(m, device=xs.device)
    cols = pos.index_select(0, c.idx.index_select(0, rows).view(-1)).view(m, -1)   # −1: not among the rows
    xs64 = xs.double()
    sq_s, delta = xs64.square().sum(dim=1), (xs64 - x.index_select(0, rows).double()).norm(dim=1)
    moved = bool(delta.max() > 0)          # else (no clamp, or a permutation) x's own values serve
    vals, order = (None if moved else c.vals.index_select(0, rows)), c.order.index_select(0, rows)
    if not bool((rows[1:] > rows[:-1]).all()):                 # columns ascend with the rows (−1s aside)
        cols, perm = cols.sort(dim=1)
        vals = None if moved else vals.gather(1, perm)
        places = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
        order = torch.empty_like(perm).scatter_(1, perm, places).gather(1, order)    # the same ranking, re-placed
    vals = _candidate_dots(xs64, cols) if moved else vals.masked_fill_(cols < 0, -math.inf)
    f = c.beyond.index_select(0, rows)
    by_products = f + delta * sq_s.max().sqrt() + c.sq.max().sqrt() * delta.max()
    dist = (c.sq.index_select(0, rows) + c.sq.min() - 2 * f).clamp(min=0).sqrt()
    by_distances = (sq_s + sq_s.max() - (dist - delta - delta.max()).clamp(min=0).square()) / 2
    bound = torch.minimum(by_products, by_distances) + _rounding(d, torch.float64, sq_s)
    return _graph(xs64, vals, cols, k, bound, order)


# ---------------------------------------------------------------------------------------------
#                       HSIC_u on kNN-masked kernels: the CKNNA similarity
# ---------------------------------------------------------------------------------------------

def _hsic_u_terms(n, trace, sum_x, sum_y, cross) -> float:
    """HSIC_u of Song et al. 2012 (JMLR 13, eq. 5) from its four sums (X̃, Ỹ zero-diagonal):

        HSIC_u = [ Σᵢⱼ X̃ᵢⱼỸⱼᵢ + (1ᵀX̃1)(1ᵀỸ1) / ((n−1)(n−2)) − 2 (1ᵀX̃)(Ỹ1) / (n−2) ] / (n(n−3))
    """
    return float((trace + sum_x * sum_y / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2))
                 / (n * (n - 3)))


def _find(idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each cols[e] sits in the sorted neighbour list of row rows[e] (a flat position in idx), and whether
    it is there. (index_select, here and below: indexing with a tensor is several times slower on the CPU.)"""
    lists = idx.index_select(0, rows)
    pos = torch.searchsorted(lists, cols.unsqueeze(1)).clamp_(max=idx.shape[1] - 1)
    return rows * idx.shape[1] + pos.squeeze(1), lists.gather(1, pos).squeeze(1) == cols


@dataclass
class _Intersection:
    """M = N_a ∩ N_b row by row, as entries of a's graph: ``entries`` (flat positions in a.idx), and where each
    sits in b's graph (``pos_b``, flat)."""

    entries: torch.Tensor
    pos_b: torch.Tensor


def _intersect(a: KnnGraph, b: KnnGraph) -> _Intersection:
    if b is a:                                   # N_K ∩ N_K = N_K: every entry, at its own position
        every = torch.arange(a.n * a.k, device=a.idx.device)
        return _Intersection(every, every)
    pos = torch.searchsorted(b.idx, a.idx).clamp_(max=b.k - 1)        # row i of a searched in row i of b
    entries = (b.idx.gather(1, pos) == a.idx).view(-1).nonzero().squeeze(1)
    return _Intersection(entries, entries // a.k * b.k + pos.view(-1).index_select(0, entries))


def _masked_hsic(a: KnnGraph, b: KnnGraph, m: _Intersection) -> float:
    """S(K, L) = HSIC_u(M∘K, M∘L), with M = N_K ∩ N_L (row-wise, not symmetrised), in O(n·k·log k).

    X = M∘K and Y = M∘L are non-zero only on M's entries (at most k per row, none on the
    diagonal, so X̃ = X). The trace term pairs entry (i, j) of X with entry (j, i) of Y: it is
    non-zero only when M holds both (i, j) and (j, i), which a binary search of i in row j of both
    graphs finds. Y's transposed value is read from b's graph, not assumed equal to
    L[i, j], so the sum is exactly Σᵢⱼ XᵢⱼYⱼᵢ even where floating-point K is not symmetric.
    Values and sums are float64.
    """
    n, e = a.n, m.entries
    rows, cols = e // a.k, a.idx.view(-1).index_select(0, e)             # M's entries (i, j)
    x = a.vals.view(-1).index_select(0, e)                               # X on them
    y = b.vals.view(-1).index_select(0, m.pos_b)                         # Y on them
    t_pos_a, t_in_a = _find(a.idx, cols, rows)                           # is (j, i) in N_a, in N_b?
    t_pos_b, t_in_b = (t_pos_a, t_in_a) if b is a else _find(b.idx, cols, rows)
    y_t = torch.where(t_in_a & t_in_b, b.vals.view(-1).index_select(0, t_pos_b), 0.0)    # Y[j, i]
    zeros = torch.zeros(n, dtype=torch.float64, device=x.device)
    col_sum_x, row_sum_y = zeros.index_add(0, cols, x), zeros.index_add(0, rows, y)
    return _hsic_u_terms(n, (x * y_t).sum(), x.sum(), y.sum(), col_sum_x @ row_sum_y)


# ---------------------------------------------------------------------------------------------
#                      CKA from feature cross-covariances (no n x n matrix)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Centred:
    """What linear CKA needs from one (preprocessed) feature matrix.

    Both HSIC estimators are unchanged by translating the features (a translation adds
    aᵢ + aⱼ + c to Kᵢⱼ, which centring / U-centring removes), so the columns are centred once;
    that also keeps float32 sums free of the large common offset of positive activations.
    """

    z: torch.Tensor    # (n, d) column-centred features
    r: torch.Tensor    # (n,) float64: Kᵢᵢ = ‖zᵢ‖²
    u: torch.Tensor    # (n,) float64: K̃1 = z(zᵀ1) − diag(K)
    s: torch.Tensor    # ()  float64: 1ᵀK̃1


@exact_float32()
def _centre(x: torch.Tensor) -> _Centred:
    z = x.double()
    z = z - z.mean(dim=0)
    r = z.square().sum(dim=1)
    u = z @ z.sum(dim=0) - r
    return _Centred(z.to(x.dtype), r, u, u.sum())


@exact_float32()
def _cross_frobenius(za: torch.Tensor, zb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """‖zaᵀ·zb‖²_F = Σᵢⱼ KᵢⱼLᵢⱼ, in chunks of za's columns so a raw-pixel width stays in memory."""
    total = torch.zeros((), dtype=torch.float64, device=za.device)
    for c0 in range(0, za.shape[1], chunk):
        total += (za[:, c0:c0 + chunk].T @ zb).double().square().sum()
    return total


def _hsic_pair(a: _Centred, b: _Centred) -> tuple[float, float]:
    """(biased, unbiased) HSIC of the linear kernels of a and b.

    biased:   tr(KHLH) = ‖Zaᵀ Zb‖²_F for column-centred Z (Gretton et al. 2005; the 1/(n−1)² factor
              cancels in CKA and is dropped);
    unbiased: HSIC_u with Σ K̃ᵢⱼL̃ᵢⱼ = ‖Zaᵀ Zb‖²_F − Σᵢ KᵢᵢLᵢᵢ and (1ᵀK̃)(L̃1) = (K̃1)·(L̃1).
    """
    n = a.z.shape[0]
    fro = _cross_frobenius(a.z, b.z)
    hsic_u = _hsic_u_terms(n, fro - a.r @ b.r, a.s, b.s, a.u @ b.u)
    return float(fro), hsic_u


# ---------------------------------------------------------------------------------------------
#                   The registry of alignment metrics (one entry per measure)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """An alignment measure between two feature matrices of the same images.

    ``part`` names what the measure needs of each (preprocessed) matrix; ``prepare(x, k)`` computes it,
    once per matrix. Measures share a part only on purpose: when they declare the same part name with the same
    ``prepare`` and ``subset`` functions (``part_key``; CKNNA and mutual kNN share the kNN graph), so a measure
    that merely reuses a name, say "centred", gets a part of its own. ``score(a, b, shared)`` compares the parts
    of a source ``a`` and a target ``b``; ``shared`` is a dict that lives for one pair and one part, for
    intermediate results the measures of that part have in common. A new measure is
    one file that calls ``register_metric`` (docs/metrics.md); analyze, compare and the trainer's analysis
    then offer it under its name.
    """

    name: str
    label: str                                   # how reports name it
    part: str
    prepare: Callable[[torch.Tensor, int], Any]
    score: Callable[[Any, Any, dict], float]
    uses_k: bool = False                         # depends on the number of neighbours k
    min_n: int = 2                               # fewest images it is defined for
    symmetric: bool = False                      # score(a, b) == score(b, a) exactly
    # (the full sample's part, rows, those rows' prepared features, k) → prepare(those features, k), derived more
    # cheaply from the full sample's part (FeatureKernel.subset); None: prepared anew
    subset: Callable[[Any, torch.Tensor, torch.Tensor, int], Any] | None = None

    @property
    def part_key(self) -> tuple:
        """What the part is filed under: its name and the functions that make it (see the class docstring)."""
        return self.part, self.prepare, self.subset


METRICS: Registry[Metric] = Registry("alignment metric")


def register_metric(metric: Metric, *, priority: int = 0, overwrite: bool = False) -> Metric:
    return METRICS.register(metric.name, metric, priority=priority, overwrite=overwrite)


def _shared(shared: dict, key: str, compute: Callable[[], Any]) -> Any:
    if key not in shared:
        shared[key] = compute()
    return shared[key]


@dataclass
class _KnnPart:
    graph: KnnGraph
    s_self: float                          # S(K, K) = HSIC_u(N_K∘K, N_K∘K)
    x: torch.Tensor | None = None          # the prepared features and each row's CANDIDATES·k nearest: what
    candidates: _Candidates | None = None  # a subset's graph is derived from (none kept for a subset's own)


def _with_s_self(g: KnnGraph, **kw) -> _KnnPart:
    return _KnnPart(g, _masked_hsic(g, g, _intersect(g, g)), **kw)


def _knn_part(x: torch.Tensor, k: int) -> _KnnPart:
    c = _candidates(x, min(CANDIDATES * k, x.shape[0] - 1))
    return _with_s_self(_graph(x.double(), c.vals, c.idx, k, c.beyond, c.order), x=x, candidates=c)


def _knn_subset(full: _KnnPart, rows: torch.Tensor, xs: torch.Tensor, k: int) -> _KnnPart:
    return _with_s_self(_subset_graph(full.x, full.candidates, rows, xs, k))


@dataclass
class _CentredPart:
    centred: _Centred
    hsic_self: tuple[float, float]   # (biased, unbiased) HSIC(K, K)


def _centred_part(x: torch.Tensor, k: int) -> _CentredPart:
    c = _centre(x)
    return _CentredPart(c, _hsic_pair(c, c))


def _cknna(a: _KnnPart, b: _KnnPart, shared: dict) -> float:
    """S(K, L) / (√(S(K, K)·S(L, L)) + 1e-6); S(X, Y) = HSIC_u(M∘X, M∘Y), M = N_K ∩ N_L row-wise."""
    m = _shared(shared, "intersection", lambda: _intersect(a.graph, b.graph))
    return _masked_hsic(a.graph, b.graph, m) / (math.sqrt(a.s_self * b.s_self) + EPS)


def _mutual_knn(a: _KnnPart, b: _KnnPart, shared: dict) -> float:
    """(1/n) Σᵢ |N_K(i) ∩ N_L(i)| / k."""
    m = _shared(shared, "intersection", lambda: _intersect(a.graph, b.graph))
    return len(m.entries) / (a.graph.n * a.graph.k)


def _cka(a: _CentredPart, b: _CentredPart, shared: dict) -> float:
    """tr(KHLH) / √(tr(KHKH)·tr(LHLH)); nan where either side is constant over the images (no kernel to align)."""
    biased, _ = _shared(shared, "hsic", lambda: _hsic_pair(a.centred, b.centred))
    norm = math.sqrt(a.hsic_self[0] * b.hsic_self[0])
    return biased / norm if norm > 0 else float("nan")


def _cka_unbiased(a: _CentredPart, b: _CentredPart, shared: dict) -> float:
    """HSIC_u(K, L) / (√(HSIC_u(K, K)·HSIC_u(L, L)) + 1e-6)."""
    _, unbiased = _shared(shared, "hsic", lambda: _hsic_pair(a.centred, b.centred))
    return unbiased / (math.sqrt(a.hsic_self[1] * b.hsic_self[1]) + EPS)


def _subspace_part(x: torch.Tensor, k: int) -> torch.Tensor:
    """An orthonormal basis (n, r) of the top r ≤ SVCCA_DIMS left singular vectors of x with every column
    centred and scaled to unit (unbiased) standard deviation (+1e-8), in float64, from the eigenvectors of
    the smaller of its two Gram matrices; fewer than SVCCA_DIMS where x spans fewer directions (singular
    values below 1e-5 of the largest are no directions: their vectors would be arbitrary)."""
    z = x.double()
    z = z - z.mean(0)
    z = z / (z.std(0) + 1e-8)
    n, d = z.shape
    s2, v = torch.linalg.eigh(z @ z.T if n <= d else z.T @ z)     # eigenvalues ascending: the top ones last
    keep = s2[-SVCCA_DIMS:] > s2[-1] * 1e-10
    s2, v = s2[-SVCCA_DIMS:][keep], v[:, -SVCCA_DIMS:][:, keep]
    return v if n <= d else z @ v / s2.sqrt()


def _svcca(a: torch.Tensor, b: torch.Tensor, shared: dict) -> float:
    """The mean canonical correlation of the two subspaces: the singular values of UaᵀUb."""
    return float(torch.linalg.svdvals(a.T @ b).clamp(max=1.0).mean())


register_metric(Metric("cknna", "CKNNA", "knn", _knn_part, _cknna, uses_k=True, min_n=4, subset=_knn_subset))
register_metric(Metric("cka", "CKA (biased)", "centred", _centred_part, _cka, symmetric=True))
register_metric(Metric("cka_unbiased", "CKA (unbiased)", "centred", _centred_part, _cka_unbiased, min_n=4,
                       symmetric=True))
register_metric(Metric("mutual_knn", "mutual k-NN", "knn", _knn_part, _mutual_knn, uses_k=True, symmetric=True,
                       subset=_knn_subset))
register_metric(Metric("svcca", "SVCCA", "subspace", _subspace_part, _svcca, min_n=3, symmetric=True))


# ---------------------------------------------------------------------------------------------
#                      One feature matrix, prepared once, compared many times
# ---------------------------------------------------------------------------------------------

def _check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """The named metrics (all registered ones for None), each checked to exist."""
    if metrics is None:
        return tuple(METRICS)
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown alignment metric(s) {unknown}; choose from {list(METRICS)}")
    return tuple(metrics)


def _check_shape(x_shape, k: int, metrics: Sequence[str], what: str) -> int:
    if len(x_shape) != 2:
        raise UserError(f"{what} must be a 2-D (images, dims) matrix, got shape {tuple(x_shape)}")
    n = x_shape[0]
    need = max(METRICS[m].min_n for m in metrics)
    if n < need:
        raise UserError(f"{what} has n={n} images; {', '.join(metrics)} needs n >= {need}")
    if any(METRICS[m].uses_k for m in metrics) and not 1 <= k <= n - 1:
        raise UserError(f"k={k} nearest neighbours needs 1 <= k <= n-1, but {what} has n={n} images")
    return n


@dataclass
class FeatureKernel:
    """Everything the requested metrics need from one feature matrix (its prepared parts, by Metric.part_key).

    Build it once for the target encoder and reuse it against every block and noise level.
    """

    n: int
    k: int
    metrics: tuple[str, ...]
    preprocessing: tuple[bool, bool] = (True, True)  # (clamp, normalize) it was built with
    parts: dict[tuple, Any] = field(default_factory=dict)
    feats: torch.Tensor | None = None                # the features as given, for ``subset`` (a subset has none)

    @classmethod
    def build(cls, feats, k: int = 10, metrics: Sequence[str] | None = None, clamp: bool = True,
              normalize: bool = True, device: torch.device | str | None = None,
              block: int | None = None, what: str = "features") -> "FeatureKernel":
        """Preprocess ``feats`` (n, d) and prepare the parts that ``metrics`` use."""
        metrics = _check_metrics(metrics)
        _check_shape(tuple(feats.shape), k, metrics, what)
        feats = _to_tensor(feats, torch.device(device) if device is not None else _default_device(feats))
        x = prepare_features(feats, clamp=clamp, normalize=normalize)
        if not bool(torch.isfinite(x.sum(dtype=torch.float64))):    # NaN or ±inf anywhere (float64: no overflow)
            raise UserError(f"{what} contain NaN or inf values (float16 overflow while capturing?)")
        return cls._assembled(x, k, metrics, (clamp, normalize), lambda metric: metric.prepare(x, k), feats)

    @classmethod
    def _assembled(cls, x: torch.Tensor, k: int, metrics: tuple[str, ...], preprocessing: tuple[bool, bool],
                   part: Callable[[Metric], Any], feats: torch.Tensor | None = None) -> "FeatureKernel":
        fk = cls(x.shape[0], k, metrics, preprocessing, feats=feats)
        for m in metrics:
            if METRICS[m].part_key not in fk.parts:
                fk.parts[METRICS[m].part_key] = part(METRICS[m])
        return fk

    def subset(self, rows: np.ndarray, what: str = "subset") -> "FeatureKernel":
        """The kernel of these rows of the features it was built from: ``build(feats[rows])`` to float rounding
        (the rows are prepared on their own, clamp threshold included), but the parts with a ``subset`` rule
        (the kNN graph) are derived from this kernel's, not computed anew. Distinct rows in any order (a
        permutation gives a permuted target); rows with repeats (a classic bootstrap) are built anew."""
        if self.feats is None:
            raise ValueError("a kernel made by subset() has no subsets; take the rows of the full sample's kernel")
        index = torch.as_tensor(rows, device=self.feats.device)
        if len(np.unique(rows)) < len(rows):
            return FeatureKernel.build(self.feats[index], self.k, self.metrics, *self.preprocessing, what=what)
        _check_shape((len(rows), self.feats.shape[1]), self.k, self.metrics, what)
        x = prepare_features(self.feats.index_select(0, index), *self.preprocessing)

        def part(metric: Metric):
            if metric.subset is None:
                return metric.prepare(x, self.k)
            return metric.subset(self.parts[metric.part_key], index, x, self.k)
        return FeatureKernel._assembled(x, self.k, self.metrics, self.preprocessing, part)


def pair_scores(a: FeatureKernel, b: FeatureKernel, metrics: Sequence[str] | None = None
                ) -> dict[str, float]:
    """All requested metrics between two prepared matrices; K comes from ``a``, L from ``b``.

    cknna        = S(K, L) / (√(S(K, K)·S(L, L)) + 1e-6)
    cka          = tr(KHLH) / √(tr(KHKH)·tr(LHLH))
    cka_unbiased = HSIC_u(K, L) / (√(HSIC_u(K, K)·HSIC_u(L, L)) + 1e-6)
    mutual_knn   = (1/n) Σᵢ |N_K(i) ∩ N_L(i)| / k
    svcca        = mean singular value of UaᵀUb, U the top 10 left singular vectors (column-standardised)
    CKNNA is very slightly asymmetric (the (1ᵀX̃)(Ỹ1) term); ``alignment`` puts the model in K and
    the target encoder in L. The 1e-6 guards follow platonic-rep; they make CKNNA with k = n − 1
    equal unbiased CKA exactly.
    """
    metrics = _check_metrics(metrics)
    if a.n != b.n:
        raise UserError(f"feature matrices disagree on the number of images ({a.n} vs {b.n}); "
                        "both must hold the same images in the same order")
    if any(METRICS[m].uses_k for m in metrics) and a.k != b.k:
        raise ValueError(f"both FeatureKernels need the same k for {[m for m in metrics if METRICS[m].uses_k]}")
    shared: dict = {}                       # per part: what the measures of one part have in common
    out = {}
    for m in metrics:
        part = METRICS[m].part_key
        if part not in a.parts or part not in b.parts:
            raise ValueError(f"both FeatureKernels need their '{part[0]}' part for {m}")
        out[m] = METRICS[m].score(a.parts[part], b.parts[part], shared.setdefault(part, {}))
    return out


# ---------------------------------------------------------------------------------------------
#                                   One-pair API
# ---------------------------------------------------------------------------------------------

def _one_pair(metric: str, feats_a, feats_b, k: int, clamp: bool, normalize: bool,
              device) -> float:
    device = torch.device(device) if device is not None else _default_device(feats_a)
    if feats_a.shape[0] != feats_b.shape[0]:
        raise UserError(f"feature matrices disagree on the number of images "
                        f"({feats_a.shape[0]} vs {feats_b.shape[0]}); both must hold the same "
                        "images in the same order")
    kw = dict(k=k, metrics=(metric,), clamp=clamp, normalize=normalize, device=device)
    a = FeatureKernel.build(feats_a, what="feats_a", **kw)
    b = FeatureKernel.build(feats_b, what="feats_b", **kw)
    return pair_scores(a, b, (metric,))[metric]


def cknna(feats_a, feats_b, k: int = 10, clamp: bool = True, normalize: bool = True,
          device: torch.device | str | None = None) -> float:
    """CKNNA(k) of Huh et al. 2024 (platonic-rep ``cknna(topk=k, unbiased=True)``).

    With M = N_K ∩ N_L (row-wise k nearest neighbours, self excluded) and S(X, Y) =
    HSIC_u(M∘X, M∘Y):  CKNNA = S(K, L) / (√(S(K, K)·S(L, L)) + 1e-6), where S(K, K) masks with N_K
    alone. With k = n − 1 it is unbiased linear CKA. O(n²·d) for the Gram, O(n·k log n) after.
    """
    return _one_pair("cknna", feats_a, feats_b, k, clamp, normalize, device)


def cka(feats_a, feats_b, unbiased: bool = False, clamp: bool = True, normalize: bool = True,
        device: torch.device | str | None = None) -> float:
    """Linear CKA (Kornblith et al. 2019): tr(KHLH) / √(tr(KHKH)·tr(LHLH)), H = I − 11ᵀ/n;
    ``unbiased=True`` replaces tr(KHLH) by HSIC_u (Song et al. 2012) and adds 1e-6 to the
    denominator (platonic-rep's ``unbiased_cka``). O(n·d_a·d_b)."""
    metric = "cka_unbiased" if unbiased else "cka"
    return _one_pair(metric, feats_a, feats_b, 10, clamp, normalize, device)


def mutual_knn(feats_a, feats_b, k: int = 10, clamp: bool = True, normalize: bool = True,
               device: torch.device | str | None = None) -> float:
    """Mutual kNN accuracy (Huh et al. 2024): (1/n) Σᵢ |N_A(i) ∩ N_B(i)| / k, self excluded."""
    return _one_pair("mutual_knn", feats_a, feats_b, k, clamp, normalize, device)


def svcca(feats_a, feats_b, clamp: bool = True, normalize: bool = True,
          device: torch.device | str | None = None) -> float:
    """SVCCA (Raghu et al. 2017; the definition of platonic-rep's ``svcca(cca_dim=10)``, computed exactly): the
    mean canonical correlation between the top 10 left singular vectors of each column-standardised matrix."""
    return _one_pair("svcca", feats_a, feats_b, 10, clamp, normalize, device)


# ---------------------------------------------------------------------------------------------
#                     Batched API: one target against a stack of sources
# ---------------------------------------------------------------------------------------------

def _leading(x) -> tuple[int, ...]:
    if x.ndim < 2:
        raise UserError(f"features must have shape (..., images, dims), got {tuple(x.shape)}")
    return tuple(x.shape[:-2])


View = tuple[np.ndarray | None, FeatureKernel]   # (rows of every source or None for all, a target kernel of them)


def alignment(target, sources, metrics: Sequence[str] | None = None, k: int = 10,
              clamp: bool = True, normalize: bool = True,
              device: torch.device | str | None = None, block: int | None = None,
              null_targets: Sequence["FeatureKernel"] | None = None, views: Sequence[View] | None = None,
              split: bool = False, desc: str | None = None):
    """Every metric between one target (n, d_t) and each (n, d) matrix of ``sources`` (..., n, d).

    ``target`` may be a ``FeatureKernel`` built earlier (then its k / metrics must cover these);
    ``sources`` may be a numpy array, a float16 ``np.memmap`` (the feature store's layout, e.g.
    [n_t, n_blocks, n, d]) or a torch tensor. The target is prepared once; sources are prepared
    one at a time, so memory is O(n·(d + CANDIDATES·k + block)) beyond the views, never O(n²) or
    O(sources·n·d). Returns {metric: array of shape sources.shape[:-2]} (float64). CKNNA puts each source
    in K and the target in L.
    ``views``: (rows, kernel) pairs; each source is also scored on its rows ``rows`` (None: all of them)
    against ``kernel``, a kernel of the target's same rows: a subsample's (``target.subset(rows)``, see
    ``bootstrap_alignment``) or a permuted target's (``permuted_targets``, rows None; ``null_targets`` are
    such views). The source's kernel of its rows comes from its full-sample kernel (``FeatureKernel.subset``).
    With views (or null targets), ({metric: values}, {metric: [len(views), ...] values}) is returned.
    ``split``: under torchrun (a process group), every rank calls this with the same arguments, each one
    scores its share of the sources, and every rank returns all the values (a process that runs alone, like
    a trainer's main rank, leaves it off). ``desc``: a progress bar with this label.
    """
    from tqdm.auto import tqdm
    metrics = _check_metrics(metrics)
    if device is None:
        device = _default_device(sources)
    lead = _leading(sources)
    if isinstance(target, FeatureKernel):
        tgt = target
        if (any(METRICS[m].uses_k for m in metrics) and tgt.k != k) or \
                not set(metrics) <= set(tgt.metrics) or tgt.preprocessing != (clamp, normalize):
            raise ValueError(f"the prepared target has k={tgt.k}, metrics={tgt.metrics}, "
                             f"(clamp, normalize)={tgt.preprocessing}; asked for k={k}, "
                             f"metrics={metrics}, (clamp, normalize)={(clamp, normalize)}")
    else:
        tgt = FeatureKernel.build(target, k, metrics, clamp, normalize, device, block, "target")
    if sources.shape[-2] != tgt.n:
        raise UserError(f"target has {tgt.n} images but sources have {sources.shape[-2]}; "
                        "both must hold the same images in the same order")
    given = views is not None or null_targets is not None
    views = [*((None, p) for p in null_targets or ()), *(views or ())]
    out = {m: np.zeros(lead, dtype=np.float64) for m in metrics}
    other = {m: np.zeros((len(views),) + lead, dtype=np.float64) for m in metrics}
    ranks = world_size() if split else 1
    mine = list(np.ndindex(*lead))[rank() if split else 0::ranks]      # this rank's share of blocks × t
    for index in tqdm(mine, desc=desc, disable=desc is None, unit="matrix", dynamic_ncols=True):
        what = f"sources{list(index)}"
        src = FeatureKernel.build(sources[index], k, metrics, clamp, normalize, device, block, what)
        for m, v in pair_scores(src, tgt, metrics).items():
            out[m][index] = v
        for p, (rows, kernel) in enumerate(views):
            for m, v in pair_scores(src if rows is None else src.subset(rows, what), kernel, metrics).items():
                other[m][(p,) + index] = v
    if ranks > 1:
        gather_ranks([*out.values(), *other.values()])
    return (out, other) if given else out


def gather_ranks(arrays: list[np.ndarray]) -> None:
    """Each rank filled the entries of its own sources (zeros elsewhere): give every rank all of them, in
    place. A sum with one non-zero term per entry is exact."""
    total, offset = sum_over_ranks_array(np.concatenate([a.ravel() for a in arrays])), 0
    for a in arrays:
        a.flat[:] = total[offset:offset + a.size]
        offset += a.size


def permuted_targets(target, draws: int, seed: int, k: int = 10, metrics: Sequence[str] | None = None,
                     clamp: bool = True, normalize: bool = True,
                     device: torch.device | str | None = None) -> list["FeatureKernel"]:
    """The permutation null (docs/statistics.md): `draws` kernels of the target (n, d_t) with its rows
    shuffled by seeded permutations, so each image is paired with another image's target features.
    The same (n, seed) gives the same permutations for every checkpoint. ``target`` may be a
    ``FeatureKernel`` built earlier (k, metrics and preprocessing are then its own): a permuted target's
    kNN graph is the target's, re-indexed (``FeatureKernel.subset``), not a new one."""
    if not isinstance(target, FeatureKernel):
        target = FeatureKernel.build(target, k, metrics, clamp, normalize, device, what="target")
    rng = np.random.default_rng([seed, 104729])
    return [target.subset(rng.permutation(target.n), f"permuted target {p}") for p in range(draws)]


def similarity_matrix(feats_a, feats_b=None, metric: str = "cknna", k: int = 10,
                      clamp: bool = True, normalize: bool = True,
                      device: torch.device | str | None = None, block: int | None = None
                      ) -> np.ndarray:
    """Block x block similarity: out[i, j] = metric(a_i, b_j) for a_i in feats_a, b_j in feats_b.

    ``feats_a`` / ``feats_b``: an array (blocks, n, d) or a list of (n, d_i) matrices (widths may
    differ, e.g. model vs encoder). ``feats_b=None`` compares feats_a with itself (one model's
    blocks); CKA is symmetric there, so only the upper triangle is computed. Each block is
    prepared once (kNN graph or centred features), so a CKNNA pair costs O(n·k log n).
    """
    (metric,) = _check_metrics((metric,))
    device = torch.device(device) if device is not None else _default_device(feats_a[0])

    def prepare(stack, name):
        return [FeatureKernel.build(f, k, (metric,), clamp, normalize, device, block,
                                    f"{name}[{i}]") for i, f in enumerate(stack)]

    same = feats_b is None
    ka = prepare(feats_a, "feats_a")
    kb = ka if same else prepare(feats_b, "feats_b")
    out = np.empty((len(ka), len(kb)))
    for i, a in enumerate(ka):
        for j, b in enumerate(kb):
            if same and METRICS[metric].symmetric and j < i:
                out[i, j] = out[j, i]
            else:
                out[i, j] = pair_scores(a, b, (metric,))[metric]
    return out


# ---------------------------------------------------------------------------------------------
#                                   Bootstrap confidence intervals
# ---------------------------------------------------------------------------------------------

def take_rows(x, idx: np.ndarray):
    """Rows ``idx`` of a numpy array, memmap or tensor (on the tensor's device)."""
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(idx).to(x.device)]
    return np.asarray(x[idx])


def _replicates(n: int, n_boot: int, seed: int, dedupe: bool) -> list[np.ndarray]:
    """The image indices of each bootstrap replicate (see ``bootstrap_ci``)."""
    return stats.subsamples(n, n_boot, seed) if dedupe else list(stats.resamples(n, n_boot, seed))


def _interval(reps: np.ndarray, level: float, around, n: int, draws: list[np.ndarray], dedupe: bool) -> np.ndarray:
    """The interval over the first axis of the replicate values ``reps`` → (..., 2) = (low, high):
    subsamples (dedupe): centred on ``around`` with the spread rescaled to n images (stats.py); classic
    replicates: centred on ``around`` if given, else the plain percentile interval."""
    if dedupe:
        return stats.centred_interval(around, reps, stats.subsample_scale([len(d) for d in draws], n), level)
    if around is not None:
        return stats.centred_interval(around, reps, None, level)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1.0 - level) / 2.0
    return np.moveaxis(np.quantile(reps, [alpha, 1.0 - alpha], axis=0), 0, -1)


def bootstrap_ci(metric_fn: Callable[..., float], feats_a, feats_b, n_boot: int = 200,
                 seed: int = 0, level: float = 0.95, dedupe: bool = True,
                 around: float | None = None) -> tuple[float, float]:
    """Bootstrap interval of ``metric_fn(feats_a, feats_b)`` over images (docs/statistics.md).

    Each replicate draws n image indices with replacement (numpy generator seeded with ``seed``)
    and applies the same rows to both sides, so the pairing of images is kept.
    Duplicates: in a plain bootstrap about 63% of the rows have a copy, and copies are identical
    rows, so Kᵢⱼ = Lᵢⱼ = 1 for them on both sides: they are each other's nearest neighbours and
    a perfectly aligned off-diagonal pair. That pushes every metric here up (CKNNA by ~0.1–0.2 on
    weakly aligned features, unbiased CKA by a few hundredths). So by default (``dedupe=True``) each
    drawn image is kept once: a subsample of m ≈ 0.63·n distinct images. The interval is then the
    full-sample value (``around``, computed if not given) plus the quantiles of √(m/(n − m))·(replicate −
    mean of replicates): the subsample's spread rescaled to n images and centred on the estimate, which
    also removes the shift in level that a kNN metric has at m images. ``dedupe=False`` gives the classic
    bootstrap (percentile interval, or centred on ``around``).
    """
    n = feats_a.shape[0]
    if dedupe and around is None:
        around = metric_fn(feats_a, feats_b)
    draws = _replicates(n, n_boot, seed, dedupe)
    reps = np.asarray([metric_fn(take_rows(feats_a, idx), take_rows(feats_b, idx)) for idx in draws])
    low, high = _interval(reps, level, around, n, draws, dedupe)
    return float(low), float(high)


def bootstrap_alignment(target, sources, metrics: Sequence[str] = ("cknna",), k: int = 10,
                        n_boot: int = 20, seed: int = 0, level: float = 0.95, dedupe: bool = True,
                        around: dict[str, np.ndarray] | None = None, clamp: bool = True,
                        normalize: bool = True, device: torch.device | str | None = None,
                        desc: str | None = None, replicates: bool = False):
    """``bootstrap_ci`` of every metric for every source (..., n, d) against one target (n, d_t),
    sharing the work: every source uses the same replicates (same seed), so the target's kernel
    of each replicate is built once, and each source's full-sample kernel once, from which its kernel of
    every replicate is derived (``alignment`` with views). ``around``: {metric: full-sample values, shape
    sources.shape[:-2]}; by default the ones computed here.
    Returns {metric: (..., 2) array of (low, high)}, equal to ``bootstrap_ci`` pair by pair, and with
    ``replicates=True`` also {metric: (n_boot, ...) the metric on each replicate}.
    ``desc``: show a progress bar over the sources with this label.
    """
    metrics = _check_metrics(metrics)
    device = torch.device(device) if device is not None else _default_device(sources)
    n = sources.shape[-2]
    draws = _replicates(n, n_boot, seed, dedupe)
    tgt = FeatureKernel.build(target, k, metrics, clamp, normalize, device, what="target")
    values, reps = alignment(tgt, sources, metrics, k, clamp, normalize, device, desc=desc,
                             views=[(idx, tgt.subset(idx, "target")) for idx in draws])
    if dedupe and around is None:
        around = values
    intervals = {m: _interval(reps[m], level, None if around is None else around[m], n, draws, dedupe)
                 for m in metrics}
    return (intervals, reps) if replicates else intervals


#################################################################################
#                 Dispersion: one representation, no target                     #
#################################################################################

DISPERSIVE_VARIANTS = ("infonce-l2", "infonce-cos")


def dispersive_loss(z: torch.Tensor, tau: float = 1.0, variant: str = "infonce-l2") -> torch.Tensor:
    """Dispersive Loss (Wang & He 2025, arXiv 2506.09027) of a batch z (B, T, D) (or any (B, ...)), flattened to
    z_i ∈ R^M: log( (1/B²) Σ_i Σ_j exp(−‖z_i − z_j‖² / M / τ) ) (infonce-l2), or with cos(z_i, z_j) / τ in the
    exponent (infonce-cos); 0 when the rows coincide. What the trainer's --dispersive term minimises
    (train/terms/dispersive.py) and the dispersion measure reports (measures.py). A float32 scalar. The B × B Gram matrix is taken in
    float64 (‖z_i‖² + ‖z_j‖² − 2 z_i·z_j cancels), with an exact zero diagonal (what the authors' pdist leaves
    out and pads back), whose gradient is then zero rather than sqrt's 0/0."""
    z = z.double().flatten(1)                                          # (B, T·D)
    gram = z @ z.T                                                     # (B, B)
    norms = gram.diagonal()
    if variant == "infonce-l2":
        off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
        squared = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0) * off
        logits = -squared / z.shape[1]                                 # −‖z_i − z_j‖² / (T·D)
    elif variant == "infonce-cos":
        unit = norms.clamp_min(1e-24).rsqrt()
        logits = gram * unit[:, None] * unit[None, :]                  # cos(z_i, z_j)
    else:
        raise ValueError(f"unknown dispersive variant {variant!r}: use one of {', '.join(DISPERSIVE_VARIANTS)}")
    return (torch.logsumexp(logits.flatten() / tau, dim=0) - math.log(logits.numel())).float()
