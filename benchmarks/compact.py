"""Compact in-memory scoring (issue 20): a new species over a stored grid, float32 copy (the
session before) vs float16 rows memory-mapped from the store (now); drift between them; memory;
and ``taxamap serve`` RSS and /api/map server time for this checkout and a baseline one.

    flock /work/wt/bench.lock nice python benchmarks/compact.py \
        --models /tmp/panel-bench/models-full --cache CACHE [--baseline-root TREE \
        --baseline-cache CACHE2] [--region usa --resolution 0.05] [--json OUT]

``--cache`` must hold the grid's complete location store (e.g. a copy of
/tmp/panel-bench/cache: this checkout adds the per-cell coordinates to it). In-process figures:
the median of ``Scorer.score`` for one new query (and 8 as one product) on both paths, p99/max
|delta score| for 100 queries (50 cell embeddings as queries, 50 random unit vectors), bytes held.
Server figures: ``taxamap serve`` started from each tree, RSS (VmRSS, RssAnon, RssFile from
/proc) once it serves, /api/map server time (its ``elapsed_ms``) for 20 species it has not
seen, RSS after them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, start_serve


def status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def in_process(args) -> dict:
    from taxamap.options import MapOptions
    from taxamap.score import fuse_many
    from taxamap.scorer import BLOCK_CELLS, Scorer

    scorer = Scorer(MapOptions(region=args.region, resolution=args.resolution,
                               models=args.models, cache=args.cache, progress=False,
                               device="cpu"))
    cells = scorer.embed_cells()
    assert sum(cells.computed_blocks.values()) == 0, "the cache must hold the complete store"
    store = cells.stores["location"]
    n, dim = store.n_cells, store.dim
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((140, dim)).astype(np.float32)

    # Before: the session's float32 copy (L2-normalised), scored by NumPy (fuse_many).
    before = status()
    e32 = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, BLOCK_CELLS):
        rows = slice(start, min(start + BLOCK_CELLS, n))
        block = store.read(rows)
        e32[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    norms = np.ones(n, dtype=np.float32)
    old_bytes = e32.nbytes + norms.nbytes
    old_one = median_ms(lambda i: fuse_many({"location": e32}, queries[i:i + 1], "mean",
                                            row_norms={"location": norms}), args.repeats)
    old_eight = median_ms(lambda i: fuse_many({"location": e32}, queries[8 * i:8 * i + 8], "mean",
                                              row_norms={"location": norms}), 3)
    # Reference scores for the drift table: 50 data queries (cell embeddings), 50 random.
    data_q = e32[rng.choice(n, 50, replace=False)]
    drift_q = np.concatenate([data_q, queries[:50] / np.linalg.norm(queries[:50], axis=1,
                                                                     keepdims=True)])
    ref = np.stack([e32 @ q for q in drift_q])
    e32 = None  # the float32 copy goes before the compact path loads
    after_old = status()

    scorer.load()
    loaded = status()
    new_one = median_ms(lambda i: scorer.score(queries[20 + i:21 + i]), args.repeats)
    new_eight = median_ms(lambda i: scorer.score(queries[40 + 8 * i:48 + 8 * i]), 3)
    ours = np.concatenate([scorer.score(drift_q[i:i + 10])[1]["location"]
                           for i in range(0, 100, 10)])
    delta = np.abs(ours - ref)
    return {
        "cells": n, "dim": dim,
        "float32_copy": {"bytes_held": old_bytes, "score_1_ms": round(old_one, 1),
                         "score_8_ms": round(old_eight, 1),
                         "rss_before_mib": before, "rss_with_copy_mib": after_old},
        "compact": {"bytes_held": scorer.memory_bytes, "bytes_mapped": scorer.mapped_bytes,
                    "score_1_ms": round(new_one, 1), "score_8_ms": round(new_eight, 1),
                    "rss_after_load_mib": loaded, "rss_after_scoring_mib": status()},
        "drift_vs_float32": {"p99": float(np.quantile(delta, 0.99)), "max": float(delta.max()),
                             "p99_data": float(np.quantile(delta[:50], 0.99)),
                             "p99_random": float(np.quantile(delta[50:], 0.99))},
    }


def serve(tree: Path, models: str, cache: str, args) -> dict:
    import httpx

    from taxamap.taxonomy import list_table_species

    t = time.perf_counter()
    proc, url, log = start_serve(["--region", args.region, "--resolution", str(args.resolution),
                                  "--models", models, "--cache", cache], tree)
    try:
        started = time.perf_counter() - t
        time.sleep(2)
        at_start = status(proc.pid)
        names = [s for s in list_table_species()][:200:10][:20]
        server_ms = []
        with httpx.Client(base_url=url, timeout=120) as client:
            for name in names:
                r = client.get("/api/map", params={"species": name})
                r.raise_for_status()
                server_ms.append(r.json()["elapsed_ms"])
        return {"tree": str(tree), "startup_s": round(started, 1), "rss_after_startup_mib":
                at_start, "rss_after_20_maps_mib": status(proc.pid),
                "new_species_server_ms_p50": round(statistics.median(server_ms), 1),
                "new_species_server_ms_all": [round(x) for x in server_ms]}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--region", default="usa")
    p.add_argument("--resolution", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--baseline-root", help="another checkout to start 'taxamap serve' from")
    p.add_argument("--baseline-cache", help="its cache (a copy of the same store)")
    p.add_argument("--skip", default="", help="comma list of: scoring,serve")
    p.add_argument("--json")
    args = p.parse_args()
    out = {"machine": machine()}
    if "scoring" not in args.skip:
        out["scoring"] = in_process(args)
        print(json.dumps(out["scoring"], indent=1), flush=True)
    if "serve" not in args.skip:
        out["serve"] = {"this": serve(ROOT, args.models, args.cache, args)}
        print(json.dumps(out["serve"]["this"], indent=1), flush=True)
        if args.baseline_root:
            out["serve"]["baseline"] = serve(Path(args.baseline_root), args.models,
                                             args.baseline_cache or args.cache, args)
            print(json.dumps(out["serve"]["baseline"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
