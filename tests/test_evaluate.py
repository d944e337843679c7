"""Map evaluation: extraction at points, AUC/AP/TSS/Boyce, the ariolimax sample, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio

from taxamap.dataset import band_name, cell_centres, open_map, pixels_of, sample_points
from taxamap.errors import TaxamapError
from taxamap.products.evaluate import (
    average_precision,
    boyce_index,
    evaluate_map,
    format_table,
    max_tss,
    plot_roc,
    roc_auc,
    spearman,
)
from tests.helpers.maps import centres, write_map
from tests.helpers.samples import ariolimax_path

# --- metrics on hand-made and synthetic data --------------------------------------------------

def test_max_tss_hand_example():
    presence = [0.9, 0.8, 0.4]
    background = [0.7, 0.3, 0.2, 0.1]
    threshold, tss, sens, spec = max_tss(presence, background)
    # >= 0.4 catches every presence and leaves out 3 of 4 background points: 1 + 3/4 - 1.
    assert threshold == 0.4 and tss == pytest.approx(0.75)
    assert (sens, spec) == (1.0, 0.75)
    # A perfect separation has TSS 1 at the lowest presence value.
    assert max_tss([5, 6], [1, 2, 3])[:2] == (5.0, 1.0)


def test_auc_and_ap_match_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    for _ in range(5):
        pos = np.round(rng.normal(0.3, 1, 200), 1)  # rounding makes many ties
        neg = np.round(rng.normal(0.0, 1, 900), 1)
        y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        s = np.r_[pos, neg]
        assert roc_auc(pos, neg) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(pos, neg) == pytest.approx(average_precision_score(y, s),
                                                            abs=1e-12)
    assert roc_auc([1, 2], [0.5]) == 1.0 and roc_auc([0.1], [0.5, 0.6]) == 0.0
    assert roc_auc([0.5], [0.5]) == 0.5
    assert math.isnan(roc_auc([], [1.0]))


def test_spearman_matches_scipy_definition():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=60), 1)
    b = a + rng.normal(size=60)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_boyce_index_ranked_and_random():
    rng = np.random.default_rng(0)
    background = rng.uniform(0, 1, 20000)
    # Presence density grows with the value (p(x) = 2x): F rises steadily over the range.
    ranked = np.sqrt(rng.uniform(0, 1, 5000))
    assert boyce_index(ranked, background) > 0.9
    # Presences drawn like the background: F is noise around 1. One draw's index is noisy (the
    # windows overlap), so average several.
    random_indices = [boyce_index(rng.uniform(0, 1, 2000), rng.uniform(0, 1, 20000))
                      for _ in range(20)]
    assert abs(float(np.mean(random_indices))) < 0.25
    # A map that points the wrong way.
    assert boyce_index(1 - ranked, background) < -0.9
    assert math.isnan(boyce_index([0.5], [0.5, 0.5]))


# --- evaluating a map file --------------------------------------------------------------------

@pytest.fixture
def small_map(tmp_path):
    """10 x 20 cells of 1 degree over (0..20 E, 0..10 N); value = longitude / 20; NaN in the
    top-left 2 x 2 cells; a second band NaN where lon < 5."""
    lat, lon = centres(0.0, 10.0, 1.0, 10, 20)
    fused = lon / 20.0
    fused[:2, :2] = np.nan
    other = 1.0 - lat / 10.0
    other[:, :5] = np.nan
    return write_map(tmp_path / "map.tif", {"fused": fused, "location": other}, 0.0, 10.0, 1.0)


def test_points_outside_and_on_nodata_are_counted(small_map):
    presences = np.array([
        [5.5, 15.5], [5.5, 18.5], [3.5, 12.5],  # on the map, valid in both bands
        [9.5, 0.5],                              # on NaN in both bands (top-left)
        [5.5, 2.5],                              # valid in fused, NaN in location
        [20.0, 5.0], [5.0, 25.0], [-1.0, 3.0],   # off the map
    ])
    background = np.array([[1.5, 1.5], [2.5, 3.5], [8.5, 10.5], [50.0, 0.0], [0.5, 19.5]])
    result = evaluate_map(small_map, presences, background)
    assert (result.presence_given, result.presence_outside) == (8, 3)
    assert (result.background, result.background_given, result.background_outside) == \
        ("given", 5, 1)
    fused, location = result.band("fused"), result.band("location")
    assert (fused.n_presence, fused.presence_nodata) == (4, 1)
    assert (location.n_presence, location.presence_nodata) == (3, 2)
    assert (fused.n_background, fused.background_nodata) == (4, 0)
    assert (location.n_background, location.background_nodata) == (2, 2)
    np.testing.assert_allclose(fused.presence_values, [15.5 / 20, 18.5 / 20, 12.5 / 20,
                                                       2.5 / 20], rtol=1e-6)
    table = format_table(result)
    assert "3 outside the map" in table and "fused" in table and "location" in table
    assert "1/0" in table  # fused: one presence, no background on nodata


def test_sampled_background_uses_valid_cells_only(small_map):
    result = evaluate_map(small_map, np.array([[5.5, 15.5], [6.5, 17.5]]), n_background=50,
                          seed=4)
    fused = result.band("fused")
    assert result.background == "sampled" and result.background_given == 50
    assert fused.n_background == 50 and fused.background_nodata == 0
    # Cells of band 1 take values (col + 0.5) / 20: the sample sits on cell values.
    cols = fused.background_values * 20 - 0.5
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-5)
    # Same seed, same sample; more than the valid cells: every valid cell once.
    again = evaluate_map(small_map, np.array([[5.5, 15.5], [6.5, 17.5]]), n_background=50, seed=4)
    np.testing.assert_array_equal(again.band("fused").background_values, fused.background_values)
    everything = evaluate_map(small_map, np.array([[5.5, 15.5]]), n_background=10**6)
    assert everything.band("fused").n_background == 200 - 4
    # The location band is NaN over some sampled cells: those are counted, not used.
    assert everything.band("location").background_nodata == 10 * 5 - 4


def test_errors_and_antimeridian(tmp_path, small_map):
    with pytest.raises(TaxamapError, match="none of the"):
        evaluate_map(small_map, np.array([[-40.0, -40.0]]))
    with pytest.raises(TaxamapError, match="not found"):
        evaluate_map(tmp_path / "missing.tif", np.array([[0.0, 0.0]]))
    with pytest.raises(TaxamapError, match=r"\(N, 2\)"):
        evaluate_map(small_map, np.array([1.0, 2.0, 3.0]))
    # A grid across the antimeridian runs from 170 to 190 E; a point at -175 lies on it.
    lat, lon = centres(170.0, 10.0, 1.0, 10, 20)
    across = write_map(tmp_path / "fiji.tif", {"fused": lon.astype(np.float32)}, 170.0, 10.0, 1.0)
    values, inside = sample_points(open_map(across),
                                   np.array([[5.5, -175.5], [5.5, 175.5], [5.5, 0.0]]))
    assert inside.tolist() == [True, True, False]
    assert values[0, :2].tolist() == [184.5, 175.5]


def test_points_and_cell_centres_on_a_projected_map(tmp_path):
    """A cell's centre (in lon/lat) is sampled back from that cell, also on a map in another
    CRS; points off the map are flagged and read as NaN."""
    values = np.arange(12 * 15, dtype=np.float32).reshape(12, 15)
    values[3, 4] = np.nan
    path = write_map(tmp_path / "albers.tif", {"fused": values, "location": -values},
                     -100_000.0, 100_000.0, 10_000.0, crs="EPSG:3310")
    ds = open_map(path)
    rows, cols = np.array([0, 3, 5, 11]), np.array([0, 4, 7, 14])
    latlon = cell_centres(ds, rows, cols)
    assert (np.abs(latlon[:, 0] - 37.0) < 2).all() and (np.abs(latlon[:, 1] + 120.0) < 2).all()
    found_rows, found_cols, inside = pixels_of(ds, latlon)
    assert inside.all() and found_rows.tolist() == rows.tolist()
    assert found_cols.tolist() == cols.tolist()
    sampled, inside = sample_points(ds, np.vstack([latlon, [[0.0, 0.0]]]))
    assert inside.tolist() == [True] * 4 + [False]
    np.testing.assert_array_equal(sampled[0, :4], values[rows, cols])
    np.testing.assert_array_equal(sampled[1, :4], -values[rows, cols])
    assert np.isnan(sampled[:, 4]).all() and np.isnan(sampled[0, 1])
    only, _ = sample_points(ds, latlon, ["location"])
    assert only.shape == (1, 4)


def test_open_map_keeps_tags_as_written_and_finds_bands(tmp_path):
    path = write_map(tmp_path / "m.tif", {"fused": np.ones((2, 3)), "location": np.zeros((2, 3))},
                     0.0, 2.0, 1.0)
    with rasterio.open(path, "r+") as f:
        f.update_tags(QUERY="Foo bar", CELLS="007", THRESHOLD="0.150")
        f.update_tags(1, MODALITY="fused")
    ds = open_map(path)
    assert {k: ds.attrs[k] for k in ("query", "cells", "threshold")} == {
        "query": "Foo bar", "cells": "007", "threshold": "0.150"}  # text, not numbers
    assert "modality" not in ds.attrs  # a band's tags are not the map's
    assert list(ds.data_vars) == ["fused", "location"] and ds["fused"].dtype == np.float32
    assert band_name(ds, "LOCATION") == "location" and band_name(ds, 1) == "fused"
    with pytest.raises(TaxamapError, match=r"^m\.tif has no band 'env'; its bands are fused, "):
        band_name(ds, "env")
    with pytest.raises(TaxamapError, match=r"^m\.tif has 2 bands; give .*1\.\.2"):
        band_name(ds, 3)


def test_json_and_roc_png_are_written_atomically(tmp_path, small_map):
    rng = np.random.default_rng(1)
    presences = np.column_stack([rng.uniform(0, 10, 40), rng.uniform(8, 20, 40)])
    result = evaluate_map(small_map, presences, n_background=100)
    out = tmp_path / "out"
    path = result.to_json(out / "eval.json")
    data = json.loads(path.read_text())
    assert [b["name"] for b in data["bands"]] == ["fused", "location"]
    assert data["bands"][0]["auc"] == pytest.approx(result.band("fused").auc, abs=1e-6)
    assert data["presence"] == {"given": 40, "outside_map": 0}
    png = plot_roc(result, out / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        assert img.size[0] > 300
        pixels = np.asarray(img.convert("RGB"))
        assert (pixels.std(axis=(0, 1)) > 5).all()  # not a blank image
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "roc.png"]


# --- the real presence/background sample shipped with elapid ----------------------------------

WEST, NORTH, RES, HEIGHT, WIDTH = -124.5, 39.8, 0.1, 73, 85  # California south of 39.8 N


@pytest.fixture(scope="module")
def california_map(tmp_path_factory):
    """Bands: fused, location (the tiny location encoder's cosine to a query), environment (a
    smooth function of latitude). NaN in two corners; environment also NaN north of 39.5 N."""
    from taxamap.models.location import load_location_encoder
    from tests.helpers.tiny import write_repo

    tmp = tmp_path_factory.mktemp("ariolimax")
    models = tmp / "models"
    write_repo(models, "MVRL/taxabind-config")
    write_repo(models, "MVRL/ecogeo")
    encoder = load_location_encoder(models_dir=models)
    lat, lon = centres(WEST, NORTH, RES, HEIGHT, WIDTH)
    emb = encoder.encode(np.column_stack([lat.ravel(), lon.ravel()]))
    # Query: the embedding of a point in the Santa Cruz mountains (the slug's home).
    query = encoder.encode(np.array([[37.1, -122.0]]))[0]
    location = (emb @ query).reshape(HEIGHT, WIDTH)
    environment = np.cos(np.radians(lat - 37.0) * 6.0)
    fused = (location + environment) / 2.0
    mask = ((lat < 35.0) & (lon > -118.0)) | ((lat > 38.5) & (lon > -121.0))
    for band in (location, environment, fused):
        band[mask] = np.nan
    environment[lat > 39.5] = np.nan
    return write_map(tmp / "ariolimax.tif",
                     {"fused": fused, "location": location, "environment": environment},
                     WEST, NORTH, RES)


def test_ariolimax_auc_matches_scikit_learn(california_map):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from taxamap.products.occurrences import read_labelled_points

    path = ariolimax_path()
    if path is None:
        pytest.skip("elapid is not installed (pip install elapid)")
    presence, background = read_labelled_points(path)
    result = evaluate_map(california_map, presence, background)

    # Independent extraction: rasterio's own sampler at (lon, lat).
    with rasterio.open(california_map) as ds:
        def sample(latlon):
            inside = ((latlon[:, 1] >= WEST) & (latlon[:, 1] < WEST + WIDTH * RES)
                      & (latlon[:, 0] <= NORTH) & (latlon[:, 0] > NORTH - HEIGHT * RES))
            values = np.array(list(ds.sample(latlon[inside][:, ::-1]))).T
            return values, inside

        p_values, p_inside = sample(presence)
        b_values, b_inside = sample(background)
    assert result.presence_given == 1595 and result.background_given == 4990
    assert result.presence_outside == int((~p_inside).sum()) > 0
    assert result.background_outside == int((~b_inside).sum()) > 0
    for i, name in enumerate(["fused", "location", "environment"]):
        band = result.band(name)
        p, b = p_values[i][np.isfinite(p_values[i])], b_values[i][np.isfinite(b_values[i])]
        np.testing.assert_array_equal(band.presence_values, p.astype(np.float64))
        np.testing.assert_array_equal(band.background_values, b.astype(np.float64))
        assert band.presence_nodata == int((~np.isfinite(p_values[i])).sum())
        y = np.r_[np.ones(p.size), np.zeros(b.size)]
        s = np.r_[p, b].astype(np.float64)
        assert abs(band.auc - roc_auc_score(y, s)) < 1e-9
        assert abs(band.average_precision - average_precision_score(y, s)) < 1e-9
        assert -1 <= band.boyce <= 1 and 0 <= band.tss <= 1
    assert result.band("environment").presence_nodata > result.band("fused").presence_nodata > 0
    print("\n" + format_table(result))
