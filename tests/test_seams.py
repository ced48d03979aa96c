"""The seams: a new model family, time convention and alignment measure are one file each (tests/toy_family.py,
tests/toy_measure.py), and analyze, compare and the trainer's analysis use them with no other change."""
from __future__ import annotations

import json
import math

import importlib
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, randomize_, run_cli, tiny_config
from repa_probe import metrics
from repa_probe.capture import capture_blocks
from repa_probe.checkpoints import save_checkpoint
from repa_probe.families import load_checkpoint
from repa_probe.models import SiT
from repa_probe.noise import seeded_noise

@pytest.fixture(scope="module")
def toy_family():
    """Import the two plug-in files (they register a family, a convention and a metric) for this module's
    tests, and take the registrations back after: other tests see the built-in registries only."""
    from repa_probe.families.base import FAMILIES
    from repa_probe.noise import CONVENTIONS
    family, _ = importlib.import_module("toy_family"), importlib.import_module("toy_measure")
    yield family
    FAMILIES.pop("toy-vit"), CONVENTIONS.pop("toy-cosine"), metrics.METRICS.pop("rv")
    sys.modules.pop("toy_family"), sys.modules.pop("toy_measure")


PLUGINS = {"REPA_PROBE_PLUGINS": f"{REPO / 'tests' / 'toy_family.py'},{REPO / 'tests' / 'toy_measure.py'}",
           "OMP_NUM_THREADS": "1"}
ENCODER = "test_vit"


def common(tmp_path, cifar_dir):
    return ["--data", cifar_dir / "test", "--n", 40, "--t", "0,0.5", "--encoder", ENCODER, "--encoder-random-init",
            "--metrics", "cknna,rv", "--bootstrap", 3, "--cache", tmp_path / "cache", "--quiet"]


def test_toy_family_hooks_equal_its_own_forward_written_out(tmp_path, toy_family):
    ckpt = load_checkpoint(toy_family.save_toy(tmp_path / "toy.pt", seed=1))
    assert ckpt.family.name == "toy-vit" and ckpt.convention.name == "toy-cosine"
    x0, ids, t = torch.rand(5, 3, 16, 16) * 2 - 1, torch.tensor([4, 8, 15, 16, 23]), 0.4
    got = capture_blocks(ckpt, x0, None, ids, [t], seed=3)[0]                    # (blocks 0..3, N, D)
    model = ckpt.model
    eps = seeded_noise(ids, (3, 16, 16), 3, salt=int(round(t * 1e6)))
    x_t = math.cos(math.pi / 2 * t) * x0 + math.sin(math.pi / 2 * t) * eps
    y, time = torch.full((5,), 10), torch.full((5,), 1000 * t)
    with torch.no_grad():
        tokens = model.patchify(x_t).flatten(2).transpose(1, 2)
        h = torch.cat([(model.label(y) + model.time(time[:, None] / 1000))[:, None], tokens], dim=1)
        expected = [h[:, 1:].mean(1)]
        for layer in model.layers:
            h = layer(h)[0]
            expected.append(h[:, 1:].mean(1))
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-6)


def test_analyze_and_compare_run_a_new_family_and_a_new_measure_given_as_plug_ins(tmp_path, cifar_dir,
                                                                                   toy_family):
    toy = toy_family.save_toy(tmp_path / "toy.pt", seed=1)
    sit = SiT(tiny_config(z_dims=[], encoder_depth=0))
    sit_path = save_checkpoint(tmp_path / "sit.pt", sit.config, randomize_(sit).state_dict(), meta={"mode": "pixels"})
    r = run_cli("analyze", toy, *common(tmp_path, cifar_dir), "--out", tmp_path / "a", env=PLUGINS)
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "a" / "results.csv").fillna({"encoder": ""})
    model = res[res["kind"] == "model"]
    assert set(model["metric"]) == {"cknna", "rv", "probe_top1", "self_cka_prev", "self_cka_tmin"}
    assert set(model["block"]) == {0, 1, 2, 3}
    untrained = res[(res["kind"] == "untrained") & (res["metric"] == "rv")]
    assert np.ptp(untrained["value"]) > 0            # no adaLN-Zero here: every untrained block is captured
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["checkpoints"]["toy"]["family"] == "toy-vit"

    # a cross-family compare: the same images and noise for both, each with its own untrained baseline
    r = run_cli("compare", sit_path, toy, *common(tmp_path, cifar_dir), "--out", tmp_path / "c", env=PLUGINS)
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "c" / "results.csv")
    assert {"sit", "toy"} <= set(res["checkpoint"])
    assert len(res.loc[res["kind"] == "untrained", "checkpoint"].unique()) == 2


def test_plug_ins_reach_the_command_line_choices_and_a_broken_one_is_one_line(tmp_path):
    r = run_cli("analyze", "--help", env=PLUGINS)
    assert "toy-cosine" in r.stdout and "rv" in r.stdout
    listed = run_cli("families", env=PLUGINS)
    assert listed.returncode == 0 and "toy-vit" in listed.stdout and "toy-cosine" in listed.stdout
    assert "toy-vit" not in run_cli("families").stdout and "cknna" in run_cli("families").stdout
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('nope')\n")
    r = run_cli("inspect", "x.pt", env={"REPA_PROBE_PLUGINS": str(bad)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "plug-in" in r.stderr and "nope" in r.stderr


def test_the_toy_measure_has_its_known_answers(toy_family):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 6, generator=g), torch.randn(50, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    rv = {k: metrics.alignment(b, x[None], ("rv",), clamp=False, normalize=False)["rv"][0] for k, x in
          (("a", a), ("a rotated", a @ q), ("a scaled", 3 * a), ("b", b))}
    assert rv["b"] == pytest.approx(1.0)
    assert rv["a rotated"] == pytest.approx(rv["a"]) and rv["a scaled"] == pytest.approx(rv["a"])
    direct = ((a.T.double() @ b.double()).norm() ** 2 / ((a.T @ a).double().norm() * (b.T @ b).double().norm()))
    assert rv["a"] == pytest.approx(float(direct))


def test_the_trainers_analysis_offers_the_new_measure(cifar_dir, tmp_path, toy_family):
    from test_train import analysis, tiny_config as train_config
    from repa_probe.train.trainer import train
    run = tmp_path / "run"
    train(train_config(cifar_dir / "train", run, 0.0, steps=2, analyze_every=2, log_every=2,
                       analysis=analysis(data=str(cifar_dir / "test"), n=40, ts=(0.5,), blocks=(1, 3),
                                         alignment_metrics=("rv",))))
    rows = [json.loads(line) for line in (run / "analysis.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} == {"rv", "probe_top1"} and all(0 <= r["value"] <= 1 for r in rows)


def test_a_figure_registered_twice_is_refused_and_families_lists_every_registry():
    """A page builder registered again under its name would give its pages twice: refused unless overwrite=True
    replaces it in place; `repa-probe families` lists spatial measures and report pages beside the rest."""
    from repa_probe.report.compose import FIGURES, curve_pages, register_figure
    before = dict(FIGURES)
    with pytest.raises(ValueError, match="already registered"):
        register_figure(curve_pages)
    register_figure(curve_pages, overwrite=True)
    assert FIGURES == before
    listed = run_cli("families").stdout
    assert "spatial measures" in listed and "lds" in listed
    assert all(f.__name__ in listed for f in FIGURES.values()) and listed.count("curve_pages") == 1


def test_a_registered_figure_appears_in_a_trajectory_report(tmp_path, cifar_dir):
    """One report path: a page builder registered once is a page of a trajectory over training steps too (real
    checkpoints analysed here), drawn from that report's own table; the analysis pages draw nothing there."""
    import matplotlib.pyplot as plt
    from pypdf import PdfReader
    from repa_probe.commands import trajectory
    from repa_probe.pipeline import AnalyzeConfig
    from repa_probe.report.compose import FIGURES, figure_name, register_figure
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    for i, step in enumerate((10, 20)):
        save_checkpoint(tmp_path / "run" / "checkpoints" / f"{step:07d}.pt", cfg,
                        randomize_(SiT(cfg), seed=i).state_dict(), meta={"step": step, "mode": "pixels"})
    drawn = {}

    def values_per_step(findings, table):
        """One page: how many values each training step has in the report."""
        drawn[findings.kind] = counts = table.groupby("step").size()
        fig, ax = plt.subplots()
        ax.bar(counts.index, counts.values)
        return [("values per step", fig)]

    before = list(FIGURES)
    register_figure(values_per_step)
    try:
        config = AnalyzeConfig(data=str(cifar_dir / "test"), n=40, ts=(0.0, 0.5), bootstrap=0, null=0,
                               self_similarity=False, cache=str(tmp_path / "cache"), quiet=True)    # the probe alone
        out = trajectory([str(tmp_path / "run")], config, str(tmp_path / "traj"))
    finally:
        FIGURES.pop(figure_name(values_per_step))
    assert list(FIGURES) == before
    pages = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pages == ["01_summary_1.png", "02_trajectory_probe_top1.png", "03_values_per_step.png"]
    assert len(PdfReader(out / "report.pdf").pages) == 3
    steps = pd.read_csv(out / "results.csv").groupby("step").size()
    assert list(drawn) == ["trajectory"] and drawn["trajectory"].to_dict() == steps.to_dict() == {10: 6, 20: 6}   # 3 blocks × 2 t


def test_a_registry_refuses_a_taken_name_and_orders_by_priority():
    """register() refuses a name that is taken unless overwrite=True; items come by priority, then in registration
    order; item assignment replaces on purpose and keeps the priority; copy() keeps kind, items and priorities."""
    from repa_probe.registry import Registry
    r = Registry("widget")
    r.register("a", 1)
    r.register("b", 2, priority=5)
    r.register("c", 3)
    assert list(r) == ["b", "a", "c"]
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        r.register("a", 9)
    r["b"] = 20
    assert list(r.items()) == [("b", 20), ("a", 1), ("c", 3)]
    copy = r.copy()
    copy.register("d", 4, priority=9)
    assert list(copy) == ["d", "b", "a", "c"] and list(r) == ["b", "a", "c"]
    del r["b"]
    assert "b" not in r.priority and list(r) == ["a", "c"]
