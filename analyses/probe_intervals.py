"""Issue 24, item 1 at full size: one checkpoint's probe intervals at two probe sizes, and what they cover.

    python analyses/probe_intervals.py CKPT [--sizes 3000,10000] [--t 0] [--draws 5] [--out DIR]

1. For each size n, the checkpoint is analysed with its probe fitted on n cifar10/train images and scored on
   n cifar10/test images (class-balanced, seed 0; the smaller sets inside the larger), by the pipeline: the
   interval of every block (refit replicates, --bootstrap of them) and the held-out drop (peak chosen by probes
   of training half A on test half A, drop measured by probes of training half B on test half B). Beside it,
   the procedure before issue 24: the 10x λ grid, one fit per block, Wilson intervals, and the held-out drop
   on halves of the test images with the fitted probes held fixed. Do the two sizes' drop intervals overlap?
2. λ resolution: every block refitted at the grid neighbours of its λ; the largest move such a flip makes,
   beside the block's interval half-width.
3. What the replicates cover: at the smallest size, --draws disjoint sets of n training images (the same test
   images) give the spread of each block's accuracy over new training draws; beside it the spread of the
   replicates' refits with the test images held (test draw counts all 1), averaged over the draws.

Writes OUT/probe_intervals.json and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from cifar_runs import DATA, REPO
from repa_probe import stats
from repa_probe.capture import make_dataset
from repa_probe.families import load_checkpoint
from repa_probe.pipeline import AnalyzeConfig, Pipeline, held_out_probe, probe_draws, wilson_interval
from repa_probe.probe import ProbeConfig, linear_probe

OLD_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)      # the probe's grid before issue 24


def block_features(pipe: Pipeline, ckpt, split: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block features [T, B, n, D], labels and image ids of the n-image class-balanced subset (seed 0) of
    cifar10/<split>, through the pipeline's store (the subsets for smaller n lie inside it)."""
    f = pipe.features(ckpt, make_dataset(DATA / split, ckpt.anatomy.input.size, n, 0), measures=False)
    return np.asarray(f.blocks), f.labels, f.ids


def old_procedure(tr, y_tr, te, y_te, blocks: list[int]) -> dict:
    """Before issue 24: 10x λ grid, one fit per block, Wilson intervals; held-out drop on test halves."""
    res = linear_probe(tr, y_tr, te, y_te, ProbeConfig(lambdas=OLD_LAMBDAS))
    n = len(y_te)
    ci = np.array([wilson_interval(round(a * n), n) for a in res["top1"].ravel()]).reshape(res["top1"].shape + (2,))
    half_a, half_b = stats.halves(y_te, 0)
    hits = res["hits"]
    peaks = stats.argmax_blocks(hits[..., half_a].mean(-1), blocks)
    t = np.arange(len(peaks))
    diff = hits[t, peaks][:, half_b].astype(np.float64) - hits[t, -1][:, half_b]
    reps = stats.draw_counts(len(half_b), 1000, 0) @ diff.T / len(half_b)
    drop = diff.mean(-1)
    return dict(value=res["top1"], ci=ci, peak=[blocks[p] for p in peaks], drop=drop,
                drop_ci=stats.centred_interval(drop, reps))


def new_procedure(tr, y_tr, te, y_te, blocks: list[int], n_boot: int) -> dict:
    """The pipeline's probe: refit replicates and their interval; the held-out drop with training halves."""
    res = linear_probe(tr, y_tr, te, y_te, ProbeConfig(), resample=probe_draws(len(y_tr), len(y_te), n_boot, 0))
    ci = stats.centred_interval(res["top1"], np.moveaxis(res["top1_replicates"], -1, 0))
    ho = held_out_probe(tr, y_tr, te, y_te, blocks, 0, max(n_boot, 100))
    return dict(value=res["top1"], ci=ci, lam=res["lambda"], peak=ho.peak, drop=ho.drop, drop_ci=ho.ci)


def lambda_flips(tr, y_tr, te, y_te, lam: np.ndarray) -> np.ndarray:
    """[T, B]: the largest |Δ top-1| when each block is refitted at a grid neighbour of its chosen λ instead."""
    grid = ProbeConfig().lambdas
    acc = np.stack([linear_probe(tr, y_tr, te, y_te, ProbeConfig(lambdas=(g,)))["top1"] for g in grid])   # [G, T, B]
    at = np.searchsorted(grid, lam * (1 - 1e-9))[None] + 1                 # the chosen λ in the padded grid
    padded = np.concatenate([acc[:1], acc, acc[-1:]])                     # an end of the grid has one neighbour
    chosen = np.take_along_axis(padded, at, 0)[0]
    return np.maximum(*(abs(np.take_along_axis(padded, at + k, 0)[0] - chosen) for k in (-1, 1)))


def fit_spread(tr_pool, y_pool, te, y_te, n: int, draws: int, n_boot: int) -> tuple[np.ndarray, np.ndarray]:
    """([T, B] SD of top-1 over `draws` disjoint training sets of n images, the same test images;
    [T, B] the replicates' SD with the test images held, averaged over the draws)."""
    perm = np.random.default_rng(0).permutation(len(y_pool))
    values, spread = [], []
    held = np.ones((n_boot, len(y_te)), dtype=np.int64)
    for k in range(draws):
        rows = np.sort(perm[k * n:(k + 1) * n])
        res = linear_probe(tr_pool[..., rows, :], y_pool[rows], te, y_te, ProbeConfig(),
                           resample=(probe_draws(n, len(y_te), n_boot, 0)[0], held))
        values.append(res["top1"])
        spread.append(res["top1_replicates"].std(axis=-1, ddof=1))
    return np.std(values, axis=0, ddof=1), np.mean(spread, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--sizes", default="3000,10000", help="probe images, train = test, per analysis")
    ap.add_argument("--t", default="0")
    ap.add_argument("--bootstrap", type=int, default=20)
    ap.add_argument("--draws", type=int, default=5, help="disjoint training draws for part 3 (0 = skip)")
    ap.add_argument("--out", default=str(REPO / "runs" / "probe_intervals"))
    a = ap.parse_args()
    sizes, ts = sorted(int(s) for s in a.sizes.split(",")), tuple(float(t) for t in a.t.split(","))
    ckpt = load_checkpoint(a.checkpoint)
    pipe = Pipeline(AnalyzeConfig(data=str(DATA / "test"), n=max(sizes), ts=ts, baselines=False,
                                  cache=os.path.relpath(REPO / "runs" / "cache"), quiet=True))
    blocks = list(range(ckpt.anatomy.depth + 1))
    train, test = block_features(pipe, ckpt, "train", max(sizes)), block_features(pipe, ckpt, "test", max(sizes))
    report = dict(checkpoint=a.checkpoint, sha256=ckpt.provenance.sha256, t=list(ts), bootstrap=a.bootstrap, sizes={})
    for n in sizes:
        start = time.perf_counter()
        (tr, y_tr), (te, y_te) = (subset(feats, labels, ids, split, n, ckpt)
                                  for (feats, labels, ids), split in ((train, "train"), (test, "test")))
        new, old = new_procedure(tr, y_tr, te, y_te, blocks, a.bootstrap), old_procedure(tr, y_tr, te, y_te, blocks)
        flips = lambda_flips(tr, y_tr, te, y_te, new.pop("lam"))
        hw = (new["ci"][..., 1] - new["ci"][..., 0]) / 2
        report["sizes"][n] = dict(new=new, old=old, flip=flips, half_width=hw, seconds=time.perf_counter() - start)
        for ti, t in enumerate(ts):
            print(f"n = {n}/{n}, t = {t:g}: held-out drop (points) new {fmt(new, ti)}, old {fmt(old, ti)}; "
                  f"a flip to a neighbouring λ moves a block by at most its half-width at "
                  f"{np.mean(flips[ti] <= hw[ti]):.0%} of blocks (largest flip {100 * flips[ti].max():.1f} points, "
                  f"median half-width {100 * np.median(hw[ti]):.1f})")
    if len(sizes) > 1:
        for kind in ("new", "old"):
            (lo1, hi1), (lo2, hi2) = (np.moveaxis(report["sizes"][n][kind]["drop_ci"], -1, 0) for n in sizes[:2])
            report[f"overlap_{kind}"] = ((lo1 <= hi2) & (lo2 <= hi1)).tolist()
            print(f"{kind}: the drop intervals at {sizes[0]} and {sizes[1]} overlap at t = {list(ts)}: "
                  f"{report[f'overlap_{kind}']}")
    if a.draws:
        n = sizes[0]
        pool, pool_labels, _ = block_features(pipe, ckpt, "train", n * a.draws)
        te, y_te = subset(*test, "test", n, ckpt)
        truth, replicated = fit_spread(pool, pool_labels, te, y_te, n, a.draws, a.bootstrap)
        report["fit_spread"] = dict(n=n, draws=a.draws, over_draws=truth, replicates=replicated)
        ratio = replicated / truth
        print(f"fit spread at n = {n}: SD of top-1 over {a.draws} disjoint training draws (same test images), "
              f"median over blocks {100 * np.median(truth):.2f} points; the replicates' SD with the test images "
              f"held, over it: median {np.median(ratio):.2f}, quartiles {np.quantile(ratio, 0.25):.2f}–"
              f"{np.quantile(ratio, 0.75):.2f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_intervals.json").write_text(json.dumps(report, indent=1, default=plain) + "\n")
    print(f"wrote {out / 'probe_intervals.json'}")


def subset(feats: np.ndarray, labels: np.ndarray, ids: np.ndarray, split: str, n: int, ckpt):
    """The rows of the n-image subset (make_dataset's, inside the larger one `ids`) of features [T, B, N, D]."""
    rows = np.isin(ids, make_dataset(DATA / split, ckpt.anatomy.input.size, n, 0).ids)
    return feats[..., rows, :], labels[rows]


def fmt(r: dict, ti: int) -> str:
    return f"{stats.fmt_interval(r['drop'][ti], *r['drop_ci'][ti], scale=100)} (peak {r['peak'][ti]})"


def plain(x):
    return x.tolist() if isinstance(x, np.ndarray) else x.item() if isinstance(x, np.generic) else str(x)


if __name__ == "__main__":
    main()
