"""Local raster satellite source: patches warped from GeoTIFFs in any CRS."""

from __future__ import annotations

import math

import mercantile
import numpy as np
import pytest
import rasterio
from affine import Affine

from taxamap.errors import TaxamapError
from taxamap.sources.rasters import RasterFileSource
from taxamap.sources.satellite import SatelliteSource, make_satellite_source
from taxamap.sources.tiles import XYZTileSource
from tests.helpers.rasters import geographic_raster, write_tif
from tests.helpers.tileserver import TileServer

ZOOM = 8


def test_mercator_raster_gives_the_same_patch_as_the_tile_server(tmp_path):
    """A GeoTIFF holding exactly the server's tiles (3x3 at zoom 8) yields the XYZ source's patch:
    both resample the same pixels onto the same footprint grid (GDAL bilinear here, taxamap's
    triangle filter there; a 150 km footprint keeps the box inside the mosaic at zoom 8)."""
    tx0, ty0 = 70, 95
    with TileServer(fmt="png") as server:
        mosaic = np.zeros((3, 3 * 256, 3 * 256), np.uint8)
        for r in range(3):
            for c in range(3):
                mosaic[:, r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = \
                    server.tile_image(ZOOM, tx0 + c, ty0 + r).transpose(2, 0, 1)
        b = mercantile.xy_bounds(tx0, ty0, ZOOM)
        res = (b.right - b.left) / 256
        path = tmp_path / "mosaic.tif"
        write_tif(path, mosaic, "EPSG:3857", Affine(res, 0, b.left, 0, -res, b.top))
        # Cells whose 256 px patch stays inside the middle of the mosaic.
        centre = mercantile.ul(tx0 + 1, ty0 + 1, ZOOM)
        cells = np.array([[centre.lat - 0.3, centre.lng + 0.4], [centre.lat + 0.2, centre.lng + 0.9]])
        with RasterFileSource(path, size=256, footprint_m=150_000, workers=2) as raster, \
                XYZTileSource(server.url_template, zoom=ZOOM, size=256, footprint_m=150_000,
                              cache_dir=tmp_path / "c") as tiles:
            got, want = raster.fetch(cells), tiles.fetch(cells)
            assert raster.describe()["resampling"] == "bilinear" and raster.stretch is None
        for a, b_ in zip(got, want):
            assert a.size == (256, 256) and a.mode == "RGB"
            diff = np.abs(np.asarray(a).astype(int) - np.asarray(b_).astype(int))
            assert diff.max() <= 1  # identical here; 1 DN of slack for GDAL's rounding


def test_any_crs_is_warped_to_a_north_up_patch_centred_on_the_cell(tmp_path):
    path = geographic_raster(tmp_path)
    with RasterFileSource(path, size=64, footprint_m=7400) as src:
        (patch,) = src.fetch([[41.0, 11.5]])
        rgb = np.asarray(patch).astype(float)
        # Centre colour encodes the cell centre (lon 11.5 -> red 187.5, lat 41 -> green 125).
        assert abs(rgb[31:33, 31:33, 0].mean() - 187.5) < 2
        assert abs(rgb[31:33, 31:33, 1].mean() - 125.0) < 2
        assert rgb[0, :, 1].mean() > rgb[-1, :, 1].mean()  # north is up
        assert rgb[:, -1, 0].mean() > rgb[:, 0, 0].mean()  # east is right
        # Ground size: a 7.4 km footprint spans 7.4 km / (111.3 km * cos 41 deg) = 0.0881 deg of
        # lon, 63/64 of it between the first and last column centres; red grows 125 per degree.
        expected_red_span = 7400 / (111319.49 * math.cos(math.radians(41))) * 63 / 64 * 125
        assert abs((rgb[32, -1, 0] - rgb[32, 0, 0]) - expected_red_span) < 2


def test_cells_outside_or_partly_outside_are_none(tmp_path):
    path = geographic_raster(tmp_path)
    with RasterFileSource(path, size=64) as src:
        inside, edge, outside, pole = src.fetch([[41.0, 11.0], [41.0, 10.001], [0.0, 0.0], [89.0, 11.0]])
        assert inside is not None and edge is None and outside is None and pole is None
        assert src.stats.cells == 4 and src.stats.cells_missing == 3
    with RasterFileSource(path, size=64, min_coverage=0.4) as src:
        (edge,) = src.fetch([[41.0, 10.001]])
        rgb = np.asarray(edge)
        assert rgb.min(axis=(0, 1))[2] >= 99  # uncovered half filled with the mean, not black


def test_nodata_is_not_imagery(tmp_path):
    data = np.full((3, 200, 200), 120, np.uint8)
    data[:, :, :100] = 0
    path = tmp_path / "nodata.tif"
    write_tif(path, data, "EPSG:4326", Affine(0.01, 0, 0, 0, -0.01, 2), nodata=0)
    with RasterFileSource(path, size=32) as src:
        west, east = src.fetch([[1.0, 0.5], [1.0, 1.5]])
        assert west is None and east is not None and np.asarray(east).min() == 120


def test_uint16_is_stretched_consistently(tmp_path):
    path = geographic_raster(tmp_path, dtype=np.uint16, scale=12.0)  # values 0..3000, like S2 L2A
    with RasterFileSource(path, size=32, stretch=(0, 3000)) as src:
        (patch,) = src.fetch([[41.0, 11.5]])
        assert abs(np.asarray(patch)[16, 16, 0] - 187.5 * 12 / 3000 * 255) < 3
        assert src.describe()["stretch"] == [0.0, 3000.0]
    with RasterFileSource(path, size=32) as src:  # auto: 2-98 % of bands 1-3
        lo, hi = src.stretch
        assert 0 < lo < 1200 < hi < 3000
        a, b = src.fetch([[41.0, 11.5], [41.5, 11.5]])
        assert np.asarray(b)[16, 16, 1] > np.asarray(a)[16, 16, 1]  # same stretch for every patch


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_missing_unreadable_and_crs_less_files(tmp_path):
    with pytest.raises(TaxamapError, match="does not exist"):
        RasterFileSource(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    with pytest.raises(TaxamapError, match="cannot read"):
        RasterFileSource(bad)
    nocrs = tmp_path / "nocrs.tif"
    with rasterio.open(nocrs, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(TaxamapError, match="no CRS"):
        RasterFileSource(nocrs)


def test_factory_and_describe(tmp_path):
    path = geographic_raster(tmp_path)
    src = make_satellite_source("file", file=path, footprint_m=1280, size=128)
    try:
        assert isinstance(src, SatelliteSource)
        d = src.describe()
        assert d["kind"] == "file" and d["path"] == str(path.resolve())
        assert d["footprint_m"] == 1280 and d["size"] == 128
        assert d["bytes"] == path.stat().st_size and d["crs"] == "EPSG:4326"
        assert src.attribution is None and src.license is None
    finally:
        src.close()
    with pytest.raises(TaxamapError, match="--sat-zoom applies to --sat-source xyz only"):
        make_satellite_source("file", file=path, zoom=11)
    with pytest.raises(TaxamapError, match="--sat-url applies"):
        make_satellite_source("file", file=path, url="https://example.org/wms")


def ramp_raster(path, crs: str, left: float, top: float, res: float, n: int) -> None:
    """A projected raster whose red grows with x (easting) and green with y: 250 DN over n px."""
    ramp = np.rint(np.arange(n) * 250.0 / (n - 1)).astype(np.uint8)
    red = np.broadcast_to(ramp[None, :], (n, n))
    green = np.broadcast_to(ramp[::-1][:, None], (n, n))  # grows northwards
    blue = np.full((n, n), 90, np.uint8)
    write_tif(path, np.stack([red, green, blue]), crs, Affine(res, 0, left, 0, -res, top))


def ground_size(rgb: np.ndarray, metres_per_dn: float) -> tuple[float, float]:
    """(width, height) in metres from the red/green ramps of a patch: slope of a straight line
    through every pixel (the uint8 steps average out)."""
    n = rgb.shape[0]
    idx = np.arange(n) + 0.5
    cols, rows = np.meshgrid(idx, idx)
    bx = np.polyfit(cols.ravel(), rgb[..., 0].astype(float).ravel(), 1)[0]
    by = np.polyfit(rows.ravel(), rgb[..., 1].astype(float).ravel(), 1)[0]
    return abs(bx) * n * metres_per_dn, abs(by) * n * metres_per_dn


def test_projected_raster_patch_is_the_2560_m_footprint(tmp_path):
    """UTM zone 17N at its central meridian (scale factor 0.9996): 10 m pixels, 8 km square."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32617", always_xy=True).transform(-81.0, 40.0)
    n, res = 800, 10.0
    path = tmp_path / "utm.tif"
    ramp_raster(path, "EPSG:32617", x - n * res / 2, y + n * res / 2, res, n)
    with RasterFileSource(path, workers=2) as src:
        assert src.describe()["crs"] == "EPSG:32617" and src.describe()["resampling"] == "bilinear"
        (patch,) = src.fetch([[40.0, -81.0]])
    rgb = np.asarray(patch)
    assert patch.size == (256, 256)
    width, height = ground_size(rgb, (n - 1) * res / 250.0 / 0.9996)
    assert width == pytest.approx(2560, rel=0.02) and height == pytest.approx(2560, rel=0.02)
    assert rgb[0, :, 1].mean() > rgb[-1, :, 1].mean() and rgb[:, -1, 0].mean() > rgb[:, 0, 0].mean()


def test_raster_across_the_antimeridian_is_joined_from_both_sides(tmp_path):
    """A raster in EPSG:3832 (PDC Mercator, centred on 150 E) over Fiji holds 180 deg inside it:
    the patch of a cell on the antimeridian is warped in two halves and joined without a seam."""
    from pyproj import Transformer

    to_pdc = Transformer.from_crs("EPSG:4326", "EPSG:3832", always_xy=True)
    x, y = to_pdc.transform(180.0, -16.5)
    n, res = 800, 10.0
    path = tmp_path / "pdc.tif"
    ramp_raster(path, "EPSG:3832", x - n * res / 2, y + n * res / 2, res, n)
    with RasterFileSource(path) as src:
        (patch,) = src.fetch([[-16.5, 179.999]])
        assert src.footprint(-16.5, 179.999).crosses_antimeridian
    rgb = np.asarray(patch).astype(float)
    # Red keeps growing eastwards across the join; the Mercator scale is 1 / cos(16.5 deg).
    assert (np.diff(rgb[128, :, 0]) > -1).all()
    scale = 1 / math.cos(math.radians(16.5))
    width, height = ground_size(rgb, (n - 1) * res / 250.0 / scale)
    assert width == pytest.approx(2560, rel=0.02) and height == pytest.approx(2560, rel=0.02)


def write_mosaic_vrt(folder, n: int = 200):
    """Two EPSG:4326 GeoTIFFs side by side (lon 10-11 and 11-12, lat 40-42) and a VRT over both."""
    from rasterio.transform import from_origin

    for i in range(2):
        data = np.full((3, n, n), 60 + 90 * i, np.uint8)
        data[1] = np.linspace(0, 250, n, dtype=np.uint8)[:, None]  # texture, so patches differ
        write_tif(folder / f"part{i}.tif", data, "EPSG:4326", from_origin(10 + i, 42, 1 / n, 2 / n))
    def band(b: int) -> str:
        return f'<VRTRasterBand dataType="Byte" band="{b}">' + "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">part{i}.tif</SourceFilename>'
            f'<SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{n}" ySize="{n}"/>'
            f'<DstRect xOff="{i * n}" yOff="0" xSize="{n}" ySize="{n}"/></SimpleSource>'
            for i in range(2)) + "</VRTRasterBand>"

    bands = "".join(band(b) for b in (1, 2, 3))
    vrt = folder / "mosaic.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{2 * n}" rasterYSize="{n}"><SRS>EPSG:4326</SRS>'
                   f'<GeoTransform>10, {1 / n}, 0, 42, 0, {-2 / n}</GeoTransform>{bands}</VRTDataset>')
    return vrt


def test_unreadable_part_leaves_its_block_for_the_rerun(tmp_path, models_dir):
    from taxamap.models.satellite import load_satellite_encoder
    from tests.helpers.source_rerun import embed_through

    encoder = load_satellite_encoder(models_dir)
    vrt = write_mosaic_vrt(tmp_path)
    cells = np.array([[41.0, 10.4], [40.6, 10.6], [41.0, 11.4], [40.6, 11.6]])  # block 1: part1
    part = tmp_path / "part1.tif"
    good = part.read_bytes()
    part.write_bytes(good[:600])  # the network share served half a file, say
    with RasterFileSource(vrt, size=32, workers=2) as src:
        first = embed_through(src, cells, encoder, tmp_path / "store")
        assert src.stats.failures == 2 and src.stats.cells_failed == 2
    assert first.pending_chunks() == [1]
    values = first.read()
    assert np.isfinite(values[:2]).all() and np.isnan(values[2:]).all()

    part.write_bytes(good)  # fixed: the VRT itself (the store key) did not change
    with RasterFileSource(vrt, size=32, workers=2) as src:
        again = embed_through(src, cells, encoder, tmp_path / "store")
        assert src.stats.cells == 2  # only the unfinished block was read again
    assert again.pending_chunks() == []
    with RasterFileSource(vrt, size=32, workers=2) as src:
        reference = embed_through(src, cells, encoder, tmp_path / "reference").read()
    np.testing.assert_array_equal(again.read(), reference)
    assert not np.allclose(reference[0], reference[2])  # the two parts look different
