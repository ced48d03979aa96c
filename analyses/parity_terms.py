"""Step 1 of our trainer against the authors' own loss functions, run beside ours from their code.

    git clone https://github.com/raywang4/DispLoss /tmp/displ      # or its mirror whaletech-ai/Disperse-Loss
    python analyses/parity_terms.py dispersive --authors /tmp/displ

For a method, this trains one step of the deep CIFAR preset's SiT (28 blocks of width 64, 64 images; the
method's flag at the authors' default) with `repa-probe train`, rebuilds step 1's batch (images, t, ε,
dropped labels) from the run's seed, runs the initial SiT on it, feeds the authors' loss function the same
tensors and compares it with the term our trainer logged at step 1. Their function is taken out of their
source file as written (its text is executed, not copied here); a `.cuda()` in it is made a no-op on a
machine without a GPU. Writes reports/parity/<method>.json: both values, their difference, the authors'
commit and file hash.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from repa_probe.checkpoints import read_checkpoint          # noqa: E402
from repa_probe.data import ImageDataset                     # noqa: E402
from repa_probe.models import ModelConfig                    # noqa: E402
from repa_probe.train.trainer import TrainConfig, init_model, replay_batch  # noqa: E402

DATA = Path(os.environ.get("REPA_PROBE_DATA", REPO.parent / "shared" / "data" / "cifar10")) / "train"
DEEP = ["--model", "SiT-S/4", "--width", "64", "--depth", "28", "--heads", "2", "--batch", "64", "--lr", "3e-4",
        "--image-size", "32", "--workers", "0", "--repa-coeff", "0", "--steps", "1", "--ckpt-every", "1",
        "--log-every", "1", "--quiet"]
# method → (our flags at the authors' default, the authors' file, the function in it, our log key, its weight)
METHODS = {"dispersive": (["--dispersive", "0.25"], "transport/transport.py", "disp_loss", "loss_dispersive", 0.25)}
REPOSITORIES = {"dispersive": "raywang4/DispLoss (checked on its mirror whaletech-ai/Disperse-Loss)"}


def authors_function(path: Path, name: str):
    """The function (or method) `name` of the authors' file, compiled from their source text alone."""
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"th": torch, "torch": torch}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    return scope[name]


def git_commit(folder: Path) -> str | None:
    r = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=list(METHODS))
    ap.add_argument("--authors", required=True, type=Path, help="a checkout of the method's authors' repository")
    ap.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 train ImageFolder (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "parity")
    args = ap.parse_args()
    flags, file, function, key, weight = METHODS[args.method]
    source = args.authors / file
    if not source.is_file():
        sys.exit(f"parity_terms: --authors {args.authors} has no {file}: pass a checkout of the authors' repository")
    theirs = authors_function(source, function)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "repa_probe", "train", "--data", str(args.data), "--out", str(run),
                        *DEEP, *flags], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        first = next(r for r in rows if r["event"] == "train")
        config_json = json.loads((run / "config.json").read_text())
        model_cfg = ModelConfig.from_dict(read_checkpoint(run / "checkpoints" / f"{1:07d}.pt")["config"])
    cfg = TrainConfig.from_dict(config_json)
    _, x, y, t, noise = replay_batch(cfg, ImageDataset(args.data, cfg.image_size), step=1)
    model = init_model(model_cfg, cfg.seed).train()
    with torch.no_grad():
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        out, _, hidden = model(x_t, t, y, return_hidden=True)
        cuda = torch.Tensor.cuda
        if not torch.cuda.is_available():
            torch.Tensor.cuda = lambda self, *a, **k: self          # their code places one tensor on the GPU
        try:
            term = theirs(None, hidden[-1]) if "self" in theirs.__code__.co_varnames[:1] else theirs(hidden[-1])
        finally:
            torch.Tensor.cuda = cuda
        denoise = ((out - (noise - x)) ** 2).mean()
    result = {"method": args.method, "flags": flags, "authors_repository": REPOSITORIES[args.method],
              "authors_commit": git_commit(args.authors),
              "authors_file": file, "authors_file_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
              "ours_step1": first[key], "authors_step1": term.item(), "difference": first[key] - term.item(),
              "ours_step1_loss": first["loss"], "authors_step1_loss": (denoise + weight * term).item(),
              "loss_difference": first["loss"] - (denoise + weight * term).item(),
              "batch": cfg.batch, "model": f"{model_cfg.depth} blocks × {model_cfg.hidden_size}"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.method}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
