"""The factory the CLI calls to build the satellite source a user asked for.

The interface every source implements (``fetch_status``/``fetch``, ``describe``, ``stats``...)
lives in :mod:`taxamap.sources.base`; :class:`SatelliteSource` and :class:`SourceStats` are
re-exported here for callers that only know this module.

Three kinds exist: ``xyz`` (any ``{z}/{x}/{y}`` tile server; default EOX Sentinel-2 cloudless
2020), ``file`` (any raster GDAL reads) and ``earthengine`` (a Sentinel-2 median composite).
All three cut the same Web-Mercator window around a cell (``zoom``/``size``), so their patches are
comparable: see :mod:`taxamap.sources.tiles` for the defaults and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taxamap.errors import TaxamapError
from taxamap.sources.base import DEFAULT_WORKERS, SatelliteSource, SourceStats, as_latlon

__all__ = ["DEFAULT_WORKERS", "SOURCE_KINDS", "SatelliteSource", "SourceStats", "as_latlon",
           "make_satellite_source"]

#: The kinds ``make_satellite_source`` accepts (``--sat-source``).
SOURCE_KINDS = ("xyz", "file", "earthengine")


def make_satellite_source(
    kind: str = "xyz",
    *,
    url: str | None = None,
    zoom: int | None = None,
    size: int | None = None,
    file: str | Path | None = None,
    ee_project: str | None = None,
    year: int = 2020,
    cache_dir: str | Path | None = None,
    workers: int = DEFAULT_WORKERS,
    **options: Any,
) -> SatelliteSource:
    """Build the satellite source a user asked for (``--sat-source``, ``--sat-url`` ...).

    ``zoom``/``size`` default to :data:`taxamap.sources.tiles.DEFAULT_ZOOM` /
    :data:`~taxamap.sources.tiles.DEFAULT_SIZE` for every kind. ``cache_dir`` is the root of the
    on-disk cache (default: the user cache dir); ``options`` go to the source's constructor
    (e.g. ``retries``, ``timeout``, ``backoff`` for xyz; ``client`` for earthengine).
    """
    from taxamap.sources import tiles

    zoom = tiles.DEFAULT_ZOOM if zoom is None else int(zoom)
    size = tiles.DEFAULT_SIZE if size is None else int(size)
    # Checked once here for every kind of source.
    if not 0 <= zoom <= 24:
        raise TaxamapError(f"--sat-zoom must be between 0 and 24, not {zoom}")
    if size < 16:
        raise TaxamapError(f"--sat-size must be at least 16 pixels, not {size}")
    if int(workers) < 1:
        raise TaxamapError(f"--workers must be at least 1, not {workers}")
    if kind == "xyz":
        return tiles.XYZTileSource(
            url or tiles.DEFAULT_URL, zoom=zoom, size=size, cache_dir=cache_dir, workers=workers, **options
        )
    if kind == "file":
        if file is None:
            raise TaxamapError("--sat-source file needs --sat-file PATH (a GeoTIFF, COG or VRT)")
        from taxamap.sources.rasters import RasterFileSource

        return RasterFileSource(file, zoom=zoom, size=size, workers=workers, **options)
    if kind == "earthengine":
        from taxamap.sources.earthengine import EarthEngineSource

        return EarthEngineSource(
            project=ee_project, year=year, zoom=zoom, size=size, cache_dir=cache_dir, workers=workers, **options
        )
    raise TaxamapError(f"unknown satellite source {kind!r}: use one of {', '.join(SOURCE_KINDS)}")
