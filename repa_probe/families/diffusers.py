"""diffusers transformers: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors).

Built on diffusers' own classes (the `latent` extra); the weights are read by our safe reader, never by
pickle. Each supported class is one `Spec` below: how to call it, which blocks carry the image tokens, its
input space and its time convention.

    DiTTransformer2DModel   the diffusers layout of DiT (facebookresearch/DiT): DiT's discrete-VP convention,
                            class labels with the null class 1000, SD-VAE latents
    PixArtTransformer2DModel PixArt-α/Σ: DiT blocks with cross-attention to text; discrete VP (DiT's schedule)
    SD3Transformer2DModel   Stable Diffusion 3's MMDiT: joint blocks return (text, image) streams, the image
                            stream is captured; rectified flow fed 1000·t
    FluxTransformer2DModel  Flux: double-stream then single-stream blocks, numbered through; 2×2-packed
                            16-channel latents; rectified flow fed t (the model scales it by 1000)

Text-conditioned models get no prompt: zero text embeddings (one token) and pooled projections, which every
report states.

A diffusers folder passed where a checkpoint goes (analyze, compare, inspect) is read through its
safetensors file; `repa-probe families` lists the classes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from repa_probe.checkpoints import LoadedCheckpoint, Provenance, as_untrained
from repa_probe.errors import UserError
from repa_probe.families.base import Anatomy, InputSpace, ModelFamily, register_family
from repa_probe.runtime import file_sha256

NO_PROMPT = ("no prompt: text conditioning is zero embeddings (one token), pooled projections zero (pass "
             "--text-embeddings FILE for a prompt's)")
TEXT_ATTRIBUTE = "_repa_probe_text"        # (text tokens, pooled) set on the model by DiffusersFamily.condition
FLUX_LATENT_SIZE = 32                      # Flux has no native size: analysed at 256-px images (16×16 tokens)


def _standard_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.transformer_blocks)


def _standard_geometry(c: dict) -> tuple[int, int, int]:
    """(latent channels, latent side, patch) of the model input."""
    return c["in_channels"], c["sample_size"], c["patch_size"]


@dataclass(frozen=True)
class Spec:
    """What one diffusers class needs: its call, blocks, input space and convention, and what a report says."""
    convention: str
    call: Callable[[nn.Module, dict, torch.Tensor, torch.Tensor, torch.Tensor | None], Any]
    labels: Callable[[dict], int | None] = lambda config: None
    latent_scale: float = 0.18215
    latent_shift: float = 0.0
    vae: str | None = "stabilityai/sd-vae-ft-ema"
    note: str = ""
    blocks: Callable[[nn.Module], list[nn.Module]] = _standard_blocks
    geometry: Callable[[dict], tuple[int, int, int]] = _standard_geometry


def _dit_call(model, config, x_t, timestep, labels):
    return model(x_t, timestep=timestep, class_labels=labels, return_dict=False)


def _text(model, x_t: torch.Tensor, dim: int, pooled_dim: int | None = None):
    """(text tokens (N, L, dim), pooled (N, pooled_dim) or None): the prompt set by `condition`, else zeros."""
    n, given = len(x_t), getattr(model, TEXT_ATTRIBUTE, None)
    if given is None:
        return x_t.new_zeros(n, 1, dim), None if pooled_dim is None else x_t.new_zeros(n, pooled_dim)
    text, pooled = given
    return (text.to(x_t).expand(n, -1, -1),
            None if pooled_dim is None else pooled.to(x_t).expand(n, -1))


def _sd3_call(model, config, x_t, timestep, labels):
    text, pooled = _text(model, x_t, config["joint_attention_dim"], config["pooled_projection_dim"])
    return model(x_t, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep, return_dict=False)


def _pixart_call(model, config, x_t, timestep, labels):
    n, side = len(x_t), x_t.shape[-1] * 8
    text = _text(model, x_t, config["caption_channels"])[0]
    cond = {"resolution": x_t.new_tensor([[side, side]]).expand(n, 2), "aspect_ratio": x_t.new_ones(n, 1)}
    return model(x_t, encoder_hidden_states=text, timestep=timestep, added_cond_kwargs=cond, return_dict=False)


def _flux_call(model, config, x_t, timestep, labels):
    n, c, h, w = x_t.shape
    packed = x_t.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(x_t)
    guidance = x_t.new_full((n,), 3.5) if config.get("guidance_embeds") else None
    text, pooled = _text(model, x_t, config["joint_attention_dim"], config["pooled_projection_dim"])
    return model(packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep, img_ids=img_ids,
                 txt_ids=x_t.new_zeros(text.shape[1], 3), guidance=guidance, return_dict=False)


SPECS = {
    "DiTTransformer2DModel": Spec("dit", _dit_call, labels=lambda c: c.get("num_embeds_ada_norm") or 1000),
    "PixArtTransformer2DModel": Spec("dit", _pixart_call, note=NO_PROMPT),
    "SD3Transformer2DModel": Spec("flow1000", _sd3_call, latent_scale=1.5305, latent_shift=0.0609,
                                  vae="stabilityai/stable-diffusion-3-medium-diffusers (subfolder vae)",
                                  note=NO_PROMPT),
    "FluxTransformer2DModel": Spec("repa", _flux_call, latent_scale=0.3611, latent_shift=0.1159,
                                   vae="black-forest-labs/FLUX.1-dev (subfolder vae)",
                                   note=NO_PROMPT + f"; guidance 3.5 where embedded; {FLUX_LATENT_SIZE * 8}-px images",
                                   blocks=lambda m: [*m.transformer_blocks, *m.single_transformer_blocks],
                                   geometry=lambda c: (c["in_channels"] // 4, FLUX_LATENT_SIZE, 2)),
}


def diffusers_config(path: Path) -> dict | None:
    """The config.json beside a weights file (or in a folder), when it names a diffusers class."""
    folder = path if path.is_dir() else path.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "_class_name" in config else None


def _class(name: str) -> type:
    try:
        import diffusers
    except ImportError:
        raise UserError("diffusers models need the diffusers package: pip install 'repa-probe[latent]'") from None
    return getattr(diffusers, name)


class DiffusersFamily(ModelFamily):
    name = "diffusers"
    description = "diffusers transformers: " + ", ".join(SPECS)

    def recognise(self, obj: dict, path: Path) -> bool:
        config = diffusers_config(path)
        if config is None:
            return False
        if config["_class_name"] not in SPECS:
            raise UserError(f"'{path}': diffusers class {config['_class_name']} is not supported yet (supported: "
                            f"{', '.join(SPECS)}); describe it in Python with repa_probe.analyze(model, blocks=...)")
        return True

    def load(self, obj, path, *, convention, weights, device="cpu", heads=None) -> LoadedCheckpoint:
        config = diffusers_config(path)
        spec = SPECS[config["_class_name"]]
        model = self._build(config)
        missing, unexpected = model.load_state_dict(obj, strict=False)
        missing = [k for k in missing if not k.endswith("pos_embed")]        # buffers diffusers recomputes
        if missing or unexpected:
            raise UserError(f"'{path}' does not fit {config['_class_name']}({Path(path).parent / 'config.json'}): "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        warnings = [spec.note] if spec.note else []
        prov = Provenance(path=str(path), format=f"diffusers {config['_class_name']}", weights="state_dict",
                          convention=convention or spec.convention,
                          convention_source="flag" if convention else "checkpoint", sha256=file_sha256(path),
                          warnings=warnings, family=self.name)
        return LoadedCheckpoint(model=model.to(device).eval(), config=config, provenance=prov, meta={}, family=self)

    def _build(self, config: dict) -> nn.Module:
        cls = _class(config["_class_name"])
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})

    def _spec(self, model: nn.Module) -> Spec:
        return SPECS[type(model).__name__]

    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        c, spec = dict(model.config), self._spec(model)
        width, depth = c["num_attention_heads"] * c["attention_head_dim"], len(spec.blocks(model))
        channels, size, patch = spec.geometry(c)
        return Anatomy(name=f"{type(model).__name__} ({depth} blocks, width {width})", depth=depth, width=width,
                       grid=size // patch, patch_size=patch,
                       input=InputSpace("latents", channels, size, 8, spec.latent_scale, spec.latent_shift, spec.vae),
                       num_classes=spec.labels(c))

    def blocks(self, model: nn.Module):
        return self._spec(model).blocks(model)

    def forward(self, model, x_t, timestep, labels):
        return self._spec(model).call(model, dict(model.config), x_t, timestep, labels)

    def block_tokens(self, output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output[1]     # SD3, Flux: (text, image)

    def untrained(self, ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
        """diffusers' own initialisation of the same config, seeded."""
        torch.manual_seed(seed)
        return as_untrained(ckpt, self._build(ckpt.config))

    def condition(self, ckpt: LoadedCheckpoint, path: str) -> None:
        """A prompt's text conditioning for every image: FILE holds `prompt_embeds` (L, D) and, for SD3 and
        Flux, `pooled_prompt_embeds` (D,), as the model's pipeline computes them (a batch axis of 1 is fine)."""
        from repa_probe.checkpoints import read_checkpoint
        c, spec = dict(ckpt.model.config), self._spec(ckpt.model)
        if spec.note != NO_PROMPT and not spec.note.startswith(NO_PROMPT):
            raise UserError(f"--text-embeddings: {ckpt.config['_class_name']} takes no text")
        obj = read_checkpoint(path)
        dim, pooled_dim = c.get("caption_channels") or c["joint_attention_dim"], c.get("pooled_projection_dim")
        text = obj.get("prompt_embeds") if isinstance(obj, dict) else None
        pooled = obj.get("pooled_prompt_embeds") if isinstance(obj, dict) else None
        text = text.reshape(-1, text.shape[-1]) if isinstance(text, torch.Tensor) else None
        pooled = pooled.reshape(-1) if isinstance(pooled, torch.Tensor) else None
        if text is None or text.shape[-1] != dim or (pooled_dim and (pooled is None or len(pooled) != pooled_dim)):
            want = f"prompt_embeds (L, {dim})" + (f" and pooled_prompt_embeds ({pooled_dim},)" if pooled_dim else "")
            raise UserError(f"--text-embeddings '{path}' must hold {want} for {ckpt.config['_class_name']}")
        setattr(ckpt.model, TEXT_ATTRIBUTE, (text.float()[None], None if pooled is None else pooled.float()[None]))
        p = ckpt.provenance
        p.warnings = [w for w in p.warnings if not w.startswith(NO_PROMPT)] + [f"text conditioning from '{path}'"]
        p.format += f", text {file_sha256(path)[:16]}"              # features with another prompt are cached apart

    def describe_rows(self, ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
        c = ckpt.anatomy
        return [("architecture", f"{c.name}, patch {c.patch_size} on {c.input.channels}×{c.input.size}² latents")]


register_family(DiffusersFamily())
