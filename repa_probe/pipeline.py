"""The analysis pipeline: checkpoints + images → per block × t measures with intervals → a Results object.

For each checkpoint, on the same images and the same seeded noise (docs/analysis.md):
  alignment  every registered alignment metric asked for (CKNNA by default; metrics.py) between every
             block's mean-pooled features at every t and each target encoder's pooled patch tokens, with
             bootstrap intervals over images and a permutation null (the same features, images shuffled);
  probe      a linear probe per block × t (probe.py), fitted on the probe-train images and scored on
             held-out probe-test images, with replicates that refit it on resampled training images and
             score it on resampled test images (intervals that include the fitting; paired);
  peak/drop  the peak block chosen on half the images and the drop after it measured, with a paired
             interval, on the other half (for the probe: fitted and scored on the other halves of its
             training and test images; stats.py, docs/statistics.md);
  baselines  the same numbers for the raw input x_t (its patches mean-pooled like the blocks, and the
             spatial thumbnail) and for the untrained model of the same architecture and initialisation,
             whose adaLN-Zero gates get PyTorch's default init (checkpoints.as_untrained: with zero gates
             every block would be the identity), each with its best block chosen on half A and measured on
             half B like a model's peak, so that "the best block beats the baseline" is a paired, held-out
             difference (report/baselines.py).
Features come from the feature store (`extract`: re-running with another metric, encoder or checkpoint
recomputes only what is new) or, for a model that changes under our feet (the trainer's EMA), straight
from memory with the same capture code. Report composition is report/compose.py's business.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from repa_probe import metrics as M
from repa_probe import stats
from repa_probe.spatial import SPATIAL_METRICS, spatial_matrix, spatial_measures
from repa_probe.capture import capture_blocks, extract, input_space, make_dataset
from repa_probe.checkpoints import LoadedCheckpoint
from repa_probe.config import AnalyzeConfig, Arg, cli_arg, python_arg  # noqa: F401 (from here too)
from repa_probe.data import ImageDataset, to_model_space
from repa_probe.probe import ProbeConfig, linear_probe
from repa_probe.runtime import AUTOCAST_DTYPES
from repa_probe.store import Features, FeatureStore, encoder_features
from repa_probe.tokens import cosine, zscored

PROBE_METRICS = {"probe_top1": "linear probe top-1 (%)", "probe_top5": "linear probe top-5 (%)"}
KINDS = {"model": "the checkpoint",
         "untrained": "the same architecture at initialisation (seeded); its zero-initialised adaLN-Zero gates get "
                      "PyTorch's default Linear init",
         "raw-input": "the noisy input x_t, its patches mean-pooled over the grid like the blocks",
         "raw-thumbnail": "the noisy input x_t average-pooled per patch (keeps the spatial layout)",
         "encoder": "the target encoder's own patch tokens (spatial measures, with --spatial)"}
COLUMNS = ["checkpoint", "kind", "block", "t", "metric", "encoder", "value", "ci_low", "ci_high", "null_low",
           "null_mean", "null_high", "n", "k"]
DROP_RESAMPLES = 100             # at least this many for the held-out drop (two sources per t)


TOKEN_PREFIX = "token_"          # an alignment metric over the token sample: token_cknna (tokens.py)
PROJECTOR_COSINE = "proj_cosine"  # mean cosine after the checkpoint's REPA projector (tokens.py)


def metric_label(metric: str) -> str:
    """How reports name a metric: the registry's label, or the probe's."""
    if metric in SPATIAL_METRICS:
        return f"{SPATIAL_METRICS[metric].label} (spatial)"
    if metric.startswith(TOKEN_PREFIX):
        return f"token {metric_label(metric.removeprefix(TOKEN_PREFIX))}"
    if metric == PROJECTOR_COSINE:
        return "projector cosine"
    return M.METRICS[metric].label if metric in M.METRICS else PROBE_METRICS.get(metric, metric)


def depends_on_n(metric: str) -> bool:
    """Whether a measure's value depends on the number of images n (and k): every alignment metric (kNN graphs,
    kernel biases; CKNNA ≈ n^−0.5 at fixed k). Probe accuracies and per-image means do not (docs/statistics.md)."""
    return metric.removeprefix(TOKEN_PREFIX) in M.METRICS


def display_scale(metric: str) -> float:
    """Values are stored as fractions; probe accuracies are shown in percent (the labels say so)."""
    return 100.0 if metric.startswith("probe") else 1.0


#################################################################################
#                                   Results                                     #
#################################################################################

@dataclass
class HeldOut:
    """The selection-aware drop after the peak, per t: the peak block chosen on half A of the images (seeded,
    class-balanced), the drop (that block − the last block) measured on the other half B, and its paired 95%
    interval over resamples of B (docs/statistics.md). For the probe both its training and its test images are
    halved (held_out_probe); n_select and n_measure count its test images."""
    peak: list[int]                 # the block chosen on half A, per t
    drop: np.ndarray                # [T]
    ci: np.ndarray                  # [T, 2]
    n_select: int                   # images in half A
    n_measure: int                  # images in half B
    best: np.ndarray | None = None             # [T] the chosen block's value on half B
    best_replicates: np.ndarray | None = None  # [R, T] its value on each resample of B (the same for every source)
    scale: np.ndarray | None = None            # [R] stats.subsample_scale of those resamples (None: full-size)


@dataclass
class Curves:
    """One measure of one model (or baseline) over blocks × t.

    value [T, B] for blocks `blocks` (block −1 = the raw input); ci [T, B, 2] (95%) or None. For paired
    statistics: `replicates` [R, T, B], the measure on each bootstrap replicate, with `scale` [R] the factor
    that turns their spread into the spread at the full sample (stats.subsample_scale for alignment's
    subsamples; 1 for the probe, whose replicates refit on a full-size resample of its training images and
    score on one of its test images); alignment curves keep `null` [P, T, B], the metric with the images
    shuffled; probe curves keep `hits` [T, B, n_test], whether each test image was classified right. Every
    checkpoint of one analysis sees the same images and the same replicates, so differences are paired."""
    checkpoint: str
    kind: str
    metric: str
    encoder: str
    ts: list[float]
    blocks: list[int]
    value: np.ndarray
    ci: np.ndarray | None = None
    replicates: np.ndarray | None = None
    scale: np.ndarray | None = None
    hits: np.ndarray | None = None
    null: np.ndarray | None = None
    held_out: HeldOut | None = None
    n: int | None = None            # images each value was computed on (a probe's: its test images)
    k: int | None = None            # neighbours, for a kNN metric

    def paired_replicates(self, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """([R, T, B] replicate values, [R] scale or None) from the same images for every checkpoint."""
        return self.replicates, self.scale

    def resolution(self, n_images: int | None = None) -> float:
        """The largest difference of this measure that is rounding (stats.resolution): half an image for the
        probe (of its n_test images, or of `n_images`, e.g. a held-out half), else 1e-6 of its scale."""
        counted = self.hits is not None
        return stats.resolution(self.value, (n_images or self.hits.shape[-1]) if counted else None)

    def rows(self) -> list[dict]:
        nan3 = np.full((3,) + self.value.shape, np.nan)
        alpha = (1 - stats.LEVEL) / 2
        null = np.stack([np.quantile(self.null, alpha, axis=0), self.null.mean(axis=0),
                         np.quantile(self.null, 1 - alpha, axis=0)]) if self.null is not None and len(self.null) \
            else nan3
        ci = self.ci if self.ci is not None else np.full(self.value.shape + (2,), np.nan)
        return [dict(checkpoint=self.checkpoint, kind=self.kind, block=block, t=t, metric=self.metric,
                     encoder=self.encoder, value=float(self.value[ti, bi]), ci_low=float(ci[ti, bi, 0]),
                     ci_high=float(ci[ti, bi, 1]), null_low=float(null[0, ti, bi]), null_mean=float(null[1, ti, bi]),
                     null_high=float(null[2, ti, bi]), n=self.n, k=self.k)
                for ti, t in enumerate(self.ts) for bi, block in enumerate(self.blocks)]


@dataclass
class Analysed:
    """What one checkpoint (or baseline) contributes: its name, kind, loaded checkpoint and curves, plus the
    t = 0 block features for the block × block similarity figures."""
    name: str
    kind: str
    ckpt: LoadedCheckpoint
    curves: list[Curves]
    block_feats_t0: np.ndarray | None = None


@dataclass
class Results:
    """Everything an analysis produced, in command-line order (baselines after their model)."""
    config: AnalyzeConfig
    analysed: list[Analysed]
    encoders: list
    timings: dict[str, float]
    images: dict[str, int] = field(default_factory=dict)   # images each set really held (after skipping)
    computed_chunks: int = 0                                # cache chunks this analysis computed itself

    @property
    def models(self) -> list[Analysed]:
        return [a for a in self.analysed if a.kind == "model"]

    def table(self) -> pd.DataFrame:
        """The tidy table: one row per checkpoint × block × t × metric × encoder (results.csv)."""
        rows = [r for a in self.analysed for c in a.curves for r in c.rows()]
        df = counts(pd.DataFrame.from_records(rows, columns=COLUMNS))
        return in_given_order(df, "checkpoint", ["metric", "encoder", "t", "block"]).reset_index(drop=True)

    def curves(self, checkpoint: str, metric: str, encoder: str = "") -> Curves:
        for a in self.analysed:
            for c in a.curves:
                if (c.checkpoint, c.metric, c.encoder) == (checkpoint, metric, encoder):
                    return c
        raise KeyError((checkpoint, metric, encoder))


def counts(df: pd.DataFrame) -> pd.DataFrame:
    """The n and k columns as whole numbers, empty where a measure has none (pandas would make them floats)."""
    return df.astype({c: "Int64" for c in ("n", "k") if c in df})


def in_given_order(df: pd.DataFrame, first: str, then: list[str]) -> pd.DataFrame:
    """Sorted by column `first` in order of first appearance (the command line's), then by `then`."""
    rank = {v: i for i, v in enumerate(dict.fromkeys(df[first]))}
    return df.sort_values([first, *then], key=lambda c: c.map(rank) if c.name == first else c, kind="stable")


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: the probe's interval before its refit replicates (test images
    only), kept to compare the two (analyses/probe_intervals.py)."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


#################################################################################
#                               Feature sources                                 #
#################################################################################

class Target(NamedTuple):
    """An encoder's features of one dataset and what every analysis of it compares against (Pipeline.target)."""
    ids: np.ndarray
    features: np.ndarray
    kernel: M.FeatureKernel                  # the full sample's: the kernels below are its subsets
    nulls: list[M.FeatureKernel]             # permuted targets (the permutation null)
    extras: dict                             # the encoder's other outputs {name: [N, ...]}
    replicates: list[M.View]                 # (rows, kernel) of every bootstrap subsample


class StoreSource:
    """Features and encoder outputs through the feature store: computed once, reused by later analyses. Under
    torchrun every rank runs the analysis (extract splits the images), so the metrics are split too."""

    collective = True

    def __init__(self, cfg: AnalyzeConfig):
        self.cfg, self.store = cfg, FeatureStore(cfg.cache)
        self.store.check_writable()
        self.computed = 0                     # chunks this process computed (the rest came from the cache)

    def features(self, ckpt: LoadedCheckpoint, dataset: ImageDataset, blocks: tuple[int, ...] | None,
                 measures: bool = True) -> Features:
        """Pooled block features of `dataset`; measures=False leaves out the per-image spatial measures and the
        token sample (the probe's images need neither)."""
        cfg = self.cfg
        capture = dataclasses.replace(cfg.capture(), blocks=blocks if blocks is not None else cfg.blocks)
        if not measures:
            capture = dataclasses.replace(capture, spatial=False, tokens=False)
        feats = extract(ckpt, dataset, capture, mode=cfg.mode, vae=cfg.vae, batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, device=cfg.device, cache_dir=cfg.cache, quiet=cfg.quiet)
        self.computed += feats.computed
        return feats

    def encoded(self, encoder, dataset: ImageDataset, grid: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """(image ids, pooled encoder features [N, D], {"spatial": measures of its tokens [N, M] with --spatial;
        "token", "token_mean", "token_std": [N, D] at each image's sampled cell with --tokens})."""
        cfg = self.cfg
        extras = None
        if cfg.spatial:                     # keyed by the measures it computes, as the blocks' capture is
            extras = {"spatial": functools.partial(spatial_matrix)}
            extras["spatial"].cache_key = "spatial: " + ", ".join(spatial_measures())
        feats = encoder_features(self.store, encoder, dataset, grid, extras=extras,
                                 cell_seed=cfg.seed if cfg.tokens else None, batch_size=cfg.batch_size,
                                 num_workers=cfg.num_workers, quiet=cfg.quiet)
        self.computed += feats.computed
        return feats.ids, np.asarray(feats["pooled"]), {k: np.asarray(v) for k, v in feats.arrays.items()
                                                        if k != "pooled"}


class MemorySource:
    """The same capture and encoders, in memory: for a model that changes under our feet (a trainer's EMA).
    Images and their model-space inputs are decoded once per dataset; no raw-input baseline. A trainer's main
    rank runs it alone."""

    collective = False

    def __init__(self, cfg: AnalyzeConfig, vae=None):
        self.cfg, self.vae, self.inputs = cfg, vae, {}

    def _images(self, dataset: ImageDataset) -> torch.Tensor:
        return torch.stack([dataset[i][0] for i in range(len(dataset))])

    def features(self, ckpt: LoadedCheckpoint, dataset: ImageDataset, blocks: tuple[int, ...] | None,
                 measures: bool = True) -> Features:
        cfg, device = self.cfg, next(ckpt.model.parameters()).device
        key = dataset.fingerprint()
        if key not in self.inputs:
            space, images = input_space(ckpt, cfg.mode), self._images(dataset)
            self.inputs[key] = torch.cat([
                to_model_space(images[i:i + cfg.batch_size].to(device), space.kind, self.vae, scale=space.scale,
                               shift=space.shift).cpu() for i in range(0, len(images), cfg.batch_size)])
        labels = torch.as_tensor(dataset.labels) if cfg.labels == "true" else None
        chosen = blocks if blocks is not None else cfg.blocks
        feats = capture_blocks(ckpt, self.inputs[key], labels, torch.as_tensor(dataset.ids), cfg.ts, seed=cfg.seed,
                               blocks=chosen, autocast_dtype=AUTOCAST_DTYPES[cfg.precision],
                               batch_size=cfg.batch_size)
        return Features(blocks=feats.numpy(), raw=None, labels=np.asarray(dataset.labels),
                        ids=np.asarray(dataset.ids), ts=list(cfg.ts), path=None,
                        manifest={"blocks": None if chosen is None else list(chosen)})

    def encoded(self, encoder, dataset: ImageDataset, grid: int) -> tuple[np.ndarray, np.ndarray, dict]:
        images, b = self._images(dataset), self.cfg.batch_size
        device = next(encoder.parameters()).device
        pooled = torch.cat([encoder.encode(images[i:i + b].to(device).float() / 255, grid)[1].cpu()
                            for i in range(0, len(images), b)])
        return np.asarray(dataset.ids), pooled.numpy(), {}


#################################################################################
#                                 The pipeline                                  #
#################################################################################

class Pipeline:
    """Holds what is shared across checkpoints: the encoders, their kernels, the store, the datasets.

    Analysing several checkpoints with one Pipeline encodes the images once per encoder and builds each
    encoder's kernel once. `source` gives the features (default: the store); `encoders` may be given
    already loaded (the trainer's); `arg` names the settings in bad-input errors (`cli_arg`, `python_arg`)."""

    def __init__(self, config: AnalyzeConfig, source=None, encoders: list | None = None, arg: Arg | None = None):
        self.cfg = config.resolved(arg)
        self.cfg.check_measurable(bool(encoders or self.cfg.encoders), arg)
        self.device = torch.device(self.cfg.device)
        self.source = source(self.cfg) if source is not None else StoreSource(self.cfg)
        self.split = getattr(self.source, "collective", False)    # metrics split across torchrun's ranks
        self.encoders = encoders if encoders is not None else self._load_encoders()
        self._targets: dict[tuple, tuple[np.ndarray, np.ndarray, M.FeatureKernel]] = {}
        self.timings: dict[str, float] = {"data+forwards": 0.0, "encoders": 0.0, "probes": 0.0, "metrics": 0.0}
        self.images: dict[str, int] = {}
        self._untrained_done: set[str] = set()

    def _load_encoders(self):
        from repa_probe.encoders import load_encoder
        return [load_encoder(spec, random_init=self.cfg.encoder_random_init, pretrained_download=self.cfg.download,
                             device=self.device, precision=self.cfg.encoder_precision)
                for spec in self.cfg.encoders]

    # ------------------------------------------------------------------ data
    def datasets(self, ckpt: LoadedCheckpoint):
        """(alignment set, probe train set, probe test set) at this model's image size."""
        size = input_space(ckpt, self.cfg.mode).image_size
        c = self.cfg
        align = make_dataset(c.data, size, c.n, c.seed, c.skip_bad_images)
        if not c.probe:
            return self._counted(align, None, None)
        if c.probe_train:
            train = make_dataset(c.probe_train, size, c.probe_n_train or c.n, c.seed, c.skip_bad_images)
            test = make_dataset(c.probe_test, size, c.probe_n_test or max(c.n // 2, 20), c.seed,
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
            return self._counted(align, None, None)
        return self._counted(align, train, test)

    def _counted(self, align, train, test):
        """Record how many images each set really holds, and every unreadable file that was skipped."""
        for name, d in (("alignment", align), ("probe train", train), ("probe test", test)):
            if d is not None:
                self.images[name] = len(d)
                for path in d.skipped:
                    note = f"skipped unreadable image (--skip-bad-images): {path}"
                    if note not in self.cfg.notes:
                        self.cfg.notes.append(note)
        return align, train, test

    def features(self, ckpt: LoadedCheckpoint, dataset, blocks: tuple[int, ...] | None = None,
                 measures: bool = True) -> Features:
        start = time.perf_counter()
        feats = self.source.features(ckpt, dataset, blocks, measures)
        self.timings["data+forwards"] += time.perf_counter() - start
        return feats

    def probe_sets(self, feats: Features, align, train, test, capture) -> tuple[Features, Features]:
        """Features of the probe's train and test images: rows of the alignment features `feats` when the
        probe splits those images (no second pass over them), else `capture(dataset)` for each set (or `feats`
        itself for a set that is the alignment set)."""
        if self.cfg.probe_train:
            return tuple(feats if d.fingerprint() == align.fingerprint() else capture(d) for d in (train, test))
        row = {image_id: i for i, image_id in enumerate(feats.ids)}
        blocks = np.asarray(feats.blocks)                        # read from the store once for both sets
        raws = {k: np.asarray(getattr(feats, k)) for k in ("raw", "raw_pooled") if getattr(feats, k) is not None}

        def rows(dataset):
            idx = np.array([row[i] for i in dataset.ids])
            return dataclasses.replace(feats, blocks=blocks[:, :, idx], labels=feats.labels[idx], ids=feats.ids[idx],
                                       **{k: v[:, idx] for k, v in raws.items()})
        return rows(train), rows(test)

    def target(self, encoder, dataset, grid: int, tokens: bool = False) -> Target:
        """The encoder's Target of `dataset`, once per encoder × subset. The features are the pooled tokens, or
        with tokens=True the token at each image's sampled cell (tokens.py)."""
        if getattr(encoder, "precision", None) == "auto":     # bf16 or fp32, from this dataset's first images
            from repa_probe.encoders import CHECK_IMAGES, choose_precision
            start = time.perf_counter()
            check = range(min(CHECK_IMAGES, len(dataset)))
            images = torch.stack([dataset[i][0] for i in check]).float().div(255).to(self.device)
            self.cfg.notes.append(choose_precision(encoder, images, grid))
            self.timings["encoders"] += time.perf_counter() - start
        key = (encoder.fingerprint(grid), dataset.fingerprint(), tokens)
        if key not in self._targets:
            if tokens:
                pooled = self.target(encoder, dataset, grid)
                ids, extras, features = pooled.ids, pooled.extras, pooled.extras["token"]
            else:
                start = time.perf_counter()
                ids, features, extras = self.source.encoded(encoder, dataset, grid)
                self.timings["encoders"] += time.perf_counter() - start
            start, cfg = time.perf_counter(), self.cfg
            what = f"encoder {encoder.name}{' tokens' if tokens else ''}"
            kernel = M.FeatureKernel.build(features, cfg.k, cfg.alignment_metrics, device=self.device, what=what)
            draws = stats.subsamples(len(ids), cfg.bootstrap, cfg.seed) if cfg.bootstrap else []
            self._targets[key] = Target(ids, features, kernel, M.permuted_targets(kernel, cfg.null, cfg.seed), extras,
                                        [(d, kernel.subset(d, what)) for d in draws])
            self.timings["metrics"] += time.perf_counter() - start
        return self._targets[key]

    # ------------------------------------------------------------------ numbers
    def alignment_curves(self, name: str, kind: str, src, ids, blocks: list[int], ts: list[float], dataset,
                         grid: int, bootstrap: bool, held_out: bool = False, tokens: bool = False) -> list[Curves]:
        """Every alignment metric × encoder for sources src [T, B, N, D]: values, the permutation null,
        bootstrap intervals and replicates (if `bootstrap`), the held-out drop (if `held_out`). tokens=True:
        src holds each block's token at the sampled cells, compared with the encoder's (metric "token_…")."""
        cfg, out = self.cfg, []
        for enc in self.encoders:
            tg = self.target(enc, dataset, grid, tokens)
            if not np.array_equal(tg.ids, ids):
                raise RuntimeError("encoder and model features hold different images")  # a bug, not user input
            start = time.perf_counter()
            replicates = tg.replicates if cfg.bootstrap and bootstrap else []
            drop_draws = self.held_out_draws(dataset.labels) if held_out else None
            half_a = stats.halves(dataset.labels, cfg.seed)[0]
            # one pass over the sources: each one's kernel, scored against the target, every permuted target,
            # every replicate's target and the held-out drop's selection half's
            views = [*((None, p) for p in tg.nulls), *replicates,
                     *([(half_a, tg.kernel.subset(half_a, "encoder, half A"))] if drop_draws else [])]
            scores, other = M.alignment(tg.kernel, src, cfg.alignment_metrics, k=cfg.k, device=self.device,
                                        views=views, split=self.split,
                                        desc=None if cfg.quiet else "alignment")
            null = {m: v[:len(tg.nulls)] for m, v in other.items()}
            reps = {m: v[len(tg.nulls):len(tg.nulls) + len(replicates)] for m, v in other.items()} if replicates else {}
            scale = stats.subsample_scale([len(d) for d, _ in replicates], len(ids)) if replicates else None
            cis = {m: stats.centred_interval(scores[m], r, scale) for m, r in reps.items()}
            drops = self.held_out_alignment(src, blocks, tg.features, {m: v[-1] for m, v in other.items()},
                                            dataset.labels, drop_draws) if drop_draws else {}
            self.timings["metrics"] += time.perf_counter() - start
            for metric, values in scores.items():
                out.append(Curves(name, kind, TOKEN_PREFIX * tokens + metric, enc.name, ts, blocks, values,
                                  cis.get(metric), reps.get(metric), scale, null=null[metric],
                                  held_out=drops.get(metric), n=len(ids),
                                  k=cfg.k if M.METRICS[metric].uses_k else None))
        return out

    def held_out_draws(self, labels: np.ndarray) -> list[np.ndarray] | None:
        """The subsamples of half B behind the held-out drop's interval (DROP_RESAMPLES at least), or None, with
        a note, when they hold too few images for k neighbours."""
        cfg = self.cfg
        draws = stats.subsamples(len(stats.halves(labels, cfg.seed)[1]), max(cfg.bootstrap, DROP_RESAMPLES), cfg.seed)
        if min(len(d) for d in draws) > cfg.k + 3:
            return draws
        note = (f"no held-out drop for alignment: half of the {len(labels)} images is too few for k = {cfg.k} "
                f"neighbours in its bootstrap subsamples (pass a larger --n)")
        if note not in cfg.notes:
            cfg.notes.append(note)
        return None

    def held_out_alignment(self, src, blocks: list[int], target: np.ndarray, on_a: dict[str, np.ndarray],
                           labels: np.ndarray, draws: list[np.ndarray]) -> dict[str, HeldOut]:
        """Per metric: the peak block on half A of the images (`on_a`: the values there), the drop after it on
        half B (paired interval over the subsamples `draws` of B)."""
        cfg = self.cfg
        half_a, half_b = stats.halves(labels, cfg.seed)
        scale = stats.subsample_scale([len(d) for d in draws], len(half_b))
        out = {}
        for m, values in on_a.items():
            peaks = stats.argmax_blocks(values, blocks, stats.resolution(values))           # [T]
            pairs = np.stack([np.stack([M.take_rows(src[ti, p], half_b), M.take_rows(src[ti, -1], half_b)])
                              for ti, p in enumerate(peaks)])                            # [T, 2, n_b, D]
            tgt = M.FeatureKernel.build(target[half_b], cfg.k, (m,), device=self.device, what="encoder, half B")
            on_b, reps = M.alignment(tgt, pairs, (m,), k=cfg.k, device=self.device, split=self.split,
                                     views=[(d, tgt.subset(d, "encoder, half B")) for d in draws])
            drop = on_b[m][:, 0] - on_b[m][:, 1]
            out[m] = HeldOut([blocks[p] for p in peaks], drop,
                             stats.centred_interval(drop, reps[m][..., 0] - reps[m][..., 1], scale),
                             len(half_a), len(half_b), on_b[m][:, 0], reps[m][..., 0], scale)
        return out

    def spatial_curves(self, name: str, kind: str, values, blocks: list[int], ts: list[float]) -> list[Curves]:
        """Every spatial measure of one source, values [T, B, N, M] per image (``per_image_curves``)."""
        return self.per_image_curves(name, kind, values, blocks, ts, list(SPATIAL_METRICS))

    def per_image_curves(self, name: str, kind: str, values, blocks: list[int], ts: list[float],
                         metrics: list[str], encoder: str = "") -> list[Curves]:
        """Measures taken per image, values [T, B, N, M] (M = len(metrics)): the mean over images, with
        paired subsample replicates (the same draws for every checkpoint) and their rescaled interval."""
        values = np.asarray(values, dtype=np.float64)
        n, cfg, out = values.shape[2], self.cfg, []
        draws = stats.subsamples(n, cfg.bootstrap, cfg.seed) if cfg.bootstrap else []
        scale = stats.subsample_scale([len(d) for d in draws], n) if draws else None
        for mi, metric in enumerate(metrics):
            v = values[..., mi]
            mean = np.nanmean(v, axis=-1)
            reps = np.stack([np.nanmean(v[..., d], axis=-1) for d in draws]) if draws else None
            ci = stats.centred_interval(mean, reps, scale) if draws else None
            out.append(Curves(name, kind, metric, encoder, ts, blocks, mean, ci, reps, scale, n=n))
        return out

    def projector_curves(self, name: str, ckpt: LoadedCheckpoint, feats: Features, dataset, grid: int
                         ) -> list[Curves]:
        """The projector cosine at the aligned block (tokens.py), for each analysis encoder that one of the
        checkpoint's projectors was trained toward: the one of the same name (else of the same width, if
        exactly one projector has it), against the target as trained (iREPA's z-score when recorded)."""
        p, out = ckpt.provenance, []
        trained = [e.partition("=")[0] for e in p.encoders]
        alpha = float(p.args.get("zscore_alpha", 0.6)) if p.args.get("spatial_norm") == "zscore" else None
        for enc in self.encoders:
            extras = self.target(enc, dataset, grid).extras
            widths, width = [np.shape(z)[-1] for z in feats.projected], extras["token"].shape[1]
            k = trained.index(enc.name) if enc.name in trained else \
                widths.index(width) if widths.count(width) == 1 else None
            if k is None or k >= len(widths) or widths[k] != width:
                continue
            z = extras["token"] if alpha is None else zscored(extras["token"], extras["token_mean"],
                                                               extras["token_std"], alpha)
            cos = np.stack([cosine(np.asarray(h), z) for h in feats.projected[k]])     # [T, N]
            out += self.per_image_curves(name, "model", cos[:, None, :, None], [ckpt.anatomy.aligned_block],
                                         feats.ts, [PROJECTOR_COSINE], enc.name)
        return out

    def probe_curves(self, name: str, kind: str, train_src, train_labels, test_src, test_labels,
                     blocks: list[int], ts: list[float], held_out: bool = False) -> list[Curves]:
        """Probe top-1 (top-5) per t × block, with `bootstrap` refit replicates (probe_draws) and their interval,
        and the held-out drop (held_out_probe) if asked."""
        cfg, start, n_test = self.cfg, time.perf_counter(), len(test_labels)
        draws = probe_draws(len(train_labels), n_test, cfg.bootstrap, cfg.seed) if cfg.bootstrap else None
        res = linear_probe(np.asarray(train_src), train_labels, np.asarray(test_src), test_labels,
                           ProbeConfig(seed=cfg.seed), device=self.device, resample=draws)
        drop = held_out_probe(np.asarray(train_src), train_labels, np.asarray(test_src), test_labels, blocks, cfg.seed,
                              max(cfg.bootstrap, DROP_RESAMPLES), device=self.device) if held_out else None
        self.timings["probes"] += time.perf_counter() - start
        out = []
        for metric in ("top1", "top5"):
            if metric not in res:
                continue
            acc = np.asarray(res[metric], dtype=np.float64)
            reps = np.moveaxis(res[f"{metric}_replicates"], -1, 0) if draws else None             # [R, T, B]
            ci = stats.centred_interval(acc, reps) if draws else None
            out.append(Curves(name, kind, f"probe_{metric}", "", ts, blocks, acc, ci, reps,
                              np.ones(cfg.bootstrap) if draws else None, hits=res["hits"] if metric == "top1" else None,
                              held_out=drop if metric == "top1" else None, n=n_test))
        return out

    def analyse(self, ckpt: LoadedCheckpoint, name: str) -> list[Analysed]:
        """All numbers for one checkpoint, plus (once per architecture) the untrained and raw baselines."""
        align, train, test = self.datasets(ckpt)
        feats = self.features(ckpt, align)
        blocks = self.blocks(ckpt)
        held_out = max(blocks) >= 2 and self.cfg.bootstrap > 0
        curves = self.alignment_curves(name, "model", feats.blocks, feats.ids, blocks, feats.ts, align,
                                       ckpt.anatomy.grid, True, held_out)
        probe_feats = None
        if train is not None:
            probe_feats = self.probe_sets(feats, align, train, test, lambda d: self.features(ckpt, d, measures=False))
            f_tr, f_te = probe_feats
            curves += self.probe_curves(name, "model", f_tr.blocks, f_tr.labels, f_te.blocks, f_te.labels,
                                        blocks, feats.ts, held_out)
        if feats.spatial is not None:
            curves += self.spatial_curves(name, "model", feats.spatial, blocks, feats.ts)
        if feats.tokens is not None:
            curves += self.alignment_curves(name, "model", feats.tokens, feats.ids, blocks, feats.ts, align,
                                            ckpt.anatomy.grid, True, held_out, tokens=True)
            curves += self.projector_curves(name, ckpt, feats, align, ckpt.anatomy.grid)
        out = [Analysed(name, "model", ckpt, curves, np.asarray(feats.blocks[0]) if self.cfg.blocks is None else None)]
        arch = arch_key(ckpt)
        if self.cfg.baselines and arch not in self._untrained_done:
            self._untrained_done.add(arch)
            out += self.baselines(ckpt, arch, feats, align, train, test, probe_feats)
        return out

    def blocks(self, ckpt: LoadedCheckpoint) -> list[int]:
        """The blocks analysed: --blocks, or 0..depth."""
        return list(self.cfg.blocks) if self.cfg.blocks is not None else list(range(ckpt.anatomy.depth + 1))

    def baselines(self, ckpt, arch, feats, align, train, test, probe_feats) -> list[Analysed]:
        """The raw input x_t (pooled like the blocks, and as a thumbnail) and the untrained model of the same
        architecture, on the same images and noise, each with its held-out best block (report/baselines.py)."""
        grid, held_out = ckpt.anatomy.grid, self.cfg.bootstrap > 0
        suffix = "" if len(self._untrained_done) == 1 else f" ({arch})"
        out = []
        for kind, field_name in (("raw-input", "raw_pooled"), ("raw-thumbnail", "raw")):
            label = kind.replace("-", " ") + suffix
            curves = self.alignment_curves(label, kind, np.asarray(getattr(feats, field_name))[:, None], feats.ids,
                                           [-1], feats.ts, align, grid, True, held_out)
            if train is not None:
                f_tr, f_te = probe_feats
                curves += self.probe_curves(label, kind, np.asarray(getattr(f_tr, field_name))[:, None], f_tr.labels,
                                            np.asarray(getattr(f_te, field_name))[:, None], f_te.labels, [-1],
                                            feats.ts, held_out)
            if kind == "raw-thumbnail" and feats.raw_spatial is not None:
                curves += self.spatial_curves(label, kind, np.asarray(feats.raw_spatial)[:, None], [-1], feats.ts)
            out.append(Analysed(label, kind, ckpt, curves))
        untrained = ckpt.family.untrained(ckpt, self.cfg.seed)
        u_feats, u_name, u_blocks = self.features(untrained, align), f"untrained{suffix}", self.blocks(ckpt)
        held_out = held_out and max(u_blocks) >= 2
        u = self.alignment_curves(u_name, "untrained", u_feats.blocks, u_feats.ids, u_blocks, feats.ts, align, grid,
                                  True, held_out)
        if train is not None:
            ut_tr, ut_te = self.probe_sets(u_feats, align, train, test,
                                           lambda d: self.features(untrained, d, measures=False))
            u += self.probe_curves(u_name, "untrained", ut_tr.blocks, ut_tr.labels, ut_te.blocks, ut_te.labels,
                                   u_blocks, feats.ts, held_out)
        if u_feats.spatial is not None:
            u += self.spatial_curves(u_name, "untrained", u_feats.spatial, u_blocks, feats.ts)
        if u_feats.tokens is not None:
            u += self.alignment_curves(u_name, "untrained", u_feats.tokens, u_feats.ids, u_blocks, feats.ts, align,
                                       grid, True, tokens=True)
        out.append(Analysed(u_name, "untrained", untrained, u))
        for enc in self.encoders if feats.spatial is not None else []:   # the target's own spatial structure
            spatial = self.target(enc, align, grid).extras["spatial"]
            reference = np.broadcast_to(spatial[None, None], (len(feats.ts), 1) + spatial.shape)
            out.append(Analysed(f"{enc.name}{suffix}", "encoder", ckpt,
                                self.spatial_curves(f"{enc.name}{suffix}", "encoder", reference, [-1], feats.ts)))
        return out


def probe_draws(n_train: int, n_test: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The probe's bootstrap replicates: draw counts of its training and of its test images, [n_boot, n_train] and
    [n_boot, n_test] (stats.draw_counts, independent streams). They depend on the sizes and the seed only, so
    every block, t and checkpoint of an analysis shares them, and differences are paired."""
    return stats.draw_counts(n_train, n_boot, [seed, 1]), stats.draw_counts(n_test, n_boot, [seed, 2])


def held_out_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                   blocks: list[int], seed: int, n_boot: int, config: ProbeConfig | None = None,
                   device: torch.device | str | None = None) -> HeldOut:
    """The held-out drop of a probe from its features [T, B, n, D]: the training and the test images are each
    split into class-balanced halves A and B; probes fitted on training half A and scored on test half A
    choose the peak, probes fitted on training half B and scored on test half B measure the drop (peak − last
    block), with an interval over n_boot replicates that refit on resampled training half B and score on
    resampled test half B. A block whose fit was lucky on A is fitted anew on B, so its luck does not carry
    over into the drop."""
    cfg = config or ProbeConfig(seed=seed)
    (train_a, train_b), (test_a, test_b) = stats.halves(train_labels, seed), stats.halves(test_labels, seed)
    on_a = linear_probe(train[..., train_a, :], train_labels[train_a], test[..., test_a, :], test_labels[test_a], cfg,
                        device)["top1"]                                                  # [T, B]
    peaks = stats.argmax_blocks(on_a, blocks)
    pairs = np.stack([peaks, np.full_like(peaks, len(blocks) - 1)], axis=-1)             # [T, 2]: peak, last
    t = np.arange(len(peaks))[:, None]
    on_b = linear_probe(train[t, pairs][..., train_b, :], train_labels[train_b], test[t, pairs][..., test_b, :],
                        test_labels[test_b], cfg, device, resample=probe_draws(len(train_b), len(test_b), n_boot, seed))
    best, reps = on_b["top1"][:, 0], on_b["top1_replicates"]                                # [T], [T, 2, R]
    drop = best - on_b["top1"][:, 1]
    return HeldOut([blocks[p] for p in peaks], drop, stats.centred_interval(drop, (reps[:, 0] - reps[:, 1]).T),
                   len(test_a), len(test_b), best, reps[:, 0].T)


def arch_key(ckpt: LoadedCheckpoint) -> str:
    """Which baselines a checkpoint shares: those of the same architecture and input."""
    a = ckpt.anatomy
    return f"{a.name}, {a.input.channels}×{a.input.size}²"


def run(checkpoints: Sequence[LoadedCheckpoint], names: Sequence[str], config: AnalyzeConfig,
        pipeline: Pipeline | None = None) -> Results:
    """Analyse loaded checkpoints (same images, same noise) → Results."""
    pipeline = pipeline or Pipeline(config)
    analysed = [a for ckpt, name in zip(checkpoints, names) for a in pipeline.analyse(ckpt, name)]
    return Results(pipeline.cfg, analysed, pipeline.encoders, dict(pipeline.timings), dict(pipeline.images),
                   getattr(pipeline.source, "computed", 0))
