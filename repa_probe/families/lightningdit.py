"""LightningDiT (hustvl/LightningDiT; Yao, Yang & Wang 2025, "Reconstruction vs. Generation: Taming
Optimization Dilemma in Latent Diffusion Models"): a DiT on 32-channel VA-VAE latents.

Architecture: DiT's adaLN-Zero transformer with optional SwiGLU feed-forward, RMSNorm (learned weight,
ε = 1e-6) in place of the non-affine LayerNorms, 2-D rotary position embedding on queries and keys (added to
DiT's fixed sin-cos table, not replacing it), qk-norm, and "wo_shift" adaLN (scale and gate only). The
released models (LightningDiT-XL/1 on 16×16×32 latents of 256-px images) use SwiGLU, RMSNorm and RoPE.
Parameter names are exactly LightningDiT's, so its state dicts load with strict key matching:

    x_embedder.proj.*, pos_embed, t_embedder.mlp.{0,2}.*, y_embedder.embedding_table.weight,
    feat_rope.freqs_{cos,sin}                         (RoPE tables, stored buffers: (grid², head_dim))
    blocks.{i}.{norm1, norm2}.weight                  (RMSNorm)
    blocks.{i}.attn.{qkv, proj, [q_norm, k_norm]}.*   (qk-norm: RMSNorm, or LayerNorm without RMSNorm)
    blocks.{i}.mlp.{w12, w3}.* | blocks.{i}.mlp.{fc1, fc2}.*   (SwiGLU | GELU MLP)
    blocks.{i}.adaLN_modulation.1.*                   (6·D rows, or 4·D with wo_shift)
    final_layer.{[norm_final.weight], linear, adaLN_modulation.1}.*

Files: LightningDiT's train.py saves {model, ema, opt, config}, config being its YAML config as a dict;
its inference.py takes the "ema" entry where there is one, else the dict itself as the state dict. Both load.
The architecture is read off the shapes; the heads from the RoPE tables or the qk-norm weights, else the
config's model_type, else --heads, else the standard size for the width and depth (stated as an assumption).

Time: LightningDiT trains with SiT's transport (path Linear, prediction velocity): x_s = s·x + (1 − s)·ε fed
s ∈ [0, 1] (0 = noise, 1 = data), target x − ε. That is exactly our "sit" convention.

Latents: LightningDiT normalises each VA-VAE latent channel with the dataset's mean and std (latents_stats.pt
beside the VA-VAE release), z = (μ − mean_c) / std_c · latent_multiplier (1.0), then noises z. A single
scale and shift cannot express this, so the input space says scale 1, shift 0 for a VAE whose 1×1 quant
convolutions have the statistics folded in (`fold_latent_stats`).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repa_probe.checkpoints import FORMAT_TAG, LoadedCheckpoint, Provenance, as_untrained
from repa_probe.errors import UserError
from repa_probe.families.base import Anatomy, InputSpace, ModelFamily, assign_weights, choose_weights, register_family
from repa_probe.models import (
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
)
from repa_probe.noise import get_convention
from repa_probe.runtime import file_sha256

# LightningDiT's model table: name → (width, depth, heads); patch sizes 1 and 2 of each
SIZES = {"B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16), "1p0B": (1536, 24, 24),
         "1p6B": (1792, 28, 28)}
VAE_DOWNSAMPLE = 16          # VA-VAE f16d32: 256-px images → 16×16×32 latents
# keys only LightningDiT's options produce (RoPE, RMSNorm, SwiGLU); DiT/SiT/REPA files have none of them
MARKER_KEYS = ("feat_rope.freqs_cos", "blocks.0.norm1.weight", "blocks.0.mlp.w12.weight")
LATENT_NOTE = ("LightningDiT was trained on VA-VAE latents normalised per channel with its latents_stats.pt "
               "(z = (mu - mean_c) / std_c); pass a --vae with those statistics folded in "
               "(repa_probe.families.lightningdit.fold_latent_stats), or the latents are not the model's")


@dataclass
class LightningDiTConfig:
    """Everything that fixes the architecture (plain data)."""
    input_size: int = 16          # latent side
    patch_size: int = 1
    in_channels: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_hidden: int = 3072        # SwiGLU: int(2/3 · 4·D); GELU MLP: 4·D
    num_classes: int = 1000       # the label table has num_classes + 1 rows; the last is the null class
    learn_sigma: bool = False
    qk_norm: bool = False
    swiglu: bool = True
    rope: bool = True
    rmsnorm: bool = True
    wo_shift: bool = False

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict:
        return asdict(self)


#################################################################################
#                                    Layers                                     #
#################################################################################

class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + ε) · w over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class VisionRoPE(nn.Module):
    """2-D rotary embedding of the token grid (EVA-02's, which LightningDiT uses). A head's channels form
    interleaved pairs (x₂ᵢ, x₂ᵢ₊₁); the pairs of the first half turn by row·ωᵢ, those of the second half by
    column·ωᵢ, ωᵢ = 10000^(−4i/head_dim), i < head_dim/4. The cos/sin tables are stored buffers."""

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dimension divisible by 4, not {head_dim}")
        half = head_dim // 2
        omega = 1.0 / 10000 ** (torch.arange(0, half, 2).float() / half)              # (head_dim/4,)
        angle = (torch.arange(grid).float()[:, None] * omega).repeat_interleave(2, dim=-1)  # (grid, half)
        rows, cols = angle[:, None].expand(grid, grid, half), angle[None].expand(grid, grid, half)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)        # row-major tokens
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., T, head_dim) → rotated."""
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return x * self.freqs_cos + rotated * self.freqs_sin


class Attention(nn.Module):
    """Multi-head self-attention; optional qk-norm, then RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rmsnorm: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = RMSNorm if rmsnorm else nn.LayerNorm
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRoPE | None = None) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)                          # (N, heads, T, head_dim)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class SwiGLU(nn.Module):
    """w3(silu(a) ⊙ b), [a, b] = w12(x) split in halves."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def _norm(dim: int, rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block: x += gate·attn(mod(norm(x))), x += gate·mlp(mod(norm(x))), modulation from c;
    wo_shift drops the shifts (4·D modulation rows instead of 6·D)."""

    def __init__(self, c: LightningDiTConfig):
        super().__init__()
        D = c.hidden_size
        self.wo_shift = c.wo_shift
        self.norm1 = _norm(D, c.rmsnorm)
        self.attn = Attention(D, c.num_heads, c.qk_norm, c.rmsnorm)
        self.norm2 = _norm(D, c.rmsnorm)
        self.mlp = SwiGLU(D, c.mlp_hidden) if c.swiglu else Mlp(D, c.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, (4 if c.wo_shift else 6) * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRoPE | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm (always shift and scale), then token → p×p×C output patch."""

    def __init__(self, c: LightningDiTConfig):
        super().__init__()
        D = c.hidden_size
        self.norm_final = _norm(D, c.rmsnorm)
        self.linear = nn.Linear(D, c.patch_size ** 2 * c.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
    """forward(x, t, y) → the velocity x − ε in LightningDiT's own time (t = 1 is data), learned-sigma half
    dropped, as its own forward returns it."""

    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(c.num_classes, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid ** 2, D), requires_grad=False)
        self.feat_rope = VisionRoPE(D // c.num_heads, c.grid) if c.rope else None
        self.blocks = nn.ModuleList(LightningDiTBlock(c) for _ in range(c.depth))
        self.final_layer = FinalLayer(c)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """LightningDiT's (DiT's) initialisation: Xavier linears and patch embedding, zero biases, sin-cos
        positions, N(0, 0.02) label and time embeddings, zero adaLN and output layers (blocks = identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.config.hidden_size,
                                                                           self.config.grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents in LightningDiT's time; t: (N,) its timestep; y: (N,) labels."""
        h = self.x_embedder(x) + self.pos_embed                        # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                     # (N, D)
        for block in self.blocks:
            h = block(h, c, self.feat_rope)
        cfg, g = self.config, self.config.grid
        out = self.final_layer(h, c).reshape(len(x), g, g, cfg.patch_size, cfg.patch_size, cfg.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(len(x), cfg.out_channels, cfg.input_size, cfg.input_size)
        return out[:, :cfg.in_channels]


#################################################################################
#                                  The family                                   #
#################################################################################

def looks_like_lightningdit(obj: dict) -> bool:
    """Whether a checkpoint object is LightningDiT's: its training config names a LightningDiT model, or its
    weights have keys or shapes only LightningDiT's options give (RoPE, RMSNorm, SwiGLU, wo_shift adaLN).
    One with none of these options is key for key a SiT state dict and is left to the sit family."""
    if not isinstance(obj, dict) or obj.get("format") == FORMAT_TAG:
        return False
    model_cfg = obj.get("config", {}).get("model") if isinstance(obj.get("config"), dict) else None
    if isinstance(model_cfg, dict) and str(model_cfg.get("model_type", "")).startswith("LightningDiT"):
        return True
    sd = _state_dict(obj)
    if not isinstance(sd, dict) or not isinstance(sd.get("x_embedder.proj.weight"), torch.Tensor):
        return False
    ada = sd.get("blocks.0.adaLN_modulation.1.weight")
    return any(k in sd for k in MARKER_KEYS) or (
        isinstance(ada, torch.Tensor) and ada.shape[0] == 4 * sd["x_embedder.proj.weight"].shape[0])


class LightningDiTFamily(ModelFamily):
    name = "lightningdit"
    description = "LightningDiT (hustvl/LightningDiT): SwiGLU, RMSNorm, RoPE DiT on VA-VAE latents"

    def recognise(self, obj: dict, path: Path) -> bool:
        return looks_like_lightningdit(obj)

    def load(self, obj: dict, path: Path, *, convention: str | None, weights: str,
             device: str | torch.device = "cpu", heads: int | None = None) -> LoadedCheckpoint:
        sd, chosen = _choose(obj, weights, path)
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        data = _section(cfg, "data")
        meta = {"downsample": int(_section(cfg, "vae").get("downsample_ratio", VAE_DOWNSAMPLE)),
                "latent_multiplier": float(data.get("latent_multiplier", 1.0)),
                "latent_norm": bool(data.get("latent_norm", True))}
        warnings = [LATENT_NOTE] if meta["latent_norm"] else []
        config = config_from_state_dict(sd, path, _section(cfg, "model").get("model_type"), heads, warnings)
        model = build_model(config, sd, path).to(device).eval()

        transport = _section(cfg, "transport")
        if convention is None and (transport.get("path_type", "Linear"), transport.get("prediction", "velocity")) \
                != ("Linear", "velocity"):
            raise UserError(f"'{path}' was trained with transport path {transport.get('path_type')!r}, prediction "
                            f"{transport.get('prediction')!r}: only Linear/velocity (the 'sit' convention) is known; "
                            f"pass --convention to say how it is fed")
        get_convention(convention or "sit")
        train = "config" in obj or "opt" in obj                  # train.py's {model, ema, opt, config}
        step = re.fullmatch(r"(\d+)\.pt", path.name) if train else None   # train.py names files by step
        fmt = "lightningdit-train" if train else "lightningdit-state-dict" if chosen == "state_dict" else \
            "lightningdit-ema"
        prov = Provenance(path=str(path), format=fmt, weights=chosen, convention=convention or "sit",
                          convention_source="flag" if convention else "checkpoint",
                          step=int(step.group(1)) if step else None,
                          sha256=file_sha256(path), args=_flat(cfg), warnings=warnings, family=self.name)
        return LoadedCheckpoint(model=model, config=config, provenance=prov, meta=meta, family=self)

    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        """Latents of a VAE with the statistics folded in (scale 1), or, for a model trained without latent
        normalisation, the plain VAE's posterior mean times the latent multiplier."""
        c: LightningDiTConfig = model.config
        meta = meta or {}
        scale = 1.0 if meta.get("latent_norm", True) else meta.get("latent_multiplier", 1.0)
        space = InputSpace("latents", c.in_channels, c.input_size, meta.get("downsample", VAE_DOWNSAMPLE), scale,
                           0.0, None)
        return Anatomy(name=size_name(c), depth=c.depth, width=c.hidden_size, grid=c.grid, patch_size=c.patch_size,
                       input=space, num_classes=c.num_classes)

    def untrained(self, ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
        """LightningDiT's initialisation of the same architecture, seeded, with the adaLN-Zero gates given
        PyTorch's default init (as_untrained)."""
        torch.manual_seed(seed)
        return as_untrained(ckpt, LightningDiT(ckpt.config))

    def describe_rows(self, ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
        c: LightningDiTConfig = ckpt.config
        options = [n for n, on in (("SwiGLU", c.swiglu), ("RMSNorm", c.rmsnorm), ("RoPE", c.rope),
                                   ("qk-norm", c.qk_norm), ("no adaLN shift", c.wo_shift),
                                   ("learn sigma", c.learn_sigma)) if on]
        return [("architecture", size_name(c)),
                ("width / depth / heads", f"{c.hidden_size} / {c.depth} / {c.num_heads}"),
                ("options", ", ".join(options) or "none (plain DiT blocks)"),
                ("input", f"{c.in_channels}×{c.input_size}², patch {c.patch_size} → {c.grid ** 2} tokens"),
                ("classes", f"{c.num_classes} (+1 null)"),
                ("latent normalisation", ("per channel, latents_stats.pt (fold into the VAE: fold_latent_stats)"
                                          if ckpt.meta.get("latent_norm", True) else
                                          f"none, × {ckpt.meta.get('latent_multiplier')}"))]


LIGHTNINGDIT = register_family(LightningDiTFamily(), priority=1)   # its keys extend SiT's: offered first


#################################################################################
#                     Unpacking, config inference, building                     #
#################################################################################

def _state_dict(obj: dict) -> dict:
    sd = obj.get("ema", obj.get("model")) if ("ema" in obj or "model" in obj) else obj
    return _strip_prefix(sd) if isinstance(sd, dict) else sd


def _strip_prefix(sd: dict) -> dict:
    """DDP's "module." prefix, which LightningDiT's own train.py strips when it loads weights."""
    if sd and all(str(k).startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _choose(obj: dict, weights: str, path: Path) -> tuple[dict, str]:
    """→ (state dict, which weights): the requested entry of a training dict, else the other, else the dict."""
    if "ema" not in obj and "model" not in obj:
        return _strip_prefix(obj), "state_dict"
    sd, name = choose_weights(obj, weights, path)
    return _strip_prefix(sd), name


def _section(cfg: dict, name: str) -> dict:
    return cfg[name] if isinstance(cfg.get(name), dict) else {}


def _flat(cfg: dict) -> dict:
    """LightningDiT's nested YAML config as flat plain data ("model.use_rope": True, ...)."""
    plain = (str, int, float, bool, type(None))
    return {f"{s}.{k}": v for s, sec in cfg.items() if isinstance(sec, dict)
            for k, v in sec.items() if isinstance(v, plain)}


def size_name(c: LightningDiTConfig) -> str:
    std = next((n for n, (d, depth, h) in SIZES.items() if (d, depth, h) == (c.hidden_size, c.depth, c.num_heads)),
               None)
    return f"LightningDiT-{std}/{c.patch_size}" if std else \
        f"LightningDiT (width {c.hidden_size}, depth {c.depth}, {c.num_heads} heads)/{c.patch_size}"


def config_from_state_dict(sd: dict, path: str | Path = "<state dict>", model_type: str | None = None,
                           heads: int | None = None, warnings: list[str] | None = None) -> LightningDiTConfig:
    """The architecture from the shapes (and, for the heads only, the config's model_type or `heads`)."""
    def shape(key: str) -> list[int] | None:
        return list(sd[key].shape) if isinstance(sd.get(key), torch.Tensor) else None

    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight"):
        if shape(key) is None:
            raise UserError(f"'{path}' is not a complete LightningDiT state dict: missing key '{key}'")
    D, C, p, _ = shape("x_embedder.proj.weight")
    grid = round(shape("pos_embed")[1] ** 0.5)
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise UserError(f"'{path}' is not a LightningDiT state dict: it has no 'blocks.N.*' keys")
    swiglu = shape("blocks.0.mlp.w12.weight")
    mlp_hidden = swiglu[0] // 2 if swiglu else (shape("blocks.0.mlp.fc1.weight") or [4 * D])[0]
    c = LightningDiTConfig(
        input_size=grid * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
        num_heads=_heads(sd, D, depth, path, model_type, heads, warnings if warnings is not None else []),
        mlp_hidden=mlp_hidden, num_classes=shape("y_embedder.embedding_table.weight")[0] - 1,
        learn_sigma=shape("final_layer.linear.weight")[0] == 2 * p * p * C,
        qk_norm="blocks.0.attn.q_norm.weight" in sd, swiglu=swiglu is not None, rope="feat_rope.freqs_cos" in sd,
        rmsnorm="blocks.0.norm1.weight" in sd,
        wo_shift=(shape("blocks.0.adaLN_modulation.1.weight") or [6 * D])[0] == 4 * D)
    return c


def _heads(sd: dict, D: int, depth: int, path, model_type: str | None, heads: int | None,
           warnings: list[str]) -> int:
    """RoPE tables (grid², head_dim) and qk-norm weights (head_dim,) fix the heads; else the config's
    model type, --heads, or the standard size (an assumption that goes into the warnings)."""
    for key, axis in (("feat_rope.freqs_cos", 1), ("blocks.0.attn.q_norm.weight", 0)):
        if isinstance(sd.get(key), torch.Tensor):
            n = D // sd[key].shape[axis]
            if heads is not None and heads != n:
                raise UserError(f"--heads {heads}: the weights of '{path}' say {n} heads ('{key}')")
            return n
    named = re.fullmatch(r"LightningDiT-(\w+)/\d+", model_type or "")
    if named and named.group(1) in SIZES:
        n = SIZES[named.group(1)][2]
        if heads is not None and heads != n:
            raise UserError(f"--heads {heads}: '{path}' is a {model_type}, which has {n} heads")
        return n
    if heads is not None:
        if heads <= 0 or D % heads:
            raise UserError(f"--heads {heads}: must be a positive divisor of the width {D} of '{path}'")
        return heads
    standard = next((h for d, n, h in SIZES.values() if (d, n) == (D, depth)), None)
    if standard is None:
        raise UserError(f"'{path}': cannot tell the attention heads of a width-{D}, {depth}-block LightningDiT "
                        f"without RoPE or qk-norm: pass --heads N")
    warnings.append(f"attention heads ASSUMED to be {standard} (the standard size for width {D}, depth {depth}): "
                    f"the weights cannot tell; pass --heads N if it was trained otherwise")
    return standard


def build_model(config: LightningDiTConfig, sd: dict, path: str | Path = "<state dict>") -> LightningDiT:
    """A LightningDiT of `config` holding `sd` (families.base.assign_weights: every key checked by name and shape)."""
    model = assign_weights(lambda: LightningDiT(config), sd, path, "LightningDiT", size_name(config))
    model.pos_embed.requires_grad_(False)
    return model


#################################################################################
#                              Latent normalisation                             #
#################################################################################

@torch.no_grad()
def fold_latent_stats(vae: nn.Module, mean: torch.Tensor, std: torch.Tensor, multiplier: float = 1.0) -> nn.Module:
    """Fold LightningDiT's per-channel latent normalisation into a KL autoencoder's 1×1 quant convolutions,
    in place: afterwards its posterior mean is (μ − mean)/std · multiplier (its std scaled by the same
    factor), and decode(z) is the old decode(z · std/multiplier + mean), as LightningDiT decodes its samples.
    Then InputSpace(scale=1, shift=0) is exact.

    vae: anything with `quant_conv` (2C → 2C: mean, log-variance) and `post_quant_conv` (C → C) 1×1
    convolutions (diffusers' AutoencoderKL, LightningDiT's VA-VAE). mean, std: C values each (the 'mean' and
    'std' of latents_stats.pt, shape (1, C, 1, 1))."""
    q, pq = vae.quant_conv, vae.post_quant_conv
    C = pq.in_channels
    m, s = mean.reshape(C).double(), std.reshape(C).double() / multiplier
    w, b = q.weight.double(), q.bias.double()
    w[:C] /= s[:, None, None, None]
    b[:C] = (b[:C] - m) / s
    b[C:] -= 2 * s.log()                                       # log-variance of μ/s
    q.weight.copy_(w)
    q.bias.copy_(b)
    pw = pq.weight.double()                                    # (C_out, C_in, 1, 1)
    pq.bias.copy_(pq.bias.double() + pw[:, :, 0, 0] @ m)
    pq.weight.copy_(pw * s[None, :, None, None])
    return vae
