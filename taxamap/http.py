"""The one way taxamap talks HTTP: a ``requests.Session`` with urllib3 retries and a circuit breaker.

Every client (XYZ tiles, WMS, the WorldClim downloader, iNaturalist/GBIF) gets its session from
:func:`make_session`:

* one ``HTTPAdapter`` whose pool holds ``workers`` connections and blocks instead of opening more;
* urllib3's :class:`~urllib3.util.Retry` for the transient failures only: statuses
  :data:`RETRY_STATUS` (429, 500, 502, 503, 504), timeouts, refused or dropped connections;
  exponential backoff with jitter, a server's ``Retry-After`` honoured (capped); other statuses
  (404, 403...) are answers and come back at once;
* (connect, read) timeouts applied to every request that does not give its own
  (``TAXAMAP_HTTP_TIMEOUT=C,R`` overrides the defaults, e.g. for tests);
* a descriptive ``User-Agent``.

A :class:`CircuitBreaker` given to the session sees every attempt. When the first requests of a
run all fail without an answer (timeouts, refused connections), or a long run of requests in a row
fails, it opens: the request in flight and every later one raise :class:`CircuitOpen`, one
:class:`~taxamap.errors.TaxamapError` naming the server, instead of waiting out timeouts and
retries for every tile of a grid. What was finished is kept (stores record whole blocks), so a
rerun resumes.

:func:`get_checked` adds the one retry urllib3 cannot do: a body that arrives broken (cut short,
or not what ``check`` accepts, e.g. an image that does not decode).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry

from taxamap.version import __version__
from taxamap.errors import TaxamapError

USER_AGENT = (f"taxamap/{__version__} (+https://github.com/taxamap; "
              "zero-shot species-distribution maps)")

#: Statuses worth retrying: the server is busy or briefly broken.
RETRY_STATUS = (429, 500, 502, 503, 504)

#: (connect, read) seconds. A tile or an API answer that has not started within 20 s is not
#: coming; with the breaker this bounds a run against a stalled server to about 2 x 20 s.
DEFAULT_TIMEOUT = (10.0, 20.0)

TIMEOUT_ENV = "TAXAMAP_HTTP_TIMEOUT"


def _not_a_retry_note(record: logging.LogRecord) -> bool:
    # urllib3 logs a WARNING per retry ("Retrying (Retry(total=3...)) after connection broken
    # by ..."): one line per tile of a flaky server. The sources count retries in their stats and
    # the breaker says in one line when a server is down, so these lines are only noise.
    return not str(record.msg).startswith("Retrying (")


logging.getLogger("urllib3.connectionpool").addFilter(_not_a_retry_note)


def default_timeout(fallback: float | tuple[float, float] = DEFAULT_TIMEOUT) -> tuple[float, float]:
    """``$TAXAMAP_HTTP_TIMEOUT`` ("S" or "CONNECT,READ" seconds) if set, else ``fallback``."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    value: Any = fallback
    if text:
        try:
            value = tuple(float(v) for v in text.split(","))
        except ValueError:
            value = ()
        if len(value) not in (1, 2) or min(value) <= 0:
            raise TaxamapError(f"{TIMEOUT_ENV}={text!r}: give seconds, e.g. 5 or 5,20")
    if isinstance(value, (int, float)):
        value = (value,)
    value = tuple(value) * 2 if len(value) == 1 else tuple(value)
    return float(value[0]), float(value[1])


def host_of(url: str) -> str:
    """``host:port`` of a URL, as messages name a server."""
    parts = urlsplit(url)
    return parts.netloc or url


class CircuitOpen(TaxamapError):
    """A server stopped answering (see :class:`CircuitBreaker`); ``host`` names it."""

    def __init__(self, message: str, host: str):
        super().__init__(message)
        self.host = host


class CircuitBreaker:
    """Stop a client sending requests to a server that does not answer.

    Opens when the first ``first`` attempts of a run all failed with no successful answer, or when
    ``consecutive`` attempts in a row failed (after earlier successes): then :meth:`check` raises
    :class:`CircuitOpen` for good. ``what`` names the things fetched ("satellite tiles") and
    ``hint`` says what to do; both go into the one-line message. ``settle``: before the first
    answer, a retry after a timeout first waits this long, so the attempts that started together
    (one per worker) report their timeouts before any of them tries again.
    Thread-safe; one breaker per client (per source object).
    """

    def __init__(self, what: str = "requests", *, first: int = 8, consecutive: int = 32,
                 hint: str = "", settle: float = 0.25):
        self.what = what
        self.first = int(first)
        self.consecutive = int(consecutive)
        self.hint = hint
        self.settle = float(settle)
        self.answered = 0  # attempts that got a usable answer
        self.failed = 0  # attempts that failed, in all
        self.in_row = 0  # attempts failed since the last answer
        self.no_answer_in_row = 0  # of those, how many got no HTTP answer at all
        self._last = ("", "")  # (host, reason) of the last failure
        self._error: CircuitOpen | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._error is not None

    @property
    def last_failure(self) -> tuple[str, str]:
        """(host, reason) of the last failed attempt; empty strings before any."""
        return self._last

    def success(self) -> None:
        """An attempt was answered (any status that is not a transient error)."""
        with self._lock:
            self.answered += 1
            self.in_row = self.no_answer_in_row = 0

    def failure(self, host: str, reason: str, *, answered: bool = False) -> None:
        """An attempt failed: ``answered`` when the server sent something (a 503, a broken body),
        False when nothing came (timeout, refused or dropped connection)."""
        with self._lock:
            self.failed += 1
            self.in_row += 1
            self.no_answer_in_row = 0 if answered else self.no_answer_in_row + 1
            self._last = (host, reason)
            if self._error is None and self.first > 0 and self.consecutive > 0 and (
                    (self.answered == 0 and self.in_row >= self.first)
                    or self.in_row >= self.consecutive):
                self._error = CircuitOpen(self._message(), host)

    def check(self) -> None:
        """Raise :class:`CircuitOpen` if the breaker has opened."""
        if self._error is not None:
            raise self._error

    def before_retry(self, no_answer: bool) -> None:
        """Called between attempts: the settle pause (see the class docstring), then :meth:`check`."""
        self.check()
        if no_answer and self.answered == 0 and self.settle > 0:
            time.sleep(self.settle)
            self.check()

    def _message(self) -> str:
        host, reason = self._last
        state = ("is not answering" if self.no_answer_in_row == self.in_row
                 else "keeps failing")
        if self.answered == 0:
            head = f"no {self.what} could be fetched: the server {host} {state} "
            count = f"(the first {self.in_row} requests all failed, last: {reason})"
        else:
            head = f"{self.what} stopped coming: the server {host} {state} "
            count = f"({self.in_row} requests in a row failed, last: {reason})"
        tail = f"; {self.hint}" if self.hint else ""
        return head + count + "; sending no more requests" + tail


def _describe_failure(response, error) -> str:
    if error is not None:
        if isinstance(error, NewConnectionError):  # refused, DNS (a ConnectTimeoutError subclass)
            return "could not connect (NewConnectionError)"
        if isinstance(error, (ReadTimeoutError, ConnectTimeoutError)):
            return f"timed out ({type(error).__name__})"
        return f"connection failed ({type(error).__name__})"
    status = getattr(response, "status", None)
    return f"HTTP {status}" if status else "no answer"


class _ReportingRetry(Retry):
    """urllib3's Retry that reports each failed attempt to a breaker and a retry counter."""

    def __init__(self, *args, breaker: CircuitBreaker | None = None,
                 on_retry: Callable[[], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.breaker = breaker
        self.on_retry = on_retry
        self._no_answer = False

    def new(self, **kwargs):
        nxt = super().new(**kwargs)
        nxt.breaker, nxt.on_retry = self.breaker, self.on_retry
        return nxt

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,
                  _stacktrace=None):
        # A 429 is a server asking to slow down (Retry-After), not a sign it is gone. The breaker
        # is only checked in sleep(): raising here would strand the response's pooled connection.
        if self.breaker is not None and getattr(response, "status", None) != 429:
            host = f"{_pool.host}:{_pool.port}" if _pool is not None else host_of(url or "")
            self.breaker.failure(host, _describe_failure(response, error),
                                 answered=response is not None)
        nxt = super().increment(method, url, response, error, _pool, _stacktrace)
        nxt._no_answer = response is None
        if self.on_retry is not None:
            self.on_retry()
        return nxt

    def sleep(self, response=None) -> None:
        if self.breaker is not None:
            self.breaker.before_retry(self._no_answer)
        super().sleep(response)
        if self.breaker is not None:
            self.breaker.check()  # another worker may have seen enough while this one slept


class _Session(requests.Session):
    """A Session whose requests get ``self.timeout`` unless they pass their own."""

    timeout: tuple[float, float] = DEFAULT_TIMEOUT

    def request(self, method, url, *args, **kwargs):  # noqa: D102 (requests' signature)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().request(method, url, *args, **kwargs)


def make_session(
    *,
    workers: int = 8,
    retries: int = 4,
    connect_retries: int | None = None,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    max_retry_after: float = 60.0,
    timeout: float | tuple[float, float] | None = None,
    user_agent: str = USER_AGENT,
    breaker: CircuitBreaker | None = None,
    on_retry: Callable[[], None] | None = None,
    headers: dict | None = None,
) -> requests.Session:
    """A Session for one client (see the module docstring).

    ``retries`` repeats after the first attempt (``connect_retries`` for connection failures,
    default the same); backoff ``backoff * 2**(n-1)`` plus up to ``backoff`` of jitter, at most
    ``max_backoff``; ``Retry-After`` capped at ``max_retry_after``. ``timeout`` defaults to
    :func:`default_timeout`. ``on_retry`` is called once per repeated attempt (statistics).
    """
    retry = _ReportingRetry(
        total=int(retries),
        connect=int(retries if connect_retries is None else connect_retries),
        read=int(retries),
        status=int(retries),
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "HEAD"}),
        backoff_factor=float(backoff),
        backoff_jitter=float(backoff),
        backoff_max=float(max_backoff),
        retry_after_max=float(max_retry_after),
        respect_retry_after_header=True,
        raise_on_status=False,  # the caller sees the last answer (e.g. 503) and says so
        raise_on_redirect=False,
        breaker=breaker,
        on_retry=on_retry,
    )
    session = _Session()
    session.timeout = default_timeout(DEFAULT_TIMEOUT if timeout is None else timeout)
    # One pooled connection per worker; block instead of opening extras beyond the bound.
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, int(workers)), pool_block=True,
                          max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent
    session.headers.update(headers or {})
    return session


def backoff_delay(attempt: int, base: float, cap: float = 30.0) -> float:
    """Seconds to wait before repeat ``attempt`` (0-based): full jitter over ``base * 2**attempt``."""
    return random.uniform(0.0, min(cap, base * (2 ** attempt))) if base > 0 else 0.0


def transport_gave_up(exc: BaseException) -> bool:
    """True when a requests error is urllib3's Retry giving up (every attempt already failed and
    was reported), as opposed to a body that broke while it was being read."""
    if isinstance(exc, (requests.exceptions.RetryError, requests.exceptions.ConnectTimeout)):
        return True
    return bool(exc.args) and isinstance(exc.args[0], MaxRetryError)


@dataclass
class Answer:
    """What :func:`get_checked` got: ``status`` None when no answer came; ``value`` is
    ``check(body)`` for a 200; ``error`` says why it failed ('' when it did not)."""

    status: int | None
    body: bytes = b""
    value: Any = None
    error: str = ""
    headers: Any = None

    @property
    def failed(self) -> bool:
        """Still failing after retries (a rerun may succeed), as opposed to an answer."""
        return bool(self.error)


def get_checked(
    session: requests.Session,
    url: str,
    *,
    check: Callable[[bytes], Any] | None = None,
    retries: int = 4,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    breaker: CircuitBreaker | None = None,
    on_retry: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Answer:
    """GET ``url``: transient statuses, timeouts and connection errors are retried by the
    session's urllib3 Retry; a 200 whose body breaks while read or fails ``check`` (which raises
    ``OSError``/``ValueError``/``SyntaxError``) is fetched again, up to ``retries`` times.

    Answers that are not transient (200, 404, 403...) come back with ``error=''`` except a bad
    200. Raises :class:`CircuitOpen` once ``breaker`` has opened (before sending anything).
    """
    host = host_of(url)
    error = ""
    for attempt in range(int(retries) + 1):
        if breaker is not None:
            breaker.check()
        if attempt:
            if on_retry is not None:
                on_retry()
            time.sleep(backoff_delay(attempt - 1, backoff, max_backoff))
            if breaker is not None:
                breaker.check()
        try:
            resp = session.get(url, **kwargs)
        except requests.RequestException as exc:
            error = f"{type(exc).__name__} for {url}"
            if transport_gave_up(exc):
                return Answer(None, error=error)  # every attempt was retried and reported
            if breaker is not None:  # the body broke off while it was read
                breaker.failure(host, type(exc).__name__, answered=True)
            continue
        status = resp.status_code
        if status in RETRY_STATUS:  # urllib3 retried it already (and told the breaker)
            return Answer(status, error=f"HTTP {status} for {url}", headers=resp.headers)
        body = resp.content
        if status == 200 and check is not None:
            try:
                value = check(body)
            except (OSError, ValueError, SyntaxError) as exc:
                error = f"undecodable body ({len(body)} bytes): {exc} for {url}"
                if breaker is not None:
                    breaker.failure(host, "undecodable body", answered=True)
                continue
        else:
            value = None
        if breaker is not None:
            if status < 400 or status in (404, 410):
                breaker.success()
            else:  # a 403 or 401 for every request is a wrong URL or key: also worth stopping
                breaker.failure(host, f"HTTP {status}", answered=True)
        return Answer(status, body, value, headers=resp.headers)
    return Answer(None, error=error)
