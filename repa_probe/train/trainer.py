"""The REPA / vanilla SiT trainer: one straight loop, single process or DDP under torchrun.

    repa-probe train --model SiT-B/2 --data DIR --image-size 256 --latents VAE --encoder dinov2-vit-b=W \
        --repa-depth 4 --repa-coeff 0.5 --batch 256 --steps N --ckpt-every K --out RUN_DIR
    torchrun --nproc_per_node=8 -m repa_probe train ...        (NCCL on GPUs, gloo on CPU)

Objective and defaults are REPA's (train.py, loss.py of sihyun-yu/REPA): linear path, v-prediction,
uniform t, class dropout 0.1, AdamW(1e-4, (0.9, 0.999), wd 0, eps 1e-8), grad-norm clip 1.0, EMA 0.9999
every step, λ = 0.5. Labels are dropped once, here. (REPA's model also drops labels inside its
LabelEmbedder in train mode, and with its --legacy flag train.py drops them a second time, an effective
p = 1 − 0.9² = 0.19; our model is a pure function of its inputs and this is not replicated.)

Controlled experiments. Every random choice comes from its own stream, a generator seeded by
(seed, stream name, step): `data` (a permutation per epoch), `t`, `noise`, `drop` (label dropout),
`posterior` (latent mode: the VAE posterior sample, per step and rank). t, ε and the drop mask are drawn
for the whole global batch and each rank takes its slice, so sample i of a step gets the same draws with
1 or N processes (in latent mode the posterior sample is the exception: it is drawn per rank). The SiT
is initialised from `seed` alone and the REPA projectors from their own stream, so `--repa-coeff 0`
(vanilla: no projectors, no encoder term) and `--repa-coeff 0.5` start from the same SiT weights and see
the same images, labels, t and noise at every step.

Files in RUN_DIR (only rank 0 writes):
    checkpoints/{step:07d}.pt  our checkpoint format (checkpoints.save_checkpoint, loads with
                               torch.load(weights_only=True)): config, ema, model, optimizer, scaler, step,
                               rng {torch_cpu, torch_cuda: generator state tensors}, data_position
                               {epoch, batch_in_epoch, samples_seen}; meta keys: convention ("repa"), step,
                               encoders, encoder_specs, encoder_random_init, repa_coeff, repa_depth, reg_cls,
                               reg_encoder (REG's class token's encoder, else null), data, mode
                               ("pixels"/"latents"), image_size, num_classes, classes, vae, world_size,
                               model_name, train_config (the whole TrainConfig as plain data).
    log.jsonl                  one object per line. {"event": "start", step, world_size, n_images, params,
                               sit_init_sha256, ...} at every (re)start, then {"event": "train", step,
                               loss, loss_denoise, loss_repa (null once --align-until has passed),
                               loss_<term> for each further term (train/terms/), grad_norm (mean over the
                               interval, before clipping), img_per_s (global), lr, epoch, elapsed_s,
                               inputs_sha256 (hash of this step's global batch: image ids, t, ε, dropped-label
                               mask)}.
    analysis.jsonl             tidy rows {step, block, t, metric, encoder, value, weights: "ema", n}: metric
                               "cknna" (k = --analyze-k, per encoder) or "probe_top1" (encoder null); block
                               is 1-based (the output of block b). `repa-probe trajectory RUN_DIR` reads it.
    config.json                the TrainConfig of the latest (re)start.
    repa-export/{step:07d}.pt  with --export-repa: the final checkpoint in REPA's layout (export_repa).
    .repa-probe.lock           while a run holds the folder: who holds it (a second run stops, naming it; a
                               killed run's lock passes to the next run: runtime.hold_folder).

Exact resume: the data order, t, ε and drop mask are functions of the step, so restoring model, EMA,
optimizer, scaler, RNG states and the step continues bit for bit (on CPU). `--resume` is automatic
when RUN_DIR/checkpoints holds a checkpoint; log rows past the resumed step are dropped.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from repa_probe.checkpoints import FORMAT_TAG, read_checkpoint, save_checkpoint
from repa_probe.config import (MAX_WORKERS, AnalyzeConfig, check_generation, check_knobs, flag_of, knob,
                               prefixed, resume_fields, spell)
from repa_probe.errors import UserError
from repa_probe.models import SiT, ModelConfig, SRAHead, build_projector, model_config, size_name
from repa_probe.runtime import (autocast, checkpoint_step, hold_folder, init_distributed,
                                latest_checkpoint, local_rank, no_space_is_one_line, rank, remove_stale_tmp,
                                resolve_device, resolve_precision, state_dict_sha256, stream_seed, torch_save_atomic,
                                world_size, write_text_atomic)
from repa_probe.train.loss import WEIGHTINGS, sample_t, spatial_zscore, training_loss
from repa_probe.train.terms import Context, Term, active_terms, past_alignment
from repa_probe.train.terms.attn_align import encoder_blocks
from repa_probe.train.terms.dispersive import VARIANTS as DISPERSIVE_VARIANTS


DATA, MODEL, REPA, OPTIM, OUTPUT = "data", "model", "REPA", "optimisation", "output"
TERMS_GROUP = "REPA's successors (train/terms/)"
ANALYSIS = "analysis while training (EMA model)"


def _analysis() -> AnalyzeConfig:
    """The in-training analysis's defaults: data None = the run's --data."""
    return AnalyzeConfig(data=None, n=1000, ts=(0.0, 0.5), bootstrap=0, baselines=False, quiet=True)


@dataclass
class TrainConfig:
    """Every knob of a run; defaults are REPA's where REPA has one. Plain data: it goes into checkpoints. The
    fields go in --help's order; resume=True marks what a resumed run must share with its checkpoint."""
    data: str = knob("", kind="path", required=True, resume=True, group=DATA, help="ImageFolder tree DIR/<class>/<image>")
    image_size: int = knob(32, least=1, most=8192, resume=True, group=DATA,
                           help="image side after centre crop (default: 32)")
    mode: str = knob("pixels", resume=True, group=DATA,          # --pixels / --latents VAE (cli.py)
                     help="pixels (images in [-1, 1]) or latents (SD-VAE · 0.18215)")
    vae: str | None = knob(None, cli=False, help="latent mode: local AutoencoderKL folder (or hub name)")
    num_classes: int | None = knob(None, least=1, most=10_000_000, resume=True, group=DATA,
                                   help="default: the number of class folders")
    num_workers: int = knob(4, flag="--workers", least=0, most=MAX_WORKERS, what="a number of worker processes",
                            group=DATA, help="DataLoader workers per process (default: 4)")
    # model
    model: str = knob("SiT-S/2", resume=True, group=MODEL, help="SiT-{S,B,L,XL}/{2,4,8} (default: SiT-S/2)")
    depth: int | None = knob(None, least=1, most=1024, resume=True, group=MODEL,
                             help="override the size's number of blocks")
    width: int | None = knob(None, least=1, most=65_536, resume=True, group=MODEL,
                             help="override the size's hidden size")
    heads: int | None = knob(None, least=1, most=65_536, resume=True, group=MODEL,
                             help="override the size's attention heads")
    qk_norm: bool = knob(False, resume=True, group=MODEL, help="LayerNorm on queries and keys (REPA default: off)")
    # REPA
    encoders: list[str] = knob(factory=list, flag="--encoder", kind="append", metavar="NAME[=WEIGHTS]", resume=True,
                               group=REPA, help="target encoder (repeat for several, one projector each), e.g. "
                                                "dinov2-vit-b=/w/dinov2.pth")
    encoder_random_init: bool = knob(False, resume=True, group=REPA, help="random target encoders (tests only)")
    repa_depth: int | None = knob(None, least=1, resume=True, group=REPA,
                                  help="aligned block, 1-based (default: 4 for S/B, 8 for L/XL)")
    repa_coeff: float = knob(0.5, least=0, resume=True, group=REPA,     # encoders of a vanilla run serve the analysis
                             help="λ of the alignment loss; 0 = vanilla SiT (default 0.5)")
    projector_dim: int = knob(2048, least=1, most=65_536, resume=True, group=REPA,
                              help="projector MLP width (default: 2048, as REPA)")
    projector: str = knob("mlp", choices=("mlp", "conv"), resume=True, group=REPA,
                          help="mlp (REPA, default) or conv (iREPA: one k×k convolution over the token grid)")
    projector_kernel: int = knob(3, least=1, most=15, resume=True, group=REPA, help="conv projector kernel (default: 3)")
    spatial_norm: str = knob("none", choices=("none", "zscore"), resume=True, group=REPA,
                             help="iREPA: z-score each target channel over the image's tokens, "
                                  "z ← (z − α·mean)/(std + 1e-6)")
    zscore_alpha: float = knob(0.6, least=0, resume=True, group=REPA, help="α of --spatial-norm zscore (default 0.6)")
    align_until: int = knob(0, least=0, metavar="STEP", group=REPA,
                            help="HASTE's switch-off: the alignment term acts on steps 1..STEP only, then training "
                                 "is denoising alone (default 0: every step)")
    # further terms, one file each in train/terms/
    dispersive: float = knob(0.0, least=0, resume=True, metavar="COEFF", group=TERMS_GROUP,
                             help="λ of Dispersive Loss (Wang & He 2025) on --dispersive-block's tokens; the "
                                  "authors' PyTorch runs use 0.25 (default 0: off)")
    dispersive_block: int | None = knob(None, least=1, resume=True, metavar="BLOCK", group=TERMS_GROUP,
                                        help="1-based block of the dispersive term (default: the last, as the "
                                             "authors' PyTorch code)")
    dispersive_tau: float = knob(1.0, above=0, resume=True, metavar="TAU", group=TERMS_GROUP,
                                 help="temperature τ of the dispersive term (default: 1)")
    dispersive_variant: str = knob("infonce-l2", choices=DISPERSIVE_VARIANTS, resume=True, group=TERMS_GROUP,
                                   help="infonce-l2 (the authors' code, default) or infonce-cos (the paper's "
                                        "cosine InfoNCE)")
    attn_align: float = knob(0.0, least=0, resume=True, metavar="COEFF", group=TERMS_GROUP,
                             help="λ of HASTE's attention distillation: the SiT's attention maps at "
                                  "--attn-align-blocks from the first --encoder's (a ViT); HASTE uses 0.5 beside "
                                  "REPA's 0.5 and --align-until (default 0: off)")
    attn_align_blocks: tuple[int, ...] | None = knob(None, kind="blocks", resume=True, metavar="BLOCKS",
                                                     group=TERMS_GROUP,
                                                     help="the SiT's blocks (default: the four ending at "
                                                          "--repa-depth, 5–8 for 8 as HASTE)")
    attn_align_teacher_blocks: tuple[int, ...] | None = knob(None, kind="blocks", resume=True, metavar="BLOCKS",
                                                             group=TERMS_GROUP,
                                                             help="the encoder's blocks, paired in order (default: "
                                                                  "its last ones, 9–12 of 12 as HASTE)")
    self_align: float = knob(0.0, least=0, resume=True, metavar="COEFF", group=TERMS_GROUP,
                             help="λ of SRA's self-alignment: a head on block STUDENT of the model aligned to block "
                                  "TEACHER of its EMA at a lower noise level; the authors use 0.5 (default 0: off)")
    self_align_blocks: tuple[int, ...] | None = knob(None, kind="blocks", resume=True, metavar="STUDENT,TEACHER",
                                                     group=TERMS_GROUP,
                                                     help="SRA's blocks (default: 2/7 and 5/7 of the depth, 8,20 "
                                                          "for 28 blocks as the authors' SiT-XL/2)")
    self_align_offset: float = knob(0.2, least=0, most=1, resume=True, metavar="DT", group=TERMS_GROUP,
                                    help="SRA's largest noise offset: the teacher sees t − DT·U(0, 1) (default 0.2)")
    reg_cls: float = knob(0.0, least=0, resume=True, metavar="COEFF", group=TERMS_GROUP,
                          help="λ of REG's class-token denoising: the first --encoder's class token (CLS, else its "
                               "mean token) noised with the image, denoised as an extra first token and aligned "
                               "by REPA's term; the authors use 0.03 (default 0: off)")
    # optimisation and objective
    batch: int = knob(256, least=1, most=1 << 20, resume=True, group=OPTIM,
                      help="global batch size, split across ranks (default: 256)")
    steps: int = knob(400_000, least=1, group=OPTIM, help="training steps (default: 400000)")
    lr: float = knob(1e-4, above=0, resume=True, group=OPTIM, help="AdamW learning rate (default: 1e-4)")
    weight_decay: float = knob(0.0, least=0, resume=True, group=OPTIM, help="AdamW weight decay (default: 0)")
    grad_clip: float = knob(1.0, above=0, resume=True, group=OPTIM, help="gradient-norm clip (default: 1.0)")
    ema_decay: float = knob(0.9999, least=0, most=1, resume=True, group=OPTIM,
                            help="EMA decay per step (default: 0.9999); tiny runs need less, e.g. 0.99")
    cfg_prob: float = knob(0.1, least=0, most=1, resume=True, group=OPTIM,
                           help="class-label dropout (default: 0.1)")
    weighting: str = knob("uniform", choices=WEIGHTINGS, resume=True, group=OPTIM,
                          help="t distribution (default: uniform)")
    precision: str = knob("auto", choices=("auto", "bf16", "fp16", "fp32"), resume=True, group=OPTIM,
                          help="autocast (default: bf16 on GPUs, fp32 on CPU)")
    tf32: bool = knob(True, negatable=True, group=OPTIM, help="TF32 matmuls on GPUs (default: on)")
    compile: bool = knob(False, group=OPTIM, help="torch.compile the model")
    seed: int = knob(0, resume=True, group=OPTIM, help="seed of every random stream (default: 0)")
    device: str | None = knob(None, group=OPTIM, help="default: cuda:LOCAL_RANK when present, else cpu")
    beta1: float = knob(0.9, cli=False, resume=True, least=0, most=1)
    beta2: float = knob(0.999, cli=False, resume=True, least=0, most=1)
    adam_eps: float = knob(1e-8, cli=False, resume=True, above=0)
    # output
    out: str = knob("runs/run", kind="path", required=True, group=OUTPUT, help="run folder (checkpoints/, log.jsonl, analysis.jsonl)")
    ckpt_every: int = knob(50_000, least=1, group=OUTPUT, help="checkpoint every N steps (default: 50000)")
    log_every: int = knob(100, least=1, group=OUTPUT, help="log the losses every N steps (default: 100)")
    resume: str | None = knob(None, kind="path", metavar="CKPT", group=OUTPUT,
                              help="resume from this checkpoint (default: the latest in --out/checkpoints, if any)")
    export_repa: bool = knob(False, group=OUTPUT, help="also write the final checkpoint in REPA's layout")
    progress: bool = knob(True, flag="--quiet", group=OUTPUT, help="no progress bar")
    # analysis while training (on the EMA model): the analysis pipeline's own knobs, spelled --analyze-*
    analyze_every: int = knob(0, least=0, group=ANALYSIS, help="probe + CKNNA every M steps (default: never)")
    eval_every: int = knob(0, least=0, group=ANALYSIS,
                           help="sample quality of the EMA model every M steps: FD of --eval-gen seeded samples in "
                                "each --analyze-gen-spaces space (default: the --encoder(s)), rows {event: eval} "
                                "in log.jsonl (default: never)")
    eval_gen: int = knob(0, least=0, most=1_000_000, metavar="N", group=ANALYSIS,
                         help="samples per --eval-every evaluation (the same noise and labels at every step)")
    analysis: AnalyzeConfig = knob(
        factory=_analysis, nest=("data", "n", "blocks", "ts", "k", "alignment_metrics", "spatial", "tokens",
                                 "dispersion", "attention", "gen_reference", "gen_reference_n", "gen_spaces",
                                 "gen_sampler", "gen_steps"),
        prefix="analyze",
        group=ANALYSIS, helps={"data": "held-out ImageFolder (default: --data)", "n": "held-out images (default: 1000)",
                               "blocks": "1-based blocks (default: REPA depth, middle, last)",
                               "ts": "noise levels (default: 0,0.5)", "k": "CKNNA neighbours (default: 10)",
                               "gen_reference": "--eval-gen's real images: an ImageFolder or an ADM .npz (default: "
                                                "--analyze-data, else --data)",
                               "gen_spaces": "--eval-gen's feature spaces: encoder names and/or inception "
                                             "(default: the run's --encoder(s))"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainConfig":
        """A config recorded in a checkpoint or config.json; settings added since it was saved get their
        defaults, and a run recorded before the analysis had its own config (analyze_n, analyze_t, ...) has its
        analyze_* settings moved into it."""
        saved, names = dict(saved), {f.name for f in dataclasses.fields(cls)}
        old = {OLD_ANALYZE.get(k, k.removeprefix("analyze_")): saved.pop(k) for k in list(saved)
               if k.startswith("analyze_") and k != "analyze_every"}
        if "blocks" in old:                          # [] stood for the default blocks
            old["blocks"] = old["blocks"] or None
        analysis = {**old, **(saved.pop("analysis", None) or {})}
        cfg = cls(**{k: v for k, v in saved.items() if k in names})
        fields = {f.name: f for f in dataclasses.fields(AnalyzeConfig)}           # JSON has lists for tuples
        cfg.analysis = dataclasses.replace(cfg.analysis, **{
            k: tuple(v) if "tuple" in str(fields[k].type) and v is not None else v
            for k, v in analysis.items() if k in fields})
        return cfg


OLD_ANALYZE = {"analyze_t": "ts", "analyze_metrics": "alignment_metrics", "analyze_batch": "batch_size"}
RESUME_MUST_MATCH = resume_fields(TrainConfig)


#################################################################################
#                     Random streams, data order, initialisation                #
#################################################################################

def draw_step_randomness(generator: torch.Generator, seed: int, step: int, n: int, shape: tuple[int, ...],
                         weighting: str, cfg_prob: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t [n], ε [n, *shape], drop [n] bool) for the whole global batch of 0-based step `step`.

    Each comes from its own stream reseeded at this step, on the generator's device.
    """
    device = generator.device
    generator.manual_seed(stream_seed(seed, "t", step))
    t = sample_t(n, generator, weighting, device)
    generator.manual_seed(stream_seed(seed, "noise", step))
    noise = torch.randn((n, *shape), generator=generator, device=device)
    generator.manual_seed(stream_seed(seed, "drop", step))
    drop = torch.rand(n, generator=generator, device=device) < cfg_prob
    return t, noise, drop


def draw_class_noise(generator: torch.Generator, seed: int, step: int, n: int, dim: int) -> torch.Tensor:
    """REG's ε of the class token [n, dim] for the whole global batch of 0-based step `step`, from its own stream
    (so the other streams, and the other arms' draws, stay as they are)."""
    generator.manual_seed(stream_seed(seed, "cls_noise", step))
    return torch.randn((n, dim), generator=generator, device=generator.device)


def draw_uniform(generator: torch.Generator, seed: int, step: int, n: int, part: slice, stream: str) -> torch.Tensor:
    """U(0, 1) draws of this process's samples `part` of 0-based step `step`'s global batch of n, from the named
    stream: what a training term asks for by name (Context.uniform), the same whichever process draws it."""
    generator.manual_seed(stream_seed(seed, stream, step))
    return torch.rand(n, generator=generator, device=generator.device)[part]


def replay_batch(cfg: TrainConfig, dataset, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """Step `step` (1-based) of a single-process pixel-mode run rebuilt from its dataset and seed: (uint8
    images, x in [-1, 1], y with the dropped labels as the null class, t, ε), what the loop fed the model.
    For checks by hand (tests, analyses/parity_terms.py)."""
    b = step - 1
    ids = ResumableShardSampler(len(dataset), cfg.batch, 0, 1, cfg.seed, b, step).global_batch_indices(b)
    images = torch.stack([dataset[i][0] for i in ids.tolist()])
    labels = torch.tensor([dataset[i][1] for i in ids.tolist()])
    shape = tuple(images.shape[1:])
    t, noise, drop = draw_step_randomness(torch.Generator(), cfg.seed, b, cfg.batch, shape, cfg.weighting,
                                          cfg.cfg_prob)
    num_classes = cfg.num_classes or len(dataset.classes)
    return images, images.float() / 127.5 - 1, torch.where(drop, num_classes, labels), t, noise


class ResumableShardSampler(Sampler[int]):
    """Indices of this rank's share of each global batch, from a given step on, across epochs.

    Epoch e is a permutation of the dataset drawn from stream (seed, "data", e); global batch b of the
    run is slice [j·B, (j + 1)·B) of epoch b // (n // B)'s permutation, j = b mod (n // B) (the last
    partial batch of an epoch is dropped, as REPA's drop_last). Rank r of W takes the r-th of W equal
    parts. The position is a function of the step alone, so a resumed run continues exactly; the
    DataLoader batches the stream with batch_size = B / W.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start_step: int, total_steps: int):
        if n < global_batch:
            raise UserError(f"--batch {global_batch} is larger than the {n} training images")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.batches_per_epoch = n // global_batch
        self._epoch, self._perm = -1, None

    def position(self, step: int) -> dict:
        """Where global batch `step` (0-based) sits: {epoch, batch_in_epoch, samples_seen}."""
        epoch, j = divmod(step, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": j, "samples_seen": step * self.global_batch}

    def global_batch_indices(self, step: int) -> torch.Tensor:
        pos = self.position(step)
        if pos["epoch"] != self._epoch:
            g = torch.Generator().manual_seed(stream_seed(self.seed, "data", pos["epoch"]))
            self._epoch, self._perm = pos["epoch"], torch.randperm(self.n, generator=g)
        j = pos["batch_in_epoch"]
        return self._perm[j * self.global_batch:(j + 1) * self.global_batch]

    def __iter__(self):
        r0 = self.rank * self.local_batch
        for step in range(self.start_step, self.total_steps):
            yield from self.global_batch_indices(step)[r0:r0 + self.local_batch].tolist()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.local_batch


def init_model(config: ModelConfig, seed: int) -> SiT:
    """A SiT whose own weights depend on `seed` alone, with REPA projectors, SRA's head and REG's class-token
    embedding drawn from separate streams.

    The vanilla SiT (no projectors) is built from torch.manual_seed(seed); the projectors (Xavier-uniform
    weights, zero biases, as REPA's initialize_weights) then come from stream (seed, "projectors"), SRA's head
    from (seed, "sra_head"), REG's `cls_projectors2` from (seed, "reg_cls") (its wg_norm and the zero
    final_layer.linear_cls need no draws; its pos_embed gains the class token's zero row). So the same seed gives
    the same SiT with or without REPA, SRA or REG, whatever the encoders. The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiT(dataclasses.replace(config, z_dims=[], sra_head=False, cls_token_dim=0))
        projectors = nn.ModuleList([build_projector(config.hidden_size, config.projector_dim, z, config.projector,
                                                    config.projector_kernel) for z in config.z_dims])
        head = SRAHead(config.hidden_size) if config.sra_head else None
        width, cls_dim = config.hidden_size, config.cls_token_dim
        cls_in, cls_out = (nn.Linear(cls_dim, width), nn.Linear(width, cls_dim)) if cls_dim else (None, None)
    for stream, heads in (("projectors", projectors), ("sra_head", head), ("reg_cls", cls_in)):  # own streams
        g = torch.Generator().manual_seed(stream_seed(seed, stream))
        for module in heads.modules() if heads is not None else ():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight, generator=g)
                nn.init.zeros_(module.bias)
    model.projectors = projectors              # same slots as SiT(config) would fill: identical key order
    model.ap_head = head
    if cls_in is not None:               # REG: the class token's embedding, zero output layer and zero position
        nn.init.zeros_(cls_out.weight)
        nn.init.zeros_(cls_out.bias)
        model.final_layer.linear_cls = cls_out
        model.cls_projectors2, model.wg_norm = cls_in, nn.LayerNorm(width, eps=1e-6)
        pos = model.pos_embed.data
        model.pos_embed = nn.Parameter(torch.cat([pos.new_zeros(1, 1, width), pos], dim=1), requires_grad=False)
    model.config = config
    return model


EXTRA_HEADS = ("projectors.", "ap_head.", "cls_projectors2.", "wg_norm.", "final_layer.linear_cls.")


def sit_sha256(model: SiT) -> str:
    """Hash of the SiT's own weights (REPA's projectors, SRA's head, REG's class-token embedding and output and
    its position row excluded): equal for every arm at init."""
    sd = model.state_dict()
    sd["pos_embed"] = sd["pos_embed"][:, model.config.prefix_tokens:]
    return state_dict_sha256(sd, skip=lambda name: name.startswith(EXTRA_HEADS))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, every parameter (as REPA's update_ema)."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


#################################################################################
#                              Setup helpers                                    #
#################################################################################

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> DistInfo:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) → a process group; else one process."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    init_distributed(dev)
    return DistInfo(rank(), world_size(), local_rank(), dev)


def build_model_config(cfg: TrainConfig, num_classes: int, z_dims: list[int], cls_token_dim: int = 0) -> ModelConfig:
    """The SiT's ModelConfig from the run's settings (named size, overrides, data mode; REG's class token width)."""
    if not cfg.model.startswith("SiT-"):
        raise UserError(f"--model {cfg.model!r}: the trainer trains SiT models (SiT-S/2, SiT-B/2, SiT-L/2, "
                        f"SiT-XL/2, patch 2/4/8)")
    latent = cfg.mode == "latents"
    overrides = dict(input_size=cfg.image_size // 8 if latent else cfg.image_size, in_channels=4 if latent else 3,
                     num_classes=num_classes, qk_norm=cfg.qk_norm, z_dims=z_dims,
                     projector_dim=cfg.projector_dim, projector=cfg.projector, projector_kernel=cfg.projector_kernel,
                     sra_head=cfg.self_align > 0, cls_token_dim=cls_token_dim)
    for key, value in (("depth", cfg.depth), ("hidden_size", cfg.width), ("num_heads", cfg.heads),
                       ("encoder_depth", cfg.repa_depth)):
        if value is not None:
            overrides[key] = value
    try:
        config = model_config(cfg.model, **overrides)
    except ValueError as e:
        raise UserError(f"--model: {e}") from None
    if config.hidden_size % config.num_heads:
        raise UserError(f"--width {config.hidden_size} is not divisible by --heads {config.num_heads}")
    if config.input_size % config.patch_size:
        raise UserError(f"the model input ({config.input_size}px) is not divisible by patch {config.patch_size}")
    if z_dims and not 1 <= config.encoder_depth <= config.depth:
        raise UserError(f"--repa-depth {config.encoder_depth} must lie in 1..{config.depth} (the model's depth)")
    return config


TRAIN_FLAGS = {f.name: flag_of(f) for f in dataclasses.fields(TrainConfig)}


def train_arg(name: str, value=...) -> str:
    """A TrainConfig field as the command line spells it: '--depth 0', '--lr nan'."""
    return spell(TRAIN_FLAGS.get(name, "--" + name.replace("_", "-")), value)


def analysis_arg(name: str, value=...) -> str:
    """The in-training analysis's settings as train spells them: '--analyze-n 5'; its seed is the run's --seed."""
    return train_arg(name, value) if name == "seed" else prefixed("analyze")(name, value)


def analysis_config(cfg: TrainConfig) -> AnalyzeConfig:
    """The in-training analysis's config, its data defaulting to the run's."""
    return dataclasses.replace(cfg.analysis, data=cfg.analysis.data or cfg.data, seed=cfg.seed)


def eval_config(cfg: TrainConfig) -> AnalyzeConfig:
    """--eval-every's config: the in-training analysis's, scoring --eval-gen samples in the run's encoders'
    spaces (or --analyze-gen-spaces), without intervals (one checkpoint at a time)."""
    return dataclasses.replace(analysis_config(cfg), gen=cfg.eval_gen, encoders=list(cfg.encoders),
                               encoder_random_init=cfg.encoder_random_init, gen_bootstrap=0, quiet=True,
                               device=cfg.device)


def eval_arg(name: str, value=...) -> str:
    """--eval-every's settings as train spells them: '--eval-gen 1', '--encoder ...', '--analyze-gen-steps 1'."""
    return train_arg({"gen": "eval_gen"}.get(name, name), value) if name in ("gen", "encoders") else \
        analysis_arg(name, value)


def check_config(cfg: TrainConfig) -> None:
    """Bad settings → one UserError line naming the flag, before anything heavy is loaded."""
    if not cfg.data:
        raise UserError("--data DIR is required (an ImageFolder tree DIR/<class>/<image>)")
    if not Path(cfg.data).is_dir():
        raise UserError(f"--data '{cfg.data}' is not a folder: expected an ImageFolder tree DIR/<class>/<image>")
    if cfg.mode not in ("pixels", "latents"):
        raise UserError(f"mode {cfg.mode!r}: use --pixels or --latents VAE")
    resolve_device(cfg.device)                                  # a GPU asked for where there is none
    check_knobs(cfg, train_arg)                                 # numbers within bounds, names among choices
    if cfg.mode == "latents" and (cfg.image_size % 8 or not cfg.vae):
        raise UserError("--latents needs a VAE (--latents VAE_DIR) and an --image-size divisible by 8")
    if cfg.projector == "conv" and cfg.projector_kernel % 2 == 0:
        raise UserError(f"--projector-kernel {cfg.projector_kernel} must be odd (the padding keeps the token grid)")
    if cfg.repa_coeff > 0 and not cfg.encoders:
        raise UserError("--repa-coeff > 0 needs at least one --encoder NAME[=WEIGHTS] (or --repa-coeff 0 for "
                        "vanilla SiT)")
    if cfg.cfg_prob == 1:
        raise UserError(f"--cfg-prob {cfg.cfg_prob} must lie in [0, 1) (1 would drop every label)")
    depth = build_model_config(cfg, 10, [1] if cfg.repa_coeff > 0 else []).depth   # bad --model, sizes, --repa-depth
    if cfg.align_until and cfg.repa_coeff == 0 and cfg.attn_align == 0:
        raise UserError(f"--align-until {cfg.align_until} switches off an alignment term this run does not have: "
                        f"add --repa-coeff COEFF (or --attn-align COEFF) and --encoder NAME, or leave --align-until "
                        f"out")
    for term in active_terms(cfg):
        term.check(cfg, depth)
    check_knobs(cfg.analysis, analysis_arg)
    if cfg.analyze_every:
        analysis_config(cfg).resolved(analysis_arg)             # its images, n and k, metrics, noise levels
    if cfg.eval_every or cfg.eval_gen:
        if not (cfg.eval_every and cfg.eval_gen):
            raise UserError(f"{train_arg('eval_every')} and {train_arg('eval_gen')} go together: evaluate every M "
                            f"steps on N samples (--eval-every M --eval-gen N)")
        check_generation(eval_config(cfg), eval_arg)            # a feature space, real images, a sampler
    latest = latest_checkpoint(cfg.out)
    if cfg.resume is None and latest is not None and checkpoint_step(latest) > cfg.steps:
        raise UserError(f"--out '{cfg.out}' already holds step {checkpoint_step(latest):,}, beyond --steps "
                        f"{cfg.steps:,}: pass a larger --steps, --resume an earlier checkpoint to branch from it, "
                        f"or a new --out")
    if cfg.resume is not None and not Path(cfg.resume).is_file():
        raise UserError(f"--resume '{cfg.resume}' is not a file: pass a checkpoint RUN/checkpoints/NNNNNNN.pt")


def supersede_later_checkpoints(out: Path, step: int) -> Path | None:
    """Branching from step `step` (an explicit --resume): the run's checkpoints after it belong to the old
    branch. They are moved, not deleted, into checkpoints/superseded-<step>-<time>/, so the next automatic
    resume continues this branch; → that folder, or None when there were none."""
    later = [p for p in (out / "checkpoints").glob("*.pt") if (checkpoint_step(p) or 0) > step]
    if not later:
        return None
    folder = out / "checkpoints" / f"superseded-{step:07d}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir()
    for p in later:
        os.replace(p, folder / p.name)
    return folder


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop rows past `last_step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(rows):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append whole rows: a write that fails (a full disk) is cut back to where it began, leaving no half row."""
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with no_space_is_one_line(path.parent), open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
        except BaseException:
            f.truncate(start)
            raise


def _batch_sha256(ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor) -> str:
    h = hashlib.sha256()
    for x in (ids.long(), t.float(), noise.float(), drop.to(torch.uint8)):
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


#################################################################################
#                          Analysis while training                              #
#################################################################################

class TrainingAnalysis:
    """Probe + alignment of the EMA model every `analyze_every` steps, computed by the analysis pipeline itself:
    the same images, probe split, seeded noise, measures and code as `repa-probe analyze CKPT --data D --n N
    --t T --metrics M --k K --seed S` (restricted to the chosen blocks, without bootstrap or baselines), in
    memory. Rows go to RUN_DIR/analysis.jsonl; tests/test_train.py checks that they equal analyze's."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, encoders: list, vae, device: torch.device):
        from repa_probe.pipeline import MemorySource, Pipeline
        depth = model_cfg.depth
        default = [model_cfg.encoder_depth or max(1, depth // 3), (depth + 1) // 2, depth]
        self.blocks = sorted({int(b) for b in (cfg.analysis.blocks or default)})
        if not all(1 <= b <= depth for b in self.blocks):
            raise UserError(f"--analyze-blocks {self.blocks}: blocks are 1-based, 1..{depth}")
        config = dataclasses.replace(analysis_config(cfg), encoders=[], blocks=tuple(self.blocks), device=str(device))
        self.pipeline = Pipeline(config, source=lambda c: MemorySource(c, vae), encoders=encoders, arg=analysis_arg)
        self.meta, self.device = {"mode": cfg.mode, "vae": cfg.vae}, device
        self.path = Path(cfg.out) / "analysis.jsonl"

    @torch.no_grad()
    def __call__(self, ema: SiT, step: int) -> list[dict]:
        from repa_probe.families.sit import as_checkpoint
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            (model,) = self.pipeline.analyse(as_checkpoint(ema, "repa", self.meta), f"step {step}",
                                             class_token=False)
        n = self.pipeline.cfg.n
        rows = [{"step": step, "block": r["block"], "t": r["t"], "metric": r["metric"], "encoder": r["encoder"] or None,
                 "value": r["value"], "weights": "ema", "n": n} for c in model.curves for r in c.rows()]
        _append_jsonl(self.path, rows)
        return rows


class TrainingEval:
    """Sample quality of the EMA model every `eval_every` steps: FD of `eval_gen` seeded samples (sample i has the
    same noise and label at every step) in each feature space, by generation.Scorer, as `repa-probe analyze
    CKPT --gen N` scores a checkpoint. Every rank draws its share (the statistics are summed over ranks); rank 0
    appends the rows {"event": "eval", step, space, score, N, value, ...} to log.jsonl."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, dist_info: DistInfo):
        from repa_probe.generation import Scorer
        self.scorer, self.main = Scorer(eval_config(cfg), dist_info.device), dist_info.main
        self.meta, self.path = {"mode": cfg.mode, "vae": cfg.vae}, Path(cfg.out) / "log.jsonl"
        size = cfg.image_size
        for first in (True, False):                # rank 0 makes the reference (cached), then the others read it
            if self.main == first:
                self.scorer.reference_for(size)
            if dist_info.world_size > 1:
                dist.barrier()

    @torch.no_grad()
    def __call__(self, ema: SiT, step: int) -> list[dict]:
        from repa_probe.families.sit import as_checkpoint
        device = self.scorer.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            rows = self.scorer.score(as_checkpoint(ema, "repa", self.meta), f"step {step}", step=step)
        rows = [{"event": "eval", "step": step, "weights": "ema", **{k: r[k] for k in EVAL_KEYS}} for r in rows]
        if self.main:
            _append_jsonl(self.path, rows)
        return rows


EVAL_KEYS = ("space", "score", "N", "value", "sampler", "steps", "cfg", "cfg_interval", "seed", "reference")


#################################################################################
#                                  Training                                     #
#################################################################################

@dataclass
class Run:
    """Everything one training run holds: settings, process, data, the SiT, its EMA and optimizer state."""
    cfg: TrainConfig
    dist: DistInfo
    precision: str
    dataset: object
    num_classes: int
    vae: object
    encoders: list
    model_cfg: ModelConfig
    model: SiT
    ema: SiT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    meta: dict
    init_sha: str = ""                  # of the SiT's own weights at initialisation (equal for a vanilla/REPA pair)
    start_step: int = 0
    resumed_from: Path | None = None
    attention_blocks: tuple[int, ...] = ()  # --attn-align: the first encoder's blocks it distils (checked at setup)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def save(self, step: int, sampler: ResumableShardSampler) -> Path:
        """Checkpoint `step` (rank 0 writes): weights, optimizer, scaler, RNG states, data position."""
        path = self.out / "checkpoints" / f"{step:07d}.pt"
        if self.dist.main:
            device = self.dist.device
            rng = {"torch_cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng["torch_cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(path, self.model_cfg, self.ema.state_dict(), model=self.model.state_dict(),
                            meta={**self.meta, "step": step}, optimizer=self.optimizer.state_dict(),
                            scaler=self.scaler.state_dict(), step=step, rng=rng, data_position=sampler.position(step))
        return path


def setup(cfg: TrainConfig) -> Run:
    """Process group, data, VAE, encoders, the SiT (seeded), EMA, optimizer; then the resume, if any."""
    from repa_probe.data import ImageDataset, load_vae
    from repa_probe.encoders import load_encoder

    d = setup_distributed(cfg.device)
    if cfg.batch % d.world_size:
        raise UserError(f"--batch {cfg.batch} does not split over {d.world_size} processes")
    device = d.device
    precision = resolve_precision(cfg.precision, device)
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    dataset = ImageDataset(cfg.data, cfg.image_size)
    num_classes = cfg.num_classes or len(dataset.classes)
    if int(dataset.labels.max()) >= num_classes:
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(dataset.classes)} class folders")
    vae = load_vae(cfg.vae, device) if cfg.mode == "latents" else None
    repa, reg = cfg.repa_coeff > 0, cfg.reg_cls > 0
    encoders = [load_encoder(spec, random_init=cfg.encoder_random_init, device=device) for spec in cfg.encoders] \
        if (repa or reg or cfg.attn_align or cfg.analyze_every) else []
    model_cfg = build_model_config(cfg, num_classes, [e.embed_dim for e in encoders] if repa else [],
                                   encoders[0].embed_dim if reg else 0)
    attention_blocks = encoder_blocks(cfg, encoders[0], model_cfg) if cfg.attn_align else ()   # a ViT that fits
    model = init_model(model_cfg, cfg.seed)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    meta = dict(convention="repa", encoders=[e.name for e in encoders] if repa else [],
                encoder_specs=list(cfg.encoders) if repa else [], encoder_random_init=cfg.encoder_random_init,
                repa_coeff=cfg.repa_coeff, repa_depth=model_cfg.encoder_depth if repa else None,
                reg_cls=cfg.reg_cls, reg_encoder=encoders[0].name if reg else None,
                data=cfg.data, mode=cfg.mode, image_size=cfg.image_size, num_classes=num_classes,
                classes=list(dataset.classes), vae=cfg.vae, world_size=d.world_size, model_name=cfg.model,
                train_config=cfg.to_dict())
    run = Run(cfg, d, precision, dataset, num_classes, vae, encoders, model_cfg, model, ema,
              make_optimizer(model, cfg, device), torch.amp.GradScaler(device.type, enabled=precision == "fp16"), meta,
              sit_sha256(model), attention_blocks=attention_blocks)
    run.resumed_from = Path(cfg.resume) if cfg.resume else latest_checkpoint(run.out)
    if run.resumed_from is not None:
        run.start_step = _restore(run.resumed_from, cfg, model, ema, run.optimizer, run.scaler)
        if run.start_step > cfg.steps:
            raise UserError(f"--resume '{run.resumed_from}' is at step {run.start_step:,}, beyond --steps "
                            f"{cfg.steps:,}")
    if d.main and cfg.resume:
        moved = supersede_later_checkpoints(run.out, run.start_step)
        if moved is not None:
            print(f"resuming from step {run.start_step:,}: the run's later checkpoints moved to {moved}", flush=True)
    if d.main:
        for name in ("log.jsonl", "analysis.jsonl"):
            _truncate_jsonl(run.out / name, run.start_step)
        write_text_atomic(run.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    return run


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the last checkpoint's path. Works under torchrun, where rank 0 alone
    writes: it holds --out from before anything is loaded to the end (runtime.hold_folder), so a second run
    on the folder stops at once with one line naming this one."""
    check_config(cfg)
    if rank() != 0:
        return _train(cfg)
    with hold_folder(cfg.out):
        out = Path(cfg.out)
        try:
            (out / "checkpoints").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"--out '{out}': cannot create its checkpoints/ folder ({e.strerror})") from None
        remove_stale_tmp(out / "checkpoints")                  # half-written checkpoints of a killed run
        remove_stale_tmp(out)
        return _train(cfg)


def _train(cfg: TrainConfig) -> Path:
    from repa_probe.data import make_loader, to_model_space

    run = setup(cfg)
    d, device, out, model, ema = run.dist, run.dist.device, run.out, run.model, run.ema
    start_step, terms = run.start_step, active_terms(cfg)
    net = _network(run, start_step + 1)
    sampler = ResumableShardSampler(len(run.dataset), cfg.batch, d.rank, d.world_size, cfg.seed, start_step, cfg.steps)
    loader = make_loader(run.dataset, sampler.local_batch, cfg.num_workers, sampler=sampler)
    gen = torch.Generator(device=device)
    shape = (run.model_cfg.in_channels, run.model_cfg.input_size, run.model_cfg.input_size)
    grid = run.model_cfg.input_size // run.model_cfg.patch_size
    amp = autocast(run.precision, device)
    analysis, evaluation = _start(run)

    last = latest_checkpoint(out) if start_step else None
    progress = tqdm(total=cfg.steps, initial=start_step, disable=not (d.main and cfg.progress), dynamic_ncols=True,
                    desc="train")
    sums, counts, n_sum, t_mark = torch.zeros(4 + len(terms), device=device), [0] * (1 + len(terms)), 0, \
        time.perf_counter()
    rates = BarRates(cfg.batch)
    batches = iter(loader)
    for step in range(start_step + 1, cfg.steps + 1):
        images, labels, _ = next(batches)
        b = step - 1                                                   # 0-based index of this batch
        t_all, noise_all, drop_all = draw_step_randomness(gen, cfg.seed, b, cfg.batch, shape, cfg.weighting,
                                                          cfg.cfg_prob)
        r0 = d.rank * sampler.local_batch
        part = slice(r0, r0 + sampler.local_batch)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        posterior = torch.Generator().manual_seed(stream_seed(cfg.seed, "posterior", b, d.rank)) if run.vae else None
        x = to_model_space(images, cfg.mode, run.vae, generator=posterior)
        y = torch.where(drop_all[part], run.num_classes, labels)
        if step == cfg.align_until + 1 and step > start_step + 1:
            net = _network(run, step)                                  # the projectors leave the update
        targets, attention, cls = teacher_signals(run, images, grid, amp, step, gen, part)
        weights = [term.weight(cfg, step) for term in terms]
        context = Context(model, ema, functools.partial(draw_uniform, gen, cfg.seed, b, cfg.batch, part), attention)
        losses = train_step(net, model, ema, run.optimizer, run.scaler, amp, x, y, t_all[part], noise_all[part],
                            targets, cfg, dict(zip(terms, weights)), context, *cls)
        sums += losses
        n_sum += 1
        counts = [c + on for c, on in zip(counts, [not past_alignment(cfg, step), *(w > 0 for w in weights)])]
        if not progress.disable:
            progress.set_postfix(rates.step(losses), refresh=False)   # drawn by update(), at tqdm's pace
        progress.update(1)
        if step % cfg.log_every == 0 or step == start_step + 1 or step == cfg.steps:
            _log_row(run, step, sums, n_sum, counts, terms, time.perf_counter() - t_mark,
                     _batch_sha256(sampler.global_batch_indices(b), t_all, noise_all, drop_all),
                     sampler.position(b)["epoch"])
            sums.zero_()
            counts, n_sum, t_mark = [0] * len(counts), 0, time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            last = run.save(step, sampler)
        if analysis is not None and step % cfg.analyze_every == 0:
            analysis(ema, step)
        if evaluation is not None and step % cfg.eval_every == 0:
            evaluation(ema, step)
    progress.close()

    return _finish(run, last)


def _network(run: Run, step: int) -> nn.Module:
    """What runs the forward at `step`: the model, in DDP over several processes, compiled with --compile. Once
    --align-until has passed, the projectors are frozen first: they no longer take part in the loss, and DDP
    must not wait for their gradients (AdamW leaves a parameter without a gradient as it is, frozen or not)."""
    device = run.dist.device
    if past_alignment(run.cfg, step):
        run.model.projectors.requires_grad_(False)
    ddp = nn.parallel.DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None) \
        if run.dist.world_size > 1 else run.model
    return torch.compile(ddp) if run.cfg.compile else ddp


def _start(run: Run) -> tuple[TrainingAnalysis | None, TrainingEval | None]:
    """Rank 0 logs the (re)start and, with --analyze-every, makes the in-training analysis; every rank, with
    --eval-every, the sample-quality evaluation. At step 0 each runs once on the initial EMA model; → (the
    analysis, None on other ranks or without one; the evaluation, None without one)."""
    evaluation = TrainingEval(run.cfg, run.model_cfg, run.dist) if run.cfg.eval_every else None
    analysis = TrainingAnalysis(run.cfg, run.model_cfg, run.encoders, run.vae, run.dist.device) \
        if run.cfg.analyze_every and run.dist.main else None
    if run.dist.main:
        _log_start(run)
    if run.start_step == 0:
        for job in (analysis, evaluation):
            if job is not None:
                job(run.ema, 0)
    return analysis, evaluation


def _log_start(run: Run) -> None:
    """log.jsonl's row at every (re)start: who runs, on what, from where."""
    d = run.dist
    _append_jsonl(run.out / "log.jsonl", [{
        "event": "start", "step": run.start_step, "world_size": d.world_size, "device": str(d.device),
        "precision": run.precision, "n_images": len(run.dataset), "num_classes": run.num_classes,
        "model": size_name(run.model_cfg), "params": sum(p.numel() for p in run.model.parameters()),
        "sit_init_sha256": run.init_sha, "resumed_from": str(run.resumed_from) if run.resumed_from else None}])


def _finish(run: Run, last: Path | None) -> Path:
    """After the last step: the export in REPA's layout, if asked for, and the process group's end."""
    if last is None:                                                   # nothing to do: already at --steps
        last = latest_checkpoint(run.out)
    if run.dist.main and run.cfg.export_repa and last is not None:
        export_repa(last, run.out / "repa-export" / last.name)
    if run.dist.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last


class BarRates:
    """The progress bar's loss, REPA term and img/s, new at every step without making the host wait for the
    device: exponential moving averages over steps (this rank's losses; the log has the mean over ranks).
    img/s averages the host's step rate, which the device's launch queue ties to the device's own; the first
    step, which also paid for the start-up, gives none. A GPU's losses are copied to pinned host memory
    without blocking and enter the averages once their copy has landed, a step or so later."""

    def __init__(self, global_batch: int, decay: float = 0.9):
        self.batch, self.decay = global_batch, decay
        self.mean: dict[str, float] = {}
        self.copies: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []   # host copies, oldest first
        self.last: float | None = None                                          # when the previous step ended

    def _add(self, name: str, value: float) -> None:
        old = self.mean.get(name)
        self.mean[name] = value if old is None else self.decay * old + (1 - self.decay) * value

    def step(self, losses: torch.Tensor) -> dict[str, str]:
        """One step's [L, L_denoise, grad norm, L_repa, ...] (on the training device) → the bar's postfix."""
        now = time.perf_counter()
        if self.last is not None:
            self._add("img_s", self.batch / max(now - self.last, 1e-9))
        self.last = now
        if losses.is_cuda:
            host, landed = torch.empty(2, pin_memory=True), torch.cuda.Event()
            host.copy_(losses[[0, 3]], non_blocking=True)
            landed.record()
            self.copies.append((host, landed))
        else:
            self.copies.append((losses[[0, 3]], None))
        while self.copies and (self.copies[0][1] is None or self.copies[0][1].query()):
            total, align = self.copies.pop(0)[0].tolist()
            self._add("loss", total)
            self._add("repa", align)
        return {k: f"{self.mean[k]:.0f}" if k == "img_s" else f"{self.mean[k]:.4f}"
                for k in ("loss", "repa", "img_s") if k in self.mean}


def _log_row(run: Run, step: int, sums: torch.Tensor, n: int, counts: list[int], terms: list[Term], elapsed: float,
             inputs_sha: str, epoch: int) -> dict | None:
    """Average the interval's [L, L_denoise, grad norm] over its n steps and L_repa and each term's L over the
    steps that had them (`counts`; null if none: after --align-until), and over ranks; rank 0 logs the row."""
    if run.dist.world_size > 1:
        dist.all_reduce(sums)
        sums /= run.dist.world_size
    total, denoise, grad_norm, *parts = sums.tolist()
    if not run.dist.main:
        return None
    cfg = run.cfg
    align, *extra = (value / count if count else None for value, count in zip(parts, counts))
    row = {"event": "train", "step": step, "loss": total / n, "loss_denoise": denoise / n, "loss_repa": align,
           **{f"loss_{term.name}": value for term, value in zip(terms, extra)},
           "grad_norm": grad_norm / n, "img_per_s": n * cfg.batch / max(elapsed, 1e-9),
           "lr": run.optimizer.param_groups[0]["lr"], "epoch": epoch, "elapsed_s": elapsed, "inputs_sha256": inputs_sha}
    _append_jsonl(run.out / "log.jsonl", [row])
    return row


def teacher_signals(run: Run, images: torch.Tensor, grid: int, autocast, step: int, generator: torch.Generator,
                    part: slice) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple]:
    """What the encoders give step `step`: REPA's targets (z-scored for iREPA; with REG the class token first, as
    the authors' zs), with --attn-align the first encoder's attention maps at --attn-align-teacher-blocks, with
    --reg-cls the first encoder's class token and its ε (else (None, None)). Past --align-until only REG's class
    token is left; when nothing needs them the encoders do not run."""
    cfg = run.cfg
    on = not past_alignment(cfg, step)
    repa, attn, reg = cfg.repa_coeff > 0 and on, cfg.attn_align > 0 and on, cfg.reg_cls > 0
    if not (repa or attn or reg):
        return [], [], (None, None)
    blocks = run.attention_blocks if attn else ()
    with run.encoders[0].attention_logits(blocks) if blocks else contextlib.nullcontext([]) as attention:
        targets, classes = encoder_outputs(run.encoders, images, grid, autocast, reg)
    targets = [spatial_zscore(z, cfg.zscore_alpha) if cfg.spatial_norm == "zscore" else z
               for z in targets] if repa else []
    if not classes:
        return targets, list(attention), (None, None)
    targets = [torch.cat([c[:, None], z], dim=1) for c, z in zip(classes, targets)]
    b = step - 1
    return targets, list(attention), (classes[0], draw_class_noise(generator, cfg.seed, b, cfg.batch,
                                                                    classes[0].shape[1])[part])


@torch.no_grad()
def encoder_targets(encoders: list, images_uint8: torch.Tensor, grid: int, autocast) -> list[torch.Tensor]:
    """Each frozen encoder's patch tokens (N, grid², D_e), float32, for uint8 images (any size: REPA's raw
    images in latent mode, the training images themselves in pixel mode); encoders run under `autocast`."""
    return encoder_outputs(encoders, images_uint8, grid, autocast)[0]


@torch.no_grad()
def encoder_outputs(encoders: list, images_uint8: torch.Tensor, grid: int, autocast,
                    with_class: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """encoder_targets, and with_class=True each encoder's class token (N, D_e) from the same forward
    (Encoder.encode_with_class: REG's), else []."""
    images01 = images_uint8.float() / 255
    with autocast:
        out = [(enc.encode_with_class if with_class else enc.encode)(images01, grid, check_range=False)
               for enc in encoders]
    return [tokens for tokens, _ in out], [cls for _, cls in out] if with_class else []


def train_step(net: nn.Module, model: SiT, ema: SiT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               autocast, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
               targets: list[torch.Tensor], cfg: TrainConfig, terms: dict[Term, float] | None = None,
               context: Context | None = None, cls_token: torch.Tensor | None = None,
               cls_noise: torch.Tensor | None = None) -> torch.Tensor:
    """One update: loss under autocast, backward (scaled for fp16), clip, AdamW, EMA.

    `net` is what runs the forward (the model, or its DDP / compiled wrapper); `y` holds the dropped labels;
    `terms` the run's further terms with their weights at this step (a weight 0 leaves the term out), `context`
    what they may need beyond the forward (the EMA teacher, this step's draws); `cls_token`, `cls_noise` REG's
    class token and its ε (None without REG).
    Returns [L, L_denoise, grad norm before clipping, L_repa, L_term...] as one detached tensor (no host sync).
    """
    terms = terms or {}
    used = {term.name: (weight, functools.partial(term, cfg=cfg, context=context))
            for term, weight in terms.items() if weight > 0}
    with autocast:
        loss, parts = training_loss(net, x, y, t, noise, targets, cfg.repa_coeff, used, cls_token, cls_noise)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, cfg.ema_decay)
    values = [parts.get(term.name, torch.zeros((), device=loss.device)) for term in terms]
    return torch.stack([v.detach().float() for v in (loss, parts["denoise"], grad_norm, parts["repa"], *values)])


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over every parameter, as REPA (the frozen pos_embed never has a gradient, so it is never
    stepped, and the state's parameter indices match REPA's). The fused kernel (CUDA and CPU) is the
    fastest: on CPU 2× the per-tensor loop and 4× foreach."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=device.type in ("cuda", "cpu"))


def resume_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings a resume must keep (declared resume=True) on which `cfg` differs from a checkpoint's recorded
    config (TrainConfig.from_dict: older layouts too); the data folder compares however it was spelled."""
    before = TrainConfig.from_dict(saved)

    def same(name: str, value):
        if name == "data" and value:
            return os.path.realpath(value)
        return list(value) if isinstance(value, tuple) else value
    return [f"{k}: checkpoint {getattr(before, k)!r}, now {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
            if same(k, getattr(before, k)) != same(k, getattr(cfg, k))]


def _restore(path: Path, cfg: TrainConfig, model: SiT, ema: SiT, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> int:
    """Load a training checkpoint of ours into model, EMA, optimizer, scaler and RNGs; → its step."""
    obj = read_checkpoint(path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_TAG and "optimizer" in obj):
        raise UserError(f"--resume '{path}' is not a repa-probe training checkpoint (no optimizer state)")
    diff = resume_differences(obj["meta"].get("train_config", {}), cfg)
    if diff:
        raise UserError(f"cannot resume from '{path}': settings differ ({'; '.join(diff[:3])}); use the same "
                        f"flags or a new --out")
    model.load_state_dict(obj["model"])
    ema.load_state_dict(obj["ema"])
    optimizer.load_state_dict(obj["optimizer"])
    scaler.load_state_dict(obj.get("scaler") or {})
    rng = obj.get("rng", {})
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return int(obj["step"])


#################################################################################
#                              Export to REPA's layout                          #
#################################################################################

def export_repa(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a training checkpoint of ours in REPA's layout {model, ema, opt, args, steps}.

    `args` is an argparse.Namespace with REPA's train.py argument names (model, encoder_depth, enc_type,
    proj_coeff, ...), plus `hidden_size`, `depth`, `num_heads`, `mode` that REPA does not have. `model` is
    REPA's size name ("SiT-B/2"); a custom size gets a description that REPA's SiT_models will refuse
    rather than silently build the wrong network. `load_checkpoint` reads the file back as "repa-train".
    """
    obj = read_checkpoint(src)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_TAG and "model" in obj and "optimizer" in obj):
        raise UserError(f"'{src}' is not a repa-probe training checkpoint (needs model and optimizer state)")
    meta, config = obj["meta"], ModelConfig.from_dict(obj["config"])
    tc = meta.get("train_config", {})
    args = argparse.Namespace(
        output_dir=str(Path(src).resolve().parents[1].parent), exp_name=Path(src).resolve().parents[1].name,
        logging_dir="logs", report_to="none", sampling_steps=10000, resume_step=0,
        model=size_name(config), num_classes=config.num_classes,
        encoder_depth=config.encoder_depth, fused_attn=True, qk_norm=config.qk_norm,
        data_dir=meta.get("data"), resolution=meta.get("image_size"), batch_size=tc.get("batch"),
        allow_tf32=tc.get("tf32", True), mixed_precision={"fp32": "no"}.get(tc.get("precision"), tc.get("precision")),
        epochs=1400, max_train_steps=tc.get("steps"), checkpointing_steps=tc.get("ckpt_every"),
        gradient_accumulation_steps=1, learning_rate=tc.get("lr"), adam_beta1=tc.get("beta1"),
        adam_beta2=tc.get("beta2"), adam_weight_decay=tc.get("weight_decay"), adam_epsilon=tc.get("adam_eps"),
        max_grad_norm=tc.get("grad_clip"), seed=tc.get("seed"), num_workers=tc.get("num_workers"),
        path_type="linear", prediction="v", cfg_prob=tc.get("cfg_prob"),
        enc_type=",".join(meta.get("encoders") or []) or "None", proj_coeff=meta.get("repa_coeff"),
        weighting=tc.get("weighting"), legacy=False,
        hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads, mode=meta.get("mode"))
    if config.cls_token_dim:                                           # REG's train.py: its weight --cls
        args.cls = meta.get("reg_cls")
    repa = {"model": obj["model"], "ema": obj["ema"], "opt": obj["optimizer"], "args": args, "steps": obj["step"]}
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic(out, repa)
    except OSError as e:
        raise UserError(f"cannot write '{out}' ({e.strerror}): choose a writable folder") from None
    return out


__all__ = ["TrainConfig", "train", "train_step", "replay_batch", "encoder_targets", "encoder_outputs", "make_optimizer",
           "export_repa", "init_model", "draw_step_randomness", "draw_class_noise", "stream_seed",
           "ResumableShardSampler", "TrainingAnalysis", "update_ema", "latest_checkpoint", "sit_sha256"]
