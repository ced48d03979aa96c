"""A toy alignment measure, written the way a user adds one: the RV coefficient (Robert & Escoufier 1976),
RV(A, B) = ‖AᵀB‖²_F / (‖AᵀA‖_F·‖BᵀB‖_F) on the (preprocessed) features, i.e. uncentred linear CKA.
This one file is all it takes: analyze, compare and the trainer's analysis offer it as `--metrics rv`."""
from __future__ import annotations

import torch

from repa_probe.metrics import METRICS, Metric, register_metric


def _gram_part(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.double()


def _rv(a: torch.Tensor, b: torch.Tensor, shared: dict) -> float:
    cross = (a.T @ b).square().sum()
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()))


if "rv" not in METRICS:
    register_metric(Metric("rv", "RV coefficient", "features-f64", _gram_part, _rv, symmetric=True))
