"""Linear-probe speed: repa_probe.probe against scikit-learn's lbfgs LogisticRegression.

Features: 10,000 CIFAR-10 training images (the first 1,000 of each class in
../shared/data/cifar10/train) and the 10,000 test images, as raw pixels in [0, 1] (3,072 values),
through a seeded random projection to 768 dimensions and a ReLU (random features: real image
statistics, encoder-like width). Both sides get the same standardised float32 arrays.

1. One fit at a fixed λ (same objective: sklearn C = 1/(λ·n)), same tolerance (max |gradient|
   ≤ 1e-4, sklearn's default) and iteration cap: best-of---repeat times, ratio, test top-1.
2. The full protocol with the λ search (5 values on a seeded 80/20 split, then a refit), ours vs
   the same protocol through sklearn (``backend="sklearn"``; skip it with --no-sklearn-search).

3. With --analysis N: the probe stage of an analysis of N images (bench_analyze's model: a seeded SiT-S/2 with
   open residual gates, on N CIFAR-10 test images, t = --t; the probe splits them, every fifth image held out):
   the probe as it was before issue 24 (the 10x λ grid, one fit per block; its held-out drop reused the test
   hits, free) against the probe now (three λ per decade; --bootstrap refit replicates; the held-out drop fitted
   on training halves with max(--bootstrap, 100) replicates), in CPU seconds, in the same run.

    python benchmarks/bench_probe.py [--device cuda] [--lam 1e-3] [--n-train 10000]
    python benchmarks/bench_probe.py --n-train 200 --n-test 2000 --lam 1e-4   # wider than the images
    python benchmarks/bench_probe.py --analysis 500 [--bootstrap 20] [--cache DIR]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from repa_probe.pipeline import held_out_probe, probe_draws
from repa_probe.probe import ProbeConfig, fit_logistic, linear_probe, logits, standardize

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


def load_cifar(split: str, per_class: int, root: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(images, 3072) float32 pixels in [0, 1] and labels, the first ``per_class`` of each class."""
    classes = sorted(p.name for p in (root / split).iterdir())
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / split / name).iterdir())[:per_class]:
            images.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).ravel())
            labels.append(c)
    return np.stack(images) / 255.0, np.array(labels)


def random_features(x: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).normal(size=(x.shape[1], dim)) / np.sqrt(x.shape[1])
    return np.maximum((x - 0.5) @ w.astype(np.float32), 0.0)  # float32, like a feature store


def objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, lam: float) -> float:
    """(1/n) Σ cross-entropy + (λ/2)‖W‖², in float64: the minimum both sides are after."""
    z = x.astype(np.float64) @ w + b
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean() + 0.5 * lam * (w ** 2).sum())


def best_time(fn, repeat: int):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def analysis_inputs(n: int, ts: tuple[float, ...], cache: str, device: str):
    """The probe's inputs in bench_analyze's analysis of n images: block features [T, B, n, D] split as analyze
    splits them (every fifth image, in class-balanced order, held out for testing), with their labels."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_analyze import open_gated_checkpoint
    from repa_probe.capture import CaptureConfig, extract
    _, ckpt = open_gated_checkpoint("SiT-S/2", Path(cache) / "model.pt")
    feats = extract(str(ckpt), str(DATA / "test"), CaptureConfig(ts=ts), n=n, cache_dir=cache, device=device,
                    quiet=True)
    x, y = np.asarray(feats.blocks), feats.labels
    held = np.arange(len(y)) % 5 == 0
    return x[..., ~held, :], y[~held], x[..., held, :], y[held]


def analysis(args):
    """Section 3: the probe stage of an analysis, before issue 24 and now, in CPU seconds (the box is shared)."""
    ts = tuple(float(t) for t in args.t.split(","))
    tr, y_tr, te, y_te = analysis_inputs(args.analysis, ts, args.cache, args.device)
    blocks = list(range(tr.shape[1]))
    print(f"probe inputs: {tr.shape[0]} t × {tr.shape[1]} blocks, {len(y_tr)} train / {len(y_te)} test images, "
          f"d = {tr.shape[-1]}; device={args.device} threads={torch.get_num_threads()}")

    def cpu(fn):
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    draws = probe_draws(len(y_tr), len(y_te), args.bootstrap, 0)
    before = cpu(lambda: linear_probe(tr, y_tr, te, y_te, ProbeConfig(lambdas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)),
                                      device=args.device))
    grid = cpu(lambda: linear_probe(tr, y_tr, te, y_te, ProbeConfig(), device=args.device))
    replicated = cpu(lambda: linear_probe(tr, y_tr, te, y_te, ProbeConfig(), device=args.device, resample=draws))
    held_out = cpu(lambda: held_out_probe(tr, y_tr, te, y_te, blocks, 0, max(args.bootstrap, 100), device=args.device))
    now = replicated + held_out
    print(f"before issue 24 (5 λ, one fit per block):       {before:7.1f} s")
    print(f"now: the fit alone (13 λ)                        {grid:7.1f} s  ({grid / before:.1f}x)")
    print(f"     with {args.bootstrap} refit replicates                 {replicated:7.1f} s  ({replicated / before:.1f}x)")
    print(f"     + the held-out drop (training halves)       {held_out:7.1f} s")
    print(f"     the probe stage now                          {now:7.1f} s  ({now / before:.1f}x before)")


def main(args):
    if args.analysis:
        return analysis(args)
    t0 = time.perf_counter()
    x_tr, y_tr = load_cifar("train", args.n_train // 10, Path(args.data))
    x_te, y_te = load_cifar("test", args.n_test // 10, Path(args.data))
    f_tr, f_te = random_features(x_tr, args.dim), random_features(x_te, args.dim)
    print(f"data: {f_tr.shape} train, {f_te.shape} test, loaded in {time.perf_counter() - t0:.1f} s;"
          f" device={args.device} threads={torch.get_num_threads()}")
    s_tr, s_te = standardize(torch.from_numpy(f_tr)[None], torch.from_numpy(f_te)[None])
    s_tr, s_te = s_tr.to(args.device), s_te.to(args.device)
    y_tr_t = torch.from_numpy(y_tr).to(args.device)

    # -- 1. one fit at a fixed λ (best of --repeat; ours after a 2-iteration warm-up at full size,
    #       which initialises torch's BLAS/LAPACK paths and allocator)
    lam = torch.tensor([[args.lam]])
    fit_logistic(s_tr, y_tr_t, lam, 10, max_iter=2)

    def ours_fit():
        theta = fit_logistic(s_tr, y_tr_t, lam, 10, max_iter=args.max_iter, tol=args.tol)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return theta

    t_ours, theta = best_time(ours_fit, args.repeat)
    acc_ours = (logits(s_te, theta)[0, :, 0].argmax(-1).cpu().numpy() == y_te).mean()

    a_tr, a_te = s_tr[0].cpu().numpy(), s_te[0].cpu().numpy()
    clf = LogisticRegression(C=1.0 / (args.lam * len(y_tr)), max_iter=args.max_iter, tol=args.tol)
    t_sk, clf = best_time(lambda: clf.fit(a_tr, y_tr), args.repeat)
    acc_sk = (clf.predict(a_te) == y_te).mean()
    print(f"fixed λ={args.lam:g} (sklearn C={1 / (args.lam * len(y_tr)):.4g}), tol={args.tol:g}:")
    print(f"  sklearn lbfgs  {t_sk:7.2f} s  top-1 {100 * acc_sk:.2f}%  ({clf.n_iter_[0]} iterations)")
    print(f"  repa_probe     {t_ours:7.2f} s  top-1 {100 * acc_ours:.2f}%")
    print(f"  speed-up {t_sk / t_ours:.1f}x, accuracy difference {100 * (acc_ours - acc_sk):+.2f}"
          " points")
    th = theta[0, 0].double().cpu().numpy()
    f_ours = objective(a_tr, y_tr, th[:-1], th[-1], args.lam)
    f_sk = objective(a_tr, y_tr, clf.coef_.T, clf.intercept_, args.lam)
    print(f"  objective: repa_probe {f_ours:.6g}, sklearn {f_sk:.6g} (ours − sklearn: {f_ours - f_sk:+.2e}, "
          f"{(f_ours - f_sk) / f_sk:+.1e} relative)")

    # -- 2. the full protocol: λ search on a validation split, refit, test
    cfg = ProbeConfig(max_iter=args.max_iter, tol=args.tol)
    t0 = time.perf_counter()
    ours = linear_probe(f_tr, y_tr, f_te, y_te, cfg, device=args.device)
    t_search = time.perf_counter() - t0
    print(f"λ search over {cfg.lambdas} + refit:")
    print(f"  repa_probe     {t_search:7.2f} s  top-1 {100 * float(ours['top1']):.2f}%  "
          f"λ={float(ours['lambda']):g} ({t_search / t_ours:.1f}x one fixed-λ fit)")
    if args.sklearn_search:
        t0 = time.perf_counter()
        ref = linear_probe(f_tr, y_tr, f_te, y_te, cfg, backend="sklearn")
        t_ref = time.perf_counter() - t0
        print(f"  sklearn        {t_ref:7.2f} s  top-1 {100 * float(ref['top1']):.2f}%  "
              f"λ={float(ref['lambda']):g}; speed-up {t_ref / t_search:.1f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=str(DATA), help="CIFAR-10 ImageFolder root (train/, test/)")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-sklearn-search", dest="sklearn_search", action="store_false")
    p.add_argument("--analysis", type=int, default=0, help="section 3 only: the probe stage of an N-image analysis")
    p.add_argument("--t", default="0,0.1,0.25,0.5,0.75", help="noise levels of --analysis")
    p.add_argument("--bootstrap", type=int, default=20, help="replicates of --analysis (analyze's --bootstrap)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bench_probe_analysis"),
                   help="feature store of --analysis (kept: a rerun skips the forwards)")
    main(p.parse_args())
