"""The committed CIFAR-10 SimCLR teacher (repa_probe/teacher.py, repa_probe/assets/cifar_ssl_resnet.*)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_probe import teacher as T

from conftest import REPO

sys.path.insert(0, str(REPO / "analyses"))
import train_teacher  # noqa: E402


@pytest.fixture(scope="module")
def model() -> T.CifarResNet:
    return T.load_teacher()


@pytest.fixture(scope="module")
def cifar_small(cifar_dir):
    """First 30 train and 20 test images of every class, in [0, 1]."""
    out = {}
    for split, n in (("train", 30), ("test", 20)):
        x, y = train_teacher.load_split(cifar_dir, split, limit_per_class=n)
        out[split] = (x.float() / 255, y)
    return out


def test_committed_weights_load_and_carry_their_card(model):
    path = T.weights_path()
    assert path.stat().st_size <= 25e6
    assert path.with_suffix(".md").is_file()
    meta = T.read_metadata(path)
    assert "SimCLR" in meta["method"]
    assert int(meta["epochs"]) > 0 and meta["seed"].isdigit()
    assert float(meta["linear_probe_top1_cifar10_test"]) >= 0.70
    assert float(meta["untrained_probe_top1"]) < float(meta["linear_probe_top1_cifar10_test"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "head")  # the projection head is a training-only part


def test_32px_images_give_a_16x16_token_grid_whose_mean_is_the_pooled_vector(model):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens, pooled = T.encode(model, x, grid=16)
    assert tokens.shape == (3, 256, model.embed_dim) and pooled.shape == (3, model.embed_dim)
    assert tokens.dtype == pooled.dtype == torch.float32
    torch.testing.assert_close(tokens.mean(dim=1), pooled, atol=1e-5, rtol=1e-5)


def test_other_grids_resample_the_native_8x8_map(model):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    native, pooled = T.encode(model, x, grid=8)
    fmap = model.forward_features(T.normalize(x))
    torch.testing.assert_close(native, fmap.flatten(2).transpose(1, 2))  # grid 8: the map itself, row-major
    for grid in (4, 12, 16, 32):
        tokens, pooled_g = T.encode(model, x, grid=grid)
        assert tokens.shape == (2, grid * grid, model.embed_dim)
        torch.testing.assert_close(pooled_g, pooled)  # pooled never depends on the grid
    torch.testing.assert_close(T.encode(model, x, grid=4)[0].mean(dim=1), pooled, atol=1e-5, rtol=1e-5)
    # token (i, j) of the 16×16 grid is the bilinear resample of the map
    up = F.interpolate(fmap, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(T.encode(model, x, grid=16)[0][:, 5 * 16 + 9], up[:, :, 5, 9])


def test_encoding_is_deterministic_and_the_same_after_reloading(model):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a = T.encode(model, x, grid=16)
    b = T.encode(T.load_teacher(), x, grid=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _nearest_class_mean(train, y_train, test, y_test) -> float:
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    means = F.normalize(torch.stack([train[y_train == c].mean(0) for c in range(10)]), dim=1)
    return float(((test @ means.T).argmax(1) == y_test).float().mean())


def test_trained_teacher_separates_real_cifar_classes_far_better_than_its_initialisation(model, cifar_small):
    """Fails if the committed weights were random: nearest-class-mean on real images, 300 train / 200 test."""
    (x_tr, y_tr), (x_te, y_te) = cifar_small["train"], cifar_small["test"]
    untrained = T.build_untrained(model.config, seed=0)
    acc = {}
    for name, net in (("trained", model), ("untrained", untrained)):
        acc[name] = _nearest_class_mean(T.encode(net, x_tr)[1], y_tr, T.encode(net, x_te)[1], y_te)
    assert acc["trained"] >= 0.4, acc        # 10 classes: chance is 0.1
    assert acc["trained"] >= acc["untrained"] + 0.2, acc


def test_full_area_crops_span_the_image_and_half_are_mirrored():
    g = torch.Generator().manual_seed(0)
    ramp = torch.arange(32.0) / 31
    x = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.zeros(32, 32)])  # x, y, 0
    crops = train_teacher.random_resized_crop(x.expand(64, 3, 32, 32), 32, (1.0, 1.0), g)
    # area 1 with an aspect ratio ≠ 1: the long side is clamped to the image, so a full row or column remains
    cols, rows = crops[:, 0, 16], crops[:, 1, :, 16]
    full_x = ((cols[:, 0] - 0).abs() < 1e-5) & ((cols[:, -1] - 1).abs() < 1e-5)
    mirrored = ((cols[:, 0] - 1).abs() < 1e-5) & ((cols[:, -1] - 0).abs() < 1e-5)
    full_y = ((rows[:, 0] - 0).abs() < 1e-5) & ((rows[:, -1] - 1).abs() < 1e-5)
    assert bool((full_x | mirrored | full_y).all())
    flipped = cols[:, -1] < cols[:, 0]
    assert 16 < int(flipped.sum()) < 48


def test_augmented_views_are_normalised_images_of_the_requested_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    jittered = train_teacher.color_jitter(x.float() / 255, g)
    assert jittered.shape == x.shape and 0 <= float(jittered.min()) and float(jittered.max()) <= 1
    view = train_teacher.simclr_view(x, 24, (0.2, 1.0), g)
    assert view.shape == (64, 3, 24, 24) and torch.isfinite(view).all()


def test_nt_xent_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    z, tau = torch.randn(8, 5, generator=g), 0.2
    zn = F.normalize(z, dim=1)
    s = zn @ zn.T / tau
    losses = []
    for i in range(8):
        j = (i + 4) % 8
        denom = sum(np.exp(float(s[i, k])) for k in range(8) if k != i)
        losses.append(-float(s[i, j]) + np.log(denom))
    assert abs(float(train_teacher.nt_xent(z, tau)) - np.mean(losses)) < 1e-4


def test_resumed_training_continues_exactly_like_an_uninterrupted_run(tmp_path, cifar_dir):
    common = ["--data", str(cifar_dir), "--limit-per-class", "8", "--batch-size", "32", "--stem", "8",
              "--widths", "8", "16", "16", "--log-every", "100", "--epochs", "2"]
    threads = torch.get_num_threads()
    try:
        train_teacher.main(train_teacher.parse_args([*common, "--out", str(tmp_path / "straight")]))
        train_teacher.main(train_teacher.parse_args([*common, "--out", str(tmp_path / "resumed"), "--stop-after", "1"]))
        train_teacher.main(train_teacher.parse_args([*common, "--out", str(tmp_path / "resumed"), "--resume"]))
    finally:
        torch.set_num_threads(threads)  # main() sets its own thread count
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_encoder_registry_serves_the_bundled_teacher_by_name_without_a_weights_flag(model):
    from repa_probe.encoders import load_encoder

    enc = load_encoder("cifar-ssl-resnet")
    assert enc.weights_path == T.weights_path() and not enc.random_init
    assert model.config == T.TeacherConfig()  # the registry's builder is the committed architecture
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens, pooled = enc.encode(x, grid=16)
    expected = T.encode(model, x, grid=16)
    torch.testing.assert_close(tokens, expected[0])
    torch.testing.assert_close(pooled, expected[1], atol=1e-5, rtol=1e-5)
    assert enc.describe(16)["input_size"] == 32 and enc.embed_dim == model.embed_dim
    random = load_encoder("cifar-ssl-resnet", random_init=True)
    torch.testing.assert_close(random.encode(x, 16)[0], T.encode(T.build_untrained(), x, 16)[0])
