"""A REG checkpoint's class token as a row of its own (kind "class-token"), on real CIFAR-10 images and tiny SiTs:
its features are the class token of the model's own forward (hooks on the whole sequence), the store never serves
the image tokens for it or back, the model's rows are what they are without it, a model without a class token gets
none, and analyze, compare (REG against a plain SiT) and trajectory run end to end with it."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from pypdf import PdfReader

from conftest import hooked_tokens, randomize_, run_cli, tiny_config
from repa_probe import metrics as M
from repa_probe.capture import CaptureConfig, capture_in_memory, extract, make_dataset, noisy_input
from repa_probe.checkpoints import save_checkpoint
from repa_probe.data import to_model_space
from repa_probe.families import load_checkpoint
from repa_probe.families.sit import as_checkpoint
from repa_probe.findings.baselines import baseline_gaps
from repa_probe.models import SiT
from repa_probe.pipeline import CLASS_TOKEN, AnalyzeConfig, MemorySource, Pipeline, run
from repa_probe.report.compose import summarise

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODER = "cifar-ssl-resnet"             # shipped weights; its 8 × 8 grid is the tiny SiT's
TS = (0.0, 0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A REG run (steps 10 and 20, a 12-d class token) and a plain SiT of the same size."""
    d = tmp_path_factory.mktemp("class_token")
    reg, plain = tiny_config(cls_token_dim=12), tiny_config()
    for step, seed in ((10, 3), (20, 4)):
        save_checkpoint(d / "reg" / "checkpoints" / f"{step:07d}.pt", reg, randomize_(SiT(reg), seed).state_dict(),
                        meta={"step": step, "mode": "pixels", "convention": "repa"})
    save_checkpoint(d / "plain.pt", plain, randomize_(SiT(plain), 5).state_dict(),
                    meta={"step": 10, "mode": "pixels", "convention": "repa"})
    return d


def reference(ckpt, images: torch.Tensor, ids: torch.Tensor, t: float, seed: int = 0):
    """(class token [depth + 1, N, D], mean of the image tokens [depth + 1, N, D]) of the model's own forward at
    t, read by hooks on the whole sequence entering block 1 and leaving each block (null class labels)."""
    x0 = to_model_space(images, "pixels") if images.dtype == torch.uint8 else images
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, t, seed)
    null = torch.full((len(x0),), ckpt.config.num_classes)
    tokens, _ = hooked_tokens(ckpt.model, x_t, timestep, null)
    return torch.stack([h[:, 0] for h in tokens]), torch.stack([h[:, 1:].mean(1) for h in tokens])


def test_the_class_token_view_gives_the_class_token_entering_block_1_and_after_every_block():
    model = randomize_(SiT(tiny_config(cls_token_dim=12)), seed=3).eval()
    ckpt = as_checkpoint(model)
    view = ckpt.family.class_token(ckpt)
    assert view.model is model and view.family.tokens == "class token" and ckpt.family.tokens == "image"
    x0, ids = torch.rand(5, 3, 16, 16) * 2 - 1, torch.arange(5)
    for t in TS:
        (token,), (image,) = (capture_in_memory(c, x0, None, ids, [t], seed=0)[0] for c in (view, ckpt))
        cls_ref, image_ref = reference(ckpt, x0, ids, t)
        assert token.shape == (4, 5, 64)
        torch.testing.assert_close(token, cls_ref, rtol=0, atol=0)
        torch.testing.assert_close(image, image_ref, rtol=1e-6, atol=1e-6)      # the image tokens as before
    with torch.no_grad():   # block 0: the class token fed 0, embedded, at its zero position
        assert not model.pos_embed[0, 0].any()
        torch.testing.assert_close(token[0], model.wg_norm(model.cls_projectors2(torch.zeros(5, 12))))
    plain = as_checkpoint(randomize_(SiT(tiny_config()), seed=3))
    assert plain.family.class_token(plain) is None


def test_the_store_never_serves_the_image_tokens_for_the_class_token_or_back(files, cifar_dir, tmp_path):
    ckpt = load_checkpoint(files / "reg/checkpoints/0000010.pt")
    view = ckpt.family.class_token(ckpt)
    dataset = make_dataset(cifar_dir / "test", 16, n=12)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ids = torch.as_tensor(dataset.ids)
    config = CaptureConfig(ts=TS)
    first = {name: extract(c, dataset, config, cache_dir=tmp_path, quiet=True)
             for name, c in (("image", ckpt), ("class token", view))}
    again = {name: extract(c, dataset, config, cache_dir=tmp_path, quiet=True)
             for name, c in (("class token", view), ("image", ckpt))}
    assert first["image"].computed > 0 and first["class token"].computed > 0          # two entries
    assert again["image"].computed == again["class token"].computed == 0               # each served from its own
    for ti, t in enumerate(TS):
        cls_ref, image_ref = reference(ckpt, images, ids, t)
        for feats in (first, again):
            np.testing.assert_allclose(np.asarray(feats["class token"].blocks[ti]), cls_ref.numpy(), atol=1e-6)
            np.testing.assert_allclose(np.asarray(feats["image"].blocks[ti]), image_ref.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def analysed(files, cifar_dir, tmp_path_factory):
    """The REG checkpoint and the plain one analysed together (the store), and the REG one, without baselines, alone
    without its class token (a fresh store) and in memory (MemorySource)."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = AnalyzeConfig(data=str(cifar_dir / "test"), encoders=[ENCODER], n=40, ts=TS, k=5, bootstrap=3, null=2,
                        alignment_metrics=("cknna", "cka"), quiet=True, cache=str(cache))
    reg, plain = (load_checkpoint(p) for p in (files / "reg/checkpoints/0000010.pt", files / "plain.pt"))
    pipeline = Pipeline(cfg)
    results = run([reg, plain], ["reg", "plain"], cfg, pipeline)
    bare = dataclasses.replace(cfg, baselines=False)
    alone = Pipeline(dataclasses.replace(bare, cache=str(cache / "alone"))).analyse(reg, "reg", class_token=False)
    memory = Pipeline(bare, source=MemorySource).analyse(reg, "reg")
    return pipeline, results, reg, alone, memory


def rows(analysed_sources, kind: str) -> pd.DataFrame:
    table = pd.DataFrame([r for a in analysed_sources if a.kind == kind for c in a.curves for r in c.rows()])
    return table.sort_values(["metric", "encoder", "t", "block"]).reset_index(drop=True)


def test_a_reg_checkpoint_gets_one_class_token_row_whose_alignment_is_its_class_tokens(analysed):
    pipeline, results, reg, _, _ = analysed
    table = results.table()
    tokens = table[table["kind"] == "class-token"]
    assert set(tokens["checkpoint"]) == {"reg" + CLASS_TOKEN}                    # none for the plain SiT
    assert [a.name for a in results.models] == ["reg", "plain"]
    # from block 1: entering it the token is one vector for every image (linear CKA of it would divide by 0)
    assert set(tokens["block"]) == {1, 2, 3} and set(tokens["t"]) == set(TS)
    assert {"cknna", "cka", "probe_top1"} <= set(tokens["metric"]) and np.isfinite(tokens["value"]).all()
    # its CKNNA is that of the class token of the model's own forward with the encoder's features
    align = pipeline.datasets(reg)[0]
    target = pipeline.target(pipeline.encoders[0], align, reg.anatomy.grid)
    images = torch.stack([align[i][0] for i in range(len(align))])
    for t in TS:
        cls_ref, image_ref = reference(reg, images, torch.as_tensor(align.ids), t)
        for b in range(1, 4):
            at = (table["metric"] == "cknna") & (table["t"] == t) & (table["block"] == b)
            (value,) = table.loc[at & (table["kind"] == "class-token"), "value"]
            (model,) = table.loc[at & (table["checkpoint"] == "reg"), "value"]
            assert value == pytest.approx(M.cknna(cls_ref[b].numpy(), target.features, k=5), abs=1e-6)
            assert model == pytest.approx(M.cknna(image_ref[b].numpy(), target.features, k=5), abs=1e-5)


def test_the_models_rows_are_unchanged_and_memory_gives_the_stores_class_token_rows(analysed):
    _, results, _, alone, memory = analysed
    assert [a.kind for a in alone] == ["model"] and [a.kind for a in memory] == ["model", "class-token"]
    with_token = rows([a for a in results.analysed if a.name == "reg"], "model")
    pd.testing.assert_frame_equal(with_token, rows(alone, "model"))
    pd.testing.assert_frame_equal(rows(results.analysed, "class-token"), rows(memory, "class-token"),
                                  check_exact=False, atol=1e-5)


def test_the_class_token_is_no_baseline_nor_a_checkpoint_to_compare(analysed):
    _, results, _, _, _ = analysed
    gaps = baseline_gaps(results)
    assert len(gaps) and set(gaps["checkpoint"]) == {"reg", "plain"}
    assert "class-token" not in set(gaps["kind"]) and not gaps["baseline"].str.contains(CLASS_TOKEN).any()
    summary, tables = summarise(results)
    assert set(summary["baseline_kinds"]) == {"untrained", "raw-input", "raw-thumbnail"}
    assert {r["a"] for r in summary["compare"]} == {"reg"} and {r["b"] for r in summary["compare"]} == {"plain"}
    assert set(tables["deltas"]["b"]) == {"plain"}
    assert {r["checkpoint"] for r in summary["peaks"]} == {"reg", "plain"}
    assert any(line.startswith("reg" + CLASS_TOKEN + ", ") for line in summary["details"])
    assert not any(CLASS_TOKEN in s for s in summary["overview"])


def cli(files, cifar_dir, command: str, *models, out) -> pd.DataFrame:
    r = run_cli(command, *models, "--data", cifar_dir / "test", "--n", "40", "--t", "0.5", "--encoder", ENCODER,
                "--k", "5", "--bootstrap", "3", "--cache", files / "cli-cache", "--quiet", "--out", out)
    assert r.returncode == 0, r.stderr
    assert len(PdfReader(out / "report.pdf").pages) == len(list((out / "figures").glob("*.png")))
    return pd.read_csv(out / "results.csv")


def test_analyze_and_compare_a_reg_checkpoint_on_the_command_line(files, cifar_dir, tmp_path):
    reg = files / "reg/checkpoints/0000010.pt"
    res = cli(files, cifar_dir, "analyze", reg, out=tmp_path / "a")
    assert set(res.loc[res["kind"] == "class-token", "checkpoint"]) == {"reg/0000010" + CLASS_TOKEN}
    assert set(res["kind"]) == {"model", "class-token", "untrained", "raw-input", "raw-thumbnail"}
    both = cli(files, cifar_dir, "compare", reg, files / "plain.pt", out=tmp_path / "ab")
    assert set(both.loc[both["kind"] == "class-token", "checkpoint"]) == {"reg/0000010" + CLASS_TOKEN}
    # the class token's rows are the same numbers in both reports (the same images, noise and n)
    key = ["checkpoint", "metric", "block"]
    a, b = (x[x["kind"] == "class-token"].sort_values(key).reset_index(drop=True) for x in (res, both))
    pd.testing.assert_frame_equal(a[key + ["value"]], b[key + ["value"]])
    comp, deltas = pd.read_csv(tmp_path / "ab/compare.csv"), pd.read_csv(tmp_path / "ab/deltas.csv")
    assert set(comp["a"]) == {"reg/0000010"} and set(comp["b"]) == set(deltas["b"]) == {"plain"}
    gaps = pd.read_csv(tmp_path / "ab/baseline_gaps.csv")
    assert set(gaps["checkpoint"]) == {"reg/0000010", "plain"} and "class-token" not in set(gaps["kind"])
    summary = json.loads((tmp_path / "ab/summary.json").read_text())
    assert set(summary["baseline_kinds"]) == {"untrained", "raw-input", "raw-thumbnail"}


def test_trajectory_over_a_reg_run_keeps_the_models_rows(files, cifar_dir, tmp_path):
    res = cli(files, cifar_dir, "trajectory", files / "reg", out=tmp_path / "traj")
    assert sorted(res["step"].unique()) == [10, 20] and set(res["kind"]) == {"model"}
    assert set(res["block"]) == {1, 2, 3} and not res["checkpoint"].str.contains(CLASS_TOKEN).any()
