"""The trainer's further terms (train/terms/) and HASTE's --align-until, on real CIFAR-10 images and tiny SiTs:
each term against its authors' formula written out here, step 1's logged loss by hand, the same seeds as the
other arms, and the switch-off freezing exactly what it should; REG's class token through the SiT, the encoder and
the analysis."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import repa_probe
from conftest import randomize_
from conftest import tiny_config as tiny_model_config
from repa_probe.capture import capture_batch, noisy_input
from repa_probe.checkpoints import read_checkpoint
from repa_probe.encoders import load_encoder
from repa_probe.errors import UserError
from repa_probe.families import load_checkpoint
from repa_probe.families.sit import as_checkpoint
from repa_probe.data import ImageDataset
from repa_probe.models import ModelConfig, SiT, modulate
from repa_probe.train.terms import TERMS, Context, Forward
from repa_probe.train.terms.dispersive import dispersive_loss
from repa_probe.train.trainer import check_config, export_repa, init_model, replay_batch, stream_seed, train
from test_train import ENCODER, log_rows, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def authors_dispersive(z: torch.Tensor) -> torch.Tensor:
    """Dispersive Loss as the authors' PyTorch code writes it (InfoNCE-L2, τ = 1): pdist over the flattened
    batch, each pair twice plus the B zeros of the diagonal, log of the mean of exp(−d)."""
    z = z.reshape(z.shape[0], -1)
    d = F.pdist(z).pow(2) / z.shape[1]
    d = torch.cat((d, d, torch.zeros(z.shape[0], dtype=z.dtype)))
    return torch.log(torch.exp(-d).mean())


def test_dispersive_l2_equals_the_authors_formula_and_the_cosine_variant_the_papers():
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0):
        z = scale * torch.randn(16, 64, 32, generator=g, dtype=torch.float64)
        assert dispersive_loss(z).item() == pytest.approx(authors_dispersive(z).item(), abs=1e-6)
        # τ divides the exponent
        d = torch.cdist(z.flatten(1), z.flatten(1)).pow(2) / z[0].numel()
        assert dispersive_loss(z, tau=0.5).item() == pytest.approx(torch.log(torch.exp(-d / 0.5).mean()).item(),
                                                                   abs=1e-6)
        cos = F.cosine_similarity(z.flatten(1)[:, None], z.flatten(1)[None], dim=-1)   # (B, B)
        assert dispersive_loss(z, 0.5, "infonce-cos").item() == pytest.approx(
            torch.log(torch.exp(cos / 0.5).mean()).item(), abs=1e-6)


def test_dispersive_is_zero_for_a_collapsed_batch_negative_otherwise_and_has_finite_gradients():
    same = torch.ones(8, 4, 3, requires_grad=True)
    value = dispersive_loss(same)
    value.backward()
    assert value.item() == 0 and torch.isfinite(same.grad).all() and same.grad.abs().max() == 0
    spread = torch.randn(8, 4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = dispersive_loss(spread)
    value.backward()
    assert value.item() < 0 and torch.isfinite(spread.grad).all() and spread.grad.abs().max() > 0
    # minimising it pushes the samples apart: a gradient step lowers it and widens the mean distance
    with torch.no_grad():
        moved = spread - 0.5 * spread.grad
    assert dispersive_loss(moved) < value
    assert torch.pdist(moved.flatten(1)).mean() > torch.pdist(spread.detach().flatten(1)).mean()
    with pytest.raises(ValueError, match="infonce-l2"):
        dispersive_loss(spread, variant="hinge")


@pytest.fixture(scope="module")
def arms(cifar_dir, tmp_path_factory):
    """10-step runs of one seed: vanilla, + dispersive, + SRA (blocks 1 → 3), REPA, REPA switched off after
    step 5, REPA + REG's class token (the authors' REG)."""
    root, data = tmp_path_factory.mktemp("arms"), cifar_dir / "test"
    settings = {"vanilla": (0.0, {}), "dispersive": (0.0, dict(dispersive=0.25)),
                "sra": (0.0, dict(self_align=0.5, self_align_blocks=(1, 3))),
                "repa": (0.5, {}), "until5": (0.5, dict(align_until=5)), "reg": (0.5, dict(reg_cls=0.03)),
                "haste": (0.5, dict(attn_align=0.5, attn_align_blocks=(2, 3), attn_align_teacher_blocks=(5, 6),
                                    align_until=5))}
    return {name: train(tiny_config(data, root / name, coeff, steps=10, ckpt_every=5, **extra)).parents[1]
            for name, (coeff, extra) in settings.items()} | {"data": data}


def test_every_arm_starts_from_the_same_sit_and_sees_the_same_batches(arms):
    names = ("vanilla", "dispersive", "sra", "repa", "until5", "haste", "reg")
    assert len({log_rows(arms[n], "start")[0]["sit_init_sha256"] for n in names}) == 1
    assert len({tuple(r["inputs_sha256"] for r in log_rows(arms[n])) for n in names}) == 1


def test_step_1s_logged_dispersive_loss_equals_the_hand_computation_on_the_first_batch(arms):
    """Batch 1 rebuilt from the images, the last block's tokens of the initial SiT, the authors' formula."""
    path = arms["dispersive"] / "checkpoints" / f"{10:07d}.pt"
    config = ModelConfig.from_dict(read_checkpoint(path)["config"])
    cfg = tiny_config(arms["data"], arms["dispersive"], 0.0, dispersive=0.25)
    _, x, y, t, noise = replay_batch(cfg, ImageDataset(arms["data"], 16), step=1)
    model = init_model(config, seed=0).train()
    with torch.no_grad():
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        h, c = model.embed(x_t, t, y)
        for block in model.blocks:
            h = block(h, c)
        out = model.unpatchify(model.final_layer(h, c))[:, :3]
        mse = ((out - (noise - x)) ** 2).mean()
        disp = authors_dispersive(h.double())
    first = log_rows(arms["dispersive"])[0]
    assert first["step"] == 1 and first["loss_repa"] == 0
    assert first["loss_dispersive"] == pytest.approx(disp.item(), abs=1e-6)
    assert first["loss"] == pytest.approx((mse + 0.25 * disp).item(), abs=1e-5)
    assert first["loss_denoise"] == pytest.approx(mse.item(), abs=1e-5)
    assert "loss_dispersive" not in log_rows(arms["vanilla"])[0]
    # the term changes training: the weights part from vanilla's after the same 10 batches
    a, b = (read_checkpoint(arms[n] / "checkpoints" / f"{10:07d}.pt")["model"] for n in ("vanilla", "dispersive"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_step_1s_logged_self_alignment_equals_the_hand_computation_on_the_first_batch(arms):
    """SRA: the head on block 1 of the model at t against block 3 of the EMA (at step 1 the initial weights) at
    t' = clamp(t − 0.2·r, 0, 1), r from the run's stream "self_align"; 1 − cosine over the tokens of each channel."""
    obj = read_checkpoint(arms["sra"] / "checkpoints" / f"{10:07d}.pt")
    config = ModelConfig.from_dict(obj["config"])
    assert config.sra_head and any(k.startswith("ap_head.linear1") for k in obj["model"])
    cfg = tiny_config(arms["data"], arms["sra"], 0.0, self_align=0.5, self_align_blocks=(1, 3))
    _, x, y, t, noise = replay_batch(cfg, ImageDataset(arms["data"], 16), step=1)
    r = torch.rand(16, generator=torch.Generator().manual_seed(stream_seed(0, "self_align", 0)))
    t_teacher = (t - 0.2 * r).clamp(0, 1)
    model = init_model(config, seed=0)
    with torch.no_grad():
        def blocks(x_t, t_):
            h, c = model.embed(x_t, t_, y)
            out = []
            for block in model.blocks:
                h = block(h, c)
                out.append(h)
            return out
        student = model.ap_head(blocks((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise, t)[0])
        teacher = blocks((1 - t_teacher.view(-1, 1, 1, 1)) * x + t_teacher.view(-1, 1, 1, 1) * noise, t_teacher)[2]
        cos = (student * teacher).sum(1) / (student.norm(dim=1) * teacher.norm(dim=1))     # (N, D): over tokens
        expected = (1 - cos).mean()
    first = log_rows(arms["sra"])[0]
    assert first["loss_self_align"] == pytest.approx(expected.item(), abs=1e-6)
    assert first["loss"] == pytest.approx(first["loss_denoise"] + 0.5 * expected.item(), abs=1e-5)
    # the head trains and the SiT's weights part from vanilla's
    init = init_model(config, seed=0).state_dict()
    assert not torch.equal(obj["model"]["ap_head.linear1.weight"], init["ap_head.linear1.weight"])


def test_checkpoints_of_every_term_load_into_the_analysis_also_in_repas_layout(arms, tmp_path):
    """Our checkpoint and its REPA-layout export load with every weight, SRA's head included, and give the
    same outputs."""
    for name in ("dispersive", "sra", "reg"):
        ours = arms[name] / "checkpoints" / f"{10:07d}.pt"
        exported = export_repa(ours, tmp_path / f"{name}.pt")
        a, b = load_checkpoint(ours), load_checkpoint(exported)
        assert b.provenance.format == "repa-train"
        assert a.model.state_dict().keys() == b.model.state_dict().keys() == read_checkpoint(ours)["ema"].keys()
        x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.7]), torch.tensor([1, 2])
        with torch.no_grad():
            assert torch.equal(a.model(x, t, y), b.model(x, t, y))


def test_align_until_trains_repa_to_its_step_then_denoising_alone_with_the_projectors_frozen(arms):
    repa, until = log_rows(arms["repa"]), log_rows(arms["until5"])
    assert [r["step"] for r in until] == [1, 5, 10]
    assert until[:2] == [{**r, "elapsed_s": u["elapsed_s"], "img_per_s": u["img_per_s"]}
                         for r, u in zip(repa[:2], until[:2])]                      # steps 1–5: REPA exactly
    assert until[2]["loss_repa"] is None and until[2]["loss"] == pytest.approx(until[2]["loss_denoise"], abs=1e-6)
    at5, at10 = (read_checkpoint(arms["until5"] / "checkpoints" / f"{s:07d}.pt") for s in (5, 10))
    same5 = read_checkpoint(arms["repa"] / "checkpoints" / f"{5:07d}.pt")
    assert all(torch.equal(at5["model"][k], same5["model"][k]) for k in at5["model"])
    projector = [k for k in at5["model"] if k.startswith("projectors.")]
    assert projector and all(torch.equal(at5["model"][k], at10["model"][k]) for k in projector)
    sit = [k for k in at5["model"] if k.startswith("blocks.")]
    assert any(not torch.equal(at5["model"][k], at10["model"][k]) for k in sit)      # the SiT trains on
    plain10 = read_checkpoint(arms["repa"] / "checkpoints" / f"{10:07d}.pt")["model"]
    assert any(not torch.equal(at10["model"][k], plain10[k]) for k in sit)


def test_a_run_resumed_after_its_switch_off_continues_bit_for_bit(arms, cifar_dir, tmp_path):
    """Resumed from step 5 (the switch) to step 10: the projectors are frozen from the restart on, and every
    weight, EMA and optimizer tensor equals the straight run's."""
    data = cifar_dir / "test"
    run = tmp_path / "resumed"
    train(tiny_config(data, run, 0.5, steps=5, ckpt_every=5, align_until=5))
    train(tiny_config(data, run, 0.5, steps=10, ckpt_every=5, align_until=5))
    a, b = (read_checkpoint(r / "checkpoints" / f"{10:07d}.pt") for r in (run, arms["until5"]))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())


def test_the_terms_registry_lists_its_terms_and_refuses_a_second_of_a_name():
    assert {"dispersive", "self_align"} <= set(TERMS)
    with pytest.raises(ValueError, match="already registered"):
        TERMS.register("dispersive", TERMS["dispersive"])


def test_the_monitor_pairs_only_the_steps_before_the_switch_off(arms):
    """A run trained with --align-until logs loss_repa null afterwards: the monitor's paired series stops there."""
    from repa_probe.findings.monitor import paired_series, train_rows
    steps, benefit, alignment = paired_series(train_rows(arms["vanilla"] / "log.jsonl"),
                                              train_rows(arms["until5"] / "log.jsonl"), ("vanilla", "until5"))
    rows = {r["step"]: r for r in log_rows(arms["until5"])}
    assert steps == [1, 5] and alignment == [-rows[1]["loss_repa"], -rows[5]["loss_repa"]]


def test_the_sits_attention_logits_are_the_attention_it_applies():
    """softmax(logits) · V through the output projection gives the block's attention output exactly."""
    from conftest import randomize_, tiny_config as tiny_model
    from repa_probe.models import SiT, modulate
    model = randomize_(SiT(tiny_model()))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, model.config.num_patches, model.config.hidden_size, generator=g), \
        torch.randn(3, model.config.hidden_size, generator=g)
    block = model.blocks[1]
    with torch.no_grad():
        shift, scale = block.adaLN_modulation(c).chunk(6, dim=-1)[:2]
        h = modulate(block.norm1(x), shift, scale)
        attn = block.attn
        v = attn.qkv(h).reshape(3, h.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        out = (block.attention_logits(x, c).softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        torch.testing.assert_close(attn.proj(out), attn(h), rtol=1e-5, atol=1e-6)


def test_the_encoders_attention_logits_give_timms_own_attention_between_patches():
    """The hook's scores, softmaxed, equal timm's explicit attention probabilities renormalised over the patch
    tokens (CLS row and column removed)."""
    from repa_probe.encoders import load_encoder
    encoder = load_encoder("test_vit", random_init=True)
    probs = {}
    for b in (2, 6):
        attn = encoder.model.blocks[b - 1].attn
        attn.fused_attn = False
        attn.attn_drop.register_forward_hook(lambda m, a, out, b=b: probs.__setitem__(b, out))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with encoder.attention_logits([2, 6]) as maps:
        encoder.encode(images, 8)
    for (b, p), logits in zip(sorted(probs.items()), maps):
        patches = p[:, :, 1:, 1:] / p[:, :, 1:, 1:].sum(-1, keepdim=True)
        assert logits.shape == (2, encoder.model.blocks[0].attn.num_heads, 64, 64)
        torch.testing.assert_close(logits.softmax(-1), patches, rtol=1e-4, atol=1e-6)


def test_step_1s_logged_attention_distillation_equals_the_hand_computation(arms):
    """HASTE: the SiT's blocks 2 and 3 at t against the ViT's blocks 5 and 6 on the same images; the cross-entropy
    of the student's attention rows under the teacher's, the teacher's first H heads paired one to one."""
    from repa_probe.encoders import load_encoder
    obj = read_checkpoint(arms["haste"] / "checkpoints" / f"{10:07d}.pt")
    config = ModelConfig.from_dict(obj["config"])
    cfg = tiny_config(arms["data"], arms["haste"], 0.5)
    images, x, y, t, noise = replay_batch(cfg, ImageDataset(arms["data"], 16), step=1)
    encoder = load_encoder("test_vit", random_init=True)
    with encoder.attention_logits([5, 6]) as teacher:
        encoder.encode(images.float() / 255, 8)
    model = init_model(config, seed=0)
    with torch.no_grad():
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        h, c = model.embed(x_t, t, y)
        h1 = model.blocks[0](h, c)
        h2 = model.blocks[1](h1, c)
        heads = teacher[0].shape[1]
        ce = [-(u.softmax(-1) * torch.log(model.blocks[b].attention_logits(inp, c)[:, :heads].softmax(-1))).sum(-1).mean()
              for b, inp, u in ((1, h1, teacher[0]), (2, h2, teacher[1]))]
    rows = log_rows(arms["haste"])
    assert rows[0]["loss_attn_align"] == pytest.approx(((ce[0] + ce[1]) / 2).item(), abs=1e-6)
    assert rows[0]["loss"] == pytest.approx(rows[0]["loss_denoise"] + 0.5 * rows[0]["loss_repa"]
                                            + 0.5 * rows[0]["loss_attn_align"], abs=1e-5)
    assert rows[-1]["step"] == 10 and rows[-1]["loss_attn_align"] is None and rows[-1]["loss_repa"] is None


def test_attention_alignment_with_an_encoder_without_attention_is_one_line(cifar_dir, tmp_path):
    from conftest import ONE_THREAD, run_cli
    from test_train import tiny_flags
    result = run_cli("train", *tiny_flags(cifar_dir / "test", tmp_path / "o", **{"--steps": 1}), "--encoder",
                     "cifar-ssl-resnet", "--repa-depth", "1", "--attn-align", "0.5", env=ONE_THREAD)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "needs a ViT encoder" in lines[0], result.stderr


def test_the_class_token_is_the_vits_cls_after_its_final_norm_and_the_cifar_teachers_mean_token():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    vit = load_encoder(ENCODER, random_init=True)
    tokens, cls = vit.encode_with_class(images, grid=8)
    with torch.no_grad():
        full = vit.model.forward_features(vit.preprocess(images, 8))       # timm: [CLS, patches] after the norm
    torch.testing.assert_close(cls, full[:, 0])
    torch.testing.assert_close(tokens, full[:, 1:])
    assert torch.equal(tokens, vit.encode(images, grid=8)[0])
    cnn = load_encoder("cifar-ssl-resnet")                                   # no CLS: its pooled feature
    tokens, cls = cnn.encode_with_class(images, grid=8)
    assert torch.equal(cls, tokens.mean(dim=1)) and torch.equal(cls, cnn.encode(images, grid=8)[1])


def reg_forward_by_hand(model: SiT, x_t, t, y, cls_t):
    """REG's SiT written out: the embedded class token first with a zero position, every block over T + 1
    tokens, the projector on block 1's T + 1 tokens, the final layer's modulation of all, the image tokens to
    patches and the class token to its velocity. → (out, zs, per-block image tokens, class velocity)."""
    h = torch.cat([model.wg_norm(model.cls_projectors2(cls_t))[:, None], model.x_embedder(x_t)], 1) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    hidden = []
    for i, block in enumerate(model.blocks):
        h = block(h, c)
        hidden.append(h[:, 1:])
        if i == 0:
            zs = [projector(h) for projector in model.projectors]
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=-1)
    f = modulate(model.final_layer.norm_final(h), shift, scale)
    return model.unpatchify(model.final_layer.linear(f[:, 1:])), zs, hidden, model.final_layer.linear_cls(f[:, 0])


def test_a_reg_sit_carries_its_class_token_first_through_every_block_and_returns_its_velocity():
    config = tiny_model_config(cls_token_dim=12, sra_head=True)
    model = randomize_(SiT(config), seed=2).train()
    assert config.prefix_tokens == 1 and model.pos_embed.shape[1] == 65 and not model.pos_embed[:, 0].any()
    g = torch.Generator().manual_seed(1)
    x_t, cls_t = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 12, generator=g)
    t, y = torch.rand(4, generator=g), torch.tensor([0, 3, 10, 7])
    with torch.no_grad():
        out, zs, hidden, c, v = model(x_t, t, y, return_zs=True, return_hidden=True, cls_token=cls_t,
                                      return_cls=True)
        hidden = hidden[1:]                                                 # the blocks' outputs
        hand = reg_forward_by_hand(model, x_t, t, y, cls_t)
        torch.testing.assert_close(out, hand[0])
        torch.testing.assert_close(zs[0], hand[1][0])                       # (4, 65, 32): the class token's too
        assert zs[0].shape == (4, 65, 32) and [h.shape for h in hidden] == [(4, 64, 64)] * 3
        for h, h_hand in zip(hidden, hand[2]):
            torch.testing.assert_close(h, h_hand)
        torch.testing.assert_close(v, hand[3])
        # no class token given: its input is 0; the class token changes the image's prediction (attention)
        torch.testing.assert_close(model(x_t, t, y), model(x_t, t, y, cls_token=torch.zeros(4, 12)))
        assert not torch.allclose(model(x_t, t, y), out)
        # SRA's teacher composed with REG sees the class token noised at its own t'
        r = torch.rand(4, generator=g)
        cls, cls_noise, x, noise = torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g), x_t, x_t.flip(0)
        cfg = SimpleNamespace(self_align_blocks=(1, 3), self_align_offset=0.2)
        forward = Forward([None, *hidden], c, x, noise, t, y, cls, cls_noise, v)
        term = TERMS["self_align"](forward, cfg, Context(model, model, lambda name: r))
        t2 = (t - 0.2 * r).clamp(0, 1)
        tt2 = t2.view(-1, 1, 1, 1)
        teacher = reg_forward_by_hand(model, (1 - tt2) * x + tt2 * noise, t2, y,
                                      (1 - t2[:, None]) * cls + t2[:, None] * cls_noise)[2][2]
        student = model.ap_head(hidden[0])
        expected = (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
        assert term.item() == pytest.approx(expected.item(), abs=1e-6)


def test_the_analysis_captures_a_reg_models_image_tokens_without_its_class_token():
    config = tiny_model_config(cls_token_dim=12)
    model = randomize_(SiT(config), seed=3).eval()
    ckpt = as_checkpoint(model)
    x0, ids, labels = torch.rand(5, 3, 16, 16) * 2 - 1, torch.arange(5), torch.tensor([0, 1, 2, 3, 4])
    features, _ = capture_batch(ckpt, x0, labels, ids, 0.5, seed=0)
    x_t, timestep = noisy_input(ckpt.convention, x0, ids, 0.5, seed=0)
    with torch.no_grad():
        hidden = model(x_t, timestep, labels, return_hidden=True)[2]
        embedded = model.embed(x_t, timestep, labels)[0][:, 1:]                 # block 0: the image tokens
    torch.testing.assert_close(hidden[0], embedded)
    expected = torch.stack([h.mean(1) for h in hidden])
    assert features.shape == (4, 5, 64)
    torch.testing.assert_close(features, expected)


def test_step_1s_logged_reg_loss_equals_the_hand_computation_on_the_first_batch(arms):
    """REG + REPA at step 1: the ViT's CLS of each image noised at the image's t with ε from the run's stream
    "cls_noise", the class token's velocity error, REPA's cosine over the class token and the patch tokens."""
    obj = read_checkpoint(arms["reg"] / "checkpoints" / f"{10:07d}.pt")
    config = ModelConfig.from_dict(obj["config"])
    assert config.cls_token_dim == 64 and obj["meta"]["reg_encoder"] == ENCODER
    cfg = tiny_config(arms["data"], arms["reg"], 0.5, reg_cls=0.03)
    images, x, y, t, noise = replay_batch(cfg, ImageDataset(arms["data"], 16), step=1)
    tokens, cls = load_encoder(ENCODER, random_init=True).encode_with_class(images.float() / 255, grid=8)
    cls_noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(stream_seed(0, "cls_noise", 0)))
    model = init_model(config, seed=0).train()
    with torch.no_grad():
        tt = t.view(-1, 1, 1, 1)
        out, (z,), _, v = reg_forward_by_hand(model, (1 - tt) * x + tt * noise, t, y,
                                               (1 - t[:, None]) * cls + t[:, None] * cls_noise)
        mse = ((out - (noise - x)) ** 2).mean()
        reg = ((v - (cls_noise - cls)) ** 2).mean()
        cos = F.cosine_similarity(z, torch.cat([cls[:, None], tokens], 1), dim=-1).mean()       # over 65 tokens
    first = log_rows(arms["reg"])[0]
    assert first["loss_reg_cls"] == pytest.approx(reg.item(), abs=1e-6)
    assert first["loss_repa"] == pytest.approx(-cos.item(), abs=1e-6)
    assert first["loss_denoise"] == pytest.approx(mse.item(), abs=1e-5)
    assert first["loss"] == pytest.approx((mse - 0.5 * cos + 0.03 * reg).item(), abs=1e-5)
    # the class token's embedding and output train
    init = model.state_dict()
    for key in ("cls_projectors2.weight", "wg_norm.weight", "final_layer.linear_cls.weight"):
        assert not torch.equal(obj["model"][key], init[key]), key
    assert not obj["model"]["pos_embed"][:, 0].any()


def test_a_reg_checkpoint_is_analysed_in_both_layouts(arms, tmp_path, cifar_dir):
    """Exported in REPA's (and REG's) layout, a REG run's checkpoint records the authors' --cls; the analysis runs
    on its image tokens (block 0..3, the encoder's 8 × 8 grid)."""
    ours = arms["reg"] / "checkpoints" / f"{10:07d}.pt"
    exported = load_checkpoint(export_repa(ours, tmp_path / "reg.pt"))
    assert exported.config.cls_token_dim == 64 and exported.provenance.args["cls"] == 0.03
    common = dict(data=str(cifar_dir / "test"), encoders=["cifar-ssl-resnet"], ts=[0.5], n=24, bootstrap=0, null=0,
                  k=5, quiet=True, cache=str(tmp_path / "cache"))
    result = repa_probe.analyze([str(ours), str(tmp_path / "reg.pt")], names=["ours", "repa"], **common)
    table = result.table.query("kind == 'model'")
    assert set(table["block"]) == {0, 1, 2, 3} and np.isfinite(table["value"]).all()
    a, b = (table[table["checkpoint"] == n].sort_values(["block", "metric"])["value"].to_numpy()
            for n in ("ours", "repa"))
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a, b)


def test_reg_needs_an_encoder_and_an_mlp_projector(arms, tmp_path):
    with pytest.raises(UserError, match="--reg-cls 0.03 .* --encoder"):
        check_config(tiny_config(arms["data"], tmp_path / "a", 0.0, encoders=[], reg_cls=0.03))
    with pytest.raises(UserError, match="--projector conv"):
        check_config(tiny_config(arms["data"], tmp_path / "b", 0.5, reg_cls=0.03, projector="conv"))
