"""Token reductions: what capture keeps of a block's tokens besides their mean, one array per image.

A reduction maps a block's tokens [N, T, D] (row-major grid cells) to a per-image array [N, ...]: the
spatial measures of each image's tokens (spatial.py), the token at each image's sampled cell (tokens.py), a
plug-in's own. Capture computes the reductions the selected measures need (measures.py) in the same forward
pass as the pooled features, and the store keeps each one in its own part, keyed by its name AND version
(``part_name``): registering a reduction, changing its version or dropping it recomputes that array only, and
never serves another's values. Change `version` whenever `fn` changes what it returns.

    where="blocks"     fn is applied to every captured block's tokens → "blocks" [n_blocks, N, ...] per t
    where="projector"  fn is applied to each of the model's REPA projector outputs at the aligned block
                       (model.project) → "projected0", "projected1", … [N, ...] per t
    raw=True           also to the thumbnail's patches (x_t average-pooled per patch, as tokens) → "raw"
    encoder=True       also to the target encoder's tokens (the encoder's own reference, pipeline.py)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from repa_probe.registry import Registry
from repa_probe.runtime import digest
from repa_probe.spatial import spatial_matrix, spatial_measures
from repa_probe.tokens import at_cells, sample_cells


@dataclass
class Batch:
    """What a reduction may know of the images besides their tokens: their stable ids and the capture seed
    (the token sample's cells depend on both, never on the batch)."""
    ids: torch.Tensor
    seed: int
    _cells: dict = field(default_factory=dict)

    def cells(self, n_tokens: int) -> torch.Tensor:
        """(N,) each image's sampled grid cell (tokens.sample_cells), drawn once per batch."""
        if n_tokens not in self._cells:
            self._cells[n_tokens] = sample_cells(self.ids, n_tokens, self.seed)
        return self._cells[n_tokens]


@dataclass(frozen=True)
class TokenReduction:
    """tokens [N, T, D] → per-image array [N, ...] (float32), named and versioned (module docstring)."""
    name: str
    version: str | Callable[[], str]            # a callable for a version that follows a registry
    fn: Callable[[torch.Tensor, Batch], torch.Tensor]
    where: str = "blocks"                       # or "projector"
    raw: bool = False
    encoder: bool = False

    def key(self) -> str:
        """'name: version', what a cache key records of it."""
        return f"{self.name}: {self.version() if callable(self.version) else self.version}"


REDUCTIONS: Registry[TokenReduction] = Registry("token reduction")


def register_reduction(reduction: TokenReduction, *, priority: int = 0, overwrite: bool = False) -> TokenReduction:
    if reduction.where not in ("blocks", "projector"):
        raise ValueError(f"token reduction {reduction.name!r}: where= is 'blocks' or 'projector'")
    return REDUCTIONS.register(reduction.name, reduction, priority=priority, overwrite=overwrite)


def part_name(t_part: str, reduction: TokenReduction) -> str:
    """The store part holding `reduction` at one noise level: its name and a hash of its name and version."""
    return f"{t_part}+{reduction.name}-{digest(reduction.key())[:12]}"


def _spatial(tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
    return spatial_matrix(tokens.float())


def _at_cells(tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
    return at_cells(tokens, batch.cells(tokens.shape[1]))


# the spatial measures' columns follow the spatial registry: its version names each measure and its function
register_reduction(TokenReduction("spatial", lambda: ", ".join(spatial_measures()), _spatial, raw=True, encoder=True))
register_reduction(TokenReduction("tokens", "the token at each image's sampled cell", _at_cells))
register_reduction(TokenReduction("projected", "the projector output at each image's sampled cell", _at_cells,
                                  where="projector"))
