"""The satellite footprint (TaxaBind's 2,560 m tangent-plane square) and its delivery by the XYZ source.

The XYZ source is checked against a tile server whose pixels name their own Web-Mercator world
pixel (tests/tileserver.py, ``content="coords"``): decoding a patch gives the world position of
every pixel, and from it (independently of taxamap's code: textbook Mercator, pyproj's geodesics)
the patch's ground width and height.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from taxamap.sources.footprint import (
    DEFAULT_FOOTPRINT_M,
    DEFAULT_SIZE,
    enu_to_lonlat,
    footprint,
    resample,
    resample_weights,
)
from taxamap.sources.tiles import XYZTileSource, auto_zoom
from tests.helpers.isatnat import TRAINING_ROWS
from tests.helpers.tileserver import TileServer, world_pixel_of


@pytest.mark.parametrize("lat, lon, west, south, east, north", TRAINING_ROWS)
def test_bbox_is_the_training_tables(lat, lon, west, south, east, north):
    fp = footprint(lat, lon)
    assert fp.size == DEFAULT_SIZE == 256 and fp.metres == DEFAULT_FOOTPRINT_M == 2560
    np.testing.assert_allclose(fp.bbox, (west, south, east, north), rtol=0, atol=1e-9)
    assert not fp.crosses_antimeridian and len(fp.parts()) == 1


def test_enu_formula_agrees_with_pymap3d():
    pymap3d = pytest.importorskip("pymap3d")
    rng = np.random.default_rng(1)
    for lat, lon in [(0, 0), (45, -83), (60, 25), (-70, 140), (89.9, 10), (-89.5, -170), (12.3, 179.99)]:
        e, n = rng.uniform(-3000, 3000, 2)
        got = enu_to_lonlat(lat, lon, e, n)
        want_lat, want_lon, _ = pymap3d.enu2geodetic(e, n, 0.0, lat, lon, 0.0)
        assert abs(float(got[1]) - want_lat) < 1e-10
        assert abs(float((got[0] - want_lon + 180) % 360 - 180)) < 1e-10


def test_poles_and_bad_input_have_no_footprint():
    assert footprint(89.995, 0.0) is None  # the north pole lies 560 m away: inside the box
    assert footprint(-89.995, 0.0) is None
    assert footprint(float("nan"), 0.0) is None and footprint(91.0, 0.0) is None
    fp = footprint(89.9, 0.0)  # 11 km from the pole: defined, very wide in longitude
    assert fp is not None and fp.south < 89.9 < fp.north < 90 and fp.east - fp.west > 10


@pytest.mark.parametrize("lon", [179.995, -179.997, 180.0, -180.0])
def test_antimeridian_parts_tile_the_patch(lon):
    fp = footprint(0.0, lon)
    assert fp.crosses_antimeridian and fp.east > fp.west
    parts = fp.parts()
    assert len(parts) == 2
    assert parts[0].col0 == 0 and parts[0].col1 == parts[1].col0 and parts[1].col1 == 256
    assert parts[0].east == 180.0 and parts[1].west == -180.0
    for p in parts:
        assert -180 <= p.west < p.east <= 180 and (p.south, p.north) == (fp.south, fp.north)
    # Each column sits on its own side: the split is the column whose centre passes 180.
    lons = fp.col_lons()
    assert lons[parts[0].col1 - 1] < 180 <= lons[parts[1].col0] + (0 if fp.west > -180 else 360)


def test_resampling_is_exact_at_unit_scale_and_averages_when_shrinking():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    same = resample(img, np.arange(40) + 0.5, np.arange(50) + 0.5)
    np.testing.assert_array_equal(same, img)
    # Halving: each target pixel averages its neighbourhood (no aliasing of a 1-px checkerboard).
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    half = resample(checker, np.arange(32) * 2 + 1.0, np.arange(32) * 2 + 1.0)
    assert np.abs(half[1:-1, 1:-1].astype(int) - 128).max() <= 1  # edges: the filter is cut off
    w = resample_weights(np.array([1.0, 3.0, 5.0]), 6)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


def _fit(values: np.ndarray, index: np.ndarray) -> tuple[float, float]:
    """Robust straight line values ~ a + b * index over all finite pixels (seams dropped)."""
    v, c = values.ravel(), index.ravel()
    b = np.nanmedian(np.diff(values, axis=-1))
    a = np.nanmedian(v - b * c)
    for _ in range(3):
        ok = np.isfinite(v) & (np.abs(v - (a + b * c)) < 3)
        b, a = np.polyfit(c[ok], v[ok], 1)
    return float(a), float(b)


def measure_patch(rgb: np.ndarray, lat: float, lon: float, zoom: int) -> tuple[float, float]:
    """(ground width, ground height) in metres of a patch from a ``content="coords"`` server."""
    from pyproj import Geod

    n = rgb.shape[0]
    world = 256 * 2**zoom
    near_x = (lon + 180.0) / 360.0 * world
    near_y = (1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * world
    x, y = world_pixel_of(rgb, near_x, near_y)
    centres = np.arange(n) + 0.5
    cols, rows = np.meshgrid(centres, centres)
    ax, bx = _fit(x, cols)  # world x of the patch's left edge, world px per patch px
    ay, by = _fit(y.T, rows.T)
    lon_w, lon_e = (ax / world) * 360 - 180, ((ax + bx * n) / world) * 360 - 180

    def lat_of(gy):
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * gy / world))))

    geod = Geod(ellps="WGS84")
    width = geod.inv(lon_w, lat, lon_e, lat)[2]
    height = geod.inv(lon, lat_of(ay), lon, lat_of(ay + by * n))[2]
    return width, height


@pytest.mark.parametrize("lat, lon", [(0.0, 10.3), (45.0, -83.2), (60.0, 25.1), (-70.0, 140.0),
                                      (0.2, 179.995), (-16.5, -179.999)])
def test_xyz_patch_is_2560_m_square_at_every_latitude(tmp_path, lat, lon):
    with TileServer(fmt="png", content="coords") as server, \
            XYZTileSource(server.url_template, cache_dir=tmp_path, workers=4) as src:
        plan = src.plan(lat, lon)
        (patch,) = src.fetch([[lat, lon]])
        assert patch.size == (256, 256)
        width, height = measure_patch(np.asarray(patch), lat, lon, plan.zoom)
    assert width == pytest.approx(2560, rel=0.02) and height == pytest.approx(2560, rel=0.02)
    # The zoom chosen from the latitude: tiles no coarser than 10 m, at most twice as fine.
    ground = 2 * math.pi * 6378137 * math.cos(math.radians(lat)) / 256 / 2**plan.zoom
    assert 5.0 < ground <= 10.0
    if abs(lon) > 179.9:  # the patch takes tiles from both ends of the world
        assert {t[1] for t in plan.tiles()} >= {0, 2**plan.zoom - 1}


def test_auto_zoom_follows_latitude_and_fixed_zoom_is_kept(tmp_path):
    assert [auto_zoom(lat, 10.0) for lat in (0, 45, 60, 70, 80)] == [14, 14, 13, 13, 12]
    with TileServer(fmt="png", content="coords") as server, \
            XYZTileSource(server.url_template, zoom=12, cache_dir=tmp_path) as src:
        plan = src.plan(45.0, 7.0)
        (patch,) = src.fetch([[45.0, 7.0]])
        assert plan.zoom == 12 and src.describe()["zoom"] == 12
        width, height = measure_patch(np.asarray(patch), 45.0, 7.0, 12)
    # A fixed, coarser zoom upsamples but the footprint stays the same.
    assert width == pytest.approx(2560, rel=0.02) and height == pytest.approx(2560, rel=0.02)


def test_beyond_web_mercator_is_none(tmp_path):
    with TileServer(fmt="png") as server, XYZTileSource(server.url_template, cache_dir=tmp_path) as src:
        assert src.fetch([[85.04, 0.0], [-85.5, 10.0]]) == [None, None]
        assert server.requests == 0
