"""Range products: a score map cut at a threshold -> binary range GeoTIFF + range polygons.

A threshold rule is one of

* ``percentile:P``: the P-th percentile of the band's valid cells (``percentile:90`` keeps the top
  ~10 % of cells);
* ``value:V``: the score V itself (raw cosine similarity, as stored in the map);
* ``maxtss:OCC_FILE``: the threshold that maximises TSS (sensitivity + specificity - 1) of the
  presences in OCC_FILE against background cells sampled uniformly over the map (see
  :mod:`taxamap.evaluate`).

A cell is in the range when its value is ``>= threshold``. :func:`threshold_map` writes

* ``<stem>_range.tif``: uint8 on the map's grid (same CRS and transform), 1 = in range, 0 = out,
  255 = nodata (where the map is NaN), with tags recording the rule, the threshold and the source;
* ``<stem>_range.gpkg``: the in-range cells dissolved into polygons, simplified with a tolerance
  of just under half a cell (so the outline loses the staircase but never uncovers an in-range
  cell centre), made valid, in EPSG:4326, one feature per part with its geodesic area in km2.

:func:`range_outline` returns the same geometry without writing files (for the HTML map).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.io import DiskFull, atomic_path, atomic_write
from taxamap.evaluate import DEFAULT_N_BACKGROUND, MapRaster, max_tss, read_map, sample_background

RULE_FORMS = ("percentile:P (0-100, of the valid cells), value:V (a score), or "
              "maxtss:OCC_FILE (best TSS against occurrences)")

#: Simplification tolerance in cells. Just under one half: every cell centre is half a cell from
#: its cell's edges, so an outline moved by less than that keeps all in-range centres inside.
SIMPLIFY_CELLS = 0.49

#: Value -> colour of the range GeoTIFF's palette (QGIS shows it as is).
PALETTE = {0: (230, 230, 230, 0), 1: (27, 120, 55, 255), 255: (0, 0, 0, 0)}
NODATA = 255


@dataclass(frozen=True)
class Rule:
    """A parsed threshold rule: ``kind`` is "percentile", "value" or "maxtss"."""

    kind: str
    value: float | None = None
    occurrences: str | None = None
    text: str = ""


def parse_rule(rule: str) -> Rule:
    """Parse ``percentile:P``, ``value:V`` or ``maxtss[:OCC_FILE]``; TaxamapError otherwise."""
    text = str(rule).strip()
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind in ("percentile", "value"):
        try:
            number = float(arg)
        except ValueError:
            raise TaxamapError(f"threshold {text!r} needs a number after '{kind}:'; use "
                               f"{RULE_FORMS}") from None
        if not math.isfinite(number) or (kind == "percentile" and not 0 <= number <= 100):
            raise TaxamapError(f"threshold {text!r} is out of range; use {RULE_FORMS}")
        return Rule(kind, number, None, text)
    if kind == "maxtss":
        return Rule(kind, None, arg or None, text)
    raise TaxamapError(f"unknown threshold {text!r}; use {RULE_FORMS}")


@dataclass(frozen=True, eq=False)
class RangeResult:
    """What :func:`threshold_map` wrote: ``paths`` {"raster": .tif, "polygons": .gpkg}, the
    ``threshold`` used, the band it was applied to, cell counts and the range's area."""

    paths: dict[str, Path]
    threshold: float
    rule: str
    band: str
    n_in_range: int
    n_valid: int
    area_km2: float
    geometry: Any = field(repr=False, default=None)

    @property
    def raster_path(self) -> Path:
        return self.paths["raster"]

    @property
    def polygons_path(self) -> Path:
        return self.paths["polygons"]


@dataclass(frozen=True, eq=False)
class _Range:
    raster: MapRaster
    band_index: int
    threshold: float
    binary: np.ndarray  # uint8: 1 in, 0 out, 255 nodata
    geometry: Any       # shapely, EPSG:4326


def compute_threshold(
    raster: MapRaster, rule: Rule, band_index: int, occurrences: Any = None, seed: int = 0,
    n_background: int = DEFAULT_N_BACKGROUND,
) -> float:
    """The threshold ``rule`` gives for band ``band_index`` (0-based) of ``raster``."""
    values = raster.values[band_index]
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        raise TaxamapError(f"band {raster.names[band_index]!r} of {raster.path.name} has no "
                           "valid cells to threshold")
    if rule.kind == "value":
        return float(rule.value)
    if rule.kind == "percentile":
        return float(np.percentile(valid.astype(np.float64), rule.value))
    source = rule.occurrences if rule.occurrences is not None else occurrences
    if source is None:
        raise TaxamapError("threshold maxtss needs occurrences: use maxtss:OCC_FILE (CSV, "
                           "GeoPackage, Shapefile or GeoJSON of presences)")
    if isinstance(source, (str, os.PathLike)):
        from taxamap.occurrences import read_points

        presences = read_points(source)
    else:
        presences = np.asarray(source, dtype=np.float64).reshape(-1, 2)
    pres_values, inside = raster.extract(presences)
    pres = pres_values[band_index]
    pres = pres[np.isfinite(pres)]
    if pres.size == 0:
        raise TaxamapError(f"none of the {len(presences)} occurrences falls on a valid cell of "
                           f"{raster.path.name}; check that they are in the map's region")
    back_values, _ = sample_background(raster, n_background, seed, band=band_index)
    back = back_values[band_index]
    threshold, _, _, _ = max_tss(pres, back[np.isfinite(back)])
    return threshold


def _compute(map_path, rule: str, occurrences, band, seed: int, n_background: int) -> _Range:
    parsed = parse_rule(rule)
    raster = read_map(map_path)
    index = raster.band_index(band)
    threshold = compute_threshold(raster, parsed, index, occurrences, seed, n_background)
    values = raster.values[index]
    valid = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        inside = valid & (values >= threshold)
    binary = np.where(valid, inside, NODATA).astype(np.uint8)
    return _Range(raster, index, threshold, binary, _polygons(inside, raster))


def _polygons(inside: np.ndarray, raster: MapRaster):
    """Dissolved, simplified, valid polygons of the True cells, in EPSG:4326."""
    import shapely
    from rasterio.features import shapes
    from shapely.geometry import shape

    if not inside.any():
        return shapely.MultiPolygon()
    pieces = [shape(geom) for geom, _ in
              shapes(inside.astype(np.uint8), mask=inside, transform=raster.transform,
                     connectivity=4)]
    merged = shapely.union_all(pieces)
    cell = min(abs(raster.transform.a), abs(raster.transform.e))
    simplified = shapely.make_valid(merged.simplify(SIMPLIFY_CELLS * cell,
                                                    preserve_topology=True))
    from taxamap.evaluate import _is_wgs84

    if not _is_wgs84(raster.crs):
        simplified = _to_wgs84(simplified, raster.crs)
    return _multipolygon(simplified)


def _wrap_longitudes(geom):
    """Polygons of a grid that runs past +/-180 degrees, cut at the antimeridian and moved back into
    [-180, 180] so GIS tools read the GeoPackage's EPSG:4326 coordinates as they should."""
    import shapely

    west, _, east, _ = geom.bounds if not geom.is_empty else (0, 0, 0, 0)
    if geom.is_empty or (west >= -180 and east <= 180):
        return geom
    pieces = []
    for shift in (-360.0, 0.0, 360.0):
        window = shapely.box(-180 - shift, -90, 180 - shift, 90)
        part = shapely.intersection(geom, window)
        if not part.is_empty:
            pieces.append(shapely.transform(part, lambda xy, s=shift: xy + np.array([s, 0.0])))
    return _multipolygon(shapely.make_valid(shapely.union_all(pieces)))


def _to_wgs84(geom, crs):
    import shapely
    from pyproj import Transformer

    t = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True)

    def project(xy: np.ndarray) -> np.ndarray:
        x, y = t.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.make_valid(shapely.transform(geom, project))


def _multipolygon(geom):
    import shapely

    parts = [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and not p.is_empty]
    nested = [g for g in shapely.get_parts(geom) if g.geom_type in ("MultiPolygon",
                                                                    "GeometryCollection")]
    for g in nested:
        parts.extend(p for p in shapely.get_parts(g) if p.geom_type == "Polygon")
    return shapely.MultiPolygon(parts)


def geodesic_area_km2(geom) -> float:
    """Area of a lon/lat geometry on the WGS84 ellipsoid, km2 (exact, no projection needed)."""
    from pyproj import Geod

    if geom.is_empty:
        return 0.0
    area, _ = Geod(ellps="WGS84").geometry_area_perimeter(geom)
    return abs(area) / 1e6


def range_outline(
    map_path: str | os.PathLike, rule: str, occurrences: Any = None, band: int | str = 1,
    seed: int = 0,
):
    """The range of ``map_path`` under ``rule`` as a shapely MultiPolygon in EPSG:4326
    (dissolved, simplified, valid; empty when no cell reaches the threshold)."""
    return _compute(map_path, rule, occurrences, band, seed, DEFAULT_N_BACKGROUND).geometry


def threshold_map(
    map_path: str | os.PathLike,
    rule: str,
    out_dir: str | os.PathLike | None = None,
    occurrences: Any = None,
    band: int | str = 1,
    *,
    seed: int = 0,
    n_background: int = DEFAULT_N_BACKGROUND,
    stem: str | None = None,
) -> RangeResult:
    """Cut band ``band`` (1-based number or name; default the fused score) of ``map_path`` at
    ``rule`` and write ``<stem>_range.tif`` and ``<stem>_range.gpkg`` into ``out_dir`` (default:
    the map's folder; ``stem`` defaults to the map's file stem).

    ``occurrences`` (a file or (N, 2) (lat, lon) array) serves a bare ``maxtss`` rule; ``seed``
    and ``n_background`` control its background sample. Files are written atomically.
    """
    result = _compute(map_path, rule, occurrences, band, seed, n_background)
    raster = result.raster
    out_dir = Path(out_dir).expanduser() if out_dir is not None else raster.path.parent
    stem = stem or raster.path.stem
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaxamapError(f"cannot create {out_dir}: {exc.strerror or exc}; choose another "
                           "--out") from None
    band_name = raster.names[result.band_index]
    tags = {"RULE": parse_rule(rule).text, "THRESHOLD": repr(result.threshold),
            "SOURCE_MAP": raster.path.name, "SOURCE_BAND": band_name,
            "VALUES": "1 = in range (value >= threshold), 0 = out of range, 255 = nodata"}
    for key in ("QUERY", "PROMPT", "TAXAMAP_VERSION"):
        if key in raster.tags:
            tags[f"SOURCE_{key}"] = raster.tags[key]
    raster_path = out_dir / f"{stem}_range.tif"
    polygons_path = out_dir / f"{stem}_range.gpkg"
    _write_binary(raster_path, result.binary, raster, tags)
    parts = list(_wrap_longitudes(result.geometry).geoms)
    areas = [geodesic_area_km2(p) for p in parts]
    order = np.argsort(areas)[::-1]
    _write_polygons(polygons_path, [parts[i] for i in order], [areas[i] for i in order],
                    tags["RULE"], result.threshold, raster.path.name)
    return RangeResult(
        paths={"raster": raster_path, "polygons": polygons_path}, threshold=result.threshold,
        rule=tags["RULE"], band=band_name, n_in_range=int((result.binary == 1).sum()),
        n_valid=int((result.binary != NODATA).sum()), area_km2=float(sum(areas)),
        geometry=result.geometry,
    )


_OUT_HINT = "free some space or choose another --out"


def _write_binary(path: Path, binary: np.ndarray, raster: MapRaster, tags: dict) -> None:
    import rasterio
    from rasterio.io import MemoryFile

    profile = dict(driver="GTiff", width=raster.width, height=raster.height, count=1,
                   dtype="uint8", nodata=NODATA, crs=raster.crs, transform=raster.transform,
                   compress="deflate")
    try:
        # Built in memory and written by Python: a full disk is then one named error, not GDAL's.
        with MemoryFile() as mem:
            with mem.open(**profile) as ds:
                ds.write(binary, 1)
                ds.set_band_description(1, "range")
                ds.write_colormap(1, PALETTE)
                ds.update_tags(**tags)
            data = mem.read()
        atomic_write(path, data, hint=_OUT_HINT)
    except DiskFull:
        raise
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise TaxamapError(f"cannot write {path}: {exc}; choose another --out") from None


def _write_polygons(path: Path, parts: list, areas: list[float], rule: str, threshold: float,
                    source: str) -> None:
    import pyogrio
    import shapely

    n = len(parts)
    geometry = np.array([shapely.to_wkb(p) for p in parts], dtype=object)
    field_data = [np.arange(1, n + 1, dtype=np.int32), np.asarray(areas, dtype=np.float64),
                  np.array([rule] * n, dtype=object), np.full(n, threshold, dtype=np.float64),
                  np.array([source] * n, dtype=object)]
    try:
        with atomic_path(path, need=sum(len(g) for g in geometry), hint=_OUT_HINT,
                         create=False) as tmp:
            pyogrio.raw.write(tmp, geometry=geometry, field_data=field_data,
                              fields=["part", "area_km2", "rule", "threshold", "source_map"],
                              geometry_type="Polygon", crs="EPSG:4326", driver="GPKG",
                              layer="range", encoding="UTF-8")
    except DiskFull:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) or type(exc).__module__.startswith("pyogrio"):
            raise TaxamapError(f"cannot write {path}: {exc}; choose another --out") from None
        raise
