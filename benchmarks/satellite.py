"""Satellite cells/s on this machine.

    python benchmarks/satellite.py [--cells 64] [--device cpu] [--wms-cells 400] [--no-encoder]

1. WMS source (the default: one GetMap per cell, TaxaBind's training request) against a loopback
   WMS with 50 ms latency: cells/s for several ``workers`` values next to the bound
   workers / latency (perfect overlap of requests), then a rerun on the warm cache (0 requests).
2. The full-size encoder (ViT-B/16, random weights at the released size) through the engine, with
   patches made in memory (no network), then fed by the WMS and by the XYZ source from 50 ms
   loopback servers (the encoder is the bound on a CPU).

For (1) the WMS runs in a child process (as a real server would: it does not share this process's
GIL) and serves one pre-encoded ~120 KB PNG after checking every parameter of the request, so the
figures measure the client; "client CPU ms/cell" is this process's CPU time per cell (what bounds
the rate on a busy machine: cores / CPU per cell). For (2) the servers run in this process.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine
from gpu import SyntheticPatches, vit_flops_per_tile, write_satellite_repo


def random_cells(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-179, 179, n)])


def _serve(conn, latency: float) -> None:
    """Child process: a loopback WMS answering 'reset', 'stats' and 'stop' over ``conn``."""
    from tests.helpers.wmsserver import WMSServer

    with WMSServer(latency=latency, content="constant") as server:
        conn.send(server.url)
        while True:
            command = conn.recv()
            if command == "reset":
                server.reset_counters()
                conn.send(None)
            elif command == "stats":
                conn.send({"requests": server.requests, "errors": list(server.errors),
                           "max_concurrent": server.max_concurrent})
            else:
                return


class ServerProcess:
    """The loopback WMS in a child process (see the module docstring)."""

    def __init__(self, latency: float):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, latency), daemon=True)

    def __enter__(self) -> "ServerProcess":
        self._proc.start()
        self.url = self._conn.recv()
        return self

    def ask(self, command: str):
        self._conn.send(command)
        return self._conn.recv()

    def __exit__(self, *exc) -> None:
        self._conn.send("stop")
        self._proc.join(timeout=10)


def wms_throughput(n_cells: int, latency: float, workers_list: list[int]) -> list[tuple]:
    """(workers, cells, requests, cells/s, bound, peak concurrent, client CPU ms/cell,
    cached cells/s, cached requests) per workers value."""
    from taxamap.sources.wms import WMSSource

    rows = []
    with ServerProcess(latency) as server:
        for k, workers in enumerate(workers_list):
            n = n_cells * max(1, workers // 8)  # keep each run a few seconds long
            cells = random_cells(n, seed=k)
            with tempfile.TemporaryDirectory() as cache:
                server.ask("reset")
                with WMSSource(server.url, cache_dir=cache, workers=workers) as src:
                    cpu, t0 = time.process_time(), time.perf_counter()
                    out = src.fetch(cells)
                    cold, cpu = time.perf_counter() - t0, time.process_time() - cpu
                stats = server.ask("stats")
                assert all(p is not None for p in out) and stats["errors"] == []
                server.ask("reset")
                with WMSSource(server.url, cache_dir=cache, workers=workers) as src:
                    t0 = time.perf_counter()
                    src.fetch(cells)
                    hot = time.perf_counter() - t0
                    assert src.stats.requests == 0
                again = server.ask("stats")["requests"]
                rows.append((workers, n, stats["requests"], n / cold, workers / latency,
                             stats["max_concurrent"], 1000 * cpu / n, n / hot, again))
    return rows


def encoder_rates(n_cells: int, device: str) -> list[tuple[str, float | int]]:
    from taxamap import engine
    from taxamap.models.satellite import load_satellite_encoder
    from taxamap.sources.tiles import XYZTileSource
    from taxamap.sources.wms import WMSSource
    from tests.helpers.tileserver import TileServer
    from tests.helpers.wmsserver import WMSServer

    rng = np.random.default_rng(0)
    latlon = np.c_[rng.uniform(39, 41, n_cells), rng.uniform(-84, -82, n_cells)]
    rows: list[tuple[str, float | int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        write_satellite_repo(Path(tmp) / "MVRL" / "ecosat")
        encoder = load_satellite_encoder(tmp, device=device)
        embedder = engine.satellite_embedder(encoder, SyntheticPatches())
        engine.embed_in_memory(latlon[:8], embedder, progress=False)
        t = time.perf_counter()
        engine.embed_in_memory(latlon, embedder, progress=False)
        rows.append(("cells/s, patches in memory (encoder-bound)", n_cells / (time.perf_counter() - t)))
        with WMSServer(latency=0.05, content="constant") as server:
            source = WMSSource(server.url, cache_dir=Path(tmp) / "wms")
            t = time.perf_counter()
            engine.embed_in_memory(latlon, engine.satellite_embedder(encoder, source), progress=False)
            rows.append(("cells/s, WMS from a 50 ms loopback server, cold", n_cells / (time.perf_counter() - t)))
            rows.append(("GetMap requests for those cells", server.requests))
        with TileServer(latency=0.05) as server:
            source = XYZTileSource(server.url_template, cache_dir=Path(tmp) / "xyz")
            t = time.perf_counter()
            engine.embed_in_memory(latlon, engine.satellite_embedder(encoder, source), progress=False)
            rows.append(("cells/s, XYZ tiles from a 50 ms loopback server, cold", n_cells / (time.perf_counter() - t)))
            rows.append(("tiles requested for those cells", server.requests))
    return rows


def main() -> None:
    from taxamap.devices import pick_device
    from taxamap.sources.satellite import DEFAULT_WORKERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=64, help="cells through the encoder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wms-cells", type=int, default=400, help="cells per WMS run (x workers/8)")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--no-encoder", action="store_true", help="only the WMS source figures")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print(f"WMS source (GetMap per cell, 2560 m / 256 px), server latency {args.latency * 1000:.0f} ms, "
          f"default workers {DEFAULT_WORKERS}\n")
    print("| workers | cells | requests | cells/s | bound w/lat | % of bound | peak concurrent | "
          "client CPU ms/cell | cached cells/s | cached requests |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, n, sent, rate, bound, peak, cpu, hot, again in wms_throughput(
            args.wms_cells, args.latency, sorted({1, 4, DEFAULT_WORKERS, 16, 32})):
        mark = "**" if w == DEFAULT_WORKERS else ""
        print(f"| {mark}{w}{mark} | {n} | {sent} | {rate:.1f} | {bound:.0f} | {mark}{100 * rate / bound:.0f} %{mark} "
              f"| {peak} | {cpu:.1f} | {hot:.0f} | {again} |")
    if args.no_encoder:
        return
    device = pick_device(args.device)
    print(f"\n{'measure':<58} {'value':>12}")
    print(f"{'encoder GFLOP per tile (ViT-B/16)':<58} {vit_flops_per_tile() / 1e9:>12.1f}")
    for name, value in encoder_rates(args.cells, device):
        text = f"{value:>12.2f}" if isinstance(value, float) else f"{value:>12}"
        print(f"{name:<58} {text}")


if __name__ == "__main__":
    main()
