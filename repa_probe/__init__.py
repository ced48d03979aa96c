"""repa-probe: per-block, per-noise-level probes and representation alignment for diffusion transformers.

The package reads as the data flow (docs/data-flow.md):
checkpoints -> families -> capture (+ data, noise, encoders) -> store -> metrics / probe -> pipeline -> report,
with ``train`` producing checkpoints and ``cli`` exposing every stage.
"""

__version__ = "0.1.0"
