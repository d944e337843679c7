"""Reference panels (issue 18): how close the default panel's per-cell statistics come to the
exact ``relative``, what they cost, richness of every table species, and query latencies.

    python panel.py [--cache DIR] [--only accuracy,stats,richness,latency,basis] [--sample 20000]

Cells: the contiguous USA at 0.05 deg (326,257 cells) embedded with GeoCLIP's real location
weights (TaxaBind's location architecture; ``taxamap embed --region usa --resolution 0.05`` into
``--cache`` once, a few minutes). Panel prompts: the shipped table's 2,435 species through a text
tower. TaxaBind's text weights cannot be downloaded here, so two stand-ins are measured: the tiny
test tower (width 16: prompt embeddings crowd together, the hardest case for float16 knots) and a
ViT-B/16-size tower with random weights (``--text full``). The interpolation bound does not depend
on the weights; the float16 part depends on how densely the panel's scores crowd at a cell, which
is reported (and ``--models DIR`` reruns all of it on real weights).

* accuracy: exact ``relative`` vs the knots' interpolation for K in 65/101/129, float16 and float32
  knots, over every cell for 20 queries (16 panel members, 4 clades), and the worst case over all
  possible query scores at ``--sample`` cells;
* stats: computing and storing the default panel's statistics once, reading them, one query's
  ``relative`` from them, and a 50-species user panel's exact ``relative``;
* richness: all table species at percentile:90 in a child process as the command would run it
  (grid, stores, panel cache, richness, GeoTIFF): wall per stage and peak RSS;
* latency: a table species' prompt embedding from the panel cache vs the text tower (full size),
  ``relative`` of one map from the statistics, species-at from cells held in memory;
* basis: with two modalities (GeoCLIP location + the tiny environment encoder on synthetic
  WorldClim layers, USA at 0.25 deg), how often ``relative`` computed per modality and averaged
  would rank two species at a cell against their fused scores (what the map shows).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine, models_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TAXAMAP_OFFLINE", "1")


def grid_and_stores(models: Path, cache: Path, region: str = "usa", resolution: float = 0.05,
                    modalities=("location",), **extra):
    from taxamap.options import MapOptions
    from taxamap.scorer import Scorer

    scorer = Scorer(MapOptions(region=region, resolution=resolution, models=str(models),
                               cache=str(cache), modalities=modalities, **extra))
    return scorer.grid, scorer.embed_cells().stores


def text_encoder(models: Path):
    from taxamap.models.text import load_text_encoder

    return load_text_encoder(str(models), device="cpu", backend="torch")


def accuracy(models: Path, cache: Path, sample: int, label: str) -> None:
    from taxamap.panel import default_panel, prepare_panel
    from taxamap.panel.cells import store_blocks
    from taxamap.panel.relative import (SCORE_CELLS, count_below, knot_ranks, panel_scores,
                                        relative_from_knots)
    from taxamap.score import fuse_many

    grid, stores = grid_and_stores(models, cache)
    encoder = text_encoder(models)
    t = time.perf_counter()
    ref = prepare_panel(default_panel(), encoder, cache)
    print(f"[{label}] panel prompts ready in {time.perf_counter() - t:.1f} s ({encoder.ref})")
    vectors, size = ref.vectors, len(ref)
    members = list(range(0, size, size // 16))[:16]
    clades = ["Animalia Chordata Aves", "Animalia Chordata Mammalia",
              "Animalia Chordata Aves Passeriformes Cardinalidae", "Plantae"]
    queries = np.concatenate([vectors[members], encoder.encode_text(clades)])
    who = members + [None] * len(clades)
    denom = np.array([size - (m is not None) for m in who], np.float32)[:, None]
    ks = (65, 101, 129)
    err = {(k, d): [0.0, 0.0, 0, 0] for k in ks for d in ("f16", "f32")}  # max, sum, >0.01, n
    worst = {k: 0.0 for k in ks}
    crowd = 0
    rng = np.random.default_rng(0)
    n = grid.n_cells
    pick = np.zeros(n, bool)
    pick[rng.choice(n, size=min(sample, n), replace=False)] = True
    t = time.perf_counter()
    for rows, block in store_blocks(stores):
        for start in range(0, rows.stop - rows.start, SCORE_CELLS):
            sub = slice(start, min(start + SCORE_CELLS, rows.stop - rows.start))
            part = {m: e[sub] for m, e in block.items()}
            scores = panel_scores(part, vectors, "mean")
            q, _ = fuse_many(part, queries, "mean")
            for s, m in enumerate(who):
                if m is not None:
                    q[s] = scores[m]
            ordered = np.sort(scores.T, axis=1)
            ok = np.isfinite(ordered[:, 0])
            ordered, q = ordered[ok], q[:, ok]
            exact = count_below(ordered, q) / denom
            here = pick[rows.start + sub.start:rows.start + sub.stop][ok]
            if here.any():  # how densely the panel's scores crowd within one float16 step
                few = ordered[here]
                step = np.spacing(few.astype(np.float16)).astype(np.float32)
                upper = count_below(few, (few + step).T).T
                crowd = max(crowd, int((upper - np.arange(size)[None]).max()))
            for k in ks:
                ranks = knot_ranks(size, k)
                for kind, dtype in (("f16", np.float16), ("f32", np.float32)):
                    knots = ordered[:, ranks].astype(dtype)
                    approx = relative_from_knots(knots, size, q, who)
                    diff = np.abs(approx - exact)
                    e = err[(k, kind)]
                    e[0] = max(e[0], float(diff.max()))
                    e[1] += float(diff.sum())
                    e[2] += int((diff > 0.01).sum())
                    e[3] += diff.size
                # Every possible query score at the sampled cells: at each panel score and just
                # above it (the steps of the exact count).
                knots = ordered[here][:, ranks].astype(np.float16)
                if knots.shape[0]:
                    cand = np.concatenate([ordered[here], np.nextafter(ordered[here], 2)], 1).T
                    truth = count_below(ordered[here], cand) / size
                    approx = relative_from_knots(knots, size, cand)
                    worst[k] = max(worst[k], float(np.abs(approx - truth).max()))
    print(f"[{label}] accuracy pass over {n:,} cells x {len(who)} queries: "
          f"{time.perf_counter() - t:.1f} s; panel of {size:,}; at most {crowd} panel scores "
          "within one float16 step of each other at any cell")
    print(f"{'K':>4} {'knots':>6} {'bound 1/(K-1)':>14} {'max |err|':>10} {'mean |err|':>11} "
          f"{'> 0.01':>8} {'worst over all s':>17}")
    for k in ks:
        for kind in ("f16", "f32"):
            e = err[(k, kind)]
            w = f"{worst[k]:.5f}" if kind == "f16" else ""
            print(f"{k:>4} {kind:>6} {1 / (k - 1):>14.5f} {e[0]:>10.5f} {e[1] / e[3]:>11.6f} "
                  f"{e[2]:>8,} {w:>17}")


def stats_costs(models: Path, cache: Path) -> None:
    from taxamap.panel import default_panel, panel_from_file, prepare_panel, relative_scores
    from taxamap.panel.relative import load_or_build_stats
    from taxamap.score import fuse_many

    grid, stores = grid_and_stores(models, cache)
    encoder = text_encoder(models)
    ref = prepare_panel(default_panel(), encoder, cache)
    for path in (stores["location"].location,):
        from taxamap.store import derived_folder

        for old in derived_folder(path).glob("panel-*"):
            old.unlink()
    t = time.perf_counter()
    stats = load_or_build_stats(stores, ref.ref, ref.panel.digest, ref.vectors, "mean")
    build = time.perf_counter() - t
    size = stats.path.stat().st_size
    t = time.perf_counter()
    stats = load_or_build_stats(stores, ref.ref, ref.panel.digest, ref.vectors, "mean")
    read = time.perf_counter() - t
    cells = stores["location"].read()
    q, _ = fuse_many({"location": cells}, ref.vectors[:1], "mean")
    times = []
    for _ in range(5):
        t = time.perf_counter()
        stats.relative(q, [0])
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        listed = Path(tmp) / "fifty.txt"
        listed.write_text("\n".join(ref.panel.labels[::48][:50]) + "\n")
        user = prepare_panel(panel_from_file(listed), encoder, cache, progress=False)
        t = time.perf_counter()
        relative_scores(user, stores, q, [None], "mean")
        exact50 = time.perf_counter() - t
    print(f"default panel statistics ({grid.n_cells:,} cells, K={stats.knots.shape[1]}): computed "
          f"and stored in {build:.1f} s, {size / 2**20:.0f} MiB; read back (CRC checked) in "
          f"{read:.2f} s; one map's relative from them {1000 * min(times):.0f} ms (best of 5)")
    print(f"a 50-species user panel, exact relative of one map from the store: {exact50:.2f} s")


def richness_run(models: Path, cache: Path, text: str) -> None:
    """``taxamap richness --region usa --resolution 0.05`` (all 2,435 table species, the panel's
    prompts from the cache) as a user runs it: wall time and the child's peak RSS."""
    from common import gemm_flops

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore",
                   TAXAMAP_OFFLINE="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "taxamap.cli", "richness", "--region", "usa",
               "--resolution", "0.05", "--models", str(models), "--cache", str(cache),
               "--out", tmp, "--no-progress"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(proc.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    flops = 2 * 326257 * 512 * 2435
    rate = gemm_flops()
    print(f"taxamap richness --region usa --resolution 0.05 (2,435 table species, {text} text "
          f"tower's panel cache, percentile:90, tif+html+png): wall {wall:.1f} s, peak RSS "
          f"{peak:,.0f} MiB; the GEMM is {flops / 1e9:.0f} GFLOP = {flops / rate:.1f} s at the "
          f"{rate / 1e9:.0f} GFLOP/s measured now")
    print("  " + " | ".join(line for line in proc.stderr.splitlines() if "richness of" in line))


def web(models: Path, cache: Path) -> None:
    """The web app's server time over the USA at 0.05 deg with the full-size text tower:
    /api/species (2,435 species ranked at a cell) and /api/map for table species whose prompt
    embeddings come from the panel cache (each species mapped once: no map cache hit), and what
    encoding such a prompt with the text tower would cost instead."""
    import taxamap
    from taxamap.serve.app import MapService

    # The server's own map cache (32 maps): every species below is asked once, so none is a
    # cache hit, but the overlay drawn for the answer reuses the map scored for it, as in
    # `taxamap serve` (map_cache=0 scored each map twice and overstated /api/map by ~50 ms).
    session = taxamap.open_session(region="usa", resolution=0.05, models=str(models),
                                   cache=str(cache), progress=False)
    service = MapService(session)
    from taxamap.panel import default_panel

    names = list(default_panel().labels)
    rng = np.random.default_rng(1)
    picks = [names[int(i)] for i in rng.choice(len(names), 60, replace=False)]

    parts: dict[str, list[float]] = {"embed": [], "score": [], "stats": [], "draw": []}

    def map_ms(batch):
        out = []
        for name in batch:
            answer = service.map_answer({"species": name})
            out.append(answer["elapsed_ms"])
            for k, v in answer.get("timings_ms", {}).items():
                parts.setdefault(k, []).append(v)
        return out

    assert session.panel.ready, "the panel's prompts are not in this cache"
    text = session.encoders.text()  # what a name outside the panel would need
    encoded = []
    for name in picks[:20]:
        prompt = session.panel.panel.prompts[names.index(name)]
        t = time.perf_counter()
        text.encode_text([prompt])
        encoded.append(1000 * (time.perf_counter() - t))
    places = ((40.0, -83.0), (35.0, -106.0), (45.0, -120.0), (30.0, -90.0), (42.0, -75.0))
    service.species_answer({"lat": "40.0", "lon": "-83.0"})  # the panel held (cache read)
    species = [service.species_answer({"lat": str(a), "lon": str(o)})["elapsed_ms"]
               for a, o in places for _ in range(3)]
    cached = map_ms(picks[20:60])
    print(f"web app, USA 0.05 deg ({session.n_cells:,} cells), server time: /api/species "
          f"(top 10 of 2,435) p50 {np.median(species):.1f} ms, max {max(species):.1f} ms; "
          f"/api/map of a table species p50 {np.median(cached):.1f} ms, its embedding from "
          f"the panel cache (n={len(cached)}); encoding the prompt instead would add "
          f"{np.median(encoded):.1f} ms p50 (the full-size text tower, NumPy, n={len(encoded)})")
    print("  /api/map p50 by part: " + ", ".join(f"{k} {np.median(v):.1f} ms"
                                                 for k, v in parts.items() if v))


def latency(models: Path, cache: Path) -> None:
    from taxamap.panel import default_panel, prepare_panel, species_at
    from taxamap.panel.vectors import read_bank
    from taxamap.models.text import load_text_encoder

    grid, stores = grid_and_stores(models, cache)
    numpy_tower = load_text_encoder(str(models), device="cpu", backend="numpy")
    ref = prepare_panel(default_panel(), text_encoder(models), cache)
    prompt = ref.panel.prompts[1234]
    numpy_tower.encode_text([prompt])
    encode = []
    for _ in range(7):
        t = time.perf_counter()
        numpy_tower.encode_text([ref.panel.prompts[int(np.random.randint(len(ref)))]])
        encode.append(time.perf_counter() - t)
    t = time.perf_counter()
    bank = read_bank(ref.ref, cache)
    read = time.perf_counter() - t
    lookups = []
    for _ in range(7):
        t = time.perf_counter()
        ref.vector_of(prompt)
        lookups.append(time.perf_counter() - t)
    cells = stores["location"].read()
    norms = np.linalg.norm(cells, axis=1, keepdims=True)
    held = {"location": np.where(norms > 0, cells / np.where(norms > 0, norms, 1), 0)}
    at = []
    for lat, lon in ((40.0, -83.0), (35.0, -106.0), (45.0, -120.0), (30.0, -90.0)):
        t = time.perf_counter()
        species_at(ref, grid, held, lat, lon, "mean", top=10)
        at.append(time.perf_counter() - t)
    print(f"text tower ({numpy_tower.ref}, NumPy, as a web session embeds one prompt): "
          f"{1000 * np.median(encode):.0f} ms median per prompt; from the panel cache: "
          f"{1e6 * np.median(lookups):.1f} us (the cache read once per process: "
          f"{1000 * read:.0f} ms, {len(bank.prompts):,} prompts)")
    print(f"species-at from cells in memory (2,435 species ranked): "
          f"{1000 * np.median(at):.1f} ms median")


def basis(models: Path, cache: Path) -> None:
    from taxamap.panel import default_panel, prepare_panel
    from taxamap.panel.cells import store_blocks
    from taxamap.panel.relative import count_below
    from taxamap.score import fuse_many

    sys.path.insert(0, str(ROOT))
    from tests.worldclim_fixtures import write_rasters

    wc = cache / "synthetic-worldclim"
    if not wc.exists():
        wc.mkdir(parents=True)
        write_rasters(wc, height=360, width=720)
    grid, stores = grid_and_stores(models, cache, resolution=0.25,
                                   modalities=("location", "environment"), worldclim=str(wc))
    ref = prepare_panel(default_panel(), text_encoder(models), cache)
    v = ref.vectors
    size = len(ref)
    rng = np.random.default_rng(0)
    inverted = pairs = 0
    top_changed = cells_seen = 0
    for _rows, block in store_blocks(stores):
        fused, per = fuse_many(block, v, "mean")
        ok = np.isfinite(fused[0])
        fused = fused[:, ok]
        per = {m: s[:, ok] for m, s in per.items()}
        rel_fused = count_below(np.sort(fused.T, 1), fused) / (size - 1)
        rel_mod = np.mean([count_below(np.sort(s.T, 1), s) / (size - 1) for s in per.values()], 0)
        a = rng.integers(0, size, 4000)
        b = rng.integers(0, size, 4000)
        df = fused[a] - fused[b]
        dr = rel_mod[a] - rel_mod[b]
        inverted += int(((df > 0) & (dr < 0)).sum() + ((df < 0) & (dr > 0)).sum())
        pairs += int((df != 0).sum())
        top_changed += int((np.argmax(rel_fused, 0) != np.argmax(rel_mod, 0)).sum())
        cells_seen += fused.shape[1]
    print(f"two modalities (location + environment, USA 0.25 deg, {cells_seen:,} cells): ranking "
          f"species at a cell by the mean of per-modality relatives contradicts their fused "
          f"scores for {inverted / max(pairs, 1):.1%} of species pairs, and changes the top "
          f"species at {top_changed / max(cells_seen, 1):.1%} of cells; relative on fused "
          "contradicts it for none (it is a monotone function of the fused score at each cell)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "panel-bench")
    parser.add_argument("--models", type=Path, default=None,
                        help="a models folder with real weights (default: GeoCLIP location "
                             "weights + the tiny test models)")
    parser.add_argument("--text", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--only", default="accuracy,stats,richness,latency,basis,web")
    parser.add_argument("--sample", type=int, default=20000)
    args = parser.parse_args()
    only = set(args.only.split(","))
    cache = args.cache / "cache"
    models = args.models
    if models is None:
        models = args.cache / f"models-{args.text}"
        if not models.exists():
            models_dir(models)
            if args.text == "full":
                from serve import full_size_text_tower

                full_size_text_tower(models)
    print(f"machine: {machine()}")
    if "accuracy" in only:
        accuracy(models, cache, args.sample, args.text)
    if "stats" in only:
        stats_costs(models, cache)
    if "richness" in only:
        richness_run(models, cache, args.text)
    if "latency" in only:
        latency(models, cache)
    if "basis" in only:
        basis(models, cache)
    if "web" in only:
        web(models, cache)


if __name__ == "__main__":
    main()
