"""What the store's integrity checks cost, and what block claims save.

    python integrity.py [--resolution 0.05] [--cache DIR] [--repeat 5]
    python integrity.py --concurrent [--baseline REV] [--region ohio --resolution 0.02]

Default: a USA store (location modality; the tiny test encoder: the check reads bytes, whatever
the weights made them) and, over it, the reading that a warm ``predict`` does
(``scorer.score_stores``, one query) with the read-time CRC check (a fresh store object: every
block checked) and without (the same blocks marked verified), the CRC alone, the cheap open-time
check (records and file sizes) and the full ``--verify`` check; then warm ``taxamap predict``
walls for context, and the store's bytes on disk per cell.

``--concurrent``: two ``taxamap embed`` processes started together on one grid and cache (GeoCLIP's
real location weights), their summed CPU seconds (``getrusage`` of the children) and the blocks
each computed, against one run alone; with ``--baseline REV``, the same for the taxamap of git
revision REV (exported with ``git archive`` into a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, models_dir


def _env(cache: Path, root: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1", TAXAMAP_CACHE=str(cache),
                PYTHONWARNINGS="ignore", PYTHONPATH=str(root))


def _taxamap(args: list[str], env: dict, root: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "taxamap.cli", *args], env=env, cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return proc


def _median(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_check(args) -> None:
    import zlib

    import numpy as np

    from taxamap.scorer import score_stores
    from taxamap.store import EmbeddingStore

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(args.cache).resolve() if args.cache else tmp / "cache"
        models = models_dir(tmp / "models", real_location=False)
        env = _env(cache, ROOT)
        grid = ["--region", args.region, "--resolution", str(args.resolution), "--models",
                str(models), "--no-progress"]
        t = time.perf_counter()
        embedded = _taxamap(["embed", *grid], env)
        embed_s = time.perf_counter() - t
        location = embedded.stdout.split("\t")[1]
        key = _key(location)
        opened = lambda: EmbeddingStore.open_existing(location, key)  # noqa: E731
        store = opened()
        query = np.random.default_rng(0).normal(size=(1, store.dim)).astype(np.float32)

        def scored(checked: bool) -> tuple[float, float]:
            """(wall, CPU of all threads) seconds of one scoring read."""
            s = opened()
            # The cheap check, as embed_cells makes it before scoring; or the full one, after
            # which every block counts as verified and the read checks nothing.
            s.pending_chunks(verify=not checked)
            t, c = time.perf_counter(), time.process_time()
            score_stores({"location": s}, query, "mean")
            return time.perf_counter() - t, time.process_time() - c

        scored(True)  # page cache warm, as a warm predict finds it
        runs: dict[bool, list] = {True: [], False: []}
        for _ in range(args.repeat):  # interleaved: a shared machine's load hits both alike
            for checked in (True, False):
                runs[checked].append(scored(checked))
        with_check, without = (statistics.median(w for w, _ in runs[k]) for k in (True, False))
        cpu_with, cpu_without = (statistics.median(c for _, c in runs[k]) for k in (True, False))
        raw = [np.asarray(store.emb[store.chunk_slice(i)]) for i in range(store.n_chunks)]
        crc = _median(lambda: [zlib.crc32(np.ascontiguousarray(b)) for b in raw], args.repeat)
        cheap = _median(lambda: opened().pending_chunks(), args.repeat)
        full = _median(lambda: opened().pending_chunks(verify=True), args.repeat)
        walls = []
        for species in ("Cardinalis cardinalis", "Cyanocitta cristata", "Turdus migratorius"):
            t = time.perf_counter()
            _taxamap(["predict", "--species", species, *grid, "--out", str(tmp / "out")], env)
            walls.append(time.perf_counter() - t)
        size = sum(p.stat().st_blocks * 512 for p in Path(location).rglob("*") if p.is_file())
        print(f"machine: {machine()}")
        print(f"store: {store.n_cells:,} cells, {store.n_chunks} blocks of {store.chunk_cells:,} "
              f"({args.region} {args.resolution} deg, location); embedded in {embed_s:.1f} s")
        print(f"{'measure':<58} {'seconds':>9}")
        print(f"{'score_stores, 1 query, read-time CRC check: wall (median)':<58} {with_check:>9.3f}")
        print(f"{'  the same, blocks already verified: wall (median)':<58} {without:>9.3f}")
        print(f"{'  check cost, wall':<58} {with_check - without:>9.3f}")
        print(f"{'score_stores with the check: CPU, all threads (median)':<58} {cpu_with:>9.3f}")
        print(f"{'  the same, blocks already verified: CPU (median)':<58} {cpu_without:>9.3f}")
        print(f"{'  check cost, CPU':<58} {cpu_with - cpu_without:>9.3f}")
        print(f"{'CRC-32 of every block alone (median)':<58} {crc:>9.3f}")
        print(f"{'open-time check: records + chunk file sizes':<58} {cheap:>9.3f}")
        print(f"{'full check (embed --verify, cache verify)':<58} {full:>9.3f}")
        print(f"{'warm taxamap predict, wall (median of 3 species)':<58} "
              f"{statistics.median(walls):>9.2f}")
        print(f"store on disk: {size / 2**20:,.1f} MiB = {size / store.n_cells:,.0f} bytes per cell "
              f"(float16 x {store.dim} = {2 * store.dim} bytes, the last block padded)")


def _key(location: str) -> str:
    import json

    return json.loads((Path(location) / "zarr.json").read_text())["attributes"]["key"]


def _cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _embed_runs(root: Path, n: int, grid: list[str], tmp: Path) -> tuple[float, float, list[int]]:
    """``n`` concurrent ``taxamap embed`` runs of the tree at ``root`` on one fresh cache: (CPU
    seconds of them all, wall seconds, blocks each computed)."""
    cache = Path(tempfile.mkdtemp(dir=tmp))
    env = _env(cache, root)
    before = _cpu_of_children()
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "taxamap.cli", "embed", *grid], env=env,
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t
    if any(p.returncode for p in procs):
        raise SystemExit("\n".join(err for _, err in outs))
    blocks = [int(out.split("\t")[2].split()[0]) for out, _ in outs]
    return _cpu_of_children() - before, wall, blocks


def concurrent(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = models_dir(tmp / "models")
        grid = ["--region", args.region, "--resolution", str(args.resolution), "--models",
                str(models), "--no-progress"]
        trees = {"current": ROOT}
        if args.baseline:
            old = tmp / "baseline"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            (old / "taxamap" / "grids").symlink_to("../grids")
            trees = {args.baseline: old, **trees}
        print(f"machine: {machine()}")
        print(f"{args.region} {args.resolution} deg, location (GeoCLIP's real weights)")
        print(f"{'tree':<12} {'runs':>4} {'CPU s':>8} {'wall s':>8}  blocks computed")
        for name, root in trees.items():
            for n in (1, 2):
                cpu, wall, blocks = _embed_runs(root, n, grid, tmp)
                print(f"{name:<12} {n:>4} {cpu:>8.1f} {wall:>8.1f}  {' + '.join(map(str, blocks))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", default=None)
    parser.add_argument("--resolution", type=float, default=None)
    parser.add_argument("--cache", metavar="DIR", help="keep the store here between runs")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrent", action="store_true",
                        help="two concurrent embeds' CPU instead of the check's cost")
    parser.add_argument("--baseline", metavar="REV", help="with --concurrent: also at git REV")
    args = parser.parse_args()
    if args.concurrent:
        args.region, args.resolution = args.region or "ohio", args.resolution or 0.02
        concurrent(args)
    else:
        args.region, args.resolution = args.region or "usa", args.resolution or 0.05
        read_check(args)


if __name__ == "__main__":
    main()
