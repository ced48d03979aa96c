"""Step 1 of our trainer against the authors' own loss functions, run beside ours from their code.

    git clone https://github.com/raywang4/DispLoss /tmp/displ      # or its mirror whaletech-ai/Disperse-Loss
    python analyses/parity_terms.py dispersive --authors /tmp/displ
    git clone https://github.com/vvvvvjdy/SRA /tmp/sra
    python analyses/parity_terms.py self_align --authors /tmp/sra
    git clone https://github.com/NUS-HPC-AI-Lab/HASTE /tmp/haste
    python analyses/parity_terms.py attn_align --authors /tmp/haste
    git clone https://github.com/Martinser/REG /tmp/reg
    python analyses/parity_terms.py reg --authors /tmp/reg
    python analyses/parity_terms.py reg-sampler --authors /tmp/reg

For a method, this trains one step of the deep CIFAR preset's SiT (28 blocks of width 64, 64 images; HASTE: a
shape its loss hard-codes, see below; the method's flag at the authors' default) with `repa-probe train`, rebuilds step 1's batch (images, t, ε,
dropped labels, the term's own draws) from the run's seed, feeds the authors' loss function the same model
and tensors and compares it with the term our trainer logged at step 1. Their code runs from their files as
written (nothing of it is copied here); where it draws its own randomness (SRA's t, offset and ε) the draws
are made ours, and a `.cuda()` becomes a no-op on a machine without a GPU. REG also runs the authors' SiT
(models/sit.py) holding our weights: their loss on their model at step 1, and their forward against ours on the
weights after step 1 (whose blocks are no longer the identity). Writes reports/parity/<method>.json: both values,
their difference, the authors' commit and file hash.

`reg-sampler` is REG's sampling rather than a term: the REG run's step-1 checkpoint, loaded as `--gen` loads it,
sampled by their euler_maruyama_sampler (samplers.py) and by our sampler.sample with the same draws
(reports/parity/reg_sampler.json).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from repa_probe.checkpoints import read_checkpoint          # noqa: E402
from repa_probe.data import ImageDataset                     # noqa: E402
from repa_probe.encoders import load_encoder                 # noqa: E402
from repa_probe.families import load_checkpoint              # noqa: E402
from repa_probe.models import ModelConfig                    # noqa: E402
from repa_probe.noise import interpolate                     # noqa: E402
from repa_probe.sampler import sample, sample_indexed        # noqa: E402
from repa_probe.train.terms.self_align import self_align_blocks  # noqa: E402
from repa_probe.train.trainer import (TrainConfig, draw_class_noise, init_model, replay_batch,  # noqa: E402
                                      stream_seed)

DATA = Path(os.environ.get("REPA_PROBE_DATA", REPO.parent / "shared" / "data" / "cifar10")) / "train"
COMMON = ["--image-size", "32", "--workers", "0", "--steps", "1", "--ckpt-every", "1", "--log-every", "1", "--lr",
          "3e-4", "--quiet"]
DEEP = ["--model", "SiT-S/4", "--width", "64", "--depth", "28", "--heads", "2", "--batch", "64"]
# HASTE's loss hard-codes SiT-XL/2's shapes (256 tokens, blocks 5–8 from the encoder's 9–12, 12 heads): an 8-block
# SiT/2 with 12 heads on 32 px (16 × 16 tokens) beside a randomly initialised DINOv2-B at 224 px (16 × 16 patches)
HASTE = ["--model", "SiT-S/2", "--width", "192", "--depth", "8", "--heads", "12", "--batch", "8", "--encoder",
         "dinov2-vit-b", "--encoder-random-init", "--repa-coeff", "0.5", "--repa-depth", "8"]
# method → (our flags at the authors' defaults, the authors' file, our log key). REG is REPA + the class token:
# the deep preset's REPA (block 8, projector width 128, the CIFAR teacher), the authors' λ 0.5 and --cls 0.03.
METHODS = {"dispersive": ([*DEEP, "--repa-coeff", "0", "--dispersive", "0.25"], "transport/transport.py",
                          "loss_dispersive"),
           "self_align": ([*DEEP, "--repa-coeff", "0", "--self-align", "0.5"], "SiT-SRA/loss.py", "loss_self_align"),
           "attn_align": ([*HASTE, "--attn-align", "0.5"], "loss.py", "loss_attn_align"),
           "reg": ([*DEEP, "--encoder", "cifar-ssl-resnet", "--repa-coeff", "0.5", "--repa-depth", "8",
                    "--projector-dim", "128", "--reg-cls", "0.03"], "loss.py", "loss_reg_cls")}
REPOSITORIES = {"dispersive": "raywang4/DispLoss (checked on its mirror whaletech-ai/Disperse-Loss)",
                "self_align": "vvvvvjdy/SRA", "attn_align": "NUS-HPC-AI-Lab/HASTE", "reg": "Martinser/REG"}
# REG's sampler: SDE, a guidance interval that leaves steps unguided, the class token's scale apart from the image's
REG_SAMPLING = dict(n=8, steps=20, cfg=1.8, cls_cfg=1.4, cfg_interval=(0.0, 0.7), seed=0)


def authors_function(path: Path, name: str):
    """The function (or method) `name` of the authors' file, compiled from their source text alone."""
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"th": torch, "torch": torch}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    return scope[name]


def authors_module(path: Path, name: str):
    """The authors' file imported as a module from its source."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def draws_made_ours(**draws):
    """torch.<name> replaced by the given functions while the authors' code runs: their random draws are ours."""
    saved = {name: getattr(torch, name) for name in draws}
    try:
        for name, draw in draws.items():
            setattr(torch, name, draw)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def authors_dispersive(source: Path, batch: dict, model, cfg) -> tuple[float, float]:
    """Their disp_loss on the last block's tokens (their code places one tensor with .cuda(): a no-op here
    without a GPU), weighted 0.25 as their transport adds it; → (term, step-1 loss)."""
    disp_loss = authors_function(source, "disp_loss")
    with torch.no_grad():
        out, _, hidden, _ = model(batch["x_t"], batch["t"], batch["y"], return_hidden=True)
        cuda = torch.Tensor.cuda
        if not torch.cuda.is_available():
            torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            term = disp_loss(None, hidden[-1])
        finally:
            torch.Tensor.cuda = cuda
        denoise = ((out - (batch["noise"] - batch["x"])) ** 2).mean()
    return term.item(), (denoise + 0.25 * term).item()


def authors_self_align(source: Path, batch: dict, model, cfg) -> tuple[float, float]:
    """Their SRALoss.__call__ (defaults: linear path, v, uniform t, loss type "cos", blocks 8 → 20 of 28, t_max
    0.2) with the student and the EMA teacher (at step 1 the initial weights) as their SiT's forward returns
    them, and its draws (t, the teacher's offset, ε) made ours; weighted 0.5 as their train.py does for "cos"."""
    module = authors_module(source, "sra_loss")

    def sit(head: bool):                                   # their SiT: forward(x, t, y, ad) → (out, xr, labels)
        def forward(x, t, y, ad):
            out, _, hidden, _ = model(x, t, y, return_hidden=True)
            return out, model.ap_head(hidden[ad]) if head else hidden[ad], y
        return forward

    n = len(batch["t"])
    student, teacher = self_align_blocks(cfg, model.config.depth)
    loss = module.SRALoss(block_out_s=student, block_out_t=teacher, t_max=cfg.self_align_offset, loss_type="cos")
    with draws_made_ours(rand=lambda *a, **k: batch["t"].view(n, 1, 1, 1).clone(),
                         rand_like=lambda x, **k: batch["r"].view_as(x).clone(),
                         randn_like=lambda x, **k: batch["noise"].clone()), torch.no_grad():
        denoise, align = loss(sit(True), batch["x"], sit(False), batch["y"])
    return align.mean().item(), (denoise.mean() + 0.5 * align.mean()).item()


def authors_attn_align(source: Path, batch: dict, model, cfg) -> tuple[float, float]:
    """Their SILoss.__call__ (HASTE's loss.py: denoising, attention distillation of blocks 5–8 from the encoder's
    9–12, REPA's term) with our SiT as their forward returns it (out, attention logits of blocks 1..8, projector
    outputs), the encoder's 12 blocks' attention scores and patch tokens from one forward of our encoder, and
    their draws of t and ε made ours; weighted 0.5 and 0.5 as their train.py. The encoder's scores are our
    hook's (Encoder.attention_logits), checked against timm's own attention by tests/test_terms.py."""
    from repa_probe.encoders import load_encoder
    module = authors_module(source, "haste_loss")
    encoder = load_encoder(cfg.encoders[0], random_init=cfg.encoder_random_init)
    grid = model.config.input_size // model.config.patch_size
    with torch.no_grad(), encoder.attention_logits(range(1, len(encoder.model.blocks) + 1)) as maps:
        tokens = encoder.encode(batch["images"].float() / 255, grid)[0]

    def sit(x, t, return_act, y):
        out, zs, hidden, c = model(x, t, y, return_zs=True, return_hidden=True)
        logits = [block.attention_logits(h, c) for block, h in zip(model.blocks, hidden)]
        return out, logits, zs

    n = len(batch["t"])
    with draws_made_ours(rand=lambda *a, **k: batch["t"].view(n, 1, 1, 1).clone(),
                         randn_like=lambda x, **k: batch["noise"].clone()), torch.no_grad():
        denoise, attn, proj = module.SILoss()(sit, batch["x"], dict(y=batch["y"]), zs=[list(maps)], proj_s=[tokens])
    return attn.item(), (denoise.mean() + 0.5 * proj.mean() + 0.5 * attn).item()


def authors_reg(source: Path, batch: dict, model, cfg) -> tuple[float, float, dict]:
    """Their SILoss.__call__ (linear path, v, uniform t) with our SiT as their forward returns it, (out, zs_tilde,
    cls_out), on the encoder's tokens with its class token first (their train.py's zs) and that class token, its
    draws (t, ε, the class token's ε) made ours; weighted as their train.py adds it: λ 0.5, --cls 0.03. Then their
    SiT (models/sit.py, built as their train.py builds it) holding our weights: the same loss on their model, and
    its forward against ours on the weights after step 1. → (term, step-1 loss, those two checks)."""
    module = authors_module(source, "reg_loss")
    c = model.config
    their_sit = authors_module(source.parent / "models" / "sit.py", "reg_sit").SiT(
        input_size=c.input_size, patch_size=c.patch_size, in_channels=c.in_channels, hidden_size=c.hidden_size,
        decoder_hidden_size=c.hidden_size, encoder_depth=c.encoder_depth, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio, num_classes=c.num_classes, use_cfg=True, z_dims=c.z_dims, projector_dim=c.projector_dim,
        cls_token_dim=c.cls_token_dim, fused_attn=True, qk_norm=c.qk_norm)
    their_sit.load_state_dict(model.state_dict())                    # strict: every key and shape theirs
    their_sit.eval()                                                 # no label dropout inside (ours is done)

    def ours(x, t, y, cls_token):
        out, zs, _, _, cls_out = model(x, t, y, return_zs=True, return_hidden=True, cls_token=cls_token,
                                       return_cls=True)
        return out, zs, cls_out

    n, zs = len(batch["t"]), [torch.cat([batch["cls"][:, None], batch["tokens"]], dim=1)]
    loss_fn = module.SILoss(prediction="v", path_type="linear", weighting="uniform")

    def step1(net) -> tuple[torch.Tensor, torch.Tensor]:
        with draws_made_ours(rand=lambda *a, **k: batch["t"].view(n, 1, 1, 1).clone(),
                             randn_like=lambda x, **k: (batch["noise"] if x.shape == batch["x"].shape
                                                        else batch["cls_noise"]).clone()), torch.no_grad():
            denoise, proj, _, _, cls = loss_fn(net, batch["x"], dict(y=batch["y"]), zs=zs, cls_token=batch["cls"])
        return cls.mean(), denoise.mean() + 0.5 * proj.mean() + 0.03 * cls.mean()

    term, loss = step1(ours)
    their_term, their_loss = step1(their_sit)
    x_t, cls_t = interpolate(batch["x"], batch["t"], batch["noise"]), interpolate(batch["cls"], batch["t"],
                                                                                  batch["cls_noise"])

    def largest_difference(a, b) -> float:                          # over (out, zs[0], cls_out)
        return max((p - q).abs().max().item() for p, q in zip((a[0], a[1][0], a[2]), (b[0], b[1][0], b[2])))

    with torch.no_grad():
        before = ours(x_t, batch["t"], batch["y"], cls_t)
        model.load_state_dict(batch["after_step1"])
        their_sit.load_state_dict(batch["after_step1"])
        a, b = ours(x_t, batch["t"], batch["y"], cls_t), their_sit(x_t, batch["t"], batch["y"], cls_token=cls_t)
    return term.item(), loss.item(), {
        "authors_model_step1": their_term.item(), "authors_model_step1_loss": their_loss.item(),
        "authors_model_loss_difference": loss.item() - their_loss.item(),
        "authors_model_forward_max_abs_difference_after_step1": largest_difference(a, b),
        "our_forward_change_over_step1": largest_difference(a, before),   # what that comparison could have missed
        "authors_model_file_sha256": hashlib.sha256((source.parent / "models" / "sit.py").read_bytes()).hexdigest()}


def authors_reg_sampler(source: Path, ckpt) -> dict:
    """Their euler_maruyama_sampler (samplers.py, run from their file) on our REG model as their SiT's forward
    returns it, (out, zs, cls_out), their null label 1000 (ImageNet's) read as ours, against our sampler.sample:
    x₁, the labels and the class token's start drawn from one generator in their generate.py's order and their
    torch.randn_like (the image's ε, then the class token's, at every step) made draws of that generator. Once on
    the weights after step 1, once with every weight redrawn (N(0, 0.2²)); each with how far our samples are
    from those of the class token fed as 0 (sample_indexed, whose image draws are the same for both: what the
    check could see)."""
    module = authors_module(source, "reg_samplers")
    model, knobs = ckpt.model.eval(), REG_SAMPLING
    n, seed, cls_dim, classes = knobs["n"], knobs["seed"], ckpt.config.cls_token_dim, ckpt.config.num_classes
    assert ckpt.convention.name == "repa", "their sampler feeds t as ours does under the 'repa' convention"
    zero_fed = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, cls_token_dim=0))
    ours_kwargs = dict(sampler="sde", steps=knobs["steps"], cfg=knobs["cfg"], cls_cfg=knobs["cls_cfg"],
                       cfg_interval=knobs["cfg_interval"])

    def theirs_forward(x, t, y, cls_token):
        out, cls_out = model(x, t, torch.where(y == 1000, classes, y), cls_token=cls_token, return_cls=True)
        return out, None, cls_out

    def compare() -> tuple[float, float]:
        ours = sample(ckpt, n, generator=torch.Generator().manual_seed(seed), **ours_kwargs)
        g = torch.Generator().manual_seed(seed)
        x1 = torch.randn((n, *ours.shape[1:]), generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        cls1 = torch.randn((n, cls_dim), generator=g)
        with draws_made_ours(randn_like=lambda x, **k: torch.randn(x.shape, generator=g, dtype=x.dtype)):
            theirs = module.euler_maruyama_sampler(
                theirs_forward, x1, y, num_steps=knobs["steps"], cfg_scale=knobs["cfg"],
                guidance_low=knobs["cfg_interval"][0], guidance_high=knobs["cfg_interval"][1], path_type="linear",
                cls_latents=cls1, args=SimpleNamespace(cls_cfg_scale=knobs["cls_cfg"])).to(torch.float32)
        joint, plain = (sample_indexed(c, range(n), seed=seed, **ours_kwargs) for c in (ckpt, zero_fed))
        return (ours - theirs).abs().max().item(), (joint - plain).abs().max().item()

    difference, effect = compare()
    g = torch.Generator().manual_seed(0)
    model.load_state_dict({k: v if k == "pos_embed" else torch.randn(v.shape, generator=g) * 0.2
                           for k, v in model.state_dict().items()})
    redrawn, redrawn_effect = compare()
    return {"sampling": knobs, "difference": difference, "class_token_effect": effect,
            "difference_redrawn_weights": redrawn, "class_token_effect_redrawn_weights": redrawn_effect}


AUTHORS = {"dispersive": authors_dispersive, "self_align": authors_self_align, "attn_align": authors_attn_align,
           "reg": authors_reg}


def git_commit(folder: Path) -> str | None:
    r = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=[*METHODS, "reg-sampler"])
    ap.add_argument("--authors", required=True, type=Path, help="a checkout of the method's authors' repository")
    ap.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 train ImageFolder (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "parity")
    args = ap.parse_args()
    sampler = args.method == "reg-sampler"
    flags, file, key = (METHODS["reg"][0], "samplers.py", None) if sampler else METHODS[args.method]
    source = args.authors / file
    if not source.is_file():
        sys.exit(f"parity_terms: --authors {args.authors} has no {file}: pass a checkout of the authors' repository")

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "repa_probe", "train", "--data", str(args.data), "--out", str(run),
                        *COMMON, *flags], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if sampler:
            ckpt = load_checkpoint(str(run / "checkpoints" / f"{1:07d}.pt"), weights="model")   # after step 1
            header = {"method": args.method, "flags": flags, "authors_repository": REPOSITORIES["reg"],
                      "authors_commit": git_commit(args.authors), "authors_file": file,
                      "authors_file_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                      "model": f"{ckpt.config.depth} blocks × {ckpt.config.hidden_size}"}
            return write_result(args.out, "reg_sampler", {**header, **authors_reg_sampler(source, ckpt)})
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        first = next(r for r in rows if r["event"] == "train")
        config_json = json.loads((run / "config.json").read_text())
        step1 = read_checkpoint(run / "checkpoints" / f"{1:07d}.pt")
    model_cfg = ModelConfig.from_dict(step1["config"])
    cfg = TrainConfig.from_dict(config_json)
    images, x, y, t, noise = replay_batch(cfg, ImageDataset(args.data, cfg.image_size), step=1)
    r = torch.rand(cfg.batch, generator=torch.Generator().manual_seed(stream_seed(cfg.seed, "self_align", 0)))
    batch = {"images": images, "x": x, "y": y, "t": t, "noise": noise, "r": r, "x_t": interpolate(x, t, noise),
             "after_step1": step1["model"]}
    if model_cfg.cls_token_dim:                  # REG: the first encoder's tokens and class token, its ε
        encoder = load_encoder(cfg.encoders[0], random_init=cfg.encoder_random_init)
        grid = model_cfg.input_size // model_cfg.patch_size
        batch["tokens"], batch["cls"] = encoder.encode_with_class(images.float() / 255, grid)
        batch["cls_noise"] = draw_class_noise(torch.Generator(), cfg.seed, 0, cfg.batch, model_cfg.cls_token_dim)
    model = init_model(model_cfg, cfg.seed).train()
    term, loss, *checks = AUTHORS[args.method](source, batch, model, cfg)
    result = {"method": args.method, "flags": flags, "authors_repository": REPOSITORIES[args.method],
              "authors_commit": git_commit(args.authors), "authors_file": file,
              "authors_file_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
              "ours_step1": first[key], "authors_step1": term, "difference": first[key] - term,
              "ours_step1_loss": first["loss"], "authors_step1_loss": loss, "loss_difference": first["loss"] - loss,
              "batch": cfg.batch, "model": f"{model_cfg.depth} blocks × {model_cfg.hidden_size}",
              **(checks[0] if checks else {})}
    write_result(args.out, args.method, result)


def write_result(folder: Path, name: str, result: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
