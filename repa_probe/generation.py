"""Sample quality of a checkpoint: N seeded samples scored against reference statistics (docs/generation.md).

    samples (sampler.sample_indexed: sample i has the same noise and label for every checkpoint)
      → uint8 images (REPA's quantisation) → feature spaces: FID's Inception-v3 (pool, spatial, logits) and/or
        any registered encoder (its pooled patch tokens)
      → float64 sums per rank, added over ranks (fid.GaussianStats) → FD per space, each with its N
    reference: an image folder (features cached in the feature store) or an ADM batch .npz (arr_0, and the
    precomputed mu/sigma, mu_s/sigma_s where the file has them)

Scores are keyed by space: "FD_<encoder>", "FID" (Inception pool), "sFID" (Inception spatial), with "IS",
"precision", "recall" beside them when Inception is a space. `compare_fd` gives a paired difference's interval.
"""
from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from repa_probe.checkpoints import LoadedCheckpoint
from repa_probe.errors import UserError
from repa_probe.fid import (FD, GaussianStats, fd_replicates, frechet_distance, inception_score,
                            paired_fd_difference, precision_recall, same_n)
from repa_probe.runtime import init_distributed, rank, resolve_precision, world_size
from repa_probe.sampler import DEFAULT_STEPS, SAMPLERS, decode, load_autoencoder, sample_indexed
from repa_probe.stats import LEVEL

INCEPTION_KEYS = {"pool": "FID", "spatial": "sFID"}     # Inception feature → the score its FD is called


@dataclass(frozen=True)
class Sampling:
    """How the N samples are drawn; REPA's FID setting by default (SDE, 250 steps, no guidance)."""
    n: int
    seed: int = 0
    sampler: str = "sde"
    steps: int | None = None
    cfg: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    batch_size: int = 64
    precision: str = "fp32"          # the model's autocast while sampling: fp32 (off), bf16 or fp16
    compile: bool = False            # torch.compile the model's blocks while sampling

    def __post_init__(self):
        if self.n < 2:
            raise UserError(f"--gen {self.n}: FD needs at least 2 samples")
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler {self.sampler!r}: use one of {', '.join(SAMPLERS)}")

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "steps": self.steps or DEFAULT_STEPS[self.sampler]}


#################################################################################
#                                Feature spaces                                 #
#################################################################################

class InceptionSpace:
    """FID's Inception-v3 (inception.py): FID from pool, sFID from spatial, IS from logits."""
    name = "inception"

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images)

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def score_name(self, key: str) -> str:
        return INCEPTION_KEYS[key]


class EncoderSpace:
    """A registered encoder's pooled patch tokens at `grid` (FD_<encoder>)."""

    def __init__(self, encoder, grid: int):
        self.encoder, self.grid, self.name = encoder, grid, encoder.name

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": self.encoder.encode(images.float() / 255, self.grid)[1]}

    def fingerprint(self) -> str:
        return f"{self.encoder.fingerprint(self.grid)} grid {self.grid}"

    def score_name(self, key: str) -> str:
        return f"FD_{self.name}"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] → uint8 as REPA's generate.py writes them: clamp(127.5·x + 128, 0, 255), truncated."""
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def space_features(spaces, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"<space>/<key>": features [B, D] float32 on the CPU} for uint8 images."""
    out = {}
    for space in spaces:
        for key, value in space.features(images).items():
            out[f"{space.name}/{key}"] = value.float().cpu()
    return out


#################################################################################
#                                  References                                   #
#################################################################################

@dataclass
class Reference:
    """Statistics (and features, where kept) of the real images, per "<space>/<key>"."""
    source: str
    stats: dict[str, GaussianStats]
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return next(iter(self.stats.values())).n


def reference_from_folder(folder: str | Path, spaces, *, image_size: int, n: int | None = None, seed: int = 0,
                          cache: str | Path | None = None, batch_size: int = 64, quiet: bool = True) -> Reference:
    """Features of an ImageFolder's images (n of them, class-balanced, or all), centre-cropped to image_size,
    cached in the feature store like the analyses' features (one entry per space and data subset)."""
    from repa_probe.data import ImageDataset, list_images, select_subset
    from repa_probe.store import FeatureStore, cache_image_features
    if not Path(folder).is_dir():
        raise UserError(f"--gen-reference '{folder}' is neither an image folder nor an ADM .npz batch")
    labels = list_images(folder)[1]
    dataset = ImageDataset(folder, image_size, select_subset(labels, n, seed) if n else None)
    store, feats = FeatureStore(cache), {}
    for space in spaces:
        cached = cache_image_features(store, "generation-reference", {"space": space.fingerprint()}, dataset,
                                      lambda images, ids, space=space: space.features(images), batch_size=batch_size,
                                      quiet=quiet)
        feats.update({f"{space.name}/{k}": np.asarray(v) for k, v in cached.arrays.items()})
    return Reference(str(folder), {k: GaussianStats.of(v) for k, v in feats.items()}, feats)


def read_npz_images(path: str | Path) -> np.ndarray:
    """An ADM batch's images: arr_0, uint8 [N, H, W, 3]."""
    try:
        with np.load(path, allow_pickle=False) as batch:
            images = batch["arr_0"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"--gen-reference '{path}' is not an ADM reference batch (.npz with arr_0 images): "
                        f"{str(e).splitlines()[0]}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"--gen-reference '{path}': arr_0 is {images.dtype} {images.shape}, not uint8 images "
                        f"[N, H, W, 3]")
    return images


def reference_from_npz(path: str | Path, spaces, *, batch_size: int = 64) -> Reference:
    """An ADM reference batch (VIRTUAL_imagenet256_labeled.npz): features of arr_0's images; where the file has
    the evaluator's precomputed statistics (mu, sigma; mu_s, sigma_s) they stand for FID's and sFID's."""
    images = read_npz_images(path)
    feats: dict[str, list] = {}
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).contiguous()
        for k, v in space_features(spaces, batch).items():
            feats.setdefault(k, []).append(v.numpy())
    arrays = {k: np.concatenate(v) for k, v in feats.items()}
    stats = {k: GaussianStats.of(v) for k, v in arrays.items()}
    with np.load(path, allow_pickle=False) as batch:
        for key, (mu, sigma) in {"inception/pool": ("mu", "sigma"), "inception/spatial": ("mu_s", "sigma_s")}.items():
            if key in stats and mu in batch.files and sigma in batch.files:
                stats[key] = GaussianStats.from_moments(len(images), batch[mu], batch[sigma])
    return Reference(str(path), stats, arrays)


def load_reference(source: str | Path, spaces, **kwargs) -> Reference:
    """A folder or an .npz (module docstring)."""
    if str(source).endswith(".npz"):
        return reference_from_npz(source, spaces, batch_size=kwargs.get("batch_size", 64))
    return reference_from_folder(source, spaces, **kwargs)


#################################################################################
#                                    Scoring                                    #
#################################################################################

@dataclass
class GenerationScores:
    """One checkpoint's sample quality: scores[name] an FD with its N (or IS, precision, recall as floats), the
    samples' features per "<space>/<key>" in sample-index order (paired intervals), how they were drawn."""
    checkpoint: str
    sampling: Sampling
    reference: str
    scores: dict[str, FD | float]
    features: dict[str, np.ndarray]
    replicates: dict[tuple, np.ndarray] = field(default_factory=dict)   # fd_replicates by (score, n_boot, seed)

    @property
    def n(self) -> int:
        return self.sampling.n

    def fd_replicates(self, reference: "Reference", score: str, n_boot: int, seed: int) -> np.ndarray:
        """The FDs of `score` on the shared bootstrap resamples of the sample indices (fid.fd_replicates), computed
        once per checkpoint however many differences and crossings use them."""
        key = (score, n_boot, seed)
        if key not in self.replicates:
            k = feature_key(self, score)
            self.replicates[key] = fd_replicates(self.features[k], reference.stats[k], n_boot, seed)
        return self.replicates[key]


def my_indices(n: int) -> np.ndarray:
    """The sample indices this rank draws (every world_size-th)."""
    return np.arange(rank(), n, world_size())


def gather_rows(indices: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Every rank's rows placed at their sample indices: the [n, D] array on every rank."""
    if not dist.is_initialized():
        return rows
    parts = [None] * world_size()
    dist.all_gather_object(parts, (indices, rows))
    out = np.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    for idx, r in parts:
        out[idx] = r
    return out


def sample_features(ckpt: LoadedCheckpoint, spaces, sampling: Sampling, *, vae: str | None = None,
                    device: torch.device | str | None = None) -> tuple[dict[str, GaussianStats], dict[str, np.ndarray]]:
    """This rank's share of the seeded samples through every space: (statistics summed over all ranks, all
    samples' features in index order)."""
    device = device or next(ckpt.model.parameters()).device
    autoencoder = load_autoencoder(ckpt, vae)
    indices, stats, rows = my_indices(sampling.n), {}, {}
    for start in range(0, len(indices), sampling.batch_size):
        batch = indices[start:start + sampling.batch_size]
        x0 = sample_indexed(ckpt, batch, seed=sampling.seed, sampler=sampling.sampler, steps=sampling.steps,
                            cfg=sampling.cfg, cfg_interval=sampling.cfg_interval, device=device,
                            precision=sampling.precision, compile=sampling.compile)
        for k, v in space_features(spaces, to_uint8(decode(ckpt, x0, autoencoder))).items():
            stats.setdefault(k, GaussianStats.empty(v.shape[1])).add(v)
            rows.setdefault(k, []).append(v.numpy())
    stats = {k: s.summed_over_ranks() for k, s in stats.items()}
    return stats, {k: gather_rows(indices, np.concatenate(v), sampling.n) for k, v in rows.items()}


def generation_scores(ckpt: LoadedCheckpoint, sampling: Sampling, spaces, reference: Reference, *,
                      name: str = "", vae: str | None = None,
                      device: torch.device | str | None = None) -> GenerationScores:
    """N samples of `ckpt` scored in every space against `reference`: FD_<encoder>, FID, sFID (each with N), and
    with Inception IS (10 splits) and precision/recall (k = 3) against the reference's features."""
    stats, feats = sample_features(ckpt, spaces, sampling, vae=vae, device=device)
    scores: dict[str, FD | float] = {}
    for space in spaces:
        for key in (("pool", "spatial") if space.name == "inception" else ("pool",)):
            k = f"{space.name}/{key}"
            if k not in reference.stats:
                raise UserError(f"the reference '{reference.source}' has no {k} statistics: rebuild it with the "
                                f"same feature spaces")
            s, r = stats[k], reference.stats[k]
            scores[space.score_name(key)] = FD(frechet_distance(s.mu, s.sigma, r.mu, r.sigma), s.n,
                                               space.score_name(key))
    if "inception/logits" in feats:
        scores["IS"] = inception_score(feats["inception/logits"])
        if "inception/pool" in reference.features:
            scores["precision"], scores["recall"] = precision_recall(reference.features["inception/pool"],
                                                                     feats["inception/pool"])
    return GenerationScores(name, sampling, reference.source, scores, feats)


def compare_fd(a: GenerationScores, b: GenerationScores, reference: Reference, score: str, *, n_boot: int = 200,
               seed: int = 0, level: float = LEVEL) -> dict:
    """FD(b) − FD(a) for `score` ("FD_<encoder>", "FID", "sFID") with its paired bootstrap interval
    (fid.paired_fd_difference). Refuses FDs of different N, or samples not drawn alike (then not paired)."""
    same_n(a.scores[score], b.scores[score])
    if a.sampling != b.sampling:
        raise UserError(f"'{a.checkpoint}' and '{b.checkpoint}' were sampled differently ({a.sampling} vs "
                        f"{b.sampling}): their samples are not paired; score both with the same settings")
    if a.reference != b.reference:
        raise UserError(f"'{a.checkpoint}' and '{b.checkpoint}' were scored against different references "
                        f"('{a.reference}', '{b.reference}')")
    key = feature_key(a, score)
    replicates = tuple(s.fd_replicates(reference, score, n_boot, seed) for s in (a, b))
    return paired_fd_difference(a.features[key], b.features[key], reference.stats[key], n_boot=n_boot, seed=seed,
                                level=level, space=score, replicates=replicates)


def feature_key(s: GenerationScores, score: str) -> str:
    """The features ("<space>/<key>") behind a score ("FD_<encoder>", "FID", "sFID") of a checkpoint."""
    return next(k for k in s.features if _score_of(k) == score)


def _score_of(key: str) -> str:
    space, part = key.split("/")
    return INCEPTION_KEYS.get(part, "") if space == "inception" else f"FD_{space}"


#################################################################################
#              A report's sample quality: --gen N (analyze, compare, trajectory)  #
#################################################################################

GEN_GRID = 16          # an encoder space sees the images at 16×16 tokens (REPA's grid at 256 px)
GEN_COLUMNS = ["checkpoint", "run", "step", "space", "score", "N", "value", "against", "difference", "ci_low",
               "ci_high", "level", "n_boot", "sampler", "steps", "cfg", "cfg_interval", "seed", "precision",
               "reference"]


def sampling_of(cfg, device: torch.device | str | None = None) -> Sampling:
    """An AnalyzeConfig's --gen settings as a Sampling: its seed, --precision (auto: bf16 on a GPU) and --compile
    are the analysis's."""
    device = torch.device(device or cfg.device or "cpu")
    return Sampling(cfg.gen, seed=cfg.seed, sampler=cfg.gen_sampler, steps=cfg.gen_steps, cfg=cfg.gen_cfg,
                    cfg_interval=tuple(cfg.gen_cfg_interval), batch_size=cfg.batch_size,
                    precision=resolve_precision(cfg.precision, device), compile=cfg.compile)


def load_spaces(cfg, device: torch.device | str | None = None) -> list:
    """--gen-spaces (default: the --encoder names) as feature spaces: an encoder with the weights its --encoder
    spec names (else found locally), in fp32; `inception` from --inception-weights, a weights folder or
    --download."""
    from repa_probe.encoders import load_encoder
    from repa_probe.inception import load_inception
    specs = {spec.split("=")[0]: spec for spec in cfg.encoders}
    spaces = []
    for name in cfg.gen_spaces or list(specs):
        if name == "inception":
            spaces.append(InceptionSpace(load_inception(cfg.inception_weights, download=cfg.download,
                                                        device=device)))
        else:
            spaces.append(EncoderSpace(load_encoder(specs.get(name, name), random_init=cfg.encoder_random_init,
                                                    pretrained_download=cfg.download, device=device), GEN_GRID))
    return spaces


class Scorer:
    """Every checkpoint of one report scored alike (docs/generation.md): one Sampling, the same feature spaces
    and reference, and each checkpoint's FDs differenced, paired, against the checkpoint it is compared with.
    `score` returns gen.csv's rows for one checkpoint; the features of checkpoints named `keep` stay for the
    later checkpoints compared with them."""

    def __init__(self, cfg, device: torch.device | str | None = None):
        init_distributed(torch.device(device) if device is not None else None)  # torchrun: samples split by rank
        self.cfg, self.device = cfg, device
        self.sampling, self.spaces = sampling_of(cfg, device), load_spaces(cfg, device)
        self.reference: Reference | None = None
        self.kept: dict[str, GenerationScores] = {}

    def reference_for(self, image_size: int) -> Reference:
        """The reference statistics, made once (a folder's images at the first checkpoint's image size)."""
        if self.reference is None:
            cfg = self.cfg
            self.reference = load_reference(cfg.gen_reference or cfg.data, self.spaces,
                                            image_size=image_size, n=cfg.gen_reference_n,
                                            seed=cfg.seed, cache=cfg.cache, batch_size=cfg.batch_size,
                                            quiet=cfg.quiet)
        return self.reference

    def score(self, ckpt: LoadedCheckpoint, name: str, *, run: str = "", step: int | None = None,
              against: str | None = None, keep: bool = False) -> list[dict]:
        """gen.csv's rows of one checkpoint: a row per score, FDs with their N, and where `against` names a kept
        checkpoint the paired difference FD(this) − FD(against) with its interval."""
        if self.device is not None:
            ckpt.model.to(self.device)
        reference = self.reference_for(ckpt.anatomy.input.image_size)
        scores = generation_scores(ckpt, self.sampling, self.spaces, reference, name=name, vae=self.cfg.vae,
                                   device=self.device)
        if keep:
            self.kept[name] = scores
        rows = score_rows(scores, run=run, step=step)
        if against is not None and against in self.kept:
            for row in rows:
                if row["score"] in FD_SCORES or row["score"].startswith("FD_"):
                    row.update(self.difference(self.kept[against], scores, row["score"]))
        return rows

    def difference(self, a: GenerationScores, b: GenerationScores, score: str) -> dict:
        """FD(b) − FD(a) with compare_fd's paired interval (none with --gen-bootstrap 0)."""
        n_boot = self.cfg.gen_bootstrap
        d = compare_fd(a, b, self.reference, score, n_boot=max(n_boot, 2), seed=self.cfg.seed)
        low, high = (d["low"], d["high"]) if n_boot else (float("nan"), float("nan"))
        return {"against": a.checkpoint, "difference": d["difference"], "ci_low": low, "ci_high": high,
                "level": d["level"], "n_boot": n_boot}


FD_SCORES = ("FID", "sFID")


def score_rows(s: GenerationScores, *, run: str = "", step: int | None = None) -> list[dict]:
    """One gen.csv row per score of a checkpoint: its value and N, how the samples were drawn, the reference."""
    how = s.sampling.describe()
    rows = []
    for score, value in s.scores.items():
        space = "inception" if score in (*FD_SCORES, "IS", "precision", "recall") else score.removeprefix("FD_")
        rows.append({"checkpoint": s.checkpoint, "run": run, "step": step, "space": space, "score": score,
                     "N": s.n, "value": float(value.value if isinstance(value, FD) else value), "against": "",
                     "difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                     "level": float("nan"), "n_boot": 0, "sampler": how["sampler"], "steps": how["steps"],
                     "cfg": how["cfg"], "cfg_interval": ",".join(f"{x:g}" for x in how["cfg_interval"]),
                     "seed": how["seed"], "precision": how["precision"], "reference": s.reference})
    return rows


def score_models(scorer: Scorer, checkpoints, names) -> pd.DataFrame:
    """analyze's and compare's gen.csv: every checkpoint scored alike, each later one's FDs differenced (paired)
    against the first's."""
    rows = []
    for i, (ckpt, name) in enumerate(zip(checkpoints, names)):
        rows += scorer.score(ckpt, name, keep=i == 0, against=names[0] if i else None)
    return pd.DataFrame(rows, columns=GEN_COLUMNS)


def logged_generation(log: Path, run: str) -> list[dict]:
    """gen.csv's rows from a training run's log.jsonl: its {"event": "eval", ...} rows (`train --eval-every`),
    named RUN@STEP."""
    if not Path(log).is_file():
        return []
    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    return [{**{c: row.get(c) for c in GEN_COLUMNS}, "checkpoint": f"{run}@{row['step']}", "run": run}
            for row in rows if row.get("event") == "eval"]
