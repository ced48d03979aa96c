"""repa-probe: per-block, per-noise-level probes and representation alignment for diffusion transformers.

The package reads as the data flow (see DESIGN.md):
checkpoints -> models -> noise -> capture (+ data, encoders) -> store -> metrics / probe -> report,
with ``train`` producing checkpoints and ``cli`` exposing every stage.
"""

__version__ = "0.1.0"
