"""docs/data-flow.md's module table names every module of the package, and nothing that is not one."""
from __future__ import annotations

import re

from conftest import REPO

PACKAGE = REPO / "repa_probe"


def module_table() -> dict[str, str]:
    """{module cell's names: the row} of data-flow.md's table: `x.py` for a module, `pkg/` for a subpackage."""
    doc = (REPO / "docs" / "data-flow.md").read_text()
    header = "| module | stage |\n|---|---|\n"
    assert header in doc, "docs/data-flow.md has no module table"
    rows = {}
    for line in doc.split(header, 1)[1].split("\n\n")[0].splitlines():
        first, rest = line.strip("|").split("|", 1)
        rows.update({name: rest for name in re.findall(r"`([^`]+)`", first)})
    return rows


def test_every_module_of_the_package_is_in_the_data_flow_table():
    rows = module_table()
    modules = {p.name for p in PACKAGE.glob("*.py")}
    packages = {p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert sorted((modules | packages) - set(rows)) == [], "missing from docs/data-flow.md's table"
    assert sorted(set(rows) - modules - packages) == [], "in the table but not in the package"
    for package in packages:            # a subpackage's row names each of its modules
        inside = {p.name for p in (PACKAGE / package).glob("*.py")} - {"__init__.py"}
        assert sorted(inside - set(re.findall(r"`([\w.]+\.py)`", rows[package]))) == [], package
