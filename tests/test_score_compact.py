"""In-memory scoring without a float32 copy of the grid (issue 20): the cells are float16 rows
memory-mapped from the store's chunk files (or a float16 copy where a store cannot be mapped),
scored with torch's float16 kernels; scores equal float32 scoring of the same embeddings within
the bound (p99 |delta| <= 0.002), NaN cells and both fusions included."""

from __future__ import annotations

import numpy as np
import pytest

from taxamap.score import fuse_many, fuse_scored
from taxamap.scorer import CellMatrix, sum_norms
from taxamap.store import EmbeddingStore, store_key

P99_BOUND = 0.002
DIM = 64


def _store(location, seed: int, n: int = 5000, chunk: int = 1024, missing: float = 0.1):
    """A finished store of ``n`` unit embeddings (rows of NaN where a cell has none)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[rng.random(n) < missing] = np.nan
    store = EmbeddingStore.open(location, key=store_key({"g": seed}, "location", "m@1", {}),
                                n_cells=n, dim=DIM, attrs={}, chunk_cells=chunk)
    for i in range(store.n_chunks):
        store.write_chunk(i, emb[store.chunk_slice(i)])
    return store


def _queries(s: int, seed: int = 9) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(s, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _within_bound(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))  # the same cells are NaN
    delta = np.abs(ours - theirs)[np.isfinite(theirs)]
    assert np.quantile(delta, 0.99) <= P99_BOUND and delta.max() <= 2 * P99_BOUND


def test_a_local_store_is_mapped_not_copied(tmp_path):
    store = _store(str(tmp_path / "s"), 1)
    cells = CellMatrix.from_store(store)
    assert all(cells.mapped)
    assert cells.mapped_bytes == store.n_cells * DIM * 2
    # What this process holds: the row lengths, no float32 (nor float16) copy of the cells.
    assert cells.held_bytes == store.n_cells * 4
    import torch

    assert {t.dtype for _, t in cells.blocks} == {torch.float16}
    theirs, _ = fuse_many({"location": store.read()}, _queries(3), "mean")
    _within_bound(cells.cosines(_queries(3)), theirs)


def test_a_store_at_a_url_is_held_as_float16(tmp_path):
    pytest.importorskip("fsspec")
    store = _store(f"memory://compact-{tmp_path.name}/s", 2)
    cells = CellMatrix.from_store(store)
    assert not any(cells.mapped) and cells.mapped_bytes == 0
    assert cells.held_bytes == store.n_cells * DIM * 2 + store.n_cells * 4
    theirs, _ = fuse_many({"location": store.read()}, _queries(1), "mean")
    _within_bound(cells.cosines(_queries(1)), theirs)


def test_several_queries_are_one_product_equal_to_single_queries(tmp_path):
    cells = CellMatrix.from_store(_store(str(tmp_path / "s"), 3))
    q = _queries(5)
    many = cells.cosines(q)
    singles = np.stack([cells.cosines(q[i:i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(many, singles, atol=2e-3, equal_nan=True)


@pytest.mark.parametrize("fusion", ["mean", "sum"])
def test_fusion_of_two_modalities_equals_float32(tmp_path, fusion):
    a = _store(str(tmp_path / "a"), 4, missing=0.2)
    b = _store(str(tmp_path / "b"), 5, missing=0.2)
    cells = {"location": CellMatrix.from_store(a), "satellite": CellMatrix.from_store(b)}
    q = _queries(4)
    per = {m: c.cosines(q) for m, c in cells.items()}
    fused = fuse_scored(per, fusion, sum_norms(cells) if fusion == "sum" else None)
    f32, per32 = fuse_many({"location": a.read(), "satellite": b.read()}, q, fusion)
    for m in per:
        _within_bound(per[m], per32[m])
    _within_bound(fused, f32)
    # A cell neither modality embedded is NaN; one that only one did takes that one's score.
    none = np.isnan(a.read()[:, 0]) & np.isnan(b.read()[:, 0])
    assert none.any() and np.isnan(fused[:, none]).all()
