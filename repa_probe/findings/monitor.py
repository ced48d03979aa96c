"""When the alignment term stops paying (issue 29, item 4; HASTE's early stop): the training step from which REPA's
benefit over vanilla on the same seeds stops improving while REPA's alignment at the aligned block still rises or
holds, with an interval, and the `--align-until` step it recommends (docs/statistics.md, "When alignment stops
paying").

The benefit is a paired difference per logged step, oriented so that higher = REPA better: vanilla − REPA
denoising loss on the same batches (`from_logs`: arms of one seed see the same images, t and noise at every step),
or REPA − vanilla probe accuracy, or vanilla − REPA FD. Over the steps from the benefit's low point on (REPA's
early cost is not a turning point), a continuous two-piece line

    benefit(s) = a + b·s + c·(s − τ)₊          (slope b before the kink τ, b + c after it)

is fitted by least squares at every candidate τ (a logged step with SIDE steps on each side) and the best τ kept.
Its uncertainty comes from an AR(1) sieve bootstrap of the fit's residuals (neighbouring logged values may move
together; the replicates keep the residuals' lag-1 autocorrelation). A kink at all is tested against a straight
line: the sup-F statistic against its replicates under the line (a selected kink always improves the fit, so
the test must account for the search). τ and both slopes get intervals from replicates of the fitted curve (τ's
the percentile interval of the refitted kinks), and a stretch's slope (the benefit's after the kink, REPA's
alignment's) from the same bootstrap of a straight line's residuals there. With several seeds the curves are
averaged step by step, and each seed's own τ is reported with a t-interval over seeds.

"Stops paying at τ" is claimed only when all hold: the kink beats the line (p < 1 − level); the benefit was rising
before it (the slope's interval above 0); τ's interval lies inside the steps that can hold a kink; the benefit
does not still rise after that interval (a line through the steps from its upper end on has a slope whose
interval reaches 0 or below: the two-piece fit's own slope after τ is biased upwards when τ is found early, as
it then takes in part of the rise); and REPA's alignment does not fall from τ on (its slope's interval reaches 0
or above), where an alignment series is given. Otherwise: "no turning point resolved", with the first reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from repa_probe import stats
from repa_probe.errors import UserError
from repa_probe.findings.seeds import t_interval

SIDE = 4                # fewest logged steps on each side of a kink
MIN_STEPS = 3 * SIDE    # logged steps from the benefit's low point on that the fit needs
SMOOTH = 5              # running-median window (logged steps) that finds the benefit's low point
N_BOOT = 999
BURN = 50               # AR(1) replicates start this many values early
PER = 1000              # slopes are printed per 1,000 training steps


@dataclass
class Monitor:
    """The monitor's answer for one REPA run against its vanilla reference (summary.json's "monitor" rows)."""
    benefit: str                          # what the benefit is, higher = REPA better
    claim: bool                           # a turning point is claimed (the module docstring's conditions)
    reason: str                           # why not, when no claim: the first condition that fails
    sentence: str
    n_steps: int                          # logged steps fitted (from `start` on)
    n_seeds: int
    start: int                            # first step fitted: the benefit's low point
    last: int
    step: float = math.nan                # τ: the kink
    ci_low: float = math.nan              # its percentile interval over bootstrap replicates
    ci_high: float = math.nan
    align_until: int | None = None        # τ rounded to the checkpoint spacing, when claimed
    p_kink: float = math.nan              # the kink against a straight line
    slope_before: list[float] = field(default_factory=list)     # [estimate, low, high], per step
    slope_after: list[float] = field(default_factory=list)      # the two-piece fit's, after τ
    slope_later: list[float] = field(default_factory=list)      # a line's from ci_high on: the one the claim reads
    alignment_after: list[float] = field(default_factory=list)  # REPA's alignment slope from τ on
    benefit_start: float = math.nan       # the fitted benefit at `start` and at the last step
    benefit_last: float = math.nan
    seed_steps: list[float] = field(default_factory=list)       # each seed's own τ
    seed_interval: list[float] = field(default_factory=list)    # their mean with the t-interval over seeds
    n_boot: int = 0
    rho: float = math.nan                 # the residuals' lag-1 autocorrelation, which the bootstrap keeps
    level: float = stats.LEVEL

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _hinge(x: np.ndarray, Y: np.ndarray, knots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares y = a + b·x + c·(x − τ)₊ at every knot τ for every column of Y ([n, B]) → (the best
    knot's index, its coefficients [B, 3], its residual sum of squares [B])."""
    X = np.stack(np.broadcast_arrays(1.0, x[None], np.maximum(x[None] - knots[:, None], 0.0)), -1)  # (C, n, 3)
    Xt = X.transpose(0, 2, 1)
    XtY = Xt @ Y                                                                        # (C, 3, B)
    coef = np.linalg.solve(Xt @ X, XtY)                                                 # (C, 3, B)
    rss = (Y ** 2).sum(0)[None] - (coef * XtY).sum(1)                                   # (C, B)
    best = rss.argmin(0)
    cols = np.arange(Y.shape[1])
    return best, coef[best, :, cols], rss[best, cols]


def _line(x: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y = a + b·x for every column of Y → (coefficients [2, B], residual sum of squares [B])."""
    X = np.stack([np.ones_like(x), x], 1)
    coef = np.linalg.lstsq(X, Y, rcond=None)[0]
    return coef, ((Y - X @ coef) ** 2).sum(0)


def ar1_resample(residuals: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """AR(1) sieve bootstrap of a series of residuals ([n]) → ([n, n_boot] replicates, ρ): ρ is their lag-1
    autocorrelation (clipped to ±0.9), and each replicate is an AR(1) series with that ρ driven by innovations
    r_i − ρ·r_{i−1} drawn with replacement (after BURN values, so that it starts in its stationary state)."""
    r = residuals - residuals.mean()
    rho = float(np.clip(r[1:] @ r[:-1] / max(r @ r, 1e-300), -0.9, 0.9))
    e = r[1:] - rho * r[:-1]
    draws = (e - e.mean())[rng.integers(0, len(e), size=(len(r) + BURN, n_boot))]
    for i in range(1, len(draws)):
        draws[i] += rho * draws[i - 1]
    return draws[BURN:], rho


def low_point(y: np.ndarray) -> int:
    """Index of the benefit's low point: the lowest running median (SMOOTH logged steps) in the first half."""
    half = max(1, len(y) // 2)
    pad = SMOOTH // 2
    padded = np.pad(y, pad, mode="edge")
    smooth = np.median(np.lib.stride_tricks.sliding_window_view(padded, SMOOTH), axis=1)
    return int(np.argmin(smooth[:half]))


def _as_seeds(name: str, values, n: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or v.shape[1] != n:
        raise UserError(f"{name}: one value per logged step ({n}), or one row of them per seed; got shape "
                        f"{np.shape(values)}")
    if not np.isfinite(v).all():
        raise UserError(f"{name}: {int((~np.isfinite(v)).sum())} value(s) are not finite")
    return v


def turning_point(steps, benefit, alignment=None, *, what: str = "REPA's benefit over vanilla",
                  every: int | None = None, start: int | None = None, n_boot: int = N_BOOT, seed: int = 0,
                  level: float = stats.LEVEL) -> Monitor:
    """The step from which `benefit` (per step, or [seeds, steps]; higher = REPA better, paired with vanilla on
    the same seeds) stops improving while `alignment` (REPA's at the aligned block, same shape, higher = more
    aligned; None: not checked) does not fall — see the module docstring. `every`: the checkpoint spacing the
    recommended --align-until is rounded to (default: the logged steps' spacing); `start`: the first step
    fitted (default: the benefit's low point)."""
    x = np.asarray(steps, dtype=np.float64)
    if x.ndim != 1 or not np.isfinite(x).all() or np.any(np.diff(x) <= 0):
        raise UserError("steps: the logged training steps, one list in increasing order")
    b = _as_seeds("benefit", benefit, len(x))
    a = None if alignment is None else _as_seeds("alignment", alignment, len(x))
    y = b.mean(0)
    if len(x) < MIN_STEPS:
        return _unresolved(what, x, b, f"too few logged steps ({len(x)}; the monitor needs at least {MIN_STEPS})")
    i0 = low_point(y) if start is None else int(np.searchsorted(x, start))
    x, y, b, a = x[i0:], y[i0:], b[:, i0:], None if a is None else a[:, i0:]
    if len(x) < MIN_STEPS:
        return _unresolved(what, x, b, f"too few logged steps from step {int(x[0]) if len(x) else start:,} on "
                                       f"({len(x)}; the monitor needs at least {MIN_STEPS})")

    rng = np.random.default_rng([seed, 29])
    span = x[-1] - x[0]
    u = (x - x[0]) / span                                   # steps on [0, 1], for a well-conditioned fit
    knots = u[SIDE:len(u) - SIDE]
    k, coef, rss = _hinge(u, y[:, None], knots)
    k, coef, rss = int(k[0]), coef[0], float(rss[0])
    X = np.stack([np.ones_like(u), u, np.maximum(u - knots[k], 0.0)], 1)
    fitted = X @ coef
    noise, rho = ar1_resample(y - fitted, n_boot, rng)                     # (n, B)

    line, rss_line = _line(u, y[:, None])
    line_fit = (np.stack([np.ones_like(u), u], 1) @ line)[:, 0]
    _, _, rss_null = _hinge(u, line_fit[:, None] + noise, knots)           # the kink's statistic under the line
    _, rss_line_null = _line(u, line_fit[:, None] + noise)
    p = (1 + np.sum(rss_line_null / rss_null >= rss_line[0] / rss)) / (n_boot + 1)

    kb, cb, _ = _hinge(u, fitted[:, None] + noise, knots)                   # replicates of the fitted kink
    tau = x[SIDE:len(x) - SIDE]                              # the knots as training steps
    alpha = 1 - level
    lo = np.quantile(tau[kb], alpha / 2, method="lower")                   # logged steps, widened outwards
    hi = np.quantile(tau[kb], 1 - alpha / 2, method="higher")
    before = _slope(coef[1], cb[:, 1], span, level)
    after = _slope(coef[1] + coef[2], cb[:, 1] + cb[:, 2], span, level)
    inside = tau[0] < lo and hi < tau[-1]
    later = _line_slope(u[x >= hi], y[x >= hi], span, n_boot, rng, level) if inside else []
    aligned = [] if a is None else _line_slope(u[k + SIDE:], a.mean(0)[k + SIDE:], span, n_boot, rng, level)

    seed_steps = [float(tau[_hinge(u, s[:, None], knots)[0][0]]) for s in b] if len(b) > 1 else []
    reason = _first_failure(p, alpha, before, (lo, hi), (tau[0], tau[-1]), later, aligned, float(tau[k]))
    every = every or int(np.median(np.diff(x)))
    m = Monitor(what, not reason, reason, "", len(x), len(b), int(x[0]), int(x[-1]), float(tau[k]), float(lo),
                float(hi), max(every, every * round(tau[k] / every)) if not reason else None, float(p), before,
                after, later, aligned, float(fitted[0]), float(fitted[-1]), seed_steps,
                list(t_interval(seed_steps)) if seed_steps else [], n_boot, rho, level)
    m.sentence = sentence(m)
    return m


def _slope(estimate: float, replicates: np.ndarray, span: float, level: float) -> list[float]:
    """[slope, low, high] per training step, from a slope on the [0, 1] scale and its replicates."""
    lo, hi = stats.centred_interval(estimate, replicates, level=level)
    return [float(estimate / span), float(lo / span), float(hi / span)]


def _line_slope(u: np.ndarray, y: np.ndarray, span: float, n_boot: int, rng: np.random.Generator,
                level: float) -> list[float]:
    """The least-squares slope of a stretch of a series, with the AR(1) bootstrap of its residuals."""
    coef, _ = _line(u, y[:, None])
    fit = (np.stack([np.ones_like(u), u], 1) @ coef)[:, 0]
    reps, _ = _line(u, fit[:, None] + ar1_resample(y - fit, n_boot, rng)[0])
    return _slope(float(coef[1, 0]), reps[1], span, level)


def _first_failure(p: float, alpha: float, before: list, interval: tuple, room: tuple, later: list,
                   aligned: list, tau: float) -> str:
    """The first condition of a claim that fails, as the reason given for no claim ('' when all hold)."""
    if p >= alpha:
        return f"the benefit has no kink beyond its noise (p = {p:.2f} against a straight line)"
    if before[1] <= 0:
        return (f"the benefit is not rising before its kink at step {tau:,.0f} (slope {slope_text(before)} per "
                f"{PER:,} steps)")
    if not later:
        return (f"the kink's interval [{interval[0]:,.0f}, {interval[1]:,.0f}] reaches the first or last step that "
                f"can hold one ({room[0]:,.0f}, {room[1]:,.0f})")
    if later[1] > 0:
        return (f"the benefit still rises after its kink at step {tau:,.0f} (slope {slope_text(later)} per {PER:,} "
                f"steps from step {interval[1]:,.0f} on, {slope_text(before)} before): it slows, it does not stop")
    if aligned and aligned[2] < 0:
        return f"REPA's alignment falls after step {tau:,.0f} (slope {slope_text(aligned)} per {PER:,} steps)"
    return ""


def slope_text(slope: list[float]) -> str:
    """A slope per step with its interval, per PER steps: '0.0020 [0.0018, 0.0022]' (U+2212 for minus)."""
    return stats.fmt_interval(*slope, scale=PER).replace("-", "−")


def number_text(x: float) -> str:
    """Two significant digits, positional: '−0.065', '−0.000039'."""
    return np.format_float_positional(float(f"{x:.2g}"), trim="-").replace("-", "−")


def _unresolved(what: str, x: np.ndarray, b: np.ndarray, reason: str) -> Monitor:
    first, last = (int(x[0]), int(x[-1])) if len(x) else (0, 0)
    m = Monitor(what, False, reason, "", len(x), len(b), first, last)
    m.sentence = sentence(m)
    return m


def sentence(m: Monitor) -> str:
    """The monitor's answer in one sentence."""
    head = f"{m.benefit}, steps {m.start:,}–{m.last:,}" + (f", mean of {m.n_seeds} seeds" if m.n_seeds > 1 else "")
    if m.benefit_start == m.benefit_start:
        head += f" (fitted {number_text(m.benefit_start)} → {number_text(m.benefit_last)})"
    if not m.claim:
        return f"{head}: no turning point resolved — {m.reason}."
    held = "" if not m.alignment_after else \
        f", while REPA's alignment {'still rises' if m.alignment_after[1] > 0 else 'holds'} " \
        f"({slope_text(m.alignment_after)} per {PER:,} steps)"
    seeds = "" if not m.seed_interval or m.seed_interval[0] != m.seed_interval[0] else \
        f"; over seeds {m.seed_interval[0]:,.0f} [{m.seed_interval[1]:,.0f}, {m.seed_interval[2]:,.0f}]"
    return (f"{head}: the benefit stops improving at step {m.step:,.0f} [{m.ci_low:,.0f}, {m.ci_high:,.0f}] "
            f"({100 * m.level:g}%, bootstrap over steps{seeds}; slope {slope_text(m.slope_before)} → "
            f"{slope_text(m.slope_after)} per {PER:,} steps){held}: --align-until {m.align_until}.")


#################################################################################
#                              From training logs                               #
#################################################################################

def train_rows(log: str | Path) -> dict[int, dict]:
    """A run's {"event": "train"} rows of log.jsonl by step (a resumed run's later row of a step wins)."""
    path = Path(log)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist: pass a training run's log.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): r for r in rows if r.get("event") == "train"}


def has_alignment(rows: dict[int, dict]) -> bool:
    """Whether a run trained with an alignment term (a nonzero loss_repa at some logged step)."""
    return any(r.get("loss_repa") for r in rows.values())


def paired_series(vanilla: dict[int, dict], repa: dict[int, dict], names: tuple[str, str]
                  ) -> tuple[list[int], list[float], list[float]]:
    """(steps, benefit, alignment) of one seed's two arms (`train_rows`): vanilla − REPA denoising loss at every
    step both logs hold while REPA's term was on (train --align-until ends it), and REPA's alignment −loss_repa (the
    projector's cosine at the aligned block). Arms that
    hashed different batches (inputs_sha256), or a "vanilla" run with an alignment term, are refused."""
    steps = sorted(s for s in set(vanilla) & set(repa) if repa[s].get("loss_repa") is not None)  # not past --align-until
    unpaired = [s for s in steps if vanilla[s].get("inputs_sha256") != repa[s].get("inputs_sha256")]
    if unpaired:
        raise UserError(f"{names[0]} and {names[1]} saw different batches at {len(unpaired)} logged step(s) (first: "
                        f"{unpaired[0]}): the monitor needs the two arms of one seed")
    if has_alignment(vanilla) or not has_alignment(repa):
        raise UserError(f"{names[0]} must be the vanilla run (loss_repa 0) and {names[1]} the REPA run")
    return (steps, [vanilla[s]["loss_denoise"] - repa[s]["loss_denoise"] for s in steps],
            [-repa[s]["loss_repa"] for s in steps])


def from_logs(vanilla: str | Path | list, repa: str | Path | list, every: int | None = None,
              names: tuple[str, str] = ("vanilla", "REPA"), **options) -> Monitor:
    """The monitor over training logs (log.jsonl): vanilla − REPA denoising loss at every step both logs hold
    (each logged value is the mean over the steps since the previous row), REPA's alignment −loss_repa. Lists
    of logs are seeds, the i-th of each arm paired (steps every seed logged). `options`: turning_point's."""
    pairs = list(zip(*(v if isinstance(v, (list, tuple)) else [v] for v in (vanilla, repa))))
    series = [paired_series(train_rows(v), train_rows(r), (f"'{v}'", f"'{r}'")) for v, r in pairs]
    steps = sorted(set.intersection(*(set(s) for s, _, _ in series)))
    pick = [[dict(zip(s, values)) for values in (b, a)] for s, b, a in series]
    benefit, alignment = ([[seed[j][s] for s in steps] for seed in pick] for j in (0, 1))
    return turning_point(steps, benefit, alignment, every=every,
                         what=f"{names[0]} − {names[1]} denoising loss (same batches)", **options)


def monitor_runs(logs: dict[str, Path]) -> list[dict]:
    """A trajectory's monitor: each run with an alignment term against the first run without one, from their
    log.jsonl ({run: path}); --align-until rounded to the REPA run's checkpoint spacing (its config.json). A pair
    that cannot be paired gets its reason, not an error."""
    aligned = {name: has_alignment(train_rows(path)) for name, path in logs.items()}
    ref = next((name for name, on in aligned.items() if not on), None)
    out = []
    for name in [n for n, on in aligned.items() if on and ref is not None]:
        config = Path(logs[name]).with_name("config.json")
        every = json.loads(config.read_text()).get("ckpt_every") if config.is_file() else None
        try:
            m = from_logs(logs[ref], logs[name], every, names=(ref, name))
        except UserError as e:
            m = _unresolved(f"{ref} − {name} denoising loss (same batches)", np.zeros(0), np.zeros((1, 0)), str(e))
        out.append({"run": name, "reference": ref, **m.to_dict()})
    return out
