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


def test_every_data_folder_is_listed_too():
    """Folders of data files only (taxamap/data, taxamap/serve/static) import as namespace
    packages: setuptools warns that it will stop shipping them unless they are listed."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    data = config["tool"]["setuptools"]["package-data"]
    folders = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "taxamap").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts
               and "grids" not in p.parent.relative_to(ROOT).parts}
    assert folders <= listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages"
    for folder in folders:
        if not (ROOT / Path(*folder.split(".")) / "__init__.py").exists():
            assert data.get(folder) == ["*"], f"ship {folder}'s files with package-data"
