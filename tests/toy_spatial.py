"""A toy spatial measure, written the way a user adds one: the mean cosine of horizontally adjacent tokens.
This one file is all it takes: with --spatial, analyze, compare, trajectory and the trainer's analysis report it
as `neighbour_cos`, and a cache filled before it was registered gets its column without serving stale ones."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from repa_probe.spatial import SPATIAL_METRICS, SpatialMetric, register_spatial_metric


def neighbour_cosine(tokens, grid) -> torch.Tensor:
    """(n,) float64: the mean cosine of each token with its right-hand neighbour."""
    h, w = grid
    u = F.normalize(torch.as_tensor(tokens).float(), dim=-1).reshape(len(tokens), h, w, -1)
    return (u[:, :, 1:] * u[:, :, :-1]).sum(-1).mean((1, 2)).double()


if "neighbour_cos" not in SPATIAL_METRICS:
    register_spatial_metric(SpatialMetric("neighbour_cos", "neighbour cosine", neighbour_cosine))
