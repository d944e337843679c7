"""Seconds each failure path takes to end, against loopback servers that never answer.

    python benchmarks/fail_fast.py [--runs 3]

The tests assert what these paths do (how many requests were sent, that the client hung up on
its own timeout, that the breaker opened, one line naming the server); this script times them:

1. XYZ tiles, a server that accepts and never answers: 40 cells, 4 workers, read timeout 0.3 s,
   until the breaker opens (``tests/test_tiles.py::test_stalled_server_trips_the_breaker``);
2. one tile stalling 30 s, read timeout 0.2 s, 2 retries: until the cell is given up
   (``test_stall_times_out_and_masks_the_cell_after_retries``);
3. WMS, the same never-answering server, 8 workers, read timeout 0.3 s
   (``tests/test_wms.py::test_stalled_server_ends_in_one_wave_of_timeouts``);
4. the WorldClim download from it, read timeout 0.3 s
   (``tests/test_worldclim.py::test_stalled_download_server_stops_in_two_timeouts``);
5. ``taxamap predict`` with the Hugging Face Hub on a closed port and no HF_HUB_OFFLINE, the
   whole command including Python start-up (``tests/test_hub_download.py``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from taxamap.errors import TaxamapError  # noqa: E402
from tests.helpers.stallserver import StallServer  # noqa: E402
from tests.helpers.tileserver import TileServer  # noqa: E402

CELLS = np.column_stack([np.linspace(-50, 50, 40), np.linspace(-100, 100, 40)])


def timed(run) -> tuple[float, str]:
    """Seconds ``run()`` took, and what it ended with (the exception's type, or "ok")."""
    t0 = time.perf_counter()
    try:
        run()
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - the failure is what is being timed
        outcome = type(exc).__name__
    return time.perf_counter() - t0, outcome


def stalled_tiles(tmp: Path) -> tuple[float, str]:
    from taxamap.sources.tiles import XYZTileSource

    with StallServer() as stall:
        src = XYZTileSource(stall.url + "/tiles/{z}/{x}/{y}.png", zoom=8, size=256,
                            cache_dir=tmp / "tiles", workers=4, backoff=0.001,
                            timeout=(1.0, 0.3))
        try:
            return timed(lambda: src.fetch(CELLS))
        finally:
            src.close()


def one_stalled_tile(tmp: Path) -> tuple[float, str]:
    import math

    from taxamap.sources.tiles import XYZTileSource

    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 99.5 / 256))))
    lon = 76.5 / 256 * 360 - 180
    with TileServer(faults={"8/76/99": "stall"}, stall=30.0) as server:
        src = XYZTileSource(server.url_template, zoom=8, size=64, footprint_m=None,
                            cache_dir=tmp / "tile", workers=4, retries=2, backoff=0.001,
                            timeout=(1.0, 0.2))
        try:
            return timed(lambda: src.fetch([[lat, lon]]))
        finally:
            src.close()


def stalled_wms(tmp: Path) -> tuple[float, str]:
    from taxamap.sources.wms import WMSSource

    with StallServer() as stall:
        with WMSSource(stall.url + "/wms", cache_dir=tmp / "wms", workers=8, timeout=(1.0, 0.3),
                       backoff=0.001) as src:
            return timed(lambda: src.fetch(CELLS))


def stalled_worldclim(tmp: Path) -> tuple[float, str]:
    from taxamap.sources.worldclim import download_worldclim

    with StallServer() as stall:
        return timed(lambda: download_worldclim(tmp / "wc", base_url=stall.url + "/climate/",
                                                progress=False, backoff=0.001,
                                                timeout=(1.0, 0.3)))


def unreachable_hub(tmp: Path) -> tuple[float, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, TAXAMAP_OFFLINE="1", PYTHONWARNINGS="ignore", HF_HOME=str(tmp / "hf"),
               TAXAMAP_CACHE=str(tmp / "c"), HF_ENDPOINT=f"http://127.0.0.1:{port}",
               PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_OFFLINE", None)
    args = [sys.executable, "-m", "taxamap.cli", "predict", "--species", "Cardinalis cardinalis",
            "--bbox=-83,40,-82.5,40.5", "--resolution", "0.1", "--out", str(tmp / "o"),
            "--no-progress"]

    def run() -> None:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise TaxamapError(proc.stderr.strip().splitlines()[-1])

    return timed(run)


PATHS = [("XYZ tiles, server never answers (40 cells, breaker)", stalled_tiles),
         ("XYZ tiles, one tile stalls 30 s (3 attempts x 0.2 s)", one_stalled_tile),
         ("WMS, server never answers (40 cells, breaker)", stalled_wms),
         ("WorldClim download, server never answers", stalled_worldclim),
         ("taxamap predict, Hub on a closed port", unreachable_hub)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("| failure path | ended with | seconds per run |")
    print("|---|---|---|")
    for name, path in PATHS:
        times, outcome = [], ""
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                seconds, outcome = path(Path(tmp))
            times.append(seconds)
        print(f"| {name} | {outcome} | {', '.join(f'{t:.2f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()
