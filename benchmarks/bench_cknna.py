"""CKNNA speed: repa_probe.metrics against the direct O(n³) form of the same formula.

The baseline is the platonic-rep form written out here: full n x n Gram matrices, dense kNN masks
for each of the three similarities S(K, L), S(K, K), S(L, L), and HSIC_u with an n x n x n matrix
product. Both sides get the same preprocessed features and must agree to ~1e-5.

    python benchmarks/bench_cknna.py                      # CPU, n = 1000, 2000, 4000
    python benchmarks/bench_cknna.py --device cuda --sizes 4000,10000 --batched-n 10000

Batched case: 12 blocks x 5 noise levels against one target. The baseline is timed on one pair and
multiplied by 60 (it shares nothing between pairs; best of 2); ours runs the real ``alignment``
call once.
Printed numbers are the best of --repeat runs after one warm-up; nothing is asserted.
"""

import argparse
import math
import time

import torch

from repa_probe.metrics import alignment, cknna, prepare_features


def direct_hsic_u(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    n = K.shape[0]
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    return ((Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
            - 2 * (Kt @ Lt).sum() / (n - 2)) / (n * (n - 3))


def direct_cknna(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """The O(n³) baseline, preprocessing included (as ours includes it)."""
    a, b = prepare_features(a), prepare_features(b)
    K, L = a @ a.T, b @ b.T
    n = K.shape[0]

    def knn_mask(X):
        top = X.clone().fill_diagonal_(-math.inf).topk(k, dim=1).indices
        return torch.zeros(n, n, device=X.device).scatter_(1, top, 1.0)

    def similarity(X, Y):
        mask = knn_mask(X) * knn_mask(Y)
        return direct_hsic_u(mask * X, mask * Y)

    value = similarity(K, L) / (torch.sqrt(similarity(K, K) * similarity(L, L)) + 1e-6)
    return float(value)


def features(n: int, dim: int, count: int, device: str, seed: int = 0) -> torch.Tensor:
    """``count`` feature matrices (n, dim) that share a 32-dim latent with each other (so the
    metric is far from 0), seeded."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    out = [(z @ torch.randn(32, dim, generator=g) + 2.0 * torch.randn(n, dim, generator=g)).relu()
           for _ in range(count)]
    return torch.stack(out).to(device)


def best_time(fn, repeat: int, warmup: bool = True) -> tuple[float, object]:
    if warmup:  # allocator, kernels, thread pools
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main(args):
    dev = args.device
    print(f"device={dev} threads={torch.get_num_threads()} dim={args.dim} k={args.k}")
    print(f"{'n':>6} {'direct s':>9} {'ours s':>8} {'speed-up':>8} {'|diff|':>8}")
    for n in args.sizes:
        a, b = features(n, args.dim, 2, dev)
        t_ref, ref = best_time(lambda: direct_cknna(a, b, args.k), args.repeat)
        t_ours, ours = best_time(lambda: cknna(a, b, k=args.k, device=dev), args.repeat)
        print(f"{n:>6} {t_ref:>9.3f} {t_ours:>8.3f} {t_ref / t_ours:>7.1f}x {abs(ref - ours):>8.1e}")

    n, pairs = args.batched_n, args.blocks * args.ts
    target = features(n, args.dim, 1, dev, seed=1)[0]
    sources = features(n, args.dim, pairs, dev, seed=2).view(args.ts, args.blocks, n, args.dim)
    # the single-pair runs above warmed both paths up
    t_pair, ref = best_time(lambda: direct_cknna(sources[0, 0], target, args.k), 2, False)
    t_ours, got = best_time(lambda: alignment(target, sources, metrics=("cknna",), k=args.k,
                                              device=dev)["cknna"], 1, False)
    print(f"batched {args.ts} t x {args.blocks} blocks vs one target, n={n}: direct "
          f"{t_pair:.3f} s/pair x {pairs} = {t_pair * pairs:.1f} s (one pair timed), ours "
          f"{t_ours:.2f} s, speed-up {t_pair * pairs / t_ours:.1f}x, |diff| on pair (0,0) "
          f"{abs(ref - float(got[0, 0])):.1e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="1000,2000,4000",
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--dim", type=int, default=768, help="feature width (DINOv2-B, SiT-B: 768)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--ts", type=int, default=5)
    p.add_argument("--batched-n", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=2)
    main(p.parse_args())
