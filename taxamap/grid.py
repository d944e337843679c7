"""A regular lat/lon grid of cells over a region (pure computation, no I/O).

Cells are addressed by their centres. The grid's origin is snapped to a multiple of the resolution,
so two regions at the same resolution share cell centres (and can share stored embeddings), and the
GeoTIFF transform is exact: pixel (row, col) has its centre at the embedded (lat, lon).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from taxamap.crs import wrap_lon
from taxamap.errors import TaxamapError
from taxamap.surface import option

#: Above this many cells in a region's frame (its bbox at the resolution) a grid is refused: the
#: land mask is tested row by row (memory stays flat) but at ~1 M cell centres a second, and every
#: kept cell needs its embeddings on disk (1 KiB per cell and modality in float16). The world at
#: 0.01 deg (a 648 M-cell frame, ~213 M land cells) is the finest one machine lays out; beyond, see
#: docs/scale.md.
MAX_FRAME_CELLS = 700_000_000

#: Frames up to this many cells are small enough for extra passes that only inform (how many
#: cells the land mask removed).
MAX_CELLS = 20_000_000

#: Default cell size in degrees: the contiguous USA is 81,541 land cells (lakes excluded), which
#: the full-size location encoder embedded in 9.7 s of a 11.6 s cold ``taxamap predict`` on a
#: 2-core x86 machine (README, "What a run looks like").
DEFAULT_RESOLUTION = 0.1


def _snap_down(value: float, step: float) -> float:
    return math.floor(value / step + 1e-9) * step


def _snap_up(value: float, step: float) -> float:
    return math.ceil(value / step - 1e-9) * step


@dataclass(frozen=True)
class Runs:
    """The kept cells of a grid as runs of consecutive columns, row by row (north to south).

    Run ``i`` covers columns ``col[i] .. col[i] + length[i] - 1`` of row ``row[i]``; its first
    cell is cell number ``first[i]`` (cells are numbered in row-major order, the order of every
    per-cell array). ``row_runs[r] .. row_runs[r + 1]`` are the runs of row ``r``, so the cells
    of any rows or any box of rows and columns are found without scanning the grid, and the
    memory held grows with the coastlines, not with the bbox (the world at 0.05 deg: ~0.6 M
    runs for ~8.5 M cells in a 25 M-pixel frame).
    """

    row: np.ndarray
    col: np.ndarray
    length: np.ndarray
    first: np.ndarray
    row_runs: np.ndarray

    @classmethod
    def from_rows(cls, rows, height: int) -> "Runs":
        """Runs of an iterable of ``height`` boolean rows (one row in memory at a time)."""
        row_l, col_l, len_l, counts = [], [], [], np.zeros(height + 1, dtype=np.int64)
        for r, inside in enumerate(rows):
            edges = np.diff(np.concatenate(([0], np.asarray(inside, dtype=np.int8), [0])))
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)
            if starts.size:
                row_l.append(np.full(starts.size, r, dtype=np.int32))
                col_l.append(starts.astype(np.int32))
                len_l.append((ends - starts).astype(np.int32))
                counts[r + 1] = starts.size
        return cls.from_parts(row_l, col_l, len_l, counts)

    @classmethod
    def from_parts(cls, row_l, col_l, len_l, counts) -> "Runs":
        """Runs from lists of per-row arrays (row, start column, length) and the count of runs
        of each row (index r + 1)."""
        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        length = cat(len_l, np.int32)
        first = np.zeros(length.size, dtype=np.int64)
        if length.size:
            np.cumsum(length[:-1], out=first[1:])
        return cls(cat(row_l, np.int32), cat(col_l, np.int32), length, first,
                   np.cumsum(counts))

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "Runs":
        mask = np.asarray(mask, dtype=bool)
        return cls.from_rows(iter(mask), mask.shape[0])

    @property
    def n_cells(self) -> int:
        return int(self.length.sum())

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.row, self.col, self.length, self.first,
                                           self.row_runs)))

    def cells_of_rows(self, r0: int, r1: int) -> slice:
        """The cells of rows ``r0 .. r1 - 1`` (a contiguous range: cells are row-major)."""
        a, b = int(self.row_runs[r0]), int(self.row_runs[r1])
        start = int(self.first[a]) if a < self.first.size else self.n_cells
        stop = int(self.first[b]) if b < self.first.size else self.n_cells
        return slice(start, stop)

    def rows_cols(self, cells: slice) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) of the cells ``cells.start .. cells.stop - 1``."""
        start, stop = cells.start, cells.stop
        if stop <= start:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        a = int(np.searchsorted(self.first, start, side="right")) - 1
        b = int(np.searchsorted(self.first, stop, side="left"))
        first = self.first[a:b]
        length = self.length[a:b].astype(np.int64)
        within = np.arange(first[0], first[-1] + length[-1]) - np.repeat(first, length)
        rows = np.repeat(self.row[a:b].astype(np.int64), length)
        cols = np.repeat(self.col[a:b].astype(np.int64), length) + within
        lo = start - int(first[0])
        return rows[lo:lo + stop - start], cols[lo:lo + stop - start]

    @functools.cached_property
    def _search_keys(self) -> tuple[int, np.ndarray]:
        """(span, sorted key of each run's start): made once, not per tile or click."""
        span = int(self.col.max()) + int(self.length.max()) + 1
        return span, self.row.astype(np.int64) * span + self.col

    def lookup(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Cell number of each (row, col), -1 where no cell is kept (out of the frame too)."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        out = np.full(rows.shape, -1, dtype=np.int64)
        height = self.row_runs.size - 1
        ok = (rows >= 0) & (rows < height) & (cols >= 0)
        if not self.col.size or not ok.any():
            return out
        span, keys = self._search_keys
        key = rows[ok] * span + np.minimum(cols[ok], span - 1)
        j = np.searchsorted(keys, key, side="right") - 1
        jj = np.maximum(j, 0)
        hit = (j >= 0) & (self.row[jj] == rows[ok]) & (cols[ok] < self.col[jj] + self.length[jj])
        found = np.where(hit, self.first[jj] + cols[ok] - self.col[jj], -1)
        out[ok] = found
        return out

    def coarsened(self, factor: int, height: int) -> "Runs":
        """The runs of the grid ``factor`` times coarser: a coarse cell is kept where any of
        its ``factor`` x ``factor`` cells is (``height`` is the fine grid's)."""
        coarse_h = -(-height // factor)
        row_l, col_l, len_l, counts = [], [], [], np.zeros(coarse_h + 1, dtype=np.int64)
        for R in range(coarse_h):
            a, b = int(self.row_runs[R * factor]), int(self.row_runs[min(height, (R + 1) * factor)])
            if a == b:
                continue
            lo = self.col[a:b].astype(np.int64) // factor
            hi = (self.col[a:b].astype(np.int64) + self.length[a:b] - 1) // factor
            width = int(hi.max()) + 2
            marks = np.zeros(width + 1, dtype=np.int64)
            np.add.at(marks, lo, 1)
            np.add.at(marks, hi + 1, -1)
            inside = np.cumsum(marks)[:width] > 0
            edges = np.diff(np.concatenate(([0], inside.astype(np.int8), [0])))
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)
            row_l.append(np.full(starts.size, R, dtype=np.int32))
            col_l.append(starts.astype(np.int32))
            len_l.append((ends - starts).astype(np.int32))
            counts[R + 1] = starts.size
        return Runs.from_parts(row_l, col_l, len_l, counts)


class Grid:
    """Cells of ``resolution`` degrees over a ``width`` x ``height`` frame whose top-left corner
    is (``west``, ``north``). The kept cells are held as :class:`Runs` (give ``mask``, a
    (height, width) bool array, or ``runs``): memory grows with the kept cells' outlines, never
    with the bbox, so the world at 0.02 deg lays out in row bands like a country does.

    ``cells`` records which cells of the region were kept ("land", "water" or "all"; see
    :data:`taxamap.geography.CELL_CHOICES`); it is part of :meth:`definition`, so grids of different
    choices never share a store even where their masks coincide.

    ``west`` may be below -180 or ``west + width * resolution`` above 180 for regions that cross
    the antimeridian; :meth:`cell_latlon` wraps longitudes back into [-180, 180).
    """

    def __init__(self, west: float, north: float, resolution: float, width: int, height: int,
                 mask: np.ndarray | None = None, crs: str = "EPSG:4326", cells: str = "land",
                 *, runs: Runs | None = None):
        if (mask is None) == (runs is None):
            raise ValueError("give a Grid either mask or runs")
        self.west, self.north, self.resolution = west, north, resolution
        self.width, self.height, self.crs, self.cells = int(width), int(height), crs, cells
        if runs is None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (self.height, self.width):
                raise ValueError(f"mask is {mask.shape}, the grid {(self.height, self.width)}")
            runs = Runs.from_mask(mask)
        self.runs = runs

    def __repr__(self) -> str:
        return (f"Grid(west={self.west}, north={self.north}, resolution={self.resolution}, "
                f"width={self.width}, height={self.height}, n_cells={self.n_cells}, "
                f"cells={self.cells!r})")

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

    @functools.cached_property
    def n_cells(self) -> int:
        """Number of kept cells."""
        return self.runs.n_cells

    @property
    def mask(self) -> np.ndarray:
        """The (height, width) bool mask of kept cells (a full frame: for regional grids)."""
        return self.mask_rows(0, self.height)

    def mask_rows(self, r0: int, r1: int) -> np.ndarray:
        """The mask of rows ``r0 .. r1 - 1`` only: (r1 - r0, width) bool."""
        out = np.zeros((r1 - r0, self.width), dtype=bool)
        rows, cols = self.runs.rows_cols(self.runs.cells_of_rows(r0, r1))
        out[rows - r0, cols] = True
        return out

    def column_lons(self) -> np.ndarray:
        """Centre longitude of each column, in the grid's own frame (not wrapped)."""
        return self.west + (np.arange(self.width) + 0.5) * self.resolution

    def row_lats(self) -> np.ndarray:
        """Centre latitude of each row (north to south)."""
        return self.north - (np.arange(self.height) + 0.5) * self.resolution

    def cell_index(self) -> np.ndarray:
        """Flat (row-major) pixel index of each kept cell; this order is the order of every
        per-cell array in taxamap."""
        rows, cols = self.runs.rows_cols(slice(0, self.n_cells))
        return rows * self.width + cols

    def cells_of_rows(self, r0: int, r1: int) -> slice:
        """The cells lying in rows ``r0 .. r1 - 1``: a contiguous range of cell numbers."""
        return self.runs.cells_of_rows(max(0, r0), min(self.height, r1))

    def cells_at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Cell number of each (row, col) pixel; -1 off the kept cells and outside the frame."""
        return self.runs.lookup(rows, cols)

    def cell_latlon(self, cells: slice | None = None) -> np.ndarray:
        """(N, 2) float64 of (lat, lon) degrees for kept cells (all, or the range ``cells``),
        lon wrapped into [-180, 180)."""
        rows, cols = self.runs.rows_cols(cells if cells is not None else slice(0, self.n_cells))
        lat = self.north - (rows + 0.5) * self.resolution
        lon = self.west + (cols + 0.5) * self.resolution
        return np.stack([lat, wrap_lon(lon)], axis=1)

    #: Grids of at most this many cells keep their cells' flat pixel index once made (4 bytes a
    #: cell): every map of a web session is scattered into a raster, 7 ms -> 1.5 ms for the USA
    #: at 0.05 deg. Larger grids are written in row blocks (:meth:`rows_raster`) instead.
    RASTER_INDEX_CELLS = 4_000_000

    @functools.cached_property
    def _raster_index(self) -> np.ndarray:
        index = self.cell_index()
        return index.astype(np.int32) if self.width * self.height < 2**31 else index

    def to_raster(self, values: np.ndarray) -> np.ndarray:
        """Scatter per-cell ``values`` (N,) into a (height, width) float32 raster, NaN elsewhere."""
        values = np.asarray(values)
        if values.shape[0] != self.n_cells:
            raise ValueError(f"expected {self.n_cells} values, got {values.shape[0]}")
        if self.n_cells > self.RASTER_INDEX_CELLS:
            return self.rows_raster(values, 0, self.height)
        out = np.full(self.width * self.height, np.nan, dtype=np.float32)
        out[self._raster_index] = values
        return out.reshape(self.height, self.width)

    def rows_raster(self, values: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0 .. r1 - 1`` of the raster: ``values`` are the cells of those rows
        (:meth:`cells_of_rows`), scattered into (r1 - r0, width) float32, NaN elsewhere. Writers
        of grids too large for one raster stream these row blocks."""
        out = np.full((r1 - r0, self.width), np.nan, dtype=np.float32)
        rows, cols = self.runs.rows_cols(self.cells_of_rows(r0, r1))
        out[rows - r0, cols] = np.asarray(values)
        return out

    def coarsened(self, factor: int) -> "Grid":
        """The grid of cells ``factor`` times larger on the same origin; a coarse cell is kept
        where any of its fine cells is (the embedding pyramids' levels)."""
        return Grid(self.west, self.north, self.resolution * factor, -(-self.width // factor),
                    -(-self.height // factor), crs=self.crs, cells=self.cells,
                    runs=self.runs.coarsened(factor, self.height))

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
            "mask_sha1": self._mask_sha1,
        }

    @functools.cached_property
    def _mask_sha1(self) -> str:
        # The SHA-1 of np.packbits(mask) as it always was, made 8 rows at a time: a band of 8
        # rows is a whole number of bytes, so the bands' bytes concatenate to the full packing.
        digest = hashlib.sha1()
        for r0 in range(0, self.height, 8 * 64):
            digest.update(np.packbits(self.mask_rows(r0, min(self.height, r0 + 8 * 64))).tobytes())
        return digest.hexdigest()

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
    if n > MAX_FRAME_CELLS:
        suggestion = math.sqrt((east - west) * (north - south) / MAX_FRAME_CELLS)
        raise TaxamapError(
            f"{option('resolution', resolution)} gives ~{n:,.0f} cells over this region's box, "
            f"more than the {MAX_FRAME_CELLS:,} one machine lays out (time, disk and memory); use "
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
    # Only the columns under a part of the geometry whose latitudes span the row are tested
    # (the others cannot be inside): a frame mostly empty costs its rows, not its cells.
    boxes = shapely.bounds(shapely.get_parts(geometry))
    first = np.floor((boxes[:, 0] - west) / resolution - 0.5).astype(np.int64)
    last = np.ceil((boxes[:, 2] - west) / resolution - 0.5).astype(np.int64)
    for r in range(height):
        lat = north - (r + 0.5) * resolution
        under = (boxes[:, 1] <= lat) & (boxes[:, 3] >= lat)
        marks = np.zeros(width + 1, dtype=np.int32)
        np.add.at(marks, np.clip(first[under], 0, width), 1)
        np.add.at(marks, np.clip(last[under] + 1, 0, width), -1)
        candidates = np.flatnonzero(np.cumsum(marks[:width]) > 0)
        inside = np.zeros(width, dtype=bool)
        if candidates.size:
            inside[candidates] = shapely.contains_xy(geometry, lons[candidates],
                                                     np.full(candidates.size, lat))
        yield inside


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
    runs = Runs.from_rows(rows, height)
    if runs.n_cells == 0:
        where = {"land": " (on land)", "water": " (on water)"}.get(cells, "")
        raise TaxamapError(
            f"no cell centre of a {resolution} degree grid falls inside the region{where}; "
            f"use a finer {option('resolution')} or a larger region"
        )
    return Grid(west=west, north=north, resolution=resolution, width=width, height=height,
                runs=runs, cells=cells)
