"""Attention-map alignment (attention.py): the maps are the ones the attention modules use (timm's own explicit
softmax; our SiT's output rebuilt from them), the scores have their closed forms, and `analyze --attention` gives
every block's values against a timm ViT, and a note for an encoder without attention."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import randomize_, run_cli, tiny_config
from repa_probe.attention import attention_scores, block_attention, encoder_attention, log_attention
from repa_probe.capture import make_dataset, noisy_input
from repa_probe.checkpoints import save_checkpoint
from repa_probe.data import to_model_space
from repa_probe.encoders import load_encoder
from repa_probe.families import load_checkpoint
from repa_probe.models import SiT


def test_a_timm_vit_map_is_its_own_softmax_head_averaged_with_the_prefix_dropped():
    encoder = load_encoder("test_vit", random_init=True)
    attn, prefix = encoder.model.blocks[-1].attn, encoder.num_prefix_tokens
    attn.fused_attn = False                        # timm then forms the probabilities itself, into attn_drop
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(3, prefix + 16, attn.qkv.in_features, generator=torch.Generator().manual_seed(0))
    try:
        attn(x)
    finally:
        handle.remove()
    probs = seen[0][:, :, prefix:, prefix:]
    want = (probs / probs.sum(-1, keepdim=True)).mean(1)
    assert prefix >= 1
    torch.testing.assert_close(log_attention(attn, x, prefix).exp(), want, atol=1e-6, rtol=1e-5)


def test_our_sit_attentions_output_is_proj_of_the_maps_times_v():
    """Explicit per-head maps P_h = softmax(q_norm(q_h)·k_norm(k_h)ᵀ/√d) reproduce the module's own (fused) output
    proj([P_h·v_h]_h), and log_attention is the log of their mean over heads."""
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    attn = randomize_(SiT(cfg), seed=1, std=0.3).blocks[0].attn
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(2))
    heads = attn.num_heads
    with torch.no_grad():
        attn.q_norm.weight.mul_(20), attn.k_norm.weight.mul_(20)      # sharp maps, so that the check has teeth
        q, k, v = attn.qkv(x).reshape(2, 64, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)      # (N, heads, T, T)
        torch.testing.assert_close(attn.proj((p @ v).transpose(1, 2).reshape(2, 64, 64)), attn(x), atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(log_attention(attn, x).exp(), p.mean(1), atol=1e-6, rtol=1e-5)
    assert p.mean(1).amax(-1).mean() > 0.2                   # far from uniform (1/64)


def test_scores_have_their_closed_forms():
    t, a = 5, 0.6
    p = torch.full((1, t, t), 1 / t, dtype=torch.float64)
    q = torch.full((t, t), (1 - a) / (t - 1), dtype=torch.float64)
    q.fill_diagonal_(a)
    kl, cos = attention_scores(p.log(), q[None].log())[0].tolist()
    assert kl == pytest.approx(-math.log(t) - (math.log(a) + (t - 1) * math.log((1 - a) / (t - 1))) / t, rel=1e-9)
    assert cos == pytest.approx((1 / t) / (math.sqrt(1 / t) * math.sqrt(a * a + (1 - a) ** 2 / (t - 1))), rel=1e-9)
    same = attention_scores(q[None].log(), q[None].log())[0]
    assert same[0].item() == pytest.approx(0, abs=1e-12) and same[1].item() == pytest.approx(1)


def test_analyze_reports_each_blocks_attention_against_a_vit_and_notes_an_encoder_without(tmp_path, cifar_dir):
    n, t = 24, 0.5
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    model = randomize_(SiT(cfg), seed=6, std=0.3)
    with torch.no_grad():
        for block in model.blocks:                                 # sharp maps, far from the encoder's
            block.attn.q_norm.weight.mul_(20), block.attn.k_norm.weight.mul_(20)
    path = save_checkpoint(tmp_path / "m.pt", cfg, model.state_dict(), meta={"mode": "pixels"})
    r = run_cli("analyze", path, "--data", cifar_dir / "test", "--n", n, "--t", t, "--encoder", "test_vit",
                "--encoder-random-init", "--encoder", "cifar-ssl-resnet", "--encoder-precision", "fp32", "--no-probe",
                "--attention", "--bootstrap", 3, "--null", 0, "--k", 5, "--batch-size", 10, "--cache",
                tmp_path / "cache", "--quiet", "--out", tmp_path / "out", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    rows = res[res["metric"].str.startswith("attention")]
    assert set(rows["encoder"]) == {"test_vit"} and set(rows["kind"]) == {"model", "untrained"}
    notes = json.loads((tmp_path / "out" / "summary.json").read_text())["notes"]
    assert any("cifar-ssl-resnet" in note and "attention" in note for note in notes)

    ckpt, encoder = load_checkpoint(path), load_encoder("test_vit", random_init=True)
    data = make_dataset(cifar_dir / "test", 16, n, 0, False)
    images, ids = torch.stack([data[i][0] for i in range(len(data))]), torch.as_tensor(data.ids)
    teacher = encoder_attention(encoder, images.float() / 255, 8)
    x_t, timestep = noisy_input(ckpt.convention, to_model_space(images, "pixels"), ids, t, 0)
    modules, maps = block_attention(ckpt, [1, 2, 3]), {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, b=b: maps.__setitem__(b, log_attention(mod, args[0])))
             for b, m in modules.items()]
    with torch.no_grad():
        ckpt.model.eval()(x_t, timestep, torch.full((n,), 10))
    for h in hooks:
        h.remove()
    for mi, metric in enumerate(("attention_kl", "attention_cos")):
        got = rows[(rows["kind"] == "model") & (rows["metric"] == metric)].sort_values("block")
        assert list(got["block"]) == [1, 2, 3]
        want = [attention_scores(teacher, maps[b])[:, mi].mean().item() for b in (1, 2, 3)]
        np.testing.assert_allclose(got["value"], want, rtol=1e-5)
        assert ((got["ci_low"] <= got["value"]) & (got["value"] <= got["ci_high"])).all()
    assert (rows.loc[rows["metric"] == "attention_kl", "value"] > 1e-2).all()    # maps far from equal
