"""A measure is one declaration: a new spatial measure (tests/toy_spatial.py) and a new token reduction with its
measure (tests/toy_reduction.py), each one file, reach analyze, compare, trajectory and the trainer's analysis
over a cache filled before they were registered, with the values of a direct computation; the store keys a
reduction by its name and version; metric parts are shared only on purpose."""
from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, hooked_tokens, randomize_, run_cli, tiny_config
from repa_probe import metrics as M
from repa_probe.capture import CaptureConfig, extract, make_dataset, noisy_input
from repa_probe.checkpoints import save_checkpoint
from repa_probe.data import to_model_space
from repa_probe.families import load_checkpoint
from repa_probe.models import SiT

PLUGINS = {"REPA_PROBE_PLUGINS": f"{REPO / 'tests' / 'toy_spatial.py'},{REPO / 'tests' / 'toy_reduction.py'}",
           "OMP_NUM_THREADS": "1"}
N, T = 24, 0.5


@pytest.fixture(scope="module")
def plugins():
    """Import both plug-in files for this module's in-process tests; take their registrations back after."""
    from repa_probe.measures import MEASURES
    from repa_probe.reductions import REDUCTIONS
    from repa_probe.spatial import SPATIAL_METRICS
    spatial, reduction = importlib.import_module("toy_spatial"), importlib.import_module("toy_reduction")
    yield spatial, reduction
    SPATIAL_METRICS.pop("neighbour_cos"), REDUCTIONS.pop("max_norm"), MEASURES.pop("max token norm")
    sys.modules.pop("toy_spatial"), sys.modules.pop("toy_reduction")


def direct(path, data_dir, n: int = N, t: float = T, weights: str | None = None) -> dict[str, np.ndarray]:
    """Both plug-ins' values per block [B] at t, from a SiT's own tokens (our hooks, not capture's)."""
    sys.path.insert(0, str(REPO / "tests"))
    from toy_spatial import neighbour_cosine
    ckpt = load_checkpoint(path, **({"weights": weights} if weights else {}))
    data = make_dataset(data_dir, 16, n, 0, False)
    images, ids = torch.stack([data[i][0] for i in range(len(data))]), torch.as_tensor(data.ids)
    x_t, timestep = noisy_input(ckpt.convention, to_model_space(images, "pixels"), ids, t, 0)
    tokens, _ = hooked_tokens(ckpt.model.eval(), x_t, timestep, torch.full((len(ids),), 10))
    return {"neighbour_cos": np.array([neighbour_cosine(h, (8, 8)).mean().item() for h in tokens]),
            "max_token_norm": np.array([h.float().norm(dim=-1).amax(1).double().mean().item() for h in tokens])}


def check(res: pd.DataFrame, want: dict[str, np.ndarray], **where) -> None:
    for metric, values in want.items():
        rows = res[(res["metric"] == metric) & (res["kind"] == "model")]
        for k, v in where.items():
            rows = rows[rows[k] == v]
        assert len(rows), metric
        np.testing.assert_allclose(rows["value"], values[rows["block"]], rtol=1e-5, atol=1e-6)


def test_plug_ins_reach_analyze_compare_and_trajectory_over_a_warm_cache(tmp_path, cifar_dir):
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    paths = [save_checkpoint(tmp_path / "run" / f"{step:07d}.pt", cfg, randomize_(SiT(cfg), seed=step).state_dict(),
                             meta={"step": step, "mode": "pixels"}) for step in (1, 2)]
    common = ["--data", cifar_dir / "test", "--n", N, "--t", T, "--encoder", "test_vit", "--encoder-random-init",
              "--no-probe", "--spatial", "--bootstrap", 2, "--null", 0, "--k", 5, "--cache", tmp_path / "cache",
              "--quiet"]
    r = run_cli("analyze", paths[0], *common, "--out", tmp_path / "cold", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr                                   # the cache, filled without the plug-ins
    cold = pd.read_csv(tmp_path / "cold" / "results.csv")
    assert not cold["metric"].isin(["neighbour_cos", "max_token_norm"]).any()
    want = [direct(p, cifar_dir / "test") for p in paths]

    r = run_cli("analyze", paths[0], *common, "--out", tmp_path / "a", env=PLUGINS)
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "a" / "results.csv")
    check(res, want[0])
    assert {"model", "untrained", "raw-thumbnail", "encoder"} <= set(res.loc[res["metric"] == "neighbour_cos", "kind"])
    pd.testing.assert_frame_equal(cold, res[res["metric"].isin(set(cold["metric"]))].reset_index(drop=True))

    r = run_cli("compare", *paths, *common, "--out", tmp_path / "c", env=PLUGINS)
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "c" / "results.csv")
    for path, w in zip(paths, want):
        check(res, w, checkpoint=path.stem)

    r = run_cli("trajectory", tmp_path / "run" / "*.pt", *common, "--source", "checkpoints", "--out", tmp_path / "t",
                env=PLUGINS)
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "t" / "results.csv")
    for step, w in zip((1, 2), want):
        check(res, {m: v for m, v in w.items()}, step=step)


def test_changing_a_reductions_version_recomputes_that_array_only(tmp_path, cifar_dir, plugins):
    _, toy = plugins
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    path = save_checkpoint(tmp_path / "m.pt", cfg, randomize_(SiT(cfg), seed=3).state_dict(), meta={"mode": "pixels"})
    kw = dict(n=8, cache_dir=tmp_path / "cache", quiet=True)
    plain = extract(str(path), str(cifar_dir / "test"), CaptureConfig(ts=(T,)), **kw)
    config = CaptureConfig(ts=(T,), reductions=("max_norm", "spatial"))
    first = extract(str(path), str(cifar_dir / "test"), config, **kw)
    assert first.computed == 2                             # one batch: the two reductions; the pooled part is cached
    assert extract(str(path), str(cifar_dir / "test"), config, **kw).computed == 0
    try:
        toy.VERSION = "2"
        again = extract(str(path), str(cifar_dir / "test"), config, **kw)
    finally:
        toy.VERSION = "1"
    assert again.computed == 1                             # that reduction's part, nothing else
    np.testing.assert_array_equal(np.asarray(again.reduced["max_norm"]["blocks"]),
                                  np.asarray(first.reduced["max_norm"]["blocks"]))
    assert np.asarray(first.reduced["max_norm"]["blocks"]).shape == (1, 4, 8, 1)
    np.testing.assert_array_equal(np.asarray(again.blocks), np.asarray(plain.blocks))


def test_the_trainers_analysis_reports_both_plug_ins(cifar_dir, tmp_path, plugins):
    from test_train import analysis, tiny_config as train_config
    from repa_probe.train.trainer import train
    run = tmp_path / "run"
    train(train_config(cifar_dir / "train", run, 0.0, steps=2, analyze_every=2, log_every=2,
                       analysis=analysis(data=str(cifar_dir / "test"), n=40, ts=(T,), blocks=(1, 3), spatial=True)))
    rows = pd.DataFrame([json.loads(line) for line in (run / "analysis.jsonl").read_text().splitlines()])
    rows = rows[rows["step"] == 2].assign(kind="model")
    want = direct(run / "checkpoints" / "0000002.pt", cifar_dir / "test", n=40, weights="ema")
    check(rows, want)
    assert set(rows.loc[rows["metric"] == "max_token_norm", "block"]) == {1, 3}


def test_metric_parts_are_shared_only_on_purpose():
    """A metric that reuses the part name "centred" with its own prepare gets its own part, not CKA's; one that
    declares CKA's part (the same name and functions) shares it."""
    def own(x, k):
        return x.double()

    def rv(a, b, shared):
        return float((a.T @ b).square().sum() / ((a.T @ a).norm() * (b.T @ b).norm()))

    cka = M.METRICS["cka"]
    M.register_metric(M.Metric("rv_centred", "RV", "centred", own, rv))
    M.register_metric(M.Metric("cka_again", "CKA again", "centred", cka.prepare, cka.score))
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(30, 5, generator=g), torch.randn(30, 4, generator=g)
        a, b = (M.FeatureKernel.build(z, metrics=("cka", "rv_centred", "cka_again")) for z in (x, y))
        assert len(a.parts) == 2
        assert isinstance(a.parts[M.METRICS["rv_centred"].part_key], torch.Tensor)
        got = M.pair_scores(a, b, ("cka", "rv_centred", "cka_again"))
        xs, ys = (M.prepare_features(z) for z in (x, y))
        assert got["rv_centred"] == pytest.approx(rv(xs.double(), ys.double(), {}))
        assert got["cka_again"] == got["cka"] != got["rv_centred"]
    finally:
        M.METRICS.pop("rv_centred"), M.METRICS.pop("cka_again")
