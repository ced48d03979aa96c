"""analyses/gpu_seeds.sh end to end at toy scale on the CPU (TINY=1): the device script's every step, as it will
run on a GPU, in one real subprocess: seeds × arms trained at once, compared at the step all reached, the seed
report, fp16 EMA weights with their hashes, all in one tarball."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from conftest import REPO


def test_the_gpu_seeds_script_trains_compares_and_packs_the_seed_report(tmp_path, cifar_dir):
    env = {**os.environ, "TINY": "1", "DEVICE": "cpu", "DATA": str(cifar_dir), "STATE": str(tmp_path / "state"),
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "analyses" / "gpu_seeds.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    with tarfile.open(tmp_path / "out" / "gpu_seeds.tar.gz") as tar:
        tar.extractall(tmp_path / "back", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    back = tmp_path / "back"
    names = [f"{arm}-s{seed}" for arm in ("vanilla", "repa") for seed in (0, 1)]

    # every run's log came back, and the four checkpoints of one common step were compared
    for name in names:
        assert json.loads((back / "runs" / name / "log.jsonl").read_text().splitlines()[-1])["step"] >= 3
    command = (back / "report" / "COMMAND.txt").read_text()
    assert "SEEDS=2" in command and int(command.split("step=")[1].split()[0]) in (3, 6)
    summary = json.loads((back / "report" / "summary.json").read_text())
    assert set(names) <= set(json.dumps(summary).split('"'))

    # the report speaks of the recipes over their two seeds: every seed row names a recipe of two seeds
    seeds = pd.read_csv(back / "report" / "seeds.csv", dtype={"seed": str})
    means = seeds[seeds["seed"] == "mean"]
    assert set(means["recipe"]) == {"vanilla", "repa"} and (means["n_seeds"] == 2).all()
    assert set(seeds.loc[seeds["seed"] != "mean", "seed"]) == {"0", "1"}

    # the weights that re-make it: fp16 EMA weights whose sha256s are those SHA256SUMS lists
    sums = dict(reversed(line.split("  ")) for line in (back / "weights" / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(f"{n}.safetensors" for n in names)
    for file, digest in sums.items():
        assert hashlib.sha256((back / "weights" / file).read_bytes()).hexdigest() == digest


def test_the_gpu_successors_script_trains_every_arm_on_one_seed_and_compares_them(tmp_path, cifar_dir):
    """analyses/gpu_successors.sh (gpu_seeds.sh with REPA's successors as its arms) at toy scale: five arms of one
    seed, each with its own term in its log, compared at the common step, packed with their weights."""
    env = {**os.environ, "TINY": "1", "SEEDS": "1", "DEVICE": "cpu", "DATA": str(cifar_dir), "TRAIN_S": "900",
           "STATE": str(tmp_path / "state"), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO)}                   # TRAIN_S: every run reaches its last step, however busy the box
    done = subprocess.run(["bash", str(REPO / "analyses" / "gpu_successors.sh")], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with tarfile.open(tmp_path / "out" / "gpu_successors.tar.gz") as tar:
        tar.extractall(tmp_path / "back", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    back = tmp_path / "back"
    arms = ("vanilla", "repa", "repa-stop", "sra", "dispersive", "reg")
    logs = {arm: [json.loads(line) for line in (back / "runs" / f"{arm}-s0" / "log.jsonl").read_text().splitlines()]
            for arm in arms}
    rows = {arm: [r for r in log if r["event"] == "train"] for arm, log in logs.items()}
    assert len({log[0]["sit_init_sha256"] for log in logs.values()}) == 1            # one seed: one initial SiT
    assert "loss_self_align" in rows["sra"][0] and "loss_dispersive" in rows["dispersive"][0]
    # switched off after step 3: the row of steps 2–6 averages the loss over 5 steps, 2 of them with REPA's term
    first, last = rows["repa-stop"]
    assert (first["step"], last["step"]) == (1, 6)
    assert last["loss"] == pytest.approx(last["loss_denoise"] + 0.5 * last["loss_repa"] * 2 / 5, abs=1e-5)
    summary = json.loads((back / "report" / "summary.json").read_text())
    assert {f"{arm}-s0" for arm in arms} <= set(json.dumps(summary).split('"'))
    assert sorted(p.name for p in (back / "weights").glob("*.safetensors")) == sorted(f"{a}-s0.safetensors"
                                                                                    for a in arms)
