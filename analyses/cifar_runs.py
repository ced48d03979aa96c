"""The controlled vanilla / REPA pair on CIFAR-10 pixels that experiments 1–3 analyse.

Both runs share everything (SiT init, data order, t, noise, label dropout; see train/trainer.py) except the
REPA term: λ = 0.5 at block depth/3 against the bundled SimCLR teacher `cifar-ssl-resnet`. Each run logs
probe + CKNNA on 1,000 held-out cifar10/test images at every block every `analyze_every` steps
(RUN/analysis.jsonl, for the trajectory) and keeps a checkpoint every `ckpt_every` steps.

    python analyses/cifar_runs.py --preset cpu     # both runs side by side, one core each
    python analyses/cifar_runs.py --preset gpu     # one after the other on the GPU
    python analyses/cifar_runs.py --preset deep --seed 1   # another training seed: runs/cifar_deep/seed1/

A training seed fixes the SiT's init, the data order, t, the noise and the label dropout; the arms of one seed
share them (a controlled pair), different seeds differ in all of them. Seed 0 keeps the folder layout of the
first runs (runs/cifar_<preset>/<arm>); seed s > 0 trains into runs/cifar_<preset>/seed<s>/<arm>.
Runs resume where they stopped (the trainer continues from RUN/checkpoints), so a finished pair costs nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# as a user would type it, relative to where the script runs (reports record paths as given)
DATA = Path(os.path.relpath(os.environ.get("REPA_PROBE_DATA", REPO.parent / "shared" / "data" / "cifar10")))

PRESETS = {
    # 2 CPU cores, ~1 h (measured 49 img/s per core with REPA): 12 blocks of width 128, patch 4
    # (8×8 = 64 tokens, the teacher's own grid), 2,500 steps of 64 images (3.2 epochs).
    "cpu": dict(model="SiT-S/4", width=128, depth=12, heads=2, batch=64, steps=2500, lr=3e-4, ema=0.999,
                ckpt_every=500, analyze_every=250, repa_depth=4, projector_dim=256, threads=1, parallel=True),
    # 2 CPU cores, ~1.5–2.5 h side by side (issue 13 §2): 28 blocks, narrow enough to train several epochs (width 64,
    # 2 heads, 67 img/s per core measured with REPA), patch 4 (64 tokens), 5,000 steps of 64 images (6.4 epochs),
    # REPA at block 8 as REPA does for depth 28. A checkpoint every 500 steps: the training-length knob.
    "deep": dict(model="SiT-S/4", width=64, depth=28, heads=2, batch=64, steps=5000, lr=3e-4, ema=0.999,
                 ckpt_every=500, analyze_every=0, repa_depth=8, projector_dim=128, threads=1, parallel=True),
    # 2 CPU cores, about an hour for the six arms of analyses/successors.py side by side: the demo's 6-block
    # width-128 SiT (patch 4, 64 tokens), 500 steps of 64 images, REPA at block 2.
    "small": dict(model="SiT-S/4", width=128, depth=6, heads=2, batch=64, steps=500, lr=3e-4, ema=0.999,
                  ckpt_every=250, analyze_every=0, repa_depth=2, projector_dim=256, threads=1, parallel=True),
    # One H100, a few minutes per run: the reference run of docs/probe.md, 12 blocks of width 384, patch 2 (256 tokens).
    "gpu": dict(model="SiT-S/2", width=384, depth=12, heads=6, batch=256, steps=6000, lr=2e-4, ema=0.9995,
                ckpt_every=1000, analyze_every=1000, repa_depth=4, projector_dim=2048, threads=0, parallel=False),
}


# name → (REPA coefficient, extra trainer flags). iREPA (arXiv 2512.10794) is REPA with a 3×3 convolutional
# projector and the target's tokens z-scored over the grid; same seeds, so all three see the same data and noise.
RUNS = {"vanilla": (0.0, []), "repa": (0.5, []),
        "irepa": (0.5, ["--projector", "conv", "--projector-kernel", "3", "--spatial-norm", "zscore",
                        "--zscore-alpha", "0.6"])}
# REPA's successors (docs/training.md), one flag each on the same seeds; "repa-stop" is REPA switched off halfway
# (HASTE's --align-until, here at half of the preset's steps: the step is filled in by train_args)
SUCCESSORS = {"repa-stop": (0.5, ["--align-until", "HALF"]), "sra": (0.0, ["--self-align", "0.5"]),
              "dispersive": (0.0, ["--dispersive", "0.25"]), "reg": (0.5, ["--reg-cls", "0.03"])}
RUNS.update(SUCCESSORS)


def finished(run: Path, steps: int) -> bool:
    """Whether a run's last checkpoint has reached `steps` (so it is not started again)."""
    return (run / "checkpoints" / f"{steps:07d}.pt").exists()


def train_args(p: dict, name: str, coeff: float, out: Path, extra: list[str] = (), seed: int = 0) -> list[str]:
    depth, data = p["depth"], Path(os.path.relpath(DATA.resolve(), REPO))   # the runs start in REPO
    return [sys.executable, "-m", "repa_probe", "train", "--data", str(data / "train"), "--image-size", "32",
            "--model", p["model"], "--width", str(p["width"]), "--depth", str(depth), "--heads", str(p["heads"]),
            "--encoder", "cifar-ssl-resnet", "--repa-depth", str(p["repa_depth"]), "--repa-coeff", str(coeff),
            "--projector-dim", str(p["projector_dim"]), "--batch", str(p["batch"]), "--steps", str(p["steps"]),
            "--lr", str(p["lr"]), "--ema-decay", str(p["ema"]), "--ckpt-every", str(p["ckpt_every"]),
            "--log-every", "50", "--workers", "1", "--seed", str(seed), "--out", str(out / name), "--quiet",
            *[str(p["steps"] // 2) if a == "HALF" else a for a in extra]] + ([
            "--analyze-every", str(p["analyze_every"]), "--analyze-data", str(data / "test"), "--analyze-n", "1000",
            "--analyze-blocks", ",".join(str(b) for b in range(1, depth + 1)), "--analyze-t", "0,0.25,0.5"]
            if p["analyze_every"] else [])


def ensure_runs(preset: str, out: Path | None = None, irepa: bool = False, seed: int = 0,
                arms: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Train (or finish) the vanilla and REPA runs of a preset and training seed, and iREPA if asked (or the
    given `arms` of RUNS); → {name: run folder}."""
    p = PRESETS[preset]
    out = out or REPO / "runs" / f"cifar_{preset}" / (f"seed{seed}" if seed else "")
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: RUNS[name] for name in (arms or (["vanilla", "repa", "irepa"] if irepa else ["vanilla", "repa"]))}
    env = dict(os.environ)
    if p["threads"]:
        env["OMP_NUM_THREADS"] = str(p["threads"])
    start = time.perf_counter()
    procs = {}
    for name, (coeff, extra) in runs.items():
        if finished(out / name, p["steps"]):
            continue
        log = open(out / f"{name}.train.log", "a")
        procs[name] = subprocess.Popen(train_args(p, name, coeff, out, extra, seed), cwd=REPO, env=env, stdout=log,
                                       stderr=log)
        if not p["parallel"]:
            procs[name].wait()
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} training failed: see {out / f'{name}.train.log'}")
    wall = time.perf_counter() - start
    if procs:                  # a call that trained nothing keeps the record of the one that did
        (out / "runs.json").write_text(json.dumps({"preset": preset, "seed": seed, "settings": p,
                                                  "wall_s_last_call": round(wall)}, indent=2) + "\n")
    return {name: out / name for name in runs}


def exported(preset: str, seed: int = 0, arms: tuple[str, ...] = ("vanilla", "repa")) -> dict[str, Path]:
    """The final EMA weights of a seed's runs in float16 (export_weights.py), where the committed reports read
    them: reports/weights/cifar_<preset>/<arm>-s<seed>.safetensors, with their sha256 in SHA256SUMS, beside the
    run's training log and config. Trains or finishes the runs first if they are not there; an existing export
    is kept (its hash is the report's), and where every arm's is there nothing is trained."""
    from export_weights import export
    folder = REPO / "reports" / "weights" / f"cifar_{preset}"
    out = {f"{arm}-s{seed}": folder / f"{arm}-s{seed}.safetensors" for arm in arms}
    if all(dst.exists() for dst in out.values()):
        return out
    runs = ensure_runs(preset, seed=seed, arms=arms)
    folder.mkdir(parents=True, exist_ok=True)
    for arm in arms:
        dst = out[f"{arm}-s{seed}"]
        if not dst.exists():
            export(runs[arm] / "checkpoints" / f"{PRESETS[preset]['steps']:07d}.pt", dst)
            for record in ("log.jsonl", "config.json"):      # the training's losses, speed and settings
                shutil.copyfile(runs[arm] / record, folder / f"{arm}-s{seed}.{record}")
    sums = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.glob("*.safetensors"))]
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return out


def experiment_parser(doc: str) -> argparse.ArgumentParser:
    """--preset and --n, shared by the experiment scripts (which may add arguments of their own)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--n", type=int, default=None, help="images (default: 2000 on cpu, 10000 on deep and gpu)")
    return ap


def experiment_args(doc: str, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    a = (parser or experiment_parser(doc)).parse_args()
    a.n = a.n or (2000 if a.preset == "cpu" else 10_000)
    return a


def analysis_config(preset: str, n: int, **extra):
    """The experiments' analysis: n cifar10/test images against the teacher; probe fitted on n train images."""
    from repa_probe.pipeline import AnalyzeConfig
    settings = dict(data=str(DATA / "test"), n=n, encoders=["cifar-ssl-resnet"], probe_train=str(DATA / "train"),
                    probe_test=str(DATA / "test"), probe_n_train=n, probe_n_test=n, bootstrap=50,
                    cache=os.path.relpath(REPO / "runs" / "cache"), quiet=True,
                    notes=[f"preset {preset}: the controlled run pair of analyses/cifar_runs.py"])
    return AnalyzeConfig(**{**settings, **extra})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--irepa", action="store_true", help="also train the iREPA run (conv projector, z-scored target)")
    ap.add_argument("--seed", type=int, default=0, help="training seed shared by the arms (default 0)")
    a = ap.parse_args()
    print(ensure_runs(a.preset, irepa=a.irepa, seed=a.seed))
