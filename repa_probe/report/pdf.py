"""Writing a report folder: results.csv, summary.json, PNG figures and report.pdf, all or nothing.

Everything is written into a hidden temporary folder beside the target and moved into place at the
end, report.pdf last, so an interrupted or failed run never leaves a partial report that looks
complete. Only the report's own file names are replaced; anything else in the folder is left alone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages

from repa_probe.errors import UserError
from repa_probe.runtime import no_space, partial_prefix, remove_stale_tmp


def check_writable(out: str | os.PathLike) -> Path:
    """Fail early (before any compute) if the report folder cannot be created or written: try it."""
    if not str(out).strip():
        raise UserError("--out is empty: name the report folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a folder: choose another path")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".repa-probe-write-test-", dir=parent))
    except OSError as e:
        raise UserError(f"--out '{out}' is not writable ({e.strerror} in '{parent}'): choose another folder") from None
    return out


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_").lower()[:60] or "figure"


def write_report(out: str | os.PathLike, results: pd.DataFrame, summary: dict,
                 figures: Iterable[tuple[str, plt.Figure]], extra_tables: dict[str, pd.DataFrame] | None = None,
                 started: float | None = None) -> Path:
    """Write results.csv, summary.json, one PNG per figure (numbered in page order) and report.pdf.

    figures: (name, figure) in page order; page 1 should be the provenance + summary page. A generator is drawn
    page by page as it is saved, so a long report never holds all its figures open at once.
    started: ``time.perf_counter()`` when the report began; summary.json's ``timings_s.report`` then counts
    the figures' drawing too (summary.json is written after them).
    """
    out = check_writable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(out.parent)                     # partial reports of killed runs
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out.name), dir=out.parent))
    except OSError as e:
        raise UserError(f"--out '{out}': cannot write the report ({e.strerror})") from None
    try:
        results.to_csv(tmp / "results.csv", index=False)
        for name, table in (extra_tables or {}).items():
            table.to_csv(tmp / f"{name}.csv", index=False)
        figdir = tmp / "figures"
        figdir.mkdir()
        with PdfPages(tmp / "report.pdf") as pdf:
            for i, (name, fig) in enumerate(figures, 1):
                pdf.savefig(fig)
                fig.savefig(figdir / f"{i:02d}_{_slug(name)}.png", dpi=110)
                plt.close(fig)
            info = pdf.infodict()
            info["Title"] = summary.get("title", "repa-probe report")
            info["Creator"] = "repa-probe"
        if started is not None:
            summary.setdefault("timings_s", {})["report"] = round(time.perf_counter() - started, 2)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        # Move into place file by file, touching only our own names (the folder may hold the user's
        # other files); report.pdf goes last and is removed first, so it marks a complete report.
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.pdf").unlink(missing_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "report.pdf"):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    except Exception as e:
        if (error := no_space(out, e)) is None:
            raise
        raise error from None          # the partial folder goes (finally); the features stay in the cache
    finally:
        for fig in plt.get_fignums():
            plt.close(fig)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _json_default(o):
    if o is pd.NA:                      # an empty whole-number cell (n, k of a measure without them)
        return None
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
