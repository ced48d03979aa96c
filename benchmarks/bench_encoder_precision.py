"""What bf16 autocast changes in a target encoder (`--encoder-precision bf16`), against fp32, and what it saves.

On n CIFAR images (default 2,000 test images), in the same run:
  features   relative deviation ‖pooled_bf16 − pooled_fp32‖ / ‖pooled_fp32‖ (Frobenius, and the worst image),
             and CKNNA(pooled_fp32, pooled_bf16) (1 = the same neighbourhoods)
  CKNNA      every block × t of a model checkpoint against the encoder in fp32 and in bf16: max |ΔCKNNA|,
             set against the 95% bootstrap interval width of the fp32 values (analyze's intervals, 20 replicates)
  time       encoding all n images in fp32 and in bf16 (alternating, median of --repeats)

    python benchmarks/bench_encoder_precision.py --checkpoint RUN/checkpoints/0005000.pt
    python benchmarks/bench_encoder_precision.py --checkpoint CKPT --encoder dinov2-vit-b --device cuda

bf16 is worth making the default only where max |ΔCKNNA| is well below the interval width.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from repa_probe import encoders as ENC
from repa_probe import metrics as M
from repa_probe.capture import capture_blocks, input_space, make_dataset
from repa_probe.data import to_model_space
from repa_probe.encoders import load_encoder
from repa_probe.families import load_checkpoint
from repa_probe.runtime import resolve_device

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def encode_all(encoder, images: torch.Tensor, grid: int, batch: int, device) -> torch.Tensor:
    return torch.cat([encoder.encode(images[i:i + batch].to(device).float() / 255, grid)[1].cpu()
                      for i in range(0, len(images), batch)])


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    ckpt.model.to(device).eval()
    space = input_space(ckpt)
    dataset = make_dataset(args.data, space.image_size, args.n)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    grid = ckpt.anatomy.grid
    encoders = {p: load_encoder(args.encoder, random_init=args.random_init, device=device, precision=p)
                for p in ("fp32", "bf16")}

    times = {p: [] for p in encoders}
    pooled = {}
    for _ in range(args.repeats):
        for p, enc in encoders.items():
            start = time.perf_counter()
            pooled[p] = encode_all(enc, images, grid, args.batch_size, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[p].append(time.perf_counter() - start)
    f32, b16 = pooled["fp32"].double(), pooled["bf16"].double()
    rel = (b16 - f32).norm() / f32.norm()
    worst = ((b16 - f32).norm(dim=1) / f32.norm(dim=1)).max()
    centred = ENC.centred_deviation(f32, b16)      # what --encoder-precision auto tests on its check images
    self_cknna = M.cknna(f32.numpy(), b16.numpy(), k=args.k, device=device)

    x0 = to_model_space(images, "pixels") if space.kind == "pixels" else None
    if x0 is None:
        raise SystemExit("this benchmark feeds pixels: give a pixel-space checkpoint")
    ts = [float(t) for t in args.t.split(",")]
    src = capture_blocks(ckpt, x0, None, torch.as_tensor(dataset.ids), ts, seed=0,
                         batch_size=args.batch_size).numpy()                     # [T, B, N, D]
    scores = {p: M.alignment(pooled[p].numpy(), src, ("cknna",), k=args.k, device=device)["cknna"] for p in pooled}
    delta = np.abs(scores["bf16"] - scores["fp32"])
    cis, _ = M.bootstrap_alignment(pooled["fp32"].numpy(), src, ("cknna",), k=args.k, n_boot=args.bootstrap, seed=0,
                                   around={"cknna": scores["fp32"]}, device=device, replicates=True)
    width = cis["cknna"][..., 1] - cis["cknna"][..., 0]

    print(f"encoder {args.encoder}{' (random weights)' if args.random_init else ''}, grid {grid}, n = {len(dataset)}, "
          f"{device}{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}; model "
          f"{ckpt.anatomy.name} ({ckpt.anatomy.depth} blocks), t = {args.t}, k = {args.k}")
    print(f"features: ‖bf16 − fp32‖ / ‖fp32‖ = {rel:.2e} (worst image {worst:.2e}); "
          f"centred {centred:.2e}; CKNNA(fp32, bf16) = {self_cknna:.4f}")
    print(f"CKNNA over {delta.size} block × t: fp32 values {scores['fp32'].min():.4f} … {scores['fp32'].max():.4f}; "
          f"|ΔCKNNA| max {delta.max():.2e}, median {np.median(delta):.2e}")
    print(f"bootstrap 95% interval width ({args.bootstrap} replicates): min {width.min():.2e}, "
          f"median {np.median(width):.2e}; max |ΔCKNNA| / min width = {delta.max() / width.min():.3f}")
    f, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"encode time, median of {args.repeats}: fp32 {f:.2f} s, bf16 {b:.2f} s (bf16 / fp32 = {b / f:.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a pixel-space model checkpoint to align")
    parser.add_argument("--encoder", default="cifar-ssl-resnet")
    parser.add_argument("--random-init", action="store_true", help="random encoder weights")
    parser.add_argument("--data", default=str(SHARED / "test"))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--t", default="0,0.5")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    main(parser.parse_args())
