"""Shared set-up for the benchmarks: a models folder with GeoCLIP's real location weights in the
MVRL/ecogeo layout (same architecture and size as TaxaBind's) next to the tiny test models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def geoclip_weights() -> Path:
    import geoclip

    return Path(geoclip.__file__).parent / "model" / "weights" / "location_encoder_weights.pth"


def models_dir(target: Path, real_location: bool = True) -> Path:
    """Tiny models for every repo; the location encoder at full size with GeoCLIP's weights."""
    import json

    import torch
    from safetensors.torch import save_file

    from tests.helpers.tiny import write_models_dir

    write_models_dir(target)
    if real_location:
        state = torch.load(geoclip_weights(), map_location="cpu", weights_only=True)
        folder = target / "MVRL" / "ecogeo"
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(
            {"dim": 512, "encoded_size": 256, "input_size": 2, "sigma": [1, 16, 256]}))
    return target


def start_serve(options: list[str], tree: Path = ROOT):
    """``taxamap serve OPTIONS --port 0 --no-progress`` from checkout ``tree`` in a child process,
    offline: (the process, its URL once it serves, its stderr lines as they come)."""
    import subprocess
    import threading

    env = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1", PYTHONPATH=str(tree),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "taxamap.cli", "serve", *options, "--port", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise SystemExit("the server did not start:\n" + "".join(log))
    return proc, line.split()[1], log


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def gemm_flops(n: int = 2048, repeats: int = 5, device: str = "cpu", dtype=None) -> float:
    """Measured dense matmul rate (FLOP/s) of this machine in the same process."""
    import time

    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
