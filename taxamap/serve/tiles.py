"""Score map tiles: ``/tiles/{query}/{z}/{x}/{y}.png`` (Web Mercator XYZ, 256 px) for any query.

A tile scores only the cells under its pixels, at the pyramid level that matches its zoom: the
coarsest level whose cells are still no larger than a pixel (:mod:`taxamap.pyramid`: a coarse
cell's score is the exact mean of its fine cells' scores). Where cells are larger than pixels,
the grid's own cells (level 1) are scored, from memory when the session holds them, else read
from the stores. Nothing here knows HTTP: :mod:`taxamap.serve.app` validates the request and
encodes the PNG.

Not to be confused with :mod:`taxamap.sources.tiles`, the client of *imagery* XYZ servers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from taxamap.pyramid import ensure_pyramid
from taxamap.score import fuse_many

TILE_SIZE = 256
#: Deepest zoom served: a pixel is ~0.6 m there, far below any cell.
MAX_ZOOM = 22
#: Web Mercator's latitude limit.
MERCATOR_LAT = 85.0511287798066


@dataclass(frozen=True)
class TileBox:
    """Pixel centres of tile ``z/x/y``: longitudes (256,) and latitudes (256,), north first."""

    lons: np.ndarray
    lats: np.ndarray
    west: float
    south: float
    east: float
    north: float


def tile_box(z: int, x: int, y: int, size: int = TILE_SIZE) -> TileBox:
    """The pixel centres of an XYZ tile (Web Mercator rows: evenly spaced in northing)."""
    n = 2 ** z
    frac = (np.arange(size) + 0.5) / size
    lons = (x + frac) / n * 360.0 - 180.0
    lats = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * (y + frac) / n))))

    def lat_of(t: float) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * t / n))))

    return TileBox(lons, lats, x / n * 360.0 - 180.0, lat_of(y + 1), (x + 1) / n * 360.0 - 180.0,
                   lat_of(y))


def pixel_degrees(z: int, size: int = TILE_SIZE) -> float:
    """Degrees of longitude per pixel at zoom ``z``."""
    return 360.0 / (size * 2 ** z)


class TileScorer:
    """Per-tile scores of a :class:`~taxamap.session.MapSession`'s grid, through the pyramids of
    its stores (built, once, when absent or stale)."""

    def __init__(self, session, factors: list[int] | None = None):
        self.session = session
        self.grid = session.grid
        self.pyramids = {}
        for modality, store in session.cells.stores.items():
            pyramid = ensure_pyramid(store, self.grid, factors)
            if pyramid is not None:
                self.pyramids[modality] = pyramid
        # levels every modality has (they share the grid, so the same factors)
        common = None
        for pyramid in self.pyramids.values():
            here = {lv.factor for lv in pyramid.levels}
            common = here if common is None else common & here
        if len(self.pyramids) != len(session.cells.stores):
            common = set()
        self.factors = [1, *sorted(common or ())]

    def factor_for(self, z: int) -> int:
        """The coarsest level whose cells are no larger than a pixel at zoom ``z`` (the grid's
        own cells where even those are larger)."""
        pixel = pixel_degrees(z)
        fit = [f for f in self.factors if f * self.grid.resolution <= pixel * (1 + 1e-9)]
        return max(fit) if fit else 1

    def level_grid(self, factor: int):
        if factor == 1:
            return self.grid
        return next(iter(self.pyramids.values())).level(factor).grid

    def overlaps(self, box: TileBox) -> bool:
        """Whether the tile can hold a cell (in longitude, any whole turn of the grid's frame)."""
        g = self.grid
        if box.south >= g.north or box.north <= g.south:
            return False
        if g.east - g.west >= 360.0:
            return True
        west = g.west + (box.west - g.west) % 360.0
        return west < g.east or west + (box.east - box.west) > g.west + 360.0

    def cells(self, factor: int, box: TileBox) -> np.ndarray:
        """(256, 256) cell numbers of the level under the tile's pixels (-1 where none)."""
        g = self.level_grid(factor)
        lons = g.west + (box.lons - g.west) % 360.0  # into the grid's longitude frame
        cols = np.floor((lons - g.west) / g.resolution).astype(np.int64)
        rows = np.floor((g.north - box.lats) / g.resolution).astype(np.int64)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        return g.cells_at(rr.ravel(), cc.ravel()).reshape(rr.shape)

    def score(self, vectors: np.ndarray, factor: int, cells: np.ndarray
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused and per-modality scores (S, n) of sorted unique ``cells`` of a level."""
        if factor == 1:
            return self.session.scorer.score_cells(vectors, cells)
        embeddings, norms = {}, {}
        for modality, pyramid in self.pyramids.items():
            embeddings[modality], norms[modality] = pyramid.level(factor).vectors(cells)
        return fuse_many(embeddings, np.atleast_2d(vectors), self.session.fusion,
                         row_norms=norms)

    def tile(self, vector: np.ndarray, band: str, z: int, x: int, y: int) -> np.ndarray | None:
        """(256, 256) float32 scores of ``band`` for tile ``z/x/y`` (NaN off the cells); None for
        a tile that holds no cell at all."""
        box = tile_box(z, x, y)
        if not self.overlaps(box):
            return None
        factor = self.factor_for(z)
        cells = self.cells(factor, box)
        held = cells >= 0
        if not held.any():
            return None
        unique, inverse = np.unique(cells[held], return_inverse=True)
        fused, per = self.score(vector, factor, unique)
        values = (fused if band == "fused" else per[band])[0]
        out = np.full(cells.shape, np.nan, dtype=np.float32)
        out[held] = values[inverse]
        return out

    def overview(self, vector: np.ndarray, band: str) -> np.ndarray:
        """Scores of ``band`` over every cell of the coarsest level (for display stretches and
        band statistics of grids drawn only as tiles)."""
        factor = self.factors[-1]
        cells = np.arange(self.level_grid(factor).n_cells)
        fused, per = self.score(vector, factor, cells)
        return (fused if band == "fused" else per[band])[0]

