"""Shared fixtures: real data paths and tiny model configs (the suite must run on a 2-core CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repa_probe.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("REPA_PROBE_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED_DATA / "cifar10"
IMAGENETTE = SHARED_DATA / "imagenette"

if os.environ.get("PYTEST_XDIST_WORKER"):     # one of pytest -n's processes (one per core): one thread each, and
    os.environ["OMP_NUM_THREADS"] = "1"       # for the subprocesses it starts, so that workers do not contend
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> ModelConfig:
    """A 3-block width-64 SiT on 3×16×16 pixels, patch 2 → 64 tokens, with one REPA projector."""
    cfg = dict(input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=3, num_heads=4,
               num_classes=10, qk_norm=True, z_dims=[32], projector_dim=48, encoder_depth=1)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every weight a random value: the zero-initialised adaLN gates would otherwise hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def hooked_tokens(model, *inputs, **kwargs) -> tuple[list[torch.Tensor], object]:
    """Run a SiT's forward with hooks of our own: (the tokens entering block 1 and each block's output, in
    order; the forward's output). The independent record that capture's tokens are checked against."""
    tokens = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: tokens.append(a[0]))]
    hooks += [b.register_forward_hook(lambda m, a, out: tokens.append(out)) for b in model.blocks]
    try:
        with torch.no_grad():
            out = model(*inputs, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return tokens, out


ONE_THREAD = {"OMP_NUM_THREADS": "1"}   # tiny models on a shared 2-core machine: threads only contend


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of many tiny problems (use: pytestmark = usefixtures("one_thread"))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path = REPO,
            **popen) -> subprocess.CompletedProcess:
    """Run the real `repa-probe` command in a subprocess (from `cwd`, the repository by default; `popen`: more
    subprocess.run arguments, e.g. a preexec_fn)."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "repa_probe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
                          **popen)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not CIFAR.exists():
        pytest.fail(f"shared CIFAR-10 data not found at {CIFAR} (set REPA_PROBE_SHARED_DATA)")
    return CIFAR
