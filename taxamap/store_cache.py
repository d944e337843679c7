"""The embedding stores in the cache, as ``taxamap cache info|clear|verify`` sees them.

``<cache>/stores/<grid key>/<modality>-<store key>`` is one store (a Zarr group; see
:mod:`taxamap.store`), with ``.lock`` (its last use is that file's time) and ``.claims/`` beside
it. Stores made with ``--store PATH`` live where the user put them and are not listed here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from taxamap.store import (EmbeddingStore, StoreMetadataDamaged, beside, damage_summary,
                           default_store_root, delete_store)


@dataclass
class CachedStore:
    """One store in the cache: what ``taxamap cache info`` prints of it."""

    path: Path
    region: str
    resolution: float | None
    cells: int | None
    modality: str
    model: str
    bytes: int
    last_used: float
    key: str | None
    readable: bool = True


def _disk_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` take on disk (allocated blocks where the system says)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue  # removed meanwhile
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def _region_of(attrs: dict) -> str:
    """The region a store was made for: its recorded name, else its grid's box."""
    if attrs.get("region"):
        return str(attrs["region"])
    grid = attrs.get("grid") or {}
    try:
        res = float(grid["resolution"])
        west, north = float(grid["west"]), float(grid["north"])
        east, south = west + res * int(grid["width"]), north - res * int(grid["height"])
        return f"bbox {west:g},{south:g},{east:g},{north:g}"
    except (KeyError, TypeError, ValueError):
        return "?"


def _describe(path: Path) -> CachedStore:
    try:
        attrs = json.loads((path / "zarr.json").read_bytes()).get("attributes") or {}
        readable = isinstance(attrs, dict)
    except (OSError, ValueError, AttributeError):
        attrs, readable = {}, False
    attrs = attrs if isinstance(attrs, dict) else {}
    modality, _, key = path.name.partition("-")
    lock = beside(str(path), ".lock")
    try:
        last = lock.stat().st_mtime
    except OSError:
        last = path.stat().st_mtime
    grid = attrs.get("grid") if isinstance(attrs.get("grid"), dict) else {}
    return CachedStore(
        path=path, region=_region_of(attrs), resolution=grid.get("resolution"),
        cells=attrs.get("n_cells"), modality=str(attrs.get("modality") or modality),
        model=str(attrs.get("model") or "?"), bytes=_disk_bytes(path), last_used=last,
        key=attrs.get("key") or key or None, readable=readable)


def cached_stores(cache_dir: str | os.PathLike | None = None) -> list[CachedStore]:
    """Every store under ``<cache>/stores``, by region, resolution and modality."""
    root = default_store_root(cache_dir)
    found = []
    if root.is_dir():
        for grid_dir in root.iterdir():
            if not grid_dir.is_dir() or grid_dir.name.startswith("."):
                continue
            for path in grid_dir.iterdir():
                if (path.is_dir() and "-" in path.name and not path.name.startswith(".")
                        and not path.name.endswith((".claims", ".pyramid"))):
                    found.append(_describe(path))
    return sorted(found, key=lambda s: (s.region.lower(), s.resolution or 0, s.modality,
                                        str(s.path)))


def remove_store(store: CachedStore) -> None:
    """Delete one cached store (and its grid's folder once that is empty)."""
    delete_store(store.path)
    try:
        store.path.parent.rmdir()
    except OSError:
        pass


def clear_stores(cache_dir: str | os.PathLike | None = None, *, region: str | None = None,
                 older_than_days: float | None = None) -> list[CachedStore]:
    """Delete the cached stores (all; those of ``region``, by the name ``cache info`` shows; or
    those last used more than ``older_than_days`` ago); returns what was deleted."""
    now = time.time()
    gone = []
    for store in cached_stores(cache_dir):
        if region is not None and store.region.lower() != region.strip().lower():
            continue
        if older_than_days is not None and now - store.last_used < older_than_days * 86400:
            continue
        remove_store(store)
        gone.append(store)
    return gone


def verify_store(store: CachedStore) -> tuple[int, int, str | None]:
    """Read every finished block of a cached store back and check it against its record.
    Returns (blocks sound, blocks unfinished, None or one line saying what is damaged). Damaged
    blocks are marked not done, so the next run over that grid embeds them again."""
    if not store.readable or not store.key:
        return 0, 0, (f"store {store.path}: its zarr.json is unreadable; the next run over this "
                      "grid rewrites it and checks every block")
    try:
        opened = EmbeddingStore.open_existing(store.path, store.key)
    except StoreMetadataDamaged as exc:
        return 0, 0, (f"store {store.path}: its metadata is damaged ({exc.problem}); the next "
                      "run over this grid rewrites it and checks every block")
    pending = opened.pending_chunks(verify=True)
    damaged = dict(opened.damaged)
    unfinished = len(pending) - len(damaged)
    if not damaged:
        return opened.n_chunks - len(pending), unfinished, None
    opened.forget(damaged)
    them = "it" if len(damaged) == 1 else "them"
    return opened.n_chunks - len(pending), unfinished, (
        f"{damage_summary(str(store.path), damaged, opened.n_chunks)}; the next predict, embed or "
        f"serve over this grid embeds {them} again")
