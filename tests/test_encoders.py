"""Target encoders: original weight layouts load exactly, REPA's preprocessing, and clear errors.

Every family is checked the same way: a randomly initialised timm network is written in the original
repository's layout (tests/original_layouts.py), loaded back through `load_encoder`, and must give the
tokens that the timm network (or, for DINOv2-reg and CLIP, the original architecture's own forward) gives.
Tiny two-block analogues keep this fast; DINOv2 ViT-B runs at its real size once.
"""
from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from conftest import run_cli
from repa_probe import encoders as E
from repa_probe import teacher
from repa_probe.errors import UserError
import original_layouts as L

torch.set_num_threads(min(2, torch.get_num_threads()))


# --------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def empty_weights_dir(tmp_path, monkeypatch) -> Path:
    """No test sees the user's weights folder."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("REPA_PROBE_WEIGHTS", str(folder))
    return folder


def tiny(monkeypatch, base: str, **kwargs) -> str:
    """Register a two-block width-64 analogue of registry entry `base` (same family, arch and converter)."""
    name = f"tiny-{base}"
    monkeypatch.setitem(E.ENCODERS, name, dataclasses.replace(E.ENCODERS[base], model_kwargs={**L.TINY, **kwargs}))
    return name


def timm_twin(name: str, seed: int = 0, **extra) -> nn.Module:
    """The registry entry's timm network with random weights: what a converted file must reproduce."""
    spec = E.ENCODERS[name]
    kwargs = {**dict(num_classes=0, global_pool="", dynamic_img_size=True), **spec.model_kwargs, **extra}
    return L.randomize_(timm.create_model(spec.arch.split(".")[0], pretrained=False, **kwargs), seed).eval()


@torch.no_grad()
def timm_tokens(model: nn.Module, x: torch.Tensor, final_norm: bool) -> torch.Tensor:
    """Patch tokens through timm's plain forward: forward_features (normed) or the blocks output."""
    if final_norm:
        h = model.forward_features(x)
    else:
        h = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
    return h[:, model.num_prefix_tokens:]


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save_pth(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


# REPA's choice per family (train.py / utils.py): which tokens it aligns to.
REPA_FINAL_NORM = {"dinov2": True, "mocov3": True, "jepa": True, "mae": False, "clip": False}


# --------------------------------------------------------------------------- original layouts load exactly

def test_dinov2_vit_b_hub_checkpoint_reproduces_timm_tokens_on_a_16x16_grid(tmp_path):
    twin = timm_twin("dinov2-vit-b")
    hub = L.dinov2_hub(twin)
    assert hub["pos_embed"].shape == (1, 1 + 37 * 37, 768) and "mask_token" in hub
    enc = E.load_encoder(f"dinov2-vit-b={save_pth(hub, tmp_path / 'dinov2_vitb14_pretrain.pth')}")
    x = images(2, 256)
    tokens, pooled = enc.encode(x, grid=16)
    assert enc.input_size(16) == 224 and tokens.shape == (2, 256, 768) and pooled.shape == (2, 768)
    torch.testing.assert_close(tokens, timm_tokens(twin, enc.preprocess(x, 16), final_norm=True))
    torch.testing.assert_close(pooled, tokens.mean(1))


def test_dinov2_register_checkpoint_matches_dinov2s_own_token_layout(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "dinov2-vit-b-reg")
    twin = timm_twin(name)
    hub = L.dinov2_hub(twin)
    assert hub["register_tokens"].shape == (1, 4, 64) and hub["pos_embed"].shape[1] == 1 + 37 * 37
    enc = E.load_encoder(f"{name}={save_pth(hub, tmp_path / 'reg.pth')}")
    x = images(2, 48)
    tokens, _ = enc.encode(x, grid=6)
    assert enc.num_prefix_tokens == 5 and tokens.shape == (2, 36, 64)
    torch.testing.assert_close(tokens, L.dinov2_reg_tokens(hub, twin, enc.preprocess(x, 6), 6))


def test_dinov2_giant_swiglu_checkpoint_loads_its_w12_w3_mlp(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "dinov2-vit-g", mlp_ratio=4.0)  # real g: width 1536, 40 blocks, same SwiGLU MLP
    twin = timm_twin(name)
    hub = L.dinov2_hub(twin, swiglu=True)
    assert hub["blocks.0.mlp.w12.weight"].shape == (256, 64) and hub["blocks.0.mlp.w3.weight"].shape == (64, 128)
    enc = E.load_encoder(f"{name}={save_pth(hub, tmp_path / 'g.pth')}")
    x = images(2, 40)
    torch.testing.assert_close(enc.encode(x, 5)[0], timm_tokens(twin, enc.preprocess(x, 5), final_norm=True))


def test_mae_checkpoint_with_decoder_loads_and_its_tokens_skip_the_final_norm_as_in_repa(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "mae-vit-l")
    twin = timm_twin(name)
    enc = E.load_encoder(f"{name}={save_pth(L.mae(twin), tmp_path / 'mae.pth')}")
    x = images(2, 80)  # 80 px = 5 × 16: no resize; pos_embed 14×14 → 5×5
    tokens, _ = enc.encode(x, 5)
    prepared = enc.preprocess(x, 5)
    torch.testing.assert_close(tokens, timm_tokens(twin, prepared, REPA_FINAL_NORM["mae"]))
    assert not torch.allclose(tokens, timm_tokens(twin, prepared, final_norm=True), atol=1e-3)


def test_ijepa_checkpoint_loads_the_encoder_not_the_target_encoder(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "jepa-vit-h")
    twin = timm_twin(name)
    enc = E.load_encoder(f"{name}={save_pth(L.ijepa(twin), tmp_path / 'IN1K-vit.h.14-300e.pth.tar')}")
    assert enc.num_prefix_tokens == 0
    x = images(2, 64)
    torch.testing.assert_close(enc.encode(x, 4)[0], timm_tokens(twin, enc.preprocess(x, 4), REPA_FINAL_NORM["jepa"]))


@pytest.mark.parametrize("misnamed", [False, True])
def test_mocov3_checkpoint_keeps_only_the_base_encoder(tmp_path, monkeypatch, misnamed):
    kwargs = dict(embed_dim=32, depth=15, num_heads=2) if misnamed else {}  # the naming bug sits in blocks 13, 14
    name = tiny(monkeypatch, "mocov3-vit-b", **kwargs)
    twin = timm_twin(name)
    ckpt = L.mocov3(twin, misnamed=misnamed)
    assert misnamed == ("module.base_encoder.blocks.13.norm13.weight" in ckpt["state_dict"])
    enc = E.load_encoder(f"{name}={save_pth(ckpt, tmp_path / 'vit-b-300ep.pth.tar')}")
    x = images(2, 64)
    torch.testing.assert_close(enc.encode(x, 4)[0], timm_tokens(twin, enc.preprocess(x, 4), REPA_FINAL_NORM["mocov3"]))


def test_openai_clip_state_dict_matches_the_original_clip_forward_before_ln_post(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "clip-vit-L")
    sd = L.openai_clip(timm_twin(name))
    assert "visual.conv1.weight" in sd and "visual.transformer.resblocks.1.attn.in_proj_weight" in sd
    enc = E.load_encoder(f"{name}={save_pth(sd, tmp_path / 'ViT-L-14.pth')}")
    x = images(2, 32)
    tokens, _ = enc.encode(x, 4)  # 32 px → 56 px, 4×4 patches of 14
    assert not REPA_FINAL_NORM["clip"]
    torch.testing.assert_close(tokens, L.openai_clip_tokens(sd, enc.preprocess(x, 4), 4, num_heads=2))


def test_siglip_timm_safetensors_with_attention_pool_head_loads(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "siglip-vit-b")
    full = timm_twin(name, global_pool="map", num_classes=10)  # as published: with attn_pool and head
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    enc = E.load_encoder(f"{name}={path}")
    x = images(2, 64)
    torch.testing.assert_close(enc.encode(x, 4)[0], timm_tokens(full, enc.preprocess(x, 4), final_norm=True))
    assert enc.spec.family.mean == (0.5, 0.5, 0.5)


def test_plain_timm_model_name_loads_a_timm_layout_file(tmp_path):
    twin = L.randomize_(timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True), 3).eval()
    path = tmp_path / "vit_tiny.safetensors"
    save_file(twin.state_dict(), str(path))
    enc = E.load_encoder(f"vit_tiny_patch16_224={path}")
    x = images(1, 48)
    assert enc.arch == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default tag: its mean, std
    assert enc.describe()["weights"] == E.file_sha256(path)
    torch.testing.assert_close(enc.encode(x, 3)[0], timm_tokens(twin, enc.preprocess(x, 3), final_norm=True))


# --------------------------------------------------------------------------- grids and preprocessing

def test_mae_vit_b_at_256_pixels_gives_256_tokens_without_resizing():
    enc = E.load_encoder("mae-vit-b", random_init=True)
    x = images(1, 256)
    norm = (x - torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)
    assert enc.input_size(16) == 256 and torch.equal(enc.preprocess(x, 16), norm)
    tokens, pooled = enc.encode(x, 16)
    assert tokens.shape == (1, 256, 768) and pooled.shape == (1, 768)


@pytest.mark.parametrize("base,mean,std", [("dinov2-vit-b", E.IMAGENET_MEAN, E.IMAGENET_STD),
                                           ("clip-vit-L", E.CLIP_MEAN, E.CLIP_STD)])
def test_preprocessing_is_repas_bicubic_resize_and_normalisation(monkeypatch, base, mean, std):
    enc = E.load_encoder(tiny(monkeypatch, base), random_init=True)
    x = images(2, 256)
    norm = lambda t: (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    repa = F.interpolate(norm(x), 224, mode="bicubic")  # REPA's train.py: normalise, then resize
    torch.testing.assert_close(enc.preprocess(x, 16), repa, atol=1e-5, rtol=1e-5)


def test_encode_refuses_images_outside_0_1(monkeypatch):
    enc = E.load_encoder(tiny(monkeypatch, "dinov2-vit-s"), random_init=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc.encode(images(1, 28) * 2 - 1, 2)


# --------------------------------------------------------------------------- weights: where from, and errors

def test_missing_weights_error_names_the_flag_the_official_file_and_its_url():
    with pytest.raises(UserError) as e:
        E.load_encoder("dinov2-vit-b")
    msg = str(e.value)
    assert "--encoder dinov2-vit-b=/path/to/dinov2_vitb14_pretrain.pth" in msg and "\n" not in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth" in msg


def test_weights_folder_is_searched_for_the_official_file_name(monkeypatch, empty_weights_dir):
    name = tiny(monkeypatch, "dinov2-vit-b")
    path = save_pth(L.dinov2_hub(timm_twin(name)), empty_weights_dir / "dinov2_vitb14_pretrain.pth")
    enc = E.load_encoder(name)
    assert enc.weights_path == path and enc.source == "file" and not enc.random_init
    row = next(r for r in E.encoders_table() if r["name"] == name)
    assert row["weights"] == str(path)


def test_random_weights_only_on_request_and_recorded_everywhere(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "dinov2-vit-s")
    torch.manual_seed(1)
    rand_a = E.load_encoder(name, random_init=True)
    torch.manual_seed(2)
    rand_b = E.load_encoder(name, random_init=True)
    x = images(1, 28)
    assert torch.equal(rand_a.encode(x, 2)[0], rand_b.encode(x, 2)[0])  # its own seed: the same in every run
    assert rand_a.describe()["weights"] == "RANDOM" and rand_a.weights_sha256 is None
    path = save_pth(L.dinov2_hub(timm_twin(name)), tmp_path / "w.pth")
    trained = E.load_encoder(f"{name}={path}")
    assert trained.describe(16)["weights"] == E.file_sha256(path)
    assert trained.fingerprint(16) != rand_a.fingerprint(16) and trained.fingerprint(16) != trained.fingerprint(8)
    with pytest.raises(UserError, match="exclude each other"):
        E.load_encoder(f"{name}={path}", random_init=True)


def test_fingerprint_ignores_where_the_file_lies(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "dinov2-vit-s")
    path = save_pth(L.dinov2_hub(timm_twin(name)), tmp_path / "w.pth")
    (tmp_path / "elsewhere").mkdir()
    copy = Path(shutil.copy(path, tmp_path / "elsewhere" / "w.pth"))
    a, b = E.load_encoder(f"{name}={path}"), E.load_encoder(f"{name}={copy}")
    assert a.weights_path != b.weights_path and a.fingerprint(16) == b.fingerprint(16)


def test_truncated_pth_is_a_clear_error(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "dinov2-vit-s")
    path = save_pth(L.dinov2_hub(timm_twin(name)), tmp_path / "cut.pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=r"encoder weights '.*cut\.pth' is truncated or corrupt"):
        E.load_encoder(f"{name}={path}")


def test_truncated_safetensors_is_a_clear_error(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "siglip-vit-b")
    path = tmp_path / "cut.safetensors"
    save_file(timm_twin(name).state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match=r"cut\.safetensors: not a readable safetensors file"):
        E.load_encoder(f"{name}={path}")


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint could do."""
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "dinov2-vit-s")
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 64), "x": _Payload(str(target))}, path)
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "probe")))).close()  # the payload is live ...
    assert (tmp_path / "probe").exists()
    with pytest.raises(UserError, match=r"refused to load encoder weights '.*evil\.pth': its pickle would import "
                                        r"'(builtins|io)\.open'.*re-save just its state dict") as e:
        E.load_encoder(f"{name}={path}")
    assert not target.exists() and str(e.value).endswith("torch.save(sd, new_path)")   # whole, not cut


class _Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 2, bias=False)

    def forward(self, x):
        return self.conv1(x)


def test_torchscript_archive_is_refused_with_a_conversion_hint(tmp_path, monkeypatch):
    path = tmp_path / "ViT-L-14.pt"
    with pytest.warns(FutureWarning):
        torch.jit.script(_Scripted()).save(str(path))
    with pytest.raises(UserError, match=r"TorchScript archive .*torch\.jit\.load"):
        E.load_encoder(f"{tiny(monkeypatch, 'clip-vit-L')}={path}")


def test_weights_of_another_size_or_depth_are_rejected_naming_the_keys(tmp_path, monkeypatch):
    name = tiny(monkeypatch, "dinov2-vit-s")
    wide = L.dinov2_hub(timm_twin(name, embed_dim=96, num_heads=2))
    with pytest.raises(UserError, match=r"do not fit .*shape cls_token \(1, 1, 96\) vs \(1, 1, 64\)"):
        E.load_encoder(f"{name}={save_pth(wide, tmp_path / 'wide.pth')}")
    deep = L.dinov2_hub(timm_twin(name, depth=3))
    with pytest.raises(UserError, match=r"unexpected blocks\.2\."):
        E.load_encoder(f"{name}={save_pth(deep, tmp_path / 'deep.pth')}")
    shallow = {k: v for k, v in L.dinov2_hub(timm_twin(name)).items() if not k.startswith("blocks.1.")}
    with pytest.raises(UserError, match=r"missing blocks\.1\."):
        E.load_encoder(f"{name}={save_pth(shallow, tmp_path / 'shallow.pth')}")


def test_missing_weight_file_and_no_timm_download_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"nope\.pth: no such file"):
        E.load_encoder(f"dinov2-vit-b={tmp_path / 'nope.pth'}")
    monkeypatch.setenv("REPA_PROBE_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(UserError, match=r"'mocov3-vit-l' has no timm download; .*--encoder mocov3-vit-l="):
        E.load_encoder("mocov3-vit-l", pretrained_download=True)     # no official address either
    monkeypatch.setenv("REPA_PROBE_MIRROR", "http://127.0.0.1:9")     # nothing listens: the fetch fails at once
    with pytest.raises(UserError, match=r"downloading http://127\.0\.0\.1:9/vit-b-300ep\.pth\.tar failed"):
        E.load_encoder("mocov3-vit-b", pretrained_download=True)


def test_pretrained_download_is_timms_own_loader_and_offline_failure_is_one_clear_line(monkeypatch):
    name = tiny(monkeypatch, "siglip-vit-b")
    downloaded, calls = timm_twin(name, global_pool="map"), []

    def fake_create_model(arch, pretrained=False, **kwargs):  # what timm returns once downloaded
        calls.append((arch, pretrained, kwargs))
        return downloaded

    monkeypatch.setattr(E.timm, "create_model", fake_create_model)
    enc = E.load_encoder(name, pretrained_download=True)
    (arch, pretrained, kwargs), = calls
    assert (arch, pretrained, "global_pool" in kwargs) == ("vit_base_patch16_siglip_256.webli", True, False)
    assert enc.source == "timm-download" and len(enc.weights_sha256) == 64 and enc.weights_path is None

    def offline(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known\nretrying")

    monkeypatch.setattr(E.timm, "create_model", offline)
    with pytest.raises(UserError, match=r"timm could not download .*Name or service not known\); pass a local file"):
        E.load_encoder(name, pretrained_download=True)


# --------------------------------------------------------------------------- names and the registry

def test_unknown_encoder_name_suggests_close_names():
    with pytest.raises(UserError) as e:
        E.load_encoder("dinov2-vit-x")
    assert "unknown encoder 'dinov2-vit-x'" in str(e.value) and "dinov2-vit-s" in str(e.value)


def test_names_are_repas_case_insensitive_and_aliased():
    assert E.get_encoder_spec("clip-vit-l")[0] == "clip-vit-L"
    assert E.get_encoder_spec("dinov2reg-vit-b")[0] == "dinov2-vit-b-reg"
    assert E.get_encoder_spec("vit_base_patch14_dinov2.lvd142m")[1].arch == "vit_base_patch14_dinov2.lvd142m"


def test_parse_encoder_spec_splits_name_and_path():
    assert E.parse_encoder_spec("dinov2-vit-b=/w/a=b.pth") == ("dinov2-vit-b", Path("/w/a=b.pth"))
    assert E.parse_encoder_spec(" mae-vit-l ") == ("mae-vit-l", None)
    for bad in ("=x.pth", "mae-vit-l="):
        with pytest.raises(UserError, match="--encoder"):
            E.parse_encoder_spec(bad)


def test_encoders_table_gives_grids_and_dims_of_every_entry_without_building_big_models():
    rows = {r["name"]: r for r in E.encoders_table()}
    assert set(rows) >= {"dinov2-vit-b", "dinov2-vit-g-reg", "mae-vit-l", "jepa-vit-h", "mocov3-vit-l", "clip-vit-L",
                         "siglip-so400m"}
    assert (rows["dinov2-vit-g"]["dim"], rows["dinov2-vit-g"]["input_size"]) == (1536, 224)
    assert (rows["mae-vit-l"]["dim"], rows["mae-vit-l"]["input_size"]) == (1024, 256)
    assert (rows["jepa-vit-h"]["dim"], rows["clip-vit-L"]["dim"], rows["siglip-so400m"]["dim"]) == (1280, 1024, 1152)
    assert all(r["grid"] == "16x16" for n, r in rows.items() if n != "cifar-ssl-resnet")   # its own: test below
    assert all(r["weights"] == "not found" for n, r in rows.items() if E.ENCODERS[n].bundled is None)
    assert rows["cifar-ssl-resnet"]["weights"].endswith("cifar_ssl_resnet.safetensors")  # ships with the package


class _PatchMean(nn.Module):
    """A non-timm encoder: a CLS token and 4×4 patch projections, as a CIFAR teacher might be."""
    num_prefix_tokens = 1

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))

    def forward_features(self, x):
        h = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), h], dim=1)


def test_registered_custom_encoder_builds_loads_and_encodes(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "ENCODERS", E.ENCODERS.copy())
    spec = E.EncoderSpec(E.Family("cifar-ssl", weights_hint="our CIFAR-10 teacher run"), builder=_PatchMean,
                         patch_size=4, embed_dim=8, weight_files=("cifar_ssl_tiny.pth",))
    E.register_encoder("cifar-ssl-tiny", spec)
    with pytest.raises(ValueError, match="already registered"):
        E.register_encoder("cifar-ssl-tiny", spec)
    src = L.randomize_(_PatchMean())
    enc = E.load_encoder(f"cifar-ssl-tiny={save_pth(src.state_dict(), tmp_path / 'cifar_ssl_tiny.pth')}")
    x = images(2, 32)
    tokens, pooled = enc.encode(x, 8)
    expected = src.forward_features(enc.preprocess(x, 8))[:, 1:]
    assert tokens.shape == (2, 64, 8)
    torch.testing.assert_close(tokens, expected.detach())
    assert next(r for r in E.encoders_table() if r["name"] == "cifar-ssl-tiny")["timm_arch"] == "(custom)"


def test_encode_refuses_images_outside_0_1_unless_the_hot_loop_skips_the_check():
    enc = E.load_encoder("cifar-ssl-resnet")
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        enc.encode(images * 255, grid=8)
    tokens, pooled = enc.encode(images * 255, grid=8, check_range=False)   # the trainer: images from uint8, always in range
    assert tokens.shape == (2, 64, enc.embed_dim) and torch.isfinite(pooled).all()


def test_bf16_encoder_is_close_to_fp32_on_real_images_and_keyed_apart(cifar_dir):
    from repa_probe.capture import make_dataset
    dataset = make_dataset(cifar_dir / "test", 32, n=16)
    x = torch.stack([dataset[i][0] for i in range(16)]).float() / 255
    fp32, bf16 = (E.load_encoder("cifar-ssl-resnet", precision=p) for p in ("fp32", "bf16"))
    (tok32, pooled32), (tok16, pooled16) = fp32.encode(x, 8), bf16.encode(x, 8)
    assert tok16.dtype == torch.float32 and tok16.shape == tok32.shape
    assert not torch.equal(pooled16, pooled32)                           # bf16 really ran
    assert ((pooled16 - pooled32).norm() / pooled32.norm()) < 2e-2
    assert "autocast" not in fp32.describe(8) and bf16.describe(8)["autocast"] == "bf16"
    assert fp32.fingerprint(8) != bf16.fingerprint(8)                    # cached apart
    with pytest.raises(UserError, match="--encoder-precision 'fp16': use auto, fp32 or bf16"):
        E.load_encoder("cifar-ssl-resnet", precision="fp16")


def test_centred_deviation_ignores_a_common_shift_and_measures_against_the_spread():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=g, dtype=torch.float64) + 100.0  # a large common offset, as activations have
    assert E.centred_deviation(a, a + torch.randn(16, generator=g, dtype=torch.float64)) < 1e-12  # same shift for all
    noise = torch.randn(8, 16, generator=g, dtype=torch.float64)
    noise -= noise.mean(0)
    spread = (a - a.mean(0)).norm()
    assert E.centred_deviation(a, a + 0.01 * spread / noise.norm() * noise) == pytest.approx(0.01, rel=1e-9)


def test_auto_precision_checks_real_images_in_both_precisions_and_keys_the_cache_as_it_chose(cifar_dir, monkeypatch):
    from repa_probe.capture import make_dataset
    dataset = make_dataset(cifar_dir / "test", 32, n=16)
    x = torch.stack([dataset[i][0] for i in range(16)]).float() / 255
    fp32, bf16 = (E.load_encoder("cifar-ssl-resnet", precision=p) for p in ("fp32", "bf16"))
    auto = E.load_encoder("cifar-ssl-resnet", precision="auto")
    with pytest.raises(RuntimeError, match="not chosen yet"):
        auto.fingerprint(8)                                             # no cache key before the choice
    note = E.choose_precision(auto, x, 8)
    if not E.bf16_native(torch.device("cpu")):
        assert auto.precision == "fp32" and "no native bf16" in note
        return
    # the deviation, computed here from the two explicitly loaded encoders on the first 8 images
    p32, p16 = fp32.encode(x[:8], 8)[1].double(), bf16.encode(x[:8], 8)[1].double()
    d = (p16 - p32) - (p16 - p32).mean(0)
    expected = float(d.norm() / (p32 - p32.mean(0)).norm())
    assert 1e-4 < expected < E.DEVIATION_LIMIT                         # bf16 really moves them, a little
    assert auto.precision == "bf16" and f"moved {expected:.1e} of their spread" in note
    assert auto.fingerprint(8) == bf16.fingerprint(8)                  # the same cache entry as explicit bf16
    assert torch.equal(auto.encode(x, 8)[1], bf16.encode(x, 8)[1])

    monkeypatch.setattr(E, "DEVIATION_LIMIT", expected / 2)            # a stricter limit: this encoder fails it
    strict = E.load_encoder("cifar-ssl-resnet", precision="auto")
    assert strict.encode(x, 8)[1].equal(fp32.encode(x, 8)[1])          # first use chooses, on its own images
    assert strict.precision == "fp32" and strict.fingerprint(8) == fp32.fingerprint(8)
    assert f"fp32 (--encoder-precision auto: under bf16 its pooled features of 8 images moved {expected:.1e}" \
        in strict.precision_note


def test_encoders_command_shows_the_cifar_teachers_own_8x8_map_resampled_to_the_grid():
    """The teacher's tokens are its trunk's map (stride 4: 8×8 at 32 px, as its card says), resampled to the
    grid; the table said 16x16. Checked against the real trunk's map at the table's input size."""
    trunk = teacher.load_teacher()
    result = run_cli("encoders")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split()[2:4] == ["input_size", "grid"]
    rows = {line.split()[0]: line.split()[2:4] for line in lines}
    assert rows["cifar-ssl-resnet"] == ["32", "8x8→16x16"] and rows["dinov2-vit-b"] == ["224", "16x16"]
    for grid in (16, 7, 1):
        row = next(r for r in E.encoders_table(grid) if r["name"] == "cifar-ssl-resnet")
        side = trunk.forward_features(torch.zeros(1, 3, row["input_size"], row["input_size"])).shape[-1]
        assert row["grid"] == (f"{side}x{side}→{grid}x{grid}" if side != grid else f"{grid}x{grid}")
    assert side == 1
