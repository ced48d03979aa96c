"""docs/extending.md's examples run as printed: each registers one plug-in under a new name in its registry,
the plug-in works through repa-probe's own entry points, and the registries are restored after."""
from __future__ import annotations

import math
import re
from contextlib import contextmanager

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from conftest import REPO, tiny_config
from repa_probe.families import FAMILIES, load_checkpoint
from repa_probe.metrics import METRICS, alignment
from repa_probe.models import SiT
from repa_probe.noise import CONVENTIONS
from repa_probe.pipeline import COLUMNS
from repa_probe.measures import MEASURES, Source
from repa_probe.pipeline import AnalyzeConfig
from repa_probe.reductions import REDUCTIONS
from repa_probe.report.compose import FIGURES
from repa_probe.spatial import SPATIAL_METRICS, spatial_scores

REGISTRIES = {"metric": METRICS, "spatial": SPATIAL_METRICS, "family": FAMILIES, "figure": FIGURES,
              "convention": CONVENTIONS, "reduction": REDUCTIONS, "measure": MEASURES}
EXAMPLES = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "extending.md").read_text(), re.S)


@contextmanager
def run_example(code: str):
    """Execute one example → (which registry, the entry it added), the registries restored afterwards."""
    saved = {kind: dict(reg) for kind, reg in REGISTRIES.items()}
    try:
        exec(compile(code, "docs/extending.md", "exec"), {"__name__": "extending_example"})
        added = {kind: [x for x in reg if x not in saved[kind]] for kind, reg in REGISTRIES.items()}
        changed = {kind: new for kind, new in added.items() if new or len(REGISTRIES[kind]) != len(saved[kind])}
        assert len(changed) == 1, f"the example should add one entry to one registry, changed {sorted(changed)}"
        (kind, new), = changed.items()
        assert len(new) == 1 and len(REGISTRIES[kind]) == len(saved[kind]) + 1   # new, not a replacement
        entry = REGISTRIES[kind][new[0]]
        yield kind, entry
    finally:
        for kind, reg in REGISTRIES.items():
            for name in [x for x in reg if x not in saved[kind]]:
                reg.pop(name)


def check_metric(metric, tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=g), torch.randn(40, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    rotated, unrelated = alignment(a, torch.stack([a @ q]), (metric.name,), clamp=False)[metric.name][0], \
        alignment(b, a[None], (metric.name,), clamp=False)[metric.name][0]
    assert rotated == pytest.approx(1.0) and abs(unrelated) < 0.3     # cosines are rotation-invariant


def check_spatial(metric, tmp_path):
    rows = torch.randn(2, 3, 1, 8).expand(2, 3, 4, 8).reshape(2, 12, 8)  # each grid row one token repeated
    score = spatial_scores(rows, (3, 4), [metric.name])[metric.name]
    assert score.shape == (2,) and torch.allclose(score, torch.ones(2, dtype=score.dtype))


def check_family(family, tmp_path):
    model = SiT(tiny_config())
    torch.save({"net": model.state_dict()}, tmp_path / "net.pt")
    ckpt = load_checkpoint(tmp_path / "net.pt")
    assert ckpt.family is family and ckpt.provenance.family == family.name and ckpt.anatomy.depth == 3
    assert torch.equal(ckpt.model.blocks[2].mlp.fc1.weight, model.blocks[2].mlp.fc1.weight)


def check_figure(builder, tmp_path):
    table = pd.DataFrame([dict.fromkeys(COLUMNS, 0.5) | {"kind": kind, "block": block}
                          for kind, block in (("model", 0), ("model", 1), ("model", 1), ("untrained", 1))])
    (name, fig), = builder(None, table)
    assert isinstance(name, str) and [p.get_height() for p in fig.axes[0].patches] == [1, 2]
    plt.close(fig)


def check_convention(convention, tmp_path):
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    half = convention.model_input(x, torch.tensor([0.5, 0.5]), noise)
    assert torch.allclose(half, math.sqrt(0.5) * (x + noise), atol=1e-6)
    assert convention.timestep(0.25).item() == 250.0


def check_reduction(reduction, tmp_path):
    from conftest import hooked_tokens, randomize_
    from repa_probe.capture import capture_batch, noisy_input
    from repa_probe.families.sit import as_checkpoint
    model = randomize_(SiT(tiny_config(z_dims=[], encoder_depth=0)), seed=1).eval()
    x0, ids = torch.rand(3, 3, 16, 16) * 2 - 1, torch.arange(3)
    _, arrays = capture_batch(as_checkpoint(model, "repa"), x0, None, ids, 0.5, seed=0, reductions=(reduction.name,))
    x_t, timestep = noisy_input(as_checkpoint(model, "repa").convention, x0, ids, 0.5, 0)
    tokens, _ = hooked_tokens(model, x_t, timestep, torch.full((3,), 10))
    want = torch.stack([(h - h.mean(1, keepdim=True)).norm(dim=-1).mean(1, keepdim=True) for h in tokens])
    torch.testing.assert_close(arrays[reduction.name], want)


def check_measure(measure, tmp_path):
    import types
    import numpy as np
    tokens = np.random.default_rng(0).normal(size=(2, 3, 10, 4))                 # [T, B, N, D]
    pipe = types.SimpleNamespace(cfg=AnalyzeConfig(data="unused", bootstrap=0))
    src = Source("m", "model", None, [0, 1, 2], [0.0, 0.5], None, 4, np.arange(10), reduced={"tokens": {"blocks": tokens}})
    (curves,) = measure.curves(pipe, src)
    np.testing.assert_allclose(curves.value, np.linalg.norm(tokens, axis=-1).mean(-1))
    assert measure.curves(pipe, Source("r", "raw-input", None, [-1], [0.0], None, 4, np.arange(10))) == []
    assert measure.needs == ("tokens",) and measure.selected(AnalyzeConfig(data="unused", tokens=True))


CHECKS = {"reduction": check_reduction, "measure": check_measure, "metric": check_metric, "spatial": check_spatial, "family": check_family, "figure": check_figure,
          "convention": check_convention}


def test_the_page_has_one_example_per_registry():
    kinds = []
    for code in EXAMPLES:
        with run_example(code) as (kind, _):
            kinds.append(kind)
    assert sorted(kinds) == sorted(REGISTRIES)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i + 1}" for i in range(len(EXAMPLES))])
def test_each_example_registers_a_working_plug_in_and_is_taken_back(code, tmp_path):
    before = {kind: list(reg) for kind, reg in REGISTRIES.items()}
    with run_example(code) as (kind, entry):
        CHECKS[kind](entry, tmp_path)
    assert {kind: list(reg) for kind, reg in REGISTRIES.items()} == before
