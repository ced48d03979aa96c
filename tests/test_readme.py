"""The README's usage section stays in step with `--help`, and its two set-up commands stay true."""
from __future__ import annotations

import os
import re

from conftest import REPO
from repa_probe.cli import build_parser

NUMBER = r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?"     # a number as the README writes one: 1, 10,000, 0.011

USAGE_WIDTH = "100"


def usage_blocks() -> dict[str, str]:
    """Each subcommand's argparse usage at a fixed width (what `repa-probe CMD --help` starts with)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_WIDTH
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        return {name: p.format_usage().strip() for name, p in sub.choices.items()}
    finally:
        if old is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = old


def test_readme_usage_matches_help_for_every_command():
    readme = (REPO / "README.md").read_text()
    stale = [name for name, usage in usage_blocks().items() if usage not in readme]
    assert not stale, ("README usage is out of date for " + ", ".join(stale) + "; paste these (COLUMNS=100):\n\n"
                       + "\n".join(usage_blocks()[n] for n in stale))


def test_readme_set_up_commands_match_ci():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = re.search(r"^python3 -m venv .*pytest.*$", readme, re.M).group(0)
    demo_cmd = re.search(r"^python3 -m venv .*repa-probe demo.*$", readme, re.M).group(0)
    for step in ("pip install -q torch==2.14.1 torchvision==0.29.1", 'pip install -q -e ".[dev,latent]"',
                 "python -m pytest -q"):
        assert step.replace(" -q", "") in test_cmd and step in ci
    assert "torch==2.14.1 torchvision==0.29.1" in demo_cmd


def readme_examples() -> list[list[str]]:
    """The `repa-probe ...` commands of the README's "Analysing real checkpoints" block, as argv lists."""
    import shlex
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Analysing real checkpoints", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in joined.splitlines() if line.strip().startswith("repa-probe ")]


def test_every_readme_example_parses_and_the_runnable_ones_run(tmp_path, cifar_dir):
    """The ImageNet examples need the official files: their flags must parse. The examples on one's own runs
    (compare, trajectory) run for real on two tiny runs, with the README's flags plus speed settings."""
    import numpy as np
    from conftest import randomize_, run_cli, tiny_config
    from repa_probe.checkpoints import save_checkpoint
    from repa_probe.models import SiT

    examples = readme_examples()
    assert {argv[0] for argv in examples} >= {"analyze", "compare", "trajectory"}
    for argv in examples:
        build_parser().parse_args(argv)
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    for r, run in enumerate(("vanilla", "repa")):
        for step in (5, 10):
            model = randomize_(SiT(cfg), seed=10 * r + step)
            save_checkpoint(tmp_path / "runs" / run / "checkpoints" / f"{step:07d}.pt", cfg, model.state_dict(),
                            meta={"step": step, "mode": "pixels"})
    fast = ["--n", "40", "--t", "0", "--bootstrap", "2", "--null", "2", "--quiet", "--cache", str(tmp_path / "c")]
    ran = 0
    for argv in examples:
        if not any(a.startswith("runs/") for a in argv):
            continue
        argv = [str(cifar_dir / "test") if a == "cifar10/test" else a for a in argv]
        r = run_cli(*argv, *fast, env={"OMP_NUM_THREADS": "1"}, cwd=tmp_path)
        assert r.returncode == 0, (argv, r.stderr[-2000:])
        out = tmp_path / argv[argv.index("--out") + 1]
        assert (out / "report.pdf").is_file() and np.isfinite(
            __import__("pandas").read_csv(out / "results.csv")["value"]).all()
        ran += 1
    assert ran == 2


def test_the_demo_paragraph_quotes_committed_numbers_as_page_1_prints_them():
    """Every number of the paragraph under the demo command comes from a committed report or the shipped pair's
    training config: the shipped pair's REPA − vanilla CKNNA at the aligned block as page 1 prints it, beyond its
    interval (REPA's lift), and the drop of every curve that page 1 says falls; the demo's own pair's steps,
    blocks and difference; the seed report's means over seeds at t = 0 (seeds.csv), with how many seeds agree.
    The picture is the shipped pair's page 1."""
    import json

    import pandas as pd
    from repa_probe.report.verdict import interval

    readme = (REPO / "README.md").read_text()
    para = " ".join(readme.split("Page 1 of the report it writes", 1)[1].split("![page 1", 1)[0].split())
    demo, shipped = (json.loads((REPO / "reports" / name / "summary.json").read_text())
                     for name in ("demo", "demo/shipped"))
    seeds = pd.read_csv(REPO / "reports" / "seeds" / "seeds.csv", dtype={"seed": str}).fillna({"encoder": ""})
    means = seeds[(seeds["seed"] == "mean") & (seeds["t"] == 0)]
    trained = json.loads((REPO / "reports" / "weights" / "cifar_deep" / "repa-s0.config.json").read_text())

    def at_aligned_block(summary: dict) -> dict:
        return next(r for r in summary["compare"] if r["metric"] == "cknna" and r["t"] == 0)

    def quoted(r: dict) -> str:
        return interval("cknna", r["aligned_delta"], r["aligned_ci_low"], r["aligned_ci_high"])

    lift, here = (quoted(at_aligned_block(s)) for s in (shipped, demo))
    over_seeds = {(r.quantity, r.recipe, r.metric): interval(r.metric, r.value, r.ci_low, r.ci_high,
                                                             signed=r.quantity == "delta") for r in means.itertuples()}
    quoted_seeds = [q for q in over_seeds.values() if q in para]
    assert over_seeds[("delta", "repa", "cknna")] in para and len(quoted_seeds) >= 2
    r = at_aligned_block(shipped)
    assert f"{lift} at block {r['aligned_block']}" in para and r["aligned_ci_low"] > 0
    assert f"n = {r['n']:,}, k = {r['k']}" in para and shipped["config"]["n"] == r["n"]
    falls = [p for p in shipped["peaks"] if p["t"] == 0 and p["peaks_then_drops"]]
    drops = [interval(p["metric"], p["drop_after"], p["drop_ci_low"], p["drop_ci_high"], signed=False)
             for p in falls]
    assert falls and all(d in para for d in drops) and all(p["drop_ci_low"] > 0 for p in falls)
    assert (f"{trained['depth']}-block SiTs trained {trained['steps']:,} steps of {trained['batch']} images, vanilla "
            f"and REPA λ = {trained['repa_coeff']:g} at block {trained['repa_depth']}") in para
    assert f"(this run: {here} at its aligned block;" in para
    steps = {demo["checkpoints"][name]["step"] for name in ("vanilla", "repa")}
    blocks = {name: pd.read_csv(REPO / "reports" / name / "results.csv")["block"].max() for name in ("demo", "seeds")}
    assert len(steps) == 1 and f"{min(steps)} steps of a {blocks['demo']}-block SiT" in para
    agree = {str(int(x)) for x in (*means["seeds_positive"], *means["n_seeds"])}
    seed_n = json.loads((REPO / "reports" / "seeds" / "summary.json").read_text())["config"]["n"]
    from_files = ({str(x) for x in (*blocks.values(), *steps, r["aligned_block"], r["k"], trained["depth"],
                                    trained["batch"], trained["repa_depth"], trained["repa_coeff"])} | agree
                  | {f"{x:,}" for x in (r["n"], trained["steps"], seed_n)}
                  | set(re.findall(r"\d+\.\d+", lift + here + "".join(drops + quoted_seeds))))
    wording = {"1", "95", "0"}                  # "page 1", "95% intervals", "seed-0" and "t = 0"
    assert set(re.findall(NUMBER, para)) <= from_files | wording
    assert "![page 1 of the shipped pair's report](reports/demo/shipped/figures/01_overview.png)" in readme


def test_the_three_way_sentence_quotes_its_report():
    """The README's sentence on reports/three_way/ gives iREPA − REPA at the aligned block as irepa_vs_repa.csv has
    it (spatial structure and pooled CKNNA at the report's first t, CKNNA with its n and k), and no other number."""
    import json

    import pandas as pd
    from repa_probe.report.verdict import interval, sample

    folder = REPO / "reports" / "three_way"
    readme = " ".join((REPO / "README.md").read_text().split())
    para = readme.split("`reports/three_way/` adds iREPA", 1)[1].split("Run the tests", 1)[0]
    summary = json.loads((folder / "summary.json").read_text())
    t, block = min(summary["config"]["ts"]), summary["aligned_blocks"]["iREPA"]
    rows = pd.read_csv(folder / "irepa_vs_repa.csv")
    at = {m: rows[(rows["metric"] == m) & (rows["t"] == t)].iloc[0] for m in ("lds", "cknna")}
    lds, cknna = (interval(m, r["aligned_delta"], r["aligned_ci_low"], r["aligned_ci_high"]) for m, r in at.items())
    where = sample("cknna", at["cknna"]["n"], at["cknna"]["k"])
    said = (f"at the aligned block {block}, iREPA − REPA is {lds} in spatial structure (LDS, t = {t:g}) and {cknna} "
            f"in pooled CKNNA ({where})")
    assert said in para, said
    assert at["lds"]["aligned_block"] == at["cknna"]["aligned_block"] == block
    numbers = set(re.findall(NUMBER, para))
    assert numbers <= set(re.findall(NUMBER, said)) | {"0"}    # "seed-0"


def test_the_probe_intervals_report_quotes_its_json():
    """reports/probe_intervals/README.md's drops and intervals are those of its probe_intervals.json, whose new
    intervals overlap across the two probe sizes (issue 24's check) and whose λ flips stay inside every interval."""
    import json

    import numpy as np

    folder = REPO / "reports" / "probe_intervals"
    text, runs = (folder / "README.md").read_text(), json.loads((folder / "probe_intervals.json").read_text())["sizes"]

    def points(x: float) -> str:
        return f"{100 * x:.1f}".replace("-", "−")

    for size in ("3000", "10000"):
        for how in ("new", "old"):
            r = runs[size][how]
            drop, (lo, hi) = r["drop"][0], r["drop_ci"][0]
            assert f"{points(drop)} [{points(lo)}, {points(hi)}]" in text, (size, how)
    (a, b), (c, d) = (runs[size]["new"]["drop_ci"][0] for size in ("3000", "10000"))
    assert a <= d and c <= b
    for size in runs.values():
        flip, half = np.array(size["flip"]), np.array(size["half_width"])
        assert (flip < 2 * half).all()


def test_the_demos_stated_duration_is_the_committed_runs():
    """The demo's duration the README states is the committed run's own total (reports/demo/terminal.txt)."""
    total = int(re.search(r"\[demo\] done in (\d+) s", (REPO / "reports" / "demo" / "terminal.txt").read_text())[1])
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"the committed run took {total:,} s on two CPU cores" in readme
