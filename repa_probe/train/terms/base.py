"""The protocol of a training term: what it is given, how it says whether it acts, and its registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

from repa_probe.registry import Registry


@dataclass
class Forward:
    """One training forward, as the terms see it (hidden carries gradients)."""
    hidden: list[torch.Tensor]      # hidden[b]: block b's output tokens (N, T, D); hidden[0]: those entering block 1
    c: torch.Tensor                 # (N, D) the blocks' condition (t and label embeddings)
    x: torch.Tensor                 # (N, C, H, W) clean input
    noise: torch.Tensor             # (N, C, H, W) ε of x_t = (1 − t)·x + t·ε
    t: torch.Tensor                 # (N,) canonical t (0 = data, 1 = noise)
    y: torch.Tensor                 # (N,) labels as fed (dropped ones are the null class)
    cls: torch.Tensor | None = None         # REG: the encoder's clean class token (N, D_c); None without REG
    cls_noise: torch.Tensor | None = None   # REG: its ε, noised with the image's t
    cls_out: torch.Tensor | None = None     # REG: the model's predicted velocity of the class token (N, D_c)


@dataclass
class Context:
    """What the trainer adds for a step: the model being trained (unwrapped: its heads), its EMA (a teacher), and
    uniform draws U(0, 1) of this process's samples from a named stream of (seed, name, step), the same for a
    sample whichever process draws it."""
    model: nn.Module
    ema: nn.Module
    uniform: Callable[[str], torch.Tensor]
    attention: list[torch.Tensor] = field(default_factory=list)   # the encoder's (--attn-align), (N, H, T, T)


def past_alignment(cfg: Any, step: int) -> bool:
    """Whether --align-until has switched the alignment terms (REPA's, HASTE's) off by (1-based) `step`."""
    return bool(cfg.align_until) and step > cfg.align_until


class Term(Protocol):
    """A loss term L_name added as weight(cfg, step) · L_name; logged as loss_<name> (batch mean)."""
    name: str

    def enabled(self, cfg: Any) -> bool:
        """Whether the run's TrainConfig asks for this term at all (its knobs are TrainConfig fields)."""

    def weight(self, cfg: Any, step: int) -> float:
        """Its coefficient at (1-based) `step`; 0 leaves it out of that step's loss and of the log's mean."""

    def check(self, cfg: Any, depth: int) -> None:
        """Bad knobs → one UserError line naming the flag (`depth`: the model's number of blocks)."""

    def __call__(self, forward: Forward, cfg: Any, context: Context) -> torch.Tensor:
        """The term's value on this batch: a scalar."""


TERMS: Registry[Term] = Registry("training term")


def active_terms(cfg: Any) -> list[Term]:
    """The registered terms this run uses, in registry order (the log's column order)."""
    return [term for term in TERMS.values() if term.enabled(cfg)]
