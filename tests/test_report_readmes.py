"""Each committed report's README.md is what its analyses/ script renders from the report's own files (summary.json,
gen.csv, seeds.csv, ...): no number in it is typed by hand. Re-rendered here and compared, with the command the
README records."""
from __future__ import annotations

import importlib
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "analyses"))

RENDERED = {"successors": "successors", "generation_curves": "generation_curves", "seeds": "seed_report",
            "three_way": "three_way"}    # report folder → its script


@pytest.mark.parametrize("folder", sorted(RENDERED))
def test_a_committed_readme_is_rendered_from_its_files(folder):
    readme = importlib.import_module(RENDERED[folder]).readme
    out = REPO / "reports" / folder
    text = (out / "README.md").read_text()
    command = next(line.strip() for line in text.splitlines() if line.strip().startswith("python analyses/"))
    assert command.startswith(f"python analyses/{RENDERED[folder]}.py")
    assert readme(out, command) == text


def test_committed_weights_are_read_without_training(tmp_path):
    """cifar_runs.exported on a seed whose fp16 weights are committed returns them and trains nothing, so that a
    report re-makes on a fresh clone (the data folder points nowhere: a training run would fail at once)."""
    import os
    import subprocess
    code = ("from cifar_runs import exported; paths = exported('deep', seed=1); "
            "print(sorted(str(p.relative_to(p.parents[3])) for p in paths.values()))")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'analyses'}", "REPA_PROBE_DATA": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(["reports/weights/cifar_deep/repa-s1.safetensors",
                                         "reports/weights/cifar_deep/vanilla-s1.safetensors"])


@pytest.mark.parametrize("folder", ["seeds", "successors", "three_way", "demo/shipped"])
def test_a_committed_report_reads_committed_weights_with_the_recorded_hashes(folder):
    """What re-makes a report travels with it: every checkpoint its summary.json names is a committed file under
    reports/weights/ (or the package's copy of one) whose sha256 is the one the summary and SHA256SUMS record
    (the untrained baseline, `<untrained>`, is drawn from a seed, not read)."""
    import hashlib
    import json
    checkpoints = json.loads((REPO / "reports" / folder / "summary.json").read_text())["checkpoints"]
    for name, ck in ((n, ck) for n, ck in checkpoints.items() if ck["path"] != "<untrained>"):
        path = REPO / ck["path"]
        assert ck["path"].startswith(("reports/weights/", "repa_probe/assets/")) and path.is_file(), (name, ck["path"])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        sums = (REPO / "reports" / "weights" / path.parent.name / "SHA256SUMS").read_text().splitlines()
        recorded = dict(reversed(line.split()) for line in sums)               # {file name: sha256}
        assert digest == ck["sha256"] == recorded[path.name], (name, ck["path"])
