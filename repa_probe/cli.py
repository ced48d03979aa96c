"""Command-line interface. Parsing lives here; every subcommand calls one library function that a
notebook can call too. Bad input ends with one line, `repa-probe: error: ...`, and exit status 2."""
from __future__ import annotations

import argparse
import sys

from repa_probe.errors import UserError


def cmd_inspect(args: argparse.Namespace) -> None:
    from repa_probe.checkpoints import load_checkpoint, summary_rows
    rows = summary_rows(load_checkpoint(args.checkpoint, convention=args.convention, weights=args.weights))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--convention", choices=["sit", "dit", "repa"], default=None,
                   help="time convention of the checkpoint (default: detected; official SiT and DiT files "
                        "are told apart by their released file names, otherwise it is assumed and reported)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint to use (default: ema)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repa-probe",
        description="Look inside diffusion transformers (SiT/DiT/REPA): per-block, per-noise-level linear "
                    "probes and CKNNA alignment with a self-supervised encoder.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="print a checkpoint's format, architecture, time convention, REPA setup",
                       description="Load a checkpoint (official DiT/SiT, REPA last.pt or training dict, or "
                                   "repa-probe's own) and print what it is.")
    p.add_argument("checkpoint", help="path to a .pt or .safetensors checkpoint")
    add_checkpoint_options(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
