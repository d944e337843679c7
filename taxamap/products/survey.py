"""Where to survey next: cells that are suitable but uncertain or novel, far from every record.

:func:`plan_survey` ranks a map's valid cells and picks sites greedily:

* **priority**: the weighted geometric mean of the cells' percentile ranks (over the valid cells,
  0-1] in each weighted band: ``suitability`` (the map's best suitability band: ``combined``,
  else ``fitted``, else ``fused``), ``uncertainty``, ``novelty`` (by default those of them the
  map has), or any band the map has (``mess`` counts in reverse: the more dissimilar, the
  higher). A geometric mean asks a site to rank well on every weighted band: a novel but
  unsuitable cell is a poor place to look for the species.
* **distance rules**: every site is at least ``min_distance_km`` (geodesic, WGS84) from every
  record and from every other site. Sites are taken best priority first; each pick rules out the
  cells within the distance of it. Neighbours are found on the sphere (scikit-learn's haversine
  ball tree, radius widened by 0.6 %, more than the sphere's error against the ellipsoid) and
  every candidate pair is then measured exactly with pyproj's WGS84 geodesic.
* **valid cell**: a site is the centre of a cell where every weighted band has a value.

A map on which no cell is far enough from the records is refused (TaxamapError), as is a
record set of which no point falls on the map. Fewer than ``n`` sites is a warning.
:func:`write_survey` writes ``<stem>_survey.gpkg`` (points), ``.csv``, ``.gpx`` (waypoints
for field GPS units) and ``.html`` (a folium map), each atomically.
"""

from __future__ import annotations

import html
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option

log = logging.getLogger(__name__)

DEFAULT_N = 50
DEFAULT_MIN_DISTANCE_KM = 10.0
#: Bands that can stand for "suitability", best first.
SUITABILITY_BANDS = ("combined", "fitted", "fused")
#: Trust bands weighted by default when the map has them.
DEFAULT_TRUST_BANDS = ("uncertainty", "novelty")
#: Bands where low values are the interesting ones (ranked in reverse).
REVERSED_BANDS = ("mess",)
#: Mean Earth radius (IUGG), for the haversine neighbour search.
EARTH_RADIUS_KM = 6371.0088
#: The sphere's distances are within 0.56 % of WGS84's geodesics: the search radius is widened
#: by this factor so no pair closer than the limit on the ellipsoid is missed.
SEARCH_MARGIN = 1.006
_OUT_HINT = "free some space or choose another --out"


@dataclass(eq=False)
class SurveyPlan:
    """Picked sites (``sites``: GeoDataFrame, EPSG:4326, one row per site with ``rank``,
    ``lat``, ``lon``, ``priority``, the weighted bands' values and ``nearest_record_km``) and how
    they were chosen."""

    sites: Any = field(repr=False)
    weights: dict[str, float]
    bands: dict[str, str]          # weight name -> band of the map
    min_distance_km: float
    n_requested: int
    n_valid: int                   # valid cells of the map
    n_allowed: int                 # of those, far enough from every record
    records: np.ndarray = field(repr=False)
    map_name: str = ""
    paths: dict[str, Path] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: what was ranked and how."""
        weights = ", ".join(f"{name} ({self.bands[name]}) x{w:g}"
                            for name, w in self.weights.items())
        return (f"{len(self.sites)} of {self.n_requested} sites on {self.map_name}, at least "
                f"{self.min_distance_km:g} km from the {len(self.records):,} records and from "
                f"each other ({self.n_allowed:,} of {self.n_valid:,} valid cells far enough); "
                f"priority = weighted geometric mean of percentile ranks: {weights}")


def parse_weights(weights: str | Sequence[str] | Mapping[str, float] | None,
                  names: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """(weight name -> weight, weight name -> band name) for a map with bands ``names``.

    ``weights``: None (``suitability`` plus whichever of ``uncertainty`` and ``novelty`` the map
    has), ``"suitability,novelty"`` or ``"suitability:2,novelty:1"``, a list of names, or a
    mapping name -> weight. ``suitability`` means the first of :data:`SUITABILITY_BANDS` the
    map has; any other name must be a band of the map."""
    lowered = {str(n).lower(): str(n) for n in names}
    suitability = next((lowered[b] for b in SUITABILITY_BANDS if b in lowered), None)
    if weights is None:
        pairs = [("suitability", 1.0)] + [(b, 1.0) for b in DEFAULT_TRUST_BANDS if b in lowered]
    elif isinstance(weights, Mapping):
        pairs = [(str(k), v) for k, v in weights.items()]
    else:
        parts = weights.split(",") if isinstance(weights, str) else list(weights)
        pairs = []
        for part in parts:
            name, _, value = str(part).partition(":")
            pairs.append((name, value.strip() or 1.0))
    out: dict[str, float] = {}
    bands: dict[str, str] = {}
    for name, value in pairs:
        name = name.strip().lower()
        try:
            w = float(value)
        except (TypeError, ValueError):
            w = math.nan
        if not name or not (math.isfinite(w) and w > 0):
            raise TaxamapError(f"cannot read the survey weight {name or '(empty)'}:{value}; give "
                               f"{option('weights')} as names or name:weight with positive "
                               "weights, e.g. suitability,uncertainty,novelty or "
                               "suitability:2,novelty:1")
        if name == "suitability":
            if suitability is None:
                raise TaxamapError(f"the map has none of the bands {', '.join(SUITABILITY_BANDS)} "
                                   f"to read suitability from; its bands are {', '.join(names)}")
            band = suitability
        elif name in lowered:
            band = lowered[name]
        else:
            raise TaxamapError(f"the map has no band {name!r} to weight; its bands are "
                               f"{', '.join(names)} (and suitability = "
                               f"{suitability or 'none of ' + '/'.join(SUITABILITY_BANDS)})")
        out[name] = out.get(name, 0.0) + w
        bands[name] = band
    return out, bands


def _percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled into (0, 1]: the top value gets 1."""
    from scipy.stats import rankdata

    return rankdata(values, method="average") / values.size


def _unit_xyz(latlon: np.ndarray) -> np.ndarray:
    return np.radians(np.asarray(latlon, dtype=np.float64))


def _geodesic_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """WGS84 geodesic distances (km) between (lat, lon) rows of ``a`` and ``b``."""
    from pyproj import Geod

    if len(a) == 0:
        return np.zeros(0)
    _, _, metres = Geod(ellps="WGS84").inv(a[:, 1], a[:, 0], b[:, 1], b[:, 0])
    return np.asarray(metres) / 1000.0


def _within(tree, points: np.ndarray, candidates: np.ndarray, radius_km: float):
    """(point index, candidate index) pairs closer than ``radius_km`` on the WGS84 ellipsoid."""
    hits = tree.query_radius(_unit_xyz(points), r=radius_km * SEARCH_MARGIN / EARTH_RADIUS_KM)
    counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    if counts.sum() == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    left = np.repeat(np.arange(len(points)), counts)
    right = np.concatenate([np.asarray(h, dtype=np.int64) for h in hits])
    close = _geodesic_km(points[left], candidates[right]) < radius_km
    return left[close], right[close]


def nearest_km(points: np.ndarray, records: np.ndarray) -> np.ndarray:
    """WGS84 geodesic distance (km) from each (lat, lon) point to its nearest record: the
    sphere's nearest neighbours (within its 0.6 % error band) measured on the ellipsoid."""
    from sklearn.neighbors import BallTree

    tree = BallTree(_unit_xyz(records), metric="haversine")
    dist, _ = tree.query(_unit_xyz(points), k=1)
    out = np.empty(len(points))
    hits = tree.query_radius(_unit_xyz(points), r=dist[:, 0] * SEARCH_MARGIN ** 2 + 1e-12)
    for i, h in enumerate(hits):
        h = np.asarray(h, dtype=np.int64)
        out[i] = _geodesic_km(np.repeat(points[i:i + 1], h.size, axis=0), records[h]).min()
    return out


def plan_survey(map_or_path: Any, occurrences: Any, *, n: int = DEFAULT_N,
                min_distance_km: float = DEFAULT_MIN_DISTANCE_KM,
                weights: str | Sequence[str] | Mapping[str, float] | None = None) -> SurveyPlan:
    """Pick up to ``n`` survey sites on a map (a taxamap GeoTIFF path or a (y, x) Dataset) given
    the known records ``occurrences`` (a file, an (N, 2) (lat, lon) array, a table or a
    GeoDataFrame); see the module docstring. TaxamapError for bad input and for a map where no
    cell is far enough from the records."""
    import geopandas as gpd
    import pandas as pd
    from sklearn.neighbors import BallTree

    from taxamap.dataset import (band_name, band_values, cell_centres, map_file,
                                 score_variables, single_map)
    from taxamap.products.evaluate import points_on_map
    from taxamap.products.occurrences import as_latlon_points

    n = int(n)
    if n < 1:
        raise TaxamapError(f"{option('n')} must be at least 1, not {n}")
    try:
        min_distance_km = float(min_distance_km)
    except (TypeError, ValueError):
        raise TaxamapError(f"{option('min-distance')} must be a number of kilometres, not "
                           f"{min_distance_km!r}") from None
    if not (math.isfinite(min_distance_km) and min_distance_km > 0):
        raise TaxamapError(f"{option('min-distance')} must be a positive number of kilometres, "
                           f"not {min_distance_km:g}")
    if occurrences is None:
        raise TaxamapError(f"a survey needs the known records: give "
                           f"{option('occurrences', metavar='FILE')}")
    records = as_latlon_points(occurrences, "occurrences")
    ds = single_map(map_or_path)
    map_name = map_file(ds).name
    points_on_map(ds, records, "occurrences")  # none on the map: one line
    weight, bands = parse_weights(weights, score_variables(ds))

    stack = np.stack([band_values(ds, band_name(ds, bands[name])) for name in weight])
    valid = np.isfinite(stack).all(axis=0)
    rows, cols = np.nonzero(valid)
    if rows.size == 0:
        raise TaxamapError(f"{map_name} has no cell where every weighted band "
                           f"({', '.join(bands.values())}) has a value")
    values = stack[:, rows, cols].astype(np.float64)
    total = sum(weight.values())
    log_priority = np.zeros(rows.size)
    for i, name in enumerate(weight):
        v = -values[i] if bands[name].lower() in REVERSED_BANDS else values[i]
        log_priority += weight[name] / total * np.log(_percentile_ranks(v))
    priority = np.exp(log_priority)
    centres = cell_centres(ds, rows, cols)

    tree = BallTree(_unit_xyz(centres), metric="haversine")
    blocked = np.zeros(rows.size, dtype=bool)
    _, near_record = _within(tree, records, centres, min_distance_km)
    blocked[near_record] = True
    n_allowed = int((~blocked).sum())
    if n_allowed == 0:
        raise TaxamapError(f"no valid cell of {map_name} is {min_distance_km:g} km or "
                           f"more from every one of the {len(records):,} records; lower "
                           f"{option('min-distance')}")
    picked: list[int] = []
    for i in np.argsort(-priority, kind="stable"):
        if blocked[i]:
            continue
        picked.append(int(i))
        if len(picked) == n:
            break
        _, close = _within(tree, centres[i:i + 1], centres, min_distance_km)
        blocked[close] = True
        blocked[i] = True
    picked_arr = np.asarray(picked, dtype=np.int64)
    if len(picked) < n:
        log.warning("survey: only %d of the %d sites fit %g km apart and from the records; "
                    "lower %s for more", len(picked), n, min_distance_km, option("min-distance"))
    site_latlon = centres[picked_arr]
    table = pd.DataFrame({"rank": np.arange(1, len(picked) + 1), "lat": site_latlon[:, 0],
                          "lon": site_latlon[:, 1], "priority": priority[picked_arr]})
    for i, name in enumerate(weight):
        table[bands[name]] = values[i, picked_arr]
    table["nearest_record_km"] = nearest_km(site_latlon, records)
    sites = gpd.GeoDataFrame(table, geometry=gpd.points_from_xy(table.lon, table.lat),
                             crs="EPSG:4326")
    return SurveyPlan(sites, weight, bands, min_distance_km, n, int(rows.size), n_allowed,
                      records, map_name)


def write_survey(plan: SurveyPlan, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write ``<stem>_survey.gpkg``, ``.csv``, ``.gpx`` and ``.html`` into ``out_dir``; returns
    their paths (also kept in ``plan.paths``)."""
    from taxamap.io import atomic_path, atomic_write, out_folder

    out_dir = out_folder(out_dir, option("out", metavar="DIR"))
    paths = {ext: out_dir / f"{stem}_survey.{ext}" for ext in ("gpkg", "csv", "gpx", "html")}
    sites = plan.sites
    try:
        with atomic_path(paths["gpkg"], hint=_OUT_HINT, create=False) as tmp:
            sites.to_file(tmp, driver="GPKG", layer="survey_sites", engine="pyogrio")
    except Exception as exc:
        if isinstance(exc, TaxamapError):
            raise
        raise TaxamapError(f"cannot write {paths['gpkg']}: {exc}; choose another --out") from None
    atomic_write(paths["csv"], sites.drop(columns="geometry").to_csv(index=False,
                                                                     float_format="%.6g"),
                 hint=_OUT_HINT)
    atomic_write(paths["gpx"], survey_gpx(plan), hint=_OUT_HINT)
    atomic_write(paths["html"], survey_html(plan), hint=_OUT_HINT)
    plan.paths = paths
    return paths


def _site_text(row, plan: SurveyPlan) -> str:
    parts = [f"rank {int(row['rank'])}", f"priority {row['priority']:.3f}"]
    parts += [f"{band} {row[band]:.4g}" for band in plan.bands.values()]
    parts.append(f"nearest record {row['nearest_record_km']:.1f} km")
    return "; ".join(parts)


def survey_gpx(plan: SurveyPlan) -> str:
    """GPX 1.1 with one waypoint per site (name ``site 01``..., the scores in ``desc``)."""
    import xml.etree.ElementTree as ET

    ns = "http://www.topografix.com/GPX/1/1"
    ET.register_namespace("", ns)
    root = ET.Element(f"{{{ns}}}gpx", {"version": "1.1", "creator": "taxamap survey"})
    meta = ET.SubElement(root, f"{{{ns}}}metadata")
    ET.SubElement(meta, f"{{{ns}}}name").text = f"survey sites on {plan.map_name}"
    ET.SubElement(meta, f"{{{ns}}}desc").text = plan.describe()
    width = len(str(len(plan.sites)))
    for row in plan.sites.to_dict("records"):
        wpt = ET.SubElement(root, f"{{{ns}}}wpt",
                            {"lat": f"{row['lat']:.6f}", "lon": f"{row['lon']:.6f}"})
        ET.SubElement(wpt, f"{{{ns}}}name").text = f"site {int(row['rank']):0{width}d}"
        ET.SubElement(wpt, f"{{{ns}}}desc").text = _site_text(row, plan)
        ET.SubElement(wpt, f"{{{ns}}}sym").text = "Flag, Blue"
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def survey_html(plan: SurveyPlan) -> str:
    """A folium map: the sites (numbered, popups with their scores) over OpenStreetMap, the
    records as small grey points (a sample when there are very many)."""
    import folium

    from taxamap.writers.html import drawn_sample

    m = folium.Map(tiles="OpenStreetMap", control_scale=True, prefer_canvas=True)
    records = drawn_sample(plan.records)
    layer = folium.FeatureGroup(name=f"records ({len(plan.records):,}"
                                     f"{', sample drawn' if len(records) < len(plan.records) else ''})")
    for lat, lon in records:
        folium.CircleMarker((float(lat), float(lon)), radius=2, color="#555555", weight=1,
                            fill=True, fill_opacity=0.6).add_to(layer)
    layer.add_to(m)
    sites = folium.FeatureGroup(name=f"survey sites ({len(plan.sites)})")
    for row in plan.sites.to_dict("records"):
        text = html.escape(_site_text(row, plan))
        folium.CircleMarker((row["lat"], row["lon"]), radius=7, color="#b2182b", weight=2,
                            fill=True, fill_color="#ef8a62", fill_opacity=0.9,
                            tooltip=f"site {int(row['rank'])}", popup=folium.Popup(text)).add_to(sites)
    sites.add_to(m)
    folium.LayerControl(collapsed=False).add_to(m)
    lat = np.r_[plan.sites["lat"].to_numpy(), records[:, 0]]
    lon = np.r_[plan.sites["lon"].to_numpy(), records[:, 1]]
    m.fit_bounds([[float(lat.min()), float(lon.min())], [float(lat.max()), float(lon.max())]])
    legend = (f"<div style='position:fixed;bottom:20px;left:10px;z-index:1000;background:white;"
              f"padding:6px 10px;border:1px solid #999;font:12px sans-serif;max-width:420px'>"
              f"<b>Where to survey next</b><br>{html.escape(plan.describe())}. Red: sites (rank "
              f"in the tooltip); grey: known records. The page loads its map from the internet."
              f"</div>")
    m.get_root().html.add_child(folium.Element(legend))
    m.get_root().header.add_child(folium.Element(
        f"<title>taxamap survey: {html.escape(plan.map_name)}</title>"))
    return m.get_root().render()


def survey_map(map_or_path: Any, occurrences: Any, *, n: int = DEFAULT_N,
               min_distance_km: float = DEFAULT_MIN_DISTANCE_KM,
               weights: str | Sequence[str] | Mapping[str, float] | None = None,
               out_dir: str | os.PathLike | None = None, stem: str | None = None) -> SurveyPlan:
    """:func:`plan_survey`, then with ``out_dir`` (or for a map file, default: its folder) the
    four files of :func:`write_survey` named after ``stem`` (default: the map's file stem)."""
    plan = plan_survey(map_or_path, occurrences, n=n, min_distance_km=min_distance_km,
                       weights=weights)
    is_file = isinstance(map_or_path, (str, os.PathLike))
    if out_dir is None and is_file:
        out_dir = Path(map_or_path).expanduser().parent
    if out_dir is not None:
        stem = stem or (Path(map_or_path).stem if is_file else Path(plan.map_name).stem)
        write_survey(plan, out_dir, stem)
    return plan
