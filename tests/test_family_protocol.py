"""The family protocol as base.py declares it is the one the loader calls: a family written from
`families/base.py` alone loads through `load_checkpoint`, and every family accepts every keyword the loader passes."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO
from repa_probe.checkpoints import LoadedCheckpoint, Provenance
from repa_probe.families import FAMILIES, load_checkpoint
from repa_probe.families.base import Anatomy, InputSpace, ModelFamily, register_family
from repa_probe.families.module import ModuleFamily


class Stack(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))


class Minimal(ModelFamily):
    """Only what base.py asks for: the abstract methods, `load` with base.py's signature as written there."""
    name = "minimal-test"

    def recognise(self, obj: dict, path: Path) -> bool:
        return "minimal_test" in obj

    def load(self, obj: dict, path: Path, *, convention: str | None, weights: str,
             device: str | torch.device = "cpu", heads: int | None = None) -> LoadedCheckpoint:
        model = Stack(**obj["minimal_test"])
        model.load_state_dict(obj["state_dict"])
        prov = Provenance(path=str(path), format="minimal", weights="state_dict", convention=convention or "repa",
                          convention_source="flag" if convention else "checkpoint", family=self.name)
        return LoadedCheckpoint(model.to(device).eval(), obj["minimal_test"], prov, {"heads": heads}, self)

    def anatomy(self, model: nn.Module, meta: dict) -> Anatomy:
        width = model.blocks[0].in_features
        return Anatomy("minimal", len(model.blocks), width, 2, 1, InputSpace(), None)

    def untrained(self, ckpt: LoadedCheckpoint, seed: int) -> LoadedCheckpoint:
        raise NotImplementedError


def test_a_family_written_from_base_py_loads_through_load_checkpoint(tmp_path):
    assert inspect.signature(Minimal.load) == inspect.signature(ModelFamily.load)   # written to base.py's letter
    model = Stack()
    path = tmp_path / "minimal.pt"
    torch.save({"minimal_test": {"width": 8, "depth": 2}, "state_dict": model.state_dict()}, path)
    register_family(Minimal())
    try:
        ckpt = load_checkpoint(path)
        assert ckpt.family.name == "minimal-test" and ckpt.anatomy.depth == 2 and ckpt.meta == {"heads": None}
        assert torch.equal(ckpt.model.blocks[1].weight, model.blocks[1].weight)
        assert load_checkpoint(path, convention="sit", heads=4).meta == {"heads": 4}
    finally:
        FAMILIES.pop("minimal-test")


def loader_keywords() -> set[str]:
    """The keywords `load_checkpoint` passes to `family.load`, read from its source."""
    tree = ast.parse((REPO / "repa_probe" / "families" / "__init__.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "load" and isinstance(n.func.value, ast.Name) and n.func.value.id == "family"]
    assert len(calls) == 1
    return {k.arg for k in calls[0].keywords}


@pytest.mark.parametrize("family", [ModelFamily, ModuleFamily, *(type(f) for f in FAMILIES.values())],
                         ids=lambda f: f.__name__)
def test_every_family_takes_every_keyword_the_loader_passes(family):
    keywords = loader_keywords()
    assert keywords >= {"convention", "weights", "device", "heads"}
    params = inspect.signature(family.load).parameters
    assert keywords <= set(params), f"{family.__name__}.load lacks {sorted(keywords - set(params))}"
    assert [p for p in params if p not in keywords] == ["self", "obj", "path"]


def test_families_md_lists_the_registered_families_in_order():
    doc = (REPO / "docs" / "families.md").read_text()
    header = "| family | checkpoints | file |\n|---|---|---|\n"
    assert header in doc, "docs/families.md has no table of the registered families"
    table = doc.split(header, 1)[1].split("\n\n")[0]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert [row[0] for row in rows] == list(FAMILIES)
    for name, _, file in rows:
        assert type(FAMILIES[name]).__module__ == "repa_probe." + file.removesuffix(".py").replace("/", ".")


def test_families_are_offered_checkpoints_by_priority_not_import_order(tmp_path):
    """families/__init__ imports sit before lightningdit, yet LightningDiT (priority 1) is offered checkpoints
    first; a plug-in that recognises SiT files takes them only with a priority above sit's, and only while
    registered."""
    from repa_probe.checkpoints import read_checkpoint
    from repa_probe.families import detect_family
    from repa_probe.families.sit import SiTFamily
    from conftest import tiny_config
    from repa_probe.models import SiT
    assert list(FAMILIES)[:2] == ["lightningdit", "sit"]
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    path = tmp_path / "a.pt"
    torch.save(SiT(cfg).state_dict(), path)             # a bare state dict: any SiT-like family recognises it

    class Claims(SiTFamily):
        name = "claims-sit-files"

    def taker() -> str:
        return detect_family(read_checkpoint(path), path).name

    for priority, expected in ((0, "sit"), (2, "claims-sit-files")):
        register_family(Claims(), priority=priority)
        try:
            assert taker() == expected
        finally:
            FAMILIES.pop("claims-sit-files")
            assert "claims-sit-files" not in FAMILIES.priority
    assert taker() == "sit"
