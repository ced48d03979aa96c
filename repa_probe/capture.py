"""Capture: every block's output, for every noise level, pooled per image on the fly.

One forward pass per (batch, t) records all blocks through hooks on the blocks its model family lists
(families/): the family also says how to call the model and where the image tokens are in a block's
input and output (tuples, extra text or register tokens), so capture works the same for every family:

    block 0   the image tokens entering block 1 (patch embedding + positions): a pre-hook on blocks[0]
    block i   the output of block i (1-based, as in the REPA paper): a forward hook on blocks[i-1]
    raw       the model input x_t as baselines: `raw_pooled`, its p×p patches (C·p·p values each, what the patch
              embedding sees) mean-pooled over the grid exactly as the blocks are; and `raw`, the thumbnail
              x_t average-pooled per patch, C·(H/p)·(W/p), which keeps the spatial layout the pooled blocks lose

Pooling (per block, per image, in float32): ``mean`` over tokens → [D]; ``grid:G`` → the token grid
average-pooled to G×G, flattened to [D·G·G] (channel-major); ``tokens`` → all tokens [T, D]. So memory
stays O(batch × depth × width) for the pooled modes.

Inputs follow the checkpoint's time convention (noise.py): x_t = model_input(x0, t, ε) and the
t-embedder is fed timestep(t). The noise ε of image `id` at level t is `seeded_noise([id], salt=round(t·1e6))`:
it depends on neither the batch, the rank, the t grid nor the checkpoint, so two checkpoints analysed
with the same seed see exactly the same noisy inputs. The class label is the null class
(``num_classes``) unless labels="true"; families without labels get None.

`capture_blocks` works in memory (the trainer's analysis-while-training); `extract` fills the feature
store (store.py) for analysis at scale, resumably and, under torchrun, split across ranks.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from repa_probe.background import host_copy
from repa_probe.checkpoints import LoadedCheckpoint, compiled_blocks
from repa_probe.data import ImageDataset, list_images, load_vae, select_subset, to_model_space, vae_fingerprint
from repa_probe.errors import UserError
from repa_probe.families import InputSpace, load_checkpoint
from repa_probe.noise import Convention, seeded_noise
from repa_probe.runtime import AUTOCAST_DTYPES, init_distributed, resolve_device
from repa_probe.reductions import REDUCTIONS, Batch, TokenReduction, part_name
from repa_probe.store import Features, FeatureStore, ImageFeatures, fill, read_features, t_part

DEFAULT_TS = (0.0, 0.1, 0.25, 0.5, 0.75)
RAW_VERSION = "raw thumbnail + raw_pooled patches"   # in the cache key: older entries lack raw_pooled


#################################################################################
#                                    Pooling                                    #
#################################################################################

def parse_pooling(pooling: str) -> tuple[str, int]:
    """'mean' → ('mean', 0); 'tokens' → ('tokens', 0); 'grid:4' → ('grid', 4)."""
    name, _, arg = pooling.partition(":")
    if name in ("mean", "tokens") and not arg:
        return name, 0
    if name == "grid" and arg.isdigit() and int(arg) > 0:
        return name, int(arg)
    raise UserError(f"--pooling {pooling!r}: use 'mean', 'tokens' or 'grid:G' (e.g. grid:4)")


def pool_tokens(h: torch.Tensor, pooling: str) -> torch.Tensor:
    """(N, T, D) tokens of a square grid → per-image features, float32 (see module docstring)."""
    name, g = parse_pooling(pooling)
    h = h.float()
    if name == "mean":
        return h.mean(dim=1)                                          # (N, D)
    if name == "tokens":
        return h                                                      # (N, T, D)
    N, T, D = h.shape
    side = int(round(T ** 0.5))
    grid = h.transpose(1, 2).reshape(N, D, side, side)                # row-major tokens → (N, D, side, side)
    return F.adaptive_avg_pool2d(grid, g).flatten(1)                  # (N, D·g·g)


def raw_baselines(x_t: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """The model input as baselines, float32 (see the module docstring):
    raw_pooled (N, C·p·p): the mean over the grid of the p×p patches, pooled like the blocks;
    raw (N, C·(H/p)·(W/p)): the thumbnail, x_t average-pooled per p×p patch."""
    x = x_t.float()
    return {"raw_pooled": F.pixel_unshuffle(x, patch_size).mean(dim=(2, 3)),
            "raw": F.avg_pool2d(x, patch_size).flatten(1)}


#################################################################################
#                                     Hooks                                     #
#################################################################################

class _StopForward(Exception):
    """Raised by the hook of the last wanted block: nothing after it (later blocks, final layer) is needed."""


class BlockCapture:
    """Context manager: hooks on a loaded model's blocks that store pooled features of the wanted blocks.

    blocks: indices in 0..depth (0 = tokens entering block 1), default all. After a forward pass,
    `features[i]` holds block i's pooled output, and `reduced[name][i]` each token reduction's array of it
    (reductions.py; a projector reduction's `reduced[name]["projected{k}"]`, of the model's REPA projectors at
    the aligned block, when it is captured). Hooks are removed on exit, also after an error.
    """

    def __init__(self, ckpt: LoadedCheckpoint, blocks: Sequence[int] | None = None, pooling: str = "mean",
                 stop_early: bool = True, reductions: Sequence[TokenReduction] = (), batch: Batch | None = None):
        self.family, self.modules = ckpt.family, list(ckpt.family.blocks(ckpt.model))
        depth = len(self.modules)
        self.pooling = pooling
        self.blocks = list(range(depth + 1)) if blocks is None else [int(b) for b in blocks]
        bad = [b for b in self.blocks if not 0 <= b <= depth]
        if bad:
            raise UserError(f"blocks {bad} out of range: this model has blocks 0..{depth} (0 = embedding)")
        parse_pooling(pooling)
        self.last = max(self.blocks) if stop_early else None
        self.features: dict[int, torch.Tensor] = {}
        self.reductions, self.batch = list(reductions), batch
        self.reduced: dict[str, dict] = {r.name: {} for r in self.reductions}   # name → {block or projectorK: [N, ...]}
        project = getattr(ckpt.model, "project", None)
        self.project = project if callable(project) else None
        self.aligned = ckpt.anatomy.aligned_block
        self.handles = []

    def _record(self, index: int, h: torch.Tensor) -> None:
        self.features[index] = pool_tokens(h, self.pooling)
        for r in self.reductions:
            if r.where == "blocks":
                self.reduced[r.name][index] = r.fn(h, self.batch)
            elif index == self.aligned and self.project is not None:
                self.reduced[r.name] = {f"projected{k}": r.fn(z, self.batch) for k, z in enumerate(self.project(h))}
        if index == self.last:
            raise _StopForward

    def __enter__(self) -> "BlockCapture":
        family, modules = self.family, self.modules
        try:
            if 0 in self.blocks:   # block 0: the image tokens entering the first block
                self.handles.append(modules[0].register_forward_pre_hook(
                    lambda m, args, kwargs: self._record(0, family.input_tokens(args, kwargs)), with_kwargs=True))
            for i in self.blocks:
                if i > 0:
                    self.handles.append(modules[i - 1].register_forward_hook(
                        lambda m, args, out, i=i: self._record(i, family.block_tokens(out))))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __exit__(self, *exc) -> bool:
        self.remove()
        return exc[0] is _StopForward   # the early stop is the normal end of a capture pass


#################################################################################
#                                 Capture passes                                #
#################################################################################

def noisy_input(convention: Convention, x0: torch.Tensor, ids: torch.Tensor, t: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, timestep) for canonical t: the seeded ε of each image id, mixed in the checkpoint's way."""
    noise = seeded_noise(ids.cpu(), tuple(x0.shape[1:]), seed, salt=int(round(t * 1e6))).to(x0.device, x0.dtype)
    t_vec = torch.full((len(x0),), float(t))   # on the CPU: the DiT step lookup tables live there
    return convention.model_input(x0, t_vec, noise), convention.timestep(t_vec).to(x0.device)


def reductions_named(names: Sequence[str | TokenReduction]) -> list[TokenReduction]:
    """Registered token reductions by name (a TokenReduction passes through); an unknown name is one line."""
    unknown = [n for n in names if isinstance(n, str) and n not in REDUCTIONS]
    if unknown:
        raise UserError(f"unknown token reduction(s) {unknown}; registered: {', '.join(REDUCTIONS)}")
    return [REDUCTIONS[n] if isinstance(n, str) else n for n in names]


@torch.no_grad()
def capture_batch(ckpt: LoadedCheckpoint, x0: torch.Tensor, labels: torch.Tensor | None, ids: torch.Tensor,
                  t: float, *, seed: int, blocks: Sequence[int] | None = None, pooling: str = "mean",
                  autocast_dtype: torch.dtype | None = None, reductions: Sequence[str | TokenReduction] = ()
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass at noise level t → (features [n_blocks, N, ...], arrays {name: [...]}), float32.

    x0 is the clean model-space input (pixels in [−1, 1] or scaled latents); labels None = null class.
    The model runs in eval mode and is put back in its previous mode afterwards. `arrays` holds the raw
    baselines "raw" and "raw_pooled" [N, d], and for each token reduction (reductions.py) NAME: "NAME"
    [n_blocks, N, ...] of every block's tokens, with raw=True "raw_NAME" [N, ...] of the thumbnail's patches;
    a projector reduction gives "NAME{k}" [N, ...] of projector k (when the model has REPA projectors and the
    aligned block is captured).
    """
    model, anatomy = ckpt.model, ckpt.anatomy
    device = next(model.parameters()).device
    x0, ids = x0.to(device, non_blocking=True).float(), ids.cpu()
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, t, seed)
    y = None if anatomy.num_classes is None else \
        labels.to(device) if labels is not None else torch.full((len(x0),), anatomy.num_classes, device=device)
    reductions, batch = reductions_named(reductions), Batch(ids, seed)
    was_training = model.training
    model.eval()
    try:
        with BlockCapture(ckpt, blocks, pooling, reductions=reductions, batch=batch) as cap, \
                torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            ckpt.family.forward(model, x_t, timestep, y)
    finally:
        model.train(was_training)
    out = raw_baselines(x_t, anatomy.patch_size)
    thumbnail = F.avg_pool2d(x_t.float(), anatomy.patch_size).flatten(2).transpose(1, 2)    # (N, grid², C)
    for r in reductions:
        got = cap.reduced[r.name]
        if r.where == "projector":
            out |= {r.name + k.removeprefix("projected"): z for k, z in got.items()}
            continue
        out[r.name] = torch.stack([got[b] for b in cap.blocks])
        if r.raw:
            out["raw_" + r.name] = r.fn(thumbnail, batch)
    return torch.stack([cap.features[b] for b in cap.blocks]), out


def capture_blocks(ckpt: LoadedCheckpoint, x0: torch.Tensor, labels: torch.Tensor | None, ids: torch.Tensor,
                   ts: Sequence[float], *, seed: int, blocks: Sequence[int] | None = None, pooling: str = "mean",
                   autocast_dtype: torch.dtype | None = None, batch_size: int | None = None,
                   out_device: str | torch.device = "cpu") -> torch.Tensor:
    """In-memory features [n_t, n_blocks, N, D] (n_blocks = depth+1 by default; index 0 = block 0), float32.

    Same noise, hooks and pooling as `extract`, no store (for models that change, such as a trainer's EMA).
    `blocks` picks and orders the blocks (0..depth); `batch_size` bounds the images per forward pass.
    """
    return capture_in_memory(ckpt, x0, labels, ids, ts, seed=seed, blocks=blocks, pooling=pooling,
                             autocast_dtype=autocast_dtype, batch_size=batch_size, out_device=out_device)[0]


def capture_in_memory(ckpt: LoadedCheckpoint, x0: torch.Tensor, labels: torch.Tensor | None, ids: torch.Tensor,
                      ts: Sequence[float], *, seed: int, blocks: Sequence[int] | None = None, pooling: str = "mean",
                      autocast_dtype: torch.dtype | None = None, batch_size: int | None = None,
                      out_device: str | torch.device = "cpu", reductions: Sequence[str | TokenReduction] = ()
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """capture_blocks, and capture_batch's other arrays of every t, stacked: {name: [n_t, ...]}."""
    step, per_t, arrays = batch_size or len(x0), [], {}
    by_block = {r.name for r in reductions_named(reductions) if r.where == "blocks"}     # [n_blocks, N, ...]
    for t in ts:
        parts = [capture_batch(ckpt, x0[i:i + step], None if labels is None else labels[i:i + step],
                               ids[i:i + step], t, seed=seed, blocks=blocks, pooling=pooling,
                               autocast_dtype=autocast_dtype, reductions=reductions)
                 for i in range(0, len(x0), step)]
        per_t.append(torch.cat([p[0].to(out_device) for p in parts], dim=1))
        for name in parts[0][1]:
            arrays.setdefault(name, []).append(torch.cat([p[1][name].to(out_device) for p in parts],
                                                         dim=int(name in by_block)))
    return torch.stack(per_t), {name: torch.stack(v) for name, v in arrays.items()}


#################################################################################
#                           Extraction into the store                           #
#################################################################################

@dataclass
class CaptureConfig:
    """What decides the captured numbers besides model and data (all of it goes into the cache key)."""
    ts: tuple[float, ...] = DEFAULT_TS
    seed: int = 0
    pooling: str = "mean"
    labels: str = "null"          # "null" (the CFG unconditional class) or "true"
    precision: str = "fp32"       # autocast: "fp32" (off), "bf16" or "fp16"
    dtype: str = "float32"        # storage: "float32" or "float16"
    blocks: tuple[int, ...] | None = None   # which blocks (0..depth) to keep; None = all. The pass stops
                                            # after the last one, so (0, 1) costs about one block
    reductions: tuple[str, ...] = ()   # token reductions to keep too (reductions.py); each is its own part of
                                       # the entry, keyed by its name and version, so not in key()
    compile: bool = False         # torch.compile every block (compiled_blocks); equal to eager up to rounding

    def __post_init__(self):
        self.ts = tuple(float(t) for t in self.ts)
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)
        self.reductions = tuple(dict.fromkeys(self.reductions))
        reductions_named(self.reductions)
        parse_pooling(self.pooling)
        if any(not 0 <= t <= 1 for t in self.ts) or not self.ts:
            raise UserError(f"--t {','.join(map(str, self.ts))}: noise levels must lie in [0, 1] (0 = clean data)")
        if self.labels not in ("null", "true"):
            raise UserError(f"--labels {self.labels!r}: use 'null' or 'true'")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"--precision {self.precision!r}: use fp32, bf16 or fp16")
        if self.dtype not in ("float32", "float16"):
            raise UserError(f"--store-dtype {self.dtype!r}: use float32 or float16")

    def key(self) -> dict:
        """The cache-key part of the settings: not t (each t is its own part of the entry), not the reductions
        (each one is its own part, named by its name and version: reductions.part_name)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("ts", "reductions") and not (k == "compile" and not v)}


def model_fingerprint(ckpt) -> dict:
    """What identifies a loaded checkpoint's function: its file hash, which weights, its time convention, and
    which of its tokens are captured where not the image tokens (a family's class-token view: `class_token`)."""
    p, tokens = ckpt.provenance, ckpt.family.tokens
    return {"sha256": p.sha256, "weights": p.weights, "convention": p.convention, "format": p.format} | \
        ({"tokens": tokens} if tokens != "image" else {})


def input_space(ckpt: LoadedCheckpoint, mode: str | None = None) -> InputSpace:
    """The model's input space (its family says), checked against a --mode the user gave."""
    space = ckpt.anatomy.input
    if mode is not None and mode not in ("pixels", "latents"):
        raise UserError(f"--mode {mode!r}: use 'pixels' or 'latents'")
    if mode is not None and mode != space.kind:
        raise UserError(f"--mode {mode}: the model takes {space.channels}-channel {space.kind} "
                        f"({space.channels}×{space.size}²); use --mode {space.kind} or leave --mode out")
    return space


class _ArrayRows(Dataset):
    """Rows of a cached .npy (e.g. latents), opened lazily so DataLoader workers map it themselves."""

    def __init__(self, path: Path, labels: np.ndarray, ids: np.ndarray):
        self.path, self.labels, self.ids, self._array = path, labels, ids, None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[i])), int(self.labels[i]), int(self.ids[i])


def cached_latents(store: FeatureStore, dataset: ImageDataset, vae, space: InputSpace, *, batch_size: int = 64,
                   num_workers: int = 0, quiet: bool = False) -> ImageFeatures:
    """VAE latents (posterior mean, scaled as `space` says) [N, C, H/f, W/f] of a data subset, computed once
    per (VAE weights, scaling, data subset) and memory-mapped from the store afterwards."""
    from repa_probe.store import cache_image_features

    def encode(images, ids):
        return {"latents": to_model_space(images, "latents", vae, scale=space.scale, shift=space.shift)}

    fingerprint = {"vae": vae_fingerprint(vae), "posterior": "mean", "scale": space.scale}
    if space.shift:
        fingerprint["shift"] = space.shift
    return cache_image_features(store, "latents", fingerprint, dataset, encode, batch_size=batch_size,
                                num_workers=num_workers, quiet=quiet)


def make_dataset(root: str | os.PathLike, image_size: int, n: int | None = None, subset_seed: int = 0,
                 skip_bad: bool = False) -> ImageDataset:
    """The n-image, class-balanced, seeded subset of an ImageFolder tree, centre-cropped to image_size."""
    _, labels, _ = list_images(root)
    return ImageDataset(root, image_size, select_subset(labels, n, subset_seed), skip_bad=skip_bad)


def extract(checkpoint, data, config: CaptureConfig | None = None, *, mode: str | None = None,
            vae: str | None = None, n: int | None = None, subset_seed: int = 0, skip_bad: bool = False,
            batch_size: int = 64, num_workers: int = 0, device: str | torch.device | None = None,
            cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> Features:
    """Fill the feature store for (checkpoint, data, config) and return the features read from it.

    checkpoint: a path or a LoadedCheckpoint. data: an ImageFolder path (then n / subset_seed / skip_bad pick
    the subset) or an ImageDataset at the model's image size. mode: "pixels" | "latents" (default: the
    checkpoint's). vae: the VAE folder or hub name for latent models (default: the family's). Only chunks
    missing from the store are computed (`Features.computed` counts them): the pooled features of each t are
    one part of the entry, and each token reduction of each t another (reductions.part_name), all filled from
    one forward pass per batch and t. Under torchrun the batches are split across ranks.
    """
    config = config or CaptureConfig()
    device = resolve_device(device)
    init_distributed(device)
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    space = input_space(ckpt, mode)
    dataset = data if isinstance(data, ImageDataset) else make_dataset(data, space.image_size, n, subset_seed, skip_bad)
    if dataset.image_size != space.image_size:
        raise UserError(f"the dataset is cropped to {dataset.image_size}px but this {space.kind} model needs "
                        f"{space.image_size}px")
    store = FeatureStore(cache_dir)
    store.check_writable()
    ckpt.model.to(device).eval()
    rows, vae_key = _model_inputs(store, dataset, space, vae, device, batch_size, num_workers, quiet)
    fingerprint = {"model": model_fingerprint(ckpt), "data": dataset.fingerprint(), "mode": space.kind,
                   "vae": vae_key, "capture": config.key(), "noise": "seeded_noise(id, salt=round(t*1e6))",
                   "raw": RAW_VERSION}
    entry = store.entry("blocks", fingerprint, dataset.labels, dataset.ids, row_axes={"blocks": 1})
    reductions = reductions_named(config.reductions)
    parts = {t_part(t): (t, None) for t in config.ts} | \
        {part_name(t_part(t), r): (t, r) for t in config.ts for r in reductions}
    compute = _part_computer(ckpt, config, device, entry, parts, reductions)
    with compiled_blocks(ckpt, config.compile):
        computed = fill(entry, list(parts), rows, compute, batch_size=batch_size, num_workers=num_workers,
                        quiet=quiet, desc="capture")
    reduced = {r.name: [part_name(t_part(t), r) for t in config.ts] for r in reductions}
    features = read_features(entry, config.ts, computed, reduced)
    features.manifest = {**features.manifest, "skipped_images": [str(p) for p in dataset.skipped]}
    return features


def _model_inputs(store: FeatureStore, dataset: ImageDataset, space: InputSpace, vae: str | None,
                  device: torch.device, batch_size: int, num_workers: int, quiet: bool) -> tuple[Dataset, dict | None]:
    """(the rows capture reads: the images, or for a latent model their cached VAE latents; the VAE's key)."""
    if space.kind != "latents":
        return dataset, None
    autoencoder = load_vae(vae or space.vae, device)
    latents = cached_latents(store, dataset, autoencoder, space, batch_size=batch_size, num_workers=num_workers,
                             quiet=quiet)
    return _ArrayRows(latents.path / "all" / "latents.npy", latents.labels, latents.ids), latents.fingerprint["vae"]


def _part_computer(ckpt: LoadedCheckpoint, config: CaptureConfig, device: torch.device, entry, parts: dict,
                   reductions: list[TokenReduction]):
    """fill's compute: the arrays of one part (t, and a token reduction or None for the pooled features) of a
    batch, rows first. fill asks for a batch's parts one after the other; one forward pass per batch and t
    serves them all, computing every reduction of that t that is not in the store yet."""
    autocast_dtype, store_dtype = AUTOCAST_DTYPES[config.precision], np.dtype(config.dtype)
    last = {}

    def compute(x, labels, ids, part):
        t, reduction = parts[part]
        if last.get("key") != (t, ids.numpy().tobytes()) or reduction not in last["reductions"]:
            wanted = [r for r in reductions if r is reduction or not entry.is_complete(part_name(t_part(t), r))]
            x = x.to(device, non_blocking=True)                           # uint8 crosses the bus: 4× fewer bytes
            x0 = to_model_space(x, "pixels") if x.dtype == torch.uint8 else x.float()
            feats, out = capture_batch(ckpt, x0, labels if config.labels == "true" else None, ids, t,
                                       seed=config.seed, pooling=config.pooling, blocks=config.blocks,
                                       autocast_dtype=autocast_dtype, reductions=wanted)
            last.update(key=(t, ids.numpy().tobytes()), reductions=[None, *wanted], feats=feats, out=out)
        fetch = host_copy(_part_arrays(last["feats"], last["out"], reduction))

        def arrays():                                                      # on the store's writer thread
            out = {k: v.astype(store_dtype, copy=False) for k, v in fetch().items()}
            if store_dtype == np.float16 and not all(np.isfinite(v).all() for v in out.values()):
                raise UserError("features exceed the float16 range (±65504): use --store-dtype float32")
            return out
        return arrays
    return compute


def _part_arrays(feats: torch.Tensor, out: dict[str, torch.Tensor], reduction: TokenReduction | None
                 ) -> dict[str, torch.Tensor]:
    """capture_batch's output as the arrays of one store part, rows first: the pooled features ("blocks") and
    raw baselines, or one reduction's arrays (by_reduction)."""
    if reduction is None:
        return {"blocks": feats.transpose(0, 1), "raw": out["raw"], "raw_pooled": out["raw_pooled"]}
    arrays = by_reduction(out, reduction)
    return arrays | ({"blocks": arrays["blocks"].transpose(0, 1)} if "blocks" in arrays else {})


def by_reduction(out: dict, reduction: TokenReduction) -> dict:
    """One reduction's arrays of capture_batch's (or capture_in_memory's) output under the names Features and
    the store give them: "blocks" (and "raw", of the thumbnail), or a projector reduction's "projected{k}"."""
    name = reduction.name
    if reduction.where == "projector":
        return {f"projected{k[len(name):]}": v for k, v in out.items() if k.startswith(name) and k[len(name):].isdigit()}
    return {"blocks": out[name], **({"raw": out["raw_" + name]} if reduction.raw else {})}
