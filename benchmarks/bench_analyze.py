"""End-to-end `analyze` wall time, split into stages, against the bare forward passes it cannot avoid.

    python benchmarks/bench_analyze.py                       # CPU: SiT-S/2 (pixels, 256 tokens), 500 CIFAR images
    python benchmarks/bench_analyze.py --model SiT-XL/2 --n 10000 --encoder dinov2-vit-l --device cuda

The model gets random weights with every block's two residual gates open (biases 1): an adaLN-Zero
initialisation makes each block the identity, so every block would hold the same rank-12 features (a
linear map of the mean patch), and probes and metrics on those do not cost what they cost on a
checkpoint's full-rank features. The forwards' cost does not depend on the weights. Pixel input
3×32×32 with patch 2, i.e. 256 tokens: the same compute per image as a latent SiT on 256-px ImageNet
(4×32×32 latents), without the one-off VAE encoding. The encoder is randomly initialised
(--encoder-random-init) at its real size.

Printed: per stage (data+forwards, encoders, probes, metrics, report) seconds and share of the total, and
the baseline — the model's forward passes the analysis cannot avoid (n images × t values, plus the probe sets
when --probe-train/--probe-test name other images; by default the probe splits the n images) with no hooks,
no store, no metrics — measured in the same run, half before the analysis and half after (the machine's
speed drifts over minutes); the ratio total / baseline is the overhead of everything else, the
untrained-model baseline's passes (block 0 only) included. Target (issue 6): XL/2-sized,
10,000 images, 5 t, a ViT-L encoder, probes + CKNNA at every block × t in ≤ 5 minutes on one H100.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repa_probe.commands import AnalyzeConfig, compare  # noqa: E402
from repa_probe.checkpoints import save_checkpoint  # noqa: E402
from repa_probe.models import SiT, model_config  # noqa: E402
from repa_probe.runtime import resolve_device, resolve_precision  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def bare_forwards(model: SiT, n_images: int, batch: int, device, dtype) -> tuple[float, float]:
    """(wall, CPU) seconds for n_images forward passes with random inputs: the floor any analysis pays."""
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t = torch.rand(batch, device=device)
    y = torch.full((batch,), cfg.num_classes, device=device)
    model = model.to(device).eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x, t, y)                                   # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        batches = max(1, round(n_images / batch))
        for _ in range(batches):
            model(x, t, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_image = n_images / (batches * batch)          # scaled to exactly n_images passes
    return (time.perf_counter() - start) * per_image, (time.process_time() - cpu) * per_image


def gated_checkpoint(path: Path, cfg, seed: int = 0) -> tuple[SiT, Path]:
    """A SiT with random weights and every block's two residual gates open (biases 1), saved as a pixel-space
    checkpoint: an adaLN-Zero initialisation would make every block the identity (see the module docstring)."""
    torch.manual_seed(seed)
    model = SiT(cfg)
    with torch.no_grad():
        for block in model.blocks:   # modulation chunks: shift, scale, gate (attention); shift, scale, gate (MLP)
            bias = block.adaLN_modulation[-1].bias.view(6, -1)
            bias[2], bias[5] = 1.0, 1.0
    return model, save_checkpoint(path, cfg, model.state_dict(), meta={"mode": "pixels", "step": 0})


def open_gated_checkpoint(name: str, path: Path) -> tuple[SiT, Path]:
    """`gated_checkpoint` of SiT `name` on 3×32×32 pixels, 10 classes, seed 0."""
    return gated_checkpoint(path, model_config(name, in_channels=3, input_size=32, num_classes=10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-S/2")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--t", default="0,0.1,0.25,0.5,0.75")
    p.add_argument("--encoder", default="vit_small_patch16_224", help="encoder name (random weights)")
    p.add_argument("--encoder-precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--data", default=str(SHARED / "test"), help="alignment images (ImageFolder)")
    p.add_argument("--probe-train", default=None,
                   help="probe training images (default: the probe splits the --n alignment images, no extra forwards)")
    p.add_argument("--probe-test", default=None)
    p.add_argument("--bootstrap", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--keep", default=None, help="keep the report and cache in this folder")
    p.add_argument("--progress", action="store_true", help="show analyze's progress bars (stderr)")
    args = p.parse_args()

    device = resolve_device(args.device)
    ts = tuple(float(t) for t in args.t.split(","))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_analyze-"))
    work.mkdir(parents=True, exist_ok=True)
    model, ckpt = open_gated_checkpoint(args.model, work / "model.pt")
    cfg = model.config

    precision = resolve_precision("auto", device)            # analyze's default for the model's forwards
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # the trained model's full forward passes: the alignment set (+ the probe sets if they are other images), × t.
    # The untrained baseline's passes (block 0 only) and everything else count as overhead in the ratio.
    n_images = args.n + ((args.n + max(args.n // 2, 20)) if args.probe_train else 0)
    n_forwards = len(ts) * n_images
    # half of the baseline before the analysis and half after: the machine's speed drifts over minutes (by
    # 10% on a shared two-core box), and a baseline measured at one end would carry that drift into the ratio
    before = bare_forwards(model, n_forwards // 2, args.batch_size, device, dtype)

    config = AnalyzeConfig(data=args.data, n=args.n, ts=ts, encoders=[args.encoder], encoder_random_init=True,
                           encoder_precision=args.encoder_precision,
                           probe_train=args.probe_train, probe_test=args.probe_test, bootstrap=args.bootstrap,
                           batch_size=args.batch_size, num_workers=args.workers, device=str(device),
                           cache=str(work / "cache"), quiet=not args.progress)
    start, cpu = time.perf_counter(), time.process_time()
    out = compare([str(ckpt)], config, str(work / "report"))
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    timings = json.loads((out / "summary.json").read_text())["timings_s"]
    after = bare_forwards(model, n_forwards - n_forwards // 2, args.batch_size, device, dtype)
    base, base_cpu = before[0] + after[0], before[1] + after[1]

    print(f"{args.model} (width {cfg.hidden_size}, {cfg.depth} blocks, 256 tokens), n = {args.n}, t = {args.t}, "
          f"encoder {args.encoder} (random), {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
          f" precision {precision}, encoder {args.encoder_precision}, threads {torch.get_num_threads()}")
    print(f"{'stage':<16}{'seconds':>10}{'share':>8}")
    for stage in ("data+forwards", "encoders", "probes", "metrics", "report"):
        print(f"{stage:<16}{timings.get(stage, 0):>10.1f}{timings.get(stage, 0) / total:>8.0%}")
    print(f"{'total':<16}{total:>10.1f}")
    print(f"baseline: {n_forwards} bare forward passes of the model (n × t; no hooks, store, untrained baseline, "
          f"metrics), half before the analysis and half after: {base:.1f} s ({before[0]:.1f} + {after[0]:.1f})")
    print(f"ratio total / bare forwards = {total / base:.2f}")
    if device.type == "cpu":   # on a shared CPU the work done is the steadier measure (the wall clock counts waits)
        print(f"CPU time: total {total_cpu:.1f} s, bare forwards {base_cpu:.1f} s, ratio {total_cpu / base_cpu:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
