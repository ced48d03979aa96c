"""The analysis pipeline: checkpoints + images → per block × t measures with intervals → a Results object.

For each checkpoint, on the same images and the same seeded noise (docs/analysis.md):
  alignment  every registered alignment metric asked for (CKNNA by default; metrics.py) between every
             block's mean-pooled features at every t and each target encoder's pooled patch tokens, with
             bootstrap intervals over images and a permutation null (the same features, images shuffled);
  probe      a linear probe per block × t (probe.py), fitted on the probe-train images and scored on
             held-out probe-test images (Wilson intervals; per-image hits kept for paired statistics);
  peak/drop  the peak block chosen on half the images and the drop after it measured, with a paired
             interval, on the other half (stats.py, docs/statistics.md);
  baselines  the same numbers for the raw input x_t (its patches mean-pooled like the blocks, and the
             spatial thumbnail) and for the untrained model of the same architecture and initialisation
             (with adaLN-Zero every untrained block is the identity: blocks 0 and 1 are captured, checked
             equal, and block 0 stands for all).
Features come from the feature store (`extract`: re-running with another metric, encoder or checkpoint
recomputes only what is new) or, for a model that changes under our feet (the trainer's EMA), straight
from memory with the same capture code. Report composition is report/compose.py's business.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from repa_probe import metrics as M
from repa_probe import stats
from repa_probe.spatial import SPATIAL_METRICS, spatial_matrix
from repa_probe.capture import (DEFAULT_TS, CaptureConfig, capture_batch, capture_blocks, extract, input_space,
                                make_dataset)
from repa_probe.checkpoints import LoadedCheckpoint
from repa_probe.data import ImageDataset, list_images, to_model_space
from repa_probe.errors import UserError
from repa_probe.probe import ProbeConfig, linear_probe
from repa_probe.runtime import AUTOCAST_DTYPES, resolve_device, resolve_precision
from repa_probe.store import Features, FeatureStore, encoder_features
from repa_probe.tokens import cosine, zscored

CPU_DEFAULT_N, GPU_DEFAULT_N = 500, 10_000
PROBE_METRICS = {"probe_top1": "linear probe top-1 (%)", "probe_top5": "linear probe top-5 (%)"}
KINDS = {"model": "the checkpoint", "untrained": "the same architecture at initialisation",
         "raw-input": "the noisy input x_t, its patches mean-pooled over the grid like the blocks",
         "raw-thumbnail": "the noisy input x_t average-pooled per patch (keeps the spatial layout)",
         "encoder": "the target encoder's own patch tokens (spatial measures, with --spatial)"}
COLUMNS = ["checkpoint", "kind", "block", "t", "metric", "encoder", "value", "ci_low", "ci_high", "null_low",
           "null_mean", "null_high"]
PROBE_RESAMPLES = 1000           # bootstrap resamples of the probe's test images (means: cheap)
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


def display_scale(metric: str) -> float:
    """Values are stored as fractions; probe accuracies are shown in percent (the labels say so)."""
    return 100.0 if metric.startswith("probe") else 1.0


@dataclass
class AnalyzeConfig:
    """Every knob of an analysis; plain data, recorded in summary.json."""
    data: str                                   # ImageFolder tree for alignment (and probes, if no probe dirs)
    n: int | None = None                        # images (default: 10,000 on a GPU, 500 on the CPU)
    ts: tuple[float, ...] = DEFAULT_TS
    encoders: list[str] = field(default_factory=list)   # NAME[=WEIGHTS]
    encoder_random_init: bool = False
    encoder_precision: str = "auto"             # encoders: bf16 autocast where measured harmless, or fp32/bf16
    download: bool = False                      # fetch missing official checkpoints / encoder weights (download.py)
    probe_train: str | None = None              # ImageFolder trees for the probe; default: split --data
    probe_test: str | None = None
    probe_n_train: int | None = None            # default: n
    probe_n_test: int | None = None             # default: n // 2
    probe: bool = True
    spatial: bool = False                       # iREPA's spatial measures of every block's tokens (spatial.py)
    tokens: bool = False                        # token-level alignment on a seeded token sample (tokens.py)
    alignment_metrics: tuple[str, ...] = ("cknna",)
    k: int = 10
    bootstrap: int = 20                         # bootstrap replicates for alignment intervals (0 = none)
    null: int = 20                              # permutation draws for the alignment null (0 = none)
    baselines: bool = True
    blocks: tuple[int, ...] | None = None       # blocks to analyse (0..depth); None = all
    seed: int = 0                               # noise seed and subset seed
    labels: str = "null"
    precision: str = "auto"                     # autocast: auto = bf16 on GPUs, fp32 on the CPU
    compile: bool = False                       # torch.compile the model's blocks during capture
    batch_size: int = 64
    num_workers: int = 0
    device: str | None = None
    cache: str | None = None
    mode: str | None = None
    vae: str | None = None
    skip_bad_images: bool = False
    convention: str | None = None
    weights: str = "ema"
    heads: int | None = None
    text_embeddings: str | None = None          # a prompt's embeddings for text-conditioned diffusers models
    quiet: bool = False
    samples: int = 0                            # >0: a page with a grid of this many samples per checkpoint
    notes: list[str] = field(default_factory=list)

    def resolved(self) -> "AnalyzeConfig":
        """Fill the device-dependent defaults and check the flags (before any compute)."""
        cfg = AnalyzeConfig(**{**asdict(self), "notes": list(self.notes)})
        device = resolve_device(cfg.device)
        cfg.device = str(device)
        if cfg.n is None:
            cfg.n = GPU_DEFAULT_N if device.type == "cuda" else CPU_DEFAULT_N
            if device.type != "cuda":
                cfg.notes.append(f"no GPU: analysed n = {cfg.n} images (pass --n for more)")
        cfg.precision = resolve_precision(cfg.precision, device)
        for flag, value, least in (("--n", cfg.n, 1), ("--probe-n-train", cfg.probe_n_train, 1),
                                   ("--probe-n-test", cfg.probe_n_test, 1), ("--k", cfg.k, 1),
                                   ("--bootstrap", cfg.bootstrap, 0), ("--null", cfg.null, 0),
                                   ("--samples", cfg.samples, 0), ("--batch-size", cfg.batch_size, 1),
                                   ("--workers", cfg.num_workers, 0), ("--heads", cfg.heads, 1)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise UserError(f"{flag} {value!r} must be an integer ≥ {least}")
        if not cfg.ts or any(not 0 <= t <= 1 for t in cfg.ts) or len(set(cfg.ts)) != len(cfg.ts):
            raise UserError(f"--t {','.join(map(str, cfg.ts))}: distinct noise levels in [0, 1] (0 = clean data)")
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

    def check_measurable(self, encoders: bool) -> None:
        """Something to measure: an encoder (alignment), or labelled images (the probe)."""
        if not encoders and not (self.probe and len(list_images(self.probe_train or self.data)[2]) > 1):
            why = "--no-probe" if not self.probe else f"'{self.probe_train or self.data}' has no class folders"
            raise UserError(f"nothing to measure: no --encoder for alignment, and {why} for the probe; pass "
                            f"--encoder NAME (e.g. dinov2-vit-b) or labelled images")

    def capture(self) -> CaptureConfig:
        return CaptureConfig(ts=self.ts, seed=self.seed, labels=self.labels, precision=self.precision,
                             blocks=self.blocks, spatial=self.spatial, tokens=self.tokens, compile=self.compile)


def _check_image_folder(path: str, flag: str) -> None:
    if not str(path).strip():
        raise UserError(f"{flag} is empty: name an ImageFolder tree DIR/<class>/<image>")
    try:
        list_images(path)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


#################################################################################
#                                   Results                                     #
#################################################################################

@dataclass
class HeldOut:
    """The selection-aware drop after the peak, per t: the peak block chosen on half A of the images (seeded,
    class-balanced), the drop (that block − the last block) measured on the other half B, and its paired 95%
    interval over resamples of B (docs/statistics.md)."""
    peak: list[int]                 # the block chosen on half A, per t
    drop: np.ndarray                # [T]
    ci: np.ndarray                  # [T, 2]
    n_select: int                   # images in half A
    n_measure: int                  # images in half B


@dataclass
class Curves:
    """One measure of one model (or baseline) over blocks × t.

    value [T, B] for blocks `blocks` (block −1 = the raw input); ci [T, B, 2] (95%) or None. For paired
    statistics: alignment curves keep `replicates` [R, T, B], the metric on each bootstrap subsample of the
    images, with `scale` [R] (stats.subsample_scale), and `null` [P, T, B], the metric with the images
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

    def paired_replicates(self, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """([R, T, B] replicate values, [R] scale or None) from the same images for every checkpoint."""
        if self.hits is not None:
            return stats.hit_replicates(self.hits, stats.resamples(self.hits.shape[-1], PROBE_RESAMPLES, seed)), None
        return self.replicates, self.scale

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
                     null_high=float(null[2, ti, bi]))
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
        df = pd.DataFrame.from_records(rows, columns=COLUMNS)
        return in_given_order(df, "checkpoint", ["metric", "encoder", "t", "block"]).reset_index(drop=True)

    def curves(self, checkpoint: str, metric: str, encoder: str = "") -> Curves:
        for a in self.analysed:
            for c in a.curves:
                if (c.checkpoint, c.metric, c.encoder) == (checkpoint, metric, encoder):
                    return c
        raise KeyError((checkpoint, metric, encoder))


def in_given_order(df: pd.DataFrame, first: str, then: list[str]) -> pd.DataFrame:
    """Sorted by column `first` in order of first appearance (the command line's), then by `then`."""
    rank = {v: i for i, v in enumerate(dict.fromkeys(df[first]))}
    return df.sort_values([first, *then], key=lambda c: c.map(rank) if c.name == first else c, kind="stable")


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (used for probe accuracy on n held-out images)."""
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
        extras = {"spatial": spatial_matrix} if cfg.spatial else None
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
    already loaded (the trainer's)."""

    def __init__(self, config: AnalyzeConfig, source=None, encoders: list | None = None):
        self.cfg = config.resolved()
        self.cfg.check_measurable(bool(encoders or self.cfg.encoders))
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

    def untrained_features(self, untrained: LoadedCheckpoint, dataset, measures: bool = True) -> Features:
        """Block 0 of the untrained model, as [n_t, 1, N, D], when its family initialises every block as the
        identity (adaLN-Zero): block 0 alone is captured (the pass stops before block 1) and stands for all
        of them, once blocks 0 and 1 are checked equal on one small batch (the identity holds for any input,
        so the check need not cost a block's pass over every image). Otherwise every block is captured."""
        if not untrained.anatomy.untrained_identity:
            return self.features(untrained, dataset, measures=measures)
        space = untrained.anatomy.input
        x0 = torch.randn(4, space.channels, space.size, space.size, generator=torch.Generator().manual_seed(0))
        b01 = capture_batch(untrained, x0, None, torch.arange(4), self.cfg.ts[0], seed=self.cfg.seed, blocks=(0, 1))[0]
        if not torch.equal(b01[0], b01[1]):
            raise RuntimeError("an untrained block changed its input: adaLN-Zero initialisation is broken")
        return self.features(untrained, dataset, blocks=(0,), measures=measures)

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
                                  held_out=drops.get(metric)))
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
            peaks = stats.argmax_blocks(values, blocks)                                   # [T]
            pairs = np.stack([np.stack([M.take_rows(src[ti, p], half_b), M.take_rows(src[ti, -1], half_b)])
                              for ti, p in enumerate(peaks)])                            # [T, 2, n_b, D]
            tgt = M.FeatureKernel.build(target[half_b], cfg.k, (m,), device=self.device, what="encoder, half B")
            on_b, reps = M.alignment(tgt, pairs, (m,), k=cfg.k, device=self.device, split=self.split,
                                     views=[(d, tgt.subset(d, "encoder, half B")) for d in draws])
            drop = on_b[m][:, 0] - on_b[m][:, 1]
            out[m] = HeldOut([blocks[p] for p in peaks], drop,
                             stats.centred_interval(drop, reps[m][..., 0] - reps[m][..., 1], scale),
                             len(half_a), len(half_b))
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
            out.append(Curves(name, kind, metric, encoder, ts, blocks, mean, ci, reps, scale))
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
        start = time.perf_counter()
        res = linear_probe(np.asarray(train_src), train_labels, np.asarray(test_src), test_labels,
                           ProbeConfig(seed=self.cfg.seed), device=self.device)
        self.timings["probes"] += time.perf_counter() - start
        n_test = len(test_labels)
        out = []
        for metric in ("top1", "top5"):
            if metric not in res:
                continue
            acc = np.asarray(res[metric], dtype=np.float64)
            ci = np.array([wilson_interval(round(a * n_test), n_test) for a in acc.ravel()]).reshape(acc.shape + (2,))
            hits = res["hits"] if metric == "top1" else None
            drop = held_out_hits(hits, blocks, test_labels, self.cfg.seed) if held_out and hits is not None else None
            out.append(Curves(name, kind, f"probe_{metric}", "", ts, blocks, acc, ci, hits=hits, held_out=drop))
        return out

    def analyse(self, ckpt: LoadedCheckpoint, name: str) -> list[Analysed]:
        """All numbers for one checkpoint, plus (once per architecture) the untrained and raw baselines."""
        align, train, test = self.datasets(ckpt)
        feats = self.features(ckpt, align)
        blocks = list(self.cfg.blocks) if self.cfg.blocks is not None else list(range(ckpt.anatomy.depth + 1))
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
        arch = _arch_key(ckpt)
        if self.cfg.baselines and arch not in self._untrained_done:
            self._untrained_done.add(arch)
            out += self.baselines(ckpt, arch, feats, align, train, test, probe_feats)
        return out

    def baselines(self, ckpt, arch, feats, align, train, test, probe_feats) -> list[Analysed]:
        """The raw input x_t (pooled like the blocks, and as a thumbnail) and the untrained model of the same
        architecture, on the same images and noise."""
        grid, depth = ckpt.anatomy.grid, ckpt.anatomy.depth
        suffix = "" if len(self._untrained_done) == 1 else f" ({arch})"
        out = []
        for kind, field_name in (("raw-input", "raw_pooled"), ("raw-thumbnail", "raw")):
            label = kind.replace("-", " ") + suffix
            curves = self.alignment_curves(label, kind, np.asarray(getattr(feats, field_name))[:, None], feats.ids,
                                           [-1], feats.ts, align, grid, True)
            if train is not None:
                f_tr, f_te = probe_feats
                curves += self.probe_curves(label, kind, np.asarray(getattr(f_tr, field_name))[:, None], f_tr.labels,
                                            np.asarray(getattr(f_te, field_name))[:, None], f_te.labels, [-1],
                                            feats.ts)
            if kind == "raw-thumbnail" and feats.raw_spatial is not None:
                curves += self.spatial_curves(label, kind, np.asarray(feats.raw_spatial)[:, None], [-1], feats.ts)
            out.append(Analysed(label, kind, ckpt, curves))
        untrained = ckpt.family.untrained(ckpt, self.cfg.seed)
        u_feats = self.untrained_features(untrained, align)
        u_name = f"untrained{suffix}"
        u_blocks = [0] if u_feats.blocks.shape[1] == 1 else list(range(u_feats.blocks.shape[1]))
        u = self.alignment_curves(u_name, "untrained", u_feats.blocks, u_feats.ids, u_blocks, feats.ts, align, grid,
                                  True)
        if train is not None:
            ut_tr, ut_te = self.probe_sets(u_feats, align, train, test,
                                           lambda d: self.untrained_features(untrained, d, measures=False))
            u += self.probe_curves(u_name, "untrained", ut_tr.blocks, ut_tr.labels, ut_te.blocks, ut_te.labels,
                                   u_blocks, feats.ts)
        if u_feats.spatial is not None:
            u += self.spatial_curves(u_name, "untrained", u_feats.spatial, u_blocks, feats.ts)
        if u_feats.tokens is not None:
            u += self.alignment_curves(u_name, "untrained", u_feats.tokens, u_feats.ids, u_blocks, feats.ts, align,
                                       grid, True, tokens=True)
        if u_blocks == [0]:                                  # block 0 stands for every block
            u = [_repeat_block(c, depth + 1) for c in u]
        out.append(Analysed(u_name, "untrained", untrained, u))
        for enc in self.encoders if feats.spatial is not None else []:   # the target's own spatial structure
            spatial = self.target(enc, align, grid).extras["spatial"]
            reference = np.broadcast_to(spatial[None, None], (len(feats.ts), 1) + spatial.shape)
            out.append(Analysed(f"{enc.name}{suffix}", "encoder", ckpt,
                                self.spatial_curves(f"{enc.name}{suffix}", "encoder", reference, [-1], feats.ts)))
        return out


def held_out_hits(hits: np.ndarray, blocks: list[int], labels: np.ndarray, seed: int) -> HeldOut:
    """The held-out drop of a probe from its per-image hits [T, B, n]: the peak on half A of the test images
    (class-balanced), the drop on half B with an interval over PROBE_RESAMPLES resamples of B."""
    half_a, half_b = stats.halves(labels, seed)
    peaks = stats.argmax_blocks(hits[..., half_a].mean(axis=-1), blocks)                # [T]
    t = np.arange(len(peaks))
    diff = hits[t, peaks][:, half_b].astype(np.float64) - hits[t, -1][:, half_b]          # [T, n_b]
    reps = stats.hit_replicates(diff, stats.resamples(len(half_b), PROBE_RESAMPLES, seed))
    drop = diff.mean(axis=-1)
    return HeldOut([blocks[p] for p in peaks], drop, stats.centred_interval(drop, reps), len(half_a), len(half_b))


def _repeat_block(c: Curves, n: int) -> Curves:
    """A curve measured at block 0 alone, standing for blocks 0..n−1 (an untrained adaLN-Zero model)."""
    def rep(x, axis):
        return None if x is None else np.repeat(x, n, axis=axis)
    return dataclasses.replace(c, blocks=list(range(n)), value=rep(c.value, 1), ci=rep(c.ci, 1),
                               replicates=rep(c.replicates, 2), hits=rep(c.hits, 1), null=rep(c.null, 2))


def _arch_key(ckpt: LoadedCheckpoint) -> str:
    a = ckpt.anatomy
    return f"{a.name}, {a.input.channels}×{a.input.size}²"


def run(checkpoints: Sequence[LoadedCheckpoint], names: Sequence[str], config: AnalyzeConfig,
        pipeline: Pipeline | None = None) -> Results:
    """Analyse loaded checkpoints (same images, same noise) → Results."""
    pipeline = pipeline or Pipeline(config)
    analysed = [a for ckpt, name in zip(checkpoints, names) for a in pipeline.analyse(ckpt, name)]
    return Results(pipeline.cfg, analysed, pipeline.encoders, dict(pipeline.timings), dict(pipeline.images),
                   getattr(pipeline.source, "computed", 0))
