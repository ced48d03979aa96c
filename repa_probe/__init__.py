"""repa-probe: per-block, per-noise-level probes and representation alignment for diffusion transformers.

The package reads as the data flow (docs/data-flow.md):
checkpoints -> families -> capture (+ data, noise, encoders) -> store -> metrics / probe -> pipeline -> report,
with ``train`` producing checkpoints and ``cli`` exposing every stage.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`repa_probe.analyze(...)` and `repa_probe.describe_module(...)` (api.py), imported on first use."""
    if name in ("analyze", "Analysis", "describe_module"):
        from repa_probe import api
        return getattr(api, name)
    raise AttributeError(f"module 'repa_probe' has no attribute {name!r}")
