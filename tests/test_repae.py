"""REPA-E family: checkpoints in REPA-E's layouts (train_repae.py, train_ldm_only.py, a bare SiT state dict) with
random weights and the latent BatchNorm's statistics, loaded through load_checkpoint; captured features checked
against our SiT hooked by hand; the latent normalisation checked by its known answer on a folded VAE."""
from __future__ import annotations

import argparse
import re

import pytest
import torch
from conftest import randomize_, tiny_config
from test_lightningdit import assert_folded

from repa_probe.capture import capture_blocks
from repa_probe.checkpoints import read_checkpoint
from repa_probe.errors import UserError
from repa_probe.families import detect_family, inspect_rows, load_checkpoint, repae
from repa_probe.models import SiT
from repa_probe.noise import seeded_noise

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 3, "num_heads": 2,
        "num_classes": 10, "qk_norm": False, "z_dims": [32], "projector_dim": 48, "encoder_depth": 2}
MEAN, VAR = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([4.0, 0.25, 1.0, 9.0])


def sit_sd(seed: int = 0, **overrides) -> dict:
    """A tiny SiT state dict (REPA's keys, every weight random) plus REPA-E's BatchNorm buffers."""
    sd = randomize_(SiT(tiny_config(**{**TINY, **overrides})), seed=seed, std=0.1).state_dict()
    return {**sd, "bn.running_mean": MEAN.clone(), "bn.running_var": VAR.clone(),
            "bn.num_batches_tracked": torch.tensor(400000)}


def repae_args(**overrides) -> argparse.Namespace:
    """REPA-E's training args (model "custom": the tiny SiT is no named size)."""
    args = {"model": "custom", "vae": "f8d4", "encoder_depth": 2, "enc_type": "dinov2-vit-b", "proj_coeff": 0.5,
            "path_type": "linear", "prediction": "v", "weighting": "uniform", "bn_momentum": 0.1, "qk_norm": False,
            "vae_ckpt": "pretrained/sdvae/sdvae-f8d4.pt"}
    return argparse.Namespace(**{**args, **overrides})


def train_dict(sd: dict, vae: dict | None = None, **args) -> dict:
    """train_repae.py's checkpoint (with a VAE) or train_ldm_only.py's (without)."""
    obj = {"model": {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}, "ema": sd,
           "opt": {"state": {}, "param_groups": []}, "args": repae_args(**args), "steps": 400000}
    if vae is not None:
        obj |= {"vae": vae, "discriminator": {"w": torch.zeros(2)}, "opt_vae": {}, "opt_disc": {}}
    return obj


def save(tmp_path, obj, name="0400000.pt"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def tiny_vae(seed: int = 0):
    """A diffusers AutoencoderKL shaped like latent-diffusion's: 32 GroupNorm groups, attention at the last
    encoder level and the first decoder level (as REPA-E's f16d32), 4 latent channels, /2."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                                  block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=32).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def to_ldm(sd: dict, levels: int = 2) -> dict:
    """A diffusers AutoencoderKL state dict renamed to latent-diffusion's layout (written independently of the
    family's converter, in the other direction)."""
    names = [("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
             ("mid_block.attentions.0.", "mid.attn_1."), ("down_blocks.", "down."), (".resnets.", ".block."),
             (".attentions.", ".attn."), ("downsamplers.0.", "downsample."), ("upsamplers.0.", "upsample."),
             ("conv_norm_out.", "norm_out."), ("conv_shortcut.", "nin_shortcut."), ("group_norm.", "norm."),
             ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", key)
        for a, b in names:
            new = new.replace(a, b)
        out[new] = value[:, :, None, None] if "attn" in new and value.ndim == 2 else value
    return out


#################################################################################
#                                     Tests                                     #
#################################################################################

@pytest.mark.parametrize("layout", ["repae-train", "repae-ldm-train", "repae-state-dict"])
def test_detected_and_loaded_in_each_layout(tmp_path, layout):
    sd = sit_sd()
    obj = {"repae-train": train_dict(sd, vae={"encoder.conv_in.weight": torch.zeros(1)}),
           "repae-ldm-train": train_dict(sd), "repae-state-dict": sd}[layout]
    path = save(tmp_path, obj)
    assert detect_family(read_checkpoint(path), path).name == "repae"          # not the sit family
    ckpt = load_checkpoint(path, heads=2)
    p, a = ckpt.provenance, ckpt.anatomy
    assert ckpt.family.name == p.family == "repae" and p.format == layout
    assert (p.convention, p.convention_source) == ("repa", "checkpoint")
    assert p.weights == ("state_dict" if layout == "repae-state-dict" else "ema")
    if layout != "repae-state-dict":
        assert p.step == 400000 and p.encoders == ["dinov2-vit-b"] and p.repa_coeff == 0.5
    assert (a.depth, a.width, a.grid, a.patch_size, a.num_classes) == (3, 64, 4, 2, 10)
    if layout == "repae-state-dict":                                 # no args: the sit family's assumption
        assert a.aligned_block == 1 and any("REPA depth not recorded" in w for w in p.warnings)
    else:
        assert a.aligned_block == 2                                  # REPA-E's --encoder-depth
    assert (a.input.kind, a.input.channels, a.input.size, a.input.downsample) == ("latents", 4, 8, 8)
    assert (a.input.scale, a.input.shift, a.input.vae) == (1.0, 0.0, None)
    assert any("export_vae" in w for w in p.warnings)
    rows = dict(inspect_rows(ckpt))
    assert "BatchNorm" in rows["latent normalisation"] and rows["REPA depth"] == str(a.aligned_block)


def test_latent_statistics_are_the_batchnorm_in_eval_mode(tmp_path):
    """Known answer: the input is (z − running_mean)/sqrt(running_var + 1e-4), per channel, as
    BatchNorm2d(4, eps=1e-4, affine=False) computes it in eval mode."""
    ckpt = load_checkpoint(save(tmp_path, train_dict(sit_sd())), heads=2)
    std = torch.tensor(ckpt.meta["latent_std"])
    torch.testing.assert_close(torch.tensor(ckpt.meta["latent_mean"]), MEAN)
    torch.testing.assert_close(std, (VAR + 1e-4).sqrt())
    bn = torch.nn.BatchNorm2d(4, eps=1e-4, affine=False).eval()
    bn.running_mean.copy_(MEAN)
    bn.running_var.copy_(VAR)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close((z - MEAN.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), bn(z))
    model = load_checkpoint(save(tmp_path, train_dict(sit_sd()), "m.pt"), heads=2, weights="model")
    torch.testing.assert_close(torch.tensor(model.meta["latent_mean"]), MEAN / 2)    # the chosen weights' own


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_captured_blocks_equal_our_sit_hooked_by_hand(tmp_path, weights):
    sd = sit_sd(seed=3, qk_norm=True)
    obj = train_dict(sd)
    ckpt = load_checkpoint(save(tmp_path, obj), weights=weights)    # qk-norm weights give the heads
    x0, ids = torch.randn(3, 4, 8, 8), torch.tensor([5, 0, 7])
    feats = capture_blocks(ckpt, x0, None, ids, [0.5], seed=0)[0]   # [blocks 0..3, N, D], token means

    ref = SiT(tiny_config(**{**TINY, "qk_norm": True})).eval()
    ref.load_state_dict({k: v for k, v in obj[weights].items() if not k.startswith("bn.")})
    x_t = 0.5 * x0 + 0.5 * seeded_noise(ids, (4, 8, 8), 0, salt=500000)       # repa: (1 − t)·x + t·ε, fed t
    tokens = [ref.x_embedder(x_t) + ref.pos_embed]
    hooks = [b.register_forward_hook(lambda m, a, out: tokens.append(out)) for b in ref.blocks]
    with torch.no_grad():
        ref(x_t, torch.full((3,), 0.5), torch.full((3,), 10))                  # null class
    for h in hooks:
        h.remove()
    torch.testing.assert_close(feats, torch.stack([h.mean(1) for h in tokens]), atol=1e-5, rtol=1e-5)


def test_model_name_gives_the_heads(tmp_path):
    """Without qk-norm the weights cannot tell the heads: args.model names a size, whose heads REPA-E's table
    and ours share (XL: 16, a divisor of the tiny width 64); with no name and no --heads, the error says so."""
    ckpt = load_checkpoint(save(tmp_path, train_dict(sit_sd(), model="SiT-XL/2")))
    assert ckpt.config.num_heads == 16 and not any("ASSUMED" in w for w in ckpt.provenance.warnings)
    with pytest.raises(UserError, match="pass --heads N"):
        load_checkpoint(save(tmp_path, train_dict(sit_sd()), "custom.pt"))


def test_export_vae_folds_the_statistics_into_the_bundled_vae(tmp_path):
    """Known answer: the exported VAE's posterior mean is the BatchNorm-normalised latent of the original VAE,
    its std is scaled alike, and decoding undoes the normalisation."""
    from repa_probe.data import load_vae
    vae = tiny_vae()
    ldm = to_ldm(vae.state_dict())
    converted = repae.ldm_vae_to_diffusers(ldm)
    for k, v in vae.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    path = save(tmp_path, train_dict(sit_sd(), vae=ldm))
    folded = load_vae(repae.export_vae(path, tmp_path / "vae"))
    assert_folded(vae, folded, MEAN.view(1, -1, 1, 1), (VAR + 1e-4).sqrt().view(1, -1, 1, 1))


def test_export_vae_for_a_checkpoint_without_one(tmp_path):
    """train_ldm_only.py files hold no VAE: the E2E-VAE is named (REPA-E's .pt here), or the error says so."""
    vae = tiny_vae(seed=1)
    path = save(tmp_path, train_dict(sit_sd()))
    with pytest.raises(UserError, match="holds no VAE.*sdvae-f8d4.pt"):
        repae.export_vae(path, tmp_path / "none")
    torch.save(to_ldm(vae.state_dict()), tmp_path / "e2e-vae.pt")
    folder = repae.export_vae(path, tmp_path / "vae", vae=tmp_path / "e2e-vae.pt")
    from repa_probe.data import load_vae
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        got = load_vae(folder).encode(x).latent_dist.mean
        want = (vae.encode(x).latent_dist.mean - MEAN.view(1, -1, 1, 1)) / (VAR + 1e-4).sqrt().view(1, -1, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_other_files_are_left_alone_and_bad_ones_are_named(tmp_path):
    plain = SiT(tiny_config(**TINY)).state_dict()
    assert not repae.looks_like_repae(plain) and not repae.looks_like_repae({"ema": plain, "args": repae_args()})
    assert detect_family(plain, tmp_path / "x.pt").name == "sit"
    with pytest.raises(UserError, match="path 'cosine'"):
        load_checkpoint(save(tmp_path, train_dict(sit_sd(), path_type="cosine")), heads=2)
    sd = sit_sd()
    del sd["blocks.2.mlp.fc2.bias"]
    with pytest.raises(UserError, match="missing key 'blocks.2.mlp.fc2.bias'"):
        load_checkpoint(save(tmp_path, train_dict(sd), "broken.pt"), heads=2)
    with pytest.raises(UserError, match="not a latent-diffusion AutoencoderKL"):
        repae.ldm_vae_to_diffusers({"decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)})


def test_untrained_baseline_is_a_seeded_sit_in_the_same_input_space(tmp_path):
    ckpt = load_checkpoint(save(tmp_path, train_dict(sit_sd())), heads=2)
    a, b = ckpt.family.untrained(ckpt, seed=1), ckpt.family.untrained(ckpt, seed=1)
    assert a.provenance.sha256 == b.provenance.sha256 != ckpt.family.untrained(ckpt, seed=2).provenance.sha256
    assert a.anatomy == ckpt.anatomy and a.family.name == "repae" and a.meta["latent_std"] == ckpt.meta["latent_std"]
    feats = capture_blocks(a, torch.randn(2, 4, 8, 8), None, torch.arange(2), [0.3], seed=0)[0]
    assert all((feats[i + 1] - feats[i]).abs().max() > 1e-3 for i in range(3))   # gates initialised: no identity
