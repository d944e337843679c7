"""The self-contained HTML map in a real browser: headless Debian chromium opens the file with all
network names unresolvable, takes a screenshot, and the pixels must show the score overlay, the
legend, the occurrence clusters and the range outline. Chromium's net log must show no request
made by the page (its own update/account pings, which fail to resolve, are ignored)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import shapely
from PIL import Image

from taxamap.grid import make_grid
from taxamap.score import ScoreMap

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1000, 800

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing")
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

# Chromium's own background services (update checks, account probes); never the page's.
BROWSER_HOSTS = ("google.com", "googleapis.com", "gvt1.com", "gstatic.com")


def _scoremap() -> ScoreMap:
    grid = make_grid(REGION, 0.25)
    lat, lon = grid.cell_latlon().T
    # A smooth bump: the top cells (coloured by the 90th-percentile stretch) form a disc whose
    # colours run from light at its rim to dark at its centre.
    dist2 = ((lat - PEAK[0]) / 2.0) ** 2 + ((lon - PEAK[1]) / 2.5) ** 2
    scores = (0.1 + 0.3 * np.exp(-dist2)).astype(np.float32)
    raster = grid.to_raster(scores)
    return ScoreMap(grid=grid, fused=raster, layers={"location": raster}, query="Lynx pardinus",
                    prompt=None, fusion="mean", region_name="Iberia", region_geometry=REGION,
                    slug="lynx-pardinus")


def _hex(color: str) -> np.ndarray:
    color = color.lstrip("#")
    return np.array([int(color[i:i + 2], 16) for i in (0, 2, 4)], dtype=float)


def _near(rgb: np.ndarray, colors: np.ndarray, tol: float) -> np.ndarray:
    """Mask of pixels within ``tol`` (Euclidean, 0-255 units) of any of ``colors``."""
    flat = rgb.reshape(-1, 3).astype(float)
    best = np.full(len(flat), np.inf)
    for c in np.asarray(colors, dtype=float).reshape(-1, 3):
        best = np.minimum(best, np.sqrt(((flat - c) ** 2).sum(axis=1)))
    return (best <= tol).reshape(rgb.shape[:2])


def _ramp(lo: float, hi: float, n: int = 24) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps[COLORMAP]
    return np.array([cmap(t)[:3] for t in np.linspace(lo, hi, n)]) * 255.0


def _on_map(colors: np.ndarray) -> np.ndarray:
    """``colors`` as the overlay shows them: blended at its opacity over land and over sea."""
    return np.concatenate([OVERLAY_OPACITY * colors + (1 - OVERLAY_OPACITY) * _hex(bg)
                           for bg in (LAND_FILL, SEA_COLOR)])


def _screenshot(page: Path, tmp: Path) -> tuple[np.ndarray, str, list[str]]:
    """(RGB pixels, chromium's stderr, URLs the page asked the network for)."""
    png, netlog = tmp / "shot.png", tmp / "net.json"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-extensions", "--disable-default-apps", "--no-pings",
        # No name resolves: nothing can leave the machine, whatever the page or browser asks.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp / 'profile'}", f"--screenshot={png}",
        f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000",
        "--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(tmp)})
    assert png.exists(), done.stderr[-3000:]
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))
    urls = set(re.findall(r'"url":"([^"]+)"', netlog.read_text(errors="replace")))
    page_urls = sorted(
        u for u in urls
        if urlparse(u).scheme in ("http", "https", "ws", "wss")
        and not (urlparse(u).hostname or "").endswith(BROWSER_HOSTS)
        and "~notfound" not in u)
    return rgb, done.stderr, page_urls


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
def offline_map(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    sm = _scoremap()
    tif = write_geotiff(sm, tmp / "lynx.tif")
    outline = range_outline(tif, "percentile:75")
    rng = np.random.default_rng(3)
    # Occurrences in the upper left, so their clusters are apart from the score disc.
    occ = np.column_stack([rng.uniform(41.5, 43.5, 80), rng.uniform(-8.5, -5.0, 80)])
    page = write_html(sm, tmp / "lynx.html", occurrences=occ, range_geometry=outline,
                      range_label="percentile:75", self_contained=True)
    rgb, stderr, urls = _screenshot(page, tmp)
    Image.fromarray(rgb).save(tmp / "seen.png")
    return page, rgb, stderr, urls


def test_self_contained_file_has_no_network_references(offline_map):
    page, *_ = offline_map
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""<script[^>]*\bsrc\s*=""", text, re.IGNORECASE)
    assert not re.search(r"""<link[^>]*\bhref\s*=\s*["']?(https?:)?//""", text, re.IGNORECASE)
    assert assets.external_urls(text) == []
    assert "Leaflet 1.9" in text and "BSD-2-Clause" in text and "MIT" in text


def test_browser_made_no_request_and_no_script_error(offline_map):
    _, _, stderr, urls = offline_map
    assert urls == []
    assert "Uncaught" not in stderr, [ln for ln in stderr.splitlines() if "CONSOLE" in ln]


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


def test_cdn_page_offline_is_detected(tmp_path, offline_map):
    """Control: the ordinary page (CDN links) asks the network and draws no overlay offline,
    so the checks above can fail."""
    page = write_html(_scoremap(), tmp_path / "cdn.html")
    rgb, stderr, urls = _screenshot(page, tmp_path)
    assert any("leaflet" in u for u in urls), urls
    assert "Uncaught" in stderr  # "L is not defined": Leaflet never loaded
    assert not _not_blank(rgb)
    assert _near(_map_area(rgb), _on_map(_ramp(0.35, 1.0)), 10).sum() < 100
