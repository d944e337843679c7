"""Peak memory (RSS) of ``taxamap embed`` for a grid and for one with ~10x the cells.

    python benchmarks/rss.py

Each run is its own process, measured by the kernel (ru_maxrss of the child). Streaming blocks
through the store should keep the peak nearly flat as the grid grows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, models_dir

PROBE = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "assert p.returncode == 0, p.stderr\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def peak_rss_mib(args: list[str], env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, sys.executable, "-m", "taxamap.cli", *args],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = models_dir(tmp / "models", real_location=False)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1",
                   TAXAMAP_CACHE=str(tmp / "cache"), PYTHONWARNINGS="ignore")
        rows = []
        for label, region, res in (("usa 0.1 deg", "usa", "0.1"),
                                   ("usa 0.0316 deg (~10x cells)", "usa", "0.0316")):
            args = ["embed", "--region", region, "--resolution", res, "--models", str(models),
                    "--no-progress"]
            rows.append((label, peak_rss_mib(args, env)))
        print(f"machine: {machine()}")
        print(f"{'grid':<32} {'peak RSS MiB':>12}")
        for label, rss in rows:
            print(f"{label:<32} {rss:>12.0f}")
        print(f"{'ratio (10x cells / 1x)':<32} {rows[1][1] / rows[0][1]:>12.2f}")


if __name__ == "__main__":
    main()
