"""Issue 26: the metric stage of `compare` against the data + forwards it sits on, as n grows.

    OMP_NUM_THREADS=1 python benchmarks/bench_metrics_scale.py                       # n = 10,000, t = 0, one model
    OMP_NUM_THREADS=1 python benchmarks/bench_metrics_scale.py --n 2500,5000,10000,20000    # the growth table
    OMP_NUM_THREADS=1 python benchmarks/bench_metrics_scale.py --t 0,0.1,0.25,0.5,0.75 --checkpoints 2  # deep
    OMP_NUM_THREADS=1 python benchmarks/bench_metrics_scale.py --profile              # where the metric time goes

The model is the deep CIFAR runs' shape: a 28-block width-64 SiT/4 on 32×32 pixels (8×8 = 64 tokens), random
weights with every block's residual gates open (bench_analyze.gated_checkpoint; --checkpoints 2 adds a second
one, seed 1, compared with the first). The target is the bundled CIFAR teacher (cifar-ssl-resnet, real
weights). No probe; CKNNA with analyze's defaults: 20 subsample replicates, 20 permutation draws, the held-out
drop, the raw-input and untrained baselines. Images: cifar10/test (10,000) up to n = 10,000, cifar10/train
above. Every n runs in a fresh feature cache, so data + forwards are really computed; both times are the
pipeline's own stages (no report is written): "data+forwards" is decoding, noise, the model's and the untrained
baseline's forwards and the store's writes, "metrics" every alignment number with its interval, null and
held-out drop. Each is measured twice in the same run, in wall-clock seconds and in CPU seconds of this
process (on a shared machine the CPU time is the steadier measure of the work done). Printed per n: both,
their ratios, the peak resident memory of the process; with several n, the exponent of a power law fitted
to the metric time and to the ratio. --profile splits the metric time by the function
that spends it (kNN graph: its Gram products and the rest, i.e. top-k and merges; preprocessing; the
intersections; the masked HSIC) and by the step that calls it (full sample, permutation null, replicates,
held-out drop). --save FILE keeps every alignment curve (values, intervals, replicates, null, held-out drop);
--against FILE prints how far this run's curves are from a saved run's (e.g. the code before issue 26, run
with this script from a snapshot of that commit). --float64-gram hands the metrics float64 copies of the prepared
features, so that every similarity is computed in float64 (the code before issue 26 ranked neighbours by its
float32 Gram matrix; the code after it ranks them by float64 products of the float32 features).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import pickle
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_analyze import SHARED, gated_checkpoint  # noqa: E402
from repa_probe import metrics as M  # noqa: E402
from repa_probe import pipeline as P  # noqa: E402
from repa_probe.families import load_checkpoint  # noqa: E402
from repa_probe.pipeline import AnalyzeConfig  # noqa: E402
from repa_probe.models import model_config  # noqa: E402

STEPS = {"alignment": "full sample + null", "permuted_targets": "null targets", "bootstrap_alignment": "replicates",
         "held_out_alignment": "held-out drop"}     # the callers a profiled call is attributed to
# the metric stage's pieces; the code before issue 26 had knn_graph (Gram strips + top-k), the code after it
# has _top_candidates (the same), _candidate_dots (re-scoring candidates), _exact_rows and _subset_graph
TIMED = ("prepare_features", "knn_graph", "_top_candidates", "_candidate_dots", "_exact_rows", "_subset_graph",
         "_intersect", "_masked_hsic", "_hsic_pair")
GRAM = ("knn_graph", "_top_candidates")      # where the n x n Gram strips are multiplied


@contextlib.contextmanager
def stage_profile(table: dict):
    """Time every call of the TIMED functions of repa_probe.metrics, keyed by (steps that called it, function);
    matrix products inside the GRAM functions are booked as their "Gram", the rest of them as "top-k + merge".
    Nested timed calls are counted in both (e.g. _candidate_dots inside _subset_graph)."""
    stack, saved = [], []

    def wrap(owner, name, step=None):
        real = getattr(owner, name)

        @functools.wraps(real)
        def timed(*args, **kw):
            if step is not None:
                stack.append(step)
            start = time.perf_counter()
            try:
                return real(*args, **kw)
            finally:
                spent = time.perf_counter() - start
                if step is not None:
                    stack.pop()
                else:
                    key = (" / ".join(dict.fromkeys(stack)) or "other", name)
                    table[key][0] += spent
                    table[key][1] += 1
        saved.append((owner, name, real))
        setattr(owner, name, timed)

    matmul = torch.Tensor.__matmul__

    def gram(x, y):
        start = time.perf_counter()
        out = matmul(x, y)
        table[(" / ".join(dict.fromkeys(stack)) or "other", "Gram")][0] += time.perf_counter() - start
        return out

    for name, step in STEPS.items():
        wrap(P.Pipeline if name == "held_out_alignment" else M, name, STEPS[name])
    for name in TIMED:
        if hasattr(M, name):
            wrap(M, name)

    def with_gram(real):         # book the products as Gram, only inside this function
        def call(*args, **kw):
            torch.Tensor.__matmul__ = gram
            try:
                return real(*args, **kw)
            finally:
                torch.Tensor.__matmul__ = matmul
        return call

    for name in GRAM:
        if hasattr(M, name):
            saved.append((M, name, getattr(M, name)))
            setattr(M, name, with_gram(getattr(M, name)))
    try:
        yield
    finally:
        for owner, name, real in reversed(saved):
            setattr(owner, name, real)


class Clock:
    """What the pipeline's time.perf_counter() returns here: wall-clock and CPU seconds at once, so that its stage
    timings (sums of differences) hold both."""

    def __init__(self, wall: float, cpu: float):
        self.wall, self.cpu = wall, cpu

    @classmethod
    def now(cls) -> "Clock":
        return cls(time.perf_counter(), time.process_time())

    def __sub__(self, other: "Clock") -> "Clock":
        return Clock(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other) -> "Clock":
        return self if other == 0 else Clock(self.wall + other.wall, self.cpu + other.cpu)

    __radd__ = __add__


def run_once(n: int, args, work: Path) -> dict:
    cfg = model_config("SiT-S/4", hidden_size=args.width, depth=args.depth, num_heads=2, in_channels=3,
                       input_size=32, num_classes=10)
    ckpts = [load_checkpoint(gated_checkpoint(work / f"model{s}.pt", cfg, seed=s)[1]) for s in range(args.checkpoints)]
    data = args.data or str(SHARED / ("test" if n <= 10_000 else "train"))
    config = AnalyzeConfig(data=data, n=n, ts=tuple(float(t) for t in args.t.split(",")),
                           encoders=["cifar-ssl-resnet"], probe=False, bootstrap=args.bootstrap, null=args.null,
                           batch_size=args.batch_size, device="cpu", cache=str(work / f"cache{n}"), quiet=True)
    table = defaultdict(lambda: [0.0, 0])
    clock, P.time, prepare = P.time, SimpleNamespace(perf_counter=Clock.now), M.prepare_features
    if args.float64_gram:
        M.prepare_features = lambda *a, **kw: prepare(*a, **kw).double()
    try:
        with stage_profile(table) if args.profile else contextlib.nullcontext():
            results = P.run(ckpts, [f"model{s}" for s in range(args.checkpoints)], config)
    finally:
        P.time, M.prepare_features = clock, prepare
    curves = {(c.checkpoint, c.kind, c.metric, c.encoder): numbers(c) for a in results.analysed for c in a.curves}
    return {"timings": results.timings, "profile": dict(table), "curves": curves,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def numbers(c) -> dict:
    """A curve's numbers: values, intervals, replicates, null; the held-out drop's peaks, drops and intervals."""
    out = {"value": c.value, "interval": c.ci, "replicates": c.replicates, "null": c.null}
    if c.held_out is not None:
        out |= {"held-out peak": np.asarray(c.held_out.peak), "held-out drop": c.held_out.drop,
                "held-out interval": c.held_out.ci}
    return out


def differences(ours: dict, theirs: dict) -> dict[str, dict[str, float]]:
    """Per kind of curve (model, raw-input, ...), the largest |ours − theirs| of each kind of number (peaks: how
    many differ)."""
    worst: dict[str, dict[str, float]] = defaultdict(dict)
    for key, curve in ours.items():
        for name, v in curve.items():
            if v is not None:
                d = np.abs(np.asarray(v, dtype=float) - np.asarray(theirs[key][name], dtype=float))
                most = float(np.sum(d > 0) if "peak" in name else d.max())
                worst[key[1]][name] = max(worst[key[1]].get(name, 0.0), most)
    return worst


def print_profile(profile: dict, metrics_s: float) -> None:
    print(f"  {'step (callers)':<44}{'function':<26}{'calls':>8}{'seconds':>10}{'share':>8}")
    for (step, name), (spent, calls) in sorted(profile.items(), key=lambda kv: -kv[1][0]):
        if name in GRAM:             # its Gram products are a row of their own
            spent -= profile.get((step, "Gram"), (0.0, 0))[0]
            name += ": top-k + merge"
        print(f"  {step:<44}{name:<26}{calls or '':>8}{spent:>10.2f}{spent / metrics_s:>8.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10000", help="comma-separated image counts")
    p.add_argument("--t", default="0")
    p.add_argument("--checkpoints", type=int, default=1, help="models compared (2: the deep analysis' pair)")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=20)
    p.add_argument("--null", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", default=None, help="ImageFolder (default: cifar10/test up to 10,000 images, train above)")
    p.add_argument("--profile", action="store_true", help="split the metric time by function and step")
    p.add_argument("--save", default=None, help="pickle every alignment curve of every n to this file")
    p.add_argument("--against", default=None, help="compare the curves with those a --save run wrote")
    p.add_argument("--float64-gram", action="store_true", help="the metrics on float64 copies of the prepared features")
    args = p.parse_args()

    sizes = [int(v) for v in args.n.split(",")]
    print(f"SiT {args.depth} blocks, width {args.width}, 64 tokens, random open gates; {args.checkpoints} "
          f"checkpoint(s); t = {args.t}; cifar-ssl-resnet; no probe; {args.bootstrap} replicates, {args.null} null "
          f"draws; CPU, {torch.get_num_threads()} thread(s)")
    print(f"{'':>7}{'wall-clock s':^36}{'CPU s':^36}")
    print(f"{'n':>7}" + f"{'data+fwd':>10}{'encoder':>9}{'metrics':>9}{'ratio':>8}" * 2 + f"{'peak RSS GiB':>14}")
    rows, saved = [], {}
    theirs = pickle.loads(Path(args.against).read_bytes()) if args.against else {}
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix="bench_metrics_scale-"))
        try:
            r = run_once(n, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        t = r["timings"]
        rows.append((n, t["data+forwards"], t["metrics"]))
        line = "".join(f"{getattr(t['data+forwards'], c):>10.1f}{getattr(t['encoders'], c):>9.1f}"
                       f"{getattr(t['metrics'], c):>9.1f}"
                       f"{getattr(t['metrics'], c) / getattr(t['data+forwards'], c):>8.2f}" for c in ("wall", "cpu"))
        print(f"{n:>7}{line}{r['peak_rss_gb']:>14.2f}", flush=True)
        if args.profile:
            print_profile(r["profile"], t["metrics"].wall)
        for kind, worst in differences(r["curves"], theirs[n]).items() if n in theirs else ():
            print(f"  largest |this run − {args.against}|, {kind}: " + ", ".join(f"{name} {v:.1e}"
                                                                               for name, v in worst.items()))
        saved[n] = r["curves"]
        if args.save:
            Path(args.save).write_bytes(pickle.dumps(saved))
    for c in ("wall", "cpu") if len(rows) > 1 else ():
        n, fwd, met = (np.log([getattr(v, c) if isinstance(v, Clock) else v for v in col]) for col in zip(*rows))
        print(f"power-law exponent in n ({c}): metrics {np.polyfit(n, met, 1)[0]:.2f}, data+forwards "
              f"{np.polyfit(n, fwd, 1)[0]:.2f}, ratio {np.polyfit(n, met - fwd, 1)[0]:.2f}")


if __name__ == "__main__":
    main()
