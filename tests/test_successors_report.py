"""reports/successors/README.md is what analyses/successors.py renders from the report's own files (summary.json,
gen.csv): no number in it is typed by hand."""
from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "analyses"))


def test_the_successors_readme_is_rendered_from_its_summary():
    from successors import readme
    out = REPO / "reports" / "successors"
    text = (out / "README.md").read_text()
    command = next(line.strip() for line in text.splitlines() if line.strip().startswith("python analyses/"))
    assert readme(out, command) == text
