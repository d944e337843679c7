"""EmbeddingStore: per-cell embeddings of one (grid, modality, model, source) on disk, in Zarr.

Layout of one store (a Zarr group; a local path or any fsspec URL):
  emb    float16 (n_cells, dim), chunked by blocks of ``chunk_cells`` cells, uncompressed
  check  uint64 (n_chunks, 3), one Zarr chunk per block: what a finished block must read back as
         (the CRC-32 of its float16 rows, how many of its cells were embedded, the record's kind)
  done   uint8 (n_chunks,), one Zarr chunk per element: the completion record of each block
  attrs  key, grid definition, region, modality, model ref, source settings, taxamap version

A block's embeddings are written first, its check record next and its ``done`` element last, so
a run killed at any moment leaves every block either recorded complete or recomputed by the next
run. Rows of NaN mark cells the modality could not embed (missing tile, open water), and only
those: a finished block counts as done only while it reads back as its check record says.

Integrity. A block that is missing, cut short, unreadable, or whose bytes no longer match their
CRC-32 (or the count of embedded cells) counts as not done, and every run that needs it embeds it
again (:class:`StoreDamaged` says which when it is found while reading). Three depths of check:
``pending_chunks()`` reads the records and stats each chunk file (missing, empty, short: no cell
is read); ``read()`` checks the CRC of each finished block the first time it reads it (a warm
``predict`` reads every block anyway, so the check costs one CRC pass, in the reader thread);
``pending_chunks(verify=True)`` reads and checks everything (``taxamap embed --verify``,
``taxamap cache verify``). CRC-32 rather than a cryptographic digest: it guards against disks and
copies, not adversaries, and runs ~4.7x faster than BLAKE2b here (1.8 vs 0.38 GB/s).

Damaged metadata (an unreadable or edited ``zarr.json``) is rewritten from what the store must be
when its identity is certain (a store in the cache, whose folder name is its key, or one whose
key still reads), after which every block is checked against its record; otherwise it is one
line saying what to delete.

Stores made before the check records (format 1) still open: the first run that opens one with
write access records the CRC of each finished block as it reads back then (trusted once, checked
from then on); read-only, they are used as they are, checked for readability only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from taxamap.version import __version__
from taxamap.errors import TaxamapError
from taxamap.io import disk_full_guard, disk_full_reason, exclusive_lock, remove_tree

DEFAULT_CHUNK_CELLS = 16384
#: In every store key: changing it gives every grid a new store (embedded again from scratch).
KEY_FORMAT = 1
#: The layout a store is written in (attrs["format"]): 2 added the per-block check records; a
#: format-1 store keeps its key and is upgraded in place.
STORE_FORMAT = 2
#: The kind of a check record (its third value): CRC-32 of the block's little-endian float16
#: rows. 0 means no record.
CHECK_CRC32 = 1

#: Each array's dimensions (Zarr v3 ``dimension_names``: what xarray reads a store's variables
#: by; docs/store.md).
DIMENSION_NAMES = {"emb": ("cell", "feature"), "check": ("block", "record"), "done": ("block",),
                   "lat": ("cell",), "lon": ("cell",)}
#: The attributes of ``emb``: CF ``coordinates`` make ``lat``/``lon`` its coordinates in xarray.
EMB_ATTRS = {
    "coordinates": "lat lon",
    "long_name": "cell embedding",
    "encoding": "float16 (IEEE half, little-endian) of the L2-normalised float32 embedding; a "
                "row of NaN is a cell the modality could not embed",
}
#: Group attributes describing the layout (docs/store.md), in every store made or upgraded.
LAYOUT_ATTRS = {
    "encoding": "float16",
    "cell_order": "the grid's kept cells in row-major order (north to south, then west to "
                  "east): lat/lon give each cell's centre",
    "docs": "docs/store.md in taxamap's source",
}

_FULL_HINT = ("free some space or pass --cache DIR (or --store DIR) on a disk with room; blocks "
              "already written are kept and the same command resumes")

_log = logging.getLogger("taxamap")


def store_key(grid_definition: dict, modality: str, model_ref: str, source: dict | None,
              precision: str = "fp32") -> str:
    """The identity of a store: a hash over everything that changes its contents.

    ``precision`` (the encoder's, :mod:`taxamap.models.precision`) enters the hash only when it
    is not fp32, so float32 stores keep the keys they had before precisions existed, and bf16
    and fp32 embeddings never share a store."""
    identity = {
        "format": KEY_FORMAT,
        "grid": grid_definition,
        "modality": modality,
        "model": model_ref,
        "source": source or {},
    }
    if precision != "fp32":
        identity["precision"] = precision
    blob = json.dumps(
        identity,
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha1(blob).hexdigest()[:20]


def default_store_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/stores``: where ``predict`` and ``embed`` keep stores unless ``--store`` is given."""
    from taxamap.paths import cache_subdir

    return cache_subdir("stores", cache_dir)


def block_record(values: np.ndarray) -> tuple[int, int]:
    """What a block's check record holds for ``values`` (its rows as stored, float16): the CRC-32
    of their bytes and the count of cells embedded (rows whose first value is finite: a cell the
    modality could not embed is a whole row of NaN)."""
    data = np.ascontiguousarray(values, dtype="<f2")
    return zlib.crc32(data), int(np.isfinite(data[:, 0]).sum())


#: Gathering rows by ``pread``: rows fewer than this apart are read in one span.
GATHER_GAP = 32


def gather_rows(fd: int, rows: np.ndarray, row_shape: tuple, dtype, offset: int = 0,
                out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``rows`` (sorted) of a raw C-order array in the file ``fd`` (starting at byte
    ``offset``), as ``dtype``; rows close together are read in one ``pread`` span. Nothing is
    mapped: the bytes read stay page cache, not the reader's resident memory, however much of
    a large file a server reads over time."""
    dtype = np.dtype(dtype)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((rows.size, *row_shape), dtype=np.float32)
    if not rows.size:
        return out
    breaks = np.flatnonzero(np.diff(rows) > GATHER_GAP) + 1
    starts = np.r_[0, breaks]
    stops = np.r_[breaks, rows.size]
    for a, b in zip(starts, stops):
        first, last = int(rows[a]), int(rows[b - 1])
        data = os.pread(fd, (last - first + 1) * row_bytes, offset + first * row_bytes)
        span = np.frombuffer(data, dtype=dtype).reshape((-1, *row_shape))
        out[a:b] = span[rows[a:b] - first]
    return out


def _short(exc: BaseException) -> str:
    """An exception as a few words for a one-line message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def damage_summary(location: str, blocks: dict[int, str], n_chunks: int) -> str:
    """``store X: block 2 of 20 damaged (checksum mismatch)``: the damaged blocks (numbered from
    1, as a user counts them) and why, in one line."""
    items = sorted(blocks.items())
    reasons = {r for _, r in items}
    shown = items[:6]
    more = f" and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    if len(reasons) == 1:
        which = ", ".join(str(i + 1) for i, _ in shown) + more
        detail = f" ({next(iter(reasons))})"
    else:
        which = ", ".join(f"{i + 1} ({r})" for i, r in shown) + more
        detail = ""
    word = "block" if len(items) == 1 else "blocks"
    return f"store {location}: {word} {which} of {n_chunks} damaged{detail}"


class StoreDamaged(TaxamapError):
    """Blocks of ``store`` found damaged while reading: ``blocks`` maps each (0-based) to why.
    They are marked not done, so the next run embeds them again."""

    def __init__(self, store: "EmbeddingStore", blocks: dict[int, str]):
        self.store, self.blocks = store, dict(blocks)
        them = "it" if len(self.blocks) == 1 else "them"
        super().__init__(f"{self.summary}; run the same command again to embed {them} again")

    @property
    def summary(self) -> str:
        return damage_summary(self.store.location, self.blocks, self.store.n_chunks)


class StoreMetadataDamaged(TaxamapError):
    """A store's metadata cannot be read, or says something other than what the store must be:
    one line naming the store, the ``problem`` and what to delete."""

    def __init__(self, location: str, problem: str):
        self.location, self.problem = location, problem
        rm = f" (rm -r '{location}')" if local_root(location) is not None else ""
        super().__init__(f"the embedding store at {location} is damaged ({problem}): delete "
                         f"it{rm} and run the same command again, which embeds its cells anew")


def local_root(location: str) -> Path | None:
    """The folder of a store on this machine's file system (a path or a ``file://`` URL), or
    None for other URLs."""
    if location.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return Path(unquote(urlsplit(location).path))
    return None if "://" in location else Path(location)


def beside(location: str, suffix: str) -> Path | None:
    """``<store><suffix>``: a file or folder next to a local store (its lock, its claims)."""
    root = local_root(location)
    return None if root is None else root.with_name(root.name + suffix)


def derived_folder(location: str) -> Path | None:
    """``<grid folder>/.<store name>.derived``: where what is computed from a local store's cells
    (a reference panel's per-cell statistics) is kept; hidden, so ``taxamap cache info`` does not
    list it as a store, and deleted with the store."""
    root = local_root(location)
    return None if root is None else root.with_name(f".{root.name}.derived")


def _creation_lock(location: str):
    """An exclusive advisory lock (``<store>.lock`` beside a local store) while a store is opened
    or created; URL stores and systems without ``fcntl`` go without."""
    return exclusive_lock(beside(location, ".lock"))


def _zarr_store(location: str):
    """What ``zarr.open_group`` is given for ``location``, the same on every zarr 3.x.

    ``file://`` URLs become a :class:`zarr.storage.LocalStore` (it makes its folders): zarr 3.0-3.1
    open them through fsspec, which needs ``auto_mkdir``, while later releases open them locally
    and refuse any ``storage_options``. Other URLs go to zarr as they are (fsspec), local paths
    too.
    """
    if location.startswith("file://"):
        from zarr.storage import LocalStore

        return LocalStore(local_root(location))
    return location


def _n_chunks(n_cells: int, chunk_cells: int) -> int:
    return max(1, -(-n_cells // chunk_cells))


def _create_check(group, n_chunks: int):
    return group.create_array("check", shape=(n_chunks, 3), chunks=(1, 3), dtype="uint64",
                              fill_value=0, overwrite=True, compressors=None,
                              dimension_names=DIMENSION_NAMES["check"])


def _create_arrays(group, n_cells: int, dim: int, chunk_cells: int) -> None:
    """A store's arrays, empty (``overwrite``: a half-made store's leftovers go)."""
    n_chunks = _n_chunks(n_cells, chunk_cells)
    # Uncompressed: embeddings barely compress, and a warm query reads them all; a chunk file's
    # size is then known, so a cut-short one is seen without reading it.
    emb = group.create_array("emb", shape=(n_cells, dim), chunks=(chunk_cells, dim),
                             dtype="float16", fill_value=np.nan, overwrite=True, compressors=None,
                             dimension_names=DIMENSION_NAMES["emb"])
    emb.attrs.update(EMB_ATTRS)
    _create_check(group, n_chunks)
    group.create_array("done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                       overwrite=True, compressors=None, dimension_names=DIMENSION_NAMES["done"])


def _store_attrs(attrs: dict, key: str, n_cells: int, dim: int, chunk_cells: int) -> dict:
    meta = {**LAYOUT_ATTRS, **attrs}
    meta.update(key=key, chunk_cells=chunk_cells, taxamap_version=__version__,
                format=STORE_FORMAT, n_cells=n_cells, dim=dim)
    return meta


def _group_problem(location: str, exc: BaseException) -> str | None:
    """Why a local store's group metadata cannot be opened, when the cause is its ``zarr.json``
    itself (None for other causes: permissions, a missing folder)."""
    root = local_root(location)
    if root is None:
        return None
    try:
        doc = json.loads((root / "zarr.json").read_bytes())
    except FileNotFoundError:
        return None
    except OSError:
        return None
    except ValueError as err:  # not UTF-8, not JSON
        return f"zarr.json is unreadable: {_short(err)}"
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        return "zarr.json is not a Zarr group's"
    return f"zarr.json cannot be opened: {_short(exc)}"


@dataclass(eq=False)
class EmbeddingStore:
    """One modality's embeddings for one grid; open with :meth:`open`."""

    group: object
    location: str
    key: str
    #: Finished blocks the last check found damaged (0-based index -> why); not done until
    #: embedded again.
    damaged: dict = field(default_factory=dict)
    #: Check every block in full at the next :meth:`pending_chunks` (set after a metadata repair).
    full_check: bool = False
    _verified: set = field(default_factory=set, repr=False)
    _flags: np.ndarray | None = field(default=None, repr=False)
    _records: np.ndarray | None = field(default=None, repr=False)

    @cached_property
    def emb(self):
        return self.group["emb"]

    @cached_property
    def done(self):
        return self.group["done"]

    @cached_property
    def check(self):
        """The blocks' check records, or None in a format-1 store."""
        try:
            return self.group["check"]
        except KeyError:
            return None

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
        (the user named the path), otherwise it is replaced. Damaged metadata is rewritten when the
        store's identity is certain (its key reads, or it is in the cache, ``must_match`` False),
        else it is a :class:`StoreMetadataDamaged` line.
        """
        location = str(location)
        # Two runs starting together (two species on a cold cache) must not both create the
        # store: the second would clear blocks the first has already written.
        need = _n_chunks(n_cells, chunk_cells) * chunk_cells * dim * 2  # whole float16 chunks
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
            problem = _group_problem(location, exc)
            if problem is None:
                raise TaxamapError(f"cannot open embedding store {location}: {exc}") from exc
            if must_match:  # a folder the user named, whose key cannot be read: not ours to judge
                raise StoreMetadataDamaged(location, problem) from None
            # In the cache the folder's name is the key: the store's identity is certain.
            return cls._rebuild(location, problem, key, n_cells, dim, attrs, chunk_cells)
        existing = group.attrs.get("key")
        if existing is not None and existing != key:
            if must_match:
                raise TaxamapError(
                    f"the store at {location} was made for other settings (grid, model or source "
                    f"differ: key {existing} != {key}); use another --store or delete it"
                )
            group = zarr.open_group(_zarr_store(location), mode="w")
            existing = None
        if existing is None:
            _create_arrays(group, n_cells, dim, chunk_cells)
            meta = _store_attrs(attrs, key, n_cells, dim, chunk_cells)
            # The key goes in last: a store whose creation was interrupted has no key and is
            # recreated on the next run.
            group.attrs.update({k: v for k, v in meta.items() if k != "key"})
            group.attrs["key"] = key
            return cls(group=group, location=location, key=key)
        store = cls(group=group, location=location, key=key)
        problem = store.metadata_problem(n_cells, dim)
        if problem is not None:
            # The key read back: whatever else is wrong, this is the store for these settings.
            keep = {k: v for k, v in store.attrs.items() if k not in ("key", "format")}
            try:
                chunk_cells = int(keep.get("chunk_cells", chunk_cells))
            except (TypeError, ValueError):
                pass
            return cls._rebuild(location, problem, key, n_cells, dim, {**keep, **attrs},
                                chunk_cells)
        if store.check is None:
            store._record_format1()
        # What 'taxamap cache info' shows, for a store made before it was recorded.
        labels = {k: attrs[k] for k in ("region", "resolution")
                  if attrs.get(k) is not None and k not in store.group.attrs}
        if labels:
            try:
                store.group.attrs.update(labels)
            except Exception:  # a read-only store keeps its attributes
                pass
        return store

    @classmethod
    def _rebuild(cls, location: str, problem: str, key: str, n_cells: int, dim: int,
                 attrs: dict, chunk_cells: int) -> "EmbeddingStore":
        """Rewrite a local store's metadata as it must be, keeping its chunks and check records;
        every block is then checked in full against its record (a block of a store whose records
        are lost too is embedded again)."""
        import zarr

        from taxamap.io import atomic_write

        root = local_root(location)
        if root is None:
            raise StoreMetadataDamaged(location, problem)
        _log.info(f"store {location}: its metadata is damaged ({problem}); rewriting it and "
                  "checking every block")
        with tempfile.TemporaryDirectory(prefix="taxamap-store-") as tmp:
            fresh = zarr.open_group(tmp, mode="w")
            _create_arrays(fresh, n_cells, dim, chunk_cells)
            fresh.attrs.update(_store_attrs(attrs, key, n_cells, dim, chunk_cells))
            for rel in ("emb/zarr.json", "check/zarr.json", "done/zarr.json", "zarr.json"):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(root / rel, (Path(tmp) / rel).read_bytes(),
                             what="repairing the embedding store", hint=_FULL_HINT)
        group = zarr.open_group(_zarr_store(location), mode="a")
        return cls(group=group, location=location, key=key, full_check=True)

    @classmethod
    def open_existing(cls, location: str | os.PathLike, key: str) -> "EmbeddingStore":
        """Open a store another process created (Dask workers); its key must match and its
        metadata be sound (else :class:`StoreMetadataDamaged`)."""
        import zarr

        location = str(location)
        try:
            group = zarr.open_group(_zarr_store(location), mode="r+")
        except Exception as exc:
            problem = _group_problem(location, exc)
            if problem is None:
                raise
            raise StoreMetadataDamaged(location, problem) from None
        if group.attrs.get("key") != key:
            raise TaxamapError(f"the store at {location} does not have key {key}")
        store = cls(group=group, location=location, key=key)
        problem = store.metadata_problem()
        if problem is not None:
            raise StoreMetadataDamaged(location, problem)
        return store

    def metadata_problem(self, n_cells: int | None = None, dim: int | None = None) -> str | None:
        """What is wrong with the store's array metadata, or None: each ``zarr.json`` must read
        and describe the shapes the store was made with (``n_cells`` x ``dim``, default: its
        attrs')."""
        attrs = self.group.attrs
        try:
            n_cells = int(attrs["n_cells"] if n_cells is None else n_cells)
            dim = int(attrs["dim"] if dim is None else dim)
            chunk_cells = int(attrs["chunk_cells"])
        except (KeyError, TypeError, ValueError):
            return "its attributes lack the shape it was made with"
        arrays = {}
        for name in ("emb", "done", "check"):
            try:
                arrays[name] = self.group[name]
            except KeyError:
                if name == "check" and int(attrs.get("format", 1)) < 2:
                    arrays[name] = None
                    continue
                return f"its {name} array is missing"
            except Exception as exc:  # unreadable JSON, or JSON that is no Zarr array
                return f"{name}/zarr.json is unreadable: {_short(exc)}"
            if not hasattr(arrays[name], "chunks"):
                return f"{name}/zarr.json describes a group, not an array"
        emb, done, check = arrays["emb"], arrays["done"], arrays["check"]
        n_chunks = _n_chunks(n_cells, chunk_cells)
        if tuple(emb.shape) != (n_cells, dim):
            return f"emb/zarr.json gives shape {tuple(emb.shape)}, not {(n_cells, dim)}"
        if tuple(emb.chunks) != (chunk_cells, dim) or emb.dtype != np.float16:
            return (f"emb/zarr.json gives chunks {tuple(emb.chunks)} of {emb.dtype}, not "
                    f"{(chunk_cells, dim)} of float16")
        if tuple(done.shape) != (n_chunks,) or tuple(done.chunks) != (1,):
            return f"done/zarr.json gives shape {tuple(done.shape)}, not ({n_chunks},)"
        if check is not None and (tuple(check.shape) != (n_chunks, 3)
                                  or tuple(check.chunks) != (1, 3)):
            return f"check/zarr.json gives shape {tuple(check.shape)}, not ({n_chunks}, 3)"
        self.__dict__.update(emb=emb, done=done, check=check)  # the arrays, read once
        return None

    def _record_format1(self) -> None:
        """Give a format-1 store its check records: each finished block's CRC as it reads back now
        (trusted once, checked from then on). Runs under the creation lock; a store that cannot
        be written stays as it is (checked for readability only)."""
        flags, unreadable = self._read_flags()
        finished = [i for i in range(self.n_chunks) if flags[i]]
        try:
            check = _create_check(self.group, self.n_chunks)
        except Exception:  # read-only: used as it is
            return
        _log.info(f"store {self.location}: recording the checksums of its "
                  f"{_count(len(finished), 'finished block')} (made by an older taxamap; once)")
        lost = dict(unreadable)
        for i in finished:
            try:
                raw = np.asarray(self.emb[self.chunk_slice(i)])
            except Exception as exc:
                lost[i] = f"unreadable: {_short(exc)}"
                continue
            crc, cells = block_record(raw)
            check[i] = np.array([crc, cells, CHECK_CRC32], dtype=np.uint64)
        self.__dict__["check"] = check
        self.group.attrs["format"] = STORE_FORMAT
        if lost:
            _log.info(f"{damage_summary(self.location, lost, self.n_chunks)}; embedding "
                      f"{'it' if len(lost) == 1 else 'them'} again")
            self.forget(lost)

    def has_coordinates(self) -> bool:
        """Whether the store holds each cell's ``lat``/``lon`` and the dimension names that let
        xarray open it (stores made before them lack both)."""
        try:
            return "lat" in self.group and "lon" in self.group and bool(
                self.emb.metadata.dimension_names)
        except Exception:
            return False

    def write_coordinates(self, latlon: np.ndarray) -> bool:
        """Give the store its per-cell ``lat``/``lon`` (``latlon``: (n_cells, 2) degrees, cell
        centres) and its arrays their dimension names, so zarr and xarray users can open it
        without taxamap (docs/store.md). An older store is upgraded in place; a read-only one,
        or one at a URL whose arrays lack dimension names, is left as it is (False)."""
        latlon = np.asarray(latlon, dtype=np.float64)
        if latlon.shape != (self.n_cells, 2):
            raise ValueError(f"latlon must be ({self.n_cells}, 2), got {latlon.shape}")
        try:
            for i, (name, units, long_name) in enumerate((
                    ("lat", "degrees_north", "latitude of the cell centre"),
                    ("lon", "degrees_east", "longitude of the cell centre, in [-180, 180)"))):
                arr = self.group.create_array(
                    name, shape=(self.n_cells,), chunks=(max(1, self.n_cells),), dtype="float64",
                    overwrite=True, compressors=None, dimension_names=DIMENSION_NAMES[name])
                arr[:] = latlon[:, i]
                arr.attrs.update(units=units, long_name=long_name)
            missing = {k: v for k, v in LAYOUT_ATTRS.items() if k not in self.group.attrs}
            if missing:
                self.group.attrs.update(missing)
            if not self.emb.metadata.dimension_names:
                return self._name_dimensions()
        except Exception:  # read-only: used as it is
            return False
        return True

    def _name_dimensions(self) -> bool:
        """Add ``dimension_names`` (and ``emb``'s attributes) to a local store's array metadata
        made before taxamap wrote them: each ``zarr.json`` rewritten atomically (the chunks are
        untouched)."""
        from taxamap.io import atomic_write

        root = local_root(self.location)
        if root is None:
            return False
        for name in ("emb", "check", "done"):
            path = root / name / "zarr.json"
            if not path.exists():
                continue
            doc = json.loads(path.read_bytes())
            doc["dimension_names"] = list(DIMENSION_NAMES[name])
            if name == "emb":
                doc["attributes"] = {**EMB_ATTRS, **doc.get("attributes", {})}
            atomic_write(path, json.dumps(doc, indent=2), what="naming the store's dimensions",
                         hint=_FULL_HINT)
        for name in ("emb", "check", "done"):
            self.__dict__.pop(name, None)  # read again, with their names
        return True

    # ------------------------------------------------------------------ blocks

    def chunk_slice(self, i: int) -> slice:
        start = i * self.chunk_cells
        return slice(start, min(start + self.chunk_cells, self.n_cells))

    @staticmethod
    def _read_per_block(array, out: np.ndarray, what: str) -> tuple[np.ndarray, dict[int, str]]:
        """``array`` (one chunk per block) read into ``out``, and the blocks whose chunk cannot
        be read (their rows stay zero: no record)."""
        try:
            out[...] = array[:]
            return out, {}
        except Exception:
            bad = {}
            for i in range(out.shape[0]):
                try:
                    out[i] = array[i]
                except Exception:
                    bad[i] = f"its {what} is unreadable"
            return out, bad

    def _read_flags(self) -> tuple[np.ndarray, dict[int, str]]:
        """Each block's done flag as on disk now, and the blocks whose flag cannot be read."""
        return self._read_per_block(self.done, np.zeros(self.n_chunks, dtype=np.uint8),
                                    "completion record")

    def _read_records(self) -> tuple[np.ndarray | None, dict[int, str]]:
        """The check records (None in a format-1 store), and the blocks whose record cannot be
        read."""
        if self.check is None:
            return None, {}
        return self._read_per_block(self.check, np.zeros((self.n_chunks, 3), dtype=np.uint64),
                                    "check record")

    def _chunk_file(self, i: int) -> Path | None:
        """The file of block ``i``'s embeddings, for a local store of plain bytes (else None)."""
        root = local_root(self.location)
        if root is None:
            return None
        try:
            meta = self.emb.metadata
            if [type(c).__name__ for c in meta.codecs] != ["BytesCodec"]:
                return None
            return root / "emb" / meta.encode_chunk_key((i, 0))
        except Exception:  # another zarr layout: sizes are not ours to judge
            return None

    def _file_problem(self, i: int, cells: int | None) -> str | None:
        """Why block ``i``'s chunk file is wrong without reading it (``cells``: the embedded cells
        its record gives; None when unknown)."""
        path = self._chunk_file(i)
        if path is None:
            return None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            # Zarr writes no file for a block of fill values: right when nothing was embedded.
            return None if not cells else "its chunk file is missing"
        except OSError as exc:
            return f"its chunk file is unreadable: {exc.strerror or exc}"
        want = self.chunk_cells * self.dim * 2
        if size == want:
            return None
        if size == 0:
            return "its chunk file is empty"
        if size < want:
            return f"its chunk file is cut short, {size:,} of {want:,} bytes"
        return f"its chunk file holds {size:,} bytes, not {want:,}"

    def mapped_block(self, i: int) -> np.ndarray | None:
        """Block ``i``'s rows as a read-only float16 view of its chunk file, memory-mapped (the
        pages are the OS's file cache: nothing is copied, and they are shared between processes
        reading the same store), or None where it cannot be mapped: a store at a URL or in
        another codec, a chunk file that is missing or not whole. Copy-on-write mapping, so
        nothing taxamap does to the view can reach the file."""
        path = self._chunk_file(i)
        if path is None:
            return None
        try:  # a missing or partial chunk file fails here
            if path.stat().st_size != self.chunk_cells * self.dim * 2:
                return None
            view = np.memmap(path, dtype="<f2", mode="c", shape=(self.chunk_cells, self.dim))
        except (OSError, ValueError):
            return None
        sl = self.chunk_slice(i)
        return view[:sl.stop - sl.start]

    @staticmethod
    def _record_problem(record) -> str | None:
        if record is None:
            return None  # format 1, read-only: nothing to check against
        kind = int(record[2])
        if kind == 0:
            return "its check record is missing"
        if kind != CHECK_CRC32:
            return f"its check record is of an unknown kind ({kind})"
        return None

    def _cheap_problem(self, i: int, record) -> str | None:
        """Why finished block ``i`` is damaged, from its record and its chunk file's size (no
        cell is read), or None."""
        return self._record_problem(record) or self._file_problem(
            i, None if record is None else int(record[1]))

    @staticmethod
    def _data_problem(raw: np.ndarray, record) -> str | None:
        """Why a block's rows as read (float16) do not match its record, or None."""
        if record is None:
            return None
        crc, cells = block_record(raw)
        if crc != int(record[0]):
            return "checksum mismatch"
        if cells != int(record[1]):
            return f"{cells:,} embedded cells where its record gives {int(record[1]):,}"
        return None

    def verify_block(self, i: int, record=None) -> str | None:
        """Read block ``i`` whole and check it against its record: why it is damaged, or None."""
        if record is None and self.check is not None:
            records, bad = self._read_records()
            if i in bad:
                return bad[i]
            record = records[i]
        problem = self._cheap_problem(i, record)
        if problem is not None:
            return problem
        try:
            raw = np.asarray(self.emb[self.chunk_slice(i)])
        except Exception as exc:
            return f"unreadable: {_short(exc)}"
        problem = self._data_problem(raw, record)
        if problem is None:
            self._verified.add(i)
        return problem

    def pending_chunks(self, verify: bool = False) -> list[int]:
        """Blocks to compute: those never finished, and finished ones that fail their check
        (listed in :attr:`damaged`). The check reads the records and the chunk files' sizes;
        with ``verify`` (or after a metadata repair) every block is read and its CRC checked."""
        verify = verify or self.full_check
        flags, damaged = self._read_flags()
        records, bad_records = self._read_records()
        for i in range(self.n_chunks):
            if not flags[i]:
                continue
            record = None if records is None else records[i]
            problem = bad_records.get(i) or self._cheap_problem(i, record)
            if problem is None and verify and i not in self._verified:
                problem = self.verify_block(i, record)
            if problem is not None:
                damaged[i] = problem
        for i in damaged:
            flags[i] = 0
        self.full_check = False
        self.damaged, self._flags, self._records = damaged, flags, records
        return [i for i in range(self.n_chunks) if not flags[i]]

    def is_complete(self) -> bool:
        return not self.pending_chunks()

    def records_digest(self) -> str:
        """A hash of the store's key, completion flags and check records as on disk now: it
        changes whenever any block is embedded again, so what is derived from the cells
        (a panel's per-cell statistics) can key on it."""
        flags, _ = self._read_flags()
        records, _ = self._read_records()
        h = hashlib.sha1(self.key.encode())
        h.update(np.ascontiguousarray(flags, dtype=np.uint8).tobytes())
        if records is not None:
            h.update(np.ascontiguousarray(records, dtype="<u8").tobytes())
        return h.hexdigest()[:20]

    def finished(self, blocks) -> set[int]:
        """Which of ``blocks`` are recorded finished on disk now, with a sound record and chunk
        file (another run may have just written them); their bytes are not read."""
        flags, bad = self._read_flags()
        records, bad_records = self._read_records()
        out = set()
        for i in blocks:
            if not flags[i] or i in bad or i in bad_records:
                continue
            record = None if records is None else records[i]
            if self._cheap_problem(i, record) is None:
                out.add(i)
        return out

    def forget(self, blocks) -> None:
        """Mark ``blocks`` (found damaged; a dict gives why) not done, so the next run embeds them
        again. A store that cannot be written keeps its flags: the damage is found again."""
        if isinstance(blocks, dict):
            self.damaged.update(blocks)
        for i in blocks:
            self._verified.discard(i)
            if self._flags is not None:
                self._flags[i] = 0
            try:
                self.done[i] = 0
            except Exception:
                pass

    def write_chunk(self, i: int, values: np.ndarray, complete: bool = True) -> None:
        """Write block ``i`` and then, if ``complete``, its check record and its completion record
        (an incomplete block is recomputed by the next run)."""
        sl = self.chunk_slice(i)
        if values.shape != (sl.stop - sl.start, self.dim):
            raise ValueError(f"block {i} expects {(sl.stop - sl.start, self.dim)}, got {values.shape}")
        data = values.astype(np.float16)
        record = None
        with disk_full_guard(self.location, self.bytes_left, what="writing the embedding store",
                             hint=_FULL_HINT):
            self.emb[sl] = data
            if complete:
                if self.check is not None:
                    crc, cells = block_record(data)
                    record = np.array([crc, cells, CHECK_CRC32], dtype=np.uint64)
                    self.check[i] = record
                self.done[i] = 1
        self._verified.discard(i)
        if complete:
            self.damaged.pop(i, None)
            if self._flags is not None:
                self._flags[i] = 1
            if self._records is not None and record is not None:
                self._records[i] = record

    def _unfinished(self) -> list[int]:
        flags = self._flags if self._flags is not None else self._read_flags()[0]
        return [i for i in range(self.n_chunks) if not flags[i]]

    def cells_left(self) -> int:
        """Cells in the blocks with no completion record."""
        return sum(self.chunk_slice(i).stop - self.chunk_slice(i).start
                   for i in self._unfinished())

    def bytes_left(self) -> int:
        """Roughly what the unfinished blocks still need on disk: Zarr writes every chunk whole
        (the last one padded to ``chunk_cells``), float16, uncompressed."""
        return len(self._unfinished()) * self.chunk_cells * self.dim * self.emb.dtype.itemsize

    def embedded_cells(self) -> int | None:
        """Cells holding an embedding, from the finished blocks' records (None in a format-1
        store)."""
        if self._records is None:
            self.pending_chunks()
        if self._records is None or self._flags is None:
            return None
        return int(sum(int(self._records[i][1]) for i in range(self.n_chunks) if self._flags[i]))

    def read(self, rows: slice | None = None) -> np.ndarray:
        """Embeddings as float32 (all cells, or a slice of rows).

        Each finished block is checked against its record the first time it is read (its CRC,
        computed on the bytes read anyway); damaged ones are marked not done and raise
        :class:`StoreDamaged`, so a lost file never reads as cells that could not be embedded.
        """
        start, stop, _ = (rows if rows is not None else slice(None)).indices(self.n_cells)
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        if stop <= start:
            return out
        if self._flags is None:
            self.pending_chunks()
        damaged: dict[int, str] = {}
        cc = self.chunk_cells
        for b in range(start // cc, (stop - 1) // cc + 1):
            whole = self.chunk_slice(b)
            lo, hi = max(start, whole.start), min(stop, whole.stop)
            if b in self.damaged:
                damaged[b] = self.damaged[b]
                continue
            check = bool(self._flags[b]) and b not in self._verified
            try:
                raw = np.asarray(self.emb[whole if check else slice(lo, hi)])
            except Exception as exc:
                damaged[b] = f"unreadable: {_short(exc)}"
                continue
            if check:
                problem = self._data_problem(raw, None if self._records is None else self._records[b])
                if problem is not None:
                    damaged[b] = problem
                    continue
                self._verified.add(b)
                raw = raw[lo - whole.start:hi - whole.start]
            out[lo - start:hi - start] = raw
        if damaged:
            self.forget(damaged)
            raise StoreDamaged(self, damaged)
        return out

    def gather(self, cells: np.ndarray) -> np.ndarray:
        """Embeddings as float32 of the cells numbered ``cells`` (sorted): a map tile's few
        cells. The blocks of a local store of plain bytes are read by spans of those cells
        (:func:`gather_rows`, nothing mapped); they pass the cheap checks of :meth:`pending_chunks` (record,
        file size), their CRC is checked by :meth:`read` and ``--verify``. Cells of unfinished
        or damaged blocks read as NaN (not embedded); other stores read the spans holding them."""
        cells = np.asarray(cells, dtype=np.int64)
        out = np.full((cells.size, self.dim), np.nan, dtype=np.float32)
        if self._flags is None:
            self.pending_chunks()
        blocks = cells // self.chunk_cells
        bounds = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            b = int(blocks[lo])
            if not self._flags[b] or b in self.damaged:
                continue
            path = self._chunk_file(b)
            if path is None:
                out[lo:hi] = self.read(slice(int(cells[lo]), int(cells[hi - 1]) + 1))[
                    cells[lo:hi] - cells[lo]]
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # a block of cells none embedded: no file
                continue
            try:
                gather_rows(fd, cells[lo:hi] - b * self.chunk_cells, (self.dim,), "<f2",
                            out=out[lo:hi])
            finally:
                os.close(fd)
        return out

    def touch(self) -> None:
        """Record a use (``taxamap cache info``'s last use, ``cache clear --older-than``): the
        modification time of the lock file beside a local store."""
        lock = beside(self.location, ".lock")
        if lock is not None:
            try:
                lock.touch()
            except OSError:
                pass  # a read-only cache: the last use is not worth an error


def delete_store(location: str | os.PathLike) -> None:
    """Delete a local store with its lock, claims and embedding pyramid, under its creation lock
    (a run opening it meanwhile waits, then makes it anew)."""
    location = str(location)
    root = local_root(location)
    if root is None:
        raise TaxamapError(f"cannot delete {location}: only stores on this machine's disks")
    with _creation_lock(location):
        remove_tree(root)
        remove_tree(beside(location, ".claims"))
        remove_tree(derived_folder(location))
        remove_tree(beside(location, ".pyramid"))
        beside(location, ".pyramid.lock").unlink(missing_ok=True)
    beside(location, ".lock").unlink(missing_ok=True)


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
