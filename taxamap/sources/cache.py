"""On-disk cache of imagery tiles and patches, shared across runs, regions and processes.

Layout under the cache root (default ``<user cache dir>/taxamap/tiles``, ``--cache`` overrides)::

    <root>/<source id>/source.json        what the source is (its URL template or settings)
    <root>/<source id>/<z>/<x>/<y>.img     the bytes the server sent (JPEG/PNG), validated
    <root>/<source id>/<z>/<x>/<y>.404     empty marker: the server said "no such tile"

``source id`` is a hash of the source's identity (the URL template for XYZ sources), so two
templates never share entries and one template's entries are found again by every run.

Rules that keep the cache trustworthy: an entry is written only after its bytes decode as an
image, through :func:`taxamap.io.atomic_write` (a crash never leaves a half-written entry under
the real name; no fsync per tile, since a damaged entry is caught on read anyway); an entry that
fails to decode on read is deleted and reported as absent, so the caller fetches it again. A full
disk is one :class:`~taxamap.io.DiskFull` line naming the cache folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from taxamap.errors import TaxamapError
from taxamap.io import DiskFull, atomic_write, disk_full_guard, remove_tree

#: Suffix of a cached image and of a negative ("404") marker.
IMAGE_SUFFIX = ".img"
MISSING_SUFFIX = ".404"
SOURCE_FILE = "source.json"


class _Missing:
    """The cache's answer for a tile the server reported as absent."""

    def __repr__(self) -> str:
        return "MISSING"


#: Returned by :meth:`TileCache.get` for a negative (404) entry.
MISSING = _Missing()


def default_cache_dir() -> Path:
    """``<cache root>/tiles``: ``$TAXAMAP_CACHE/tiles``, else e.g. ``~/.cache/taxamap/tiles``."""
    from taxamap.paths import cache_subdir

    return cache_subdir("tiles")


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache root for a user-given ``--cache`` value (``None``: the default)."""
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def source_id(identity: Any) -> str:
    """Stable short id of a source: sha256 of its identity (a template string or a JSON dict)."""
    text = identity if isinstance(identity, str) else json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def decode_image(data: bytes):
    """Decode ``data`` fully into an RGB ``PIL.Image``; raise ``OSError``/``ValueError`` if it is not one.

    ``load()`` forces the whole decode: a truncated JPEG fails here, not later in the encoder.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _write_entry(root: Path, path: Path, data: bytes) -> None:
    hint = "free some space or pass --cache DIR on a disk with room; the same command resumes"
    try:
        with disk_full_guard(root, len(data), what="caching satellite tiles", hint=hint):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data, fsync=False, what="caching satellite tiles", hint=hint)
    except DiskFull as exc:
        raise DiskFull(root, exc.need, what=exc.what, hint=hint, reason=exc.reason,
                       per_cell=exc.per_cell) from None
    except OSError as exc:
        raise TaxamapError(
            f"cannot write the tile cache at {path.parent} ({exc.strerror or exc}): "
            "free some space or pass --cache DIR"
        ) from None


class TileCache:
    """The entries of one source under a cache root. Thread- and process-safe for get/put."""

    def __init__(self, cache_dir: str | Path | None, identity: Any, label: str | None = None):
        self.root = resolve_cache_dir(cache_dir)
        self.identity = identity
        self.id = source_id(identity)
        self.dir = self.root / self.id
        self._label = label
        self._described = False

    def _path(self, key: str, suffix: str) -> Path:
        return self.dir / f"{key}{suffix}"

    def get(self, key: str):
        """The cached image for ``key`` (an RGB PIL image), :data:`MISSING`, or ``None`` if absent.

        ``key`` is a relative path such as ``"14/8192/5461"``. A corrupt entry is deleted and
        reported as absent, so the caller refetches it.
        """
        path = self._path(key, IMAGE_SUFFIX)
        try:
            data = path.read_bytes()
        except OSError:  # absent, or an unreadable cache: either way, fetch it (put says why)
            try:
                return MISSING if self._path(key, MISSING_SUFFIX).exists() else None
            except OSError:
                return None
        try:
            return decode_image(data)
        except (OSError, ValueError, SyntaxError):
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, data: bytes, *, validated: bool = False) -> None:
        """Store image bytes for ``key``; they are decoded first unless the caller already did."""
        if not validated:
            decode_image(data)  # raises on bytes that are not an image: nothing is written
        self._describe()
        _write_entry(self.root, self._path(key, IMAGE_SUFFIX), data)
        self._path(key, MISSING_SUFFIX).unlink(missing_ok=True)

    def put_missing(self, key: str) -> None:
        """Remember that ``key`` does not exist on the server (so reruns send no request)."""
        self._describe()
        _write_entry(self.root, self._path(key, MISSING_SUFFIX), b"")

    def _describe(self) -> None:
        if self._described:
            return
        meta = self.dir / SOURCE_FILE
        if not meta.exists():
            body = {"identity": self.identity, "label": self._label or _label_of(self.identity)}
            _write_entry(self.root, meta, json.dumps(body, indent=1, sort_keys=True).encode("utf-8"))
        self._described = True


def _label_of(identity: Any) -> str:
    if isinstance(identity, str):
        return identity
    if isinstance(identity, dict):
        return str(identity.get("url") or identity.get("kind") or json.dumps(identity, sort_keys=True))
    return str(identity)


def _read_source(folder: Path) -> dict:
    try:
        return json.loads((folder / SOURCE_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def _count(folder: Path) -> tuple[int, int, int]:
    """(image entries, their bytes, negative entries) under ``folder``."""
    entries = size = missing = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith(IMAGE_SUFFIX) and not name.startswith("."):
                entries += 1
                try:
                    size += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass  # removed by a concurrent clear
            elif name.endswith(MISSING_SUFFIX):
                missing += 1
    return entries, size, missing


def cache_info(cache_dir: str | Path | None = None) -> dict:
    """What ``taxamap cache info`` prints: the root, totals, and one row per source.

    Returns ``{"path", "entries", "bytes", "missing", "sources": [{"id", "label", "entries",
    "bytes", "missing"}, ...]}`` (``missing`` counts negative 404 markers).
    """
    root = resolve_cache_dir(cache_dir)
    out: dict[str, Any] = {"path": str(root), "entries": 0, "bytes": 0, "missing": 0, "sources": []}
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entries, size, missing = _count(folder)
        meta = _read_source(folder)
        out["sources"].append(
            {
                "id": folder.name,
                "label": meta.get("label", "?"),
                "entries": entries,
                "bytes": size,
                "missing": missing,
            }
        )
        out["entries"] += entries
        out["bytes"] += size
        out["missing"] += missing
    return out


def cache_clear(cache_dir: str | Path | None = None, source: str | None = None) -> int:
    """Delete cached entries (``taxamap cache clear``); returns how many entries were removed.

    ``source`` selects one source by its id (as ``cache_info`` lists it), its label, or its URL
    template; ``None`` clears every source. An unknown ``source`` is a :class:`TaxamapError`.
    """
    root = resolve_cache_dir(cache_dir)
    if not root.is_dir():
        if source is not None:
            raise TaxamapError(f"no cached source {source!r} in {root} (see 'taxamap cache info')")
        return 0
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if source is not None:
        wanted = {source, source_id(source)}
        folders = [p for p in folders if p.name in wanted or _read_source(p).get("label") == source]
        if not folders:
            raise TaxamapError(f"no cached source {source!r} in {root} (see 'taxamap cache info')")
    removed = 0
    for folder in folders:
        entries, _size, missing = _count(folder)
        remove_tree(folder)  # a concurrent run never sees a half-deleted source as valid entries
        removed += entries + missing
    return removed


def cached(cache: "TileCache | None", key: str, stats) -> tuple[bool, Any]:
    """Look ``key`` up in a source's cache (``cache`` may be None): (True, image) for a stored
    answer, (True, None) for one recorded as absent (404, blank), (False, None) when it must be
    fetched. Hits are counted in the source's ``stats``."""
    if cache is None:
        return False, None
    hit = cache.get(key)
    if hit is MISSING:
        stats.add(cache_hits=1, not_found=1)
        return True, None
    if hit is not None:
        stats.add(cache_hits=1)
        return True, hit
    return False, None
