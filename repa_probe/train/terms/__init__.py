"""Terms the trainer adds to the denoising and REPA objective, one file each, on the TERMS registry
(docs/training.md, "REPA's successors"):

    base.py        the Term protocol, the registry, and what a term is given (Forward)
    dispersive.py  Dispersive Loss (Wang & He 2025, arXiv 2506.09027), --dispersive COEFF

A new term is one new file that registers itself here, plus its TrainConfig knobs (train/trainer.py).
"""
from repa_probe.train.terms.base import TERMS, Forward, Term, active_terms
from repa_probe.train.terms import dispersive  # noqa: F401  (registers "dispersive")

__all__ = ["TERMS", "Forward", "Term", "active_terms"]
