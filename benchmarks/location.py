"""Location encoder throughput on this machine vs its measured fp32 GEMM rate.

    python benchmarks/location.py [--points 20000] [--device cpu]

Prints points/s for taxamap's encoder (subnormals flushed, as loaded) and for the same weights with
subnormals kept, the FLOPs per point, and the fraction of the GEMM-bound rate reached.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import gemm_flops, geoclip_weights, machine


def flops_per_point(encoder) -> float:
    """2 x multiply-adds of every Linear layer (the Fourier features and sums are negligible)."""
    import torch

    total = 0
    for module in encoder.module.modules():
        if isinstance(module, torch.nn.Linear):
            total += 2 * module.in_features * module.out_features
    return float(total)


def points_per_second(encoders: list, latlon: np.ndarray, rounds: int = 5) -> list[float]:
    """Best-of-``rounds`` rate of each encoder, measured in alternation so that a busy moment of
    the machine does not favour one of them."""
    for enc in encoders:
        enc.encode(latlon[:1024])
    best = [float("inf")] * len(encoders)
    for _ in range(rounds):
        for i, enc in enumerate(encoders):
            t = time.perf_counter()
            enc.encode(latlon)
            best[i] = min(best[i], time.perf_counter() - t)
    return [latlon.shape[0] / b for b in best]


def main() -> None:
    import torch

    from taxamap.devices import pick_device
    from taxamap.models.location import LocationEncoder, load_location_encoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = pick_device(args.device)
    rng = np.random.default_rng(0)
    latlon = np.c_[rng.uniform(-60, 75, args.points), rng.uniform(-180, 180, args.points)]

    flushed = load_location_encoder(checkpoint=geoclip_weights(), device=device)
    raw_state = torch.load(geoclip_weights(), map_location="cpu", weights_only=True)
    raw = LocationEncoder(raw_state, ref="geoclip-raw", device=device)
    fpp = flops_per_point(flushed)
    gemm = gemm_flops(device=device)
    rate, rate_raw = points_per_second([flushed, raw], latlon)
    gemm = max(gemm, gemm_flops(device=device))
    bound = gemm / fpp
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"{'measure':<44} {'value':>14}")
    print(f"{'fp32 GEMM rate (2048^3, same run)':<44} {gemm / 1e9:>10.1f} GFLOP/s")
    print(f"{'FLOPs per point':<44} {fpp / 1e6:>11.2f} MFLOP")
    print(f"{'GEMM-bound rate':<44} {bound:>10.0f} pts/s")
    print(f"{'location encoder, subnormals flushed':<44} {rate:>10.0f} pts/s")
    print(f"{'location encoder, subnormals kept':<44} {rate_raw:>10.0f} pts/s")
    print(f"{'fraction of GEMM bound (flushed)':<44} {rate / bound:>14.2f}")
    print(f"{'speed-up from flushing subnormals':<44} {rate / rate_raw:>13.2f}x")


if __name__ == "__main__":
    main()
