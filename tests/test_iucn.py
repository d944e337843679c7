"""IUCN range metrics: EOO and AOO of known ranges against hand computations (WGS84 formulas)."""

from __future__ import annotations

import math

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely

from taxamap.products.iucn import aoo_km2, contiguous_longitudes, criterion_b, eoo_km2
from taxamap.products.ranges import threshold_map
from tests.helpers.maps import centres, write_map

A = 6378137.0
F = 1 / 298.257223563
E2 = F * (2 - F)
E = math.sqrt(E2)


def q(lat_deg: float) -> float:
    """Snyder's q (authalic latitude function) on WGS84."""
    s = math.sin(math.radians(lat_deg))
    return (1 - E2) * (s / (1 - E2 * s * s) - math.log((1 - E * s) / (1 + E * s)) / (2 * E))


def box_area_km2(dlon: float, lat0: float, lat1: float) -> float:
    """Exact ellipsoidal area of a lon/lat box (between two parallels, dlon degrees wide)."""
    return A * A * math.radians(dlon) / 2 * (q(lat1) - q(lat0)) / 1e6


# EASE-Grid 2.0 global (EPSG:6933): cylindrical equal-area, true scale at 30 degrees.
K0 = math.cos(math.radians(30)) / math.sqrt(1 - E2 * math.sin(math.radians(30)) ** 2)


def ease_x(lon: float) -> float:
    return A * K0 * math.radians(lon)


def ease_y(lat: float) -> float:
    return A * q(lat) / (2 * K0)


def n_cells(lo: float, hi: float, size: float = 2000.0) -> int:
    """2 km cells of the grid anchored at 0 that the interval [lo, hi] overlaps."""
    return math.ceil(hi / size) - math.floor(lo / size)


def range_map(tmp_path, west, north, res, height, width, box):
    """A map whose value is 1 inside ``box`` (lon0, lat0, lon1, lat1; grid frame) and 0 outside."""
    lat, lon = centres(west, north, res, height, width)
    lon0, lat0, lon1, lat1 = box
    inside = (lon > lon0) & (lon < lon1) & (lat > lat0) & (lat < lat1)
    return write_map(tmp_path / "map.tif", {"fused": inside.astype(np.float32)}, west, north, res)


def test_known_rectangle_eoo_aoo_in_files(tmp_path):
    box = (10.0, 40.0, 12.0, 42.0)
    path = range_map(tmp_path, 8.0, 44.0, 0.25, 24, 24, box)
    result = threshold_map(path, "value:0.5", tmp_path / "out")
    eoo = box_area_km2(2.0, 40.0, 42.0)
    aoo = 4.0 * n_cells(ease_x(10), ease_x(12)) * n_cells(ease_y(40), ease_y(42))
    assert result.eoo_hull_km2 == pytest.approx(eoo, rel=0.01)
    assert result.aoo_km2 == pytest.approx(aoo, rel=0.01)
    # Boundary cells of the 2 km grid count whole, so the AOO exceeds the hull: EOO is raised.
    assert result.aoo_km2 > result.eoo_hull_km2 and result.eoo_km2 == result.aoo_km2
    with rasterio.open(result.paths["raster"]) as ds:
        tags = ds.tags()
    assert float(tags["EOO_KM2"]) == pytest.approx(result.eoo_km2, rel=1e-6)
    assert float(tags["EOO_HULL_KM2"]) == pytest.approx(result.eoo_hull_km2, rel=1e-6)
    assert float(tags["AOO_KM2"]) == pytest.approx(result.aoo_km2, rel=1e-6)
    assert "above the B1 area thresholds" in tags["IUCN_B"]
    meta, _, _, fields = pyogrio.raw.read(result.paths["polygons"])
    data = dict(zip(meta["fields"], fields))
    assert data["eoo_km2"][0] == pytest.approx(result.eoo_km2)
    assert data["aoo_km2"][0] == pytest.approx(result.aoo_km2)
    assert "not a Red List category" in result.criterion_b


def test_range_across_the_antimeridian(tmp_path):
    # The grid runs 170..190 degrees east; the range is 175..185 (i.e. 175..180 and -180..-175).
    box = (175.0, -20.0, 185.0, -15.0)
    path = range_map(tmp_path, 170.0, -10.0, 0.5, 20, 40, box)
    result = threshold_map(path, "value:0.5", tmp_path / "out")
    eoo = box_area_km2(10.0, -20.0, -15.0)
    rows = n_cells(ease_y(-20), ease_y(-15))
    cols = n_cells(ease_x(175), ease_x(180)) + n_cells(ease_x(-180), ease_x(-175))
    assert result.eoo_km2 == pytest.approx(eoo, rel=0.01)
    assert result.aoo_km2 == pytest.approx(4.0 * rows * cols, rel=0.01)
    # Same answers for the range written as two pieces within [-180, 180].
    split = shapely.MultiPolygon([shapely.box(175, -20, 180, -15),
                                  shapely.box(-180, -20, -175, -15)])
    assert eoo_km2(split) == pytest.approx(eoo, rel=0.01)
    assert aoo_km2(split) == pytest.approx(4.0 * rows * cols, rel=0.01)


def test_small_ranges_and_thresholds():
    # One 2 km-ish square inside a single grid cell: AOO is one cell (4 km2).
    x0 = 1000.0 / (A * K0)
    tiny = shapely.box(math.degrees(x0) + 0.001, 10.001, math.degrees(x0) + 0.005, 10.005)
    assert aoo_km2(tiny) in (4.0, 8.0, 16.0)
    assert eoo_km2(shapely.Point(1, 1)) == 0.0 and aoo_km2(shapely.MultiPolygon()) == 0.0
    text = criterion_b(80.0, 8.0)
    assert "meets the B1 area threshold for Critically Endangered" in text
    assert "meets the B2 area threshold for Critically Endangered" in text
    # An EOO under the AOO is raised to it (IUCN guidelines): 80 < 400 reads as EOO 400 km2.
    text = criterion_b(80.0, 400.0)
    assert "EOO 400 km2 (the hull's 80 km2 raised to the AOO" in text
    assert "B1 area threshold for Endangered" in text and "Critically" not in text
    assert "Vulnerable" in criterion_b(15000.0, 1500.0)


def test_eoo_is_raised_to_aoo_when_the_hull_is_smaller(tmp_path):
    # 3 x 3 cells of 0.01 degrees (a ~1.1 km square each) just north of 10 N: the hull is the
    # 0.03 x 0.03 degree box (~11 km2), while 2 km AOO cells overlapping it count whole.
    box = (20.0, 10.0, 20.03, 10.03)
    path = range_map(tmp_path, 19.95, 10.08, 0.01, 13, 13, box)
    result = threshold_map(path, "value:0.5", tmp_path / "out")
    assert result.n_in_range == 9
    hull = box_area_km2(0.03, 10.0, 10.03)
    aoo = 4.0 * n_cells(ease_x(20.0), ease_x(20.03)) * n_cells(ease_y(10.0), ease_y(10.03))
    assert result.eoo_hull_km2 == pytest.approx(hull, rel=0.01)
    assert result.aoo_km2 == pytest.approx(aoo) and aoo > 2 * hull
    assert result.eoo_km2 == result.aoo_km2  # raised, not the hull's 11 km2
    assert f"EOO {aoo:,.0f} km2 (the hull's {hull:,.0f} km2 raised" in result.criterion_b
    assert "B1 area threshold for Critically Endangered" in result.criterion_b  # AOO < 100
    with rasterio.open(result.paths["raster"]) as ds:
        assert float(ds.tags()["EOO_KM2"]) == pytest.approx(aoo)


def test_single_cell_and_empty_ranges_claim_no_threshold(tmp_path):
    # One 0.1 degree cell (~120 km2) in range: its EOO and AOO are the cell's own size.
    box = (10.0, 40.0, 10.1, 40.1)
    path = range_map(tmp_path, 9.5, 40.5, 0.1, 10, 10, box)
    result = threshold_map(path, "value:0.5", tmp_path / "out")
    assert result.n_in_range == 1 and 0 < result.eoo_km2 < 200
    text = result.criterion_b
    assert "single map cell" in text and "no criterion B area threshold" in text
    assert "meets" not in text and "Endangered" not in text
    with rasterio.open(result.paths["raster"]) as ds:
        assert ds.tags()["IUCN_B"] == text
    empty = criterion_b(0.0, 0.0)
    assert "empty" in empty and "meets" not in empty and "Endangered" not in empty
    assert np.allclose(contiguous_longitudes(np.array([179.0, -179.0, 178.0])), [179, 181, 178])
