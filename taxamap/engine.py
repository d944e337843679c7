"""The embedding engine: stream a grid's cells through a modality's source and encoder.

Each modality is a :class:`CellEmbedder` split in two halves: ``prepare`` does I/O (fetch tiles,
read climate rasters) and runs in background threads, ``compute`` runs the encoder on the main
thread. The engine keeps a couple of blocks prepared ahead, so fetching and decoding overlap with
compute, and holds one block of inputs and outputs at a time: memory stays flat as grids grow.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from taxamap.claims import BlockClaims, wait_for_blocks
from taxamap.io import DiskFull
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
    #: Cells per prepare/compute step. Stores commit larger blocks; a block is streamed through
    #: in batches so that e.g. only a few hundred decoded tiles are in memory at once.
    batch_cells: int = 16384
    #: Threads running ``prepare`` ahead of ``compute`` (fetching, decoding, preprocessing).
    workers: int = 1
    #: How many cells of a prepared batch failed for a reason a rerun may fix (a tile or patch
    #: still failing after retries, an unreadable window). A block with such cells is written but
    #: not recorded complete.
    failures: Callable[[Any], int] | None = None


def location_embedder(encoder) -> CellEmbedder:
    return CellEmbedder(
        modality="location",
        model_ref=encoder.ref,
        source={"kind": "coordinates"},
        prepare=lambda latlon: np.asarray(latlon, dtype=np.float32),
        compute=encoder.encode,
        dim=encoder.dim,
    )


def satellite_embedder(encoder, source, batch_cells: int | None = None,
                       workers: int | None = None) -> CellEmbedder:
    """Cells whose patch could not be fetched get a NaN row, never a black-image embedding.

    Fetching and preprocessing (resize, crop, normalise) run in ``prepare`` threads; only the
    forward pass runs in ``compute``, so the encoder's device never waits on PIL.
    """

    def prepare(latlon):
        # Every source says which missing patches failed (taxamap.sources.base): a block holding
        # any is stored unfinished, so a rerun fetches it again, whatever the source.
        patches, failed = source.fetch_status(latlon)
        ok = [i for i, p in enumerate(patches) if p is not None]
        pixels = encoder.preprocess([patches[i] for i in ok]) if ok else None
        return len(patches), ok, pixels, sum(failed)

    def compute(prepared) -> np.ndarray:
        n, ok, pixels, _ = prepared
        out = np.full((n, encoder.embed_dim), np.nan, dtype=np.float32)
        if ok:
            out[ok] = encoder.encode_pixels(pixels)
        return out

    on_gpu = str(getattr(encoder, "device", "cpu")).startswith("cuda")
    return CellEmbedder(
        modality="satellite",
        model_ref=encoder.ref,
        source=source.describe(),
        prepare=prepare,
        compute=compute,
        dim=encoder.embed_dim,
        failures=lambda prepared: prepared[3],
        batch_cells=batch_cells or (512 if on_gpu else 64),
        # Decoding and resizing tiles is CPU work that releases the GIL: one thread per core
        # (up to 8) keeps a GPU fed; on a small CPU the encoder itself is the bottleneck.
        workers=workers or max(2, min(8, os.cpu_count() or 1)),
    )


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
    sink: Callable[[int, np.ndarray, bool], None],
    *,
    progress: bool = True,
    already_done: int = 0,
    claim: Callable[[int], bool] | None = None,
) -> int:
    """Embed each (block id, cell slice) and hand the whole block to
    ``sink(block_id, emb, complete)``; returns how many cells failed (see
    :attr:`CellEmbedder.failures`). ``complete`` is False for a block holding such cells.

    Blocks are cut into batches of ``embedder.batch_cells``; up to ``workers + 1`` batches are
    prepared ahead in threads while the current one is computed. A block's result is handed over
    only when all its batches are done, so a store commits whole blocks. With ``claim``, each
    block is claimed just before its first batch is prepared and skipped when ``claim`` says
    another run has it (:mod:`taxamap.claims`).
    """
    total = latlon.shape[0]
    bar = _progress(total, f"embedding {embedder.modality}", progress)
    bar.update(already_done)
    step = max(1, int(embedder.batch_cells))

    def claimed_batches():
        for block_id, sl in blocks:
            if claim is not None and not claim(block_id):
                continue
            for start in range(sl.start, sl.stop, step):
                yield block_id, sl, slice(start, min(start + step, sl.stop))

    workers = max(1, int(embedder.workers))
    queue: deque = deque()
    buffers: dict[int, np.ndarray] = {}
    remaining = {block_id: sl.stop - sl.start for block_id, sl in blocks}
    failed = {block_id: 0 for block_id, _ in blocks}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="taxamap-prep") as pool:
        pending = claimed_batches()

        def submit_next() -> bool:
            nxt = next(pending, None)
            if nxt is None:
                return False
            block_id, sl, part = nxt
            queue.append((block_id, sl, part, pool.submit(embedder.prepare, latlon[part])))
            return True

        for _ in range(workers + 1):
            if not submit_next():
                break
        try:
            while queue:
                block_id, sl, part, future = queue.popleft()
                inputs = future.result()
                submit_next()
                if embedder.failures is not None:
                    failed[block_id] += int(embedder.failures(inputs))
                emb = np.asarray(embedder.compute(inputs), dtype=np.float32)
                buf = buffers.get(block_id)
                if buf is None:
                    buf = buffers[block_id] = np.empty((sl.stop - sl.start, emb.shape[1]), np.float32)
                buf[part.start - sl.start:part.stop - sl.start] = emb
                remaining[block_id] -= part.stop - part.start
                if remaining[block_id] == 0:
                    sink(block_id, buffers.pop(block_id), failed[block_id] == 0)
                bar.update(part.stop - part.start)
        finally:
            for *_, future in queue:
                future.cancel()
            bar.close()
    return sum(failed.values())


def embed_to_store(
    latlon: np.ndarray,
    embedder: CellEmbedder,
    store: EmbeddingStore,
    *,
    progress: bool = True,
    chunks: list[int] | None = None,
) -> int:
    """Compute the store's unfinished blocks (or just ``chunks``); returns how many this run
    computed. Blocks are claimed first (:mod:`taxamap.claims`): a block another live run is
    computing is left to it and waited for (and checked) instead of being computed twice."""
    todo = store.pending_chunks() if chunks is None else list(chunks)
    if not todo:
        return 0
    # Blocks found damaged are computed even where their flag still says done (a store whose
    # flags cannot be written); others are left to a run that finished them since.
    redo = set(store.damaged)
    done_cells = store.n_cells - sum(store.chunk_slice(i).stop - store.chunk_slice(i).start
                                     for i in todo)
    computed: list[int] = []
    failed = 0
    with BlockClaims(store.location, label=embedder.modality) as claims:

        def claim(i: int) -> bool:
            if not claims.take(i):
                return False
            if i not in redo and store.finished([i]):  # another run wrote it since we listed it
                claims.release(i)
                return False
            return True

        def sink(i: int, values: np.ndarray, complete: bool) -> None:
            store.write_chunk(i, values, complete)
            claims.release(i)
            computed.append(i)

        work = todo
        while work:
            blocks = [(i, store.chunk_slice(i)) for i in work]
            try:
                failed += run_blocks(latlon, embedder, blocks, sink, progress=progress,
                                     already_done=done_cells, claim=claim)
            except DiskFull as exc:
                if not exc.per_cell:
                    raise
                # A cache knows its bytes per cell, the store how many cells are left: the
                # step's need.
                raise exc.needing(int(exc.per_cell * store.cells_left())) from None
            others = [i for i in work if i not in computed]
            work = wait_for_blocks(store, claims, others) if others else []
            # Only blocks that landed damaged skip the claim's "finished since" check: a block
            # whose run ended without it is computed anyway, and one that lands meanwhile is not.
            redo.update(store.damaged)
            progress = False  # one bar; later rounds are the few blocks other runs dropped
    if failed:
        logging.getLogger("taxamap").info(f"{embedder.modality}: {failed:,} cells failed to fetch and are NaN in this map; their "
            "blocks are left unfinished in the store, so running the same command again retries "
            "them (fetched tiles come from the cache)")
    return len(computed)


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

    def sink(block_id: int, emb: np.ndarray, complete: bool = True) -> None:
        sl = blocks[block_id][1]
        out[sl] = emb

    run_blocks(latlon, embedder, blocks, sink, progress=progress)
    return out
