"""A real ``taxamap serve`` server on 127.0.0.1 for the tests: uvicorn in a thread on a free port,
serving the app of a :class:`~taxamap.session.MapSession` over a small bbox with tiny models.

    with ServeServer(session, max_upload=256 * 1024) as server:
        httpx.get(server.url + "api/health")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from taxamap.serve.app import create_app
from taxamap.serve.server import allowed_hosts_for, bind, make_server, url_of

ROOT = Path(__file__).resolve().parents[2]

#: The small box the serve tests map (every cell is on land; see tests/test_api.py).
BBOX = (-84.0, 39.0, -82.0, 41.0)
SPECIES = "Cardinalis cardinalis"
PROMPT = "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"


def open_test_session(models_dir, cache, resolution: float = 0.1):
    """The session the serve tests use (location modality, offline, no progress bars)."""
    import taxamap

    return taxamap.open_session(bbox=BBOX, resolution=resolution, models=models_dir,
                                cache=cache, progress=False)


#: 60 cells with the satellite modality (tests/test_multimodal_e2e.py's box).
SATELLITE_BBOX = (-83.0, 40.0, -82.0, 40.6)


def open_satellite_session(models_dir, cache, tiles_url: str):
    """A session with location + satellite, the patches from a loopback XYZ tile server."""
    import taxamap

    return taxamap.open_session(
        bbox=SATELLITE_BBOX, resolution=0.1, modalities=("location", "satellite"),
        models=models_dir, cache=cache, progress=False, sat_source="xyz", sat_url=tiles_url,
        sat_zoom=12, sat_size=64, workers=4)


class ServeServer:
    """The app of ``session`` served by uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, session, **app_options):
        self.session = session
        self.sock = bind("127.0.0.1", 0)
        self.app = create_app(session, allowed_hosts=allowed_hosts_for("127.0.0.1"),
                              **app_options)
        self.service = self.app.state.service
        self.url = url_of("127.0.0.1", self.sock)
        self.port = self.sock.getsockname()[1]
        self._ready = threading.Event()
        self.server = make_server(self.app, self.sock, on_ready=self._ready.set,
                                  read_timeout=self.service.read_timeout)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="serve-test", daemon=True)

    def __enter__(self) -> "ServeServer":
        self.service.warm_up()
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.sock.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes over a new connection and return everything the server answers."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as conn:
            conn.sendall(data)
            chunks = []
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except socket.timeout:
                pass
        return b"".join(chunks)


class ServeProcess:
    """``taxamap serve`` over :data:`BBOX` in a child process, so that its memory (RSS) and its
    stderr are its own; ``lines`` collects stderr as it comes.

        with ServeProcess(models_dir, cache, "--max-uploads", "2") as server: ...
    """

    def __init__(self, models_dir, cache, *options: str):
        self.args = [sys.executable, "-m", "taxamap.cli", "serve", "--bbox=-84,39,-82,41",
                     "--resolution", "0.1", "--models", str(models_dir), "--cache", str(cache),
                     "--no-progress", "--port", "0", *options]
        self.lines: list[str] = []

    def __enter__(self) -> "ServeProcess":
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        if not line.startswith("serving http://"):
            self.proc.kill()
            self._reader.join(10)
            raise RuntimeError("taxamap serve did not start: " + " | ".join(self.lines[-5:]))
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int:
        """Ctrl-C the server; its exit code once stopped (stderr read to the end)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode

    def wait_for(self, predicate, timeout: float = 60.0) -> bool:
        """Whether a stderr line satisfying ``predicate`` came within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(line) for line in list(self.lines)):
                return True
            time.sleep(0.05)
        return False

    def memory_kib(self) -> dict[str, int]:
        """The server's ``VmRSS`` and ``VmHWM`` (peak RSS), KiB, from /proc."""
        fields = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0])
        return fields

    def reset_peak(self) -> None:
        """Start the kernel's peak-RSS count (VmHWM) again from the current RSS."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as fh:
            fh.write("5")
