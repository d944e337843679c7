"""A map against an expert range on H3 cells (the SINR protocol), checked independently."""

from __future__ import annotations

import json

import geopandas as gpd
import h3
import numpy as np
import pytest
import rasterio
import shapely

from taxamap.cli import main
from taxamap.errors import TaxamapError
from taxamap.products.expert import compare_range, read_expert_range
from tests.helpers.maps import centres, write_map

WEST, NORTH, RES, HEIGHT, WIDTH = -104.0, 45.0, 0.1, 70, 100
#: The expert range: a non-convex polygon inside the map.
EXPERT = shapely.Polygon([(-102, 40), (-97, 40), (-97, 43), (-99, 43), (-99, 41.5), (-102, 41.5)])


@pytest.fixture
def scene(tmp_path):
    """A map whose scores rise towards the expert range (plus noise), NaN in one corner; the
    expert range saved in Web Mercator (another CRS than the map)."""
    rng = np.random.default_rng(0)
    lat, lon = centres(WEST, NORTH, RES, HEIGHT, WIDTH)
    distance = shapely.distance(EXPERT, shapely.points(lon.ravel(), lat.ravel())).reshape(lat.shape)
    fused = np.exp(-distance / 1.5) + rng.normal(0, 0.15, lat.shape)
    location = -distance + rng.normal(0, 0.5, lat.shape)
    corner = (lat < 40) & (lon > -97)
    fused[corner] = np.nan
    location[corner] = np.nan
    path = write_map(tmp_path / "map.tif", {"fused": fused, "location": location},
                     WEST, NORTH, RES)
    expert = tmp_path / "expert.gpkg"
    gpd.GeoDataFrame({"name": ["range"]}, geometry=[EXPERT], crs=4326).to_crs(3857).to_file(expert)
    return path, expert


def independent(map_path):
    """H3 cells whose centre is on a valid cell, their labels and band values, computed without
    taxamap: one polygon_to_cells over the map's box, rasterio's sampler, shapely's contains."""
    poly = h3.LatLngPoly([(NORTH - HEIGHT * RES, WEST), (NORTH - HEIGHT * RES, WEST + WIDTH * RES),
                          (NORTH, WEST + WIDTH * RES), (NORTH, WEST)])
    ids = np.array(sorted(h3.polygon_to_cells(poly, 5)))
    latlon = np.array([h3.cell_to_latlng(c) for c in ids])
    with rasterio.open(map_path) as ds:
        values = np.array(list(ds.sample(latlon[:, ::-1]))).T.astype(np.float64)
    labels = shapely.contains_xy(EXPERT, latlon[:, 1], latlon[:, 0])
    return ids, labels, values


@pytest.mark.slow
def test_ap_auc_and_best_f1_equal_an_independent_computation(scene):
    from sklearn.metrics import (average_precision_score, f1_score, jaccard_score,
                                 precision_score, recall_score, roc_auc_score)

    map_path, expert = scene
    result = compare_range(map_path, expert)
    ids, labels, values = independent(map_path)
    on_map = np.isfinite(values).any(axis=0)
    assert sorted(result.cells.h3) == sorted(ids[on_map])
    table = result.table.set_index("band")
    assert list(table.index) == ["fused", "location"]
    for i, band in enumerate(["fused", "location"]):
        ok = np.isfinite(values[i])
        s, y = values[i][ok], labels[ok]
        row = table.loc[band]
        assert row.n_h3_cells == ok.sum() and row.n_h3_positive == y.sum() > 20
        assert row.range_ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert row.range_auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        # Best F1 by brute force over every distinct score.
        f1s = {t: f1_score(y, s >= t) for t in np.unique(s)}
        best = max(f1s.values())
        assert row.f1 == pytest.approx(best, abs=1e-12)
        assert f1s[row.threshold] == pytest.approx(best, abs=1e-12)
        pred = s >= row.threshold
        assert row.precision == pytest.approx(precision_score(y, pred), abs=1e-12)
        assert row.recall == pytest.approx(recall_score(y, pred), abs=1e-12)
        assert row.jaccard == pytest.approx(jaccard_score(y, pred), abs=1e-12)
    assert table.loc["fused", "range_ap"] > 0.7  # the map does point at the range
    # Another rule: percentile of the map's valid cells.
    other = compare_range(map_path, EXPERT, rule="percentile:80").table.set_index("band")
    with rasterio.open(map_path) as ds:
        band = ds.read(1)
    assert other.loc["fused", "threshold"] == pytest.approx(
        np.percentile(band[np.isfinite(band)].astype(np.float64), 80))


def test_cli_table_json_and_agreement_raster(scene, tmp_path, capsys):
    map_path, expert = scene
    out = tmp_path / "cmp"
    code = main(["evaluate", str(map_path), "--range", str(expert), "--out", str(out),
                 "--json", str(tmp_path / "r.json")])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "expert range: expert.gpkg" in stdout and "Jaccard" in stdout
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["band"] for r in records] == ["fused", "location"]
    assert {"range_ap", "range_auc", "precision", "recall", "f1", "jaccard", "n_h3_cells",
            "n_h3_positive"} <= set(records[0])
    tif = out / "map_agreement.tif"
    assert str(tif) in stdout and (out / "map_agreement.qml").is_file()
    assert 'label="map only (commission)"' in (out / "map_agreement.qml").read_text()
    with rasterio.open(tif) as ds, rasterio.open(map_path) as src:
        codes = ds.read(1)
        assert ds.transform == src.transform and ds.nodata == 0 and ds.dtypes == ("uint8",)
        assert ds.colormap(1)[1][:3] == (27, 120, 55)
        threshold = float(ds.tags()["THRESHOLD"])
        fused = src.read(1)
    lat, lon = centres(WEST, NORTH, RES, HEIGHT, WIDTH)
    in_expert = shapely.contains_xy(EXPERT, lon, lat)
    valid = np.isfinite(fused)
    in_map = valid & (np.nan_to_num(fused, nan=-np.inf) >= threshold)
    expected = np.select([in_map & in_expert, in_map, valid & in_expert], [1, 2, 3], 0)
    np.testing.assert_array_equal(codes, expected)
    assert threshold == pytest.approx(records[0]["threshold"], abs=1e-6)
    assert set(np.unique(codes)) == {0, 1, 2, 3}


def test_bad_expert_files(scene, tmp_path, capsys):
    map_path, _ = scene
    points = tmp_path / "points.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.Point(-100, 41)], crs=4326).to_file(points)
    no_crs = tmp_path / "nocrs.shp"
    with pytest.warns(UserWarning, match="crs"):
        gpd.GeoDataFrame(geometry=[EXPERT]).to_file(no_crs)
    far = tmp_path / "far.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(10, 10, 12, 12)], crs=4326).to_file(far)
    cases = [(points, "holds no polygons"), (no_crs, "has no CRS"),
             (far, "lies inside the expert range"), (tmp_path / "missing.gpkg", "not found")]
    for path, message in cases:
        code = main(["evaluate", str(map_path), "--range", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert main(["evaluate", str(map_path)]) == 2
    assert "--range FILE" in capsys.readouterr().err
    with pytest.raises(TaxamapError, match="holds no polygons"):
        read_expert_range(shapely.LineString([(0, 0), (1, 1)]))
