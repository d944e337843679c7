"""Scale-out on Dask: blocks of a grid embedded on distributed workers, written straight to the
shared store (a path every worker can reach, or an fsspec URL).

Each worker builds its modality's encoder and source once (cached per process) and runs the very
same ``prepare`` + ``compute`` as a single-process run on the same blocks, so the store it leaves
equals the local one (float16 values; any difference is float rounding from thread counts).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option

_EMBEDDERS: dict = {}


def open_client(address: str):
    """``local`` or ``local:N`` starts a LocalCluster of N single-threaded processes; anything else
    is a scheduler address (``tcp://host:8786``). Returns (client, cluster or None)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise TaxamapError(f"{option('dask')} needs dask.distributed: pip install "
                           "'dask[distributed]'") from exc
    if address == "local" or address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1]) if ":" in address else (os.cpu_count() or 1)
        except ValueError as exc:
            raise TaxamapError(f"{option('dask', address)}: use local or local:N (N workers)") \
                from exc
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(address, timeout="20s"), None
    except OSError as exc:
        raise TaxamapError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc


def _embed_block(options, config: dict, modality: str, location: str, key: str, block_id: int,
                 latlon: np.ndarray, redo: bool = False) -> bool:
    """Runs on a worker: claim one block, embed it and commit it to the store. Returns False,
    computing nothing, when another run (a local ``taxamap embed``, another cluster) holds the
    block's claim or has just finished it (unless ``redo``: a block found damaged): the driver
    waits for (and checks) that run's block instead."""
    import torch

    from taxamap.claims import BlockClaims
    from taxamap.devices import pick_device
    from taxamap.modalities import build_embedder
    from taxamap.store import EmbeddingStore

    with BlockClaims(location, label=modality) as claims:
        if not claims.take(block_id):
            return False
        store = EmbeddingStore.open_existing(location, key)
        if not redo and store.finished([block_id]):
            return False
        cache_key = (modality, key)
        embedder = _EMBEDDERS.get(cache_key)
        if embedder is None:
            device = pick_device(options.device)
            try:
                from distributed import get_worker

                # One intra-op thread per worker thread: workers already fill the cores.
                torch.set_num_threads(max(1, get_worker().state.nthreads))
            except (ImportError, ValueError):
                pass
            embedder = build_embedder(modality, options, config, device)
            _EMBEDDERS[cache_key] = embedder
        from taxamap.engine import run_blocks

        def sink(_: int, values: np.ndarray, complete: bool) -> None:
            store.write_chunk(block_id, values, complete)

        # The same batching as a local run: a satellite block streams through in small batches.
        run_blocks(latlon, embedder, [(block_id, slice(0, latlon.shape[0]))], sink,
                   progress=False)
    return True


def embed_on_dask(options, config: dict, modality: str, store, latlon: np.ndarray,
                  chunks: list[int] | None = None) -> int:
    """Submit every unfinished block of ``store`` (or ``chunks``) to the cluster; returns how many
    its workers computed. Blocks another run has claimed are waited for, not computed twice."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from taxamap.claims import BlockClaims, wait_for_blocks

    client, cluster = open_client(options.dask)
    computed = 0
    try:
        todo = store.pending_chunks() if chunks is None else list(chunks)
        bar = tqdm(total=len(todo), desc=f"embedding {modality} on dask", unit="block",
                   disable=not options.progress, file=sys.stderr)
        claims = BlockClaims(store.location, label=modality)  # only asked who holds a block
        round_, redo = 0, set(store.damaged)
        while todo:
            futures = {}
            for i in todo:
                sl = store.chunk_slice(i)
                future = client.submit(
                    _embed_block, options, config, modality, store.location, store.key, i,
                    np.ascontiguousarray(latlon[sl]), i in redo, pure=False,
                    key=f"taxamap-{store.key}-{i}-{round_}",
                )
                futures[future] = i
            elsewhere = []
            for future in as_completed(futures):
                if future.result():  # re-raises a worker's error here
                    computed += 1
                    bar.update(1)
                else:
                    elsewhere.append(futures[future])
            todo = wait_for_blocks(store, claims, elsewhere) if elsewhere else []
            redo.update(store.damaged)  # as embed_to_store: damaged blocks only
            round_ += 1
        bar.close()
        return computed
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
