"""The model-family protocol: what capture, analysis and sampling need to know about a diffusion transformer.

A family (SiT/DiT/REPA in ``sit.py``; a new one is one file and a `register_family` call) says how to
  recognise   a checkpoint object that belongs to it (read with weights-only loading),
  load        it into an nn.Module with its provenance and time convention,
  describe    its anatomy: blocks, token grid, patch size, input space, classes, REPA's aligned block,
  run         it: the list of blocks to hook, a forward call with (x_t, timestep, label), and how to read the
              image tokens out of a block's input and output (tuples, text or register tokens),
  view        a model that carries a class token beside its image tokens (REG's) through that token alone
              (`class_token`: the analysis measures it as a source of its own),
  initialise  an untrained model of the same architecture (a baseline in every report).
docs/families.md walks through adding one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from repa_probe.errors import UserError
from repa_probe.registry import Registry

if TYPE_CHECKING:
    from repa_probe.checkpoints import LoadedCheckpoint


@dataclass(frozen=True)
class InputSpace:
    """What the model is fed: pixels in [−1, 1], or VAE latents z = scale·(μ − shift) of images
    `downsample` times larger than the latent grid."""
    kind: str = "pixels"             # "pixels" or "latents"
    channels: int = 3
    size: int = 32                   # spatial side of the model input
    downsample: int = 1              # image side / input side (8 for SD-VAE)
    scale: float = 1.0
    shift: float = 0.0
    vae: str | None = None           # latents: the VAE a user would pass to --vae (folder or hub name)

    @property
    def image_size(self) -> int:
        return self.size * self.downsample


@dataclass(frozen=True)
class Anatomy:
    """A loaded model as the pipeline sees it; plain data (goes into reports)."""
    name: str                        # "SiT-XL/2", or a description of a custom size
    depth: int                       # blocks; block 0 = tokens entering block 1, i = output of block i
    width: int
    grid: int                        # image tokens per side (square grids)
    patch_size: int                  # input units per token side
    input: InputSpace
    num_classes: int | None          # label-conditioned with a null class `num_classes`; None = no labels
    aligned_block: int | None = None  # REPA: the block whose output the projectors read (1-based)

    def to_dict(self) -> dict:
        return asdict(self)


class ModelFamily(ABC):
    """Base class of a model family: implement the abstract methods, override what else differs."""
    name = ""
    description = ""
    tokens = "image"        # which tokens input_tokens / block_tokens give: "image", or "class token" in the view
                            # `class_token` returns (in the capture's cache key when not "image")

    @abstractmethod
    def recognise(self, obj: dict, path: Path) -> bool:
        """Whether the (safely read) checkpoint object `obj` belongs to this family."""

    @abstractmethod
    def load(self, obj: dict, path: Path, *, convention: str | None, weights: str,
             device: str | torch.device = "cpu", heads: int | None = None) -> LoadedCheckpoint:
        """The model (eval mode) with its provenance; bad contents are one UserError naming the file.

        `load_checkpoint` passes every keyword: `convention` (--convention, None: detect it), `weights` ("ema" or
        "model"), `device`, `heads` (--heads, None: read them from the weights; a family whose weights always
        tell them may ignore it)."""

    @abstractmethod
    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        """What the pipeline needs to know about a loaded model (see Anatomy)."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def forward(self, model: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor,
                labels: torch.Tensor | None) -> Any:
        return model(x_t, timestep, labels)

    def input_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """Block 0: the image tokens entering the first block, from its call's arguments."""
        return args[0] if args else kwargs["hidden_states"]

    def block_tokens(self, output: Any) -> torch.Tensor:
        """The image tokens (N, T, D) in a block's output."""
        return output

    def class_token(self, ckpt: LoadedCheckpoint) -> LoadedCheckpoint | None:
        """`ckpt` seen through the class token its model carries beside the image tokens (REG's): the same model,
        whose family's `input_tokens` and `block_tokens` give that token alone, (N, 1, D), and whose `tokens` is
        "class token". None for a model without one (the default)."""
        return None

    @abstractmethod
    def untrained(self, ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
        """A freshly initialised model of the same architecture and time convention (checkpoints.as_untrained)."""

    def describe_rows(self, ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
        """Family-specific rows for `repa-probe inspect`."""
        return []

    def condition(self, ckpt: LoadedCheckpoint, path: str) -> None:
        """Set a text conditioning for every image from an embeddings file (text-conditioned families)."""
        raise UserError(f"--text-embeddings: a {self.name} model takes no text conditioning")


def choose_weights(obj: dict, weights: str, path) -> tuple[dict, str]:
    """The `weights` entry ("ema" or "model") of a training dict, else the other one → (state dict, which)."""
    other = "model" if weights == "ema" else "ema"
    for name in (weights, other):
        if isinstance(obj.get(name), dict):
            return obj[name], name
    raise UserError(f"'{path}' has no '{weights}' or '{other}' weights")


def assign_weights(make: Callable[[], nn.Module], sd: dict, path, what: str, name: str) -> nn.Module:
    """`make()` built on the meta device and `sd` loaded by assignment (no double memory, no wasted init); any
    missing, unexpected or mis-shaped key is one clear UserError naming the first such key. `what` names the
    architecture in errors ("DiT/SiT"), `name` the size read from the shapes."""
    try:
        with torch.device("meta"):
            model = make()
    except ValueError as e:
        raise UserError(f"'{path}': {e}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise UserError(f"'{path}' is not a complete {what} state dict: missing key '{missing[0]}' "
                        f"(expected shape {list(expected[missing[0]].shape)}; {len(missing)} missing in all)")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise UserError(f"'{path}' has unexpected key '{unexpected[0]}' with shape {list(sd[unexpected[0]].shape)} "
                        f"({len(unexpected)} unexpected in all): not a {what} architecture repa-probe knows")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise UserError(f"'{path}': key '{k}' has shape {list(sd[k].shape)}, expected {list(v.shape)} for {name}")
    model.load_state_dict({k: sd[k].float() for k in expected}, assign=True)
    return model


FAMILIES: Registry[ModelFamily] = Registry("model family")     # in the order checkpoints are offered to them


def register_family(family: ModelFamily, *, priority: int = 0, overwrite: bool = False) -> ModelFamily:
    """Add a family to the registry. Checkpoints are offered to families by priority, highest first, and within
    one priority in registration order: a family whose files another would also recognise (LightningDiT's keys
    extend SiT's) takes a higher priority than that one, whatever the order of the imports."""
    return FAMILIES.register(family.name, family, priority=priority, overwrite=overwrite)
