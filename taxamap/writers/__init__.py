"""Writers turn a :class:`taxamap.score.ScoreMap` into files users open: GeoTIFF, HTML, PNG."""

from __future__ import annotations

import os
import re
from html import unescape  # not `import html`: the submodule taxamap.writers.html shadows it
from pathlib import Path

#: Where each output records the query it maps: the GeoTIFF's QUERY tag (SOURCE_QUERY on a
#: range GeoTIFF), this ``<meta>`` in the HTML head and this PNG text chunk.
HTML_QUERY_META = "taxamap-query"
PNG_QUERY_KEY = "taxamap query"

_META = re.compile(r'<meta name="' + HTML_QUERY_META + r'" content="([^"]*)">')


def recorded_query(path: str | os.PathLike) -> str | None:
    """The query the taxamap output at ``path`` maps (as written in it), or None when there is
    no such file or it records none (not a taxamap file, or one written before the record)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.suffix == ".tif":
            import rasterio

            with rasterio.open(path) as src:
                tags = src.tags()
            return tags.get("QUERY", tags.get("SOURCE_QUERY"))
        if path.suffix == ".html":
            match = _META.search(path.read_text(encoding="utf-8", errors="replace"))
            return unescape(match.group(1)) if match else None
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return getattr(im, "text", {}).get(PNG_QUERY_KEY)
    except Exception:  # noqa: BLE001 - unreadable: no record to compare
        return None
    return None
