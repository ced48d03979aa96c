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
  cls token  for a model that carries a class token beside its image tokens (REG's; the family's `class_token`),
             the same measures of that token's hidden state after every block, as a source of its own (kind
             "class-token"), on the same images and noise;
  baselines  the same numbers for the raw input x_t (its patches mean-pooled like the blocks, and the
             spatial thumbnail) and for the untrained model of the same architecture and initialisation,
             whose adaLN-Zero gates get PyTorch's default init (checkpoints.as_untrained: with zero gates
             every block would be the identity), each with its best block chosen on half A and measured on
             half B like a model's peak, so that "the best block beats the baseline" is a paired, held-out
             difference (findings/baselines.py).
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

from repa_probe import attention  # noqa: F401  (registers the attention-map measure)
from repa_probe import self_similarity  # noqa: F401  (registers the SRA view's measure)
from repa_probe import metrics as M
from repa_probe import stats
from repa_probe.capture import by_reduction, capture_in_memory, extract, input_space, make_dataset, reductions_named
from repa_probe.checkpoints import LoadedCheckpoint
from repa_probe.config import AnalyzeConfig, Arg, cli_arg, python_arg  # noqa: F401 (from here too)
from repa_probe.curves import Curves, HeldOut  # noqa: F401 (from here too)
from repa_probe.data import ImageDataset, to_model_space
from repa_probe.measures import (DROP_RESAMPLES, PROBE_METRICS, PROJECTOR_COSINE, TOKEN_PREFIX, Source,  # noqa: F401
                                 depends_on_n, display_scale, held_out_probe, metric_label, needed_reductions,
                                 probe_draws, selected)
from repa_probe.reductions import Batch
from repa_probe.runtime import AUTOCAST_DTYPES
from repa_probe.store import Features, FeatureStore, encode_batch, encoder_features

KINDS = {"model": "the checkpoint",
         "class-token": "the class token a REG checkpoint carries first through its blocks (its input 0, as when it is "
                        "run without an encoder): its hidden state after each block (entering block 1 it is the "
                        "same for every image)",
         "untrained": "the same architecture at initialisation (seeded); its zero-initialised adaLN-Zero gates get "
                      "PyTorch's default Linear init",
         "raw-input": "the noisy input x_t, its patches mean-pooled over the grid like the blocks",
         "raw-thumbnail": "the noisy input x_t average-pooled per patch (keeps the spatial layout)",
         "encoder": "the target encoder's own patch tokens (spatial measures, with --spatial)"}
BASELINES = ("untrained", "raw-input", "raw-thumbnail", "encoder")   # the kinds a model's best block is held against
CLASS_TOKEN = " · class token"                                        # a class-token source's name: its model's + this
COLUMNS = ["checkpoint", "kind", "block", "t", "metric", "encoder", "value", "ci_low", "ci_high", "null_low",
           "null_mean", "null_high", "n", "k"]


#################################################################################
#                                   Results                                     #
#################################################################################

@dataclass
class Analysed:
    """What one checkpoint (or baseline) contributes: its name, kind, loaded checkpoint and curves, plus a model's
    pooled block features [T, B, N, D] (every block analysed) for compare's blocks of one model × another's
    (findings/similarity.py)."""
    name: str
    kind: str
    ckpt: LoadedCheckpoint
    curves: list[Curves]
    block_feats: np.ndarray | None = None


@dataclass
class Results:
    """Everything an analysis produced, in command-line order (baselines after their model)."""
    config: AnalyzeConfig
    analysed: list[Analysed]
    encoders: list
    timings: dict[str, float]
    images: dict[str, int] = field(default_factory=dict)   # images each set really held (after skipping)
    computed_chunks: int = 0                                # cache chunks this analysis computed itself
    generation: pd.DataFrame | None = None                  # --gen: gen.csv's rows (generation.score_models)

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


def encoder_reductions(cfg: AnalyzeConfig, seed: int) -> dict:
    """The token reductions the selected measures need of the encoders' own tokens (encoder=True), as
    store.encoder_features' extras: {name: fn(tokens, ids)}, each keyed by its name and version."""
    extras = {}
    for r in reductions_named(needed_reductions(cfg)):
        if r.encoder:
            extras[r.name] = functools.partial(_on_encoder, r, seed)
            extras[r.name].cache_key = r.key()
    return extras


def _on_encoder(reduction, seed: int, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return reduction.fn(tokens, Batch(ids, seed))


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
        """Pooled block features of `dataset`, with the token reductions the measures need; measures=False
        leaves those out (the probe's images need none)."""
        cfg = self.cfg
        capture = dataclasses.replace(cfg.capture(), blocks=blocks if blocks is not None else cfg.blocks)
        if not measures:
            capture = dataclasses.replace(capture, reductions=())
        feats = extract(ckpt, dataset, capture, mode=cfg.mode, vae=cfg.vae, batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, device=cfg.device, cache_dir=cfg.cache, quiet=cfg.quiet)
        self.computed += feats.computed
        return feats

    def encoded(self, encoder, dataset: ImageDataset, grid: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """(image ids, pooled encoder features [N, D], {each encoder reduction the measures need: [N, ...];
        "token", "token_mean", "token_std": [N, D] at each image's sampled cell with --tokens})."""
        cfg = self.cfg
        feats = encoder_features(self.store, encoder, dataset, grid, extras=encoder_reductions(cfg, cfg.seed) or None,
                                 cell_seed=cfg.seed if cfg.tokens else None, batch_size=cfg.batch_size,
                                 num_workers=cfg.num_workers, quiet=cfg.quiet)
        self.computed += feats.computed
        return feats.ids, np.asarray(feats["pooled"]), {k: np.asarray(v) for k, v in feats.arrays.items()
                                                        if k != "pooled"}


class MemorySource:
    """The same capture and encoders, in memory: for a model that changes under our feet (a trainer's EMA).
    Images and their model-space inputs are decoded once per dataset. A trainer's main rank runs it alone."""

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
        reductions = reductions_named(needed_reductions(cfg) if measures else ())
        feats, arrays = capture_in_memory(ckpt, self.inputs[key], labels, torch.as_tensor(dataset.ids), cfg.ts,
                                          seed=cfg.seed, blocks=chosen, autocast_dtype=AUTOCAST_DTYPES[cfg.precision],
                                          batch_size=cfg.batch_size, reductions=reductions)
        arrays = {k: v.numpy() for k, v in arrays.items()}
        return Features(blocks=feats.numpy(), raw=arrays["raw"], raw_pooled=arrays["raw_pooled"],
                        labels=np.asarray(dataset.labels), ids=np.asarray(dataset.ids), ts=list(cfg.ts), path=None,
                        manifest={"blocks": None if chosen is None else list(chosen)},
                        reduced={r.name: by_reduction(arrays, r) for r in reductions})

    def encoded(self, encoder, dataset: ImageDataset, grid: int) -> tuple[np.ndarray, np.ndarray, dict]:
        images, b, cfg = self._images(dataset), self.cfg.batch_size, self.cfg
        device, ids = next(encoder.parameters()).device, torch.as_tensor(dataset.ids)
        parts = [encode_batch(encoder, images[i:i + b].to(device), ids[i:i + b], grid,
                              extras=encoder_reductions(cfg, cfg.seed), cell_seed=cfg.seed if cfg.tokens else None)
                 for i in range(0, len(images), b)]
        arrays = {k: torch.cat([p[k].cpu() for p in parts]).float().numpy() for k in parts[0]}
        return np.asarray(dataset.ids), arrays.pop("pooled"), arrays


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
        self.measures = selected(self.cfg)
        self._targets: dict[tuple, Target] = {}
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
            self._note(f"no probe: '{train.root}' has no class labels (one class); pass --probe-train/--probe-test "
                       f"with labelled ImageFolder trees to get one")
            return self._counted(align, None, None)
        return self._counted(align, train, test)

    def _note(self, note: str) -> None:
        if note not in self.cfg.notes:
            self.cfg.notes.append(note)

    def _counted(self, align, train, test):
        """Record how many images each set really holds, and every unreadable file that was skipped."""
        for name, d in (("alignment", align), ("probe train", train), ("probe test", test)):
            if d is not None:
                self.images[name] = len(d)
                for path in d.skipped:
                    self._note(f"skipped unreadable image (--skip-bad-images): {path}")
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
    def analyse(self, ckpt: LoadedCheckpoint, name: str, class_token: bool = True) -> list[Analysed]:
        """Every selected measure of one checkpoint, of its class token if it carries one (and `class_token`), and
        (once per architecture) of its baselines: the raw input (pooled like the blocks, and as a thumbnail), the
        untrained model of the same architecture, on the same images and noise, and the encoders' own tokens
        (findings/baselines.py)."""
        data = self.datasets(ckpt)
        model, feats, probe_feats = self.source_of(ckpt, name, "model", data)
        pooled = feats.blocks if self.cfg.blocks is None else None
        sources, arch = [model], arch_key(ckpt)
        # a class token (REG's) as a source of its own, without token reductions, from block 1: entering it, the
        # token (fed 0) is one vector for every image, nothing to measure
        view = ckpt.family.class_token(ckpt) if class_token else None
        blocks = tuple(b for b in self.blocks(ckpt) if b >= 1)
        if view is not None and blocks:
            sources.append(self.source_of(view, name + CLASS_TOKEN, "class-token", data, blocks, measures=False)[0])
        if self.cfg.baselines and arch not in self._untrained_done:
            self._untrained_done.add(arch)
            suffix = "" if len(self._untrained_done) == 1 else f" ({arch})"
            sources += self.raw_sources(model, feats, probe_feats, suffix)
            untrained = ckpt.family.untrained(ckpt, self.cfg.seed)
            sources.append(self.source_of(untrained, f"untrained{suffix}", "untrained", data)[0])
            sources += self.encoder_sources(model, suffix)
        return [Analysed(s.name, s.kind, s.ckpt, [c for m in self.measures for c in m.curves(self, s)],
                         pooled if s is model else None) for s in sources]

    def source_of(self, ckpt: LoadedCheckpoint, name: str, kind: str, data, blocks: tuple[int, ...] | None = None,
                  measures: bool = True) -> tuple[Source, Features, tuple | None]:
        """A model (its untrained twin, its class token) as a Source of the alignment images, with its Features
        and those of the probe's train and test images (None without a probe); `blocks`: those analysed (default
        `self.blocks`); measures=False: without the token reductions the measures need."""
        align, train, test = data
        feats = self.features(ckpt, align, blocks, measures)
        probe_feats = None if train is None else \
            self.probe_sets(feats, align, train, test, lambda d: self.features(ckpt, d, blocks, measures=False))
        probe = None if train is None else \
            (probe_feats[0].blocks, probe_feats[0].labels, probe_feats[1].blocks, probe_feats[1].labels)
        analysed = list(blocks) if blocks is not None else self.blocks(ckpt)
        return Source(name, kind, ckpt, analysed, feats.ts, align, ckpt.anatomy.grid, feats.ids, feats.blocks,
                      feats.reduced, probe, max(analysed) >= 2 and self.cfg.bootstrap > 0), feats, probe_feats

    def raw_sources(self, model: Source, feats: Features, probe_feats: tuple | None, suffix: str) -> list[Source]:
        """The raw input x_t as two one-"block" (−1) sources: its patches pooled like the blocks, and the
        thumbnail, with the token reductions applied to the thumbnail's patches (raw=True)."""
        out = []
        for kind, field_name in (("raw-input", "raw_pooled"), ("raw-thumbnail", "raw")):
            def pooled(f):
                return np.asarray(getattr(f, field_name))[:, None]
            reduced = {} if kind == "raw-input" else \
                {r: {"blocks": np.asarray(a["raw"])[:, None]} for r, a in feats.reduced.items() if "raw" in a}
            probe = None if probe_feats is None else \
                (pooled(probe_feats[0]), probe_feats[0].labels, pooled(probe_feats[1]), probe_feats[1].labels)
            out.append(dataclasses.replace(model, name=kind.replace("-", " ") + suffix, kind=kind, blocks=[-1],
                                           pooled=pooled(feats), reduced=reduced, probe=probe,
                                           held_out=self.cfg.bootstrap > 0))
        return out

    def encoder_sources(self, model: Source, suffix: str) -> list[Source]:
        """Each encoder's own tokens as a one-"block" source of the reductions applied to them (encoder=True;
        the spatial measures' reference): the same value at every t."""
        names = list(encoder_reductions(self.cfg, self.cfg.seed))
        out = []
        for enc in self.encoders if names else []:
            extras = self.target(enc, model.dataset, model.grid).extras
            reduced = {r: {"blocks": np.broadcast_to(extras[r][None, None], (len(model.ts), 1) + extras[r].shape)}
                       for r in names}
            out.append(dataclasses.replace(model, name=f"{enc.name}{suffix}", kind="encoder", blocks=[-1], pooled=None,
                                           reduced=reduced, probe=None, held_out=False))
        return out

    def blocks(self, ckpt: LoadedCheckpoint) -> list[int]:
        """The blocks analysed: --blocks, or 0..depth."""
        return list(self.cfg.blocks) if self.cfg.blocks is not None else list(range(ckpt.anatomy.depth + 1))


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
