"""Time conventions: each checkpoint family receives the timestep and input it was trained with."""
from __future__ import annotations

import math

import pytest
import torch

from repa_probe.errors import UserError
from repa_probe.noise import dit_step_for_t, get_convention, interpolate, seeded_noise

T = [0.0, 0.25, 0.5, 1.0]


def hand_alphas_cumprod():
    """DiT's schedule written out by hand: β_k = 1e-4 + k·(0.02 − 1e-4)/999, ᾱ_k = ∏(1 − β_i)."""
    out, prod = [], 1.0
    for k in range(1000):
        prod *= 1 - (1e-4 + k * (0.02 - 1e-4) / 999)
        out.append(prod)
    return out


def hand_dit_step(t):
    if t == 0:
        return 0
    if t == 1:
        return 999
    target = 2 * math.log((1 - t) / t)
    abar = hand_alphas_cumprod()
    return min(range(1000), key=lambda k: abs(math.log(abar[k] / (1 - abar[k])) - target))


@pytest.fixture
def xe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)


def test_repa_convention_feeds_t_and_the_linear_interpolant(xe):
    x, e = xe
    conv, t = get_convention("repa"), torch.tensor(T)
    assert conv.timestep(t).tolist() == T
    expected = torch.stack([(1 - ti) * x[i] + ti * e[i] for i, ti in enumerate(T)])
    torch.testing.assert_close(conv.model_input(x, t, e), expected, rtol=0, atol=0)
    assert torch.equal(conv.model_input(x, t, e)[0], x[0]) and torch.equal(conv.model_input(x, t, e)[3], e[3])


def test_sit_convention_feeds_one_minus_t_with_the_same_input(xe):
    x, e = xe
    conv, t = get_convention("sit"), torch.tensor(T)
    assert conv.timestep(t).tolist() == [1.0, 0.75, 0.5, 0.0]
    torch.testing.assert_close(conv.model_input(x, t, e), get_convention("repa").model_input(x, t, e), rtol=0, atol=0)


def test_dit_convention_matches_snr_by_hand(xe):
    x, e = xe
    conv, t = get_convention("dit"), torch.tensor(T)
    ks = [hand_dit_step(ti) for ti in T]
    assert ks[0] == 0 and ks[-1] == 999 and 0 < ks[1] < ks[2] < 999
    assert conv.timestep(t).tolist() == [float(k) for k in ks]
    abar = hand_alphas_cumprod()
    # at t = 0.5 the SNR is 1, so ᾱ_k must be the schedule's closest value to 1/2
    assert abs(abar[ks[2]] - 0.5) < 0.003
    # at t = 0.25 the SNR is 9, so ᾱ_k ≈ 0.9
    assert abs(abar[ks[1]] - 0.9) < 0.002
    expected = torch.stack([math.sqrt(abar[k]) * x[i] + math.sqrt(1 - abar[k]) * e[i] for i, k in enumerate(ks)])
    torch.testing.assert_close(conv.model_input(x, t, e), expected, rtol=1e-6, atol=1e-6)


def test_dit_step_is_monotone_in_t():
    ks = dit_step_for_t(torch.linspace(0, 1, 101))
    assert torch.all(ks[1:] >= ks[:-1])


def test_unknown_convention_is_rejected():
    with pytest.raises(UserError, match="'edm': not a known time convention"):
        get_convention("edm")


def test_seeded_noise_depends_on_image_id_not_on_batching():
    ids = torch.arange(10)
    full = seeded_noise(ids, (3, 4, 4), seed=7, salt=2)
    parts = torch.cat([seeded_noise(ids[:3], (3, 4, 4), 7, 2), seeded_noise(ids[3:], (3, 4, 4), 7, 2)])
    assert torch.equal(full, parts)
    assert not torch.equal(full, seeded_noise(ids, (3, 4, 4), seed=8, salt=2))
    assert not torch.equal(full, seeded_noise(ids, (3, 4, 4), seed=7, salt=3))
    assert abs(full.std().item() - 1) < 0.15


def test_interpolate_scalar_t():
    x, e = torch.ones(2, 3), torch.zeros(2, 3)
    torch.testing.assert_close(interpolate(x, torch.tensor(0.25), e), torch.full((2, 3), 0.75))
