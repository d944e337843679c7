"""The whole world at interactive speed (issue 21): serve start-up, tiles per zoom, panning
clients, embedding throughput, the Dask path over a world band.

    flock /work/wt/bench.lock python benchmarks/world.py synth   --cache C --models M
    flock /work/wt/bench.lock python benchmarks/world.py startup --cache C --models M   # twice
    flock /work/wt/bench.lock python benchmarks/world.py tiles   --cache C --models M
    flock /work/wt/bench.lock python benchmarks/world.py pan     --cache C --models M
    flock /work/wt/bench.lock python benchmarks/world.py embed   --cache C2 --models M [--dask local:2]

``synth`` fills the world 0.05 deg location store (8.5 M cells x 512, float16, 8.7 GB) with
synthetic unit embeddings under the very key and layout ``taxamap embed`` would write (GeoCLIP's
model ref from ``--models``): embedding it for real takes hours on a shared 2-core machine, and
tile timings depend on the store's size and layout, not on its values. ``startup`` opens
``taxamap serve``'s session and tile scorer (the first one builds the pyramids) and reports time
and RSS. ``tiles`` asks each zoom 1-10 for tiles over land, every tile for a species never asked
before (its name embedded, its stretch computed, nothing cached): the server's time per tile.
``pan``: 16 HTTP clients panning and zooming for 30 s against a real server. ``embed``: the
full-size location encoder over a world band (cells/s per worker), optionally on Dask.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    return memory()["rss"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory() -> dict:
    """Resident MB now: all, anonymous (the process's own) and file-backed (memory-mapped store
    and pyramid pages: page cache the kernel reclaims under pressure)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            for key, name in (("VmRSS:", "rss"), ("RssAnon:", "anon"), ("RssFile:", "file")):
                if line.startswith(key):
                    out[name] = round(int(line.split()[1]) / 1024)
    return out


def options(args, **more):
    from taxamap.options import MapOptions

    return MapOptions(region="world", resolution=args.resolution, models=args.models,
                      cache=args.cache, modalities=("location",), progress=False, **more)


def synth(args) -> dict:
    """The world store, filled with synthetic unit embeddings in taxamap's own layout."""
    from taxamap.modalities import plan_modality
    from taxamap.scorer import Scorer
    from taxamap.store import EmbeddingStore, store_key, store_location

    t0 = time.perf_counter()
    scorer = Scorer(options(args))
    grid = scorer.grid
    plan = plan_modality("location", scorer.options, scorer.config, scorer.device, grid.n_cells)
    key = store_key(grid.definition(), "location", plan.model_ref, plan.source)
    location, _ = store_location(None, grid.key(), "location", key, args.cache)
    store = EmbeddingStore.open(location, key=key, n_cells=grid.n_cells, dim=512,
                                attrs={"grid": grid.definition(), "modality": "location",
                                       "model": plan.model_ref, "source": plan.source,
                                       "region": scorer.region.name, "synthetic": True,
                                       "resolution": grid.resolution})
    rng = np.random.default_rng(0)
    base = rng.standard_normal((store.chunk_cells, 512), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    for i in store.pending_chunks():
        rows = store.chunk_slice(i)
        block = np.roll(base, 7 * i + 1, axis=1)[: rows.stop - rows.start]
        store.write_chunk(i, block)
    size = sum(p.stat().st_size for p in Path(location).rglob("*") if p.is_file())
    return {"cells": grid.n_cells, "store_gb": round(size / 1e9, 2), "location": location,
            "seconds": round(time.perf_counter() - t0, 1)}


def open_service(args):
    from taxamap.serve.app import MapService
    from taxamap.session import MapSession

    session = MapSession(options(args))
    return MapService(session)


def startup(args) -> dict:
    t0 = time.perf_counter()
    service = open_service(args)
    seconds = time.perf_counter() - t0
    current, peak = rss_mb()
    levels = [lv.factor for p in service.tiler.pyramids.values() for lv in p.levels]
    return {"startup_s": round(seconds, 2), "rss_mb": round(current), "peak_rss_mb": round(peak),
            "memory_mb": memory(),
            "in_memory": service.session.scorer.in_memory, "levels": levels,
            "cells": service.session.n_cells}


def _species(n: int, skip: int = 0) -> list[str]:
    from taxamap.serve.app import SpeciesIndex

    rows = SpeciesIndex().rows
    step = max(1, len(rows) // (n + skip + 1))
    return [rows[(i + skip) * step][0] for i in range(n)]


def _land_tiles(grid, z: int, rng, count: int) -> list[tuple[int, int]]:
    """``count`` tiles at zoom ``z`` whose centre lies on a kept cell."""
    from taxamap.serve.tiles import tile_box

    out: list[tuple[int, int]] = []
    n = 2 ** z
    while len(out) < count:
        x, y = int(rng.integers(n)), int(rng.integers(n))
        box = tile_box(z, x, y, size=1)
        row = int((grid.north - box.lats[0]) // grid.resolution)
        col = int((box.lons[0] - grid.west) // grid.resolution)
        if grid.cells_at(np.array([row]), np.array([col]))[0] >= 0:
            out.append((x, y))
    return out


def tiles(args) -> dict:
    service = open_service(args)
    rng = np.random.default_rng(1)
    names = iter(_species(args.per_zoom * 10 + 20, skip=3))
    out = {}
    for z in range(1, 11):
        times = []
        for x, y in _land_tiles(service.session.grid, z, rng, args.per_zoom):
            name = next(names)
            t0 = time.perf_counter()
            service.tile_png(name, str(z), str(x), str(y), {})
            times.append((time.perf_counter() - t0) * 1000)
        out[z] = {"level": service.tiler.factor_for(z), "p50_ms": round(np.percentile(times, 50), 1),
                  "p95_ms": round(np.percentile(times, 95), 1), "n": len(times)}
        print(f"zoom {z:2d} (level {out[z]['level']:2d}x): p50 {out[z]['p50_ms']:7.1f} ms, "
              f"p95 {out[z]['p95_ms']:7.1f} ms", flush=True)
    return {"tiles": out, "memory_mb": memory()}


def pan(args) -> dict:
    import httpx

    from tests.helpers.serveserver import ServeServer

    service_session = open_service(args).session
    names = _species(args.clients, skip=1)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + args.seconds

    def client(i: int, url: str) -> None:
        rng = np.random.default_rng(100 + i)
        z = int(rng.integers(3, 8))
        x, y = _land_tiles(service_session.grid, z, rng, 1)[0]
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < stop:
                # a 4 x 3 view of tiles, then a pan step or a zoom
                for dx in range(-2, 2):
                    for dy in range(-1, 2):
                        tx, ty = (x + dx) % 2 ** z, min(max(y + dy, 0), 2 ** z - 1)
                        t0 = time.perf_counter()
                        r = c.get(f"/tiles/{names[i]}/{z}/{tx}/{ty}.png")
                        ms = (time.perf_counter() - t0) * 1000
                        with lock:
                            latencies.append(ms)
                            if r.status_code != 200:
                                errors.append(f"{r.status_code} {r.text[:80]}")
                move = rng.integers(6)
                if move == 0 and z < 10:
                    z, x, y = z + 1, 2 * x, 2 * y
                elif move == 1 and z > 2:
                    z, x, y = z - 1, x // 2, y // 2
                else:
                    x = (x + int(rng.integers(-1, 2))) % 2 ** z
                    y = min(max(y + int(rng.integers(-1, 2)), 0), 2 ** z - 1)

    with ServeServer(service_session) as server:
        threads = [threading.Thread(target=client, args=(i, server.url)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"clients": args.clients, "seconds": args.seconds, "requests": len(latencies),
            "errors": len(errors), "first_errors": errors[:3],
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "memory_mb": memory()}


def embed(args) -> dict:
    """The full-size location encoder over a band of the world (here, or on a local Dask
    cluster): cells per second."""
    from taxamap.options import MapOptions
    from taxamap.scorer import Scorer

    opts = MapOptions(bbox=args.band, resolution=args.resolution, models=args.models,
                      cache=args.cache, modalities=("location",), progress=False,
                      dask=args.dask)
    scorer = Scorer(opts)
    t0 = time.perf_counter()
    cells = scorer.embed_cells()
    seconds = time.perf_counter() - t0
    n = scorer.grid.n_cells
    return {"band": args.band, "cells": n, "seconds": round(seconds, 1),
            "cells_per_s": round(n / seconds), "dask": args.dask,
            "blocks": cells.computed_blocks, "peak_rss_mb": round(rss_mb()[1])}


def screenshot(args) -> dict:
    """The page in headless chromium over a tiled world session (cells embedded for real with
    ``--models``; the session is made to score from the stores whatever the grid's size), a
    species typed: docs/world.png."""
    from playwright.sync_api import expect, sync_playwright

    from taxamap.session import MapSession
    from tests.helpers.browser import CHROMIUM
    from tests.helpers.serveserver import ServeServer

    session = MapSession(options(args), in_memory=False)
    with ServeServer(session) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(server.url)
        expect(page.locator("#status")).to_contain_text("type a species", timeout=60000)
        page.fill("#species", args.species)
        t0 = time.perf_counter()
        page.press("#species", "Enter")
        expect(page.locator("#status")).to_have_text("ready", timeout=120000)
        painted = time.perf_counter() - t0
        page.wait_for_timeout(500)
        page.screenshot(path=args.out)
        browser.close()
    return {"screenshot": args.out, "enter_to_painted_s": round(painted, 2),
            "cells": session.n_cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["synth", "startup", "tiles", "pan", "embed",
                                           "screenshot"])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--models", default="/tmp/panel-bench/models-full")
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--per-zoom", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--band", default="-180,0,180,1.5")
    parser.add_argument("--dask", default=None)
    parser.add_argument("--species", default="Cardinalis cardinalis")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "world.png"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = {"step": args.step, **globals()[args.step](args)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
