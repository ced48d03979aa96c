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
one recipe (by default, names RECIPE-sSEED are; report/seeds.py).
`models=`, `encoders=`, `names=` and `ts=` take one value or a list.
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
from repa_probe.commands import resolve_checkpoint, unique_names
from repa_probe.errors import UserError
from repa_probe.families import load_checkpoint
from repa_probe.families.module import describe_module
from repa_probe.pipeline import AnalyzeConfig, Pipeline, Results, python_arg, run
from repa_probe.report import compose
from repa_probe.report.seeds import check_groups

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


def _load(model: Any, cfg: AnalyzeConfig, describe: dict, index: int) -> tuple[LoadedCheckpoint, str]:
    if isinstance(model, LoadedCheckpoint):
        return model, Path(model.provenance.path).stem or f"model{index + 1}"
    if isinstance(model, nn.Module):
        ckpt = describe_module(model, **describe)
        return ckpt, describe.get("name") or f"{type(model).__name__}" + (f"-{index + 1}" if index else "")
    if isinstance(model, (str, os.PathLike)):
        path = resolve_checkpoint(str(model), cfg.download)
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
    start = time.perf_counter()
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
    pipeline = Pipeline(config, arg=python_arg)
    loaded = [_load(m, pipeline.cfg, describe, i) for i, m in enumerate(models)]
    if names is None:                                  # files as on the command line; modules by their name
        is_path = [isinstance(m, (str, os.PathLike)) for m in models]
        short = iter(unique_names([n for (_, n), p in zip(loaded, is_path) if p]))
        names = [next(short) if p else n for (_, n), p in zip(loaded, is_path)]
    if len(set(names)) != len(names):
        raise UserError(f"names {list(names)} repeat: pass names=[...] with one distinct name per model")
    if pipeline.cfg.seed_groups is not None:
        check_groups(pipeline.cfg.seed_groups, list(names))        # before any compute
    results = run([c for c, _ in loaded], list(names), pipeline.cfg, pipeline)
    return Analysis(results, time.perf_counter() - start)
