"""Range products: a score map cut at a threshold -> binary range GeoTIFF + range polygons.

A threshold rule is one of

* ``percentile:P``: the P-th percentile of the band's valid cells (``percentile:90`` keeps the top
  ~10 % of cells);
* ``value:V``: the score V itself (raw cosine similarity, as stored in the map);
* ``maxtss:OCC_FILE``: the threshold that maximises TSS (sensitivity + specificity - 1) of the
  presences in OCC_FILE against background cells sampled uniformly over the map (see
  :mod:`taxamap.products.evaluate`).

A cell is in the range when its value is ``>= threshold``. :func:`cut_range` cuts a map (a score
Dataset, or a GeoTIFF opened into one) into a :class:`Range`, the one range result; its
:meth:`Range.write` (and :func:`threshold_map`, which does both) writes

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

:func:`range_outline` returns the outline alone (what the HTML map draws).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taxamap.crs import geometry_to_lonlat, is_wgs84, polygon_parts, wrap_longitudes
from taxamap.dataset import (
    band_name,
    band_values,
    georeference,
    map_file,
    sample_points,
    score_variables,
    single_map,
)
from taxamap.errors import TaxamapError
from taxamap.io import DiskFull, atomic_path, atomic_write
from taxamap.products.evaluate import DEFAULT_N_BACKGROUND, max_tss, sample_background
from taxamap.surface import accepts, current, option

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import xarray as xr

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


@dataclass(eq=False)
class Range:
    """A map cut at a threshold rule (:func:`cut_range`); :meth:`write` writes it.

    ``threshold`` (the score cut at), ``rule`` (as given), ``band`` (the band cut); ``raster``: an
    ``xarray.DataArray`` on the map's grid, 1 in range, 0 out, NaN off the cells; ``polygons``: a
    ``geopandas.GeoDataFrame`` in EPSG:4326, one row per part (largest first, cut at the
    antimeridian) with its geodesic ``area_km2`` and the range's ``eoo_km2`` and ``aoo_km2``;
    ``geometry``: the outline as one shapely MultiPolygon in EPSG:4326 (past +/-180 for grids
    across the antimeridian, as the HTML map draws it); cell counts; ``area_km2`` (all parts);
    the IUCN extent of occurrence and area of occupancy (``eoo_km2``, ``aoo_km2``, and
    ``eoo_hull_km2``, the hull's own area before EOO is raised to the AOO) and ``criterion_b``
    (which criterion B area thresholds they meet; the other conditions of B are not assessed);
    ``source``: the map's file (written files go beside it by default, named after it);
    ``tags``: what the written files record; ``paths``: {"raster": .tif, "polygons": .gpkg}
    once written.
    """

    threshold: float
    rule: str
    band: str
    raster: "xr.DataArray" = field(repr=False)
    polygons: "gpd.GeoDataFrame" = field(repr=False)
    geometry: Any = field(repr=False)
    n_in_range: int
    n_valid: int
    area_km2: float
    eoo_km2: float
    aoo_km2: float
    eoo_hull_km2: float
    criterion_b: str
    source: Path
    tags: dict[str, str] = field(default_factory=dict, repr=False)
    paths: dict[str, Path] = field(default_factory=dict)

    def write(self, out_dir: str | os.PathLike | None = None,
              stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>_range.tif`` and ``<stem>_range.gpkg`` (atomically) into ``out_dir``
        (default: the map's folder; ``stem``: the map's file stem); returns and keeps ``paths``."""
        out_dir = Path(out_dir).expanduser() if out_dir is not None else self.source.parent
        stem = stem or self.source.stem
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TaxamapError(f"cannot create {out_dir}: {exc.strerror or exc}; choose "
                               "another --out") from None
        raster_path = out_dir / f"{stem}_range.tif"
        polygons_path = out_dir / f"{stem}_range.gpkg"
        values = np.asarray(self.raster.values)
        binary = np.where(np.isnan(values), NODATA, values).astype(np.uint8)
        write_categories(raster_path, binary, self.raster, nodata=NODATA, palette=PALETTE,
                         description="range", tags=self.tags)
        _write_polygons(polygons_path, self.polygons, self.rule, self.threshold,
                        self.source.name)
        self.paths = {"raster": raster_path, "polygons": polygons_path}
        return self.paths


def compute_threshold(
    ds: "xr.Dataset", rule: Rule, band: str, occurrences: Any = None, seed: int = 0,
    n_background: int = DEFAULT_N_BACKGROUND,
) -> float:
    """The threshold ``rule`` gives for ``band`` (a variable name) of the (y, x) map ``ds``."""
    values = band_values(ds, band)
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        raise TaxamapError(f"band {band!r} of {map_file(ds).name} has no valid cells to "
                           "threshold")
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
    pres, _ = sample_points(ds, presences, [band])
    pres = pres[0][np.isfinite(pres[0])]
    if pres.size == 0:
        raise TaxamapError(f"none of the {len(presences)} occurrences falls on a valid cell of "
                           f"{map_file(ds).name}; check that they are in the map's region")
    back_values, _ = sample_background(ds, n_background, seed, band=band)
    back = back_values[score_variables(ds).index(band)]
    threshold, _, _, _ = max_tss(pres, back[np.isfinite(back)])
    return threshold


def cut_range(map_or_path: Any, rule: str, occurrences: Any = None, band: int | str = 1,
              seed: int = 0, n_background: int = DEFAULT_N_BACKGROUND,
              mask: str | None = None) -> Range:
    """Cut ``band`` (1-based number or name; default the fused score) of a (y, x) map (a score
    Dataset or a GeoTIFF path) at ``rule``, in memory; an empty range is refused.

    ``occurrences`` (a file or (N, 2) (lat, lon) array) serves a bare ``maxtss`` rule; ``seed``
    and ``n_background`` control its background sample. ``mask`` (e.g. ``"novelty>2"``, see
    :func:`taxamap.products.trust.parse_mask`) drops the cells where it holds after the rule has
    set the threshold: they become nodata, neither in nor out of the range.
    """
    import geopandas as gpd
    import xarray as xr

    from taxamap.products.iucn import range_metrics

    parsed = parse_rule(rule)
    ds = single_map(map_or_path)
    name = band_name(ds, band)
    threshold = compute_threshold(ds, parsed, name, occurrences, seed, n_background)
    values = band_values(ds, name)
    valid = np.isfinite(values)
    if mask:
        from taxamap.products.trust import mask_cells, parse_mask

        conditions = parse_mask(mask)
        valid &= ~mask_cells({n: band_values(ds, n) for n in score_variables(ds)}, conditions,
                             map_file(ds).name)
        parsed = Rule(parsed.kind, parsed.value, parsed.occurrences,
                      f"{parsed.text}; mask {','.join(c.text for c in conditions)}")
    with np.errstate(invalid="ignore"):
        inside = valid & (values >= threshold)
    source = map_file(ds)
    if not inside.any():
        # An empty range is no result (its EOO of 0 would read as Critically Endangered).
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        raise TaxamapError(
            f"threshold {parsed.text} keeps no cell: band {name!r} of {source.name} ranges "
            f"from {lo:.4g} to {hi:.4g}; give a value at or below {hi:.4g}, or percentile:P")
    geometry = _outline(inside, ds)
    n_in_range = int(inside.sum())
    metrics = range_metrics(geometry, n_in_range)
    parts = list(wrap_longitudes(geometry).geoms)
    areas = [geodesic_area_km2(p) for p in parts]
    order = np.argsort(areas)[::-1]
    parts, areas = [parts[i] for i in order], [areas[i] for i in order]
    polygons = gpd.GeoDataFrame({"area_km2": areas, "eoo_km2": metrics.eoo_km2,
                                 "aoo_km2": metrics.aoo_km2}, geometry=parts, crs="EPSG:4326")
    binary = np.where(valid, inside, np.nan).astype(np.float32)
    raster = georeference(
        xr.Dataset({"range": (("y", "x"), binary)}, coords={"y": ds["y"], "x": ds["x"]}),
        ds.rio.crs, ds.rio.transform())["range"]
    raster.attrs.update(rule=parsed.text, threshold=threshold, band=name)
    tags = {"RULE": parsed.text, "THRESHOLD": repr(threshold), "SOURCE_MAP": source.name,
            "SOURCE_BAND": name,
            "VALUES": "1 = in range (value >= threshold), 0 = out of range, 255 = nodata",
            "EOO_KM2": f"{metrics.eoo_km2:.3f}", "AOO_KM2": f"{metrics.aoo_km2:.3f}",
            "EOO_HULL_KM2": f"{metrics.hull_km2:.3f}", "IUCN_B": metrics.criterion_b}
    provenance = {str(k).upper(): str(v) for k, v in ds.attrs.items()}
    for key in ("QUERY", "PROMPT", "TAXAMAP_VERSION"):
        if key in provenance:
            tags[f"SOURCE_{key}"] = provenance[key]
    return Range(threshold=threshold, rule=parsed.text, band=name, raster=raster,
                 polygons=polygons, geometry=geometry, n_in_range=n_in_range,
                 n_valid=int(valid.sum()), area_km2=float(sum(areas)),
                 eoo_km2=metrics.eoo_km2, aoo_km2=metrics.aoo_km2,
                 eoo_hull_km2=metrics.hull_km2, criterion_b=metrics.criterion_b,
                 source=source, tags=tags)


def _outline(inside: np.ndarray, ds: "xr.Dataset"):
    """The True cells dissolved into valid polygons whose edges are the cells' own edges, in
    EPSG:4326 (one MultiPolygon).

    Exact, not simplified: any simplification that drops a corner draws a diagonal through cells,
    which shows at high zoom. GDAL's polygonize already gives one vertex per corner only."""
    import shapely
    from rasterio.features import shapes
    from shapely.geometry import shape

    transform, crs = ds.rio.transform(), ds.rio.crs
    pieces = [shape(geom) for geom, _ in
              shapes(inside.astype(np.uint8), mask=inside, transform=transform, connectivity=4)]
    merged = shapely.union_all(pieces)
    if not is_wgs84(crs):
        # Edges densified first, so the cells' straight edges in the map's CRS follow their
        # curves in lon/lat.
        cell = min(abs(transform.a), abs(transform.e))
        merged = geometry_to_lonlat(shapely.segmentize(merged, cell / 4.0), crs,
                                    f"map {map_file(ds).name}")
    return polygon_parts(merged)


def geodesic_area_km2(geom) -> float:
    """Area of a lon/lat geometry on the WGS84 ellipsoid, km2 (exact, no projection needed)."""
    from pyproj import Geod

    if geom.is_empty:
        return 0.0
    area, _ = Geod(ellps="WGS84").geometry_area_perimeter(geom)
    return abs(area) / 1e6


def range_outline(
    map_or_path: Any, rule: str, occurrences: Any = None, band: int | str = 1, seed: int = 0,
):
    """The outline of :func:`cut_range`'s range: a shapely MultiPolygon in EPSG:4326 (dissolved
    along cell edges, valid)."""
    return cut_range(map_or_path, rule, occurrences, band, seed).geometry


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
) -> Range:
    """``taxamap threshold``: :func:`cut_range` of ``map_path``, written by :meth:`Range.write`
    into ``out_dir`` (default: the map's folder) as ``<stem>_range.tif`` and
    ``<stem>_range.gpkg`` (``stem`` defaults to the map's file stem); ``mask`` drops cells
    (:func:`cut_range`)."""
    result = cut_range(map_path, rule, occurrences, band, seed, n_background, mask)
    result.write(out_dir, stem=stem)
    return result


_OUT_HINT = "free some space or choose another --out"


def write_categories(path: Path, codes: np.ndarray, grid: Any, *, nodata: int,
                     palette: dict[int, tuple[int, int, int, int]], description: str,
                     tags: dict[str, str]) -> None:
    """Write ``codes`` (uint8, (y, x)) as a one-band GeoTIFF on the grid of ``grid`` (a Dataset
    or DataArray: its CRS and transform), with a colour table, a band description and ``tags``,
    atomically."""
    import rasterio
    from rasterio.io import MemoryFile

    height, width = codes.shape
    profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                   nodata=nodata, crs=grid.rio.crs, transform=grid.rio.transform(),
                   compress="deflate")
    try:
        # Built in memory and written by Python: a full disk is then one named error, not GDAL's.
        with MemoryFile() as mem:
            with mem.open(**profile) as ds:
                ds.write(codes, 1)
                ds.set_band_description(1, description)
                ds.write_colormap(1, palette)
                ds.update_tags(**tags)
            data = mem.read()
        atomic_write(path, data, hint=_OUT_HINT)
    except DiskFull:
        raise
    except (OSError, rasterio.errors.RasterioError) as exc:
        raise TaxamapError(f"cannot write {path}: {exc}; choose another --out") from None


def _write_polygons(path: Path, polygons: "gpd.GeoDataFrame", rule: str, threshold: float,
                    source: str) -> None:
    import pyogrio
    import shapely

    n = len(polygons)
    geometry = np.array([shapely.to_wkb(p) for p in polygons.geometry], dtype=object)
    # EOO and AOO belong to the whole range: every part carries them.
    field_data = [np.arange(1, n + 1, dtype=np.int32),
                  np.asarray(polygons["area_km2"], dtype=np.float64),
                  np.array([rule] * n, dtype=object), np.full(n, threshold, dtype=np.float64),
                  np.array([source] * n, dtype=object),
                  np.asarray(polygons["eoo_km2"], dtype=np.float64),
                  np.asarray(polygons["aoo_km2"], dtype=np.float64)]
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
