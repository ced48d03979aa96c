"""Claims over training seeds (findings/seeds.py): groups by name or given, the mean of per-seed estimates with a
t-interval over seeds, 'k of K seeds', and a seed-level claim on page 1 only where the seeds agree."""
from __future__ import annotations

import json
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

import repa_probe
from conftest import randomize_, tiny_config
from test_report import assert_plain
from repa_probe.checkpoints import save_checkpoint
from repa_probe.errors import UserError
from repa_probe.families.sit import as_checkpoint
from repa_probe.findings import analysis_findings
from repa_probe.findings.seeds import check_groups, groups_by_name, seed_table, t_interval
from repa_probe.findings.summary import peak_summary
from repa_probe.models import SiT
from repa_probe.pipeline import AnalyzeConfig, Analysed, Curves, HeldOut, Results
from repa_probe.report.compose import seed_pages, summarise

# Student's t at 97.5% by hand: with 2 df its CDF is 1/2 + t/(2·√(2 + t²)), so t = 0.95·√(2/(1 − 0.95²))
# = 4.3027; with 1 df (Cauchy) t = tan(0.475·π) = 12.706
T975_2DF, T975_1DF = 0.95 * np.sqrt(2 / (1 - 0.95 ** 2)), np.tan(0.475 * np.pi)
ALIGNED = 2


@pytest.fixture(scope="module")
def ckpts():
    """(vanilla, REPA aligned at block 2) tiny real checkpoints: page 1 reads the aligned block off the REPA one."""
    return (as_checkpoint(SiT(tiny_config(depth=4, z_dims=[], encoder_depth=0))),
            as_checkpoint(SiT(tiny_config(depth=4, encoder_depth=ALIGNED))))


def seed_results(ckpts, drops: list[float], deltas: list[float]) -> Results:
    """vanilla-sK and repa-sK, K = 0, 1, 2: one CKNNA curve each over blocks 0–4 at t = 0 with 200 replicates that
    share the images' spread (so paired differences are sharp); vanilla-sK's held-out drop is drops[K] ± 0.01,
    repa-sK − vanilla-sK at the aligned block is deltas[K] (± ~0.001)."""
    rng, analysed = np.random.default_rng(0), []
    for k, (drop, delta) in enumerate(zip(drops, deltas)):
        reps = 0.3 + rng.normal(scale=0.05, size=(200, 1, 1)) + np.array([0, .01, .02, .015, .01])
        for arm, ckpt, shift in (("vanilla", ckpts[0], 0.0), ("repa", ckpts[1], delta)):
            r = reps + np.array([0, 0, shift, 0, 0]) + rng.normal(scale=2e-4, size=reps.shape)
            ho = HeldOut([2], np.array([drop if arm == "vanilla" else 0.0]),
                         np.array([[drop - 0.01, drop + 0.01] if arm == "vanilla" else [-0.01, 0.01]]), 100, 100)
            name = f"{arm}-s{k}"
            analysed.append(Analysed(name, "model", ckpt, [Curves(name, "model", "cknna", "e", [0.0], list(range(5)),
                                                                  np.median(r, axis=0), None, r, None, held_out=ho)]))
    return Results(AnalyzeConfig(data="unused"), analysed, [], {})


def mean_row(seeds: pd.DataFrame, quantity: str) -> pd.Series:
    return seeds[(seeds["quantity"] == quantity) & (seeds["seed"] == "mean")].iloc[0]


def test_seeds_group_by_name_or_as_given_and_a_bad_grouping_is_one_clear_error():
    assert groups_by_name(["vanilla-s0", "vanilla-s1/0005000", "repa-s1", "repa-s0", "repa-s2", "x-s3", "plain",
                           "twice-s0/0000010", "twice-s0/0000020", "twice-s1"]) == \
        {"vanilla": {0: "vanilla-s0", 1: "vanilla-s1/0005000"}, "repa": {0: "repa-s0", 1: "repa-s1", 2: "repa-s2"}}
    assert check_groups({"a": ["x", "y"]}, ["x", "y", "z"]) == {"a": {0: "x", 1: "y"}}
    for bad, why in (({"a": ["x", "w"]}, "'w' is not one of the models' names"), ({"a": ["x"]}, "at least two seeds"),
                     ({"a": ["x", "y"], "b": ["y", "z"]}, "named twice"), (["x", "y"], "pass a dict")):
        with pytest.raises(UserError, match=why):
            check_groups(bad, ["x", "y", "z"])


def test_seed_level_mean_t_interval_and_k_of_k_and_page_1_speaks_of_the_recipe(ckpts):
    drops, deltas = [0.05, 0.03, 0.07], [0.02, 0.03, 0.025]
    res = seed_results(ckpts, drops, deltas)
    groups, seeds = seed_table(res, peak_summary(res), {f"repa-s{k}": ALIGNED for k in range(3)})
    assert groups == {"vanilla": {k: f"vanilla-s{k}" for k in range(3)}, "repa": {k: f"repa-s{k}" for k in range(3)}}
    for quantity, values in (("drop", drops), ("delta", deltas)):
        per_seed = seeds[(seeds["quantity"] == quantity) & (seeds["recipe"] == "vanilla" if quantity == "drop" else
                                                             seeds["quantity"] == quantity) & (seeds["seed"] != "mean")]
        assert per_seed["value"].to_numpy() == pytest.approx(values, abs=2e-3)      # deltas: up to the replicates
        row, v = mean_row(seeds, quantity), per_seed["value"].to_numpy()
        half = T975_2DF * np.std(v, ddof=1) / np.sqrt(3)
        assert (row["value"], row["ci_low"], row["ci_high"]) == pytest.approx((v.mean(), v.mean() - half,
                                                                               v.mean() + half), abs=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(sps.t.interval(0.95, 2, v.mean(), sps.sem(v)),
                                                                abs=1e-12)
        assert (row["seeds_positive"], row["n_seeds"], row["verdict"]) == (3, 3, 1)
    assert mean_row(seeds, "delta")["block"] == ALIGNED and mean_row(seeds, "delta")["reference"] == "vanilla"
    overview = summarise(res)[0]["overview"]
    assert_plain(overview, compare=True)                                   # ≤ 160 characters each, one precision
    peak, compared, _ = overview
    assert peak.startswith("At t = 0, over 3 seeds, vanilla's CKNNA peaks, then drops 0.050 [0.000, 0.100] (drops in "
                           "3 of 3 seeds); the other curve does not")
    assert compared.startswith(f"At the aligned block {ALIGNED}, over 3 seed pairs, repa − vanilla: CKNNA +0.025 "
                               f"[0.013, 0.037] (3 of 3 above 0); repa better in CKNNA")


def test_no_seed_level_claim_when_seeds_disagree_though_each_seeds_own_interval_excludes_0(ckpts):
    res = seed_results(ckpts, [0.05, -0.04, 0.05], [0.03, -0.03, 0.03])
    summary = summarise(res)[0]
    rows = pd.DataFrame(summary["seeds"]["rows"])
    own = rows[(rows["seed"] != "mean") & ((rows["recipe"] == "vanilla") | (rows["quantity"] == "delta"))]
    assert list(own["verdict"]) == [1, -1, 1] * 2                    # every seed's own interval excludes 0
    for quantity in ("drop", "delta"):
        row = mean_row(rows, quantity)
        assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == 0 and row["seeds_positive"] == 2
    assert_plain(summary["overview"], compare=True)
    peak, compared, _ = summary["overview"]
    assert "peaks, then drops" not in peak and "falls" not in peak
    assert peak.startswith("At t = 0, over 3 seeds, no curve drops after its peak at the seed level (0–2 of 3 seeds "
                           "drop)")
    assert "better" not in compared and compared.endswith("no seed-level difference.")
    assert any(line.startswith("seeds, vanilla, held-out drop after the peak, CKNNA vs e: s0 +0.050, s1 −0.040, s2 "
                               "+0.050; mean +0.020") for line in summary["details"])


def test_the_seed_figure_draws_each_seed_thin_and_the_mean_over_seeds_on_top(ckpts):
    res = seed_results(ckpts, [0.05, 0.03, 0.07], [0.02, 0.03, 0.025])
    table = res.table()
    [(name, fig)] = seed_pages(analysis_findings(res, table, pages=False), table)
    try:
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        thin = [line for line in fig.axes[0].get_lines() if line.get_linewidth() < 1 and line.get_color() ==
                lines["repa: mean of 3 seeds"].get_color()]
        assert len(thin) == 3 and "vanilla: mean of 3 seeds" in lines
        repa = table[table["checkpoint"].str.startswith("repa")].groupby("block")["value"].mean()
        assert lines["repa: mean of 3 seeds"].get_ydata() == pytest.approx(repa.to_numpy())
    finally:
        plt.close("all")


def test_t_interval_needs_two_finite_values():
    assert np.isnan(t_interval([0.1])).all() and np.isnan(t_interval([0.1, np.nan, 0.2])).all()
    assert t_interval([1.0, 3.0]) == pytest.approx((2.0, 2.0 - T975_1DF, 2.0 + T975_1DF), abs=1e-12)   # s/√2 = 1


def seed_files(tmp_path, cifar_dir, seeds: int) -> tuple[list[str], object]:
    """Real tiny checkpoint files vanilla-sK and repa-sK (K < seeds; REPA aligned at block 1), and 40 real images
    (quick to list): (their paths, the image folder)."""
    paths = []
    for arm, extra in (("vanilla", dict(z_dims=[], encoder_depth=0)), ("repa", {})):
        for k in range(seeds):
            cfg = tiny_config(**extra)
            paths.append(str(tmp_path / f"{arm}-s{k}.pt"))
            save_checkpoint(paths[-1], cfg, randomize_(SiT(cfg), seed=k).state_dict(),
                            meta={"step": 4, "mode": "pixels", "convention": "repa"})
    data = tmp_path / "data"
    for folder in sorted((cifar_dir / "test").iterdir()):
        (data / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:4]:
            shutil.copy(image, data / folder.name / image.name)
    return paths, data


def test_an_analysis_of_checkpoints_named_by_seed_reports_them_at_the_seed_level(tmp_path, cifar_dir):
    """Real tiny checkpoint files vanilla-s0/s1 and repa-s0/s1, grouped by their names: the tables that become
    seeds.csv, summary.json's seeds and page 1's seed-level sentences."""
    paths, data = seed_files(tmp_path, cifar_dir, 2)
    a = repa_probe.analyze(paths, data=str(data), n=40, ts=0, bootstrap=2, null=0, baselines=False, quiet=True,
                           cache=str(tmp_path / "cache"))
    summary, tables = summarise(a.results)
    assert summary["seeds"]["groups"] == {"vanilla": {"0": "vanilla-s0", "1": "vanilla-s1"},
                                          "repa": {"0": "repa-s0", "1": "repa-s1"}}
    seeds = tables["seeds"]                                               # written as seeds.csv
    assert list(seeds["seed"]) == ["0", "1", "mean"] * 4        # the probe's drops of 2 recipes and its delta,
    assert list(seeds["quantity"]) == ["drop"] * 6 + ["delta"] * 6     # self_cka_prev's delta (it has no drop)
    assert list(seeds["metric"]) == ["probe_top1"] * 9 + ["self_cka_prev"] * 3
    assert seeds.to_dict("records") == summary["seeds"]["rows"]
    assert summary["overview"][0].startswith("At t = 0, over 2 seeds, ")
    assert summary["overview"][1].startswith("At the aligned block 1, over 2 seed pairs, repa − vanilla: probe "
                                             "top-1 ")
    assert any(line.startswith("seeds, repa − vanilla at the aligned block, linear probe top-1: s0 ")
               for line in summary["details"])


def test_explicit_seed_groups_are_checked_before_any_compute(tmp_path, cifar_dir):
    model = SiT(tiny_config(z_dims=[], encoder_depth=0))
    with pytest.raises(UserError, match=r"seed_groups=.*'c' is not one of the models' names \['a', 'b'\]"):
        repa_probe.analyze([model, model], data=str(cifar_dir / "test"), names=["a", "b"], blocks="blocks",
                           convention="sit", image_size=16, num_classes=10, seed_groups={"r": ["a", "c"]},
                           cache=str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_page_2_of_many_checkpoints_continues_on_further_pages_instead_of_below_the_page():
    """Six seeds' provenance (6 rows each) filled page 2 and pushed its details, the seed lines among them, below
    the bottom of the page, where nothing shows."""
    from repa_probe.report.figures import summary_pages
    sections = [("Checkpoints", [(f"seed {i}", "row") for i in range(60)]), ("Details", ["the seed lines"] * 5)]
    pages = summary_pages("seeds", sections, pd.DataFrame({"a": range(50)}), "the table")
    try:
        texts = [(t.get_text(), t.get_position()[1]) for page in pages for t in page.texts]
        assert all(0 < y < 1 for _, y in texts) and len(pages) >= 3
        assert [text for text, _ in texts].count("the seed lines") == 5
        assert "seeds (continued)" in [text for text, _ in texts]
    finally:
        plt.close("all")


def test_the_seed_report_readme_is_rendered_from_its_files(tmp_path, cifar_dir):
    """analyses/seed_report.py's README on a real tiny seed analysis: the page-1 sentences, and a table row per
    seeds.csv row group whose cells are that file's values (each seed's, the mean with its t-interval, k of K)."""
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "analyses"))
    from seed_report import readme
    from repa_probe.report.verdict import interval
    paths, data = seed_files(tmp_path, cifar_dir, 3)
    out = tmp_path / "report"
    repa_probe.analyze(paths, data=str(data), n=40, ts=0, bootstrap=2, null=0, baselines=False, quiet=True,
                       cache=str(tmp_path / "cache"), self_similarity=False).report(out)
    text = readme(out, "python analyses/seed_report.py --seeds 0,1,2")
    summary, seeds = json.loads((out / "summary.json").read_text()), pd.read_csv(out / "seeds.csv", dtype={"seed": str})
    assert " vs nan" not in text and "linear probe top-1 (points)" in text
    assert text.startswith("# The finding over 3 training seeds (vanilla, repa)")
    assert all(f"- {s}" in text for s in summary["overview"]) and "2 degrees of freedom" in text
    rows = [line for line in text.splitlines() if line.startswith(("| vanilla", "| repa"))]
    means = seeds[seeds["seed"] == "mean"]
    assert len(rows) == len(means) > 0
    for line, m in zip(rows, means.itertuples()):
        per = seeds[(seeds["seed"] != "mean") & (seeds["quantity"] == m.quantity) & (seeds["recipe"] == m.recipe)
                    & (seeds["metric"] == m.metric) & (seeds["t"] == m.t)]
        cells = [c.strip() for c in line.split("|")[1:-1]]
        signed = m.quantity == "delta"
        expect = [interval(m.metric, r.value, r.ci_low, r.ci_high, signed).removesuffix(" points")
                  for r in per.itertuples()]
        assert cells[3:6] == expect and cells[6] == "**" + interval(m.metric, m.value, m.ci_low, m.ci_high,
                                                                    signed).removesuffix(" points") + "**"
        assert cells[7] == f"{m.seeds_positive} of 3"
