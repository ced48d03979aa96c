"""Hook overhead per model family: a forward pass inside BlockCapture (hooks on every block, mean pooling)
÷ the same forward pass bare (target ≤ 1.05 for every family).

Each family at a comparable size (width 384, 12 blocks, 256 image tokens, random weights), batch 16:
SiT (ours), DiT / PixArt / SD3 / Flux through diffusers' classes, and a SiT described as a plain nn.Module.
Forward and hooked forward alternate within each repeat; medians of CPU time (steadier than wall time on a
shared machine) and wall time are printed.

    python benchmarks/bench_families.py [--batch-size 16] [--repeats 5] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench_capture import timed
from repa_probe.capture import BlockCapture, noisy_input
from repa_probe.families import load_checkpoint
from repa_probe.families.module import describe_module
from repa_probe.families.sit import as_checkpoint
from repa_probe.models import SiT, model_config

HEADS, HEAD_DIM, DEPTH = 6, 64, 12


def diffusers_model(name: str, folder: Path):
    import diffusers
    kwargs = {
        "DiTTransformer2DModel": dict(in_channels=4, out_channels=8, sample_size=32, num_embeds_ada_norm=1000),
        "PixArtTransformer2DModel": dict(in_channels=4, out_channels=8, sample_size=32, cross_attention_dim=384,
                                         caption_channels=64),
        "SD3Transformer2DModel": dict(in_channels=4, out_channels=4, sample_size=32, joint_attention_dim=64,
                                      caption_projection_dim=384, pooled_projection_dim=32, pos_embed_max_size=32),
        "FluxTransformer2DModel": dict(in_channels=64, num_layers=DEPTH // 2, num_single_layers=DEPTH // 2,
                                       joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24)),
    }[name]
    kwargs.setdefault("num_layers", DEPTH)
    torch.manual_seed(0)
    model = getattr(diffusers, name)(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, **kwargs)
    model.save_pretrained(folder / name, safe_serialization=True)
    return load_checkpoint(folder / name)


def checkpoints(folder: Path) -> dict:
    sit = SiT(model_config("SiT-S/2", input_size=32, in_channels=4)).eval()
    with torch.no_grad():
        for name, p in sit.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.02)
    out = {"SiT (ours)": as_checkpoint(sit, "repa"),
           "nn.Module (SiT)": describe_module(sit, blocks="blocks", convention="repa", image_size=32, channels=4,
                                              num_classes=1000)}
    for name in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                 "FluxTransformer2DModel"):
        out[name] = diffusers_model(name, folder)
    return out


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = checkpoints(Path(tmp))
    print(f"batch {args.batch_size}, {device.type}"
          f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}, median of {args.repeats}:")
    for name, ckpt in ckpts.items():
        ckpt.model.to(device)
        a = ckpt.anatomy
        x0 = torch.randn(args.batch_size, a.input.channels, a.input.size, a.input.size, device=device)
        x_t, timestep = noisy_input(ckpt.convention, x0, torch.arange(args.batch_size), 0.5, seed=0)
        y = None if a.num_classes is None else torch.full((args.batch_size,), a.num_classes, device=device)

        @torch.no_grad()
        def bare():
            ckpt.family.forward(ckpt.model, x_t, timestep, y)

        @torch.no_grad()
        def hooked():
            with BlockCapture(ckpt, stop_early=False):
                ckpt.family.forward(ckpt.model, x_t, timestep, y)

        bare(), hooked()
        times = {k: [] for k in ("bare", "hooked")}
        for _ in range(args.repeats):
            for key, fn in (("bare", bare), ("hooked", hooked)):
                times[key].append(timed(fn, device))
        clock = 1 if device.type == "cpu" else 0
        med = {k: statistics.median(t[clock] for t in v) for k, v in times.items()}
        print(f"  {name:<26} {a.depth:>2} blocks × {a.grid ** 2} tokens: bare {med['bare'] * 1e3:8.1f} ms, hooked "
              f"{med['hooked'] * 1e3:8.1f} ms, ratio {med['hooked'] / med['bare']:.3f} (target ≤ 1.05)")
        ckpt.model.cpu()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    main(parser.parse_args())
