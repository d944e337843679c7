"""Few-shot maps on real data: taxamap's ``fitted`` band vs elapid's MaxEnt on the same folds.

    python benchmarks/fit.py [--resolution 0.05] [--blocks 0.5] [--seed 0]

Data that ships offline: elapid's ``ariolimax.gpkg`` (1,595 presences and 4,990 background
points of the banana slug in California, with six covariates at each point: surface temperature,
leaf area index and cloud cover, mean and sd). Cells: California at 0.05 degree, embedded once
with GeoCLIP's published location-encoder weights (TaxaBind's location architecture and starting
point) into an :class:`~taxamap.store.EmbeddingStore`; the fit reads that store (no cell is
re-embedded).

Protocol: every point on a grid cell is one sample (``thin=False``, as MaxEnt sees points);
:func:`taxamap.products.fit.fit_maps` deals 0.5 degree blocks to 5 spatial folds. MaxEnt
(``elapid.MaxentModel()``, default features and regularisation) is fitted on each fold's training
points' six covariates and scored on its held-out points; both AUCs come from
:func:`taxamap.products.evaluate.roc_auc` on exactly the same held-out points. The ``fused`` and
``combined`` rows use a stand-in prior (the location embedding of a point in the Santa Cruz
mountains as the query): the TaxaBind text tower cannot be downloaded here.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from common import geoclip_weights, machine


def ariolimax_path() -> Path:
    spec = importlib.util.find_spec("elapid")
    if spec is None:
        raise SystemExit("elapid is not installed: pip install elapid")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "ariolimax.gpkg"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=float, default=0.05)
    ap.add_argument("--blocks", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import elapid
    import geopandas as gpd

    from taxamap.products.evaluate import roc_auc
    from taxamap.products.fit import cells_of_points, fit_maps
    from taxamap.grid import make_grid
    from taxamap.models.location import load_location_encoder
    from taxamap.geography import resolve_region
    from taxamap.score import fuse
    from taxamap.store import EmbeddingStore

    print(f"machine: {machine()}")
    region = resolve_region("california")
    grid = make_grid(region.geometry, args.resolution)
    latlon = grid.cell_latlon()
    encoder = load_location_encoder(checkpoint=geoclip_weights())
    t = time.perf_counter()
    emb = encoder.encode(latlon)
    embed_s = time.perf_counter() - t

    points = gpd.read_file(ariolimax_path()).to_crs(4326)
    covariates = [c for c in points.columns if c not in ("presence", "geometry")]
    cells = cells_of_points(np.column_stack([points.geometry.y, points.geometry.x]), grid)
    on_grid = cells >= 0
    used = points[on_grid].reset_index(drop=True)
    cells = cells[on_grid]
    presence = used["presence"].to_numpy() == 1
    print(f"ariolimax: {len(points)} points ({int((points.presence == 1).sum())} presences), "
          f"{len(used)} on the {grid.n_cells:,} cells of California at {args.resolution} deg "
          f"({int(presence.sum())} presences, {int((~presence).sum())} background); "
          f"covariates {', '.join(covariates)}")

    query = encoder.encode(np.array([[37.1, -122.0]]))[0]
    fused, _ = fuse({"location": emb}, query)
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore.open(Path(tmp) / "location", key="bench", n_cells=grid.n_cells,
                                    dim=emb.shape[1], attrs={})
        for i in range(store.n_chunks):
            store.write_chunk(i, emb[store.chunk_slice(i)])
        t = time.perf_counter()
        result = fit_maps({"location": store}, fused, latlon, cells[presence], cells[~presence],
                          seed=args.seed, cv_blocks_deg=args.blocks, thin=False)
        fit_s = time.perf_counter() - t

    samples = result.samples
    # Samples are the presences then the background, in the order given: the used points'.
    order = np.r_[np.flatnonzero(presence), np.flatnonzero(~presence)]
    assert (samples.presence.to_numpy() == presence[order]).all()
    x = used.iloc[order][covariates].reset_index(drop=True)
    y = samples.presence.to_numpy()
    fold = samples.fold.to_numpy()
    maxent = np.full(len(y), np.nan)
    t = time.perf_counter()
    for k in sorted(np.unique(fold)):
        train, test = fold != k, fold == k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = elapid.MaxentModel().fit(x[train], y[train])
            maxent[test] = model.predict(x[test])
    maxent_s = time.perf_counter() - t

    rows = []
    for k in sorted(np.unique(fold)):
        test = fold == k
        cv = result.cv[(result.cv.fold == k)].set_index("band")
        rows.append((k, int((test & (y == 1)).sum()), int((test & (y == 0)).sum()),
                     cv.loc["fitted", "auc"], roc_auc(maxent[test & (y == 1)],
                                                       maxent[test & (y == 0)]),
                     cv.loc["fused", "auc"], cv.loc["combined", "auc"]))
    print(f"\nspatial {result.folds}-fold CV on {args.blocks} deg blocks (seed {args.seed}); "
          f"taxamap C = {result.C:g}\n")
    print("| fold | presences | background | taxamap fitted AUC | MaxEnt AUC | fused (stand-in) "
          "| combined |")
    print("|---|---|---|---|---|---|---|")
    for k, n_p, n_b, a, m, f, c in rows:
        print(f"| {k} | {n_p} | {n_b} | **{a:.3f}** | {m:.3f} | {f:.3f} | {c:.3f} |")
    mean = np.nanmean(np.array([r[3:] for r in rows], dtype=float), axis=0)
    print(f"| mean | | | **{mean[0]:.3f}** | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} |")
    print(f"\nembedding {grid.n_cells:,} cells: {embed_s:.1f} s (once, into the store); "
          f"taxamap fit + 5-fold CV from the store: {fit_s:.1f} s; MaxEnt 5 folds: "
          f"{maxent_s:.1f} s")
    print("\n" + result.format_table())


if __name__ == "__main__":
    main()
