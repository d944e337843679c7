"""The interface every satellite source implements, and the pieces the sources share.

A source turns cell centres into RGB patches for the satellite encoder:

* ``fetch_status(latlon) -> (patches, failed)``: one patch per (lat, lon) row, ``None`` where the
  patch could not be had; ``failed[i]`` is True when patch i is missing for a reason a rerun may
  fix (a request still failing after retries, a file that could not be read), False when it is
  present or absent for good (404, outside the imagery, no clear observation). The engine stores
  a block holding failed cells as unfinished, so the same command retries exactly those blocks.
  A missing patch stays missing (NaN downstream): sources never return zero-filled images.
* ``fetch(latlon) -> list``: the patches alone (``fetch_status(latlon)[0]``).
* ``describe() -> dict``: JSON-able settings that identify the imagery (a store key; provenance).
* ``attribution`` / ``license``: what outputs made from this imagery must carry (or ``None``).
* ``stats``: a :class:`SourceStats` (requests, cache hits, failures, retries, ...).
* ``close()``: release connections and threads (sources are also context managers).

Concrete sources import this module (and :mod:`taxamap.http`), never the factory in
:mod:`taxamap.sources.satellite`, so the imports run one way.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np

from taxamap.errors import TaxamapError

#: Default parallel requests. Eight keeps a public tile server's per-client limits happy (most ask
#: for "a few" connections) while hiding ~50-100 ms of latency per tile.
DEFAULT_WORKERS = 8


@dataclass
class SourceStats:
    """Counters a source keeps across its ``fetch`` calls (thread-safe through :meth:`add`)."""

    requests: int = 0  # network requests sent, retries included
    cache_hits: int = 0  # tiles/patches answered from the on-disk cache (negative entries too)
    retries: int = 0  # requests repeated after a transient error
    failures: int = 0  # tiles/patches given up on (still failing after retries, permanent error)
    not_found: int = 0  # tiles/patches the server says do not exist (404) or with no data
    fetched: int = 0  # tiles/patches obtained from the network and validated
    cells: int = 0  # cells asked for
    cells_missing: int = 0  # cells answered with None
    cells_failed: int = 0  # of those, cells a rerun may get (their blocks stay unfinished)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Increment counters atomically: ``stats.add(requests=1, retries=1)``."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for summaries and logs)."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@runtime_checkable
class SatelliteSource(Protocol):
    """What the satellite encoder's driver needs from an imagery source."""

    attribution: str | None
    license: str | None
    stats: SourceStats

    def fetch_status(self, latlon: np.ndarray) -> tuple[list[Any], list[bool]]:
        """(patches, failed) per (lat, lon) row; see the module docstring."""
        ...

    def fetch(self, latlon: np.ndarray) -> list[Any]:
        """One RGB ``PIL.Image`` (``size`` x ``size``) per (lat, lon) row, ``None`` where missing."""
        ...

    def describe(self) -> dict:
        """JSON-able settings that identify the imagery (store key, provenance tags)."""
        ...

    def close(self) -> None:
        """Release network connections, open files and worker threads."""
        ...


def as_latlon(latlon) -> np.ndarray:
    """Check and convert cell centres to a float64 (N, 2) array of (lat, lon) degrees."""
    arr = np.asarray(latlon, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr.reshape(1, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise TaxamapError(f"satellite fetch needs an (N, 2) array of (lat, lon), got shape {arr.shape}")
    return arr


class PerCellSource:
    """Base of sources that make each cell's patch on its own (local rasters, Earth Engine).

    Subclasses call ``super().__init__(workers)`` and implement ``patch(lat, lon) -> (image or
    None, failed)``; this class gives them ``stats``, ``fetch_status``/``fetch`` over one thread
    pool (made on first use, shared by concurrent calls), ``close`` and the context manager.
    """

    _thread_name = "taxamap-source"

    def __init__(self, workers: int = DEFAULT_WORKERS):
        self.workers = max(1, int(workers))
        self.stats = SourceStats()
        self._executor: ThreadPoolExecutor | None = None
        # The engine calls fetch from several prepare threads at once: one pool, made once.
        self._executor_lock = threading.Lock()

    def patch(self, lat: float, lon: float) -> tuple[Any, bool]:
        """(RGB patch or None, failed) for one cell centre."""
        raise NotImplementedError

    def fetch_status(self, latlon) -> tuple[list, list[bool]]:
        """(patches, failed) for each (lat, lon) row (see :mod:`taxamap.sources.base`)."""
        latlon = as_latlon(latlon)
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self._thread_name)
            pool = self._executor
        results = list(pool.map(lambda row: self.patch(float(row[0]), float(row[1])), latlon))
        out = [img for img, _ in results]
        failed = [img is None and bool(bad) for img, bad in results]
        self.stats.add(cells=len(out), cells_missing=sum(p is None for p in out),
                       cells_failed=sum(failed))
        return out, failed

    def fetch(self, latlon) -> list:
        """One RGB patch per (lat, lon) row, ``None`` where missing."""
        return self.fetch_status(latlon)[0]

    def close(self) -> None:
        """Stop the worker threads (subclasses release their own resources too)."""
        with self._executor_lock:
            pool, self._executor = self._executor, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_patch_size(size: int, most: int = 4096, source: str = "") -> int:
    """``size`` as an int, or TaxamapError naming the option when it is outside 16..``most``."""
    from taxamap.surface import option

    if not 16 <= int(size) <= most:
        raise TaxamapError(f"{option('sat-size')} must be between 16 and {most} pixels{source}, "
                           f"got {size}")
    return int(size)


def explain_footprint(fp, lat: float, lon: float, source: dict) -> dict:
    """The start of every source's ``explain``: the footprint (or just the point where a cell has
    none) and the source's settings."""
    out = fp.to_dict() if fp is not None else {"lat": float(lat), "lon": float(lon)}
    out["source"] = source
    return out


class HTTPSource:
    """The plumbing the HTTP imagery sources (XYZ tiles, WMS) share: one session made on first
    use from the source's retry settings and circuit breaker (:func:`taxamap.http.
    make_session`), retries counted in ``stats``, and ``close`` / the context manager.

    Subclasses call :meth:`_configure` from ``__init__`` (after their own checks) and may then
    replace ``_lock`` (the tile source needs a re-entrant one).
    """

    def _configure(self, *, what: str, size: int, workers: int, retries: int, backoff: float,
                   max_backoff: float, max_retry_after: float, timeout, session, user_agent: str,
                   fail_fast_after: int, fail_after_in_row: int,
                   attribution: tuple[str | None, str | None]) -> None:
        """Check and keep the settings every HTTP imagery source has: patch ``size``, request
        ``workers`` and retry policy, ``timeout``, the circuit breaker over ``what`` (its name in
        messages), the session (None: one made on first use) and the (attribution, licence)."""
        from taxamap import http
        from taxamap.surface import option

        check_patch_size(size)
        if int(workers) < 1:
            raise TaxamapError(f"{option('workers')} must be at least 1, got {workers}")
        self.size = int(size)
        self.workers = int(workers)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.timeout = http.default_timeout(http.DEFAULT_TIMEOUT if timeout is None else timeout)
        self.attribution, self.license = attribution
        self.stats = SourceStats()
        self.breaker = http.CircuitBreaker(
            what, first=fail_fast_after, consecutive=fail_after_in_row,
            hint="check --sat-url and the network, or drop the satellite modality; blocks "
                 "already embedded are kept and the same command resumes")
        self._user_agent = user_agent
        self._session = session
        self._own_session = session is None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._fatal: Exception | None = None  # an error that ends the run (a full cache disk)

    def close(self) -> None:
        """Stop the worker threads and close the HTTP connections."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._session is not None and self._own_session:
            self._session.close()
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _http(self):
        from taxamap import http

        with self._lock:
            if self._session is None:
                self._session = http.make_session(
                    workers=self.workers, retries=self.retries, backoff=self.backoff,
                    max_backoff=self.max_backoff, max_retry_after=self.max_retry_after,
                    timeout=self.timeout, user_agent=self._user_agent, breaker=self.breaker,
                    on_retry=self._count_retry)
            return self._session

    def _count_retry(self) -> None:
        self.stats.add(requests=1, retries=1)
