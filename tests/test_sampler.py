"""Samplers against hand computations: Euler ODE, Euler–Maruyama SDE, CFG on a t interval, the PNG grid."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ONE_THREAD, randomize_, run_cli, tiny_config
from repa_probe.checkpoints import save_checkpoint
from repa_probe.models import SiT
from repa_probe.errors import UserError
from repa_probe.families.sit import as_checkpoint
from repa_probe.sampler import euler_maruyama, euler_ode, guided_velocity, image_grid, sample


pytestmark = pytest.mark.usefixtures("one_thread")      # tiny tensors


class ClassVelocity(nn.Module):
    """A velocity field known in closed form: v(x, τ, y) = a·x + (1 + τ)·c_y, one constant image c_y per
    class (row num_classes = the null class). τ is whatever time the sampler feeds."""

    def __init__(self, num_classes: int = 3, shape: tuple[int, ...] = (3, 4, 4), a: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c = nn.Parameter(torch.randn(num_classes + 1, *shape, generator=g), requires_grad=False)
        self.a = a
        self.config = tiny_config(input_size=shape[-1], in_channels=shape[0], num_classes=num_classes)
        self.fed_times: list[float] = []

    def forward(self, x, t, y):
        self.fed_times += t.tolist()
        return self.a * x + (1 + t.view(-1, 1, 1, 1)) * self.c[y]


def test_ode_with_one_step_is_x1_minus_the_velocity_at_t1():
    model = ClassVelocity(a=0.5)
    g = torch.Generator().manual_seed(7)
    x0 = sample(as_checkpoint(model, "repa"), 4, labels=torch.tensor([0, 1, 2, 0]), steps=1, cfg=1.0,
                generator=g)
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(4, 3, 4, 4, generator=g)
    expected = x1 - (0.5 * x1 + 2 * model.c[torch.tensor([0, 1, 2, 0])])          # Δt = −1, τ = 1
    assert torch.allclose(x0, expected, atol=1e-6)
    assert set(model.fed_times) == {1.0}


def test_ode_steps_follow_the_linspace_grid():
    model = ClassVelocity(a=0.0)
    x1 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 2])
    out = euler_ode(guided_velocity(as_checkpoint(model, "repa"), y), x1, steps=4)
    # v = (1 + t)·c_y at t = 1, .75, .5, .25, each for Δt = −1/4
    assert torch.allclose(out.float(), x1 - 0.25 * (2 + 1.75 + 1.5 + 1.25) * model.c[y], atol=1e-6)
    assert out.dtype == torch.float64                                                 # REPA's float64 state


def test_cfg_is_applied_only_inside_the_interval_with_inclusive_ends():
    model = ClassVelocity(a=0.0)
    x1 = torch.zeros(2, 3, 4, 4)
    y, w = torch.tensor([0, 2]), 3.0
    c_y, c_null = model.c[y], model.c[3]
    guided = c_null + w * (c_y - c_null)
    out = euler_ode(guided_velocity(as_checkpoint(model, "repa"), y, cfg=w, cfg_interval=(0.5, 0.75)), x1,
                    steps=4)
    # t = 1 (unguided), 0.75 and 0.5 (guided: the ends count), 0.25 (unguided)
    expected = -0.25 * (2 * c_y + 1.75 * guided + 1.5 * guided + 1.25 * c_y)
    assert torch.allclose(out.float(), expected, atol=1e-5)
    assert len(model.fed_times) == 2 + 4 + 4 + 2                  # guided steps run the batch twice


def test_sde_last_step_is_deterministic_and_noise_comes_from_the_generator():
    model = ClassVelocity(a=0.0)
    x1 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)).double()
    y = torch.tensor([0, 1])
    velocity = guided_velocity(as_checkpoint(model, "repa"), y)
    out = euler_maruyama(velocity, x1, steps=2, generator=torch.Generator().manual_seed(11))
    z = torch.randn(x1.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    c = model.c[y].double()
    # step 1: t = 1 → 0.04; v = 2c, score = −((1 − t)·v + x)/t = −x, drift = v − t·score = 2c + x
    x = x1 + (2 * c + x1) * (0.04 - 1) + (2 * 1.0) ** 0.5 * 0.96 ** 0.5 * z
    # step 2 (mean only): t = 0.04 → 0; v = 1.04c, drift = v + (1 − t)·v + x
    v = 1.04 * c
    x = x + (v + 0.96 * v + x) * (0 - 0.04)
    assert torch.allclose(out, x, atol=1e-9)
    again = euler_maruyama(velocity, x1, steps=2, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out, again)


def test_sit_convention_is_fed_reversed_time_and_its_velocity_negated():
    model = ClassVelocity(a=0.0)
    x1 = torch.zeros(1, 3, 4, 4)
    y = torch.tensor([1])
    out = euler_ode(guided_velocity(as_checkpoint(model, "sit"), y), x1, steps=1)
    assert model.fed_times == [0.0]                                # s = 1 − t at t = 1
    assert torch.allclose(out.float(), model.c[1:2], atol=1e-6)   # x0 = x1 − (−c)
    with pytest.raises(UserError, match="not a flow model"):
        guided_velocity(as_checkpoint(model, "dit"), y)


def test_sample_on_a_real_sit_is_seeded_and_shaped():
    model = randomize_(SiT(tiny_config()), seed=2).eval()
    ckpt = as_checkpoint(model, "repa")
    a = sample(ckpt, 3, sampler="sde", steps=3, cfg=2.0, generator=torch.Generator().manual_seed(5))
    b = sample(ckpt, 3, sampler="sde", steps=3, cfg=2.0, generator=torch.Generator().manual_seed(5))
    c = sample(ckpt, 3, sampler="sde", steps=3, cfg=2.0, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_grid_layout():
    images = torch.zeros(5, 3, 4, 6)
    images[4] = 1.0
    grid = image_grid(images, padding=2)                           # round(√5) = 2 columns, 3 rows
    assert grid.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    assert (grid[2 + 2 * 6: 2 + 2 * 6 + 4, 2:8] == 255).all() and grid[:2].max() == 0


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_sample_cli_writes_a_png_grid(sampler, tmp_path):
    config = tiny_config(z_dims=[])
    model = randomize_(SiT(config), seed=1)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", config, model.state_dict(), meta={"mode": "pixels", "step": 3})
    out = tmp_path / "grid.png"
    result = run_cli("sample", ckpt, "--n", 6, "--steps", 3, "--sampler", sampler, "--cfg", 1.5,
                     "--cfg-interval", "0,0.7", "--class-label", 2, "--out", out, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (2 + 2 * 18, 2 + 3 * 18)   # 2 columns × 3 rows of 16 px + gutters


def test_sample_cli_bad_output_is_one_line_exit_2(tmp_path):
    config = tiny_config(z_dims=[])
    ckpt = save_checkpoint(tmp_path / "tiny.pt", config, SiT(config).state_dict(), meta={"mode": "pixels"})
    result = run_cli("sample", ckpt, "--out", tmp_path / "no-such-folder" / "grid.png", env=ONE_THREAD)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--out" in lines[0], result.stderr
