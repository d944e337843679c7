"""IUCN Red List range metrics of a range map: extent of occurrence (EOO) and area of occupancy (AOO).

* **EOO** (IUCN criterion B1): the area of the minimum convex polygon (convex hull) around the
  range. The hull is taken in a longitude frame where the range is contiguous (cut at the widest
  empty stretch of longitude, so a range across the antimeridian is one piece, not a hull around
  the whole globe); its area is measured on the WGS84 ellipsoid with :class:`pyproj.Geod`, edges
  as geodesics. When the hull comes out smaller than the AOO (a thin or small range on the 2 km
  grid), EOO is raised to the AOO, as the IUCN Red List Guidelines (section 4.9) direct so that
  the AOO stays an area within the EOO; the hull's own area is kept beside it.
* **AOO** (criterion B2): 4 km2 x the number of cells of the IUCN reference grid, 2 km x 2 km, that
  the range intersects. The grid is laid in the equal-area EASE-Grid 2.0 projection
  (EPSG:6933), anchored at the projection's origin so two maps share cells.

:func:`criterion_b` says which area thresholds of criterion B these values fall under
(EOO < 100 / 5,000 / 20,000 km2; AOO < 10 / 500 / 2,000 km2 for CR / EN / VU). Meeting an area
threshold is one of the conditions of criterion B; the others (severe fragmentation or few
locations, continuing decline, extreme fluctuations) are not assessed here, so the text never
states a listing. An empty range, or one of a single map cell (whose EOO and AOO are the cell's
own size, set by the map's resolution), gets no area threshold at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from taxamap.crs import wrap_longitudes

#: Side of the AOO reference grid cells in metres (IUCN's 2 km x 2 km) and its projection.
AOO_CELL_M = 2000.0
AOO_CRS = "EPSG:6933"

#: Criterion B area thresholds (km2), most severe first: (category, EOO B1, AOO B2).
B_THRESHOLDS = (
    ("Critically Endangered", 100.0, 10.0),
    ("Endangered", 5000.0, 500.0),
    ("Vulnerable", 20000.0, 2000.0),
)

#: Largest raster strip rasterised at once when counting AOO cells (bytes of uint8).
_STRIP_PIXELS = 32_000_000


@dataclass(frozen=True)
class RangeMetrics:
    """EOO (raised to the AOO when the hull is smaller) and AOO of a range (km2), the hull's own
    area, the number of map cells in the range (None: unknown), and the criterion B sentence."""

    eoo_km2: float
    aoo_km2: float
    hull_km2: float = math.nan
    n_cells: int | None = None

    @property
    def criterion_b(self) -> str:
        hull = self.hull_km2 if math.isfinite(self.hull_km2) else self.eoo_km2
        return criterion_b(hull, self.aoo_km2, self.n_cells)


def contiguous_longitudes(lon: np.ndarray) -> np.ndarray:
    """``lon`` (degrees, any frame) moved by whole turns so the values are contiguous: the frame
    starts just after the widest empty stretch of longitude on the circle. A range across the
    antimeridian (e.g. 175..180 and -180..-175) comes out as 175..185."""
    lon = np.asarray(lon, dtype=np.float64)
    if lon.size == 0:
        return lon
    wrapped = np.mod(lon, 360.0)
    unique = np.unique(wrapped)
    if unique.size == 1:
        return wrapped
    gaps = np.diff(np.r_[unique, unique[0] + 360.0])
    start = unique[(int(np.argmax(gaps)) + 1) % unique.size]
    return start + np.mod(wrapped - start, 360.0)


def eoo_km2(geom) -> float:
    """Extent of occurrence (km2): geodesic area of the convex hull of ``geom`` (lon/lat degrees,
    EPSG:4326, any longitude frame); 0 for an empty range or one without area (points, a line)."""
    import shapely
    from pyproj import Geod

    if geom is None or geom.is_empty:
        return 0.0
    xy = shapely.get_coordinates(geom)
    if xy.shape[0] < 3:
        return 0.0
    hull = shapely.MultiPoint(np.column_stack([contiguous_longitudes(xy[:, 0]), xy[:, 1]]))
    hull = hull.convex_hull
    if hull.geom_type != "Polygon":
        return 0.0
    area, _ = Geod(ellps="WGS84").geometry_area_perimeter(hull)
    return abs(float(area)) / 1e6


def aoo_km2(geom, cell_m: float = AOO_CELL_M) -> float:
    """Area of occupancy (km2): (cell area) x the number of ``cell_m`` x ``cell_m`` cells of a grid
    in EPSG:6933 anchored at (0, 0) that ``geom`` (lon/lat degrees, any longitude frame) intersects.

    Cells are found by rasterising the projected range with GDAL's all-touched rule (every cell
    the outline passes through counts, as well as those inside), strip by strip so memory stays
    bounded for continent-sized ranges. Edges are densified to 0.05 degrees before projecting.
    """
    import shapely
    from pyproj import Transformer
    from rasterio.features import rasterize
    from rasterio.transform import Affine

    if geom is None or geom.is_empty:
        return 0.0
    polygons = wrap_longitudes(geom)
    if polygons.is_empty:
        return 0.0
    to_ease = Transformer.from_crs("EPSG:4326", AOO_CRS, always_xy=True)

    def project(xy: np.ndarray) -> np.ndarray:
        # EASE-Grid 2.0 is defined to +/-85.04 degrees; clamp so polar ranges stay finite.
        x, y = to_ease.transform(xy[:, 0], np.clip(xy[:, 1], -85.0445, 85.0445))
        return np.column_stack([x, y])

    projected = shapely.transform(shapely.segmentize(polygons, 0.05), project)
    minx, miny, maxx, maxy = projected.bounds
    col0, col1 = math.floor(minx / cell_m), math.ceil(maxx / cell_m)
    row0, row1 = math.floor(miny / cell_m), math.ceil(maxy / cell_m)
    width = max(1, col1 - col0)
    strip = max(1, _STRIP_PIXELS // width)
    count = 0
    for top in range(row1, row0, -strip):
        rows = min(strip, top - row0)
        transform = Affine(cell_m, 0.0, col0 * cell_m, 0.0, -cell_m, top * cell_m)
        burned = rasterize([(projected, 1)], out_shape=(rows, width), transform=transform,
                           fill=0, all_touched=True, dtype="uint8")
        count += int(np.count_nonzero(burned))
    return count * (cell_m / 1000.0) ** 2


def range_metrics(geom, n_cells: int | None = None) -> RangeMetrics:
    """EOO and AOO of a range geometry (lon/lat degrees, EPSG:4326) made of ``n_cells`` map
    cells; EOO is the hull's area raised to the AOO when smaller (IUCN guidelines, 4.9)."""
    hull, aoo = eoo_km2(geom), aoo_km2(geom)
    return RangeMetrics(max(hull, aoo), aoo, hull, n_cells)


def _km2(value: float) -> str:
    return f"{value:,.0f} km2" if value >= 10 else f"{value:,.1f} km2"


def criterion_b(eoo: float, aoo: float, n_cells: int | None = None) -> str:
    """One sentence on the criterion B area thresholds that EOO and AOO (km2) fall under, e.g.
    "EOO 3,120 km2 meets the B1 area threshold for Endangered (< 5,000 km2); ...". States area
    thresholds only, never a listing (the other conditions of criterion B are not assessed).

    An EOO below the AOO is raised to it first (and the sentence says so). A range that is empty
    (no AOO, or ``n_cells`` 0) or one map cell (``n_cells`` 1) gets no area threshold: its
    figures measure the map's cell, not the species.
    """
    if n_cells == 0 or not aoo > 0:
        return ("The range is empty: it has no EOO or AOO, so no criterion B area threshold "
                "applies.")
    if n_cells == 1:
        return (f"The range is a single map cell: its EOO ({_km2(max(eoo, aoo))}) and AOO "
                f"({_km2(aoo)}) are that cell's own size, set by the map's resolution rather than "
                "by the species, so no criterion B area threshold is stated; cut the map at a "
                "lower threshold or map it at a finer resolution.")
    raised = f" (the hull's {_km2(eoo)} raised to the AOO, per IUCN's guidelines)" if eoo < aoo else ""
    eoo = max(eoo, aoo)
    parts = []
    for label, sub, value, column in (("EOO", "B1", eoo, 1), ("AOO", "B2", aoo, 2)):
        note = raised if label == "EOO" else ""
        met = next((row for row in B_THRESHOLDS if value < row[column]), None)
        if met is None:
            limit = B_THRESHOLDS[-1][column]
            parts.append(f"{label} {_km2(value)}{note} is above the {sub} area thresholds "
                         f"(Vulnerable: < {limit:,.0f} km2)")
        else:
            parts.append(f"{label} {_km2(value)}{note} meets the {sub} area threshold for "
                         f"{met[0]} (< {met[column]:,.0f} km2)")
    return ("; ".join(parts) + ". Area thresholds only: the other conditions of criterion B "
            "(fragmentation or locations, continuing decline, extreme fluctuations) are not "
            "assessed, so this is not a Red List category.")
