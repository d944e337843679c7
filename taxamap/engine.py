"""The embedding engine: stream a grid's cells through a modality's source and encoder.

Each modality is a :class:`CellEmbedder` split in two halves: ``prepare`` does I/O (fetch tiles,
read climate rasters) and runs in background threads, ``compute`` runs the encoder on the main
thread. The engine keeps a couple of blocks prepared ahead, so fetching and decoding overlap with
compute, and holds one block of inputs and outputs at a time: memory stays flat as grids grow.
"""

from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from taxamap.store import EmbeddingStore


@dataclass
class CellEmbedder:
    """How one modality turns (lat, lon) cell centres into embeddings."""

    modality: str
    model_ref: str
    source: dict
    prepare: Callable[[np.ndarray], Any]
    compute: Callable[[Any], np.ndarray]
    dim: int = 512
    attribution: str | None = None
    license: str | None = None
    stats: dict = field(default_factory=dict)


def location_embedder(encoder) -> CellEmbedder:
    return CellEmbedder(
        modality="location",
        model_ref=encoder.ref,
        source={"kind": "coordinates"},
        prepare=lambda latlon: np.asarray(latlon, dtype=np.float32),
        compute=encoder.encode,
        dim=encoder.dim,
    )


def satellite_embedder(encoder, source) -> CellEmbedder:
    """Cells whose patch could not be fetched get a NaN row, never a black-image embedding."""

    def compute(patches) -> np.ndarray:
        out = np.full((len(patches), 512), np.nan, dtype=np.float32)
        ok = [i for i, p in enumerate(patches) if p is not None]
        if ok:
            out[ok] = encoder.encode([patches[i] for i in ok])
        return out

    emb = CellEmbedder(
        modality="satellite",
        model_ref=encoder.ref,
        source=source.describe(),
        prepare=source.fetch,
        compute=compute,
        attribution=getattr(source, "attribution", None),
        license=getattr(source, "license", None),
    )
    return emb


def environment_embedder(encoder, features) -> CellEmbedder:
    return CellEmbedder(
        modality="environment",
        model_ref=encoder.ref,
        source=features.describe(),
        prepare=features.features,
        compute=encoder.encode,
    )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="cell", unit_scale=True, disable=not enabled,
        file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
    )


def run_blocks(
    latlon: np.ndarray,
    embedder: CellEmbedder,
    blocks: list[tuple[int, slice]],
    sink: Callable[[int, np.ndarray], None],
    *,
    progress: bool = True,
    prefetch: int = 2,
    workers: int = 1,
    already_done: int = 0,
) -> None:
    """Embed each (block id, cell slice) and hand the result to ``sink(block_id, emb)``."""
    total = latlon.shape[0]
    bar = _progress(total, f"embedding {embedder.modality}", progress)
    bar.update(already_done)
    queue: deque = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="taxamap-prep") as pool:
        pending = iter(blocks)

        def submit_next() -> bool:
            nxt = next(pending, None)
            if nxt is None:
                return False
            block_id, sl = nxt
            queue.append((block_id, sl, pool.submit(embedder.prepare, latlon[sl])))
            return True

        for _ in range(max(1, prefetch)):
            if not submit_next():
                break
        try:
            while queue:
                block_id, sl, future = queue.popleft()
                inputs = future.result()
                submit_next()
                emb = np.asarray(embedder.compute(inputs), dtype=np.float32)
                sink(block_id, emb)
                bar.update(sl.stop - sl.start)
        finally:
            for _, _, future in queue:
                future.cancel()
            bar.close()


def embed_to_store(
    latlon: np.ndarray,
    embedder: CellEmbedder,
    store: EmbeddingStore,
    *,
    progress: bool = True,
    chunks: list[int] | None = None,
) -> int:
    """Compute the store's unfinished blocks (or just ``chunks``); returns how many were computed."""
    todo = store.pending_chunks() if chunks is None else list(chunks)
    if not todo:
        return 0
    blocks = [(i, store.chunk_slice(i)) for i in todo]
    done_cells = store.n_cells - sum(sl.stop - sl.start for _, sl in blocks) if chunks is None else 0
    run_blocks(latlon, embedder, blocks, store.write_chunk, progress=progress,
               already_done=done_cells)
    return len(blocks)


def embed_in_memory(
    latlon: np.ndarray,
    embedder: CellEmbedder,
    *,
    block_cells: int = 16384,
    progress: bool = True,
) -> np.ndarray:
    """All cells' embeddings as one float32 array (for small grids and tests)."""
    n = latlon.shape[0]
    out = np.empty((n, embedder.dim), dtype=np.float32)
    blocks = [(i, slice(s, min(s + block_cells, n))) for i, s in enumerate(range(0, n, block_cells))]

    def sink(block_id: int, emb: np.ndarray) -> None:
        sl = blocks[block_id][1]
        out[sl] = emb

    run_blocks(latlon, embedder, blocks, sink, progress=progress)
    return out
