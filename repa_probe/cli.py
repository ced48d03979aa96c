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


def cmd_extract(args: argparse.Namespace) -> None:
    import time
    from repa_probe.capture import CaptureConfig, extract
    from repa_probe.checkpoints import load_checkpoint
    from repa_probe.store import rank, shutdown_distributed
    start = time.perf_counter()
    config = CaptureConfig(ts=args.t, seed=args.seed, pooling=args.pooling, labels=args.labels,
                           precision=args.precision, dtype=args.store_dtype)
    ckpt = load_checkpoint(args.checkpoint, convention=args.convention, weights=args.weights)
    try:
        features = extract(ckpt, args.data, config, mode=args.mode, vae=args.vae, n=args.n,
                           subset_seed=args.subset_seed, skip_bad=args.skip_bad_images, batch_size=args.batch_size,
                           num_workers=args.workers, device=args.device, cache_dir=args.cache, quiet=args.quiet)
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


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.1,0.5; got {s!r}") from None


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

    p = sub.add_parser("extract", help="capture every block's features at each noise level into the feature store",
                       description="Run a checkpoint over a data subset at each noise level t, pool every block's "
                                   "output per image and store it (resumable; torchrun splits the images across "
                                   "ranks). Prints where the features are.")
    p.add_argument("checkpoint", help="path to a .pt or .safetensors checkpoint")
    p.add_argument("--data", required=True, help="ImageFolder tree DIR/<class>/<image> (e.g. ImageNet val)")
    p.add_argument("--num-images", "--n", dest="n", type=int, default=None,
                   help="images to use: a class-balanced seeded subset (default: all); under torchrun spell it "
                        "--num-images (torchrun's own parser rejects the abbreviation --n)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset choice (default: 0)")
    p.add_argument("--t", type=_floats, default=(0.0, 0.1, 0.25, 0.5, 0.75),
                   help="noise levels, 0 = clean data, 1 = pure noise (default: 0,0.1,0.25,0.5,0.75)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; equal seeds give equal noisy inputs to every "
                                                       "checkpoint (default: 0)")
    p.add_argument("--pooling", default="mean", help="per-image pooling of tokens: mean, tokens or grid:G (default: mean)")
    p.add_argument("--labels", choices=["null", "true"], default="null",
                   help="class label fed to the model: the null (unconditional) class or the true one (default: null)")
    p.add_argument("--mode", choices=["pixels", "latents"], default=None,
                   help="model input space (default: from the checkpoint; 4 input channels = SD-VAE latents)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                   help="latent models: local AutoencoderKL folder, or a hub name where the hub is reachable")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast (default: fp32)")
    p.add_argument("--store-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the stored features (default: float32)")
    p.add_argument("--cache", default=None, help="feature store folder (default: $XDG_CACHE_HOME/repa-probe or "
                                                 "~/.cache/repa-probe)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files and report them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_checkpoint_options(p)
    p.set_defaults(func=cmd_extract)
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
