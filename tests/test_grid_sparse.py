"""Grids that scale with the kept cells, not with the bbox (issue 21)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import shapely

from taxamap.grid import MAX_CELLS, Grid, Runs, make_grid


def _dense_lookup(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    number = np.full(mask.shape, -1, dtype=np.int64)
    number[mask] = np.arange(int(mask.sum()))
    inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    out = np.full(rows.shape, -1, dtype=np.int64)
    out[inside] = number[rows[inside], cols[inside]]
    return out


def test_runs_answer_as_the_dense_mask_does():
    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) < 0.4
    mask[5] = False  # a row without cells
    grid = Grid(-10.0, 5.0, 0.5, 53, 37, mask=mask)
    assert grid.n_cells == mask.sum()
    assert (grid.mask == mask).all()
    assert (grid.cell_index() == np.flatnonzero(mask.ravel())).all()
    rows, cols = rng.integers(-3, 40, 4000), rng.integers(-3, 56, 4000)
    assert (grid.cells_at(rows, cols) == _dense_lookup(mask, rows, cols)).all()
    # the cells of a band of rows are one contiguous range, in the grid's cell order
    band = grid.cells_of_rows(4, 11)
    assert band.stop - band.start == mask[4:11].sum()
    values = np.arange(grid.n_cells, dtype=np.float32)
    assert np.array_equal(grid.rows_raster(values[band], 4, 11), grid.to_raster(values)[4:11],
                          equal_nan=True)
    assert np.allclose(grid.cell_latlon(band), grid.cell_latlon()[band])
    for factor in (2, 3, 4):
        coarse = grid.coarsened(factor)
        padded = np.zeros((coarse.height * factor, coarse.width * factor), dtype=bool)
        padded[:37, :53] = mask
        expected = padded.reshape(coarse.height, factor, coarse.width, factor).any(axis=(1, 3))
        assert (coarse.mask == expected).all()
        assert coarse.resolution == 0.5 * factor and coarse.west == -10.0


def test_mask_hash_is_the_dense_packing():
    """Store keys hash the packed mask: the row-band hash must give the same digest."""
    import hashlib

    mask = np.random.default_rng(1).random((1100, 13)) < 0.5  # 13 columns: rows not byte-aligned
    grid = Grid(0.0, 0.0, 1.0, 13, 1100, mask=mask)
    assert grid.definition()["mask_sha1"] == hashlib.sha1(np.packbits(mask).tobytes()).hexdigest()


def test_a_grid_larger_than_the_old_cap_builds_in_row_bands():
    """A frame of 36 M cells (the old cap refused 20 M) with two small patches of kept cells:
    memory follows the kept cells, not the frame."""
    west_patch = shapely.box(0.0, 0.0, 0.05, 0.2)
    east_patch = shapely.box(179.9, 0.05, 180.0, 0.1)
    geometry = shapely.union(west_patch, east_patch)
    tracemalloc.start()
    try:
        grid = make_grid(geometry, 0.001, cells="all")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    frame = grid.width * grid.height
    assert frame > MAX_CELLS
    assert grid.n_cells == 50 * 200 + 100 * 50
    # a dense bool mask of the frame alone would take 36 MB, its cell numbers 8 bytes a pixel
    assert peak < frame // 4
    assert grid.runs.nbytes < 20_000
    assert len(grid.runs.row) == 200 + 50  # one run per row of each patch
    # a tile-sized box finds its cells without touching the rest of the grid
    rows, cols = np.meshgrid(np.arange(120, 130), np.arange(179_950, 179_960), indexing="ij")
    cells = grid.cells_at(rows.ravel(), cols.ravel())
    assert (cells >= 0).sum() == 100
    lat, lon = grid.cell_latlon(slice(int(cells.max()), int(cells.max()) + 1))[0]
    assert 0.05 < lat < 0.1 and 179.9 < lon < 180.0


@pytest.mark.slow
def test_world_at_005_builds_and_is_cached(tmp_path):
    from taxamap.cells import build_grid
    from taxamap.options import GridOptions

    options = GridOptions(region="world", resolution=0.05, cache=str(tmp_path))
    _, grid = build_grid(options)
    assert 8_000_000 < grid.n_cells < 9_000_000
    assert grid.width * grid.height > 20_000_000
    assert grid.runs.nbytes < 5_000_000
    assert len(list((tmp_path / "grids").glob("*.npz"))) == 1
    _, again = build_grid(options)
    assert again.key() == grid.key() and again.n_cells == grid.n_cells
    assert isinstance(again.runs, Runs)


def test_a_region_grid_is_cached_with_the_count_its_land_mask_removed(tmp_path, caplog):
    """A warm predict over the USA at 0.05 deg spent 1.9 s of 5 laying the grid out again and
    counting the water cells its land mask removed; both now come from the cache."""
    import logging

    import numpy as np

    from taxamap.cells import GRID_CACHE_FRAME, build_grid
    from taxamap.options import GridOptions

    options = GridOptions(bbox="-84,39,-74,44", resolution=0.01, cache=str(tmp_path))
    assert 1000 * 500 > GRID_CACHE_FRAME
    caplog.set_level(logging.INFO, logger="taxamap")
    _, grid = build_grid(options)
    first = [r.getMessage() for r in caplog.records if "mask:" in r.getMessage()]
    [cached] = (tmp_path / "grids").glob("*.npz")
    with np.load(cached) as f:
        outline = int(f["outline_cells"])
    assert outline == 1000 * 500 and outline > grid.n_cells  # the box, less Lake Erie and sea
    assert first == [f"land mask: {outline - grid.n_cells:,} water cells removed"]
    caplog.clear()
    _, again = build_grid(options)
    assert again.key() == grid.key()
    assert [r.getMessage() for r in caplog.records if "mask:" in r.getMessage()] == first
    assert not any("laying out" in r.getMessage() for r in caplog.records)


def test_to_raster_scatters_as_the_row_blocks_do():
    """The cached flat index (small grids) and the row-block path (large ones) agree."""
    import numpy as np

    from taxamap.grid import Grid

    rng = np.random.default_rng(11)
    mask = rng.random((37, 53)) < 0.4
    grid = Grid(-10.0, 5.0, 0.1, 53, 37, mask=mask)
    values = rng.normal(size=grid.n_cells).astype(np.float32)
    want = np.full(mask.shape, np.nan, np.float32)
    want[mask] = values  # cells are row-major
    assert np.array_equal(grid.to_raster(values), want, equal_nan=True)
    assert np.array_equal(grid.to_raster(values), want, equal_nan=True)  # index reused
    assert np.array_equal(grid.rows_raster(values, 0, grid.height), want, equal_nan=True)
    big = Grid(-10.0, 5.0, 0.1, 53, 37, mask=mask)
    big.RASTER_INDEX_CELLS = 10  # the row-block path
    assert np.array_equal(big.to_raster(values), want, equal_nan=True)
    assert "_raster_index" not in vars(big)
