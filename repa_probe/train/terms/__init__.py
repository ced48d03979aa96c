"""Terms the trainer adds to the denoising and REPA objective, one file each, on the TERMS registry
(docs/training.md, "REPA's successors"):

    base.py        the Term protocol, the registry, and what a term is given (Forward)
    dispersive.py  Dispersive Loss (Wang & He 2025, arXiv 2506.09027), --dispersive COEFF
    self_align.py  SRA, self-representation alignment (Jiang et al. 2025, arXiv 2505.02831), --self-align COEFF
    attn_align.py  HASTE's attention distillation (Wang et al. 2025, arXiv 2505.16792), --attn-align COEFF
    reg.py         REG, an encoder's class token denoised with the image (Wu et al. 2025, arXiv 2507.01467),
                   --reg-cls COEFF

A new term is one new file that registers itself here, plus its TrainConfig knobs (train/trainer.py).
"""
from repa_probe.train.terms.base import TERMS, Context, Forward, Term, active_terms, past_alignment
from repa_probe.train.terms import attn_align, dispersive, reg, self_align  # noqa: F401  (they register themselves)

__all__ = ["TERMS", "Context", "Forward", "Term", "active_terms", "past_alignment"]
