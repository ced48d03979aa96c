"""The README's demo command runs end to end (here with few steps and images, on the real CIFAR-10 data), as a
newcomer runs it: in a fresh project folder, printing page 1's verdict, leaving what the README's notebook
example needs, and writing nothing git does not ignore."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from pypdf import PdfReader

from conftest import REPO, run_cli
from test_report import assert_plain


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cifar_dir):
    """`repa-probe demo` (6 steps, 60 images) run in a fresh git repository holding the project's .gitignore,
    with the output folder it picks itself: (that folder, the finished process)."""
    project = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / ".gitignore", project)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    r = run_cli("demo", "--data", cifar_dir, "--steps", "6", "--n", "60", "--quiet", cwd=project)
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
        assert (out / "runs" / run / "checkpoints" / "0000006.pt").is_file()
    res = pd.read_csv(out / "report" / "results.csv")
    assert {"vanilla", "repa"} <= set(res["checkpoint"])
    assert set(res["kind"]) == {"model", "untrained", "raw-input", "raw-thumbnail"}
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["checkpoints"]["repa"]["repa_coeff"] == 0.5 and summary["checkpoints"]["vanilla"]["repa_coeff"] == 0
    assert {row["metric"] for row in summary["compare"]} == {"cknna", "probe_top1"}
    assert "RANDOM" not in PdfReader(out / "report" / "report.pdf").pages[0].extract_text()
    assert untracked(project) == ["?? .gitignore"]


def test_the_demo_ends_by_printing_page_1s_verdict(demo):
    """The sentences of page 1, each on its own line, between the end of the work and the report's path."""
    project, r = demo
    out = project / "repa-probe-demo" / "report"
    sentences = json.loads((out / "summary.json").read_text())["overview"]
    assert_plain(sentences, compare=True)
    lines = r.stdout.splitlines()
    end = lines.index(f"report: {out.relative_to(project) / 'report.pdf'}")
    assert lines[end - len(sentences):end] == sentences and lines.index(next(
        line for line in lines if line.startswith("[demo] done"))) < end - len(sentences)
    page1 = " ".join(PdfReader(out / "report.pdf").pages[0].extract_text().split())
    assert all(" ".join(s.split()) in page1 for s in sentences)


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
