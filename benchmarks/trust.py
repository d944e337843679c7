"""Trust layers on real data (issue 19): do ``novelty`` and ``uncertainty`` separate good from bad
held-out predictions, what do they cost, and how fast are MESS, novelty and survey at USA size.

    python benchmarks/trust.py [--resolution 0.05] [--blocks 0.5] [--seed 0] [--repeat 2]
                               [--cache DIR] [--figure docs/trust.png] [--only fit,usa]

``fit`` (elapid's ariolimax sample, as ``fit.py``): California at 0.05 degree embedded once with
GeoCLIP's published location weights (kept in ``--cache`` as .npy for reruns); every point on a
grid cell is one sample (``thin=False``); 0.5 degree blocks dealt to 5 spatial folds. Prints the
held-out AUC and mean |presence - held-out fitted| by tercile of novelty and of uncertainty
(each computed without the sample's fold), the same for a k-nearest-neighbour variant of
novelty (mean distance to the 10 nearest), and the wall time of :func:`fit_maps` without the
trust layers (``n_boot=0, novelty=False``: the fit as it was) and with them, alternating
``--repeat`` times in one process. ``--figure`` draws fitted / uncertainty / novelty over
California with the presences.

``usa``: the contiguous USA at 0.05 degree (326 k cells): novelty of every cell against 10,000
training samples (random unit embeddings of the location encoder's 512 dimensions: the cost
does not depend on the values), MESS of 20 climate variables against 10,000 reference cells,
and ``taxamap survey`` (n = 50, 20 km) on a map GeoTIFF of that size with suitability,
uncertainty and novelty bands and 1,000 records.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, geoclip_weights, machine
from fit import ariolimax_path


def california(resolution: float, cache: Path | None):
    """(grid, cell lat/lon, GeoCLIP location embeddings of the cells), cached as .npy."""
    from taxamap.geography import resolve_region
    from taxamap.grid import make_grid

    grid = make_grid(resolve_region("california").geometry, resolution)
    latlon = grid.cell_latlon()
    path = cache / f"california-{resolution:g}-geoclip.npy" if cache else None
    if path is not None and path.is_file():
        emb = np.load(path)
        if emb.shape[0] == grid.n_cells:
            return grid, latlon, emb
    from taxamap.models.location import load_location_encoder

    t = time.perf_counter()
    emb = load_location_encoder(checkpoint=geoclip_weights()).encode(latlon)
    print(f"embedded {grid.n_cells:,} cells in {time.perf_counter() - t:.1f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, emb)
    return grid, latlon, emb


def ariolimax_samples(grid):
    """(presence cells, background cells) of elapid's ariolimax points on the grid's cells."""
    import geopandas as gpd

    from taxamap.products.fit import cells_of_points

    points = gpd.read_file(ariolimax_path()).to_crs(4326)
    cells = cells_of_points(np.column_stack([points.geometry.y, points.geometry.x]), grid)
    on = cells >= 0
    presence = points["presence"].to_numpy()[on] == 1
    return cells[on][presence], cells[on][~presence]


def terciles(values: np.ndarray, y: np.ndarray, pred: np.ndarray) -> list[tuple]:
    from taxamap.products.evaluate import roc_auc

    ok = np.isfinite(values)
    cuts = np.quantile(values[ok], [1 / 3, 2 / 3])
    t = 1 + (values > cuts[0]).astype(int) + (values > cuts[1])
    rows = []
    for k in (1, 2, 3):
        s = ok & (t == k)
        rows.append((k, float(values[s].min()), float(values[s].max()), int(s.sum()),
                     int(y[s].sum()), roc_auc(pred[s & (y == 1)], pred[s & (y == 0)]),
                     float(np.abs(y[s] - pred[s]).mean())))
    return rows


def print_terciles(name: str, rows: list[tuple]) -> None:
    print(f"\n{name}\n\n| tercile | range | samples (presences) | held-out AUC | mean \\|error\\| |")
    print("|---|---|---|---|---|")
    for k, lo, hi, n, n_p, auc, err in rows:
        print(f"| {k} | {lo:.3g}-{hi:.3g} | {n} ({n_p}) | {auc:.3f} | {err:.3f} |")


def knn_novelty(samples, joint: np.ndarray, position: np.ndarray, k: int = 10) -> np.ndarray:
    """Held-out mean cosine distance to the k nearest training samples of the other folds."""
    fold = samples.fold.to_numpy()
    out = np.full(fold.size, np.nan)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        ref = np.unique(joint[np.unique(position[train])], axis=0)
        sims = joint[position[test]] @ ref.T
        top = -np.partition(-sims, k - 1, axis=1)[:, :k]
        out[test] = (1.0 - top).mean(axis=1)
    return out


def run_fit(args) -> None:
    from taxamap.products.fit import _unit_rows, fit_maps  # noqa: benchmark reaches inside
    from taxamap.products.trust import joint_rows
    from taxamap.score import fuse

    grid, latlon, emb = california(args.resolution, args.cache)
    pres, back = ariolimax_samples(grid)
    print(f"ariolimax: {pres.size} presence and {back.size} background points on the "
          f"{grid.n_cells:,} cells of California at {args.resolution:g} deg")
    query = emb[np.argmin(np.abs(latlon - [37.1, -122.0]).sum(axis=1))]
    fused, _ = fuse({"location": emb}, query)
    kwargs = dict(seed=args.seed, cv_blocks_deg=args.blocks, thin=False)
    times = {"before (no trust layers)": [], "after (uncertainty + novelty)": []}
    result = None
    for _ in range(args.repeat):
        for label, extra in (("before (no trust layers)", dict(n_boot=0, novelty=False)),
                             ("after (uncertainty + novelty)", {})):
            t = time.perf_counter()
            r = fit_maps({"location": emb}, fused, latlon, pres, back, **kwargs, **extra)
            times[label].append(time.perf_counter() - t)
            if extra == {}:
                result = r
    print(f"\nfit_maps wall seconds, {args.repeat} alternating runs each:")
    for label, ts in times.items():
        print(f"  {label}: {', '.join(f'{t:.1f}' for t in ts)} (median {np.median(ts):.1f})")
    ratio = np.median(times["after (uncertainty + novelty)"]) / np.median(
        times["before (no trust layers)"])
    print(f"  after / before: {ratio:.2f}x")
    print("\n" + result.format_table())
    s = result.samples
    y, pred = s.presence.to_numpy(), s.fitted.to_numpy()
    print_terciles("novelty (nearest training sample, scaled), held out",
                   terciles(s.novelty.to_numpy(), y, pred))
    print_terciles(f"uncertainty (sd over {result.n_boot} bootstrap refits), held out",
                   terciles(s.uncertainty.to_numpy(), y, pred))
    cells, position = np.unique(s.cell.to_numpy(), return_inverse=True)
    joint = joint_rows([_unit_rows(emb[cells])[0]])
    print_terciles("variant: mean cosine distance to the 10 nearest training samples, held out",
                   terciles(knn_novelty(s, joint, position), y, pred))
    for name in ("novelty", "uncertainty"):
        v = s[name].to_numpy()
        far = v > np.median(v)
        err = np.abs(y - pred)
        print(f"halves by {name}: mean |error| {err[~far].mean():.3f} (low) vs {err[far].mean():.3f}"
              f" (high)")
    if args.figure:
        figure(args.figure, grid, result, latlon[pres])


def figure(path: Path, grid, result, presences: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("fitted", result.fitted, "viridis", "fitted (relative suitability)"),
              ("uncertainty", result.uncertainty, "magma", "uncertainty (sd of 20 refits)"),
              ("novelty", result.novelty, "cividis", "novelty (0 = like the training data)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 5.2), constrained_layout=True)
    extent = (grid.west, grid.west + grid.width * grid.resolution,
              grid.north - grid.height * grid.resolution, grid.north)
    flat = grid.cell_index()
    for ax, (name, values, cmap, title) in zip(axes, panels):
        image = np.full(grid.height * grid.width, np.nan, dtype=np.float32)
        image[flat] = values
        image = image.reshape(grid.height, grid.width)
        hi = np.nanpercentile(values, 99)
        im = ax.imshow(image, extent=extent, cmap=cmap, vmin=0, vmax=hi, interpolation="nearest")
        ax.scatter(presences[:, 1], presences[:, 0], s=2, c="white", edgecolors="black",
                   linewidths=0.2, label="presence records")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.7)
    axes[0].legend(loc="lower left", fontsize=8, markerscale=4)
    fig.suptitle("Banana slug (elapid's ariolimax sample), California 0.05°, GeoCLIP location "
                 "embeddings: a fit and where to trust it", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def run_usa(args) -> None:
    from taxamap.geography import resolve_region
    from taxamap.grid import make_grid
    from taxamap.products.trust import Novelty, mess

    grid = make_grid(resolve_region("usa").geometry, 0.05)
    n = grid.n_cells
    rng = np.random.default_rng(args.seed)
    print(f"\nUSA at 0.05 deg: {n:,} cells")
    emb = rng.normal(size=(n, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ref = emb[rng.choice(n, 10_000, replace=False)]
    t = time.perf_counter()
    index = Novelty(ref)
    build = time.perf_counter() - t
    t = time.perf_counter()
    index(emb)
    print(f"novelty, 10,000 training samples: index (leave-one-out spacing) {build:.2f} s; "
          f"all cells {time.perf_counter() - t:.2f} s")
    climate = rng.normal(size=(n, 20)) * (1 + np.arange(20)) + 100 * np.arange(20)
    t = time.perf_counter()
    mess(climate, climate[rng.choice(n, 10_000, replace=False)])
    print(f"MESS, 20 variables, 10,000 reference cells: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    mess(climate, climate)
    print(f"MESS, 20 variables, the region as reference ({n:,} cells): "
          f"{time.perf_counter() - t:.2f} s")
    run_survey(grid, rng)


def run_survey(grid, rng) -> None:
    import rasterio
    from rasterio.transform import from_origin

    from taxamap.products.survey import survey_map

    latlon = grid.cell_latlon()
    flat = grid.cell_index()
    bands = {"fitted": rng.uniform(0, 1, grid.n_cells), "uncertainty": rng.uniform(0, 0.1,
             grid.n_cells), "novelty": rng.gamma(2.0, 1.0, grid.n_cells)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "usa-map.tif"
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=3,
                       dtype="float32", nodata=float("nan"), crs="EPSG:4326",
                       transform=from_origin(grid.west, grid.north, grid.resolution,
                                             grid.resolution), compress="deflate")
        with rasterio.open(path, "w", **profile) as dst:
            for i, (name, v) in enumerate(bands.items(), start=1):
                image = np.full(grid.height * grid.width, np.nan, dtype=np.float32)
                image[flat] = v
                dst.write(image.reshape(grid.height, grid.width), i)
                dst.set_band_description(i, name)
        records = latlon[rng.choice(grid.n_cells, 1000, replace=False)]
        t = time.perf_counter()
        result = survey_map(path, records, n=50, min_distance_km=20.0, out_dir=Path(tmp))
        print(f"survey, n = 50, 20 km, 1,000 records ({grid.n_cells:,} cells, all four files "
              f"written): {time.perf_counter() - t:.2f} s; {len(result.sites)} sites")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=float, default=0.05)
    ap.add_argument("--blocks", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--only", default="fit,usa")
    args = ap.parse_args()
    print(f"machine: {machine()}; checkout {ROOT}")
    only = set(args.only.split(","))
    if "fit" in only:
        run_fit(args)
    if "usa" in only:
        run_usa(args)


if __name__ == "__main__":
    main()
