"""Satellite patches from any XYZ / WMTS-REST tile server, with an on-disk cache.

The default imagery is EOX's *Sentinel-2 cloudless 2020* mosaic, the imagery TaxaBind's satellite
encoder was trained on, served in Web Mercator (WMTS tile matrix set ``g`` = GoogleMapsCompatible,
URL order ``{z}/{y}/{x}``: TileMatrix/TileRow/TileCol). It is CC BY-NC-SA 4.0: outputs made from it
must carry :data:`EOX_ATTRIBUTION` and :data:`EOX_LICENSE` (the source exposes both).

What a patch is (TaxaBind's training footprint, :mod:`taxamap.sources.footprint`): the 2,560 m
square around the cell centre in its local tangent plane, ``size`` = 256 px on a lon/lat-regular
grid, exactly the box the default WMS source asks for. This source mosaics the Web-Mercator tiles
under that box and resamples them onto its grid (anti-aliased triangle filter, rows and columns
separately: Mercator x depends on longitude only, y on latitude only). The zoom is chosen per cell
from its latitude: the coarsest level whose pixels are no larger than the footprint's
(``footprint_m / size``, 10 m): zoom 14 at the equator (9.55 m), 13 at 60 deg (9.55 m). A fixed
``zoom`` may be given instead. Cells whose box reaches past Web Mercator's +-85.05 deg get ``None``.

``footprint_m=None`` keeps the tiles' native pixels instead: a ``size`` x ``size`` window of the
``zoom`` level centred on the cell (no resampling; its ground size shrinks with cos(latitude), so
it is *not* what the encoder learned from; for looking at raw tiles).

Every tile a patch touches is fetched once (usually 2 x 2 or 3 x 3) and shared by neighbouring
cells. Networking is deliberately boring and shared with every other client
(:mod:`taxamap.http`): a thread pool of ``workers`` requests (never more in flight), one
session whose pool holds ``workers`` connections, (connect, read) timeouts, urllib3 retries with
exponential backoff and jitter on 429, 5xx, timeouts and connection errors (``Retry-After``
honoured, capped), a refetch of truncated/undecodable bodies, no retry on 404 (cached as a
negative entry so reruns send nothing) or other 4xx, a descriptive User-Agent, and a circuit
breaker: when the first requests all fail without an answer (a stalled or unreachable server),
or many in a row fail, the run stops with one line naming the server. A tile that still fails
makes the cells that need it ``None`` and "failed" (a rerun retries them); it is never cached.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option
from taxamap.io import DiskFull
from taxamap import http
from taxamap.sources.base import DEFAULT_WORKERS, HTTPSource, as_latlon
from taxamap.sources.cache import TileCache, cached, decode_image
from taxamap.sources.footprint import DEFAULT_FOOTPRINT_M, Footprint, footprint, resample

#: EOX Sentinel-2 cloudless 2020, Web Mercator (the layer TaxaBind trained on).
DEFAULT_URL = "https://tiles.maps.eox.at/wmts/1.0.0/s2cloudless-2020_3857/default/g/{z}/{y}/{x}.jpg"
#: The zoom of ``footprint_m=None`` (native-pixel) patches when none is given: ~10 m/px at the
#: equator, Sentinel-2's native resolution.
DEFAULT_ZOOM = 14
DEFAULT_SIZE = 256
TILE_SIZE = 256
#: The finest zoom the automatic choice goes to (1 m pixels at 30 deg).
MAX_AUTO_ZOOM = 19
#: Equatorial circumference of the Web-Mercator sphere (metres).
_EARTH_CIRCUMFERENCE = 2 * math.pi * 6378137.0

EOX_LICENSE = "CC BY-NC-SA 4.0"
EOX_ATTRIBUTION = (
    "Sentinel-2 cloudless - https://s2maps.eu by EOX IT Services GmbH "
    "(Contains modified Copernicus Sentinel data {year})"
)

USER_AGENT = http.USER_AGENT

#: Statuses that mean "this tile does not exist": cached as a negative entry, never retried.
ABSENT_STATUS = frozenset({404, 410})

#: Latitude limit of Web Mercator tiles.
MAX_LAT = 85.0511287798066


def eox_metadata(url: str) -> tuple[str | None, str | None]:
    """(attribution, licence) for an EOX s2cloudless template, (None, None) for other servers."""
    match = re.search(r"s2cloudless-(\d{4})", url)
    if match is None:
        return None, None
    # Mosaic "YYYY" is built from data of that year (the 2016 one from 2016-2017 data).
    return EOX_ATTRIBUTION.format(year=match.group(1)), EOX_LICENSE


def check_template(url: str) -> None:
    """Refuse a URL template that cannot address tiles (one-line, actionable)."""
    if "{z}" not in url or "{x}" not in url or ("{y}" not in url and "{-y}" not in url):
        raise TaxamapError(
            f"tile URL {url!r} needs {{z}}, {{x}} and {{y}} placeholders, "
            "e.g. https://server/tiles/{z}/{x}/{y}.jpg"
        )
    if not re.match(r"^https?://", url):
        raise TaxamapError(f"tile URL {url!r} must start with http:// or https://")


@dataclass(frozen=True)
class PatchPlan:
    """The window of one zoom level's world pixels a cell's patch is made from."""

    zoom: int
    x0: int  # world pixel column of the window's left edge (may be <0 or >= world: wraps)
    y0: int  # world pixel row of the window's top edge
    width: int  # window size in pixels
    height: int
    tx0: int  # first tile column touched (unwrapped)
    ty0: int  # first tile row touched
    ncols: int  # tiles across
    nrows: int  # tiles down
    #: The box resampled onto; None: the window itself is the patch (native pixels).
    footprint: Footprint | None = None

    def tiles(self, zoom: int | None = None) -> list[tuple[int, int, int]]:
        """The (z, x, y) tiles to fetch, row-major, x wrapped around the antimeridian."""
        z = self.zoom if zoom is None else zoom
        n = 1 << z
        return [(z, (self.tx0 + c) % n, self.ty0 + r) for r in range(self.nrows) for c in range(self.ncols)]


def _world_xy(lon, lat, zoom: int, tile_size: int = TILE_SIZE):
    """World pixel coordinates (edges at integers) of lon/lat at ``zoom``; lon unwrapped."""
    world = tile_size * (1 << zoom)
    x = (np.asarray(lon, dtype=np.float64) + 180.0) / 360.0 * world
    y = (1.0 - np.arcsinh(np.tan(np.radians(lat))) / math.pi) / 2.0 * world
    return x, y


def _window(x0: int, y0: int, width: int, height: int, zoom: int, tile_size: int,
            fp: Footprint | None = None) -> PatchPlan | None:
    world = tile_size * (1 << zoom)
    if y0 < 0 or y0 + height > world:
        return None  # the window would reach past the top/bottom of the map
    tx0, ty0 = x0 // tile_size, y0 // tile_size
    tx1, ty1 = (x0 + width - 1) // tile_size, (y0 + height - 1) // tile_size
    return PatchPlan(zoom, x0, y0, width, height, tx0, ty0, tx1 - tx0 + 1, ty1 - ty0 + 1, fp)


def plan_patch(lat: float, lon: float, zoom: int, size: int, tile_size: int = TILE_SIZE) -> PatchPlan | None:
    """The native ``size`` x ``size`` window centred on (lat, lon) at ``zoom`` (no resampling);
    None beyond Mercator's poles."""
    if not (np.isfinite(lat) and np.isfinite(lon)) or abs(lat) >= MAX_LAT:
        return None
    gx, gy = _world_xy(lon, lat, zoom, tile_size)
    # Patch centre at its pixel-edge position size/2: round the origin to whole pixels (no resampling).
    x0 = math.floor(float(gx) - size / 2 + 0.5)
    y0 = math.floor(float(gy) - size / 2 + 0.5)
    return _window(x0, y0, size, size, zoom, tile_size)


def auto_zoom(lat: float, metres_per_pixel: float, tile_size: int = TILE_SIZE,
              max_zoom: int = MAX_AUTO_ZOOM) -> int:
    """The coarsest zoom whose pixels at ``lat`` are no larger than ``metres_per_pixel``."""
    ground = _EARTH_CIRCUMFERENCE * math.cos(math.radians(lat)) / tile_size  # zoom-0 pixel
    need = math.log2(max(ground, 1e-9) / metres_per_pixel)
    return int(min(max(math.ceil(need - 1e-9), 0), max_zoom))


def plan_footprint(fp: Footprint, zoom: int | None, tile_size: int = TILE_SIZE,
                   max_zoom: int = MAX_AUTO_ZOOM) -> PatchPlan | None:
    """The tile window under a footprint (plus the resampling filter's reach); None past Mercator."""
    if fp.north >= MAX_LAT or fp.south <= -MAX_LAT:
        return None
    z = auto_zoom(fp.lat, fp.metres_per_pixel, tile_size, max_zoom) if zoom is None else int(zoom)
    xs, ys = _world_xy([fp.west, fp.east], [fp.north, fp.south], z, tile_size)
    # The filter reaches one target pixel (>= 1 source pixel) beyond the box's edge pixels.
    reach_x = max(1.0, (xs[1] - xs[0]) / fp.size) + 1
    reach_y = max(1.0, (ys[1] - ys[0]) / fp.size) + 1
    x0, x1 = math.floor(xs[0] - reach_x), math.ceil(xs[1] + reach_x)
    y0, y1 = math.floor(ys[0] - reach_y), math.ceil(ys[1] + reach_y)
    world = tile_size * (1 << z)
    y0, y1 = max(y0, 0), min(y1, world)
    return _window(x0, y0, x1 - x0, y1 - y0, z, tile_size, fp)


class XYZTileSource(HTTPSource):
    """Patches mosaicked from ``{z}/{x}/{y}`` tiles (see the module docstring for the behaviour).

    Parameters: ``url`` template (``{z}``, ``{x}``, ``{y}`` or ``{-y}`` for TMS, optional ``{s}``
    with ``subdomains``); ``footprint_m`` ground size of the patch (default TaxaBind's 2,560 m;
    None: native pixels, see the module docstring); ``zoom`` (None: chosen per cell from its
    latitude, at most ``max_zoom``); ``size`` of the square patch in pixels; ``cache_dir`` root of
    the tile cache (None: user cache dir) or ``cache=False`` for none; ``workers`` parallel
    requests; ``retries`` after the first attempt; ``backoff`` base delay in seconds (doubling per
    retry, with jitter, at most ``max_backoff``); ``max_retry_after`` caps a server's Retry-After;
    ``timeout`` (connect, read) seconds (default :func:`taxamap.http.default_timeout`);
    ``session`` a ready ``requests.Session`` (the network boundary; default one from
    :func:`~taxamap.http.make_session`, whose retries and breaker a given session lacks);
    ``fail_fast_after``: stop the run (:class:`~taxamap.http.CircuitOpen`) when this many
    first requests all failed (a wrong URL, no network, a stalled server) rather than make a map
    of holes; ``fail_after_in_row`` the same for requests in a row after some succeeded;
    ``prefetch`` tiles requested ahead of the cell being assembled (see :meth:`fetch`).
    """

    kind = "xyz"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        zoom: int | None = None,
        size: int = DEFAULT_SIZE,
        footprint_m: float | None = DEFAULT_FOOTPRINT_M,
        max_zoom: int = MAX_AUTO_ZOOM,
        tile_size: int = TILE_SIZE,
        cache_dir: str | Path | None = None,
        cache: bool = True,
        workers: int = DEFAULT_WORKERS,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 60.0,
        timeout: float | tuple[float, float] | None = None,
        subdomains: str = "abc",
        session=None,
        attribution: str | None = None,
        license: str | None = None,
        user_agent: str = USER_AGENT,
        fail_fast_after: int = 8,
        fail_after_in_row: int = 32,
        prefetch: int | None = None,
    ):
        check_template(url)
        if footprint_m is None and zoom is None:
            zoom = DEFAULT_ZOOM
        if zoom is not None and not 0 <= int(zoom) <= 24:
            raise TaxamapError(f"{option('sat-zoom')} must be between 0 and 24, got {zoom}")
        eox_attr, eox_lic = eox_metadata(url)
        self._configure(
            what="satellite tiles", size=size, workers=workers, retries=retries, backoff=backoff,
            max_backoff=max_backoff, max_retry_after=max_retry_after, timeout=timeout,
            session=session, user_agent=user_agent, fail_fast_after=fail_fast_after,
            fail_after_in_row=fail_after_in_row,
            attribution=(eox_attr if attribution is None else attribution,
                         eox_lic if license is None else license))
        self.url = url
        self.zoom = None if zoom is None else int(zoom)
        self.max_zoom = int(max_zoom)
        self.footprint_m = None if footprint_m is None else float(footprint_m)
        self.tile_size = int(tile_size)
        self.subdomains = subdomains
        self.prefetch = max(64, 16 * self.workers) if prefetch is None else max(1, int(prefetch))
        self.cache = TileCache(cache_dir, url) if cache else None
        self._inflight: dict[tuple[int, int, int], Future] = {}
        # Re-entrant: add_done_callback runs _forget at once, in this thread, if the tile is done.
        self._lock = threading.RLock()

    # -- public -------------------------------------------------------------------------------

    def describe(self) -> dict:
        """The settings that identify these patches (store key and provenance)."""
        if self.footprint_m is None:
            return {"kind": self.kind, "url": self.url, "zoom": self.zoom, "size": self.size,
                    "tile_size": self.tile_size, "footprint_m": None}
        return {"kind": self.kind, "url": self.url, "footprint_m": self.footprint_m,
                "size": self.size, "zoom": "auto" if self.zoom is None else self.zoom,
                "max_zoom": self.max_zoom, "tile_size": self.tile_size,
                "resampling": "triangle"}

    def plan(self, lat: float, lon: float) -> PatchPlan | None:
        """The tile window a cell's patch is made from; None where there is no patch."""
        if self.footprint_m is None:
            return plan_patch(lat, lon, self.zoom, self.size, self.tile_size)
        fp = footprint(lat, lon, self.footprint_m, self.size)
        return None if fp is None else plan_footprint(fp, self.zoom, self.tile_size, self.max_zoom)

    def explain(self, lat: float, lon: float) -> dict:
        """What the patch of (lat, lon) is made of (no request): footprint, zoom, tile URLs."""
        plan = self.plan(lat, lon)
        fp = footprint(lat, lon, self.footprint_m, self.size) if self.footprint_m else None
        out = fp.to_dict() if fp is not None else {"lat": float(lat), "lon": float(lon),
                                                   "footprint_m": None, "size_px": self.size}
        out["source"] = self.describe()
        if plan is not None:
            out["zoom"] = plan.zoom
            out["tiles"] = [self.tile_url(*t) for t in plan.tiles()]
        return out

    def fetch(self, latlon) -> list:
        """One RGB ``size`` x ``size`` PIL image per (lat, lon) row, ``None`` where missing.

        :meth:`fetch_status` also says which missing cells failed (as opposed to absent tiles).
        """
        return self.fetch_status(latlon)[0]

    def fetch_status(self, latlon) -> tuple[list, list[bool]]:
        """(patches, failed): ``failed[i]`` is True when cell i's patch is missing because a tile
        still failed after retries (a rerun may get it), False when it is absent (404) or present.

        Tiles shared by several cells are fetched once. At most ``prefetch`` tiles (default
        ``max(64, 16 * workers)``, ~200 KB each decoded) are requested ahead of the cell being
        assembled: enough that one tile waiting out a Retry-After does not idle the other workers,
        few enough that a long list of cells streams. The returned patches are the caller's to chunk.
        Thread-safe: concurrent calls share the workers and never fetch a tile twice.
        Raises :class:`~taxamap.http.CircuitOpen` once the server is given up on.
        """
        latlon = as_latlon(latlon)
        plans = [self.plan(lat, lon) for lat, lon in latlon]
        need = [p.tiles() if p is not None else [] for p in plans]
        refs = Counter(t for tiles in need for t in tiles)
        futures: dict[tuple[int, int, int], Future] = {}
        ahead = self.prefetch
        submitted = 0
        out: list = [None] * len(plans)
        failed = [False] * len(plans)
        for i, plan in enumerate(plans):
            while submitted < len(plans) and (submitted <= i or len(futures) < ahead):
                for tile in need[submitted]:
                    if tile not in futures:
                        futures[tile] = self._tile_future(tile)
                submitted += 1
            if plan is not None:
                results = [futures[t].result() for t in need[i]]
                if all(img is not None for img, _ in results):
                    out[i] = self._assemble(plan, [img for img, _ in results])
                else:
                    failed[i] = any(bad for _, bad in results)
                for tile in need[i]:
                    refs[tile] -= 1
                    if refs[tile] == 0:
                        del futures[tile]
        self.stats.add(cells=len(out), cells_missing=sum(p is None for p in out),
                       cells_failed=sum(failed))
        return out, failed

    # -- tiles --------------------------------------------------------------------------------

    def tile_url(self, z: int, x: int, y: int) -> str:
        """The URL of tile (z, x, y) for this template."""
        url = self.url.replace("{z}", str(z)).replace("{x}", str(x)).replace("{y}", str(y))
        url = url.replace("{-y}", str((1 << z) - 1 - y))
        if "{s}" in url:
            url = url.replace("{s}", self.subdomains[(x + y) % len(self.subdomains)])
        return url

    def _tile_future(self, tile: tuple[int, int, int]) -> Future:
        with self._lock:
            fut = self._inflight.get(tile)
            if fut is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="taxamap-tiles")
                fut = self._executor.submit(self._get_tile, tile)
                self._inflight[tile] = fut
                fut.add_done_callback(lambda _f, t=tile: self._forget(t))
            return fut

    def _forget(self, tile) -> None:
        with self._lock:
            self._inflight.pop(tile, None)

    def _get_tile(self, tile: tuple[int, int, int]):
        """(decoded RGB tile or None, failed): failed when it is missing after retries (not absent)."""
        if self._fatal is not None:
            raise self._fatal
        z, x, y = tile
        key = f"{z}/{x}/{y}"
        found, hit = cached(self.cache, key, self.stats)
        if found:
            return (None if hit is None else self._check_size(hit)), False
        url = self.tile_url(z, x, y)
        self.stats.add(requests=1)
        answer = http.get_checked(
            self._http(), url, check=decode_image, retries=self.retries, backoff=self.backoff,
            max_backoff=self.max_backoff, breaker=self.breaker, on_retry=self._count_retry,
            timeout=self.timeout)
        if answer.status == 200 and not answer.failed:
            if self.cache is not None:
                try:
                    self.cache.put(key, answer.body, validated=True)
                except DiskFull as exc:
                    # A window of `size` px touches (1 + size/tile)^2 tiles on average.
                    exc.per_cell = len(answer.body) * (1 + self.size / self.tile_size) ** 2
                    self._fatal = exc  # tiles queued behind this one are not fetched for nothing
                    raise
            self.stats.add(fetched=1)
            return self._check_size(answer.value), False
        if answer.status in ABSENT_STATUS:
            if self.cache is not None:
                self.cache.put_missing(key)
            self.stats.add(not_found=1)
            return None, False
        self.stats.add(failures=1)
        return None, True

    def _check_size(self, img):
        if img.size != (self.tile_size, self.tile_size):
            raise TaxamapError(
                f"tiles from {self.url} are {img.size[0]}x{img.size[1]} px, expected "
                f"{self.tile_size}: pass tile_size={img.size[0]}"
            )
        return img

    def _assemble(self, plan: PatchPlan, images: list):
        from PIL import Image

        ts = self.tile_size
        left, top = plan.x0 - plan.tx0 * ts, plan.y0 - plan.ty0 * ts
        box = (left, top, left + plan.width, top + plan.height)
        if len(images) == 1:
            window = images[0].crop(box)
        else:
            canvas = Image.new("RGB", (plan.ncols * ts, plan.nrows * ts))
            for k, img in enumerate(images):
                canvas.paste(img, ((k % plan.ncols) * ts, (k // plan.ncols) * ts))
            window = canvas.crop(box)
        fp = plan.footprint
        if fp is None:
            return window
        # Target pixel centres in the window's pixel coordinates: x is linear in longitude, y in
        # Mercator's stretched latitude, so the two axes resample separately.
        xs, _ = _world_xy(fp.col_lons(), 0.0, plan.zoom, ts)
        _, ys = _world_xy(0.0, fp.row_lats(), plan.zoom, ts)
        rgb = resample(np.asarray(window), ys - plan.y0, xs - plan.x0)
        return Image.fromarray(rgb, "RGB")
