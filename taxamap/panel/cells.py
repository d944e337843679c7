"""Cell embeddings a block at a time, from stores (on disk) or arrays (a web session's memory).

Everything the panel computes streams the grid's cells through these, so memory holds a few
blocks of embeddings however large the grid, and the same code serves ``predict`` (stores) and
the web app (arrays already in memory).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

#: Cells per block read from a store (one store chunk: each is CRC-checked once, whole).
READ_CELLS = 16384


def store_blocks(stores: Mapping[str, object], block_cells: int = READ_CELLS
                 ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """(rows, {modality: (rows, D) float32}) over every cell of ``stores`` (EmbeddingStores of
    one grid), the next block read in a thread while the caller works on this one."""
    from concurrent.futures import ThreadPoolExecutor

    n = next(iter(stores.values())).n_cells
    starts = list(range(0, n, block_cells))

    def read(start: int) -> dict:
        rows = slice(start, min(start + block_cells, n))
        return {m: st.read(rows) for m, st in stores.items()}

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="taxamap-panel-read") as pool:
        nxt = pool.submit(read, starts[0]) if starts else None
        for i, start in enumerate(starts):
            block = nxt.result()
            if i + 1 < len(starts):
                nxt = pool.submit(read, starts[i + 1])
            yield slice(start, min(start + block_cells, n)), block


def array_blocks(embeddings: Mapping[str, np.ndarray], block_cells: int = READ_CELLS
                 ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """The same blocks from (N, D) arrays held in memory (views, nothing copied)."""
    n = next(iter(embeddings.values())).shape[0]
    for start in range(0, n, block_cells):
        rows = slice(start, min(start + block_cells, n))
        yield rows, {m: e[rows] for m, e in embeddings.items()}


def read_cell(stores: Mapping[str, object], cell: int) -> dict[str, np.ndarray]:
    """One cell's embeddings, {modality: (1, D) float32}, from stores or in-memory arrays."""
    out = {}
    for modality, source in stores.items():
        if isinstance(source, np.ndarray):
            out[modality] = np.asarray(source[cell:cell + 1], dtype=np.float32)
        else:
            out[modality] = source.read(slice(cell, cell + 1))
    return out


def n_cells(stores: Mapping[str, object]) -> int:
    """How many cells ``stores`` (stores or arrays) hold."""
    first = next(iter(stores.values()))
    return int(first.shape[0] if isinstance(first, np.ndarray) else first.n_cells)


def blocks(stores: Mapping[str, object], block_cells: int = READ_CELLS
           ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """:func:`store_blocks` or :func:`array_blocks`, whichever ``stores`` holds."""
    first = next(iter(stores.values()))
    if isinstance(first, np.ndarray):
        return array_blocks(stores, block_cells)
    return store_blocks(stores, block_cells)


__all__ = ["READ_CELLS", "array_blocks", "blocks", "n_cells", "read_cell", "store_blocks"]
