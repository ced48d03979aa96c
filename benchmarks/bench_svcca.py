"""SVCCA speed and accuracy: repa_probe.metrics.svcca against the platonic-rep procedure.

The baseline is platonic-rep's ``svcca(cca_dim=10)`` written out here: standardise columns, the top 10
left singular vectors from ``torch.svd_lowrank`` (randomised, niter=2), scikit-learn's iterative CCA between
them, the mean correlation of the canonical pairs. Ours computes the same definition exactly (eigenvectors of
the smaller Gram matrix in float64, canonical correlations as singular values). Both get the same
preprocessed features (clamp + unit rows). "exact" is the baseline with numpy's full SVD in place of
svd_lowrank (the same definition computed without approximation, timed too), so |baseline − exact| is the
randomised SVD's error and |ours − exact| is what remains of the iterative CCA's.

    OMP_NUM_THREADS=1 python benchmarks/bench_svcca.py            # CPU, n = 1000, 2000, 4000, d = 768

Printed times are the best of --repeat runs after one warm-up; nothing is asserted.
"""

import argparse

import numpy as np
import torch
from bench_cknna import best_time, features

from repa_probe.metrics import prepare_features, svcca


def standardise(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)
    return x / (x.std(0) + 1e-8)


def canonical_mean(u1: np.ndarray, u2: np.ndarray, dims: int) -> float:
    from sklearn.cross_decomposition import CCA
    x1, x2 = CCA(n_components=dims).fit(u1, u2).transform(u1, u2)
    return float(np.mean([np.corrcoef(x1[:, i], x2[:, i])[0, 1] for i in range(dims)]))


def baseline(a: torch.Tensor, b: torch.Tensor, dims: int = 10, exact_svd: bool = False) -> float:
    """platonic-rep's procedure on preprocessed features (exact_svd: numpy's SVD instead of svd_lowrank)."""
    a, b = standardise(a), standardise(b)
    if exact_svd:
        u1, u2 = (np.linalg.svd(x.double().numpy(), full_matrices=False)[0][:, :dims] for x in (a, b))
    else:
        u1, u2 = (torch.svd_lowrank(x, q=dims)[0].numpy() for x in (a, b))
    return canonical_mean(u1, u2, dims)


def main(args):
    import warnings
    warnings.filterwarnings("ignore", message="Maximum number of iterations")   # sklearn's CCA, as it runs
    print(f"threads={torch.get_num_threads()} dim={args.dim}")
    print(f"{'n':>6} {'base s':>7} {'exact s':>7} {'ours s':>7} {'÷base':>6} {'÷exact':>6} {'ours':>9} "
          f"{'baseline':>9} {'exact':>9} {'|ours-ex|':>9} {'|base-ex|':>9}")
    for n in args.sizes:
        a, b = (prepare_features(x) for x in features(n, args.dim, 2, "cpu", seed=n))
        t_base, v_base = best_time(lambda: baseline(a, b), args.repeat)
        t_exact, exact = best_time(lambda: baseline(a, b, exact_svd=True), args.repeat)
        t_ours, v_ours = best_time(lambda: svcca(a, b, clamp=False, normalize=False), args.repeat)
        print(f"{n:>6} {t_base:>7.3f} {t_exact:>7.3f} {t_ours:>7.3f} {t_base / t_ours:>5.2f}× "
              f"{t_exact / t_ours:>5.2f}× {v_ours:>9.6f} {v_base:>9.6f} {exact:>9.6f} "
              f"{abs(v_ours - exact):>9.1e} {abs(v_base - exact):>9.1e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1000, 2000, 4000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeat", type=int, default=3)
    main(p.parse_args())
