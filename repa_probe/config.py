"""Every knob, declared once. A config field's `knob(...)` says how the command line spells it, its help, what
values it takes (least and largest value, choices), whether a resumed training run must keep it and whether it
enters the capture's cache key. The parsers (cli.py), the checks of values given in Python (`check_knobs`),
the settings a resume must match (`resume_fields`) and the capture's settings (`AnalyzeConfig.capture`) are
all read from there.

AnalyzeConfig holds every knob of an analysis; TrainConfig (train/trainer.py) holds every knob of a training
run, and an AnalyzeConfig for its in-training analysis (flags --analyze-*)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import MISSING, asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, Sequence

from repa_probe import metrics as M
from repa_probe import stats
from repa_probe.capture import DEFAULT_TS, CaptureConfig
from repa_probe.data import DEFAULT_VAE, list_images
from repa_probe.encoders import ENCODERS
from repa_probe.errors import UserError
from repa_probe.measures import needed_reductions
from repa_probe.noise import CONVENTIONS
from repa_probe.runtime import resolve_device, resolve_precision

CPU_DEFAULT_N, GPU_DEFAULT_N = 500, 10_000
MAX_WORKERS = 4 * (os.cpu_count() or 1)


@dataclass
class Knob:
    """How one config field is set from the command line and checked; `knob()` declares it on the field."""
    help: str | None = None
    flag: str | None = None         # None: --field-name
    cli: bool = True                # on the command line of the commands that take this config
    required: bool = False          # the command line needs it (a field without a default needs it anyway)
    aliases: tuple[str, ...] = ()
    kind: str | None = None         # a value of parts: "path", "levels" (distinct noise levels), "names" (comma-
                                    # separated), "blocks" (distinct, 1-based), "interval" (LOW,HIGH in [0, 1]),
                                    # "specs" (NAME[=WEIGHTS], repeatable and comma-separated), "append" (repeatable)
    least: float | None = None      # the smallest value
    above: float | None = None      # a value must exceed it
    most: float | None = None       # the largest value (beyond it no run could finish)
    what: str | None = None         # what a bounded integer counts, in errors: "a number of worker processes"
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None   # or a registry's names (plug-ins too)
    negatable: bool = False         # --x and --no-x
    metavar: str | None = None
    group: str | None = None        # its section of --help
    resume: bool = False            # a resumed training run must have the checkpoint's value
    cache: bool = False             # enters the capture's cache key (CaptureConfig)
    nest: tuple[str, ...] = ()      # a config inside a config: the fields of it the command line sets, as
    prefix: str = ""                # --PREFIX-FLAG (TrainConfig.analysis: --analyze-n)
    helps: dict[str, str] = field(default_factory=dict)   # nest: help in the outer config's terms

    def names(self) -> list[str]:
        """The allowed values, a registry's read now (after the plug-ins have registered)."""
        return list(self.choices() if callable(self.choices) else self.choices or ())

    def bounds(self, integer: bool) -> str:
        """The allowed numbers in words: 'an integer ≥ 1', 'an integer in 0..10,000', 'a finite number > 0'."""
        if integer:
            if self.most is not None:
                return f"{self.what or 'an integer'} in {self.least:,}..{self.most:,}"
            return "an integer" + (f" ≥ {self.least}" if self.least is not None else "")
        if self.most is not None:
            return f"a number in [{self.least:g}, {self.most:g}]"
        return "a finite number" + (f" > {self.above:g}" if self.above is not None else
                                    f" ≥ {self.least:g}" if self.least is not None else "")

    def holds(self, v: float) -> bool:
        return math.isfinite(v) and (self.least is None or v >= self.least) and \
            (self.above is None or v > self.above) and (self.most is None or v <= self.most)


def knob(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, **spec: Any) -> Any:
    """A dataclass field with its Knob: knob(10, help="...", least=1), knob(factory=list, kind="specs", ...)."""
    return field(default=default, default_factory=factory or MISSING, metadata={"knob": Knob(**spec)})


def knob_of(f: dataclasses.Field) -> Knob:
    return f.metadata.get("knob") or Knob(cli=False)


def flag_of(f: dataclasses.Field) -> str:
    return knob_of(f).flag or "--" + f.name.replace("_", "-")


def base_type(f: dataclasses.Field) -> str:
    """'int', 'float', 'bool' or 'str' for a scalar field (the annotation's first word), else ''."""
    head = str(f.type).split("|")[0].strip()
    return head if head in ("int", "float", "bool", "str") else ""


def resume_fields(cls) -> tuple[str, ...]:
    """The settings a resumed run must share with its checkpoint (the rest, e.g. steps or logging, may change)."""
    return tuple(f.name for f in dataclasses.fields(cls) if knob_of(f).resume)


Arg = Callable[..., str]      # names a setting (and its value) in the caller's terms: cli_arg, python_arg


def spell(flag: str, value: Any = ...) -> str:
    """A flag with its value unless none is given (...): '--n 0', '--t 0,0.5', '--no-probe' (a switch)."""
    if value is ... or isinstance(value, bool):
        return flag
    return f"{flag} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else repr(value)}"


def cli_arg(name: str, value: Any = ...) -> str:
    """An AnalyzeConfig field as the command line spells it, with its value unless none is given (...):
    '--n 0', '--t 0,0.5', '--no-probe' (a switch takes no value)."""
    return spell(CLI_FLAGS.get(name, "--" + name.replace("_", "-")), value)


def python_arg(name: str, value: Any = ...) -> str:
    """The same for repa_probe.analyze's keyword arguments: 'n=0', 'ts=(0.0, 2.0)', 'probe=False', 'data=...'."""
    return f"{name}=" + ("..." if value is ... else repr(value))


def prefixed(prefix: str, arg: Arg = cli_arg) -> Arg:
    """`arg` for a nested config's flags: '--n 5' → '--analyze-n 5'."""
    return lambda name, value=...: arg(name, value).replace("--", f"--{prefix}-", 1)


def check_knobs(cfg: Any, arg: Arg) -> None:
    """Every switch is a bool, every number an integer or a finite number within its declared bounds, every name
    one of its choices (the parser checks the same while parsing; this is for configs made in Python). Integers
    become plain ints."""
    for f in dataclasses.fields(cfg):
        k, kind, value = knob_of(f), base_type(f), getattr(cfg, f.name)
        if kind == "bool" and not isinstance(value, bool):
            raise UserError(f"{arg(f.name, value)} must be True or False")
        if k.choices and value is not None:
            names = k.names()
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if v not in names:
                    raise UserError(f"{arg(f.name, v)}: choose from {', '.join(names)}")
        if value is None or kind not in ("int", "float") or (k.least, k.above, k.most) == (None, None, None):
            continue
        integer = kind == "int"
        if isinstance(value, bool) or not isinstance(value, Integral if integer else Real) or not k.holds(value):
            raise UserError(f"{arg(f.name, value)} must be {k.bounds(integer)}")
        if integer:
            setattr(cfg, f.name, int(value))


DATA, PROBE, METRICS, CAPTURE = "data and encoders", "linear probe", "metrics", "capture"
GENERATION = "sample quality (--gen; docs/generation.md)"
GEN_SPACES = lambda: (*ENCODERS, "inception")       # noqa: E731 (the registry's names, read when checked)


@dataclass
class AnalyzeConfig:
    """Every knob of an analysis; plain data, recorded in summary.json. The fields go in --help's order."""
    data: str = knob(help="ImageFolder tree DIR/<class>/<image> for alignment (e.g. ImageNet val, cifar10/test)",
                     kind="path", group=DATA)
    n: int | None = knob(None, help="images: a class-balanced seeded subset (default: 10000 on a GPU, 500 on the "
                                    "CPU)", aliases=("--num-images",), least=1, group=DATA)
    encoders: list[str] = knob(factory=list, flag="--encoder", kind="specs", metavar="NAME[=WEIGHTS]", group=DATA,
                               help="target encoder(s) for CKNNA, e.g. dinov2-vit-b=/w/dinov2_vitb14_pretrain.pth; "
                                    "repeat or comma-separate for several; see `repa-probe encoders`. Without one, "
                                    "only probes run")
    encoder_random_init: bool = knob(False, group=DATA, help="random encoder weights (tests only; every report then "
                                                             "says RANDOM WEIGHTS)")
    encoder_precision: str = knob("auto", choices=("auto", "fp32", "bf16"), group=DATA,
                                  help="the encoders' precision; auto: bf16 autocast where the device has native bf16 "
                                       "and the pooled features of the first 8 images move by at most 1e-2 of their "
                                       "spread from fp32 (the report says which and by how much), else fp32 "
                                       "(default: auto)")
    text_embeddings: str | None = knob(None, kind="path", metavar="FILE", group=DATA,
                                       help="text-conditioned diffusers models (PixArt, SD3, Flux): a prompt's "
                                            "embeddings (prompt_embeds, pooled_prompt_embeds; .pt or .safetensors); "
                                            "default: zeros, as reported")
    download: bool = knob(False, group=DATA,
                          help="fetch what is missing: official DiT/SiT/REPA checkpoints named by file name "
                               "(DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt, repa-last.pt), encoder weights and "
                               "--gen's Inception weights, into "
                               "~/.cache/repa-probe (checksummed, resumable); without it nothing touches the network")
    probe_train: str | None = knob(None, kind="path", group=PROBE,
                                   help="labelled ImageFolder to fit probes on (with --probe-test); default: 4/5 of "
                                        "the --data images")
    probe_test: str | None = knob(None, kind="path", group=PROBE,
                                  help="held-out labelled ImageFolder to score probes on (default: the other 1/5 of "
                                       "--data)")
    probe_n_train: int | None = knob(None, least=1, group=PROBE, help="probe training images (default: --n)")
    probe_n_test: int | None = knob(None, least=1, group=PROBE, help="probe test images (default: --n / 2)")
    probe: bool = knob(True, flag="--no-probe", group=PROBE, help="skip the linear probes (unlabelled data)")
    alignment_metrics: tuple[str, ...] = knob(("cknna",), flag="--metrics", kind="names", group=METRICS,
                                              choices=lambda: tuple(M.METRICS),
                                              help="alignment metrics: %(choices)s (default: cknna)")
    spatial: bool = knob(False, group=METRICS,
                         help="also iREPA's spatial measures (LDS, CDS, RMSC) of every block's tokens, the input's "
                              "and the encoder's, per image during capture (docs/spatial.md)")
    tokens: bool = knob(False, group=METRICS,
                        help="also patch-level alignment on one seeded token per image: token-level versions of "
                             "--metrics against the encoder's token of the same cell, and the mean cosine after "
                             "the checkpoint's own REPA projector at its aligned block (docs/spatial.md)")
    dispersion: bool = knob(False, group=METRICS,
                            help="also each block's dispersion: what Dispersive Loss minimises (InfoNCE-L2, τ = 1) "
                                 "on the pooled features, averaged over seeded disjoint batches of 64 images "
                                 "(docs/metrics.md)")
    attention: bool = knob(False, group=METRICS,
                           help="also each block's attention map (averaged over heads) against the encoder's last "
                                "block's, as HASTE distils it: row-wise KL and cosine per image, from one more pass "
                                "per batch and t (docs/metrics.md)")
    self_similarity: bool = knob(True, flag="--no-self-similarity", group=METRICS,
                                 help="skip the SRA view: each model's block × block and t × t linear CKA "
                                      "(self_similarity.csv, two pages; curves self_cka_prev, self_cka_tmin), "
                                      "computed when every block is analysed (docs/metrics.md)")
    k: int = knob(10, least=1, group=METRICS, help="nearest neighbours for CKNNA / mutual k-NN (default: 10)")
    bootstrap: int = knob(20, least=0, most=10_000, group=METRICS,
                          help="bootstrap replicates for every interval (alignment subsamples, probe refits), 0 = "
                               "none (default: 20)")
    null: int = knob(20, least=0, most=10_000, group=METRICS,
                     help="permutation draws for the alignment null (images shuffled), 0 = none (default: 20)")
    baselines: bool = knob(True, flag="--no-baselines", group=METRICS,
                           help="skip the untrained-model and raw-input baselines")
    samples: int = knob(0, least=0, most=100_000, group=METRICS,
                        help="add a page with this many samples per checkpoint (Euler ODE, 50 steps; default: 0)")
    ts: tuple[float, ...] = knob(DEFAULT_TS, flag="--t", kind="levels", cache=True, group=CAPTURE,
                                 help="noise levels, 0 = clean data, 1 = pure noise (default: 0,0.1,0.25,0.5,0.75)")
    seed: int = knob(0, least=0, cache=True, group=CAPTURE,
                     help="noise seed; equal seeds give equal noisy inputs to every checkpoint (default: 0)")
    labels: str = knob("null", choices=("null", "true"), cache=True, group=CAPTURE,
                       help="class label fed to the model: the null (unconditional) class or the true one "
                            "(default: null)")
    mode: str | None = knob(None, choices=("pixels", "latents"), group=CAPTURE,
                            help="model input space (default: from the checkpoint; 4 input channels = SD-VAE "
                                 "latents)")
    vae: str | None = knob(None, kind="path", group=CAPTURE,
                           help=f"latent models: local AutoencoderKL folder, or a hub name where the hub is reachable "
                                f"(default: the checkpoint's: as its trainer recorded it, {DEFAULT_VAE} for "
                                f"SiT/DiT/REPA; LightningDiT and REPA-E need theirs)")
    batch_size: int = knob(64, least=1, most=1 << 20, group=CAPTURE)
    num_workers: int = knob(0, flag="--workers", least=0, most=MAX_WORKERS, what="a number of worker processes",
                            group=CAPTURE, help="DataLoader worker processes (default: 0)")
    device: str | None = knob(None, group=CAPTURE, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    precision: str = knob("auto", choices=("auto", "fp32", "bf16", "fp16"), cache=True, group=CAPTURE,
                          help="autocast; auto = bf16 on GPUs, fp32 on the CPU (default: %(default)s)")
    cache: str | None = knob(None, kind="path", group=CAPTURE,
                             help="feature store folder (default: $XDG_CACHE_HOME/repa-probe or ~/.cache/repa-probe)")
    compile: bool = knob(False, cache=True, group=CAPTURE,
                         help="torch.compile the model's blocks (features equal eager up to rounding, cached apart; "
                              "the first batches pay the compile time)")
    skip_bad_images: bool = knob(False, group=CAPTURE, help="skip unreadable image files and report them")
    quiet: bool = knob(False, group=CAPTURE, help="no progress bar")
    convention: str | None = knob(None, choices=lambda: tuple(CONVENTIONS), group=CAPTURE,
                                  help="time convention of the checkpoint (default: detected; official SiT and DiT "
                                       "files are told apart by their released file names, otherwise it is assumed "
                                       "and reported)")
    weights: str = knob("ema", choices=("ema", "model"), group=CAPTURE,
                        help="which weights of a training checkpoint to use (default: ema)")
    heads: int | None = knob(None, least=1, group=CAPTURE,
                             help="attention heads, for a custom-width checkpoint whose weights cannot tell (no "
                                  "qk-norm, none recorded)")
    gen: int = knob(0, least=0, most=1_000_000, metavar="N", group=GENERATION,
                    help="score N seeded samples per checkpoint (the same noise and labels for each): FD in every "
                         "--gen-spaces space against --gen-reference, each beside its N, and paired differences "
                         "with bootstrap intervals; gen.csv (default: 0 = off)")
    gen_reference: str | None = knob(None, kind="path", metavar="DIR|NPZ", group=GENERATION,
                                     help="real images: an ImageFolder (its features cached in --cache) or an ADM "
                                          "reference batch .npz (default: --data)")
    gen_reference_n: int | None = knob(None, least=2, group=GENERATION,
                                       help="reference images of a folder: a class-balanced seeded subset "
                                            "(default: all)")
    gen_spaces: tuple[str, ...] | None = knob(None, kind="names", choices=GEN_SPACES, group=GENERATION,
                                              help="feature spaces: registered encoder names (FD_<encoder>; "
                                                   "weights as --encoder gives them, else found locally) and/or "
                                                   "inception (FID, sFID, IS, precision/recall) (default: the "
                                                   "--encoder(s))")
    inception_weights: str | None = knob(None, kind="path", metavar="PATH", group=GENERATION,
                                         help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth for the inception "
                                              "space (default: found in the weights folders, or fetched with "
                                              "--download)")
    gen_sampler: str = knob("sde", choices=("ode", "sde"), group=GENERATION,
                            help="Euler ODE or Euler-Maruyama SDE (default: sde, as REPA's FID)")
    gen_steps: int | None = knob(None, least=1, most=100_000, group=GENERATION,
                                 help="sampler steps (default: 250 for sde, 50 for ode, as REPA)")
    gen_cfg: float = knob(1.0, least=0, group=GENERATION, help="guidance scale; 1 = none (default: 1)")
    gen_cfg_interval: tuple[float, float] = knob((0.0, 1.0), kind="interval", metavar="LOW,HIGH", group=GENERATION,
                                                 help="guide only for t in [LOW, HIGH] (default: 0,1)")
    gen_bootstrap: int = knob(200, least=0, most=100_000, group=GENERATION,
                              help="replicates of a paired FD difference's bootstrap over sample indices, 0 = no "
                                   "intervals (default: 200)")
    blocks: tuple[int, ...] | None = knob(None, kind="blocks", cache=True, cli=False,
                                          help="blocks to analyse (0..depth); None = all")
    seed_groups: dict[str, list[str]] | None = None   # {recipe: [name of seed 0, ...]}; None: by name (findings/seeds.py)
    notes: list[str] = field(default_factory=list)

    def resolved(self, arg: Arg | None = None) -> "AnalyzeConfig":
        """Fill the device-dependent defaults and check every setting before any compute. `arg` names a setting
        in the caller's terms (`cli_arg`, the default: '--n 0'; `python_arg`: 'n=0')."""
        arg = arg or cli_arg
        cfg = AnalyzeConfig(**{**asdict(self), "notes": list(self.notes)})
        if not isinstance(cfg.data, (str, os.PathLike)) or not str(cfg.data).strip():
            raise UserError(f"{arg('data', cfg.data)}: name an ImageFolder tree DIR/<class>/<image>")
        device = resolve_device(cfg.device)
        cfg.device = str(device)
        if cfg.n is None:
            cfg.n = GPU_DEFAULT_N if device.type == "cuda" else CPU_DEFAULT_N
            if device.type != "cuda":
                cfg.notes.append(f"no GPU: analysed n = {cfg.n} images (pass {arg('n')} for more)")
        cfg.precision = resolve_precision(cfg.precision, device)
        check_knobs(cfg, arg)
        if cfg.bootstrap == 1:
            raise UserError(f"{arg('bootstrap', 1)}: an interval needs at least 2 replicates; pass 0 (no intervals) or "
                            f"2 or more (default 20)")
        ts = cfg.ts
        if not isinstance(ts, (tuple, list)) or not ts or \
                any(isinstance(t, bool) or not isinstance(t, Real) or not 0 <= t <= 1 for t in ts) or \
                len(set(ts)) != len(ts):
            raise UserError(f"{arg('ts', ts)}: distinct noise levels in [0, 1] (0 = clean data)")
        if (cfg.probe_train is None) != (cfg.probe_test is None):
            raise UserError(f"{arg('probe_train')} and {arg('probe_test')} go together: give both, or neither to "
                            f"split {arg('data')}")
        if cfg.n <= cfg.k + 3:
            raise UserError(f"{arg('n', cfg.n)} is too small for {arg('k', cfg.k)} nearest neighbours (need n > k + 3)")
        cfg.ts = tuple(float(t) for t in ts)
        cfg.data = str(cfg.data)
        images = {name: _check_image_folder(getattr(cfg, name), arg(name))
                  for name in ("data", "probe_train", "probe_test") if getattr(cfg, name) is not None}
        if cfg.n > images["data"]:
            raise UserError(f"{arg('n', cfg.n)}: choose between 1 and the {images['data']} images in {arg('data')}")
        if cfg.encoders and cfg.bootstrap:
            _check_subsamples(cfg, arg)
        if cfg.gen:
            check_generation(cfg, arg)
        return cfg

    def check_measurable(self, encoders: bool, arg: Arg | None = None) -> None:
        """Something to measure: an encoder (alignment), or labelled images (the probe)."""
        arg = arg or cli_arg
        if not encoders and not (self.probe and len(list_images(self.probe_train or self.data)[2]) > 1):
            why = arg("probe", False) if not self.probe else \
                f"'{self.probe_train or self.data}' has no class folders"
            raise UserError(f"nothing to measure: no {arg('encoders')} for alignment, and {why} for the probe; pass "
                            f"{arg('encoders', ['dinov2-vit-b'])} (an encoder) or labelled images")

    def capture(self) -> CaptureConfig:
        """The capture's settings: the knobs declared cache=True, which its cache key holds, and the token
        reductions the selected measures need (each keyed in the store by its name and version)."""
        return CaptureConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if knob_of(f).cache},
                             reductions=needed_reductions(self))


CLI_FLAGS = {f.name: flag_of(f) for f in dataclasses.fields(AnalyzeConfig)}


def _check_image_folder(path: str, name: str) -> int:
    """The number of images in the ImageFolder tree `path`; `name` says which setting gave it."""
    if not str(path).strip():
        raise UserError(f"{name} is empty: name an ImageFolder tree DIR/<class>/<image>")
    try:
        return len(list_images(path)[0])
    except UserError as e:
        raise UserError(f"{name}: {e}") from None


def check_generation(cfg: AnalyzeConfig, arg: Arg) -> None:
    """--gen's settings, before any compute: a feature space, real images to score against, a sampler that can
    run, and a pair of guidance bounds."""
    if not (cfg.gen_spaces or cfg.encoders):
        raise UserError(f"{arg('gen', cfg.gen)} needs a feature space: pass {arg('gen_spaces', ['inception'])} or an "
                        f"{arg('encoders', ['cifar-ssl-resnet'])}")
    if cfg.gen < 2:
        raise UserError(f"{arg('gen', cfg.gen)}: a Fréchet distance needs at least 2 samples")
    reference = cfg.gen_reference or cfg.data
    if not reference:
        raise UserError(f"{arg('gen', cfg.gen)} needs real images: pass {arg('gen_reference')} (an ImageFolder or an "
                        f"ADM .npz) or {arg('data')}")
    if not (Path(reference).is_dir() or (str(reference).endswith(".npz") and Path(reference).is_file())):
        raise UserError(f"{arg('gen_reference', str(reference))} is neither an image folder nor an ADM .npz file")
    if cfg.gen_sampler == "sde" and cfg.gen_steps == 1:
        raise UserError(f"{arg('gen_steps', 1)}: the sde sampler needs at least 2 steps")
    low_high = tuple(cfg.gen_cfg_interval)
    if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1] <= 1:
        raise UserError(f"{arg('gen_cfg_interval', low_high)}: LOW,HIGH with 0 ≤ LOW ≤ HIGH ≤ 1")


def _check_subsamples(cfg: AnalyzeConfig, arg: Arg) -> None:
    """Every bootstrap subsample of the n images (stats.subsamples: about 0.63·n distinct images, fewer by
    chance) must hold enough images for the alignment metrics: their fewest (`min_n`) and, for a kNN metric,
    k + 1 (k neighbours besides the image itself; metrics.FeatureKernel). Checked here, before any compute,
    rather than when the first subsample's kernel is built after the capture."""
    metrics = [M.METRICS[m] for m in cfg.alignment_metrics]
    need = max([m.min_n for m in metrics] + [cfg.k + 1 for m in metrics if m.uses_k])

    def fewest(n: int) -> int:
        return min(len(d) for d in stats.subsamples(n, cfg.bootstrap, cfg.seed))

    if fewest(cfg.n) >= need:
        return
    enough = next(n for n in range(cfg.n + 1, cfg.n + 100 * need) if fewest(n) >= need)
    raise UserError(f"{arg('n', cfg.n)} is too few for {arg('k', cfg.k)}: a bootstrap subsample "
                    f"({arg('bootstrap', cfg.bootstrap)}) keeps as few as {fewest(cfg.n)} distinct images, and "
                    f"{', '.join(cfg.alignment_metrics)} with k = {cfg.k} needs {need}; pass {arg('n', enough)} "
                    f"or more, a smaller {arg('k')}, or {arg('bootstrap', 0)}")
