"""Checkpoint formats round-trip with identical outputs; bad files give one clear error."""
from __future__ import annotations

import argparse
import random
from dataclasses import replace

import pytest
import torch
import torchvision

from conftest import randomize_, run_cli, tiny_config
from repa_probe.checkpoints import save_checkpoint
from repa_probe.families import load_checkpoint
from repa_probe.errors import UserError
from repa_probe.models import SiT, model_config

CONFIGS = {
    "S/2": model_config("SiT-S/2", input_size=16, num_classes=10),
    "B/4": model_config("SiT-B/4", input_size=16, num_classes=10),
    "tiny": tiny_config(),
}


def outputs(model: SiT, cfg, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return model.eval()(x, torch.tensor([0.3, 0.9]), torch.tensor([1, cfg.num_classes]))


def build(cfg, seed=0):
    return randomize_(SiT(cfg), seed)


def official_sd(cfg):
    """The official layout: bare state dict with learn-sigma outputs and no projectors."""
    cfg = replace(cfg, learn_sigma=True, z_dims=[], projector_dim=2048, encoder_depth=0)
    model = build(cfg)
    return cfg, model, model.state_dict()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("convention", ["dit", "sit"])
def test_official_bare_state_dict_round_trips(tmp_path, name, convention):
    cfg, model, sd = official_sd(CONFIGS[name])
    assert sd["final_layer.linear.weight"].shape[0] == 2 * cfg.patch_size ** 2 * cfg.in_channels
    path = tmp_path / "ema.pt"
    torch.save(sd, path)
    ck = load_checkpoint(path, convention=convention)
    assert ck.config == cfg
    assert ck.provenance.format == f"{convention}-official"
    assert ck.provenance.convention_source == "flag"
    torch.testing.assert_close(outputs(ck.model, cfg), outputs(model, cfg), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_repa_last_pt_round_trips_with_projectors(tmp_path, name):
    base = CONFIGS[name]
    # REPA's released file does not record the aligned depth: it is the size's REPA default.
    depth = {"S/2": 4, "B/4": 4, "tiny": 1}[name]
    cfg = replace(base, learn_sigma=False, z_dims=[768] if name != "tiny" else [32], encoder_depth=depth)
    model = build(cfg)
    path = tmp_path / "last.pt"
    torch.save(model.state_dict(), path)
    ck = load_checkpoint(path)
    assert ck.config == cfg
    assert (ck.provenance.format, ck.provenance.convention) == ("repa-last", "repa")
    torch.testing.assert_close(outputs(ck.model, cfg), outputs(model, cfg), rtol=0, atol=1e-6)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.tensor([0.1, 0.5]), torch.tensor([0, 1])
    (_, zs_a), (_, zs_b) = ck.model(x, t, y, return_zs=True), model.eval()(x, t, y, return_zs=True)
    assert zs_a[0].shape == (2, cfg.num_patches, cfg.z_dims[0])
    torch.testing.assert_close(zs_a[0], zs_b[0], rtol=0, atol=1e-6)


def repa_training_dict(cfg, legacy=False):
    model, ema = build(cfg, seed=0), build(cfg, seed=1)
    args = argparse.Namespace(model="SiT-B/2", encoder_depth=cfg.encoder_depth, enc_type="dinov2-vit-b",
                              proj_coeff=0.5, qk_norm=cfg.qk_norm, resolution=256, seed=0)
    sd_model, sd_ema = model.state_dict(), ema.state_dict()
    if legacy:
        def rename(sd):
            out = {}
            for k, v in sd.items():
                parts = k.split(".")
                if parts[0] == "blocks" and int(parts[1]) >= cfg.encoder_depth:
                    k = ".".join(["decoder_blocks", str(int(parts[1]) - cfg.encoder_depth), *parts[2:]])
                out[k] = v
            return out
        sd_model, sd_ema = rename(sd_model), rename(sd_ema)
    opt = torch.optim.AdamW(model.parameters()).state_dict()
    return model, ema, {"model": sd_model, "ema": sd_ema, "opt": opt, "args": args, "steps": 4000}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("legacy", [False, True])
def test_repa_training_dict_loads_ema_by_default(tmp_path, name, legacy):
    cfg = replace(CONFIGS[name], learn_sigma=False, z_dims=[64], projector_dim=96, encoder_depth=2)
    model, ema, ckpt = repa_training_dict(cfg, legacy)
    path = tmp_path / "0004000.pt"
    torch.save(ckpt, path)
    ck = load_checkpoint(path)
    assert ck.config == cfg
    assert (ck.provenance.format, ck.provenance.step, ck.provenance.weights) == ("repa-train", 4000, "ema")
    assert ck.provenance.encoders == ["dinov2-vit-b"] and ck.provenance.repa_coeff == 0.5
    assert any("legacy" in w for w in ck.provenance.warnings) == legacy
    torch.testing.assert_close(outputs(ck.model, cfg), outputs(ema, cfg), rtol=0, atol=1e-6)
    raw = load_checkpoint(path, weights="model")
    torch.testing.assert_close(outputs(raw.model, cfg), outputs(model, cfg), rtol=0, atol=1e-6)


def test_repa_args_num_heads_wins_over_the_width_rule(tmp_path):
    """Without qk-norm the heads are invisible in the shapes; our export writes args.num_heads."""
    cfg = tiny_config(qk_norm=False, num_heads=2, hidden_size=96, z_dims=[32], encoder_depth=1)
    _, ema, ckpt = repa_training_dict(cfg)
    ckpt["args"].num_heads = 2
    torch.save(ckpt, tmp_path / "custom.pt")
    ck = load_checkpoint(tmp_path / "custom.pt")
    assert ck.config.num_heads == 2 and ck.config == cfg
    torch.testing.assert_close(outputs(ck.model, cfg), outputs(ema, cfg), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_format_round_trips_config_and_meta(tmp_path, name, suffix):
    cfg = CONFIGS[name]
    model = build(cfg)
    meta = {"step": 123, "encoders": ["cifar-ssl-vit"], "repa_coeff": 0.5, "mode": "pixels"}
    path = save_checkpoint(tmp_path / f"ckpt{suffix}", cfg, model.state_dict(), meta=meta)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    ck = load_checkpoint(path)
    assert ck.config == cfg and ck.meta["mode"] == "pixels"
    assert (ck.provenance.format, ck.provenance.step, ck.provenance.convention) == ("repa-probe", 123, "repa")
    assert ck.provenance.convention_source == "checkpoint"
    torch.testing.assert_close(outputs(ck.model, cfg), outputs(model, cfg), rtol=0, atol=1e-6)


def test_official_file_names_set_the_convention(tmp_path):
    _, _, sd = official_sd(tiny_config(qk_norm=False, num_heads=1))
    for fname, conv in [("DiT-XL-2-256x256.pt", "dit"), ("SiT-XL-2-256x256.pt", "sit")]:
        torch.save(sd, tmp_path / fname)
        prov = load_checkpoint(tmp_path / fname, heads=1).provenance
        assert (prov.convention, prov.convention_source) == (conv, "file name")
    torch.save(sd, tmp_path / "renamed.pt")
    prov = load_checkpoint(tmp_path / "renamed.pt", heads=1).provenance
    assert prov.convention_source == "assumed"
    assert any("ASSUMED" in w for w in prov.warnings)


def test_heads_inferred_from_standard_size_table_for_xl():
    """XL has 16 heads of width 72: not width/64. Inference must use the size table."""
    from repa_probe.families.sit import config_from_state_dict
    with torch.device("meta"):
        sd = SiT(model_config("DiT-XL/2")).state_dict()
    cfg = config_from_state_dict(sd)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.learn_sigma) == (1152, 28, 16, True)
    assert cfg == model_config("DiT-XL/2", encoder_depth=0)


def test_published_parameter_counts():
    published = {"S": 33, "B": 130, "L": 458, "XL": 675}  # millions, DiT paper Table 1
    for size, millions in published.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in SiT(model_config(f"DiT-{size}/2")).parameters())
        assert round(n / 1e6) == millions or int(n / 1e6) == millions, (size, n)


# --------------------------------------------------------------------------- bad files

class CreatesFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": CreatesFile(str(target))}, path)
    with pytest.raises(UserError, match=r"refused to load .*evil\.pt.*would import '(builtins|io)\.open'"):
        load_checkpoint(path)
    assert not target.exists()


def test_truncated_file_gives_clear_error(tmp_path):
    path = tmp_path / "trunc.pt"
    good = tmp_path / "good.pt"
    torch.save(build(tiny_config()).state_dict(), good)
    path.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_random_bytes_give_clear_error(tmp_path):
    path = tmp_path / "noise.pt"
    for seed in range(40):  # garbage trips the unpickler in many different ways; each must read clearly
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(UserError, match="not a PyTorch file"):
            load_checkpoint(path)


def test_resnet_state_dict_is_named_as_not_a_dit(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match=r"not a DiT/SiT state dict or any model family repa-probe knows \(lightningdit, sit, repae, diffusers\): "
                                        r"missing key 'x_embedder.proj.weight'; its first key is 'conv1.weight' "
                                        r"with shape \[64, 3, 7, 7\]"):
        load_checkpoint(path)


def test_dit_with_a_missing_block_names_the_first_missing_key(tmp_path):
    _, _, sd = official_sd(tiny_config())
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    torch.save(sd, tmp_path / "holes.pt")
    with pytest.raises(UserError, match=r"missing key 'blocks\.1\.norm1|missing key 'blocks\.1\.attn\.qkv\.weight' "
                                        r"\(expected shape \[192, 64\]"):
        load_checkpoint(tmp_path / "holes.pt")


def test_wrong_shape_is_reported(tmp_path):
    _, _, sd = official_sd(tiny_config())
    sd["blocks.2.mlp.fc2.weight"] = torch.zeros(64, 100)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"'blocks\.2\.mlp\.fc2\.weight' has shape \[64, 100\], expected \[64, 256\]"):
        load_checkpoint(tmp_path / "bad.pt")


# --------------------------------------------------------------------------- CLI

def test_cli_inspect_prints_each_format(tmp_path):
    cfg = tiny_config()
    model = build(cfg)
    save_checkpoint(tmp_path / "ours.safetensors", cfg, model.state_dict(), meta={"step": 7})
    _, _, sd = official_sd(cfg)
    torch.save(sd, tmp_path / "DiT-XL-2-256x256.pt")
    _, _, train = repa_training_dict(replace(cfg, encoder_depth=2), legacy=True)
    torch.save(train, tmp_path / "legacy.pt")
    expect = {"ours.safetensors": "repa-probe", "DiT-XL-2-256x256.pt": "dit-official", "legacy.pt": "repa-train"}
    for fname, fmt in expect.items():
        r = run_cli("inspect", tmp_path / fname)
        assert r.returncode == 0, r.stderr
        assert f"format                 {fmt}" in r.stdout
        assert "parameters" in r.stdout and "time convention" in r.stdout


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\x00" * 64 + b"not a pickle at all", "not a PyTorch file"),
])
def test_cli_bad_checkpoint_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    r = run_cli("inspect", path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repa-probe: error:") and message in lines[0], r.stderr
