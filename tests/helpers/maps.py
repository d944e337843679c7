"""Score maps the tests write by hand and the geometry checks they run on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine


def write_map(path: Path, bands: dict[str, np.ndarray], west: float, north: float,
              res: float, crs: str = "EPSG:4326") -> Path:
    """A GeoTIFF in taxamap's shape: float32, NaN nodata, band descriptions name the bands."""
    arrays = [np.asarray(a, dtype=np.float32) for a in bands.values()]
    height, width = arrays[0].shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height,
                       count=len(arrays), dtype="float32", crs=crs, nodata=float("nan"),
                       transform=Affine(res, 0, west, 0, -res, north)) as ds:
        for i, (name, arr) in enumerate(zip(bands, arrays), start=1):
            ds.write(arr, i)
            ds.set_band_description(i, name)
    return path


def centres(west: float, north: float, res: float, height: int, width: int):
    """(lat, lon) of every cell centre of a north-up grid, each a (height, width) array."""
    lat = north - (np.arange(height) + 0.5) * res
    lon = west + (np.arange(width) + 0.5) * res
    return np.meshgrid(lat, lon, indexing="ij")


def off_cell_edges(geom, west: float, north: float, res: float, tol: float = 1e-6) -> int:
    """How many vertices and segments of ``geom``'s rings (shapely, lon/lat; or a list of rings,
    each an (N, 2) array) leave the grid's cell edges: a vertex off the cells' corners, or a
    segment neither along a row edge nor along a column edge (a diagonal through cells, which a
    simplified outline draws)."""
    if isinstance(geom, shapely.Geometry):
        polys = shapely.get_parts(geom)
        rings = [shapely.get_coordinates(r) for p in polys
                 for r in (p.exterior, *p.interiors)]
    else:
        rings = [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in geom]
    bad = 0
    for xy in rings:
        gx = (xy[:, 0] - west) / res
        gy = (north - xy[:, 1]) / res
        bad += int(((np.abs(gx - np.round(gx)) * res > tol)
                    | (np.abs(gy - np.round(gy)) * res > tol)).sum())
        step = np.abs(np.diff(xy, axis=0))
        bad += int(((step[:, 0] > tol) & (step[:, 1] > tol)).sum())
    return bad
