"""fp32 vs bf16-mixed cell encoders over a whole grid: how far do the score maps move?

    flock /work/wt/bench.lock nice python benchmarks/precision_drift.py \
        --models /tmp/panel-bench/models-full [--region usa --resolution 0.05] \
        [--reuse DIR] [--modalities location,environment]

Embeds every cell of the grid with the location encoder (and the environment encoder, from smooth
synthetic climate fields unless ``--worldclim DIR`` is given) twice, through
:func:`~taxamap.models.precision` ``fp32`` and ``bf16-mixed``, and scores 100 queries against
both: 50 "data" queries (fp32 embeddings of random cells: the cosines are large, like a species
that matches a place) and 50 random unit vectors. Figures: p99 and max |delta score| over all
cells x queries, Spearman rank correlation of each query's map (min and median), and the worst
``||e - e'||`` (the largest |delta score| any unit query could see). The issue's bar: p99 <= 0.002,
else ``auto`` must fall back to fp32.

``--reuse DIR`` reads ``<modality>_<region>_<res>_{fp32,bf16}.npy`` there when present (and writes
the ones it computes), so a second run costs only the scoring. On a CPU without AVX512-BF16 the
bf16 forward pass is emulated by torch: slow, but the same arithmetic (bf16 rounding of weights
and activations, float32 accumulation) as the native kernels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (puts this checkout on sys.path)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score maps (finite cells only; ties are rare floats)."""
    ok = np.isfinite(a) & np.isfinite(b)
    ra, rb = np.empty(ok.sum()), np.empty(ok.sum())
    ra[np.argsort(a[ok])] = np.arange(ok.sum())
    rb[np.argsort(b[ok])] = np.arange(ok.sum())
    return float(np.corrcoef(ra, rb)[0, 1])


def synthetic_climate(latlon: np.ndarray, n: int = 20, seed: int = 0) -> np.ndarray:
    """Smooth, standardised climate-like fields of (lat, lon): sums of low-frequency waves."""
    rng = np.random.default_rng(seed)
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    out = np.zeros((latlon.shape[0], n), dtype=np.float32)
    for j in range(n):
        for _ in range(4):
            f = rng.uniform(0.5, 6, 2)
            out[:, j] += np.sin(f[0] * lat + rng.uniform(0, 6.3)) * np.cos(f[1] * lon + rng.uniform(0, 6.3))
        out[:, j] = (out[:, j] - out[:, j].mean()) / (out[:, j].std() + 1e-6)
    return out


def embed(modality: str, precision: str, latlon: np.ndarray, args) -> np.ndarray:
    if modality == "location":
        from taxamap.models.location import load_location_encoder

        enc = load_location_encoder(args.models, device="cpu", precision=precision)
        x = latlon
    else:
        from taxamap.models.environment import load_environment_encoder

        enc = load_environment_encoder(args.models, device="cpu", precision=precision)
        if args.worldclim:
            from taxamap.sources.worldclim import WorldClimFeatures

            x = WorldClimFeatures(args.worldclim).features(latlon)
        else:
            x = synthetic_climate(latlon)
    assert enc.precision == precision, (enc.precision, precision)
    t0 = time.perf_counter()
    out = enc.encode(x)
    print(f"  {modality} {precision}: {latlon.shape[0]:,} cells in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return out


def drift(e32: np.ndarray, e16: np.ndarray, n_queries: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ok = np.isfinite(e32[:, 0]) & np.isfinite(e16[:, 0])
    a, b = e32[ok], e16[ok]
    data = a[rng.choice(a.shape[0], n_queries // 2, replace=False)]
    rand = rng.standard_normal((n_queries - n_queries // 2, a.shape[1])).astype(np.float32)
    q = np.concatenate([data, rand])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d = np.empty((q.shape[0], a.shape[0]), dtype=np.float32)
    rho = []
    for i in range(q.shape[0]):
        s32, s16 = a @ q[i], b @ q[i]
        d[i] = np.abs(s32 - s16)
        rho.append(spearman(s32, s16))
    half = n_queries // 2
    return {
        "cells": int(a.shape[0]), "queries": int(q.shape[0]),
        "p99": float(np.quantile(d, 0.99)), "max": float(d.max()),
        "p99_data": float(np.quantile(d[:half], 0.99)), "p99_random": float(np.quantile(d[half:], 0.99)),
        "spearman_min": float(min(rho)), "spearman_median": float(np.median(rho)),
        "worst_norm_diff": float(np.linalg.norm(a - b, axis=1).max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True)
    p.add_argument("--region", default="usa")
    p.add_argument("--resolution", type=float, default=0.05)
    p.add_argument("--modalities", default="location,environment")
    p.add_argument("--worldclim")
    p.add_argument("--reuse")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--json")
    args = p.parse_args()

    from taxamap.cells import build_grid
    from taxamap.options import GridOptions

    _, grid = build_grid(GridOptions(region=args.region, resolution=args.resolution))
    latlon = grid.cell_latlon().astype(np.float32)
    results = {}
    for modality in args.modalities.split(","):
        arrays = {}
        for precision, tag in (("fp32", "fp32"), ("bf16-mixed", "bf16")):
            path = (Path(args.reuse) / f"{modality}_{args.region}_{args.resolution:g}_{tag}.npy"
                    if args.reuse else None)
            if path is not None and path.exists():
                arrays[tag] = np.load(path, mmap_mode="r")
                print(f"  {modality} {precision}: reused {path}", flush=True)
            else:
                arrays[tag] = embed(modality, precision, latlon, args)
                if path is not None:
                    np.save(path, arrays[tag])
        results[modality] = drift(np.asarray(arrays["fp32"]), np.asarray(arrays["bf16"]),
                                  args.queries)
        r = results[modality]
        print(f"{modality}: p99 |dscore| {r['p99']:.5f} (data {r['p99_data']:.5f}, random "
              f"{r['p99_random']:.5f}), max {r['max']:.5f}, Spearman min {r['spearman_min']:.6f} "
              f"median {r['spearman_median']:.6f}, worst ||e-e'|| {r['worst_norm_diff']:.4f} "
              f"-> {'within' if r['p99'] <= 0.002 else 'OVER'} the 0.002 bar", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
