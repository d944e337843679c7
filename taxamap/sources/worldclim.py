"""WorldClim 2.1 climate features for the environment encoder: download, scaling, lookup.

The environment encoder (``MVRL/ecoclim``, SINR's residual net) was trained on 20 numbers per
place, in this order: ``[elevation, bio1, ..., bio19]`` from WorldClim 2.1 at 5 arc-minutes.
Each layer is z-scored with the mean and standard deviation of all its valid pixels over the whole
globe (values below -1e6 are the rasters' no-data), missing values become 0 after scaling, and a
place reads the nearest cell of the global 2160 x 4320 grid. :class:`WorldClimFeatures` reproduces
that from the official GeoTIFFs (or reads TaxaBind/SINR's pre-scaled array);
:func:`download_worldclim` fetches and unpacks the official zips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option
from taxamap.io import DiskFull, atomic_write, disk_full_guard
from taxamap import http

log = logging.getLogger(__name__)

#: The 20 rasters in feature order, named as the official zips unpack.
WORLDCLIM_FILES: tuple[str, ...] = ("wc2.1_5m_elev.tif",) + tuple(
    f"wc2.1_5m_bio_{i}.tif" for i in range(1, 20)
)

#: Official WorldClim 2.1 "base" download folder (geodata.ucdavis.edu, as linked from
#: worldclim.org and SINR's data instructions).
WORLDCLIM_BASE_URL = "https://geodata.ucdavis.edu/climate/worldclim/2_1/base/"

#: zip name -> the rasters it holds.
WORLDCLIM_ZIPS: dict[str, tuple[str, ...]] = {
    "wc2.1_5m_elev.zip": WORLDCLIM_FILES[:1],
    "wc2.1_5m_bio.zip": WORLDCLIM_FILES[1:],
}

#: Values below this are no-data (WorldClim writes -3.4e38), as in SINR/TaxaBind preprocessing.
INVALID_BELOW = -1e6

#: Stats cache written beside the rasters.
STATS_FILE = "taxamap-worldclim-stats.json"
#: Download record written beside the rasters.
MANIFEST_FILE = "taxamap-worldclim-download.json"

_STATS_VERSION = 1
_PARTIAL_HASH_BYTES = 1 << 20
_FULL_HINT = "free some space or choose another folder; the same command resumes"


def _missing_message(directory: Path, missing: Sequence[str]) -> str:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (
        f"WorldClim rasters missing in {directory}: {shown}; run "
        f"'taxamap data worldclim {directory}' to download them (or pass --env-array "
        "bioclim_elevation_scaled.npy)"
    )


def fingerprint(path: Path) -> str:
    """A cheap identity of a raster file: size, mtime (ns) and sha256 of its first and last MiB.

    Hashing the whole 5-minute rasters on every run would cost ~0.5 s for a value that almost
    never changes; any rewrite changes the mtime, and GeoTIFF headers/tile indexes sit at the ends
    of the file, so this catches replaced data without reading it all. Small files are hashed whole.
    """
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if st.st_size <= 2 * _PARTIAL_HASH_BYTES:
            h.update(fh.read())
        else:
            h.update(fh.read(_PARTIAL_HASH_BYTES))
            fh.seek(-_PARTIAL_HASH_BYTES, os.SEEK_END)
            h.update(fh.read(_PARTIAL_HASH_BYTES))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:32]}"


def _mask_invalid(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """float64 copy with no-data (sentinel, < -1e6, non-finite) as NaN."""
    out = np.asarray(values, dtype=np.float64).copy()
    bad = ~np.isfinite(out) | (out < INVALID_BELOW)
    if nodata is not None and np.isfinite(nodata):
        bad |= out == nodata
    out[bad] = np.nan
    return out


def cell_index(latlon: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-cell (row, col) on a global lat/lon grid, as TaxaBind looked features up.

    ``x = int((lon + 180) * W / 360)``, ``y = int((90 - lat) * H / 180)``, clipped into the grid
    (so lon = 180 and lat = -90 land in the last column/row).
    """
    latlon = np.asarray(latlon, dtype=np.float64)
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise TaxamapError(f"expected an (N, 2) array of (lat, lon), got shape {latlon.shape}")
    if not np.isfinite(latlon).all():
        raise TaxamapError("climate lookup got non-finite coordinates; pass (lat, lon) in degrees")
    lat, lon = latlon[:, 0], latlon[:, 1]
    x = np.floor((lon + 180.0) * width / 360.0).astype(np.int64)
    y = np.floor((90.0 - lat) * height / 180.0).astype(np.int64)
    return np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)


class WorldClimFeatures:
    """The 20 scaled climate features of any (lat, lon), as the environment encoder expects.

    Give either ``directory`` (the 20 official WorldClim 2.1 5-minute GeoTIFFs, see
    :data:`WORLDCLIM_FILES`) or ``env_array`` (TaxaBind/SINR's pre-scaled
    ``bioclim_elevation_scaled.npy``, H x W x 20, memory-mapped).

    From rasters: each layer's no-data (its nodata value, anything < -1e6) becomes NaN; each layer
    is z-scored with the mean and (population) std of all its valid pixels over the whole raster,
    computed once and cached in ``directory/taxamap-worldclim-stats.json`` keyed by each file's
    :func:`fingerprint`; NaN becomes 0 after scaling, as in training, except that a cell where all
    20 layers are missing (open water) returns a NaN row so callers can mask it.

    The pre-scaled array has no NaN (SINR filled them with 0), so there a row whose 20 values are
    all exactly 0 is taken as "no data" and returned as NaN.

    Rasters are read one layer at a time, in the window that covers the requested cells, so memory
    stays at one layer (~37 MB for a global 5-minute float32 layer) whatever the query.
    """

    def __init__(self, directory: str | os.PathLike | None = None,
                 env_array: str | os.PathLike | None = None) -> None:
        if (directory is None) == (env_array is None):
            raise TaxamapError(
                "environment features need exactly one of a WorldClim folder "
                f"({option('worldclim', metavar='DIR')}) or a pre-scaled array "
                f"({option('env-array', 'bioclim_elevation_scaled.npy')})"
            )
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.env_array_path = Path(env_array).expanduser() if env_array is not None else None
        self._stats: dict[str, tuple[float, float]] | None = None
        self._array = None
        if self.directory is not None:
            self._open_rasters()
        else:
            self._open_array()

    # -- setup -----------------------------------------------------------------------------

    def _open_rasters(self) -> None:
        import rasterio

        directory = self.directory
        if not directory.is_dir():
            raise TaxamapError(_missing_message(directory, list(WORLDCLIM_FILES)))
        missing = [name for name in WORLDCLIM_FILES if not (directory / name).is_file()]
        if missing:
            raise TaxamapError(_missing_message(directory, missing))
        self.paths = [directory / name for name in WORLDCLIM_FILES]
        shape = None
        self._nodata: list[float | None] = []
        for path in self.paths:
            try:
                with rasterio.open(path) as src:
                    this = (src.height, src.width)
                    self._check_global(path, src)
                    self._nodata.append(src.nodata)
            except rasterio.errors.RasterioIOError as exc:
                raise TaxamapError(
                    f"cannot read {path} ({exc}); delete it and run "
                    f"'taxamap data worldclim {directory}' again"
                ) from exc
            if shape is None:
                shape = this
            elif this != shape:
                raise TaxamapError(
                    f"{path.name} is {this[0]}x{this[1]} pixels but {self.paths[0].name} is "
                    f"{shape[0]}x{shape[1]}; all 20 WorldClim layers must share one grid"
                )
        self.height, self.width = shape

    @staticmethod
    def _check_global(path: Path, src) -> None:
        # The lookup formula assumes a whole-world lat/lon grid with its origin at (-180, 90).
        t = src.transform
        px, py = 360.0 / src.width, 180.0 / src.height
        ok = (
            abs(t.b) < 1e-12 and abs(t.d) < 1e-12
            and abs(t.a - px) <= 1e-6 * px and abs(-t.e - py) <= 1e-6 * py
            and abs(t.c + 180.0) <= 0.01 * px and abs(t.f - 90.0) <= 0.01 * py
        )
        if src.crs is not None and not src.crs.is_geographic:
            ok = False
        if not ok:
            raise TaxamapError(
                f"{path} is not a global lat/lon raster (-180..180, -90..90); use the official "
                "WorldClim 2.1 files from 'taxamap data worldclim DIR'"
            )

    def _open_array(self) -> None:
        path = self.env_array_path
        if not path.is_file():
            raise TaxamapError(
                f"environment array {path} not found; pass the path of SINR/TaxaBind's "
                "bioclim_elevation_scaled.npy, or use --worldclim DIR instead"
            )
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty or cut-short file
            text = str(exc)
            why = ("the file is empty" if path.stat().st_size == 0
                   else "it is not a NumPy .npy array" if "pickled" in text
                   else "the file is cut short" if not text or "mmap length" in text else text)
            raise TaxamapError(f"cannot read environment array {path}: {why}; pass SINR/"
                               "TaxaBind's bioclim_elevation_scaled.npy, or use --worldclim DIR "
                               "instead") from None
        if not isinstance(arr, np.ndarray):  # an .npz archive
            raise TaxamapError(f"{path} is not a single .npy array; pass SINR/TaxaBind's "
                               "bioclim_elevation_scaled.npy")
        if arr.ndim != 3 or arr.shape[2] != len(WORLDCLIM_FILES):
            raise TaxamapError(
                f"{path} has shape {arr.shape}; expected H x W x {len(WORLDCLIM_FILES)} "
                "(SINR's bioclim_elevation_scaled.npy)"
            )
        self._array = arr
        self.height, self.width = int(arr.shape[0]), int(arr.shape[1])

    # -- stats -----------------------------------------------------------------------------

    @property
    def stats_path(self) -> Path | None:
        return self.directory / STATS_FILE if self.directory is not None else None

    def stats(self) -> dict[str, tuple[float, float]]:
        """Per-layer ``(mean, std)`` over all valid pixels of the global rasters (cached)."""
        if self._array is not None:
            raise TaxamapError("a pre-scaled environment array carries no per-layer statistics")
        if self._stats is None:
            self._stats = self._load_or_compute_stats()
        return self._stats

    def _load_or_compute_stats(self) -> dict[str, tuple[float, float]]:
        cached: dict = {}
        try:
            data = json.loads(self.stats_path.read_text())
            if data.get("version") == _STATS_VERSION and data.get("invalid_below") == INVALID_BELOW:
                cached = data.get("layers", {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable %s (%s); recomputing", self.stats_path, exc)
        out, layers, changed = {}, {}, False
        for path, nodata in zip(self.paths, self._nodata):
            fp = fingerprint(path)
            entry = cached.get(path.name)
            if not (isinstance(entry, dict) and entry.get("fingerprint") == fp):
                mean, std, count = self._layer_stats(path, nodata)
                entry = {"fingerprint": fp, "mean": mean, "std": std, "valid_pixels": count}
                changed = True
            layers[path.name] = entry
            out[path.name] = (float(entry["mean"]), float(entry["std"]))
        if changed:
            text = json.dumps(
                {"version": _STATS_VERSION, "invalid_below": INVALID_BELOW, "layers": layers},
                indent=1,
            )
            try:
                atomic_write(self.stats_path, text)
            except (OSError, DiskFull) as exc:  # a read-only data folder still works, just slower
                log.warning("could not cache WorldClim statistics in %s: %s", self.stats_path, exc)
        return out

    @staticmethod
    def _layer_stats(path: Path, nodata: float | None) -> tuple[float, float, int]:
        import rasterio

        with rasterio.open(path) as src:
            values = src.read(1)
        valid = values.astype(np.float64, copy=False)
        valid = valid[np.isfinite(valid) & (valid >= INVALID_BELOW)]
        if nodata is not None and np.isfinite(nodata):
            valid = valid[valid != nodata]
        if valid.size == 0:
            raise TaxamapError(
                f"{path} holds no valid pixels; delete it and run "
                f"'taxamap data worldclim {path.parent}' again"
            )
        mean = float(valid.mean())
        std = float(valid.std())
        # A constant layer would divide by zero; its z-scores are all 0 either way.
        return mean, (std if std > 0 else 1.0), int(valid.size)

    # -- lookup ----------------------------------------------------------------------------

    def features(self, latlon: np.ndarray) -> np.ndarray:
        """Scaled features ``(N, 20)`` float32 for ``(N, 2)`` (lat, lon) degrees.

        Rows for cells with no climate data in any layer are all NaN.
        """
        rows, cols = cell_index(latlon, self.height, self.width)
        if rows.size == 0:
            return np.zeros((0, len(WORLDCLIM_FILES)), dtype=np.float32)
        if self._array is not None:
            out = np.asarray(self._array[rows, cols], dtype=np.float32)
            nan = np.isnan(out)
            empty = nan.all(axis=1) | (out == 0).all(axis=1)
            out[nan] = 0.0
            out[empty] = np.nan
            return out
        return self._features_from_rasters(rows, cols)

    def _features_from_rasters(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        import rasterio
        from rasterio.windows import Window

        stats = self.stats()
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        window = Window(c0, r0, c1 - c0, r1 - r0)
        out = np.empty((rows.size, len(self.paths)), dtype=np.float32)
        for k, (path, nodata) in enumerate(zip(self.paths, self._nodata)):
            with rasterio.open(path) as src:
                block = src.read(1, window=window)
            raw = _mask_invalid(block[rows - r0, cols - c0], nodata)
            mean, std = stats[path.name]
            out[:, k] = (raw - mean) / std
        nan = np.isnan(out)
        empty = nan.all(axis=1)
        out[nan] = 0.0
        out[empty] = np.nan
        return out

    def describe(self) -> dict[str, Any]:
        """Settings that identify these features (for store keys and output provenance)."""
        common = {
            "features": [Path(n).stem.replace("wc2.1_5m_", "") for n in WORLDCLIM_FILES],
            "lookup": "nearest cell: x=int((lon+180)*W/360), y=int((90-lat)*H/180)",
            "grid": [self.height, self.width],
        }
        if self._array is not None:
            return {
                "source": "env_array",
                "file": self.env_array_path.name,
                "fingerprint": fingerprint(self.env_array_path),
                "scaling": "pre-scaled array; all-zero rows treated as no data",
                **common,
            }
        digest = hashlib.sha256(
            "|".join(fingerprint(p) for p in self.paths).encode()
        ).hexdigest()[:16]
        return {
            "source": "worldclim-2.1-5m",
            "files": list(WORLDCLIM_FILES),
            "fingerprint": digest,
            "scaling": f"global z-score per layer over valid pixels (< {INVALID_BELOW:g} invalid), "
                       "NaN->0, all-NaN cells masked",
            **common,
        }


# -- download ------------------------------------------------------------------------------

class _Transient(Exception):
    """A download that broke off after the server answered (resumed with a Range request)."""


#: WorldClim's own page listing the 2.1 downloads (the zips link to WORLDCLIM_BASE_URL).
WORLDCLIM_PAGE = "https://www.worldclim.org/data/worldclim21.html"


def by_hand_hint(zips: Sequence[str], base_url: str, target: Path) -> str:
    """How to bring the ``zips`` still needed without this downloader: their names, where they
    come from and where they go."""
    names = " and ".join(zips)
    return (f"download {names} from {base_url} (WorldClim 2.1, 5 minutes; listed on "
            f"{WORLDCLIM_PAGE}) into {target}, where the same command unpacks them")


def download_breaker(by_hand: str = "") -> http.CircuitBreaker:
    """The breaker of one download run: the downloader is sequential, so two attempts in a row
    with no answer (about 2 x the read timeout) are enough to say the server is not answering.
    ``by_hand``: :func:`by_hand_hint`, added to its message."""
    return http.CircuitBreaker(
        "WorldClim downloads", first=2, consecutive=8,
        hint="check the network and run the same command again (it resumes)"
             + (f", or {by_hand}" if by_hand else ""))


def _unpacked_ok(target: Path, manifest: dict, members: Iterable[str]) -> bool:
    """True when every member is in place: its size as recorded, or (unpacked by hand, no
    record) a readable single-band raster, which then gets recorded."""
    files = manifest.setdefault("files", {})
    for name in members:
        path = target / name
        if not path.is_file():
            return False
        size = path.stat().st_size
        if name in files:
            if files[name] != size:
                return False
        elif _readable_raster(path):
            files[name] = size
        else:
            return False
    return True


def _readable_raster(path: Path) -> bool:
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.count >= 1 and src.width > 0 and src.height > 0
    except rasterio.errors.RasterioIOError:
        return False


def _read_manifest(target: Path) -> dict:
    try:
        data = json.loads((target / MANIFEST_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _fetch(session, url: str, part: Path, *, progress: bool, timeout, by_hand: str = "") -> None:
    """One attempt at bringing ``part`` to the full size of ``url``, resuming what is there.

    Timeouts, refused connections and 429/5xx are retried inside the session (urllib3); what
    still fails then is final here. A body that breaks off raises :class:`_Transient`.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout)
    except http.CircuitOpen:
        raise
    except Exception as exc:  # requests' connection/timeouts after retries; any client's equivalents
        raise TaxamapError(f"download of {url} failed ({type(exc).__name__}); check the network "
                           "and run the same command again (it resumes)"
                           + (f", or {by_hand}" if by_hand else "")) from None
    with resp:
        status = resp.status_code
        if status == 416 and have:
            # Our .part is already complete or longer than the file: start again.
            part.unlink()
            raise _Transient("range not satisfiable; restarting download")
        if status not in (200, 206):
            raise TaxamapError(f"download of {url} failed: HTTP {status}")
        if status == 206:
            crange = resp.headers.get("Content-Range", "")
            try:
                start = int(crange.split()[1].split("-")[0])
                total = int(crange.rsplit("/", 1)[1])
            except (IndexError, ValueError) as exc:
                raise _Transient(f"bad Content-Range {crange!r}") from exc
            if start != have:
                raise _Transient(f"server resumed at {start}, expected {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # server ignored the Range: whole file again
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        bar = _progress_bar(url, total, have, progress)
        try:
            with disk_full_guard(part.parent, total - have if total else None,
                                 what=f"downloading {part.name[:-5]}", hint=_FULL_HINT), \
                    open(part, mode) as fh:
                try:
                    for chunk in _body_chunks(resp):
                        fh.write(chunk)
                        bar.update(len(chunk))
                except Exception as exc:  # dropped connection mid-body
                    raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Transient(f"got {size} of {total} bytes")


def _body_chunks(resp, size: int = 1 << 16):
    """Yield the body as it arrives. ``raw.read1`` (urllib3 2) hands over every byte received
    before a dropped connection, so a resume wastes nothing; other clients use ``iter_content``."""
    raw = getattr(resp, "raw", None)
    if raw is not None and hasattr(raw, "read1") and not resp.headers.get("Content-Encoding"):
        while True:
            chunk = raw.read1(size)
            if not chunk:
                return
            yield chunk
    else:
        for chunk in resp.iter_content(chunk_size=size):
            if chunk:
                yield chunk


def _progress_bar(url: str, total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
        desc=url.rsplit("/", 1)[-1], file=sys.stderr, disable=not enabled, leave=False,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unpack(zip_path: Path, members: Sequence[str], target: Path) -> dict[str, int]:
    """Extract ``members`` (matched by base name) into a temp folder, then move them in."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            by_name = {Path(info.filename).name: info for info in zf.infolist() if not info.is_dir()}
            missing = [m for m in members if m not in by_name]
            if missing:
                raise TaxamapError(
                    f"{zip_path.name} lacks {', '.join(missing)}; it is not the official "
                    "WorldClim 2.1 archive (delete it and run the download again)"
                )
            bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"CRC error in {bad}")
            need = sum(by_name[m].file_size for m in members)
            with disk_full_guard(target, need, what=f"unpacking {zip_path.name}", hint=_FULL_HINT):
                tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target))
                try:
                    sizes = {}
                    for name in members:
                        dest = tmp / name
                        with zf.open(by_name[name]) as src, open(dest, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        sizes[name] = dest.stat().st_size
                    # A set of files, moved in once all are complete (no half-unpacked set).
                    for name in members:
                        os.replace(tmp / name, target / name)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as exc:
        zip_path.unlink(missing_ok=True)
        raise TaxamapError(
            f"{zip_path.name} is corrupt ({exc}); it was deleted, run the download again"
        ) from exc
    return sizes


def download_worldclim(
    target_dir: str | os.PathLike,
    *,
    session=None,
    progress: bool = True,
    base_url: str = WORLDCLIM_BASE_URL,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float | tuple[float, float] | None = None,
    keep_zips: bool = False,
) -> list[Path]:
    """Download and unpack the official WorldClim 2.1 5-minute elevation and bioclim zips.

    Returns the 20 raster paths in feature order. Idempotent: rasters already unpacked (sizes as
    recorded in ``taxamap-worldclim-download.json``) are not fetched again. Each zip downloads into
    ``<name>.part`` with a tqdm bar on stderr, resumes with an HTTP Range request after a dropped
    connection (or an interrupted earlier run), is checked against the server's size, has its
    sha256 recorded, and is unpacked through a temporary folder so no half-written raster is ever
    visible. An official zip already in ``target_dir`` (downloaded by hand) is used as is, and
    rasters already unpacked by hand are accepted when they read as rasters. ``session`` is any
    object with a requests-style ``get(url, headers=, stream=, timeout=)``; the default is
    :func:`taxamap.http.make_session`'s, with retries and a breaker that stops the run
    in about a minute when the server does not answer. ``timeout`` (connect, read) defaults to
    :func:`taxamap.http.default_timeout`.
    """
    target = Path(target_dir).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaxamapError(f"cannot create {target}: {exc}") from exc
    manifest = _read_manifest(target)
    manifest.setdefault("zips", {})
    manifest.setdefault("files", {})
    before = json.dumps(manifest, sort_keys=True)
    timeout = http.default_timeout(http.DEFAULT_TIMEOUT if timeout is None else timeout)
    base = base_url if base_url.endswith("/") else base_url + "/"
    by_hand = by_hand_hint([z for z, members in WORLDCLIM_ZIPS.items()
                            if not (target / z).is_file()
                            and not _unpacked_ok(target, manifest, members)], base, target)
    if session is None:
        session = http.make_session(workers=1, retries=retries, backoff=backoff, timeout=timeout,
                                    breaker=download_breaker(by_hand))
    for zip_name, members in WORLDCLIM_ZIPS.items():
        if _unpacked_ok(target, manifest, members):
            log.info("%s already unpacked in %s", zip_name, target)
            continue
        url = base + zip_name
        zip_path = target / zip_name
        part = target / (zip_name + ".part")
        if not zip_path.is_file():
            _download_with_retries(session, url, part, progress=progress, retries=retries,
                                   backoff=backoff, timeout=timeout, by_hand=by_hand)
            os.replace(part, zip_path)
        digest = _sha256(zip_path)
        sizes = _unpack(zip_path, members, target)
        manifest["zips"][zip_name] = {
            "url": url, "size": zip_path.stat().st_size, "sha256": digest,
            "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest["files"].update(sizes)
        atomic_write(target / MANIFEST_FILE, json.dumps(manifest, indent=1), hint=_FULL_HINT)
        if not keep_zips:
            zip_path.unlink(missing_ok=True)
    if json.dumps(manifest, sort_keys=True) != before:  # rasters found unpacked by hand
        atomic_write(target / MANIFEST_FILE, json.dumps(manifest, indent=1), hint=_FULL_HINT)
    return [target / name for name in WORLDCLIM_FILES]


def _download_with_retries(session, url: str, part: Path, *, progress: bool, retries: int,
                           backoff: float, timeout, by_hand: str = "") -> None:
    """Resume a body that broke off, up to ``retries`` times (the session retries the rest)."""
    for attempt in range(retries + 1):
        try:
            _fetch(session, url, part, progress=progress, timeout=timeout, by_hand=by_hand)
            return
        except _Transient as exc:
            if attempt == retries:
                raise TaxamapError(
                    f"download of {url} failed after {retries + 1} attempts ({exc}); run the "
                    "same command again to resume"
                ) from exc
            delay = http.backoff_delay(attempt, backoff, 60.0)
            log.warning("download of %s interrupted (%s); resuming in %.1f s", url,
                        type(exc).__name__, delay)
            time.sleep(delay)
