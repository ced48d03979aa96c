"""Any nn.Module as a model family: the user names its blocks, how to call it and its noise convention.

For a diffusion transformer repa-probe has no family file for (a notebook's own model, a diffusers
transformer, a successor of REPA): `describe_module(model, blocks="transformer_blocks", call=...,
convention="sit", image_size=32)` returns a LoadedCheckpoint that capture, analysis and reports treat like a
loaded file. What it must know and cannot guess:

    blocks        the attribute path of the block list ("blocks", "transformer_blocks") or the modules
    call          how to run it: call(model, x_t, timestep, label); default model(x_t, timestep, label)
    convention    a registered time convention (noise.py): how canonical t becomes x_t and the model's timestep
    image_size    side of the images the model is fed (pixels), with `channels`
    grid          image tokens per side (default: inferred from the first block's output on one input)
    num_classes   the null label for class-conditional models (None: the model takes no labels)

Block outputs may be tuples (an MMDiT block returns (text, image) streams): the image stream is the element
with the image's token count, or `stream=i` says which. Sequences that carry extra tokens (text, registers,
a CLS token) give their image tokens as the last grid² tokens, or the slice `image_tokens` says.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from repa_probe.checkpoints import LoadedCheckpoint, Provenance, as_untrained
from repa_probe.errors import UserError
from repa_probe.families.base import Anatomy, InputSpace, ModelFamily
from repa_probe.noise import get_convention
from repa_probe.runtime import state_dict_sha256

Call = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]


def _default_call(model: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, label: torch.Tensor | None) -> Any:
    return model(x_t, timestep, label)


def _source_digest(fn: Callable) -> str:
    """What identifies a call function across sessions: its source when Python has it, else its name."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ModuleFamily(ModelFamily):
    """One user-described module (not registered: it recognises no files)."""
    name = "module"
    description = "any nn.Module described in Python (repa_probe.analyze)"

    def __init__(self, blocks: str | Sequence[nn.Module], call: Call | None = None, stream: int | None = None,
                 image_tokens: slice | None = None):
        self.block_spec, self.call = blocks, call or _default_call
        self.stream, self.image_tokens = stream, image_tokens
        self.grid: int | None = None

    def recognise(self, obj: dict, path: Path) -> bool:
        return False

    def load(self, obj, path, *, convention, weights, device="cpu", heads=None):
        raise UserError("a module described in Python is not loaded from a file: use repa_probe.analyze(model, ...)")

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        if not isinstance(self.block_spec, str):
            return list(self.block_spec)
        found: Any = model
        for part in self.block_spec.split("."):
            if not hasattr(found, part):
                raise UserError(f"blocks={self.block_spec!r}: {type(model).__name__} has no attribute path "
                                f"'{self.block_spec}' (its children: "
                                f"{', '.join(n for n, _ in model.named_children())})")
            found = getattr(found, part)
        if not isinstance(found, (nn.ModuleList, nn.Sequential, list, tuple)) or not len(found):
            raise UserError(f"blocks={self.block_spec!r} is a {type(found).__name__}, not a non-empty list of blocks")
        return list(found)

    def forward(self, model, x_t, timestep, labels):
        return self.call(model, x_t, timestep, labels)

    def _image(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim != 3:
            raise UserError(f"a block gave a tensor of shape {tuple(h.shape)}; expected (batch, tokens, width)")
        if self.image_tokens is not None:
            return h[:, self.image_tokens]
        t = self.grid * self.grid if self.grid else h.shape[1]
        if h.shape[1] < t:
            raise UserError(f"a block gave {h.shape[1]} tokens, fewer than the {self.grid}×{self.grid} image grid")
        return h[:, h.shape[1] - t:]

    def input_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor:
        first = args[0] if args else kwargs["hidden_states"]          # the image stream goes in first
        return self._image(first) if isinstance(first, torch.Tensor) else self.block_tokens(first)

    def block_tokens(self, output: Any) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return self._image(output)
        tensors = [o for o in output if isinstance(o, torch.Tensor) and o.ndim == 3]
        if self.stream is not None:
            return self._image(output[self.stream])
        image = [o for o in tensors if self.grid and o.shape[1] == self.grid ** 2]
        if len(image) == 1 or (len(tensors) == 1 and not image):
            return self._image((image or tensors)[0])
        shapes = ", ".join(str(tuple(o.shape)) for o in tensors)
        raise UserError(f"a block returns several token streams ({shapes}) and none is singled out by the "
                        f"{self.grid}×{self.grid} image grid: pass stream=INDEX (the image stream's position)")

    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        return meta["anatomy"]

    def untrained(self, ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
        """The same module re-initialised: every submodule's own reset_parameters(), seeded."""
        torch.manual_seed(seed)
        model = copy.deepcopy(ckpt.model)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        untrained = as_untrained(ckpt, model)
        untrained.provenance.format = ckpt.provenance.format     # the call's digest keeps its cache entries apart
        return untrained

    def describe_rows(self, ckpt: LoadedCheckpoint) -> list[tuple[str, str]]:
        spec = self.block_spec if isinstance(self.block_spec, str) else f"{len(self.block_spec)} modules"
        return [("architecture", f"{type(ckpt.model).__name__} (blocks: {spec}, call: "
                                 f"{getattr(self.call, '__qualname__', 'custom')})")]


def _image_stream(output: Sequence, stream: int | None) -> torch.Tensor:
    """The one token stream of a tuple output with a square token count (the image's), or output[stream]."""
    if stream is not None:
        return output[stream]
    square = [o for o in output if isinstance(o, torch.Tensor) and o.ndim == 3 and round(o.shape[1] ** .5) ** 2 ==
              o.shape[1]]
    if len(square) != 1:
        shapes = ", ".join(str(tuple(o.shape)) for o in output if isinstance(o, torch.Tensor))
        raise UserError(f"the first block returns token streams {shapes}: pass stream=INDEX (the image stream's "
                        f"position) or grid= (image tokens per side)")
    return square[0]


def describe_module(model: nn.Module, *, blocks: str | Sequence[nn.Module] = "blocks", call: Call | None = None,
                    convention: str = "sit", image_size: int = 32, channels: int = 3, grid: int | None = None,
                    num_classes: int | None = None, stream: int | None = None, image_tokens: slice | None = None,
                    aligned_block: int | None = None, name: str | None = None) -> LoadedCheckpoint:
    """A LoadedCheckpoint for any module that maps (x_t, timestep, label) through a list of blocks."""
    for key, value, least in (("image_size", image_size, 1), ("channels", channels, 1), ("grid", grid, 1),
                              ("num_classes", num_classes, 1), ("stream", stream, 0),
                              ("aligned_block", aligned_block, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < least):
            raise UserError(f"{key}={value!r} must be an integer ≥ {least}")
    conv = get_convention(convention)
    family = ModuleFamily(blocks, call, stream, image_tokens)
    modules = family.blocks(model)
    device = next(model.parameters()).device
    seen = []                                  # one clean input through the first block: tokens and width
    handle = modules[0].register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.zeros(1, channels, image_size, image_size, device=device)
    label = None if num_classes is None else torch.full((1,), num_classes, device=device)
    try:
        with torch.no_grad():
            family.forward(model.eval(), x, conv.time_fn(torch.zeros(1, device=device)), label)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"calling the model on a {channels}×{image_size}² input failed ({type(e).__name__}: {e}): "
                        f"check call=, image_size= and channels=") from e
    finally:
        handle.remove()
    if not seen:
        raise UserError("the model's forward never ran its first block: check blocks= and call=")
    if grid is None:
        out = seen[0] if isinstance(seen[0], torch.Tensor) else _image_stream(seen[0], stream)
        tokens = out.shape[1] if image_tokens is None else len(range(out.shape[1])[image_tokens])
        grid = round(tokens ** 0.5)
        if grid * grid != tokens:
            raise UserError(f"the first block gives {tokens} tokens, not a square grid: pass grid= (image tokens "
                            f"per side) and image_tokens= if extra tokens are mixed in")
    if image_size % grid:
        raise UserError(f"image_size {image_size} is not a multiple of the {grid}×{grid} token grid")
    family.grid = grid
    width = family.block_tokens(seen[0]).shape[-1]
    anatomy = Anatomy(name=name or type(model).__name__, depth=len(modules), width=int(width), grid=grid,
                      patch_size=image_size // grid, input=InputSpace("pixels", channels, image_size),
                      num_classes=num_classes, aligned_block=aligned_block)
    spec = blocks if isinstance(blocks, str) else f"{len(modules)} modules"
    fmt = f"module {type(model).__name__}: blocks {spec}, call {_source_digest(family.call)}, stream {stream}, " \
          f"tokens {image_tokens}"
    prov = Provenance(path=f"<{type(model).__name__} in memory>", format=fmt, weights="as given",
                      convention=conv.name, convention_source="given",
                      sha256=state_dict_sha256(model.state_dict(), ordered=True), family=family.name)
    return LoadedCheckpoint(model=model.eval(), config=None, provenance=prov, meta={"anatomy": anatomy},
                            family=family, anatomy=anatomy)
