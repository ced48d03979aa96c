"""Spatial structure of patch tokens: how token similarity depends on where tokens sit (docs/spatial.md).

The measures of Singh et al. 2025, "What matters for Representation Alignment: Global Information or
Spatial Structure?" (arXiv 2512.10794, "iREPA"). The paper's finding is that a target encoder's spatial
structure, the pairwise cosine similarity between its patch tokens and how it falls off with distance,
predicts REPA's generation FID much better than the encoder's ImageNet accuracy does.

Every measure reads one image at a time from its tokens X ∈ R^(T×d), T = H·W, through the cosine kernel

    K(t, t') = ⟨x_t, x_t'⟩ / (‖x_t‖·‖x_t'‖),

and the Manhattan (city-block) distance between the tokens' grid cells, d(t, t') = |i − i'| + |j − j'|.
Tokens are in row-major order (token t = i·W + j sits in row i, column j), as a ViT or a SiT patchifies.
Because only cosines enter, every measure is unchanged by a rotation of the feature space (x ↦ Qx, Q
orthogonal) and by a positive rescaling of any token. A zero token has cosine 0 with everything.

- LDS, local vs distant similarity: mean K of nearby pairs minus mean K of distant pairs;
- CDS, correlation-decay slope: minus the least-squares slope of mean K against distance;
- RMSC, RMS spatial contrast: the spread of the unit tokens around their mean (blind to positions);
- SRSS, semantic-region self-similarity: LDS restricted to a foreground mask (needs the mask, so it
  is not in ``SPATIAL_METRICS`` and no command computes it: a library function for masks of your own).

The definitions follow the authors' release (End2End-Diffusion/iREPA, metrics/spatial_metrics.py), read to
confirm them, not copied; run beside ours they agree to within 1e-7 (docs/spatial.md).

The Gram matrices are formed in full float32 (never TF32) unless the tokens are float64, and summed per
grid distance by one product with a (T², H+W−1) distance indicator in the same precision; the means that
follow divide those sums by pair counts of hundreds or more, so their rounding stays below 1e-7 (tested
against float64 pair loops to 1e-6). No T×T matrix is kept for more than one chunk of images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .registry import Registry
from .metrics import exact_float32

Grid = tuple[int, int]

GRAM_ENTRIES_PER_CHUNK = 2**22   # images per chunk = this // T² (64 images of a 16×16 grid)


# ---------------------------------------------------------------------------------------------
#                                          Helpers
# ---------------------------------------------------------------------------------------------

def _check(tokens, grid: Grid) -> tuple[torch.Tensor, int, int]:
    """tokens as a 3-D tensor (n, H·W, d) in float32, or float64 if given float64."""
    x = torch.as_tensor(tokens)
    if x.ndim != 3:
        raise UserError(f"tokens must be a 3-D (images, H*W tokens, dims) array, got shape {tuple(x.shape)}")
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1 or h * w != x.shape[1]:
        raise UserError(f"grid {h}x{w} does not match {x.shape[1]} tokens per image")
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), h, w


def grid_distances(grid: Grid, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) Manhattan distances |i − i'| + |j − j'| between the cells of a row-major H×W grid."""
    h, w = grid
    i = torch.arange(h, device=device).repeat_interleave(w)
    j = torch.arange(w, device=device).repeat(h)
    return (i[:, None] - i[None, :]).abs() + (j[:, None] - j[None, :]).abs()


def _chunks(n: int, t: int):
    step = max(1, GRAM_ENTRIES_PER_CHUNK // (t * t))
    return (slice(s, min(n, s + step)) for s in range(0, n, step))


@exact_float32()
def _cosine_gram(x: torch.Tensor) -> torch.Tensor:
    """(c, T, T) cosines between the tokens of each image (c, T, d)."""
    u = F.normalize(x, dim=-1)
    return u @ u.transpose(1, 2)


def distance_sums(tokens, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of K(t, t') over the ordered token pairs at each grid distance, per image.

    Returns (sums, counts): sums is (n, H+W−1) float64, sums[b, r] = Σ_{d(t,t')=r} K_b(t, t'); counts
    is (H+W−1,) float64, the number of ordered pairs at distance r (the same for every image). r = 0 is
    the pairs of a token with itself."""
    x, h, w = _check(tokens, grid)
    n, t, _ = x.shape
    dist = grid_distances((h, w), x.device).flatten()
    bins = h + w - 1
    indicator = _distance_indicator((h, w), x.dtype, x.device)
    sums = torch.cat([_binned(_cosine_gram(x[part]).flatten(1), indicator) for part in _chunks(n, t)])
    counts = torch.bincount(dist, minlength=bins).to(torch.float64)
    return sums.to(torch.float64), counts


@functools.lru_cache(maxsize=8)
def _distance_indicator(grid: Grid, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T², H+W−1) one-hot of each ordered pair's grid distance."""
    return F.one_hot(grid_distances(grid, device).flatten(), grid[0] + grid[1] - 1).to(dtype)


@exact_float32()
def _binned(gram: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
    return gram @ indicator


def similarity_profile(tokens, grid: Grid) -> torch.Tensor:
    """Mean cosine of token pairs at each grid distance r = 0 … H+W−2, per image: (n, H+W−1) float64.

    The curve whose fall-off the paper calls spatial structure; entry 0 is 1 for non-zero tokens."""
    sums, counts = distance_sums(tokens, grid)
    return sums / counts


# ---------------------------------------------------------------------------------------------
#                                          Measures
# ---------------------------------------------------------------------------------------------

def local_distant_similarity(tokens, grid: Grid, r_near: int = 2, r_far: int = 6, *,
                             sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """LDS, local vs distant similarity, per image: (n,) float64.

        LDS(X) = E[K(t, t') | 0 < d(t, t') < r_near] − E[K(t, t') | d(t, t') ≥ r_far],

    each expectation a plain mean over all token pairs of the image in that distance band. The paper
    defines LDS this way (its spatial-structure metric, the one reported with |r| > 0.85 against FID).
    Defaults r_near = 2 (the 4-neighbours, d = 1) and r_far = 6 are the authors'. High LDS: neighbouring
    tokens agree and distant ones do not; LDS ≈ 0 when similarity does not depend on position (e.g. the
    tokens shuffled across the grid). `sums`: ``distance_sums(tokens, grid)`` when already computed.
    """
    sums, counts = sums or distance_sums(tokens, grid)
    if not 1 < r_near <= r_far < len(counts):
        raise UserError(f"LDS needs 1 < r_near <= r_far <= H+W-2, got r_near={r_near}, r_far={r_far} "
                        f"on a grid whose largest distance is {len(counts) - 1}")
    near = sums[:, 1:r_near].sum(1) / counts[1:r_near].sum()
    far = sums[:, r_far:].sum(1) / counts[r_far:].sum()
    return near - far


def correlation_decay_slope(tokens, grid: Grid, max_distance: int = 8, *,
                            sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """CDS, correlation-decay slope, per image: (n,) float64.

    With S(r) the mean cosine of the pairs at grid distance r (``similarity_profile``), CDS is minus
    the ordinary least-squares slope of S(r) against r over r = 1 … R, R = min(max_distance, H+W−2),
    every distance weighted equally:

        CDS = − Σ_r (r − r̄)(S(r) − S̄) / Σ_r (r − r̄)².

    High CDS: similarity falls quickly with distance; 0: no fall-off. R = 8 and the unweighted fit are
    the authors'. `sums`: ``distance_sums(tokens, grid)`` when already computed.
    """
    sums, counts = sums or distance_sums(tokens, grid)
    profile = sums / counts
    last = min(max_distance, profile.shape[1] - 1)
    if last < 2:
        raise UserError(f"CDS needs at least two distances, got max_distance={max_distance} on grid {grid}")
    s = profile[:, 1:last + 1]
    r = torch.arange(1, last + 1, dtype=torch.float64, device=s.device)
    r = r - r.mean()
    return -((s - s.mean(1, keepdim=True)) @ r) / (r @ r)


def rms_spatial_contrast(tokens, grid: Grid) -> torch.Tensor:
    """RMSC, RMS spatial contrast, per image: (n,) float64.

    With u_t = x_t/‖x_t‖ and ū their mean over the image's tokens,

        RMSC = √( (1/T) Σ_t ‖u_t − ū‖² ) = √(1 − ‖ū‖²)    (for non-zero tokens),

    0 when all tokens point the same way, √(1 − 1/T) for T orthonormal tokens. It measures how much the
    tokens of one image differ at all, not where: it is unchanged by shuffling tokens across the grid
    (``grid`` is only checked).
    """
    x, _, _ = _check(tokens, grid)
    u = F.normalize(x, dim=-1)     # in the tokens' precision: deviations avoid the cancellation of 1 − ‖ū‖²
    return (u - u.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt().to(torch.float64)


def semantic_region_self_similarity(tokens, grid: Grid, foreground, d_pos: int = 1,
                                    d_neg: int = 6) -> torch.Tensor:
    """SRSS, semantic-region self-similarity, per image: (n,) float64, NaN where undefined.

    For every foreground token t (``foreground``: (n, T) boolean mask), the mean cosine to the
    foreground tokens at distance 1 ≤ d ≤ d_pos minus the mean cosine to the background tokens at
    distance d ≥ d_neg; SRSS is the mean of that difference over the foreground tokens that have
    both kinds of partners (NaN if none does). High SRSS: an object's tokens agree with each other and
    differ from the far background.
    """
    x, h, w = _check(tokens, grid)
    fg = torch.as_tensor(foreground, device=x.device).bool()
    if fg.shape != x.shape[:2]:
        raise UserError(f"foreground mask must be (images, tokens) = {tuple(x.shape[:2])}, "
                        f"got {tuple(fg.shape)}")
    dist = grid_distances((h, w), x.device)
    near = (dist >= 1) & (dist <= d_pos)
    far = dist >= d_neg
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for part in _chunks(x.shape[0], x.shape[1]):
        gram = _cosine_gram(x[part]).to(torch.float64)
        f = fg[part]
        pos = f[:, :, None] & f[:, None, :] & near            # anchor fg, partner fg, near
        neg = f[:, :, None] & ~f[:, None, :] & far            # anchor fg, partner bg, far
        n_pos, n_neg = pos.sum(2), neg.sum(2)
        delta = (gram * pos).sum(2) / n_pos.clamp(min=1) - (gram * neg).sum(2) / n_neg.clamp(min=1)
        valid = f & (n_pos > 0) & (n_neg > 0)
        out[part] = (delta * valid).sum(1) / valid.sum(1)    # 0/0 = NaN where no anchor is valid
    return out


# ---------------------------------------------------------------------------------------------
#                                          Registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpatialMetric:
    """A per-image spatial measure of patch tokens: ``fn(tokens (n, H·W, d), (H, W)) -> (n,)``.

    A new measure is one file that calls ``register_spatial_metric``; ``spatial_scores`` then offers
    it under its name."""

    name: str
    label: str                                        # how reports name it
    fn: Callable[[torch.Tensor, Grid], torch.Tensor]
    positional: bool = True                           # False: unchanged by shuffling tokens
    shares_sums: bool = False                         # fn takes sums= (distance_sums), computed once for all


SPATIAL_METRICS: Registry[SpatialMetric] = Registry("spatial metric")


def register_spatial_metric(metric: SpatialMetric, *, priority: int = 0, overwrite: bool = False) -> SpatialMetric:
    return SPATIAL_METRICS.register(metric.name, metric, priority=priority, overwrite=overwrite)


register_spatial_metric(SpatialMetric("lds", "LDS", local_distant_similarity, shares_sums=True))
register_spatial_metric(SpatialMetric("cds", "CDS", correlation_decay_slope, shares_sums=True))
register_spatial_metric(SpatialMetric("rmsc", "RMSC", rms_spatial_contrast, positional=False))


def spatial_measures() -> list[str]:
    """What `spatial_matrix`'s columns hold, for cache keys: each registered measure's name and the function that
    computes it (module.qualname), in column order."""
    return [f"{m.name}={m.fn.__module__}.{m.fn.__qualname__}" for m in SPATIAL_METRICS.values()]


def spatial_matrix(tokens, grid: Grid | None = None) -> torch.Tensor:
    """(n, M) float32: every registered measure (SPATIAL_METRICS order) of each image's tokens, for capture;
    `grid` defaults to the square one of the token count."""
    x = torch.as_tensor(tokens)
    side = int(round(x.shape[1] ** 0.5))
    scores = spatial_scores(x, grid or (side, side))
    return torch.stack([scores[m].float() for m in SPATIAL_METRICS], dim=1)


def spatial_scores(tokens, grid: Grid, names: list[str] | tuple[str, ...] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Per-image scores (n,) of the named registered measures (default: all); average for an aggregate."""
    names = list(SPATIAL_METRICS) if names is None else list(names)
    unknown = [m for m in names if m not in SPATIAL_METRICS]
    if unknown:
        raise UserError(f"unknown spatial metric(s) {unknown}; choose from {list(SPATIAL_METRICS)}")
    sums = distance_sums(tokens, grid) if any(SPATIAL_METRICS[m].shares_sums for m in names) else None
    return {m: SPATIAL_METRICS[m].fn(tokens, grid, sums=sums) if SPATIAL_METRICS[m].shares_sums else
            SPATIAL_METRICS[m].fn(tokens, grid) for m in names}
