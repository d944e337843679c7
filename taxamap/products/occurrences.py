"""Occurrence points: read them from users' files, or download them from GBIF.

:func:`read_points` / :func:`load_points` read presence (or background) points from

* delimited text (CSV, TSV; the delimiter is sniffed, so GBIF's tab-separated downloads work, also
  ``.gz`` or a ``.zip`` holding one such file) with a latitude/longitude column pair, matched
  case-insensitively: ``lat``/``lon`` (or ``lng``), ``latitude``/``longitude``, or GBIF's
  ``decimalLatitude``/``decimalLongitude``;
* point vector files (GeoPackage, Shapefile, GeoJSON, FlatGeobuf, ...) in any CRS, reprojected to
  EPSG:4326 with pyproj.

Points are returned as an (N, 2) float64 array of (lat, lon) degrees, the order every taxamap
function takes. Rows without usable coordinates are counted (``Points.n_missing``) and logged,
never silently dropped.

:func:`download_occurrences` pages through GBIF's occurrence search API for one species inside a
bounding box or polygon and writes the records as CSV. All HTTP goes through one
:class:`~taxamap.taxonomy.TaxonomyClient` (retries with backoff on 429/5xx only), which tests
point at a server on 127.0.0.1.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from taxamap.crs import as_crs, to_lonlat
from taxamap.errors import TaxamapError
from taxamap.io import DiskFull, atomic_path, atomic_write
from taxamap.surface import option

log = logging.getLogger(__name__)

#: Accepted (latitude, longitude) column pairs, lower case, in order of preference.
COORDINATE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("decimallatitude", "decimallongitude"),
    ("latitude", "longitude"),
    ("lat", "lon"),
    ("lat", "lng"),
    ("lat", "long"),
)
ACCEPTED_COLUMNS_TEXT = ("lat/lon, latitude/longitude or decimalLatitude/decimalLongitude "
                         "(any case)")

#: File endings read as delimited text; everything else goes to GDAL (pyogrio).
TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".tab", ".csv.gz", ".tsv.gz", ".txt.gz")

#: Values that mean "no value" in a coordinate cell.
_EMPTY = {"", "na", "nan", "null", "none", "n/a", "-"}

#: Column names taken as a 0/1 presence label by :func:`read_labelled_points`.
LABEL_COLUMNS = ("presence", "pa", "occurrence", "class", "label")


@dataclass(frozen=True, eq=False)
class Points:
    """Points read from a file.

    ``latlon``: (N, 2) float64 (lat, lon) degrees of the usable rows; ``labels``: (N,) of the
    label column when one was asked for, else None; ``n_rows``: rows (features) in the file;
    ``n_missing``: rows dropped because a coordinate was empty or not a number; ``n_invalid``:
    rows dropped because the coordinates are outside [-90, 90] x [-180, 180] (or could not be
    reprojected); ``source``: the file.
    """

    latlon: np.ndarray
    n_rows: int
    n_missing: int = 0
    n_invalid: int = 0
    labels: np.ndarray | None = None
    source: str = ""

    @property
    def n_dropped(self) -> int:
        return self.n_missing + self.n_invalid

    def summary(self) -> str:
        """One line for users: how many points were read and how many rows were dropped."""
        text = f"{len(self.latlon)} points from {self.source}"
        if self.n_dropped:
            parts = []
            if self.n_missing:
                parts.append(f"{self.n_missing} without coordinates")
            if self.n_invalid:
                parts.append(f"{self.n_invalid} with coordinates out of range")
            text += f" ({' and '.join(parts)} skipped of {self.n_rows} rows)"
        return text


def read_points(path: str | os.PathLike) -> np.ndarray:
    """(N, 2) float64 (lat, lon) degrees of the points in ``path`` (see module docstring).

    Rows without usable coordinates are skipped and reported with a warning (use
    :func:`load_points` to get the counts). Raises TaxamapError for unreadable files and for
    tables without an accepted coordinate column pair.
    """
    points = load_points(path)
    if points.n_dropped:
        log.warning("%s", points.summary())
    return points.latlon


def as_latlon_points(points: Any, what: str = "points") -> np.ndarray:
    """(N, 2) float64 (lat, lon) degrees from whatever users hold their points in.

    Accepted: a file path (as :func:`read_points`), a ``geopandas.GeoDataFrame``/``GeoSeries``
    of points in any CRS (reprojected to EPSG:4326; other geometries give their centroids), a
    ``pandas.DataFrame`` with a latitude/longitude column pair (the names files may use), or an
    (N, 2) array of (lat, lon).
    """
    if isinstance(points, (str, os.PathLike)):
        return read_points(points)
    geometry = getattr(points, "geometry", None)
    if geometry is not None and hasattr(points, "crs"):
        if points.crs is None:
            raise TaxamapError(f"the {what} GeoDataFrame has no CRS; set it with "
                               ".set_crs('EPSG:4326') (or the CRS its coordinates are in)")
        geoms = points.to_crs("EPSG:4326")
        geoms = getattr(geoms, "geometry", geoms)
        if not (geoms.geom_type == "Point").all():
            geoms = geoms.centroid
        latlon = np.column_stack([geoms.y.to_numpy(float), geoms.x.to_numpy(float)])
        return latlon[np.isfinite(latlon).all(axis=1)]
    columns = getattr(points, "columns", None)
    if columns is not None:
        found = _coordinate_columns([str(c) for c in columns])
        if found is None:
            raise TaxamapError(f"the {what} table has no coordinate columns; name them "
                               f"{ACCEPTED_COLUMNS_TEXT}")
        lat = points.iloc[:, found[0]].to_numpy(dtype=float)
        lon = points.iloc[:, found[1]].to_numpy(dtype=float)
        latlon = np.column_stack([lat, lon])
    else:
        latlon = np.asarray(points, dtype=np.float64)
        if latlon.ndim != 2 or latlon.shape[1] != 2:
            raise TaxamapError(f"{what} must be an (N, 2) array of (lat, lon), a table with "
                               "lat/lon columns, a GeoDataFrame or a file")
    ok = (np.isfinite(latlon).all(axis=1) & (np.abs(latlon[:, 0]) <= 90)
          & (np.abs(latlon[:, 1]) <= 180))
    return latlon[ok]


def points_frame(latlon: np.ndarray, **columns: Any):
    """A ``geopandas.GeoDataFrame`` of (lat, lon) points in EPSG:4326 (plus ``columns``)."""
    import geopandas as gpd

    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    return gpd.GeoDataFrame(
        {"lat": latlon[:, 0], "lon": latlon[:, 1], **columns},
        geometry=gpd.points_from_xy(latlon[:, 1], latlon[:, 0]), crs="EPSG:4326",
    )


def read_labelled_points(
    path: str | os.PathLike, column: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(presences, background) from one file whose ``column`` holds 1 (presence) / 0 (other).

    ``column=None`` takes the first of :data:`LABEL_COLUMNS` present (case-insensitive). This
    reads presence/background samples such as the one ``elapid`` ships (``presence`` = 1/0).
    """
    points = load_points(path, label_column=column or LABEL_COLUMNS)
    if points.n_dropped:
        log.warning("%s", points.summary())
    labels = points.labels
    assert labels is not None
    try:
        numeric = np.array([_label_value(v) for v in labels], dtype=float)
    except ValueError as exc:
        raise TaxamapError(f"label column of {path} holds {exc}; it must be 1 (presence) or 0 "
                           "(absence/background)") from None
    return points.latlon[numeric == 1], points.latlon[numeric == 0]


def _label_value(value: Any) -> float:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes", "presence", "present"):
        return 1.0
    if text in ("0", "0.0", "false", "no", "absence", "absent", "background"):
        return 0.0
    raise ValueError(repr(value))


def load_points(
    path: str | os.PathLike, label_column: str | Sequence[str] | None = None
) -> Points:
    """Read the points of ``path`` with their counts (see :class:`Points`).

    ``label_column``: a column name, or candidate names (the first present is used), whose values
    are returned as ``Points.labels``; TaxamapError when none is present.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TaxamapError(f"occurrence file {path} not found; check the path")
    wanted = [label_column] if isinstance(label_column, str) else list(label_column or [])
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return _read_text(path, _open_text(path), wanted, label_column is not None)
    if name.endswith(".zip"):
        text_member = _zip_text_member(path)
        if text_member is not None:
            return _read_text(path, text_member, wanted, label_column is not None)
    return _read_vector(path, wanted, label_column is not None)


# --- delimited text ---------------------------------------------------------------------------

def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.name.lower().endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise TaxamapError(f"cannot read occurrence file {path}: {exc.strerror or exc}") from None


def _zip_text_member(path: Path) -> io.TextIOBase | None:
    """The largest CSV/TXT file in a zip (GBIF's downloads), or None when it holds none."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise TaxamapError(f"cannot read occurrence file {path}: {exc}") from None
    infos = archive.infolist()
    if any(i.filename.lower().endswith(".shp") for i in infos):
        return None
    texts = [i for i in infos if i.filename.lower().endswith((".csv", ".tsv", ".txt"))
             and not i.filename.lower().endswith(("citations.txt", "rights.txt"))]
    if not texts:
        return None
    member = max(texts, key=lambda i: i.file_size)
    return io.TextIOWrapper(archive.open(member), encoding="utf-8-sig", newline="")


def sniff_delimiter(header: str) -> str:
    """The delimiter of a header line: whichever of tab, comma, semicolon, pipe occurs most."""
    counts = {d: header.count(d) for d in ("\t", ",", ";", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _coordinate_columns(header: list[str]) -> tuple[int, int] | None:
    lowered = [h.strip().strip('"').lower() for h in header]
    for lat_name, lon_name in COORDINATE_COLUMNS:
        if lat_name in lowered and lon_name in lowered:
            return lowered.index(lat_name), lowered.index(lon_name)
    return None


def _label_index(header: list[str], wanted: list[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in wanted:
        if name.lower() in lowered:
            return lowered.index(name.lower())
    return None


def _parse_float(text: str) -> float:
    text = text.strip()
    if text.lower() in _EMPTY:
        return math.nan
    try:
        return float(text)
    except ValueError:
        # Decimal commas ("45,2") appear in European exports with ';' delimiters.
        try:
            return float(text.replace(",", "."))
        except ValueError:
            return math.nan


def _read_text(path: Path, handle: io.TextIOBase, wanted: list[str], need_label: bool) -> Points:
    with handle:
        try:
            header_line = handle.readline()
        except (OSError, UnicodeDecodeError, EOFError, zipfile.BadZipFile) as exc:
            raise TaxamapError(f"cannot read occurrence file {path}: {exc}; give a UTF-8 CSV "
                               "or TSV file") from None
        if not header_line.strip():
            raise TaxamapError(f"occurrence file {path} is empty; it needs a header row with "
                               f"{ACCEPTED_COLUMNS_TEXT}")
        delimiter = sniff_delimiter(header_line)
        header = next(csv.reader([header_line], delimiter=delimiter))
        columns = _coordinate_columns(header)
        if columns is None:
            shown = ", ".join(h.strip() for h in header[:12])
            shown += ", ..." if len(header) > 12 else ""
            raise TaxamapError(f"occurrence file {path} has no coordinate columns (found: "
                               f"{shown}); name them {ACCEPTED_COLUMNS_TEXT}")
        label_at = _label_index(header, wanted) if need_label else None
        if need_label and label_at is None:
            raise TaxamapError(f"occurrence file {path} has no {' or '.join(wanted)} column; "
                               "add one with 1 for presence and 0 for background")
        lat_at, lon_at = columns
        lats: list[float] = []
        lons: list[float] = []
        labels: list[str] = []
        # GBIF text has unescaped quotes inside fields: quoting is off for tab-separated files.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        try:
            for row in csv.reader(handle, delimiter=delimiter, quoting=quoting):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                lat = _parse_float(row[lat_at]) if lat_at < len(row) else math.nan
                lon = _parse_float(row[lon_at]) if lon_at < len(row) else math.nan
                lats.append(lat)
                lons.append(lon)
                if label_at is not None:
                    labels.append(row[label_at] if label_at < len(row) else "")
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            raise TaxamapError(f"cannot read occurrence file {path}: {exc}") from None
    latlon = np.column_stack([np.asarray(lats, dtype=float), np.asarray(lons, dtype=float)])
    return _finish(path, latlon.reshape(-1, 2), np.asarray(labels, dtype=object)
                   if label_at is not None else None)


def _finish(path: Path, latlon: np.ndarray, labels: np.ndarray | None,
            n_invalid_extra: int = 0) -> Points:
    n_rows = len(latlon) + n_invalid_extra
    missing = ~np.isfinite(latlon).all(axis=1)
    invalid = ~missing & ((np.abs(latlon[:, 0]) > 90) | (np.abs(latlon[:, 1]) > 180))
    keep = ~(missing | invalid)
    return Points(
        latlon=np.ascontiguousarray(latlon[keep], dtype=np.float64),
        n_rows=n_rows,
        n_missing=int(missing.sum()),
        n_invalid=int(invalid.sum()) + n_invalid_extra,
        labels=None if labels is None else labels[keep],
        source=str(path),
    )


# --- vector files ------------------------------------------------------------------------------

def _read_vector(path: Path, wanted: list[str], need_label: bool) -> Points:
    import pyogrio
    import shapely

    try:
        info = pyogrio.read_info(path)
    except Exception as exc:  # pyogrio raises several GDAL-derived types; all mean "unreadable"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaxamapError(f"cannot read occurrence file {path}: {detail}; give a CSV with "
                           f"{ACCEPTED_COLUMNS_TEXT}, or a GeoPackage/Shapefile/GeoJSON of "
                           "points") from None
    fields = [str(f) for f in info.get("fields", [])]
    label_field = None
    if need_label:
        lowered = {f.lower(): f for f in fields}
        label_field = next((lowered[w.lower()] for w in wanted if w.lower() in lowered), None)
        if label_field is None:
            raise TaxamapError(f"occurrence file {path} has no {' or '.join(wanted)} field; add "
                               "one with 1 for presence and 0 for background")
    try:
        meta, _, wkb, field_data = pyogrio.raw.read(
            path, read_geometry=True, columns=[label_field] if label_field else []
        )
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaxamapError(f"cannot read occurrence file {path}: {detail}") from None
    if wkb is None:
        raise TaxamapError(f"occurrence file {path} has no point geometries; give points, or a "
                           f"CSV with {ACCEPTED_COLUMNS_TEXT}")
    present = np.array([g is not None for g in wkb], dtype=bool)
    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object)[present])
    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds - {0, 4}:  # 0 = Point, 4 = MultiPoint
        raise TaxamapError(f"occurrence file {path} holds lines or polygons; give point "
                           "features (one per occurrence)")
    parts, owner = shapely.get_parts(geoms, return_index=True)
    xy = shapely.get_coordinates(parts)
    if len(xy) != len(parts):  # empty points have no coordinates
        xy = np.array([shapely.get_coordinates(p)[0] if not shapely.is_empty(p)
                       else (math.nan, math.nan) for p in parts], dtype=float).reshape(-1, 2)
    labels = None
    if label_field is not None:
        labels = np.asarray(field_data[0], dtype=object)[present][owner]
    lonlat = _to_lonlat(xy, meta.get("crs"), path)
    latlon = lonlat[:, ::-1].copy()
    n_null = int((~present).sum())
    if n_null:
        # Features without geometry count as rows without coordinates.
        latlon = np.vstack([latlon, np.full((n_null, 2), np.nan)])
        if labels is not None:
            labels = np.concatenate([labels, np.full(n_null, "", dtype=object)])
    return _finish(path, latlon, labels)


def _to_lonlat(xy: np.ndarray, crs: Any, path: Path) -> np.ndarray:
    if crs is None:
        finite = xy[np.isfinite(xy).all(axis=1)]
        if len(finite) and (np.abs(finite[:, 0]).max() > 360 or np.abs(finite[:, 1]).max() > 90):
            raise TaxamapError(f"occurrence file {path} has no CRS and its coordinates are not "
                               "longitude/latitude; save it with a CRS")
        return xy
    as_crs(crs, f"occurrence file {path}")
    return np.column_stack(to_lonlat(xy[:, 0], xy[:, 1], crs))


# --- GBIF download -----------------------------------------------------------------------------

#: GBIF's occurrence search returns at most 300 records per page ...
GBIF_PAGE_SIZE = 300
#: ... and pages only through the first 100 000 records of a query (offset + limit).
GBIF_MAX_RECORDS = 100_000
#: Default number of records fetched.
DEFAULT_LIMIT = 5000
#: Longest geometry WKT sent (GBIF rejects very long URLs); longer outlines are simplified.
MAX_WKT_CHARS = 1500

#: Columns of the CSV written by :func:`download_occurrences`, in order.
CSV_COLUMNS = (
    "decimalLatitude", "decimalLongitude", "gbifID", "species", "scientificName", "eventDate",
    "year", "basisOfRecord", "coordinateUncertaintyInMeters", "countryCode", "datasetKey",
    "license", "occurrenceID",
)


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_occurrences` wrote.

    ``count``: records GBIF holds for the query; ``n_records``: records written (at most the
    limit); ``from_cache``: the file was copied from an earlier identical download.
    """

    path: Path
    n_records: int
    count: int
    taxon_key: int
    scientific_name: str
    from_cache: bool = False

    @property
    def truncated(self) -> bool:
        return self.count > self.n_records


def default_cache_dir() -> Path:
    """``$TAXAMAP_CACHE/occurrences``, else ``<user cache dir>/taxamap/occurrences``."""
    from taxamap.paths import cache_subdir

    return cache_subdir("occurrences")


def default_client():
    """A GBIF client with longer read timeouts than taxonomy lookups (pages of 300 records)."""
    from taxamap.taxonomy import TaxonomyClient

    return TaxonomyClient(timeout=(5.0, 60.0), retries=4, backoff=1.0, max_wait=30.0)


def download_occurrences(
    species: str,
    bbox_or_geometry: Any,
    out: str | os.PathLike | None,
    limit: int = DEFAULT_LIMIT,
    client: Any = None,
    *,
    offline: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    delay: float = 0.2,
    refresh: bool = False,
) -> DownloadResult:
    """Download up to ``limit`` GBIF occurrences of ``species`` inside a region, as CSV at ``out``.

    ``bbox_or_geometry``: (west, south, east, north) degrees, a "W,S,E,N" string, a shapely
    geometry or a WKT string (EPSG:4326; longitudes beyond +/-180 are wrapped, e.g. regions
    across the antimeridian). Only records with coordinates and without geospatial issues are
    fetched, ``limit`` at most :data:`GBIF_MAX_RECORDS`. ``client`` is the HTTP boundary
    (default :func:`default_client`); it needs ``gbif(path, params) -> JSON``. ``delay`` seconds
    pass between pages. Identical requests are answered from ``cache_dir`` (default
    :func:`default_cache_dir`) unless ``refresh``. Offline (``offline=True``,
    ``TAXAMAP_OFFLINE=1``) or when GBIF cannot be reached, a one-line TaxamapError.
    """
    from taxamap.taxonomy import (TaxonomyServiceError, normalize_binomial, offline_requested,
                                  offline_variables)

    limit = int(limit)
    if not 1 <= limit <= GBIF_MAX_RECORDS:
        raise TaxamapError(f"{option('limit', limit)} is out of range; GBIF's search API pages "
                           f"through at most {GBIF_MAX_RECORDS} records (use "
                           f"1..{GBIF_MAX_RECORDS}, or a GBIF download from gbif.org for more)")
    name = normalize_binomial(species) if len(species.split()) == 2 else " ".join(species.split())
    if not name:
        raise TaxamapError(f"give a species name, e.g. {option('species', 'Ariolimax buttoni')}")
    spatial = _spatial_params(bbox_or_geometry)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(json.dumps({"species": name.lower(), "spatial": spatial,
                                     "limit": limit}, sort_keys=True).encode()).hexdigest()[:24]
    cached_csv = cache_root / f"{key}.csv"
    cached_meta = cache_root / f"{key}.json"
    # Without ``out`` the records stay in the cache only (taxamap.products.occurrences reads them there).
    out = Path(out).expanduser() if out is not None else cached_csv
    if not refresh and cached_csv.is_file() and cached_meta.is_file():
        try:
            meta = json.loads(cached_meta.read_text())
            if out != cached_csv:
                _copy_atomic(cached_csv, out)
            return DownloadResult(out, int(meta["n_records"]), int(meta["count"]),
                                  int(meta["taxon_key"]), str(meta["scientific_name"]), True)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable occurrence cache entry %s (%s)", cached_meta, exc)

    if offline is None:
        offline = offline_requested()
    if offline:
        names = offline_variables()
        why = (f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} set, and taxamap "
               "then sends no request" if names else "offline was asked for")
        fix = f"unset {' and '.join(names)}" if names else "run it"
        raise TaxamapError(f"cannot download GBIF occurrences of {name}: offline ({why}); "
                           f"{fix} on a connected machine, or give your own "
                           f"{option('occurrences', metavar='FILE')}")
    client = client if client is not None else default_client()
    try:
        taxon_key, scientific = _match_species(client, name)
        records, count = _fetch_pages(client, taxon_key, spatial, limit, delay)
    except TaxonomyServiceError as exc:
        raise TaxamapError(f"cannot download GBIF occurrences of {name}: GBIF could not be "
                           f"reached ({exc}); check the connection or try again later") from None
    except (LookupError, TypeError, ValueError, AttributeError) as exc:
        raise TaxamapError(f"cannot download GBIF occurrences of {name}: unexpected answer from "
                           f"GBIF ({exc.__class__.__name__}: {exc})") from None

    if out == cached_csv:
        cache_root.mkdir(parents=True, exist_ok=True)
    _write_csv(records, out)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        if out != cached_csv:
            _copy_atomic(out, cached_csv)
        _write_text_atomic(cached_meta, json.dumps({
            "species": name, "taxon_key": taxon_key, "scientific_name": scientific,
            "spatial": spatial, "limit": limit, "count": count, "n_records": len(records),
            "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=1))
    except (OSError, DiskFull) as exc:
        log.warning("could not cache GBIF occurrences in %s (%s)", cache_root, exc)
    return DownloadResult(out, len(records), count, taxon_key, scientific, False)


def _match_species(client, name: str) -> tuple[int, str]:
    answer = client.gbif("species/match", {"name": name, "verbose": "false"})
    match_type = str(answer.get("matchType", "NONE")).upper()
    rank = str(answer.get("rank", "")).upper()
    if match_type == "NONE" or "usageKey" not in answer:
        raise TaxamapError(f"GBIF does not know the species {name!r}; check the spelling")
    if match_type == "HIGHERRANK" or rank not in ("SPECIES", "SUBSPECIES", "VARIETY", "FORM"):
        raise TaxamapError(f"GBIF matched {name!r} only to the {rank.lower() or 'higher'} "
                           f"{answer.get('scientificName', '?')}; check the species name")
    # Occurrences are indexed under accepted names: follow a synonym to its accepted taxon.
    key = answer.get("acceptedUsageKey") or answer["usageKey"]
    return int(key), str(answer.get("species") or answer.get("scientificName") or name)


def _fetch_pages(client, taxon_key: int, spatial: dict, limit: int,
                 delay: float) -> tuple[list[dict], int]:
    records: list[dict] = []
    seen: set[str] = set()
    offset = 0
    count = 0
    while len(records) < limit:
        page_size = min(GBIF_PAGE_SIZE, limit - len(records))
        params = {"taxonKey": taxon_key, "hasCoordinate": "true", "hasGeospatialIssue": "false",
                  "offset": offset, "limit": page_size, **spatial}
        page = client.gbif("occurrence/search", params)
        results = page.get("results") or []
        count = int(page.get("count", count) or 0)
        for rec in results:
            row = _record_row(rec)
            if row is None or row["gbifID"] in seen:
                continue  # pages can shift while GBIF indexes; never write a record twice
            seen.add(row["gbifID"])
            records.append(row)
            if len(records) >= limit:
                break
        offset += len(results)
        if page.get("endOfRecords", True) or not results or offset >= GBIF_MAX_RECORDS:
            break
        if delay > 0:
            time.sleep(delay)  # be polite to a free public service
    return records, max(count, len(records))


def _record_row(rec: dict) -> dict | None:
    lat, lon = rec.get("decimalLatitude"), rec.get("decimalLongitude")
    if lat is None or lon is None:
        return None
    row = {c: rec.get(c) for c in CSV_COLUMNS}
    row["gbifID"] = str(rec.get("gbifID") or rec.get("key") or "")
    row["decimalLatitude"], row["decimalLongitude"] = float(lat), float(lon)
    return {k: "" if v is None else v for k, v in row.items()}


def _spatial_params(where: Any) -> dict[str, str]:
    """GBIF query parameters restricting the search to ``where``."""
    import shapely

    if isinstance(where, str) and not where.strip().upper().startswith(
            ("POLYGON", "MULTIPOLYGON")):
        try:
            where = tuple(float(v) for v in where.split(","))
        except ValueError:
            raise TaxamapError(f"region {where!r} is neither W,S,E,N nor WKT") from None
    if isinstance(where, (tuple, list)) and len(where) == 4:
        west, south, east, north = (float(v) for v in where)
        if not (-90 <= south < north <= 90):
            raise TaxamapError(f"bbox {where} needs -90 <= south < north <= 90")
        if west < east and -180 <= west and east <= 180:
            return {"decimalLatitude": f"{south:g},{north:g}",
                    "decimalLongitude": f"{west:g},{east:g}"}
        if west > east:  # crosses the antimeridian
            east += 360.0
        where = shapely.box(west, south, east, north)
    if isinstance(where, str):
        try:
            where = shapely.from_wkt(where)
        except Exception:
            raise TaxamapError("region WKT cannot be parsed; give a POLYGON or MULTIPOLYGON") \
                from None
    if not isinstance(where, shapely.Geometry) or where.is_empty:
        raise TaxamapError("give the region as (west, south, east, north) or a polygon")
    return {"geometry": geometry_wkt(where)}


def geometry_wkt(geom) -> str:
    """Polygon WKT GBIF accepts: lon in [-180, 180], counter-clockwise shells, short enough."""
    import shapely
    import shapely.affinity
    from shapely.geometry.polygon import orient

    geom = shapely.make_valid(geom)
    pieces = []
    for shift in (-360.0, 0.0, 360.0):
        moved = shapely.affinity.translate(geom, xoff=shift) if shift else geom
        part = moved.intersection(shapely.box(-180, -90, 180, 90))
        if not part.is_empty:
            pieces.append(part)
    geom = shapely.union_all(pieces)
    polygons = [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and p.area > 0]
    if not polygons:
        raise TaxamapError("the region has no area; give a polygon or a bounding box")
    size = max(geom.bounds[2] - geom.bounds[0], geom.bounds[3] - geom.bounds[1])
    tolerance = size / 1000.0
    while True:
        shapes = [orient(p, sign=1.0) for p in polygons]
        multi = shapely.MultiPolygon(shapes) if len(shapes) > 1 else shapes[0]
        text = shapely.to_wkt(multi, rounding_precision=4, trim=True)
        if len(text) <= MAX_WKT_CHARS:
            return text
        if tolerance > size:
            # Still too long: the bounding box of each part, then of the whole.
            boxes = shapely.union_all([shapely.box(*p.bounds) for p in polygons])
            polygons = [p for p in shapely.get_parts(boxes)]
            if len(polygons) > 20:
                polygons = [shapely.box(*geom.bounds)]
            shapes = [orient(p, sign=1.0) for p in polygons]
            multi = shapely.MultiPolygon(shapes) if len(shapes) > 1 else shapes[0]
            return shapely.to_wkt(multi, rounding_precision=4, trim=True)
        # Outward buffer first so simplification never drops occurrences at the edge.
        polygons = [p for p in shapely.get_parts(
            shapely.union_all([p.buffer(tolerance).simplify(tolerance) for p in polygons]))
            if p.geom_type == "Polygon"]
        tolerance *= 2


# --- atomic writes -----------------------------------------------------------------------------

def _write_csv(records: Iterable[dict], out: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    _write_text_atomic(out, text.getvalue())


def _write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text, hint="free some space or choose another --out")
    except DiskFull:
        raise
    except OSError as exc:
        raise TaxamapError(f"cannot write {path}: {exc.strerror or exc}; choose another --out") \
            from None


def _copy_atomic(src: Path, dst: Path) -> None:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, need=Path(src).stat().st_size) as tmp:
        shutil.copyfile(src, tmp)
