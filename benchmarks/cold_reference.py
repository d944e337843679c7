"""Cold ``taxamap predict`` over the USA at 0.05° vs GeoCLIP's reference location encoder on the
same points, in the same run; warm vs cold; encoder points/s vs the fp32 and bf16 GEMM bounds.

    nice python benchmarks/cold_reference.py \
        --models DIR [--baseline-root TREE] [--also-fp32] [--json OUT]

Cold = an empty cache (every cell embedded by the full-size location encoder, GeoCLIP's real
weights; ``--precision auto``, which is fp32 on a CPU without AVX512-BF16/AMX); the reference is
``geoclip.LocationEncoder`` (the pip wheel) embedding the grid's 326,257 points in batches of
1,024 under ``torch.inference_mode`` with the process's threads; warm = a new species over the
stored grid (process start-up included). ``--baseline-root`` also times the cold and warm
commands from another checkout (e.g. ``git worktree add /tmp/compact-base 131afc4``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, gemm_flops, machine


def predict(tree: Path, models: str, cache: str, species: str, out: str,
            precision: str = "auto") -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "taxamap.cli", "predict", "--species", species,
                           "--region", "usa", "--resolution", "0.05", "--models", models,
                           "--cache", cache, "--out", out, "--no-progress",
                           "--precision", precision],
                          env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return wall


def reference_seconds(latlon: np.ndarray, batch: int = 1024) -> float:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from geoclip import LocationEncoder

        ref = LocationEncoder().eval()
    points = torch.from_numpy(latlon.astype(np.float32))
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(points), batch):
            ref(points[s:s + batch])
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True)
    p.add_argument("--baseline-root")
    p.add_argument("--json")
    p.add_argument("--also-fp32", action="store_true",
                   help="also time a cold --precision fp32 predict of this tree in the same run")
    args = p.parse_args()

    import torch

    from taxamap.cells import build_grid
    from taxamap.devices import pick_device
    from taxamap.options import GridOptions

    pick_device("cpu")
    _, grid = build_grid(GridOptions(region="usa", resolution=0.05))
    latlon = grid.cell_latlon()
    out: dict = {"machine": machine(), "cells": int(len(latlon)),
                 "threads": torch.get_num_threads()}
    flop_pt = 3 * (512 * 1024 + 2 * 1024 * 1024 + 1024 * 512) * 2
    out["fp32_gemm_gflops"] = round(gemm_flops() / 1e9, 1)
    out["bf16_gemm_gflops"] = round(
        gemm_flops(n=4096, repeats=3, dtype=torch.bfloat16) / 1e9, 1)  # AMX peaks at large n
    trees = [("this", ROOT)] + ([("baseline", Path(args.baseline_root))]
                                if args.baseline_root else [])
    with tempfile.TemporaryDirectory(prefix="cold-ref-") as tmp:
        for name, tree in trees:
            cache, files = f"{tmp}/{name}-cache", f"{tmp}/{name}-out"
            cold = predict(tree, args.models, cache, "Cardinalis cardinalis", files)
            warm = [predict(tree, args.models, cache, s, files)
                    for s in ("Cyanocitta cristata", "Poecile atricapillus")]
            out[name] = {"cold_s": round(cold, 1), "warm_s": [round(w, 2) for w in warm],
                         "cold_over_warm": round(cold / min(warm), 1)}
            print(name, out[name], flush=True)
    if args.also_fp32:
        with tempfile.TemporaryDirectory(prefix="cold-fp32-") as tmp:
            cold = predict(ROOT, args.models, f"{tmp}/cache", "Cardinalis cardinalis",
                           f"{tmp}/out", precision="fp32")
        out["this"]["cold_fp32_s"] = round(cold, 1)
        print("this, --precision fp32: cold", out["this"]["cold_fp32_s"], flush=True)
    ref = reference_seconds(latlon)
    out["reference_encoder_s"] = round(ref, 1)
    out["reference_pts_s"] = round(len(latlon) / ref)
    for name, _ in trees:
        out[name]["reference_over_cold"] = round(ref / out[name]["cold_s"], 2)
    if "cold_fp32_s" in out["this"]:
        out["this"]["reference_over_cold_fp32"] = round(ref / out["this"]["cold_fp32_s"], 2)
    from taxamap.models.location import load_location_encoder

    enc = load_location_encoder(args.models, precision="auto")
    sample = latlon[:40000]
    enc.encode(sample[:2048])
    t = time.perf_counter()
    enc.encode(sample)
    pts = len(sample) / (time.perf_counter() - t)
    out["encoder"] = {"precision": enc.precision, "pts_s": round(pts),
                      "of_fp32_bound": round(pts * flop_pt / (out["fp32_gemm_gflops"] * 1e9), 2),
                      "of_bf16_bound": round(pts * flop_pt / (out["bf16_gemm_gflops"] * 1e9), 2)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
