"""Sample quality's cost on the CPU for the CIFAR deep preset model (issue 27, item 7): samples/s of the seeded
sampler (generation.sample_features' path: sampler.sample_indexed in batches) against the same samples drawn one
at a time (batch size 1, the unbatched per-sample loop), and the time of an FD: the teacher's features of the
samples, then our Fréchet distance against pytorch-fid's scipy `sqrtm` formula on the same statistics.

Batched and one-at-a-time samples are the same samples (one generator per sample index): the script checks that
they agree and prints the largest difference. Medians over repeats; wall time and CPU time.

    OMP_NUM_THREADS=1 python benchmarks/bench_generation.py \\
        --weights reports/weights/cifar_deep/vanilla-s0.safetensors [--n 64] [--steps 25] [--sampler sde]

On a GPU, REPA's FID setting for SiT-XL/2 (random weights, 32×32×4 latents, 1,000 classes; the VAE decode and
Inception features are not in it): `--model SiT-XL/2 --device cuda --precision bf16 [--compile] --n 256
--batch-size 256 --steps 10 --no-single --no-fd`, which prints the measured samples/s, the estimated time of 50,000
samples at 250 SDE steps and the model FLOP utilisation (analytic forward FLOPs, bench_train.block_flops, against
--peak-tflops).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from repa_probe import generation as G
from repa_probe.encoders import load_encoder
from repa_probe.families import load_checkpoint
from repa_probe.fid import GaussianStats, frechet_distance
from repa_probe.families.sit import as_checkpoint
from repa_probe.sampler import DEFAULT_STEPS, sample_indexed
from bench_capture import random_sit  # noqa: E402  (benchmarks/ is the script's folder)
from bench_train import block_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEACHER = "cifar-ssl-resnet"


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median wall s, median CPU s, the last result) of fn() over `repeats` runs."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def sampling(ckpt, n: int, batch: int, sampler: str, steps: int, precision: str = "fp32",
             compile: bool = False) -> torch.Tensor:
    out = torch.cat([sample_indexed(ckpt, range(i, min(i + batch, n)), sampler=sampler, steps=steps,
                                    precision=precision, compile=compile) for i in range(0, n, batch)])
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def sample_flops(config) -> float:
    """Analytic forward FLOPs of one sample at one sampler step (no guidance: one forward)."""
    return block_flops(config.hidden_size, (config.input_size // config.patch_size) ** 2, config.depth)


def fd_parts(samples: torch.Tensor, reference: GaussianStats, repeats: int) -> dict[str, float]:
    """Seconds of the teacher's features of the samples, of our FD and of pytorch-fid's formula."""
    space = G.EncoderSpace(load_encoder(TEACHER), grid=G.GEN_GRID)
    feats_s, _, feats = timed(lambda: space.features(G.to_uint8(samples))["pool"].double().numpy(), repeats)
    s = GaussianStats.of(feats)
    ours_s, _, ours = timed(lambda: frechet_distance(s.mu, s.sigma, reference.mu, reference.sigma), repeats)
    out = {"features_s": feats_s, "fd_ours_s": ours_s, "fd": ours}
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
        scipy_s, _, theirs = timed(lambda: calculate_frechet_distance(s.mu, s.sigma, reference.mu, reference.sigma),
                                   repeats)
        out.update(fd_scipy_s=scipy_s, fd_scipy=float(theirs))
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(REPO / "reports" / "weights" / "cifar_deep" / "vanilla-s0.safetensors"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10" / "test"))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sampler", choices=("ode", "sde"), default="sde")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (REPA's FID: 250 SDE; time is linear in it)")
    p.add_argument("--reference-n", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="a random SiT of this size (e.g. SiT-XL/2) instead of --weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="the model's autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (the first repeat compiles)")
    p.add_argument("--no-single", action="store_true", help="skip the one-sample-at-a-time baseline")
    p.add_argument("--no-fd", action="store_true", help="skip the FD timing (the teacher sees 32×32 pixels only)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H100/H200 SXM bf16)")
    a = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(a.device)
    ckpt = as_checkpoint(random_sit(a.model, 4, device), "repa") if a.model else load_checkpoint(a.weights,
                                                                                               device=device)
    an = ckpt.anatomy
    print(f"{a.model or a.weights}: {an.name}, width {an.width}, {an.depth} blocks, {an.grid ** 2} tokens; "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}"
          f"; {a.n} samples, {a.sampler} {a.steps} steps, {a.precision}{', compiled' if a.compile else ''}")
    batched = timed(lambda: sampling(ckpt, a.n, a.batch_size, a.sampler, a.steps, a.precision, a.compile),
                    a.repeats)
    line = f"sampling, batch {a.batch_size}: {a.n / batched[0]:.2f} samples/s (wall {batched[0]:.2f} s, CPU " \
           f"{batched[1]:.2f} s)"
    if not a.no_single:
        single = timed(lambda: sampling(ckpt, a.n, 1, a.sampler, a.steps), max(1, a.repeats - 1))
        same = float((batched[2] - single[2]).abs().max())
        line += f"; batch 1: {a.n / single[0]:.2f} samples/s (wall {single[0]:.2f} s); batched ÷ one at a time: " \
                f"{single[0] / batched[0]:.2f}× faster; max |difference| {same:.2e}"
    print(line)
    full = DEFAULT_STEPS["sde"] / a.steps
    flops = sample_flops(ckpt.config) * a.steps * a.n / batched[0]
    print(f"  → REPA's setting (SDE {DEFAULT_STEPS['sde']} steps): about {a.n / batched[0] / full:.2f} samples/s, "
          f"{1000 * full * batched[0] / a.n:.0f} s per 1,000 samples, {50_000 * full * batched[0] / a.n / 60:.1f} min "
          f"per 50,000; model FLOP utilisation {flops / (a.peak_tflops * 1e12):.1%} of {a.peak_tflops:g} TFLOP/s")
    if a.no_fd:
        return
    space = G.EncoderSpace(load_encoder(TEACHER), grid=G.GEN_GRID)
    reference = G.reference_from_folder(a.data, [space], image_size=an.input.image_size, n=a.reference_n)
    parts = fd_parts(batched[2], reference.stats[f"{TEACHER}/pool"], a.repeats)
    line = f"FD in {TEACHER}'s space (D = {reference.stats[f'{TEACHER}/pool'].mu.shape[0]}): features of {a.n} " \
           f"samples {parts['features_s']:.3f} s, FD {parts['fd_ours_s'] * 1e3:.1f} ms = {parts['fd']:.4f}"
    if "fd_scipy_s" in parts:
        line += f"; pytorch-fid's scipy formula {parts['fd_scipy_s'] * 1e3:.1f} ms = {parts['fd_scipy']:.4f} " \
                f"(ours {parts['fd_scipy_s'] / parts['fd_ours_s']:.2f}× faster, |diff| " \
                f"{abs(parts['fd'] - parts['fd_scipy']):.1e})"
    print(line)


if __name__ == "__main__":
    main()
