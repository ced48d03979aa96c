"""When does a run reach the first run's final FD (issue 27, item 5: "does REPA reach a given FD in fewer
steps, with a paired interval?"): findings/generation.py's first_reach and steps_to_reach against hand
computations, and the interval's coverage of a planted crossing over simulated seeds."""
import numpy as np
import pandas as pd

from repa_probe.fid import GaussianStats, fd_against, fd_replicates
from repa_probe.findings.generation import first_reach, steps_to_reach
from repa_probe.report.verdict import reach_lines


def test_first_reach_interpolates_between_the_checkpoints_around_the_crossing():
    steps = np.array([100, 200, 300])
    assert first_reach(steps, np.array([9.0, 5.0, 1.0]), 4.0) == 200 + (5 - 4) / (5 - 1) * 100
    assert first_reach(steps, np.array([9.0, 3.0, 5.0]), 4.0) == 100 + (9 - 4) / (9 - 3) * 100   # the first crossing
    assert first_reach(steps, np.array([3.0, 2.0, 1.0]), 4.0) == 100
    assert first_reach(steps, np.array([9.0, 8.0, 7.0]), 4.0) == float("inf")


def test_steps_to_reach_uses_the_first_runs_last_fd_and_pairs_the_replicates():
    a = {100: (9.0, np.array([9.5, 8.0])), 200: (4.0, np.array([4.5, 3.0]))}
    b = {100: (6.0, np.array([5.0, 7.0])), 200: (2.0, np.array([2.0, 2.0]))}
    row = steps_to_reach({"a": a, "b": b}, "FD_x", 16, n_boot=2).iloc[0]
    assert row["level"] == 4.0 and row["step_against"] == 200
    assert row["step"] == 100 + (6 - 4) / (6 - 2) * 100                      # 150
    # replicate 0: level 4.5, b crosses at 100 + (5 - 4.5)/(5 - 2)·100; replicate 1: level 3, 100 + 4/5·100
    reps = sorted([100 + 0.5 / 3 * 100, 100 + 4 / 5 * 100])
    assert row["ci_low"] == reps[0] and row["ci_high"] == reps[1]
    assert row["speedup"] == 200 / 150 and row["N"] == 16 and row["run"] == "b" and row["against"] == "a"
    line = reach_lines(pd.DataFrame([row]))[0]
    assert "b reaches a's last FD_x (4, N = 16" in line and "in fewer steps" in line


def test_a_run_that_never_gets_there_is_said_so():
    a = {1: (5.0, np.array([5.0])), 2: (1.0, np.array([1.0]))}
    b = {1: (6.0, np.array([6.0])), 2: (3.0, np.array([3.0]))}
    row = steps_to_reach({"a": a, "b": b}, "FD_x", 8, n_boot=1).iloc[0]
    assert row["step"] == float("inf") and row["speedup"] == 0
    assert "at step never [never, never]: in more steps" in reach_lines(pd.DataFrame([row]))[0]


def test_the_interval_covers_a_planted_crossing_over_simulated_seeds():
    """Samples N(μ_s, I) in 3 dimensions against a reference N(0, I): the population FD is |μ_s|², run a's
    mean falls as 600/s and run b's as 600/(1.6 s) along one axis; the population crossing (interpolated like
    the estimate) is known. The 95% interval must cover it, and resolve "fewer steps", in most of 200
    simulated seeds."""
    steps, n, d = np.arange(100, 700, 100), 400, 3
    ref = GaussianStats.from_moments(10**9, np.zeros(d), np.eye(d))
    fd = fd_against(ref)
    pop = {"a": (600 / steps) ** 2, "b": (600 / (1.6 * steps)) ** 2}
    truth = first_reach(steps, pop["b"], pop["a"][-1])
    assert 300 < truth < 400
    covered = fewer = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        runs = {}
        for r, speed in (("a", 1.0), ("b", 1.6)):
            runs[r] = {}
            for s in steps:
                x = rng.standard_normal((n, d))
                x[:, 0] += 600 / (speed * s)
                runs[r][int(s)] = (fd(x), fd_replicates(x, ref, 60, seed))
        row = steps_to_reach(runs, "FD", n, 60).iloc[0]
        covered += row["ci_low"] <= truth <= row["ci_high"]
        fewer += row["ci_high"] < row["step_against"]
    print(f"covered {covered} of 200, fewer steps resolved in {fewer}")
    assert covered >= 0.88 * 200 and fewer >= 0.9 * 200, (covered, fewer)
