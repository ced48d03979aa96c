"""Capture overhead: time of one capture pass ÷ time of one plain forward pass (target ≤ 1.05).

SiT-S/2 on 32×32×4 latents (256 tokens), random weights, batch 64 by default. Two ratios:
  full        capture_batch (seeded noise, x_t, hooks on every block, mean pooling, raw baseline) ÷ forward of x_t
  hooks only  the same forward of x_t inside BlockCapture ÷ forward of x_t
Forward and capture alternate within each repeat so that machine load hits both alike; medians are reported.

    python benchmarks/bench_capture.py [--model SiT-XL/2 --depth 4] [--batch-size 64] [--repeats 5] [--device cuda] [--precision bf16] [--spatial]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from repa_probe.capture import BlockCapture, capture_batch, noisy_input
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


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    depth = {"depth": args.depth} if args.depth else {}       # the ratio is per block: fewer blocks, same ratio
    model = SiT(model_config(args.model, input_size=32, in_channels=4, **depth)).to(device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():   # random weights: adaLN-Zero gates would be zero otherwise
            if name != "pos_embed":
                p.normal_(0, 0.02)
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

    for fn in (forward, hooks_only, capture):   # warm-up
        fn()
    names = ("forward", "hooks only", "capture")
    times = {(k, clock): [] for k in names for clock in ("wall", "cpu")}
    for _ in range(args.repeats):
        for name, fn in zip(names, (forward, hooks_only, capture)):
            wall, cpu = timed(fn, device)
            times[name, "wall"].append(wall)
            times[name, "cpu"].append(cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    where = f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else \
        torch.cuda.get_device_name(device)
    print(f"{args.model}{f' ({args.depth} blocks)' if args.depth else ''}, 256 tokens, batch {args.batch_size}, {args.precision}, {where}, "
          f"median of {args.repeats}:")
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    for clock in clocks:
        for name in names:
            runs = ", ".join(f"{s * 1e3:.0f}" for s in times[name, clock])
            print(f"  {clock:<4} {name:<10} {med[name, clock] * 1e3:9.1f} ms   ({runs})")
        print(f"  {clock:<4} ratio capture / forward = {med['capture', clock] / med['forward', clock]:.3f}   "
              f"(hooks only: {med['hooks only', clock] / med['forward', clock]:.3f}; target ≤ 1.05)")

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
    main(parser.parse_args())
