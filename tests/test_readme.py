"""The README's usage section stays in step with `--help`, and its two set-up commands stay true."""
from __future__ import annotations

import os
import re

from conftest import REPO
from repa_probe.cli import build_parser

USAGE_WIDTH = "100"


def usage_blocks() -> dict[str, str]:
    """Each subcommand's argparse usage at a fixed width (what `repa-probe CMD --help` starts with)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = USAGE_WIDTH
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        return {name: p.format_usage().strip() for name, p in sub.choices.items()}
    finally:
        if old is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = old


def test_readme_usage_matches_help_for_every_command():
    readme = (REPO / "README.md").read_text()
    stale = [name for name, usage in usage_blocks().items() if usage not in readme]
    assert not stale, ("README usage is out of date for " + ", ".join(stale) + "; paste these (COLUMNS=100):\n\n"
                       + "\n".join(usage_blocks()[n] for n in stale))


def test_readme_set_up_commands_match_ci():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = re.search(r"^python3 -m venv .*pytest.*$", readme, re.M).group(0)
    demo_cmd = re.search(r"^python3 -m venv .*repa-probe demo.*$", readme, re.M).group(0)
    for step in ("pip install -q torch==2.14.1 torchvision==0.29.1", 'pip install -q -e ".[dev,latent]"',
                 "python -m pytest -q"):
        assert step.replace(" -q", "") in test_cmd and step in ci
    assert "torch==2.14.1 torchvision==0.29.1" in demo_cmd
