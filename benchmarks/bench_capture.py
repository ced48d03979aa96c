"""Capture overhead against plain forward passes, per pass and end to end.

Per pass (target ≤ 1.05): SiT-S/2 on 32×32×4 latents (256 tokens), random weights, batch 64 by default:
  full        capture_batch (seeded noise, x_t, hooks on every block, mean pooling, raw baseline) ÷ forward of x_t
  hooks only  the same forward of x_t inside BlockCapture ÷ forward of x_t
End to end (--n > 0; target: bare forwards ÷ extract ≥ 0.95 in throughput): a real `capture.extract` of n CIFAR
images (SiT-S/2 on 3×32×32 pixels, patch 2: 256 tokens) at every --ts into a fresh temporary feature store
(image decoding, batching, noise, hooks, pooling, chunk writes, claims, the final merge), against the bare
forwards of the same images × t (x_t computed beforehand, untimed). Listing the ImageFolder is done once,
outside the timer (a per-analysis constant).
Measured things alternate within each repeat so that machine load hits them alike; medians are reported.

    python benchmarks/bench_capture.py [--model SiT-XL/2 --depth 4] [--batch-size 64] [--repeats 5] [--device cuda] [--precision bf16] [--spatial]
                                       [--n 256] [--ts 0.25,0.5] [--data ../shared/data/cifar10/test] [--compile]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from repa_probe.capture import BlockCapture, CaptureConfig, capture_batch, extract, make_dataset, noisy_input
from repa_probe.data import to_model_space
from repa_probe.families.sit import as_checkpoint
from repa_probe.models import SiT, model_config
from repa_probe.runtime import AUTOCAST_DTYPES


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared CPU the CPU time is the steadier measure:
    it counts the work done, not the time spent waiting for a core."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def random_sit(name: str, in_channels: int, device: torch.device, depth: int | None = None) -> SiT:
    """A SiT with random weights everywhere (adaLN-Zero gates would be zero otherwise), 32×32 input; `depth`
    overrides the number of blocks (the per-pass ratio is per block, so fewer blocks give the same ratio)."""
    torch.manual_seed(0)
    model = SiT(model_config(name, input_size=32, in_channels=in_channels, **({"depth": depth} if depth else {})))
    model = model.to(device).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname != "pos_embed":
                p.normal_(0, 0.02)
    return model


def report(title: str, names: tuple[str, ...], times: dict, device: torch.device) -> dict:
    """Print each measured thing's runs and median per clock; → medians {(name, clock): s}."""
    med = {k: statistics.median(v) for k, v in times.items()}
    print(title)
    for clock in ("wall", "cpu") if device.type == "cpu" else ("wall",):
        for name in names:
            runs = ", ".join(f"{s * 1e3:.0f}" for s in times[name, clock])
            print(f"  {clock:<4} {name:<10} {med[name, clock] * 1e3:9.1f} ms   ({runs})")
    return med


def repeat(fns: dict, repeats: int, device: torch.device) -> dict:
    """Time every fn once per repeat, alternating; → {(name, clock): [seconds]}."""
    times = {(k, clock): [] for k in fns for clock in ("wall", "cpu")}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = timed(fn, device)
            times[name, "wall"].append(wall)
            times[name, "cpu"].append(cpu)
    return times


def end_to_end(args: argparse.Namespace) -> None:
    """A real extract into a fresh store ÷ the bare forwards of the same images × t (see the docstring)."""
    device = torch.device(args.device)
    model = random_sit(args.model, 3, device)
    ckpt = as_checkpoint(model, "repa")
    ts = tuple(float(t) for t in args.ts.split(","))
    dataset = make_dataset(args.data, 32, args.n)
    config = CaptureConfig(ts=ts, precision=args.precision)
    dtype = AUTOCAST_DTYPES[args.precision]
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    x0, ids = to_model_space(images, "pixels").to(device), torch.as_tensor(dataset.ids)
    batches = [(sl, noisy_input(ckpt.convention, x0[sl], ids[sl], t, seed=0)) for t in ts
               for sl in (slice(i, i + args.batch_size) for i in range(0, len(x0), args.batch_size))]
    y = torch.full((args.batch_size,), model.config.num_classes, device=device)

    @torch.no_grad()
    def forwards():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for sl, (x_t, timestep) in batches:
                model(x_t, timestep, y[:len(x_t)])

    def capture(config: CaptureConfig = config):
        cache = tempfile.mkdtemp(prefix="bench_capture-")
        try:
            extract(ckpt, dataset, config, batch_size=args.batch_size, num_workers=args.workers, device=device,
                    cache_dir=cache, quiet=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    fns = {"forwards": forwards, "extract": capture}
    if args.compile:
        fns["compiled"] = lambda: capture(CaptureConfig(ts=ts, precision=args.precision, compile=True))
        fns["compiled"]()                        # warm-up: the compilation itself is not timed
    forwards()                                   # warm-up
    med = report(f"end to end: {args.model} pixels, 256 tokens, {len(dataset)} CIFAR images × t = {args.ts}, "
                 f"batch {args.batch_size}, workers {args.workers}, {args.precision}, {where(device)}, "
                 f"median of {args.repeats}:", tuple(fns), repeat(fns, args.repeats, device), device)
    for clock in ("wall", "cpu") if device.type == "cpu" else ("wall",):
        print(f"  {clock:<4} throughput extract / bare forwards = {med['forwards', clock] / med['extract', clock]:.3f}"
              f"   (target ≥ 0.95)" + (f"; extract --compile / bare forwards = "
                                       f"{med['forwards', clock] / med['compiled', clock]:.3f}" if args.compile else ""))


def where(device: torch.device) -> str:
    return f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else \
        torch.cuda.get_device_name(device)


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    model = random_sit(args.model, 4, device, args.depth)
    ckpt = as_checkpoint(model, "repa")
    convention, dtype = ckpt.convention, AUTOCAST_DTYPES[args.precision]
    x0 = torch.randn(args.batch_size, 4, 32, 32, device=device)
    ids = torch.arange(args.batch_size)
    x_t, timestep = noisy_input(convention, x0, ids, args.t, seed=0)
    y = torch.full((args.batch_size,), model.config.num_classes, device=device)

    @torch.no_grad()
    def forward():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x_t, timestep, y)

    @torch.no_grad()
    def hooks_only():
        with BlockCapture(ckpt, stop_early=False), \
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x_t, timestep, y)

    def capture():
        capture_batch(ckpt, x0, None, ids, args.t, seed=0, autocast_dtype=dtype, spatial=args.spatial)

    fns = {"forward": forward, "hooks only": hooks_only, "capture": capture}
    for fn in fns.values():   # warm-up
        fn()
    med = report(f"per pass: {args.model}{f' ({args.depth} blocks)' if args.depth else ''} latents, 256 tokens, batch {args.batch_size}, {args.precision}, "
                 f"{where(device)}, median of {args.repeats}:", tuple(fns), repeat(fns, args.repeats, device), device)
    for clock in ("wall", "cpu") if device.type == "cpu" else ("wall",):
        print(f"  {clock:<4} ratio capture / forward = {med['capture', clock] / med['forward', clock]:.3f}   "
              f"(hooks only: {med['hooks only', clock] / med['forward', clock]:.3f}; target ≤ 1.05)")
    if args.n:
        end_to_end(args)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SiT-S/2")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: the model's own)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--spatial", action="store_true", help="capture also computes the spatial measures")
    parser.add_argument("--n", type=int, default=256, help="end to end: CIFAR images (0 = skip the end-to-end part)")
    parser.add_argument("--ts", default="0.25,0.5", help="end to end: noise levels")
    parser.add_argument("--workers", type=int, default=0, help="end to end: DataLoader workers")
    parser.add_argument("--compile", action="store_true", help="end to end: also time extract with --compile")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10/test"))
    main(parser.parse_args())
