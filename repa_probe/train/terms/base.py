"""The protocol of a training term: what it is given, how it says whether it acts, and its registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from repa_probe.registry import Registry


@dataclass
class Forward:
    """One training forward, as the terms see it (all tensors carry gradients)."""
    hidden: list[torch.Tensor]      # hidden[b − 1]: block b's output tokens (N, T, D)
    t: torch.Tensor                 # (N,) canonical t (0 = data, 1 = noise)


class Term(Protocol):
    """A loss term L_name added as weight(cfg, step) · L_name; logged as loss_<name> (batch mean)."""
    name: str

    def enabled(self, cfg: Any) -> bool:
        """Whether the run's TrainConfig asks for this term at all (its knobs are TrainConfig fields)."""

    def weight(self, cfg: Any, step: int) -> float:
        """Its coefficient at (1-based) `step`; 0 leaves it out of that step's loss and of the log's mean."""

    def check(self, cfg: Any, depth: int) -> None:
        """Bad knobs → one UserError line naming the flag (`depth`: the model's number of blocks)."""

    def __call__(self, forward: Forward, cfg: Any) -> torch.Tensor:
        """The term's value on this batch: a scalar."""


TERMS: Registry[Term] = Registry("training term")


def active_terms(cfg: Any) -> list[Term]:
    """The registered terms this run uses, in registry order (the log's column order)."""
    return [term for term in TERMS.values() if term.enabled(cfg)]
