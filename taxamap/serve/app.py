"""The Starlette app of ``taxamap serve``: the HTTP contract of DESIGN.md ("Web app") over one
:class:`~taxamap.session.MapSession`.

Every answer is JSON, a PNG, a download or the page; every error is a 4xx JSON
``{"error": "one readable line"}``. No request parameter reaches a file path: parameters are
checked against fixed sets or patterns, uploads and downloads live in a server-owned temporary
folder under names the server chooses.
"""

from __future__ import annotations

import contextlib
import functools
import ctypes
import ctypes.util
import hashlib
import os
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import unicodedata
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.writers.files import list_formats
from taxamap.serve import INSTALL_HINT
from taxamap.surface import speaking_to

if TYPE_CHECKING:  # pragma: no cover
    from taxamap.session import EmbeddedQuery, MapSession

log = logging.getLogger("taxamap.serve")

#: Largest upload accepted by default (a photo or a recording).
DEFAULT_MAX_UPLOAD = 20 * 2**20

#: Uploads received and embedded at once by default; one more is answered 503 with Retry-After.
DEFAULT_MAX_UPLOADS = 4

#: Photos or recordings decoded at once, whatever the number of uploads: one decode takes up to
#: ~0.5 GB (a 40 Mpx photo, see ``taxamap.models.preprocess.MAX_PIXELS``).
DECODE_SLOTS = 2

#: Seconds a client refused for being one upload too many is told to wait (Retry-After).
RETRY_AFTER_S = 5

#: Default seconds within which a request's head must arrive, and that an upload's body may
#: stall; an upload's whole body must arrive within DEFAULT_UPLOAD_TIMEOUT.
DEFAULT_READ_TIMEOUT = 20.0
DEFAULT_UPLOAD_TIMEOUT = 120.0

#: Longest recording an upload may be (the CLI takes an hour). A 20 MB MP3 at 32 kbit/s lasts
#: 80 minutes; decoding and resampling 10 minutes at 48 kHz takes ~0.5 GB.
UPLOAD_AUDIO_SECONDS = 600.0

#: Longest text parameter (species names, threshold rules) accepted.
MAX_TEXT = 200

#: Most species /api/species lists.
MAX_SPECIES_AT = 200

#: Most suggestions /api/search returns.
MAX_SUGGESTIONS = 20

#: zlib level of overlay PNGs: level 1 is several times faster than 6 and the overlays (smooth
#: ramps, large transparent areas) come out barely larger.
OVERLAY_PNG_LEVEL = 1

STATIC = Path(__file__).resolve().parent / "static"

#: Map tiles kept (PNG bytes, least recently used out): a few MB for a session of panning.
TILES_HELD = 4096
#: XYZ tile coordinates: a few digits, nothing else.
_TILE_NUMBER = re.compile(r"^[0-9]{1,8}$")

#: Threshold rules a request may give (maxtss would name a file: never from a request).
_RULE = re.compile(r"^(percentile|value):\s*-?(\d+(\.\d*)?|\.\d+)$", re.IGNORECASE)
_UPLOAD_ID = re.compile(r"^[0-9a-f]{24}$")
#: Downloads: the map formats of the writers' registry (but the HTML map: the page is one) and
#: the range polygons.
FORMATS = (*(f for f in list_formats() if f != "html"), "gpkg")


#: Uploads (photos, recordings) held by their id for follow-up requests: the newest ones.
UPLOADS_HELD = 64


def _frozen(params: dict) -> tuple:
    """A request's query parameters as a hashable key."""
    return tuple(sorted(params.items()))


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, one readable line and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------- request parameters

def text_param(params, name: str, required: bool = True) -> str | None:
    """A short printable text parameter (None when absent and not required)."""
    value = params.get(name)
    if value is None or not value.strip():
        if required:
            raise ApiError(400, f"missing {name}=...")
        return None
    if len(value) > MAX_TEXT:
        raise ApiError(400, f"{name} is longer than {MAX_TEXT} characters")
    if any(unicodedata.category(c).startswith("C") for c in value):
        raise ApiError(400, f"{name} holds control characters")
    return value.strip()


def number_param(params, name: str, default: float | None = None, lo: float = -math.inf,
                 hi: float = math.inf) -> float:
    """A finite number parameter in [lo, hi]."""
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ApiError(400, f"missing {name}=...")
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, got {_one_line(raw)[:40]!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be a number from {lo:g} to {hi:g}")
    return value


def rule_param(params, default: str | None = None) -> str | None:
    """A threshold rule ``percentile:P`` or ``value:V`` (checked by the range code too)."""
    rule = text_param(params, "threshold", required=False) or default
    if rule is None:
        return None
    from taxamap.products.ranges import parse_rule, rule_forms

    if not _RULE.match(rule):
        raise ApiError(400, f"threshold must be {rule_forms()}")

    try:
        return parse_rule(rule).text
    except TaxamapError as exc:
        raise ApiError(400, _one_line(exc)) from None


def encode_png(rgba: np.ndarray, level: int = OVERLAY_PNG_LEVEL) -> bytes:
    """(H, W, 4) uint8 -> PNG bytes, rows unfiltered. Pillow tries all five PNG filters on every
    row, which costs ~7x the compression itself on an overlay; unfiltered rows of a smooth,
    mostly transparent overlay compress as well (measured: 114 vs 144 KiB, 11 vs 82 ms for a
    USA 0.05 deg overlay)."""
    import struct
    import zlib

    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    height, width = rgba.shape[:2]
    rows = np.empty((height, 1 + width * 4), dtype=np.uint8)
    rows[:, 0] = 0  # filter type "None" on every row
    rows[:, 1:] = rgba.reshape(height, width * 4)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(memoryview(rows), level)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------- uploads

_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG", ".jpg"), (b"\x89PNG\r\n\x1a\n", "PNG", ".png"))
_AUDIO_FORMATS = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3"}


@functools.lru_cache(maxsize=1)
def _empty_tile() -> bytes:
    """A fully transparent 256-px tile (no cell under it)."""
    return encode_png(np.zeros((256, 256, 4), dtype=np.uint8))


def sniff_upload(path: Path) -> tuple[str, str]:
    """("image" | "audio", extension) of an uploaded file, from its content (magic bytes, then
    Pillow or libsndfile must open it; only headers are read); ApiError 415 otherwise."""
    with open(path, "rb") as fh:
        data = fh.read(16)
    kind = None
    for magic, _fmt, ext in _IMAGE_MAGIC:
        if data.startswith(magic):
            kind = ("image", ext)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = ("image", ".webp")
    if kind is not None:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    im.verify()  # structure and checksums; no pixel is decoded
        except Image.DecompressionBombError:
            return kind  # load_image says so, in its words
        except Exception:  # noqa: BLE001 - any decoder failure means: not a usable photo
            raise ApiError(415, "the photo could not be decoded (corrupt or truncated)") from None
        return kind
    audio = (data[:4] == b"RIFF" and data[8:12] == b"WAVE") or data[:4] in (b"fLaC", b"OggS") \
        or data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if audio:
        import soundfile as sf

        try:
            info = sf.info(str(path))
        except Exception:  # noqa: BLE001 - libsndfile refuses it: not a recording we can read
            raise ApiError(415, "the recording could not be decoded (WAV, FLAC, OGG or MP3)") \
                from None
        ext = _AUDIO_FORMATS.get(str(info.format).upper())
        if ext is None:
            raise ApiError(415, f"recordings in {info.format} are not supported; use WAV, FLAC, "
                           "OGG or MP3")
        return "audio", ext
    raise ApiError(415, "upload a photo (JPEG, PNG, WebP) or a recording (WAV, FLAC, OGG, MP3)")


def page_terms(message: str, path: Path, shown: str, folder: Path) -> str:
    """An error about the server's copy of an upload, told about the user's file: the copy's
    path becomes the file's name, and no other path under the server's folder is shown."""
    message = _one_line(message).replace(str(path), shown)
    return re.sub(re.escape(str(folder)) + r"\S*", "(a file of the server's)", message)


_LIBC = None


def give_back_memory() -> None:
    """Hand the memory a decode freed back to the system. glibc keeps freed heap pages (its
    mmap threshold grows with each large block freed, so a photo's blocks land on the heap)
    until ``malloc_trim``; elsewhere this does nothing."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


def display_name(filename: str | None, fallback: str) -> str:
    """The user's file name as a label: its last path part, printable, at most 80 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(c for c in name if not unicodedata.category(c).startswith("C")).strip()
    return name[:80] or fallback


# ---------------------------------------------------------------------- species suggestions

class SpeciesIndex:
    """Suggestions from taxamap's shipped taxonomy table (binomials and common names)."""

    def __init__(self):
        from taxamap.taxonomy import list_table_species, lookup_table

        rows = []
        for binomial in list_table_species():
            taxon = lookup_table(binomial)
            if taxon is not None:
                rows.append((binomial, taxon.prompt, taxon.common_name or ""))
        self.rows = rows

    def search(self, text: str, limit: int = MAX_SUGGESTIONS) -> list[dict]:
        """Up to ``limit`` species matching ``text``, ranked as the CLI's suggestions are
        (:func:`taxamap.taxonomy.search_table`: exact and whole-word matches of scientific and
        common names first)."""
        from taxamap.taxonomy import search_table

        return [{"name": t.binomial, "prompt": t.prompt, "common": t.common_name}
                for t in search_table(text, limit)]


# ---------------------------------------------------------------------- the service

class MapService:
    """What the endpoints call: the session, the caches and the server's own temporary folder."""

    def __init__(self, session: "MapSession", *, max_upload: int = DEFAULT_MAX_UPLOAD,
                 workdir: str | None = None, max_uploads: int = DEFAULT_MAX_UPLOADS,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT):
        self.session = session
        self.max_upload = int(max_upload)
        self.max_uploads = int(max_uploads)
        self.read_timeout = float(read_timeout)
        self.upload_timeout = float(upload_timeout)
        self.uploads_in_progress = 0
        self._upload_count_lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(DECODE_SLOTS)
        self._decodes = 0  # decodes running now; memory is handed back when the last one ends
        self.workdir = Path(tempfile.mkdtemp(prefix="taxamap-serve-", dir=workdir))
        # Computed answers are kept (least recently used out) by what they are computed from;
        # an upload is held by its id until UPLOADS_HELD newer ones push it out.
        self._answers = functools.lru_cache(maxsize=256)(self._new_map_answer)
        self._overlays = functools.lru_cache(maxsize=64)(self._draw_overlay)
        self._ranges = functools.lru_cache(maxsize=32)(self._range_geojson)
        self._patches = functools.lru_cache(maxsize=256)(self._patch_png)
        self._tiles = functools.lru_cache(maxsize=TILES_HELD)(self._tile_png)
        self._stretches = functools.lru_cache(maxsize=256)(self._stretch)
        self.tiler = self._tile_scorer(session)
        # A grid too large for memory is drawn only as tiles (no whole-grid overlay).
        self.tiled = not session.scorer.in_memory
        self.uploads: dict[str, "EmbeddedQuery"] = {}
        self.species = SpeciesIndex()
        self._land = None
        self._land_lock = threading.Lock()
        self.patches = "satellite" in session.modalities  # per-cell satellite patches
        # Scoring and drawing run on at most this many threads at once: more only thrash the
        # caches and memory bandwidth (each scores every cell); cache hits never wait.
        self._compute = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _tile_scorer(session):
        from taxamap.serve.tiles import TileScorer

        try:
            return TileScorer(session)
        except OSError as exc:  # e.g. a read-only store: tiles from the grid's own cells
            log.warning("no embedding pyramid (%s); tiles score the grid's own cells", exc)
            return TileScorer(session, factors=[])

    def warm_up(self) -> None:
        """Map one species of the shipped table and draw the land once, so the text encoder and
        every import the first request needs are loaded before the server says it is ready."""
        if self.species.rows:
            try:
                self.map_answer({"species": self.species.rows[0][0]})
            except ApiError as exc:  # e.g. the table is not reachable offline: not fatal
                log.warning("warm-up map failed: %s", exc.message)
        self.land()

    # -- queries

    def query_of(self, params) -> tuple["EmbeddedQuery", dict]:
        """The embedded query a request names (``species=NAME`` or ``upload=ID``) and the
        parameters that name it again in follow-up URLs."""
        upload = params.get("upload")
        if upload is not None:
            if not _UPLOAD_ID.match(upload):
                raise ApiError(400, "upload must be an id returned by POST /api/query")
            hit = self.uploads.get(upload)
            if hit is None:
                raise ApiError(404, "that upload is no longer held by the server; upload the "
                               "file again")
            return hit, {"upload": upload}
        name = text_param(params, "species")
        try:
            embedded = self.session.embed(name)
        except TaxamapError as exc:
            message = _one_line(exc)
            raise ApiError(404 if message.startswith("unknown species") else 400,
                           message) from None
        return embedded, {"species": name}

    def band_of(self, params) -> str:
        band = params.get("band") or "fused"
        if band not in self.session.bands:
            raise ApiError(400, f"band must be one of {', '.join(self.session.bands)}")
        return band

    def dataset(self, embedded: "EmbeddedQuery"):
        """The query's map (the session computes at most as many at once as there are cores;
        a cached one never waits)."""
        try:
            return self.session.dataset(embedded)
        except TaxamapError as exc:
            raise ApiError(400, _one_line(exc)) from None

    # -- answers

    def map_answer(self, params) -> dict:
        """``/api/map``: the Dataset's band statistics, the overlay's bounds and URL."""
        t0 = time.perf_counter()
        embedded, key = self.query_of(params)
        embed_ms = (time.perf_counter() - t0) * 1000.0
        answer = self._map_answer(embedded, key, params)
        if "timings_ms" in answer:
            answer["timings_ms"] = {"embed": round(embed_ms, 1), **answer["timings_ms"]}
        answer["elapsed_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        return answer

    def _map_answer(self, embedded, key: dict, params) -> dict:
        from taxamap.writers.style import STRETCH_PERCENTILE

        band = self.band_of(params)
        percentile = number_param(params, "stretch", STRETCH_PERCENTILE, 0.0, 99.99)
        hits = self._answers.cache_info().hits
        answer = dict(self._answers(embedded, _frozen(key), band, round(percentile, 4)))
        if self._answers.cache_info().hits > hits:  # a cached answer took no time now
            answer.pop("timings_ms", None)
        return answer

    def tile_template(self, key: dict, band: str, percentile: float) -> str:
        """The Leaflet URL template of a query's tiles."""
        from urllib.parse import quote

        name = key.get("upload") or key["species"]
        return (f"/tiles/{quote(name, safe='')}/{{z}}/{{x}}/{{y}}.png?"
                + urlencode({"band": band, "stretch": f"{percentile:g}"}))

    def _tiled_answer(self, embedded, key: dict, band: str, percentile: float) -> dict:
        """``/api/map`` of a grid drawn only as tiles: band statistics and the stretch over the
        coarsest pyramid level (exact means of the cells), no whole-grid overlay."""
        t0 = time.perf_counter()
        stats = {}
        with self._compute:
            for name in self.session.bands:
                values = self.tiler.overview(embedded.query.vector, name)
                valid = values[np.isfinite(values)]
                stats[name] = ({"min": float(valid.min()), "max": float(valid.max()),
                                "mean": float(valid.mean())} if valid.size else
                               {"min": None, "max": None, "mean": None})
        stretch = self._stretches(embedded, band, percentile)
        g = self.session.grid
        return {
            "query": embedded.label, "prompt": embedded.query.prompt or None,
            "slug": embedded.query.slug, "band": band,
            "bounds": [[g.south, g.west], [g.north, g.east]], "bands": stats,
            "stretch": {"percentile": percentile, "vmin": stretch.vmin, "vmax": stretch.vmax,
                        "cells": stretch.valid},
            "overlay": None, "tiles": self.tile_template(key, band, percentile),
            **({"upload": key["upload"]} if "upload" in key else {}),
            "timings_ms": {"score": round((time.perf_counter() - t0) * 1000.0, 1)},
        }

    def _new_map_answer(self, embedded, key: tuple, band: str, percentile: float) -> dict:
        from taxamap.dataset import signal_note

        key = dict(key)
        if self.tiled:
            return self._tiled_answer(embedded, key, band, percentile)
        t0 = time.perf_counter()
        ds = self.dataset(embedded)
        t1 = time.perf_counter()
        stats = {}
        for name in self.session.bands:
            values = np.asarray(ds[name].values)
            valid = values[np.isfinite(values)]
            stats[name] = ({"min": float(valid.min()), "max": float(valid.max()),
                            "mean": float(valid.mean())} if valid.size else
                           {"min": None, "max": None, "mean": None})
        t2 = time.perf_counter()
        overlay = self.overlay(embedded, key, band, percentile)
        t3 = time.perf_counter()
        query = {**key, "band": band, "stretch": f"{percentile:g}"}
        return {
            "query": ds.attrs.get("query", embedded.label),
            "prompt": ds.attrs.get("prompt") or None,
            "slug": ds.attrs.get("slug"),
            "band": band,
            "bounds": overlay["bounds"],
            "bands": stats,
            "stretch": overlay["stretch"],
            **({"legend": overlay["legend"]} if "legend" in overlay else {}),
            "overlay": "/api/overlay.png?" + urlencode(query),
            "no_signal": signal_note(ds),
            "tiles": self.tile_template(key, band, percentile),
            **({"upload": key["upload"]} if "upload" in key else {}),
            # Where the server's time went (scoring every cell, statistics, drawing the PNG).
            "timings_ms": {"score": round((t1 - t0) * 1000.0, 1),
                           "stats": round((t2 - t1) * 1000.0, 1),
                           "draw": round((t3 - t2) * 1000.0, 1)},
        }

    def overlay(self, embedded, key: dict, band: str, percentile: float) -> dict:
        """The overlay PNG (Web-Mercator rows, transparent off the cells) of one band at one
        display stretch, with its bounds; cached."""
        return self._overlays(embedded, band, round(percentile, 4))

    def _draw_overlay(self, embedded, band: str, percentile: float) -> dict:
        from taxamap.dataset import band_meaning, band_unit
        from taxamap.writers.html import overlay_rgba
        from taxamap.writers.stretch import StretchRule, band_display
        from taxamap.writers.style import gradient_css

        ds = self.dataset(embedded)
        raster = np.asarray(ds[band].values)
        with self._compute:
            # 'relative' keeps its fixed 0-1 scale whatever the slider says; a trust layer
            # has its own colours over most of its range.
            cmap, stretch = band_display(band, raster,
                                         StretchRule("percentile", percentile=percentile))
            rgba, bounds = overlay_rgba(raster, self.session.grid, stretch, cmap=cmap)
            png = encode_png(rgba)
        out = {"png": png, "bounds": [[float(v) for v in p] for p in bounds],
               "stretch": {"percentile": percentile, "vmin": stretch.vmin,
                           "vmax": stretch.vmax, "cells": stretch.valid,
                           "fixed": bool(getattr(stretch, "fixed", False))}}
        if band_meaning(band):  # a trust layer: its own colours, unit and what high means
            out["legend"] = {"unit": band_unit(band), "meaning": band_meaning(band),
                             "stretch": stretch.describe(), "gradient": gradient_css(cmap)}
        return out

    def overlay_png(self, params) -> bytes:
        from taxamap.writers.style import STRETCH_PERCENTILE

        embedded, key = self.query_of(params)
        band = self.band_of(params)
        percentile = number_param(params, "stretch", STRETCH_PERCENTILE, 0.0, 99.99)
        return self.overlay(embedded, key, band, percentile)["png"]

    def _stretch(self, embedded, band: str, percentile: float):
        """The display stretch of a query's tiles: the overlay's (every cell) where the session
        holds its cells, else over the coarsest pyramid level."""
        from taxamap.writers.style import stretch_of

        if not self.tiled:
            return stretch_of(np.asarray(self.dataset(embedded)[band].values), percentile)
        with self._compute:
            return stretch_of(self.tiler.overview(embedded.query.vector, band), percentile)

    def tile_png(self, query: str, z: str, x: str, y: str, params) -> bytes:
        """``/tiles/{query}/{z}/{x}/{y}.png``: one 256-px Web Mercator tile of a band (transparent
        off the cells), scored at the pyramid level of its zoom; cached."""
        from taxamap.serve.tiles import MAX_ZOOM
        from taxamap.writers.style import STRETCH_PERCENTILE

        numbers = []
        for name, text in (("zoom", z), ("x", x), ("y", y)):
            if not _TILE_NUMBER.match(text or ""):
                raise ApiError(400, f"tile {name} must be a whole number, got {text[:20]!r}")
            numbers.append(int(text))
        zoom, tx, ty = numbers
        if zoom > MAX_ZOOM:
            raise ApiError(400, f"zoom must be 0 to {MAX_ZOOM}, got {zoom}")
        if tx >= 2 ** zoom or ty >= 2 ** zoom:
            raise ApiError(400, f"tile {zoom}/{tx}/{ty} is out of range: at zoom {zoom} x and y "
                           f"run from 0 to {2 ** zoom - 1}")
        key = {"upload": query} if _UPLOAD_ID.match(query or "") else {"species": query}
        embedded, _key = self.query_of(key)
        band = self.band_of(params)
        percentile = number_param(params, "stretch", STRETCH_PERCENTILE, 0.0, 99.99)
        return self._tiles(embedded, band, round(percentile, 4), zoom, tx, ty)

    def _tile_png(self, embedded, band: str, percentile: float, z: int, x: int, y: int) -> bytes:
        from taxamap.writers.style import colorize

        stretch = self._stretches(embedded, band, percentile)
        with self._compute:
            values = self.tiler.tile(embedded.query.vector, band, z, x, y)
            if values is None:
                return _empty_tile()
            return encode_png(colorize(values, stretch))

    def cell(self, params) -> dict:
        """``/api/cell``: every band's score at the cell holding (lat, lon); 404 outside."""
        lat = number_param(params, "lat", lo=-90.0, hi=90.0)
        lon = number_param(params, "lon", lo=-1e6, hi=1e6)
        embedded, _key = self.query_of(params)
        where = self.session.cell_at(lat, lon)
        if where is None:
            raise ApiError(404, f"no cell of this grid at lat {lat:.4f}, lon {lon:.4f}")
        row, col = where
        if self.tiled:  # one cell scored from the stores, not the whole grid
            return self._one_cell(embedded, row, col, lat, lon)
        ds = self.dataset(embedded)
        scores = {}
        for name in self.session.bands:
            value = float(np.asarray(ds[name].values)[row, col])
            scores[name] = value if math.isfinite(value) else None
        answer = {"lat": float(ds["y"].values[row]), "lon": float(ds["x"].values[col]),
                  "scores": scores, "query": ds.attrs.get("query")}
        if self.patches:
            answer["patch"] = "/api/patch?" + urlencode({"lat": f"{lat:.6f}", "lon": f"{lon:.6f}"})
        return answer

    def species_answer(self, params) -> dict:
        """``/api/species``: the reference panel's species ranked at the cell holding (lat,
        lon), best first (``top``, default 10); 404 off the grid's cells."""
        from taxamap.panel.questions import ranking_json

        t0 = time.perf_counter()
        lat = number_param(params, "lat", lo=-90.0, hi=90.0)
        lon = number_param(params, "lon", lo=-1e6, hi=1e6)
        top = number_param(params, "top", 10, 1, MAX_SPECIES_AT)
        if top != int(top):
            raise ApiError(400, "top must be a whole number of species")
        if self.session.cell_at(lat, lon) is None:
            raise ApiError(404, f"no cell of this grid at lat {lat:.4f}, lon {lon:.4f}; click "
                           "inside the region")
        try:
            table = self.session.species_at(lat, lon, int(top))
        except TaxamapError as exc:
            raise ApiError(400, _one_line(exc)) from None
        answer = ranking_json(table)
        answer["elapsed_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        return answer

    def _one_cell(self, embedded, row: int, col: int, lat: float, lon: float) -> dict:
        g = self.session.grid
        cell = g.cells_at(np.array([row]), np.array([col]))
        fused, per = self.session.scorer.score_cells(embedded.query.vector, cell)
        scores = {}
        for name in self.session.bands:
            band = fused if name == "fused" else per.get(name)
            value = float(band[0, 0]) if band is not None else math.nan  # not made per cell
            scores[name] = value if math.isfinite(value) else None
        answer = {"lat": float(g.row_lats()[row]), "lon": float(g.column_lons()[col]),
                  "scores": scores, "query": embedded.label}
        if self.patches:
            answer["patch"] = "/api/patch?" + urlencode({"lat": f"{lat:.6f}", "lon": f"{lon:.6f}"})
        return answer

    def range_answer(self, params) -> dict:
        """``/api/range``: the range polygons at a threshold rule, as GeoJSON (EPSG:4326)."""

        embedded, _key = self.query_of(params)
        return self._ranges(embedded, self.band_of(params), rule_param(params, "percentile:90"))

    def _range_geojson(self, embedded, band: str, rule: str) -> dict:
        from taxamap.products.ranges import cut_range

        ds = self.dataset(embedded)
        try:
            cut = cut_range(ds, rule, band=band)
        except TaxamapError as exc:
            raise ApiError(400, _one_line(exc)) from None
        geojson = json.loads(cut.polygons.to_json(drop_id=True))
        geojson.update(rule=cut.rule, band=cut.band, threshold=cut.threshold,
                       n_in_range=cut.n_in_range, n_valid=cut.n_valid, area_km2=cut.area_km2)
        return geojson

    def download(self, params) -> tuple[Path, str, Path]:
        """``/api/download``: (file, name to offer, folder to delete after sending)."""
        from taxamap.options import WriteOptions
        from taxamap.products.ranges import cut_range
        from taxamap.writers.files import write_dataset

        fmt = params.get("format") or ""
        if fmt not in FORMATS:
            raise ApiError(400, f"format must be one of {', '.join(FORMATS)}")
        embedded, _key = self.query_of(params)
        band = self.band_of(params)
        rule = rule_param(params, "percentile:90" if fmt == "gpkg" else None)
        ds = self.dataset(embedded)
        slug = re.sub(r"[^a-z0-9-]+", "-", str(ds.attrs.get("slug") or "map").lower())[:80]
        folder = Path(tempfile.mkdtemp(prefix="download-", dir=self.workdir))
        try:
            if fmt == "gpkg":
                written = cut_range(ds, rule, band=band).write(folder)
                return written["polygons"], f"{slug}_range.gpkg", folder
            paths = write_dataset(ds, WriteOptions(out=folder, formats=(fmt,)))
            path = next(p for name, p in paths.items() if name.endswith(f".{fmt}"))
            return path, f"{slug}.{fmt}", folder
        except TaxamapError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(400, _one_line(exc)) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def upload_slot(self):
        """Hold one of ``max_uploads`` upload slots while receiving and embedding an upload;
        ApiError 503 with Retry-After when all are taken."""
        with self._upload_count_lock:
            if self.uploads_in_progress >= self.max_uploads:
                raise ApiError(503, f"the server is busy with {self.uploads_in_progress} other "
                               f"uploads; try again in {RETRY_AFTER_S} s",
                               {"Retry-After": str(RETRY_AFTER_S)})
            self.uploads_in_progress += 1
        try:
            yield
        finally:
            with self._upload_count_lock:
                self.uploads_in_progress -= 1

    def upload(self, path: Path, digest: str, filename: str | None
               ) -> tuple["EmbeddedQuery", dict]:
        """Embed an uploaded photo or recording, received into ``path`` (type from its
        content); cached by content (``digest``)."""
        from taxamap.models.audio import check_audio, model_rate
        from taxamap.naming import file_slug

        kind, ext = sniff_upload(path)
        upload_id = digest[:24]
        hit = self.uploads.get(upload_id)
        if hit is not None:
            return hit, {"upload": upload_id}
        typed = path.rename(path.with_name(f"{kind}{ext}"))  # the server's name, not the client's
        shown = display_name(filename, f"{kind}{ext}")
        try:
            if kind == "audio":  # tighter than the CLI's hour: checked from the header
                check_audio(typed, model_rate(self.session.config),
                            max_seconds=UPLOAD_AUDIO_SECONDS)
            with self._decoding_slot():
                embedded = (self.session.embed(image=typed) if kind == "image"
                            else self.session.embed(audio=typed))
        except TaxamapError as exc:
            message = page_terms(str(exc), typed, shown, self.workdir)
            raise ApiError(415 if message.startswith("cannot read")
                           or "cannot decode" in message else 400, message) from None
        word = "photo" if kind == "image" else "recording"
        # Named as `taxamap predict --image/--audio` names it (downloads keep that name).
        query = replace(embedded.query, label=f"{word} {shown}",
                        slug=file_slug(kind, shown, digest))
        embedded = replace(embedded, query=query)
        self.uploads[upload_id] = embedded
        while len(self.uploads) > UPLOADS_HELD:  # the oldest upload goes first
            self.uploads.pop(next(iter(self.uploads)))
        return embedded, {"upload": upload_id}

    @contextlib.contextmanager
    def _decoding_slot(self):
        """One of DECODE_SLOTS; the last decode to end hands the freed memory back."""
        with self._decoding:
            with self._upload_count_lock:
                self._decodes += 1
            try:
                yield
            finally:
                with self._upload_count_lock:
                    self._decodes -= 1
                    last = self._decodes == 0
                if last:
                    give_back_memory()

    def upload_answer(self, path: Path, digest: str, filename: str | None, params) -> dict:
        t0 = time.perf_counter()
        embedded, key = self.upload(path, digest, filename)
        answer = self._map_answer(embedded, key, params)
        answer["elapsed_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        return answer

    def patch_png(self, params) -> bytes:
        """``/api/patch``: the satellite patch of the cell holding (lat, lon), as a PNG."""
        if not self.patches:
            raise ApiError(404, "this grid has no satellite modality, so no patches to show")
        lat = number_param(params, "lat", lo=-90.0, hi=90.0)
        lon = number_param(params, "lon", lo=-1e6, hi=1e6)
        cell = self.session.cell_at(lat, lon)
        if cell is None:
            raise ApiError(404, f"no cell of this grid at lat {lat:.4f}, lon {lon:.4f}")
        return self._patches(*cell)

    def _patch_png(self, row: int, col: int) -> bytes:
        grid = self.session.grid
        lat, lon = float(grid.row_lats()[row]), float(grid.column_lons()[col])
        try:
            rgb, info = self.session.satellite_patch(lat, lon)
        except TaxamapError as exc:
            raise ApiError(400, _one_line(exc)) from None
        if rgb is None:
            reason = _one_line(info.get("reason") or "the source has no imagery there")
            raise ApiError(404, f"no patch for this cell (it is NaN in the satellite band): "
                           f"{reason}")
        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        return encode_png(rgba)

    def land(self) -> dict:
        """Natural Earth land around the grid (GeoJSON), the base map when web tiles fail."""
        with self._land_lock:
            if self._land is None:
                from shapely.geometry import mapping

                from taxamap.writers.html import land_context
                from taxamap.writers.style import MERCATOR_MAX_LAT

                g = self.session.grid
                margin = max(5.0, 0.5 * max(g.east - g.west, g.north - g.south))
                view = (g.west - margin, max(g.south - margin, -MERCATOR_MAX_LAT),
                        g.east + margin, min(g.north + margin, MERCATOR_MAX_LAT))
                geom = land_context(view, tolerance=max(g.east - g.west, 1.0) / 1500.0)
                features = [] if geom is None else [
                    {"type": "Feature", "properties": {}, "geometry": mapping(geom)}]
                self._land = {"type": "FeatureCollection", "features": features}
            return self._land

    def health(self) -> dict:
        from taxamap.writers.style import gradient_css

        g = self.session.grid
        # "cells": what the session really holds (a cell no modality could embed is no cell).
        embedded = self.session.embedded_cells
        held = self.session.cells_held if not self.tiled else max(embedded.values(), default=0)
        return {"status": "ok", "cells": held, "tiles": self.tiled,
                "grid_cells": self.session.n_cells, "embedded": embedded,
                "modalities": self.session.modalities, "region": self.session.region.name,
                "bands": self.session.bands, "resolution": g.resolution,
                "bounds": [[g.south, g.west], [g.north, g.east]],
                "attribution": self.session.cells.attribution,
                "patches": self.patches, "max_upload_bytes": self.max_upload,
                "gradient": gradient_css()}


# ---------------------------------------------------------------------- the app

def _leaflet_folder() -> Path:
    from taxamap.writers import assets

    try:
        libs = assets.offline_libraries()
    except TaxamapError:
        raise TaxamapError(f"taxamap serve needs Leaflet's files (XStatic-Leaflet): "
                           f"{INSTALL_HINT}") from None
    return next(lib.folder for lib in libs if lib.name == "Leaflet")


_PAGE_HEADERS = {
    # The page loads only its own files; images may also come from the OpenStreetMap tile
    # servers (the web base map) and data: URIs (Leaflet's icons).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob: "
                               "https://tile.openstreetmap.org; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def create_app(session: "MapSession", *, max_upload: int = DEFAULT_MAX_UPLOAD,
               workdir: str | None = None, allowed_hosts: list[str] | None = None,
               max_uploads: int = DEFAULT_MAX_UPLOADS,
               read_timeout: float = DEFAULT_READ_TIMEOUT,
               upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT):
    """The Starlette app serving ``session``. ``allowed_hosts`` (Host header names; None: any)
    guards a loopback server against DNS rebinding. At most ``max_uploads`` uploads of at most
    ``max_upload`` bytes are received at once (more: 503), each body streamed to disk within
    ``upload_timeout`` s, never stalling ``read_timeout`` s (else 408)."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    leaflet = _leaflet_folder()
    service = MapService(session, max_upload=max_upload, workdir=workdir,
                         max_uploads=max_uploads, read_timeout=read_timeout,
                         upload_timeout=upload_timeout)
    no_store = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    def json_response(data, status: int = 200) -> Response:
        return JSONResponse(data, status_code=status, headers=no_store)

    def favicon(_request) -> Response:
        return Response(status_code=204)

    def page(_request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={**_PAGE_HEADERS, "X-Content-Type-Options": "nosniff"})

    def health(_request) -> Response:
        return json_response(service.health())

    def search(request) -> Response:
        text = request.query_params.get("q") or ""
        return json_response(service.species.search(text[:MAX_TEXT]))

    def map_(request) -> Response:
        return json_response(service.map_answer(request.query_params))

    def overlay(request) -> Response:
        return Response(service.overlay_png(request.query_params), media_type="image/png",
                        headers=no_store)

    def cell(request) -> Response:
        return json_response(service.cell(request.query_params))

    def species(request) -> Response:
        return json_response(service.species_answer(request.query_params))

    def tile(request) -> Response:
        p = request.path_params
        png = service.tile_png(p["query"], p["z"], p["x"], p["y"], request.query_params)
        # A query's tiles change only when the server restarts on other stores.
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=600",
                                 "X-Content-Type-Options": "nosniff"})

    def range_(request) -> Response:
        return JSONResponse(service.range_answer(request.query_params),
                            media_type="application/geo+json", headers=no_store)

    def land(_request) -> Response:
        return JSONResponse(service.land(), media_type="application/geo+json")

    def download(request) -> Response:
        path, name, folder = service.download(request.query_params)
        return FileResponse(path, filename=name, headers=no_store,
                            background=BackgroundTask(shutil.rmtree, folder, True))

    def patch(request) -> Response:
        return Response(service.patch_png(request.query_params), media_type="image/png",
                        headers=no_store)

    async def query(request: Request) -> Response:
        with service.upload_slot():
            folder = Path(tempfile.mkdtemp(prefix="upload-", dir=service.workdir))
            try:
                received = await _receive_upload(request, service, folder / "upload")
                if received is None:  # the client left: nobody to answer
                    return Response(status_code=400)
                answer = await run_in_threadpool(service.upload_answer, *received,
                                                 request.query_params)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return json_response(answer)

    async def api_error(_request, exc: ApiError) -> Response:
        return JSONResponse({"error": exc.message}, status_code=exc.status,
                            headers={**no_store, **exc.headers})

    async def taxamap_error(_request, exc: TaxamapError) -> Response:
        return json_response({"error": _one_line(exc)}, 400)

    async def http_error(_request, exc: HTTPException) -> Response:
        message = {404: "no such page; the API is under /api/ (see /api/health)",
                   405: "method not allowed"}.get(exc.status_code, _one_line(exc.detail))
        return json_response({"error": message}, exc.status_code)

    async def server_error(_request, exc: Exception) -> Response:
        log.error("internal error", exc_info=exc)
        return json_response({"error": f"internal error ({type(exc).__name__}); see the "
                              "server's log"}, 500)

    routes = [
        Route("/", page),
        Route("/favicon.ico", favicon),
        Route("/api/health", health),
        Route("/api/search", search),
        Route("/api/map", map_),
        Route("/api/overlay.png", overlay),
        Route("/api/cell", cell),
        Route("/tiles/{query}/{z}/{x}/{y}.png", tile),
        Route("/api/range", range_),
        Route("/api/species", species),
        Route("/api/land", land),
        Route("/api/download", download),
        Route("/api/patch", patch),
        Route("/api/query", query, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Mount("/lib/leaflet", StaticFiles(directory=leaflet), name="leaflet"),
    ]
    # Messages raised while answering name the page's controls, not the CLI's flags.
    middleware = [Middleware(_WebWording)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            service.close()  # the server's temporary folder goes with it

    app = Starlette(
        routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={ApiError: api_error, TaxamapError: taxamap_error,
                            HTTPException: http_error, Exception: server_error},
    )
    app.state.service = service
    return app


class _WebWording:
    """ASGI middleware: whatever answers a request speaks to the web page
    (:mod:`taxamap.surface`), so its errors name the page's controls."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        with speaking_to("web"):
            await self.app(scope, receive, send)


#: Bytes of multipart framing (boundaries, part headers) allowed around an upload's file.
FRAMING_BYTES = 64 * 1024


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than {limit / 2**20:g} MB")


class _BodyGuard:
    """The ASGI ``receive`` of an upload, guarded: a body over ``limit`` (+ framing) is a 413 as
    soon as it grows past it, a body stalling ``read_timeout`` s or not complete after
    ``upload_timeout`` s a 408 (the connection is then closed); counts the bytes received."""

    def __init__(self, receive, limit: int, read_timeout: float, upload_timeout: float):
        import anyio

        self.receive = receive
        self.limit = limit
        self.read_timeout = read_timeout
        self.upload_timeout = upload_timeout
        self.deadline = anyio.current_time() + upload_timeout
        self.received = 0

    async def __call__(self):
        import anyio

        left = self.deadline - anyio.current_time()
        wait = min(self.read_timeout, left)
        if wait > 0:
            with anyio.move_on_after(wait):
                message = await self.receive()
                if message["type"] == "http.request":
                    self.received += len(message.get("body", b""))
                    if self.received > self.limit + FRAMING_BYTES:
                        raise _too_big(self.limit)
                return message
        if left <= self.read_timeout:
            message = (f"the upload did not arrive within {self.upload_timeout:g} s; send a "
                       "smaller file or use a faster connection")
        else:
            message = (f"the upload stalled (nothing arrived for {self.read_timeout:g} s); "
                       "check the connection and upload the file again")
        raise ApiError(408, message, {"Connection": "close"})


async def _receive_upload(request, service: MapService, path: Path
                          ) -> tuple[Path, str, str | None] | None:
    """Stream the ``file`` part of a multipart POST into ``path``: (path, its SHA-256, the
    client's file name), or None when the client left (said in one line). The body is never
    held in memory: Starlette's multipart parser spools a file to disk beyond its
    ``spool_max_size`` (1 MiB); limits and timeouts as :class:`_BodyGuard`."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request

    limit = service.max_upload
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit + FRAMING_BYTES
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
        if too_big:
            raise _too_big(limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "POST the file as multipart/form-data with the field name 'file'")
    guard = _BodyGuard(request.receive, limit, service.read_timeout, service.upload_timeout)
    try:
        form = await Request(request.scope, guard).form(max_files=1, max_fields=10,
                                                        max_part_size=64 * 1024)
    except ClientDisconnect:
        log.warning("an upload was dropped: the client closed the connection after %s of %s",
                    _size(guard.received), _size(int(declared)) if declared else "the body")
        return None
    except ApiError:
        raise
    except HTTPException as exc:  # Starlette's word for a malformed multipart body
        raise ApiError(400, f"malformed multipart body ({_one_line(exc.detail)[:80]})") from None
    except Exception as exc:  # noqa: BLE001 - python-multipart's errors: a malformed body
        raise ApiError(400, f"malformed multipart body ({_one_line(exc)[:80]})") from None
    try:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise ApiError(400, "no file in the upload; send it in a field named 'file'")
        if (part.size or 0) > limit:
            raise _too_big(limit)
        if not part.size:
            raise ApiError(400, "the uploaded file is empty")
        digest = await run_in_threadpool(_copy_hashing, part.file, path)
    finally:
        await form.close()
    return path, digest, part.filename


def _size(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count >= 100_000 else f"{count:,} bytes"


def _copy_hashing(source, path: Path) -> str:
    """Copy an open file into ``path`` in 1 MiB pieces; the SHA-256 of what was copied."""
    sha = hashlib.sha256()
    source.seek(0)
    with open(path, "wb") as out:
        while piece := source.read(2**20):
            sha.update(piece)
            out.write(piece)
    return sha.hexdigest()
