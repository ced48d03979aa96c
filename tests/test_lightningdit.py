"""LightningDiT family: state dicts in LightningDiT's own layout (keys written out below, random weights), saved
as its train.py and inference.py store them, loaded through load_checkpoint, and checked against a reference
forward pass written from the formulas (RMSNorm, 2-D RoPE, SwiGLU, adaLN) with no code from the family."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

import repa_probe.families.lightningdit as ld
from repa_probe.capture import capture_blocks
from repa_probe.errors import UserError
from repa_probe.families import detect_family, load_checkpoint
from repa_probe.models import SiT
from repa_probe.noise import seeded_noise

pytestmark = pytest.mark.usefixtures("one_thread")
RELEASED = {"swiglu": True, "rope": True, "rmsnorm": True, "qk_norm": False, "wo_shift": False, "learn_sigma": False}
TINY = {"D": 64, "depth": 2, "heads": 2, "patch": 2, "C": 32, "size": 8, "classes": 10}


def rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (grid², head_dim): channel pair i of the first half turns by row·ω_i, of the second half by
    column·ω_i, ω_i = 10000^(−4i/head_dim)."""
    angles = torch.zeros(grid * grid, head_dim)
    for r in range(grid):
        for c in range(grid):
            for j in range(head_dim):
                half, i = divmod(j, head_dim // 2)
                omega = 10000 ** (-4 * (i // 2) / head_dim)
                angles[r * grid + c, j] = (c if half else r) * omega
    return angles.cos(), angles.sin()


def lightningdit_sd(seed: int = 0, D=64, depth=2, heads=2, patch=2, C=32, size=8, classes=10, swiglu=True, rope=True,
                    rmsnorm=True, qk_norm=False, wo_shift=False, learn_sigma=False) -> dict:
    """A state dict with LightningDiT's key names and shapes, every weight random (no zero gates)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, base=0.0):
        return base + 0.1 * torch.randn(shape, generator=g)

    T, hd, out = (size // patch) ** 2, D // heads, patch * patch * C * (2 if learn_sigma else 1)
    ff = int(2 / 3 * 4 * D) if swiglu else 4 * D
    sd = {"x_embedder.proj.weight": r(D, C, patch, patch), "x_embedder.proj.bias": r(D), "pos_embed": r(1, T, D),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(classes + 1, D)}
    if rope:
        sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = rope_tables(hd, size // patch)
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
               b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
               b + "adaLN_modulation.1.weight": r((4 if wo_shift else 6) * D, D),
               b + "adaLN_modulation.1.bias": r((4 if wo_shift else 6) * D)}
        if rmsnorm:
            sd |= {b + "norm1.weight": r(D, base=1), b + "norm2.weight": r(D, base=1)}
        if qk_norm:
            for n in ("q_norm", "k_norm"):
                sd[b + f"attn.{n}.weight"] = r(hd, base=1)
                if not rmsnorm:
                    sd[b + f"attn.{n}.bias"] = r(hd)
        names = ("w12", "w3") if swiglu else ("fc1", "fc2")
        sd |= {b + f"mlp.{names[0]}.weight": r(ff * (2 if swiglu else 1), D),
               b + f"mlp.{names[0]}.bias": r(ff * (2 if swiglu else 1)),
               b + f"mlp.{names[1]}.weight": r(D, ff), b + f"mlp.{names[1]}.bias": r(D)}
    sd |= {"final_layer.linear.weight": r(out, D), "final_layer.linear.bias": r(out),
           "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    if rmsnorm:
        sd["final_layer.norm_final.weight"] = r(D, base=1)
    return sd


def train_dict(sd: dict, **config) -> dict:
    """LightningDiT's train.py checkpoint: {model, ema, opt, config (its YAML as a dict)}."""
    cfg = {"model": {"model_type": "custom", "use_rope": True}, "vae": {"downsample_ratio": 16},
           "data": {"latent_norm": True, "latent_multiplier": 1.0},
           "transport": {"path_type": "Linear", "prediction": "velocity"}}
    for section, values in config.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return {"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {"state": {}, "param_groups": []},
            "config": cfg}


def save(tmp_path, obj, name="0080000.pt"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


#################################################################################
#                      Reference forward, from the formulas                     #
#################################################################################

def rms(x, w, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def reference(sd: dict, o: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """(tokens entering and leaving each block, output) of LightningDiT with options `o`, in its own time."""
    D, heads, p = TINY["D"], TINY["heads"], TINY["patch"]
    hd, N = D // heads, len(x)
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    temb = linear(sd, "t_embedder.mlp.2", F.silu(linear(sd, "t_embedder.mlp.0", temb)))
    c = temb + sd["y_embedder.embedding_table.weight"][y]

    def norm(v, name):
        return rms(v, sd[name + ".weight"]) if o["rmsnorm"] else F.layer_norm(v, (v.shape[-1],), eps=1e-6)

    def rotate(v):   # v (N, heads, T, hd): pairs (v_2i, v_2i+1) as complex numbers times e^{iθ}
        angle = torch.atan2(sd["feat_rope.freqs_sin"], sd["feat_rope.freqs_cos"])[:, ::2]
        z = torch.view_as_complex(v.reshape(*v.shape[:-1], hd // 2, 2).contiguous()) * torch.polar(
            torch.ones_like(angle), angle)
        return torch.view_as_real(z).flatten(-2)

    tokens = [h]
    for i in range(TINY["depth"]):
        b = f"blocks.{i}."
        mod = linear(sd, b + "adaLN_modulation.1", F.silu(c)).chunk(4 if o["wo_shift"] else 6, dim=1)
        if o["wo_shift"]:
            (s1, g1, s2, g2), m1, m2 = mod, 0, 0
        else:
            m1, s1, g1, m2, s2, g2 = mod
            m1, m2 = m1[:, None], m2[:, None]
        a = norm(h, b + "norm1") * (1 + s1[:, None]) + m1
        q, k, v = linear(sd, b + "attn.qkv", a).reshape(N, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if o["qk_norm"]:
            q, k = (rms(q, sd[b + "attn.q_norm.weight"]), rms(k, sd[b + "attn.k_norm.weight"])) if o["rmsnorm"] else \
                (F.layer_norm(q, (hd,), sd[b + "attn.q_norm.weight"], sd[b + "attn.q_norm.bias"]),
                 F.layer_norm(k, (hd,), sd[b + "attn.k_norm.weight"], sd[b + "attn.k_norm.bias"]))
        if o["rope"]:
            q, k = rotate(q), rotate(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        h = h + g1[:, None] * linear(sd, b + "attn.proj", att.transpose(1, 2).reshape(N, -1, D))
        a = norm(h, b + "norm2") * (1 + s2[:, None]) + m2
        if o["swiglu"]:
            u, w = linear(sd, b + "mlp.w12", a).chunk(2, dim=-1)
            ff = linear(sd, b + "mlp.w3", F.silu(u) * w)
        else:
            ff = linear(sd, b + "mlp.fc2", F.gelu(linear(sd, b + "mlp.fc1", a), approximate="tanh"))
        h = h + g2[:, None] * ff
        tokens.append(h)
    shift, scale = linear(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = linear(sd, "final_layer.linear", norm(h, "final_layer.norm_final") * (1 + scale[:, None]) + shift[:, None])
    g, C = TINY["size"] // p, TINY["C"]
    out = out.reshape(N, g, g, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(N, -1, g * p, g * p)
    return tokens, out[:, :C]


#################################################################################
#                                     Tests                                     #
#################################################################################

@pytest.mark.parametrize("layout", ["train", "ema-only", "bare"])
def test_loads_in_each_layout(tmp_path, layout):
    sd = lightningdit_sd()
    obj = {"train": train_dict(sd), "ema-only": {"ema": sd}, "bare": sd}[layout]
    path = save(tmp_path, obj)
    assert detect_family(obj, path).name == "lightningdit"     # not claimed by the sit family first
    ckpt = load_checkpoint(path)
    assert ckpt.family.name == "lightningdit" and ckpt.provenance.convention == "sit"
    assert ckpt.provenance.weights == ("state_dict" if layout == "bare" else "ema")
    assert ckpt.provenance.step == (80000 if layout == "train" else None)
    assert set(ckpt.model.state_dict()) == set(sd)
    assert all(torch.equal(v, sd[k]) for k, v in ckpt.model.state_dict().items())
    assert any("latents_stats.pt" in w for w in ckpt.provenance.warnings)


def test_weights_model_picks_the_training_weights(tmp_path):
    sd = lightningdit_sd()
    ckpt = load_checkpoint(save(tmp_path, train_dict(sd)), weights="model")
    assert ckpt.provenance.weights == "model"
    assert torch.equal(ckpt.model.pos_embed, sd["pos_embed"] + 1)


def test_anatomy_and_inspect_rows(tmp_path):
    ckpt = load_checkpoint(save(tmp_path, train_dict(lightningdit_sd())))
    a = ckpt.anatomy
    assert (a.depth, a.width, a.grid, a.patch_size, a.num_classes) == (2, 64, 4, 2, 10)
    assert (a.input.kind, a.input.channels, a.input.size, a.input.downsample, a.input.scale, a.input.shift) == \
        ("latents", 32, 8, 16, 1.0, 0.0)
    assert a.input.image_size == 128 and a.name == "LightningDiT (width 64, depth 2, 2 heads)/2"
    rows = dict(ckpt.family.describe_rows(ckpt))
    assert rows["options"] == "SwiGLU, RMSNorm, RoPE" and rows["width / depth / heads"] == "64 / 2 / 2"
    assert ckpt.provenance.args["model.use_rope"] is True
    plain = load_checkpoint(save(tmp_path, train_dict(lightningdit_sd(), data={"latent_norm": False,
                                                                             "latent_multiplier": 0.5}), "p.pt"))
    assert plain.anatomy.input.scale == 0.5 and not plain.provenance.warnings


OPTIONS = [RELEASED, {**RELEASED, "qk_norm": True, "wo_shift": True, "learn_sigma": True},
           {**RELEASED, "swiglu": False, "rmsnorm": False, "qk_norm": True},
           {**RELEASED, "swiglu": False, "rope": False, "rmsnorm": False, "wo_shift": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=["released", "all", "layernorm-qk", "wo-shift-only"])
def test_blocks_match_the_reference_forward(tmp_path, options):
    """Captured tokens at t = ½ and ¼ (which tells the time direction apart) and the model's output equal the
    reference fed LightningDiT's time s = 1 − t, x_s = s·x + (1 − s)·ε, with the null label."""
    sd = lightningdit_sd(seed=3, **options)
    ckpt = load_checkpoint(save(tmp_path, train_dict(sd)), heads=2)
    assert {k: getattr(ckpt.config, k) for k in options} == options
    x0, ids = torch.randn(3, 32, 8, 8), torch.tensor([4, 7, 11])
    got = capture_blocks(ckpt, x0, None, ids, [0.5, 0.25], seed=0, pooling="tokens")   # [t, block, N, T, D]
    pooled = capture_blocks(ckpt, x0, None, ids, [0.5], seed=0)[0]                   # [block, N, D]
    null = torch.full((3,), 10)
    for j, t in enumerate([0.5, 0.25]):
        eps = seeded_noise(ids, (32, 8, 8), 0, salt=round(t * 1e6))
        tokens, _ = reference(sd, options, (1 - t) * x0 + t * eps, torch.full((3,), 1 - t), null)
        for b, ref in enumerate(tokens):
            torch.testing.assert_close(got[j, b], ref, atol=2e-5, rtol=1e-4)
            if j == 0:
                torch.testing.assert_close(pooled[b], ref.mean(1), atol=2e-5, rtol=1e-4)
    x, s, y = torch.randn(2, 32, 8, 8), torch.tensor([0.1, 0.9]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.family.forward(ckpt.model, x, s, y), reference(sd, options, x, s, y)[1],
                                   atol=2e-5, rtol=1e-4)


def test_time_mapping(tmp_path):
    """Canonical t (0 = data, 1 = noise) → LightningDiT fed s = 1 − t; its output x − ε is −(canonical velocity)."""
    conv = load_checkpoint(save(tmp_path, lightningdit_sd())).convention
    x, eps = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    for t, fed in [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]:
        assert conv.timestep(torch.tensor([t])).item() == fed
        torch.testing.assert_close(conv.model_input(x, torch.full((2,), t), eps), (1 - t) * x + t * eps)
    assert torch.equal(conv.velocity(x - eps, None, None), eps - x)


def test_heads(tmp_path):
    """Heads come from the RoPE tables or qk-norm weights; without either from the config's model type,
    --heads or the standard size (a stated assumption); a custom width without any is refused."""
    plain = {"swiglu": True, "rope": False, "rmsnorm": True}
    path = save(tmp_path, lightningdit_sd(**plain))
    with pytest.raises(UserError, match="--heads"):
        load_checkpoint(path)
    assert load_checkpoint(path, heads=4).config.num_heads == 4
    with pytest.raises(UserError, match="say 2 heads"):
        load_checkpoint(save(tmp_path, lightningdit_sd(), "r.pt"), heads=4)
    named = train_dict(lightningdit_sd(**plain), model={"model_type": "LightningDiT-B/2"})
    with pytest.raises(UserError, match="12 heads"):          # a B/2 config on width-64 weights: 64 % 12 ≠ 0
        load_checkpoint(save(tmp_path, named, "b.pt"))
    assert ld._heads({}, 768, 12, "x", "LightningDiT-B/2", None, []) == 12
    warnings = []
    assert ld._heads({}, 1152, 28, "x", None, None, warnings) == 16 and "ASSUMED" in warnings[0]


def test_untrained_is_seeded_lightningdit_init(tmp_path):
    ckpt = load_checkpoint(save(tmp_path, lightningdit_sd()))
    a, b = ckpt.family.untrained(ckpt, seed=1), ckpt.family.untrained(ckpt, seed=1)
    assert a.provenance.sha256 == b.provenance.sha256 != ckpt.family.untrained(ckpt, seed=2).provenance.sha256
    assert a.anatomy == ckpt.anatomy and a.provenance.convention == "sit"
    torch.testing.assert_close(a.model.feat_rope.freqs_cos, rope_tables(32, 4)[0])   # our tables = the formula
    feats = capture_blocks(a, torch.randn(2, 32, 8, 8), None, torch.arange(2), [0.3], seed=0)[0]
    # its adaLN-Zero gates get PyTorch's default init: each block changes its input, the baseline is no identity
    assert all((feats[i + 1] - feats[i]).abs().max() > 1e-3 for i in range(2))


def test_sit_files_are_not_claimed_and_bad_files_are_named(tmp_path):
    sit_sd = SiT(tiny_config(z_dims=[], qk_norm=False)).state_dict()
    assert not ld.looks_like_lightningdit(sit_sd) and not ld.looks_like_lightningdit({"ema": sit_sd, "args": {}})
    sd = lightningdit_sd()
    del sd["blocks.1.attn.proj.bias"]
    with pytest.raises(UserError, match="missing key 'blocks.1.attn.proj.bias'"):
        load_checkpoint(save(tmp_path, sd))
    bad = train_dict(lightningdit_sd(), transport={"path_type": "GVP"})
    with pytest.raises(UserError, match="GVP"):
        load_checkpoint(save(tmp_path, bad, "gvp.pt"))


def test_fold_latent_stats_makes_scale_one_exact():
    """After folding, the VAE's posterior mean is LightningDiT's normalised latent and decoding inverts it."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    kw = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
          "block_out_channels": (8, 8), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4}
    vae, folded = AutoencoderKL(**kw).eval(), AutoencoderKL(**kw).eval()
    folded.load_state_dict(vae.state_dict())
    mean, std = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.5
    ld.fold_latent_stats(folded, mean, std)
    assert_folded(vae, folded, mean, std)


def assert_folded(vae, folded, mean: torch.Tensor, std: torch.Tensor) -> None:
    """`folded`'s posterior is `vae`'s normalised per channel, (μ − mean)/std, and its decoding inverts that."""
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before, after = vae.encode(x).latent_dist, folded.encode(x).latent_dist
        torch.testing.assert_close(after.mean, (before.mean - mean) / std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after.std, before.std / std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(folded.decode(after.mean).sample, vae.decode(before.mean).sample,
                                   atol=1e-5, rtol=1e-5)
