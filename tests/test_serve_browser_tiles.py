"""The ``taxamap serve`` page draws a grid too large for memory as map tiles (issue 21): in Debian's
headless chromium (Playwright), typing a species paints score tiles, and zooming in paints the
tiles of the next zoom. Nothing is loaded from the network."""

from __future__ import annotations

import os
import re
from urllib.parse import urlparse

import pytest

from taxamap.options import MapOptions
from taxamap.session import MapSession

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing")]
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tests.helpers.serveserver import SPECIES, ServeServer  # noqa: E402
from tests.test_serve_browser import green_pixels, map_pixels  # noqa: E402

ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
TILE = re.compile(r"/tiles/Cardinalis%20cardinalis/(\d+)/(\d+)/(\d+)\.png")


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    options = MapOptions(bbox=(-100.0, 33.0, -70.0, 45.0), resolution=0.1, models=models_dir,
                         cache=tmp_path_factory.mktemp("tiles-browser"), progress=False)
    with ServeServer(MapSession(options, in_memory=False)) as srv:
        yield srv


def test_tiles_paint_for_a_query_and_after_a_zoom(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        sync_api.expect(page.locator("#status")).to_contain_text("type a species", timeout=30000)
        assert green_pixels(map_pixels(page)) == 0
        page.fill("#species", SPECIES)
        page.press("#species", "Enter")
        sync_api.expect(page.locator("#status")).to_have_text("ready", timeout=60000)
        zooms = {int(m.group(1)) for u in requests if (m := TILE.search(u))}
        assert len(zooms) == 1 and not any("/api/overlay.png" in u for u in requests)
        first = zooms.pop()
        assert page.locator(".score-tiles img").count() > 0
        assert green_pixels(map_pixels(page)) > 5000

        page.click(".leaflet-control-zoom-in")
        page.wait_for_function(
            "n => document.querySelectorAll('.score-tiles img.leaflet-tile-loaded').length > 0 &&"
            " [...document.querySelectorAll('.score-tiles img')].some("
            "  i => i.src.includes('/' + n + '/'))", arg=first + 1, timeout=30000)
        page.wait_for_timeout(500)  # the zoom animation ends
        after = {int(m.group(1)) for u in requests if (m := TILE.search(u))}
        assert first + 1 in after
        assert green_pixels(map_pixels(page)) > 5000
        assert errors == []
        foreign = {urlparse(u).hostname for u in requests} - {"127.0.0.1"}
        assert foreign <= {"tile.openstreetmap.org"}, foreign
        page.screenshot(path=str(server.session.options.cache) + "/tiles.png")
        browser.close()
