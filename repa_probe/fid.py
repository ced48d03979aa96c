"""Sample quality from features: Fréchet distance, Gaussian statistics summed over ranks, Inception Score,
precision and recall, and the paired interval of an FD difference (docs/generation.md).

- Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂): |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2·tr (Σ₁^½ Σ₂ Σ₁^½)^½.
  The last trace is the nuclear norm (sum of singular values) of Σ₁^½ Σ₂^½, since (Σ₁^½ Σ₂^½)(Σ₁^½ Σ₂^½)ᵀ =
  Σ₁^½ Σ₂ Σ₁^½. We take the two square roots from symmetric eigendecompositions and the singular values of
  their product, all in float64: pytorch-fid's scipy `sqrtm(Σ₁Σ₂)` is the same number where it converges, but
  it square-roots a non-symmetric product, so a singular covariance (fewer samples than dimensions) makes it
  return nan, or need its ε·I fix, which moves the result. Here eigenvalues below numpy's rank tolerance
  (D·eps·λmax) count as zero, so a singular covariance gives the exact value (tests/test_generation.py checks
  both against a 50-digit reference).
- Statistics are sums (n, Σx, Σxxᵀ) in float64, as EDM2 keeps them: under torchrun each rank sums its own
  samples and the sums are added across ranks, so the statistics are those of all samples, not an average of
  per-rank estimates. Σ = (Σxxᵀ − n·μμᵀ) / (n − 1), the unbiased covariance numpy's `np.cov` gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from repa_probe.errors import UserError
from repa_probe.runtime import sum_over_ranks_array
from repa_probe.stats import LEVEL, centred_interval, resamples

#################################################################################
#                          Gaussian statistics as sums                          #
#################################################################################


@dataclass
class GaussianStats:
    """n, Σx [D] and Σxxᵀ [D, D] of a set of feature vectors, float64."""
    n: int
    sum: np.ndarray
    sum_outer: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "GaussianStats":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> "GaussianStats":
        stats = cls.empty(features.shape[1])
        stats.add(features)
        return stats

    @classmethod
    def from_moments(cls, n: int, mu: np.ndarray, sigma: np.ndarray) -> "GaussianStats":
        """The sums behind a mean and an unbiased covariance of n samples (a reference file's mu and sigma)."""
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        return cls(int(n), n * mu, (n - 1) * sigma + n * np.outer(mu, mu))

    def add(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch [B, D] (any float dtype; summed in float64)."""
        x = features.double() if isinstance(features, torch.Tensor) else torch.from_numpy(np.array(features, np.float64))
        self.n += len(x)
        self.sum += x.sum(0).cpu().numpy()
        self.sum_outer += (x.T @ x).cpu().numpy()

    def summed_over_ranks(self) -> "GaussianStats":
        """The statistics of every rank's samples together (these in a single process)."""
        n = int(round(sum_over_ranks_array(np.array([self.n], dtype=np.float64))[0]))
        return GaussianStats(n, sum_over_ranks_array(self.sum), sum_over_ranks_array(self.sum_outer))

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.mu
        return (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)


#################################################################################
#                               Fréchet distance                                #
#################################################################################

def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance; eigenvalues below D·eps·λmax (rounding) count as 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    w = np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0.0), w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(root1: np.ndarray, root2: np.ndarray) -> float:
    """tr (Σ₁^½ Σ₂ Σ₁^½)^½ from the square roots: the sum of the singular values of Σ₁^½ Σ₂^½."""
    return float(np.linalg.svd(root1 @ root2, compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different dimensions: μ {mu1.shape} vs {mu2.shape}, "
                         f"Σ {sigma1.shape} vs {sigma2.shape}")
    return _fd(mu1, sigma1, mu2, sigma2, psd_sqrt(sigma2))


def _fd(mu1, sigma1, mu2, sigma2, root2) -> float:
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(psd_sqrt(sigma1), root2))


#################################################################################
#                 Scores: FD with its N, paired differences                     #
#################################################################################

@dataclass(frozen=True)
class FD:
    """A Fréchet distance and the number of samples it was measured on (its bias depends on n)."""
    value: float
    n: int
    space: str = ""

    def __str__(self) -> str:
        return f"{self.space + ' ' if self.space else ''}{self.value:.4g} (N={self.n})"


def same_n(*scores: FD) -> int:
    """The common N of FDs about to be compared; one clear error when they differ."""
    ns = sorted({s.n for s in scores})
    if len(ns) > 1:
        raise UserError(f"FDs measured on different numbers of samples ({', '.join(f'N={n}' for n in ns)}) cannot be "
                        f"compared: FD's bias depends on N; score every checkpoint with the same --gen N")
    return ns[0]


def fd_against(ref: GaussianStats) -> Callable[[np.ndarray], float]:
    """features [N, D] → their Gaussian's FD to `ref`, with ref's square root taken once (for many FDs to it)."""
    mu_r, sigma_r = ref.mu, ref.sigma
    root_r = psd_sqrt(sigma_r)

    def fd(x: np.ndarray) -> float:
        s = GaussianStats.of(x)
        return _fd(s.mu, s.sigma, mu_r, sigma_r, root_r)
    return fd


def fd_replicates(features: np.ndarray, ref: GaussianStats, n_boot: int, seed: int = 0) -> np.ndarray:
    """The FDs to `ref` of `n_boot` resamples of the rows of `features` [N, D] (stats.resamples(N, n_boot,
    seed)): every checkpoint scored with the same N and seed is resampled at the same sample indices, so the
    replicates of two checkpoints pair up."""
    fd = fd_against(ref)
    return np.array([fd(features[rows]) for rows in resamples(len(features), n_boot, seed)])


def paired_fd_difference(features_a: np.ndarray, features_b: np.ndarray, ref: GaussianStats, *,
                         n_boot: int = 200, seed: int = 0, level: float = LEVEL, space: str = "",
                         replicates: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """FD(b) − FD(a) against a fixed reference, with a paired bootstrap interval.

    Row i of `features_a` and of `features_b` must come from the same noise and class label (the same sample
    index): each replicate draws sample indices with replacement, takes those rows from both checkpoints and
    recomputes both FDs; the interval is the full-sample difference ± t·sd of the replicates' differences
    (stats.centred_interval). It covers the variance from which samples were drawn, not that of the reference
    statistics (held fixed) nor of training (docs/generation.md). `replicates`: both sides' fd_replicates with
    the same n_boot and seed, where already computed."""
    if features_a.shape != features_b.shape:
        same_n(FD(0.0, len(features_a)), FD(0.0, len(features_b)))
        raise ValueError(f"features of different shapes: {features_a.shape} vs {features_b.shape}")
    n, fd = len(features_a), fd_against(ref)
    fd_a, fd_b = fd(features_a), fd(features_b)
    rep_a, rep_b = replicates or (fd_replicates(features_a, ref, n_boot, seed), fd_replicates(features_b, ref, n_boot,
                                                                                               seed))
    reps = rep_b - rep_a
    low, high = centred_interval(fd_b - fd_a, reps, level=level)
    return {"space": space, "n": n, "fd_a": fd_a, "fd_b": fd_b, "difference": fd_b - fd_a, "low": float(low),
            "high": float(high), "level": level, "n_boot": n_boot, "replicates": reps}


#################################################################################
#                   Inception Score, precision and recall                       #
#################################################################################

def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> float:
    """exp E_x KL(p(y|x) ‖ p(y)) in `splits` contiguous equal parts (rows i·N/splits …), averaged: the ADM
    evaluator's at N = 50 000 (its parts are 5 000 samples); fewer than `splits` samples make one part each.
    `logits`: the classifier's, before the softmax."""
    logp = torch.log_softmax(torch.as_tensor(logits).double(), dim=1)
    n, scores = len(logp), []
    splits = min(splits, n)
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        log_marginal = torch.logsumexp(part, 0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)


def knn_radii(x: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Each row's squared distance to its k-th nearest other row (itself, at 0, is the first)."""
    return torch.cat([_squared_distances(x[i:i + block], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), block)])


def coverage(x: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int = 1024) -> float:
    """The share of rows of x inside at least one ball (centres, squared radii)."""
    inside = [(_squared_distances(x[i:i + block], centres) <= radii).any(1) for i in range(0, len(x), block)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): precision = share of samples inside the real manifold (the union of balls
    around each real feature reaching its k-th nearest real neighbour), recall = share of real features inside
    the samples' manifold. k = 3 as the ADM evaluator; distances in float64 (ADM's are float16 where finite)."""
    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))
