"""The ``taxamap serve`` page in a real browser: Playwright (PyPI) drives Debian's headless chromium
against a real server on 127.0.0.1, with every network name unresolvable. Typing a species and
Enter paints the overlay (pixels in the map) and #status reads "ready" (the Enter-to-paint time
is printed); clicking a cell shows its scores; moving #threshold draws the range outline; a photo
upload maps; an unknown species and a hostile name show readable text; a link reopens the state;
two species compare side by side. The page loads nothing from the network."""

from __future__ import annotations

import os
import re
import time
from urllib.parse import urlparse

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
# A real browser for every test: end to end, out of the quick loop (-m "not slow").
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing")]
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tests.helpers.serveserver import (  # noqa: E402
    SPECIES, ServeServer, open_satellite_session, open_test_session)

WIDTH, HEIGHT = 1280, 800
RANGE_RGB = (0x7B, 0x32, 0x94)
# Every name but the test server's address fails to resolve: no request can leave the machine.
ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    session = open_test_session(models_dir, tmp_path_factory.mktemp("browser-cache"))
    with ServeServer(session) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    pg = context.new_page()
    pg.requests = []  # every URL the page asks for
    pg.errors = []
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(server.url)
    sync_api.expect(pg.locator("#status")).to_contain_text("type a species", timeout=30000)
    yield pg
    assert pg.errors == []
    foreign = {urlparse(u).hostname for u in pg.requests} - {"127.0.0.1"}
    assert foreign <= {"tile.openstreetmap.org"}, foreign  # the optional web base map only
    context.close()


def map_pixels(pg, selector: str = "#map") -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    # The legend panels (their colour bars are green too) float over the maps: blank them out.
    shot = pg.locator(selector).screenshot(mask=[pg.locator(".panel")], mask_color="#000000")
    return np.asarray(Image.open(BytesIO(shot)).convert("RGB")).astype(int)


def green_pixels(rgb: np.ndarray) -> int:
    """Pixels of the score colour map (matplotlib Greens): green well above red and blue."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((g - r > 40) & (g - b > 20)).sum())


def range_pixels(rgb: np.ndarray) -> int:
    return int((np.abs(rgb - np.array(RANGE_RGB)).sum(axis=-1) < 60).sum())


def map_species(pg, name: str = SPECIES) -> float:
    pg.fill("#species", name)
    t0 = time.perf_counter()
    pg.press("#species", "Enter")
    sync_api.expect(pg.locator("#status")).to_have_text("ready", timeout=30000)
    return time.perf_counter() - t0


def test_enter_paints_the_overlay_and_says_ready(page, capsys):
    assert green_pixels(map_pixels(page)) == 0
    page.fill("#species", "Cardinalis card")
    sync_api.expect(page.locator("#suggestions li").first).to_have_text(
        re.compile(r"^Cardinalis cardinalis"), timeout=10000)
    seconds = map_species(page)
    in_page = float(page.evaluate("document.body.dataset.paintMs"))
    with capsys.disabled():
        print(f"\n[serve browser] Enter -> overlay painted: {seconds * 1000:.0f} ms "
              f"(page's own clock: {in_page:.0f} ms), 400-cell grid")
    assert green_pixels(map_pixels(page)) > 2000
    assert page.locator("#title").inner_text().startswith(SPECIES)
    assert "species=Cardinalis+cardinalis" in page.url
    href = page.get_attribute("#dl-tif", "href")
    assert href.startswith("/api/download?") and "format=tif" in href


def test_click_a_cell_shows_its_scores(page):
    map_species(page)
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.45)
    sync_api.expect(page.locator("#cell")).to_contain_text("fused", timeout=10000)
    text = page.locator("#cell").inner_text()
    assert re.search(r"fused\s+-?\d\.\d{4}", text) and re.search(r"location\s+-?\d\.\d{4}", text)
    assert page.locator(".leaflet-popup-content table").count() == 1


def test_moving_the_threshold_draws_the_range_outline(page):
    map_species(page)
    before = range_pixels(map_pixels(page))
    page.focus("#threshold")
    for _ in range(10):
        page.keyboard.press("ArrowLeft")  # 90 -> 85th percentile
    page.wait_for_selector("#map[data-range-parts]", timeout=20000)
    sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=20000)
    assert int(page.get_attribute("#map", "data-range-parts")) >= 1
    assert range_pixels(map_pixels(page)) > before + 100
    sync_api.expect(page.locator("#threshold-value")).to_contain_text("km²")
    assert "threshold=percentile%3A85" in page.url
    assert "threshold=percentile%3A85" in page.get_attribute("#dl-gpkg", "href")


def test_upload_a_photo_maps_it(page, tmp_path):
    from PIL import Image

    path = tmp_path / "heron.jpg"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        path)
    page.set_input_files("#file", str(path))
    sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=30000)
    assert page.locator("#title").inner_text().startswith("photo heron.jpg")
    assert green_pixels(map_pixels(page)) > 2000
    assert "upload=" in page.url


def test_a_pixel_bomb_reads_as_a_message(page, tmp_path):
    from tests.helpers.bombs import png_bomb

    bomb = png_bomb(tmp_path / "huge.png", 12000, 12000)  # refused from its header
    page.set_input_files("#file", str(bomb))
    status = page.locator("#status.error")
    sync_api.expect(status).to_contain_text("huge.png is 12,000 x 12,000 pixels (144 Mpx)",
                                            timeout=30000)
    assert "/" not in status.inner_text()  # no path of the server's


def test_unknown_species_reads_as_a_message(page):
    page.fill("#species", "Nonexistus fictus")
    page.press("#species", "Enter")
    status = page.locator("#status.error")
    sync_api.expect(status).to_contain_text('unknown species "Nonexistus fictus"', timeout=20000)


def test_user_strings_are_text_not_html(page):
    hostile = '<img src=x onerror="document.body.dataset.pwned=1">'
    page.fill("#species", hostile)
    page.press("#species", "Enter")
    sync_api.expect(page.locator("#status.error")).to_contain_text("<img", timeout=20000)
    assert page.locator("#status img, #title img").count() == 0
    assert page.evaluate("document.body.dataset.pwned") is None


def test_a_link_reopens_the_same_map(browser, server):
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    pg = context.new_page()
    pg.goto(server.url + "?species=Cardinalis+cardinalis&band=location&stretch=80"
            "&threshold=percentile%3A80")
    sync_api.expect(pg.locator("#status")).to_have_text("ready", timeout=30000)
    assert pg.locator("#band").input_value() == "location"
    assert pg.locator("#stretch").input_value() == "80"
    assert pg.get_attribute("#map", "data-range-parts") is not None
    assert green_pixels(map_pixels(pg)) > 2000 and range_pixels(map_pixels(pg)) > 100
    context.close()


def test_compare_two_species_side_by_side(page):
    map_species(page)
    page.fill("#compare", "Cyanocitta cristata")
    page.press("#compare", "Enter")
    sync_api.expect(page.locator("#title2")).to_contain_text("Cyanocitta cristata", timeout=20000)
    sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=20000)
    assert page.locator("#pane2").is_visible()
    assert green_pixels(map_pixels(page, "#map2")) > 1000
    assert "compare=Cyanocitta+cristata" in page.url


def test_compare_view_gives_each_map_its_legend_and_popup(page, server):
    """Side by side, each map has its own legend (its own species' stretch: the colours of the
    two maps mean different scores) and a click on either map opens a popup on both, each with
    its own species' scores."""
    import httpx

    page.goto(server.url + "?species=Cardinalis+cardinalis&compare=Cyanocitta+cristata")
    sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=30000)
    for pane, species in (("#pane1", SPECIES), ("#pane2", "Cyanocitta cristata")):
        legend = page.locator(f"{pane} .panel")
        assert legend.count() == 1 and legend.is_visible()
        stretch = httpx.get(server.url + "api/map", params={"species": species},
                            timeout=30).json()["stretch"]
        ends = legend.locator(".legend-ends").inner_text().split()
        assert ends == [f"{stretch['vmin']:.3f}", f"{stretch['vmax']:.3f}"], (pane, ends)
        box = legend.bounding_box()
        pane_box = page.locator(pane).bounding_box()
        assert pane_box["x"] <= box["x"] and box["x"] + box["width"] <= pane_box["x"] + \
            pane_box["width"]
    for clicked in ("#map", "#map2"):
        box = page.locator(clicked).bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.45)
        for target, species, other in (("#map", SPECIES, "Cyanocitta"),
                                       ("#map2", "Cyanocitta cristata", "Cardinalis")):
            popup = page.locator(f"{target} .leaflet-popup-content")
            sync_api.expect(popup).to_have_count(1, timeout=10000)
            sync_api.expect(popup).to_contain_text(species, timeout=10000)
            text = popup.inner_text()
            assert re.search(r"fused\s+-?\d\.\d{4}", text) and other not in text, text
    assert "Cyanocitta cristata" in page.locator("#pane2 .panel").inner_text()


def test_cell_popup_shows_the_satellite_patch(browser, models_dir, tmp_path_factory):
    from tests.helpers.tileserver import TileServer

    with TileServer(latency=0.0) as tiles:
        session = open_satellite_session(models_dir, tmp_path_factory.mktemp("sat-browser"),
                                         tiles.url_template)
        with ServeServer(session) as server:
            context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
            pg = context.new_page()
            pg.goto(server.url + "?species=Cardinalis+cardinalis&band=satellite")
            sync_api.expect(pg.locator("#status")).to_have_text("ready", timeout=30000)
            box = pg.locator("#map").bounding_box()
            pg.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5)
            img = pg.locator(".leaflet-popup-content img.popup-patch")
            sync_api.expect(img).to_have_count(1, timeout=20000)
            pg.wait_for_timeout(200)
            size = None
            for _ in range(50):  # until the patch image has loaded
                size = img.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
                if size[0] and size[1]:
                    break
                pg.wait_for_timeout(100)
            assert size[1:] == [64, 64]
            assert re.search(r"satellite\s+-?\d\.\d{4}", pg.locator("#cell").inner_text())
            context.close()


def test_click_lists_the_species_there_and_each_link_maps_it(page):
    """What lives here? A click lists the panel's likeliest species at the cell; following one
    maps that species."""
    map_species(page)
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    links = page.locator("#here ol.species-at li a")
    sync_api.expect(links).to_have_count(10, timeout=60000)
    assert "% of the panel" in page.locator("#here").inner_text()
    second = links.nth(1).inner_text()
    links.nth(1).click()
    sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=30000)
    assert page.locator("#title").inner_text().startswith(second)
    assert page.input_value("#species") == second
