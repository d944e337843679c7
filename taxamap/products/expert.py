"""Compare a map with an expert range: the H3 protocol of SINR / LE-SINR.

The cells are every H3 cell (resolution :data:`H3_RESOLUTION` = 5, ~253 km2) whose centre falls on
a valid map cell; the label of a cell is whether its centre lies inside the expert range
polygons; its score is the map's value at the centre (the map cell holding it). Per band:

* ``range_ap``: average precision (scikit-learn's ``average_precision_score``) and ``range_auc``:
  ROC-AUC of the scores against the labels;
* for a threshold rule (default :data:`DEFAULT_RULE`, the threshold of the band's values that
  maximises F1 on these cells, an optimistic "best F1" as peers report it; or ``percentile:P``,
  ``value:V``, ``maxtss[:OCC_FILE]`` as for range maps), with cells ``value >= threshold``
  predicted in range: ``precision``, ``recall``, ``f1`` and ``jaccard`` (TP / (TP + FP + FN));
* ``n_h3_cells`` (cells on a valid cell of that band) and ``n_h3_positive`` (of those, inside the
  expert range).

:func:`agreement` lays the comparison back on the map's own grid (1 = both, 2 = map only or
commission, 3 = expert only or omission, 0 = nodata: neither, or off the map), and
:func:`write_agreement` writes it as a uint8 GeoTIFF with a colour table and a QGIS style file
beside it (QGIS loads ``<name>.qml`` with ``<name>.tif``).

H3 cells are enumerated tile by tile (boxes of :data:`TILE_DEG` degrees that touch a valid map
cell, within [-180, 180]), so a map across the antimeridian or a continent-sized one costs a few
seconds (the contiguous USA is ~35 k cells at resolution 5).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from taxamap.crs import polygon_parts
from taxamap.dataset import (
    band_name,
    band_values,
    cell_centres,
    map_file,
    sample_points,
    score_variables,
    single_map,
)
from taxamap.errors import TaxamapError
from taxamap.products.evaluate import json_value, text_table, write_file

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

H3_RESOLUTION = 5
TILE_DEG = 10.0
DEFAULT_RULE = "maxf1"
RULE_HELP = ("maxf1 (the threshold maximising F1 on the H3 cells), percentile:P, value:V or "
             "maxtss:OCC_FILE")

#: Agreement raster values, colours (RGBA) and labels.
AGREEMENT = {
    1: ((27, 120, 55, 255), "both: map and expert range"),
    2: ((230, 97, 1, 255), "map only (commission)"),
    3: ((94, 60, 153, 255), "expert only (omission)"),
}
AGREEMENT_NODATA = 0

#: Columns of :attr:`RangeComparison.table`, in order.
COLUMNS = ("band", "rule", "threshold", "range_ap", "range_auc", "precision", "recall", "f1",
           "jaccard", "n_h3_cells", "n_h3_positive")


def read_expert_range(source: Any):
    """The polygons of an expert range as one shapely MultiPolygon in EPSG:4326.

    ``source``: a vector file in any CRS (GeoPackage, Shapefile, GeoJSON, ...; every layer
    feature is used), a GeoDataFrame / GeoSeries with a CRS, or a shapely geometry taken as
    EPSG:4326 lon/lat. A file without a CRS, or without any polygon, is refused (one line).
    """
    import shapely

    if isinstance(source, shapely.Geometry):
        geom, name = source, "the expert geometry"
    else:
        geom, name = _read_vector_range(source)
    polygons = polygon_parts(shapely.make_valid(geom))
    if polygons.is_empty or polygons.area <= 0:
        raise TaxamapError(f"{name} holds no polygons; an expert range must be polygons (not "
                           "points or lines)")
    return polygons


def _read_vector_range(source: Any):
    import geopandas as gpd
    import shapely

    if isinstance(source, (gpd.GeoDataFrame, gpd.GeoSeries)):
        frame, name = source, "the expert GeoDataFrame"
    else:
        path = Path(source).expanduser()
        name = f"expert range {path}"
        if not path.exists():
            raise TaxamapError(f"{name} not found; check the path")
        try:
            frame = gpd.read_file(path)
        except Exception as exc:  # pyogrio / GDAL errors: unreadable or not a vector file
            message = " ".join(str(exc).split())[:200]
            raise TaxamapError(f"cannot read {name}: {message}; give a GeoPackage, Shapefile "
                               "or GeoJSON of polygons") from None
    if frame.crs is None:
        raise TaxamapError(f"{name} has no CRS; save it with one (e.g. EPSG:4326) so its "
                           "coordinates can be placed")
    geoms = frame.geometry if isinstance(frame, gpd.GeoDataFrame) else frame
    geoms = geoms[geoms.notna() & ~geoms.is_empty]
    if len(geoms) == 0:
        raise TaxamapError(f"{name} holds no polygons (no features with a geometry)")
    if not geoms.crs.equals("EPSG:4326"):
        geoms = geoms.to_crs("EPSG:4326")
    return shapely.union_all(np.asarray(geoms.values)), name


def _tiles(ds: "xr.Dataset") -> list[tuple[float, float]]:
    """(west, south) of the :data:`TILE_DEG` tiles, within [-180, 180), that touch a valid cell."""
    valid = np.zeros((ds.sizes["y"], ds.sizes["x"]), dtype=bool)
    for name in score_variables(ds):
        valid |= np.isfinite(band_values(ds, name))
    t, crs = ds.rio.transform(), ds.rio.crs
    height, width = valid.shape
    geographic = bool(getattr(crs, "is_geographic", False))
    if not geographic or t.b != 0 or t.d != 0:
        from rasterio.warp import transform_bounds

        west, south, east, north = transform_bounds(
            crs, "EPSG:4326", t.c, t.f + t.e * height, t.c + t.a * width, t.f, densify_pts=51)
        if east < west:
            east += 360.0
        boxes = [(x, y) for y in np.arange(math.floor(south / TILE_DEG) * TILE_DEG, north,
                                           TILE_DEG)
                 for x in np.arange(math.floor(west / TILE_DEG) * TILE_DEG, east, TILE_DEG)]
    else:
        lon_w = t.c + t.a * np.arange(width)
        lat_n = t.f + t.e * np.arange(height)
        tx0 = np.floor(lon_w / TILE_DEG).astype(int)
        tx1 = np.floor((lon_w + t.a) / TILE_DEG - 1e-9).astype(int)
        ty0 = np.floor((lat_n + t.e) / TILE_DEG).astype(int)
        ty1 = np.floor(lat_n / TILE_DEG - 1e-9).astype(int)
        boxes = set()
        for ty in range(int(ty0.min()), int(ty1.max()) + 1):
            rows = (ty0 <= ty) & (ty1 >= ty)
            if not rows.any():
                continue
            cols = np.flatnonzero(valid[rows].any(axis=0))
            # A cell is at most 10 degrees wide (the grid's limit): it touches tiles tx0..tx1,
            # at most two, so the two ends name them all.
            for tx in np.unique(np.r_[tx0[cols], tx1[cols]]):
                boxes.add((float(tx) * TILE_DEG, ty * TILE_DEG))
        boxes = sorted(boxes)
    tiles = set()
    for x, y in boxes:
        if y >= 90 or y + TILE_DEG <= -90:
            continue
        tiles.add(((x + 180.0) % 360.0 - 180.0, y))
    return sorted(tiles)


def h3_cells_on_map(ds: "xr.Dataset", resolution: int = H3_RESOLUTION):
    """(H3 cell ids, (M, 2) (lat, lon) of their centres, (bands, M) map values there) of every
    H3 cell whose centre falls on a cell valid in at least one band of the (y, x) map ``ds``."""
    import h3

    ids: set[str] = set()
    for west, south in _tiles(ds):
        north = min(south + TILE_DEG, 90.0)
        south = max(south, -90.0)
        east = west + TILE_DEG
        poly = h3.LatLngPoly([(south, west), (south, east), (north, east), (north, west)])
        ids.update(h3.polygon_to_cells(poly, resolution))
    cells = np.array(sorted(ids), dtype=object)
    if cells.size == 0:
        return cells, np.empty((0, 2)), np.empty((len(score_variables(ds)), 0))
    latlon = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64)
    values, _ = sample_points(ds, latlon)
    keep = np.isfinite(values).any(axis=0)
    return cells[keep], latlon[keep], values[:, keep]


def inside_range(expert, latlon: np.ndarray) -> np.ndarray:
    """Whether each (lat, lon) point lies inside the expert polygons (also tried one turn over,
    for polygons written past +/-180 degrees)."""
    import shapely

    lat, lon = latlon[:, 0], latlon[:, 1]
    shapely.prepare(expert)
    out = np.zeros(lat.shape[0], dtype=bool)
    for shift in (0.0, 360.0, -360.0):
        out |= shapely.contains_xy(expert, lon + shift, lat)
    return out


def max_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold (``value >= t`` predicted in range) maximising F1 on these cells
    (from scikit-learn's precision-recall curve); of equally good thresholds the highest."""
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels, dtype=bool)
    if not labels.any():
        return math.nan
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The curve's last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2.0 * precision * recall / (precision + recall))
    # Equal F1 values may differ in the last bit (two divisions): ties within 1e-12 go to the
    # highest threshold. Thresholds come in increasing order.
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]
    return float(thresholds[best])


def confusion_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """precision, recall, f1 and jaccard of a binary prediction (NaN where undefined)."""
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    tp = float((predicted & labels).sum())
    fp = float((predicted & ~labels).sum())
    fn = float((~predicted & labels).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "jaccard": ratio(tp, tp + fp + fn)}


@dataclass(eq=False)
class RangeComparison:
    """A map against an expert range on H3 cells.

    ``table``: a DataFrame with a row per band and the columns :data:`COLUMNS`; ``cells``: one
    row per H3 cell (``h3``, ``lat``, ``lon``, ``expert`` and each band's value); ``thresholds``:
    band -> threshold used; ``paths``: files written (agreement raster and style).
    """

    table: Any = field(repr=False)
    cells: Any = field(repr=False)
    thresholds: dict[str, float]
    rule: str
    map_path: str
    expert_name: str
    expert: Any = field(repr=False, default=None)
    paths: dict[str, Path] = field(default_factory=dict)

    def to_records(self) -> list[dict[str, Any]]:
        """The table as JSON-ready records (NaN as None)."""
        return [{k: json_value(v) for k, v in rec.items()}
                for rec in self.table.to_dict("records")]

    def format_table(self) -> str:
        lines = [f"map: {self.map_path}",
                 f"expert range: {self.expert_name}; H3 resolution {H3_RESOLUTION} cells whose "
                 f"centre is on the map; threshold rule {self.rule}"]
        header = ("band", "cells", "in range", "AP", "AUC", "threshold", "precision", "recall",
                  "F1", "Jaccard")
        rows = [header]
        for r in self.table.itertuples(index=False):
            rows.append((r.band, f"{r.n_h3_cells:,}", f"{r.n_h3_positive:,}", _fmt(r.range_ap),
                         _fmt(r.range_auc), _fmt(r.threshold, 4), _fmt(r.precision),
                         _fmt(r.recall), _fmt(r.f1), _fmt(r.jaccard)))
        return "\n".join(lines + text_table(rows))


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def band_threshold(ds: "xr.Dataset", band: str, rule: str, scores: np.ndarray,
                   labels: np.ndarray, occurrences: Any = None, seed: int = 0) -> float:
    """The threshold ``rule`` gives ``band``: :data:`DEFAULT_RULE` on the H3 cells'
    ``scores``/``labels``, any range rule (:func:`taxamap.products.ranges.parse_rule`) on the map."""
    if str(rule).strip().lower() == DEFAULT_RULE:
        return max_f1_threshold(scores, labels)
    from taxamap.products.ranges import compute_threshold, parse_rule

    return compute_threshold(ds, parse_rule(rule), band, occurrences, seed)


def compare_range(
    map_or_path: Any,
    expert: Any,
    *,
    rule: str = DEFAULT_RULE,
    bands: Sequence[int | str] | None = None,
    occurrences: Any = None,
    seed: int = 0,
    resolution: int = H3_RESOLUTION,
) -> RangeComparison:
    """Compare every band (or ``bands``) of a (y, x) map (a score Dataset or a GeoTIFF path)
    with an expert range (module docstring).

    ``expert``: a vector file, GeoDataFrame or shapely geometry (:func:`read_expert_range`).
    ``occurrences`` / ``seed`` serve a bare ``maxtss`` rule. TaxamapError when no H3 cell
    centre falls on the map, or none of them inside the expert range.
    """
    import pandas as pd
    from sklearn.metrics import average_precision_score, roc_auc_score

    ds = single_map(map_or_path)
    expert_name = (Path(expert).name if isinstance(expert, (str, os.PathLike))
                   else type(expert).__name__)
    polygons = read_expert_range(expert)
    rule = str(rule).strip() or DEFAULT_RULE
    if rule.lower() != DEFAULT_RULE:
        from taxamap.products.ranges import parse_rule

        parse_rule(rule)  # a bad rule fails before any work
    ids, latlon, values = h3_cells_on_map(ds, resolution)
    if ids.size == 0:
        raise TaxamapError(f"no H3 resolution-{resolution} cell centre falls on a valid cell of "
                           f"{map_file(ds).name}; the map is smaller than an H3 cell (~253 km2)")
    labels = inside_range(polygons, latlon)
    if not labels.any():
        raise TaxamapError(f"none of the {ids.size:,} H3 cells on the map lies inside the expert "
                           f"range {expert_name}; check that it is the right species and region "
                           "and that its CRS is right")
    names = score_variables(ds)
    indices = (range(len(names)) if bands is None
               else [names.index(band_name(ds, b)) for b in bands])
    records, thresholds = [], {}
    for i in indices:
        scores = values[i]
        ok = np.isfinite(scores)
        s, y = scores[ok], labels[ok]
        both = 0 < y.sum() < y.size
        threshold = band_threshold(ds, names[i], rule, s, y, occurrences, seed)
        thresholds[names[i]] = threshold
        with np.errstate(invalid="ignore"):
            metrics = confusion_metrics(s >= threshold, y)
        records.append({
            "band": names[i], "rule": rule, "threshold": threshold,
            "range_ap": float(average_precision_score(y, s)) if both else math.nan,
            "range_auc": float(roc_auc_score(y, s)) if both else math.nan,
            **metrics, "n_h3_cells": int(ok.sum()), "n_h3_positive": int(y.sum()),
        })
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    cells = pd.DataFrame({"h3": ids, "lat": latlon[:, 0], "lon": latlon[:, 1],
                          "expert": labels,
                          **{names[i]: values[i] for i in indices}})
    return RangeComparison(table, cells, thresholds, rule, str(map_file(ds)), expert_name,
                           polygons)


def agreement(ds: "xr.Dataset", band: str, threshold: float, expert) -> np.ndarray:
    """(height, width) uint8 on the map's grid: 1 = map and expert, 2 = map only (commission),
    3 = expert only (omission), 0 = neither or off the map (nodata). The expert side is whether
    the cell's centre lies inside the expert polygons."""
    values = band_values(ds, band)
    valid = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    rows, cols = np.nonzero(valid)
    if rows.size == 0:
        return out
    in_expert = inside_range(expert, cell_centres(ds, rows, cols))
    in_map = values[rows, cols] >= threshold
    out[rows, cols] = np.where(in_map & in_expert, 1, np.where(in_map, 2,
                               np.where(in_expert, 3, AGREEMENT_NODATA)))
    return out


def agreement_qml() -> str:
    """A QGIS style (paletted renderer) for the agreement raster, with the category labels."""
    entries = "\n".join(
        f'        <paletteEntry value="{v}" color="#{c[0]:02x}{c[1]:02x}{c[2]:02x}" '
        f'alpha="{c[3]}" label="{label}"/>' for v, (c, label) in AGREEMENT.items())
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            '<qgis version="3.28" styleCategories="AllStyleCategories">\n  <pipe>\n'
            '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1">\n'
            f"      <colorPalette>\n{entries}\n      </colorPalette>\n"
            "    </rasterrenderer>\n  </pipe>\n</qgis>\n")


def write_agreement(path: str | os.PathLike, ds: "xr.Dataset", codes: np.ndarray,
                    tags: dict[str, str]) -> dict[str, Path]:
    """Write the agreement raster (uint8 GeoTIFF on the map's grid, nodata 0, colour table, the
    category labels in tags) and its QGIS style ``<stem>.qml``, atomically; returns both paths."""
    from taxamap.products.ranges import write_categories

    path = Path(path).expanduser()
    labels = "; ".join(f"{v} = {label}" for v, (_, label) in AGREEMENT.items())
    palette = {AGREEMENT_NODATA: (0, 0, 0, 0), **{v: c for v, (c, _) in AGREEMENT.items()}}
    write_categories(path, codes, ds, nodata=AGREEMENT_NODATA, palette=palette,
                     description="agreement",
                     tags={**tags, "VALUES": f"{labels}; 0 = nodata (neither, or off the map)"})
    style = write_file(path.with_suffix(".qml"), agreement_qml().encode("utf-8"))
    return {"agreement.tif": path, "agreement.qml": style}


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as JSON (NaN refused: give None), atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return write_file(path, text.encode("utf-8"))


def compare_files(
    map_path: str | os.PathLike,
    range_path: str | os.PathLike,
    *,
    rule: str = DEFAULT_RULE,
    band: int | str = 1,
    out_dir: str | os.PathLike | None = None,
    occurrences: Any = None,
    seed: int = 0,
) -> RangeComparison:
    """``taxamap evaluate MAP --range EXPERT``: compare every band; with ``out_dir``, also write
    ``<map stem>_agreement.tif`` (+ ``.qml``) for ``band`` (number or name, default the fused
    score) there."""
    ds = single_map(map_path)
    comparison = compare_range(ds, range_path, rule=rule, occurrences=occurrences, seed=seed)
    if out_dir is not None:
        name = band_name(ds, band)
        threshold = comparison.thresholds[name]
        codes = agreement(ds, name, threshold, comparison.expert)
        source = map_file(ds)
        tags = {"SOURCE_MAP": source.name, "SOURCE_BAND": name,
                "EXPERT_RANGE": comparison.expert_name, "RULE": comparison.rule,
                "THRESHOLD": repr(threshold)}
        out = Path(out_dir).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TaxamapError(f"cannot create {out}: {exc.strerror or exc}; choose another "
                               "--out") from None
        comparison.paths = write_agreement(out / f"{source.stem}_agreement.tif", ds, codes,
                                           tags)
    return comparison
