"""A small self-supervised CIFAR-10 teacher: a ResNet trained with SimCLR, usable as a REPA target encoder.

No pretrained encoder (DINOv2, MAE, ...) can be downloaded on the machines this project runs on, so REPA on
CIFAR-10 needs a target encoder that exists offline. This is one: a small ResNet (He et al. 2016,
arXiv 1512.03385; CIFAR-style 3×3 stem, no max-pool) trained on CIFAR-10's train split only, without
labels, by SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv 2002.05709): two random augmentations of each image, a 2-layer MLP projection
head, and the NT-Xent (InfoNCE) loss. The head is dropped after training; ``analyses/train_teacher.py``
made the weights and ``repa_probe/assets/cifar_ssl_resnet.md`` is their card.

Tokens. The trunk's final feature map (stride 4: 8×8 positions of D channels for a 32×32 image) is the
teacher's token grid; each position is one "patch token". For a diffusion model with a ``grid × grid``
token grid (16 for SiT/2 on 32×32 pixels) the map is resampled bilinearly (align_corners=False) to
``grid × grid``; for grid = 2·map size (8 → 16) every map position then gets the same total weight, so the
mean of the tokens equals the mean of the map. The pooled vector is the global average of the native map,
i.e. exactly the feature SimCLR trained the projection head on and the card's linear probe measures.

Normalisation: images in [0, 1] are normalised with the usual CIFAR-10 train statistics,
mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616), inside ``encode``.

In the encoder registry it is ``cifar-ssl-resnet`` (``repa_probe.encoders.load_encoder``; the weights ship
with the package, no flag needed). The registry treats it like a ViT of patch size 2: images are resized to
2·grid pixels (32 for grid 16, the size it was trained for; no resize then) and its pooled vector is the
token mean, which for grid 16 is the same pooled vector as ``encode``'s. ``encode`` here keeps the
image size and resamples the map to any grid.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_NAME = "cifar_ssl_resnet"


@dataclass
class TeacherConfig:
    """Trunk shape: a 3×3 stem, then one stage per width, each of ``depth`` residual blocks; the first
    block of a stage convolves with the stage's stride. Total stride 4 → an 8×8 map for 32×32 images."""
    stem: int = 32
    widths: tuple[int, ...] = (64, 128, 256)
    depths: tuple[int, ...] = (1, 1, 1)
    strides: tuple[int, ...] = (2, 2, 1)
    expand: int = 0            # >0: a final 1×1 conv-BN-ReLU to this width (MobileNetV2's last layer)
    proj_hidden: int = 512     # SimCLR projection head g(·): D → hidden → out (training only)
    proj_out: int = 128

    @property
    def embed_dim(self) -> int:
        return self.expand or self.widths[-1]

    @property
    def stride(self) -> int:
        s = 1
        for t in self.strides:
            s *= t
        return s


#################################################################################
#                                 Residual trunk                                #
#################################################################################

class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 projection) shortcut, ResNet's basic block."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class CifarResNet(nn.Module):
    """The teacher trunk: image [N, 3, H, W] (normalised) → feature map [N, D, H/4, W/4].

    ``with_head`` adds SimCLR's projection MLP ``head``, needed only for training; the weight file has none."""

    def __init__(self, config: TeacherConfig | None = None, with_head: bool = False):
        super().__init__()
        self.config = cfg = config or TeacherConfig()
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.stem, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.stem), nn.ReLU())
        stages, c_in = [], cfg.stem
        for width, depth, stride in zip(cfg.widths, cfg.depths, cfg.strides):
            blocks = [BasicBlock(c_in if i == 0 else width, width, stride if i == 0 else 1) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        if cfg.expand:
            # A wide, cheap last layer: the pooled vector gets `expand` dims for ~20 % more compute.
            stages.append(nn.Sequential(nn.Conv2d(c_in, cfg.expand, 1, bias=False), nn.BatchNorm2d(cfg.expand),
                                        nn.ReLU()))
        self.stages = nn.Sequential(*stages)
        if with_head:
            self.head = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.proj_hidden), nn.BatchNorm1d(cfg.proj_hidden),
                                      nn.ReLU(), nn.Linear(cfg.proj_hidden, cfg.proj_out))
        # Attributes the encoder registry reads: the pixels per token of the 16×16 grid on 32×32 images.
        self.embed_dim = cfg.embed_dim
        self.patch_size = 2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised images [N, 3, H, W] → final feature map [N, D, H/4, W/4]."""
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: (pooled features h [N, D], projections z = g(h) [N, proj_out])."""
        h = self.forward_features(x).mean(dim=(2, 3))
        return h, self.head(h)


#################################################################################
#                              Tokens and encoding                              #
#################################################################################

def normalize(images01: Tensor) -> Tensor:
    """[N, 3, H, W] in [0, 1] → CIFAR-10-standardised float32."""
    mean = torch.tensor(CIFAR_MEAN, device=images01.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images01.device).view(1, 3, 1, 1)
    return (images01.float() - mean) / std


def map_to_tokens(fmap: Tensor, grid: int) -> Tensor:
    """Feature map [N, D, h, w] → tokens [N, grid², D], row-major like a ViT's patch tokens.

    Upsampling is bilinear (align_corners=False); shrinking is area averaging, so the token mean stays
    the map mean; the native size is returned unchanged."""
    if fmap.shape[-2:] != (grid, grid):
        smaller = grid < fmap.shape[-1]
        fmap = F.adaptive_avg_pool2d(fmap, grid) if smaller else \
            F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)  # (N, grid², D)


def tokens_for_registry(model: CifarResNet, x: Tensor) -> Tensor:
    """The encoder registry's hook: ``x`` is already normalised and sized ``2·grid`` (patch size 2)."""
    return map_to_tokens(model.forward_features(x), x.shape[-1] // model.patch_size)


@torch.no_grad()
def encode(model: CifarResNet, images01: Tensor, grid: int = 16) -> tuple[Tensor, Tensor]:
    """Tokens [N, grid², D] and pooled [N, D] (float32) for images [N, 3, H, W] in [0, 1] at their own size.

    Pooled is the mean of the native feature map (global average pooling), which for grid = 2·(H/4),
    e.g. 16 for 32×32 images, equals the mean of the returned tokens."""
    model.eval()
    fmap = model.forward_features(normalize(images01.to(next(model.parameters()).device))).float()
    return map_to_tokens(fmap, grid), fmap.mean(dim=(2, 3))


#################################################################################
#                                     Weights                                   #
#################################################################################

def weights_path(name: str = DEFAULT_NAME) -> Path:
    return ASSETS / f"{name}.safetensors"


def save_teacher(model: CifarResNet, path: Path, metadata: dict[str, str]) -> None:
    """Trunk weights (fp32, projection head dropped) plus the config and ``metadata`` as safetensors."""
    from safetensors.torch import save_file
    sd = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
          for k, v in model.state_dict().items() if not k.startswith("head.")}
    meta = {**metadata, "config": json.dumps(asdict(model.config))}
    save_file(sd, str(path), metadata=meta)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def build_untrained(config: TeacherConfig | None = None, seed: int = 0) -> CifarResNet:
    """The architecture as ``train_teacher.py --seed SEED`` initialises it (projection head built, then
    dropped, so the trunk's random draws are the run's own), without touching the global RNG.

    With the defaults, the initialisation of the committed teacher: the card's untrained baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CifarResNet(config, with_head=True)
    del model.head
    return model.eval()


def load_teacher(path: Path | str | None = None, device: torch.device | str = "cpu") -> CifarResNet:
    """The committed teacher (or the file at ``path``), in eval mode with gradients off."""
    from safetensors.torch import load_file
    path = Path(path) if path is not None else weights_path()
    meta = read_metadata(path)
    cfg = json.loads(meta["config"])
    model = CifarResNet(TeacherConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)
