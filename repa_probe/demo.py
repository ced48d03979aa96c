"""`repa-probe demo`: the whole product in one command on a CPU in about ten minutes.

1. trains a tiny vanilla SiT and the same SiT with REPA on CIFAR-10 pixels (same init, data order, t and
   noise: a controlled pair), aligned to the bundled self-supervised CIFAR-10 teacher (cifar-ssl-resnet);
2. analyses both on the same held-out images and noise (linear probe + CKNNA at every block × t, with
   untrained-model and raw-input baselines);
3. writes one compare report (results.csv, summary.json, figures/, report.pdf) and prints page 1's verdict;
   OUT/cifar10 links to the data it used (the README's notebook example runs on OUT).

The model is deliberately small (6 blocks of width 128, patch 4 → an 8×8 grid of 64 tokens, which is the
teacher's own feature-map grid) so that a few hundred steps fit in minutes; at this scale REPA's effect
shows up first as alignment at and around the aligned block. Real-scale runs are in analyses/.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from repa_probe.errors import UserError

TEACHER = "cifar-ssl-resnet"


@dataclass
class DemoConfig:
    data: str | None = None        # CIFAR-10 ImageFolder root with train/ and test/
    out: str = "repa-probe-demo"
    steps: int = 700
    batch: int = 64
    lr: float = 3e-4               # above REPA's 1e-4: a few hundred steps must show learning
    width: int = 128
    depth: int = 6
    heads: int = 2
    patch: int = 4
    repa_depth: int = 2            # about a third of the depth, as REPA's 8 of 28 / 4 of 12
    repa_coeff: float = 0.5
    n: int = 500                   # analysis images (cifar10/test), probe trained on as many train images
    seed: int = 0
    device: str | None = None
    quiet: bool = False


def find_cifar(data: str | None) -> Path:
    """--data, else $REPA_PROBE_DATA, else shared/data/cifar10 in the folder that holds the project, else
    CIFAR-10 downloaded (checksummed) and converted once into the cache."""
    candidates = [data] if data else [os.environ.get("REPA_PROBE_DATA"),
                                       str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"),
                                       str(Path.cwd().parent / "shared" / "data" / "cifar10")]
    for c in filter(None, candidates):
        root = Path(c)
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root if data else Path(os.path.relpath(root))   # reports show it as from where the demo ran
    if data:
        raise UserError(f"--data: no CIFAR-10 ImageFolder with train/ and test/ at {data}: pass --data DIR")
    from repa_probe.download import cifar10
    print("[demo] no CIFAR-10 found beside the project: downloading it once (pass --data DIR to use your copy)",
          flush=True)
    return cifar10()


def check_earlier_run(plan, out: Path) -> None:
    """A demo folder that already holds runs is reused only if they were trained exactly as asked now (a
    finished one costs nothing, an interrupted one resumes); otherwise say so, before any work."""
    from repa_probe.train.trainer import RESUME_MUST_MATCH
    saved = Path(plan.out) / "config.json"
    if not saved.is_file():
        return
    before, now = json.loads(saved.read_text()), plan.to_dict()
    before["data"], now["data"] = os.path.realpath(before.get("data") or ""), os.path.realpath(now["data"])
    differ = [k for k in (*RESUME_MUST_MATCH, "steps") if before.get(k) != now[k]]
    if differ:
        shown = ", ".join(f"{k} {before.get(k)!r} (now {now[k]!r})" for k in differ[:3])
        raise UserError(f"--out '{out}' holds a demo trained with other settings ({shown}): pass another --out, or "
                        f"remove '{out / 'runs'}' to retrain")


def link_data(root: Path, out: Path) -> None:
    """out/cifar10 → the CIFAR-10 the demo used, so that the README's notebook example finds it beside the runs
    (wherever it was found or downloaded); a folder of the user's at that name is left alone."""
    link = out / "cifar10"
    if link.is_symlink():                   # an earlier demo's, perhaps to another copy
        link.unlink()
    if not link.exists():
        link.symlink_to(root.resolve(), target_is_directory=True)


def run_demo(cfg: DemoConfig) -> Path:
    """Train vanilla + REPA, compare them, return the report folder."""
    from repa_probe.commands import compare
    from repa_probe.pipeline import AnalyzeConfig
    from repa_probe.report.pdf import check_writable
    from repa_probe.train.trainer import TrainConfig, train

    root = find_cifar(cfg.data)
    out = Path(cfg.out)
    check_writable(out)
    start = time.perf_counter()
    plans = {name: TrainConfig(
        data=str(root / "train"), image_size=32, mode="pixels", model=f"SiT-S/{cfg.patch}", depth=cfg.depth,
        width=cfg.width, heads=cfg.heads, encoders=[TEACHER], repa_depth=cfg.repa_depth, repa_coeff=coeff,
        projector_dim=2 * cfg.width, batch=cfg.batch, steps=cfg.steps, lr=cfg.lr, ema_decay=0.99,
        seed=cfg.seed, num_workers=0, device=cfg.device, out=str(out / "runs" / name), ckpt_every=cfg.steps,
        log_every=max(1, cfg.steps // 10), progress=not cfg.quiet)
        for name, coeff in (("vanilla", 0.0), ("repa", cfg.repa_coeff))}
    for plan in plans.values():
        check_earlier_run(plan, out)
    runs = {}
    for name, plan in plans.items():
        t0 = time.perf_counter()
        print(f"[demo] training {name} SiT ({cfg.depth} blocks × {cfg.width}, patch {cfg.patch}, {cfg.steps} steps of "
              f"{cfg.batch}; REPA λ = {plan.repa_coeff} at block {cfg.repa_depth} vs {TEACHER})", flush=True)
        runs[name] = train(plan)
        print(f"[demo] {name}: {time.perf_counter() - t0:.0f} s → {runs[name]}", flush=True)
    print(f"[demo] analysing both on {cfg.n} cifar10/test images (probe: {cfg.n} train images)", flush=True)
    report = compare([str(out / "runs" / name) for name in runs],         # run folders: named vanilla, repa
                     AnalyzeConfig(data=str(root / "test"), n=cfg.n, encoders=[TEACHER],
                                   probe_train=str(root / "train"), probe_test=str(root / "test"),
                                   probe_n_train=cfg.n, probe_n_test=cfg.n, seed=cfg.seed, device=cfg.device,
                                   cache=str(out / "cache"), quiet=cfg.quiet,
                                   notes=[f"demo: {cfg.steps} training steps per model on a CPU-sized SiT, a budget "
                                          f"that shows the workflow; REPA's effect needs longer runs (reports/)"]),
                     str(out / "report"))
    link_data(root, out)
    print(f"[demo] done in {time.perf_counter() - start:.0f} s", flush=True)
    return report
