"""Coverage of the intervals in the regime the reports use (issue 24 §4; docs/statistics.md).

The reports measure CKNNA on thousands of images with k/n ≈ 0.001 (10 of 10,000), a weak signal (CKNNA ≈ 0.01)
and the default 20 subsample replicates. This study simulates that regime with known answers:

  model     a 6-d latent per image, seen by a target encoder (12-d) and by two checkpoints A and B (16-d) at
            BLOCKS blocks × TS noise levels; each block is the latent times fixed weights, scaled by a profile
            over blocks and t, plus noise correlated across blocks, t and between A and B (the same images
            through related models). A and B are exchangeable: no effect, B − A = 0 at every cell.
  per seed  fresh images; every cell's CKNNA on all n images and on the default number of subsample
            replicates, with the library's own functions (metrics.alignment, metrics.bootstrap_alignment,
            stats.subsamples), the same replicates for A and B as in a compare.
  truth     a value's truth is its mean over TRUTH_DRAWS fresh samples of n images (CKNNA depends on n: the
            truth is at the same n); a difference's truth is 0.
  figures   pointwise coverage of the values and of B − A (the interval now and the replicates' quantiles
            before issue 24); the share of seeds with a false "better" or "worse" anywhere, pointwise and
            with the simultaneous band; how wide the intervals are against the true spread, and why (fresh
            samples at a subsample's size m); and the band's construction alone at the reports' 140 cells,
            with Gaussian replicates of the right spread (Bonferroni against a max-|t| band from the replicates).

The replicate values are cached (runs/coverage/) and saved, compact, as reports/coverage/replicates.npz, so
the figures in reports/coverage/coverage.json are recomputed from them with the current stats code
(`figures`; tests/test_stats.py checks that they still hold):

    python analyses/interval_coverage.py                 # n = 5000, k = 5, 150 seeds (2–3 h on one busy core)
    python analyses/interval_coverage.py --evaluate-only # the figures again, from replicates.npz
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from repa_probe import metrics as M  # noqa: E402
from repa_probe import stats  # noqa: E402
from repa_probe.pipeline import AnalyzeConfig  # noqa: E402

OUT = REPO / "reports" / "coverage"
BLOCKS, TS = 4, 2
PROFILE = np.array([0.6, 1.0, 0.8, 0.7])[:, None] * np.array([1.0, 0.7])[None]   # [B, T] signal strength
SIGNAL, RHO, SHARED = 0.5, 0.8, 0.5      # latent scale (CKNNA 0.003–0.013 at n = 5000, k = 5); noise correlation
TRUTH_DRAWS = 100
_WEIGHTS = np.random.default_rng(0)
W_TARGET, W_BLOCK = _WEIGHTS.normal(size=(6, 12)), _WEIGHTS.normal(size=(BLOCKS, 6, 16))


def features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(target [n, 12], sources [2 checkpoints, T, B, n, 16]) for n fresh images of seed `seed`."""
    rng = np.random.default_rng([seed, 24])
    z = rng.normal(size=(n, 6))
    target = z @ W_TARGET + rng.normal(size=(n, 12))
    noise = rng.normal(size=(2, TS, BLOCKS, n, 16))
    for b in range(1, BLOCKS):                    # blocks of one model move together
        noise[:, :, b] = RHO * noise[:, :, b - 1] + np.sqrt(1 - RHO ** 2) * noise[:, :, b]
    for t in range(1, TS):                        # so do its noise levels
        noise[:, t] = RHO * noise[:, t - 1] + np.sqrt(1 - RHO ** 2) * noise[:, t]
    noise[1] = SHARED * noise[0] + np.sqrt(1 - SHARED ** 2) * noise[1]     # B resembles A: exchangeable
    signal = np.einsum("nl,bld->bnd", z, W_BLOCK)                          # [B, n, 16]
    sources = SIGNAL * PROFILE.T[None, :, :, None, None] * signal[None, None] + noise
    return target.astype(np.float32), sources.astype(np.float32)


def simulate(seed: int, n: int, k: int, n_boot: int) -> dict[str, np.ndarray]:
    """One seed: value [2, T, B] on all n images, replicates [R, 2, T, B] on the subsamples, scale [R]."""
    target, sources = features(n, seed)
    value = M.alignment(target, sources, ("cknna",), k=k)["cknna"]
    _, reps = M.bootstrap_alignment(target, sources, ("cknna",), k=k, n_boot=n_boot, seed=seed,
                                    around={"cknna": value}, replicates=True)
    scale = stats.subsample_scale([len(d) for d in stats.subsamples(n, n_boot, seed)], n)
    return dict(value=value, replicates=reps["cknna"], scale=scale)


def fresh(n: int, k: int, size: int, cache: Path) -> np.ndarray:
    """CKNNA [TRUTH_DRAWS, 2, T, B] on TRUTH_DRAWS fresh samples of `size` images: at size n their mean is the
    truth of a value (CKNNA depends on n: the truth is at the analysis' n), and with a sample at the size of a
    subsample they show how CKNNA's spread changes with n."""
    path = cache / f"fresh{size}.npy"
    if not path.exists():
        np.save(path, [M.alignment(*features(size, 10_000 + d), ("cknna",), k=k)["cknna"] for d in range(TRUTH_DRAWS)])
    return np.load(path)


def rate(hits: np.ndarray) -> dict:
    """A share with its binomial standard error and count."""
    hits = np.asarray(hits, dtype=bool).ravel()
    p = float(hits.mean())
    return dict(rate=round(p, 4), se=round(float(np.sqrt(p * (1 - p) / len(hits))), 4), of=int(len(hits)))


def percentile_interval(estimate, replicates, scale) -> np.ndarray:
    """The interval before issue 24: the estimate plus the 2.5% and 97.5% quantiles of the rescaled deviations."""
    low, high = np.quantile(stats.deviations(replicates, scale), [0.025, 0.975], axis=0)
    return np.stack([estimate + np.minimum(low, 0), estimate + np.maximum(high, 0)], axis=-1)


def spread_ratio(value: np.ndarray, replicates: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per cell [..., T, B]: the replicates' mean sd at n (stats.spread) over the sd of the estimates across
    seeds (value [S, ..., T, B], replicates [S, R, ..., T, B]): 1 = the intervals are as wide as they should be."""
    spread = np.mean([stats.spread(replicates[s], scale[s]) for s in range(len(value))], axis=0)
    return spread / value.std(axis=0, ddof=1)


def figures(value: np.ndarray, replicates: np.ndarray, scale: np.ndarray, true: np.ndarray) -> dict:
    """Coverage of every interval from the saved replicates: value [S, 2, T, B], replicates [S, R, 2, T, B],
    scale [S, R], true [T, B]. Pointwise: each cell's value and each cell's B − A (truth 0); family-wise: the
    share of seeds in which some cell's B − A is called better or worse (stats.verdict) — the false claims of
    'B is better at blocks …' under no effect — with the intervals as computed and, to see the rules at the
    nominal width, narrowed about their centre by each cell's `spread_ratio` (an oracle: it uses the truth)."""
    seeds, cells = len(value), value.shape[-2] * value.shape[-1]
    covered = {"value": {"percentile": [], "normal": []}, "difference": {"percentile": [], "normal": []}}
    claims = {"pointwise percentile": [], "pointwise": [], "simultaneous": [], "pointwise, at the true width": [],
              "simultaneous, at the true width": []}
    wide = spread_ratio(value[:, 1] - value[:, 0], replicates[:, :, 1] - replicates[:, :, 0], scale)[..., None]
    for s in range(seeds):
        delta, d_reps = value[s, 1] - value[s, 0], replicates[s, :, 1] - replicates[s, :, 0]
        for name, make in (("percentile", percentile_interval), ("normal", stats.centred_interval)):
            lo, hi = np.moveaxis(make(value[s], replicates[s], scale[s]), -1, 0)
            covered["value"][name].append((lo <= true) & (true <= hi))
            lo, hi = np.moveaxis(make(delta, d_reps, scale[s]), -1, 0)
            covered["difference"][name].append((lo <= 0) & (0 <= hi))
        floor = stats.resolution(value[s])
        for name, ci in (("pointwise percentile", percentile_interval(delta, d_reps, scale[s])),
                         ("pointwise", stats.centred_interval(delta, d_reps, scale[s])),
                         ("simultaneous", stats.centred_interval(delta, d_reps, scale[s], cells=cells))):
            claims[name].append(bool(np.any(stats.verdict(delta, ci[..., 0], ci[..., 1], floor))))
            if name != "pointwise percentile":
                ci = delta[..., None] + (ci - delta[..., None]) / wide
                claims[f"{name}, at the true width"].append(bool(np.any(stats.verdict(delta, ci[..., 0], ci[..., 1],
                                                                                        floor))))
    return {"pointwise coverage (nominal 0.95)": {what: {name: rate(np.stack(v)) for name, v in c.items()}
                                                  for what, c in covered.items()},
            "seeds with a false better or worse anywhere (nominal ≤ 0.05)": {name: rate(v)
                                                                              for name, v in claims.items()}}


def width(value: np.ndarray, replicates: np.ndarray, scale: np.ndarray, fresh_n: np.ndarray, fresh_m: np.ndarray,
          n: int, m: int) -> dict:
    """How wide the intervals are, and why. Width: per cell, the replicates' mean sd at n (stats.spread) over the
    sd of the estimates across seeds, for the values and for B − A (1 = right, above 1 = too wide). Why: the
    rescaling √(m/(n − m)) holds when a subsample's value varies around the full sample's, Var(θ_m − θ_n) =
    V(m) − V(n), with V(s) ∝ 1/s (a mean). Here, from the fresh samples of n and of m images (medians over
    cells): the exponent a of V(s) ∝ s^−a, and the replicates' variance over V(m) − V(n) and over V(m)."""
    ratio = {"value": spread_ratio(value, replicates, scale),
             "difference": spread_ratio(value[:, 1] - value[:, 0], replicates[:, :, 1] - replicates[:, :, 0], scale)}
    v_n, v_m = (x.reshape(-1, *x.shape[-2:]).var(0, ddof=1) for x in (fresh_n, fresh_m))
    v_rep = replicates.var(axis=1, ddof=1).mean(axis=(0, 1))
    why = {"exponent a": np.log(v_m / v_n) / np.log(n / m), "replicate variance / (V(m) − V(n))": v_rep / (v_m - v_n),
           "replicate variance / V(m)": v_rep / v_m}
    return {"sd at n from the replicates / sd over seeds": {
        what: dict(median=round(float(np.median(r)), 2), low=round(float(r.min()), 2), high=round(float(r.max()), 2))
        for what, r in ratio.items()},
        f"why (m = {m})": {what: round(float(np.median(r)), 2) for what, r in why.items()}}


def gaussian_bands(blocks: int = 28, ts: int = 5, n_boot: int = 20, seeds: int = 2000) -> dict:
    """The band's construction alone, at the reports' size (28 blocks × 5 t = 140 cells, 20 replicates): B − A
    and its replicates drawn from one Gaussian with the right spread (no effect), its cells correlated across
    blocks (ρ_b) and t (ρ_t). Share of seeds in which every cell's interval holds 0, for pointwise intervals, for
    a max-|t| band calibrated on the replicates themselves (the 95% quantile over replicates of the largest
    |deviation|/sd over cells) and for the Bonferroni band (stats.centred_interval with cells)."""
    rng, out = np.random.default_rng(24), {}
    cells = blocks * ts
    for rho_b, rho_t in ((0.0, 0.0), (0.5, 0.3), (0.9, 0.5), (0.97, 0.8)):
        corr = np.kron(rho_t ** np.abs(np.subtract.outer(range(ts), range(ts))),
                       rho_b ** np.abs(np.subtract.outer(range(blocks), range(blocks))))
        root = np.linalg.cholesky(corr + 1e-9 * np.eye(cells))
        held = {"pointwise": [], "max-|t| from the replicates": [], "simultaneous (Bonferroni)": []}
        for _ in range(seeds):
            delta, reps = rng.normal(size=cells) @ root.T, rng.normal(size=(n_boot, cells)) @ root.T
            sd = stats.spread(reps)
            c = np.quantile(np.abs(stats.deviations(reps) / sd).max(axis=1), 0.95)
            for name, (lo, hi) in (("pointwise", stats.centred_interval(delta, reps).T),
                                   ("max-|t| from the replicates", (delta - c * sd, delta + c * sd)),
                                   ("simultaneous (Bonferroni)", stats.centred_interval(delta, reps, cells=cells).T)):
                held[name].append(bool(np.all((lo <= 0) & (0 <= hi))))
        out[f"rho_block {rho_b}, rho_t {rho_t}"] = {name: rate(v) for name, v in held.items()}
    return {"cells": cells, "bootstrap": n_boot, "family-wise coverage (nominal ≥ 0.95)": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=150)
    ap.add_argument("--bootstrap", type=int, default=AnalyzeConfig(data="").bootstrap, help="the analyses' default")
    ap.add_argument("--evaluate-only", action="store_true", help="recompute the figures from replicates.npz")
    a = ap.parse_args()
    saved = OUT / "replicates.npz"
    if not a.evaluate_only:
        import torch
        torch.set_num_threads(1)
        cache = REPO / "runs" / "coverage" / f"n{a.n}_k{a.k}_R{a.bootstrap}"
        cache.mkdir(parents=True, exist_ok=True)
        for seed in range(a.seeds):
            path = cache / f"seed{seed:04d}.npz"
            if not path.exists():
                np.savez(path, **simulate(seed, a.n, a.k, a.bootstrap))
                print(f"seed {seed}", flush=True)
        runs = [np.load(cache / f"seed{s:04d}.npz") for s in range(a.seeds)]
        m = int(round(np.mean([len(d) for d in stats.subsamples(a.n, a.bootstrap, 0)])))    # a subsample's size
        OUT.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(saved, n=a.n, k=a.k, m=m, fresh_n=fresh(a.n, a.k, a.n, cache).astype(np.float32),
                            fresh_m=fresh(a.n, a.k, m, cache).astype(np.float32),
                            **{key: np.stack([r[key] for r in runs]).astype(np.float32)
                               for key in ("value", "replicates", "scale")})
    d = {key: v.astype(np.float64) if v.ndim else int(v) for key, v in np.load(saved).items()}
    true = d["fresh_n"].mean(axis=(0, 1))                       # A and B alike: the mean of both
    result = {"settings": {"n": d["n"], "k": d["k"], "bootstrap": d["replicates"].shape[1], "seeds": len(d["value"]),
                           "blocks": BLOCKS, "ts": TS, "truth draws": len(d["fresh_n"]),
                           "cknna": [round(float(true.min()), 4), round(float(true.max()), 4)]},
              **figures(d["value"], d["replicates"], d["scale"], true),
              "interval width": width(d["value"], d["replicates"], d["scale"], d["fresh_n"], d["fresh_m"], d["n"],
                                      d["m"]),
              "the band alone, Gaussian replicates": gaussian_bands()}
    (OUT / "coverage.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
