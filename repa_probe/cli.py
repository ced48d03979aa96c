"""Command-line interface. Parsing lives here; every subcommand calls one library function that a
notebook can call too. Bad input ends with one line, `repa-probe: error: ...`, and exit status 2."""
from __future__ import annotations

import argparse
import math
import os
import sys

from repa_probe.errors import UserError
from repa_probe.metrics import METRICS
from repa_probe.noise import CONVENTIONS


def cmd_inspect(args: argparse.Namespace) -> None:
    from repa_probe.families import inspect_rows, load_checkpoint
    rows = inspect_rows(load_checkpoint(args.checkpoint, convention=args.convention, weights=args.weights,
                                        heads=args.heads))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_extract(args: argparse.Namespace) -> None:
    import time
    from repa_probe.capture import CaptureConfig, extract
    from repa_probe.families import load_checkpoint
    from repa_probe.runtime import rank, resolve_device, resolve_precision, shutdown_distributed
    start = time.perf_counter()
    device = resolve_device(args.device)
    config = CaptureConfig(ts=args.t, seed=args.seed, pooling=args.pooling, labels=args.labels,
                           precision=resolve_precision(args.precision, device), dtype=args.store_dtype,
                           compile=args.compile)
    ckpt = load_checkpoint(args.checkpoint, convention=args.convention, weights=args.weights, heads=args.heads)
    try:
        features = extract(ckpt, args.data, config, mode=args.mode, vae=args.vae, n=args.n,
                           subset_seed=args.subset_seed, skip_bad=args.skip_bad_images, batch_size=args.batch_size,
                           num_workers=args.workers, device=device, cache_dir=args.cache, quiet=args.quiet)
        main_process = rank() == 0   # under torchrun only rank 0 reports
    finally:
        shutdown_distributed()
    if main_process:
        skipped = features.manifest["skipped_images"]
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
        print(f"computed {features.computed} chunk(s) (batch × t) in {time.perf_counter() - start:.1f} s")
        print(f"blocks {list(features.blocks.shape)} [t, block, image, dim], raw {list(features.raw.shape)}, "
              f"{features.blocks.dtype}, t = {', '.join(f'{t:g}' for t in features.ts)}")
        print(f"features: {features.path}")


def cmd_train(args: argparse.Namespace) -> None:
    import os
    from repa_probe.train.trainer import TrainConfig, train
    cfg = TrainConfig(
        data=args.data, image_size=args.image_size, mode="latents" if args.latents else "pixels", vae=args.latents,
        num_classes=args.num_classes, model=args.model, depth=args.depth, width=args.width, heads=args.heads,
        qk_norm=args.qk_norm, encoders=args.encoder or [], encoder_random_init=args.encoder_random_init,
        repa_depth=args.repa_depth, repa_coeff=args.repa_coeff, projector_dim=args.projector_dim,
        projector=args.projector, projector_kernel=args.projector_kernel, spatial_norm=args.spatial_norm,
        zscore_alpha=args.zscore_alpha,
        weighting=args.weighting, cfg_prob=args.cfg_prob, batch=args.batch, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay, precision=args.precision,
        tf32=args.tf32, compile=args.compile, seed=args.seed, num_workers=args.workers, device=args.device,
        out=args.out, ckpt_every=args.ckpt_every, log_every=args.log_every, resume=args.resume,
        export_repa=args.export_repa, progress=not args.quiet, analyze_every=args.analyze_every,
        analyze_data=args.analyze_data, analyze_n=args.analyze_n, analyze_blocks=list(args.analyze_blocks),
        analyze_t=list(args.analyze_t), analyze_k=args.analyze_k, analyze_metrics=list(args.analyze_metrics))
    last = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"last checkpoint: {last}")


def cmd_sample(args: argparse.Namespace) -> None:
    from repa_probe.sampler import sample_checkpoint
    images = sample_checkpoint(args.checkpoint, args.out, args.n, cfg=args.cfg, cfg_interval=tuple(args.cfg_interval),
                               sampler=args.sampler, steps=args.steps, seed=args.seed, class_label=args.class_label,
                               vae=args.vae, weights=args.weights, convention=args.convention, heads=args.heads,
                               device=args.device)
    print(f"wrote {len(images)} samples to {args.out}")


def cmd_export_repa(args: argparse.Namespace) -> None:
    from repa_probe.train.trainer import export_repa
    print(f"wrote {export_repa(args.checkpoint, args.out)} (REPA layout: model, ema, opt, args, steps)")


def _analyze_config(args: argparse.Namespace, data: str):
    from repa_probe.pipeline import AnalyzeConfig
    encoders = [e for spec in (args.encoder or []) for e in spec.split(",") if e]
    return AnalyzeConfig(
        data=data, n=args.n, ts=args.t, encoders=encoders, encoder_random_init=args.encoder_random_init,
        encoder_precision=args.encoder_precision, compile=args.compile,
        download=args.download, text_embeddings=args.text_embeddings,
        probe_train=args.probe_train, probe_test=args.probe_test, probe_n_train=args.probe_n_train,
        probe_n_test=args.probe_n_test, probe=not args.no_probe, alignment_metrics=tuple(args.metrics), k=args.k,
        bootstrap=args.bootstrap, null=args.null, spatial=args.spatial, tokens=args.tokens,
        baselines=not args.no_baselines, seed=args.seed, labels=args.labels,
        precision=args.precision, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
        cache=args.cache, mode=args.mode, vae=args.vae, skip_bad_images=args.skip_bad_images,
        convention=args.convention, weights=args.weights, heads=args.heads, quiet=args.quiet, samples=args.samples)


def _report_done(out) -> None:
    import json
    from pathlib import Path
    summary = json.loads((Path(out) / "summary.json").read_text())
    for line in summary.get("notes", []) + summary.get("overview", []):     # the notes, then page 1's verdict
        print(line)
    print(f"report: {Path(out) / 'report.pdf'}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from repa_probe.commands import analyze
    _report_done(analyze(args.checkpoint, _analyze_config(args, args.data), args.out))


def cmd_compare(args: argparse.Namespace) -> None:
    from repa_probe.commands import compare
    if len(args.checkpoints) < 2:
        raise UserError("compare needs at least two checkpoints: repa-probe compare A.pt B.pt [C.pt ...]")
    _report_done(compare(args.checkpoints, _analyze_config(args, args.data), args.out))


def cmd_trajectory(args: argparse.Namespace) -> None:
    from repa_probe.commands import trajectory
    out = trajectory(args.sources, _analyze_config(args, args.data), args.out, source=args.source)
    print(f"report: {out / 'report.pdf'}")


def cmd_encoders(args: argparse.Namespace) -> None:
    from repa_probe.encoders import encoders_table
    rows = encoders_table(grid=args.grid)
    cols = ["name", "timm_arch", "input_size", "grid", "dim", "weights"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))


def cmd_families(args: argparse.Namespace) -> None:
    """What this installation can analyse and draw: every plug-in registry (model families, time conventions,
    alignment and spatial measures, encoders, report pages), in the order its items are offered, plug-ins
    included."""
    from repa_probe.encoders import ENCODERS
    from repa_probe.families import FAMILIES
    from repa_probe.metrics import METRICS
    from repa_probe.noise import CONVENTIONS
    from repa_probe.report.compose import FIGURES
    from repa_probe.spatial import SPATIAL_METRICS

    def first_line(f) -> str:
        return (f.__doc__ or "").strip().split("\n")[0]
    sections = [("model families (checkpoint files)", FAMILIES, lambda f: f.description),
                ("time conventions (--convention)", CONVENTIONS, lambda c: c.description),
                ("alignment metrics (--metrics)", METRICS, lambda m: m.label),
                ("spatial measures (--spatial)", SPATIAL_METRICS, lambda m: m.label),
                ("encoders (--encoder; details: repa-probe encoders)", ENCODERS, lambda e: e.family.name),
                ("report pages (figures)", FIGURES, first_line)]
    for title, registry, what in sections:
        print(title)
        for name, item in registry.items():
            shown = name.rpartition(".")[2] if registry is FIGURES else name
            priority = f" [priority {registry.priority[name]}]" if registry.priority[name] else ""
            print(f"  {shown:<16} {what(item)}{priority}")
        if registry is FAMILIES:
            print(f"  {'module':<16} any nn.Module: repa_probe.analyze(model, blocks=..., call=..., convention=...)")


def cmd_demo(args: argparse.Namespace) -> None:
    from repa_probe.demo import DemoConfig, run_demo
    _report_done(run_demo(DemoConfig(data=args.data, out=args.out, steps=args.steps, n=args.n, device=args.device,
                                     quiet=args.quiet)))


def _add_analysis_commands(sub) -> None:
    """`analyze`, `compare`, `trajectory` (repa_probe/commands.py) and `encoders`."""
    def common(p, data_required=True):
        g = p.add_argument_group("data and encoders")
        g.add_argument("--data", type=path, required=data_required, default=None,
                       help="ImageFolder tree DIR/<class>/<image> for alignment (e.g. ImageNet val, cifar10/test)")
        g.add_argument("--n", "--num-images", dest="n", type=positive_int, default=None,
                       help="images: a class-balanced seeded subset (default: 10000 on a GPU, 500 on the CPU)")
        g.add_argument("--encoder", action="append", metavar="NAME[=WEIGHTS]",
                       help="target encoder(s) for CKNNA, e.g. dinov2-vit-b=/w/dinov2_vitb14_pretrain.pth; repeat or "
                            "comma-separate for several; see `repa-probe encoders`. Without one, only probes run")
        g.add_argument("--encoder-random-init", action="store_true",
                       help="random encoder weights (tests only; every report then says RANDOM WEIGHTS)")
        g.add_argument("--encoder-precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="the encoders' precision; auto: bf16 autocast where the device has native bf16 and "
                            "the pooled features of the first 8 images move by at most 1e-2 of their spread "
                            "from fp32 (the report says which and by how much), else fp32 (default: auto)")
        g.add_argument("--text-embeddings", type=path, default=None, metavar="FILE",
                       help="text-conditioned diffusers models (PixArt, SD3, Flux): a prompt's embeddings "
                            "(prompt_embeds, pooled_prompt_embeds; .pt or .safetensors); default: zeros, as reported")
        g.add_argument("--download", action="store_true",
                       help="fetch what is missing: official DiT/SiT/REPA checkpoints named by file name "
                            "(DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt, repa-last.pt) and encoder weights, into "
                            "~/.cache/repa-probe (checksummed, resumable); without it nothing touches the network")
        g = p.add_argument_group("linear probe")
        g.add_argument("--probe-train", type=path, default=None, help="labelled ImageFolder to fit probes on (with --probe-test); "
                                                           "default: 4/5 of the --data images")
        g.add_argument("--probe-test", type=path, default=None, help="held-out labelled ImageFolder to score probes on "
                                                          "(default: the other 1/5 of --data)")
        g.add_argument("--probe-n-train", type=positive_int, default=None, help="probe training images (default: --n)")
        g.add_argument("--probe-n-test", type=positive_int, default=None, help="probe test images (default: --n / 2)")
        g.add_argument("--no-probe", action="store_true", help="skip the linear probes (unlabelled data)")
        g = p.add_argument_group("metrics")
        g.add_argument("--metrics", type=_names, default=["cknna"],
                       help=f"alignment metrics: {', '.join(METRICS)} (default: cknna)")
        g.add_argument("--spatial", action="store_true",
                       help="also iREPA's spatial measures (LDS, CDS, RMSC) of every block's tokens, the input's "
                            "and the encoder's, per image during capture (docs/spatial.md)")
        g.add_argument("--tokens", action="store_true",
                       help="also patch-level alignment on one seeded token per image: token-level versions of "
                            "--metrics against the encoder's token of the same cell, and the mean cosine after "
                            "the checkpoint's own REPA projector at its aligned block (docs/spatial.md)")
        g.add_argument("--k", type=positive_int, default=10,
                       help="nearest neighbours for CKNNA / mutual k-NN (default: 10)")
        g.add_argument("--bootstrap", type=count(0, 10_000), default=20,
                       help="bootstrap replicates for every interval (alignment subsamples, probe refits), 0 = none "
                            "(default: 20)")
        g.add_argument("--null", type=count(0, 10_000), default=20,
                       help="permutation draws for the alignment null (images shuffled), 0 = none (default: 20)")
        g.add_argument("--no-baselines", action="store_true", help="skip the untrained-model and raw-input baselines")
        g.add_argument("--samples", type=count(0, 100_000), default=0,
                       help="add a page with this many samples per checkpoint (Euler ODE, 50 steps; default: 0)")
        g = p.add_argument_group("capture")
        add_capture_options(g, precision_default="auto")
        add_checkpoint_options(g)
        p.add_argument("--out", type=path, required=True, help="report folder: results.csv, summary.json, figures/, report.pdf")

    p = sub.add_parser("analyze", help="probe + CKNNA at every block × t of one checkpoint; PDF report",
                       description="For every block and noise level of one checkpoint: linear-probe accuracy and "
                                   "alignment (CKNNA) with target encoders, the peak block and the drop after it, "
                                   "against untrained-model and raw-input baselines. Writes results.csv (tidy), "
                                   "summary.json, figures/ and report.pdf into --out; page 1 has the answer.")
    p.add_argument("checkpoint", type=path, help="official DiT/SiT, REPA (last.pt or training dict) or repa-probe checkpoint, "
                                      "or a training run folder (its latest checkpoint)")
    common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", help="overlay several checkpoints (same images, same noise), deltas B − A",
                       description="Analyse every checkpoint on the same images with the same seeded noise and write "
                                   "one report overlaying them, with per block × t deltas against the first.")
    p.add_argument("checkpoints", type=path, nargs="+", help="A.pt B.pt [C.pt ...] (or run folders: their latest "
                                                     "checkpoints); deltas are taken against A")
    common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("trajectory", help="metrics over training steps (REPA Fig. 2b), one curve per block group",
                       description="Metrics of a series of checkpoints over training steps. Each source is a run "
                                   "folder or a glob of checkpoints; a run folder with analysis.jsonl (from "
                                   "`train --analyze-every`) is read directly unless --source checkpoints.")
    p.add_argument("sources", type=path, nargs="+", help="RUN_DIR or 'runs/x/checkpoints/*.pt' (one line style per source)")
    p.add_argument("--source", choices=["auto", "log", "checkpoints"], default="auto",
                   help="auto: a run's analysis.jsonl when present, else its checkpoints (default: auto)")
    common(p, data_required=False)
    p.set_defaults(func=cmd_trajectory)

    p = sub.add_parser("demo", help="train tiny vanilla + REPA SiTs on CIFAR-10 (CPU, ~10 min), compare them",
                       description="The README's demo: trains a tiny vanilla SiT and the same SiT with REPA "
                                   "(bundled CIFAR-10 SimCLR teacher) on CIFAR-10 pixels, analyses both and writes "
                                   "a compare report (OUT/report/report.pdf).")
    p.add_argument("--data", type=path, default=None, help="CIFAR-10 ImageFolder with train/ and test/ (default: "
                                                "$REPA_PROBE_DATA, or shared/data/cifar10 beside the project)")
    p.add_argument("--out", type=path, default="repa-probe-demo", help="output folder (default: repa-probe-demo)")
    p.add_argument("--steps", type=count(1, 10_000_000), default=700, help="training steps per model (default: 700)")
    p.add_argument("--n", type=positive_int, default=500, help="analysis images (default: 500)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("families", help="list the model families, time conventions, measures and report pages this "
                                        "installation has",
                       description="What can be analysed and drawn: registered model families, time conventions, "
                                   "alignment and spatial measures and report pages (plug-ins included).")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("encoders", help="list the known target encoders and whether their weights are found locally")
    p.add_argument("--grid", type=grid, default=16, help="token grid to size the inputs for (default: 16)")
    p.set_defaults(func=cmd_encoders)


#################################################################################
#          Flag values: checked while parsing, before anything is loaded          #
#################################################################################

def _number(kind, test, what: str):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not (math.isfinite(v) and test(v)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer ≥ 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number ≥ 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def count(low: int, high: int, what: str = "a count"):
    """An integer in low..high: the upper end refuses values no run could finish (10^20 replicates, blocks)."""
    return _number(int, lambda v: low <= v <= high, f"{what} in {low:,}..{high:,}")


def path(s: str) -> str:
    """A file or folder name: not empty (an empty name would mean the current folder)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return s


MAX_WORKERS = 4 * (os.cpu_count() or 1)
workers = _number(int, lambda v: 0 <= v <= MAX_WORKERS, f"a number of worker processes in 0..{MAX_WORKERS} "
                                                        f"(4 per CPU core)")
grid = _number(int, lambda v: 0 < v <= 1024, "a token grid side in 1..1024")


def noise_levels(s: str) -> tuple[float, ...]:
    """'0,0.25,0.5' → distinct noise levels in [0, 1]."""
    values = tuple(fraction(v) for v in s.split(",") if v.strip())
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct noise levels in [0, 1] such as 0,0.25,0.5; got {s!r}")
    return values


def _interval(s: str) -> tuple[float, float]:
    values = tuple(fraction(v) for v in s.split(",") if v.strip())
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in [0, 1] such as 0,0.7; got {s!r}")
    return values


def _blocks(s: str) -> tuple[int, ...]:
    values = tuple(positive_int(v) for v in s.split(",") if v.strip())
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct block numbers such as 4,8,12; got {s!r}")
    return values


def _names(s: str) -> list[str]:
    names = [m.strip() for m in s.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names; got {s!r}")
    return names


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`repa-probe CMD: error: ...`, exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_commands(sub) -> None:
    """`train`, `sample` and `export-repa` (repa_probe/train/)."""
    p = sub.add_parser("train", help="train a REPA (or vanilla, --repa-coeff 0) SiT; torchrun for several GPUs",
                       description="Train a SiT with REPA's objective (or vanilla SiT with --repa-coeff 0: same data "
                                   "order, t, noise and SiT init). Resumes automatically from --out's checkpoints.")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=path, required=True, help="ImageFolder tree DIR/<class>/<image>")
    g.add_argument("--image-size", type=count(1, 8192), default=32, help="image side after centre crop (default: 32)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--pixels", action="store_true", help="train on pixels in [-1, 1] (the default)")
    m.add_argument("--latents", type=path, metavar="VAE", default=None, help="train on SD-VAE latents; VAE = local folder")
    g.add_argument("--num-classes", type=count(1, 10_000_000), default=None,
                   help="default: the number of class folders")
    g.add_argument("--workers", type=workers, default=4, help="DataLoader workers per process (default: 4)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="SiT-S/2", help="SiT-{S,B,L,XL}/{2,4,8} (default: SiT-S/2)")
    g.add_argument("--depth", type=count(1, 1024), default=None, help="override the size's number of blocks")
    g.add_argument("--width", type=count(1, 65_536), default=None, help="override the size's hidden size")
    g.add_argument("--heads", type=count(1, 65_536), default=None, help="override the size's attention heads")
    g.add_argument("--qk-norm", action="store_true", help="LayerNorm on queries and keys (REPA default: off)")
    g = p.add_argument_group("REPA")
    g.add_argument("--encoder", action="append", metavar="NAME[=WEIGHTS]",
                   help="target encoder (repeat for several, one projector each), e.g. dinov2-vit-b=/w/dinov2.pth")
    g.add_argument("--encoder-random-init", action="store_true", help="random target encoders (tests only)")
    g.add_argument("--repa-depth", type=positive_int, default=None,
                   help="aligned block, 1-based (default: 4 for S/B, 8 for L/XL)")
    g.add_argument("--repa-coeff", type=nonneg_float, default=0.5,
                   help="λ of the alignment loss; 0 = vanilla SiT (default 0.5)")
    g.add_argument("--projector-dim", type=count(1, 65_536), default=2048,
                   help="projector MLP width (default: 2048, as REPA)")
    g.add_argument("--projector", choices=["mlp", "conv"], default="mlp",
                   help="mlp (REPA, default) or conv (iREPA: one k×k convolution over the token grid)")
    g.add_argument("--projector-kernel", type=count(1, 15), default=3, help="conv projector kernel (default: 3)")
    g.add_argument("--spatial-norm", choices=["none", "zscore"], default="none",
                   help="iREPA: z-score each target channel over the image's tokens, z ← (z − α·mean)/(std + 1e-6)")
    g.add_argument("--zscore-alpha", type=nonneg_float, default=0.6, help="α of --spatial-norm zscore (default 0.6)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=count(1, 1 << 20), default=256, help="global batch size (default: 256)")
    g.add_argument("--steps", type=positive_int, default=400_000)
    g.add_argument("--lr", type=positive_float, default=1e-4)
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    g.add_argument("--grad-clip", type=positive_float, default=1.0)
    g.add_argument("--ema-decay", type=fraction, default=0.9999, help="tiny runs need less, e.g. 0.99")
    g.add_argument("--cfg-prob", type=fraction, default=0.1, help="class-label dropout (default: 0.1)")
    g.add_argument("--weighting", choices=["uniform", "lognormal"], default="uniform", help="t distribution")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast (default: bf16 on GPUs, fp32 on CPU)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when present, else cpu")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=path, required=True, help="run folder (checkpoints/, log.jsonl, analysis.jsonl)")
    g.add_argument("--ckpt-every", type=positive_int, default=50_000)
    g.add_argument("--log-every", type=positive_int, default=100)
    g.add_argument("--resume", type=path, default=None, metavar="CKPT",
                   help="resume from this checkpoint (default: the latest in --out/checkpoints, if any)")
    g.add_argument("--export-repa", action="store_true", help="also write the final checkpoint in REPA's layout")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("analysis while training (EMA model)")
    g.add_argument("--analyze-every", type=nonneg_int, default=0, help="probe + CKNNA every M steps (default: never)")
    g.add_argument("--analyze-data", type=path, default=None, help="held-out ImageFolder (default: --data)")
    g.add_argument("--analyze-n", type=positive_int, default=1000, help="held-out images (default: 1000)")
    g.add_argument("--analyze-blocks", type=_blocks, default=(),
                   help="1-based blocks (default: REPA depth, middle, last)")
    g.add_argument("--analyze-t", type=noise_levels, default=(0.0, 0.5), help="noise levels (default: 0,0.5)")
    g.add_argument("--analyze-k", type=positive_int, default=10, help="CKNNA neighbours (default: 10)")
    g.add_argument("--analyze-metrics", type=_names, default=["cknna"],
                   help=f"alignment metrics: {', '.join(METRICS)} (default: cknna)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a checkpoint into a PNG grid",
                       description="Euler ODE or Euler-Maruyama SDE sampling (REPA's samplers), classifier-free "
                                   "guidance optionally restricted to a t interval; latent models decode via --vae.")
    p.add_argument("checkpoint", type=path, help="path to a SiT/REPA checkpoint")
    p.add_argument("--n", type=count(1, 100_000), default=64, help="number of samples (default: 64)")
    p.add_argument("--cfg", type=nonneg_float, default=1.5, help="guidance scale; 1 = none (default: 1.5, as REPA)")
    p.add_argument("--cfg-interval", type=_interval, default=(0.0, 1.0),
                   help="LOW,HIGH: guide only for t in there (default 0,1)")
    p.add_argument("--sampler", choices=["ode", "sde"], default="ode")
    p.add_argument("--steps", type=count(1, 100_000), default=None, help="default: 50 (ode), 250 (sde)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-label", type=nonneg_int, default=None, help="one class for all samples (default: random)")
    p.add_argument("--vae", type=path, default=None, help="latent models: AutoencoderKL folder (default: the run's)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=path, required=True, help="PNG file to write")
    add_checkpoint_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export-repa", help="write a training checkpoint in REPA's layout (model/ema/opt/args/steps)")
    p.add_argument("checkpoint", type=path, help="a repa-probe training checkpoint (RUN_DIR/checkpoints/NNNNNNN.pt)")
    p.add_argument("out", type=path, help="file to write")
    p.set_defaults(func=cmd_export_repa)


def add_capture_options(p: argparse.ArgumentParser, precision_default: str = "fp32") -> None:
    """Options shared by every command that runs checkpoints over images (extract, analyze, ...)."""
    p.add_argument("--t", type=noise_levels, default=(0.0, 0.1, 0.25, 0.5, 0.75),
                   help="noise levels, 0 = clean data, 1 = pure noise (default: 0,0.1,0.25,0.5,0.75)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; equal seeds give equal noisy inputs to every "
                                                       "checkpoint (default: 0)")
    p.add_argument("--labels", choices=["null", "true"], default="null",
                   help="class label fed to the model: the null (unconditional) class or the true one (default: null)")
    p.add_argument("--mode", choices=["pixels", "latents"], default=None,
                   help="model input space (default: from the checkpoint; 4 input channels = SD-VAE latents)")
    p.add_argument("--vae", type=path, default="stabilityai/sd-vae-ft-mse",
                   help="latent models: local AutoencoderKL folder, or a hub name where the hub is reachable")
    p.add_argument("--batch-size", type=count(1, 1 << 20), default=64)
    p.add_argument("--workers", type=workers, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=precision_default,
                   help=f"autocast; auto = bf16 on GPUs, fp32 on the CPU (default: {precision_default})")
    p.add_argument("--cache", type=path, default=None, help="feature store folder (default: $XDG_CACHE_HOME/repa-probe or "
                                                 "~/.cache/repa-probe)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's blocks (features equal eager up to rounding, cached apart; "
                        "the first batches pay the compile time)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files and report them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--convention", choices=list(CONVENTIONS), default=None,
                   help="time convention of the checkpoint (default: detected; official SiT and DiT files "
                        "are told apart by their released file names, otherwise it is assumed and reported)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint to use (default: ema)")
    p.add_argument("--heads", type=positive_int, default=None,
                   help="attention heads, for a custom-width checkpoint whose weights cannot tell (no qk-norm, "
                        "none recorded)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="repa-probe",
        description="Look inside diffusion transformers (SiT/DiT/REPA): per-block, per-noise-level linear "
                    "probes and CKNNA alignment with a self-supervised encoder.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="print a checkpoint's format, architecture, time convention, REPA setup",
                       description="Load a checkpoint (official DiT/SiT, REPA last.pt or training dict, or "
                                   "repa-probe's own) and print what it is.")
    p.add_argument("checkpoint", type=path, help="path to a .pt or .safetensors checkpoint")
    add_checkpoint_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("extract", help="capture every block's features at each noise level into the feature store",
                       description="Run a checkpoint over a data subset at each noise level t, pool every block's "
                                   "output per image and store it (resumable; torchrun splits the images across "
                                   "ranks). Prints where the features are.")
    p.add_argument("checkpoint", type=path, help="path to a .pt or .safetensors checkpoint")
    p.add_argument("--data", type=path, required=True, help="ImageFolder tree DIR/<class>/<image> (e.g. ImageNet val)")
    p.add_argument("--num-images", "--n", dest="n", type=positive_int, default=None,
                   help="images to use: a class-balanced seeded subset (default: all); under torchrun spell it "
                        "--num-images (torchrun's own parser rejects the abbreviation --n)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset choice (default: 0)")
    add_capture_options(p)
    p.add_argument("--pooling", default="mean",
                   help="per-image pooling of tokens: mean, tokens or grid:G (default: mean)")
    p.add_argument("--store-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the stored features (default: float32)")
    add_checkpoint_options(p)
    p.set_defaults(func=cmd_extract)

    _add_analysis_commands(sub)
    _add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from repa_probe.plugins import load_plugins
    try:
        load_plugins()
    except UserError as e:
        print(f"repa-probe: error: {e}", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                      # --help (0) or a bad flag (2, its one line already printed)
        return int(e.code or 0)
    try:
        args.func(args)
    except UserError as e:
        print(f"repa-probe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repa-probe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
