"""A regular lat/lon grid of cells over a region (pure computation, no I/O).

Cells are addressed by their centres. The grid's origin is snapped to a multiple of the resolution,
so two regions at the same resolution share cell centres (and can share stored embeddings), and the
GeoTIFF transform is exact: pixel (row, col) has its centre at the embedded (lat, lon).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from taxamap.crs import wrap_lon
from taxamap.errors import TaxamapError
from taxamap.surface import option

#: Above this many cells a grid is refused: one float32 512-d embedding per cell is 2 KiB, so
#: 20 M cells would be ~40 GiB of embeddings per modality.
MAX_CELLS = 20_000_000

#: Default cell size in degrees: the contiguous USA is 81,541 land cells (lakes excluded), which
#: the full-size location encoder embedded in 9.7 s of a 11.6 s cold ``taxamap predict`` on a
#: 2-core x86 machine (README, "What a run looks like").
DEFAULT_RESOLUTION = 0.1


def _snap_down(value: float, step: float) -> float:
    return math.floor(value / step + 1e-9) * step


def _snap_up(value: float, step: float) -> float:
    return math.ceil(value / step - 1e-9) * step


@dataclass(frozen=True, eq=False)
class Grid:
    """Cells of ``resolution`` degrees; ``mask[row, col]`` is True for cells that are kept.

    ``cells`` records which cells of the region were kept ("land", "water" or "all"; see
    :data:`taxamap.geography.CELL_CHOICES`); it is part of :meth:`definition`, so grids of different
    choices never share a store even where their masks coincide.

    ``west`` may be below -180 or ``west + width * resolution`` above 180 for regions that cross
    the antimeridian; :meth:`cell_latlon` wraps longitudes back into [-180, 180) for the encoders.
    """

    west: float
    north: float
    resolution: float
    width: int
    height: int
    mask: np.ndarray = field(repr=False)
    crs: str = "EPSG:4326"
    cells: str = "land"

    @property
    def east(self) -> float:
        return self.west + self.width * self.resolution

    @property
    def south(self) -> float:
        return self.north - self.height * self.resolution

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) of the outer cell edges."""
        return (self.west, self.south, self.east, self.north)

    @property
    def transform(self):
        """The affine transform of the grid's pixels (rasterio/GDAL convention)."""
        from affine import Affine

        return Affine(self.resolution, 0.0, self.west, 0.0, -self.resolution, self.north)

    @property
    def n_cells(self) -> int:
        """Number of kept cells."""
        return int(self.mask.sum())

    def column_lons(self) -> np.ndarray:
        """Centre longitude of each column, in the grid's own frame (not wrapped)."""
        return self.west + (np.arange(self.width) + 0.5) * self.resolution

    def row_lats(self) -> np.ndarray:
        """Centre latitude of each row (north to south)."""
        return self.north - (np.arange(self.height) + 0.5) * self.resolution

    def cell_index(self) -> np.ndarray:
        """Flat (row-major) pixel index of each kept cell; this order is the order of every
        per-cell array in taxamap."""
        return np.flatnonzero(self.mask.ravel())

    def cell_latlon(self) -> np.ndarray:
        """(N, 2) float64 of (lat, lon) degrees for kept cells, lon wrapped into [-180, 180)."""
        idx = self.cell_index()
        rows, cols = np.divmod(idx, self.width)
        lat = self.row_lats()[rows]
        lon = self.column_lons()[cols]
        return np.stack([lat, wrap_lon(lon)], axis=1)

    def to_raster(self, values: np.ndarray) -> np.ndarray:
        """Scatter per-cell ``values`` (N,) into a (height, width) float32 raster, NaN elsewhere."""
        values = np.asarray(values)
        if values.shape[0] != self.n_cells:
            raise ValueError(f"expected {self.n_cells} values, got {values.shape[0]}")
        out = np.full(self.height * self.width, np.nan, dtype=np.float32)
        out[self.cell_index()] = values
        return out.reshape(self.height, self.width)

    def definition(self) -> dict:
        """A JSON-able description that identifies the grid (stores key on it)."""
        return {
            "west": round(self.west, 9),
            "north": round(self.north, 9),
            "resolution": self.resolution,
            "width": self.width,
            "height": self.height,
            "crs": self.crs,
            "cells": self.cells,
            "mask_sha1": hashlib.sha1(np.packbits(self.mask).tobytes()).hexdigest(),
        }

    def key(self) -> str:
        """A short stable hash of :meth:`definition`."""
        blob = json.dumps(self.definition(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]


def check_resolution(resolution: float, bounds: tuple[float, float, float, float]) -> None:
    """Raise a one-line :class:`TaxamapError` for a resolution that is unusable over ``bounds``."""
    if not (isinstance(resolution, (int, float)) and math.isfinite(resolution)) or resolution <= 0:
        raise TaxamapError(f"{option('resolution')} must be a positive number of degrees, got "
                           f"{resolution!r}")
    if resolution > 10:
        raise TaxamapError(f"{option('resolution', resolution)} is coarser than 10 degrees; use "
                           f"e.g. {option('resolution', 0.1)}")
    west, south, east, north = bounds
    n = ((east - west) / resolution) * ((north - south) / resolution)
    if n > MAX_CELLS:
        suggestion = math.sqrt((east - west) * (north - south) / MAX_CELLS)
        raise TaxamapError(
            f"{option('resolution', resolution)} gives ~{n:,.0f} cells over this region, more "
            f"than the {MAX_CELLS:,} that fit in memory; use "
            f"{option('resolution', float(f'{suggestion:.3g}'))} or coarser, or a smaller region"
        )


def _frame(bounds: tuple[float, float, float, float], resolution: float):
    """(west, north, width, height) of the snapped grid that covers ``bounds``."""
    minx, miny, maxx, maxy = bounds
    west = _snap_down(minx, resolution)
    east = _snap_up(maxx, resolution)
    south = max(_snap_down(miny, resolution), -90.0)
    north = min(_snap_up(maxy, resolution), 90.0)
    width = max(1, int(round((east - west) / resolution)))
    height = max(1, int(round((north - south) / resolution)))
    return west, north, width, height


def _rows_inside(geometry, resolution: float):
    """Yield, row by row (north to south), which snapped cell centres fall inside ``geometry``;
    first yields the frame (west, north, width, height). One row of points at a time keeps peak
    memory flat even for very large grids."""
    import shapely

    west, north, width, height = _frame(geometry.bounds, resolution)
    yield west, north, width, height
    lons = west + (np.arange(width) + 0.5) * resolution
    shapely.prepare(geometry)
    for r in range(height):
        lat = north - (r + 0.5) * resolution
        yield shapely.contains_xy(geometry, lons, np.full(width, lat))


def count_cells(geometry, resolution: float) -> int:
    """How many cell centres of the snapped ``resolution`` grid fall inside ``geometry`` (what
    :func:`make_grid` would keep, without building the mask); 0 for an empty geometry."""
    if geometry.is_empty:
        return 0
    rows = _rows_inside(geometry, resolution)
    next(rows)
    return int(sum(int(row.sum()) for row in rows))


def make_grid(geometry, resolution: float = DEFAULT_RESOLUTION, cells: str = "land") -> Grid:
    """Lay a grid over a shapely ``geometry`` (EPSG:4326 degrees) and keep the cells whose centre
    falls inside it; ``cells`` ("land", "water", "all") records what the geometry is (it is part
    of the grid's key).

    The geometry may extend past +/-180 degrees of longitude (antimeridian regions); the grid then
    does too.
    """
    check_resolution(resolution, geometry.bounds)
    rows = _rows_inside(geometry, resolution)
    west, north, width, height = next(rows)
    mask = np.zeros((height, width), dtype=bool)
    for r, inside in enumerate(rows):
        mask[r] = inside
    if not mask.any():
        where = {"land": " (on land)", "water": " (on water)"}.get(cells, "")
        raise TaxamapError(
            f"no cell centre of a {resolution} degree grid falls inside the region{where}; "
            f"use a finer {option('resolution')} or a larger region"
        )
    return Grid(west=west, north=north, resolution=resolution, width=width, height=height,
                mask=mask, cells=cells)
