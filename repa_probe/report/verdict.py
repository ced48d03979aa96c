"""Page 1's verdict in at most three short sentences, and page 2's details, in plain words.

  1. where the page-1 curves peak, and which fall after their peak (held-out, paired 95%), with their drops
     where the sentence has room;
  2. B − A at the aligned block, and at which blocks B is better or worse (a comparison only: the simultaneous
     band over blocks × t, so that a false "better" anywhere is rare);
  3. what the baselines and the permutation null say: whether the best block beats each baseline (held out:
     the block chosen on half the images, best − baseline measured on the other half, findings/baselines.py).
A trajectory's lines say, per run and block group, how the values moved from the first training step to the last
(findings/trends.py): "rises" or "falls" only when the change's paired interval excludes 0.
When the report holds several training seeds of a recipe (findings/seeds.py), sentences 1 and 2 speak of the
recipe: the mean over seeds with its t-interval, and how many seeds agree.
A measure that depends on the number of images (CKNNA and the other alignment metrics) has its n and k beside
its values: the held-out drop and best − baseline are measured on half the images, so their n is not the
curve's.

Every number is printed at one precision per measure, a value and its interval alike: probe accuracies in
points with one decimal, every other measure with three decimals. A difference is called better, worse or a
fall only when its paired 95% interval excludes 0. A sentence keeps at most LIMIT characters: a clause that
does not fit in any of its wordings is left to page 2, and the sentence says so.
"""
from __future__ import annotations

import pandas as pd

from repa_probe import stats
from repa_probe.findings.summary import block_ranges
from repa_probe.pipeline import BASELINES, PROJECTOR_COSINE, depends_on_n, display_scale, metric_label
from repa_probe.spatial import SPATIAL_METRICS
from repa_probe.stats import fmt_interval

LIMIT = 160                 # characters per page-1 sentence: two lines of page 1, one terminal line or two
MORE = " (more on page 2)"
BASELINE_NAMES = {"untrained": "untrained model", "raw-input": "raw input", "raw-thumbnail": "raw thumbnail",
                  "encoder": "encoder's tokens"}


def number(metric: str, v: float, signed: bool = False) -> str:
    """v at its measure's precision ('32.8' for a probe accuracy, '0.053' otherwise), with a true minus sign."""
    digits = 1 if display_scale(metric) == 100 else 3
    x = round(v * display_scale(metric), digits) + 0.0       # + 0.0 turns -0.0 into 0.0
    return f"{x:{'+' if signed else ''}.{digits}f}".replace("-", "−")


def level(metric: str, v: float) -> str:
    """A value of the measure itself: '32.8%' for a probe accuracy, '0.053' otherwise."""
    return number(metric, v) + ("%" if display_scale(metric) == 100 else "")


def _unit(metric: str) -> str:
    return " points" if display_scale(metric) == 100 else ""


def interval(metric: str, v: float, lo: float, hi: float, signed: bool = True) -> str:
    """A difference with its interval at one precision: '−0.002 [−0.009, 0.004]', '+3.8 [0.9, 6.6] points'."""
    return f"{number(metric, v, signed)} [{number(metric, lo)}, {number(metric, hi)}]{_unit(metric)}"


def sample(metric: str, n, k) -> str:
    """'n = 10,000, k = 10' for a measure whose value depends on them (pipeline.depends_on_n), '' otherwise."""
    if not depends_on_n(metric) or pd.isna(n):
        return ""
    return f"n = {int(n):,}" + ("" if pd.isna(k) else f", k = {int(k)}")


def paren(*parts: str) -> str:
    """' (a; b)' of the parts that are not empty, '' if none is."""
    parts = [p for p in parts if p]
    return f" ({'; '.join(parts)})" if parts else ""


def at_blocks(blocks) -> str:
    """'at block 3', 'at blocks 1–4, 15', 'at no block'."""
    blocks = [int(b) for b in blocks]
    return f"at block{'s' if len(blocks) > 1 else ''} {block_ranges(blocks)}" if blocks else "at no block"


def fit(head: str, clauses: list[tuple[str, ...]]) -> str:
    """head + clauses joined by '; ' in at most LIMIT characters: each clause in the longest of its wordings
    (longest first) that leaves room for the rest in their shortest; if even those do not fit, as many
    clauses as fit, and the sentence says the rest is on page 2."""
    def length(parts: list[str], tail: str = "") -> int:
        return len(head + "; ".join(parts) + tail + ".")

    kept = []
    if length([c[-1] for c in clauses]) <= LIMIT:
        for i, wordings in enumerate(clauses):
            rest = [c[-1] for c in clauses[i + 1:]]
            kept.append(next(w for w in wordings if length(kept + [w] + rest) <= LIMIT))
        return head + "; ".join(kept) + "."
    for wordings in clauses:
        kept += [w for w in wordings if length(kept + [w], MORE) <= LIMIT][:1]
    return head + "; ".join(kept or [clauses[0][-1]]) + MORE + "."     # over LIMIT only if one clause is


def what(metric: str, encoder: str, with_encoder: bool = True) -> str:
    """A measure in a sentence: 'CKNNA vs dinov2-vit-b', 'linear probe top-1'."""
    return metric_label(metric).removesuffix(" (%)") + (f" vs {encoder}" if encoder and with_encoder else "")


def _names(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """How page 1 names each (metric, encoder): briefly ('probe top-1': the panel's title says 'linear'), with
    the encoder only when page 1 shows several."""
    several = len({e for _, e in pairs if e}) > 1
    return {(m, e): what(m, e, several).removeprefix("linear ") for m, e in pairs}


def _shown(df: pd.DataFrame, name: dict, t: float) -> pd.DataFrame:
    """df's rows at t for the measures page 1 shows."""
    shown = pd.Series([p in name for p in zip(df["metric"], df["encoder"])], index=df.index, dtype=bool)
    return df[(df["t"] == t) & shown]


def _peak_blocks(blocks) -> str:
    """'block 4', 'blocks 5 and 6', 'blocks 8, 17 and 26'."""
    b = [str(x) for x in sorted(set(int(x) for x in blocks))]
    return f"block {b[0]}" if len(b) == 1 else f"blocks {', '.join(b[:-1])} and {b[-1]}"


def _aligned(r) -> str:
    """A compare row's B − A at the aligned block, with its interval."""
    return interval(r.metric, r.aligned_delta, r.aligned_ci_low, r.aligned_ci_high)


def _above_null(best: pd.DataFrame) -> str:
    """'5–6 of 6': how many blocks ≥ 1 of each checkpoint clear the permutation null ('' without a null)."""
    lo, hi, of = best["blocks_above_null"].min(), best["blocks_above_null"].max(), best["blocks_with_null"].max()
    return f"{lo}{f'–{hi}' if hi != lo else ''} of {of}" if of else ""


def peak_sentence(peaks: pd.DataFrame, pairs: list[tuple[str, str]], t: float) -> str:
    """Whether any page-1 curve falls after its peak, and where each measure peaks (over the checkpoints)."""
    name = _names(pairs)
    at = _shown(peaks, name, t)
    if not len(at):
        return f"At t = {t:g}, no measure has a curve over blocks."
    single = at["checkpoint"].nunique() == 1
    fell = list(at[at["peaks_then_drops"].astype(bool)].itertuples())
    curves = [("" if single else f"{r.checkpoint}'s ") + name[(r.metric, r.encoder)] for r in fell]
    falls = [f"{'its ' if single else ''}{c} falls "
             f"{interval(r.metric, r.drop_after, r.drop_ci_low, r.drop_ci_high, signed=False)}"
             f"{paren(sample(r.metric, r.n_measure, r.k))}" for c, r in zip(curves, fell)]
    one = len(fell) == 1
    drop = ("after the peak " + ", ".join(falls),
            f"{_and(curves)} {'falls' if one else 'fall'} significantly after {'its peak' if one else 'their peaks'}",
            f"{len(falls)} of {len(at)} curves fall significantly after their peak") if falls else \
        ("no curve falls significantly after its peak",)
    where = [f"{name[p]}{' peaks' if i == 0 else ''} at {_peak_blocks(g['best_block'])}" +
             (paren(level(p[0], g['best_value'].iloc[0]), sample(p[0], g['n'].iloc[0], g['k'].iloc[0])) if single
              else "")
             for i, (p, g) in enumerate(at.groupby(["metric", "encoder"], sort=False))]
    return fit(f"At t = {t:g}, ", [drop, (", ".join(where),)])


def compare_sentence(comp: pd.DataFrame, pairs: list[tuple[str, str]], t: float) -> str:
    """B − A at the aligned block for each page-1 measure, then where B is better or worse, block by block."""
    name = _names(pairs)
    at = _shown(comp, name, t)
    if not len(at):
        return f"At t = {t:g}, no measure on page 1 was compared."
    aligned = set(at.loc[at["aligned_delta"].notna(), "aligned_block"])
    one_block = len(aligned) == 1           # REPA's aligned block, the same for every pair
    head = f"At the aligned block {aligned.pop()}, " if one_block else "Block by block, "
    clauses = []
    for (a, b), g in at.groupby(["a", "b"], sort=False):
        deltas = [f"{name[(r.metric, r.encoder)]} {_aligned(r)}{paren(sample(r.metric, r.n, r.k))}"
                  for r in g.itertuples() if r.aligned_delta == r.aligned_delta]
        if one_block and deltas:    # every page-1 measure, else the first (the alignment), else with names cut
            clauses.append((f"{b} − {a}: " + ", ".join(deltas), f"{b} − {a}: {deltas[0]}",
                            f"{_cut(b)} − {_cut(a)}: {deltas[0]}"))
        hits = [(side, name[(r.metric, r.encoder)], list(blocks)) for side in ("better", "worse")
                for r in g.itertuples() if len(blocks := getattr(r, f"b_{side}_blocks"))]
        lists = f"{b} is " + ", ".join(f"{side} {at_blocks(bl)} in {m}" for side, m, bl in hits)
        clauses.append((lists + " (jointly over blocks × t)", lists,
                        f"{b} is " + ", ".join(f"{side} at {len(bl)} block{'s' * (len(bl) > 1)} in {m}"
                                               for side, m, bl in hits))
                       if hits else (f"no block of {b} differs significantly from {a}",
                                     f"no block of {_cut(b)} differs significantly from {_cut(a)}"))
    return fit(head, clauses)


def _cut(name: str, width: int = 16) -> str:
    """A checkpoint's name shortened to `width` characters ('…' marks the cut) where a long one would push a
    sentence past LIMIT; page 2 and the files keep the whole name."""
    return name if len(name) <= width else name[:width - 1] + "…"


def _and(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _point_clause(best: pd.DataFrame, base: pd.DataFrame, metric: str) -> str:
    """Without held-out values (no bootstrap, or an older summary): the baselines at or above every block, as
    values only: a maximum over blocks compared with a value is no test (findings/baselines.py)."""
    high = base.groupby("kind", sort=False)["value"].max()
    over = [f"the {BASELINE_NAMES.get(k, k)} ({level(metric, v)})" for k, v in high.items()
            if v >= best["best_value"].max()]
    return _and(over) + f" {'are' if len(over) > 1 else 'is'} at or above every block (no interval)" if over \
        else "the best block is above every baseline (no interval)"


def _gap_clauses(g: pd.DataFrame, metric: str) -> tuple[str, str]:
    """(detailed, short) wording of whether the best block beats each baseline kind (rows of baseline_gaps at one t
    for one measure): beats, is level with or is below it in every checkpoint, else beats it in k of n."""
    n, kinds = g["checkpoint"].nunique(), dict(tuple(g.groupby("kind", sort=False)))
    side = {k: int(h["verdict"].iloc[0]) if h["verdict"].nunique() == 1 else None for k, h in kinds.items()}

    def named(k: str, detailed: bool) -> str:
        h = kinds[k].iloc[0]
        gap = f" ({interval(metric, h.gap, h.ci_low, h.ci_high)})" if detailed and n == 1 else ""
        return f"the {BASELINE_NAMES.get(k, k)}{gap}"

    def said(detailed: bool) -> str:
        parts = [f"{verb} {_and([named(k, detailed) for k in kinds if side[k] == s])}"
                 for s, verb in ((1, "beats"), (0, "is level with"), (-1, "is below")) if s in side.values()]
        parts += [f"beats {named(k, False)} in {(h['verdict'] > 0).sum()} of {n} checkpoints"
                  if (h["verdict"] > 0).any() else f"is below {named(k, False)} in {(h['verdict'] < 0).sum()} of {n} "
                  f"checkpoints" for k, h in kinds.items() if side[k] is None]
        return ("the best block " if n == 1 else "each checkpoint's best block ") + ", ".join(parts)
    return said(True), said(False)


def baseline_sentence(peaks: pd.DataFrame, table: pd.DataFrame, pairs: list[tuple[str, str]], t: float,
                      gaps: pd.DataFrame | None = None) -> str:
    """For each page-1 measure: whether the best block beats each baseline (held out, paired; `gaps`:
    findings.baselines.baseline_gaps, else values only), and the blocks above the null."""
    name, clauses = _names(pairs), []
    for metric, encoder in pairs:
        best = peaks[(peaks["t"] == t) & (peaks["metric"] == metric) & (peaks["encoder"] == encoder)]
        base = table[(table["t"] == t) & table["kind"].isin(BASELINES) & (table["metric"] == metric) &
                     (table["encoder"] == encoder)]
        g = gaps[(gaps["t"] == t) & (gaps["metric"] == metric) & (gaps["encoder"] == encoder)] \
            if gaps is not None and len(gaps) else []
        if not len(best) or not len(base):
            continue
        said = _gap_clauses(g, metric) if len(g) else (_point_clause(best, base, metric),) * 2
        null = f", and {_above_null(best)} blocks clear the permutation null" if _above_null(best) else ""
        values_n = g["n_measure"].iloc[0] if len(g) else best["n"].iloc[0]     # held out: half B; else all images
        at = paren(sample(metric, values_n, best["k"].iloc[0]))
        m = f"in {name[(metric, encoder)]}"
        tagged = m + (at if not len(g) or g["checkpoint"].nunique() == 1 else "")    # where values are printed
        plain = m + ("" if len(g) else at)
        clauses.append((f"{tagged} {said[0]}{null}", f"{plain} {said[1]}{null}", f"{plain} {said[1]}"))
    if not clauses:
        return f"At t = {t:g}, no baseline was measured."
    text = fit("", clauses)
    return text[0].upper() + text[1:]


def _seed_rows(seeds: pd.DataFrame | None, quantity: str, name: dict, t: float) -> pd.DataFrame:
    """The seed-level ('mean') rows of seeds.csv for one quantity, at t, for the measures page 1 shows."""
    if seeds is None or not len(seeds):
        return pd.DataFrame()
    return _shown(seeds[(seeds["quantity"] == quantity) & (seeds["seed"] == "mean")], name, t)


def _over(rows: pd.DataFrame, what: str) -> str:
    """'3 seeds', '3–5 seed pairs'."""
    lo, hi = rows["n_seeds"].min(), rows["n_seeds"].max()
    return f"{lo}{f'–{hi}' if hi != lo else ''} {what}"


def seed_peak_sentence(seeds: pd.DataFrame, pairs: list[tuple[str, str]], t: float) -> str | None:
    """Which recipes' page-1 curves peak, then drop, at the seed level (the mean held-out drop over seeds, its
    t-interval above 0), with in how many seeds each drops; the others in one clause (None: no seed groups)."""
    name = _names(pairs)
    at = _seed_rows(seeds, "drop", name, t)
    if not len(at):
        return None
    clauses = []
    for r in at[at["verdict"] > 0].itertuples():
        who, k = f"{r.recipe}'s {name[(r.metric, r.encoder)]}", f"{r.seeds_positive} of {r.n_seeds} seeds"
        drop = interval(r.metric, r.value, r.ci_low, r.ci_high, signed=False)
        clauses.append((f"{who} peaks, then drops {drop} (drops in {k})", f"{who} peaks, then drops (in {k})"))
    rest = at[at["verdict"] <= 0]
    if len(rest):
        lo, hi = rest["seeds_positive"].min(), rest["seeds_positive"].max()
        each = f"{lo}{f'–{hi}' if hi != lo else ''} of {rest['n_seeds'].max()} seeds drop"
        others = "the other curve does not" if len(rest) == 1 else f"the other {len(rest)} curves do not"
        clauses.append((f"{others} ({each})", others) if clauses else
                       (f"no curve drops after its peak at the seed level ({each})",
                        "no curve drops after its peak at the seed level"))
    return fit(f"At t = {t:g}, over {_over(at, 'seeds')}, ", clauses)


def seed_compare_sentence(seeds: pd.DataFrame, pairs: list[tuple[str, str]], t: float) -> str | None:
    """B − A at the aligned block over seed pairs (A-sK, B-sK): the mean with its t-interval, how many seeds are
    above 0, and "B better" only where the seed-level interval is above 0 (None: no paired seed groups)."""
    name = _names(pairs)
    at = _seed_rows(seeds, "delta", name, t)
    if not len(at):
        return None
    blocks = set(at["block"].dropna())
    head = f"At the aligned block {int(blocks.pop())}, over {_over(at, 'seed pairs')}, " if len(blocks) == 1 else \
        f"At the aligned blocks, over {_over(at, 'seed pairs')}, "
    clauses = []
    for (a, b), g in at.groupby(["reference", "recipe"], sort=False):
        values = [f"{name[(r.metric, r.encoder)]} {interval(r.metric, r.value, r.ci_low, r.ci_high)}"
                  for r in g.itertuples()]
        counts = [f"{v} ({r.seeds_positive} of {r.n_seeds} above 0)" for v, r in zip(values, g.itertuples())]
        sides = [(word, [name[(r.metric, r.encoder)] for r in g.itertuples() if r.verdict == s])
                 for s, word in ((1, "better"), (-1, "worse"))]
        claim = "; ".join(f"{b} {word} in {_and(m)}" for word, m in sides if m) or "no seed-level difference"
        clauses.append((f"{b} − {a}: {', '.join(counts)}; {claim}", f"{b} − {a}: {', '.join(values)}; {claim}",
                        f"{b} − {a}: {claim}"))
    return fit(head, clauses)


def overview_sentences(peaks: pd.DataFrame, comp: pd.DataFrame | None, table: pd.DataFrame,
                       pairs: list[tuple[str, str]], t: float, gaps: pd.DataFrame | None = None,
                       seeds: pd.DataFrame | None = None) -> list[str]:
    """Page 1's verdict on its panels' measures (spatial ones have their own pages) at noise level t; with seed
    groups (`seeds`: seeds.csv) the peak and the comparison at the seed level."""
    pairs = [p for p in pairs if p[0] not in SPATIAL_METRICS]
    out = [seed_peak_sentence(seeds, pairs, t) or peak_sentence(peaks, pairs, t)]
    if comp is not None and len(comp):
        out.append(seed_compare_sentence(seeds, pairs, t) or compare_sentence(comp, pairs, t))
    out.append(baseline_sentence(peaks, table, pairs, t, gaps))
    return out


#################################################################################
#                        Page 2: the details, one line each                     #
#################################################################################

def detail_lines(peaks: pd.DataFrame, comp: pd.DataFrame | None, table: pd.DataFrame, t: float) -> list[str]:
    """Every measure at noise level t: B − A at the aligned block and block by block, the projector's cosine,
    a REG checkpoint's class token, the baselines and the blocks above the permutation null."""
    lines = []
    for r in ([] if comp is None else comp[comp["t"] == t].itertuples()):
        at = "" if r.aligned_delta != r.aligned_delta else f"at the aligned block {r.aligned_block} {_aligned(r)}; "
        lines.append(f"{r.b} − {r.a}, {what(r.metric, r.encoder)}{paren(sample(r.metric, r.n, r.k))}: {at}better "
                     f"{at_blocks(r.b_better_blocks)}, worse {at_blocks(r.b_worse_blocks)} (jointly over blocks × t); "
                     f"largest difference {number(r.metric, r.max_delta, True)}{_unit(r.metric)} at block "
                     f"{r.max_delta_block}")
    for r in table[(table["t"] == t) & (table["metric"] == PROJECTOR_COSINE)].itertuples():
        cosine = interval(r.metric, r.value, r.ci_low, r.ci_high, False) if r.ci_low == r.ci_low else \
            number(r.metric, r.value)
        lines.append(f"{r.checkpoint}: mean cosine to {r.encoder}'s tokens after its own projector at block "
                     f"{r.block} {cosine}")
    lines += class_token_lines(table, t)
    base = table[(table["t"] == t) & table["kind"].isin(BASELINES)]
    for (metric, encoder), g in base.groupby(["metric", "encoder"], sort=False):
        best = peaks[(peaks["t"] == t) & (peaks["metric"] == metric) & (peaks["encoder"] == encoder)]
        values = ", ".join(f"{BASELINE_NAMES.get(kind, kind)} {level(metric, h['value'].max())}"
                           for kind, h in g.groupby("kind", sort=False))
        top = f"; best block {level(metric, best['best_value'].max())}" if len(best) else ""
        null = f"; blocks above the permutation null: {_above_null(best)}" if len(best) and _above_null(best) else ""
        lines.append(f"baselines, {what(metric, encoder)}{paren(sample(metric, g['n'].iloc[0], g['k'].iloc[0]))}: "
                     f"{values}{top}{null}")
    return lines


def class_token_lines(table: pd.DataFrame, t: float) -> list[str]:
    """Each class-token source's measures at noise level t: at its first block, its highest, its last."""
    rows = table[(table["t"] == t) & (table["kind"] == "class-token")]
    if rows.empty:
        return []
    lines = []
    for (name, metric, encoder), g in rows.groupby(["checkpoint", "metric", "encoder"], sort=False):
        g = g.dropna(subset=["value"]).sort_values("block")
        if g.empty:
            continue
        first, top, last = g.iloc[0], g.loc[g["value"].idxmax()], g.iloc[-1]
        lines.append(f"{name}, {what(metric, encoder)}{paren(sample(metric, first.n, first.k))}: block "
                     f"{first.block} {level(metric, first.value)}, highest at block {top.block} "
                     f"{level(metric, top.value)}, last block {last.block} {level(metric, last.value)}")
    return lines


def gap_lines(gaps: pd.DataFrame, t: float) -> list[str]:
    """Each checkpoint's best block − each baseline at noise level t, held out (findings/baselines.py)."""
    lines = []
    for (ckpt, metric, encoder), g in gaps[gaps["t"] == t].groupby(["checkpoint", "metric", "encoder"], sort=False):
        r = g.iloc[0]
        each = "; ".join(f"− {x.baseline}{f' (block {x.baseline_block})' if x.baseline_block >= 0 else ''} "
                         f"{interval(metric, x.gap, x.ci_low, x.ci_high)}" for x in g.itertuples())
        lines.append(f"{ckpt}, {what(metric, encoder)}: best block {r.block} (chosen on {r.n_select} images, "
                     f"measured on {r.n_measure}) {each}")
    return lines


def seed_lines(seeds: pd.DataFrame, t: float) -> list[str]:
    """Per recipe × measure at noise level t: each seed's held-out drop or B − A at the aligned block, and their
    mean with its t-interval over seeds (findings/seeds.py)."""
    lines = []
    for r in seeds[(seeds["t"] == t) & (seeds["seed"] == "mean")].itertuples():
        per = seeds[(seeds["t"] == t) & (seeds["seed"] != "mean") & (seeds["quantity"] == r.quantity) &
                    (seeds["recipe"] == r.recipe) & (seeds["metric"] == r.metric) & (seeds["encoder"] == r.encoder)]
        values = ", ".join(f"s{x.seed} {number(r.metric, x.value, True)}" for x in per.itertuples())
        head = f"{r.recipe}, held-out drop after the peak" if r.quantity == "drop" else \
            f"{r.recipe} − {r.reference} at the aligned block"
        word = "drops" if r.quantity == "drop" else "above 0"
        lines.append(f"seeds, {head}, {what(r.metric, r.encoder)}: {values}; mean "
                     f"{interval(r.metric, r.value, r.ci_low, r.ci_high)} (t-interval, {int(r.n_seeds) - 1} df); "
                     f"{word} in {r.seeds_positive} of {r.n_seeds} seeds")
    return lines


def trend_word(r) -> str:
    """'rises' / 'falls' when the paired interval of the change excludes 0 and the change is beyond the measure's
    resolution (stats.verdict), else 'no change beyond the interval'; without an interval, only which way the
    values moved (a change within the resolution is none)."""
    if r.change_ci_low == r.change_ci_low:
        return {1: "rises", -1: "falls", 0: "no change beyond the interval"}[
            stats.verdict(r.change, r.change_ci_low, r.change_ci_high, r.resolution)]
    moved = r.change if abs(r.change) > r.resolution else 0.0
    return ("higher" if moved > 0 else "lower" if moved < 0 else "unchanged") + " at the last step (values only, " \
                                                                                "no interval)"


def trend_lines(trend: pd.DataFrame) -> list[str]:
    """A trajectory's page-1 lines: each run × measure × block group at the lowest t, first → last step."""
    return [f"{r.run}: {metric_label(r.metric)}{' vs ' + r.encoder if r.encoder else ''}, t={r.t:g}, blocks "
            f"{r.blocks}: {r.first * display_scale(r.metric):.3g} at step {r.first_step:,} → "
            f"{r.last * display_scale(r.metric):.3g} at step {r.last_step:,}"
            + ("" if r.change_ci_low != r.change_ci_low else
               f", change {fmt_interval(r.change, r.change_ci_low, r.change_ci_high, display_scale(r.metric))} "
               f"(paired 95%)") + f" — {trend_word(r)}"
            for r in trend.itertuples() if r.t == trend["t"].min()]


def trend_table(trend: pd.DataFrame) -> pd.DataFrame:
    """A trajectory's summary table: per run, measure, t and block group, first and last step with the change."""
    return pd.DataFrame([{
        "run": r.run, "metric": metric_label(r.metric), "encoder": r.encoder or "-", "t": f"{r.t:g}",
        "blocks": r.blocks, "first step": r.first_step, "first": f"{r.first * display_scale(r.metric):.3g}",
        "last step": r.last_step, "last": f"{r.last * display_scale(r.metric):.3g}",
        "change [paired 95%]": "-" if r.change_ci_low != r.change_ci_low else
        fmt_interval(r.change, r.change_ci_low, r.change_ci_high, display_scale(r.metric)),
        "trend": trend_word(r).split(" (")[0]} for r in trend.itertuples()])


#################################################################################
#              Sample quality beside representation (--gen; issue 27)           #
#################################################################################

def fd_sentence(gen: pd.DataFrame) -> str | None:
    """Each checkpoint's first FD beside its N, and each paired difference with its interval."""
    score = next((s for s in dict.fromkeys(gen["score"]) if s.startswith("FD_") or s in ("FID", "sFID")), None)
    if score is None:
        return None
    rows = gen[gen["score"] == score]
    values = ", ".join(f"{r.checkpoint} {r.value:.4g}" for r in rows.head(6).itertuples())
    more = f" (and {len(rows) - 6} more, gen.csv)" if len(rows) > 6 else ""
    diffs = [f"{r.checkpoint} − {r.against} {r.difference:+.3g}" + ("" if r.ci_low != r.ci_low else
                                                                    f" [{r.ci_low:+.3g}, {r.ci_high:+.3g}]")
             for r in rows[rows["against"].fillna("") != ""].head(3).itertuples()]
    paired = f"; {', '.join(diffs)} (paired 95%, bootstrap over sample indices)" if diffs else ""
    return f"Sample quality ({score}, N = {int(rows['N'].iloc[0]):,} samples each): {values}{more}{paired}."


def reach_lines(reach: pd.DataFrame | None) -> list[str]:
    """Per later run of a trajectory: the step at which it reaches the first run's last FD, with its interval,
    and "in fewer steps" only where the interval ends before the first run's own step."""
    out = []
    for r in ([] if reach is None else reach.itertuples()):
        def step(x: float) -> str:
            return "never" if x == float("inf") else f"{x:,.0f}"
        where = f"at step {step(r.step)} [{step(r.ci_low)}, {step(r.ci_high)}]" if r.n_boot else \
            f"at step {step(r.step)} (no interval: --gen-bootstrap 0)"
        verdict = "in fewer steps" if r.n_boot and r.ci_high < r.step_against else \
            "in more steps" if r.n_boot and r.ci_low > r.step_against else "in no resolved difference of steps"
        ratio = f" ({r.speedup:.2g}× [{r.speedup_low:.2g}, {r.speedup_high:.2g}])" if r.n_boot else ""
        out.append(f"{r.run} reaches {r.against}'s last {r.score} ({r.level:.4g}, N = {int(r.N):,}, first reached "
                   f"by {r.against} at step {step(r.step_against)}) {where}: {verdict}{ratio}; 95% bootstrap over "
                   f"the sample indices both share, not over training seeds.")
    return out


def correlation_sentence(r: pd.Series | None) -> str | None:
    """Page 1's one sentence on "better generation, better representation": claimed (or refuted) only when ρ's
    interval excludes 0; otherwise it says the run does not settle it."""
    if r is None:
        return None
    rho = f"Spearman ρ = {r.rho:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] over {r.points} checkpoints (95% " \
          f"bootstrap over {r.over}; {what(r.metric, r.encoder)} at its peak block, t = {r.t:g}; −{r.score}, " \
          f"N = {int(r.N):,})"
    if r.ci_low > 0:
        return f"Better generation, better representation holds in this run: {rho}."
    if r.ci_high < 0:
        return f"Better generation, better representation does not hold in this run, the order is reversed: {rho}."
    return f"This run does not settle whether better generation goes with better representation: {rho}."


def correlation_lines(corr: pd.DataFrame) -> list[str]:
    """Every measure's rank correlation with sample quality, one line each."""
    return [f"−{r.score} (N = {int(r.N):,}) vs {what(r.metric, r.encoder)} at its peak block, t = {r.t:g}: "
            f"ρ = {r.rho:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] over {r.points} checkpoints ({r.over})"
            for r in corr.itertuples()]
