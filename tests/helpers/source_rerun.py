"""Embed cells through a satellite source into a small store, as ``predict`` does, for rerun tests.

Blocks of ``CHUNK`` cells: a test makes some cells fail on the first run, checks that exactly
their blocks are left unfinished, repairs the source and runs again.
"""

from __future__ import annotations

import numpy as np

from taxamap import engine
from taxamap.store import EmbeddingStore

CHUNK = 2


def embed_through(source, latlon: np.ndarray, encoder, location) -> EmbeddingStore:
    """Fill (or resume) the store at ``location`` with ``source``'s satellite embeddings."""
    embedder = engine.satellite_embedder(encoder, source, batch_cells=CHUNK, workers=1)
    store = EmbeddingStore.open(location, key="rerun-test", n_cells=len(latlon), dim=embedder.dim,
                                attrs={"source": embedder.source}, chunk_cells=CHUNK)
    engine.embed_to_store(latlon, embedder, store, progress=False)
    return store
