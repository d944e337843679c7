"""What `pip install .` ships: every package of the source tree (a new subpackage left out of
pyproject.toml's list installs without it, and only the editable checkout works)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "taxamap").rglob("__init__.py")
             if "grids" not in p.parent.relative_to(ROOT).parts}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
