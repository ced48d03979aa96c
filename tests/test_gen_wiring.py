"""Sample quality in the product (issue 27, items 1, 3, 4, 6): `--gen N` on the command line gives gen.csv with N
and paired intervals equal to generation.generation_scores called directly; the report's page; page 1's sentence
on "better generation, better representation" only when its interval excludes 0; `train --eval-every` logs FD,
resumes, and trajectory reads it; analyses/generation_curves.py end to end on tiny runs."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ONE_THREAD, REPO, run_cli
from test_generation import tiny_checkpoint
from repa_probe import generation as G
from repa_probe.cli import main
from repa_probe.config import AnalyzeConfig
from repa_probe.encoders import load_encoder
from repa_probe.families import load_checkpoint
from repa_probe.findings import Findings, with_generation
from repa_probe.findings.generation import first_reach
from repa_probe.report.compose import FIGURES, generation_sentences
from repa_probe.train.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER = "cifar-ssl-resnet"
GEN = ["--gen", "16", "--gen-sampler", "ode", "--gen-steps", "3", "--gen-reference-n", "40", "--gen-bootstrap", "8"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return [tiny_checkpoint(folder / f"tiny{s}.pt", s) for s in (0, 1)]


def test_compare_with_gen_writes_gen_csv_equal_to_generation_scores(pair, cifar_dir, tmp_path):
    out, cache = tmp_path / "report", tmp_path / "cache"
    result = run_cli("compare", *pair, "--data", cifar_dir / "test", "--n", "24", "--k", "3", "--t", "0",
                     "--encoder", TEACHER, "--no-probe", "--bootstrap", "0", "--null", "0", "--no-baselines",
                     "--cache", cache, "--out", out, "--quiet", "--device", "cpu", *GEN, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    gen = pd.read_csv(out / "gen.csv")
    assert list(gen["checkpoint"]) == ["tiny0", "tiny1"] and (gen["N"] == 16).all()
    assert "N = 16" in result.stdout                                   # printed beside its N

    space = G.EncoderSpace(load_encoder(TEACHER), grid=G.GEN_GRID)
    reference = G.reference_from_folder(cifar_dir / "test", [space], image_size=32, n=40, cache=cache)
    sampling = G.Sampling(16, sampler="ode", steps=3)
    a, b = (G.generation_scores(load_checkpoint(p), sampling, [space], reference, name=n)
            for p, n in zip(pair, ("tiny0", "tiny1")))
    score = f"FD_{TEACHER}"
    assert gen["value"].tolist() == [a.scores[score].value, b.scores[score].value]
    d = G.compare_fd(a, b, reference, score, n_boot=8, seed=0)
    row = gen.iloc[1]
    assert row["against"] == "tiny0" and row["n_boot"] == 8
    np.testing.assert_allclose([row["difference"], row["ci_low"], row["ci_high"]],          # BLAS's last digit
                               [d["difference"], d["low"], d["high"]], rtol=1e-12)
    assert row["ci_low"] < row["difference"] < row["ci_high"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["rows"][1]["ci_high"] == row["ci_high"]
    assert any(p.name.endswith("generation_and_representation.png") for p in (out / "figures").iterdir())


def test_gen_settings_are_checked_before_any_compute(pair, cifar_dir, tmp_path, capsys):
    common = [*map(str, pair), "--data", str(cifar_dir / "test"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main(["compare", *common, "--gen", "16"]) == 2
    assert "--gen 16 needs a feature space" in capsys.readouterr().err
    assert main(["compare", *common, "--gen", "16", "--gen-spaces", "nosuch"]) == 2
    assert "--gen-spaces 'nosuch': choose from" in capsys.readouterr().err
    assert main(["compare", *common, "--gen", "16", "--encoder", TEACHER, "--gen-reference", "x.npz"]) == 2
    assert "--gen-reference 'x.npz' is neither an image folder nor an ADM .npz file" in capsys.readouterr().err


def test_gen_knobs_do_not_enter_the_captures_cache_key():
    base = AnalyzeConfig(data="d", precision="fp32")
    other = AnalyzeConfig(data="d", precision="fp32", gen=100, gen_spaces=("inception",), gen_steps=3,
                          gen_sampler="ode")
    assert base.capture() == other.capture()


#################################################################################
#                 Page 1's sentence and the page (synthetic Findings)           #
#################################################################################

def synthetic(fd: list[float], cknna: list[float]) -> Findings:
    """A trajectory of one run whose checkpoints have these FDs and CKNNA peaks."""
    steps = range(0, 100 * len(fd), 100)
    table = pd.DataFrame([dict(run="r", step=s, checkpoint=f"r@{s}", kind="model", block=b, t=0.0, metric="cknna",
                               encoder=TEACHER, value=v - 0.01 * (b != 2)) for s, v in zip(steps, cknna)
                          for b in (1, 2, 3)])
    gen = pd.DataFrame([dict(checkpoint=f"r@{s}", run="r", step=s, space=TEACHER, score=f"FD_{TEACHER}", N=500,
                             value=v, against="") for s, v in zip(steps, fd)], columns=G.GEN_COLUMNS)
    return with_generation(Findings("trajectory", "t", table, AnalyzeConfig(data="d")), gen)


def test_the_sentence_claims_only_when_the_interval_excludes_zero():
    rng = np.random.default_rng(0)
    together = synthetic(list(np.linspace(90, 20, 12)), list(np.linspace(0.1, 0.5, 12) + rng.normal(0, 0.01, 12)))
    r = together.gen_correlation.iloc[0]
    assert r.points == 12 and r.rho > 0.9 and r.ci_low > 0
    assert generation_sentences(together)[0].startswith("Better generation, better representation holds in this run")
    assert "N = 500" in generation_sentences(together)[0]

    unrelated = synthetic([60, 20, 80, 40, 30, 90, 50, 70], list(np.linspace(0.1, 0.5, 8)))
    r = unrelated.gen_correlation.iloc[0]
    assert r.ci_low <= 0 <= r.ci_high
    sentence = generation_sentences(unrelated)[0]
    assert "holds" not in sentence and "does not hold" not in sentence and "does not settle" in sentence

    few = synthetic([90, 50, 20], [0.1, 0.2, 0.3])                    # fewer than 4 checkpoints: no correlation
    assert few.gen_correlation.empty and generation_sentences(few)[0].startswith("Sample quality (FD_")


def test_the_generation_page_is_registered_and_draws_only_with_gen():
    builder = FIGURES["repa_probe.report.compose.generation_pages"]
    f = synthetic([90, 60, 50, 20], [0.1, 0.2, 0.3, 0.4])
    assert [name for name, _ in builder(f, f.table)] == ["generation and representation"]
    assert builder(Findings("trajectory", "t", f.table, f.config), f.table) == []


#################################################################################
#                     During training, resumed; trajectory reads it             #
#################################################################################

def eval_config(data, out, steps: int) -> TrainConfig:
    return TrainConfig(data=str(data), image_size=16, model="SiT-S/2", depth=3, width=64, heads=4, qk_norm=True,
                       projector_dim=64, encoders=[TEACHER], repa_coeff=0.0, batch=16, steps=steps, lr=1e-3,
                       ema_decay=0.9, num_workers=0, log_every=5, ckpt_every=2, out=str(out), progress=False,
                       eval_every=2, eval_gen=16,
                       analysis=dataclasses.replace(TrainConfig().analysis, gen_sampler="ode", gen_steps=2,
                                                    gen_reference_n=40))


def evals(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == "eval"]


def test_train_logs_fd_resumes_and_trajectory_reads_it(cifar_dir, tmp_path):
    data = cifar_dir / "test"
    result = run_cli("train", "--data", data, "--image-size", "16", "--model", "SiT-S/2", "--depth", "3", "--width",
                     "64", "--heads", "4", "--qk-norm", "--projector-dim", "64", "--batch", "16", "--steps", "2",
                     "--ckpt-every", "2",
                     "--workers", "0", "--ema-decay", "0.9", "--lr", "1e-3", "--repa-coeff", "0", "--encoder", TEACHER,
                     "--eval-every", "2", "--eval-gen", "16", "--analyze-gen-sampler", "ode", "--analyze-gen-steps",
                     "2", "--analyze-gen-reference-n", "40", "--quiet", "--out", tmp_path / "resumed", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    train(eval_config(data, tmp_path / "resumed", 4))                 # resumes from step 2
    train(eval_config(data, tmp_path / "straight", 4))
    resumed, straight = evals(tmp_path / "resumed"), evals(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [0, 2, 4] and resumed == straight
    assert all(r["N"] == 16 and r["score"] == f"FD_{TEACHER}" for r in resumed)

    out = tmp_path / "traj"                                            # the log's FDs, and the checkpoints' again
    result = run_cli("trajectory", tmp_path / "straight", "--data", data, "--n", "24", "--k", "3", "--t", "0",
                     "--encoder", TEACHER, "--no-probe", "--bootstrap", "0", "--null", "0", "--device", "cpu",
                     "--out", out, "--quiet", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    gen = pd.read_csv(out / "gen.csv")
    assert gen["value"].tolist() == [r["value"] for r in straight] and (gen["N"] == 16).all()
    result = run_cli("trajectory", tmp_path / "straight", "--data", data, "--n", "24", "--k", "3", "--t", "0",
                     "--encoder", TEACHER, "--no-probe", "--bootstrap", "0", "--null", "0", "--device", "cpu",
                     "--out", tmp_path / "traj2", "--quiet", "--gen", "16", "--gen-sampler", "ode", "--gen-steps", "2",
                     "--gen-reference-n", "40", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    scored = pd.read_csv(tmp_path / "traj2" / "gen.csv")                # checkpoints at steps 2 and 4
    assert scored["value"].tolist() == [r["value"] for r in straight[1:]]


def test_generation_curves_script_end_to_end_on_tiny_runs(cifar_dir, tmp_path):
    data, root = cifar_dir / "test", tmp_path / "cifar_deep"
    for folder in ("vanilla", "repa", "seed1/vanilla"):
        cfg = eval_config(data, root / folder, 4)
        cfg.eval_every, cfg.eval_gen = 0, 0
        train(cfg)
    out = tmp_path / "report"
    # under torchrun (2 gloo processes, as the committed report was made): rank 0 alone writes
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "analyses" / "generation_curves.py"), "--", "--root", str(root),
                             "--data", str(data), "--gen", "16", "--gen-sampler", "ode", "--gen-steps", "2",
                             "--gen-reference-n", "40", "--gen-bootstrap", "4", "--n", "24", "--bootstrap", "0",
                             "--device", "cpu", "--cache", str(tmp_path / "cache"), "--out", str(out)],
                            capture_output=True, text=True, env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(REPO)},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped repa-s1" in result.stdout and result.stdout.count("report: ") == 1
    gen = pd.read_csv(out / "gen.csv")
    assert list(dict.fromkeys(gen["run"])) == ["vanilla-s0", "repa-s0", "vanilla-s1"] and (gen["N"] == 16).all()
    later = gen[gen["run"] != "vanilla-s0"]
    assert (later["against"] == "vanilla-s0@" + later["step"].astype(str)).all() and later["ci_low"].notna().all()
    reach = pd.read_csv(out / "gen_reach.csv")                  # when each later run reaches vanilla-s0's last FD
    assert reach["run"].tolist() == ["repa-s0", "vanilla-s1"] and (reach["N"] == 16).all()
    fd = gen[gen["score"] == f"FD_{TEACHER}"]
    first = fd[fd["run"] == "vanilla-s0"]
    for r in reach.itertuples():
        mine = fd[fd["run"] == r.run]
        level = first["value"].iloc[-1]
        assert r.level == level and r.step == first_reach(mine["step"].to_numpy(), mine["value"].to_numpy(), level)
        assert r.ci_low <= r.ci_high and r.n_boot == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["correlation"] and "N = 16" in summary["generation"]["sentence"]
    assert len(summary["generation"]["reach"]) == 2
    assert any(p.name.endswith("generation_and_representation.png") for p in (out / "figures").iterdir())
    sys.path.insert(0, str(REPO / "analyses"))
    from generation_curves import readme
    text = (out / "README.md").read_text()
    command = next(line.strip() for line in text.splitlines() if line.strip().startswith("python analyses/"))
    assert readme(out, command) == text and "| 4 | " in text and "reaches vanilla-s0's last FD" in text
    sums = (out / "checkpoints.sha256").read_text().splitlines()
    assert len(sums) == 6 and sums[0].endswith("vanilla-s0/0000002.pt")       # 3 runs × steps 2 and 4


def test_generation_curves_finds_every_seed_and_refuses_a_missing_one(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "analyses"))
    from generation_curves import linked_runs
    root = tmp_path / "cifar_deep"
    for folder in ("vanilla", "repa", "seed2/vanilla", "seed2/repa", "seed10/repa", "seedling/vanilla"):
        (root / folder / "checkpoints").mkdir(parents=True)
    links = tmp_path / "links"
    names = [Path(p).name for p in linked_runs(root, links)]
    assert names == ["vanilla-s0", "repa-s0", "vanilla-s2", "repa-s2", "repa-s10"]
    assert "skipped vanilla-s10" in capsys.readouterr().out
    assert [Path(p).resolve() for p in linked_runs(root, links, [2])] == [(root / "seed2" / a).resolve()
                                                                       for a in ("vanilla", "repa")]
    with pytest.raises(SystemExit, match=r"--seeds: no runs of seed 1 under .*found seeds: 0, 2, 10"):
        linked_runs(root, links, [1])
