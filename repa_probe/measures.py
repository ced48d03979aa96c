"""Measures: each thing an analysis reports, declared once.

A measure says what it reads of a source (the pooled block features, the probe's images, named token
reductions: reductions.py), how it turns that into Curves, the metrics it reports with their labels, their
display scale and whether their values depend on the number of images. The pipeline captures the union of
what the selected measures need and applies every selected measure to every source: the model, a REG model's
class token, its untrained twin, the raw input (pooled, and as a thumbnail) and the target encoders' own tokens
(pipeline.py). A source that lacks what a measure reads gets no curves from it (the class token: no token
reductions).

Built in, in report order: the alignment metrics (one measure over the metrics registry, metrics.py), the
linear probe (probe.py), the spatial measures (one measure over the spatial registry, spatial.py), token
alignment and the projector cosine (tokens.py), the dispersion of each block (what Dispersive Loss minimises,
metrics.dispersive_loss), attention-map alignment (attention.py) and the SRA view (self_similarity.py), the last two
registering themselves like plug-ins: pipeline.py imports them. A new measure is one file that calls
`register_measure` (docs/extending.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from repa_probe import metrics as M
from repa_probe import stats
from repa_probe.checkpoints import LoadedCheckpoint
from repa_probe.curves import Curves, HeldOut, per_image_curves
from repa_probe.probe import ProbeConfig, linear_probe
from repa_probe.registry import Registry
from repa_probe.spatial import SPATIAL_METRICS
from repa_probe.tokens import cosine, zscored

PROBE_METRICS = {"probe_top1": "linear probe top-1 (%)", "probe_top5": "linear probe top-5 (%)"}
TOKEN_PREFIX = "token_"          # an alignment metric over the token sample: token_cknna (tokens.py)
PROJECTOR_COSINE = "proj_cosine"  # mean cosine after the checkpoint's REPA projector (tokens.py)
DROP_RESAMPLES = 100             # at least this many for the held-out drop (two sources per t)


@dataclass
class Source:
    """One thing measured, as measures read it: pooled [T, B, N, D] block features (None for an encoder's
    reference), token reductions {name: {array: [T, B, N, ...] "blocks", or [T, N, ...] "projected{k}"}}, and
    the probe's (train features, train labels, test features, test labels) or None."""
    name: str
    kind: str                       # model, class-token, untrained, raw-input, raw-thumbnail, encoder (pipeline.KINDS)
    ckpt: LoadedCheckpoint
    blocks: list[int]               # block −1: the raw input
    ts: list[float]
    dataset: Any                    # the alignment images (ImageDataset)
    grid: int
    ids: np.ndarray
    pooled: Any = None
    reduced: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe: tuple | None = None
    held_out: bool = False          # also the held-out drop after the peak block


@dataclass(frozen=True)
class Measure:
    """A measure (module docstring). `curves(pipeline, source)` → its Curves ([] where the source lacks what it
    reads); `labels()` → {metric: label} of every metric it may report; `selected(config)` → whether an
    analysis with this AnalyzeConfig asks for it; `needs` the token reductions it reads."""
    name: str
    curves: Callable[[Any, Source], list[Curves]]
    labels: Callable[[], dict[str, str]]
    selected: Callable[[Any], bool] = lambda cfg: True
    needs: tuple[str, ...] = ()
    display_scale: float = 1.0      # values are stored as fractions; shown × this (probe accuracy: percent)
    depends_on_n: bool = False      # its value depends on n and k (kNN graphs, kernel biases; docs/statistics.md)


MEASURES: Registry[Measure] = Registry("measure")


def register_measure(measure: Measure, *, priority: int = 0, overwrite: bool = False) -> Measure:
    return MEASURES.register(measure.name, measure, priority=priority, overwrite=overwrite)


def owner(metric: str) -> Measure | None:
    """The measure that reports `metric`."""
    return next((m for m in MEASURES.values() if metric in m.labels()), None)


def metric_label(metric: str) -> str:
    """How reports name a metric (its measure's label for it)."""
    m = owner(metric)
    return m.labels()[metric] if m else metric


def display_scale(metric: str) -> float:
    """Values are stored as fractions; probe accuracies are shown in percent (the labels say so)."""
    m = owner(metric)
    return m.display_scale if m else 1.0


def depends_on_n(metric: str) -> bool:
    """Whether a measure's value depends on the number of images n (and k): every alignment metric (kNN graphs,
    kernel biases; CKNNA ≈ n^−0.5 at fixed k). Probe accuracies and per-image means do not (docs/statistics.md)."""
    m = owner(metric)
    return bool(m and m.depends_on_n)


#################################################################################
#                                   Alignment                                   #
#################################################################################

def alignment_curves(pipe, src: Source, values, held_out: bool, tokens: bool = False) -> list[Curves]:
    """Every alignment metric × encoder for `values` [T, B, N, D]: values, the permutation null, bootstrap
    intervals and replicates, the held-out drop (if `held_out`). tokens=True: values hold each block's token at
    the sampled cells, compared with the encoder's (metric "token_…")."""
    cfg, out = pipe.cfg, []
    for enc in pipe.encoders:
        tg = pipe.target(enc, src.dataset, src.grid, tokens)
        if not np.array_equal(tg.ids, src.ids):
            raise RuntimeError("encoder and model features hold different images")  # a bug, not user input
        start = time.perf_counter()
        replicates = tg.replicates if cfg.bootstrap else []
        drop_draws = held_out_draws(cfg, src.dataset.labels) if held_out else None
        half_a = stats.halves(src.dataset.labels, cfg.seed)[0]
        # one pass over the sources: each one's kernel, scored against the target, every permuted target,
        # every replicate's target and the held-out drop's selection half's
        views = [*((None, p) for p in tg.nulls), *replicates,
                 *([(half_a, tg.kernel.subset(half_a, "encoder, half A"))] if drop_draws else [])]
        scores, other = M.alignment(tg.kernel, values, cfg.alignment_metrics, k=cfg.k, device=pipe.device,
                                    views=views, split=pipe.split, desc=None if cfg.quiet else "alignment")
        null = {m: v[:len(tg.nulls)] for m, v in other.items()}
        reps = {m: v[len(tg.nulls):len(tg.nulls) + len(replicates)] for m, v in other.items()} if replicates else {}
        scale = stats.subsample_scale([len(d) for d, _ in replicates], len(src.ids)) if replicates else None
        cis = {m: stats.centred_interval(scores[m], r, scale) for m, r in reps.items()}
        drops = held_out_alignment(pipe, values, src.blocks, tg.features, {m: v[-1] for m, v in other.items()},
                                   src.dataset.labels, drop_draws) if drop_draws else {}
        pipe.timings["metrics"] += time.perf_counter() - start
        for metric, v in scores.items():
            out.append(Curves(src.name, src.kind, TOKEN_PREFIX * tokens + metric, enc.name, src.ts, src.blocks, v,
                              cis.get(metric), reps.get(metric), scale, null=null[metric],
                              held_out=drops.get(metric), n=len(src.ids),
                              k=cfg.k if M.METRICS[metric].uses_k else None))
    return out


def held_out_draws(cfg, labels: np.ndarray) -> list[np.ndarray] | None:
    """The subsamples of half B behind the held-out drop's interval (DROP_RESAMPLES at least), or None, with
    a note, when they hold too few images for k neighbours."""
    draws = stats.subsamples(len(stats.halves(labels, cfg.seed)[1]), max(cfg.bootstrap, DROP_RESAMPLES), cfg.seed)
    if min(len(d) for d in draws) > cfg.k + 3:
        return draws
    note = (f"no held-out drop for alignment: half of the {len(labels)} images is too few for k = {cfg.k} "
            f"neighbours in its bootstrap subsamples (pass a larger --n)")
    if note not in cfg.notes:
        cfg.notes.append(note)
    return None


def held_out_alignment(pipe, values, blocks: list[int], target: np.ndarray, on_a: dict[str, np.ndarray],
                       labels: np.ndarray, draws: list[np.ndarray]) -> dict[str, HeldOut]:
    """Per metric: the peak block on half A of the images (`on_a`: the values there), the drop after it on
    half B (paired interval over the subsamples `draws` of B)."""
    cfg = pipe.cfg
    half_a, half_b = stats.halves(labels, cfg.seed)
    scale = stats.subsample_scale([len(d) for d in draws], len(half_b))
    out = {}
    for m, on_a_m in on_a.items():
        peaks = stats.argmax_blocks(on_a_m, blocks, stats.resolution(on_a_m))            # [T]
        pairs = np.stack([np.stack([M.take_rows(values[ti, p], half_b), M.take_rows(values[ti, -1], half_b)])
                          for ti, p in enumerate(peaks)])                                 # [T, 2, n_b, D]
        tgt = M.FeatureKernel.build(target[half_b], cfg.k, (m,), device=pipe.device, what="encoder, half B")
        on_b, reps = M.alignment(tgt, pairs, (m,), k=cfg.k, device=pipe.device, split=pipe.split,
                                 views=[(d, tgt.subset(d, "encoder, half B")) for d in draws])
        drop = on_b[m][:, 0] - on_b[m][:, 1]
        out[m] = HeldOut([blocks[p] for p in peaks], drop,
                         stats.centred_interval(drop, reps[m][..., 0] - reps[m][..., 1], scale),
                         len(half_a), len(half_b), on_b[m][:, 0], reps[m][..., 0], scale)
    return out


def _alignment(pipe, src: Source) -> list[Curves]:
    return [] if src.pooled is None else alignment_curves(pipe, src, src.pooled, src.held_out)


def _token_alignment(pipe, src: Source) -> list[Curves]:
    # the untrained twin's token curves carry no held-out drop: findings/baselines.py compares pooled curves
    return [] if "tokens" not in src.reduced else \
        alignment_curves(pipe, src, src.reduced["tokens"]["blocks"], src.held_out and src.kind == "model", tokens=True)


#################################################################################
#                                  Linear probe                                 #
#################################################################################

def probe_draws(n_train: int, n_test: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The probe's bootstrap replicates: draw counts of its training and of its test images, [n_boot, n_train] and
    [n_boot, n_test] (stats.draw_counts, independent streams). They depend on the sizes and the seed only, so
    every block, t and checkpoint of an analysis shares them, and differences are paired."""
    return stats.draw_counts(n_train, n_boot, [seed, 1]), stats.draw_counts(n_test, n_boot, [seed, 2])


def held_out_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                   blocks: list[int], seed: int, n_boot: int, config: ProbeConfig | None = None,
                   device: torch.device | str | None = None, split: bool = False) -> HeldOut:
    """The held-out drop of a probe from its features [T, B, n, D]: the training and the test images are each
    split into class-balanced halves A and B; probes fitted on training half A and scored on test half A
    choose the peak, probes fitted on training half B and scored on test half B measure the drop (peak − last
    block), with an interval over n_boot replicates that refit on resampled training half B and score on
    resampled test half B. A block whose fit was lucky on A is fitted anew on B, so its luck does not carry
    over into the drop."""
    cfg = config or ProbeConfig(seed=seed)
    (train_a, train_b), (test_a, test_b) = stats.halves(train_labels, seed), stats.halves(test_labels, seed)
    on_a = linear_probe(train[..., train_a, :], train_labels[train_a], test[..., test_a, :], test_labels[test_a], cfg,
                        device, split=split)["top1"]                                                # [T, B]
    peaks = stats.argmax_blocks(on_a, blocks)
    pairs = np.stack([peaks, np.full_like(peaks, len(blocks) - 1)], axis=-1)             # [T, 2]: peak, last
    t = np.arange(len(peaks))[:, None]
    on_b = linear_probe(train[t, pairs][..., train_b, :], train_labels[train_b], test[t, pairs][..., test_b, :],
                        test_labels[test_b], cfg, device, resample=probe_draws(len(train_b), len(test_b), n_boot, seed),
                        split=split)
    best, reps = on_b["top1"][:, 0], on_b["top1_replicates"]                                # [T], [T, 2, R]
    drop = best - on_b["top1"][:, 1]
    return HeldOut([blocks[p] for p in peaks], drop, stats.centred_interval(drop, (reps[:, 0] - reps[:, 1]).T),
                   len(test_a), len(test_b), best, reps[:, 0].T)


def _probe(pipe, src: Source) -> list[Curves]:
    """Probe top-1 (top-5) per t × block, with `bootstrap` refit replicates (probe_draws) and their interval,
    and the held-out drop (held_out_probe) if the source asks for it."""
    if src.probe is None:
        return []
    cfg, start = pipe.cfg, time.perf_counter()
    train, train_labels, test, test_labels = (np.asarray(x) for x in src.probe)
    draws = probe_draws(len(train_labels), len(test_labels), cfg.bootstrap, cfg.seed) if cfg.bootstrap else None
    res = linear_probe(train, train_labels, test, test_labels, ProbeConfig(seed=cfg.seed), device=pipe.device,
                       resample=draws, split=pipe.split)           # under torchrun each rank fits a share
    drop = held_out_probe(train, train_labels, test, test_labels, src.blocks, cfg.seed,
                          max(cfg.bootstrap, DROP_RESAMPLES), device=pipe.device, split=pipe.split) \
        if src.held_out else None
    pipe.timings["probes"] += time.perf_counter() - start
    out = []
    for metric in ("top1", "top5"):
        if metric not in res:
            continue
        acc = np.asarray(res[metric], dtype=np.float64)
        reps = np.moveaxis(res[f"{metric}_replicates"], -1, 0) if draws else None             # [R, T, B]
        ci = stats.centred_interval(acc, reps) if draws else None
        out.append(Curves(src.name, src.kind, f"probe_{metric}", "", src.ts, src.blocks, acc, ci, reps,
                          np.ones(cfg.bootstrap) if draws else None, hits=res["hits"] if metric == "top1" else None,
                          held_out=drop if metric == "top1" else None, n=len(test_labels)))
    return out


#################################################################################
#                              Per-image measures                               #
#################################################################################

def _spatial(pipe, src: Source) -> list[Curves]:
    """Every spatial measure (the "spatial" reduction's columns, in registry order: its version)."""
    return [] if "spatial" not in src.reduced else \
        per_image_curves(pipe, src, src.reduced["spatial"]["blocks"], list(SPATIAL_METRICS))


def _projector_cosine(pipe, src: Source) -> list[Curves]:
    """The projector cosine at the aligned block (tokens.py), for each analysis encoder that one of the
    checkpoint's projectors was trained toward: the one of the same name (else of the same width, if exactly
    one projector has it), against the target as trained (iREPA's z-score when recorded). The checkpoint's
    only: an untrained twin's projector was trained toward nothing."""
    if src.kind != "model" or "projected" not in src.reduced:
        return []
    arrays = src.reduced["projected"]
    projected = [arrays[f"projected{k}"] for k in range(len(arrays))]
    p, out = src.ckpt.provenance, []
    trained = [e.partition("=")[0] for e in p.encoders]
    alpha = float(p.args.get("zscore_alpha", 0.6)) if p.args.get("spatial_norm") == "zscore" else None
    for enc in pipe.encoders:
        extras = pipe.target(enc, src.dataset, src.grid).extras
        widths, width = [np.shape(z)[-1] for z in projected], extras["token"].shape[1]
        k = trained.index(enc.name) if enc.name in trained else \
            widths.index(width) if widths.count(width) == 1 else None
        if k is None or k >= len(widths) or widths[k] != width:
            continue
        z = extras["token"] if alpha is None else zscored(extras["token"], extras["token_mean"],
                                                           extras["token_std"], alpha)
        cos = np.stack([cosine(np.asarray(h), z) for h in projected[k]])                      # [T, N]
        out += per_image_curves(pipe, src, cos[:, None, :, None], [PROJECTOR_COSINE], enc.name,
                                [src.ckpt.anatomy.aligned_block])
    return out


#################################################################################
#                                   Dispersion                                  #
#################################################################################

DISPERSION = "dispersion"
DISPERSION_BATCH = 64            # images per log-mean: the dispersive term's is over one training batch


def dispersion_batches(rows: np.ndarray, size: int, seed: list[int]) -> np.ndarray:
    """`rows` in a seeded order, cut into len(rows) // size disjoint batches (the rest left out): [K, size]."""
    order = np.random.default_rng(seed).permutation(np.asarray(rows))
    return order[:len(order) // size * size].reshape(-1, size)


def dispersion(features, batches: np.ndarray) -> float:
    """What Dispersive Loss minimises (InfoNCE-L2, τ = 1: metrics.dispersive_loss, the trainer's term), of the
    rows of `features` [N, D] in each batch [K, size], averaged over the K batches:
    mean_k log( (1/size²) Σ_i,j∈k exp(−‖z_i − z_j‖² / D) ). 0 when the rows coincide, ≥ −log size."""
    z = torch.as_tensor(np.asarray(features))[torch.as_tensor(batches)]  # [K, size, D]
    return float(torch.vmap(M.dispersive_loss)(z).double().mean())


def _dispersion(pipe, src: Source) -> list[Curves]:
    """The dispersion of every block's pooled features per t, on the same seeded batches of DISPERSION_BATCH
    images for every source, with paired subsample replicates (each re-batched with its own seed)."""
    if src.pooled is None:
        return []
    cfg, n = pipe.cfg, len(src.ids)
    draws = stats.subsamples(n, cfg.bootstrap, cfg.seed) if cfg.bootstrap else []
    size = min(DISPERSION_BATCH, n, *(len(d) for d in draws))
    if size < DISPERSION_BATCH:
        note = (f"dispersion on batches of {size} images, not {DISPERSION_BATCH}: the fewest that every bootstrap "
                f"subsample of the n = {n} images holds (pass a larger --n)")
        cfg.notes += [] if note in cfg.notes else [note]
    full = dispersion_batches(np.arange(n), size, [cfg.seed, 8191])
    batches = [dispersion_batches(d, size, [cfg.seed, 8191, r + 1]) for r, d in enumerate(draws)]
    value = np.zeros((len(src.ts), len(src.blocks)))
    reps = np.zeros((len(draws),) + value.shape)
    for index in np.ndindex(*value.shape):
        x = np.asarray(src.pooled[index])                                  # [N, D]
        value[index] = dispersion(x, full)
        for r, b in enumerate(batches):
            reps[(r,) + index] = dispersion(x, b)
    scale = stats.subsample_scale([len(d) for d in draws], n) if draws else None
    ci = stats.centred_interval(value, reps, scale) if draws else None
    return [Curves(src.name, src.kind, DISPERSION, "", src.ts, src.blocks, value, ci, reps if draws else None, scale,
                   n=size)]


register_measure(Measure("alignment", _alignment, lambda: {m: M.METRICS[m].label for m in M.METRICS},
                         lambda cfg: True, depends_on_n=True))
register_measure(Measure("probe", _probe, lambda: PROBE_METRICS, lambda cfg: cfg.probe, display_scale=100.0))
register_measure(Measure("spatial", _spatial, lambda: {m: f"{s.label} (spatial)" for m, s in SPATIAL_METRICS.items()},
                         lambda cfg: cfg.spatial, needs=("spatial",)))
register_measure(Measure("token alignment", _token_alignment,
                         lambda: {TOKEN_PREFIX + m: f"token {s.label}" for m, s in M.METRICS.items()},
                         lambda cfg: cfg.tokens, needs=("tokens",), depends_on_n=True))
register_measure(Measure("projector cosine", _projector_cosine, lambda: {PROJECTOR_COSINE: "projector cosine"},
                         lambda cfg: cfg.tokens, needs=("projected",)))
register_measure(Measure("dispersion", _dispersion,
                         lambda: {DISPERSION: "dispersion (Dispersive Loss, InfoNCE-L2, τ = 1)"},
                         lambda cfg: cfg.dispersion, depends_on_n=True))


def selected(cfg) -> list[Measure]:
    """The measures an analysis with AnalyzeConfig `cfg` asks for, in report order."""
    return [m for m in MEASURES.values() if m.selected(cfg)]


def needed_reductions(cfg) -> tuple[str, ...]:
    """The token reductions capture must keep for the selected measures: the union of their needs."""
    return tuple(dict.fromkeys(r for m in selected(cfg) for r in m.needs))
