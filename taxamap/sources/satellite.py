"""The satellite-imagery interface every source implements, and the factory the CLI calls.

A source turns cell centres into RGB patches for the satellite encoder:

* ``fetch(latlon) -> list[PIL.Image.Image | None]``: one patch per (lat, lon) row; ``None`` where
  the patch could not be had (404, still failing after retries, outside the imagery). A missing
  patch must stay missing (NaN downstream): sources never return zero-filled or black images.
* ``describe() -> dict``: JSON-able settings that identify the imagery (a store key; provenance).
* ``attribution`` / ``license``: what outputs made from this imagery must carry (or ``None``).
* ``stats``: a :class:`SourceStats` (requests, cache hits, failures, retries, ...).
* ``close()``: release connections and threads (sources are also context managers).

Three kinds exist: ``xyz`` (any ``{z}/{x}/{y}`` tile server; default EOX Sentinel-2 cloudless
2020), ``file`` (any raster GDAL reads) and ``earthengine`` (a Sentinel-2 median composite).
All three cut the same Web-Mercator window around a cell (``zoom``/``size``), so their patches are
comparable: see :mod:`taxamap.sources.tiles` for the defaults and why.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from taxamap.errors import TaxamapError

#: The kinds ``make_satellite_source`` accepts (``--sat-source``).
SOURCE_KINDS = ("xyz", "file", "earthengine")

#: Default parallel requests. Eight keeps a public tile server's per-client limits happy (most ask
#: for "a few" connections) while hiding ~50-100 ms of latency per tile.
DEFAULT_WORKERS = 8


@dataclass
class SourceStats:
    """Counters a source keeps across its ``fetch`` calls (thread-safe through :meth:`add`)."""

    requests: int = 0  # network requests sent, retries included
    cache_hits: int = 0  # tiles/patches answered from the on-disk cache (negative entries too)
    retries: int = 0  # requests repeated after a transient error
    failures: int = 0  # tiles/patches given up on (still failing after retries, permanent error)
    not_found: int = 0  # tiles/patches the server says do not exist (404) or with no data
    fetched: int = 0  # tiles/patches obtained from the network and validated
    cells: int = 0  # cells asked for
    cells_missing: int = 0  # cells answered with None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Increment counters atomically: ``stats.add(requests=1, retries=1)``."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for summaries and logs)."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@runtime_checkable
class SatelliteSource(Protocol):
    """What the satellite encoder's driver needs from an imagery source."""

    attribution: str | None
    license: str | None
    stats: SourceStats

    def fetch(self, latlon: np.ndarray) -> list[Any]:
        """One RGB ``PIL.Image`` (``size`` x ``size``) per (lat, lon) row, ``None`` where missing."""
        ...

    def describe(self) -> dict:
        """JSON-able settings that identify the imagery (store key, provenance tags)."""
        ...

    def close(self) -> None:
        """Release network connections, open files and worker threads."""
        ...


def as_latlon(latlon) -> np.ndarray:
    """Check and convert cell centres to a float64 (N, 2) array of (lat, lon) degrees."""
    arr = np.asarray(latlon, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr.reshape(1, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise TaxamapError(f"satellite fetch needs an (N, 2) array of (lat, lon), got shape {arr.shape}")
    return arr


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
