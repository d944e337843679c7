"""Embedding pyramids: coarser levels of a store's cells, for maps at every zoom (issue 21).

Level ``f`` (f = 2, 4, 8, ...) lays cells ``f`` times larger over the store's grid
(:meth:`taxamap.grid.Grid.coarsened`); each coarse cell holds the **mean of the unit (L2-normalised)
embeddings** of the fine cells it covers that the modality embedded, and their **count**.

Why a coarse score is exact. A cell's score is the cosine ``e_i . q`` of its unit embedding ``e_i``
and the unit query ``q``. The dot product is linear, so for the mean ``m = (1/n) sum e_i``::

    m . q = (1/n) sum (e_i . q)

the coarse cell's score *is* the mean of its fine cells' scores, for any query, computed once per
store. (It is ``m . q``, not the cosine of ``m``: the mean is not renormalised, which would
break the identity.) Levels are built from the finer level's sums (mean x count), so every level
is the mean over the base cells themselves, not a mean of means.

Where it is not the mean of what a fine map shows:

* **Missing cells**: a fine cell the modality could not embed (NaN) is left out of the mean and
  of the count; the coarse score is the mean over the embedded cells, which is what a fine map
  averaged over its finite pixels gives. A coarse cell with no embedded cell is NaN.
* **Fusion of several modalities**: each modality has its own pyramid and the coarse cell's
  modality scores are exact means; fusing them with ``mean`` equals the mean of the fine fused
  scores only where every fine cell has every modality (a fine cell missing one is fused over
  the others, a different weight). ``sum`` fusion renormalises the summed embeddings, which is
  not linear: the coarse fused score is then an approximation.
* **Normalisation and display**: ranks, percentiles (the ``relative`` band, display stretches)
  and thresholds are not linear in the scores: a coarse level shows the mean score, not the mean
  of anything computed from scores.
* **Float rounding**: sums are kept in float32; a level matches the exact mean to ~1e-6.

On disk (beside a local store, ``<store>.pyramid``, a Zarr v3 group readable by any Zarr
reader): attrs ``format``, ``store_key``, ``fingerprint`` (of the store's completion and check
records: a resumed or repaired store gets a new one and its pyramid is built again),
``factors``; one group ``level_<f>`` per level (attrs ``factor``, ``resolution``, ``width``,
``height``) with ``emb`` float32 (n, dim) mean unit embeddings, ``count`` int32 (n,), and the
level's cells as runs (``row``, ``col``, ``length``, ``row_runs``, see :class:`~taxamap.grid.Runs`).
``emb`` and ``count`` are single uncompressed chunks, so a map tile reads only the byte ranges of
its own cells (``pread``; nothing is memory-mapped, so a server's resident memory does not grow
with what it has read).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxamap.grid import Grid, Runs
from taxamap.io import exclusive_lock, remove_tree
from taxamap.store import beside, gather_rows

_log = logging.getLogger("taxamap")

PYRAMID_FORMAT = 1
#: The coarsest level is the first at most this many cells wide: one 256-pixel map tile shows
#: the whole grid at about a cell a pixel.
TOP_WIDTH = 256
#: Source cells read per step while building (bounded memory: ~128 MiB of float32 at 512-d).
BUILD_CELLS = 65536


def default_factors(grid: Grid, top_width: int = TOP_WIDTH) -> list[int]:
    """2, 4, 8, ... up to the first level at most ``top_width`` cells wide (none for a grid
    already that narrow)."""
    factors, f = [], 2
    while grid.width > top_width and -(-grid.width // (f // 2)) > top_width:
        factors.append(f)
        f *= 2
    return factors


def fingerprint(store) -> str:
    """What a pyramid was built from: the store's key, shape, unfinished blocks and check records
    (a resume or a repair changes them)."""
    digest = hashlib.sha1(f"{PYRAMID_FORMAT}|{store.key}|{store.n_cells}|{store.dim}".encode())
    digest.update(np.asarray(store.pending_chunks(), dtype=np.int64).tobytes())
    if store.check is not None:
        digest.update(np.ascontiguousarray(store.check[:]).tobytes())
    return digest.hexdigest()


def pyramid_path(store) -> Path | None:
    """``<store>.pyramid`` beside a local store (None for a store at a URL: no pyramid)."""
    return beside(store.location, ".pyramid")


@dataclass
class Level:
    """One level: its coarse grid, mean unit embeddings (n, dim; read from the file by the rows
    a tile needs) and counts (n,)."""

    factor: int
    grid: Grid
    emb: "_ChunkFile"
    count: np.ndarray

    def vectors(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean unit embeddings of ``cells`` (sorted cell numbers) and the row norms to give
        :func:`~taxamap.score.fuse_many` (1, or NaN where no fine cell was embedded): the score
        is then ``mean . q``, the exact mean of the fine scores."""
        cells = np.asarray(cells, dtype=np.int64)
        return self.emb.rows(cells), np.where(self.count[cells] > 0, 1.0, np.nan)


@dataclass
class Pyramid:
    """The levels of one store, finest first."""

    levels: list[Level]
    fingerprint: str

    def level(self, factor: int) -> Level:
        return next(lv for lv in self.levels if lv.factor == factor)


class _ChunkFile:
    """The single uncompressed chunk of a Zarr v3 array as a file read and written by row ranges
    (``pread``/``pwrite``): building a level maps nothing, so its pages stay page cache, not the
    builder's resident memory."""

    def __init__(self, path: Path, shape: tuple, dtype: str, create: bool = False):
        self.path, self.shape = path, shape
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.truncate(shape[0] * self.row_bytes)
        self.writable = create
        self._fd = os.open(path, os.O_RDWR if create else os.O_RDONLY)

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        os.pwrite(self._fd, data, rows.start * self.row_bytes)

    def __getitem__(self, rows: slice) -> np.ndarray:
        n = rows.stop - rows.start
        data = os.pread(self._fd, n * self.row_bytes, rows.start * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:]))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted) as float32, read by spans (:func:`~taxamap.store.gather_rows`)."""
        return gather_rows(self._fd, rows, self.shape[1:], self.dtype)

    def close(self) -> None:
        if self.writable:
            os.fsync(self._fd)
        os.close(self._fd)


def _single_chunk(group, name: str, shape: tuple, dtype: str, fill) -> _ChunkFile:
    """A Zarr array of one uncompressed chunk, its file open for writing by rows (Zarr v3
    keeps the chunk at ``<name>/c/0[/0]`` as raw little-endian C-order bytes)."""
    group.create_array(name, shape=shape, chunks=shape, dtype=dtype, compressors=None,
                       fill_value=fill)
    path = _chunk_path(Path(group.store.root) / group.path, name, len(shape))
    return _ChunkFile(path, shape, dtype, create=True)


def _chunk_path(root: Path, name: str, ndim: int) -> Path:
    return root / name / "c" / "/".join("0" * ndim)


def _base_block(store, grid: Grid, cells: slice, pending: set[int]):
    """Unit embeddings of base ``cells`` (zero rows where not embedded) and their weights (1/0)."""
    vectors = store.read(cells)
    if pending:
        blocks = np.arange(cells.start, cells.stop) // store.chunk_cells
        vectors[np.isin(blocks, list(pending))] = np.nan
    length = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    ok = np.isfinite(length) & (length > 0)
    vectors[~ok] = 0.0
    vectors[ok] /= length[ok, None]
    return vectors, ok.astype(np.float32)


def _level_block(level: Level, cells: slice):
    """Sums (mean x count) of a finer level's ``cells`` and their counts."""
    counts = np.asarray(level.count[cells], dtype=np.float32)
    vectors = np.array(level.emb[cells], dtype=np.float32)  # a copy: zeroed below
    vectors[counts == 0] = 0.0
    return vectors * counts[:, None], counts


def _aggregate(source_grid: Grid, coarse: Grid, k: int, read, emb, count) -> None:
    """Fill ``emb``/``count`` of the ``coarse`` grid (``k`` times coarser than ``source_grid``)
    from ``read(cells) -> (weighted vectors, weights)``, a band of coarse rows at a time."""
    per_row = max(1, source_grid.n_cells // max(1, source_grid.height))
    band = max(1, BUILD_CELLS // (per_row * k))
    for R0 in range(0, coarse.height, band):
        R1 = min(coarse.height, R0 + band)
        cells = source_grid.cells_of_rows(R0 * k, R1 * k)
        dest = coarse.cells_of_rows(R0, R1)
        if cells.stop <= cells.start:
            continue
        vectors, weights = read(cells)
        rows, cols = source_grid.runs.rows_cols(cells)
        target = coarse.cells_at(rows // k, cols // k) - dest.start
        order = np.argsort(target, kind="stable")
        target = target[order]
        starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
        # every coarse cell covers at least one source cell, so the groups are the dest cells
        sums = np.add.reduceat(vectors[order], starts, axis=0)
        n = np.add.reduceat(weights[order], starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            emb[dest] = sums / n[:, None]
        count[dest] = n.astype(np.int32)


def _build_lock(store) -> Path | None:
    """``<store>.pyramid.lock``: held while a pyramid is built, so two servers starting on one
    store build it once (the second waits, then opens the first one's)."""
    return beside(store.location, ".pyramid.lock")


def _build(store, grid: Grid, factors: list[int], root: Path, stamp: str) -> Pyramid:
    """Build (again) the pyramid of ``store`` over ``grid`` from the store's public reads, under
    the store's pyramid lock; cells of unfinished blocks count as not embedded. Written aside and
    renamed into place, so a reader never sees half a pyramid."""
    import zarr

    pending = set(store.pending_chunks())
    # Under the lock no other build is running: any half-built folder is a crashed build's.
    for pattern in (f".{root.name}.*.building", f".{root.name}.*.replaced"):
        for leftover in root.parent.glob(pattern):
            remove_tree(leftover)
    building = root.with_name(f".{root.name}.{os.getpid()}.building")
    group = zarr.open_group(str(building), mode="w")
    group.attrs.update({"format": PYRAMID_FORMAT, "store_key": store.key, "fingerprint": stamp,
                        "factors": factors, "dim": store.dim})
    previous: Level | None = None
    for f in factors:
        coarse = grid.coarsened(f)
        sub = group.create_group(f"level_{f}")
        sub.attrs.update({"factor": f, "resolution": coarse.resolution, "width": coarse.width,
                          "height": coarse.height, "n_cells": coarse.n_cells})
        for name in ("row", "col", "length", "row_runs"):
            values = getattr(coarse.runs, name)
            sub.create_array(name, data=values, chunks=(max(1, values.size),))
        emb = _single_chunk(sub, "emb", (coarse.n_cells, store.dim), "float32", np.nan)
        count = _single_chunk(sub, "count", (coarse.n_cells,), "int32", 0)
        if previous is None:
            _aggregate(grid, coarse, f, lambda c: _base_block(store, grid, c, pending), emb, count)
        else:
            _aggregate(previous.grid, coarse, f // previous.factor,
                       lambda c, p=previous: _level_block(p, c), emb, count)
        if previous is not None:
            previous.emb.close()
            previous.count.close()
        previous = Level(f, coarse, emb, count)
    previous.emb.close()
    previous.count.close()
    # The old pyramid goes aside in one rename and the new one takes its place in another: a
    # reader finds one or the other (or, for an instant, none: it then waits on the lock).
    old = root.with_name(f".{root.name}.{os.getpid()}.replaced")
    try:
        os.replace(root, old)
    except FileNotFoundError:
        pass
    os.replace(building, root)
    remove_tree(old)
    return open_pyramid(store, grid, stamp)


def open_pyramid(store, grid: Grid, stamp: str | None = None) -> Pyramid | None:
    """The store's pyramid if it exists and was built from the store as it is now, else None."""
    import zarr

    root = pyramid_path(store)
    if root is None or not (root / "zarr.json").exists():
        return None
    try:
        group = zarr.open_group(str(root), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("format") != PYRAMID_FORMAT:
            return None
        stamp = stamp or fingerprint(store)
        if attrs.get("fingerprint") != stamp:
            return None
        levels = []
        for f in attrs["factors"]:
            sub = group[f"level_{f}"]
            a = dict(sub.attrs)
            runs = Runs.from_parts([sub["row"][:]], [sub["col"][:]], [sub["length"][:]],
                                   np.diff(sub["row_runs"][:], prepend=0))
            coarse = Grid(grid.west, grid.north, float(a["resolution"]), int(a["width"]),
                          int(a["height"]), crs=grid.crs, cells=grid.cells, runs=runs)
            n, folder = int(a["n_cells"]), root / f"level_{f}"
            emb = _ChunkFile(_chunk_path(folder, "emb", 2), (n, int(attrs["dim"])), "float32")
            count = np.fromfile(_chunk_path(folder, "count", 1), dtype="<i4", count=n)
            if count.size != n:
                raise ValueError(f"level {f}: {count.size} counts for {n} cells")
            levels.append(Level(int(f), coarse, emb, count))
    except (OSError, KeyError, ValueError) as exc:
        _log.info("pyramid %s unreadable (%s); building it again", root, exc)
        return None
    return Pyramid(levels, stamp)


def ensure_pyramid(store, grid: Grid, factors: list[int] | None = None) -> Pyramid | None:
    """The store's pyramid, built (with one line saying so) when absent or stale."""
    factors = default_factors(grid) if factors is None else sorted(factors)
    if not factors or pyramid_path(store) is None:
        return None
    stamp = fingerprint(store)
    found = open_pyramid(store, grid, stamp)
    if found is not None and [lv.factor for lv in found.levels] == factors:
        return found
    with exclusive_lock(_build_lock(store)):
        # Another process may have built it while this one waited for the lock.
        found = open_pyramid(store, grid, stamp)
        if found is not None and [lv.factor for lv in found.levels] == factors:
            return found
        _log.info("building the embedding pyramid of %s (%d levels, %s x coarser at the top)",
                  store.location, len(factors), factors[-1])
        return _build(store, grid, factors, pyramid_path(store), stamp)
