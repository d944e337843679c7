"""The Python API's data contract: predict -> xarray.Dataset, write/threshold/evaluate on it,
GeoDataFrame inputs in any CRS. Tiny models in the released layout, offline."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import rasterio

import taxamap

BBOX = (-84.0, 39.0, -82.0, 41.0)
PROMPT = "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("api-cache")


@pytest.fixture(scope="module")
def ds(models_dir, cache):
    return taxamap.predict(species="Cardinalis cardinalis", bbox=BBOX, resolution=0.1,
                           models=models_dir, cache=cache, progress=False)


@pytest.mark.slow
def test_import_taxamap_does_not_import_torch():
    code = ("import sys, taxamap; assert callable(taxamap.predict); "
            "print('torch' in sys.modules, 'xarray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_dataset_dims_coords_crs_and_attrs(ds):
    assert ds["fused"].dims == ("y", "x")
    assert list(ds.data_vars) == ["fused", "location"]
    assert ds.sizes == {"y": 20, "x": 20}
    assert all(ds[v].dtype == np.float32 for v in ds.data_vars)
    # cell centres, latitude descending
    assert ds["y"].values[0] == pytest.approx(40.95) and ds["y"].values[-1] == pytest.approx(39.05)
    assert ds["x"].values[0] == pytest.approx(-83.95) and ds["x"].values[-1] == pytest.approx(-82.05)
    assert ds.rio.crs.to_epsg() == 4326
    t = ds.rio.transform()
    assert (t.a, t.b, t.c, t.d, t.e, t.f) == pytest.approx((0.1, 0, -84.0, 0, -0.1, 41.0))
    assert np.isnan(ds["fused"].rio.nodata)
    assert ds.attrs["prompt"] == PROMPT and ds.attrs["query"] == "Cardinalis cardinalis"
    assert ds.attrs["modalities"] == "location" and ds.attrs["fusion"] == "mean"
    assert ds.attrs["taxamap_version"] == taxamap.__version__
    assert "MVRL/ecogeo" in ds.attrs["models"] and "model_location" in ds.attrs
    assert all(isinstance(v, str) for v in ds.attrs.values())
    values = ds["fused"].values
    assert np.isfinite(values).sum() == 400  # every cell of this box is on land
    assert np.all(np.abs(values[np.isfinite(values)]) <= 1.0 + 1e-6)


def test_predict_writes_no_output_file(models_dir, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    taxamap.predict(species="Cardinalis cardinalis", bbox=BBOX, resolution=0.1,
                    models=models_dir, cache=cache, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_several_species_give_a_species_dimension(ds, models_dir, cache):
    both = taxamap.predict(species=["Cardinalis cardinalis", "Cyanocitta cristata"], bbox=BBOX,
                           resolution=0.1, models=models_dir, cache=cache, progress=False)
    assert both["fused"].dims == ("species", "y", "x")
    assert list(both["species"].values) == ["Cardinalis cardinalis", "Cyanocitta cristata"]
    assert list(both["slug"].values) == ["cardinalis-cardinalis", "cyanocitta-cristata"]
    assert both["prompt"].values[0] == PROMPT
    # the same species alone and in a batch: the same map
    np.testing.assert_allclose(both["fused"].sel(species="Cardinalis cardinalis").values,
                               ds["fused"].values, atol=1e-6, equal_nan=True)
    assert not np.allclose(both["fused"].values[0], both["fused"].values[1], equal_nan=True)


def test_rio_to_raster_round_trip_equals_write(ds, tmp_path):
    paths = taxamap.write(ds, out=tmp_path / "maps", formats=("tif",))
    tif = paths["cardinalis-cardinalis.tif"]
    ds["fused"].rio.to_raster(tmp_path / "fused.tif")
    with rasterio.open(tif) as a, rasterio.open(tmp_path / "fused.tif") as b:
        assert a.transform.almost_equals(b.transform) and a.crs == b.crs
        assert (a.width, a.height) == (b.width, b.height)
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert np.isnan(b.nodata)
        assert a.tags()["PROMPT"] == PROMPT and a.tags()["QUERY"] == "Cardinalis cardinalis"
        assert a.descriptions == ("fused", "location")


def test_write_writes_what_the_cli_writes(ds, tmp_path):
    paths = taxamap.write(ds, out=tmp_path)
    assert sorted(p.name for p in paths.values()) == [
        "cardinalis-cardinalis.html", "cardinalis-cardinalis.png", "cardinalis-cardinalis.tif"]
    assert all(p.stat().st_size > 0 for p in paths.values())


def test_write_never_silently_replaces_a_map_of_another_query(ds, tmp_path, caplog):
    """A file named like this map but holding another query's map (its recorded query) is kept:
    this map goes to the next free name, said in one line; a rerun of the same query then
    overwrites its own files, and the record is read back from each format."""
    import logging

    from taxamap.writers import recorded_query

    other = ds.copy()
    other.attrs.update(query="Cyanocitta cristata")  # named like the cardinal's map
    first = taxamap.write(other, out=tmp_path, threshold="percentile:90")
    before = {p.name: p.read_bytes() for p in first.values()}
    assert {recorded_query(p) for p in first.values() if p.suffix != ".gpkg"} == {
        "Cyanocitta cristata"}
    with caplog.at_level(logging.INFO, logger="taxamap"):
        paths = taxamap.write(ds, out=tmp_path, threshold="percentile:90")
    assert sorted(p.name for p in paths.values()) == [
        "cardinalis-cardinalis-2.html", "cardinalis-cardinalis-2.png",
        "cardinalis-cardinalis-2.tif", "cardinalis-cardinalis-2_range.gpkg",
        "cardinalis-cardinalis-2_range.tif"]
    assert {p.name: p.read_bytes() for p in first.values()} == before
    said = [r.getMessage() for r in caplog.records if "cardinalis-cardinalis-2" in r.getMessage()]
    assert len(said) == 1 and "'Cyanocitta cristata'" in said[0] and "keeping it" in said[0]
    again = taxamap.write(ds, out=tmp_path, formats=("png",))
    assert [p.name for p in again.values()] == ["cardinalis-cardinalis-2.png"]
    assert len(list(tmp_path.iterdir())) == 10


def test_threshold_on_dataset_equals_threshold_on_its_file(ds, tmp_path):
    tif = taxamap.write(ds, out=tmp_path, formats=("tif",))["cardinalis-cardinalis.tif"]
    a = taxamap.threshold(ds, "percentile:80")
    b = taxamap.threshold(tif, "percentile:80", out=tmp_path / "ranges")
    assert a.threshold == pytest.approx(b.threshold, abs=0)
    np.testing.assert_array_equal(a.raster.values, b.raster.values)
    assert a.raster.rio.crs.to_epsg() == 4326
    assert set(np.unique(a.raster.values[np.isfinite(a.raster.values)])) == {0.0, 1.0}
    assert a.n_in_range == int(np.nansum(a.raster.values)) == b.n_in_range
    assert a.polygons.crs.to_epsg() == 4326 and "area_km2" in a.polygons
    assert a.area_km2 == pytest.approx(b.area_km2)
    assert a.area_km2 == pytest.approx(float(a.polygons["area_km2"].sum()))
    assert sorted(p.name for p in b.paths.values()) == [
        "cardinalis-cardinalis_range.gpkg", "cardinalis-cardinalis_range.tif"]
    assert a.paths == {}
    # One range type: the map in memory, written later, gives the file's range byte for byte.
    assert type(a) is type(b) is taxamap.Range
    written = a.write(tmp_path / "later")
    assert a.paths == written and written["raster"].name == "cardinalis-cardinalis_range.tif"
    assert written["raster"].read_bytes() == b.paths["raster"].read_bytes()
    assert a.polygons.to_json() == b.polygons.to_json()


def _points(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(39.1, 40.9, n), rng.uniform(-83.9, -82.1, n)])


def test_evaluate_on_dataset_equals_evaluate_on_its_file(ds, tmp_path):
    tif = taxamap.write(ds, out=tmp_path, formats=("tif",))["cardinalis-cardinalis.tif"]
    pres, back = _points(1, 40), _points(2, 300)
    a = taxamap.evaluate(ds, pres, background=back)
    b = taxamap.evaluate(tif, pres, background=back)
    assert list(a.index) == ["fused", "location"]
    for column in ("auc", "average_precision", "tss", "boyce", "n_presence"):
        assert a.loc["fused", column] == pytest.approx(b.loc["fused", column], abs=1e-12)
    assert 0.0 <= a.loc["fused", "auc"] <= 1.0


def test_geodataframe_inputs_in_another_crs(ds):
    import geopandas as gpd
    import pandas as pd

    pres, back = _points(3, 30), _points(4, 200)
    as_arrays = taxamap.evaluate(ds, pres, background=back)

    def frame(latlon):
        gdf = gpd.GeoDataFrame(geometry=gpd.points_from_xy(latlon[:, 1], latlon[:, 0]),
                               crs="EPSG:4326")
        return gdf.to_crs("EPSG:3857")

    as_frames = taxamap.evaluate(ds, frame(pres), background=frame(back))
    pd.testing.assert_frame_equal(as_arrays, as_frames)
    as_table = taxamap.evaluate(ds, pd.DataFrame({"latitude": pres[:, 0],
                                                  "longitude": pres[:, 1]}), background=back)
    pd.testing.assert_frame_equal(as_arrays, as_table)
    crsless = gpd.GeoDataFrame(geometry=gpd.points_from_xy(pres[:, 1], pres[:, 0]))
    with pytest.raises(taxamap.TaxamapError, match="no CRS"):
        taxamap.evaluate(ds, crsless)


def test_threshold_maxtss_with_geodataframe_occurrences(ds):
    import geopandas as gpd

    pres = _points(5, 25)
    gdf = gpd.GeoDataFrame(geometry=gpd.points_from_xy(pres[:, 1], pres[:, 0]),
                           crs="EPSG:4326").to_crs("EPSG:32617")
    a = taxamap.threshold(ds, "maxtss", occurrences=gdf)
    b = taxamap.threshold(ds, "maxtss", occurrences=pres)
    assert a.threshold == pytest.approx(b.threshold)


def test_region_and_regions():
    ohio = taxamap.region("Ohio")
    assert ohio.crs.to_epsg() == 4326 and len(ohio) == 1 and ohio["kind"].iloc[0] == "state"
    west, south, east, north = ohio.total_bounds
    assert -85 < west < -84 and 38 < south < 39 and -81 < east < -80 and 41 < north < 42.5
    table = taxamap.regions()
    assert {"name", "kind"} <= set(table.columns) and len(table) > 300
    assert set(taxamap.regions(kind="continent")["kind"]) == {"continent"}


def test_bad_inputs_are_taxamap_errors(ds, models_dir, cache):
    with pytest.raises(taxamap.TaxamapError, match="unknown modality"):
        taxamap.predict(species="Cardinalis cardinalis", bbox=BBOX, modalities=("radar",),
                        models=models_dir, cache=cache, progress=False)
    with pytest.raises(taxamap.TaxamapError, match="xarray.Dataset"):
        taxamap.write(np.zeros((3, 3)), out=".")
    with pytest.raises(taxamap.TaxamapError, match="select one"):
        taxamap.threshold(ds.expand_dims(species=["a", "b"]), "percentile:90")


def test_fit_adds_fitted_and_combined_variables(models_dir, cache):
    pres = np.column_stack([np.random.default_rng(6).uniform(40.0, 40.9, 40),
                            np.random.default_rng(7).uniform(-83.9, -83.0, 40)])
    ds = taxamap.predict(species="Cardinalis cardinalis", bbox=BBOX, resolution=0.1,
                         models=models_dir, cache=cache, progress=False, occurrences=pres,
                         fit=True, cv_blocks=0.5, seed=1)
    from taxamap.dataset import cv_table, score_variables

    assert score_variables(ds) == ["fused", "location", "fitted", "combined", "uncertainty",
                                   "novelty"]
    # The per-sample cross-validation travels with the map (what <slug>_cv.csv holds).
    samples = cv_table(ds)
    assert samples["presence"].sum() > 0 and samples["fitted"].between(0, 1).all()
    assert {"fold", "novelty", "uncertainty"} <= set(samples.columns)
    fitted = ds["fitted"].values[np.isfinite(ds["fitted"].values)]
    assert fitted.size == 400 and fitted.min() >= 0.0 and fitted.max() <= 1.0
    assert "fit_cv" in ds.attrs and "fit_model" in ds.attrs
    # the records pull the fitted map up where they are
    north = ds["fitted"].sel(y=slice(40.9, 40.0)).mean()
    south = ds["fitted"].sel(y=slice(39.9, 39.0)).mean()
    assert float(north) > float(south)


def test_threshold_reports_eoo_and_aoo(ds):
    rng = taxamap.threshold(ds, "percentile:50")
    assert rng.eoo_km2 > 0 and rng.aoo_km2 > 0
    assert rng.aoo_km2 <= rng.area_km2 * 1.2 + 100
    assert "EOO" in rng.criterion_b and "B1" in rng.criterion_b and "not a Red List" in rng.criterion_b
    assert float(rng.polygons["eoo_km2"].iloc[0]) == pytest.approx(rng.eoo_km2)


def test_evaluate_against_an_expert_range_geodataframe(ds):
    import geopandas as gpd
    import shapely

    expert = gpd.GeoDataFrame(geometry=[shapely.box(-84, 40, -82, 41)],
                              crs="EPSG:4326").to_crs("EPSG:5070")
    table = taxamap.evaluate(ds, range=expert)
    for column in ("range_ap", "range_auc", "precision", "recall", "f1", "jaccard",
                   "n_h3_cells", "n_h3_positive"):
        assert column in table.columns
    assert list(table.index) == ["fused", "location"]
    assert 0 < table.loc["fused", "n_h3_positive"] < table.loc["fused", "n_h3_cells"]
    with pytest.raises(taxamap.TaxamapError, match="occurrences"):
        taxamap.evaluate(ds)
