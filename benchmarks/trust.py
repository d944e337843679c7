"""Trust layers on real data (issue 19): do ``novelty`` and ``uncertainty`` separate good from bad
held-out predictions, what do they cost, and how fast are MESS, novelty and survey at USA size.

    python benchmarks/trust.py [--resolution 0.05] [--blocks 0.5] [--seed 0] [--repeat 2]
                               [--cache DIR] [--figure docs/trust.png] [--map MAP.tif]
                               [--only fit,usa,fittime]

``fit`` (elapid's ariolimax sample, as ``fit.py``): California at 0.05 degree embedded once with
GeoCLIP's published location weights (kept in ``--cache`` as .npy for reruns); every point on a
grid cell is one sample (``thin=False``); 0.5 degree blocks dealt to 5 spatial folds. Prints the
held-out AUC and mean |presence - held-out fitted| by tercile of novelty and of uncertainty
(each computed without the sample's fold), the same for a k-nearest-neighbour variant of
novelty (mean distance to the 10 nearest), and the wall time of :func:`fit_maps` without the
trust layers (``n_boot=0, novelty=False``: the fit as it was) and with them, alternating
``--repeat`` times in one process. ``--figure`` draws fitted / uncertainty / novelty over
California with the presences.

``fittime``: ``fit_maps`` with its defaults on the inputs ``fit`` saved in ``--cache``, timed in
whichever taxamap is imported: run it with ``PYTHONPATH`` at a checkout of main before the trust
layers (131afc4) and without, for the fit stage of ``predict --fit`` before and after.

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
        err = np.abs(y - pred)
        rows.append((k, float(values[s].min()), float(values[s].max()), int(s.sum()),
                     int(y[s].sum()), roc_auc(pred[s & (y == 1)], pred[s & (y == 0)]),
                     float(err[s].mean()), float(err[s & (y == 1)].mean()),
                     float(err[s & (y == 0)].mean())))
    return rows


def print_terciles(name: str, rows: list[tuple]) -> None:
    print(f"\n{name}\n\n| tercile | range | samples (presences) | held-out AUC | mean \\|error\\| "
          "| of presences | of background |")
    print("|---|---|---|---|---|---|---|")
    for k, lo, hi, n, n_p, auc, err, err_p, err_b in rows:
        print(f"| {k} | {lo:.3g}-{hi:.3g} | {n} ({n_p}) | {auc:.3f} | {err:.3f} | {err_p:.3f} "
              f"| {err_b:.3f} |")


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


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as the fit reads embeddings."""
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.where(norm > 0, emb / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)


def fit_inputs(args):
    """(grid, cell lat/lon, embeddings, fused, presence cells, background cells); the arrays
    also saved as ``--cache``/ariolimax-fit-inputs.npz for ``--only fittime``."""
    from taxamap.score import fuse

    grid, latlon, emb = california(args.resolution, args.cache)
    pres, back = ariolimax_samples(grid)
    print(f"ariolimax: {pres.size} presence and {back.size} background points on the "
          f"{grid.n_cells:,} cells of California at {args.resolution:g} deg")
    query = emb[np.argmin(np.abs(latlon - [37.1, -122.0]).sum(axis=1))]
    fused, _ = fuse({"location": emb}, query)
    if args.cache:
        np.savez(args.cache / "ariolimax-fit-inputs.npz", emb=emb, fused=fused, latlon=latlon,
                 pres=pres, back=back)
    return grid, latlon, emb, fused, pres, back


def run_fittime(args) -> None:
    """``fit_maps`` with its defaults, timed in whichever taxamap is imported (run once with
    ``PYTHONPATH`` at a baseline checkout, once in this one): the fit stage of ``predict
    --fit`` before and after the trust layers."""
    import taxamap
    from taxamap.products.fit import fit_maps

    data = np.load(args.cache / "ariolimax-fit-inputs.npz")
    inputs = ({"location": data["emb"]}, data["fused"], data["latlon"], data["pres"],
              data["back"])
    kwargs = dict(seed=args.seed, cv_blocks_deg=args.blocks, thin=False)
    fit_maps(*inputs, **kwargs)  # loads scikit-learn and SciPy: not timed
    wall, cpu = [], []
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        fit_maps(*inputs, **kwargs)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(f"fit_maps (defaults) from {Path(taxamap.__file__).parent}: wall "
          f"{', '.join(f'{t:.2f}' for t in wall)} s (median {np.median(wall):.2f}); CPU "
          f"{', '.join(f'{t:.2f}' for t in cpu)} s (median {np.median(cpu):.2f})")


def run_fit(args) -> None:
    from taxamap.products.fit import fit_maps
    from taxamap.products.trust import joint_rows

    grid, latlon, emb, fused, pres, back = fit_inputs(args)
    kwargs = dict(seed=args.seed, cv_blocks_deg=args.blocks, thin=False)
    labels = ("before (no trust layers)", "after (uncertainty + novelty)")
    wall = {label: [] for label in labels}
    cpu = {label: [] for label in labels}
    result = None
    # A first fit loads scikit-learn and SciPy: not part of either figure.
    fit_maps({"location": emb}, fused, latlon, pres, back, **kwargs, n_boot=0, novelty=False)
    for _ in range(args.repeat):
        for label, extra in zip(labels, (dict(n_boot=0, novelty=False), {})):
            t, c = time.perf_counter(), time.process_time()
            r = fit_maps({"location": emb}, fused, latlon, pres, back, **kwargs, **extra)
            wall[label].append(time.perf_counter() - t)
            cpu[label].append(time.process_time() - c)
            if extra == {}:
                result = r
    print(f"\nfit_maps seconds, {args.repeat} alternating runs each (wall; CPU of all threads, "
          "steadier on a shared machine):")
    for label in labels:
        print(f"  {label}: wall {', '.join(f'{t:.1f}' for t in wall[label])} (median "
              f"{np.median(wall[label]):.1f}); CPU {', '.join(f'{t:.1f}' for t in cpu[label])} "
              f"(median {np.median(cpu[label]):.1f})")
    for name, series in (("wall", wall), ("CPU", cpu)):
        print(f"  after / before, {name}: "
              f"{np.median(series[labels[1]]) / np.median(series[labels[0]]):.2f}x")
    print("\n" + result.format_table())
    s = result.samples
    y, pred = s.presence.to_numpy(), s.fitted.to_numpy()
    print_terciles("novelty (nearest training sample, scaled), held out",
                   terciles(s.novelty.to_numpy(), y, pred))
    print_terciles(f"uncertainty (sd over {result.n_boot} bootstrap refits), held out",
                   terciles(s.uncertainty.to_numpy(), y, pred))
    cells, position = np.unique(s.cell.to_numpy(), return_inverse=True)
    joint = joint_rows([unit_rows(emb[cells])])
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
    if args.map:
        write_map(args.map, grid, result)


def write_map(path: Path, grid, result) -> None:
    """The fit as a GeoTIFF with bands fitted, combined, uncertainty, novelty (for trying
    ``taxamap survey`` and ``taxamap threshold --mask`` on real data)."""
    import rasterio
    from rasterio.transform import from_origin

    bands = {"fitted": result.fitted, "combined": result.combined,
             "uncertainty": result.uncertainty, "novelty": result.novelty}
    flat = grid.cell_index()
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=grid.width, height=grid.height,
                       count=len(bands), dtype="float32", nodata=float("nan"), crs="EPSG:4326",
                       transform=from_origin(grid.west, grid.north, grid.resolution,
                                             grid.resolution), compress="deflate") as dst:
        for i, (name, values) in enumerate(bands.items(), start=1):
            image = np.full(grid.height * grid.width, np.nan, dtype=np.float32)
            image[flat] = values
            dst.write(image.reshape(grid.height, grid.width), i)
            dst.set_band_description(i, name)
    print(f"wrote {path}")


def figure(path: Path, grid, result, presences: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.colors import BoundaryNorm, ListedColormap

    # Novelty in bands a reader can act on: within the training samples' own spacing (< 1),
    # up to twice it, and beyond.
    novelty_cmap = ListedColormap(["#f0f0f0", "#fdd49e", "#fc8d59", "#b30000"])
    novelty_norm = BoundaryNorm([0, 1, 2, 3, 4], novelty_cmap.N)
    panels = (("fitted (relative suitability)", result.fitted, "viridis", None),
              (f"uncertainty (sd of {result.n_boot} bootstrap refits)", result.uncertainty,
               "magma", None),
              ("novelty (0 = a training sample; 1 = their typical spacing)",
               np.minimum(result.novelty, 3.5), novelty_cmap, novelty_norm))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.9), constrained_layout=True)
    extent = (grid.west, grid.west + grid.width * grid.resolution,
              grid.north - grid.height * grid.resolution, grid.north)
    flat = grid.cell_index()
    for i, (ax, (title, values, cmap, norm)) in enumerate(zip(axes, panels)):
        image = np.full(grid.height * grid.width, np.nan, dtype=np.float32)
        image[flat] = values
        image = image.reshape(grid.height, grid.width)
        scale = dict(norm=norm) if norm else dict(vmin=0, vmax=np.nanpercentile(values, 99))
        im = ax.imshow(image, extent=extent, cmap=cmap, interpolation="nearest", **scale)
        if i < 2:
            ax.scatter(presences[:, 1], presences[:, 0], s=1, c="#00e5ff", linewidths=0,
                       label="presence records")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        bar = fig.colorbar(im, ax=ax, shrink=0.75)
        if norm:
            bar.set_ticks([0.5, 1.5, 2.5, 3.5])
            bar.set_ticklabels(["< 1", "1-2", "2-3", "> 3"])
    axes[0].legend(loc="lower left", fontsize=8, markerscale=6)
    fig.suptitle("Banana slug (elapid's ariolimax sample: presences and background points), "
                 "California 0.05°, GeoCLIP location embeddings: a fit and where to trust it",
                 fontsize=11)
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
    run_climate_mess(grid, rng)
    run_survey(grid, rng)


def run_climate_mess(grid, rng) -> None:
    """MESS as ``predict`` makes it (:func:`taxamap.products.trust.climate_mess`): the cells'
    20 WorldClim variables read from global 5-minute GeoTIFFs (synthetic fields of the official
    size and names: no network here), against the region and against 10,000 cells."""
    import rasterio
    from rasterio.transform import from_origin

    from taxamap.products.trust import climate_mess
    from taxamap.sources.worldclim import WORLDCLIM_FILES, WorldClimFeatures

    latlon = grid.cell_latlon()
    with tempfile.TemporaryDirectory() as tmp:
        height, width = 2160, 4320
        coarse = rng.normal(size=(len(WORLDCLIM_FILES), 18, 36))
        for k, name in enumerate(WORLDCLIM_FILES):
            layer = np.kron(coarse[k], np.ones((120, 120))).astype(np.float32) * (k + 1) + 10 * k
            with rasterio.open(Path(tmp) / name, "w", driver="GTiff", width=width, height=height,
                               count=1, dtype="float32", nodata=-3.4e38, crs="EPSG:4326",
                               transform=from_origin(-180, 90, 1 / 12, 1 / 12),
                               compress="deflate") as dst:
                dst.write(layer, 1)
        features = WorldClimFeatures(tmp)
        t = time.perf_counter()
        features.stats()
        print(f"WorldClim layer statistics (once per folder, then cached): "
              f"{time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        climate_mess(features, latlon)
        print(f"climate_mess, the region as reference ({grid.n_cells:,} cells, rasters read): "
              f"{time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        climate_mess(features, latlon, latlon[rng.choice(grid.n_cells, 10_000, replace=False)])
        print(f"climate_mess, 10,000 reference cells (a fit's presences and background): "
              f"{time.perf_counter() - t:.2f} s")


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
    ap.add_argument("--map", type=Path, default=None, help="write the fit as a GeoTIFF here")
    ap.add_argument("--only", default="fit,usa", help="fit, usa, fittime (comma list)")
    args = ap.parse_args()
    print(f"machine: {machine()}; checkout {ROOT}")
    only = set(args.only.split(","))
    if "fit" in only:
        run_fit(args)
    if "fittime" in only:
        run_fittime(args)
    if "usa" in only:
        run_usa(args)


if __name__ == "__main__":
    main()
