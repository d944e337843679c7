"""Coordinate reference systems and longitudes: the one place taxamap converts between a CRS
and longitude/latitude (pyproj), and wraps longitudes (of points, and of polygons that run past
the antimeridian).

Everything inside taxamap is EPSG:4326 (lon, lat) degrees; users' files, GeoDataFrames and maps
may be in any CRS and meet these helpers at the boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from taxamap.errors import TaxamapError

WGS84 = "EPSG:4326"


def wrap_lon(lon):
    """Longitudes wrapped into [-180, 180)."""
    return (np.asarray(lon, dtype=float) + 180.0) % 360.0 - 180.0


def wrap_longitudes(geom):
    """``geom`` (lon/lat degrees, possibly past +/-180 as grids across the antimeridian are) cut at
    the antimeridian and moved into [-180, 180]; polygons only (a MultiPolygon)."""
    import shapely

    if geom.is_empty:
        return polygon_parts(geom)
    west, _, east, _ = geom.bounds
    if west >= -180 and east <= 180:
        return polygon_parts(geom)
    pieces = []
    for shift in (-360.0, 0.0, 360.0):
        window = shapely.box(-180 - shift, -90, 180 - shift, 90)
        part = shapely.intersection(geom, window)
        if not part.is_empty:
            pieces.append(shapely.transform(part, lambda xy, s=shift: xy + np.array([s, 0.0])))
    return polygon_parts(shapely.make_valid(shapely.union_all(pieces)))


def polygon_parts(geom):
    """The polygon parts of any geometry (collections flattened, lines and points dropped) as one
    MultiPolygon."""
    import shapely

    parts = []
    for part in shapely.get_parts(geom):
        if part.geom_type == "Polygon" and not part.is_empty:
            parts.append(part)
        elif part.geom_type in ("MultiPolygon", "GeometryCollection"):
            parts.extend(p for p in shapely.get_parts(polygon_parts(part).geoms))
    return shapely.MultiPolygon(parts)


def clip_wrapped(geom, bounds: tuple[float, float, float, float], kind: str) -> list:
    """The parts of type ``kind`` ("Polygon", "LineString") of lon/lat ``geom`` inside ``bounds``
    (west, south, east, north), where west may be below -180 and east above 180: copies of
    ``geom`` shifted by 360 degrees fill those parts, so a map across the antimeridian is whole."""
    import shapely
    from shapely import affinity

    west, south, east, north = bounds
    parts = []
    for shift in (-360.0, 0.0, 360.0):
        if west - shift < 180.0 and east - shift > -180.0:
            moved = geom if shift == 0 else affinity.translate(geom, xoff=shift)
            parts.extend(p for p in shapely.get_parts(
                shapely.clip_by_rect(moved, west, south, east, north))
                if p.geom_type == kind and not p.is_empty)
    return parts


def as_crs(crs: Any, what: str = "the data"):
    """A ``pyproj.CRS`` from an EPSG code, WKT, a rasterio/pyproj CRS or a user string; a
    TaxamapError saying how to fix it otherwise."""
    from pyproj import CRS

    try:
        return CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception:
        raise TaxamapError(f"{what} has a CRS that cannot be understood; save it in EPSG:4326 "
                           "or another EPSG code") from None


def is_wgs84(crs: Any) -> bool:
    """True when ``crs`` is longitude/latitude on WGS84 (axis order aside)."""
    from pyproj import CRS

    return as_crs(crs).equals(CRS.from_epsg(4326), ignore_axis_order=True)


def to_lonlat(x: np.ndarray, y: np.ndarray, crs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) of points (``x``, ``y``) in ``crs``; NaN where they cannot be converted."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if is_wgs84(crs):
        return x.copy(), y.copy()
    from pyproj import Transformer

    t = Transformer.from_crs(as_crs(crs), WGS84, always_xy=True)
    lon, lat = t.transform(x, y, errcheck=False)
    lon, lat = np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
    bad = ~(np.isfinite(lon) & np.isfinite(lat))
    lon[bad] = lat[bad] = np.nan
    return lon, lat


def from_lonlat(lon: np.ndarray, lat: np.ndarray, crs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) in ``crs`` of (``lon``, ``lat``) degrees."""
    lon, lat = np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
    if is_wgs84(crs):
        return lon.copy(), lat.copy()
    from pyproj import Transformer

    t = Transformer.from_crs(WGS84, as_crs(crs), always_xy=True)
    x, y = t.transform(lon, lat, errcheck=False)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def geometry_to_lonlat(geom, crs: Any, what: str = "the geometry"):
    """A shapely geometry in ``crs`` -> EPSG:4326, valid. Straight edges of a projected CRS are
    curves in lon/lat, so long edges get vertices first and keep their shape."""
    import shapely

    source = as_crs(crs, what)
    if is_wgs84(source):
        return geom
    if not source.is_geographic:
        minx, miny, maxx, maxy = geom.bounds
        step = max(maxx - minx, maxy - miny) / 256.0
        if step > 0:
            geom = shapely.segmentize(geom, step)

    def project(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(to_lonlat(xy[:, 0], xy[:, 1], source))

    out = shapely.transform(geom, project)
    if not np.all(np.isfinite(shapely.get_coordinates(out))):
        raise TaxamapError(f"{what} has coordinates that cannot be converted to "
                           "longitude/latitude from its CRS; check its CRS")
    return shapely.make_valid(out)


def frame_to_lonlat(frame, what: str = "the data", *, allow_missing_crs: bool = True):
    """A GeoDataFrame/GeoSeries in EPSG:4326. A frame without a CRS is taken as lon/lat when its
    coordinates look like degrees (``allow_missing_crs``), else TaxamapError."""
    if frame.crs is None:
        minx, miny, maxx, maxy = frame.total_bounds if len(frame) else (0, 0, 0, 0)
        looks_lonlat = -360 <= minx and maxx <= 360 and -90 <= miny and maxy <= 90
        if not (allow_missing_crs and looks_lonlat):
            raise TaxamapError(f"{what} has no CRS and its coordinates are not "
                               "longitude/latitude; save it with a CRS (e.g. a .prj file)")
        return frame.set_crs(WGS84)
    as_crs(frame.crs, what)
    return frame if is_wgs84(frame.crs) else frame.to_crs(WGS84)
