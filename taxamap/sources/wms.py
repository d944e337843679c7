"""Satellite patches by WMS GetMap: the request TaxaBind's satellite encoder was trained on.

iSatNat, TaxaBind's satellite training set, holds one URL per observation (``train_df.csv``,
column ``sat_url``)::

    https://tiles.maps.eox.at/wms?service=WMS&version=1.1.1&request=GetMap&layers=s2cloudless-2020
        &styles=&width=256&height=256&srs=EPSG:4326&bbox=W,S,E,N&format=image/png

with the bbox through the points 1,280 m east, north, west and south of the observation in its
local East-North-Up tangent plane (:func:`taxamap.sources.footprint.footprint`). This source sends
exactly that request for every cell centre (same parameters, same order, the bbox numbers written
as Python writes floats), so the default satellite map is made from the training imagery at the
training footprint. ``url`` sets another WMS endpoint; ``footprint_m``/``size`` another box/size.
A box crossing the antimeridian is asked for as two requests (each within +-180 deg, split on a
pixel column) and joined side by side.

The imagery (EOX Sentinel-2 cloudless) is CC BY-NC-SA 4.0: outputs carry
:data:`~taxamap.sources.tiles.EOX_ATTRIBUTION` and the licence.

Networking is :mod:`taxamap.http`'s: ``workers`` requests in flight at most, urllib3
retries with backoff and jitter on 429/5xx/timeouts/dropped connections (``Retry-After``
honoured), a refetch of truncated or undecodable bodies, and a circuit breaker that stops the run
with one line when the server does not answer. Answers are validated before they are cached
(atomically, on disk, keyed by the request: a rerun sends nothing):

* an intact 256 x 256 PNG (every chunk's CRC checked) -> the patch;
* 404/410, or a blank image (fully transparent, or one colour: a WMS's "no data here") -> that
  cell's satellite value is missing (counted as ``not_found``; cached, like an absent tile);
* still failing after retries -> missing and *failed*: the engine leaves its block unfinished
  and the same command retries it; never cached;
* a WMS ``ServiceException`` (wrong layer or parameter: it would fail for every cell) -> one
  :class:`~taxamap.errors.TaxamapError` naming the server's message.
"""

from __future__ import annotations

import hashlib
import io
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote


from taxamap.errors import TaxamapError
from taxamap.surface import option
from taxamap.io import DiskFull
from taxamap import http
from taxamap.sources.cache import TileCache, cached
from taxamap.sources.footprint import DEFAULT_FOOTPRINT_M, DEFAULT_SIZE, Footprint, footprint
from taxamap.sources.base import DEFAULT_WORKERS, HTTPSource, as_latlon, explain_footprint
from taxamap.sources.tiles import eox_metadata

#: EOX's WMS, the endpoint of every iSatNat training URL.
DEFAULT_WMS_URL = "https://tiles.maps.eox.at/wms"
#: The layer TaxaBind trained on.
DEFAULT_LAYER = "s2cloudless-2020"
#: The fixed GetMap parameters of the training request, in its order (bbox and size go between).
WMS_VERSION = "1.1.1"
WMS_SRS = "EPSG:4326"
WMS_FORMAT = "image/png"

#: Statuses that mean "nothing here": missing, cached as a negative entry, never retried.
ABSENT_STATUS = frozenset({404, 410})


def check_endpoint(url: str) -> str:
    """Refuse what cannot be a WMS endpoint (one line); returns it without a trailing '?'/'&'."""
    if not re.match(r"^https?://", url or ""):
        raise TaxamapError(f"WMS URL {url!r} must start with http:// or https://")
    if "{z}" in url or "{x}" in url:
        raise TaxamapError(f"{url!r} is an XYZ tile template: pass {option('sat-source', 'xyz')} "
                           "with it, or a WMS endpoint such as https://tiles.maps.eox.at/wms")
    if re.search(r"[?&](request|bbox)=", url, re.IGNORECASE):
        raise TaxamapError(f"{option('sat-url', url)} already holds GetMap parameters: give the "
                           "endpoint only (e.g. https://tiles.maps.eox.at/wms); taxamap adds the "
                           "request")
    return url.rstrip("?&")


def format_number(value: float) -> str:
    """A bbox number as the training URLs write it: Python's shortest round-trip repr."""
    return repr(float(value))


class _ServiceException(Exception):
    """The server answered 200 with a WMS ServiceException document."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: A GetMap PNG smaller than this is decoded at once and checked for blankness: imagery of real
#: ground compresses to tens of KB at 256 px, one colour or full transparency to a few hundred bytes.
BLANK_CHECK_BYTES = 16_384


def png_header(data: bytes) -> tuple[int, int, int, bool]:
    """(width, height, colour type, has tRNS) of a PNG whose every chunk is intact.

    Walks the chunks and checks each CRC, that IHDR comes first and IEND last: a body cut short or
    damaged in transit fails here (``ValueError``) without inflating the image (~0.05 ms instead of
    ~3 ms for a full decode)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    pos, end, first, last, trns = 8, len(data), None, None, False
    width = height = colour = 0
    while pos < end:
        if pos + 12 > end:
            raise ValueError("PNG cut short")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        stop = pos + 8 + length
        if stop + 4 > end:
            raise ValueError(f"PNG cut short in a {kind!r} chunk")
        if zlib.crc32(data[pos + 8:stop], zlib.crc32(kind)) != int.from_bytes(data[stop:stop + 4], "big"):
            raise ValueError(f"PNG {kind!r} chunk damaged (CRC mismatch)")
        if first is None:
            first = kind
            if kind != b"IHDR" or length < 13:
                raise ValueError("PNG does not start with IHDR")
            width = int.from_bytes(data[pos + 8:pos + 12], "big")
            height = int.from_bytes(data[pos + 12:pos + 16], "big")
            colour = data[pos + 17]
        trns = trns or kind == b"tRNS"
        last = kind
        pos = stop + 4
    if last != b"IEND":
        raise ValueError("PNG cut short (no IEND)")
    return width, height, colour, trns


def decode_answer(data: bytes, size: tuple[int, int]):
    """('image', RGB PIL image) | ('blank', None) for a GetMap body; raises ``ValueError``/``OSError``
    for a body that is not an intact image of ``size`` (the http layer fetches it again) and
    :class:`_ServiceException` for an XML exception report.

    An intact PNG of real imagery (8-bit RGB or grey, no transparency, larger than
    :data:`BLANK_CHECK_BYTES`) is returned opened but not yet decoded: the engine's preprocessing
    threads decode it, so the request workers only wait on the network."""
    from PIL import Image

    head = data[:400].lstrip().lower()
    if head.startswith(b"<?xml") or b"serviceexception" in head:
        text = re.sub(rb"<[^>]+>", b" ", data[:2000]).decode("utf-8", "replace")
        raise _ServiceException(" ".join(text.split())[:300] or "ServiceException")
    if data.startswith(PNG_SIGNATURE):
        width, height, colour, trns = png_header(data)
        if (width, height) != size:
            raise ValueError(f"the server sent {width}x{height} px, asked for {size[0]}x{size[1]}")
        if len(data) > BLANK_CHECK_BYTES and colour in (0, 2) and not trns:
            img = Image.open(io.BytesIO(data))
            return "image", img if img.mode == "RGB" else img.convert("RGB")
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.size != size:
        raise ValueError(f"the server sent {img.size[0]}x{img.size[1]} px, asked for {size[0]}x{size[1]}")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        if img.convert("RGBA").getchannel("A").getextrema() == (0, 0):
            return "blank", None
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    # One colour everywhere (min == max in every band): PIL computes it in C, without a copy.
    if all(lo == hi for lo, hi in rgb.getextrema()):
        return "blank", None
    return "image", rgb


class WMSSource(HTTPSource):
    """Patches by one WMS GetMap per cell (see the module docstring).

    Parameters: ``url`` the WMS endpoint; ``layer``; ``footprint_m``/``size`` the box and its
    pixels (TaxaBind: 2,560 m, 256 px); ``cache_dir`` root of the on-disk cache (None: user cache
    dir) or ``cache=False``; ``workers`` requests in flight; ``retries``, ``backoff``,
    ``max_backoff``, ``max_retry_after``, ``timeout`` as in :func:`taxamap.http.make_session`;
    ``session`` a ready ``requests.Session`` (the network boundary); ``fail_fast_after``: stop
    when this many first requests all failed; ``fail_after_in_row`` the same for requests in a row
    after some succeeded.
    """

    kind = "wms"

    def __init__(
        self,
        url: str = DEFAULT_WMS_URL,
        *,
        layer: str = DEFAULT_LAYER,
        size: int = DEFAULT_SIZE,
        footprint_m: float = DEFAULT_FOOTPRINT_M,
        cache_dir: str | Path | None = None,
        cache: bool = True,
        workers: int = DEFAULT_WORKERS,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 60.0,
        timeout: float | tuple[float, float] | None = None,
        session=None,
        attribution: str | None = None,
        license: str | None = None,
        user_agent: str = http.USER_AGENT,
        fail_fast_after: int = 8,
        fail_after_in_row: int = 32,
    ):
        self.url = check_endpoint(url)
        self.layer = str(layer)
        eox_attr, eox_lic = eox_metadata(self.layer)
        self._configure(
            what="satellite patches", size=size, workers=workers, retries=retries,
            backoff=backoff, max_backoff=max_backoff, max_retry_after=max_retry_after,
            timeout=timeout, session=session, user_agent=user_agent,
            fail_fast_after=fail_fast_after, fail_after_in_row=fail_after_in_row,
            attribution=(eox_attr if attribution is None else attribution,
                         eox_lic if license is None else license))
        self.footprint_m = float(footprint_m)
        identity = {"kind": self.kind, "url": self.url, "layers": self.layer, "version": WMS_VERSION,
                    "srs": WMS_SRS, "format": WMS_FORMAT, "styles": ""}
        self.cache = TileCache(cache_dir, identity, label=f"{self.url} {self.layer}") if cache else None

    # -- public -------------------------------------------------------------------------------

    def describe(self) -> dict:
        """The settings that identify these patches (store key and provenance)."""
        return {"kind": self.kind, "url": self.url, "layers": self.layer, "version": WMS_VERSION,
                "srs": WMS_SRS, "format": WMS_FORMAT, "footprint_m": self.footprint_m,
                "size": self.size}

    def footprint(self, lat: float, lon: float) -> Footprint | None:
        """The box of (lat, lon) (None near a pole)."""
        return footprint(lat, lon, self.footprint_m, self.size)

    def request_url(self, bbox, width: int | None = None) -> str:
        """The GetMap URL for a (W, S, E, N) box, ``width`` x ``size`` px (default square)."""
        w, s, e, n = (format_number(v) for v in bbox)
        sep = "&" if "?" in self.url else "?"
        return (f"{self.url}{sep}service=WMS&version={WMS_VERSION}&request=GetMap"
                f"&layers={quote(self.layer, safe='-_.,')}&styles="
                f"&width={self.size if width is None else int(width)}&height={self.size}"
                f"&srs={WMS_SRS}&bbox={w},{s},{e},{n}&format={WMS_FORMAT}")

    def requests_for(self, lat: float, lon: float) -> list[tuple[int, int, str]] | None:
        """[(first column, last column + 1, URL), ...] of the cell's patch; None near a pole."""
        fp = self.footprint(lat, lon)
        if fp is None:
            return None
        return [(p.col0, p.col1, self.request_url(p.bbox, p.width)) for p in fp.parts()]

    def explain(self, lat: float, lon: float) -> dict:
        """What the patch of (lat, lon) is (no request): its footprint and the GetMap URL(s)."""
        out = explain_footprint(self.footprint(lat, lon), lat, lon, self.describe())
        planned = self.requests_for(lat, lon)
        if planned is not None:
            out["requests"] = [url for _, _, url in planned]
        return out

    def fetch(self, latlon) -> list:
        """One RGB ``size`` x ``size`` PIL image per (lat, lon) row, ``None`` where missing."""
        return self.fetch_status(latlon)[0]

    def fetch_status(self, latlon) -> tuple[list, list[bool]]:
        """(patches, failed): ``failed[i]`` is True when cell i's patch is missing because a
        request still failed after retries (a rerun may get it), False when present or absent.

        All requests of the call are submitted to the shared pool of ``workers`` threads at once
        (the engine hands over a batch of cells at a time); identical requests are sent once.
        Thread-safe. Raises :class:`~taxamap.http.CircuitOpen` once the server is given
        up on, and :class:`~taxamap.errors.TaxamapError` on a ServiceException.
        """
        latlon = as_latlon(latlon)
        plans = [self.requests_for(lat, lon) for lat, lon in latlon]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="taxamap-wms")
            pool = self._executor
        futures = {}
        for plan in plans:
            for col0, col1, url in plan or ():
                if url not in futures:
                    futures[url] = pool.submit(self._get, url, col1 - col0)
        out: list = [None] * len(plans)
        failed = [False] * len(plans)
        try:
            for i, plan in enumerate(plans):
                if plan is None:
                    continue
                results = [futures[url].result() for _, _, url in plan]
                if all(img is not None for img, _ in results):
                    out[i] = self._join(plan, [img for img, _ in results])
                else:
                    failed[i] = any(bad for _, bad in results)
        except BaseException:
            for fut in futures.values():
                fut.cancel()
            raise
        self.stats.add(cells=len(out), cells_missing=sum(p is None for p in out),
                       cells_failed=sum(failed))
        return out, failed

    # -- requests -----------------------------------------------------------------------------

    @staticmethod
    def _key(url: str) -> str:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return f"{digest[:2]}/{digest[2:26]}"

    def _get(self, url: str, width: int):
        """(RGB image or None, failed) for one GetMap URL of ``width`` x ``size`` px."""
        if self._fatal is not None:
            raise self._fatal
        key = self._key(url)
        found, hit = cached(self.cache, key, self.stats)
        if found:
            return hit, False
        self.stats.add(requests=1)
        try:
            answer = http.get_checked(
                self._http(), url, check=lambda body: decode_answer(body, (width, self.size)),
                retries=self.retries, backoff=self.backoff, max_backoff=self.max_backoff,
                breaker=self.breaker, on_retry=self._count_retry, timeout=self.timeout)
        except _ServiceException as exc:
            raise TaxamapError(f"the WMS server {http.host_of(url)} refused the GetMap request "
                               f"({exc}); check {option('sat-url')}") from None
        if answer.status == 200 and not answer.failed:
            kind, img = answer.value
            if kind == "blank":
                if self.cache is not None:
                    self.cache.put_missing(key)
                self.stats.add(not_found=1)
                return None, False
            if self.cache is not None:
                try:
                    self.cache.put(key, answer.body, validated=True)
                except DiskFull as exc:
                    exc.per_cell = len(answer.body)  # one request per cell
                    self._fatal = exc  # requests queued behind this one are not sent for nothing
                    raise
            self.stats.add(fetched=1)
            return img, False
        if answer.status in ABSENT_STATUS:
            if self.cache is not None:
                self.cache.put_missing(key)
            self.stats.add(not_found=1)
            return None, False
        self.stats.add(failures=1)
        return None, True

    def _join(self, plan, images: list):
        if len(images) == 1:
            return images[0]
        from PIL import Image

        canvas = Image.new("RGB", (self.size, self.size))
        for (col0, _col1, _url), img in zip(plan, images):
            canvas.paste(img, (col0, 0))
        return canvas
