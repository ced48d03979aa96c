"""The Python API, for notebooks: `repa_probe.analyze(model_or_path, data=..., encoders=[...], ts=[...])`.

    import repa_probe
    a = repa_probe.analyze("runs/repa", data="cifar10/test", encoders=["cifar-ssl-resnet"], ts=[0, 0.25])
    a.table                       # tidy DataFrame: checkpoint, kind, block, t, metric, encoder, value, intervals
    a.summary["overview"]         # page 1's sentences; a.summary["peaks"], a.summary["compare"], ...
    a.report("out/repa")          # results.csv, summary.json, figures/, report.pdf

A list of models is a comparison (same images, same noise; deltas against the first). A model is a checkpoint
path or run folder (any family repa-probe loads), an already loaded checkpoint, or any nn.Module described by
`blocks=`, `call=`, `convention=`, `image_size=` ... (families/module.py). Every other keyword is an
AnalyzeConfig field (n, k, bootstrap, null, probe_train, probe_test, cache, device, ...), as on the command line,
and checked as there: a bad value ends in one UserError that names it as Python spells it ("n=0", "data=...").
`seed_groups={"vanilla": [names of its seeds 0, 1, ...], "repa": [...]}` says which models are training seeds of
one recipe (by default, names RECIPE-sSEED are; findings/seeds.py).
`models=`, `encoders=`, `names=` and `ts=` take one value or a list.

The command line's `analyze` and `compare` are `analyse` (the same orchestration, from an AnalyzeConfig) plus
the report; its `trajectory` is `trajectory` plus the report (commands.py).
"""
from __future__ import annotations

import dataclasses
import os
import time
from numbers import Real
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from torch import nn

from repa_probe.checkpoints import LoadedCheckpoint
from repa_probe.encoders import get_encoder_spec, parse_encoder_spec
from repa_probe.errors import UserError
from repa_probe.families import load_checkpoint
from repa_probe.families.module import describe_module
from repa_probe.findings import Findings, trajectory_findings
from repa_probe.findings.seeds import check_groups
from repa_probe.findings.generation import quality_score, steps_to_reach
from repa_probe.generation import GEN_COLUMNS, Scorer, logged_generation, score_models
from repa_probe.pipeline import AnalyzeConfig, Arg, Pipeline, Results, cli_arg, python_arg, run
from repa_probe.report import compose
from repa_probe.runtime import find_checkpoints, latest_in_run

ANALYSIS_LOG = "analysis.jsonl"   # the trainer's analysis-while-training rows (train/trainer.py)
TRAIN_LOG = "log.jsonl"           # the trainer's log, with its sample-quality rows ({"event": "eval", ...})
MODULE_KEYS = ("blocks", "call", "convention", "image_size", "channels", "grid", "num_classes", "stream",
               "image_tokens", "aligned_block")


@dataclasses.dataclass
class Analysis:
    """What `analyze` returns: the pipeline's Results with the table, the summary and a report writer."""
    results: Results
    seconds: float

    @property
    def table(self) -> pd.DataFrame:
        return self.results.table()

    @property
    def summary(self) -> dict:
        """summary.json's content: overview sentences, peaks with held-out drops, compare deltas, provenance."""
        return compose.summarise(self.results, {"total": self.seconds})[0]

    def report(self, out: str | os.PathLike) -> Path:
        """Write results.csv, summary.json, figures/ and report.pdf into `out`; returns the folder."""
        if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
            raise UserError(f"report(out={out!r}): pass the folder to write into, e.g. a.report('out/repa')")
        return compose.write(self.results, str(out), {"total": self.seconds})


def unique_names(paths: list[str]) -> list[str]:
    """Short distinct labels for checkpoints: file stems (run/stem for a training run's RUN/checkpoints/
    0002500.pt, whose stem alone says nothing); when they repeat, the run folder (the folder holding
    checkpoints/, or the file's folder), then run/stem, then numbered stems."""
    def run_of(p: Path) -> str:
        return p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name

    paths = [Path(p) for p in paths]
    stems = [f"{run_of(p)}/{p.stem}" if p.parent.name == "checkpoints" else p.stem for p in paths]
    for names in (stems, [run_of(p) for p in paths], [f"{run_of(p)}/{p.stem}" for p in paths]):
        if len(set(names)) == len(names) and all(names):
            return names
    return [f"{i + 1}:{p.stem}" for i, p in enumerate(paths)]


def resolve_checkpoint(arg: str, download: bool = False) -> str:
    """A checkpoint file, a run folder's latest checkpoint, or an official checkpoint by file name (from the
    download cache; fetched there with download=True)."""
    from repa_probe.download import CHECKPOINTS, cache_root, official_checkpoint
    path = latest_in_run(arg)
    if Path(path).is_file():
        return path
    name = Path(arg).name
    if name in CHECKPOINTS and (download or (cache_root() / "checkpoints" / name).is_file()):
        return str(official_checkpoint(name))
    hint = " (an official checkpoint: add --download to fetch it)" if name in CHECKPOINTS else ": check the path"
    raise UserError(f"checkpoint '{path}' does not exist{hint}")


def _is_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike))


def _load(model: Any, path: str | None, cfg: AnalyzeConfig, describe: dict, index: int) -> tuple[LoadedCheckpoint, str]:
    """(the loaded model, its default name); `path`: the resolved checkpoint file of a path or run folder."""
    if isinstance(model, LoadedCheckpoint):
        return model, Path(model.provenance.path).stem or f"model{index + 1}"
    if isinstance(model, nn.Module):
        ckpt = describe_module(model, **describe)
        return ckpt, describe.get("name") or f"{type(model).__name__}" + (f"-{index + 1}" if index else "")
    if path is not None:
        return load_checkpoint(path, convention=cfg.convention, weights=cfg.weights, heads=cfg.heads,
                               text_embeddings=cfg.text_embeddings), str(model)
    raise UserError(f"cannot analyse a {type(model).__name__}: pass a checkpoint path, a run folder, a loaded "
                    f"checkpoint or an nn.Module (with blocks=, call=, convention=, image_size=)")


def _listed(name: str, value: Any, what: str, of: type = object) -> list:
    """An argument that takes one item or a list of them (models=, encoders=, names=), as a non-empty list."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, of) for v in items):
        raise UserError(f"{python_arg(name, value)}: pass {what}, or a non-empty list of them")
    return items


def analyze(models: Any | Sequence[Any], data: str, encoders: str | Sequence[str] = (),
            ts: float | Sequence[float] | None = None, *, names: str | Sequence[str] | None = None,
            **options: Any) -> Analysis:
    """Analyse one model, or compare several on the same images and noise; see the module docstring. Bad
    arguments end in one UserError that names them as here (`data=`, `ts=`), checked as the command line's."""
    models = _listed("models", models, "a checkpoint path, run folder, loaded checkpoint or nn.Module")
    encoders = _listed("encoders", encoders, "an encoder name such as 'dinov2-vit-b'", str) if encoders else []
    if isinstance(options.get("alignment_metrics"), str):
        options["alignment_metrics"] = (options["alignment_metrics"],)
    if isinstance(ts, Real) or (isinstance(ts, Iterable) and not isinstance(ts, (str, bytes))):
        ts = (ts,) if isinstance(ts, Real) else tuple(ts)      # one noise level or several, checked with the rest
    modules = any(isinstance(m, nn.Module) for m in models)
    describe = {k: options.pop(k) for k in MODULE_KEYS + ("name",) if k in options and (modules or k != "convention")}
    if describe and not modules:
        raise UserError(f"{', '.join(sorted(describe))}: only for an nn.Module (a checkpoint file describes itself)")
    fields = {f.name for f in dataclasses.fields(AnalyzeConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UserError(f"analyze() got unknown option(s) {unknown}; options are {sorted(fields | set(MODULE_KEYS))}")
    if names is not None:
        names = _listed("names", names, "a name", str)
        if len(names) != len(models):
            raise UserError(f"{python_arg('names', names)} gives {len(names)} name(s) for {len(models)} model(s): "
                            f"pass one name per model")
    config = AnalyzeConfig(data=data, encoders=encoders, **options, **({"ts": ts} if ts is not None else {}))
    return analyse(models, config, names, describe, arg=python_arg)


def analyse(models: Sequence[Any], config: AnalyzeConfig, names: Sequence[str] | None = None,
            describe: dict | None = None, arg: Arg = cli_arg) -> Analysis:
    """`analyze` and `compare`, from a config: check it (`arg` names a setting in errors: the command line's
    flags or Python's keywords), load every model (a missing file fails before any loads), analyse all on the
    same images and noise. `names` default to `unique_names` of the paths as given, and a module's name."""
    start = time.perf_counter()
    cfg = config.resolved(arg)                             # every setting checked, encoder names included,
    for spec in cfg.encoders:                              # and every file found, before anything loads
        get_encoder_spec(parse_encoder_spec(spec)[0])
    paths = [resolve_checkpoint(str(m), cfg.download) if _is_path(m) else None for m in models]
    pipeline = Pipeline(cfg, arg=arg)
    scorer = Scorer(pipeline.cfg, pipeline.device) if pipeline.cfg.gen else None      # and --gen's feature spaces
    loaded = [_load(m, p, pipeline.cfg, describe or {}, i) for i, (m, p) in enumerate(zip(models, paths))]
    if names is None:                                  # files as on the command line; modules by their name
        short = iter(unique_names([n for (_, n), p in zip(loaded, paths) if p is not None]))
        names = [next(short) if p is not None else n for (_, n), p in zip(loaded, paths)]
    if len(set(names)) != len(names):
        raise UserError(f"names {list(names)} repeat: pass names=[...] with one distinct name per model")
    if pipeline.cfg.seed_groups is not None:
        check_groups(pipeline.cfg.seed_groups, list(names))        # before any compute
    if scorer is not None:
        scorer.reference_for(loaded[0][0].anatomy.input.image_size)     # the real images' statistics (cached)
    results = run([c for c, _ in loaded], list(names), pipeline.cfg, pipeline)
    if scorer is not None:                             # sample quality, the same samples for every checkpoint
        gen_start = time.perf_counter()
        results.generation = score_models(scorer, [c for c, _ in loaded], list(names))
        results.timings["generation"] = time.perf_counter() - gen_start
    return Analysis(results, time.perf_counter() - start)


def trajectory(sources: Sequence[str], config: AnalyzeConfig, source: str = "auto") -> Findings:
    """Metrics over training steps (REPA Fig. 2b) → the trajectory's Findings (`compose.write` draws them).

    Each source is a run folder or a glob of checkpoints (one line style per source). source="log" reads
    the run's analysis-while-training file (analysis.jsonl: step, block, t, metric, encoder, value),
    "checkpoints" analyses every checkpoint (feature store: only new ones cost compute), "auto" uses the
    log where a run folder has one and the checkpoints otherwise. With config.gen every checkpoint's samples
    are scored (each later run's step differenced, paired, against the first run's same step); without it, the
    FDs a run's log.jsonl holds (`train --eval-every`) are read. With a vanilla and a REPA run folder, their
    log.jsonl's losses say from which step the alignment term stops paying (findings/monitor.py)."""
    frames, curves, provenance, depth, pipeline, logs = [], {}, {}, 1, None, {}
    gen = GenSteps(_run_name(sources[0]))
    for src in sources:
        name, log = _run_name(src), Path(src) / ANALYSIS_LOG
        if (Path(src) / TRAIN_LOG).is_file():
            logs[name] = Path(src) / TRAIN_LOG
        if not config.gen:
            gen.rows += logged_generation(Path(src) / TRAIN_LOG, name)
        if source != "checkpoints" and log.is_file():
            df = pd.read_json(log, lines=True)
            frames.append(df.assign(run=name, checkpoint=name, kind="model"))
            depth = max(depth, int(df["block"].max()))
            provenance[name] = {"path": str(log), "format": "analysis-while-training log"}
            gen.score_run(src, name, config)
            continue
        files = _run_checkpoints(src, source, config)
        pipeline = pipeline or Pipeline(config)
        gen.start(pipeline.cfg, pipeline.device)
        for file in files:
            depth = max(depth, _analyse_step(file, name, pipeline, frames, curves, provenance, gen))
    cfg = pipeline.cfg if pipeline else config
    return trajectory_findings(frames, curves, provenance, depth, cfg, list(sources), source, gen.table(), logs,
                               gen.reach())


def _run_name(src: str) -> str:
    return Path(src).name if Path(src).is_dir() else src


@dataclasses.dataclass
class GenSteps:
    """A trajectory's gen.csv rows: with --gen each run's checkpoints scored, RUN@STEP, the first run's kept so
    that every later run's step is differenced against the first run's same step (the same samples: paired);
    without it, the FDs logged by `train --eval-every` (log.jsonl)."""
    first: str
    scorer: Scorer | None = None
    rows: list = dataclasses.field(default_factory=list)
    reached: dict = dataclasses.field(default_factory=dict)     # {run: {step: (FD, its bootstrap replicates)}}

    def start(self, cfg: AnalyzeConfig, device=None) -> None:
        if cfg.gen and self.scorer is None:
            self.scorer = Scorer(cfg, device)

    def score(self, ckpt: LoadedCheckpoint, run: str, step: int) -> None:
        if self.scorer is not None:
            name = f"{run}@{step}"
            rows = self.scorer.score(ckpt, name, run=run, step=step, keep=True,
                                     against=None if run == self.first else f"{self.first}@{step}")
            self.rows += rows
            scores, score, cfg = self.scorer.kept[name], quality_score(pd.DataFrame(rows)), self.scorer.cfg
            reps = scores.fd_replicates(self.scorer.reference, score, cfg.gen_bootstrap, cfg.seed)
            self.reached.setdefault(run, {})[step] = (scores.scores[score].value, reps)
            if run != self.first:              # only the first run's samples are compared with later ones
                del self.scorer.kept[name]

    def score_run(self, src: str, run: str, config: AnalyzeConfig) -> None:
        """With --gen, the checkpoints of a run whose measures come from its log."""
        if not config.gen:
            return
        cfg = config.resolved()
        self.start(cfg, cfg.device)
        for file in find_checkpoints(src):
            ckpt = load_checkpoint(file, convention=cfg.convention, weights=cfg.weights, heads=cfg.heads)
            self.score(ckpt, run, _step_of(ckpt, file))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=GEN_COLUMNS)

    def reach(self) -> pd.DataFrame | None:
        """With --gen: the step at which each later run reaches the first run's last FD (the first FD score),
        paired over the sample indices every checkpoint shares (findings/generation.py's steps_to_reach)."""
        if self.scorer is None or not self.rows:
            return None
        runs = {self.first: self.reached[self.first], **self.reached} if self.first in self.reached else self.reached
        return steps_to_reach(runs, quality_score(self.table()), self.scorer.sampling.n, self.scorer.cfg.gen_bootstrap)


def _step_of(ckpt: LoadedCheckpoint, file: str) -> int:
    if ckpt.provenance.step is None:
        raise UserError(f"'{file}' records no training step: trajectory needs checkpoints from a training run")
    return ckpt.provenance.step


def _run_checkpoints(src: str, source: str, config: AnalyzeConfig) -> list[str]:
    """The checkpoints of a source without a training log that trajectory may analyse."""
    if source == "log":
        raise UserError(f"'{src}' has no {ANALYSIS_LOG}: train with --analyze-every, or use --source checkpoints")
    files = find_checkpoints(src)
    if not files:
        raise UserError(f"no checkpoints (.pt/.safetensors) found for '{src}': pass a run folder or a glob")
    if not config.data:
        raise UserError(f"'{src}' has no {ANALYSIS_LOG} (train with --analyze-every for one), so its checkpoints "
                        f"are analysed: pass --data IMAGE_FOLDER (held-out images, e.g. cifar10/test)")
    return files


def _analyse_step(file: str, run_name: str, pipeline: Pipeline, frames: list, curves: dict, provenance: dict,
                  gen: GenSteps) -> int:
    """Analyse one checkpoint of a run as RUN@STEP, adding its rows (with run and step), its curves, its
    provenance and, with --gen, its sample quality; → its depth."""
    cfg = pipeline.cfg
    ckpt = load_checkpoint(file, convention=cfg.convention, weights=cfg.weights, heads=cfg.heads)
    step = _step_of(ckpt, file)
    gen.score(ckpt, run_name, step)
    for a in pipeline.analyse(ckpt, f"{run_name}@{step}", class_token=False):      # the models' rows only
        if a.kind == "model":
            frames.append(pd.DataFrame([r for c in a.curves for r in c.rows()]).assign(run=run_name, step=step))
            curves[(run_name, step)] = a.curves
            provenance[a.name] = ckpt.provenance.to_dict()
    return ckpt.anatomy.depth
