"""Satellite patches cut from a local raster: any file GDAL reads (COG, VRT, GeoTIFF), any CRS.

Every patch is TaxaBind's footprint (:mod:`taxamap.sources.footprint`): the ``footprint_m``
(2,560 m) square in the cell's tangent plane on the same lon/lat pixel grid (``size`` = 256 px) the
WMS source asks for, so a local copy of a mosaic and a server give comparable patches. Each patch is
one GDAL warp of just that box (a per-cell ``WarpedVRT`` onto the box's EPSG:4326 grid; two at the
antimeridian, side by side): only the source blocks under it are read, whatever the file's size
or projection.

* Bands 1-3 are red, green, blue (a 1- or 2-band file is read as grey from band 1).
* ``uint8`` data is used as is. Any other type is stretched linearly, the same for every patch of
  the file: ``stretch=(lo, hi)`` maps lo..hi to 0..255; ``"auto"`` (default) takes the 2nd and
  98th percentiles of bands 1-3 together (one pair, so colour balance is kept) over a decimated
  read of the whole file, computed once per source.
* Resampling: ``average`` when the file is finer than the patch's pixels (no aliasing from e.g.
  0.5 m aerial photos), ``bilinear`` otherwise.
* A cell whose window is not entirely covered by valid data (outside the raster, nodata, alpha 0)
  gets ``None``: a patch is never padded with black. ``min_coverage`` < 1 relaxes this; the
  uncovered pixels are then filled with the covered pixels' mean colour.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option
from taxamap.sources.base import DEFAULT_WORKERS, PerCellSource, check_patch_size
from taxamap.sources.footprint import DEFAULT_FOOTPRINT_M, DEFAULT_SIZE, Footprint, footprint

log = logging.getLogger(__name__)

_EQUATOR_M_PER_DEG = 111_319.49


def _open(path: Path):
    import rasterio

    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise TaxamapError(f"cannot read satellite raster {path}: {str(exc).splitlines()[0]}") from None


class RasterFileSource(PerCellSource):
    """Patches warped from a local raster (see the module docstring).

    A window that cannot be read (a damaged block, a VRT member missing or unreadable, a share
    that went away) is ``None`` and *failed* (``fetch_status``): its block stays unfinished in
    the store, so the same command reads it again once the file is fixed.
    """

    kind = "file"
    _thread_name = "taxamap-raster"

    def __init__(
        self,
        path: str | Path,
        *,
        size: int = DEFAULT_SIZE,
        footprint_m: float = DEFAULT_FOOTPRINT_M,
        workers: int = DEFAULT_WORKERS,
        stretch: str | tuple[float, float] | None = "auto",
        min_coverage: float = 1.0,
        resampling: str = "auto",
        attribution: str | None = None,
        license: str | None = None,
    ):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file() and not str(path).startswith("/vsi"):
            raise TaxamapError(f"satellite raster {path} does not exist: pass an existing "
                               f"{option('sat-file')}")
        self.size = check_patch_size(size)
        super().__init__(workers)
        self.footprint_m = float(footprint_m)
        self.min_coverage = float(min_coverage)
        self.attribution, self.license = attribution, license
        self._local = threading.local()
        self._datasets: list = []
        self._lock = threading.Lock()
        self._read_errors = 0
        try:
            src = self._dataset()
            if src.crs is None:
                raise TaxamapError(f"satellite raster {self.path} has no CRS: assign one (gdal_edit.py -a_srs)")
            self.crs = src.crs.to_string()
            self.count = src.count
            self.dtype = src.dtypes[0]
            self._bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
            self.stretch = self._stretch(src, stretch)
            self._resampling = self._pick_resampling(src, resampling)
        except BaseException:
            self.close()
            raise

    # -- public -------------------------------------------------------------------------------

    def describe(self) -> dict:
        """File identity (path, size, mtime) and the patch settings."""
        st = os.stat(self.path)
        return {
            "kind": self.kind,
            "path": str(self.path),
            "bytes": st.st_size,
            "mtime": int(st.st_mtime),
            "crs": self.crs,
            "footprint_m": self.footprint_m,
            "size": self.size,
            "stretch": None if self.stretch is None else [float(v) for v in self.stretch],
            "resampling": self._resampling.name,
        }

    def close(self) -> None:
        """Close the per-thread datasets and stop the workers."""
        super().close()
        with self._lock:
            for ds in self._datasets:
                ds.close()
            self._datasets.clear()
        self._local = threading.local()

    # -- internals ----------------------------------------------------------------------------

    def _dataset(self):
        # GDAL dataset handles are not thread-safe: one per worker thread.
        ds = getattr(self._local, "ds", None)
        if ds is None:
            ds = _open(self.path)
            self._local.ds = ds
            with self._lock:
                self._datasets.append(ds)
        return ds

    def _stretch(self, src, stretch) -> tuple[float, float] | None:
        if stretch is None or (stretch == "auto" and src.dtypes[0] == "uint8"):
            return None
        if stretch != "auto":
            lo, hi = (float(v) for v in stretch)
            if not hi > lo:
                raise TaxamapError(f"raster stretch needs lo < hi, got {stretch}")
            return lo, hi
        scale = max(1, math.ceil(max(src.width, src.height) / 1024))
        shape = (3, max(1, src.height // scale), max(1, src.width // scale))
        data = src.read(self._bands, out_shape=shape, masked=True)
        values = data.compressed().astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise TaxamapError(f"satellite raster {self.path} holds no valid pixels in bands 1-3")
        lo, hi = np.percentile(values, [2.0, 98.0])
        return float(lo), float(hi if hi > lo else lo + 1.0)

    def _pick_resampling(self, src, resampling: str):
        from rasterio.enums import Resampling

        if resampling != "auto":
            try:
                return Resampling[resampling]
            except KeyError:
                raise TaxamapError(f"unknown resampling {resampling!r} (e.g. bilinear, average)") from None
        # Source pixel size in metres (roughly: degrees are taken at the equator).
        src_res = min(abs(src.res[0]), abs(src.res[1]))
        if src.crs.is_geographic:
            src_res *= _EQUATOR_M_PER_DEG
        else:
            src_res *= src.crs.linear_units_factor[1]
        dst_res = self.footprint_m / self.size
        return Resampling.average if src_res < dst_res * 0.75 else Resampling.bilinear

    def footprint(self, lat: float, lon: float) -> Footprint | None:
        """The box the patch of (lat, lon) covers (None near a pole)."""
        return footprint(lat, lon, self.footprint_m, self.size)

    def explain(self, lat: float, lon: float) -> dict:
        """What the patch of (lat, lon) is cut from (no reading): footprint, file, resampling."""
        fp = self.footprint(lat, lon)
        out = fp.to_dict() if fp is not None else {"lat": float(lat), "lon": float(lon)}
        out["source"] = self.describe()
        return out

    def patch(self, lat: float, lon: float):
        """(RGB patch or None, failed) of one cell; failed when the box could not be read."""
        import rasterio

        fp = self.footprint(lat, lon)
        if fp is None:
            return None, False
        try:
            return self._render(fp), False
        except rasterio.errors.RasterioError as exc:
            # A damaged block or a missing VRT member fails these cells, not the run.
            with self._lock:
                self._read_errors += 1
                first = self._read_errors == 1
            if first:
                why = exc.__cause__ or exc  # GDAL's own message ("m1.tif: No such file ...")
                log.warning("cannot read %s around (%.4f, %.4f): %s; those cells are left for a "
                            "rerun", self.path, lat, lon, str(why).splitlines()[0])
            self.stats.add(failures=1)
            return None, True

    def _render(self, fp: Footprint):
        """The patch warped onto the footprint's grid (None without enough valid data)."""
        from PIL import Image

        data = np.zeros((len(self._bands), self.size, self.size), dtype=self.dtype)
        valid = np.zeros((self.size, self.size), dtype=bool)
        for part in fp.parts():
            d, a = self._warp(part.bbox, part.width)
            data[:, :, part.col0:part.col1] = d
            valid[:, part.col0:part.col1] = a > 0
        coverage = float(valid.mean())
        if coverage < self.min_coverage or coverage == 0.0:
            self.stats.add(not_found=1)
            return None
        rgb = self._to_uint8(data.astype(np.float64) if self.stretch else data)
        if not valid.all():
            fill = rgb[:, valid].mean(axis=1).round().astype(np.uint8)
            rgb[:, ~valid] = fill[:, None]
        self.stats.add(fetched=1)
        return Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)), "RGB")

    def _warp(self, bbox, width: int):
        """(bands, alpha) of the file warped onto an EPSG:4326 box ``width`` x ``size`` px."""
        from rasterio.transform import from_bounds
        from rasterio.vrt import WarpedVRT

        with WarpedVRT(
            self._dataset(),
            crs="EPSG:4326",
            transform=from_bounds(*bbox, width, self.size),
            width=width,
            height=self.size,
            resampling=self._resampling,
            add_alpha=True,
        ) as vrt:
            return vrt.read(self._bands), vrt.read(vrt.count)

    def _to_uint8(self, data: np.ndarray) -> np.ndarray:
        if self.stretch is None:
            return np.clip(data, 0, 255).astype(np.uint8)
        lo, hi = self.stretch
        scaled = (np.nan_to_num(data, nan=lo) - lo) * (255.0 / (hi - lo))
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
