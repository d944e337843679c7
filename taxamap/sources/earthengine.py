"""Satellite patches from Google Earth Engine: a yearly cloud-masked Sentinel-2 median composite.

What is computed (state it in a paper's methods section as is):

* Collection ``COPERNICUS/S2_SR_HARMONIZED`` (Sentinel-2 L2A surface reflectance, DN = reflectance
  x 10000, processing-baseline offsets already removed), images acquired in ``year`` (UTC).
* Cloud mask from the Scene Classification Layer (SCL), not QA60 (QA60 misses thin cloud and
  shadows): keep classes 2 dark area, 4 vegetation, 5 bare, 6 water, 7 unclassified, 11 snow/ice;
  drop 0 no data, 1 saturated/defective, 3 cloud shadow, 8/9 cloud medium/high probability,
  10 thin cirrus.
* Per-pixel median of B4, B3, B2 (red, green, blue) over the kept observations, bilinear
  resampling from the native 10 m grid.
* Stretch to 8 bits, done here (not on the server) so it is exact and tested:
  ``255 * clip(reflectance / 0.3, 0, 1) ** (1 / 1.2)``: reflectance 0..0.3 fills the range, a mild
  gamma brightens mid-tones, approximating the look of EOX's Sentinel-2 cloudless mosaic (whose
  exact processing is not published).
* Window: TaxaBind's footprint (:mod:`taxamap.sources.footprint`), the ``footprint_m`` (2,560 m)
  square in the cell's tangent plane on the EPSG:4326 grid of ``size`` (256) px the WMS source
  asks for, fetched as NPY with ``ee.data.computePixels`` (two requests side by side at the
  antimeridian). A fourth band ``valid`` says where at least one clear observation exists; a
  patch with more than ``max_invalid`` (1 %) of pixels without one is ``None`` (never a black
  patch).

All Earth Engine calls go through one small object, :class:`EarthEngineClient`
(``initialize(project)``, ``compute_pixels(request) -> bytes``); tests pass a fake one. Transient
errors (429 / "Too many concurrent aggregations", 5xx, deadlines, timeouts, connection errors) are
retried with exponential backoff and jitter; any other error stops the run with one line, since
it would fail for every cell alike. The ``earthengine-api`` package is optional.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option
from taxamap.io import DiskFull
from taxamap import http
from taxamap.sources.cache import TileCache, cached
from taxamap.sources.base import DEFAULT_WORKERS, PerCellSource, check_patch_size, explain_footprint
from taxamap.sources.footprint import DEFAULT_FOOTPRINT_M, DEFAULT_SIZE, Footprint, footprint

COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
RGB_BANDS = ("B4", "B3", "B2")
VALID_BAND = "valid"
#: SCL classes kept as clear observations (see the module docstring).
SCL_KEEP = (2, 4, 5, 6, 7, 11)
REFLECTANCE_SCALE = 10000.0
REFLECTANCE_MAX = 0.3
GAMMA = 1.2

INSTALL_HINT = "Earth Engine needs the earthengine-api package: pip install earthengine-api"

_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_TRANSIENT_TEXT = (
    "too many concurrent", "too many requests", "rate limit", "429", "quota exceeded for quota metric",
    "internal error", "backend error", "service unavailable", "bad gateway", "deadline",
    "timed out", "timeout", "temporarily", "try again", "connection reset", "connection aborted",
    "error 500", "error 502", "error 503", "error 504",
)
_AUTH_TEXT = (
    "authenticate", "credential", "authoriz", "permission denied", "not registered",
    "no project found", "project is not", "unauthenticated", "401", "403",
)


def stretch_to_uint8(dn: np.ndarray, reflectance_max: float = REFLECTANCE_MAX, gamma: float = GAMMA) -> np.ndarray:
    """Sentinel-2 L2A DN (reflectance x 10000) to display uint8, as the module docstring states."""
    refl = np.asarray(dn, dtype=np.float64) / REFLECTANCE_SCALE
    unit = np.clip(refl / reflectance_max, 0.0, 1.0) ** (1.0 / gamma)
    return np.round(unit * 255.0).astype(np.uint8)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: rate limits, server errors, deadlines, dropped connections."""
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    for holder in (exc, getattr(exc, "resp", None), getattr(exc, "response", None)):
        for attr in ("status", "status_code", "code"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and value in _TRANSIENT_STATUS:
                return True
    text = str(exc).lower()
    return any(marker in text for marker in _TRANSIENT_TEXT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _credentials_error(exc: BaseException) -> TaxamapError:
    return TaxamapError(f"Earth Engine credentials missing or not usable ({_first_line(exc)}): "
                        f"run 'earthengine authenticate' (and pass "
                        f"{option('ee-project', metavar='ID')})")


def build_composite(ee, spec: dict):
    """The ``ee.Image`` a composite spec describes (median of SCL-masked RGB, plus ``valid``)."""
    year = int(spec["year"])
    bands = list(spec["bands"])
    keep = list(spec["scl_keep"])

    def clear(img):
        ok = img.select("SCL").remap(keep, [1] * len(keep), 0)
        return img.select(bands).resample("bilinear").updateMask(ok)

    median = (
        ee.ImageCollection(spec["collection"])
        .filterDate(f"{year}-01-01", f"{year + 1}-01-01")
        .map(clear)
        .median()
    )
    valid = median.select(bands[0]).mask().gt(0).unmask(0).rename(VALID_BAND)
    return median.unmask(0).round().toUint16().addBands(valid.toUint16())


class EarthEngineClient:
    """The network boundary: the only object that talks to Earth Engine.

    ``initialize(project)`` authenticates (``ee.Initialize``); ``compute_pixels(request)`` takes
    a plain dict (``composite`` spec, ``grid``, ``fileFormat``, ``bandIds``), builds the image for
    the spec once, and returns the bytes of ``ee.data.computePixels``. ``ee_module`` is the ``ee``
    package (imported lazily when not given).
    """

    def __init__(self, ee_module=None):
        self._ee = ee_module
        self._images: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _module(self):
        if self._ee is None:
            try:
                import ee  # optional dependency
            except ImportError:
                raise TaxamapError(INSTALL_HINT) from None
            self._ee = ee
        return self._ee

    def initialize(self, project: str | None) -> None:
        """Authenticate with the stored credentials; a missing login is a one-line TaxamapError."""
        ee = self._module()
        try:
            ee.Initialize(project=project) if project else ee.Initialize()
        except Exception as exc:  # ee raises EEException, google.auth errors, ValueError...
            raise _credentials_error(exc) from None

    def compute_pixels(self, request: dict) -> bytes:
        """The raw bytes (NPY) of ``ee.data.computePixels`` for ``request``."""
        ee = self._module()
        params = dict(request)
        spec = params.pop("composite")
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            image = self._images.get(key)
            if image is None:
                image = self._images[key] = build_composite(ee, spec)
        params["expression"] = image
        return ee.data.computePixels(params)


def decode_npy(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """(rgb (H, W, 3) DN array, valid (H, W) bool or None) from NPY bytes (structured or plain)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype.names:
        missing = [b for b in RGB_BANDS if b not in arr.dtype.names]
        if missing:
            raise ValueError(f"NPY lacks bands {missing}")
        rgb = np.stack([arr[b].astype(np.float64) for b in RGB_BANDS], axis=-1)
        valid = arr[VALID_BAND] > 0 if VALID_BAND in arr.dtype.names else None
        return rgb, valid
    if arr.ndim == 3 and arr.shape[-1] >= 3:
        return arr[..., :3].astype(np.float64), (arr[..., 3] > 0 if arr.shape[-1] > 3 else None)
    if arr.ndim == 3 and arr.shape[0] >= 3:
        return np.moveaxis(arr[:3], 0, -1).astype(np.float64), (arr[3] > 0 if arr.shape[0] > 3 else None)
    raise ValueError(f"unexpected NPY array shape {arr.shape}")


class EarthEngineSource(PerCellSource):
    """Sentinel-2 median-composite patches from Earth Engine (see the module docstring).

    A patch whose request still fails after the retries is ``None`` and *failed* (``fetch_status``):
    its block stays unfinished in the store and a rerun asks again.
    """

    kind = "earthengine"
    _thread_name = "taxamap-ee"

    def __init__(
        self,
        project: str | None = None,
        *,
        year: int = 2020,
        size: int = DEFAULT_SIZE,
        footprint_m: float = DEFAULT_FOOTPRINT_M,
        cache_dir: str | Path | None = None,
        cache: bool = True,
        workers: int = DEFAULT_WORKERS,
        client: EarthEngineClient | None = None,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        reflectance_max: float = REFLECTANCE_MAX,
        gamma: float = GAMMA,
        max_invalid: float = 0.01,
    ):
        if not 2017 <= int(year) <= 2100:
            raise TaxamapError(f"{option('sat-year')} must be 2017 or later (Sentinel-2 L2A), "
                               f"got {year}")
        self.size = check_patch_size(size, 1024, " for Earth Engine")
        super().__init__(workers)
        self.project = project
        self.year = int(year)
        self.footprint_m = float(footprint_m)
        self.retries, self.backoff, self.max_backoff = int(retries), float(backoff), float(max_backoff)
        self.reflectance_max, self.gamma = float(reflectance_max), float(gamma)
        self.max_invalid = float(max_invalid)
        self.attribution = (
            f"Contains modified Copernicus Sentinel data {self.year}, composited with Google Earth Engine"
        )
        self.license = "Copernicus Sentinel data terms (free, full and open access); Earth Engine terms of service"
        self.client = client if client is not None else EarthEngineClient()
        self.client.initialize(project)
        self.cache = TileCache(cache_dir, self.describe(), label=f"earthengine {COLLECTION} {self.year}") \
            if cache else None

    def composite_spec(self) -> dict:
        """The JSON description of the composite the client turns into an ``ee.Image``."""
        return {
            "collection": COLLECTION,
            "year": self.year,
            "bands": list(RGB_BANDS),
            "cloud_mask": "SCL",
            "scl_keep": list(SCL_KEEP),
            "reducer": "median",
        }

    def describe(self) -> dict:
        """Settings identifying the patches (the project is not part of the imagery)."""
        return {
            "kind": self.kind,
            "collection": COLLECTION,
            "year": self.year,
            "cloud_mask": "SCL",
            "scl_keep": list(SCL_KEEP),
            "footprint_m": self.footprint_m,
            "size": self.size,
            "stretch": {"reflectance_max": self.reflectance_max, "gamma": self.gamma},
        }

    def footprint(self, lat: float, lon: float) -> Footprint | None:
        """The box the patch of (lat, lon) covers (None near a pole)."""
        return footprint(lat, lon, self.footprint_m, self.size)

    def requests_for(self, lat: float, lon: float) -> tuple[str, list[tuple[int, int, dict]]] | None:
        """(cache key, [(first column, last column + 1, computePixels request), ...]) for the
        cell's footprint: one request, or two side by side at the antimeridian; None near a pole."""
        fp = self.footprint(lat, lon)
        if fp is None:
            return None
        out = []
        for part in fp.parts():
            w, s, e, n = part.bbox
            grid = {
                "dimensions": {"width": part.width, "height": self.size},
                "affineTransform": {
                    "scaleX": (e - w) / part.width, "shearX": 0.0, "translateX": w,
                    "shearY": 0.0, "scaleY": -(n - s) / self.size, "translateY": n,
                },
                "crsCode": "EPSG:4326",
            }
            request = {
                "composite": self.composite_spec(),
                "fileFormat": "NPY",
                "bandIds": [*RGB_BANDS, VALID_BAND],
                "grid": grid,
            }
            out.append((part.col0, part.col1, request))
        grids = json.dumps([r["grid"] for _, _, r in out], sort_keys=True)
        digest = hashlib.sha256(grids.encode("utf-8")).hexdigest()
        return f"{digest[:2]}/{digest[2:24]}", out

    def explain(self, lat: float, lon: float) -> dict:
        """What the patch of (lat, lon) is computed from (no request): footprint and EE grids."""
        out = explain_footprint(self.footprint(lat, lon), lat, lon, self.describe())
        planned = self.requests_for(lat, lon)
        if planned is not None:
            # The composite is the source's (out["source"]); each request adds its grid.
            out["requests"] = [{k: v for k, v in r.items() if k != "composite"} for _, _, r in planned[1]]
        return out

    def patch(self, lat: float, lon: float):
        """(RGB patch or None, failed) of one cell: failed when Earth Engine still errs after the
        retries; None without failure beyond Mercator's poles or without clear observations."""
        from PIL import Image

        planned = self.requests_for(lat, lon)
        if planned is None:
            return None, False
        key, parts = planned
        found, hit = cached(self.cache, key, self.stats)
        if found:
            return hit, False
        dn = np.zeros((self.size, self.size, 3), np.float64)
        valid = np.zeros((self.size, self.size), bool)
        for col0, col1, request in parts:
            data = self._compute(request)
            if data is None:
                return None, True
            try:
                part_dn, part_valid = decode_npy(data)
            except (ValueError, OSError) as exc:
                raise TaxamapError(f"Earth Engine returned an unreadable patch: {exc}") from None
            if part_dn.shape[:2] != (self.size, col1 - col0):
                raise TaxamapError(f"Earth Engine returned a {part_dn.shape[1]}x{part_dn.shape[0]} "
                                   f"patch for a {col1 - col0}x{self.size} request")
            if part_valid is None:
                part_valid = part_dn.any(axis=-1)  # no mask band: all-zero DN means no observation
            dn[:, col0:col1] = part_dn
            valid[:, col0:col1] = part_valid
        if 1.0 - float(valid.mean()) > self.max_invalid:
            self.stats.add(not_found=1)
            if self.cache is not None:
                self.cache.put_missing(key)
            return None, False
        rgb = stretch_to_uint8(dn, self.reflectance_max, self.gamma)
        if not valid.all():
            rgb[~valid] = rgb[valid].mean(axis=0).round().astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
        if self.cache is not None:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            try:
                self.cache.put(key, buf.getvalue(), validated=True)
            except DiskFull as exc:
                exc.per_cell = len(buf.getvalue())  # one patch per cell
                raise
        self.stats.add(fetched=1)
        return img, False

    def _compute(self, request: dict) -> bytes | None:
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.add(retries=1)
            self.stats.add(requests=1)
            try:
                return self.client.compute_pixels(request)
            except TaxamapError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    text = _first_line(exc)
                    if any(marker in text.lower() for marker in _AUTH_TEXT):
                        raise _credentials_error(exc) from None
                    raise TaxamapError(f"Earth Engine refused the request: {text}") from None
            if attempt < self.retries:
                time.sleep(http.backoff_delay(attempt, self.backoff, self.max_backoff))
        self.stats.add(failures=1)
        return None
