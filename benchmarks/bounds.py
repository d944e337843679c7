"""Inputs whose size outgrows their meaning (issue 15, section 4): peak memory and time of
``taxamap predict`` with a long species file, a region file that crosses itself everywhere and a
large occurrence file.

    python bounds.py [--root DIR] [--cap SECONDS] [--only species,region,html] [--species N,..]
                     [--stars N,..]

Every run is its own process, measured by the kernel (peak RSS of the child, like
``/usr/bin/time -v``) and stopped with Ctrl-C (SIGINT) after ``--cap`` seconds. ``--root`` runs
another checkout's taxamap (e.g. an export of an earlier revision) for before/after figures.
Tiny models, offline; the species maps are over a 2 x 2 degree box at 0.05 degrees (1,600 cells).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT

PROBE = (
    "import resource, signal, subprocess, sys, time\n"
    "cap = float(sys.argv[1])\n"
    "t = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)\n"
    "try:\n"
    "    out, err = p.communicate(timeout=cap)\n"
    "except subprocess.TimeoutExpired:\n"
    "    p.send_signal(signal.SIGINT)\n"
    "    try:\n"
    "        out, err = p.communicate(timeout=30)\n"
    "    except subprocess.TimeoutExpired:\n"
    "        p.kill()\n"
    "        out, err = p.communicate()\n"
    "import json\n"
    "print(json.dumps({'rc': p.returncode, 'seconds': time.perf_counter() - t,\n"
    "                  'rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,\n"
    "                  'stdout_lines': len(out.splitlines()),\n"
    "                  'last': (err.strip().splitlines() or [''])[-1][:300]}))\n"
)


def measured(args: list[str], root: Path, env: dict, cap: float) -> dict:
    """Run ``python -m taxamap.cli ARGS`` from ``root`` under the cap; its peak RSS and more."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(cap), sys.executable, *args],
                         cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def prompts(n: int) -> list[str]:
    """``n`` distinct seven-rank prompts with distinct binomials."""
    def word(i: int) -> str:
        return "".join(chr(97 + (i // 26 ** k) % 26) for k in range(4))
    side = math.isqrt(n - 1) + 1
    return [f"Animalia Chordata Aves Passeriformes Fringillidae G{word(g)} s{word(e)}"
            for g in range(side) for e in range(side)][:n]


def star(path: Path, n: int) -> Path:
    """A star of ``n`` vertices drawn with crossing edges, as GeoJSON."""
    import numpy as np

    k = n // 2 - 1
    while math.gcd(n, k) != 1:
        k -= 1
    angle = 2 * np.pi * np.arange(n + 1) * k / n
    ring = np.round(np.column_stack([-83 + np.cos(angle), 40 + np.sin(angle)]), 6).tolist()
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose taxamap runs")
    parser.add_argument("--cap", type=float, default=120.0, help="seconds per run (default 120)")
    parser.add_argument("--only", default="species,region,html")
    parser.add_argument("--species", default="2000,20000", help="species file sizes")
    parser.add_argument("--stars", default="1000,3000,1000000",
                        help="star vertex counts (a million took 13 GB before the fix)")
    opts = parser.parse_args()
    parts = opts.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(ROOT))
        from tests.helpers.tiny import write_models_dir

        models = write_models_dir(tmp / "models")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1", PYTHONWARNINGS="ignore",
                   TAXAMAP_CACHE=str(tmp / "cache"), PYTHONPATH=str(opts.root))
        grid = ["--bbox=-84,39,-82,41", "--resolution", "0.05", "--models", str(models)]
        base = ["-m", "taxamap.cli", "predict"]
        print(f"root {opts.root}, cap {opts.cap:.0f} s")
        # Cells embedded once, outside the measured runs.
        measured([*base, "--species", "Cardinalis cardinalis", *grid, "--out", str(tmp / "warm"),
                  "--no-progress"], opts.root, env, 600)
        if "species" in parts:
            print(f"{'species file':<28} {'peak RSS MiB':>12} {'seconds':>8} {'files out':>9}  end")
            for n in map(int, opts.species.split(",")):
                path = tmp / f"birds{n}.txt"
                path.write_text("\n".join(prompts(n)) + "\n")
                out = tmp / f"out{n}"
                r = measured([*base, "--species-file", str(path), *grid, "--out", str(out),
                              "--no-progress"], opts.root, env, opts.cap)
                files = len(list(out.glob("*"))) if out.exists() else 0
                end = "done" if r["rc"] == 0 else f"stopped at the cap (rc {r['rc']})"
                print(f"{n:>10,} prompts{'':<11} {r['rss_mib']:>12.0f} {r['seconds']:>8.1f} "
                      f"{files:>9,}  {end}")
        if "region" in parts:
            print(f"{'region file':<28} {'peak RSS MiB':>12} {'seconds':>8}  outcome")
            for n in map(int, opts.stars.split(",")):
                path = star(tmp / f"star{n}.geojson", n)
                r = measured([*base, "--species", "Cardinalis cardinalis", "--region", str(path),
                              "--cells", "all", *grid[1:], "--out", str(tmp / "star"),
                              "--no-progress"], opts.root, env, opts.cap)
                outcome = ("map written" if r["rc"] == 0 else "stopped at the cap"
                           if r["rc"] in (130, -signal.SIGINT, -signal.SIGKILL)
                           else r["last"].replace("taxamap: error: ", "refused: ")[:100])
                print(f"star, {n:>9,} vertices{'':<3} {r['rss_mib']:>12.0f} {r['seconds']:>8.1f}  "
                      f"{outcome}")
        if "html" in parts:
            import numpy as np

            n = 2_000_000
            rng = np.random.default_rng(0)
            occ = tmp / "occurrences.csv"
            np.savetxt(occ, np.column_stack([rng.uniform(39, 41, n), rng.uniform(-84, -82, n)]),
                       fmt="%.5f", delimiter=",", header="lat,lon", comments="")
            out = tmp / "html"
            r = measured([*base, "--species", "Cardinalis cardinalis", *grid, "--occurrences",
                          str(occ), "--out", str(out), "--no-progress"], opts.root, env,
                         max(opts.cap, 600))
            page = out / "cardinalis-cardinalis.html"
            size = page.stat().st_size / 2**20 if page.exists() else float("nan")
            print(f"{'occurrences':<28} {'peak RSS MiB':>12} {'seconds':>8}  HTML MB")
            print(f"{n:>10,} records{'':<11} {r['rss_mib']:>12.0f} {r['seconds']:>8.1f}  "
                  f"{size:.2f}")


if __name__ == "__main__":
    main()
