"""A real HTTP tile server on 127.0.0.1 for tests and benchmarks (no network beyond loopback).

    with TileServer(latency=0.05, faults={"3/4/2": ["500", "ok"]}) as server:
        source = XYZTileSource(server.url_template, ...)
        ...
        assert server.requests == 4 and server.max_concurrent <= 8

Tiles are generated JPEGs (PNG with ``fmt="png"``) whose pixels depend on (z, x, y) and the
position inside the tile: red = column, green = row, blue = a per-tile constant. A mosaic that is
shifted, flipped or stitched from the wrong tile is therefore visible pixel by pixel. With
``content="coords"`` the blue byte is ``(x % 16) * 16 + y % 16`` instead, so every pixel of a
(lossless, PNG) tile names its own world pixel: :func:`world_pixel_of` decodes it.
:meth:`TileServer.tile_image` decodes the exact bytes the server sends, so tests can build the
expected patch from them.

Faults (``kind`` strings):
  ``"500"``/``"502"``/``"503"``  that status;   ``"404"``  not found;
  ``"429"``  too many requests with ``Retry-After: <retry_after>``;
  ``"truncated"``  200 with the full Content-Length but half the body, then the connection closes;
  ``"garbage"``  200 with bytes that are not an image;
  ``"stall"``  wait ``stall`` seconds before answering (longer than the client's timeout);
             a client that hangs up first is counted in ``abandoned`` (per tile) and not
             answered, so a test can tell the client's timeout ended the wait, not the server;
  ``"ok"``  a normal answer.
``faults`` maps a tile (``"z/x/y"`` or ``(z, x, y)``) to a kind (every request) or to a list of
kinds used one per request, then normal answers. ``fault_rate`` adds random faults (drawn from
``rate_faults``, seeded) to any request not covered by ``faults``.
"""

from __future__ import annotations

import io
import random
import re
import select
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

_PATH = re.compile(r"^/tiles/(\d+)/(\d+)/(\d+)\.(jpg|png)$")


def tile_pixels(z: int, x: int, y: int, tile_size: int = 256, content: str = "ramps") -> np.ndarray:
    """The (tile_size, tile_size, 3) uint8 content of tile (z, x, y) before encoding."""
    ramp = np.arange(tile_size, dtype=np.int64) * 255 // max(tile_size - 1, 1)
    red = np.broadcast_to(ramp[None, :], (tile_size, tile_size))  # varies along a row
    green = np.broadcast_to(ramp[:, None], (tile_size, tile_size))  # varies down a column
    code = (x % 16) * 16 + y % 16 if content == "coords" else (x * 53 + y * 97 + z * 31) % 200 + 40
    blue = np.full((tile_size, tile_size), code)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def world_pixel_of(rgb, near_x: float, near_y: float, tile_size: int = 256):
    """Decode ``content="coords"`` pixels (..., 3) back to world pixel centres (x, y) at their
    zoom; ``near_x``/``near_y`` (world pixels) pick the tile among those with the same code
    (x unwrapped around it). Pixels a tile seam blended are NaN: red or green near 0 or 255
    (the blue code blends across both kinds of seam)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    red, green, blue = rgb[..., 0], rgb[..., 1], np.rint(rgb[..., 2]).astype(np.int64)
    tx_code, ty_code = blue // 16, blue % 16
    base_x, base_y = near_x // tile_size, near_y // tile_size
    tx = base_x + ((tx_code - base_x + 8) % 16) - 8
    ty = base_y + ((ty_code - base_y + 8) % 16) - 8
    x = tx * tile_size + red + 0.5
    y = ty * tile_size + green + 0.5
    seam = 6
    blended = (red < seam) | (red > tile_size - 1 - seam) | (green < seam) | (green > tile_size - 1 - seam)
    return np.where(blended, np.nan, x), np.where(blended, np.nan, y)


class TileServer:
    """Threaded loopback tile server; a context manager that starts and stops it."""

    def __init__(
        self,
        latency: float = 0.0,
        faults: dict | None = None,
        *,
        fault_rate: float = 0.0,
        rate_faults: tuple[str, ...] = ("500", "429", "truncated"),
        retry_after: float | int = 1,
        stall: float = 5.0,
        seed: int = 0,
        tile_size: int = 256,
        fmt: str = "jpeg",
        max_zoom: int = 22,
        content: str = "ramps",
    ):
        self.latency = latency
        self.faults = {self._key(k): (list(v) if isinstance(v, (list, tuple)) else v)
                       for k, v in (faults or {}).items()}
        self.fault_rate = fault_rate
        self.rate_faults = tuple(rate_faults)
        self.retry_after = retry_after
        self.stall = stall
        self.tile_size = tile_size
        self.fmt = fmt
        self.max_zoom = max_zoom
        self.content = content
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._bytes: dict[tuple[int, int, int], bytes] = {}
        self.requests = 0
        self.by_tile: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.faults_served: Counter = Counter()
        self.abandoned: Counter = Counter()  # stalled requests the client hung up on first
        self.user_agents: set[str] = set()
        self.concurrent = 0
        self.max_concurrent = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _key(tile) -> str:
        return "/".join(str(int(v)) for v in tile) if isinstance(tile, (tuple, list)) else str(tile)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "TileServer":
        handler = type("Handler", (_Handler,), {"tiles": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "TileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url_template(self) -> str:
        ext = "jpg" if self.fmt == "jpeg" else "png"
        return f"http://127.0.0.1:{self.port}/tiles/{{z}}/{{x}}/{{y}}.{ext}"

    def reset_counters(self) -> None:
        """Zero the request counters and the concurrency gauge (faults keep their state)."""
        with self._lock:
            self.requests = 0
            self.by_tile.clear()
            self.times.clear()
            self.faults_served.clear()
            self.max_concurrent = 0

    # -- content ------------------------------------------------------------------------------

    def tile_bytes(self, z: int, x: int, y: int) -> bytes:
        """The encoded bytes served for tile (z, x, y) (generated once, then reused)."""
        key = (z, x, y)
        with self._lock:
            data = self._bytes.get(key)
        if data is None:
            buf = io.BytesIO()
            img = Image.fromarray(tile_pixels(z, x, y, self.tile_size, self.content))
            if self.fmt == "jpeg":
                img.save(buf, format="JPEG", quality=90)
            else:
                img.save(buf, format="PNG")
            data = buf.getvalue()
            with self._lock:
                self._bytes[key] = data
        return data

    def tile_image(self, z: int, x: int, y: int) -> np.ndarray:
        """The decoded RGB pixels of exactly the bytes the server sends."""
        return np.asarray(Image.open(io.BytesIO(self.tile_bytes(z, x, y))).convert("RGB"))

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no request is being handled (a stalled handler ends when it sees the
        client hang up, or when its stall is over); True once idle, False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.concurrent == 0:
                    return True
            time.sleep(0.02)
        return False

    def _fault_for(self, key: str) -> str:
        with self._lock:
            plan = self.faults.get(key)
            if isinstance(plan, list):
                return plan.pop(0) if plan else "ok"
            if plan is not None:
                return plan
            if self.fault_rate and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.rate_faults)
            return "ok"

    def _enter(self, key: str, agent: str) -> None:
        with self._lock:
            self.requests += 1
            self.by_tile[key] += 1
            self.times.setdefault(key, []).append(time.monotonic())
            self.user_agents.add(agent)
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)

    def _leave(self, fault: str) -> None:
        with self._lock:
            self.concurrent -= 1
            if fault != "ok":
                self.faults_served[fault] += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is exercised
    # Headers and body go out in separate writes; with Nagle on, the body would wait for the
    # client's delayed ACK (~40 ms) and every request would look that much slower.
    disable_nagle_algorithm = True
    tiles: TileServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _client_hung_up(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as the client closes its end (it gave up)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True
                except OSError:  # reset by the client: it gave up too
                    return True
                time.sleep(min(left, 0.05))  # a pipelined request waits its turn
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.tiles
        match = _PATH.match(self.path)
        if match is None:
            self._send(400, b"bad path")
            return
        z, x, y = (int(g) for g in match.groups()[:3])
        key = f"{z}/{x}/{y}"
        server._enter(key, self.headers.get("User-Agent", ""))
        fault = "ok"
        try:
            if server.latency:
                time.sleep(server.latency)
            if z > server.max_zoom or x >= (1 << z) or y >= (1 << z):
                fault = "404"
            else:
                fault = server._fault_for(key)
            mime = "image/jpeg" if server.fmt == "jpeg" else "image/png"
            if fault == "ok":
                self._send(200, server.tile_bytes(z, x, y), {"Content-Type": mime})
            elif fault in ("404", "500", "502", "503"):
                self._send(int(fault), b"fault", {"Content-Type": "text/plain"})
            elif fault == "429":
                self._send(429, b"slow down", {"Retry-After": str(server.retry_after)})
            elif fault == "garbage":
                self._send(200, b"<html>not an image</html>", {"Content-Type": mime})
            elif fault == "truncated":
                body = server.tile_bytes(z, x, y)
                self.send_response(200)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
            elif fault == "stall":
                if self._client_hung_up(server.stall):
                    with server._lock:
                        server.abandoned[key] += 1
                    self.close_connection = True
                else:
                    self._send(200, server.tile_bytes(z, x, y), {"Content-Type": mime})
            else:
                raise ValueError(f"unknown fault {fault!r}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout): nothing to answer
        finally:
            server._leave(fault)
