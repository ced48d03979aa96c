"""The statistics behind every claim a report makes: intervals, paired differences, the selection-aware peak
and drop (docs/statistics.md; the permutation null's targets are metrics.permuted_targets).

Every number repa-probe reports is a statistic of the images analysed; its uncertainty comes from
resampling those images.
- Probe accuracy depends on the test images it is scored on and on the training images it was fitted on. A
  replicate resamples both with replacement and refits every probe on its training draw (λ chosen anew);
  the replicates' spread is that of the whole procedure (`draw_counts`; probe.linear_probe's `resample`).
- An alignment metric is not a mean, and a kNN metric on duplicated rows finds perfect, spurious
  neighbours, so a replicate keeps each drawn image once: a subsample of m ≈ 0.63·n distinct images. Its
  spread around the replicates' median is rescaled to the full sample's by √(m/(n − m)) (for a statistic of
  m images drawn without replacement from n, Var(θ_m − θ_n) ≈ σ²·(1/m − 1/n) while Var(θ_n) ≈ σ²/n) and
  centred on the full-sample value, which also removes the level shift of a kNN metric at m images.
- An interval is the estimate ± Student's t quantile × the replicates' sd at n images (`centred_interval`): the
  default 20 replicates are too few for their own 2.5% and 97.5% quantiles (reports/coverage/).
Paired: every checkpoint and every block of one analysis sees the same images, the same noise and the same
replicates (they depend on n and the seed only), so a difference — peak block minus last block, checkpoint B
minus A — is taken replicate by replicate and its interval is that of the difference.
Selection-aware: the peak block is chosen on one half of the images (seeded, class-balanced) and the drop
after it is measured, with its paired interval, on the other half, so the choice cannot inflate the drop (for
the probe, halves of its training and of its test images: the probes that choose are not those that measure).
Family-wise: "B is better at blocks …" rests on a simultaneous band over every block × t of the comparison
(`centred_interval(..., cells=C)`), so that under no effect a false "better" anywhere is rare (≤ 5%), where
C pointwise intervals would make about 0.05·C of them.
Resolution: a difference no larger than the measure's resolution (half an image for the probe, 1e-6 of the
scale for float measures) is rounding: it makes no peak, no drop, no "better" (`resolution`, `verdict`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import t as student_t

LEVEL = 0.95
RTOL = 1e-6      # float measures: differences below 1e-6 of their scale are rounding (measured: ~1e-8)


def subsamples(n: int, n_boot: int, seed: int) -> list[np.ndarray]:
    """Bootstrap replicates without duplicates: n draws with replacement, each drawn image kept once
    (sorted row indices, ≈ 0.63·n of them). The same (n, seed) gives the same replicates."""
    rng = np.random.default_rng(seed)
    return [np.unique(rng.integers(0, n, size=n)) for _ in range(n_boot)]


def resamples(n: int, n_boot: int, seed: int | list[int]) -> np.ndarray:
    """Classic bootstrap replicates: [n_boot, n] row indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def subsample_scale(m: np.ndarray | int, n: int) -> np.ndarray:
    """√(m/(n − m)): the factor that turns the spread of a statistic over m-of-n subsamples (without
    replacement) into its spread at n images."""
    m = np.asarray(m, dtype=np.float64)
    return np.sqrt(m / np.maximum(n - m, 1.0))


def deviations(replicates: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """scale_r·(replicate_r − median of the replicates) over the first axis of `replicates` ([R, ...]): their
    spread at n images around 0. The median, not the mean: a kNN metric's replicates can sit on one value but
    for a rare neighbour swap, and the mean of such a set lies beside all of them (the estimate would then
    fall outside its own interval); half of the deviations are ≤ 0 and half ≥ 0 whatever their shape."""
    reps = np.asarray(replicates, dtype=np.float64)
    dev = reps - np.median(reps, axis=0)
    if scale is not None:
        dev = dev * np.asarray(scale, dtype=np.float64).reshape((-1,) + (1,) * (reps.ndim - 1))
    return dev


def spread(replicates: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """The standard deviation at n images of the replicates ([R, ...]): that of their rescaled `deviations`."""
    reps = np.asarray(replicates)
    if len(reps) < 2:
        raise ValueError(f"an interval needs at least 2 replicates, got {len(reps)}")
    return np.std(deviations(reps, scale), axis=0, ddof=1)


def t_quantile(level: float = LEVEL, dof: float = np.inf, cells: int = 1) -> float:
    """Student's t quantile for a two-sided `level` interval with `dof` degrees of freedom, Bonferroni-corrected
    over `cells` intervals that must hold together (cells = 1: pointwise)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(student_t.ppf(1.0 - (1.0 - level) / (2.0 * cells), dof))


def centred_interval(estimate, replicates: np.ndarray, scale: np.ndarray | None = None,
                     level: float = LEVEL, cells: int = 1) -> np.ndarray:
    """estimate ± c·sd → [..., 2] (low, high): sd the replicates' `spread` at n images (scale None = 1: replicates
    at full size), c Student's t quantile with R − 1 degrees of freedom (`t_quantile`). cells = 1 gives the
    pointwise interval; cells = C a simultaneous band: C such intervals all cover at once with probability ≥
    `level` (Bonferroni), whatever their correlation. A normal interval from the sd, not the replicates'
    quantiles: the 2.5% and 97.5% quantiles of 20 replicates sit near ±1.65 sd and cover ≈ 90%, and none of 20
    reaches the band's 99.98% (reports/coverage/). The estimate lies at the centre, whatever the replicates."""
    reps = np.asarray(replicates, dtype=np.float64)
    half = t_quantile(level, len(reps) - 1, cells) * spread(reps, scale)
    estimate = np.asarray(estimate, dtype=np.float64)
    return np.stack([estimate - half, estimate + half], axis=-1)


def draw_counts(n: int, n_boot: int, seed: int | list[int]) -> np.ndarray:
    """How often each of n images is drawn by each of `resamples`' replicates: [n_boot, n] counts, each row
    summing to n (the weights of a fit on the resample: the probe's refits)."""
    return np.stack([np.bincount(rows, minlength=n) for rows in resamples(n, n_boot, seed)]).reshape(n_boot, n)


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, class-balanced split of the rows into two halves (A, B): within each class, a random half
    of its images goes to A (the extra one of an odd class alternates), the rest to B. Sorted indices."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 7919])
    a, odd = [], 0
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        take = len(rows) // 2 + (len(rows) % 2) * (odd % 2 == 0)
        odd += len(rows) % 2
        a.append(rows[:take])
    a = np.sort(np.concatenate(a)) if a else np.zeros(0, dtype=np.int64)
    return a, np.setdiff1d(np.arange(len(labels)), a)


def argmax_blocks(values: np.ndarray, blocks: list[int], floor: float = 0.0) -> np.ndarray:
    """Index (into `blocks`) of the best block ≥ 1 along the last axis: the earliest whose value is within
    `floor` (the measure's `resolution`) of the maximum, so blocks equal but for rounding tie and the tie goes
    to the earliest. Block 0 (the embedding) and the raw input (−1) are never peaks."""
    eligible = np.array([b >= 1 for b in blocks])
    v = np.where(eligible, np.asarray(values, dtype=np.float64), -np.inf)
    return np.argmax(v >= v.max(axis=-1, keepdims=True) - floor, axis=-1)


def peak_frequency(replicates: np.ndarray, blocks: list[int], block_index: int, floor: float = 0.0) -> float:
    """Share of replicates ([R, B]) whose best block (`argmax_blocks`) is blocks[block_index]."""
    return float(np.mean(argmax_blocks(replicates, blocks, floor) == block_index))


def resolution(values: np.ndarray, n_images: int | None = None) -> float:
    """The largest difference of a measure that is rounding, not a measurement (docs/statistics.md): half an
    image for a share of `n_images` (a probe's accuracy moves in steps of one image, 1/n), else RTOL of
    max(1, the largest |value|) for a float measure (CKNNA, CKA, SVCCA and cosines are at most 1 in size)."""
    if n_images:
        return 0.5 / n_images
    v = np.abs(np.asarray(values, dtype=np.float64))
    return RTOL * max(1.0, float(np.max(v, where=np.isfinite(v), initial=0.0)))


def verdict(difference, low, high, floor):
    """+1 when a difference counts as positive (its interval above 0 and the difference beyond the measure's
    resolution `floor`), −1 when it counts as negative, 0 when it is neither: no claim. Elementwise on arrays
    (an int for scalars)."""
    d, low, high, floor = (np.asarray(x, dtype=np.float64) for x in (difference, low, high, floor))
    sign = np.where((low > 0) & (d > floor), 1, np.where((high < 0) & (d < -floor), -1, 0))
    return int(sign) if sign.ndim == 0 else sign


def fmt_interval(value: float, lo: float, hi: float, scale: float = 1.0, digits: int = 2) -> str:
    """'1.1 [0.4, 1.9]' with `digits` significant digits of the interval's width."""
    width = abs(hi - lo) * scale
    decimals = max(0, digits - 1 - math.floor(math.log10(width))) if width > 0 and math.isfinite(width) else 3
    return f"{value * scale:.{decimals}f} [{lo * scale:.{decimals}f}, {hi * scale:.{decimals}f}]"
