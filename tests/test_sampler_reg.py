"""REG models sampled as REG samples them: the class token denoised jointly with the image (sampler.py), on tiny
REG SiTs with random weights, against REG's sampler equations written out here, with the image's draws paired
with a model without a class token."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import randomize_, tiny_config
from repa_probe.families.sit import as_checkpoint
from repa_probe.models import SiT
from repa_probe.sampler import (class_token_seed, euler_maruyama, euler_ode, guided_velocity, joint_noise, pack,
                                sample, sample_indexed, sample_seed, unpack)

pytestmark = pytest.mark.usefixtures("one_thread")      # tiny tensors

CLS_DIM, NUM_CLASSES, SHAPE = 12, 10, (3, 16, 16)


def reg_model(seed: int = 2, std: float = 0.05) -> SiT:
    """A tiny REG SiT with random weights, its class token's LayerNorm gain at 1 (its init) so that the class
    token weighs on the image as much as in a trained model."""
    model = randomize_(SiT(tiny_config(cls_token_dim=CLS_DIM, z_dims=[])), seed=seed, std=std).eval()
    with torch.no_grad():
        model.wg_norm.weight.fill_(1.0)
    return model


def as_plain(ckpt):
    """The same model sampled as a model without a class token: its class token input is 0 at every step."""
    return dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, cls_token_dim=0))


def reg_by_hand(model: SiT, x1, y, cls1, draw, *, sampler: str, steps: int, cfg: float, cls_cfg: float,
                interval: tuple[float, float]) -> torch.Tensor:
    """REG's samplers.py written out (linear path, model fed t, float64 states, float32 model): image x and class
    token c each get drift d = v − ½·g²·s with g² = 2t and the score s = (α/α̇·v − x)/(σ² − α/α̇·σ̇·σ), guided on
    the drift (image at cfg, class token at cls_cfg, its conditional drift alone when cls_cfg ≤ 0) where
    cfg > 1 and low ≤ t ≤ high; `draw()` → (ε, ε_c) for each noisy step. The ODE: x, c ← x, c + Δt·v."""
    low, high = interval
    x, c = x1.double(), cls1.double()
    ts = (torch.linspace(1, 0.04, steps, dtype=torch.float64).tolist() + [0.0] if sampler == "sde" else
          torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist())
    y_null = torch.full_like(y, NUM_CLASSES)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t
        guided = cfg > 1 and low <= t <= high
        x_in, c_in, y_in = (torch.cat([x, x]), torch.cat([c, c]), torch.cat([y, y_null])) if guided else (x, c, y)
        time = torch.full((len(x_in),), t, dtype=torch.float64).float()
        with torch.no_grad():
            v, v_c = model(x_in.float(), time, y_in, cls_token=c_in.float(), return_cls=True)
        drifts = []
        for vel, state in ((v.double(), x_in), (v_c.double(), c_in)):
            if sampler == "sde":
                alpha, d_alpha, sigma, d_sigma = 1 - t, -1.0, t, 1.0
                ratio = alpha / d_alpha
                score = (ratio * vel - state) / (sigma ** 2 - ratio * d_sigma * sigma)
                vel = vel - 0.5 * (2 * t) * score
            drifts.append(vel)
        d, d_c = drifts
        if guided:
            (d_cond, d_uncond), (dc_cond, dc_uncond) = d.chunk(2), d_c.chunk(2)
            d = d_uncond + cfg * (d_cond - d_uncond)
            d_c = dc_cond if cls_cfg <= 0 else dc_uncond + cls_cfg * (dc_cond - dc_uncond)
        x, c = x + d * dt, c + d_c * dt
        if sampler == "sde" and i < steps - 1:
            eps, eps_c = draw()
            x = x + math.sqrt(2 * t) * math.sqrt(abs(dt)) * eps
            c = c + math.sqrt(2 * t) * math.sqrt(abs(dt)) * eps_c
    return x


def draws(entry: str, n: int, seed: int):
    """The draws `sample` (one generator, REG's generate.py/samplers.py order: x₁, labels, c₁, then at every noisy
    step the image's ε and the class token's) or `sample_indexed` (x₁, label and the image's ε of sample i from
    its generator, c₁ and ε_c from its class token's) makes: (x₁, y, c₁, the image's noise source, the class
    token's), a source being a generator or a list of one per sample."""
    if entry == "sample":
        g = torch.Generator().manual_seed(seed)
        x1, y = torch.randn((n, *SHAPE), generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return x1, y, torch.randn((n, CLS_DIM), generator=g), g, g
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(n)]
    cls_gens = [torch.Generator().manual_seed(class_token_seed(seed, i)) for i in range(n)]
    x1 = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    y = torch.cat([torch.randint(0, NUM_CLASSES, (1,), generator=g) for g in gens])
    return x1, y, torch.stack([torch.randn((CLS_DIM,), generator=g) for g in cls_gens]), gens, cls_gens


def by_hand(model: SiT, entry: str, n: int, seed: int, **knobs) -> torch.Tensor:
    """`reg_by_hand` on `entry`'s draws, each step's ε and ε_c drawn with torch.randn."""
    x1, y, c1, image, cls = draws(entry, n, seed)

    def noise(source, shape):
        if isinstance(source, list):
            return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in source])
        return torch.randn((n, *shape), generator=source, dtype=torch.float64)

    return reg_by_hand(model, x1, y, c1, lambda: (noise(image, SHAPE), noise(cls, (CLS_DIM,))), **knobs)


def joint_state(ckpt, entry: str, n: int, seed: int, *, sampler: str, steps: int, cfg: float, cls_cfg: float,
                interval: tuple[float, float]) -> torch.Tensor:
    """Our joint sampler's float64 image state at t = 0 on `entry`'s draws, from sampler.py's parts."""
    x1, y, c1, image, cls = draws(entry, n, seed)
    velocity, state = guided_velocity(ckpt, y, cfg, interval, cls_cfg), pack(x1, c1)
    out = euler_ode(velocity, state, steps) if sampler == "ode" else \
        euler_maruyama(velocity, state, steps, joint_noise(image, cls, SHAPE))
    return unpack(out, SHAPE)[0]


@pytest.mark.parametrize("entry", ["sample", "sample_indexed"])
@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_joint_sampling_equals_regs_equations_written_out(sampler, entry):
    model = reg_model()
    ckpt = as_checkpoint(model, "repa")
    knobs = dict(sampler=sampler, steps=3, cfg=2.0, cls_cfg=1.4, interval=(0.3, 0.9))
    state = joint_state(ckpt, entry, 4, 5, **knobs)
    assert state.dtype == torch.float64
    torch.testing.assert_close(state, by_hand(model, entry, 4, 5, **knobs), rtol=0, atol=1e-12)
    kwargs = dict(sampler=sampler, steps=3, cfg=2.0, cls_cfg=1.4, cfg_interval=(0.3, 0.9))
    ours = (sample(ckpt, 4, generator=torch.Generator().manual_seed(5), **kwargs) if entry == "sample" else
            sample_indexed(ckpt, range(4), seed=5, **kwargs))
    assert ours.dtype == torch.float32 and torch.equal(ours, state.float())


@pytest.mark.parametrize("cfg, cls_cfg", [(2.0, 0.0), (1.0, 3.0), (1.8, None)])
def test_the_class_tokens_guidance_follows_regs_rules(cfg, cls_cfg):
    """cls_cfg ≤ 0: the conditional drift; no guidance at all where the image has none (cfg ≤ 1); None: cfg."""
    model = reg_model(seed=6)
    state = joint_state(as_checkpoint(model, "repa"), "sample", 3, 2, sampler="sde", steps=3, cfg=cfg,
                        cls_cfg=cls_cfg, interval=(0.0, 1.0))
    hand = by_hand(model, "sample", 3, 2, sampler="sde", steps=3, cfg=cfg,
                   cls_cfg=cfg if cls_cfg is None else cls_cfg, interval=(0.0, 1.0))
    torch.testing.assert_close(state, hand, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_a_reg_models_image_draws_are_a_plain_models_for_every_sample(sampler):
    """With the class token's input cut (wg_norm 0: every class token enters as the same zero token) the image
    no longer depends on the class token, so the joint sampler must give exactly the samples the same model gets
    sampled as a plain one: the same x₁, label and image noise for sample i, whatever else is in the batch."""
    model = reg_model(seed=3)
    with torch.no_grad():
        model.wg_norm.weight.zero_()
        model.wg_norm.bias.zero_()
    ckpt = as_checkpoint(model, "repa")
    knobs = dict(seed=4, sampler=sampler, steps=3, cfg=1.5, cfg_interval=(0.2, 0.8))
    joint = sample_indexed(ckpt, [2, 7, 8], **knobs)
    assert torch.equal(joint, sample_indexed(as_plain(ckpt), [2, 7, 8], **knobs))
    # batch-independent (up to float32 kernels that differ with the batch size)
    torch.testing.assert_close(joint[1:2], sample_indexed(ckpt, [7], **knobs), rtol=0, atol=1e-5)


def test_the_class_token_changes_a_reg_models_samples():
    """Denoised jointly, the class token is not the zero input a plain sampler feeds, and its noise and start
    are drawn: the samples (of size ≈ 5 with weights of std 0.2) differ from the zero-fed ones by far more than
    float32 rounding; the class token's seed stream is none of the images'."""
    ckpt = as_checkpoint(reg_model(seed=7, std=0.2), "repa")
    for sampler in ("sde", "ode"):
        knobs = dict(seed=0, sampler=sampler, steps=4, cfg=1.5)
        joint, zero_fed = sample_indexed(ckpt, [0, 1, 2], **knobs), sample_indexed(as_plain(ckpt), [0, 1, 2], **knobs)
        assert (joint - zero_fed).abs().max() > 1e-2, sampler
    assert class_token_seed(0, 1) not in (sample_seed(0, 1), class_token_seed(0, 2), class_token_seed(1, 1))


def test_a_reg_models_velocity_refuses_a_state_without_its_class_token():
    ckpt = as_checkpoint(reg_model(), "repa")
    velocity = guided_velocity(ckpt, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="packed"):
        velocity(torch.zeros(2, *SHAPE, dtype=torch.float64), 1.0)
    assert velocity(pack(torch.zeros(2, *SHAPE), torch.zeros(2, CLS_DIM)).double(), 1.0).shape == (2, 768 + CLS_DIM)
