"""reports/README.md quotes committed files only (issue 24, item 7).

Every number in it is inside a claim rebuilt here from a committed file (the reports' CSV and JSON, the training
presets, benchmarks/RESULTS.md), printed the way the README prints it, or on WORDING, a short list of numbers that
are words (a nominal level, a date, a figure number) with a reason each. The claims about block lists, drops and
intervals are looked up by meaning (which run, metric, t) and their verdicts checked where the README states one.
A number typed by hand that no claim rebuilds fails `test_every_number_in_reports_readme_is_traced`.
"""
from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_EVEN, Decimal
from functools import cache

import pandas as pd
from conftest import REPO

REPORTS = REPO / "reports"
MINUS = "\u2212"
NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:e-\d+)?(?!\w)")
T_MENTION = re.compile(r"\bt (?:=|≥) (\d+(?:\.\d+)?(?: / \d+(?:\.\d+)?)*)")
WORDING = {  # numbers that are words, not results
    r"95%": "the nominal level of every interval the library prints",
    r"excludes 0": "no difference, what an interval is tested against",
    r"CIFAR-10": "the data set's name",
    r"2\.5% / 97\.5%": "the two tails of a 95% interval (how the old intervals were made)",
    r"2026-11-30": "the date of the change the sentence describes",
    r"issue 24": "the issue that changed the statistics",
    r"[Pp]ages?[- ]1": "the report's first page",
    r"top-1": "the probe's metric, top-1 accuracy",
    r"SiT-XL/2": "the paper's model (patch 2 is part of its name)",
    r"Fig\. 2": "the figure of REPA's paper that is cited",
    r"1/n": "the variance law of a mean, notation",
    r"OMP_NUM_THREADS=1": "the environment setting a run was made with (one thread)",
    r"--nproc_per_node=2 analyses/seed_report\.py -- --seeds 0,1,2": "the command seeds/ was made with (its README "
                                                                      "records it, tests/test_report_readmes.py)",
    r"seed-0": "the training seed a pair of checkpoints is named by",
    r"of seed 0": "the training seed a run is named by",
}


def flat(text: str) -> str:
    """Whitespace collapsed, so a claim matches across the README's line breaks."""
    return re.sub(r"\s+", " ", text)


def readme() -> str:
    return flat((REPORTS / "README.md").read_text())


def fixed(x: float, places: int, scale: int = 1) -> str:
    """x as the README prints it: the decimal it reads as, rounded half to even, thousands separated, U+2212."""
    d = (Decimal(repr(float(x))) * scale).quantize(Decimal(1).scaleb(-places), ROUND_HALF_EVEN)
    return f"{d:,}".replace("-", MINUS)


def signed(x: float, places: int, scale: int = 1) -> str:
    s = fixed(x, places, scale)
    return s if s.startswith(MINUS) else "+" + s


def pct(x: float, places: int = 1) -> str:
    return fixed(x, places, 100) + "%"


def ci(x: float, lo: float, hi: float, places: int, scale: int = 1, sign: bool = False) -> str:
    head = signed(x, places, scale) if sign else fixed(x, places, scale)
    return f"{head} [{fixed(lo, places, scale)}, {fixed(hi, places, scale)}]"


def blocks(bs) -> str:
    """[1, 4, 5, 6, 19, 20] → "1, 4–6, 19–20", the README's block lists."""
    runs: list[list[int]] = []
    for b in sorted(bs):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def g(x: float) -> str:
    """A setting as typed (0.5, 0.999, 3e-4)."""
    return re.sub(r"e-0*", "e-", f"{x:.0e}") if 0 < abs(x) < 1e-3 else f"{x:g}"


@cache
def summary(folder: str) -> dict:
    return json.loads((REPORTS / folder / "summary.json").read_text())


@cache
def table(path: str) -> pd.DataFrame:
    df = pd.read_csv(REPORTS / path)
    for col in ("b_better_blocks", "b_worse_blocks", "b_better_blocks_pointwise", "b_worse_blocks_pointwise"):
        if col in df:
            df[col] = df[col].map(json.loads)
    return df


def row(df: pd.DataFrame, **where) -> pd.Series:
    hit = df
    for k, v in where.items():
        hit = hit[hit[k] == v]
    assert len(hit) == 1, (where, len(hit))
    return hit.iloc[0]


def drop(p: dict, places: int, scale: int = 1) -> str:
    return ci(p["drop_after"], p["drop_ci_low"], p["drop_ci_high"], places, scale)


def aligned(r: pd.Series, places: int, scale: int = 1) -> str:
    return ci(r["aligned_delta"], r["aligned_ci_low"], r["aligned_ci_high"], places, scale, sign=True)


def source(path: str) -> str:
    return flat((REPO / path).read_text())


def setting(path: str, pattern: str) -> str:
    """One value out of a committed script, e.g. the deep preset's width."""
    m = re.search(pattern, source(path))
    assert m, (path, pattern)
    return m.group(1)


def demo_claims() -> list[str]:
    s, res = summary("demo"), table("demo/results.csv")
    cfg, args = s["config"], s["checkpoints"]["repa"]["args"]
    depth = int(res["block"].max())
    demo = lambda key: setting("repa_probe/demo.py", key + r": int = (\d+)")
    assert int(demo("depth")) == depth and int(demo("steps")) == args["step"]
    block = s["aligned_blocks"]["repa"]
    cmp = table("demo/compare.csv")
    c, p = row(cmp, metric="cknna", t=0.0), row(cmp, metric="probe_top1", t=0.0)
    assert c["b_better_blocks"] == c["b_worse_blocks"] == [] == p["b_worse_blocks"]
    fell = [q for q in s["peaks"] if q["peaks_then_drops"]]
    assert len(fell) == 1 and fell[0]["t"] > 0 and fell[0]["metric"] == "probe_top1"
    halves = {q["n_select"] for q in s["peaks"] if q["metric"] == "cknna"}
    at0 = res[(res.t == 0.0) & (res.metric == "cknna")]
    thumb, best = float(row(at0, kind="raw-thumbnail")["value"]), at0[at0.kind == "model"]["value"].max()
    assert thumb > best
    terminal = (REPORTS / "demo" / "terminal.txt").read_text()
    took = {k: int(re.search(rf"\[demo\] {k}:? (?:in )?(\d+) s", terminal)[1]) for k in ("vanilla", "repa", "done")}
    better = f"at blocks {blocks(p['b_better_blocks'])}" if p["b_better_blocks"] else "at no block"
    return [f"the analyses took {fixed(s['timings_s']['total'], 0)} s (its own pair) and "
            f"{fixed(summary('demo/shipped')['timings_s']['total'], 0)} s (the shipped pair)",
            f"training {took['vanilla']} s and {took['repa']} s, {fixed(took['done'], 0)} s in all",
            f"{depth}-block width-{demo('width')} patch-{args['model_name'].rsplit('/', 1)[1]} SiTs, "
            f"{args['step']} steps × {demo('batch')} images each, REPA λ = {g(args['repa_coeff'])} at block {block}",
            f"{cfg['n']} test images for CKNNA, probes on {cfg['probe_n_train']} train images",
            f"CKNNA at block {block} is {aligned(c, 3)} (paired)",
            f"the probe is better {better} (largest difference {signed(p['max_delta'], 1, 100)} points, at "
            f"block {p['max_delta_block']})", f"No curve peaks then drops at t = 0 ({depth} blocks, "
            f"{halves.pop()}-image halves); one of the {len(s['peaks'])} curves over the {len(cfg['ts'])} t does: "
            f"{fell[0]['checkpoint']}'s probe at t = {g(fell[0]['t'])}, by {drop(fell[0], 1, 100)} points from block "
            f"{fell[0]['selected_block']}",
            f"CKNNA ({fixed(thumb, 3)}) beats every block ({fixed(best, 4)})"] + shipped_claims()


def shipped_claims() -> list[str]:
    """demo/shipped: the package's copy of the seed-0 deep pair (its hashes those of SHA256SUMS), at t = 0."""
    s, folder = summary("demo/shipped"), REPORTS / "weights" / "cifar_deep"
    trained = json.loads((folder / "repa-s0.config.json").read_text())
    sums = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert all(s["checkpoints"][n]["sha256"] == sums[f"{n}-s0.safetensors"] for n in ("vanilla", "repa"))
    cfg, block = s["config"], s["aligned_blocks"]["repa"]
    assert cfg["ts"] == [0.0] and not cfg["baselines"] and block == trained["repa_depth"]
    cmp, d = table("demo/shipped/compare.csv"), table("demo/shipped/deltas.csv")
    c, p = row(cmp, metric="cknna", t=0.0), row(cmp, metric="probe_top1", t=0.0)

    def listed(r: pd.Series) -> tuple[str, str]:
        """The band's blocks and the pointwise ones, each checked against the deltas file."""
        cell = d[(d.metric == r["metric"]) & (d.t == r["t"]) & (d.block >= 1)]
        assert r["b_better_blocks"] == sorted(cell.loc[cell.sim_low > 0, "block"]) and r["b_worse_blocks"] == []
        assert r["b_better_blocks_pointwise"] == sorted(cell.loc[cell.ci_low > 0, "block"])
        band = f"blocks {blocks(r['b_better_blocks'])}" if r["b_better_blocks"] else "no block"
        return band, blocks(r["b_better_blocks_pointwise"])

    (cb, cp), (pb, pp) = listed(c), listed(p)
    falls = {(q["checkpoint"], q["metric"]): q for q in s["peaks"] if q["t"] == 0}
    yes = [falls[k] for k in (("vanilla", "probe_top1"), ("repa", "cknna"))]
    no = [falls[k] for k in (("vanilla", "cknna"), ("repa", "probe_top1"))]
    assert all(q["peaks_then_drops"] for q in yes) and not any(q["peaks_then_drops"] for q in no)
    halves = {(q["n_select"], q["n_measure"], q["last_block"]) for q in falls.values()}
    (select, measure, last), = halves
    return [f"{trained['depth']}-block width-{trained['width']} patch-{trained['model'].rsplit('/', 1)[1]} SiTs, "
            f"{fixed(trained['steps'], 0)} steps × {trained['batch']} images each, REPA λ = "
            f"{g(trained['repa_coeff'])} at block {trained['repa_depth']}",
            f"at t = 0 on {fixed(cfg['n'], 0)} test images for CKNNA (k = {cfg['k']}), probes fitted on "
            f"{fixed(cfg['probe_n_train'], 0)} train images and scored on the {fixed(cfg['probe_n_test'], 0)} test",
            f"CKNNA at block {block} is {aligned(c, 3)} (paired); REPA is better at {cb} under the simultaneous "
            f"band ({cp} block by block)", f"in the probe it is better at {pb} under the band ({pp} block by block)",
            f"the peak chosen on {fixed(select, 0)} images and the drop to block {last} measured on the other "
            f"{fixed(measure, 0)}",
            f"vanilla's probe falls from block {yes[0]['selected_block']} by {drop(yes[0], 1, 100)} points and "
            f"REPA's CKNNA from block {yes[1]['selected_block']} by {drop(yes[1], 3)}",
            f"vanilla's CKNNA ({drop(no[0], 3)}) and REPA's probe ({drop(no[1], 1, 100)} points) do not fall"]


def coverage_claims() -> list[str]:
    j = json.loads((REPORTS / "coverage" / "coverage.json").read_text())
    st, cov = j["settings"], j["pointwise coverage (nominal 0.95)"]
    false = j["seeds with a false better or worse anywhere (nominal ≤ 0.05)"]
    width = j["interval width"]["sd at n from the replicates / sd over seeds"]
    band = j["the band alone, Gaussian replicates"]
    cells = band["family-wise coverage (nominal ≥ 0.95)"].values()
    bonf = [c["simultaneous (Bonferroni)"]["rate"] for c in cells]
    maxt = [c["max-|t| from the replicates"]["rate"] for c in cells]
    deep = summary("seeds")["config"]
    depth, n_t = int(table("seeds/results.csv")["block"].max()), len(deep["ts"])
    assert band["cells"] == depth * n_t and false["simultaneous"]["rate"] == 0
    seeds = {c[k]["of"] for c in cells for k in c}
    assert len(seeds) == 1
    sizes = json.loads((REPORTS / "probe_intervals" / "probe_intervals.json").read_text())["sizes"]
    blocks_pi = len(sizes[max(sizes, key=int)]["new"]["value"][0]) - 1
    return [f"n = {fixed(st['n'], 0)} images with k = {st['k']} (k/n = {g(st['k'] / st['n'])}, as {deep['k']} of "
            f"{fixed(deep['n'], 0)})", f"(CKNNA {fixed(st['cknna'][0], 3)}–{fixed(st['cknna'][1], 3)})",
            f"the default {st['bootstrap']} subsample replicates", f"at {st['blocks']} blocks × {st['ts']} t, "
            f"{st['seeds']} seeds", f"quantiles, block by block (before issue 24) | "
            f"{pct(cov['value']['percentile']['rate'])} / {pct(cov['difference']['percentile']['rate'])} | "
            f"{pct(false['pointwise percentile']['rate'])} |",
            f"(`ci_low`, `ci_high`) | {pct(cov['value']['normal']['rate'])} / "
            f"{pct(cov['difference']['normal']['rate'])} | {pct(false['pointwise']['rate'])} |",
            f"the lists the reports print) | | {pct(false['simultaneous']['rate'], 0)} |",
            f"(an oracle) | | {pct(false['pointwise, at the true width']['rate'])} block by block, "
            f"{pct(false['simultaneous, at the true width']['rate'])} band |",
            f"sd is {fixed(width['value']['median'], 2)}× (values) and {fixed(width['difference']['median'], 2)}× "
            f"(B − A)",
            f"n^{MINUS}{fixed(j['interval width']['why (m = 3158)']['exponent a'], 2)}",
            f"in {fixed(min(bonf), 1, 100)}–{pct(max(bonf))} of {fixed(seeds.pop(), 0)} seeds",
            f"calibrated on the {band['bootstrap']} replicates themselves in only {fixed(min(maxt), 0, 100)}–"
            f"{pct(max(maxt), 0)}",
            f"One {blocks_pi}-block SiT's probe"]


def setup_claims() -> list[str]:
    """The paragraphs that quote benchmarks/RESULTS.md and the scripts of the runs not yet made."""
    results = source("benchmarks/RESULTS.md")
    cpu = re.search(r"\*\*(\d+) cores of an AMD EPYC \(Zen 4, no GPU\), (\d+) GiB, torch ([\d.]+) CPU\*\*", results)
    gpu = source("analyses/gpu_reproduce.sh")
    model = re.search(r"a (\d+)-block, width-(\d+) SiT/(\d+) .*?= (\d+) tokens", gpu)
    images = setting("analyses/gpu_reproduce.sh", r"the compare report on ([\d,]+) test images")
    minutes = setting("analyses/gpu_reproduce.sh", r"in calls of ≤ (\d+) minutes")
    pair = f"a {model[1]}-block, width-{model[2]} SiT/{model[3]} pair"
    cpu_preset = setting("analyses/cifar_runs.py", r'"cpu": dict\([^)]*\bdepth=(\d+)')
    over = setting("analyses/alignment_over_training.py", r"set_defaults\([^)]*\bn=(\d+)")
    return [f"{cpu[1]} cores of an AMD EPYC, {cpu[2]} GiB, no GPU, torch {cpu[3]}",
            f"{pair}, chained device calls of ≤ {minutes} minutes",
            f"{pair} on {model[4]} tokens, {images} analysis images",
            f"both runs on {fixed(int(over), 0)} images", f"The {cpu_preset}-block reports of earlier sessions"]


def retired_claims() -> list[str]:
    """What the README says of the retired depth/ and of the seed report that replaced it."""
    seeds = summary("seeds")["config"]
    depth, n_t = int(table("seeds/results.csv")["block"].max()), len(seeds["ts"])
    return [f"one training seed's {depth}-block pair", f"at the reports' {depth} blocks × {n_t} t"]


def claims() -> list[str]:
    return retired_claims() + demo_claims() + coverage_claims() + setup_claims()


def test_every_claim_of_reports_readme_is_rebuilt_from_its_file():
    text = readme()
    missing = [c for c in claims() if flat(c) not in text]
    assert not missing, "reports/README.md does not say, as the files do:\n" + "\n".join(missing)


def test_the_reports_lists_are_the_bands_and_the_pointwise_lists_stay_beside_them():
    """A block is in b_better_blocks / b_worse_blocks when the simultaneous band over blocks × t excludes 0
    (sim_low, sim_high of the deltas file), and in b_*_blocks_pointwise when its own paired interval does."""
    for folder, compare, deltas in (("demo", "compare", "deltas"), ("demo/shipped", "compare", "deltas"),
                                    ("seeds", "compare", "deltas"), ("three_way", "compare", "deltas"),
                                    ("three_way", "irepa_vs_repa", "irepa_vs_repa_deltas")):
        d = table(f"{folder}/{deltas}.csv")
        for r in table(f"{folder}/{compare}.csv").itertuples():
            cell = d[(d.a == r.a) & (d.b == r.b) & (d.metric == r.metric) & (d.t == r.t) & (d.block >= 1)]
            where = (folder, r.b, r.metric, r.t)
            assert r.b_better_blocks == sorted(cell.loc[cell.sim_low > 0, "block"]), where
            assert r.b_worse_blocks == sorted(cell.loc[cell.sim_high < 0, "block"]), where
            assert r.b_better_blocks_pointwise == sorted(cell.loc[cell.ci_low > 0, "block"]), where
            assert r.b_worse_blocks_pointwise == sorted(cell.loc[cell.ci_high < 0, "block"]), where


def test_every_number_in_reports_readme_is_traced():
    """Each number lies inside a rebuilt claim, a wording number or a t the reports were run at."""
    text = readme()
    covered = [False] * len(text)

    def cover(start: int, end: int) -> None:
        covered[start:end] = [True] * (end - start)

    for c in [flat(c) for c in claims()] + [m.group(0) for p in WORDING for m in re.finditer(p, text)]:
        for m in re.finditer(re.escape(c), text):
            cover(*m.span())
    ts = {g(t) for t in summary("seeds")["config"]["ts"]}
    for m in T_MENTION.finditer(text):
        if set(m.group(1).split(" / ")) <= ts:
            cover(*m.span())
    stray = [f"{m.group(0)!r} in …{text[max(0, m.start() - 50):m.end() + 30]}…"
             for m in NUMBER.finditer(text) if not all(covered[m.start():m.end()])]
    assert not stray, "numbers in reports/README.md that no committed file supports:\n" + "\n".join(stray)
