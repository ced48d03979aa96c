"""Linear-probe the CIFAR-10 SSL teacher and (optionally) export it as the package's weight file.

The protocol behind the accuracy on the teacher's card: the pooled vector the analyses use (mean of the
final 8×8 feature map, ``repa_probe.teacher.encode``) of every un-augmented cifar10/train image and
cifar10/test image at 32×32; ``repa_probe.probe.linear_probe`` (features standardised with the train
statistics, multinomial logistic regression with an L2 penalty chosen on a seeded 20 % validation split of
train, refitted on all 50k train images); top-1 on the 10k test images, which take no part in fitting or
selection. The same probe on the untrained network (same architecture, seed 0 initialisation) is the
baseline; a cosine 20-NN accuracy is printed too.

    python analyses/probe_teacher.py --ckpt scratch/teacher/last.pt \\
        --export repa_probe/assets/cifar_ssl_resnet.safetensors --json scratch/teacher/probe.json
    python analyses/probe_teacher.py --weights repa_probe/assets/cifar_ssl_resnet.safetensors  # re-measure
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_teacher import DEFAULT_DATA, REPO, knn_accuracy, load_split  # noqa: E402

from repa_probe.probe import linear_probe  # noqa: E402
from repa_probe.teacher import CifarResNet, TeacherConfig, build_untrained, encode, load_teacher, save_teacher  # noqa: E402


@torch.no_grad()
def pooled(model: CifarResNet, images_u8: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The encoder's pooled vectors [N, D] for uint8 images, through ``teacher.encode`` itself."""
    return torch.cat([encode(model, images_u8[i:i + batch].float() / 255, grid=16)[1]
                      for i in range(0, len(images_u8), batch)])


def evaluate(model: CifarResNet, data: dict[str, torch.Tensor], label: str) -> dict[str, float]:
    t0 = time.time()
    tr, te = pooled(model, data["x_train"]), pooled(model, data["x_test"])
    res = linear_probe(tr.numpy(), data["y_train"].numpy(), te.numpy(), data["y_test"].numpy(), device="cpu")
    out = {"linear_probe_top1": float(res["top1"]), "train_top1": float(res["train_top1"]),
           "lambda": float(res["lambda"]), "knn20_top1": knn_accuracy(tr, data["y_train"], te, data["y_test"]),
           "dim": tr.shape[1], "seconds": round(time.time() - t0)}
    print(f"{label}: " + json.dumps(out), flush=True)
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha or "unknown"
    except OSError:
        return "unknown"


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if (args.ckpt is None) == (args.weights is None):
        raise SystemExit("give exactly one of --ckpt (a training checkpoint) or --weights (a safetensors file)")
    if args.ckpt is not None:
        ck = torch.load(args.ckpt, weights_only=True)
        a = ck["args"]
        cfg = TeacherConfig(stem=a["stem"], widths=tuple(a["widths"]), depths=tuple(a["depths"]),
                            expand=a.get("expand", 0))
        model = CifarResNet(cfg, with_head=True)  # the head is not used here and not exported
        model.load_state_dict(ck["model"])
        model.eval().requires_grad_(False)
    else:
        model = load_teacher(args.weights)
        cfg = model.config
    x_tr, y_tr = load_split(args.data, "train", args.limit_per_class)
    x_te, y_te = load_split(args.data, "test", args.limit_per_class)
    data = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    results = {"teacher": evaluate(model, data, "teacher")}
    if args.baseline:
        untrained = build_untrained(cfg, args.baseline_seed)  # the run's own initialisation
        results["untrained"] = evaluate(untrained, data, f"untrained (seed {args.baseline_seed})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.export:
        if args.ckpt is None:
            raise SystemExit("--export needs --ckpt")
        meta = {
            "method": "SimCLR (Chen et al. 2020, arXiv 2002.05709)", "dataset": "CIFAR-10 train (50k, no labels)",
            "epochs": str(ck["epoch"]), "seed": str(a["seed"]), "train_args": json.dumps(a, sort_keys=True),
            "train_minutes": f"{ck['elapsed'] / 60:.1f}", "trunk_params": str(ck["n_params"]),
            "linear_probe_top1_cifar10_test": f"{results['teacher']['linear_probe_top1']:.4f}",
            "untrained_probe_top1": f"{results['untrained']['linear_probe_top1']:.4f}" if args.baseline else "",
            "git_commit": git_commit(), "tokens": "final 8x8 map (stride 4), bilinear to grid x grid",
            "pooled": "mean of the native final map", "normalisation": "CIFAR-10 mean/std",
        }
        save_teacher(model, Path(args.export), meta)
        print(f"wrote {args.export} ({Path(args.export).stat().st_size / 1e6:.1f} MB)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="a train_teacher.py checkpoint (last.pt)")
    p.add_argument("--weights", type=Path, help="an exported teacher .safetensors")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--export", type=Path, help="write the trunk (no projection head) + metadata here")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also probe the untrained network")
    p.add_argument("--baseline-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-per-class", type=int, help="the first N images of each class (smoke tests)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
