"""Plug-ins: modules that register model families, time conventions, alignment metrics or report figures.

A plug-in is any module whose import calls the registries' `register_*` functions (docs/extending.md). The
command line imports every plug-in before it parses its flags, so a registered convention or metric appears in
`--convention` / `--metrics` and the analysis uses it with no other change:
  - installed packages declare an entry point in the group ``repa_probe.plugins``;
  - ``REPA_PROBE_PLUGINS`` lists module names or .py files, comma-separated (for a file of your own).
In Python, importing the module is all it takes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from importlib.metadata import entry_points
from pathlib import Path

from repa_probe.errors import UserError

ENV = "REPA_PROBE_PLUGINS"


def load_plugins() -> list[str]:
    """Import every declared plug-in; → their names. A plug-in that fails to import is one UserError."""
    loaded = []
    for ep in entry_points(group="repa_probe.plugins"):
        _guarded(ep.name, ep.load)
        loaded.append(ep.name)
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        _guarded(spec, lambda spec=spec: _import(spec))
        loaded.append(spec)
    return loaded


def _import(spec: str):
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"{ENV}: plug-in file '{spec}' does not exist")
        module = importlib.util.spec_from_file_location(f"repa_probe_plugin_{path.stem}", path)
        loaded = importlib.util.module_from_spec(module)
        module.loader.exec_module(loaded)
        return loaded
    return importlib.import_module(spec)


def _guarded(name: str, load) -> None:
    try:
        load()
    except UserError:
        raise
    except Exception as e:   # any error inside a user's module: name the plug-in, not our traceback
        raise UserError(f"{ENV} / entry point: plug-in '{name}' failed to load ({type(e).__name__}: {e})") from None
