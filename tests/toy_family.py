"""A toy model family, written the way a user adds one: a tiny plain-ViT denoiser whose attribute names
differ from DiT's, whose blocks return tuples and whose token sequence carries an extra conditioning token,
with its own checkpoint layout and its own (cosine) time convention. This one file is all it takes:
analyze, compare and the trainer's analysis pick it up through the registries (tests/test_seams.py)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from repa_probe.checkpoints import LoadedCheckpoint, Provenance
from repa_probe.families.base import Anatomy, InputSpace, ModelFamily, register_family
from repa_probe.noise import CONVENTIONS, Convention, register_convention
from repa_probe.runtime import file_sha256, state_dict_sha256

if "toy-cosine" not in CONVENTIONS:
    register_convention(Convention(
        "toy-cosine", "toy", "x_t = cos(πt/2)·x + sin(πt/2)·ε, fed 1000·t",
        lambda t: (torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)), lambda t: 1000 * t))


class Layer(nn.Module):
    """A pre-norm transformer layer that returns (tokens, a side output): the tuple case."""

    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=2 * width, batch_first=True,
                                                norm_first=True, dropout=0.0)

    def forward(self, hidden_states: torch.Tensor):
        h = self.inner(hidden_states)
        return h, h.norm(dim=-1)


class TinyViT(nn.Module):
    """patchify → [cond token, image tokens] → layers → head on the image tokens."""

    def __init__(self, size: int = 16, patch: int = 4, width: int = 32, depth: int = 3, classes: int = 10):
        super().__init__()
        self.cfg = dict(size=size, patch=patch, width=width, depth=depth, classes=classes)
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        self.label = nn.Embedding(classes + 1, width)
        self.time = nn.Linear(1, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))
        self.head = nn.Linear(width, patch * patch * 3)

    def forward(self, x, t, y):
        tokens = self.patchify(x).flatten(2).transpose(1, 2)                      # (N, T, D)
        cond = (self.label(y) + self.time(t[:, None].float() / 1000))[:, None]    # (N, 1, D)
        h = torch.cat([cond, tokens], dim=1)
        for layer in self.layers:
            h, _ = layer(hidden_states=h)                                         # called with a keyword
        p, g = self.cfg["patch"], self.cfg["size"] // self.cfg["patch"]
        out = self.head(h[:, 1:]).reshape(len(x), g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(len(x), 3, g * p, g * p)


class ToyFamily(ModelFamily):
    name = "toy-vit"
    description = "a tiny plain ViT (tests)"

    def recognise(self, obj: dict, path: Path) -> bool:
        return "toy_vit" in obj

    def load(self, obj, path, *, convention, weights, device="cpu", heads=None) -> LoadedCheckpoint:
        model = TinyViT(**obj["toy_vit"])
        model.load_state_dict(obj["state_dict"])
        prov = Provenance(path=str(path), format="toy-vit", weights="state_dict", convention=convention or "toy-cosine",
                          convention_source="flag" if convention else "checkpoint", sha256=file_sha256(path),
                          family=self.name)
        return LoadedCheckpoint(model=model.to(device).eval(), config=obj["toy_vit"], provenance=prov, meta={},
                                family=self)

    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        c = model.cfg
        return Anatomy(name=f"toy ViT/{c['patch']}", depth=c["depth"], width=c["width"], grid=c["size"] // c["patch"],
                       patch_size=c["patch"], input=InputSpace("pixels", 3, c["size"]), num_classes=c["classes"])

    def blocks(self, model):
        return model.layers

    def input_tokens(self, args, kwargs):
        return kwargs["hidden_states"][:, 1:]          # drop the conditioning token

    def block_tokens(self, output):
        return output[0][:, 1:]                        # the image tokens of the tuple's first element

    def untrained(self, ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
        torch.manual_seed(seed)
        model = TinyViT(**ckpt.config).eval()
        prov = Provenance(path="<untrained>", format="untrained", weights="init", convention=ckpt.provenance.convention,
                          convention_source=ckpt.provenance.convention_source,
                          sha256=state_dict_sha256(model.state_dict()), family=self.name)
        return LoadedCheckpoint(model=model, config=ckpt.config, provenance=prov, meta={}, family=self)


FAMILY = register_family(ToyFamily(), overwrite=True)


def save_toy(path: Path, seed: int = 0, **cfg) -> Path:
    torch.manual_seed(seed)
    model = TinyViT(**cfg)
    torch.save({"toy_vit": model.cfg, "state_dict": model.state_dict()}, path)
    return path
