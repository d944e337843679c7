"""Where taxamap keeps what it caches: one root with a folder per kind.

``--cache DIR`` (or ``TAXAMAP_CACHE``, else the user cache dir, e.g. ``~/.cache/taxamap``) holds
``tiles/`` (satellite tiles), ``taxonomy/`` (name lookups), ``occurrences/`` (GBIF downloads) and
``stores/`` (embedding stores).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root in effect: ``cache_dir``, else ``$TAXAMAP_CACHE``, else the user cache dir."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("TAXAMAP_CACHE"):
        return Path(os.environ["TAXAMAP_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("taxamap"))


def cache_subdir(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache root>/<kind>`` (tiles, taxonomy, occurrences, stores)."""
    return cache_root(cache_dir) / kind
