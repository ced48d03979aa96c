"""The SiT/DiT family of diffusion transformers, with REPA projectors.

One readable file, in the order of the forward pass: embedders, the adaLN-Zero block, the final
layer, the model, positional embeddings, then the size registry. Parameter names are exactly those
of the official DiT (Peebles & Xie 2023), SiT (Ma et al. 2024) and REPA (Yu et al. 2024) code, so
their released state dicts load as they are:

    x_embedder.proj.*, pos_embed, t_embedder.mlp.{0,2}.*, y_embedder.embedding_table.weight,
    blocks.{i}.{attn.qkv, attn.proj, [attn.q_norm, attn.k_norm], mlp.fc1, mlp.fc2, adaLN_modulation.1}.*,
    final_layer.{adaLN_modulation.1, linear}.*, projectors.{k}.{0,2,4}.*

and the heads of REPA's successors under their authors' names: SRA's `ap_head.*`, REG's class-token embedding
`cls_projectors2.*`, `wg_norm.*` and output `final_layer.linear_cls.*` (with REG's pos_embed of T + 1 rows, the
class token's row zero, as their checkpoints store it).

The model works in its own native time (whatever its checkpoint was trained with); `noise.py` maps the
canonical t (0 = data, 1 = noise) to it.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """Everything that fixes the architecture. Plain data: it goes into checkpoints and reports."""
    input_size: int = 32          # spatial size of the model input (latent or pixel grid)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000       # the label table has num_classes + 1 rows; the last is the null class
    learn_sigma: bool = False     # DiT/SiT official: the final layer also predicts a variance
    qk_norm: bool = False
    z_dims: list[int] = field(default_factory=list)  # one REPA projector per target encoder
    projector_dim: int = 2048
    encoder_depth: int = 0        # REPA: projectors read the output of this block (1-based); 0 = none
    projector: str = "mlp"        # "mlp" (REPA) or "conv" (iREPA: one k×k convolution over the token grid)
    projector_kernel: int = 3
    sra_head: bool = False        # SRA: a head on the student block's tokens (the authors' `ap_head`)
    cls_token_dim: int = 0        # REG: width of the encoder class token entangled as a first token (0 = none)

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def prefix_tokens(self) -> int:
        """Tokens ahead of the image tokens in the blocks' sequence: REG's class token, or none."""
        return 1 if self.cls_token_dim else 0

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}")
        d = dict(d)
        if "z_dims" in d:
            d["z_dims"] = [int(z) for z in d["z_dims"]]
        return cls(**d)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class PatchEmbed(nn.Module):
    """p×p patches → tokens: a strided convolution, (N, C, H, W) → (N, T, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timestep → vector: sinusoidal features (GLIDE's, cos first) through a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """[cos(t·ω_j), sin(t·ω_j)] with ω_j = max_period^(−j/half), j < half = dim/2; t may be fractional."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label → vector. Row `num_classes` is the null ("unconditional") class used for CFG.

    Label dropout for classifier-free guidance is done by the trainer, not here, so the model is a
    pure function of (x, t, y).
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


#################################################################################
#                                 Core SiT Model                                #
#################################################################################

def attention_logits(attn: nn.Module, x: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """The pre-softmax scores q·kᵀ/√d_head (N, heads, T − prefix, T − prefix) of a timm-style attention module
    (`qkv`, `num_heads`, `q_norm`, `k_norm`: ours and timm's ViTs) on its input x (N, T, D), the first `prefix`
    tokens (CLS, registers) dropped from rows and columns."""
    n, t, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(n, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)                               # (N, heads, T, d_head)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1))[:, :, prefix:, prefix:]


def has_attention(attn: nn.Module | None) -> bool:
    """Whether `attn` is a timm-style attention module that attention_logits can read."""
    return attn is not None and all(hasattr(attn, a) for a in ("qkv", "num_heads", "q_norm", "k_norm"))


@contextmanager
def attention_hooks(modules: Mapping[Any, nn.Module], score: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                    into: Any = None) -> Iterator[Any]:
    """While open, every forward of `modules[key]` stores score(module, its input) at `into[key]` (a new dict
    unless given, e.g. a list indexed by position), which is yielded; the hooks go on exit."""
    into = {} if into is None else into
    handles = [m.register_forward_pre_hook(lambda mod, args, key=key: into.__setitem__(key, score(mod, args[0])))
               for key, m in modules.items()]
    try:
        yield into
    finally:
        for handle in handles:
            handle.remove()


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash/fused when available)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                       # (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: shift, scale and gate from c = t_emb + y_emb.

    The gates start at zero, so an untrained block is the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def attention_logits(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The pre-softmax attention scores (N, heads, T, T) of this block for its input tokens x and condition c."""
        shift_msa, scale_msa = self.adaLN_modulation(c).chunk(6, dim=-1)[:2]
        return attention_logits(self.attn, modulate(self.norm1(x), shift_msa, scale_msa))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its p×p×C output patch. With REG's
    `linear_cls` (cls_dim > 0) the sequence starts with the class token, mapped by it to the class token's
    velocity: forward then returns (patches of the image tokens, (N, cls_dim)), as REG's FinalLayer does."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cls_dim: int = 0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear_cls = nn.Linear(hidden_size, cls_dim) if cls_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if self.linear_cls is None:
            return self.linear(x)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


class ConvProjector(nn.Module):
    """iREPA's projector (Singh et al. 2025): one k×k convolution over the token grid, D → z_dim, padded so
    the grid keeps its size; a token's projection sees its neighbours, which carries spatial structure."""

    def __init__(self, hidden_size: int, z_dim: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(hidden_size, z_dim, kernel, padding=kernel // 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, T, D = h.shape
        side = int(round(T ** 0.5))
        grid = h.transpose(1, 2).reshape(N, D, side, side)
        return self.conv(grid).flatten(2).transpose(1, 2)           # (N, T, z_dim)


class SRAHead(nn.Module):
    """SRA's head on the student block's tokens (N, T, D) → (N, T, D): Linear(D, 2D), SiLU, Linear(2D, D), named
    as the authors' SimpleHead so that their weights load (train/terms/self_align.py)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear2 = nn.Linear(2 * hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.linear1(x)))


def build_projector(hidden_size: int, projector_dim: int, z_dim: int, kind: str = "mlp",
                    kernel: int = 3) -> nn.Module:
    """REPA's projector h_φ: Linear D→2048, SiLU, Linear 2048→2048, SiLU, Linear 2048→z_dim (tokens one by
    one); or iREPA's ConvProjector (kind="conv")."""
    if kind == "conv":
        return ConvProjector(hidden_size, z_dim, kernel)
    if kind != "mlp":
        raise ValueError(f"unknown projector {kind!r}: use 'mlp' or 'conv'")
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class SiT(nn.Module):
    """The DiT/SiT transformer (same architecture; they differ only in time convention and training).

    forward(x, t, y) returns the prediction (velocity for SiT/REPA, noise for DiT) with the
    learned-sigma half dropped, as SiT's official forward does; with return_zs=True it also returns
    the REPA projector outputs [(N, T, z_dim), ...] read after block `encoder_depth`.

    REG (Wu et al. 2025, arXiv 2507.01467; config.cls_token_dim > 0): an encoder's class token c (N, cls_dim),
    noised like the image, enters as the first token, wg_norm(cls_projectors2(c)), with a zero position; it goes
    through every block with the image tokens and leaves through final_layer.linear_cls as its velocity. Without
    a class token the input is 0 (the mean of the noise it starts from in sampling).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        # Fixed 2-D sin-cos embedding, stored (like the official code) as a frozen parameter.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.prefix_tokens + config.num_patches, D),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(
            [SiTBlock(D, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)])
        self.projectors = nn.ModuleList(
            [build_projector(D, config.projector_dim, z, config.projector, config.projector_kernel)
             for z in config.z_dims])
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels, config.cls_token_dim)
        self.ap_head = SRAHead(D) if config.sra_head else None
        self.cls_projectors2 = nn.Linear(config.cls_token_dim, D) if config.cls_token_dim else None  # REG
        self.wg_norm = nn.LayerNorm(D, eps=1e-6) if config.cls_token_dim else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, sin-cos positions, N(0, 0.02) embeddings, adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.config.num_patches ** 0.5)
        self.pos_embed.data[:, self.config.prefix_tokens:] = torch.from_numpy(
            get_2d_sincos_pos_embed(self.config.hidden_size, grid)).float()       # a class token's row stays 0
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))     # patch embedding initialised like a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:                            # adaLN-Zero: every block starts as identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for linear in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear, self.final_layer.linear_cls):
            if linear is not None:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) → (N, C, H, W)."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              cls_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens entering block 1 (patch embedding + positions; REG's class token first) and the conditioning
        vector c."""
        tokens = self.x_embedder(x)                                   # (N, T, D)
        if self.cls_projectors2 is not None:
            if cls_token is None:
                cls_token = tokens.new_zeros(len(x), self.config.cls_token_dim)
            tokens = torch.cat([self.wg_norm(self.cls_projectors2(cls_token))[:, None], tokens], dim=1)
        c = self.t_embedder(t) + self.y_embedder(y)                   # (N, D)
        return tokens + self.pos_embed, c

    def project(self, h: torch.Tensor) -> list[torch.Tensor]:
        """The REPA projectors' outputs [(N, T, z_dim), ...] for tokens h (N, T, D) of block `encoder_depth`."""
        N, T, D = h.shape
        return [projector(h) if isinstance(projector, ConvProjector) else
                projector(h.reshape(-1, D)).reshape(N, T, -1) for projector in self.projectors]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_zs: bool = False,
                return_hidden: bool = False, cls_token: torch.Tensor | None = None, return_cls: bool = False):
        """x: (N, C, H, W) input in the model's own time; t: (N,) native timestep; y: (N,) labels.
        return_hidden=True returns (out, zs, hidden, c) for the trainer's further terms: hidden[b] is block b's
        image tokens (N, T, D), hidden[0] those entering block 1, c the condition (zs is [] unless return_zs). REG:
        `cls_token` (N, cls_dim) is the noisy class token fed with x (default 0), the projectors read it too (REG
        aligns it to the encoder's), and return_cls=True appends its predicted velocity (N, cls_dim) to what is
        returned (None without REG)."""
        h, c = self.embed(x, t, y, cls_token)
        n = self.config.prefix_tokens
        zs, hidden = [], [h[:, n:]]
        for i, block in enumerate(self.blocks):
            h = block(h, c)                                           # (N, n + T, D)
            hidden.append(h[:, n:])
            if return_zs and i + 1 == self.config.encoder_depth:
                zs = self.project(h)
        out, cls_out = self.final_layer(h, c) if n else (self.final_layer(h, c), None)
        out = self.unpatchify(out)                                    # (N, out_channels, H, W)
        if self.config.learn_sigma:
            out = out[:, : self.config.in_channels]                   # drop the variance half
        result = (out, zs, hidden, c) if return_hidden else (out, zs) if return_zs else (out,)
        result += (cls_out,) if return_cls else ()
        return result if len(result) > 1 else out


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions → (M, embed_dim): [sin(pos·ω), cos(pos·ω)], ω_j = 10000^(−2j/embed_dim)."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid², embed_dim) for a row-major token grid; first half encodes the column, second the row
    (MAE's layout, which the official checkpoints store)."""
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                           get_1d_sincos_pos_embed(embed_dim // 2, rows)], axis=1)


#################################################################################
#                                 Size registry                                 #
#################################################################################

SIZES = {  # name: (hidden_size, depth, num_heads)
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
REPA_DEPTH = {"S": 4, "B": 4, "L": 8, "XL": 8}   # REPA's aligned block (1-based) for each size


def model_config(name: str, **overrides) -> ModelConfig:
    """'SiT-XL/2' or 'DiT-B/4' → ModelConfig. DiT names default to learn_sigma=True (as released)."""
    m = re.fullmatch(r"(SiT|DiT)-(S|B|L|XL)/(2|4|8)", name)
    if m is None:
        raise ValueError(f"unknown model {name!r}: expected e.g. SiT-XL/2, SiT-B/4, DiT-S/8 "
                         f"(sizes {', '.join(SIZES)}, patch 2/4/8)")
    family, size, patch = m.group(1), m.group(2), int(m.group(3))
    hidden, depth, heads = SIZES[size]
    cfg = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch,
               learn_sigma=family == "DiT", encoder_depth=REPA_DEPTH[size])
    cfg.update(overrides)
    return ModelConfig(**cfg)


def size_name(config: ModelConfig, family: str = "SiT") -> str:
    """'SiT-XL/2'-style name if the config is a standard size, else a short description."""
    for size, (hidden, depth, heads) in SIZES.items():
        if (config.hidden_size, config.depth, config.num_heads) == (hidden, depth, heads) and config.mlp_ratio == 4:
            return f"{family}-{size}/{config.patch_size}"
    return f"custom (width {config.hidden_size}, depth {config.depth}, patch {config.patch_size})"
