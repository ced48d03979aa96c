"""The monitor (findings/monitor.py, issue 29 item 4): on simulated training curves with a planted turning point it
finds it inside its interval; with none planted it claims one at about the nominal rate; short or odd input gets a
reason or one clear error; on the committed CIFAR-10 logs it reads the paired losses, and trajectory and
analyses/monitor_cifar.py report it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ONE_THREAD, REPO, randomize_, tiny_config

from repa_probe.errors import UserError
from repa_probe.findings.monitor import MIN_STEPS, from_logs, monitor_runs, turning_point

STEPS = np.arange(50, 5001, 50)           # a 5,000-step run logged every 50 steps, as the CIFAR runs
TURN = 2000
LOGS = REPO / "reports" / "weights" / "cifar_deep"


def ar_noise(rng: np.random.Generator, sd: float = 1e-3, rho: float = 0.3, n: int = len(STEPS)) -> np.ndarray:
    """AR(1) noise of standard deviation sd: neighbouring logged values move together, as a run's do."""
    e = rng.normal(0.0, sd * np.sqrt(1 - rho ** 2), n)
    e[0] = rng.normal(0.0, sd)
    for i in range(1, n):
        e[i] += rho * e[i - 1]
    return e


def alignment(rng: np.random.Generator) -> np.ndarray:
    """REPA's cosine rising through the run, like the CIFAR run's."""
    return 0.6 + 0.1 * (1 - np.exp(-STEPS / 1500)) + ar_noise(rng, 2e-3)


CURVES = {   # benefit per step, higher = REPA better
    "rises, then flat": lambda s: 0.01 * np.minimum(s, TURN) / TURN,
    "rises, then falls": lambda s: 0.01 * np.minimum(s, TURN) / TURN - 0.003 * np.maximum(s - TURN, 0) / 3000,
    "rises all along": lambda s: 0.01 * s / 5000,
    "flat": lambda s: 0.0 * s,
    "rises, then slower": lambda s: 0.01 * np.minimum(s, TURN) / TURN + 0.004 * np.maximum(s - TURN, 0) / 3000,
}


def simulate(curve: str, sims: int, seeds: int = 1) -> list:
    out = []
    for r in range(sims):
        rng = np.random.default_rng([r, seeds])
        benefit = [CURVES[curve](STEPS) + ar_noise(rng) for _ in range(seeds)]
        out.append(turning_point(STEPS, benefit, [alignment(rng) for _ in range(seeds)], every=500, seed=r))
    return out


@pytest.mark.parametrize("curve", ["rises, then flat", "rises, then falls"])
def test_a_planted_turning_point_is_claimed_and_inside_its_interval_in_about_nine_of_ten_runs(curve):
    """Nominal 95%; change-point intervals run narrow at this noise (docs/statistics.md: about 92% cover, and
    claim and cover together in about 90% of runs), so the bar is 88% of 200 runs."""
    found = simulate(curve, 200)
    hits = [m for m in found if m.claim and m.ci_low <= TURN <= m.ci_high]
    assert len(hits) >= 176, [m.reason for m in found if not m.claim]
    for m in hits:
        assert m.align_until % 500 == 0 and abs(m.align_until - m.step) <= 250
        assert m.slope_before[1] > 0 and m.slope_later[1] <= 0 and m.alignment_after[2] >= 0
        assert f"--align-until {m.align_until}" in m.sentence


@pytest.mark.parametrize("curve", ["rises all along", "flat"])
def test_with_no_turning_point_one_is_claimed_at_most_at_the_nominal_rate(curve):
    found = simulate(curve, 100)
    assert sum(m.claim for m in found) <= 10          # nominal 5% (binomial: ≥ 11 of 100 has chance ≈ 1%)
    assert all("no turning point resolved" in m.sentence for m in found if not m.claim)


def test_a_benefit_that_only_slows_is_still_paying():
    found = simulate("rises, then slower", 40)
    assert sum(m.claim for m in found) <= 4
    assert sum("it slows, it does not stop" in m.reason for m in found) >= 30


def test_no_claim_when_the_alignment_itself_falls_after_the_kink():
    rng = np.random.default_rng(0)
    falling = 0.7 - 0.1 * np.maximum(STEPS - TURN, 0) / 3000 + ar_noise(rng, 2e-3)
    m = turning_point(STEPS, CURVES["rises, then flat"](STEPS) + ar_noise(rng), falling)
    assert not m.claim and m.reason.startswith("REPA's alignment falls") and m.alignment_after[2] < 0
    assert turning_point(STEPS, CURVES["rises, then flat"](STEPS) + ar_noise(rng)).claim    # no alignment given


def test_several_seeds_are_averaged_and_each_gives_its_own_step():
    m = simulate("rises, then flat", 1, seeds=3)[0]
    assert m.claim and m.n_seeds == 3 and len(m.seed_steps) == 3
    mean, lo, hi = m.seed_interval
    assert mean == pytest.approx(np.mean(m.seed_steps)) and lo < mean < hi
    assert "mean of 3 seeds" in m.sentence and "over seeds" in m.sentence


def test_too_few_steps_is_a_reason_not_a_crash():
    rng = np.random.default_rng(1)
    short = turning_point(STEPS[:MIN_STEPS - 1], rng.normal(size=MIN_STEPS - 1))
    assert not short.claim and "too few logged steps" in short.reason and short.step != short.step
    dip = np.r_[np.linspace(0, -1, 30), np.full(MIN_STEPS - 2, -1.0)]     # low point leaves too few after it
    late = turning_point(np.arange(len(dip)) * 10, dip + rng.normal(0, 1e-3, len(dip)), start=300)
    assert not late.claim and "from step 300 on" in late.reason
    assert json.loads(json.dumps(short.to_dict()))["step"] is None


@pytest.mark.parametrize("steps, benefit, message", [
    ([3, 2, 1], [0, 0, 0], "increasing order"),
    (STEPS, np.zeros(len(STEPS) - 1), "one value per logged step"),
    (STEPS, np.r_[np.zeros(len(STEPS) - 1), np.nan], "not finite"),
])
def test_bad_series_are_one_clear_error(steps, benefit, message):
    with pytest.raises(UserError, match=message):
        turning_point(steps, benefit)


#################################################################################
#                     The committed CIFAR-10 logs                               #
#################################################################################

def test_the_cifar_logs_are_read_as_paired_losses():
    """The monitor's series are the logs' own numbers, read here independently: vanilla − REPA loss_denoise at
    every logged step (0 at step 1: both arms start from the same weights on the same batch), −loss_repa."""
    rows = {arm: [json.loads(x) for x in (LOGS / f"{arm}-s0.log.jsonl").read_text().splitlines()]
            for arm in ("vanilla", "repa")}
    v, r = ({x["step"]: x for x in rows[arm] if x["event"] == "train"} for arm in ("vanilla", "repa"))
    assert list(v) == list(r) and len(v) == 101 and v[1]["loss_denoise"] == r[1]["loss_denoise"]
    steps = list(v)
    expected = turning_point(steps, [v[s]["loss_denoise"] - r[s]["loss_denoise"] for s in steps],
                             [-r[s]["loss_repa"] for s in steps], every=500,
                             what="vanilla − REPA denoising loss (same batches)")
    assert from_logs(LOGS / "vanilla-s0.log.jsonl", LOGS / "repa-s0.log.jsonl", every=500) == expected
    with pytest.raises(UserError, match="must be the vanilla run"):
        from_logs(LOGS / "repa-s0.log.jsonl", LOGS / "vanilla-s0.log.jsonl")


def test_arms_that_saw_different_batches_are_refused(tmp_path):
    lines = (LOGS / "repa-s0.log.jsonl").read_text().splitlines()
    shifted = [json.dumps({**json.loads(x), "inputs_sha256": "0" * 16}) if '"step": 100,' in x else x for x in lines]
    (tmp_path / "log.jsonl").write_text("\n".join(shifted) + "\n")
    with pytest.raises(UserError, match="saw different batches at 1 logged step"):
        from_logs(LOGS / "vanilla-s0.log.jsonl", tmp_path / "log.jsonl")
    rows = monitor_runs({"vanilla": LOGS / "vanilla-s0.log.jsonl", "repa": tmp_path / "log.jsonl"})
    assert len(rows) == 1 and not rows[0]["claim"] and "different batches" in rows[0]["reason"]


def test_the_monitor_report_is_what_its_script_makes_from_the_logs(tmp_path):
    """reports/monitor/ is reproduced by analyses/monitor_cifar.py: the same summary.json, and a README whose
    every number comes from it."""
    result = subprocess.run([sys.executable, str(REPO / "analyses" / "monitor_cifar.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, env={**ONE_THREAD, "PATH": "", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    committed = REPO / "reports" / "monitor"
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((committed / "summary.json").read_text())
    assert (tmp_path / "README.md").read_text() == (committed / "README.md").read_text()
    summary = json.loads((committed / "summary.json").read_text())
    assert summary["monitor"]["sentence"] in (committed / "README.md").read_text()
    seeds = sorted(summary["logs"], key=int)                       # every seed pair committed (0 and 1 so far)
    assert seeds[0] == "0" and len(seeds) == len(list(LOGS.glob("repa-s*.log.jsonl")))
    assert summary["monitor"] == from_logs([LOGS / f"vanilla-s{s}.log.jsonl" for s in seeds],
                                           [LOGS / f"repa-s{s}.log.jsonl" for s in seeds], every=500).to_dict()


def test_trajectory_states_the_monitor_of_two_run_folders(tmp_path, cifar_dir):
    """`trajectory VANILLA_RUN REPA_RUN`: summary.json's monitor is the logs' (each run folder's log.jsonl, the
    REPA run's checkpoint spacing from its config.json), and page 1 of the summary says it."""
    from repa_probe.checkpoints import save_checkpoint
    from repa_probe.commands import trajectory
    from repa_probe.models import SiT
    from repa_probe.pipeline import AnalyzeConfig
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    for arm in ("vanilla", "repa"):
        run = tmp_path / arm
        save_checkpoint(run / "checkpoints" / "0000010.pt", cfg, randomize_(SiT(cfg), seed=0).state_dict(),
                        meta={"step": 10, "mode": "pixels"})
        shutil.copyfile(LOGS / f"{arm}-s0.log.jsonl", run / "log.jsonl")
        shutil.copyfile(LOGS / f"{arm}-s0.config.json", run / "config.json")
    config = AnalyzeConfig(data=str(cifar_dir / "test"), n=40, ts=(0.0,), bootstrap=0, null=0,
                           cache=str(tmp_path / "cache"), quiet=True)
    out = trajectory([str(tmp_path / "vanilla"), str(tmp_path / "repa")], config, str(tmp_path / "traj"))
    summary = json.loads((out / "summary.json").read_text())
    expected = from_logs(tmp_path / "vanilla" / "log.jsonl", tmp_path / "repa" / "log.jsonl", every=500,
                         names=("vanilla", "repa")).to_dict()
    assert summary["monitor"] == [{"run": "repa", "reference": "vanilla", **expected}]
    from pypdf import PdfReader
    text = " ".join(page.extract_text() for page in PdfReader(out / "report.pdf").pages)
    assert "When alignment stops paying" in text
