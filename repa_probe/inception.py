"""The Inception-v3 of FID: TensorFlow's 2015-12-05 graph as pytorch-fid ports it (docs/generation.md).

The network is torchvision's Inception-v3 with the four changes pytorch-fid makes to match the TensorFlow
graph every FID is computed with: the average pools inside Mixed_5b–5d, 6b–6e and 7b leave the zero padding
out of their mean (TensorFlow's SAME pooling), Mixed_7c pools its branch by max instead of average, and the
classifier has 1008 classes. Parameter names are those of pytorch-fid's weight file
(``pt_inception-2015-12-05-6726825d.pth``; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has
the same names and values), so that file loads as it is.

One forward pass gives what the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py) reads from the
graph:
    pool     [N, 2048]   ``pool_3``: the global average pool (FID, precision/recall)
    spatial  [N, 2023]   ``mixed_6/conv``, first 7 channels, flattened (h, w, c): sFID. TensorFlow's mixed,
                         mixed_1, … are Mixed_5b, 5c, …, so mixed_6 is Mixed_6d, and its ``conv`` (the 1×1 branch
                         after its ReLU) is the first 192 channels of Mixed_6d's output
    logits   [N, 1008]   pool @ Wᵀ without the bias, as the evaluator's softmax for the Inception Score

Two preprocessings, because the two reference implementations differ (tests/test_generation.py matches each):
    "adm"          images 0–255 resized to 299 by TensorFlow 1's bilinear rule (ADM's graph; torch-fidelity),
                   then (x − 128)/128
    "pytorch-fid"  images in [0, 1] resized to 299 by torch's bilinear (align_corners=False), then 2x − 1
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa_probe.checkpoints import safe_torch_load
from repa_probe.errors import UserError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
PREPROCESSING = ("adm", "pytorch-fid")
SIZE = 299
SPATIAL_CHANNELS = 7                      # the ADM evaluator keeps mixed_6/conv's first 7 channels


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's ε = 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: Tensor) -> Tensor:
    """3×3 average pool, stride 1, SAME padding that is left out of the mean (TensorFlow's)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35×35 → 17×17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Factorised 7×7 convolutions (1×7 then 7×1) at 17×17."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17×17 → 8×8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter banks at 8×8; `max_pool`: the pooled branch takes the max (Mixed_7c in TensorFlow's graph)."""

    def __init__(self, cin: int, max_pool: bool = False):
        super().__init__()
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pooled)], 1)


def resize_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1's bilinear resize (align_corners=False, no half-pixel centres): output pixel i reads input
    position i·in/out (the scale in float32), interpolating along the width, then the height."""
    def along(x: Tensor, dim: int) -> Tensor:
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n / size, dtype=torch.float32)
        lo = src.floor().long()
        hi, w = (lo + 1).clamp(max=n - 1), (src - lo).to(x.dtype).to(x.device)
        shape = [1] * x.ndim
        shape[dim] = size
        return torch.lerp(x.index_select(dim, lo.to(x.device)), x.index_select(dim, hi.to(x.device)), w.view(shape))
    return along(along(x, 3), 2)


class InceptionV3(nn.Module):
    """FID's Inception-v3; `forward(images)` → {"pool", "spatial", "logits"} (module docstring)."""

    def __init__(self, preprocessing: str = "adm"):
        super().__init__()
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing {preprocessing!r}: use one of {', '.join(PREPROCESSING)}")
        self.preprocessing = preprocessing
        self.weights_sha256: str | None = None
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 images [N, 3, H, W] → the network's 299×299 input in [−1, 1]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects uint8 images [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.fc.weight.device, torch.float32)
        if self.preprocessing == "adm":
            x = resize_tf1(x, SIZE) if x.shape[-2:] != (SIZE, SIZE) else x
            return (x - 128) / 128
        x = F.interpolate(x / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.prepare(images)
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for layer in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = layer(x)
        x = self.Mixed_6d(x)
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)       # mixed_6/conv, (h, w, c)
        for layer in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = layer(x)
        pool = x.mean((2, 3))
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}

    def fingerprint(self) -> str:
        """What decides the features: the weights and the preprocessing."""
        return f"fid-inception-v3 {self.weights_sha256} {self.preprocessing}"


#################################################################################
#                                    Weights                                    #
#################################################################################

def load_inception(path: str | Path | None = None, *, download: bool = False, preprocessing: str = "adm",
                   device: torch.device | str | None = None) -> InceptionV3:
    """FID's Inception-v3 from pytorch-fid's weight file: `path`, else WEIGHTS_FILE in a weights folder
    (encoders.weights_dirs), else downloaded there when `download`; else one error saying where to get it."""
    from repa_probe.encoders import file_sha256, weights_dirs
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights '{path}' is not a file: pass pytorch-fid's {WEIGHTS_FILE}")
    else:
        path = next((d / WEIGHTS_FILE for d in weights_dirs() if (d / WEIGHTS_FILE).is_file()), None)
    if path is None and download:
        from repa_probe.download import Remote, fetch
        path = fetch(Remote(WEIGHTS_URL, WEIGHTS_FILE, "FID's Inception-v3 weights (pytorch-fid)"), weights_dirs()[0])
    if path is None:
        raise UserError(f"FID needs the Inception-v3 weights: pass --inception-weights PATH to {WEIGHTS_FILE} "
                        f"(from {WEIGHTS_URL}), put it in {' or '.join(map(str, weights_dirs()))}, or add --download")
    model = InceptionV3(preprocessing)
    load_state(model, safe_torch_load(path, f"Inception weights '{path}'"), str(path))
    model.weights_sha256 = file_sha256(path)
    return model.eval().requires_grad_(False).to(device)


def load_state(model: InceptionV3, state: dict, source: str) -> None:
    """Load a state dict in pytorch-fid's names; batch norms' step counters may be absent (older files)."""
    if not isinstance(state, dict):
        raise UserError(f"Inception weights '{source}' hold a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:                           # a tensor of another shape
        raise UserError(f"Inception weights '{source}' do not fit FID's Inception-v3: {str(e).splitlines()[-1].strip()}"
                        ) from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserError(f"Inception weights '{source}' are not pytorch-fid's layout (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}): pass {WEIGHTS_FILE}")

