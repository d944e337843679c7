"""Embedding pyramids: coarse levels hold exact means of the fine cells' scores (issue 21)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from taxamap.grid import Grid
from taxamap.pyramid import default_factors, ensure_pyramid, open_pyramid
from taxamap.score import fuse_many, normalize
from taxamap.store import EmbeddingStore


def _store(tmp_path, grid: Grid, dim: int = 8, chunk_cells: int = 16):
    return EmbeddingStore.open(tmp_path / "store", key="k", n_cells=grid.n_cells, dim=dim,
                               attrs={}, chunk_cells=chunk_cells)


def _grid(seed: int = 0) -> Grid:
    mask = np.random.default_rng(seed).random((13, 21)) < 0.6
    mask[0, 0] = True
    return Grid(-5.0, 10.0, 0.5, 21, 13, mask=mask)


def _fine_scores(values: np.ndarray, query: np.ndarray) -> np.ndarray:
    return fuse_many({"location": values}, query[None])[0][0]


def _coarse_scores(level, query: np.ndarray) -> np.ndarray:
    cells = np.arange(level.grid.n_cells)
    emb, norms = level.vectors(cells)
    return fuse_many({"location": emb}, query[None], row_norms={"location": norms})[0][0]


def test_coarse_scores_are_the_mean_of_the_fine_scores(tmp_path):
    grid = _grid()
    store = _store(tmp_path, grid)
    rng = np.random.default_rng(1)
    values = rng.normal(size=(grid.n_cells, 8)).astype(np.float32)
    values[3] = np.nan  # a cell the modality could not embed
    for i in range(store.n_chunks):
        sl = store.chunk_slice(i)
        store.write_chunk(i, values[sl])
    stored = store.read()  # float16 on disk: the fine scores are those of what is stored
    pyramid = ensure_pyramid(store, grid, factors=[2, 4])
    assert [lv.factor for lv in pyramid.levels] == [2, 4]
    query = normalize(rng.normal(size=8).astype(np.float32))
    fine = _fine_scores(stored, query)
    rows, cols = grid.runs.rows_cols(slice(0, grid.n_cells))
    for level in pyramid.levels:
        f = level.factor
        coarse = _coarse_scores(level, query)
        assert level.grid.n_cells == len({(r // f, c // f) for r, c in zip(rows, cols)})
        target = level.grid.cells_at(rows // f, cols // f)
        assert (target >= 0).all()
        for cell in range(level.grid.n_cells):
            members = fine[target == cell]
            members = members[np.isfinite(members)]
            assert level.count[cell] == members.size
            if members.size:
                assert abs(coarse[cell] - members.mean()) < 1e-5
            else:
                assert np.isnan(coarse[cell])
    # the levels lie on the grid's origin: a coarse cell's centre is inside its fine cells' box
    top = pyramid.levels[-1].grid
    assert top.west == grid.west and top.north == grid.north and top.resolution == 2.0


def test_levels_are_built_again_when_the_store_is_resumed(tmp_path):
    grid = _grid(2)
    store = _store(tmp_path, grid)
    values = np.random.default_rng(3).normal(size=(grid.n_cells, 8)).astype(np.float32)
    half = store.n_chunks // 2
    for i in range(half):  # an interrupted run: the later blocks are not done
        store.write_chunk(i, values[store.chunk_slice(i)])
    first = ensure_pyramid(store, grid, factors=[2])
    embedded_then = int(first.levels[0].count.sum())
    assert embedded_then == store.chunk_slice(half - 1).stop
    assert open_pyramid(store, grid) is not None  # reused while the store is unchanged
    for i in range(half, store.n_chunks):  # the resumed run finishes the store
        store.write_chunk(i, values[store.chunk_slice(i)])
    assert open_pyramid(store, grid) is None  # stale: the store changed under it
    again = ensure_pyramid(store, grid, factors=[2])
    assert int(again.levels[0].count.sum()) == grid.n_cells
    assert again.fingerprint != first.fingerprint


def test_default_levels_stop_at_a_tile_wide():
    world = Grid(-180.0, 90.0, 0.05, 7200, 3600, mask=np.zeros((3600, 7200), bool))
    assert default_factors(world) == [2, 4, 8, 16, 32]
    assert default_factors(_grid()) == []


def test_gather_reads_the_cells_asked_for(tmp_path):
    """A map tile's cells from a store on disk: the rows read() gives; unfinished blocks NaN."""
    grid = _grid(4)
    store = _store(tmp_path, grid)
    values = np.random.default_rng(5).normal(size=(grid.n_cells, 8)).astype(np.float32)
    for i in range(store.n_chunks - 1):  # the last block is not done
        store.write_chunk(i, values[store.chunk_slice(i)])
    cells = np.array([0, 3, 17, 18, 40, grid.n_cells - 1])
    got = store.gather(cells)
    full = store.read()
    done = cells < store.chunk_slice(store.n_chunks - 1).start
    assert np.array_equal(got[done], full[cells[done]])
    assert np.isnan(got[~done]).all()


def test_the_cache_lists_stores_not_pyramids_and_deletes_both(tmp_path):
    from taxamap.store_cache import cached_stores, clear_stores

    grid = Grid(-5.0, 10.0, 0.5, 21, 13, mask=np.ones((13, 21), bool))
    location = tmp_path / "stores" / "g1" / "location-k"
    store = EmbeddingStore.open(location, key="k", n_cells=grid.n_cells, dim=8, attrs={},
                                chunk_cells=64)
    for i in range(store.n_chunks):
        store.write_chunk(i, np.ones((store.chunk_slice(i).stop - store.chunk_slice(i).start, 8),
                                     np.float32))
    ensure_pyramid(store, grid, factors=[2])
    assert (tmp_path / "stores" / "g1" / "location-k.pyramid").is_dir()
    assert [s.path.name for s in cached_stores(tmp_path)] == ["location-k"]
    clear_stores(tmp_path)
    assert not (tmp_path / "stores" / "g1").exists()


def test_taxamap_embed_builds_the_pyramid_with_the_store(models_dir, tmp_path):
    import taxamap
    from taxamap.store import EmbeddingStore as Store

    # 300 columns at 0.1 deg: wider than a map tile, so one 2x level
    stores = taxamap.embed(bbox=(-100.0, 40.0, -70.0, 41.0), resolution=0.1, models=models_dir,
                           cache=tmp_path, progress=False)
    location = stores["location"]
    store = Store.open_existing(location, Path(location).name.split("-", 1)[1])
    from taxamap.cells import build_grid
    from taxamap.options import GridOptions

    _, grid = build_grid(GridOptions(bbox=(-100.0, 40.0, -70.0, 41.0), resolution=0.1,
                                     cache=tmp_path))
    pyramid = open_pyramid(store, grid)
    assert pyramid is not None and [lv.factor for lv in pyramid.levels] == [2]
    assert int(pyramid.levels[0].count.sum()) == grid.n_cells


def _filled(tmp_path, grid: Grid) -> EmbeddingStore:
    store = _store(tmp_path, grid)
    values = np.random.default_rng(7).normal(size=(grid.n_cells, 8)).astype(np.float32)
    for i in range(store.n_chunks):
        store.write_chunk(i, values[store.chunk_slice(i)])
    return store


def test_two_servers_starting_together_build_the_pyramid_once(tmp_path, caplog):
    """Before: both built it and raced at the final rename (the loser served no pyramid)."""
    import logging
    import threading

    from taxamap.io import exclusive_lock

    grid = _grid(6)
    store = _filled(tmp_path, grid)
    got = []
    caplog.set_level(logging.INFO, logger="taxamap")
    # Both find no pyramid while a third party holds the build lock, then race for it.
    with exclusive_lock(tmp_path / "store.pyramid.lock"):
        starts = [threading.Thread(target=lambda: got.append(ensure_pyramid(store, grid, [2])))
                  for _ in range(2)]
        for t in starts:
            t.start()
    for t in starts:
        t.join(60)
    assert len(got) == 2 and all(p is not None for p in got)
    assert got[0].fingerprint == got[1].fingerprint
    built = [r for r in caplog.records if "building the embedding pyramid" in r.getMessage()]
    assert len(built) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "store", "store.lock", "store.pyramid", "store.pyramid.lock"]


def test_a_crashed_builds_leftovers_are_cleared_by_the_next_build(tmp_path):
    grid = _grid(8)
    store = _filled(tmp_path, grid)
    crashed = tmp_path / ".store.pyramid.4242.building"
    (crashed / "level_2").mkdir(parents=True)
    (crashed / "zarr.json").write_text("{")
    assert ensure_pyramid(store, grid, factors=[2]) is not None
    assert not crashed.exists()
    assert open_pyramid(store, grid) is not None
