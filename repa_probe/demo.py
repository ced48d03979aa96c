"""`repa-probe demo`: the whole product in one command on a CPU in about ten minutes.

1. trains a tiny vanilla SiT and the same SiT with REPA on CIFAR-10 pixels (same init, data order, t and
   noise: a controlled pair), aligned to the bundled self-supervised CIFAR-10 teacher (cifar-ssl-resnet);
2. analyses both on the same held-out images and noise (linear probe + CKNNA at every block × t, with
   untrained-model and raw-input baselines) into one compare report (OUT/report: results.csv, summary.json,
   figures/, report.pdf);
3. analyses the shipped pair the same way at t = 0 on more images, without baselines (OUT/shipped): a 28-block
   SiT trained 5,000 steps by this trainer, vanilla and REPA λ = 0.5 at block 8 (analyses/cifar_runs.py, preset
   deep, seed 0), whose float16 EMA weights the package carries (assets/cifar_deep/, the files of
   reports/weights/cifar_deep/ with their training logs, configs and SHA256SUMS);
4. prints each report's page-1 verdict, the shipped pair's last; OUT/cifar10 links to the data it used (the
   README's notebook example runs on OUT).

The tiny model (6 blocks of width 128, patch 4 → an 8×8 grid of 64 tokens, the teacher's own feature-map grid)
trains in minutes and shows the workflow; a few hundred steps are too few for REPA's effect, which the shipped
pair shows: REPA's lift at its aligned block, and curves that peak, then drop. Real-scale runs are in analyses/.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from repa_probe.errors import UserError

if TYPE_CHECKING:
    from repa_probe.pipeline import AnalyzeConfig

TEACHER = "cifar-ssl-resnet"
SHIPPED = Path(__file__).resolve().parent / "assets" / "cifar_deep"
SHIPPED_RUNS = ("vanilla", "repa")        # SHIPPED/<name>-s0.safetensors, compared in this order


@dataclass
class DemoConfig:
    data: str | None = None        # CIFAR-10 ImageFolder root with train/ and test/
    out: str = "repa-probe-demo"
    steps: int = 300
    batch: int = 64
    lr: float = 3e-4               # above REPA's 1e-4: a few hundred steps must show learning
    width: int = 128
    depth: int = 6
    heads: int = 2
    patch: int = 4
    repa_depth: int = 2            # about a third of the depth, as REPA's 8 of 28 / 4 of 12
    repa_coeff: float = 0.5
    n: int = 500                   # analysis images (cifar10/test), probe trained on as many train images
    shipped_n: int = 5000          # the shipped pair's analysis images (as n); 0 = not analysed
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


def shipped_pair() -> tuple[list[str], str]:
    """The shipped pair's files as paths from where the demo runs (what its report records), and a note that
    says, from the REPA file's own training settings, what they are."""
    from repa_probe.checkpoints import read_checkpoint
    files = [SHIPPED / f"{name}-s0.safetensors" for name in SHIPPED_RUNS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"the package's shipped checkpoints are missing ({', '.join(missing)}): reinstall "
                        f"repa-probe, or pass --shipped-n 0")
    t = read_checkpoint(files[-1])["meta"]["train_config"]
    note = (f"shipped: {t['depth']}-block width-{t['width']} SiTs trained {t['steps']:,} steps × {t['batch']} images "
            f"by repa-probe's trainer (seed {t['seed']}), vanilla and REPA λ = {t['repa_coeff']:g} at block "
            f"{t['repa_depth']}; their float16 EMA weights")
    return [os.path.relpath(f) for f in files], note


def analysis(cfg: DemoConfig, root: Path, n: int, **extra) -> AnalyzeConfig:
    """n cifar10/test images against the teacher, probes fitted on n train images and scored on the n test ones."""
    from repa_probe.pipeline import AnalyzeConfig
    return AnalyzeConfig(data=str(root / "test"), n=n, encoders=[TEACHER], probe_train=str(root / "train"),
                         probe_test=str(root / "test"), probe_n_train=n, probe_n_test=n, seed=cfg.seed,
                         device=cfg.device, cache=str(Path(cfg.out) / "cache"), quiet=cfg.quiet, **extra)


def run_demo(cfg: DemoConfig) -> list[Path]:
    """Train vanilla + REPA and compare them, then compare the shipped pair; return the report folders."""
    from repa_probe.commands import compare
    from repa_probe.report.pdf import check_writable
    from repa_probe.train.trainer import TrainConfig, train

    root = find_cifar(cfg.data)
    out = Path(cfg.out)
    check_writable(out)
    shipped, note = shipped_pair() if cfg.shipped_n else ([], "")
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
    reports = [compare([str(out / "runs" / name) for name in runs],        # run folders: named vanilla, repa
                       analysis(cfg, root, cfg.n, notes=[
                           f"demo: {cfg.steps} training steps per model on a CPU-sized SiT, a budget that shows "
                           f"the workflow, not REPA's effect, which needs longer runs ("
                           f"{'the shipped pair below, ' if shipped else ''}reports/)"]),
                       str(out / "report"))]
    if shipped:
        print(f"[demo] analysing the shipped pair at t = 0 on {cfg.shipped_n} cifar10/test images (probe: "
              f"{cfg.shipped_n} train images)", flush=True)
        reports.append(compare(shipped, analysis(cfg, root, cfg.shipped_n, ts=(0.0,), baselines=False, notes=[note]),
                               str(out / "shipped"), names=list(SHIPPED_RUNS)))
    link_data(root, out)
    print(f"[demo] done in {time.perf_counter() - start:.0f} s", flush=True)
    return reports
