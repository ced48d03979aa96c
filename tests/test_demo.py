"""The README's demo command runs end to end (here with few steps and images, on the real CIFAR-10 data)."""
from __future__ import annotations

import json

import pandas as pd
from pypdf import PdfReader

from conftest import run_cli


def test_demo_trains_both_models_and_writes_a_compare_report(tmp_path, cifar_dir):
    out = tmp_path / "demo"
    r = run_cli("demo", "--data", cifar_dir, "--out", out, "--steps", "6", "--n", "60", "--quiet")
    assert r.returncode == 0, r.stderr
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


def test_demo_without_data_says_which_flag_to_pass(tmp_path):
    r = run_cli("demo", "--data", tmp_path / "nowhere", "--out", tmp_path / "demo")
    assert r.returncode == 2 and "--data" in r.stderr and len(r.stderr.strip().splitlines()) == 1
