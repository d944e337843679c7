"""Real occurrence samples the tests read from installed packages (skipped when absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def ariolimax_path() -> Path | None:
    """The presence/background sample shipped in the elapid wheel, without importing elapid."""
    spec = importlib.util.find_spec("elapid")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ariolimax.gpkg"
    return path if path.is_file() else None
