"""`analyze`, `compare` and `trajectory`: checkpoints + images → tidy results → summary → PDF report.

For each checkpoint, on the same images and the same seeded noise:
  alignment  CKNNA (and optionally CKA, mutual k-NN) between every block's mean-pooled features at
             every t and each target encoder's pooled patch tokens (DESIGN.md §5), with bootstrap
             intervals over images;
  probe      a linear probe per block × t (DESIGN.md §6), fitted on the probe-train images and scored
             on held-out probe-test images, with a 95% Wilson interval on the test accuracy;
  baselines  the same numbers for the raw input x_t (average-pooled per patch) and for the untrained
             model of the same architecture and initialisation (adaLN-Zero makes every untrained block
             the identity: blocks 0 and 1 are captured, checked equal, and block 0 stands for all).
Everything heavy goes through the feature store, so re-running with another metric, encoder or
checkpoint recomputes only what is new.

The tidy table (results.csv) has one row per checkpoint × block × t × metric × encoder; see
report/summary.py for the columns and the baseline naming.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from repa_probe import metrics as M
from repa_probe.capture import DEFAULT_TS, CaptureConfig, default_device, extract, make_dataset
from repa_probe.checkpoints import LoadedCheckpoint, Provenance, load_checkpoint
from repa_probe.data import ImageDataset, image_size_for, list_images, model_mode
from repa_probe.errors import UserError
from repa_probe.models import SiT, size_name
from repa_probe.probe import ProbeConfig, linear_probe
from repa_probe.report import figures as F
from repa_probe.report.pdf import check_writable, write_report
from repa_probe.report.summary import (BASELINE_PREFIX, COLUMNS, compare_summary, deltas, display_scale,
                                       metric_label, peak_summary, wilson_interval)
from repa_probe.store import FeatureStore, encoder_features

UNTRAINED = f"{BASELINE_PREFIX}untrained"
RAW = f"{BASELINE_PREFIX}raw-input"
CPU_DEFAULT_N, GPU_DEFAULT_N = 500, 10_000
ANALYSIS_LOG = "analysis.jsonl"   # the trainer's analysis-while-training rows (train/trainer.py)


@dataclass
class AnalyzeConfig:
    """Every knob of an analysis; plain data, recorded in summary.json."""
    data: str                                   # ImageFolder tree for alignment (and probes, if no probe dirs)
    n: int | None = None                        # images (default: 10,000 on a GPU, 500 on the CPU)
    ts: tuple[float, ...] = DEFAULT_TS
    encoders: list[str] = field(default_factory=list)   # NAME[=WEIGHTS]
    encoder_random_init: bool = False
    probe_train: str | None = None              # ImageFolder trees for the probe; default: split --data
    probe_test: str | None = None
    probe_n_train: int | None = None            # default: n
    probe_n_test: int | None = None             # default: n // 2
    probe: bool = True
    alignment_metrics: tuple[str, ...] = ("cknna",)
    k: int = 10
    bootstrap: int = 20                         # bootstrap replicates for alignment intervals (0 = none)
    baselines: bool = True
    seed: int = 0                               # noise seed and subset seed
    labels: str = "null"
    precision: str = "auto"                     # autocast: auto = bf16 on GPUs, fp32 on the CPU
    batch_size: int = 64
    num_workers: int = 0
    device: str | None = None
    cache: str | None = None
    mode: str | None = None
    vae: str | None = None
    skip_bad_images: bool = False
    convention: str | None = None
    weights: str = "ema"
    quiet: bool = False
    samples: int = 0                            # >0: a page with a grid of this many samples per checkpoint
    notes: list[str] = field(default_factory=list)

    def resolved(self) -> "AnalyzeConfig":
        """Fill the device-dependent defaults and check the flags (before any compute)."""
        cfg = AnalyzeConfig(**{**asdict(self), "notes": list(self.notes)})
        device = torch.device(cfg.device) if cfg.device else default_device()
        cfg.device = str(device)
        if cfg.n is None:
            cfg.n = GPU_DEFAULT_N if device.type == "cuda" else CPU_DEFAULT_N
            if device.type != "cuda":
                cfg.notes.append(f"no GPU: analysed n = {cfg.n} images (pass --n for more)")
        if cfg.precision == "auto":
            cfg.precision = "bf16" if device.type == "cuda" else "fp32"
        if (cfg.probe_train is None) != (cfg.probe_test is None):
            raise UserError("--probe-train and --probe-test go together: give both, or neither to split --data")
        for m in cfg.alignment_metrics:
            if m not in M.METRICS:
                raise UserError(f"--metrics {m!r}: choose from {', '.join(M.METRICS)}")
        if cfg.n is not None and cfg.n <= cfg.k + 3:
            raise UserError(f"--n {cfg.n} is too small for k = {cfg.k} nearest neighbours (need n > k + 3)")
        cfg.ts = tuple(float(t) for t in cfg.ts)
        for path, flag in [(cfg.data, "--data"), (cfg.probe_train, "--probe-train"), (cfg.probe_test, "--probe-test")]:
            if path is not None:
                _check_image_folder(path, flag)
        return cfg

    def capture(self) -> CaptureConfig:
        return CaptureConfig(ts=self.ts, seed=self.seed, labels=self.labels, precision=self.precision)


def _check_image_folder(path: str, flag: str) -> None:
    try:
        list_images(path)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


#################################################################################
#                              One checkpoint's numbers                         #
#################################################################################

@dataclass
class Analysed:
    """What one checkpoint contributes: its name, provenance and tidy rows, plus t=0 block features
    for the layer × layer similarity figures."""
    name: str
    ckpt: LoadedCheckpoint
    rows: list[dict]
    block_feats_t0: np.ndarray | None = None


class Analyzer:
    """Holds what is shared across checkpoints: the encoders, their kernels, the store, the datasets.

    Analysing several checkpoints with one Analyzer encodes the images once per encoder and builds
    each encoder's kNN graph once."""

    def __init__(self, config: AnalyzeConfig):
        self.cfg = config.resolved()
        self.store = FeatureStore(self.cfg.cache)
        self.device = torch.device(self.cfg.device)
        self.encoders = self._load_encoders()
        self._targets: dict[tuple, tuple[np.ndarray, M.FeatureKernel]] = {}
        self.timings: dict[str, float] = {"data+forwards": 0.0, "encoders": 0.0, "probes": 0.0, "metrics": 0.0}
        self._untrained_done: set[str] = set()

    def _load_encoders(self):
        from repa_probe.encoders import load_encoder
        out = []
        for spec in self.cfg.encoders:
            enc = load_encoder(spec, random_init=self.cfg.encoder_random_init, device=self.device)
            out.append(enc)
        return out

    # ------------------------------------------------------------------ data
    def datasets(self, ckpt: LoadedCheckpoint):
        """(alignment set, probe train set, probe test set) at this model's image size."""
        mode = model_mode(ckpt, self.cfg.mode)
        size = image_size_for(ckpt.config, mode)
        c = self.cfg
        align = make_dataset(c.data, size, c.n, c.seed, c.skip_bad_images)
        if not c.probe:
            return align, None, None
        if c.probe_train:
            train = make_dataset(c.probe_train, size, c.probe_n_train or c.n, c.seed, c.skip_bad_images)
            test = make_dataset(c.probe_test, size, c.probe_n_test or max(c.n // 2, 20), c.seed + 1,
                                c.skip_bad_images)
        else:  # split the alignment images: every 5th (class-balanced order) is held out for testing
            held = np.arange(len(align.ids)) % 5 == 0
            train = ImageDataset(c.data, size, indices=align.ids[~held])
            test = ImageDataset(c.data, size, indices=align.ids[held])
        if len(np.unique(train.labels)) < 2:
            note = (f"no probe: '{train.root}' has no class labels (one class); pass --probe-train/--probe-test "
                    f"with labelled ImageFolder trees to get one")
            if note not in c.notes:
                c.notes.append(note)
            return align, None, None
        return align, train, test

    def features(self, ckpt: LoadedCheckpoint, dataset, blocks: tuple[int, ...] | None = None):
        start = time.perf_counter()
        capture = dataclasses.replace(self.cfg.capture(), blocks=blocks)
        feats = extract(ckpt, dataset, capture, mode=self.cfg.mode, vae=self.cfg.vae,
                        batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers, device=self.device,
                        cache_dir=self.cfg.cache, quiet=self.cfg.quiet)
        self.timings["data+forwards"] += time.perf_counter() - start
        return feats

    def untrained_features(self, untrained: LoadedCheckpoint, dataset):
        """Block 0 of the untrained model, as [n_t, 1, N, D]. adaLN-Zero makes every untrained block the
        identity, so blocks 1..depth equal block 0: we capture blocks 0 and 1 (the pass stops there),
        check that they are equal, and let block 0 stand for all of them."""
        feats = self.features(untrained, dataset, blocks=(0, 1))
        b = np.asarray(feats.blocks)
        if not np.array_equal(b[:, 0], b[:, 1]):
            raise RuntimeError("an untrained SiT block changed its input: adaLN-Zero initialisation is broken")
        return dataclasses.replace(feats, blocks=b[:, :1])

    def probe_sets(self, feats, train, test, capture):
        """Features of the probe's train and test images: rows of the alignment features `feats` when the
        probe splits those images (no second pass over them), else `capture(dataset)` for each set."""
        if self.cfg.probe_train:
            return capture(train), capture(test)
        row = {image_id: i for i, image_id in enumerate(feats.ids)}
        blocks, raw = np.asarray(feats.blocks), np.asarray(feats.raw)   # read from the store once for both sets

        def rows(dataset):
            idx = np.array([row[i] for i in dataset.ids])
            return dataclasses.replace(feats, blocks=blocks[:, :, idx], raw=raw[:, idx], labels=feats.labels[idx],
                                       ids=feats.ids[idx])
        return rows(train), rows(test)

    def target(self, encoder, dataset, grid: int):
        """Pooled encoder features of `dataset` and their prepared kernel (once per encoder × subset)."""
        key = (encoder.fingerprint(grid), dataset.fingerprint())
        if key not in self._targets:
            start = time.perf_counter()
            pooled = encoder_features(self.store, encoder, dataset, grid, batch_size=self.cfg.batch_size,
                                      num_workers=self.cfg.num_workers, quiet=self.cfg.quiet)
            self.timings["encoders"] += time.perf_counter() - start
            start = time.perf_counter()
            kernel = M.FeatureKernel.build(pooled["pooled"], self.cfg.k, self.cfg.alignment_metrics,
                                           device=self.device, what=f"encoder {encoder.name}")
            self.timings["metrics"] += time.perf_counter() - start
            self._targets[key] = (pooled.ids, np.asarray(pooled["pooled"]), kernel)
        return self._targets[key]

    # ------------------------------------------------------------------ numbers
    def alignment_rows(self, name: str, feats, raw: bool, dataset, grid: int) -> list[dict]:
        rows = []
        for enc in self.encoders:
            ids, target, kernel = self.target(enc, dataset, grid)
            if not np.array_equal(ids, feats.ids):
                raise RuntimeError("encoder and model features hold different images")  # a bug, not user input
            start = time.perf_counter()
            src = feats.raw if raw else feats.blocks
            scores = M.alignment(kernel, src, self.cfg.alignment_metrics, k=self.cfg.k, device=self.device)
            cis = {}                                  # 95% bootstrap intervals {metric: (..., 2)}
            if self.cfg.bootstrap and not raw:
                cis = M.bootstrap_alignment(target, src, tuple(scores), k=self.cfg.k, n_boot=self.cfg.bootstrap,
                                            seed=self.cfg.seed, around=scores, device=self.device,
                                            desc=None if self.cfg.quiet else "bootstrap")
            self.timings["metrics"] += time.perf_counter() - start
            for metric, values in scores.items():
                for index in np.ndindex(values.shape):
                    ti = index[0]
                    block = -1 if raw else index[1]
                    lo, hi = cis[metric][index] if metric in cis else (math.nan, math.nan)
                    rows.append(dict(checkpoint=name, block=block, t=feats.ts[ti], metric=metric,
                                     encoder=enc.name, value=float(values[index]), ci_low=lo, ci_high=hi))
        return rows

    def probe_rows(self, name: str, train, test, raw: bool) -> list[dict]:
        start = time.perf_counter()
        src_tr = np.asarray(train.raw if raw else train.blocks)
        src_te = np.asarray(test.raw if raw else test.blocks)
        res = linear_probe(src_tr, train.labels, src_te, test.labels, ProbeConfig(seed=self.cfg.seed),
                           device=self.device)
        self.timings["probes"] += time.perf_counter() - start
        rows, n_test = [], len(test.labels)
        for metric in ("top1", "top5"):
            if metric not in res:
                continue
            for index in np.ndindex(res[metric].shape):
                acc = float(res[metric][index])
                lo, hi = wilson_interval(round(acc * n_test), n_test)
                rows.append(dict(checkpoint=name, block=-1 if raw else index[1], t=train.ts[index[0]],
                                 metric=f"probe_{metric}", encoder="", value=acc, ci_low=lo, ci_high=hi))
        return rows

    def analyse(self, ckpt: LoadedCheckpoint, name: str) -> list[Analysed]:
        """All numbers for one checkpoint, plus (once per architecture) the untrained and raw baselines."""
        align, train, test = self.datasets(ckpt)
        grid = int(round(ckpt.config.num_patches ** 0.5))
        out = []
        feats = self.features(ckpt, align)
        rows = self.alignment_rows(name, feats, False, align, grid)
        if train is not None:
            f_tr, f_te = self.probe_sets(feats, train, test, lambda d: self.features(ckpt, d))
            rows += self.probe_rows(name, f_tr, f_te, raw=False)
        out.append(Analysed(name, ckpt, rows, np.asarray(feats.blocks[0])))
        arch = _arch_key(ckpt)
        if self.cfg.baselines and arch not in self._untrained_done:
            self._untrained_done.add(arch)
            base_rows = self.alignment_rows(RAW, feats, True, align, grid)
            untrained = untrained_like(ckpt, self.cfg.seed)
            u_feats = self.untrained_features(untrained, align)
            u_rows = self.alignment_rows(UNTRAINED, u_feats, False, align, grid)
            if train is not None:
                base_rows += self.probe_rows(RAW, f_tr, f_te, raw=True)
                u_rows += self.probe_rows(UNTRAINED, *self.probe_sets(
                    u_feats, train, test, lambda d: self.untrained_features(untrained, d)), raw=False)
            base_rows += [dict(r, block=b) for r in u_rows for b in range(ckpt.config.depth + 1)]
            out.append(Analysed(UNTRAINED if len(self._untrained_done) == 1 else f"{UNTRAINED} ({arch})",
                                untrained, base_rows))
        return out


def _arch_key(ckpt: LoadedCheckpoint) -> str:
    c = ckpt.config
    return f"{size_name(c)}, {c.in_channels}×{c.input_size}²"


def untrained_like(ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
    """A freshly initialised model of the same architecture and time convention (DiT's init)."""
    torch.manual_seed(seed)
    model = SiT(ckpt.config).eval()
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    prov = Provenance(path="<untrained>", format="untrained", weights="init", convention=ckpt.provenance.convention,
                      convention_source=ckpt.provenance.convention_source, sha256=h.hexdigest())
    return LoadedCheckpoint(model=model, config=ckpt.config, provenance=prov, meta=dict(ckpt.meta))


#################################################################################
#                       Tables, summaries and report pages                       #
#################################################################################

def tidy(analysed: list[Analysed]) -> pd.DataFrame:
    """The tidy table, checkpoints in the order analysed (so colours and legends follow the command line)."""
    rows = [r for a in analysed for r in a.rows]
    df = pd.DataFrame.from_records(rows, columns=COLUMNS)
    return in_given_order(df, "checkpoint", ["metric", "encoder", "t", "block"]).reset_index(drop=True)


def in_given_order(df: pd.DataFrame, first: str, then: list[str]) -> pd.DataFrame:
    """Sorted by column `first` in order of first appearance (the command line's), then by `then`."""
    rank = {v: i for i, v in enumerate(dict.fromkeys(df[first]))}
    return df.sort_values([first, *then], key=lambda c: c.map(rank) if c.name == first else c, kind="stable")


def unique_names(paths: list[str]) -> list[str]:
    """Short distinct labels for checkpoints: file stems (run/stem for a training run's RUN/checkpoints/
    0002500.pt, whose stem alone says nothing); when they repeat, the run folder (the folder holding
    checkpoints/, or the file's folder), then run/stem, then numbered stems."""
    def run_of(p: Path) -> str:
        return p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name

    paths = [Path(p) for p in paths]
    stems = [f"{run_of(p)}/{p.stem}" if p.parent.name == "checkpoints" else p.stem for p in paths]
    for names in (stems, [run_of(p) for p in paths], [f"{run_of(p)}/{p.stem}" for p in paths]):
        if len(set(names)) == len(names) and all(names):
            return names
    return [f"{i + 1}:{p.stem}" for i, p in enumerate(paths)]


def provenance_rows(a: Analysed, cfg: AnalyzeConfig) -> list[tuple[str, str]]:
    p, c = a.ckpt.provenance, a.ckpt.config
    rows = [(f"{a.name}", f"{p.path}  [{p.format}, {p.weights} weights, sha256 {p.sha256[:12]}]"),
            ("  architecture", f"{size_name(c)}: width {c.hidden_size}, {c.depth} blocks, {c.num_patches} tokens "
                               f"({c.in_channels}×{c.input_size}² input, patch {c.patch_size})"),
            ("  time convention", f"{p.convention} ({p.convention_source})"),
            ("  training step", "-" if p.step is None else f"{p.step:,}"),
            ("  REPA", f"depth {c.encoder_depth}, λ = {p.repa_coeff}, encoders {', '.join(p.encoders) or '-'}"
             if c.z_dims else "no projector (vanilla)")]
    rows += [("  WARNING", w) for w in p.warnings]
    return rows


def encoder_rows(analyzer: Analyzer) -> list[tuple[str, str]]:
    rows = []
    for enc in analyzer.encoders:
        weights = "RANDOM WEIGHTS (--encoder-random-init): alignment numbers are meaningless" if enc.random_init \
            else f"{enc.weights_path} (sha256 {str(enc.weights_sha256)[:12]})"
        rows.append((enc.name, f"{enc.arch}, dim {enc.embed_dim}: {weights}"))
    return rows or [("(none)", "no --encoder given: alignment not measured, probes only")]


def headline(peaks: pd.DataFrame) -> list[str]:
    """One line per metric × encoder at the lowest t: the sentence a reader wants first."""
    lines = []
    if peaks.empty:
        return lines
    for (ckpt, metric, encoder), g in peaks.groupby(["checkpoint", "metric", "encoder"], sort=False):
        r = g.sort_values("t").iloc[0]
        s = display_scale(metric)
        unit = " points" if s == 100 else ""
        verdict = "peaks then drops (beyond the 95% intervals)" if r.peaks_then_drops else \
            ("drop within the intervals" if r.drop_abs > 0 else "no drop after the peak")
        lines.append(f"{ckpt}: {metric_label(metric)}{' vs ' + encoder if encoder else ''} at t={r.t:g} peaks at "
                     f"block {r.best_block} ({r.best_value * s:.3g}), last block {r.last_block}: "
                     f"{r.last_value * s:.3g}; drop {r.drop_abs * s:.2g}{unit} — {verdict}")
    return lines


def summary_table(peaks: pd.DataFrame) -> pd.DataFrame:
    if peaks.empty:
        return pd.DataFrame({"": ["no curves"]})
    rows = []
    for r in peaks.itertuples():
        s = display_scale(r.metric)
        rows.append({"checkpoint": r.checkpoint, "metric": metric_label(r.metric), "encoder": r.encoder or "-",
                     "t": f"{r.t:g}", "best block": r.best_block,
                     "best": f"{r.best_value * s:.3g} [{r.best_ci_low * s:.3g}, {r.best_ci_high * s:.3g}]",
                     "last block": r.last_block, "last": f"{r.last_value * s:.3g}",
                     "drop": f"{r.drop_abs * s:.2g} ({100 * r.drop_rel:.1f}%)" if r.drop_abs > 0 else "0",
                     "peaks then drops": "yes" if r.peaks_then_drops else "no"})
    return pd.DataFrame(rows)


def baseline_lines(results: pd.DataFrame) -> list[str]:
    lines = []
    for name in (RAW, UNTRAINED):
        b = results[(results["checkpoint"] == name) & (results["t"] == results["t"].min())]
        for (metric, encoder), g in b.groupby(["metric", "encoder"]):
            s = display_scale(metric)
            v = g["value"].to_numpy() * s
            span = f"{v.min():.3g}" if np.ptp(v) < 1e-9 * max(1, abs(v).max()) else f"{v.min():.3g}–{v.max():.3g}"
            lines.append(f"{name.removeprefix(BASELINE_PREFIX)}: {metric_label(metric)}"
                         f"{' vs ' + encoder if encoder else ''} at t={g['t'].iloc[0]:g}: {span}")
    return lines


def _figures(results: pd.DataFrame, analysed: list[Analysed], title: str) -> list[tuple[str, object]]:
    figs = []
    models = [a for a in analysed if not a.name.startswith(BASELINE_PREFIX)]
    panels = sorted(results[~results["checkpoint"].str.startswith(BASELINE_PREFIX)]
                    .groupby(["metric", "encoder"]).groups)
    for (metric, encoder) in panels:
        figs.append((f"curves {metric} {encoder}", F.curves(results, metric, encoder,
                                                            f"{metric_label(metric)} per block")))
    for a in models:
        for fig in F.heatmaps(results, a.name, "block × t"):
            figs.append((f"heatmap {a.name}", fig))
        figs.append((f"profile over t {a.name}", F.curves_over_t(results, a.name, panels, "layer-wise profile vs t")))
    for a in models:
        if a.block_feats_t0 is not None:
            sim = M.similarity_matrix(a.block_feats_t0, metric="cka")
            figs.append((f"layer similarity {a.name}", F.similarity_matrix(
                sim, f"{a.name}: block × block linear CKA at t = 0 (block 0 = patch embedding)")))
    return figs


def sample_page(a: Analysed, cfg: AnalyzeConfig):
    """A grid of cfg.samples samples (Euler ODE, 50 steps, random classes, no guidance, seeded)."""
    import tempfile
    import matplotlib.image as mpimg
    from repa_probe.train.sampler import sample_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "grid.png"
        sample_checkpoint(a.ckpt.provenance.path, str(png), cfg.samples, cfg=1.0, seed=cfg.seed, vae=cfg.vae,
                          weights=cfg.weights, convention=cfg.convention, device=cfg.device)
        grid = mpimg.imread(png)
    return F.image_grid(grid, f"{a.name}: {cfg.samples} samples (Euler ODE, 50 steps, random classes, no guidance, "
                              f"seed {cfg.seed})")


def _summary_dict(cfg: AnalyzeConfig, analysed, results, peaks, timings, title, extra=None) -> dict:
    return {"title": title, "config": asdict(cfg), "notes": cfg.notes,
            "checkpoints": {a.name: a.ckpt.provenance.to_dict() for a in analysed},
            "n_rows": len(results), "peaks": peaks.to_dict(orient="records"),
            "baselines": baseline_lines(results), "headline": headline(peaks),
            "timings_s": {k: round(v, 2) for k, v in timings.items()}, **(extra or {})}


#################################################################################
#                                 The commands                                  #
#################################################################################

def analyze(checkpoint: str, config: AnalyzeConfig, out: str) -> Path:
    """`repa-probe analyze`: one checkpoint → results.csv, summary.json, figures, report.pdf in `out`."""
    return compare([checkpoint], config, out)


def compare(checkpoints: list[str], config: AnalyzeConfig, out: str) -> Path:
    """`repa-probe compare A B [C ...]`: the same images and noise for all; deltas are (B − A) etc."""
    check_writable(out)
    start = time.perf_counter()
    analyzer = Analyzer(config)
    cfg = analyzer.cfg
    loaded = [load_checkpoint(latest_in_run(p), convention=cfg.convention, weights=cfg.weights) for p in checkpoints]
    names = unique_names(checkpoints)
    analysed = []
    for ckpt, name in zip(loaded, names):
        analysed += analyzer.analyse(ckpt, name)
    results = tidy(analysed)
    peaks = peak_summary(results)
    models = [a for a in analysed if not a.name.startswith(BASELINE_PREFIX)]
    single = len(models) == 1
    title = f"repa-probe {'analysis' if single else 'comparison'}: " + " vs ".join(a.name for a in models)
    timings = {**analyzer.timings}
    extra, compare_tables, compare_lines = {}, {}, []
    if not single:
        a0 = models[0].name
        comp = pd.concat([compare_summary(results, a0, m.name) for m in models[1:]], ignore_index=True)
        extra["compare"] = comp.to_dict(orient="records")
        compare_tables["compare"] = comp
        for r in comp.itertuples():
            s = display_scale(r.metric)
            if r.t == comp["t"].min():
                compare_lines.append(
                    f"{r.b} − {r.a}: {metric_label(r.metric)}{' vs ' + r.encoder if r.encoder else ''} at t={r.t:g}: "
                    f"largest gain {r.max_delta * s:+.3g} at block {r.max_delta_block}, mean {r.mean_delta * s:+.3g}; "
                    f"{r.b} better beyond the intervals at blocks {r.b_better_blocks or 'none'}")
    report_start = time.perf_counter()
    page1 = [("Checkpoints", [row for a in models for row in provenance_rows(a, cfg)]),
             ("Data", [("alignment images", f"{cfg.data} (n = {cfg.n}, class-balanced, seed {cfg.seed})"),
                       ("probe", f"train {cfg.probe_train or cfg.data + ' (4/5 of the n images)'}; "
                                 f"test {cfg.probe_test or cfg.data + ' (the other 1/5)'}" if cfg.probe else "off"),
                       ("noise levels t", ", ".join(f"{t:g}" for t in cfg.ts) + "  (0 = clean data, 1 = pure noise; "
                                                                             "seeded noise, null class label)")]),
             ("Encoders", encoder_rows(analyzer)),
             ("Headline", [f"! {n}" for n in cfg.notes] + headline(peaks) + compare_lines + baseline_lines(results))]
    pages = F.summary_pages(title, page1, summary_table(peaks), "Where each curve peaks, and the drop after it",
                            "best = block with the highest value (block 0, the embedding, is not a candidate) "
                            "[95% interval]; drop = best − last block; 'peaks then drops' = the best block's "
                            "interval lies above the last block's (shaded rows).")
    figs = [(f"summary {i + 1}", page) for i, page in enumerate(pages)]
    figs += _figures(results, analysed, title)
    if not single:
        for m in models[1:]:
            for fig in F.delta_heatmaps(deltas(results, models[0].name, m.name), models[0].name, m.name):
                figs.append((f"deltas {m.name}", fig))
            if models[0].block_feats_t0 is not None and m.block_feats_t0 is not None:
                sim = M.similarity_matrix(models[0].block_feats_t0, m.block_feats_t0, metric="cka")
                figs.append((f"cross similarity {m.name}", F.similarity_matrix(
                    sim, f"linear CKA at t = 0: {models[0].name} block (rows) × {m.name} block (columns)",
                    xlabel=f"{m.name} block", ylabel=f"{models[0].name} block")))
    for a in models if cfg.samples else []:
        figs.append((f"samples {a.name}", sample_page(a, cfg)))
    timings["report"] = time.perf_counter() - report_start
    timings["total"] = time.perf_counter() - start
    summary = _summary_dict(cfg, analysed, results, peaks, timings, title, extra)
    return write_report(out, results, summary, figs, compare_tables)


def find_checkpoints(pattern: str) -> list[Path]:
    """A run folder (its checkpoints/ or itself), a glob, or one file → checkpoint files."""
    p = Path(pattern)
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        files = sorted(f for f in folder.iterdir() if f.suffix in (".pt", ".safetensors") and f.is_file())
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(pattern) if Path(f).suffix in (".pt", ".safetensors"))
    return files


def latest_in_run(arg: str) -> str:
    """A checkpoint file as is; a training run folder → its checkpoint with the highest step."""
    if not Path(arg).is_dir():
        return arg
    files = find_checkpoints(arg)
    if not files:
        raise UserError(f"'{arg}' is a folder without checkpoints: pass a .pt/.safetensors file or a training "
                        "run folder (RUN/checkpoints/*.pt)")
    return str(max(files, key=lambda f: (f.stem.isdigit(), int(f.stem) if f.stem.isdigit() else 0, f.name)))


def block_groups(depth: int, n_groups: int = 4) -> list[list[int]]:
    """Blocks 1..depth in n_groups contiguous groups (e.g. 12 blocks → 1–3, 4–6, 7–9, 10–12)."""
    edges = np.linspace(0, depth, min(n_groups, depth) + 1).round().astype(int)
    return [list(range(a + 1, b + 1)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def trajectory(sources: list[str], config: AnalyzeConfig, out: str, source: str = "auto") -> Path:
    """`repa-probe trajectory RUN_DIR_OR_GLOB [...]`: metrics over training steps (REPA Fig. 2b).

    Each source is a run folder or a glob of checkpoints (one line style per source). source="log" reads
    the run's analysis-while-training file (analysis.jsonl: step, block, t, metric, encoder, value),
    "checkpoints" analyses every checkpoint (feature store: only new ones cost compute), "auto" uses the
    log where a run folder has one and the checkpoints otherwise."""
    check_writable(out)
    if source not in ("auto", "log", "checkpoints"):
        raise UserError(f"--source {source!r}: use auto, log or checkpoints")
    start = time.perf_counter()
    frames, provenance, analyzer, depth = [], {}, None, 1
    for src in sources:
        run = Path(src).name if Path(src).is_dir() else src
        log = Path(src) / ANALYSIS_LOG
        if source != "checkpoints" and log.is_file():
            df = pd.read_json(log, lines=True)
            frames.append(df.assign(run=run, checkpoint=run))
            depth = max(depth, int(df["block"].max()))
            provenance[run] = {"path": str(log), "format": "analysis-while-training log"}
            continue
        if source == "log":
            raise UserError(f"'{src}' has no {ANALYSIS_LOG}: train with --analyze-every, or use --source checkpoints")
        files = find_checkpoints(src)
        if not files:
            raise UserError(f"no checkpoints (.pt/.safetensors) found for '{src}': pass a run folder or a glob")
        analyzer = analyzer or Analyzer(config)
        for f in files:
            ckpt = load_checkpoint(f, convention=analyzer.cfg.convention, weights=analyzer.cfg.weights)
            if ckpt.provenance.step is None:
                raise UserError(f"'{f}' records no training step: trajectory needs checkpoints from a training run")
            depth = max(depth, ckpt.config.depth)
            for a in analyzer.analyse(ckpt, f"{run}@{ckpt.provenance.step}"):
                if a.name.startswith(BASELINE_PREFIX):
                    continue
                frames.append(pd.DataFrame(a.rows).assign(run=run, step=ckpt.provenance.step))
                provenance[a.name] = ckpt.provenance.to_dict()
    # a training log carries no intervals: its ci_low / ci_high columns stay empty
    traj = pd.concat(frames, ignore_index=True).reindex(columns=["run", "step", *COLUMNS])
    traj = in_given_order(traj, "run", ["step", "metric", "t", "block"])
    traj = traj[traj["block"] >= 1]
    groups = block_groups(depth)
    figs = []
    for (metric, encoder), _ in traj.fillna({"encoder": ""}).groupby(["metric", "encoder"]):
        figs.append((f"trajectory {metric} {encoder}",
                     F.trajectory(traj.fillna({"encoder": ""}), metric, encoder,
                                  f"{metric_label(metric)} over training", groups)))
    trend = trajectory_summary(traj.fillna({"encoder": ""}), groups)
    cfg = analyzer.cfg if analyzer else config
    title = "repa-probe trajectory: " + ", ".join(dict.fromkeys(traj["run"]))
    lines = [f"{r.run}: {metric_label(r.metric)}{' vs ' + r.encoder if r.encoder else ''}, t={r.t:g}, blocks "
             f"{r.blocks}: {r.first * display_scale(r.metric):.3g} at step {r.first_step:,} → "
             f"{r.last * display_scale(r.metric):.3g} at step {r.last_step:,} "
             f"({'rises' if r.last > r.first else 'falls' if r.last < r.first else 'flat'})"
             for r in trend.itertuples() if r.t == trend["t"].min()]

    def shown(col: str) -> list[str]:
        return [f"{v * display_scale(m):.3g}" for v, m in zip(trend[col], trend["metric"])]

    pages = F.summary_pages(title, [("Sources", [(k, v.get("path", "")) for k, v in provenance.items()][:12]),
                                    ("Trend (first → last step, mean over the block group)", lines[:14])],
                            trend.assign(metric=trend["metric"].map(metric_label), first=shown("first"),
                                         last=shown("last")),
                            "Per run, metric, t and block group")
    figs = [(f"summary {i + 1}", p) for i, p in enumerate(pages)] + figs
    summary = {"title": title, "sources": sources, "source": source, "groups": groups,
               "trend": trend.to_dict(orient="records"), "provenance": provenance,
               "config": asdict(cfg), "timings_s": {"total": round(time.perf_counter() - start, 2)}}
    return write_report(out, traj, summary, figs)


def trajectory_summary(traj: pd.DataFrame, groups: list[list[int]]) -> pd.DataFrame:
    """First and last step's value per run × metric × encoder × t × block group (group mean)."""
    rows = []
    for (run, metric, encoder, t), g in traj.groupby(["run", "metric", "encoder", "t"], sort=False):
        for group in groups:
            c = g[g["block"].isin(group)].groupby("step")["value"].mean()
            if len(c):
                rows.append(dict(run=run, metric=metric, encoder=encoder, t=float(t),
                                 blocks=f"{group[0]}–{group[-1]}", first_step=int(c.index[0]), first=float(c.iloc[0]),
                                 last_step=int(c.index[-1]), last=float(c.iloc[-1])))
    return pd.DataFrame(rows)
