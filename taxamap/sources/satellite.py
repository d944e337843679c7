"""The factory the CLI calls to build the satellite source a user asked for.

The interface every source implements (``fetch_status``/``fetch``, ``describe``, ``stats``...)
lives in :mod:`taxamap.sources.base`; :class:`SatelliteSource` and :class:`SourceStats` are
re-exported here for callers that only know this module.

Four kinds exist: ``wms`` (the default: exactly the GetMap request of TaxaBind's training set,
EOX Sentinel-2 cloudless 2020), ``xyz`` (any ``{z}/{x}/{y}`` tile server; default the same EOX
mosaic in Web Mercator), ``file`` (any raster GDAL reads) and ``earthengine`` (a Sentinel-2
median composite). All four deliver the same footprint, the 2,560 m square in the cell's local
tangent plane at 256 x 256 px that the encoder was trained on (:mod:`taxamap.sources.footprint`),
so their patches are comparable.

To look at what the encoder sees: :func:`patch_at` / :func:`patches_at` give the exact RGB patch
handed to its preprocessing plus the footprint and request(s) behind it (the web app shows them per
cell); :func:`write_patches` is ``taxamap patches``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option
from taxamap.sources.base import DEFAULT_WORKERS, SatelliteSource, SourceStats, as_latlon

__all__ = ["DEFAULT_SOURCE", "DEFAULT_WORKERS", "SOURCE_KINDS", "PatchFile", "SatelliteSource",
           "SourceStats", "as_latlon", "describe_patch", "make_satellite_source", "patch_at",
           "patch_name", "patches_at", "write_patches"]

#: The kinds ``make_satellite_source`` accepts (``--sat-source``).
SOURCE_KINDS = ("wms", "xyz", "file", "earthengine")
#: The default: the WMS request TaxaBind's satellite encoder was trained on (EOX s2cloudless-2020).
DEFAULT_SOURCE = "wms"


def make_satellite_source(
    kind: str = DEFAULT_SOURCE,
    *,
    url: str | None = None,
    zoom: int | None = None,
    size: int | None = None,
    footprint_m: float | None = None,
    file: str | Path | None = None,
    ee_project: str | None = None,
    year: int = 2020,
    cache_dir: str | Path | None = None,
    workers: int = DEFAULT_WORKERS,
    **options: Any,
) -> SatelliteSource:
    """Build the satellite source a user asked for (``--sat-source``, ``--sat-url`` ...).

    Every kind delivers TaxaBind's footprint: ``footprint_m`` (default 2,560 m) square in the
    cell's tangent plane at ``size`` (default 256) px (:mod:`taxamap.sources.footprint`).
    ``zoom`` fixes the tile level of ``xyz`` (default: chosen per cell from its latitude) and is
    refused for the other kinds. ``cache_dir`` is the root of the on-disk cache (default: the user
    cache dir); ``options`` go to the source's constructor (e.g. ``retries``, ``timeout``,
    ``backoff`` for wms/xyz; ``client`` for earthengine).
    """
    from taxamap.sources.footprint import check_footprint_options

    # Checked once here for every kind of source.
    footprint_m, size = check_footprint_options(footprint_m, size)
    if int(workers) < 1:
        raise TaxamapError(f"{option('workers')} must be at least 1, not {workers}")
    if zoom is not None:
        if kind != "xyz":
            raise TaxamapError(f"{option('sat-zoom')} applies to {option('sat-source', 'xyz')} "
                               f"only (a {kind} source resamples its imagery to "
                               f"{option('sat-footprint')} / {option('sat-size')})")
        if not 0 <= int(zoom) <= 24:
            raise TaxamapError(f"{option('sat-zoom')} must be between 0 and 24, not {zoom}")
    common = dict(size=size, footprint_m=footprint_m, workers=workers)
    if kind == "wms":
        from taxamap.sources.wms import DEFAULT_WMS_URL, WMSSource

        return WMSSource(url or DEFAULT_WMS_URL, cache_dir=cache_dir, **common, **options)
    if kind == "xyz":
        from taxamap.sources import tiles

        return tiles.XYZTileSource(url or tiles.DEFAULT_URL, zoom=zoom, cache_dir=cache_dir, **common,
                                   **options)
    if url is not None and kind in ("file", "earthengine"):
        raise TaxamapError(f"{option('sat-url')} applies to {option('sat-source', 'wms')} or "
                           f"xyz, not {kind}")
    if kind == "file":
        if file is None:
            raise TaxamapError(f"{option('sat-source', 'file')} needs "
                               f"{option('sat-file', metavar='PATH')} (a GeoTIFF, COG or VRT)")
        from taxamap.sources.rasters import RasterFileSource

        return RasterFileSource(file, **common, **options)
    if kind == "earthengine":
        from taxamap.sources.earthengine import EarthEngineSource

        return EarthEngineSource(project=ee_project, year=year, cache_dir=cache_dir, **common, **options)
    raise TaxamapError(f"unknown satellite source {kind!r}: use one of {', '.join(SOURCE_KINDS)}")


@dataclass
class PatchFile:
    """What :func:`write_patches` wrote for one point (``png`` None where there was no patch)."""

    lat: float
    lon: float
    png: Path | None
    json: Path


def patch_name(lat: float, lon: float) -> str:
    """``<lat>_<lon>`` with up to 6 decimals, trailing zeros dropped: ``40.1_-83.25``."""
    def fmt(v: float) -> str:
        text = f"{float(v):.6f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text

    return f"{fmt(lat)}_{fmt(lon)}"


def describe_patch(source: SatelliteSource, lat: float, lon: float) -> dict:
    """What the patch of (lat, lon) is, without fetching it: footprint (bbox, metres per pixel),
    the source's settings, the request URL(s) or tiles, and the imagery credit."""
    explain = getattr(source, "explain", None)
    info = explain(lat, lon) if explain is not None else {"lat": float(lat), "lon": float(lon),
                                                           "source": source.describe()}
    info["attribution"] = getattr(source, "attribution", None)
    info["license"] = getattr(source, "license", None)
    return info


def _fetch_status(source: SatelliteSource, latlon: np.ndarray) -> tuple[list, list[bool]]:
    status = getattr(source, "fetch_status", None)
    if status is not None:
        return status(latlon)
    patches = source.fetch(latlon)
    return patches, [False] * len(patches)


def patches_at(source: SatelliteSource, latlon) -> list[tuple[np.ndarray | None, dict]]:
    """For each (lat, lon) row: the exact RGB patch the satellite encoder's preprocessing is handed
    (an (size, size, 3) uint8 array, None where there is none) and :func:`describe_patch`'s dict
    plus ``missing`` / ``failed`` (failed: a rerun may get it). One fetch for all rows."""
    latlon = as_latlon(latlon)
    patches, failed = _fetch_status(source, latlon)
    out = []
    for (lat, lon), img, bad in zip(latlon, patches, failed):
        info = describe_patch(source, float(lat), float(lon))
        info["missing"] = img is None
        info["failed"] = bool(bad)
        if img is None:
            info["reason"] = _missing_reason(info, bool(bad))
        out.append((None if img is None else np.asarray(img.convert("RGB")), info))
    return out


def _missing_reason(info: dict, failed: bool) -> str:
    if failed:
        return "the source still failed after retries (a rerun may get it)"
    if "bbox" not in info:
        return "no footprint here: a pole lies inside it"
    if info.get("source", {}).get("kind") == "xyz" and not info.get("tiles"):
        return "beyond Web Mercator's +-85.05 deg"
    return "no imagery here (not found, blank, or not enough valid pixels)"


def patch_at(source: SatelliteSource, lat: float, lon: float) -> tuple[np.ndarray | None, dict]:
    """:func:`patches_at` for one point (the web app shows it per cell)."""
    return patches_at(source, [[lat, lon]])[0]


#: What ``taxamap patches`` advises when the server fails (the sources' own advice is predict's).
PATCHES_HINT = "check --sat-url (or --sat-source) and the network, then run the same command again"


def write_patches(points, out: str | Path, source: SatelliteSource) -> list[PatchFile]:
    """``taxamap patches``: per (lat, lon), ``out/<lat>_<lon>.png`` (the patch, lossless) and
    ``out/<lat>_<lon>.json`` (:func:`patches_at`'s description). Each file is written under a
    temporary name and renamed; a point with no imagery there gets the JSON only.

    A patch missing because the source failed (not answering, still failing after retries) is
    a TaxamapError naming the server, after the other points' files are written."""
    from PIL import Image

    from taxamap.io import atomic_path, atomic_write
    from taxamap.paths import check_folder

    folder = check_folder(out, "--out")
    latlon = as_latlon(points)
    breaker = getattr(source, "breaker", None)
    if breaker is not None:
        breaker.hint = PATCHES_HINT
    written, failed = [], []
    try:
        for (lat, lon), (rgb, info) in zip(latlon, patches_at(source, latlon)):
            if info.get("failed"):
                failed.append((float(lat), float(lon)))
                continue
            stem = patch_name(lat, lon)
            png = None
            if rgb is not None:
                png = folder / f"{stem}.png"
                with atomic_path(png, need=rgb.nbytes, what="writing satellite patches") as tmp:
                    Image.fromarray(rgb, "RGB").save(tmp, format="PNG")
                info["file"] = png.name
            meta = folder / f"{stem}.json"
            atomic_write(meta, json.dumps(info, indent=1, sort_keys=True) + "\n",
                         what="writing satellite patches")
            written.append(PatchFile(float(lat), float(lon), png, meta))
    except OSError as exc:
        raise TaxamapError(f"cannot write patches to {folder}: {exc.strerror or exc}") from None
    if failed:
        host, reason = breaker.last_failure if breaker is not None else ("", "")
        server = host or source.describe().get("url") or source.describe().get("kind")
        kept = f" ({len(written)} written to {folder} are kept)" if written else ""
        raise TaxamapError(
            f"{len(failed)} of {len(latlon)} satellite patches could not be fetched from "
            f"{server} (first at {failed[0][0]:g}, {failed[0][1]:g}; still failing after "
            f"retries{', last: ' + reason if reason else ''}){kept}; {PATCHES_HINT}")
    return written
