"""Patch-level alignment (tokens.py): the seeded token sample, capture of each block's token at it, the
projector cosine and token CKNNA in analyze, each checked against a direct computation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import hooked_tokens, randomize_, tiny_config
from repa_probe.capture import capture_batch, make_dataset, noisy_input
from repa_probe.families.sit import as_checkpoint
from repa_probe.models import SiT
from repa_probe.pipeline import display_scale
from repa_probe.tokens import at_cells, sample_cells

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cells_depend_only_on_seed_and_image_id():
    ids = torch.arange(3000)
    cells = sample_cells(ids, 64, seed=0)
    assert cells.dtype == torch.long and cells.min() >= 0 and cells.max() < 64
    perm = torch.randperm(3000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_cells(ids[perm], 64, seed=0), cells[perm])          # any batch, any order
    assert torch.equal(sample_cells(ids[:10], 64, seed=0), cells[:10])
    assert (sample_cells(ids, 64, seed=1) != cells).float().mean() > 0.9          # another seed, other cells
    counts = torch.bincount(cells, minlength=64).double()                        # uniform over the grid
    chi2 = ((counts - 3000 / 64) ** 2 / (3000 / 64)).sum().item()
    assert chi2 < 120                                                            # 63 dof: p ≈ 3e-5


@pytest.mark.parametrize("projector", ["mlp", "conv"])
def test_capture_keeps_each_blocks_token_at_the_cell_and_the_projector_output(projector):
    model = randomize_(SiT(tiny_config(projector=projector, encoder_depth=2)), seed=3).eval()
    ckpt = as_checkpoint(model, "repa")
    x0, ids = torch.rand(5, 3, 16, 16) * 2 - 1, torch.tensor([4, 17, 2, 99, 1000])
    feats, raw = capture_batch(ckpt, x0, None, ids, 0.25, seed=7, reductions=("tokens", "projected"))
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.25, 7)
    tokens, (_, zs) = hooked_tokens(model, x_t, timestep, torch.full((5,), 10), return_zs=True)
    cells = sample_cells(ids, 64, seed=7)
    rows = torch.arange(5)
    torch.testing.assert_close(raw["tokens"], torch.stack([h[rows, cells] for h in tokens]), rtol=0, atol=0)
    torch.testing.assert_close(raw["projected0"], zs[0][rows, cells], rtol=0, atol=0)
    assert feats.shape == (4, 5, 64)                                             # pooled features unchanged
    _, plain = capture_batch(ckpt, x0, None, ids, 0.25, seed=7)
    assert "tokens" not in plain and "projected0" not in plain


def _direct_projector_cosine(model, data, encoder, ts, seed, alpha=None):
    """Mean over images of cos(projector output, target) at each image's cell, from full token maps."""
    from repa_probe.data import to_model_space
    images = torch.stack([data[i][0] for i in range(len(data))])
    ids = torch.as_tensor(data.ids)
    z = encoder.encode(images.float() / 255, 8)[0]
    if alpha is not None:
        z = (z - alpha * z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)      # iREPA, by hand
    cells = sample_cells(ids, 64, seed)
    ckpt = as_checkpoint(model, "repa")
    out = []
    for t in ts:
        x_t, timestep = noisy_input(ckpt.convention, to_model_space(images, "pixels"), ids, t, seed)
        with torch.no_grad():
            _, zs = model(x_t, timestep, torch.full((len(ids),), 10), return_zs=True)
        out.append(torch.nn.functional.cosine_similarity(at_cells(zs[0], cells).double(),
                                                         at_cells(z, cells).double(), dim=-1).mean().item())
    return np.array(out)


@pytest.mark.parametrize("spatial_norm", ["none", "zscore"])
def test_analyze_tokens_gives_token_alignment_and_projector_cosine(tmp_path, cifar_dir, spatial_norm):
    import repa_probe
    from repa_probe import metrics as M
    from repa_probe.capture import CaptureConfig
    from repa_probe.checkpoints import save_checkpoint
    from repa_probe.encoders import load_encoder
    from repa_probe.report.compose import summarise
    assert "tokens" not in CaptureConfig().key()                # caches made without --tokens stay valid
    cfg = tiny_config(z_dims=[256], encoder_depth=2)             # one projector, toward cifar-ssl-resnet (256-d)
    model = randomize_(SiT(cfg), seed=1).eval()
    meta = {"step": 1, "encoders": ["cifar-ssl-resnet"], "spatial_norm": spatial_norm, "zscore_alpha": 0.6}
    save_checkpoint(tmp_path / "a.pt", cfg, model.state_dict(), meta=meta)
    ts = [0.0, 0.5]
    a = repa_probe.analyze([str(tmp_path / "a.pt")] * 2, names=["a", "b"], data=str(cifar_dir / "test"),
                           encoders=["cifar-ssl-resnet"], ts=ts, n=40, bootstrap=5, null=2, k=5, quiet=True,
                           cache=str(tmp_path / "c"), tokens=True, weights="model")
    t = a.table
    proj = t[t["metric"] == "proj_cosine"]
    assert set(proj["checkpoint"]) == {"a", "b"} and set(proj["block"]) == {2} and len(proj) == 4
    data = make_dataset(str(cifar_dir / "test"), 16, 40, 0, False)
    encoder = load_encoder("cifar-ssl-resnet", precision="auto")      # chooses on its first 8 images, as analyze
    want = _direct_projector_cosine(model, data, encoder, ts, seed=0,
                                    alpha=0.6 if spatial_norm == "zscore" else None)
    got = proj[proj["checkpoint"] == "a"].sort_values("t")["value"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    inside = (proj["ci_low"] <= proj["value"]) & (proj["value"] <= proj["ci_high"])
    assert inside.all()

    token = t[t["metric"] == "token_cknna"]
    assert set(token["kind"]) == {"model", "untrained"} and len(token[token["checkpoint"] == "a"]) == 2 * 4
    # token CKNNA of block 1 at t = 0 equals CKNNA of the hooked block-1 tokens and the encoder's, at the cells
    from repa_probe.data import to_model_space
    images = torch.stack([data[i][0] for i in range(len(data))])
    ids = torch.as_tensor(data.ids)
    ckpt = as_checkpoint(model, "repa")
    _, raw = capture_batch(ckpt, to_model_space(images, "pixels"), None, ids, 0.0, seed=0, reductions=("tokens",))
    z = at_cells(encoder.encode(images.float() / 255, 8)[0], sample_cells(ids, 64, 0))
    direct = M.cknna(raw["tokens"][1].numpy(), z.numpy(), k=5)
    value = token[(token["checkpoint"] == "a") & (token["block"] == 1) & (token["t"] == 0)]["value"].item()
    assert value == pytest.approx(direct, abs=1e-6)
    deltas = summarise(a.results)[1]["deltas"]                  # a self-compare: every paired delta is 0
    tok = deltas[deltas["metric"].isin(["token_cknna", "proj_cosine"])]
    assert len(tok) and (tok["delta"] == 0).all()
    # the projector cosine, at one block, is drawn against t (not as a one-point curve per t)
    import matplotlib.pyplot as plt
    from repa_probe.findings import analysis_findings
    from repa_probe.report.compose import curve_pages
    pages = dict(curve_pages(analysis_findings(a.results, t, pages=False), t))
    assert not any(name.startswith("curves proj_cosine") for name in pages)
    line = pages["over t proj_cosine cifar-ssl-resnet"].axes[0].lines[0]
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), ts)
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), got * display_scale("proj_cosine"))
    plt.close("all")


def test_probe_images_are_captured_without_the_per_image_measures(tmp_path, cifar_dir):
    """--spatial/--tokens are measured on the alignment images only: the probe's own train images are captured
    plainly (one cache entry without them), and the probe's numbers equal those of a run without the flags."""
    import json

    import repa_probe
    from repa_probe.checkpoints import save_checkpoint
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    save_checkpoint(tmp_path / "a.pt", cfg, randomize_(SiT(cfg), seed=4).state_dict(), meta={"step": 1})
    kw = dict(data=str(cifar_dir / "test"), encoders=["cifar-ssl-resnet"], ts=[0.5], n=30, bootstrap=0, null=0,
              k=5, quiet=True, probe_train=str(cifar_dir / "train"), probe_test=str(cifar_dir / "test"),
              probe_n_train=40, probe_n_test=30)
    measured = repa_probe.analyze(str(tmp_path / "a.pt"), cache=str(tmp_path / "c1"), spatial=True, tokens=True, **kw)
    plain = repa_probe.analyze(str(tmp_path / "a.pt"), cache=str(tmp_path / "c2"), **kw)
    probe = [t[t["metric"] == "probe_top1"].reset_index(drop=True) for t in (measured.table, plain.table)]
    assert len(probe[0]) > 0
    pd.testing.assert_frame_equal(probe[0], probe[1])
    parts = [json.loads(m.read_text())["parts"] for m in (tmp_path / "c1" / "blocks").glob("*/manifest.json")]
    reduced = sorted(sorted({p.split("+")[1].rsplit("-", 1)[0] for p in ps if "+" in p}) for ps in parts)
    # model and untrained: the alignment images with their token reductions, the probe's train images plain
    assert reduced == [[], [], ["projected", "spatial", "tokens"], ["projected", "spatial", "tokens"]]
