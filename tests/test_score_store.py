"""Scoring, fusion and the embedding store (without models)."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from taxamap.errors import TaxamapError
from taxamap.grid import make_grid
from taxamap.options import parse_modalities
from taxamap.score import cosine, fuse, normalize
from taxamap.store import EmbeddingStore, store_key


def _rand(n, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_cosine_is_raw_and_handles_nan():
    e = _rand(5)
    e[2] = np.nan
    q = _rand(1, seed=1)[0]
    got = cosine(e, q)
    expected = (e @ q) / (np.linalg.norm(e, axis=1) * np.linalg.norm(q))
    assert np.isnan(got[2])
    ok = [0, 1, 3, 4]
    assert np.allclose(got[ok], expected[ok], atol=1e-6)
    assert np.all(np.abs(got[ok]) <= 1.0)


def test_fusion_rules_over_available_modalities():
    a, b, q = _rand(4, seed=1), _rand(4, seed=2), _rand(1, seed=3)[0]
    b[1] = np.nan  # e.g. a missing satellite tile
    fused, per = fuse({"location": a, "satellite": b}, q, "mean")
    assert np.isclose(fused[0], (per["location"][0] + per["satellite"][0]) / 2)
    assert np.isclose(fused[1], per["location"][1])  # only the modality the cell has
    fused_sum, _ = fuse({"location": a, "satellite": b}, q, "sum")
    s = normalize(normalize(a[0]) + normalize(b[0]))
    assert np.isclose(fused_sum[0], s @ normalize(q), atol=1e-6)
    assert np.isclose(fused_sum[1], per["location"][1], atol=1e-6)
    both_missing = {"location": np.full((1, 8), np.nan, np.float32)}
    assert np.isnan(fuse(both_missing, q)[0][0])
    with pytest.raises(TaxamapError):
        fuse({"location": a}, q, "max")


def test_parse_modalities_orders_and_rejects():
    assert parse_modalities("environment, location") == ["location", "environment"]
    with pytest.raises(TaxamapError, match="unknown modality"):
        parse_modalities("location,sound")


def test_grid_transform_and_centres():
    grid = make_grid(shapely.box(-10.02, 40.01, -9.0, 41.0), 0.25)
    assert grid.west == -10.25 and grid.north == 41.0
    latlon = grid.cell_latlon()
    assert grid.transform @ (0.5, 0.5) == (grid.west + 0.125, grid.north - 0.125)
    assert latlon[0, 0] == pytest.approx(40.875) and latlon[0, 1] == pytest.approx(-9.875)
    raster = grid.to_raster(np.arange(grid.n_cells))
    assert np.isnan(raster[~grid.mask]).all() and (raster[grid.mask] == np.arange(grid.n_cells)).all()


def test_resolution_errors():
    with pytest.raises(TaxamapError, match="positive"):
        make_grid(shapely.box(0, 0, 1, 1), 0)
    with pytest.raises(TaxamapError, match="memory"):
        make_grid(shapely.box(-180, -90, 180, 90), 0.001)


def test_store_blocks_resume_and_key_guard(tmp_path):
    attrs = {"modality": "location"}
    key = store_key({"g": 1}, "location", "m@1", {})
    store = EmbeddingStore.open(tmp_path / "s", key=key, n_cells=10, dim=4, attrs=attrs, chunk_cells=4)
    assert store.n_chunks == 3 and store.pending_chunks() == [0, 1, 2]
    values = _rand(10, 4)
    store.write_chunk(1, values[4:8])
    reopened = EmbeddingStore.open(tmp_path / "s", key=key, n_cells=10, dim=4, attrs=attrs, chunk_cells=4)
    assert reopened.pending_chunks() == [0, 2]
    assert np.allclose(reopened.read()[4:8], values[4:8], atol=1e-2)
    assert np.isnan(reopened.read()[0]).all()
    other = store_key({"g": 2}, "location", "m@1", {})
    with pytest.raises(TaxamapError, match="other settings"):
        EmbeddingStore.open(tmp_path / "s", key=other, n_cells=10, dim=4, attrs=attrs)
    replaced = EmbeddingStore.open(tmp_path / "s", key=other, n_cells=10, dim=4, attrs=attrs,
                                   chunk_cells=4, must_match=False)
    assert replaced.pending_chunks() == [0, 1, 2]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_store_at_fsspec_url(tmp_path, scheme):
    url = f"file://{tmp_path}/s/location" if scheme == "file" else f"memory://taxamap-test-{id(tmp_path)}/location"
    store = EmbeddingStore.open(url, key="k", n_cells=10, dim=4, attrs={}, chunk_cells=4)
    store.write_chunk(2, np.ones((2, 4), np.float32))
    again = EmbeddingStore.open_existing(url, "k")
    assert again.pending_chunks() == [0, 1]
    assert np.allclose(again.read()[8:], 1.0)


def test_concurrent_creation_keeps_written_blocks(tmp_path):
    """A second opener arriving while the first has already written a block must not clear it."""
    import threading

    key = store_key({"g": 3}, "location", "m@1", {})
    kw = dict(key=key, n_cells=8, dim=4, attrs={}, chunk_cells=4)
    first = EmbeddingStore.open(tmp_path / "s", **kw)
    first.write_chunk(0, np.ones((4, 4), np.float32))
    results = []
    threads = [threading.Thread(target=lambda: results.append(EmbeddingStore.open(tmp_path / "s", **kw)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s.pending_chunks() == [1] for s in results)
    assert np.allclose(results[0].read()[:4], 1.0)
    assert (tmp_path / "s.lock").exists()


def test_store_creation_waits_for_the_lock(tmp_path):
    import fcntl
    import threading
    import time

    key = store_key({"g": 4}, "location", "m@1", {})
    lock = tmp_path / "s.lock"
    opened = []
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: opened.append(EmbeddingStore.open(
            tmp_path / "s", key=key, n_cells=8, dim=4, attrs={}, chunk_cells=4)))
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and not opened  # another process is creating it: wait
        fcntl.flock(handle, fcntl.LOCK_UN)
    t.join(10)
    assert opened and opened[0].pending_chunks() == [0, 1]
