"""Target encoders: the pretrained vision transformers whose patch tokens REPA aligns to (docs/encoders.md).

An encoder is named the way REPA names it, ``type-arch-size`` (``dinov2-vit-b``, ``mae-vit-l``,
``jepa-vit-h``, ``mocov3-vit-b``, ``clip-vit-L``, ...), or by any timm model name. Every registry entry
is a timm architecture plus a *family*: how the family's images are normalised, whether REPA takes its
tokens before or after the final norm, and a converter from the original repository's weight file to
timm's parameter names. Written against timm 1.0.31 (``timm.__version__`` is recorded in ``describe()``).

What REPA does (sihyun-yu/REPA ``train.py: preprocess_raw_image``, ``utils.py: load_encoders``), and
what we do, for a diffusion model whose token grid is ``grid × grid`` (16 for SiT/2 on 32×32 latents):

    family    mean/std   input size            tokens                 REPA at 256 px
    dinov2    ImageNet   grid·14, bicubic      after final norm       224 px, x_norm_patchtokens
    mae       ImageNet   grid·16 (H: ·14)      before final norm      256 px, blocks output
    jepa      ImageNet   grid·14, bicubic      after final norm       224 px
    mocov3    ImageNet   grid·16, bicubic      after final norm       256 px
    clip      CLIP       grid·14 (B: ·16)      before ln_post         224 px
    siglip    0.5 / 0.5  grid·patch, bicubic   after final norm       (not in REPA)

Resizing is ``F.interpolate(mode='bicubic', antialias=False)`` as in REPA, skipped when the image already
has the size; we resize before normalising (REPA normalises first for most families: the two orders are
the same map, since both are linear and bicubic weights sum to one). Position embeddings: the model keeps
the grid it was trained at and timm resamples them to the requested grid on every forward
(``dynamic_img_size=True``: bicubic, antialiased, in fp32); that is the same function and the same
arguments REPA applies once at load time (``resample_abs_pos_embed(pos_embed, [16, 16])``), so the
features agree, and one loaded encoder serves any grid. Patch tokens exclude CLS and register tokens;
the pooled vector is their mean.

Weights never come from the network unless asked (``pretrained_download=True``): a spec string
``NAME=PATH`` names a local ``.pth``/``.pt``/``.safetensors`` file (original layout or timm's), or the file
is found by its official name in ``$REPA_PROBE_WEIGHTS`` / ``~/.cache/repa-probe/weights``. ``.pth`` files
are read with ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa_probe import teacher as cifar_teacher
from repa_probe.checkpoints import safe_torch_load
from repa_probe.errors import UserError
from repa_probe.models import attention_hooks, attention_logits, has_attention
from repa_probe.registry import Registry

#################################################################################
#                          Normalisation constants                              #
#################################################################################

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RANDOM_SEED = 0  # random_init=True always draws the same network, so its features can be cached too

#################################################################################
#            Converters: original repositories' weight files → timm names       #
#################################################################################
# Each converter takes what torch.load returned and the (timm) model, and returns a state dict in timm's
# names. They end in timm's own `checkpoint_filter_fn`, which converts the DINOv2 hub layout (mask_token,
# register_tokens, SwiGLU w12/w3), OpenAI CLIP's `visual.*` names and I-JEPA's `{'encoder': module.*}`,
# and resamples position embeddings stored at another grid. Keys that are not part of the encoder trunk
# (heads, decoders, predictors, momentum encoders) survive conversion and are dropped by `_HARMLESS`.

_vit_filter = timm.models.vision_transformer.checkpoint_filter_fn


def convert_timm(ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """timm layout, or any layout timm's ViT filter recognises (DINOv2 hub, OpenAI CLIP, I-JEPA)."""
    return _vit_filter(dict(ckpt), model)


def convert_mae(ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """MAE (facebookresearch/mae): ``{'model': encoder [+ decoder_*, mask_token] state dict}``.

    The encoder's names are already timm's (MAE's ViT subclasses timm's); the decoder is dropped.
    """
    sd = ckpt.get("model", ckpt)
    return _vit_filter({k: v for k, v in sd.items() if not k.startswith("decoder") and k != "mask_token"}, model)


def convert_ijepa(ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """I-JEPA (facebookresearch/ijepa): ``{'encoder': {'module.<timm name>': ...}, 'predictor': ...,
    'target_encoder': ..., 'opt': ...}``. Like REPA we take ``encoder``; no CLS token, pos_embed [1, 256, D]."""
    sd = ckpt.get("encoder", ckpt)
    return _vit_filter({k.removeprefix("module."): v for k, v in sd.items()}, model)


# A released MoCo v3 ViT-L file misnames four parameters of blocks 13 and 14 (REPA's utils.py renames them).
_MOCOV3_KEY_FIXES = {
    "blocks.13.norm13.": "blocks.13.norm1.", "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
    "blocks.14.norm14.": "blocks.14.norm2.", "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2.",
}


def convert_mocov3(ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """MoCo v3 (facebookresearch/moco-v3): ``{'state_dict': {'module.base_encoder.<timm name>', ...,
    'module.momentum_encoder.*', 'module.predictor.*'}, 'optimizer': ...}``.

    Only the base encoder is kept; its ``head.*`` (the projection MLP) is dropped later as harmless.
    """
    sd = {k.removeprefix("module."): v for k, v in ckpt.get("state_dict", ckpt).items()}
    if any(k.startswith("base_encoder.") for k in sd):
        sd = {k.removeprefix("base_encoder."): v for k, v in sd.items() if k.startswith("base_encoder.")}
    out = {}
    for k, v in sd.items():
        for wrong, right in _MOCOV3_KEY_FIXES.items():
            k = k.replace(wrong, right)
        out[k] = v
    return _vit_filter(out, model)


# Keys of a weight file that are not part of the trunk we run, once converted: classifier or projection
# heads (MoCo v3's projector, CLIP's `proj`) and SigLIP's attention pool. Anything else that does not fit
# is an error. (MAE's decoder, DINOv2's mask_token, MoCo's momentum encoder and predictor and I-JEPA's
# predictor never get this far: their converters leave them behind.)
_HARMLESS = re.compile(r"^(head|attn_pool)\.")

#################################################################################
#                               Encoder registry                                #
#################################################################################


@dataclass(frozen=True)
class Family:
    """What every encoder of one kind shares: preprocessing, where REPA takes tokens, the converter."""
    name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    final_norm: bool = True   # tokens after the trunk's final norm (REPA: DINOv2, MoCo v3, I-JEPA) or before
    convert: Callable[[Mapping[str, Any], nn.Module], dict[str, Tensor]] | None = None  # None: timm's filter
    weights_hint: str = ""    # where to get the official weights, for the "needs weights" error


DINOV2 = Family("dinov2", weights_hint="https://github.com/facebookresearch/dinov2")
MAE = Family("mae", final_norm=False, convert=convert_mae,
             weights_hint="https://github.com/facebookresearch/mae")
JEPA = Family("jepa", convert=convert_ijepa,
              weights_hint="https://github.com/facebookresearch/ijepa")
MOCOV3 = Family("mocov3", convert=convert_mocov3,
                weights_hint="https://github.com/facebookresearch/moco-v3")
CLIP = Family("clip", CLIP_MEAN, CLIP_STD, final_norm=False,
              weights_hint="https://github.com/openai/CLIP/blob/main/clip/clip.py (_MODELS)")
SIGLIP = Family("siglip", SIGLIP_MEAN, SIGLIP_STD, weights_hint="https://huggingface.co/timm")


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry.

    A timm encoder gives ``arch``, a timm name whose pretrained tag (``.lvd142m``) names the timm weights that
    ``pretrained_download`` fetches; no tag means timm has none of this encoder's weights (MoCo v3). A custom
    encoder (not a timm model) gives ``builder``: a function returning an nn.Module whose
    ``forward_features(x)`` returns tokens [N, num_prefix_tokens + grid², D] (``num_prefix_tokens``
    attribute, default 0) or, instead, a ``tokens(model, x) -> [N, grid², D]`` function; it should also
    state ``patch_size`` and ``embed_dim`` so the encoder table needs no model.
    """
    family: Family
    arch: str = ""
    weight_files: tuple[str, ...] = ()   # official file names, looked up in the weights folders
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra timm kwargs (tests: tiny depth)
    builder: Callable[[], nn.Module] | None = None
    tokens: Callable[[nn.Module, Tensor], Tensor] | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    weights_url: str = ""                # the official file's address, for the "needs weights" error
    bundled: Path | None = None          # weights shipped inside the package, used when no file is given or found
    map_stride: int | None = None        # a CNN's pixels per position of its own map, coarser than patch_size: the
                                         # map is resampled to the grid (None: one token per patch)


_FAIR = "https://dl.fbaipublicfiles.com"


def _dinov2(size: str, reg: bool, arch: str) -> EncoderSpec:
    base = f"dinov2_vit{size}14"
    fname = f"{base}{'_reg4' if reg else ''}_pretrain.pth"
    return EncoderSpec(DINOV2, arch, (fname,), weights_url=f"{_FAIR}/dinov2/{base}/{fname}")


def _mae(size: str, arch: str) -> EncoderSpec:
    fname = f"mae_pretrain_vit_{dict(b='base', l='large', h='huge')[size]}.pth"
    return EncoderSpec(MAE, arch, (fname, f"mae_vit{size}.pth"), weights_url=f"{_FAIR}/mae/pretrain/{fname}")


_BUILT_IN: dict[str, EncoderSpec] = {
    # DINOv2 (torch.hub checkpoints dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth; ViT-g uses a SwiGLU MLP)
    "dinov2-vit-s": _dinov2("s", False, "vit_small_patch14_dinov2.lvd142m"),
    "dinov2-vit-b": _dinov2("b", False, "vit_base_patch14_dinov2.lvd142m"),
    "dinov2-vit-l": _dinov2("l", False, "vit_large_patch14_dinov2.lvd142m"),
    "dinov2-vit-g": _dinov2("g", False, "vit_giant_patch14_dinov2.lvd142m"),
    "dinov2-vit-s-reg": _dinov2("s", True, "vit_small_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vit-b-reg": _dinov2("b", True, "vit_base_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vit-l-reg": _dinov2("l", True, "vit_large_patch14_reg4_dinov2.lvd142m"),
    "dinov2-vit-g-reg": _dinov2("g", True, "vit_giant_patch14_reg4_dinov2.lvd142m"),
    # MAE (mae_pretrain_vit_{base,large,huge}.pth; REPA calls them ckpts/mae_vit{b,l,h}.pth)
    "mae-vit-b": _mae("b", "vit_base_patch16_224.mae"),
    "mae-vit-l": _mae("l", "vit_large_patch16_224.mae"),
    "mae-vit-h": _mae("h", "vit_huge_patch14_224.mae"),
    # I-JEPA ViT-H/14, ImageNet-1k, 300 epochs (REPA: ckpts/ijepa_vith.pth)
    "jepa-vit-h": EncoderSpec(JEPA, "vit_huge_patch14_gap_224.in1k_ijepa",
                              ("IN1K-vit.h.14-300e.pth.tar", "ijepa_vith.pth"),
                              weights_url=f"{_FAIR}/ijepa/IN1K-vit.h.14-300e.pth.tar"),
    # MoCo v3 (no timm weights: the architecture is timm's plain ViT; REPA: ckpts/mocov3_vit{b,l}.pth)
    "mocov3-vit-b": EncoderSpec(MOCOV3, "vit_base_patch16_224", ("vit-b-300ep.pth.tar", "mocov3_vitb.pth"),
                                weights_url=f"{_FAIR}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"),
    "mocov3-vit-l": EncoderSpec(MOCOV3, "vit_large_patch16_224", ("mocov3_vitl.pth",)),
    # OpenAI CLIP image towers; QuickGELU as in the original (timm's non-quickgelu arch would differ)
    "clip-vit-B": EncoderSpec(CLIP, "vit_base_patch16_clip_quickgelu_224.openai", ("ViT-B-16.pth",)),
    "clip-vit-L": EncoderSpec(CLIP, "vit_large_patch14_clip_quickgelu_224.openai", ("ViT-L-14.pth",)),
    # SigLIP (timm layout only), each trained at a 16×16 token grid
    "siglip-vit-b": EncoderSpec(SIGLIP, "vit_base_patch16_siglip_256.webli"),
    "siglip-vit-l": EncoderSpec(SIGLIP, "vit_large_patch16_siglip_256.webli"),
    "siglip-so400m": EncoderSpec(SIGLIP, "vit_so400m_patch14_siglip_224.webli"),
    "siglip2-vit-b": EncoderSpec(SIGLIP, "vit_base_patch16_siglip_256.v2_webli"),
    "siglip2-so400m": EncoderSpec(SIGLIP, "vit_so400m_patch14_siglip_224.v2_webli"),
    # Our CIFAR-10 SimCLR ResNet (repa_probe/teacher.py; card: repa_probe/assets/cifar_ssl_resnet.md). Its 8×8
    # map is resampled to the grid; patch size 2 means 32 px images for a 16×16 grid. Weights ship with the package.
    "cifar-ssl-resnet": EncoderSpec(
        Family("cifar-ssl", cifar_teacher.CIFAR_MEAN, cifar_teacher.CIFAR_STD), builder=cifar_teacher.build_untrained,
        tokens=cifar_teacher.tokens_for_registry, patch_size=2, embed_dim=cifar_teacher.TeacherConfig().embed_dim,
        bundled=cifar_teacher.weights_path(), map_stride=cifar_teacher.TeacherConfig().stride),
}

# REPA's own spelling of the register variants (its encoder type contains "reg").
ALIASES = {f"dinov2reg-vit-{s}": f"dinov2-vit-{s}-reg" for s in "sblg"}


def register_encoder(name: str, spec: EncoderSpec, *, priority: int = 0, overwrite: bool = False) -> EncoderSpec:
    """Add an encoder to the registry (e.g. a CIFAR-10 self-supervised teacher ``cifar-ssl-...``)."""
    if not (spec.arch or spec.builder):
        raise ValueError(f"encoder {name!r}: give a timm arch or a builder")
    return ENCODERS.register(name, spec, priority=priority, overwrite=overwrite)


ENCODERS: Registry[EncoderSpec] = Registry("encoder")
for _name, _spec in _BUILT_IN.items():
    register_encoder(_name, _spec)


def _timm_family(arch: str) -> Family:
    """A plain timm model name: normalisation from its pretrained config, tokens after the final norm."""
    cfg = timm.models.get_pretrained_cfg(arch)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return Family("timm", tuple(mean), tuple(std), weights_hint=f"https://huggingface.co/timm/{arch}")


def get_encoder_spec(name: str) -> tuple[str, EncoderSpec]:
    """(canonical name, spec) for a registry name (case-insensitive), a REPA alias or a timm model name."""
    name = ALIASES.get(name, name)
    if name in ENCODERS:
        return name, ENCODERS[name]
    folded = {k.lower(): k for k in ENCODERS}
    if name.lower() in folded:
        return folded[name.lower()], ENCODERS[folded[name.lower()]]
    if timm.is_model(name):
        cfg = timm.models.get_pretrained_cfg(name)
        tagged = name if "." in name or cfg is None or not cfg.tag else f"{name}.{cfg.tag}"  # timm's default
        return name, EncoderSpec(_timm_family(tagged), tagged)
    known = list(ENCODERS) + list(ALIASES)
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    if len(close) < 4:
        close += difflib.get_close_matches(name, timm.list_models(pretrained=True), n=4 - len(close), cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(list(ENCODERS)[:8])}, ..."
    raise UserError(f"unknown encoder {name!r}: {hint} (`repa-probe encoders` lists them; any timm model "
                    "name works too)")

#################################################################################
#                                  Weight files                                 #
#################################################################################


def parse_encoder_spec(s: str) -> tuple[str, Path | None]:
    """``'dinov2-vit-b=/w/dinov2_vitb14_pretrain.pth'`` → (``'dinov2-vit-b'``, Path); ``'mae-vit-l'`` → (name, None)."""
    name, sep, path = s.strip().partition("=")
    name, path = name.strip(), path.strip()
    if not name:
        raise UserError(f"--encoder {s!r}: give an encoder name, e.g. dinov2-vit-b or dinov2-vit-b=/path/weights.pth")
    if sep and not path:
        raise UserError(f"--encoder {s!r}: nothing after '='; give the weight file, e.g. {name}=/path/weights.pth")
    return name, Path(path).expanduser() if path else None


def weights_dirs() -> list[Path]:
    """Folders searched for official weight files: ``$REPA_PROBE_WEIGHTS`` (os.pathsep-separated) or
    ``~/.cache/repa-probe/weights``."""
    env = os.environ.get("REPA_PROBE_WEIGHTS")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path.home() / ".cache" / "repa-probe" / "weights"]


def candidate_files(name: str, spec: EncoderSpec) -> list[str]:
    """File names that count as this encoder's weights in a weights folder, official ones first."""
    names = [*spec.weight_files, f"{name}.safetensors", f"{name}.pth"]
    if spec.arch:
        names.append(f"{spec.arch}.safetensors")
    return list(dict.fromkeys(names))


def find_weights(name: str, spec: EncoderSpec) -> Path | None:
    """The first candidate file present in a weights folder, or None."""
    for folder in weights_dirs():
        for fname in candidate_files(name, spec):
            if (folder / fname).is_file():
                return folder / fname
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_weights(path: Path) -> Mapping[str, Any]:
    """Read a weight file without running code from it: safetensors, or torch.load(weights_only=True)."""
    if not path.is_file():
        raise UserError(f"encoder weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"encoder weights {path}: not a readable safetensors file ({_first_line(e)}); "
                            "is the download complete?") from None
    if _is_torchscript(path):
        raise UserError(
            f"encoder weights {path}: a TorchScript archive (like OpenAI's CLIP .pt); repa-probe reads plain "
            "state dicts only: convert it once, if you trust the file, with python -c \"import torch; "
            f"torch.save(torch.jit.load('{path}', map_location='cpu').state_dict(), '{path.with_suffix('.pth')}')\"")
    obj = safe_torch_load(path, f"encoder weights '{path}'")
    if not isinstance(obj, Mapping):
        raise UserError(f"encoder weights {path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _state_dict_sha256(sd: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

#################################################################################
#                                 Building models                               #
#################################################################################

def _create_timm(spec: EncoderSpec, *, pretrained: bool = False) -> nn.Module:
    """The trunk at any input grid, without classifier; without pooling head too, unless timm's own
    pretrained weights (which carry it, and are loaded strictly) are being downloaded."""
    kwargs = dict(num_classes=0, dynamic_img_size=True, **({} if pretrained else dict(global_pool="")))
    try:
        return timm.create_model(spec.arch, pretrained=pretrained, **kwargs, **spec.model_kwargs)
    except TypeError as e:
        raise UserError(f"timm model {spec.arch!r} is not a ViT-style model with patch tokens ({e})") from None


def _build(spec: EncoderSpec, *, on_meta: bool) -> nn.Module:
    """The untrained network; on the meta device (no memory, no init) when weights will be assigned."""
    if spec.builder is not None:
        return spec.builder()
    if on_meta:
        with torch.device("meta"):
            return _create_timm(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return _create_timm(spec)


def load_weights_into(model: nn.Module, sd: Mapping[str, Any], spec: EncoderSpec, source: str) -> None:
    """Convert ``sd`` to the model's names and load it; every trunk parameter must be there."""
    convert = spec.family.convert or (convert_timm if spec.builder is None else lambda ckpt, _: dict(ckpt))
    converted = convert(sd, model)
    own = model.state_dict()
    converted = {k: v for k, v in converted.items() if k in own or not _HARMLESS.match(k)}
    bad = [k for k, v in converted.items() if not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"encoder weights {source}: entries {_few(bad)} are not tensors; not a state dict")
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise UserError(f"encoder weights {source} do not fit {spec.arch or 'the model'}: shape "
                        f"{', '.join(mismatched[:3])} (file vs model); wrong size or wrong encoder name?")
    on_meta = any(t.is_meta for t in own.values())
    converted = {k: v.to(own[k].dtype) if k in own else v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=on_meta)
    if missing or unexpected:
        parts = [f"{what} {_few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise UserError(f"encoder weights {source} do not match {spec.arch or 'the model'}: {'; '.join(parts)}; "
                        "wrong file for this encoder name?")
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:  # a buffer the weight file does not carry: cannot come from assignment
        raise UserError(f"encoder weights {source}: {still_meta[:3]} are not in the file")


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _timm_tokens(model: nn.Module, x: Tensor, final_norm: bool) -> tuple[Tensor, Tensor | None]:
    """Last block's patch tokens [N, T, D] (CLS and registers removed) and its CLS token [N, D] (None without
    one), optionally after the final norm."""
    out = model.forward_intermediates(x, indices=1, norm=final_norm, output_fmt="NLC", intermediates_only=True,
                                      return_prefix_tokens=True)[-1]
    tokens, prefix = out if isinstance(out, tuple) else (out, None)
    has_cls = prefix is not None and getattr(model, "cls_token", None) is not None    # timm puts CLS first
    return tokens, prefix[:, 0] if has_cls else None


def _builder_tokens(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """A builder's patch tokens and the first of its prefix tokens as its CLS (None without prefix tokens)."""
    n = getattr(model, "num_prefix_tokens", 0)
    out = model.forward_features(x)
    return out[:, n:], out[:, 0] if n else None

#################################################################################
#                                    Encoder                                    #
#################################################################################


class Encoder(nn.Module):
    """A frozen target encoder: ``encode(images01, grid) -> (tokens [N, grid², D], pooled [N, D])``."""

    def __init__(self, name: str, spec: EncoderSpec, model: nn.Module, *, weights_path: Path | None,
                 weights_sha256: str | None, random_init: bool, source: str):
        super().__init__()
        self.name, self.spec, self.model = name, spec, model.eval().requires_grad_(False)
        self.arch = spec.arch or type(model).__name__
        self.family = spec.family.name
        self.weights_path, self.weights_sha256, self.random_init = weights_path, weights_sha256, random_init
        self.source = source  # "file", "timm-download" or "random"
        self.patch_size = _patch_size(model, spec)
        self.embed_dim = spec.embed_dim or getattr(model, "embed_dim", None) or getattr(model, "num_features")
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.precision = "fp32"   # "bf16": under bf16 autocast; "auto": chosen by choose_precision on first use
        self.precision_note = ""  # what choose_precision chose, and why

    def input_size(self, grid: int) -> int:
        """Pixels per side fed to the encoder so that it yields ``grid × grid`` patch tokens."""
        return grid * self.patch_size

    def preprocess(self, images01: Tensor, grid: int) -> Tensor:
        """[N, 3, H, W] in [0, 1] → resized (bicubic, no antialias, as REPA) to the grid and normalised."""
        size = self.input_size(grid)
        x = images01.float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.spec.family.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.family.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # in fp32 whatever the model's dtype

    @torch.no_grad()
    def encode(self, images01: Tensor, grid: int, check_range: bool = True) -> tuple[Tensor, Tensor]:
        """Patch tokens [N, grid², D] and their mean [N, D], both float32, for images in [0, 1].

        check_range=False skips the [0, 1] check, which waits for the GPU (the trainer's hot loop)."""
        tokens, _ = self._encode(images01, grid, check_range)
        return tokens, tokens.mean(dim=1)

    @torch.no_grad()
    def encode_with_class(self, images01: Tensor, grid: int, check_range: bool = True) -> tuple[Tensor, Tensor]:
        """Patch tokens [N, grid², D] and the class token [N, D] (REG's), both float32: the encoder's CLS token
        after the same final norm as its patch tokens (DINOv2's x_norm_clstoken), or, for an encoder without one
        (a CNN such as cifar-ssl-resnet, a mean-pooled ViT), the mean of its patch tokens (`encode`'s pooled)."""
        tokens, cls = self._encode(images01, grid, check_range)
        return tokens, tokens.mean(dim=1) if cls is None else cls

    def _encode(self, images01: Tensor, grid: int, check_range: bool) -> tuple[Tensor, Tensor | None]:
        """(patch tokens, CLS token or None), float32."""
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"encode expects images [N, 3, H, W]; got {tuple(images01.shape)}")
        if check_range:
            lo, hi = torch.stack(torch.aminmax(images01.float())).tolist()   # one device sync
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"encode expects images in [0, 1]; got values in [{lo:.3f}, {hi:.3f}]")
        if self.precision == "auto":
            choose_precision(self, images01, grid)
        self.model.eval()
        param = next(self.model.parameters())
        x = self.preprocess(images01.to(param.device), grid).to(param.dtype)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if self.spec.tokens is not None:
                tokens, cls = self.spec.tokens(self.model, x), None
            elif self.spec.builder is not None:
                tokens, cls = _builder_tokens(self.model, x)
            else:
                tokens, cls = _timm_tokens(self.model, x, self.spec.family.final_norm)  # (N, grid², D), (N, D)
        if tokens.shape[1] != grid * grid:
            raise RuntimeError(f"{self.name}: expected {grid * grid} patch tokens, got {tokens.shape[1]}")
        return tokens.float(), None if cls is None else cls.float()

    @contextmanager
    def attention_logits(self, blocks: Sequence[int]) -> Iterator[list[Tensor]]:
        """While open, every encode() also fills the yielded list with the pre-softmax attention scores
        q·kᵀ·scale (N, heads, T, T), float32, of these 1-based blocks, between patch tokens only (CLS and register
        rows and columns removed): what HASTE distils (train/terms/attn_align.py). A ViT of timm's layout only."""
        attns = [getattr(block, "attn", None) for block in getattr(self.model, "blocks", [])]
        if not attns or not all(map(has_attention, attns)):
            raise UserError(f"encoder {self.name}: --attn-align needs a ViT encoder with attention maps (e.g. "
                            f"dinov2-vit-b); {self.arch} has none")
        bad = [b for b in blocks if not 1 <= b <= len(attns)]
        if bad:
            raise UserError(f"encoder {self.name} has {len(attns)} blocks: no block {bad[0]}")
        p = self.num_prefix_tokens
        with attention_hooks({i: attns[b - 1] for i, b in enumerate(blocks)},
                             lambda attn, x: attention_logits(attn, x, p).float(), [None] * len(blocks)) as maps:
            yield maps

    def describe(self, grid: int | None = None) -> dict[str, Any]:
        """Plain data for provenance: what network, which weights, what preprocessing."""
        d = {
            "name": self.name, "family": self.family, "arch": self.arch, "timm_version": timm.__version__,
            "weights": "RANDOM" if self.random_init else self.weights_sha256,
            "random_seed": RANDOM_SEED if self.random_init else None,
            "weights_source": self.source, "weights_path": str(self.weights_path) if self.weights_path else None,
            "patch_size": self.patch_size, "embed_dim": self.embed_dim,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "preprocessing": {"range": "[0,1]", "resize": "bicubic", "antialias": False,
                              "mean": list(self.spec.family.mean), "std": list(self.spec.family.std)},
            "tokens": "patch tokens after final norm" if self.spec.family.final_norm
                      else "patch tokens before final norm",
            "pooled": "mean of patch tokens",
        }
        if self.precision != "fp32":   # fp32 adds no key: caches made before the option stay valid
            d["autocast"] = self.precision
        if grid is not None:
            d.update(grid=grid, input_size=self.input_size(grid))
        return d

    def fingerprint(self, grid: int) -> str:
        """A short hash of ``describe(grid)`` without the weights path: a cache key for these features."""
        if self.precision == "auto":
            raise RuntimeError(f"encoder {self.name}: precision 'auto' is not chosen yet (call choose_precision)")
        d = {k: v for k, v in self.describe(grid).items() if k != "weights_path"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def forward(self, images01: Tensor, grid: int) -> tuple[Tensor, Tensor]:
        return self.encode(images01, grid)


def _patch_size(model: nn.Module, spec: EncoderSpec) -> int:
    if spec.patch_size:
        return spec.patch_size
    p = getattr(getattr(model, "patch_embed", None), "patch_size", None) or getattr(model, "patch_size", None)
    if p is None:
        raise UserError(f"encoder {spec.arch or spec.builder}: cannot tell its patch size; set EncoderSpec.patch_size")
    return int(p[0] if isinstance(p, (tuple, list)) else p)

#################################################################################
#                                    Loading                                    #
#################################################################################


ENCODER_PRECISIONS = ("auto", "fp32", "bf16")
CHECK_IMAGES = 8            # images that --encoder-precision auto encodes in both precisions
DEVIATION_LIMIT = 1e-2      # the largest centred deviation of pooled features that auto accepts for bf16


def centred_deviation(reference: Tensor, other: Tensor) -> float:
    """‖(other − reference) centred‖ / ‖reference centred‖ over the rows (images), in float64: how far
    `other` moves the features, relative to how much they vary between images. A shift common to every
    image does not count (centred kernels, CKA and CKNNA, ignore it)."""
    ref, delta = reference.double(), other.double() - reference.double()
    return float((delta - delta.mean(0)).norm() / (ref - ref.mean(0)).norm().clamp_min(1e-30))


def bf16_native(device: torch.device) -> bool:
    """Whether this device computes bf16 natively (CUDA: Ampere or later; CPU: AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_precision(encoder: "Encoder", images01: Tensor, grid: int) -> str:
    """Resolve ``--encoder-precision auto`` for `encoder` from a few of its real input images: bf16
    autocast where the device computes bf16 natively and the pooled features of the first
    ``CHECK_IMAGES`` images move by at most ``DEVIATION_LIMIT`` from fp32 (``centred_deviation``), else
    fp32. Sets ``encoder.precision`` and returns a one-line note saying what was chosen and why."""
    device = next(encoder.model.parameters()).device
    if not bf16_native(device):
        encoder.precision = "fp32"
        encoder.precision_note = f"encoder {encoder.name}: fp32 (--encoder-precision auto: no native bf16 here)"
        return encoder.precision_note
    x = images01[:CHECK_IMAGES]
    pooled = {}
    for precision in ("fp32", "bf16"):
        encoder.precision = precision
        pooled[precision] = encoder.encode(x, grid)[1]
    deviation = centred_deviation(pooled["fp32"], pooled["bf16"])
    encoder.precision = "bf16" if deviation <= DEVIATION_LIMIT else "fp32"
    encoder.precision_note = (f"encoder {encoder.name}: {encoder.precision} (--encoder-precision auto: under bf16 its "
                              f"pooled features of {len(x)} images moved {deviation:.1e} of their spread, "
                              f"limit {DEVIATION_LIMIT:.0e})")
    return encoder.precision_note


def load_encoder(spec: str, *, random_init: bool = False, pretrained_download: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 precision: str = "fp32") -> Encoder:
    """Build a frozen target encoder from ``'NAME'`` or ``'NAME=PATH'``; precision "bf16" runs it under
    bf16 autocast, "auto" lets ``choose_precision`` pick bf16 or fp32 on its first images
    (benchmarks/bench_encoder_precision.py measures what bf16 changes).

    Weights come from PATH, else from a weights folder (``weights_dirs()``), else from timm's download when
    ``pretrained_download``; none of these → UserError naming the flag and file. ``random_init=True`` gives
    a seeded random network instead (for tests) and the encoder says so (``describe()['weights']``).
    """
    if precision not in ENCODER_PRECISIONS:
        raise UserError(f"--encoder-precision {precision!r}: use {', '.join(ENCODER_PRECISIONS[:-1])} or "
                        f"{ENCODER_PRECISIONS[-1]}")
    name, path = parse_encoder_spec(spec)
    name, entry = get_encoder_spec(name)
    if random_init and path is not None:
        raise UserError(f"--encoder {spec}: a weight file and --encoder-random-init exclude each other")
    path = None if random_init else path or find_weights(name, entry) or entry.bundled
    if random_init:
        model, sha, source = _build(entry, on_meta=False), None, "random"
    elif path is not None:
        sd = read_weights(path)
        model = _build(entry, on_meta=entry.builder is None)
        load_weights_into(model, sd, entry, str(path))
        sha, source = file_sha256(path), "file"
    elif pretrained_download and entry.weights_url:      # the official file, into the weights folder
        from repa_probe.download import Remote, fetch
        fname = entry.weights_url.rsplit("/", 1)[-1]
        path = fetch(Remote(entry.weights_url, fname, f"{name} weights"), weights_dirs()[0])
        return load_encoder(f"{name}={path}", device=device, dtype=dtype, precision=precision)
    elif pretrained_download:
        model, source = _download(name, entry), "timm-download"
        sha = _state_dict_sha256(model.state_dict())
    else:
        raise UserError(_needs_weights_message(name, entry))
    enc = Encoder(name, entry, model, weights_path=path, weights_sha256=sha, random_init=random_init,
                  source=source)
    enc.precision = precision
    return enc.to(device=device, dtype=dtype)


def _download(name: str, spec: EncoderSpec) -> nn.Module:
    """timm's own pretrained weights; only where the arch's tag names this encoder's weights."""
    if "." not in spec.arch:
        raise UserError(f"encoder {name!r} has no timm download; {_needs_weights_message(name, spec)}")
    try:
        return _create_timm(spec, pretrained=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, hub errors, ...
        raise UserError(f"encoder {name!r}: timm could not download {spec.arch} ({type(e).__name__}: "
                        f"{_first_line(e)[:120]}); pass a local file with --encoder {name}=/path/weights") from None


def _needs_weights_message(name: str, spec: EncoderSpec) -> str:
    fname = (candidate_files(name, spec) or [f"{name}.safetensors"])[0]
    url = spec.weights_url or spec.family.weights_hint
    where = f" (download it from {url})" if url else ""
    folders = " or ".join(str(d) for d in weights_dirs())
    return (f"encoder {name!r} needs weights: pass --encoder {name}=/path/to/{fname}{where}, or put {fname} in "
            f"{folders} (REPA_PROBE_WEIGHTS); --encoder-random-init runs a random network for tests")

#################################################################################
#                               The encoder table                               #
#################################################################################


_SHAPES: dict[tuple, tuple[int, int]] = {}


def _shape_info(spec: EncoderSpec) -> tuple[int, int]:
    """(patch size, feature dim) from a meta-device build (no memory, no weights), or from the spec."""
    if spec.patch_size and spec.embed_dim:
        return spec.patch_size, spec.embed_dim
    key = (spec.arch, spec.builder, tuple(sorted(spec.model_kwargs.items())))
    if key not in _SHAPES:
        model = _build(spec, on_meta=spec.builder is None)
        _SHAPES[key] = _patch_size(model, spec), int(spec.embed_dim or getattr(model, "embed_dim"))
    return _SHAPES[key]


def encoders_table(grid: int = 16) -> list[dict[str, Any]]:
    """One row per registered encoder for ``repa-probe encoders``; builds nothing bigger than a meta model.
    ``grid`` is the encoder's own token grid at that input size, with "→GxG" when it is resampled to G×G (the
    CIFAR teacher's 8×8 map at 32 px: "8x8→16x16"; its stride-2 convolutions round up)."""
    rows = []
    for name, spec in ENCODERS.items():
        patch, dim = _shape_info(spec)
        found = find_weights(name, spec) or (spec.bundled if spec.bundled and spec.bundled.is_file() else None)
        own = math.ceil(grid * patch / spec.map_stride) if spec.map_stride else grid
        rows.append({
            "name": name, "family": spec.family.name, "timm_arch": spec.arch or "(custom)", "patch_size": patch,
            "input_size": grid * patch, "grid": f"{own}x{own}" + (f"→{grid}x{grid}" if own != grid else ""), "dim": dim,
            "tokens": "after final norm" if spec.family.final_norm else "before final norm",
            "weights": str(found) if found else "not found", "weight_files": ", ".join(candidate_files(name, spec)),
        })
    return rows


__all__ = [
    "ENCODERS", "ALIASES", "Encoder", "EncoderSpec", "Family", "choose_precision", "encoders_table",
    "find_weights", "get_encoder_spec", "load_encoder", "load_weights_into", "parse_encoder_spec", "read_weights",
    "register_encoder", "weights_dirs",
]
