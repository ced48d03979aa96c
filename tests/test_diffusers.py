"""diffusers families on tiny random configs built with diffusers itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel  # noqa: E402

from conftest import randomize_  # noqa: E402
from diffusers_layouts import dit_to_diffusers, save_diffusers_folder  # noqa: E402
from repa_probe.capture import capture_blocks, noisy_input  # noqa: E402
from repa_probe.families import load_checkpoint  # noqa: E402
from repa_probe.models import ModelConfig, SiT  # noqa: E402
from repa_probe.noise import get_convention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
           patch_size=2, num_embeds_ada_norm=10)


def tiny_dit(tmp_path, **overrides):
    torch.manual_seed(0)
    model = randomize_(DiTTransformer2DModel(**{**DIT, **overrides}), seed=1).eval()
    save_diffusers_folder(model, tmp_path / "dit")
    return model, load_checkpoint(tmp_path / "dit" / "diffusion_pytorch_model.safetensors")


def test_dit_blocks_are_what_diffusers_computes(tmp_path):
    """Block i's captured features equal running diffusers' blocks by hand on its own patch embedding."""
    model, ckpt = tiny_dit(tmp_path)
    assert ckpt.family.name == "diffusers" and ckpt.provenance.convention == "dit"
    assert (ckpt.anatomy.depth, ckpt.anatomy.grid, ckpt.anatomy.width, ckpt.anatomy.num_classes) == (3, 4, 32, 10)
    x0, ids = torch.randn(5, 4, 8, 8), torch.arange(5)
    got = capture_blocks(ckpt, x0, None, ids, [0.5], seed=0)[0]
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.5, 0)
    labels = torch.full((5,), 10)
    with torch.no_grad():
        h = model.pos_embed(x_t)
        want = [h.mean(1)]
        for block in model.transformer_blocks:
            h = block(h, timestep=timestep, class_labels=labels)
            want.append(h.mean(1))
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=0)


def test_time_conventions_at_both_ends_and_the_middle():
    t = torch.tensor([0.0, 0.5, 1.0])
    dit = get_convention("dit").timestep(t)
    assert dit[0] == 0 and dit[2] == 999 and 0 < dit[1] < 999
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[int(dit[1])]
    assert abs(abar / (1 - abar) - 1) < 0.02                          # t = ½ ⇔ SNR 1: ᾱ = ½
    torch.testing.assert_close(get_convention("flow1000").timestep(t), torch.tensor([0.0, 500.0, 1000.0]))
    alpha, sigma = get_convention("flow1000").coefficients(t)
    torch.testing.assert_close(alpha, 1 - t) and torch.testing.assert_close(sigma, t)


def test_official_dit_and_its_diffusers_conversion(tmp_path):
    """The same weights in DiT's layout and in diffusers': block 0 identical; the blocks differ only through
    diffusers' timestep frequencies (10000^(−i/127) where DiT has 10000^(−i/128)) and its LayerNorm ε (1e-5
    vs 1e-6) — with those two set to DiT's, every block agrees."""
    cfg = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                      learn_sigma=True)
    official = randomize_(SiT(cfg), seed=2).eval()
    torch.save(official.state_dict(), tmp_path / "DiT-tiny.pt")
    dit = load_checkpoint(tmp_path / "DiT-tiny.pt", convention="dit", heads=2)
    x0, ids = torch.randn(6, 4, 8, 8), torch.arange(6)
    ref = capture_blocks(dit, x0, None, ids, [0.25], seed=0)[0]

    def converted(eps: float, freq_shift: int):
        diff = DiTTransformer2DModel(**DIT, norm_eps=eps).eval()
        diff.load_state_dict(dit_to_diffusers(official.state_dict(), 3), strict=False)
        folder = tmp_path / f"diff-{eps}"
        save_diffusers_folder(diff, folder)
        ckpt = load_checkpoint(folder)
        for block in ckpt.model.transformer_blocks:       # not in diffusers' config: set on the loaded model
            block.norm1.emb.time_proj.downscale_freq_shift = freq_shift
        return capture_blocks(ckpt, x0, None, ids, [0.25], seed=0)[0]

    as_published = converted(1e-5, 1)
    torch.testing.assert_close(as_published[0], ref[0], rtol=0, atol=0)               # patch + position embedding
    gap = ((as_published[1:] - ref[1:]).norm(dim=-1) / ref[1:].norm(dim=-1)).max()
    assert gap > 1e-4                                                                  # the published model differs
    aligned = converted(1e-6, 0)
    torch.testing.assert_close(aligned, ref, rtol=1e-5, atol=1e-5)


def tiny_sd3(folder):
    """A 2-block SD3 MMDiT on 8×8×4 latents with 12-d text tokens and 6-d pooled projections, saved."""
    torch.manual_seed(0)
    model = randomize_(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=8),
                       seed=3).eval()
    save_diffusers_folder(model, folder)
    return model


def test_sd3_joint_blocks_give_the_image_stream(tmp_path):
    model = tiny_sd3(tmp_path / "sd3")
    ckpt = load_checkpoint(tmp_path / "sd3")
    assert ckpt.provenance.convention == "flow1000" and "no prompt" in ckpt.provenance.warnings[0]
    x0, ids = torch.randn(3, 4, 8, 8), torch.arange(3)
    got = capture_blocks(ckpt, x0, None, ids, [0.75], seed=0)[0]
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.75, 0)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, kw, out: seen.append(out[1]), with_kwargs=True)
             for b in model.transformer_blocks]
    with torch.no_grad():
        model(x_t, encoder_hidden_states=torch.zeros(3, 1, 12), pooled_projections=torch.zeros(3, 6),
              timestep=timestep)
    for h in hooks:
        h.remove()
    assert got.shape == (3, 3, 16) and np.allclose(timestep.numpy(), 750)
    torch.testing.assert_close(got[1:], torch.stack([s.mean(1) for s in seen]), rtol=0, atol=0)


def test_cross_family_compare_through_the_command_line(tmp_path, cifar_dir):
    """`repa-probe compare` of an official DiT file and its diffusers conversion (latents through a tiny VAE):
    both analysed on the same images and noise; block 0 (before any timestep enters) has delta 0, the blocks
    after it differ by diffusers' time embedding, and the report says which family each came from."""
    import pandas as pd
    from conftest import run_cli
    from test_data import save_tiny_vae
    cfg = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                      learn_sigma=True)
    official = randomize_(SiT(cfg), seed=2).eval()
    torch.save(official.state_dict(), tmp_path / "DiT-tiny.pt")
    diff = DiTTransformer2DModel(**DIT).eval()
    diff.load_state_dict(dit_to_diffusers(official.state_dict(), 3), strict=False)
    save_diffusers_folder(diff, tmp_path / "dit-diffusers")
    vae = save_tiny_vae(tmp_path / "vae")
    r = run_cli("compare", tmp_path / "DiT-tiny.pt", tmp_path / "dit-diffusers", "--convention", "dit", "--heads", 2,
                "--vae", vae, "--data", cifar_dir / "test", "--n", 40, "--t", "0,0.5", "--encoder", "cifar-ssl-resnet",
                "--bootstrap", 3, "--null", 2, "--quiet", "--cache", tmp_path / "c", "--out", tmp_path / "r",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    deltas = pd.read_csv(tmp_path / "r" / "deltas.csv")
    assert (deltas.loc[deltas["block"] == 0, "delta"].abs() < 1e-6).all()
    assert (deltas.loc[deltas["block"] > 0, "delta"].abs() > 0).any()
    import json
    fams = {c["family"] for c in json.loads((tmp_path / "r" / "summary.json").read_text())["checkpoints"].values()}
    assert {"sit", "diffusers"} <= fams


def _hooked_image_stream(model, blocks, run) -> torch.Tensor:
    """[depth, N, D]: each block's image tokens averaged, recorded by our own hooks around diffusers' forward."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out if torch.is_tensor(out) else out[1]))
             for b in blocks]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return torch.stack([s.mean(1) for s in seen])


def test_pixart_blocks_and_zero_prompt(tmp_path):
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    model = randomize_(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=8,
                                                caption_channels=12, norm_num_groups=4), seed=4).eval()
    save_diffusers_folder(model, tmp_path / "pixart")
    ckpt = load_checkpoint(tmp_path / "pixart")
    assert ckpt.provenance.convention == "dit" and ckpt.anatomy.num_classes is None and ckpt.anatomy.grid == 4
    x0, ids = torch.randn(3, 4, 8, 8), torch.arange(3)
    got = capture_blocks(ckpt, x0, None, ids, [0.5], seed=0)[0]
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.5, 0)
    cond = {"resolution": torch.tensor([[64.0, 64.0]] * 3), "aspect_ratio": torch.ones(3, 1)}
    want = _hooked_image_stream(model, model.transformer_blocks, lambda: model(
        x_t, encoder_hidden_states=torch.zeros(3, 1, 12), timestep=timestep, added_cond_kwargs=cond))
    torch.testing.assert_close(got[1:], want, rtol=0, atol=0)


def test_flux_double_then_single_blocks_numbered_through(tmp_path):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = randomize_(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                              pooled_projection_dim=6, axes_dims_rope=(2, 2, 4)), seed=5).eval()
    save_diffusers_folder(model, tmp_path / "flux")
    ckpt = load_checkpoint(tmp_path / "flux")
    a = ckpt.anatomy
    assert (a.depth, a.input.channels, a.input.size, a.grid, a.width) == (4, 4, 32, 16, 16)
    x0, ids = torch.randn(2, 4, 32, 32), torch.arange(2)
    got = capture_blocks(ckpt, x0, None, ids, [0.25], seed=0)[0]
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.25, 0)
    assert np.allclose(timestep.numpy(), 0.25)                       # the model multiplies by 1000 itself
    packed = x_t.reshape(2, 4, 16, 2, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 256, 16)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    want = _hooked_image_stream(model, [*model.transformer_blocks, *model.single_transformer_blocks], lambda: model(
        packed, encoder_hidden_states=torch.zeros(2, 1, 12), pooled_projections=torch.zeros(2, 6), timestep=timestep,
        img_ids=img_ids, txt_ids=torch.zeros(1, 3)))
    torch.testing.assert_close(got[1:], want, rtol=0, atol=0)
    with torch.no_grad():                                            # block 0: the packed latents, embedded
        torch.testing.assert_close(got[0], model.x_embedder(packed).mean(1), rtol=0, atol=0)


def test_sd3_prompt_embeddings_from_a_file(tmp_path):
    """--text-embeddings: the captured image stream is what SD3 computes with that prompt; the report names
    the file and the cache keeps the two conditionings apart; wrong shapes and text-free models are refused."""
    from safetensors.torch import save_file
    from repa_probe.errors import UserError
    model = tiny_sd3(tmp_path / "sd3")
    prompt, pooled = torch.randn(1, 5, 12), torch.randn(1, 6)
    save_file({"prompt_embeds": prompt, "pooled_prompt_embeds": pooled}, tmp_path / "prompt.safetensors")
    zero = load_checkpoint(tmp_path / "sd3")
    ckpt = load_checkpoint(tmp_path / "sd3", text_embeddings=str(tmp_path / "prompt.safetensors"))
    assert "prompt.safetensors" in ckpt.provenance.warnings[-1] and ckpt.provenance.format != zero.provenance.format
    x0, ids = torch.randn(3, 4, 8, 8), torch.arange(3)
    got = capture_blocks(ckpt, x0, None, ids, [0.5], seed=0)[0]
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.5, 0)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out[1])) for b in model.transformer_blocks]
    with torch.no_grad():
        model(x_t, encoder_hidden_states=prompt.expand(3, -1, -1), pooled_projections=pooled.expand(3, -1),
              timestep=timestep)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got[1:], torch.stack([s.mean(1) for s in seen]), rtol=0, atol=0)
    assert not torch.equal(got[1:], capture_blocks(zero, x0, None, ids, [0.5], seed=0)[0][1:])
    save_file({"prompt_embeds": torch.randn(5, 7)}, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=r"must hold prompt_embeds \(L, 12\) and pooled_prompt_embeds \(6,\)"):
        load_checkpoint(tmp_path / "sd3", text_embeddings=str(tmp_path / "bad.safetensors"))
    _, dit = tiny_dit(tmp_path)
    with pytest.raises(UserError, match="takes no text"):
        dit.family.condition(dit, str(tmp_path / "prompt.safetensors"))
