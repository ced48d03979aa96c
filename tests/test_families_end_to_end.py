"""Every registered family through `analyze` and `compare` on tiny random models and real CIFAR-10 images
encoded by a tiny local VAE: all blocks × t get finite numbers, and a model compared with itself has deltas 0."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import repa_probe  # noqa: E402
from conftest import randomize_  # noqa: E402
from diffusers_layouts import save_diffusers_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(path: Path, latent_channels: int, downsample: int) -> Path:
    """A random AutoencoderKL with the given latent channels and a downsampling factor of 2^(blocks − 1)."""
    from diffusers import AutoencoderKL
    blocks = int(np.log2(downsample)) + 1
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                  block_out_channels=(8,) * blocks, norm_num_groups=4, sample_size=64).save_pretrained(path)
    return path


def diffusers_folder(tmp_path: Path, name: str) -> Path:
    import diffusers
    kwargs = {"DiTTransformer2DModel": dict(in_channels=4, out_channels=8, sample_size=8, num_embeds_ada_norm=10,
                                            num_layers=2),
              "PixArtTransformer2DModel": dict(in_channels=4, out_channels=8, sample_size=8, num_layers=2,
                                               cross_attention_dim=16, caption_channels=12),
              "SD3Transformer2DModel": dict(in_channels=4, out_channels=4, sample_size=8, num_layers=2,
                                            joint_attention_dim=12, caption_projection_dim=16,
                                            pooled_projection_dim=6, pos_embed_max_size=8),
              "FluxTransformer2DModel": dict(in_channels=16, num_layers=1, num_single_layers=1, joint_attention_dim=12,
                                             pooled_projection_dim=6, axes_dims_rope=(2, 2, 4))}[name]
    torch.manual_seed(0)
    model = randomize_(getattr(diffusers, name)(num_attention_heads=2, attention_head_dim=8, **kwargs), seed=1)
    save_diffusers_folder(model.eval(), tmp_path / name)
    return tmp_path / name


def lightningdit_file(tmp_path: Path) -> Path:
    from test_lightningdit import lightningdit_sd, save, train_dict
    return save(tmp_path, train_dict(lightningdit_sd(size=4)))


@pytest.mark.parametrize("family", ["DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                                    "FluxTransformer2DModel", "lightningdit"])
def test_analyze_and_self_compare(family, tmp_path, cifar_dir):
    if family == "lightningdit":
        path, vae = lightningdit_file(tmp_path), tiny_vae(tmp_path / "vae", 32, 16)
    else:
        path, vae = diffusers_folder(tmp_path, family), tiny_vae(tmp_path / "vae", 4, 8)
    common = dict(data=str(cifar_dir / "test"), encoders=["cifar-ssl-resnet"], ts=[0, 0.5], n=24, vae=str(vae),
                  bootstrap=2, null=2, k=5, quiet=True, cache=str(tmp_path / "cache"))
    one = repa_probe.analyze(str(path), **common)
    depth = one.results.models[0].ckpt.anatomy.depth
    table = one.table.query("kind == 'model'")
    assert set(table["block"]) == set(range(depth + 1))
    assert set(table["metric"]) == {"cknna", "probe_top1", "self_cka_prev", "self_cka_tmin"}
    assert np.isfinite(table["value"]).all()
    both = repa_probe.analyze([str(path), str(path)], names=["a", "b"], **common)
    from repa_probe.report.compose import summarise
    deltas = summarise(both.results)[1]["deltas"]
    # cknna and probe at 2 t × every block, self_cka_prev at 2 t × blocks ≥ 1, self_cka_tmin at t = 0.5 × every block
    assert len(deltas) == 2 * 2 * (depth + 1) + 2 * depth + (depth + 1) and (deltas["delta"] == 0).all()
