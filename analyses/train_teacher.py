"""Train the CIFAR-10 self-supervised teacher (``repa_probe/teacher.py``) with SimCLR.

SimCLR (Chen et al. 2020, arXiv 2002.05709): each image of a batch gets two random augmentations; the
projections z = g(f(x)) of the 2B views are L2-normalised and each view must pick out its partner among
the other 2B − 1 views, NT-Xent loss  ℓ(i, j) = −log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ),  s = cosine.
Augmentations are SimCLR's CIFAR set without blur: random resized crop, horizontal flip, colour jitter
(0.4, 0.4, 0.4, 0.1) with p = 0.8, greyscale with p = 0.2. Labels are never read.

The whole train split is decoded once into a uint8 tensor (150 MB) and augmented in batched tensor ops
(crops as one ``grid_sample``), because per-image PIL transforms would cost more than the network on a
2-core CPU. A checkpoint is written after every epoch; ``--resume`` continues from it with the same
data order and augmentations as an uninterrupted run (both are seeded by (seed, epoch)).

    python analyses/train_teacher.py --out scratch/teacher            # the committed teacher
    python analyses/train_teacher.py --out scratch/teacher --resume   # after an interruption
    python analyses/probe_teacher.py --ckpt scratch/teacher/last.pt --export repa_probe/assets/cifar_ssl_resnet.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from repa_probe.teacher import CifarResNet, TeacherConfig, normalize  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"


#################################################################################
#                                      Data                                     #
#################################################################################

def load_split(root: Path, split: str, limit_per_class: int | None = None) -> tuple[Tensor, Tensor]:
    """An ImageFolder split decoded whole: images uint8 [N, 3, H, W], labels int64 [N] (sorted class names)."""
    folder = Path(root) / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())[:limit_per_class]]
    first = np.asarray(Image.open(files[0][0]).convert("RGB"))
    images = np.empty((len(files), *first.shape), np.uint8)
    for j, (f, _) in enumerate(files):
        with Image.open(f) as im:
            images[j] = np.asarray(im.convert("RGB"))
    labels = torch.tensor([i for _, i in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


#################################################################################
#                              Batched augmentations                            #
#################################################################################

def random_resized_crop(x: Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> Tensor:
    """torchvision's RandomResizedCrop (area ∈ scale, aspect ∈ [3/4, 4/3] log-uniform) plus a horizontal flip
    with p = 0.5, for a whole batch [N, C, H, W] float in one bilinear ``grid_sample``.

    Instead of torchvision's rejection sampling, a box side longer than the image is clamped to the image."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=g)
    log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)   # box sides as fractions of the image side
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)  # box centre in [-1, 1] coordinates
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device), [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma [N, 1, H, W], torchvision's rgb_to_grayscale."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: Tensor, g: torch.Generator, strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                 p: float = 0.8) -> Tensor:
    """Brightness, contrast, saturation, hue jitter (torchvision's ColorJitter factors, in this fixed order),
    applied to a random fraction p of the batch; images in [0, 1].

    Hue is a rotation of the chroma plane of YIQ, a cheap batched stand-in for the HSV hue shift."""
    n = x.shape[0]
    b, c, s, hue = strength

    def factor(k: float) -> Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(1 - k, 1 + k, generator=g).to(x.device)

    on = (torch.rand(n, 1, 1, 1, generator=g) < p).float().to(x.device)
    fb, fc, fs = factor(b), factor(c), factor(s)
    angle = torch.empty(n).uniform_(-hue, hue, generator=g) * 2 * math.pi
    y = (x * fb).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * fc + mean).clamp(0, 1)
    gray = _gray(y)
    y = ((y - gray) * fs + gray).clamp(0, 1)
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = (torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq).to(x.device)   # (N, 3, 3) per-image colour matrix
    y = torch.einsum("nij,njhw->nihw", m, y).clamp(0, 1)
    return on * y + (1 - on) * x


def random_grayscale(x: Tensor, g: torch.Generator, p: float = 0.2) -> Tensor:
    on = (torch.rand(x.shape[0], 1, 1, 1, generator=g) < p).float().to(x.device)
    return on * _gray(x).expand_as(x) + (1 - on) * x


def simclr_view(batch_u8: Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> Tensor:
    """One augmented, normalised view [N, 3, size, size] of a uint8 batch."""
    x = random_resized_crop(batch_u8.float() / 255, size, scale, g)
    x = random_grayscale(color_jitter(x, g), g)
    return normalize(x).contiguous(memory_format=torch.channels_last)


#################################################################################
#                                   Loss, schedule                              #
#################################################################################

def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent for z [2B, d] whose rows i and i ± B are the two views of one image."""
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))          # a view is not its own negative
    b = z.shape[0] // 2
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


#################################################################################
#                                    Monitor                                    #
#################################################################################

@torch.no_grad()
def pooled_features(model: CifarResNet, images_u8: Tensor, batch: int = 500) -> Tensor:
    """Pooled (mean of the final map) features [N, D] of uint8 images at their own size, eval mode."""
    model.eval()
    out = [model.forward_features(normalize(images_u8[i:i + batch].float() / 255)
                                  .contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3)).float()
           for i in range(0, len(images_u8), batch)]
    return torch.cat(out)


def knn_accuracy(train: Tensor, y_train: Tensor, test: Tensor, y_test: Tensor, k: int = 20) -> float:
    """Cosine k-NN top-1 with similarity-weighted votes (the usual SSL monitor, Wu et al. 2018)."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    sim, idx = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test), int(y_train.max()) + 1, device=test.device).scatter_add_(
        1, y_train[idx], (sim / 0.07).exp())
    return float((votes.argmax(dim=1) == y_test).float().mean())


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"
    t_load = time.time()
    device = torch.device(args.device)
    images, _ = load_split(args.data, "train", args.limit_per_class)  # labels are never used for training
    mon = min(500, args.limit_per_class or 500)                       # monitor only: 5k/1k kNN
    mon_tr, mon_ytr = (t.to(device) for t in load_split(args.data, "train", limit_per_class=mon))
    mon_te, mon_yte = (t.to(device) for t in load_split(args.data, "test", limit_per_class=mon // 5))
    images = images.to(device)
    print(f"decoded {len(images)} training images in {time.time() - t_load:.0f}s", flush=True)

    torch.manual_seed(args.seed)
    cfg = TeacherConfig(stem=args.stem, widths=tuple(args.widths), depths=tuple(args.depths), expand=args.expand)
    model = CifarResNet(cfg, with_head=True).to(device, memory_format=torch.channels_last)
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    # No weight decay on BatchNorm parameters and biases, as usual for SimCLR-style training.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(images) // args.batch_size                # drop the last partial batch
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    start_epoch, log, elapsed = 0, [], 0.0
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start_epoch, log, elapsed = ck["epoch"], ck["log"], ck["elapsed"]
        print(f"resumed from {ckpt_path} after epoch {start_epoch}", flush=True)
    print(f"SimCLR teacher: {n_params / 1e6:.2f}M trunk parameters, {args.epochs} epochs x {steps_per_epoch} steps "
          f"of {args.batch_size} images, crops {args.res}px", flush=True)

    for epoch in range(start_epoch, min(args.epochs, args.stop_after or args.epochs)):
        model.train()
        t0 = time.time()
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)  # same order and views after a resume
        order = torch.randperm(len(images), generator=g)
        running = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            batch = images[order[i * args.batch_size:(i + 1) * args.batch_size].to(device)]
            views = torch.cat([simclr_view(batch, args.res, (args.min_scale, 1.0), g) for _ in range(2)])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                _, z = model(views)
            loss = nt_xent(z, args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            if (i + 1) % args.log_every == 0:
                rate = (i + 1) * args.batch_size / (time.time() - t0)
                print(f"epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {running / (i + 1):.4f} "
                      f"lr {opt.param_groups[0]['lr']:.4f} {rate:.0f} img/s", flush=True)
        knn = knn_accuracy(pooled_features(model, mon_tr), mon_ytr, pooled_features(model, mon_te), mon_yte)
        elapsed += time.time() - t0
        log.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "knn_5k_1k": knn,
                    "epoch_s": time.time() - t0})
        print(json.dumps(log[-1]), f"total {elapsed / 60:.1f} min", flush=True)
        ck = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
              "epoch": epoch + 1, "log": log,
              "elapsed": elapsed, "args": vars(args) | {"data": str(args.data), "out": str(args.out)},
              "n_params": n_params}
        torch.save(ck, out / "tmp.pt")
        (out / "tmp.pt").replace(ckpt_path)        # atomic: an interruption never leaves a broken checkpoint
    print(f"done: {log[-1]['epoch'] if log else 0}/{args.epochs} epochs, {elapsed / 60:.1f} min of training; checkpoint {ckpt_path}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 ImageFolder root (train/, test/)")
    p.add_argument("--out", type=Path, default=REPO / "scratch" / "teacher", help="run folder (last.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--stop-after", type=int, help="stop after this many epochs (the schedule stays that of "
                   "--epochs); continue later with --resume")
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.3, help="peak SGD learning rate (Nesterov momentum 0.9)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay on weights (not BN/bias)")
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--res", type=int, default=24, help="training crop size in pixels")
    p.add_argument("--min-scale", type=float, default=0.2, help="smallest crop area fraction")
    p.add_argument("--stem", type=int, default=32)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 1, 1])
    p.add_argument("--expand", type=int, default=0, help="width of a final 1x1 conv layer (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a CPU shared with other jobs")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the augmentations' random numbers are drawn on the "
                                                  "CPU either way, so a run's views do not depend on the device)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--limit-per-class", type=int, help="train on the first N images of each class (smoke tests)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
