"""The trainer's further terms (train/terms/) and HASTE's --align-until, on real CIFAR-10 images and tiny SiTs:
each term against its authors' formula written out here, step 1's logged loss by hand, the same seeds as the
other arms, and the switch-off freezing exactly what it should."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from repa_probe.checkpoints import read_checkpoint
from repa_probe.families import load_checkpoint
from repa_probe.data import ImageDataset
from repa_probe.models import ModelConfig
from repa_probe.train.terms import TERMS
from repa_probe.train.terms.dispersive import dispersive_loss
from repa_probe.train.trainer import export_repa, init_model, replay_batch, stream_seed, train
from test_train import log_rows, tiny_config

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
    step 5."""
    root, data = tmp_path_factory.mktemp("arms"), cifar_dir / "test"
    settings = {"vanilla": (0.0, {}), "dispersive": (0.0, dict(dispersive=0.25)),
                "sra": (0.0, dict(self_align=0.5, self_align_blocks=(1, 3))),
                "repa": (0.5, {}), "until5": (0.5, dict(align_until=5)),
                "haste": (0.5, dict(attn_align=0.5, attn_align_blocks=(2, 3), attn_align_teacher_blocks=(5, 6),
                                    align_until=5))}
    return {name: train(tiny_config(data, root / name, coeff, steps=10, ckpt_every=5, **extra)).parents[1]
            for name, (coeff, extra) in settings.items()} | {"data": data}


def test_every_arm_starts_from_the_same_sit_and_sees_the_same_batches(arms):
    names = ("vanilla", "dispersive", "sra", "repa", "until5", "haste")
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
    for name in ("dispersive", "sra"):
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
