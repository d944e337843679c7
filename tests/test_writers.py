"""Writers: the COG GeoTIFF contract, the QGIS view of it, the PNG, the HTML, atomic writes."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image
from rio_cogeo.cogeo import cog_validate

import taxamap
from taxamap.errors import TaxamapError
from taxamap.grid import Grid, make_grid
from taxamap.dataset import grid_of, map_bands, provenance, scores_dataset
from taxamap.writers.geotiff import write_geotiff
from taxamap.writers.html import overlay_rgba, write_html
from taxamap.writers.png import write_png
from taxamap.writers.style import (
    UNITS,
    colorize,
    mercator_rows,
    mercator_y,
    stretch_of,
)

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
EVIL = "<script>alert(1)</script>"
ATTRIBUTION = "Sentinel-2 cloudless - https://s2maps.eu by EOX IT Services GmbH <2020>"

# A pentagon, so the mask has cells both in and out of the region.
REGION = shapely.Polygon([(-10.0, 36.0), (4.0, 35.2), (5.0, 41.0), (-2.0, 44.8), (-9.5, 43.0)])


def _scoremap(geometry=REGION, resolution=0.5, modalities=("location", "satellite"),
              attribution=ATTRIBUTION, query="Cardinalis cardinalis", seed=0):
    """A one-query score Dataset (the contract after scoring) of smooth fields plus noise."""
    grid = make_grid(geometry, resolution)
    rng = np.random.default_rng(seed)
    lat, lon = grid.cell_latlon().T
    # Smooth fields (so the maps have structure) plus noise (so values are not round numbers).
    per = {}
    for k, m in enumerate(modalities):
        field = np.cos(np.radians(lat * (k + 2))) * np.sin(np.radians(lon * (k + 3)))
        per[m] = (0.6 * field + 0.05 * rng.standard_normal(grid.n_cells)).astype(np.float32)
    fused = np.mean(np.stack(list(per.values())), axis=0).astype(np.float32)
    attrs = provenance(
        modalities=modalities, fusion="mean",
        models={m: f"MVRL/eco{m}@{'0123abcd' * 5}" for m in modalities}
        | {"text": "MVRL/taxabind-vit-b-16@deadbeef"},
        region_name="Iberia & co", region_outline=geometry, attribution=attribution,
        extra={"RESOLUTION": str(resolution)})
    return scores_dataset(
        grid, fused[None], {m: v[None] for m, v in per.items()}, labels=[query],
        prompts=["Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"],
        slugs=["cardinalis-cardinalis"], attrs=attrs)


@pytest.fixture(scope="module")
def scoremap():
    return _scoremap()


@pytest.fixture(scope="module")
def tif(scoremap, tmp_path_factory) -> Path:
    return write_geotiff(scoremap, tmp_path_factory.mktemp("tif") / "map.tif")


# ---------------------------------------------------------------- GeoTIFF


def test_geotiff_georeferencing_bands_and_values(scoremap, tif):
    grid = grid_of(scoremap)
    with rasterio.open(tif) as ds:
        assert ds.driver == "GTiff"
        assert ds.crs.to_epsg() == 4326
        assert ds.transform == grid.transform  # exact, not approximately
        assert (ds.width, ds.height) == (grid.width, grid.height)
        assert ds.count == 3
        assert ds.descriptions == ("fused", "location", "satellite")
        assert all(d == "float32" for d in ds.dtypes)
        assert math.isnan(ds.nodata)
        data = ds.read()
        # The pixel centre of each kept cell is the point that was embedded.
        rows, cols = np.nonzero(grid.mask)
        xs, ys = rasterio.transform.xy(ds.transform, rows, cols)
        np.testing.assert_allclose(np.c_[ys, xs], grid.cell_latlon(), atol=1e-9)
    for i, (_, raster) in enumerate(map_bands(scoremap)):
        # Raw values, bit for bit: no stretch, no rounding.
        assert np.array_equal(data[i], raster, equal_nan=True)
        assert np.isnan(data[i][~grid.mask]).all()
        assert np.isfinite(data[i][grid.mask]).all()
    assert (~grid.mask).any() and grid.mask.any()


def test_geotiff_tags(scoremap, tif):
    with rasterio.open(tif) as ds:
        tags = ds.tags()
        band_tags = [ds.tags(i) for i in (1, 2, 3)]
    assert tags["QUERY"] == "Cardinalis cardinalis"
    assert tags["PROMPT"] == scoremap.attrs["prompt"]
    assert tags["MODALITIES"] == "location,satellite"
    assert tags["FUSION"] == "mean"
    assert tags["MODEL_LOCATION"] == scoremap.attrs["model_location"]
    assert tags["MODEL_SATELLITE"] == scoremap.attrs["model_satellite"]
    assert tags["MODEL_TEXT"] == "MVRL/taxabind-vit-b-16@deadbeef"
    assert tags["TAXAMAP_VERSION"] == taxamap.__version__
    assert tags["UNITS"] == UNITS
    assert datetime.fromisoformat(tags["CREATED"]).tzinfo is not None
    assert tags["IMAGERY_ATTRIBUTION"] == ATTRIBUTION
    assert tags["IMAGERY_LICENSE"] == "CC BY-NC-SA 4.0"
    assert tags["RESOLUTION"] == "0.5"  # extra_tags pass through
    assert tags["REGION"] == "Iberia & co"
    assert [t["MODALITY"] for t in band_tags] == ["fused", "location", "satellite"]


def test_geotiff_is_a_valid_cog(tif):
    valid, errors, warnings = cog_validate(str(tif))
    assert valid and not errors, errors


def test_geotiff_without_imagery_has_no_imagery_tags(tmp_path):
    sm = _scoremap(modalities=("location",), attribution=None)
    path = write_geotiff(sm, tmp_path / "loc.tif")
    with rasterio.open(path) as ds:
        tags = ds.tags()
        assert ds.count == 2 and ds.descriptions == ("fused", "location")
        assert np.array_equal(ds.read(1), sm["fused"].values, equal_nan=True)
    assert "IMAGERY_ATTRIBUTION" not in tags and "IMAGERY_LICENSE" not in tags
    assert tags["MODALITIES"] == "location"


def test_geotiff_has_internal_overviews_when_larger_than_a_tile(tmp_path):
    sm = _scoremap(geometry=shapely.box(-20.0, 20.0, 10.0, 35.0), resolution=0.05,
                   modalities=("location",))
    assert grid_of(sm).width > 512
    path = write_geotiff(sm, tmp_path / "big.tif")
    valid, errors, warnings = cog_validate(str(path))
    assert valid and not errors and not warnings, (errors, warnings)
    with rasterio.open(path) as ds:
        assert ds.overviews(1)  # internal: no .ovr sidecar
        assert np.array_equal(ds.read(2), sm["location"].values, equal_nan=True)
    assert not list(tmp_path.glob("*.ovr"))


def test_geotiff_across_the_antimeridian(tmp_path):
    sm = _scoremap(geometry=shapely.box(170.0, -20.0, 190.0, -10.0), resolution=0.5)
    path = write_geotiff(sm, tmp_path / "fiji.tif")
    assert cog_validate(str(path))[0]
    with rasterio.open(path) as ds:
        assert ds.bounds.left == pytest.approx(170.0) and ds.bounds.right == pytest.approx(190.0)
        assert ds.transform == grid_of(sm).transform
        assert np.array_equal(ds.read(1), sm["fused"].values, equal_nan=True)


def _system_qgis() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True,
                           env={**os.environ, "QT_QPA_PLATFORM": "offscreen"}, timeout=60)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _system_qgis(), reason="/usr/bin/python3 cannot import qgis.core")
def test_qgis_opens_the_geotiff(scoremap, tif, tmp_path):
    grid = grid_of(scoremap)
    rows, cols = np.nonzero(grid.mask)
    picks = [0, len(rows) // 2, len(rows) - 1]
    samples = []
    for k in picks:
        r, c = int(rows[k]), int(cols[k])
        x = grid.west + (c + 0.5) * grid.resolution
        y = grid.north - (r + 0.5) * grid.resolution
        samples.append([x, y, 1, float(scoremap["fused"].values[r, c])])
        samples.append([x, y, 3, float(scoremap["satellite"].values[r, c])])
    r, c = map(int, np.argwhere(~grid.mask)[0])
    samples.append([grid.west + (c + 0.5) * grid.resolution,
                    grid.north - (r + 0.5) * grid.resolution, 1, None])
    expected = {
        "crs": "EPSG:4326",
        "extent": list(grid.bounds),
        "bands": ["fused", "location", "satellite"],
        "samples": samples,
        "tolerance": 1e-7,
    }
    spec = tmp_path / "expected.json"
    spec.write_text(json.dumps(expected))
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    env.pop("PYTHONPATH", None)
    checker = HERE / "helpers" / "qgis_check.py"
    done = subprocess.run([SYSTEM_PYTHON, str(checker), str(tif), str(spec)],
                          capture_output=True, text=True, env=env, timeout=120)
    report_line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert report_line, done.stdout + done.stderr
    report = json.loads(report_line[-1])
    assert report["ok"] and done.returncode == 0, report["failures"]


# ---------------------------------------------------------------- PNG


def _green_pixels(rgb: np.ndarray) -> int:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((g - r > 40) & (g - b > 10)).sum())


@pytest.mark.parametrize("modalities", [("location",), ("location", "satellite", "environment")])
def test_png_is_a_sensible_image(tmp_path, modalities):
    sm = _scoremap(modalities=modalities, query="Cardinalis $cardinalis$")  # $ is not mathtext
    path = write_png(sm, tmp_path / "map.png")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        rgb = np.asarray(im.convert("RGB"))
    assert 800 <= w <= 4000 and 500 <= h <= 5000
    # The map area (the upper middle of the figure) holds green score pixels.
    top = rgb[int(h * 0.08): int(h * 0.6), int(w * 0.05): int(w * 0.85)]
    assert _green_pixels(top) > 200
    if len(modalities) > 1:
        # The per-modality panels below hold green pixels too.
        assert _green_pixels(rgb[int(h * 0.62): int(h * 0.92)]) > 100


def test_coastlines_are_clipped_lines_and_wrap_across_the_antimeridian():
    grids = pytest.importorskip("taxamap.grids")
    if not hasattr(grids, "land"):
        pytest.skip("taxamap.grids.land() is not available")
    from taxamap.writers.png import coastlines

    # Fiji straddles 180; Tonga and Samoa lie at -175..-171, i.e. 185..189 in this grid's frame.
    lines = coastlines((170.0, -20.0, 190.0, -10.0))
    assert lines is not None and lines.geom_type == "MultiLineString"
    xy = shapely.get_coordinates(lines)
    assert xy[:, 0].min() >= 170.0 and xy[:, 0].max() <= 190.0
    assert xy[:, 1].min() >= -20.0 and xy[:, 1].max() <= -10.0
    assert (xy[:, 0] > 183.0).any() and (xy[:, 0] < 180.0).any()
    # Open ocean: nothing to draw, and no clip frame drawn either.
    assert coastlines((-140.0, -40.0, -130.0, -30.0)) is None


def test_png_across_the_antimeridian(tmp_path):
    sm = _scoremap(geometry=shapely.box(170.0, -20.0, 190.0, -10.0), resolution=0.5)
    path = write_png(sm, tmp_path / "fiji.png")
    with Image.open(path) as im:
        assert _green_pixels(np.asarray(im.convert("RGB"))) > 100


# ---------------------------------------------------------------- HTML


@pytest.fixture(scope="module")
def html_page(tmp_path_factory):
    sm = _scoremap(modalities=("location", "satellite", "environment"), query=EVIL)
    path = write_html(sm, tmp_path_factory.mktemp("html") / "map.html")
    return sm, path.read_text(encoding="utf-8")


def test_html_escapes_user_strings(html_page):
    _, page = html_page
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Iberia &amp; co" in page and "Iberia & co" not in page
    assert "&lt;2020&gt;" in page and "<2020>" not in page  # the attribution is escaped too


def test_html_layer_control_legend_and_outline(html_page):
    sm, page = html_page
    assert "L.control.layers(" in page
    for name in ("fused", "location", "satellite", "environment", "region outline"):
        assert re.search(rf'"{name}"\s*:\s*\w+', page), name
    # One image overlay per band, as an embedded PNG.
    assert len(re.findall(r"L\.imageOverlay\(", page)) == 4
    assert len(re.findall(r"data:image/png;base64,", page)) == 4
    # Only the fused overlay is on the map at first.
    added = re.findall(r"(image_overlay_\w+)\.addTo\(map_\w+\)", page)
    assert len(added) == 1
    assert re.search(rf'"fused"\s*:\s*{added[0]}\b', page)
    # Legend: units and the stretch, stated.
    assert UNITS in page
    assert "90th percentile" in page and "Greens" in page
    # The outline is there as GeoJSON with the region's vertices.
    assert "L.geoJson(" in page or "L.geoJSON(" in page
    assert "-9.5" in page and "44.8" in page


def _overlay_images(page: str) -> list[np.ndarray]:
    out = []
    for blob in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        with Image.open(io.BytesIO(base64.b64decode(blob))) as im:
            out.append(np.asarray(im.convert("RGBA")))
    return out


def test_html_overlay_is_transparent_outside_the_region(html_page):
    sm, page = html_page
    fused = _overlay_images(page)[0]
    rows, south, north = mercator_rows(grid_of(sm).north, grid_of(sm).resolution, grid_of(sm).height)
    assert fused.shape == (len(rows), grid_of(sm).width, 4)
    expected_alpha = np.where(grid_of(sm).mask[rows], 255, 0)
    assert np.array_equal(fused[..., 3], expected_alpha)


def test_mercator_rows_put_each_row_at_its_latitude():
    # 0..80 degrees north in 1-degree rows: Mercator stretches the north ~5x more than the south.
    north, res, height = 80.0, 1.0, 80
    rows, south, top = mercator_rows(north, res, height)
    assert (south, top) == (0.0, 80.0)
    n = len(rows)
    assert n > height  # enough output rows that the thinnest source row gets one
    y = mercator_y(top) - (np.arange(n) + 0.5) * (mercator_y(top) - mercator_y(south)) / n
    lat = np.degrees(np.arctan(np.sinh(y)))
    row_north = north - rows * res
    assert np.all((lat <= row_north + 1e-9) & (lat >= row_north - res - 1e-9))
    # The image's middle is near 57N; stretching the lat/lon raster would put 40N there.
    assert 56.0 < lat[n // 2] < 58.0
    assert rows[n // 2] in (23, 24)
    assert set(np.unique(rows)) == set(range(height))  # every source row is shown


def test_mercator_rows_clip_to_web_mercator():
    rows, south, north = mercator_rows(90.0, 1.0, 180)
    assert north == pytest.approx(85.0511287798066) and south == pytest.approx(-85.0511287798066)
    assert rows.min() >= 4 and rows.max() <= 175


def test_overlay_subsamples_huge_rasters():
    grid = Grid(west=-180.0, north=10.0, resolution=0.05, width=7200, height=20,
                mask=np.ones((20, 7200), bool))
    raster = np.tile(np.arange(7200, dtype=np.float32), (20, 1))
    rgba, bounds = overlay_rgba(raster, grid, stretch_of(raster), max_pixels=1000)
    assert rgba.shape[1] == 1000
    assert np.allclose(bounds, [[9.0, -180.0], [10.0, 180.0]])
    # Picked columns still run low to high: the colours darken left to right.
    brightness = rgba[0, :, :3].astype(int).sum(axis=1)
    assert np.all(np.diff(brightness) <= 0) and brightness[0] > brightness[-1]


def test_html_across_the_antimeridian(tmp_path):
    sm = _scoremap(geometry=shapely.box(170.0, -20.0, 190.0, -10.0), resolution=0.5)
    page = write_html(sm, tmp_path / "fiji.html").read_text()
    assert "[[-20.0, 170.0], [-10.0, 190.0]]" in page  # bounds as Leaflet gets them


def _cluster_data(page: str) -> list[list[float]]:
    match = re.search(r"var data = (\[.*?\]\]);", page, re.DOTALL)
    assert match, "no FastMarkerCluster data in the page"
    return json.loads(match.group(1))


def test_html_occurrences_and_range_outline(tmp_path):
    sm = _scoremap(modalities=("location",))
    occ = np.array([[40.123456789, -3.5], [41.0, -4.25], [np.nan, 1.0], [38.5, 0.75]])
    rng = shapely.box(-6.0, 38.0, -1.0, 42.0)
    page = write_html(sm, tmp_path / "occ.html", occurrences=occ, range_geometry=rng,
                      range_label="percentile:90").read_text()
    # Own layers in the layer control, named with the count and the rule.
    assert re.search(r'"occurrences \(3\)"\s*:\s*fast_marker_cluster_\w+', page)
    assert re.search(r'"range outline \(percentile:90\)"\s*:\s*geo_json_\w+', page)
    # Clustered: one marker-cluster group holding the finite rows, rounded to ~1 m.
    assert "L.markerClusterGroup(" in page
    assert _cluster_data(page) == [[40.12346, -3.5], [41.0, -4.25], [38.5, 0.75]]
    assert "bindPopup(" in page and "toFixed(5)" in page  # popups give lat/lon
    # The outline's corners, and the legend's account of what is drawn and what was dropped.
    for corner in ("[-6.0, 38.0]", "[-1.0, 42.0]"):
        assert corner in page
    assert "occurrences: 3 (1 without coordinates not shown)" in page
    assert "range outline (percentile:90)" in page


def test_html_empty_range_is_stated_not_drawn(tmp_path):
    sm = _scoremap(modalities=("location",))
    page = write_html(sm, tmp_path / "e.html", range_geometry=shapely.MultiPolygon(),
                      occurrences=np.empty((0, 2))).read_text()
    assert "no cell reaches the threshold" in page
    assert "range outline" not in page and "L.markerClusterGroup(" not in page


def test_html_antimeridian_occurrences_and_range_follow_the_grid(tmp_path):
    sm = _scoremap(geometry=shapely.box(170.0, -20.0, 190.0, -10.0), modalities=("location",))
    # GeoJSON-style inputs: longitudes in -180..180 on both sides of the antimeridian.
    occ = np.array([[-17.5, 178.25], [-15.0, -178.5]])
    rng = shapely.MultiPolygon([shapely.box(175.0, -16.0, 180.0, -12.0),
                                shapely.box(-180.0, -16.0, -176.0, -12.0)])
    page = write_html(sm, tmp_path / "fiji.html", occurrences=occ,
                      range_geometry=rng).read_text()
    assert _cluster_data(page) == [[-17.5, 178.25], [-15.0, 181.5]]
    # The popup maps 181.5 back to -178.5.
    assert "% 360) - 180" in page
    assert "[184.0, -16.0]" in page and "[-176.0" not in page


@pytest.mark.parametrize("bad,match", [
    (np.zeros((3, 3)), "shape"),
    (np.array([[120.0, 10.0]]), r"\(lon, lat\)"),
    ("nonsense", "array"),
])
def test_html_bad_occurrences_raise_and_write_nothing(tmp_path, scoremap, bad, match):
    with pytest.raises(TaxamapError, match=match):
        write_html(scoremap, tmp_path / "bad.html", occurrences=bad)
    with pytest.raises(TaxamapError, match="shapely"):
        write_html(scoremap, tmp_path / "bad.html", range_geometry=[[0, 0], [1, 1]])
    assert not list(tmp_path.iterdir())


def _need_offline_assets() -> None:
    for module in ("xstatic.pkg.leaflet", "xstatic.pkg.leaflet_markercluster"):
        pytest.importorskip(module, reason="offline assets: pip install 'taxamap[offline]'")


@pytest.fixture(scope="module")
def offline_page(tmp_path_factory) -> str:
    _need_offline_assets()
    sm = _scoremap(modalities=("location", "satellite"), query=EVIL)
    path = write_html(sm, tmp_path_factory.mktemp("offline") / "map.html",
                      occurrences=np.array([[40.0, -3.0], [41.0, -2.0]]),
                      range_geometry=shapely.box(-6.0, 38.0, -1.0, 42.0), self_contained=True)
    return path.read_text(encoding="utf-8")


def test_self_contained_html_needs_no_network(offline_page):
    from taxamap.writers.assets import external_urls

    page = offline_page
    assert external_urls(page) == []
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)
    assert not re.search(r"<link[^>]*rel=.?stylesheet", page, re.IGNORECASE)
    # Leaflet and the cluster plugin are inside, with their CSS images as data URIs.
    assert "Leaflet 1.9" in page and "L.MarkerClusterGroup=L.FeatureGroup.extend" in page
    assert ".leaflet-control-layers-toggle" in page and "url(images/" not in page
    assert ".marker-cluster-small" in page
    # No web basemap; Natural Earth land instead, under the scores.
    assert "tile_layer_" not in page and "openstreetmap" not in page.lower()
    assert re.search(r'"land \(Natural Earth\)"\s*:\s*geo_json_\w+', page)
    assert '"pane": "taxamap-land"' in page
    # folium's jQuery/Bootstrap/icon fonts are not needed and not embedded.
    assert "jquery" not in page.lower() and "bootstrap" not in page.lower()
    # Escaping still holds, and every overlay is still there.
    assert EVIL not in page and len(re.findall(r"L\.imageOverlay\(", page)) == 3


def test_self_contained_html_carries_the_licences(offline_page):
    comment = re.search(r"<!--\s*Third-party software embedded in this file:(.*?)-->",
                        offline_page, re.DOTALL)
    assert comment, "no licence notice"
    notice = comment.group(1)
    assert "Leaflet 1.9.3 (BSD-2-Clause)" in notice and "XStatic-Leaflet" in notice
    assert "Vladimir Agafonkin" in notice and "Redistributions in binary form" in notice
    assert "Leaflet.markercluster" in notice and "(MIT)" in notice and "David Leaver" in notice
    assert "Natural Earth" in offline_page  # visible attribution of the land layer


def test_self_contained_without_the_package_says_what_to_install(tmp_path, scoremap,
                                                                  monkeypatch):
    import sys

    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "xstatic.pkg.leaflet", None)
    with pytest.raises(TaxamapError, match=r"pip install 'taxamap\[offline\]'") as err:
        write_html(scoremap, tmp_path / "map.html", self_contained=True)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_inline_assets_refuses_what_it_cannot_embed():
    _need_offline_assets()
    from taxamap.writers.assets import inline_assets

    page = inline_assets('<html><head><script src="https://cdn.example/leaflet@9/dist/leaflet.js">'
                         "</script></head></html>")
    assert "https://cdn.example" not in page and "Leaflet 1.9" in page
    with pytest.raises(TaxamapError, match="no offline copy"):
        inline_assets('<head><script src="https://cdn.example/jquery.min.js"></script></head>')


# ---------------------------------------------------------------- stretch


def test_stretch_and_colours():
    values = np.arange(100, dtype=np.float32).reshape(10, 10)
    values[0, 0] = np.nan
    s = stretch_of(values)
    assert s.vmin == pytest.approx(np.percentile(np.arange(1, 100), 90))
    assert s.vmax == 99.0 and s.valid == 99
    rgba = colorize(values, s)
    assert rgba[0, 0, 3] == 0 and (rgba.reshape(-1, 4)[1:, 3] == 255).all()
    # Everything below the 90th percentile gets the same (lightest) colour; the top is darkest.
    assert (rgba[1, :] == rgba[1, 0]).all()
    assert rgba[9, 9, :3].sum() < rgba[1, 0, :3].sum()
    assert "90th percentile" in s.describe()
    assert stretch_of(np.full((2, 2), np.nan)).valid == 0
    constant = stretch_of(np.full((2, 2), 0.3))
    assert constant.vmax > constant.vmin


# ---------------------------------------------------------------- atomic writes

WRITERS = [(write_geotiff, "map.tif"), (write_png, "map.png"), (write_html, "map.html")]


@pytest.mark.parametrize("writer,name", WRITERS)
def test_missing_or_bad_folder_raises_and_writes_nothing(tmp_path, scoremap, writer, name):
    missing = tmp_path / "nope"
    with pytest.raises(TaxamapError, match="does not exist"):
        writer(scoremap, missing / name)
    assert not missing.exists()
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(TaxamapError, match="not a folder"):
        writer(scoremap, not_a_folder / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
@pytest.mark.parametrize("writer,name", WRITERS)
def test_read_only_folder_raises(tmp_path, scoremap, writer, name):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(TaxamapError, match="cannot write"):
            writer(scoremap, folder / name)
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o700)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, scoremap, monkeypatch):
    import rasterio.shutil

    target = tmp_path / "map.tif"
    target.write_bytes(b"old")

    def broken_copy(*_args, **_kwargs):  # GDAL failing half-way through the COG
        raise rasterio.errors.RasterioIOError("write failed")

    monkeypatch.setattr(rasterio.shutil, "copy", broken_copy)
    with pytest.raises(Exception):  # noqa: B017
        write_geotiff(scoremap, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["map.tif"]


def test_a_dataset_of_several_species_is_a_taxamap_error(tmp_path, scoremap):
    import xarray as xr

    several = xr.concat([scoremap, scoremap], dim="species")
    for writer, name in WRITERS:
        with pytest.raises(TaxamapError, match="select a species first"):
            writer(several, tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_results_replace_existing_files_with_normal_permissions(tmp_path, scoremap):
    for writer, name in WRITERS:
        target = tmp_path / name
        target.write_bytes(b"stale")
        writer(scoremap, target)
        assert target.read_bytes() != b"stale"
        assert target.stat().st_mode & 0o044  # readable by others, unlike a mkstemp file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for _, n in WRITERS)


def test_large_geotiff_is_built_on_disk_in_row_blocks(tmp_path, monkeypatch):
    """Past IN_MEMORY_PIXELS (the world at 0.05 deg) the COG is staged on disk row block by row
    block: the same valid COG, overviews and tags as the in-memory build, nothing left beside."""
    from taxamap.writers import geotiff

    sm = _scoremap(geometry=shapely.box(-20.0, 20.0, 10.0, 35.0), resolution=0.05,
                   modalities=("location",))
    in_memory = write_geotiff(sm, tmp_path / "memory.tif")
    monkeypatch.setattr(geotiff, "IN_MEMORY_PIXELS", 1000)
    monkeypatch.setattr(geotiff, "ROW_BLOCK", 37)  # blocks that do not divide the rows
    on_disk = write_geotiff(sm, tmp_path / "disk.tif")
    valid, errors, warnings = cog_validate(str(on_disk))
    assert valid and not errors and not warnings, (errors, warnings)
    with rasterio.open(in_memory) as a, rasterio.open(on_disk) as b:
        for i in (1, 2):
            assert np.array_equal(a.read(i), b.read(i), equal_nan=True)
        assert b.overviews(1) == a.overviews(1) and b.overviews(1)
        assert b.descriptions == a.descriptions and b.transform == a.transform
        assert {k: v for k, v in b.tags().items() if k != "CREATED"} == {
            k: v for k, v in a.tags().items() if k != "CREATED"}
        assert b.tags(2) == a.tags(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.tif", "memory.tif"]
