"""A server that stalls: it accepts TCP connections on 127.0.0.1 and never sends a byte.

    with StallServer() as stall:
        XYZTileSource(stall.url + "/{z}/{x}/{y}.png", ...)   # every request times out
        assert stall.accepted <= 8

Connections are held open until the server stops, as a hung HTTP server (or a proxy that lost
its upstream) holds them: clients see read timeouts, never a refusal or a reset.
"""

from __future__ import annotations

import socket
import threading
import time


class StallServer:
    """Listening socket that accepts and holds connections; counts them (``accepted``) and
    notes when the first came (``first_at``), so a test can time the client's network part alone."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.accepted = 0
        self.first_at: float | None = None  # time.monotonic() of the first connection

    @property
    def port(self) -> int:
        assert self._sock is not None, "server not started"
        return self._sock.getsockname()[1]

    @property
    def host(self) -> str:
        """``host:port``, as error messages name a server."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> "StallServer":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed by stop()
                return
            with self._lock:
                self._held.append(conn)
                self.accepted += 1
                if self.first_at is None:
                    self.first_at = time.monotonic()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held.clear()

    def __enter__(self) -> "StallServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
