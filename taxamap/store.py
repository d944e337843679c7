"""EmbeddingStore: per-cell embeddings of one (grid, modality, model, source) on disk, in Zarr.

Layout of one store (a Zarr group; a local path or any fsspec URL):
  emb   float16 (n_cells, dim), chunked by blocks of ``chunk_cells`` cells
  done  uint8 (n_chunks,), one Zarr chunk per element: the completion record of each block
  attrs key, grid definition, modality, model ref, source settings, taxamap version

A block's embeddings are written first and its ``done`` element after, so a run killed at any
moment leaves every block either recorded complete or recomputed by the next run. Rows of NaN mark
cells the modality could not embed (missing tile, open water).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxamap import __version__
from taxamap.errors import TaxamapError
from taxamap.io import disk_full_guard, disk_full_reason

DEFAULT_CHUNK_CELLS = 16384
STORE_FORMAT = 1

_FULL_HINT = ("free some space or pass --cache DIR (or --store DIR) on a disk with room; blocks "
              "already written are kept and the same command resumes")


def store_key(grid_definition: dict, modality: str, model_ref: str, source: dict | None) -> str:
    """The identity of a store: a hash over everything that changes its contents."""
    blob = json.dumps(
        {
            "format": STORE_FORMAT,
            "grid": grid_definition,
            "modality": modality,
            "model": model_ref,
            "source": source or {},
        },
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha1(blob).hexdigest()[:20]


def default_store_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/stores``: where ``predict`` and ``embed`` keep stores unless ``--store`` is given."""
    from taxamap.paths import cache_subdir

    return cache_subdir("stores", cache_dir)


@contextlib.contextmanager
def _creation_lock(location: str):
    """An exclusive advisory lock (``<store>.lock`` beside a local store) while a store is opened
    or created; URL stores and systems without ``fcntl`` go without."""
    if "://" in location:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path = Path(location).with_name(Path(location).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _zarr_store(location: str):
    """What ``zarr.open_group`` is given for ``location``, the same on every zarr 3.x.

    ``file://`` URLs become a :class:`zarr.storage.LocalStore` (it makes its folders): zarr 3.0-3.1
    open them through fsspec, which needs ``auto_mkdir``, while later releases open them locally
    and refuse any ``storage_options``. Other URLs go to zarr as they are (fsspec), local paths
    too.
    """
    if location.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        from zarr.storage import LocalStore

        return LocalStore(unquote(urlsplit(location).path))
    return location


@dataclass
class EmbeddingStore:
    """One modality's embeddings for one grid; open with :meth:`open`."""

    group: object
    location: str
    key: str

    @property
    def emb(self):
        return self.group["emb"]

    @property
    def done(self):
        return self.group["done"]

    @property
    def n_cells(self) -> int:
        return int(self.emb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    @property
    def chunk_cells(self) -> int:
        return int(self.group.attrs["chunk_cells"])

    @property
    def n_chunks(self) -> int:
        return int(self.done.shape[0])

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @classmethod
    def open(
        cls,
        location: str | os.PathLike,
        *,
        key: str,
        n_cells: int,
        dim: int,
        attrs: dict,
        chunk_cells: int = DEFAULT_CHUNK_CELLS,
        must_match: bool = True,
    ) -> "EmbeddingStore":
        """Open the store at ``location``, creating it if absent.

        An existing store whose key differs is never reused: with ``must_match`` that is an error
        (the user named the path), otherwise it is replaced.
        """
        location = str(location)
        # Two runs starting together (two species on a cold cache) must not both create the
        # store: the second would clear blocks the first has already written.
        need = max(1, -(-n_cells // chunk_cells)) * chunk_cells * dim * 2  # whole float16 chunks
        with _creation_lock(location), disk_full_guard(
                location, need, what="creating the embedding store", hint=_FULL_HINT):
            return cls._open_or_create(location, key, n_cells, dim, attrs, chunk_cells, must_match)

    @classmethod
    def _open_or_create(cls, location: str, key: str, n_cells: int, dim: int, attrs: dict,
                        chunk_cells: int, must_match: bool) -> "EmbeddingStore":
        import zarr

        try:
            group = zarr.open_group(_zarr_store(location), mode="a")
        except Exception as exc:
            if disk_full_reason(exc):
                raise  # the caller's guard says which folder is full
            raise TaxamapError(f"cannot open embedding store {location}: {exc}") from exc
        existing = group.attrs.get("key")
        if existing is not None and existing != key:
            if must_match:
                raise TaxamapError(
                    f"the store at {location} was made for other settings (grid, model or source "
                    f"differ: key {existing} != {key}); use another --store or delete it"
                )
            group = zarr.open_group(_zarr_store(location), mode="w")
            existing = None
        if existing is None or "emb" not in group or "done" not in group:
            n_chunks = max(1, -(-n_cells // chunk_cells))
            # Uncompressed: embeddings barely compress, and a warm query reads them all.
            group.create_array(
                "emb", shape=(n_cells, dim), chunks=(chunk_cells, dim), dtype="float16",
                fill_value=np.nan, overwrite=True, compressors=None,
            )
            group.create_array(
                "done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                overwrite=True,
            )
            meta = dict(attrs)
            meta.update(
                key=key, chunk_cells=chunk_cells, taxamap_version=__version__,
                format=STORE_FORMAT, n_cells=n_cells, dim=dim,
            )
            # The key goes in last: a store whose creation was interrupted has no key and is
            # recreated on the next run.
            group.attrs.update({k: v for k, v in meta.items() if k != "key"})
            group.attrs["key"] = key
        return cls(group=group, location=location, key=key)

    @classmethod
    def open_existing(cls, location: str | os.PathLike, key: str) -> "EmbeddingStore":
        """Open a store another process created (Dask workers); its key must match."""
        import zarr

        group = zarr.open_group(_zarr_store(str(location)), mode="r+")
        if group.attrs.get("key") != key:
            raise TaxamapError(f"the store at {location} does not have key {key}")
        return cls(group=group, location=str(location), key=key)

    def chunk_slice(self, i: int) -> slice:
        start = i * self.chunk_cells
        return slice(start, min(start + self.chunk_cells, self.n_cells))

    def pending_chunks(self) -> list[int]:
        """Blocks with no completion record."""
        done = np.asarray(self.done[:])
        return [i for i in range(self.n_chunks) if not done[i]]

    def is_complete(self) -> bool:
        return not self.pending_chunks()

    def write_chunk(self, i: int, values: np.ndarray, complete: bool = True) -> None:
        """Write block ``i`` and then, if ``complete``, its completion record (an incomplete
        block is recomputed by the next run)."""
        sl = self.chunk_slice(i)
        if values.shape != (sl.stop - sl.start, self.dim):
            raise ValueError(f"block {i} expects {(sl.stop - sl.start, self.dim)}, got {values.shape}")
        with disk_full_guard(self.location, self.bytes_left, what="writing the embedding store",
                             hint=_FULL_HINT):
            self.emb[sl] = values.astype(np.float16)
            if complete:
                self.done[i] = 1

    def cells_left(self) -> int:
        """Cells in the blocks with no completion record."""
        return sum(self.chunk_slice(i).stop - self.chunk_slice(i).start
                   for i in self.pending_chunks())

    def bytes_left(self) -> int:
        """Roughly what the unfinished blocks still need on disk: Zarr writes every chunk whole
        (the last one padded to ``chunk_cells``), float16, uncompressed."""
        return len(self.pending_chunks()) * self.chunk_cells * self.dim * self.emb.dtype.itemsize

    def read(self, rows: slice | None = None) -> np.ndarray:
        """Embeddings as float32 (all cells, or a slice of rows)."""
        return np.asarray(self.emb[rows if rows is not None else slice(None)], dtype=np.float32)


def store_location(
    root: str | os.PathLike | None,
    grid_key: str,
    modality: str,
    key: str,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[str, bool]:
    """Where a store lives, and whether the user chose it (``--store``; then keys must match).

    With ``--store ROOT``: ``ROOT/<modality>``. Otherwise the cache:
    ``<cache>/stores/<grid key>/<modality>-<key>``, so changed settings get a new store beside the
    old one instead of overwriting it.
    """
    if root:
        root = str(root)
        if "://" not in root:
            folder = Path(root).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            return str(folder / modality), True
        return f"{root.rstrip('/')}/{modality}", True
    base = default_store_root(cache_dir) / grid_key
    base.mkdir(parents=True, exist_ok=True)
    return str(base / f"{modality}-{key}"), False
