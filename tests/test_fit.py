"""Few-shot maps: a classifier on stored cell embeddings, with a known answer, and `predict --fit`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import shapely.geometry

from taxamap.errors import TaxamapError
from taxamap.products.evaluate import roc_auc
from taxamap.products.fit import cells_of_points, fit_grid, fit_maps, spatial_folds
from taxamap.grid import make_grid


def geoclip_weights() -> Path:
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("geoclip is not installed (pip install geoclip): no real location weights")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "weights" / \
        "location_encoder_weights.pth"
    if not path.is_file():
        pytest.skip("geoclip's location_encoder_weights.pth is missing")
    return path


#: The truth: a species present inside this (non-convex) polygon only.
TRUTH = shapely.Polygon([(-99, 36), (-94, 36), (-94, 38), (-96.5, 38), (-96.5, 41), (-99, 41)])


@pytest.fixture(scope="module")
def world():
    """A 0.25 degree grid over the central USA with GeoCLIP's real location embeddings."""
    from taxamap.models.location import load_location_encoder

    grid = make_grid(shapely.box(-101, 34, -92, 43), 0.25)
    latlon = grid.cell_latlon()
    emb = load_location_encoder(checkpoint=geoclip_weights()).encode(latlon)
    inside = shapely.contains_xy(TRUTH, latlon[:, 1], latlon[:, 0])
    # A weak zero-shot prior: cosine to the embedding of one point in the polygon.
    fused = emb @ emb[int(np.flatnonzero(inside)[0])]
    return grid, latlon, emb, inside, fused


def presences(inside: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.flatnonzero(inside), size=n, replace=False))


def test_fitted_recovers_a_known_range(world):
    grid, latlon, emb, inside, fused = world
    result = fit_maps({"location": emb}, fused, latlon, presences(inside, 80), None, seed=0,
                      cv_blocks_deg=1.0)
    summary = result.summary()
    assert list(summary.index) == ["fused", "fitted", "combined"]
    assert summary.loc["fitted", "folds_scored"] == 5
    # The background is every cell, the range's cells too, so presence/background AUC tops out
    # near 1 - (share of cells in range) / 2: 0.89 here.
    assert summary.loc["fitted", "auc"] > 0.8 and summary.loc["combined", "auc"] > 0.8
    assert summary.loc["fitted", "auc"] > summary.loc["fused", "auc"] + 0.1
    fitted = result.cv[result.cv.band == "fitted"]
    assert fitted.n_presence.min() >= 12
    # Held-out cells (out-of-fold predictions) are separated by the truth, fold by fold.
    back = result.samples[result.samples.presence == 0]
    truth = inside[back.cell.to_numpy()]
    assert roc_auc(back.fitted[truth], back.fitted[~truth]) > 0.9
    for _, fold in back.groupby("fold"):
        t = inside[fold.cell.to_numpy()]
        assert roc_auc(fold.fitted[t], fold.fitted[~t]) > 0.85
    assert roc_auc(result.fitted[inside], result.fitted[~inside]) > 0.95
    assert result.fitted.dtype == np.float32 and result.fitted.shape == (grid.n_cells,)
    assert 0 <= np.nanmin(result.fitted) and np.nanmax(result.combined) <= 1
    assert result.n_presence == 80 and result.n_background == grid.n_cells
    assert set(result.samples.columns) >= {"cell", "presence", "fold", "fitted", "combined"}
    text = result.format_table()
    assert "fitted" in text and "C = " in text and "blocks of 1 deg" in text
    cv = json.loads(result.tags()["FIT_CV"])
    assert cv["summary"]["fitted"]["auc"] == pytest.approx(summary.loc["fitted", "auc"], abs=1e-6)
    assert len(cv["folds"]) == 15


def test_cv_is_reproducible_with_a_seed(world):
    _, latlon, emb, inside, fused = world
    pres = presences(inside, 30, seed=1)
    kwargs = dict(cv_blocks_deg=2.0, n_background=400, folds=3, cs=(1e-4, 1e-3))
    a = fit_maps({"location": emb}, fused, latlon, pres, None, seed=3, **kwargs)
    b = fit_maps({"location": emb}, fused, latlon, pres, None, seed=3, **kwargs)
    pd.testing.assert_frame_equal(a.cv, b.cv)
    pd.testing.assert_frame_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.fitted, b.fitted)
    c = fit_maps({"location": emb}, fused, latlon, pres, None, seed=4, **kwargs)
    assert not a.samples.fold.equals(c.samples.fold) or not a.cv.equals(c.cv)


def test_missing_modality_rows_and_few_presences(world, caplog):
    _, latlon, emb, inside, fused = world
    other = emb[:, ::-1].copy()
    other[::3] = np.nan  # cells this modality could not embed
    with caplog.at_level("WARNING", logger="taxamap.products.fit"):
        result = fit_maps({"location": emb, "satellite": other}, fused, latlon,
                          presences(inside, 8), None, seed=0, cv_blocks_deg=1.0, folds=3,
                          n_background=400, cs=(1e-3,))
    assert np.isfinite(result.fitted).all() and np.isfinite(result.combined).all()
    assert any("fewer than 10" in w for w in result.warnings)
    assert "fewer than 10" in caplog.text
    assert result.modalities == ["location", "satellite"]


def test_cells_of_points_and_folds():
    grid = make_grid(shapely.box(170, -10, 190, 0), 0.5)  # across the antimeridian
    points = np.array([[-5.2, 175.1], [-5.2, -175.1], [5.0, 175.0], [-5.0, 200.0]])
    cells = cells_of_points(points, grid)
    assert cells[0] >= 0 and cells[1] >= 0 and cells[2] == -1
    centre = grid.cell_latlon()[cells[1]]
    assert centre[0] == pytest.approx(-5.25) and centre[1] == pytest.approx(-175.25)
    latlon = np.column_stack([np.repeat(np.arange(10) + 0.5, 10), np.tile(np.arange(10) + 0.5, 10)])
    y = np.zeros(100, dtype=bool)
    y[::7] = True
    folds = spatial_folds(latlon, y, block_deg=2.0, folds=5, seed=0)
    block = (latlon[:, 0] // 2) * 10 + latlon[:, 1] // 2
    for b in np.unique(block):
        assert np.unique(folds[block == b]).size == 1
    counts = np.bincount(folds[y], minlength=5)
    assert counts.max() - counts.min() <= 2
    with pytest.raises(TaxamapError, match="positive"):
        spatial_folds(latlon, y, block_deg=0.0)


def test_bad_inputs(world):
    grid, latlon, emb, inside, fused = world
    with pytest.raises(TaxamapError, match="none of the 2 occurrences"):
        fit_grid(grid, {"location": emb}, fused, np.array([[10.0, 10.0], [-40.0, 20.0]]))
    with pytest.raises(TaxamapError, match="no presences"):
        fit_grid(grid, {"location": emb}, fused, np.empty((0, 2)))
    with pytest.raises(TaxamapError, match="no presences"):
        fit_maps({"location": emb}, fused, latlon, np.array([], dtype=int))
    with pytest.raises(TaxamapError, match="background"):
        fit_grid(grid, {"location": emb}, fused, latlon[inside][:5], np.array([[0.0, 0.0]]))


def test_predict_fit_adds_bands_tags_and_table(tmp_path, models_dir, capsys):
    from taxamap.cli import main

    rng = np.random.default_rng(0)
    occ = tmp_path / "occ.csv"
    lat, lon = rng.uniform(39.1, 39.9, 25), rng.uniform(-83.9, -83.1, 25)
    occ.write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in zip(lat, lon)))
    args = ["predict", "--species", "Cardinalis cardinalis", "--bbox", "-84,39,-82,41",
            "--resolution", "0.1", "--models", str(models_dir), "--cache", str(tmp_path / "c"),
            "--no-progress", "--occurrences", str(occ)]
    expert = tmp_path / "expert.geojson"
    expert.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(
            shapely.box(-83.8, 39.2, -83.2, 39.8))}]}))
    code = main(args + ["--out", str(tmp_path / "out"), "--fit", "--cv-blocks", "0.5",
                        "--seed", "2", "--expert-range", str(expert)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "spatial 5-fold CV (blocks of 0.5 deg, seed 2)" in err and "combined" in err
    assert "held-out fitted by tercile of novelty and uncertainty" in err
    with rasterio.open(tmp_path / "out" / "cardinalis-cardinalis.tif") as ds:
        assert ds.descriptions == ("fused", "location", "fitted", "combined", "uncertainty",
                                   "novelty")
        tags = ds.tags()
        fitted = ds.read(3)
        assert ds.units[2] == "relative suitability (0-1)"
        assert ds.units[4].startswith("standard deviation of fitted over bootstrap refits")
        assert ds.tags(6)["UNITS"] == ds.units[5] and "unlike every training" in ds.tags(6)[
            "MEANING"]
        novelty, uncertainty = ds.read(6), ds.read(5)
    # All 400 cells are background samples here: every cell is training data, novelty 0.
    assert np.nanmax(novelty) == 0 and np.isfinite(novelty).sum() == 400
    assert np.nanmin(uncertainty) >= 0 and np.nanmax(uncertainty) > 0
    assert "bootstrap refits" in tags["FIT_UNCERTAINTY"]
    samples = pd.read_csv(tmp_path / "out" / "cardinalis-cardinalis_cv.csv")
    assert list(samples.columns) == ["cell", "lat", "lon", "presence", "fold", "fused", "fitted",
                                     "combined", "novelty", "uncertainty"]
    assert samples["presence"].sum() == 22 and samples["fold"].between(1, 5).all()
    assert (tmp_path / "out" / "cardinalis-cardinalis.png").stat().st_size > 0
    assert tags["FIT_SEED"] == "2" and "fitted" in json.loads(tags["FIT_CV"])["summary"]
    assert np.nanmin(fitted) >= 0 and np.nanmax(fitted) <= 1
    assert "fitted,combined" in tags["BANDS"] and tags["MODALITIES"] == "location"
    page = (tmp_path / "out" / "cardinalis-cardinalis.html").read_text()
    assert "expert range" in page and '"dashArray": "6 4"' in page and "fitted" in page
    # Each trust layer has its own legend entry saying what high means.
    assert "Where the map can be trusted" in page
    assert "data-band='novelty'" in page and "data-band='uncertainty'" in page
    assert "the fit changes with which records it got" in page

    far = tmp_path / "far.csv"
    far.write_text("lat,lon\n10,10\n-20,30\n")
    for extra, message in (([str(far)], "none of the 2 occurrences falls on a cell"),
                           (None, "--fit needs --occurrences")):
        argv = args[:-2] + (["--occurrences", *extra] if extra else [])
        code = main(argv + ["--out", str(tmp_path / "bad"), "--fit"])
        err = capsys.readouterr().err
        assert code == 2
        lines = err.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("taxamap: error:")
        assert "Traceback" not in err and not list((tmp_path / "bad").glob("*.tif"))
