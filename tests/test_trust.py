"""Trust layers (issue 19): bootstrap uncertainty, embedding novelty, the per-sample CV table,
modality disagreement, MESS, threshold masks and survey sites. Generated data, offline."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from taxamap.errors import TaxamapError
from taxamap.products.fit import _design, _read_pass, fit_maps
from taxamap.products.trust import (
    Novelty,
    climate_mess,
    disagreement,
    joint_rows,
    mask_cells,
    mess,
    parse_mask,
)


def landscape(n: int = 2500, dim: int = 24, seed: int = 0):
    """Cells on a 10 x 10 degree square with smooth 'embeddings' (random Fourier features of
    lat/lon), a species present in the north-east quarter and a weak zero-shot prior."""
    rng = np.random.default_rng(seed)
    side = int(math.sqrt(n))
    lat, lon = np.meshgrid(30 + (np.arange(side) + 0.5) * 10 / side,
                           -100 + (np.arange(side) + 0.5) * 10 / side, indexing="ij")
    latlon = np.column_stack([lat.ravel(), lon.ravel()])
    freq = rng.normal(0, 0.35, size=(2, dim))
    phase = rng.uniform(0, 2 * np.pi, dim)
    emb = np.cos(latlon @ freq + phase).astype(np.float32)
    inside = (latlon[:, 0] > 35) & (latlon[:, 1] > -95)
    fused = (emb @ emb[np.flatnonzero(inside)[0]]).astype(np.float32)
    return latlon, emb, inside, fused


def pick(inside: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(np.flatnonzero(inside), n, replace=False))


# --- uncertainty and the per-sample table --------------------------------------------------------

def test_bootstrap_spread_shrinks_with_tenfold_presences():
    latlon, emb, inside, fused = landscape()
    kwargs = dict(cv_blocks_deg=2.0, n_background=300, cs=(1e-2,), novelty=False, seed=1)
    few = fit_maps({"location": emb}, fused, latlon, pick(inside, 15), None, **kwargs)
    many = fit_maps({"location": emb}, fused, latlon, pick(inside, 150), None, **kwargs)
    assert few.uncertainty.shape == (len(latlon),) and few.uncertainty.dtype == np.float32
    assert np.isfinite(few.uncertainty).all() and (few.uncertainty >= 0).all()
    # Ten times the presences: the refits agree more, over the range and over the whole map.
    assert np.mean(many.uncertainty[inside]) < 0.7 * np.mean(few.uncertainty[inside])
    assert np.mean(many.uncertainty) < np.mean(few.uncertainty)
    assert few.n_boot == 10 and "10 bootstrap refits" in few.tags()["FIT_UNCERTAINTY"]


def test_bootstrap_refits_minimise_scikit_learns_objective():
    """The fixed-Hessian Newton refits reach the weighted fit lbfgs converges to."""
    from sklearn.linear_model import LogisticRegression

    from taxamap.products.fit import _bootstrap

    latlon, emb, inside, _ = landscape(900, 12)
    rng = np.random.default_rng(0)
    x = (emb - emb.mean(0)) / emb.std(0)
    x = x[rng.choice(len(x), 400, replace=False)].astype(np.float64)
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0.8).astype(int)
    base = LogisticRegression(C=0.1, class_weight="balanced", tol=1e-10, max_iter=5000).fit(x, y)
    coefs, intercepts = _bootstrap(x, y, 0.1, 3, 7, (base.coef_[0], base.intercept_[0]))
    # The same resamples, drawn again, fitted by scikit-learn to a tight tolerance.
    draw = np.random.default_rng(7)
    pres, back = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for i in range(3):
        weight = (np.bincount(draw.choice(pres, pres.size), minlength=y.size)
                  + np.bincount(draw.choice(back, back.size), minlength=y.size))
        ref = LogisticRegression(C=0.1, class_weight="balanced", tol=1e-10, max_iter=5000).fit(
            x, y, sample_weight=weight.astype(float))
        np.testing.assert_allclose(x @ coefs[:, i] + intercepts[i],
                                   x @ ref.coef_[0] + ref.intercept_[0], atol=1e-4)
        assert not np.allclose(coefs[:, i], base.coef_[0], atol=1e-3)


def test_per_sample_table_is_a_refit_without_the_fold(tmp_path):
    from sklearn.linear_model import LogisticRegression

    latlon, emb, inside, fused = landscape()
    pres = pick(inside, 40)
    c = 1e-2
    result = fit_maps({"location": emb}, fused, latlon, pres, None, cv_blocks_deg=2.0,
                      n_background=300, cs=(c,), seed=3, n_boot=5)
    s = result.samples
    assert list(s.columns) == ["cell", "lat", "lon", "presence", "fold", "fused", "fitted",
                               "combined", "novelty", "uncertainty"]
    # The design the fit sees: unit rows standardised by all cells' mean and sd.
    cells = s.cell.to_numpy()
    wanted, position = np.unique(cells, return_inverse=True)
    stats, rows = _read_pass({"location": lambda r: emb[r]}, len(emb), wanted)
    x = _design(*rows["location"], *stats["location"])[position].astype(np.float64)
    y, fold = s.presence.to_numpy(), s.fold.to_numpy()
    assert set(fold) == {1, 2, 3, 4, 5}
    unit = joint_rows([rows["location"][0]])[position]
    for k in range(1, 6):
        train, test = fold != k, fold == k
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=500).fit(x[train],
                                                                                  y[train])
        np.testing.assert_allclose(s.fitted[test], model.predict_proba(x[test])[:, 1],
                                   atol=2e-4)
        # Novelty without the fold: nearest other-fold sample, in that fold set's spacing.
        ref = np.unique(unit[train], axis=0)
        nearest = 1 - (unit[test] @ ref.T).max(axis=1)
        sims = ref @ ref.T
        np.fill_diagonal(sims, -np.inf)
        spacing = np.median(1 - sims.max(axis=1))
        np.testing.assert_allclose(s.novelty[test], np.where(nearest < 1e-6, 0, nearest)
                                   / spacing, rtol=1e-3, atol=1e-5)
        assert (s.novelty[test] > 0).all()  # a held-out sample is never its own reference
    assert np.isfinite(s.uncertainty).all() and (s.uncertainty > 0).all()

    table = result.trust_table()
    assert list(table.measure) == ["novelty"] * 3 + ["uncertainty"] * 3
    assert table.n.sum() == 2 * len(s)
    err = np.abs(y - s.fitted.to_numpy())
    low = s.novelty <= table.high[0]
    assert table.mean_abs_error[0] == pytest.approx(err[low].mean())
    text = result.format_table()
    assert "by tercile of novelty and uncertainty" in text and "mean |error|" in text

    # The table travels with the map's Dataset (what <slug>_cv.csv is written from).
    import xarray as xr

    from taxamap.dataset import cv_table, with_cv_table

    back = cv_table(with_cv_table(xr.Dataset(), s))
    assert list(back.columns) == list(s.columns) and len(back) == len(s)
    np.testing.assert_allclose(back.fitted, s.fitted, rtol=1e-5)


def test_trust_layers_can_be_switched_off_and_bad_refit_counts():
    latlon, emb, inside, fused = landscape(900, 12)
    result = fit_maps({"location": emb}, fused, latlon, pick(inside, 20), None,
                      cv_blocks_deg=2.0, n_background=200, cs=(1e-2,), n_boot=0, novelty=False)
    assert result.uncertainty is None and result.novelty is None
    assert "novelty" not in result.samples and "FIT_NOVELTY" not in result.tags()
    assert "tercile" not in result.format_table()
    with pytest.raises(TaxamapError, match="at least 2 bootstrap refits"):
        fit_maps({"location": emb}, fused, latlon, pick(inside, 20), None, n_boot=1)


# --- novelty ---------------------------------------------------------------------------------------

def test_novelty_is_zero_at_training_cells_and_grows_with_distance():
    latlon, emb, inside, fused = landscape()
    pres = pick(inside, 30)
    result = fit_maps({"location": emb}, fused, latlon, pres, None, cv_blocks_deg=2.0,
                      n_background=300, cs=(1e-2,), n_boot=0)
    training = np.unique(result.samples.cell)
    assert np.all(result.novelty[training] == 0)
    others = np.setdiff1d(np.arange(len(emb)), training)
    assert (result.novelty[others] > 0).all()
    assert 0 < result.novelty_spacing < 1 and "FIT_NOVELTY" in result.tags()

    # A reference of unit vectors; queries turned away from one of them by growing angles.
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 16)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    index = Novelty(ref)
    far = np.zeros(16, dtype=np.float32)
    far[0] = 1
    far -= (far @ ref[0]) * ref[0]
    far /= np.linalg.norm(far)
    # The nearest reference to each query must stay ref[0] for the ordering to hold.
    angles = np.linspace(0, 0.3, 7)
    queries = np.cos(angles)[:, None] * ref[0] + np.sin(angles)[:, None] * far
    values = index(queries)
    assert values[0] == 0 and (np.diff(values) > 0).all()
    np.testing.assert_allclose(values, (1 - np.cos(angles)) / index.spacing, rtol=1e-3,
                               atol=1e-5)
    # Spacing: the training samples' median leave-one-out nearest distance.
    sims = ref @ ref.T
    np.fill_diagonal(sims, -np.inf)
    assert index.spacing == pytest.approx(float(np.median(1 - sims.max(axis=1))), rel=1e-5)
    # Duplicated samples (several records in one cell) do not shrink the spacing to 0.
    assert Novelty(np.r_[ref, ref]).spacing == pytest.approx(index.spacing, rel=1e-6)
    assert np.isnan(index(np.zeros((1, 16), dtype=np.float32)))[0]


# --- disagreement ------------------------------------------------------------------------------

def test_disagreement_is_zero_when_modalities_agree():
    a = np.array([[0.1, 0.2], [np.nan, 0.05]], dtype=np.float32)
    assert np.array_equal(disagreement({"location": a, "satellite": a.copy(),
                                        "environment": a.copy()})[0], [0, 0])
    b = np.array([[0.3, 0.2], [0.1, np.nan]], dtype=np.float32)
    out = disagreement([a, b])
    assert out[0, 0] == pytest.approx(0.1) and out[0, 1] == 0
    # A cell scored by one modality only has no spread to report.
    assert np.isnan(out[1, 0]) and np.isnan(out[1, 1])
    c = np.array([[0.5, 0.2], [0.3, 0.0]], dtype=np.float32)
    three = disagreement([a, b, c])
    assert three[0, 0] == pytest.approx(np.std([0.1, 0.3, 0.5]), rel=1e-6)
    assert three[1, 0] == pytest.approx(0.1, rel=1e-6)  # NaN left out: std of (0.1, 0.3)
    with pytest.raises(TaxamapError, match="at least 2 modalities"):
        disagreement([a])


# --- MESS ----------------------------------------------------------------------------------------

def hand_mess(p: list[float], ref: list[list[float]]) -> tuple[float, int]:
    """Elith et al. (2010) appendix S3, written out plainly for one cell."""
    sims = []
    for i, value in enumerate(p):
        column = [r[i] for r in ref]
        lo, hi = min(column), max(column)
        f = 100.0 * sum(1 for v in column if v < value) / len(column)
        if f == 0:
            s = (value - lo) / (hi - lo) * 100
        elif f <= 50:
            s = 2 * f
        elif f < 100:
            s = 2 * (100 - f)
        else:
            s = (hi - value) / (hi - lo) * 100
        sims.append(s)
    best = min(range(len(sims)), key=lambda i: sims[i])
    return sims[best], best


def test_mess_matches_a_hand_computation():
    ref = [[1.0, 10.0, 5.0], [2.0, 20.0, 5.5], [3.0, 30.0, 6.0], [4.0, 40.0, 9.0]]
    cells = [[2.5, 25.0, 5.6], [1.0, 25.0, 5.6], [3.5, 45.0, 5.6], [0.0, 25.0, 5.6],
             [2.5, 25.0, 12.0], [4.0, 40.0, 9.0]]
    result = mess(np.array(cells), np.array(ref), ("a", "b", "c"))
    for row, m, v in zip(cells, result.mess, result.variable):
        want, var = hand_mess(row, ref)
        assert m == pytest.approx(want, abs=1e-4) and v == var
    assert result.mess[0] == pytest.approx(100.0)          # at the median of every variable
    assert result.mess[2] == pytest.approx(-50 / 3, rel=1e-5) and result.variable[2] == 1
    assert result.mess[3] == pytest.approx(-100 / 3, rel=1e-5) and result.variable[3] == 0
    assert result.mess[4] < 0 and result.names[result.variable[4]] == "c"


def test_mess_of_worldclim_rasters(tmp_path):
    from taxamap.sources.worldclim import WorldClimFeatures
    from tests.helpers.worldclim_fixtures import write_rasters

    synth = write_rasters(tmp_path / "wc")
    rows, cols = np.nonzero(~synth.ocean & ~synth.partial.any(axis=0))
    latlon = np.column_stack([90 - (rows + 0.5) * 10, -180 + (cols + 0.5) * 10])
    raw = synth.raw[:, rows, cols].T.astype(np.float64)
    rng = np.random.default_rng(0)
    ref = np.sort(rng.choice(len(latlon), 40, replace=False))
    result = climate_mess(WorldClimFeatures(tmp_path / "wc"), latlon, latlon[ref])
    assert result.names[0] == "elev" and result.names[-1] == "bio_19"
    # On the raw values: MESS is rank based, the features' z-scores change nothing.
    for i in rng.choice(len(latlon), 25, replace=False):
        want, var = hand_mess(list(raw[i]), [list(r) for r in raw[ref]])
        assert result.mess[i] == pytest.approx(want, abs=1e-2) and result.variable[i] == var
    assert (result.mess[ref] >= 0).all()
    outside = np.flatnonzero(result.mess < 0)
    assert outside.size > 0
    for i in outside:
        k = result.variable[i]
        assert raw[i, k] < raw[ref, k].min() or raw[i, k] > raw[ref, k].max()
    # Without a reference: the region itself, so nothing lies outside its range.
    assert (climate_mess(WorldClimFeatures(tmp_path / "wc"), latlon).mess >= 0).all()
    ocean = np.array([[85.0, -175.0]])  # a pixel of the synthetic ocean band
    assert np.isnan(climate_mess(WorldClimFeatures(tmp_path / "wc"), ocean, latlon).mess[0])


# --- masks -----------------------------------------------------------------------------------------

def test_mask_conditions():
    bands = {"fused": np.array([0.1, 0.2, 0.3, np.nan]),
             "novelty": np.array([0.5, 3.0, np.nan, 1.0])}
    assert mask_cells(bands, parse_mask("novelty>2")).tolist() == [False, True, False, False]
    assert mask_cells(bands, parse_mask("Novelty >= 1, fused<0.15")).tolist() == \
        [True, True, False, True]
    for bad in ("novelty", "novelty>>2", "novelty>x", "novelty>nan", ""):
        with pytest.raises(TaxamapError, match="BAND>V"):
            parse_mask(bad)
    with pytest.raises(TaxamapError, match="lacks; its bands are fused, novelty"):
        mask_cells(bands, parse_mask("uncertainty>0.1"))



# --- survey and threshold masks on a map GeoTIFF ----------------------------------------------------

TRUST_BANDS = ("fused", "location", "fitted", "combined", "uncertainty", "novelty")


def write_trust_map(path, seed: int = 0):
    """A 0.1 degree map over (-100, 35)-(-96, 39) with the bands of ``predict --fit`` plus the
    trust layers; the western tenth and a lake are nodata. Returns (path, bands dict)."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    h = w = 40
    lat = 39 - (np.arange(h) + 0.5) * 0.1
    lon = -100 + (np.arange(w) + 0.5) * 0.1
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    suit = np.exp(-((la - 37) ** 2 + (lo + 98) ** 2) / 2).astype(np.float32)
    bands = {"fused": suit * 0.1, "location": suit * 0.1, "fitted": suit,
             "combined": suit * 0.9 + 0.05,
             "uncertainty": rng.uniform(0, 0.1, (h, w)).astype(np.float32),
             "novelty": (np.abs(lo + 98) + rng.uniform(0, 0.5, (h, w))).astype(np.float32)}
    nodata = np.zeros((h, w), dtype=bool)
    nodata[:, :4] = True
    nodata[18:22, 18:22] = True
    for v in bands.values():
        v[nodata] = np.nan
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=len(bands),
                       dtype="float32", crs="EPSG:4326", nodata=float("nan"),
                       transform=from_origin(-100, 39, 0.1, 0.1)) as dst:
        for i, (name, v) in enumerate(bands.items(), start=1):
            dst.write(v, i)
            dst.set_band_description(i, name)
    return path, bands


RECORDS = np.array([[37.05, -98.05], [36.5, -97.2], [38.2, -98.9], [37.6, -96.4]])


def _geod(a, b):
    from pyproj import Geod

    a, b = np.broadcast_arrays(a, b)
    shape = a.shape[:-1]
    a, b = a.reshape(-1, 2), b.reshape(-1, 2)
    _, _, d = Geod(ellps="WGS84").inv(a[:, 1], a[:, 0], b[:, 1], b[:, 0])
    return np.asarray(d).reshape(shape) / 1000


def test_survey_sites_obey_the_distance_rules_and_lie_on_valid_cells(tmp_path, capsys):
    import pyogrio
    import rasterio

    from taxamap.cli import main

    path, bands = write_trust_map(tmp_path / "slug.tif")
    occ = tmp_path / "occ.csv"
    occ.write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in RECORDS)
                   + "10.0,10.0\n")  # one record off the map still counts for distances
    code = main(["survey", str(path), "--occurrences", str(occ), "--n", "12",
                 "--min-distance", "40", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    files = [tmp_path / "out" / f"slug_survey.{ext}" for ext in ("gpkg", "csv", "gpx", "html")]
    assert out.split() == [str(f) for f in files]
    assert "priority = weighted geometric mean" in err and "suitability (combined)" in err

    sites = pyogrio.read_dataframe(files[0])
    assert len(sites) == 12 and list(sites["rank"]) == list(range(1, 13))
    assert set(sites.columns) >= {"lat", "lon", "priority", "combined", "uncertainty", "novelty",
                                  "nearest_record_km"}
    latlon = sites[["lat", "lon"]].to_numpy()
    assert (np.diff(sites.priority) <= 0).all()
    # Every site at least 40 km (WGS84 geodesic) from every record and every other site.
    to_records = _geod(latlon[:, None, :], RECORDS[None, :, :])
    assert (to_records >= 40).all()
    np.testing.assert_allclose(sites.nearest_record_km, to_records.min(axis=1), rtol=1e-6)
    pairs = _geod(latlon[:, None, :], latlon[None, :, :])
    assert (pairs[~np.eye(len(latlon), dtype=bool)] >= 40).all()
    # ... on a valid cell of the map, at its centre, with that cell's values.
    with rasterio.open(path) as src:
        values = np.array([v for v in src.sample(zip(latlon[:, 1], latlon[:, 0]))])
    assert np.isfinite(values).all()
    np.testing.assert_allclose(sites.combined, values[:, 3], rtol=1e-6)
    np.testing.assert_allclose((39 - latlon[:, 0]) / 0.1 % 1, 0.5, atol=1e-6)
    np.testing.assert_allclose((latlon[:, 1] + 100) / 0.1 % 1, 0.5, atol=1e-6)

    csv = pd.read_csv(files[1])
    np.testing.assert_allclose(csv[["lat", "lon"]], latlon, atol=1e-5)
    gpx = pyogrio.read_dataframe(files[2], layer="waypoints")  # GDAL's GPX driver parses it
    assert list(gpx["name"]) == [f"site {i:02d}" for i in range(1, 13)]
    np.testing.assert_allclose(np.column_stack([gpx.geometry.y, gpx.geometry.x]), latlon,
                               atol=1e-6)
    assert "nearest record" in gpx["desc"][0]
    page = files[3].read_text()
    assert "survey sites (12)" in page and "Where to survey next" in page

    # The Python API: a GeoDataFrame, the same sites; weights change the ranking.
    import taxamap

    api = taxamap.survey(path, occurrences=occ, n=12, min_distance=40)
    assert api.crs.to_epsg() == 4326
    np.testing.assert_allclose(api[["lat", "lon"]].to_numpy(), latlon)
    only = taxamap.survey(path, occurrences=RECORDS, n=3, min_distance=40,
                          weights="novelty")
    assert list(only.columns[:5]) == ["rank", "lat", "lon", "priority", "novelty"]
    assert only.novelty.iloc[0] >= np.nanpercentile(bands["novelty"], 95)


def test_survey_takes_fewer_sites_when_the_rules_leave_fewer(tmp_path, caplog):
    from taxamap.products.survey import plan_survey

    path, _ = write_trust_map(tmp_path / "m.tif")
    with caplog.at_level("WARNING", logger="taxamap.products.survey"):
        plan = plan_survey(path, RECORDS, n=50, min_distance_km=150)
    assert 1 <= len(plan.sites) < 50 and "only" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--min-distance", "5"], "a survey needs the known records"),
    (["--occurrences", "OCC", "--min-distance", "0"], "must be a positive number"),
    (["--occurrences", "OCC", "--min-distance", "-5"], "must be a positive number"),
    (["--occurrences", "FAR"], "none of the 2 occurrences falls on the map"),
    (["--occurrences", "OCC", "--weights", "suitability,disagreement"],
     "no band 'disagreement' to weight"),
    (["--occurrences", "OCC", "--weights", "novelty:-1"], "positive weights"),
    (["--occurrences", "OCC", "--n", "0"], "--n must be at least 1"),
    (["--occurrences", "OCC", "--min-distance", "5000"], "no valid cell of m.tif is 5000 km"),
])
def test_survey_bad_input_is_one_line(tmp_path, capsys, args, message):
    from taxamap.cli import main

    path, _ = write_trust_map(tmp_path / "m.tif")
    occ, far = tmp_path / "occ.csv", tmp_path / "far.csv"
    occ.write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in RECORDS))
    far.write_text("lat,lon\n10,10\n-20,30\n")
    argv = [str(occ) if a == "OCC" else str(far) if a == "FAR" else a for a in args]
    code = main(["survey", str(path), *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taxamap: error:") and message in lines[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_threshold_mask_drops_novel_cells(tmp_path, capsys):
    import rasterio

    from taxamap.cli import main

    path, bands = write_trust_map(tmp_path / "m.tif")
    code = main(["threshold", str(path), "--band", "fitted", "--rule", "value:0.3",
                 "--mask", "novelty>1.5", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 0, err
    with rasterio.open(tmp_path / "r" / "m_range.tif") as src:
        binary = src.read(1)
        assert "mask novelty>1.5" in src.tags()["RULE"]
    novel = bands["novelty"] > 1.5
    assert (binary[novel] == 255).all()
    keep = ~novel & np.isfinite(bands["fitted"])
    assert np.array_equal(binary[keep] == 1, bands["fitted"][keep] >= 0.3)
    assert (binary == 1).any()
    # Python: the same mask; masked cells are NaN in the range raster.
    import taxamap

    rng = taxamap.threshold(path, "value:0.3", band="fitted", mask="novelty>1.5")
    assert np.isnan(rng.raster.values[novel]).all() and rng.n_in_range == int((binary == 1).sum())
    code = main(["threshold", str(path), "--mask", "disagreement>0.1", "--out",
                 str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "names band 'disagreement', which m.tif lacks" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_bands_follow_the_design_order_whatever_order_they_are_made_in():
    """A fitted multimodal map with a panel makes its bands in three places (panel, fit, the
    scorer's trust bands); the Dataset and the GeoTIFF list them in DESIGN.md's order."""
    from taxamap.dataset import in_band_order

    made = {"relative": 0, "fitted": 1, "combined": 2, "uncertainty": 3, "novelty": 4,
            "mess": 5, "mess_variable": 6, "disagreement": 7, "other": 8}
    assert list(in_band_order(made)) == [
        "relative", "disagreement", "mess", "mess_variable", "fitted", "combined",
        "uncertainty", "novelty", "other"]
