"""Range products: a score map cut at a threshold -> binary range GeoTIFF + range polygons.

A threshold rule is one of

* ``percentile:P``: the P-th percentile of the band's valid cells (``percentile:90`` keeps the top
  ~10 % of cells);
* ``value:V``: the score V itself (raw cosine similarity, as stored in the map);
* ``maxtss:OCC_FILE``: the threshold that maximises TSS (sensitivity + specificity - 1) of the
  presences in OCC_FILE against background cells sampled uniformly over the map (see
  :mod:`taxamap.products.evaluate`).

A cell is in the range when its value is ``>= threshold``. :func:`threshold_map` writes

* ``<stem>_range.tif``: uint8 on the map's grid (same CRS and transform), 1 = in range, 0 = out,
  255 = nodata (where the map is NaN), with tags recording the rule, the threshold and the source;
* ``<stem>_range.gpkg``: the in-range cells dissolved into polygons whose edges are the cells'
  own edges (not simplified: at any zoom the outline runs along cell edges, never through a
  cell), made valid, in EPSG:4326, one feature per part with its geodesic area in km2.

Both also carry the range's IUCN metrics (:mod:`taxamap.products.iucn`), measured on the in-range cells
themselves: EOO and AOO in km2 (GeoPackage fields ``eoo_km2`` and
``aoo_km2`` on every part, GeoTIFF tags ``EOO_KM2``, ``AOO_KM2`` and ``EOO_HULL_KM2``, and
``IUCN_B``: which criterion B area thresholds they fall under).

A rule that keeps no cell (``value:5`` on a map whose scores end at 0.15) is an error giving the
band's value range: an empty range is never written.

:func:`range_outline` returns the same geometry without writing files (for the HTML map).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taxamap.crs import geometry_to_lonlat, is_wgs84
from taxamap.errors import TaxamapError
from taxamap.io import DiskFull, atomic_path, atomic_write
from taxamap.products.evaluate import DEFAULT_N_BACKGROUND, MapRaster, max_tss, read_map, sample_background
from taxamap.surface import accepts, current, option

RULE_FORMS = ("percentile:P (0-100, of the valid cells), value:V (a score), or "
              "maxtss:OCC_FILE (best TSS against occurrences)")


def rule_forms() -> str:
    """:data:`RULE_FORMS` as the caller's surface accepts them: the web page has no occurrence
    files (so no maxtss), and its range slider sets percentile:P."""
    if accepts("occurrences"):
        return RULE_FORMS
    return (f"percentile:P (0-100, of the valid cells; {option('threshold')} sets it) or "
            "value:V (a score)")

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
                               f"{rule_forms()}") from None
        if not math.isfinite(number) or (kind == "percentile" and not 0 <= number <= 100):
            raise TaxamapError(f"threshold {text!r} is out of range; use {rule_forms()}")
        return Rule(kind, number, None, text)
    if kind == "maxtss":
        return Rule(kind, None, arg or None, text)
    raise TaxamapError(f"unknown threshold {text!r}; use {rule_forms()}")


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
    eoo_km2: float = math.nan
    aoo_km2: float = math.nan
    eoo_hull_km2: float = math.nan  # the hull's own area, before EOO is raised to the AOO

    @property
    def criterion_b(self) -> str:
        """Which IUCN criterion B area thresholds EOO and AOO fall under (never a listing)."""
        from taxamap.products.iucn import RangeMetrics

        return RangeMetrics(self.eoo_km2, self.aoo_km2, self.eoo_hull_km2,
                            self.n_in_range).criterion_b

    @property
    def raster_path(self) -> Path:
        return self.paths["raster"]

    @property
    def polygons_path(self) -> Path:
        return self.paths["polygons"]


@dataclass(frozen=True, eq=False)
class RangeCut:
    """A map cut at a rule, in memory: ``binary`` uint8 on the map's grid (1 in, 0 out,
    255 nodata) and ``geometry`` (shapely MultiPolygon, EPSG:4326, possibly past +/-180 for
    grids across the antimeridian)."""

    raster: MapRaster
    band_index: int
    threshold: float
    binary: np.ndarray
    geometry: Any
    cells: Any = None   # the in-range cells dissolved, EPSG:4326 (IUCN metrics)
    rule_text: str = ""

    @property
    def band_name(self) -> str:
        return self.raster.names[self.band_index]

    @property
    def n_in_range(self) -> int:
        return int((self.binary == 1).sum())

    @property
    def n_valid(self) -> int:
        return int((self.binary != NODATA).sum())

    def parts(self) -> list[tuple[Any, float]]:
        """(polygon, geodesic area km2) of each part, wrapped into [-180, 180], largest first."""
        parts = list(_wrap_longitudes(self.geometry).geoms)
        areas = [geodesic_area_km2(p) for p in parts]
        order = np.argsort(areas)[::-1]
        return [(parts[i], areas[i]) for i in order]


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
        # Only the API also takes the points apart from the rule ('taxamap threshold' does not).
        also = f" or {option('occurrences', metavar='FILE')}" if current() == "api" else ""
        raise TaxamapError("threshold maxtss needs occurrences: use maxtss:OCC_FILE (CSV, "
                           f"GeoPackage, Shapefile or GeoJSON of presences){also}")
    if isinstance(source, (str, os.PathLike)):
        from taxamap.products.occurrences import read_points

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


def cut_range(map_or_path: Any, rule: str, occurrences: Any = None, band: int | str = 1,
              seed: int = 0, n_background: int = DEFAULT_N_BACKGROUND,
              mask: str | None = None) -> RangeCut:
    """Cut band ``band`` of a map (a score Dataset or a GeoTIFF path) at ``rule``, in memory.
    ``mask`` (e.g. ``"novelty>2"``, see :func:`taxamap.products.trust.parse_mask`) drops the
    cells where it holds after the rule has set the threshold: they become nodata, neither in
    nor out of the range."""
    parsed = parse_rule(rule)
    raster = read_map(map_or_path)
    index = raster.band_index(band)
    threshold = compute_threshold(raster, parsed, index, occurrences, seed, n_background)
    values = raster.values[index]
    valid = np.isfinite(values)
    if mask:
        from taxamap.products.trust import mask_cells, parse_mask

        conditions = parse_mask(mask)
        valid &= ~mask_cells(dict(zip(raster.names, raster.values)), conditions,
                             raster.path.name)
        parsed = Rule(parsed.kind, parsed.value, parsed.occurrences,
                      f"{parsed.text}; mask {','.join(c.text for c in conditions)}")
    with np.errstate(invalid="ignore"):
        inside = valid & (values >= threshold)
    if not inside.any():
        # An empty range is no result (its EOO of 0 would read as Critically Endangered).
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        raise TaxamapError(
            f"threshold {parsed.text} keeps no cell: band {raster.names[index]!r} of "
            f"{raster.path.name} ranges from {lo:.4g} to {hi:.4g}; give a value at or below "
            f"{hi:.4g}, or percentile:P")
    binary = np.where(valid, inside, NODATA).astype(np.uint8)
    outline, cells = _polygons(inside, raster)
    return RangeCut(raster, index, threshold, binary, outline, cells, parsed.text)


def _polygons(inside: np.ndarray, raster: MapRaster):
    """(the True cells dissolved into valid polygons whose edges are the cells' own edges, for
    drawing and the GeoPackage; the same for the IUCN metrics), both in EPSG:4326.

    Exact, not simplified: any simplification that drops a corner draws a diagonal through cells,
    which shows at high zoom. GDAL's polygonize already gives one vertex per corner only."""
    import shapely
    from rasterio.features import shapes
    from shapely.geometry import shape

    if not inside.any():
        return shapely.MultiPolygon(), shapely.MultiPolygon()
    pieces = [shape(geom) for geom, _ in
              shapes(inside.astype(np.uint8), mask=inside, transform=raster.transform,
                     connectivity=4)]
    merged = shapely.union_all(pieces)
    if not is_wgs84(raster.crs):
        # Edges densified first, so the cells' straight edges in the map's CRS follow their
        # curves in lon/lat.
        cell = min(abs(raster.transform.a), abs(raster.transform.e))
        merged = geometry_to_lonlat(shapely.segmentize(merged, cell / 4.0), raster.crs,
                                    f"map {raster.path.name}")
    outline = _multipolygon(merged)
    return outline, outline


def _wrap_longitudes(geom):
    """Polygons of a grid that runs past +/-180 degrees, cut at the antimeridian and moved back into
    [-180, 180] so GIS tools read the GeoPackage's EPSG:4326 coordinates as they should."""
    from taxamap.products.iucn import wrap_longitudes

    return wrap_longitudes(geom)


def _multipolygon(geom):
    from taxamap.products.iucn import polygon_parts

    return polygon_parts(geom)


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
    (dissolved along cell edges, valid; empty when no cell reaches the threshold)."""
    return cut_range(map_path, rule, occurrences, band, seed, DEFAULT_N_BACKGROUND).geometry


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
    mask: str | None = None,
) -> RangeResult:
    """Cut band ``band`` (1-based number or name; default the fused score) of ``map_path`` at
    ``rule`` and write ``<stem>_range.tif`` and ``<stem>_range.gpkg`` into ``out_dir`` (default:
    the map's folder; ``stem`` defaults to the map's file stem).

    ``occurrences`` (a file or (N, 2) (lat, lon) array) serves a bare ``maxtss`` rule; ``seed``
    and ``n_background`` control its background sample; ``mask`` drops cells (see
    :func:`cut_range`). Files are written atomically.
    """
    return write_range(cut_range(map_path, rule, occurrences, band, seed, n_background, mask),
                       out_dir, stem=stem)


def write_range(result: RangeCut, out_dir: str | os.PathLike | None = None,
                stem: str | None = None) -> RangeResult:
    """Write a :class:`RangeCut` as ``<stem>_range.tif`` and ``<stem>_range.gpkg`` (atomically)."""
    raster = result.raster
    out_dir = Path(out_dir).expanduser() if out_dir is not None else raster.path.parent
    stem = stem or raster.path.stem
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaxamapError(f"cannot create {out_dir}: {exc.strerror or exc}; choose another "
                           "--out") from None
    band_name = result.band_name
    from taxamap.products.iucn import range_metrics

    metrics = range_metrics(result.cells, result.n_in_range)
    tags = {"RULE": result.rule_text, "THRESHOLD": repr(result.threshold),
            "SOURCE_MAP": raster.path.name, "SOURCE_BAND": band_name,
            "VALUES": "1 = in range (value >= threshold), 0 = out of range, 255 = nodata",
            "EOO_KM2": f"{metrics.eoo_km2:.3f}", "AOO_KM2": f"{metrics.aoo_km2:.3f}",
            "EOO_HULL_KM2": f"{metrics.hull_km2:.3f}", "IUCN_B": metrics.criterion_b}
    for key in ("QUERY", "PROMPT", "TAXAMAP_VERSION"):
        if key in raster.tags:
            tags[f"SOURCE_{key}"] = raster.tags[key]
    raster_path = out_dir / f"{stem}_range.tif"
    polygons_path = out_dir / f"{stem}_range.gpkg"
    _write_binary(raster_path, result.binary, raster, tags)
    parts = result.parts()
    areas = [a for _, a in parts]
    _write_polygons(polygons_path, [p for p, _ in parts], areas, tags["RULE"], result.threshold,
                    raster.path.name, metrics)
    return RangeResult(
        paths={"raster": raster_path, "polygons": polygons_path}, threshold=result.threshold,
        rule=tags["RULE"], band=band_name, n_in_range=result.n_in_range,
        n_valid=result.n_valid, area_km2=float(sum(areas)), geometry=result.geometry,
        eoo_km2=metrics.eoo_km2, aoo_km2=metrics.aoo_km2, eoo_hull_km2=metrics.hull_km2,
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
                    source: str, metrics) -> None:
    import pyogrio
    import shapely

    n = len(parts)
    geometry = np.array([shapely.to_wkb(p) for p in parts], dtype=object)
    field_data = [np.arange(1, n + 1, dtype=np.int32), np.asarray(areas, dtype=np.float64),
                  np.array([rule] * n, dtype=object), np.full(n, threshold, dtype=np.float64),
                  np.array([source] * n, dtype=object),
                  # EOO and AOO belong to the whole range: every part carries them.
                  np.full(n, metrics.eoo_km2, dtype=np.float64),
                  np.full(n, metrics.aoo_km2, dtype=np.float64)]
    try:
        with atomic_path(path, need=sum(len(g) for g in geometry), hint=_OUT_HINT,
                         create=False) as tmp:
            pyogrio.raw.write(tmp, geometry=geometry, field_data=field_data,
                              fields=["part", "area_km2", "rule", "threshold", "source_map",
                                      "eoo_km2", "aoo_km2"],
                              geometry_type="Polygon", crs="EPSG:4326", driver="GPKG",
                              layer="range", encoding="UTF-8")
    except DiskFull:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) or type(exc).__module__.startswith("pyogrio"):
            raise TaxamapError(f"cannot write {path}: {exc}; choose another --out") from None
        raise
