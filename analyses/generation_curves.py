"""Generation beside representation over training (issue 27, item 5): every saved checkpoint of the CIFAR-10 deep
pair (runs/cifar_deep/{vanilla,repa}, seed s in runs/cifar_deep/seed<s>/) scored with FD in the teacher's space
(cifar-ssl-resnet) at one N for all, against cifar10/test, beside probe and CKNNA with the teacher, in one
trajectory report with the page "generation and representation" (FD vs step, alignment/probe vs step, their rank
correlation over checkpoints).

    python analyses/generation_curves.py                         # N = 1000, REPA's SDE (250 steps)
    python analyses/generation_curves.py --seeds 2 --gen 500 --gen-sampler ode   # the committed report (seed 2)
    torchrun --nproc_per_node=2 analyses/generation_curves.py -- --seeds 2 --gen 500 --gen-sampler ode  # one process a core

The report's README.md is rendered from its own files (summary.json, gen.csv, gen_reach.csv; `readme`), with the
sha256 of every scored checkpoint in checkpoints.sha256.

The runs are found under --root as cifar_runs.py lays them out (seed 0 in ROOT/{vanilla,repa}, seed s in
ROOT/seed<s>/{vanilla,repa}; --seeds picks some) and named RECIPE-sSEED (vanilla-s0, repa-s0, vanilla-s2, ...)
through links in OUT/.runs; the first seed's vanilla run comes first: every other run's FD at a step is
differenced, paired (the same sample indices: the same noise and labels), against that run's at that step (gen.csv:
difference, ci_low, ci_high); within one seed that is the controlled pair. Nothing is trained here; a seed that
lacks an arm is scored without it, with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from repa_probe.commands import trajectory
from repa_probe.config import AnalyzeConfig
from repa_probe.findings.generation import quality_score
from repa_probe.report.verdict import correlation_lines, reach_lines
from repa_probe.runtime import rank, shutdown_distributed

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.path.relpath(os.environ.get("REPA_PROBE_DATA", REPO.parent / "shared" / "data" / "cifar10")))
TEACHER = "cifar-ssl-resnet"
ARMS = ("vanilla", "repa")


def seed_folders(root: Path) -> dict[int, Path]:
    """{training seed: its folder} under a preset's runs (seed 0 is the root itself, seed s is ROOT/seed<s>)."""
    found = {0: root} if any((root / arm).is_dir() for arm in ARMS) else {}
    for folder in root.glob("seed*"):
        if folder.name[4:].isdigit() and any((folder / arm).is_dir() for arm in ARMS):
            found[int(folder.name[4:])] = folder
    return dict(sorted(found.items()))


def linked_runs(root: Path, links: Path, seeds: list[int] | None = None) -> list[str]:
    """The runs under `root` of the given training seeds (default: every seed found), as links named RECIPE-sSEED
    in `links` (the first seed's vanilla first)."""
    links.mkdir(parents=True, exist_ok=True)
    folders, found = seed_folders(root), []
    for seed in seeds if seeds is not None else list(folders):
        if seed not in folders:
            raise SystemExit(f"--seeds: no runs of seed {seed} under {root} (found seeds: "
                             f"{', '.join(map(str, folders)) or 'none'}); train them with analyses/cifar_runs.py "
                             f"--preset deep --seed {seed}")
        for arm in ARMS:
            name, run = f"{arm}-s{seed}", folders[seed] / arm
            if not (run / "checkpoints").is_dir():
                print(f"skipped {name}: no {run / 'checkpoints'}")
                continue
            link, tmp = links / name, links / f".{name}.{os.getpid()}"    # replaced atomically: under torchrun
            tmp.symlink_to(run.resolve(), target_is_directory=True)        # every rank makes the same links
            os.replace(tmp, link)
            found.append(os.path.relpath(link))           # reports record paths as given, relative
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "cifar_deep", help="the preset's runs")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="training seeds to score, comma-separated (default: every seed under --root)")
    p.add_argument("--data", type=Path, default=DATA / "test", help="held-out images: alignment, probe, FD reference")
    p.add_argument("--gen", type=int, default=1000, help="samples per checkpoint, the same N for all (default 1000)")
    p.add_argument("--gen-sampler", choices=("ode", "sde"), default="sde")
    p.add_argument("--gen-steps", type=int, default=None, help="default: 250 (sde), 50 (ode), as REPA")
    p.add_argument("--gen-reference-n", type=int, default=None, help="reference images (default: all of --data)")
    p.add_argument("--gen-bootstrap", type=int, default=200)
    p.add_argument("--n", type=int, default=1000, help="images for probe and CKNNA (default 1000)")
    p.add_argument("--t", type=float, nargs="+", default=[0.0], help="noise levels of the measures (default 0)")
    p.add_argument("--bootstrap", type=int, default=20)
    p.add_argument("--cache", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=REPO / "reports" / "generation_curves")
    return p


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def readme(out: Path, command: str) -> str:
    """OUT/README.md from the report's own files (summary.json, gen.csv, gen_reach.csv): no number typed."""
    summary, gen = json.loads((out / "summary.json").read_text()), pd.read_csv(out / "gen.csv")
    cfg, score = summary["config"], quality_score(gen)
    fd = gen[gen["score"] == score]
    runs, how = list(dict.fromkeys(fd["run"])), fd.iloc[0]
    lines = ["# Sample quality beside representation over training (issue 27, item 5)", "",
             f"Every saved checkpoint of {', '.join(runs)} (the CIFAR-10 `deep` preset of analyses/cifar_runs.py: "
             "within a seed both runs start from the same SiT and see the same images, t and noise) scored with "
             f"{score} against {how['reference']} at N = {int(how['N']):,} samples each ({how['sampler']}, "
             f"{int(how['steps'])} steps, CFG {how['cfg']:g}; sample i has the same noise and label at every "
             f"checkpoint), beside CKNNA and the linear probe on n = {cfg['n']:,} cifar10/test images at t = "
             f"{', '.join(f'{t:g}' for t in cfg['ts'])}. Intervals resample the N samples (paired across "
             "checkpoints); they cover the sampling of these files, not training seeds.", "", "    " + command, "",
             "The scored checkpoints' sha256 are in `checkpoints.sha256`, their final EMA weights (fp16) in "
             "`reports/weights/cifar_deep/`.", "", f"## {score} over training", "",
             f"| step | {' | '.join(runs)} | {' | '.join(f'{r} − {runs[0]} [95%]' for r in runs[1:])} |",
             "|---" * (2 * len(runs)) + "|"]
    for step, g in fd.groupby("step", sort=True):
        by_run = g.set_index("run")
        values = [f"{by_run.loc[r, 'value']:.2f}" if r in by_run.index else "–" for r in runs]
        diffs = [f"{fmt(by_run.loc[r, 'difference'])} [{fmt(by_run.loc[r, 'ci_low'])}, {fmt(by_run.loc[r, 'ci_high'])}]"
                 if r in by_run.index and not pd.isna(by_run.loc[r, "difference"]) else "–" for r in runs[1:]]
        lines.append(f"| {int(step):,} | {' | '.join(values)} | {' | '.join(diffs)} |")
    reach = out / "gen_reach.csv"
    if reach.exists():
        lines += ["", "## Does a run reach the same FD in fewer steps?", ""]
        lines += [f"- {line}" for line in reach_lines(pd.read_csv(reach))]
    generation = summary["generation"]
    lines += ["", "## Better generation, better representation?", "", generation["sentence"], ""]
    lines += [f"- {line}" for line in correlation_lines(pd.DataFrame(generation["correlation"]))]
    if summary.get("monitor"):
        lines += ["", "## When the alignment term stops paying (training logs)", ""]
        lines += [f"- {m['sentence']}" for m in summary["monitor"]]
    return "\n".join(lines) + "\n"


def checksums(sources: list[str]) -> str:
    """sha256 and path of every checkpoint a trajectory of these run folders scores."""
    from repa_probe.runtime import file_sha256, find_checkpoints
    return "".join(f"{file_sha256(f)}  {Path(src).name}/{Path(f).name}\n" for src in sources
                   for f in find_checkpoints(src))


def main(argv: list[str] | None = None) -> Path:
    a = parser().parse_args(argv)
    sources = linked_runs(a.root, a.out.parent / f".{a.out.name}-runs", a.seeds)
    if not sources:
        raise SystemExit(f"--root: no runs under {a.root} (expected {a.root}/vanilla, {a.root}/seed1/repa, ...; "
                         "train them with analyses/cifar_runs.py --preset deep)")
    # probe and CKNNA are what FD is set beside; the SRA view's block × block matrices would only cost time here
    config = AnalyzeConfig(data=str(a.data), n=a.n, encoders=[TEACHER], ts=tuple(a.t), bootstrap=a.bootstrap, null=0,
                           baselines=False, self_similarity=False, gen=a.gen, gen_spaces=(TEACHER,),
                           gen_reference=str(a.data), gen_reference_n=a.gen_reference_n, gen_sampler=a.gen_sampler,
                           gen_steps=a.gen_steps, gen_bootstrap=a.gen_bootstrap, cache=a.cache, device=a.device, quiet=True)
    report = trajectory(sources, config, str(a.out), source="checkpoints")
    if rank() != 0:                                    # under torchrun rank 0 alone writes
        return report
    (a.out / "checkpoints.sha256").write_text(checksums(sources))
    command = "python analyses/generation_curves.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (a.out / "README.md").write_text(readme(a.out, command))
    return report


if __name__ == "__main__":
    try:
        done = main()
        if rank() == 0:
            print(f"report: {done / 'report.pdf'}")
    finally:
        shutdown_distributed()
