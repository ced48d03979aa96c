"""Command-line interface. Parsing lives here; every subcommand calls one library function that a
notebook can call too. Bad input ends with one line, `repa-probe: error: ...`, and exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable, Sequence

from repa_probe.config import AnalyzeConfig, Knob, base_type, flag_of, knob_of
from repa_probe.errors import UserError


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
    config = CaptureConfig(ts=args.ts, seed=args.seed, pooling=args.pooling, labels=args.labels,
                           precision=resolve_precision(args.precision, device), dtype=args.store_dtype,
                           compile=args.compile)
    ckpt = load_checkpoint(args.checkpoint, convention=args.convention, weights=args.weights, heads=args.heads)
    try:
        features = extract(ckpt, args.data, config, mode=args.mode, vae=args.vae, n=args.n,
                           subset_seed=args.subset_seed, skip_bad=args.skip_bad_images, batch_size=args.batch_size,
                           num_workers=args.num_workers, device=device, cache_dir=args.cache, quiet=args.quiet)
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
    cfg = config_from_args(TrainConfig, args, mode="latents" if args.latents else "pixels", vae=args.latents)
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


def _report_done(out) -> None:
    import json
    from pathlib import Path
    from repa_probe.runtime import rank
    if rank() != 0:                              # under torchrun rank 0 wrote the report and alone reports it
        return
    summary = json.loads((Path(out) / "summary.json").read_text())
    for line in summary.get("notes", []) + summary.get("overview", []):     # the notes, then page 1's verdict
        print(line)
    print(f"report: {Path(out) / 'report.pdf'}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from repa_probe.commands import analyze
    _report_done(analyze(args.checkpoint, config_from_args(AnalyzeConfig, args), args.out))


def cmd_compare(args: argparse.Namespace) -> None:
    from repa_probe.commands import compare
    if len(args.checkpoints) < 2:
        raise UserError("compare needs at least two checkpoints: repa-probe compare A.pt B.pt [C.pt ...]")
    _report_done(compare(args.checkpoints, config_from_args(AnalyzeConfig, args), args.out))


def cmd_trajectory(args: argparse.Namespace) -> None:
    from repa_probe.commands import trajectory
    out = trajectory(args.sources, config_from_args(AnalyzeConfig, args), args.out, source=args.source)
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
    for report in run_demo(DemoConfig(data=args.data, out=args.out, steps=args.steps, n=args.n,
                                      shipped_n=args.shipped_n, device=args.device, quiet=args.quiet)):
        _report_done(report)                  # the shipped pair's page 1 last: it shows the finding


def _add_analysis_commands(sub) -> None:
    """`analyze`, `compare`, `trajectory` (repa_probe/commands.py), `demo`, `families` and `encoders`."""
    def common(p, data_required=True):
        add_knobs(p, AnalyzeConfig, optional=() if data_required else ("data",))
        p.add_argument("--out", type=path, required=True, help="report folder: results.csv, summary.json, figures/, "
                                                               "report.pdf")

    p = sub.add_parser("analyze", help="probe + CKNNA at every block × t of one checkpoint; PDF report",
                       description="For every block and noise level of one checkpoint: linear-probe accuracy and "
                                   "alignment (CKNNA) with target encoders, the peak block and the drop after it, "
                                   "against untrained-model and raw-input baselines. Writes results.csv (tidy), "
                                   "summary.json, figures/ and report.pdf into --out; page 1 has the answer.")
    p.add_argument("checkpoint", type=path, help="official DiT/SiT, REPA (last.pt or training dict) or repa-probe "
                                                 "checkpoint, or a training run folder (its latest checkpoint)")
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
    p.add_argument("sources", type=path, nargs="+", help="RUN_DIR or 'runs/x/checkpoints/*.pt' (one line style per "
                                                         "source)")
    p.add_argument("--source", choices=["auto", "log", "checkpoints"], default="auto",
                   help="auto: a run's analysis.jsonl when present, else its checkpoints (default: auto)")
    common(p, data_required=False)
    p.set_defaults(func=cmd_trajectory)
    _add_listing_commands(sub)


def _add_listing_commands(sub) -> None:
    """`demo`, `families` and `encoders`."""
    p = sub.add_parser("demo", help="train tiny vanilla + REPA SiTs on CIFAR-10 (CPU, ~10 min), compare them, "
                                    "then the shipped 28-block pair",
                       description="The README's demo: trains a tiny vanilla SiT and the same SiT with REPA "
                                   "(bundled CIFAR-10 SimCLR teacher) on CIFAR-10 pixels, analyses both and writes "
                                   "a compare report (OUT/report/report.pdf); then compares the shipped pair, "
                                   "28-block SiTs trained 5,000 steps by the same trainer, at t = 0 "
                                   "(OUT/shipped/report.pdf).")
    p.add_argument("--data", type=path, default=None, help="CIFAR-10 ImageFolder with train/ and test/ (default: "
                                                           "$REPA_PROBE_DATA, or shared/data/cifar10 beside the "
                                                           "project)")
    p.add_argument("--out", type=path, default="repa-probe-demo", help="output folder (default: repa-probe-demo)")
    p.add_argument("--steps", type=count(1, 10_000_000), default=300, help="training steps per model (default: 300)")
    p.add_argument("--n", type=positive_int, default=500, help="analysis images (default: 500)")
    p.add_argument("--shipped-n", type=count(0, 10_000), default=5000,
                   help="the shipped pair's analysis images, probes fitted on as many train images (default: 5000; "
                        "0 = skip it)")
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
#        Config flags: generated from the knobs declared in config.py           #
#################################################################################

def add_knobs(p, cls, only: Sequence[str] | None = None, optional: Sequence[str] = (), grouped: bool = True,
              custom: dict[str, Callable] | None = None, defaults: dict | None = None) -> None:
    """The flags of config class `cls` (config.knob declares each field's flag, help, checks and default): every
    knob on the command line, or `only` these, in field order, in --help sections by their group. A field in
    `custom` is added by its function instead (one flag standing for two fields); `defaults` overrides."""
    custom, defaults = custom or {}, defaults or {}
    for f in dataclasses.fields(cls):
        k = knob_of(f)
        if not (k.cli if only is None else f.name in only):
            continue
        where = _section(p, k.group) if grouped and k.group else p
        if f.name in custom:
            custom[f.name](where)
        elif k.nest:
            inner = _default(f)                     # a config inside: --PREFIX-FLAG, without the aliases
            fields = {g.name: g for g in dataclasses.fields(inner)}
            for g in (fields[name] for name in k.nest):
                _add_knob(where, f"{f.name}.{g.name}", f"--{k.prefix}-{flag_of(g)[2:]}",
                          dataclasses.replace(knob_of(g), aliases=()), base_type(g), getattr(inner, g.name),
                          help=k.helps.get(g.name, knob_of(g).help))
        else:
            default = defaults.get(f.name, _default(f))
            required = k.required or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            _add_knob(where, f.name, flag_of(f), k, base_type(f), default, k.help,
                      required=required and f.name not in optional)


def _add_knob(p, dest: str, flag: str, k: Knob, kind: str, default, help: str | None, required: bool = False):
    names, help = [flag, *k.aliases], help and help.replace("%(choices)s", ", ".join(k.names()))
    if kind == "bool":
        action = argparse.BooleanOptionalAction if k.negatable else "store_false" if default else "store_true"
        p.add_argument(*names, dest=dest, action=action, default=default, help=help)
        return
    opts = dict(dest=dest, default=default, help=help, required=required,
                metavar=k.metavar or flag[2:].replace("-", "_").upper())
    if k.kind == "specs":
        opts.update(action="extend", type=_specs)
    elif k.kind == "append":
        opts.update(action="append")
    elif kind == "str" and k.choices:
        opts.update(choices=k.names(), metavar=None)
    else:
        opts.update(type=_value_type(k, kind))
    p.add_argument(*names, **opts)


def _value_type(k: Knob, kind: str) -> Callable | None:
    """What checks a flag's value while parsing: its kind, or its declared bounds."""
    if k.kind:
        return {"path": path, "levels": noise_levels, "names": _names, "blocks": _blocks, "interval": _interval}[k.kind]
    if kind not in ("int", "float"):
        return None
    number = int if kind == "int" else float
    if (k.least, k.above, k.most) == (None, None, None):
        return number
    return _number(number, k.holds, k.bounds(number is int))


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _section(p, title: str):
    """The --help section `title` of parser p, made at first use."""
    return next((g for g in p._action_groups if g.title == title), None) or p.add_argument_group(title)


def config_from_args(cls, args: argparse.Namespace, **given):
    """A config from parsed flags (each knob's dest is its field's name; a nested config's, FIELD.NAME); fields
    the command did not set keep their defaults; `given` sets the rest."""
    values = {}
    for f in dataclasses.fields(cls):
        k = knob_of(f)
        if k.nest:
            values[f.name] = dataclasses.replace(_default(f), **{n: getattr(args, f"{f.name}.{n}") for n in k.nest})
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**{**values, **given})


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


def _names(s: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in s.split(",") if m.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names; got {s!r}")
    return names


def _specs(s: str) -> list[str]:
    """'a,b=W' → ['a', 'b=W']: --encoder may be repeated or comma-separated (an empty one names none)."""
    return [e for e in s.split(",") if e]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`repa-probe CMD: error: ...`, exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_commands(sub) -> None:
    """`train`, `sample` and `export-repa` (repa_probe/train/)."""
    from repa_probe.train.trainer import TrainConfig
    p = sub.add_parser("train", help="train a REPA (or vanilla, --repa-coeff 0) SiT; torchrun for several GPUs",
                       description="Train a SiT with REPA's objective (or vanilla SiT with --repa-coeff 0: same data "
                                   "order, t, noise and SiT init). Resumes automatically from --out's checkpoints.")

    def pixels_or_latents(g):                      # one choice that sets two fields, mode and vae
        m = g.add_mutually_exclusive_group()
        m.add_argument("--pixels", action="store_true", help="train on pixels in [-1, 1] (the default)")
        m.add_argument("--latents", type=path, metavar="VAE", default=None,
                       help="train on SD-VAE latents; VAE = local folder")
    add_knobs(p, TrainConfig, custom={"mode": pixels_or_latents})
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
    add_knobs(p, AnalyzeConfig, CHECKPOINT_KNOBS, grouped=False)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export-repa", help="write a training checkpoint in REPA's layout (model/ema/opt/args/steps)")
    p.add_argument("checkpoint", type=path, help="a repa-probe training checkpoint (RUN_DIR/checkpoints/NNNNNNN.pt)")
    p.add_argument("out", type=path, help="file to write")
    p.set_defaults(func=cmd_export_repa)


# AnalyzeConfig's knobs that other commands share: how a checkpoint is captured, and how it is read
CAPTURE_KNOBS = ("ts", "seed", "labels", "mode", "vae", "batch_size", "num_workers", "device", "precision", "cache",
                 "compile", "skip_bad_images", "quiet")
CHECKPOINT_KNOBS = ("convention", "weights", "heads")


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
    add_knobs(p, AnalyzeConfig, CHECKPOINT_KNOBS, grouped=False)
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
    add_knobs(p, AnalyzeConfig, CAPTURE_KNOBS, grouped=False, defaults={"precision": "fp32"})
    p.add_argument("--pooling", default="mean",
                   help="per-image pooling of tokens: mean, tokens or grid:G (default: mean)")
    p.add_argument("--store-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the stored features (default: float32)")
    add_knobs(p, AnalyzeConfig, CHECKPOINT_KNOBS, grouped=False)
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
