"""Small synthetic global WorldClim rasters (and official-layout zips) for the tests.

Each of the 20 layers is a whole-world EPSG:4326 float32 GeoTIFF with the official name, the
official no-data value (-3.4e38) over "ocean" pixels in every layer, a few pixels missing in only
some layers, and values that differ per layer (layer k is offset by 1000 * k), so a test can tell
which layer landed in which feature column.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxamap.sources.worldclim import WORLDCLIM_FILES, WORLDCLIM_ZIPS

NODATA = -3.4e38


@dataclass
class SyntheticWorldClim:
    folder: Path
    raw: np.ndarray       # (20, H, W) float32 as written, NODATA included
    ocean: np.ndarray     # (H, W) bool: missing in every layer
    partial: np.ndarray   # (20, H, W) bool: missing in that layer only (not ocean)

    @property
    def height(self) -> int:
        return self.raw.shape[1]

    @property
    def width(self) -> int:
        return self.raw.shape[2]


def synthetic_layers(height: int = 18, width: int = 36, seed: int = 0):
    """The arrays written by :func:`write_rasters` (raw with NODATA, ocean, partial masks)."""
    rng = np.random.default_rng(seed)
    n = len(WORLDCLIM_FILES)
    raw = np.empty((n, height, width), dtype=np.float32)
    for k in range(n):
        raw[k] = 1000.0 * k + rng.normal(0.0, 10.0 + k, size=(height, width))
    ocean = np.zeros((height, width), dtype=bool)
    ocean[:, : width // 6] = True          # a band of open water in the west
    ocean[height // 2, width // 2] = True  # and one cell at (0, 0)-ish
    partial = np.zeros((n, height, width), dtype=bool)
    partial[3, 1, width - 1] = True
    partial[7, 1, width - 1] = True
    partial[0, 2, width - 2] = True
    raw[:, ocean] = NODATA
    raw[partial] = NODATA
    return raw, ocean, partial


def write_raster(path: Path, values: np.ndarray, nodata: float | None = NODATA) -> None:
    import rasterio
    from rasterio.transform import from_origin

    height, width = values.shape
    profile = dict(
        driver="GTiff", height=height, width=width, count=1, dtype="float32", crs="EPSG:4326",
        transform=from_origin(-180.0, 90.0, 360.0 / width, 180.0 / height), nodata=nodata,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values.astype(np.float32), 1)


def write_rasters(folder: Path, height: int = 18, width: int = 36, seed: int = 0,
                  names=WORLDCLIM_FILES) -> SyntheticWorldClim:
    """Write the 20 synthetic layers with their official names into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw, ocean, partial = synthetic_layers(height, width, seed)
    for k, name in enumerate(WORLDCLIM_FILES):
        if name in names:
            write_raster(folder / name, raw[k])
    return SyntheticWorldClim(folder, raw, ocean, partial)


def official_zips(height: int = 18, width: int = 36, seed: int = 0) -> dict[str, bytes]:
    """``{zip name: bytes}`` laid out like the official WorldClim 2.1 downloads."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_rasters(Path(tmp), height, width, seed)
        for zip_name, members in WORLDCLIM_ZIPS.items():
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for name in members:
                    zf.write(Path(tmp) / name, arcname=name)
            out[zip_name] = buf.getvalue()
    return out
