"""Range products: thresholds -> binary range GeoTIFF and polygons."""

from __future__ import annotations

import math

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely

from taxamap.errors import TaxamapError
from taxamap.products.evaluate import evaluate_map
from taxamap.products.ranges import parse_rule, range_outline, threshold_map
from tests.helpers.maps import centres, off_cell_edges, write_map

WEST, NORTH, RES, HEIGHT, WIDTH = -10.0, 50.0, 0.25, 40, 60


@pytest.fixture
def score_map(tmp_path):
    """Smooth blobs plus noise (raw-cosine-like values), NaN outside an ellipse ("land")."""
    rng = np.random.default_rng(0)
    lat, lon = centres(WEST, NORTH, RES, HEIGHT, WIDTH)
    fused = (0.3 * np.exp(-((lat - 45) ** 2 + (lon + 5) ** 2) / 4.0)
             + 0.25 * np.exp(-((lat - 42) ** 2 + (lon - 1) ** 2) / 2.0)
             + rng.normal(0, 0.03, lat.shape))
    land = ((lat - 45) / 5.5) ** 2 + ((lon + 2.5) / 8) ** 2 < 1
    fused[~land] = np.nan
    location = fused[::-1].copy()
    return write_map(tmp_path / "map.tif", {"fused": fused, "location": location},
                     WEST, NORTH, RES)


def read_band(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile, ds.tags(), ds.descriptions


def read_polygons(path):
    meta, _, wkb, fields = pyogrio.raw.read(path)
    geoms = shapely.from_wkb(wkb) if wkb is not None else np.array([])
    return meta, geoms, dict(zip(meta["fields"], fields))


def test_outline_runs_along_cell_edges(tmp_path, score_map):
    """At any zoom the outline follows the in-range cells exactly: every vertex is a cell
    corner, and it covers exactly the in-range cells (no out-of-range centre inside)."""
    outline = range_outline(score_map, "value:0.15")
    assert len(shapely.get_coordinates(outline)) > 50
    assert off_cell_edges(outline, WEST, NORTH, RES) == 0
    result = threshold_map(score_map, "value:0.15", out_dir=tmp_path / "out")
    _, geoms, _ = read_polygons(result.paths["polygons"])
    assert off_cell_edges(shapely.union_all(geoms), WEST, NORTH, RES) == 0
    binary, *_ = read_band(result.paths["raster"])
    lat, lon = centres(WEST, NORTH, RES, HEIGHT, WIDTH)
    assert not shapely.contains(outline, shapely.points(lon[binary == 0], lat[binary == 0])).any()
    r = 6371.0088
    cell_km2 = r * r * math.radians(RES) * (np.sin(np.radians(lat + RES / 2))
                                              - np.sin(np.radians(lat - RES / 2)))
    assert result.area_km2 == pytest.approx(float(cell_km2[binary == 1].sum()), rel=0.005)


def test_value_rule_raster_polygons_and_tags(tmp_path, score_map):
    result = threshold_map(score_map, "value:0.15", out_dir=tmp_path / "out")
    assert result.threshold == 0.15 and result.band == "fused"
    binary, profile, tags, descriptions = read_band(result.paths["raster"])
    with rasterio.open(score_map) as src:
        values = src.read(1)
        assert profile["transform"] == src.transform and profile["crs"] == src.crs
        assert (profile["width"], profile["height"]) == (src.width, src.height)
    assert profile["dtype"] == "uint8" and profile["nodata"] == 255
    valid = np.isfinite(values)
    np.testing.assert_array_equal(binary[~valid], 255)
    np.testing.assert_array_equal(binary[valid], (values[valid] >= 0.15).astype(np.uint8))
    assert result.n_in_range == int((values[valid] >= 0.15).sum()) > 20
    assert result.n_valid == int(valid.sum())
    assert tags["RULE"] == "value:0.15" and float(tags["THRESHOLD"]) == 0.15
    assert tags["SOURCE_MAP"] == "map.tif" and descriptions == ("range",)

    meta, geoms, fields = read_polygons(result.paths["polygons"])
    assert meta["crs"] == "EPSG:4326"
    assert len(geoms) >= 2 and shapely.is_valid(geoms).all()
    union = shapely.union_all(geoms)
    lat, lon = centres(WEST, NORTH, RES, HEIGHT, WIDTH)
    in_range = binary == 1
    assert shapely.covers(union, shapely.points(lon[in_range], lat[in_range])).all()
    # Along the cells' edges, so no out-of-range centre lies inside it.
    outside = shapely.contains(union, shapely.points(lon[binary == 0], lat[binary == 0]))
    assert outside.sum() == 0
    # Areas: geodesic, close to the area of the in-range cells on a sphere.
    r = 6371.0088
    lat_top = np.radians(lat + RES / 2)
    lat_bottom = np.radians(lat - RES / 2)
    cell_km2 = r * r * math.radians(RES) * (np.sin(lat_top) - np.sin(lat_bottom))
    expected = float(cell_km2[in_range].sum())
    assert result.area_km2 == pytest.approx(expected, rel=0.08)
    assert fields["area_km2"].sum() == pytest.approx(result.area_km2)
    assert list(fields["area_km2"]) == sorted(fields["area_km2"], reverse=True)
    assert set(fields["rule"]) == {"value:0.15"}
    # range_outline gives the same geometry, without writing files.
    outline = range_outline(score_map, "value:0.15")
    assert outline.geom_type == "MultiPolygon"
    assert shapely.equals_exact(shapely.normalize(outline), shapely.normalize(union), 1e-9)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["map_range.gpkg",
                                                                    "map_range.tif"]


def test_percentile_rule_keeps_about_ten_percent(tmp_path, score_map):
    result = threshold_map(score_map, "percentile:90")
    assert result.paths["raster"].parent == score_map.parent  # default: next to the map
    share = result.n_in_range / result.n_valid
    assert abs(share - 0.10) < 1.0 / result.n_valid + 1e-9
    # By name: the location band is another surface.
    other = threshold_map(score_map, "percentile:90", band="location", stem="loc")
    assert other.band == "location" and other.paths["raster"].name == "loc_range.tif"
    assert other.threshold != result.threshold or other.n_in_range == result.n_in_range


def test_maxtss_rule_uses_the_evaluation_threshold(tmp_path, score_map):
    rng = np.random.default_rng(2)
    lat = rng.normal(45, 1.0, 80)
    lon = rng.normal(-5, 1.0, 80)
    occ = tmp_path / "occ.csv"
    occ.write_text("latitude,longitude\n" + "".join(f"{a},{b}\n" for a, b in zip(lat, lon)))
    result = threshold_map(score_map, f"maxtss:{occ}", out_dir=tmp_path / "o", seed=3)
    expected = evaluate_map(score_map, np.column_stack([lat, lon]), seed=3).band("fused")
    assert result.threshold == expected.tss_threshold
    binary, _, tags, _ = read_band(result.paths["raster"])
    assert tags["RULE"] == f"maxtss:{occ}"
    # A bare "maxtss" takes the occurrences argument (array or file).
    again = threshold_map(score_map, "maxtss", out_dir=tmp_path / "p", seed=3,
                          occurrences=np.column_stack([lat, lon]))
    assert again.threshold == result.threshold


def test_empty_range_and_bad_rules(tmp_path, score_map):
    # A rule that keeps no cell is refused with the band's value range, and nothing is written.
    with rasterio.open(score_map) as ds:
        fused = ds.read(1)
    hi = float(np.nanmax(fused))
    with pytest.raises(TaxamapError) as err:
        threshold_map(score_map, "value:5", out_dir=tmp_path / "empty")
    message = str(err.value)
    assert "keeps no cell" in message and f"{hi:.4g}" in message
    assert f"{float(np.nanmin(fused)):.4g}" in message and "\n" not in message
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())
    with pytest.raises(TaxamapError, match="keeps no cell"):
        range_outline(score_map, f"value:{hi + 1e-3}")
    assert threshold_map(score_map, f"value:{hi}", out_dir=tmp_path / "top").n_in_range == 1
    for bad in ("top10", "percentile:150", "value:abc", "percentile:", ""):
        with pytest.raises(TaxamapError) as err:
            parse_rule(bad)
        assert "percentile:P" in str(err.value) and "maxtss:OCC_FILE" in str(err.value)
    with pytest.raises(TaxamapError, match="needs occurrences"):
        threshold_map(score_map, "maxtss", out_dir=tmp_path)
    with pytest.raises(TaxamapError, match="no band 'satellite'"):
        threshold_map(score_map, "value:0.1", out_dir=tmp_path, band="satellite")
    assert parse_rule(" Percentile:95 ").value == 95.0


def test_projected_map_polygons_come_out_in_wgs84(tmp_path):
    from pyproj import Transformer

    # 10 km cells in California Albers (EPSG:3310); in range: a block of 6 x 8 cells.
    values = np.zeros((20, 20), dtype=np.float32)
    values[5:11, 4:12] = 1.0
    values[0, :] = np.nan
    path = write_map(tmp_path / "albers.tif", {"fused": values}, -100_000.0, 100_000.0,
                     10_000.0, crs="EPSG:3310")
    result = threshold_map(path, "value:0.5")
    meta, geoms, fields = read_polygons(result.paths["polygons"])
    assert meta["crs"] == "EPSG:4326" and len(geoms) == 1
    rows, cols = np.nonzero(values == 1.0)
    x = -100_000.0 + (cols + 0.5) * 10_000.0
    y = 100_000.0 - (rows + 0.5) * 10_000.0
    lon, lat = Transformer.from_crs("EPSG:3310", "EPSG:4326", always_xy=True).transform(x, y)
    assert shapely.covers(geoms[0], shapely.points(lon, lat)).all()
    assert fields["area_km2"][0] == pytest.approx(48 * 100.0, rel=0.01)  # equal-area source


def test_antimeridian_range_polygons_are_written_within_180():
    import shapely

    from taxamap.crs import wrap_longitudes

    fiji_like = shapely.MultiPolygon([shapely.box(178.0, -18.0, 181.5, -16.0)])
    wrapped = wrap_longitudes(fiji_like)
    west, south, east, north = wrapped.bounds
    assert west >= -180 and east <= 180
    assert abs(wrapped.area - fiji_like.area) < 1e-9
    assert wrapped.intersects(shapely.box(-179, -17, -178.6, -16.5))  # the part past 180
