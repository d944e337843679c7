"""A WMS 1.1.1 GetMap server on 127.0.0.1 for tests and benchmarks (no network beyond loopback).

    with WMSServer(latency=0.05) as server:
        source = WMSSource(server.url, ...)
        ...
        assert server.errors == [] and len(server.bboxes) == 3

Every request is checked against the iSatNat training request (TAXABIND.md): ``service=WMS``,
``version=1.1.1``, ``request=GetMap``, ``layers=s2cloudless-2020``, ``styles=`` (empty),
``width``/``height`` (``size``; the width may be smaller for one half of an antimeridian box),
``srs=EPSG:4326``, ``bbox=W,S,E,N`` within [-180, 180] x [-90, 90] with W < E and S < N,
``format=image/png``, and no other parameter. A request that deviates gets a ServiceException
(HTTP 200, XML, as MapServer answers) and is listed in :attr:`WMSServer.errors`.

Images are PNGs: red = pixel column, green = pixel row (each mod 256), blue = 100 when the box's
centre longitude is >= 0 and 200 when it is < 0, so a patch joined from the two halves of an
antimeridian box shows which columns came from which request. ``content="constant"`` serves one
pre-encoded image (:func:`texture`, ~120 KB like a real one) for every request (fast: for
benchmarks).

Faults: ``faults`` maps a point ``(lat, lon)`` to a kind (every request whose bbox contains it) or
a list of kinds used one per request, then normal answers. Kinds: ``"500"``/``"503"``/``"404"``
that status; ``"429"`` with ``Retry-After: <retry_after>``; ``"truncated"`` half a body then a
closed connection; ``"garbage"`` 200 with non-image bytes; ``"blank"`` a one-colour PNG;
``"transparent"`` a fully transparent PNG; ``"exception"`` a ServiceException; ``"wrongsize"``
a PNG of another size; ``"stall"`` sleep ``stall`` seconds first; ``"ok"`` a normal answer.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from PIL import Image

EXPECTED = {"service": "WMS", "version": "1.1.1", "request": "GetMap", "layers": "s2cloudless-2020",
            "styles": "", "srs": "EPSG:4326", "format": "image/png"}
ORDER = ["service", "version", "request", "layers", "styles", "width", "height", "srs", "bbox", "format"]

EXCEPTION_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ServiceExceptionReport version="1.1.1">'
                 b'<ServiceException code="{code}">{text}</ServiceException></ServiceExceptionReport>')


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def patch_pixels(width: int, height: int, east_of_antimeridian: bool) -> np.ndarray:
    """The (height, width, 3) content the server renders for a box."""
    red = np.broadcast_to(np.arange(width)[None, :] % 256, (height, width))
    green = np.broadcast_to(np.arange(height)[:, None] % 256, (height, width))
    blue = np.full((height, width), 200 if east_of_antimeridian else 100)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def texture(size: int) -> np.ndarray:
    """A smooth colour texture with fine noise: its PNG is ~120 KB at 256 px, like s2cloudless's."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(40, 200, (size // 8, size // 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC)).astype(int)
    return np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255).astype(np.uint8)


class WMSServer:
    """Threaded loopback WMS; a context manager that starts and stops it."""

    def __init__(self, latency: float = 0.0, faults: dict | None = None, *, size: int = 256,
                 layer: str = "s2cloudless-2020", retry_after: float | int = 1, stall: float = 5.0,
                 content: str = "coords"):
        self.latency = latency
        self.faults = {tuple(k): (list(v) if isinstance(v, (list, tuple)) else v)
                       for k, v in (faults or {}).items()}
        self.size = size
        self.expected = dict(EXPECTED, layers=layer)
        self.retry_after = retry_after
        self.stall = stall
        self.content = content
        self._constant = png(texture(size))
        self._lock = threading.Lock()
        self.requests = 0
        self.bboxes: list[tuple[float, float, float, float]] = []
        self.widths: list[int] = []
        self.errors: list[str] = []
        self.user_agents: set[str] = set()
        self.faults_served: Counter = Counter()
        self.concurrent = 0
        self.max_concurrent = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "WMSServer":
        handler = type("Handler", (_Handler,), {"wms": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "WMSServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/wms"

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = 0
            self.bboxes.clear()
            self.widths.clear()
            self.faults_served.clear()
            self.max_concurrent = 0

    def check(self, query: str) -> tuple[str | None, tuple | None, int]:
        """(error or None, bbox, width) of a GetMap query string, checked parameter by parameter."""
        pairs = parse_qsl(query, keep_blank_values=True)
        names = [k for k, _ in pairs]
        if names != ORDER:
            return f"parameters {names} are not {ORDER}", None, 0
        params = dict(pairs)
        for key, want in self.expected.items():
            if params[key] != want:
                return f"{key}={params[key]!r}, expected {want!r}", None, 0
        try:
            width, height = int(params["width"]), int(params["height"])
            bbox = tuple(float(v) for v in params["bbox"].split(","))
        except ValueError:
            return f"bad numbers in {query!r}", None, 0
        if height != self.size or not 1 <= width <= self.size:
            return f"size {width}x{height}, expected {self.size}x{self.size}", None, 0
        if len(bbox) != 4:
            return f"bbox {params['bbox']!r} needs 4 numbers", None, 0
        w, s, e, n = bbox
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            return f"bbox {bbox} is not W<E within +-180, S<N within +-90", None, 0
        return None, bbox, width

    def _fault_for(self, bbox) -> str:
        w, s, e, n = bbox
        with self._lock:
            for (lat, lon), plan in self.faults.items():
                if s <= lat <= n and w <= lon <= e:
                    if isinstance(plan, list):
                        return plan.pop(0) if plan else "ok"
                    return plan
        return "ok"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wms: WMSServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.wms
        parts = urlsplit(self.path)
        with server._lock:
            server.requests += 1
            server.user_agents.add(self.headers.get("User-Agent", ""))
            server.concurrent += 1
            server.max_concurrent = max(server.max_concurrent, server.concurrent)
        fault = "ok"
        try:
            if server.latency:
                time.sleep(server.latency)
            if parts.path != "/wms":
                self._send(404, b"no such path", "text/plain")
                return
            error, bbox, width = server.check(parts.query)
            if error is not None:
                with server._lock:
                    server.errors.append(error)
                body = EXCEPTION_XML.replace(b"{code}", b"InvalidParameterValue").replace(
                    b"{text}", error.encode())
                self._send(200, body, "application/vnd.ogc.se_xml")
                return
            with server._lock:
                server.bboxes.append(bbox)
                server.widths.append(width)
            fault = server._fault_for(bbox)
            east = (bbox[0] + bbox[2]) / 2 < 0
            if fault == "ok" or fault == "stall":
                if fault == "stall":
                    time.sleep(server.stall)
                body = server._constant if server.content == "constant" else \
                    png(patch_pixels(width, server.size, east))
                self._send(200, body)
            elif fault in ("404", "500", "503"):
                self._send(int(fault), b"fault", "text/plain")
            elif fault == "429":
                self._send(429, b"slow down", "text/plain", {"Retry-After": str(server.retry_after)})
            elif fault == "garbage":
                self._send(200, b"<html>not an image</html>", "image/png")
            elif fault == "blank":
                self._send(200, png(np.full((server.size, width, 3), 255, np.uint8)))
            elif fault == "transparent":
                rgba = np.zeros((server.size, width, 4), np.uint8)
                rgba[..., :3] = patch_pixels(width, server.size, east)
                self._send(200, png(rgba))
            elif fault == "wrongsize":
                self._send(200, png(patch_pixels(width // 2 + 1, server.size, east)))
            elif fault == "exception":
                body = EXCEPTION_XML.replace(b"{code}", b"LayerNotDefined").replace(
                    b"{text}", b"msWMSLoadGetMapParams(): WMS server error. Invalid layer(s) given")
                self._send(200, body, "application/vnd.ogc.se_xml")
            elif fault == "truncated":
                body = png(patch_pixels(width, server.size, east))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
            else:
                raise ValueError(f"unknown fault {fault!r}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with server._lock:
                server.concurrent -= 1
                if fault != "ok":
                    server.faults_served[fault] += 1
