"""Spatial-structure measures (docs/spatial.md) against known answers and a literal pair-loop reference."""

import math

import numpy as np
import pandas as pd

import pytest
import torch
import torch.nn.functional as F

from repa_probe import spatial
from repa_probe.errors import UserError
from repa_probe.spatial import (
    SPATIAL_METRICS,
    SpatialMetric,
    correlation_decay_slope,
    local_distant_similarity,
    register_spatial_metric,
    rms_spatial_contrast,
    semantic_region_self_similarity,
    similarity_profile,
    spatial_scores,
)

GRID = (16, 16)


def smooth_field(n: int, grid=GRID, d: int = 32, sigma: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Gaussian-blurred white noise, (n, H·W, d) row-major: nearby tokens similar, distant ones not."""
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    k = int(3 * sigma)
    ax = torch.arange(-k, k + 1, dtype=torch.float64)
    k1 = torch.exp(-ax**2 / (2 * sigma**2))
    kernel = (k1[:, None] * k1[None, :] / k1.sum() ** 2).expand(d, 1, -1, -1)
    noise = torch.randn(n, d, h + 2 * k, w + 2 * k, generator=g, dtype=torch.float64)
    return F.conv2d(noise, kernel, groups=d).flatten(2).transpose(1, 2)


def shuffle_positions(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The same tokens, put in a different random order in every image."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(x.shape[1], generator=g) for _ in range(x.shape[0])])
    return torch.gather(x, 1, perm[:, :, None].expand_as(x))


@pytest.fixture(scope="module")
def field():
    return smooth_field(16)


# ----------------------------------------------------------------------------- literal references

def ref_cos(a, b) -> float:
    dot = sum(p * q for p, q in zip(a, b))
    return dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))


def ref_pairs(grid):
    """Every ordered pair of cells (t, t') with its Manhattan distance, t = i·W + j."""
    h, w = grid
    cells = [(i, j) for i in range(h) for j in range(w)]
    for t, (i, j) in enumerate(cells):
        for s, (k, l) in enumerate(cells):
            yield t, s, abs(i - k) + abs(j - l)


def ref_lds(img, grid, r_near, r_far) -> float:
    near = [ref_cos(img[t], img[s]) for t, s, d in ref_pairs(grid) if 0 < d < r_near]
    far = [ref_cos(img[t], img[s]) for t, s, d in ref_pairs(grid) if d >= r_far]
    return sum(near) / len(near) - sum(far) / len(far)


def ref_cds(img, grid, max_distance) -> float:
    by_d = {}
    for t, s, d in ref_pairs(grid):
        if 1 <= d <= max_distance:
            by_d.setdefault(d, []).append(ref_cos(img[t], img[s]))
    ds = sorted(by_d)
    means = [sum(by_d[d]) / len(by_d[d]) for d in ds]
    d_bar, m_bar = sum(ds) / len(ds), sum(means) / len(means)
    slope = (sum((d - d_bar) * (m - m_bar) for d, m in zip(ds, means))
             / sum((d - d_bar) ** 2 for d in ds))
    return -slope


def ref_rmsc(img) -> float:
    units = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in img]
    mean = [sum(col) / len(units) for col in zip(*units)]
    return math.sqrt(sum(sum((v - m) ** 2 for v, m in zip(row, mean)) for row in units) / len(units))


def ref_srss(img, fg, grid, d_pos, d_neg) -> float:
    pos, neg = {}, {}
    for t, s, d in ref_pairs(grid):
        if fg[t] and fg[s] and 1 <= d <= d_pos:
            pos.setdefault(t, []).append(ref_cos(img[t], img[s]))
        if fg[t] and not fg[s] and d >= d_neg:
            neg.setdefault(t, []).append(ref_cos(img[t], img[s]))
    deltas = [sum(pos[t]) / len(pos[t]) - sum(neg[t]) / len(neg[t]) for t in pos if t in neg]
    return sum(deltas) / len(deltas) if deltas else math.nan


def test_fast_equals_pair_loops_on_a_tiny_input():
    """4×5 grid (not square: a transposed grid would fail), 3 images, d = 3, float32 input."""
    grid = (4, 5)
    x = torch.randn(3, 20, 3, generator=torch.Generator().manual_seed(0))
    x[2] = x[2].abs()        # mostly positive cosines: a different regime
    fg = torch.zeros(3, 20, dtype=torch.bool)
    fg[0, [0, 1, 5, 6, 7]] = True                       # a blob in the top-left corner
    fg[1, 10:] = True                                   # the bottom half
    fg[2, :] = True                                     # no background: SRSS undefined
    imgs = x.double().tolist()
    for b, img in enumerate(imgs):
        assert local_distant_similarity(x, grid)[b] == pytest.approx(ref_lds(img, grid, 2, 6), abs=1e-6)
        assert local_distant_similarity(x, grid, 3, 4)[b] == pytest.approx(ref_lds(img, grid, 3, 4), abs=1e-6)
        assert correlation_decay_slope(x, grid)[b] == pytest.approx(ref_cds(img, grid, 8), abs=1e-6)
        assert correlation_decay_slope(x, grid, 4)[b] == pytest.approx(ref_cds(img, grid, 4), abs=1e-6)
        assert rms_spatial_contrast(x, grid)[b] == pytest.approx(ref_rmsc(img), abs=1e-6)
        want = ref_srss(img, fg[b].tolist(), grid, 1, 3)
        got = float(semantic_region_self_similarity(x, grid, fg, d_neg=3)[b])
        assert (math.isnan(got) and math.isnan(want)) if b == 2 else got == pytest.approx(want, abs=1e-6)


def test_smooth_field_is_structured_and_shuffling_destroys_it(field):
    lds = local_distant_similarity(field, GRID)
    assert lds.dtype == torch.float64 and lds.shape == (16,)
    assert lds.min() > 0.7                               # measured ≈ 0.82–0.92 (σ = 2 cells)
    assert correlation_decay_slope(field, GRID).min() > 0.08
    shuffled = shuffle_positions(field)
    lds_s = local_distant_similarity(shuffled, GRID)
    # a random placement makes near and far pairs exchangeable: E[LDS] = 0. Over 50 shuffles the
    # per-image SD is ≈ 0.013 and the SD of the 16-image mean ≈ 0.004.
    assert lds_s.abs().max() < 0.06
    assert abs(float(lds_s.mean())) < 0.02
    assert abs(float(correlation_decay_slope(shuffled, GRID).mean())) < 0.005
    # RMSC does not look at positions at all
    torch.testing.assert_close(rms_spatial_contrast(shuffled, GRID), rms_spatial_contrast(field, GRID),
                               rtol=0, atol=1e-12)


def test_profile_decays_with_distance(field):
    prof = similarity_profile(field, GRID).mean(0)
    assert prof[0] == pytest.approx(1.0, abs=1e-6)       # every token with itself
    assert bool((prof[1:9].diff() < 0).all())           # strictly falling over the first 8 distances
    assert prof[1] > 0.85 and abs(float(prof[12])) < 0.1


def test_invariant_to_rotation_and_positive_scaling(field):
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    scale = torch.rand(16, 256, 1, generator=g, dtype=torch.float64) * 10 + 0.1      # per token
    base = spatial_scores(field, GRID)
    for moved in (field @ q, field * scale, 7.5 * field):
        for name, value in spatial_scores(moved, GRID).items():
            torch.testing.assert_close(value, base[name], rtol=0, atol=1e-10)


def test_closed_forms():
    same = torch.ones(2, 64, 8)                          # every token identical: float32 rounding, or none
    for dtype, atol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        for value in spatial_scores(same.to(dtype), (8, 8)).values():
            torch.testing.assert_close(value, torch.zeros(2, dtype=torch.float64), rtol=0, atol=atol)
    ortho = torch.eye(64, dtype=torch.float64)[None]     # 64 orthonormal tokens: all cosines 0
    assert rms_spatial_contrast(ortho, (8, 8)).item() == pytest.approx(math.sqrt(1 - 1 / 64), abs=1e-12)
    assert local_distant_similarity(ortho, (8, 8)).item() == pytest.approx(0.0, abs=1e-12)
    # column stripes: token j mod 2 is e1 or e2, so K = 1 when the column offset is even, else 0.
    # Near pairs (d = 1): the vertical ones (K = 1) are 2·7·8 of 2·(7·8 + 8·7), LDS_near = 1/2.
    stripes = torch.eye(2)[torch.arange(64) % 8 % 2][None]
    pairs = [(abs(a // 8 - b // 8) + abs(a % 8 - b % 8), (a - b) % 2 == 0)
             for a in range(64) for b in range(64)]
    far_mean = sum(k for d, k in pairs if d >= 6) / sum(1 for d, _ in pairs if d >= 6)
    assert local_distant_similarity(stripes, (8, 8)).item() == pytest.approx(0.5 - far_mean, abs=1e-12)


def test_zero_tokens_and_chunking_do_not_change_results(field, monkeypatch):
    whole = spatial_scores(field, GRID)
    monkeypatch.setattr(spatial, "GRAM_ENTRIES_PER_CHUNK", 3 * 256 * 256)     # chunks of 3 images
    for name, value in spatial_scores(field, GRID).items():
        torch.testing.assert_close(value, whole[name], rtol=0, atol=1e-12)
    x = field[:1].clone()
    x[0, 0] = 0                                          # a zero token: cosine 0, no NaN
    assert torch.isfinite(torch.stack(list(spatial_scores(x, GRID).values()))).all()


def test_errors_and_registry():
    x = torch.randn(2, 16, 4)
    with pytest.raises(UserError, match="grid"):
        local_distant_similarity(x, (4, 5))
    with pytest.raises(UserError, match="3-D"):
        local_distant_similarity(x[0], (4, 4))
    with pytest.raises(UserError, match="r_near"):
        local_distant_similarity(x, (4, 4), r_near=2, r_far=7)     # largest distance on 4×4 is 6
    with pytest.raises(UserError, match="unknown spatial metric"):
        spatial_scores(x, (4, 4), ["nope"])
    assert set(SPATIAL_METRICS) >= {"lds", "cds", "rmsc"}
    with pytest.raises(ValueError, match="already registered"):
        register_spatial_metric(SpatialMetric("lds", "LDS", local_distant_similarity))
    extra = register_spatial_metric(SpatialMetric("mean_near", "near cosine",
                                                  lambda t, g: similarity_profile(t, g)[:, 1]))
    try:
        assert spatial_scores(x, (4, 4), ["mean_near"])["mean_near"].shape == (2,)
    finally:
        del SPATIAL_METRICS[extra.name]


# ---------------------------------------------------------------------------------------------
#                      In analyze: every block's tokens, the input's, the encoder's
# ---------------------------------------------------------------------------------------------

def test_capture_records_each_blocks_spatial_measures_from_its_tokens():
    """capture_batch(reductions=("spatial",)) gives, per block, the measures of exactly the tokens the block produced."""
    from conftest import hooked_tokens, randomize_, tiny_config
    from repa_probe.capture import capture_batch, noisy_input
    from repa_probe.families.sit import as_checkpoint
    from repa_probe.models import SiT
    from repa_probe.spatial import spatial_matrix
    model = randomize_(SiT(tiny_config(z_dims=[], encoder_depth=0)), seed=2).eval()
    ckpt = as_checkpoint(model, "repa")
    x0, ids = torch.rand(4, 3, 16, 16) * 2 - 1, torch.arange(4)
    _, raw = capture_batch(ckpt, x0, None, ids, 0.5, seed=0, reductions=("spatial",))
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.5, 0)
    tokens, _ = hooked_tokens(model, x_t, timestep, torch.full((4,), 10))
    want = torch.stack([spatial_matrix(h) for h in tokens])
    torch.testing.assert_close(raw["spatial"], want, rtol=0, atol=0)
    thumb = torch.nn.functional.avg_pool2d(x_t, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(raw["raw_spatial"], spatial_matrix(thumb), rtol=0, atol=0)


def test_analyze_spatial_curves_baselines_and_encoder_reference(tmp_path, cifar_dir):
    import repa_probe
    from conftest import randomize_, tiny_config
    from repa_probe.capture import CaptureConfig
    from repa_probe.checkpoints import save_checkpoint
    from repa_probe.models import SiT
    assert "spatial" not in CaptureConfig().key()               # caches made before spatial capture stay valid
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    save_checkpoint(tmp_path / "a.pt", cfg, randomize_(SiT(cfg), seed=1).state_dict(), meta={"step": 1})
    a = repa_probe.analyze([str(tmp_path / "a.pt")] * 2, names=["a", "b"], data=str(cifar_dir / "test"),
                           encoders=["cifar-ssl-resnet"], ts=[0, 0.5], n=40, bootstrap=5, null=2, k=5, quiet=True,
                           cache=str(tmp_path / "c"), spatial=True)
    t = a.table[a.table["metric"].isin(list(SPATIAL_METRICS))]
    assert set(t["kind"]) == {"model", "untrained", "raw-thumbnail", "encoder"}
    model = t[t["kind"] == "model"]
    inside = (model["ci_low"] <= model["value"]) & (model["value"] <= model["ci_high"])
    assert len(model) == 2 * 3 * 2 * 4 and inside.all()
    from repa_probe.report.compose import summarise
    deltas = summarise(a.results)[1]["deltas"]
    assert (deltas.loc[deltas["metric"].isin(list(SPATIAL_METRICS)), "delta"] == 0).all()
    # the encoder's reference: its own tokens at the model's 8×8 grid, measured directly
    from repa_probe.capture import make_dataset
    from repa_probe.encoders import load_encoder
    from repa_probe.spatial import spatial_matrix
    data = make_dataset(str(cifar_dir / "test"), 16, 40, 0, False)
    images = torch.stack([data[i][0] for i in range(len(data))]).float() / 255
    tokens = load_encoder("cifar-ssl-resnet", precision="auto").encode(images, 8)[0]   # analyze's default: it
    # chooses bf16 or fp32 on the first 8 images, the same 8 as here
    want = spatial_matrix(tokens).double().mean(0)
    enc = t[t["kind"] == "encoder"].groupby("metric")["value"].first()
    np.testing.assert_allclose([enc[m] for m in SPATIAL_METRICS], want.numpy(), rtol=1e-5)


def test_a_cached_spatial_capture_is_not_served_for_another_set_of_measures(tmp_path, cifar_dir):
    """The store's key names the spatial measures a capture computed: after a plug-in measure is registered (or
    one is replaced under the same name), the cached entry is not reused; the new capture holds the plug-in's
    column, computed from the tokens (no IndexError, no other measure's values)."""
    from conftest import randomize_, tiny_config
    from repa_probe.capture import CaptureConfig, extract
    from repa_probe.checkpoints import save_checkpoint
    from repa_probe.models import SiT
    model = randomize_(SiT(tiny_config(z_dims=[], encoder_depth=0, input_size=32, in_channels=3)), seed=1)
    ckpt = save_checkpoint(tmp_path / "m.pt", model.config, model.state_dict(), meta={"mode": "pixels"})
    config, kw = CaptureConfig(ts=(0.5,), reductions=("spatial",)), dict(n=8, cache_dir=tmp_path / "cache", quiet=True)
    first = extract(str(ckpt), str(cifar_dir / "test"), config, **kw)
    assert extract(str(ckpt), str(cifar_dir / "test"), config, **kw).computed == 0          # a plain hit

    def near(t, g):
        return similarity_profile(t, g)[:, 1]

    def far(t, g):
        return similarity_profile(t, g)[:, -1]

    width = first.reduced["spatial"]["blocks"][0].shape[-1]
    extra = register_spatial_metric(SpatialMetric("plug", "plug-in", near))
    try:
        plugged = extract(str(ckpt), str(cifar_dir / "test"), config, **kw)
        assert plugged.computed > 0 and plugged.reduced["spatial"]["blocks"][0].shape[-1] == width + 1
        np.testing.assert_array_equal(np.asarray(plugged.reduced["spatial"]["blocks"][0])[..., :width], np.asarray(first.reduced["spatial"]["blocks"][0]))
        register_spatial_metric(SpatialMetric("plug", "plug-in", far), overwrite=True)
        replaced = extract(str(ckpt), str(cifar_dir / "test"), config, **kw)
        assert replaced.computed > 0
        assert not np.array_equal(np.asarray(replaced.reduced["spatial"]["blocks"][0])[..., -1], np.asarray(plugged.reduced["spatial"]["blocks"][0])[..., -1])
    finally:
        del SPATIAL_METRICS[extra.name]


def test_analyze_with_a_warm_cache_measures_a_spatial_measure_registered_since(tmp_path, cifar_dir):
    """Blocks and the encoder's reference alike: after a first analysis with --spatial, a measure registered
    since is computed on a rerun over the same cache (no IndexError, no missing encoder row), and the measures
    that were there keep their values."""
    import repa_probe
    from conftest import randomize_, tiny_config
    from repa_probe.checkpoints import save_checkpoint
    from repa_probe.models import SiT
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    save_checkpoint(tmp_path / "a.pt", cfg, randomize_(SiT(cfg), seed=1).state_dict(), meta={"step": 1})
    kw = dict(data=str(cifar_dir / "test"), encoders=["cifar-ssl-resnet"], ts=[0.5], n=24, bootstrap=0, null=0, k=5,
              quiet=True, cache=str(tmp_path / "c"), spatial=True)
    before = repa_probe.analyze(str(tmp_path / "a.pt"), **kw).table
    extra = register_spatial_metric(SpatialMetric("plug", "plug-in", lambda t, g: similarity_profile(t, g)[:, 1]))
    try:
        after = repa_probe.analyze(str(tmp_path / "a.pt"), **kw).table
    finally:
        del SPATIAL_METRICS[extra.name]
    plug = after[after["metric"] == "plug"]
    assert {"model", "untrained", "encoder"} <= set(plug["kind"]) and plug["value"].notna().all()
    old = before[before["metric"].isin(["lds", "cds", "rmsc"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, after[after["metric"].isin(["lds", "cds", "rmsc"])].reset_index(drop=True))
