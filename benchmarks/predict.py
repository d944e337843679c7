"""Cold vs warm ``taxamap predict`` over the contiguous USA (location modality).

    python benchmarks/predict.py [--resolution 0.05] [--baseline REV] [--repeat 3]

The location encoder runs at full size with GeoCLIP's real weights (TaxaBind's architecture); the
text encoder is the tiny test model (the real one needs the Hub). Cold = empty cache (cells are
embedded); warm = a new species on the same grid (cells come from the store). Also reports the
process start-up (import) time and the query path measured inside the process.

``--baseline REV`` also times the warm predict of the taxamap at git revision REV (checked out in
a temporary worktree) over the same stored grid, alternating runs of the two, and reports the
medians and their ratio: a refactor's cost measured in one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, models_dir


def run(args: list[str], env: dict, root: Path = ROOT) -> tuple[float, str]:
    """Wall seconds and stderr of ``taxamap ARGS`` run from the source tree at ``root``."""
    env = dict(env, PYTHONPATH=str(root))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "taxamap.cli", *args], env=env, cwd=root,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return wall, proc.stderr


def timing(stderr: str, name: str) -> float:
    import re

    m = re.search(rf"{name} ([0-9.]+) s", stderr)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--region", default="usa")
    parser.add_argument("--baseline", metavar="REV", help="also time the warm path at git REV")
    parser.add_argument("--repeat", type=int, default=3, help="warm runs per tree (median)")
    parser.add_argument("--cache", metavar="DIR", help="keep the cache (stores) here between "
                        "runs (default: a temporary folder; the cold run is then cold)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = models_dir(tmp / "models")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1",
                   TAXAMAP_CACHE=str(Path(args.cache).resolve() if args.cache else tmp / "cache"),
                   PYTHONWARNINGS="ignore")
        common = ["--region", args.region, "--resolution", str(args.resolution), "--models",
                  str(models), "--out", str(tmp / "out"), "--no-progress"]
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import taxamap.cli"], env=env, check=True)
        import_cli = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        python_start = time.perf_counter() - t
        cold, cold_err = run(["predict", "--species", "Cardinalis cardinalis", *common], env)
        warm, warm_err = run(["predict", "--species", "Cyanocitta cristata", *common], env)
        cells = next((ln for ln in cold_err.splitlines() if " cells of " in ln), "")
        query_path = sum(timing(warm_err, k) for k in ("query", "score", "write"))
        print(f"machine: {machine()}")
        print(cells)
        print(f"{'measure':<48} {'seconds':>9}")
        print(f"{'python start-up':<48} {python_start:>9.2f}")
        print(f"{'python + import taxamap.cli':<48} {import_cli:>9.2f}")
        print(f"{'cold predict (wall, cells embedded)':<48} {cold:>9.2f}")
        print(f"{'  of which embedding cells':<48} {timing(cold_err, 'cells'):>9.2f}")
        print(f"{'warm predict, new species (wall)':<48} {warm:>9.2f}")
        print(f"{'  query path in-process (prompt+score+write)':<48} {query_path:>9.2f}")
        print(f"{'    prompt embedding (incl. text model load)':<48} {timing(warm_err, 'query'):>9.2f}")
        print(f"{'    scoring':<48} {timing(warm_err, 'score'):>9.2f}")
        print(f"{'    writing GeoTIFF+HTML+PNG':<48} {timing(warm_err, 'write'):>9.2f}")
        print(f"{'cold / warm':<48} {cold / warm:>8.1f}x")
        if args.baseline:
            compare(args, common, env, tmp)


def baseline_tree(rev: str, where: Path) -> Path:
    """A worktree of ``rev`` (region presets importable from its own grids/ folder)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), rev],
                   check=True)
    link = where / "taxamap" / "grids"
    if not link.exists():
        link.symlink_to("../grids")
    return where


def table_species(n: int) -> list[str]:
    """``n`` binomials from taxamap's shipped table (they resolve offline)."""
    import csv

    with open(ROOT / "taxamap" / "data" / "taxonomy.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    step = max(1, len(rows) // (n + 1))
    return [f"{r['genus']} {r['species']}" for r in rows[step::step][:n]]


def compare(args, common: list[str], env: dict, tmp: Path) -> None:
    import statistics

    old = baseline_tree(args.baseline, tmp / "baseline")
    try:
        times: dict[str, list[float]] = {"baseline": [], "current": []}
        species = table_species(2 * args.repeat)
        for i in range(args.repeat):
            for name, root in (("baseline", old), ("current", ROOT)):
                sp = species[(2 * i + (name == "current")) % len(species)]
                wall, _ = run(["predict", "--species", sp, *common], env, root)
                times[name].append(wall)
        base, cur = (statistics.median(times[k]) for k in ("baseline", "current"))
        print(f"{'warm predict at ' + args.baseline + ' (median wall)':<48} {base:>9.2f}")
        print(f"{'warm predict now (median wall)':<48} {cur:>9.2f}")
        print(f"{'now / baseline':<48} {cur / base:>9.3f}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                       check=False)


if __name__ == "__main__":
    main()
