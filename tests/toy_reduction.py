"""A toy token reduction and the measure that reads it, written the way a user adds them: each block's largest
token norm per image, reported as the mean over images with its bootstrap interval (`max_token_norm`). This one
file is all it takes: analyze, compare, trajectory and the trainer's analysis report it, and the store keeps the
reduction under its name and version (change VERSION and only this array is computed again)."""
from __future__ import annotations

from repa_probe.measures import MEASURES, Measure, per_image_curves, register_measure
from repa_probe.reductions import REDUCTIONS, TokenReduction, register_reduction

VERSION = "1"


def max_norm(tokens, batch):
    """[N, T, D] → [N, 1]: each image's largest token norm."""
    return tokens.float().norm(dim=-1).amax(dim=1, keepdim=True)


def curves(pipeline, source):
    if "max_norm" not in source.reduced:        # e.g. the raw input: the reduction is not applied to it
        return []
    return per_image_curves(pipeline, source, source.reduced["max_norm"]["blocks"], ["max_token_norm"])


if "max_norm" not in REDUCTIONS:
    register_reduction(TokenReduction("max_norm", lambda: VERSION, max_norm))
    register_measure(Measure("max token norm", curves, lambda: {"max_token_norm": "largest token norm"},
                             needs=("max_norm",)))
assert "max token norm" in MEASURES
