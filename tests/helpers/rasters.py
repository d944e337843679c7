"""Satellite-like GeoTIFFs for the local raster source: colours that encode the position."""

from __future__ import annotations

import numpy as np
import rasterio
from affine import Affine


def write_tif(path, data, crs, transform, nodata=None):
    """A tiled GeoTIFF of ``data`` (bands, rows, columns)."""
    bands, height, width = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=bands,
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        dst.write(data)


def geographic_raster(tmp_path, dtype=np.uint8, scale=1.0):
    """EPSG:4326 raster over lon 10..12, lat 40..42: red grows with lon, green with lat."""
    n = 400
    res = 2.0 / n
    lon = 10 + (np.arange(n) + 0.5) * res
    lat = 42 - (np.arange(n) + 0.5) * res
    red = np.broadcast_to((lon - 10) / 2 * 250, (n, n))
    green = np.broadcast_to(((lat - 40) / 2 * 250)[:, None], (n, n))
    blue = np.full((n, n), 100.0)
    data = (np.stack([red, green, blue]) * scale).astype(dtype)
    path = tmp_path / "geo.tif"
    write_tif(path, data, "EPSG:4326", Affine(res, 0, 10, 0, -res, 42))
    return path
