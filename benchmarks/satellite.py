"""Satellite cells/s on this machine: the full-size encoder (ViT-B/16, random weights at the
released size) through the engine, with patches made in memory (no network) and, separately, the
XYZ source against a loopback server with 50 ms latency.

    python benchmarks/satellite.py [--cells 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine
from gpu import SyntheticPatches, vit_flops_per_tile, write_satellite_repo


def main() -> None:
    from taxamap import engine
    from taxamap.devices import pick_device
    from taxamap.models.satellite import load_satellite_encoder
    from taxamap.sources.tiles import XYZTileSource
    from tests.tileserver import TileServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = pick_device(args.device)
    rng = np.random.default_rng(0)
    latlon = np.c_[rng.uniform(39, 41, args.cells), rng.uniform(-84, -82, args.cells)]
    with tempfile.TemporaryDirectory() as tmp:
        write_satellite_repo(Path(tmp) / "MVRL" / "ecosat")
        encoder = load_satellite_encoder(tmp, device=device)
        embedder = engine.satellite_embedder(encoder, SyntheticPatches())
        engine.embed_in_memory(latlon[:8], embedder, progress=False)
        t = time.perf_counter()
        engine.embed_in_memory(latlon, embedder, progress=False)
        in_memory = args.cells / (time.perf_counter() - t)
        with TileServer(latency=0.05) as server:
            source = XYZTileSource(server.url_template, cache_dir=Path(tmp) / "cache")
            embedder = engine.satellite_embedder(encoder, source)
            t = time.perf_counter()
            engine.embed_in_memory(latlon, embedder, progress=False)
            networked = args.cells / (time.perf_counter() - t)
            tiles = server.requests
    print(f"machine: {machine()}")
    print(f"{'measure':<58} {'value':>12}")
    print(f"{'encoder GFLOP per tile (ViT-B/16)':<58} {vit_flops_per_tile() / 1e9:>12.1f}")
    print(f"{'cells/s, patches in memory (encoder-bound)':<58} {in_memory:>12.2f}")
    print(f"{'cells/s, XYZ tiles from a 50 ms loopback server, cold':<58} {networked:>12.2f}")
    print(f"{'tiles requested for those cells':<58} {tiles:>12}")


if __name__ == "__main__":
    main()
