"""Tile throughput and fault tolerance of the XYZ satellite source against a loopback server.

    python benchmarks/tiles.py [--cells 120] [--latency 0.05]

1. tiles/s with a 50 ms server latency for several ``workers`` values, next to the bound
   workers / latency (what perfect overlap of requests would give); plus a warm-cache rerun.
2. cells masked under a 10 % fault rate (500, 503, 429 + Retry-After: 1, truncated bodies), with the
   default retries and with retries disabled.

The server runs in the same process (its JPEG bytes are generated before timing), so at high
worker counts the numbers also include the server's Python overhead on this machine's cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taxamap.sources.base import DEFAULT_WORKERS  # noqa: E402
from taxamap.sources.footprint import DEFAULT_FOOTPRINT_M, DEFAULT_SIZE  # noqa: E402
from taxamap.sources.tiles import XYZTileSource  # noqa: E402
from tests.helpers.tileserver import TileServer  # noqa: E402


def random_cells(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-179, 179, n)])


def warm(server: TileServer, cells: np.ndarray) -> int:
    """Encode every tile the cells need before timing; returns how many distinct tiles."""
    planner = XYZTileSource(server.url_template, cache=False)  # the default footprint and zooms
    tiles = {t for lat, lon in cells for t in planner.plan(lat, lon).tiles()}
    for t in tiles:
        server.tile_bytes(*t)
    return len(tiles)


def throughput(cells_n: int, latency: float, workers_list: list[int]) -> list[tuple]:
    rows = []
    with TileServer(latency=latency) as server:
        for k, workers in enumerate(workers_list):
            n = cells_n * max(1, workers // DEFAULT_WORKERS)  # keep each run a few seconds long
            cells = random_cells(n, seed=k)
            n_tiles = warm(server, cells)
            with tempfile.TemporaryDirectory() as cache:
                server.reset_counters()
                with XYZTileSource(server.url_template, cache_dir=cache, workers=workers) as src:
                    t0 = time.perf_counter()
                    out = src.fetch(cells)
                    cold = time.perf_counter() - t0
                assert server.requests == n_tiles and all(p is not None for p in out)
                peak = server.max_concurrent
                with XYZTileSource(server.url_template, cache_dir=cache, workers=workers) as src:
                    t0 = time.perf_counter()
                    src.fetch(cells)
                    hot = time.perf_counter() - t0
                    assert src.stats.requests == 0
            rows.append((workers, n, n_tiles, n_tiles / cold, workers / latency, peak, n_tiles / hot))
    return rows


def faults(cells_n: int, rate: float, latency: float) -> list[tuple]:
    rows = []
    cells = random_cells(cells_n, seed=99)
    for retries in (4, 0):
        with TileServer(latency=latency, fault_rate=rate, rate_faults=("500", "503", "429", "truncated"),
                        retry_after=1, seed=7) as server, tempfile.TemporaryDirectory() as cache:
            warm(server, cells)
            with XYZTileSource(server.url_template, cache_dir=cache, retries=retries) as src:
                t0 = time.perf_counter()
                out = src.fetch(cells)
                dt = time.perf_counter() - t0
                s = src.stats
            masked = sum(p is None for p in out)
            rows.append((retries, cells_n, server.requests, sum(server.faults_served.values()), s.retries,
                         s.failures, masked, dt))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=120, help="cells per throughput run (x workers/8)")
    ap.add_argument("--latency", type=float, default=0.05, help="server latency in seconds")
    ap.add_argument("--fault-cells", type=int, default=300)
    ap.add_argument("--fault-rate", type=float, default=0.10)
    args = ap.parse_args()

    print(f"XYZ source, {DEFAULT_FOOTPRINT_M:.0f} m footprint, {DEFAULT_SIZE} px patches, zoom per "
          f"latitude, server latency "
          f"{args.latency * 1000:.0f} ms, default workers {DEFAULT_WORKERS}\n")
    print("| workers | cells | tiles | tiles/s | bound w/lat | % of bound | peak concurrent | cached tiles/s |")
    print("|---|---|---|---|---|---|---|---|")
    for w, n, t, rate, bound, peak, hot in throughput(args.cells, args.latency, [1, 4, DEFAULT_WORKERS, 16, 32]):
        print(f"| {w} | {n} | {t} | {rate:.1f} | {bound:.0f} | {100 * rate / bound:.0f} % | {peak} | {hot:.0f} |")

    print(f"\n{args.fault_rate:.0%} of requests fail (500/503/429+Retry-After 1 s/truncated), "
          f"{args.fault_cells} cells, workers {DEFAULT_WORKERS}, latency 5 ms\n")
    print("| retries | cells | requests | faults served | retried | tiles failed | cells masked | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r, n, req, served, retried, failed, masked, dt in faults(args.fault_cells, args.fault_rate, 0.005):
        print(f"| {r} | {n} | {req} | {served} | {retried} | {failed} | {masked} ({100 * masked / n:.1f} %) | {dt:.1f} |")


if __name__ == "__main__":
    main()
