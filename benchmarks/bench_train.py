"""Training throughput: the trainer's step against a plain reference step, measured in the same run.

    python benchmarks/bench_train.py                      # CPU: a small pixel SiT, tiny random ViT teacher
    python benchmarks/bench_train.py --models S/2,B/2,XL/2 --compile    # GPU: 256 tokens, DINOv2-B-sized teacher

Both steps train the same SiT (same config, same init) with the REPA term on the same batch:

- ours: `repa_probe.train.trainer` as `train()` runs it (draw_step_randomness, encoder_targets, train_step):
  autocast (bf16 on GPUs, off on CPU), TF32, fused AdamW, foreach EMA, the vectorised float32 cosine;
  `--compile` adds a torch.compile variant.
- reference: written below as a straightforward loop in the style of REPA's train.py/loss.py: eager fp32
  (no TF32), torch.optim.AdamW with its defaults, the per-sample REPA loss loop, the per-parameter EMA.

- REPA official (``--official DIR``, a snapshot of github.com/sihyun-yu/REPA): its own ``models/sit.py`` SiT
  and ``loss.py`` SILoss, built and stepped as its train.py does (fp16 autocast with a gradient scaler and
  TF32 on GPUs, as its README's commands; fp32 on CPU), the teacher as ours. Nothing is downloaded or copied:
  the two files are imported from DIR (git archive of the fetched repository; `gpu_session.sh` carries it).

``--curve STEPS`` instead trains STEPS steps on the plain path (fp32, no TF32, eager) and on the fast one
(bf16 autocast and TF32 on GPUs, torch.compile with --compile) from the same init and seeds, and prints the
largest relative difference of the two loss curves.

Each line also gives the model FLOP utilisation on a GPU: analytic FLOPs (2 per multiply-add) of the
student's forward × 3 (forward + backward) plus the teacher's forward, per image, × img/s, over the bf16
dense peak of the device (--peak-tflops; default: H100/H200 SXM, 989).

Only the step is timed (data on the device already; latent runs get random latents, as REPA trains on
precomputed VAE moments). On CPU the variants alternate step by step and the median step time counts,
so a shared machine's load hits both alike; on GPU each runs a synchronised block of steps. REPA's README
numbers on one H100 (fused attention, no compile, with its data loader): SiT-XL/2 + DINOv2-B 290 img/s at
batch 64, SiT-B/2 + DINOv2-B 1039 img/s at batch 128; the GPU lines also print our img/s against them
(meaningful on an H100 only; --official measures the official code on the same device instead).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from repa_probe.encoders import load_encoder
from repa_probe.models import model_config
from repa_probe.runtime import autocast as autocast_for
from repa_probe.train.trainer import (TrainConfig, draw_step_randomness, encoder_targets, init_model,
                                      make_optimizer, train_step)

REPA_OFFICIAL_H100 = {("B/2", 128): 1039.0, ("XL/2", 64): 290.0}   # img/s, REPA's README (no compile)
GPU_BATCH = {"S/2": 256, "B/2": 128, "L/2": 64, "XL/2": 64}


def reference_step(model, ema, optimizer, encoders, images, x, labels, grid, num_classes):
    """REPA-style fp32 step: encoders, t ~ U(0, 1), label drop, v-loss + 0.5·REPA, clip 1.0, AdamW, EMA."""
    with torch.no_grad():
        zs = [enc.encode(images.float() / 255, grid)[0] for enc in encoders]
    n = x.shape[0]
    t = torch.rand(n, device=x.device)
    noise = torch.randn_like(x)
    y = torch.where(torch.rand(n, device=x.device) < 0.1, num_classes, labels)
    tt = t.view(-1, 1, 1, 1)
    out, zs_tilde = model((1 - tt) * x + tt * noise, t, y, return_zs=True)
    denoise = ((out - (noise - x)) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for j in range(n):
            proj = proj + (-(F.normalize(z[j], dim=-1) * F.normalize(z_tilde[j], dim=-1)).sum(dim=-1)).mean()
    proj = proj / (len(zs) * n)
    (denoise + 0.5 * proj).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)


def official_modules(repa_dir: str):
    """REPA's ``models/sit.py`` and ``loss.py``, imported from a checkout of sihyun-yu/REPA."""
    root = Path(repa_dir)
    mods = []
    for name, rel in (("repa_official_sit", "models/sit.py"), ("repa_official_loss", "loss.py")):
        if not (root / rel).is_file():
            raise SystemExit(f"--official {repa_dir}: no {rel} there; give a checkout of github.com/sihyun-yu/REPA")
        spec = importlib.util.spec_from_file_location(name, root / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def official_step(repa_dir: str, config, encoders, images, x, labels, grid: int, device: torch.device):
    """One step of REPA's train.py loop on its own model and loss: teacher tokens, SILoss (v-prediction,
    linear path, uniform t), loss + 0.5·proj, clip 1.0, AdamW (its defaults), per-parameter EMA; fp16 autocast,
    a gradient scaler and TF32 on GPUs (its README's setting), fp32 on CPU; its own initialisation (a step's
    cost does not depend on the weights)."""
    sit, loss = official_modules(repa_dir)
    model = sit.SiT(input_size=config.input_size, patch_size=config.patch_size, in_channels=config.in_channels,
                    hidden_size=config.hidden_size, decoder_hidden_size=config.hidden_size,
                    encoder_depth=config.encoder_depth, depth=config.depth, num_heads=config.num_heads,
                    num_classes=config.num_classes, use_cfg=True, z_dims=list(config.z_dims),
                    projector_dim=config.projector_dim, fused_attn=True, qk_norm=False).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    gpu = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = gpu
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=gpu)
    loss_fn = loss.SILoss(prediction="v", path_type="linear", weighting="uniform")
    ema_params, model_params = OrderedDict(ema.named_parameters()), OrderedDict(model.named_parameters())

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=gpu):
            zs = [enc.encode(images.float() / 255, grid, check_range=False)[0] for enc in encoders]
        with torch.autocast(device.type, dtype=torch.float16, enabled=gpu):   # accelerate wraps forward so
            denoise, proj = loss_fn(model, x, dict(y=labels), zs=zs)
        total = denoise.mean() + proj.mean() * 0.5
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, param in model_params.items():
                ema_params[name].mul_(0.9999).add_(param.data, alpha=1 - 0.9999)
    return step


def block_flops(width: int, tokens: int, depth: int) -> float:
    """Analytic forward FLOPs of `depth` transformer blocks for one image (2 per multiply-add): qkv + proj +
    MLP (4×) + attention scores and values."""
    return depth * tokens * (2 * 12 * width ** 2 + 2 * 2 * tokens * width)


def step_flops(config, encoder) -> float:
    """Analytic FLOPs of one training image (2 per multiply-add): the student's blocks, projector and final
    layer forward × 3 (backward ≈ 2 × forward), plus the teacher's forward (its blocks at its token count)."""
    blocks = block_flops
    tokens = (config.input_size // config.patch_size) ** 2
    d = config.hidden_size
    student = blocks(d, tokens, config.depth) + tokens * 2 * (d * config.projector_dim +
                                                          config.projector_dim ** 2 +
                                                          config.projector_dim * sum(config.z_dims))
    grid = config.input_size // config.patch_size
    teacher_tokens = grid * grid + getattr(encoder.model, "num_prefix_tokens", 1)
    depth = len(getattr(encoder.model, "blocks", [])) or 12
    return 3 * student + blocks(encoder.embed_dim, teacher_tokens, depth)


def timed(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def bench_one(name: str, batch: int, device: torch.device, args) -> tuple[list[tuple[str, float]], float]:
    """([(variant, img/s)], the step's FLOPs per image); no variants with --curve."""
    gpu = device.type == "cuda"
    if gpu:   # REPA's setting: SD-VAE latents 4×32×32 of 256-px images, patch 2 → 256 tokens
        overrides = dict(input_size=32, in_channels=4, num_classes=1000, projector_dim=2048)
        image_px, encoder = 256, args.encoder or "dinov2-vit-b"
    else:     # a small pixel SiT: 3×16×16, patch 2 → 64 tokens
        overrides = dict(input_size=16, in_channels=3, num_classes=10, hidden_size=192, depth=6, num_heads=3,
                         projector_dim=512, encoder_depth=2)
        image_px, encoder = 16, args.encoder or "test_vit"
    encoders = [load_encoder(encoder, random_init=True, device=device)]
    config = model_config(f"SiT-{name}", z_dims=[e.embed_dim for e in encoders], **overrides)
    grid = config.input_size // config.patch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_px, image_px), generator=g, dtype=torch.uint8).to(device)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g).to(device)
    labels = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
    base = init_model(config, seed=0).to(device).train()

    def reference():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False      # plain fp32
        model, ema = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        return lambda: reference_step(model, ema, optimizer, encoders, images, x, labels, grid, config.num_classes)

    def ours(compiled: bool, fp32: bool = False):
        def make():   # fp32=True: the plain path (fp32, no TF32) that --curve holds the fast one against
            cfg = TrainConfig(batch=batch, repa_coeff=0.5, precision="bf16" if gpu and not fp32 else "fp32",
                              tf32=not fp32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
            autocast = autocast_for(cfg.precision, device)
            model, ema = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
            optimizer = make_optimizer(model, cfg, device)
            scaler = torch.amp.GradScaler(device.type, enabled=False)
            net = torch.compile(model) if compiled else model
            gen, counter = torch.Generator(device=device), iter(range(10 ** 9))

            def step():   # what train() does per step, minus data loading and logging
                t, noise, drop = draw_step_randomness(gen, 0, next(counter), batch, tuple(x.shape[1:]), "uniform",
                                                      0.1)
                y = torch.where(drop, config.num_classes, labels)
                targets = encoder_targets(encoders, images, grid, autocast)
                return train_step(net, model, ema, optimizer, scaler, autocast, x, y, t, noise, targets, cfg)
            return step
        return make

    if args.curve:   # the same init, batch and per-step randomness; the losses of every step, side by side
        fast = "ours" + (" + torch.compile" if args.compile else "") + (" (bf16, TF32)" if gpu else " (fp32)")
        curves = {}
        for label, make in (("ours, fp32 eager", ours(False, fp32=True)), (fast, ours(args.compile))):
            step = make()
            curves[label] = torch.stack([step()[:2] for _ in range(args.curve)]).double().cpu()
            del step
        (ref, a), (_, b) = curves.items()
        rel = ((b - a).abs() / a.abs().clamp_min(1e-12)).max(dim=0).values
        print(f"SiT-{name}, batch {batch}: loss curves over {args.curve} steps, {fast} against {ref}: max relative "
              f"difference denoising {rel[0]:.1e}, REPA term {rel[1]:.1e}; last step denoising {a[-1, 0]:.5f} vs "
              f"{b[-1, 0]:.5f}, REPA {a[-1, 1]:.5f} vs {b[-1, 1]:.5f}")
        return [], 0.0

    variants = {"reference (fp32 eager)": reference, "ours": ours(False)}
    if args.compile:
        variants["ours + torch.compile"] = ours(True)
    if args.official:
        variants["REPA official code"] = lambda: official_step(args.official, config, encoders, images, x, labels,
                                                              grid, device)
    if gpu:   # one variant at a time (XL/2 states do not fit thrice), a synchronised block of steps each
        out = []
        for label, make in variants.items():
            step = make()
            out.append((label, batch / timed(step, args.warmup + (3 if "compile" in label else 0), args.steps,
                                             device)))
            del step
            torch.cuda.empty_cache()
        return out, step_flops(config, encoders[0])
    steps = {label: make() for label, make in variants.items()}   # CPU: alternate single steps, take medians,
    for label, step in steps.items():                               # so a shared machine's load hits all alike
        for _ in range(args.warmup + (3 if "compile" in label else 0)):
            step()
    times = {label: [] for label in steps}
    for _ in range(args.steps):
        for label, step in steps.items():
            times[label].append(timed(step, 0, 1, device))
    return [(label, batch / statistics.median(ts)) for label, ts in times.items()], step_flops(config, encoders[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--models", default=None, help="SiT sizes, e.g. S/2,B/2,XL/2 (default: S/2,B/2 on GPUs; "
                                                       "a small custom S/2 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on CPU; 256/128/64 for S/B/XL on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 15 on CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--encoder", default=None, help="random-init teacher (default: dinov2-vit-b on GPU, "
                                                        "test_vit on CPU)")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    parser.add_argument("--official", default=None, metavar="DIR",
                        help="also time REPA's own model and loss, imported from DIR (a sihyun-yu/REPA checkout)")
    parser.add_argument("--curve", type=int, default=0, metavar="STEPS",
                        help="instead of timing: train STEPS steps on the plain fp32 eager path and on the fast one "
                             "(bf16 + TF32 on GPUs, + torch.compile with --compile) from equal seeds; compare losses")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.steps = args.steps or (20 if gpu else 15)
    names = (args.models or ("S/2,B/2" if gpu else "S/2")).split(",")
    what = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {what}; torch {torch.__version__}")
    for name in names:
        batch = args.batch or (GPU_BATCH.get(name, 64) if gpu else 32)
        results, flops = bench_one(name, batch, device, args)
        if not results:   # --curve: no timing
            continue
        ref = results[0][1]
        size = f"SiT-{name}" + ("" if gpu else " (width 192, depth 6, 16×16 px, 64 tokens)")
        print(f"\n{size}, batch {batch}, REPA term on ({args.encoder or ('DINOv2-B' if gpu else 'test_vit')}, random)")
        measured = dict(results).get("REPA official code")
        print(f"  {flops / 1e9:.1f} GFLOP per image (student forward × 3 + teacher forward)")
        for label, ips in results:
            line = f"  {label:<24} {ips:9.1f} img/s   ×{ips / ref:.2f} vs reference"
            if gpu:
                line += f"   MFU {ips * flops / (args.peak_tflops * 1e12):.1%}"
            if measured and label.startswith("ours"):
                line += f"   ×{ips / measured:.2f} vs REPA official code (measured here)"
            official = REPA_OFFICIAL_H100.get((name, batch)) if gpu else None
            if official and label != results[0][0]:
                line += f"   ×{ips / official:.2f} vs REPA's README ({official:.0f} img/s, H100)"
            print(line)


if __name__ == "__main__":
    main()
