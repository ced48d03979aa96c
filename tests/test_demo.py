"""The README's demo command runs end to end (here with few steps and images, on the real CIFAR-10 data), as a
newcomer runs it: in a fresh project folder, training and comparing its own pair, then comparing the shipped
pair (the package's copy of reports/weights/cifar_deep), printing both pages 1 (the shipped pair's last), leaving
what the README's notebook example needs, and writing nothing git does not ignore."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pandas as pd
import pytest
from pypdf import PdfReader

from conftest import REPO, run_cli
from repa_probe.demo import SHIPPED, SHIPPED_RUNS
from test_report import assert_plain

STEPS, N, SHIPPED_N = 2, 60, 60             # 60 images: the fewest whose halves hold k = 10 neighbours' subsamples
WEIGHTS = REPO / "reports" / "weights" / "cifar_deep"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cifar_dir):
    """`repa-probe demo` (2 steps, 60 images, the shipped pair on 60) run in a fresh git repository holding the
    project's .gitignore, with the output folder it picks itself: (that folder, the finished process)."""
    project = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / ".gitignore", project)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    r = run_cli("demo", "--data", cifar_dir, "--steps", STEPS, "--n", N, "--shipped-n", SHIPPED_N, "--quiet",
                cwd=project)
    assert r.returncode == 0, r.stderr
    return project, r


def untracked(project) -> list[str]:
    """What git would offer to commit in the project folder: every file not ignored."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project, check=True,
                          capture_output=True, text=True).stdout.splitlines()


def test_demo_trains_both_models_and_writes_a_compare_report(demo):
    project, r = demo
    out = project / "repa-probe-demo"
    assert "report:" in r.stdout and "[demo] done" in r.stdout
    for run in ("vanilla", "repa"):
        assert (out / "runs" / run / "checkpoints" / f"{STEPS:07d}.pt").is_file()
    res = pd.read_csv(out / "report" / "results.csv")
    assert {"vanilla", "repa"} <= set(res["checkpoint"])
    assert set(res["kind"]) == {"model", "untrained", "raw-input", "raw-thumbnail"}
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["checkpoints"]["repa"]["repa_coeff"] == 0.5 and summary["checkpoints"]["vanilla"]["repa_coeff"] == 0
    assert {row["metric"] for row in summary["compare"]} == {"cknna", "probe_top1", "self_cka_prev", "self_cka_tmin"}
    assert "RANDOM" not in PdfReader(out / "report" / "report.pdf").pages[0].extract_text()
    assert untracked(project) == ["?? .gitignore"]


def shipped_sums() -> dict[str, str]:
    """reports/weights/cifar_deep/SHA256SUMS: {file name: sha256}."""
    return {name: digest for digest, name in (line.split() for line in (WEIGHTS / "SHA256SUMS").read_text().splitlines())}


def test_the_shipped_pair_is_the_committed_seed_0_pair_byte_for_byte():
    """The package's copies are the files the committed reports read (git stores one blob for both), with the
    hashes SHA256SUMS records, and the package data (pyproject.toml's globs, as setuptools reads them) holds them."""
    import ast
    import re
    sums = shipped_sums()
    for name in SHIPPED_RUNS:
        shipped = SHIPPED / f"{name}-s0.safetensors"
        assert shipped.read_bytes() == (WEIGHTS / shipped.name).read_bytes()
        assert hashlib.sha256(shipped.read_bytes()).hexdigest() == sums[shipped.name]
    package_data = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    globs = ast.literal_eval(re.search(r"^repa_probe = (\[.*?\])", package_data, re.M)[1])
    packaged = {p for g in globs for p in (REPO / "repa_probe").glob(g) if p.is_file()}
    assert {SHIPPED / f"{name}-s0.safetensors" for name in SHIPPED_RUNS} <= packaged


def test_demo_compares_the_shipped_pair_at_t_0_without_baselines(demo):
    """OUT/shipped: the shipped files, named vanilla and repa, recorded with the hashes of SHA256SUMS and the
    training settings of their committed configs, on SHIPPED_N images at t = 0, models only."""
    project, r = demo
    out = project / "repa-probe-demo" / "shipped"
    summary = json.loads((out / "summary.json").read_text())
    sums, trained = shipped_sums(), {name: json.loads((WEIGHTS / f"{name}-s0.config.json").read_text())
                                     for name in SHIPPED_RUNS}
    for name in SHIPPED_RUNS:
        ckpt = summary["checkpoints"][name]
        assert ckpt["sha256"] == sums[f"{name}-s0.safetensors"] and Path(ckpt["path"]).name == f"{name}-s0.safetensors"
        assert ckpt["step"] == trained[name]["steps"] and ckpt["repa_coeff"] == trained[name]["repa_coeff"]
    assert summary["config"]["ts"] == [0.0] and summary["config"]["n"] == SHIPPED_N
    assert set(pd.read_csv(out / "results.csv")["kind"]) == {"model"} and (out / "report.pdf").is_file()
    repa = trained["repa"]
    assert summary["aligned_blocks"]["repa"] == repa["repa_depth"]
    assert f"{repa['depth']}-block" in summary["notes"][0] and f"{repa['steps']:,} steps" in summary["notes"][0]


def test_the_demo_ends_by_printing_page_1s_verdict(demo):
    """The notes and sentences of each page 1, each on its own line, after the end of the work and before its
    report's path: its own pair's first, the shipped pair's last."""
    project, r = demo
    lines = r.stdout.splitlines()
    done = lines.index(next(line for line in lines if line.startswith("[demo] done")))
    for name in ("report", "shipped"):
        out = project / "repa-probe-demo" / name
        summary = json.loads((out / "summary.json").read_text())
        sentences = summary["overview"]
        assert_plain(sentences, compare=True)
        end = lines.index(f"report: {out.relative_to(project) / 'report.pdf'}")
        said = summary["notes"] + sentences
        assert lines[end - len(said):end] == said and done < end - len(said)
        page1 = " ".join(PdfReader(out / "report.pdf").pages[0].extract_text().split())
        assert all(" ".join(s.split()) in page1 for s in sentences)
    assert lines[-1] == f"report: {Path('repa-probe-demo') / 'shipped' / 'report.pdf'}"


def test_the_readme_notebook_example_runs_as_written_after_the_demo(demo, tmp_path):
    """The README's Python block, run in a subprocess from the folder where the demo ran, with n=500 lowered to the
    demo's 60 images and few resamples for the suite's time: it finds the demo's runs and data, writes only into
    the demo's (git-ignored) folder, and gives what the README says it does."""
    project, _ = demo
    readme = (REPO / "README.md").read_text()
    code = readme.split("## In a notebook", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert code.count("n=500") == 2
    code = code.replace("n=500", "n=60, bootstrap=2, null=2, quiet=True") + (
        "\nassert [m.name for m in a.results.models] == ['vanilla', 'repa'] and len(curves) == 2 * 7"
        "\nassert set(b.table.query(\"kind == 'model'\")['block']) == set(range(7))\n")
    script = tmp_path / "notebook.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], cwd=project, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = project / "repa-probe-demo" / "notebook"
    summary = json.loads((report / "summary.json").read_text())
    sentences = summary["overview"]
    assert r.stdout.splitlines()[:len(sentences)] == sentences and (report / "report.pdf").is_file()
    assert summary["cache"]["chunks_computed"] == 0             # the demo's cache held these images' features
    assert untracked(project) == ["?? .gitignore"]


def test_demo_without_data_says_which_flag_to_pass(tmp_path):
    r = run_cli("demo", "--data", tmp_path / "nowhere", "--out", tmp_path / "demo")
    assert r.returncode == 2 and "--data" in r.stderr and len(r.stderr.strip().splitlines()) == 1
