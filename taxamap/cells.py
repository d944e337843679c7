"""The cells of a request: its region and grid, and every modality's stored cell embeddings.

Cell embeddings do not depend on the query, so they live in an
:class:`~taxamap.store.EmbeddingStore` per (grid, modality, model, source) and are computed once:
:func:`embed_cells` completes the stores (only the missing or damaged blocks), and
:func:`read_repairing` embeds again a block found damaged while it is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.grid import Grid, make_grid
from taxamap.modalities import licence_notice, plan_modality
from taxamap.paths import check_folder, checked_cache_root

if TYPE_CHECKING:  # pragma: no cover
    from taxamap.options import GridOptions


T = TypeVar("T")
_logger = logging.getLogger("taxamap")


def log(message: str) -> None:
    """Progress and facts for the user (the CLI shows them on stderr; stdout is for results)."""
    _logger.info(message)


def check_grid_paths(options: GridOptions) -> None:
    """The cache, the store and the models folder of ``options``, checked before any work: a
    read-only, misplaced or looping folder is one line naming it (see :func:`check_folder`)."""
    checked_cache_root(options.cache)
    if options.store:
        # A store folder that exists may be read-only (a finished store, shared): whether it
        # must be written is known per modality, in embed_cells, before its first block.
        check_folder(options.store, "--store", write=not Path(str(options.store)).expanduser().exists())
    models = options.models or os.environ.get("TAXAMAP_MODELS")
    if models:
        check_folder(models, "--models" if options.models else "TAXAMAP_MODELS", write=False)


def build_grid(options: GridOptions):
    """Resolve the region and lay the grid over it; returns (region, grid).

    Logs the grid's size and, with ``cells`` "land" or "water", how many of the region's cells
    the mask removed.
    """
    from taxamap.geography import resolve_region

    region = resolve_region(options.region, options.bbox, cells=options.cells)
    grid, outline_cells = cached_grid(region, options.resolution, options.cache)
    log(f"region {region.name}: {grid.n_cells:,} cells of {grid.resolution} deg "
        f"({grid.width} x {grid.height} grid)")
    if outline_cells is not None and outline_cells > grid.n_cells:
        # a box wholly on land needs no word about the mask
        other = "water" if region.cells == "land" else "land"
        log(f"{region.cells} mask: {outline_cells - grid.n_cells:,} {other} cells removed")
    return region, grid


#: Grids over frames of more cells than this are kept in the cache (``<cache>/grids``): laying
#: the world at 0.05 deg tests 25 M cell centres (~25 s), reading its runs back takes ~0.1 s;
#: the USA at 0.05 deg (a 575,688-cell frame) took 1.9 s of a 5 s warm predict (the layout and
#: the count of the cells its land mask removed), read back 5 ms. Smaller frames lay out in a
#: fraction of a second and leave no file.
GRID_CACHE_FRAME = 200_000
#: Bumped when the layout of a cached grid file changes.
GRID_CACHE_FORMAT = 2


def _outline_cells(region, resolution: float) -> int | None:
    """How many cells the region's outline holds before its land (or water) mask: what the
    mask removed is this less the grid's cells. None where no mask applies, or where counting
    means another pass over a frame far larger than any grid taxamap accepts."""
    from taxamap.grid import MAX_CELLS, count_cells

    if region.cells == "all":
        return None
    west, south, east, north = region.outline.bounds
    if (east - west) * (north - south) / resolution ** 2 > MAX_CELLS:
        return None
    return count_cells(region.outline, resolution)


def cached_grid(region, resolution: float, cache=None) -> tuple[Grid, int | None]:
    """:func:`~taxamap.grid.make_grid` over ``region`` and :func:`_outline_cells`, read from the
    cache when a large frame was laid out before (keyed on the geometry's bytes, the outline's,
    the resolution and the cell choice)."""
    import hashlib

    from taxamap.grid import Runs, check_resolution
    from taxamap.io import atomic_path
    from taxamap.paths import cache_subdir

    check_resolution(resolution, region.geometry.bounds)
    west, south, east, north = region.geometry.bounds
    if (east - west) * (north - south) / resolution ** 2 <= GRID_CACHE_FRAME:
        return (make_grid(region.geometry, resolution, cells=region.cells),
                _outline_cells(region, resolution))
    import shapely

    digest = hashlib.sha1(shapely.to_wkb(region.geometry, output_dimension=2))
    digest.update(shapely.to_wkb(region.outline, output_dimension=2))
    digest.update(f"{GRID_CACHE_FORMAT}|{resolution!r}|{region.cells}".encode())
    path = cache_subdir("grids", cache) / f"{digest.hexdigest()[:20]}.npz"
    try:
        with np.load(path) as f:
            frame = f["frame"]
            runs = Runs.from_parts([f["row"]], [f["col"]], [f["length"]], np.diff(f["row_runs"],
                                                                           prepend=0))
            outline = int(f["outline_cells"])
        return (Grid(float(frame[0]), float(frame[1]), resolution, int(frame[2]), int(frame[3]),
                     cells=region.cells, runs=runs), outline if outline >= 0 else None)
    except (OSError, KeyError, ValueError):  # absent or unreadable: lay it out again
        pass
    log(f"laying out the {resolution} deg grid over {region.name} (kept in the cache for next "
        "time)")
    grid = make_grid(region.geometry, resolution, cells=region.cells)
    outline = _outline_cells(region, resolution)
    with contextlib.suppress(OSError, TaxamapError):  # a read-only or full cache only costs the next run the layout
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, what="caching the grid") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, frame=np.array([grid.west, grid.north, grid.width, grid.height]),
                         row=grid.runs.row, col=grid.runs.col, length=grid.runs.length,
                         row_runs=grid.runs.row_runs,
                         outline_cells=np.int64(-1 if outline is None else outline))
    return grid, outline


@dataclass
class CellEmbeddings:
    """The stores of one grid, one per modality, with what the outputs must credit."""

    stores: dict
    model_refs: dict[str, str]
    attribution: str | None
    license: str | None
    computed_blocks: dict[str, int]
    #: Per modality, its source's describe() (what the satellite patches were: GeoTIFF tags).
    sources: dict[str, dict] = field(default_factory=dict)
    #: Per modality with a precision choice (location, environment), its encoder's precision.
    precisions: dict[str, str] = field(default_factory=dict)


def _complete_store(location: str, key: str):
    """The store at ``location`` if it exists, has ``key``, sound metadata and check records, and
    no unfinished or damaged block (by its records and file sizes; the CRCs are checked as the
    cells are read); else None."""
    from taxamap.store import EmbeddingStore

    try:
        store = EmbeddingStore.open_existing(location, key)
    except Exception:  # absent, half-created, another key, damaged: the full path below decides
        return None
    if store.check is None:  # format 1: its check records are made under the creation lock
        return None
    return store if store.is_complete() else None


def _fill_store(options: GridOptions, config: dict, modality: str, store, latlon: np.ndarray,
                embedder, chunks: list[int] | None = None, precision: str = "fp32") -> int:
    """Compute ``store``'s unfinished blocks (or ``chunks``) here or on Dask; returns how many
    this run computed (``precision``: the one the store's key was made with)."""
    from taxamap import engine

    if options.dask:
        from taxamap.distributed import embed_on_dask
        from taxamap.options import with_options

        # Pinned: a worker with other CPU flags must not pick another precision under "auto".
        pinned = with_options(options, precision=precision)
        return embed_on_dask(pinned, config, modality, store, latlon, chunks=chunks)
    return engine.embed_to_store(latlon, embedder, store, progress=options.progress, chunks=chunks)


def embed_cells(options: GridOptions, grid: Grid, config: dict,
                device: Callable[[], str], *, region: str | None = None,
                verify: bool = False) -> CellEmbeddings:
    """Make sure every modality's store for ``grid`` is complete (computing only missing blocks).

    A complete store is used without loading its encoder at all: a warm query touches no weights
    but the query encoder's. Blocks found damaged are embedded again, with one line saying so;
    ``verify`` reads every block and checks it against its record first (``embed --verify``).
    ``region`` (its name) is recorded in a new store's attributes (``taxamap cache info``).
    """
    from taxamap.store import EmbeddingStore, damage_summary, store_key, store_location

    latlon = None
    stores, refs, computed, sources, precisions = {}, {}, {}, {}, {}
    attribution = license_ = None
    for modality in options.modalities:
        plan = plan_modality(modality, options, config, device, grid.n_cells)
        key = store_key(grid.definition(), modality, plan.model_ref, plan.source, plan.precision)
        location, chosen = store_location(options.store, grid.key(), modality, key, options.cache)
        store = None if verify else _complete_store(location, key)
        licence_notice(plan.attribution, plan.license)
        if store is not None:
            computed[modality] = 0
        else:
            if chosen:
                check_folder(options.store, "--store")
            embedder = plan.build()
            store = EmbeddingStore.open(
                location, key=key, n_cells=grid.n_cells, dim=embedder.dim,
                attrs={"grid": grid.definition(), "modality": modality, "model": plan.model_ref,
                       "source": plan.source, "region": region,
                       "resolution": grid.resolution, "precision": plan.precision},
                must_match=chosen,
            )
            if latlon is None:
                latlon = grid.cell_latlon()
            pending = store.pending_chunks(verify=verify)
            if store.damaged:
                them = "it" if len(store.damaged) == 1 else "them"
                log(f"{damage_summary(location, store.damaged, store.n_chunks)}; re-embedding {them}")
            fresh = len(pending) - len(store.damaged)
            if 0 < fresh and len(pending) < store.n_chunks:
                log(f"resuming {modality}: {fresh} of {store.n_chunks} blocks left in {location}")
            computed[modality] = _fill_store(options, config, modality, store, latlon, embedder,
                                             pending, plan.precision)
            missing = getattr(plan.stats, "cells_missing", 0) if plan.stats is not None else 0
            if missing:
                asked = getattr(plan.stats, "cells", 0)
                log(f"{modality}: {missing:,} of {asked:,} cells had no imagery (not found, or "
                    "still failing after retries); they are NaN in that band and fused over the "
                    "other modalities")
        if not store.has_coordinates():
            # New stores, and stores made before the coordinates: once (read-only ones skip).
            store.write_coordinates(grid.cell_latlon() if latlon is None else latlon)
        store.touch()
        if plan.attribution:
            attribution, license_ = plan.attribution, plan.license
        stores[modality] = store
        refs[modality] = plan.model_ref
        sources[modality] = plan.source
        if modality in ("location", "environment"):
            precisions[modality] = plan.precision
    return CellEmbeddings(stores, refs, attribution, license_, computed, sources, precisions)


#: Rounds of "read, find a damaged block, embed it again" before a store is called failing.
REPAIR_ROUNDS = 3


def read_repairing(options: GridOptions, grid: Grid, config: dict, device: Callable[[], str],
                   cells: CellEmbeddings, read: Callable[[], T]) -> T:
    """``read()`` (which reads ``cells``' stores: scoring, a session's load); a block found
    damaged on the way is embedded again (one line saying so, after a full check of its store
    finds any other) and ``read()`` runs again. A store damaged again right after its repair is a
    one-line error about the disk."""
    from taxamap.store import StoreDamaged, damage_summary

    rounds = 0
    while True:
        try:
            return read()
        except StoreDamaged as exc:
            store = exc.store
            rounds += 1
            if rounds == REPAIR_ROUNDS:
                raise TaxamapError(
                    f"{exc.summary}, again after embedding it anew: the disk under "
                    f"{store.location} may be failing; check it, or pass --cache DIR (or --store) "
                    "on another disk") from None
            modality = next(m for m, s in cells.stores.items() if s is store)
            store.pending_chunks(verify=True)  # every other damaged block, in this one repair
            store.damaged.update(exc.blocks)
            damaged = dict(store.damaged)
            them = "it" if len(damaged) == 1 else "them"
            log(f"{damage_summary(store.location, damaged, store.n_chunks)}; re-embedding {them}")
            plan = plan_modality(modality, options, config, device, grid.n_cells)
            n = _fill_store(options, config, modality, store, grid.cell_latlon(), plan.build(),
                            sorted(damaged), plan.precision)
            cells.computed_blocks[modality] = cells.computed_blocks.get(modality, 0) + n
