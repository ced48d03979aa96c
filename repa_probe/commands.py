"""The analysis commands: `analyze`, `compare` and `trajectory` (docs/analysis.md).

Each is the Python API's analysis (api.py: load the checkpoints, run the pipeline on the same images and seeded
noise for every checkpoint, intervals, baselines) plus its report (report/compose.py: the pages of the figure
registry over the findings): results.csv (tidy, one row per checkpoint × block × t × metric × encoder, with a
`kind` column: model, untrained, raw-input), summary.json, figures/ and report.pdf, whose first page has the
answer. A command checks that its report folder is writable and holds it against a second analysis first.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from repa_probe import api
from repa_probe.errors import UserError
from repa_probe.pipeline import AnalyzeConfig
from repa_probe.report import compose
from repa_probe.report.pdf import check_writable
from repa_probe.runtime import hold_folder, rank

__all__ = ["AnalyzeConfig", "analyze", "compare", "trajectory"]


def held(out: str):
    """Hold the report folder against a second analysis; under torchrun rank 0 holds it (and alone writes the
    report), the other ranks compute their share beside it."""
    return hold_folder(out) if rank() == 0 else contextlib.nullcontext(Path(out))


def analyze(checkpoint: str, config: AnalyzeConfig, out: str) -> Path:
    """`repa-probe analyze`: one checkpoint → results.csv, summary.json, figures, report.pdf in `out`."""
    return compare([checkpoint], config, out)


def compare(checkpoints: list[str], config: AnalyzeConfig, out: str, names: list[str] | None = None) -> Path:
    """`repa-probe compare A B [C ...]`: the same images and noise for all; deltas are (B − A) etc. `names`
    default to the files' (api.unique_names)."""
    check_writable(out)
    with held(out):                        # a second analysis into `out` stops at once, naming this one
        return api.analyse(checkpoints, config, names).report(out)


def trajectory(sources: list[str], config: AnalyzeConfig, out: str, source: str = "auto") -> Path:
    """`repa-probe trajectory RUN_DIR_OR_GLOB [...]`: metrics over training steps (REPA Fig. 2b); see
    api.trajectory for the sources."""
    check_writable(out)
    if source not in ("auto", "log", "checkpoints"):
        raise UserError(f"--source {source!r}: use auto, log or checkpoints")
    with held(out):
        start = time.perf_counter()
        return compose.write(api.trajectory(sources, config, source), out, {"total": time.perf_counter() - start})
