"""A real browser for the HTML map tests and benchmarks: Debian's chromium driven by Playwright
(from PyPI; no browser is ever downloaded), with every network name unresolvable.

    with launch() as browser:
        shot = open_map(browser, Path("map.html"), (1280, 800), bounds=(w, s, e, n))
        shot.rgb, shot.requests, shot.errors, shot.painted_s

:func:`open_map` times the page: ``load_s`` from navigation start to the load event, then it waits
for the Leaflet map to reach the view that fits ``bounds`` (an animated zoom shows stale,
CSS-scaled layers until it ends) and takes screenshots until ``painted(rgb, boxes)`` holds;
``painted_s`` is seconds from the load event to the end of the first screenshot that showed it.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import numpy as np

CHROMIUM = "/usr/bin/chromium"

#: No name resolves: nothing can leave the machine, whatever the page or the browser asks.
ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND", "--disable-gpu", "--no-sandbox",
        "--disable-quic", "--no-pings", "--disable-background-networking"]


def missing() -> str | None:
    """Why no browser can be driven here (for ``pytest.skip``), or None."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    return None


@contextlib.contextmanager
def launch() -> Iterator[object]:
    """A headless chromium (Playwright ``Browser``) that resolves no network name."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Shot:
    """What the browser showed and did."""

    rgb: np.ndarray
    requests: list[str] = field(default_factory=list)  # network URLs the page asked for
    errors: list[str] = field(default_factory=list)  # uncaught script errors
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    load_s: float = float("nan")
    painted_s: float | None = None


# Leaflet's map object: folium names its variable map_<id>.
_FIND_MAP = """() => {
    if (typeof L === "undefined") return null;
    for (const k of Object.keys(window)) {
        if (k.startsWith("map_") && window[k] instanceof L.Map) return window[k];
    }
    return null;
}"""

_AT_VIEW = f"""(b) => {{
    const m = ({_FIND_MAP})();
    if (!m) return false;
    const bounds = L.latLngBounds([b[1], b[0]], [b[3], b[2]]);
    return m.getZoom() === m.getBoundsZoom(bounds);
}}"""

_BOXES = f"""(boxes) => {{
    const m = ({_FIND_MAP})();
    const out = {{}};
    for (const [name, b] of Object.entries(boxes)) {{
        const nw = m.latLngToContainerPoint([b[3], b[0]]);
        const se = m.latLngToContainerPoint([b[1], b[2]]);
        out[name] = [Math.round(nw.x), Math.round(nw.y), Math.round(se.x), Math.round(se.y)];
    }}
    return out;
}}"""


def _rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def open_map(browser, path: Path, size: tuple[int, int], *,
             bounds: tuple[float, float, float, float] | None = None,
             boxes: dict[str, tuple[float, float, float, float]] | None = None,
             painted: Callable[[np.ndarray, dict], bool] | None = None,
             timeout: float = 5.0) -> Shot:
    """Open ``path`` in a fresh page of ``size`` (width, height) px and screenshot it.

    ``bounds`` (west, south, east, north): wait for the map to fit them first. ``boxes``: name ->
    (west, south, east, north) degrees, returned as (x0, y0, x1, y1) screen pixels of the final
    view. ``painted``: screenshots are taken until it holds for (rgb, pixel boxes) or ``timeout``
    seconds after the load event have passed; without it, one screenshot once the view is reached.
    """
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    shot = Shot(rgb=np.zeros((0, 0, 3), np.uint8))
    page.on("request", lambda r: shot.requests.append(r.url)
            if urlparse(r.url).scheme not in ("file", "data", "blob", "about") else None)
    page.on("pageerror", lambda e: shot.errors.append(str(e)))
    try:
        start = time.perf_counter()
        page.goto(Path(path).resolve().as_uri(), wait_until="load")
        loaded = time.perf_counter()
        shot.load_s = loaded - start
        if bounds is not None:
            page.wait_for_function(_AT_VIEW, arg=list(bounds), polling=50,
                                   timeout=timeout * 4000)
            shot.boxes = page.evaluate(_BOXES, {k: list(v) for k, v in (boxes or {}).items()})
        while True:
            shot.rgb = _rgb(page.screenshot())
            elapsed = time.perf_counter() - loaded
            if painted is None:
                break
            if painted(shot.rgb, shot.boxes):
                shot.painted_s = elapsed
                break
            if elapsed > timeout:
                break
            time.sleep(0.1)
    finally:
        context.close()
    return shot


# ---------------------------------------------------------------- pixels


def hex_rgb(color: str) -> np.ndarray:
    """``"#rrggbb"`` as three floats 0-255."""
    color = color.lstrip("#")
    return np.array([int(color[i:i + 2], 16) for i in (0, 2, 4)], dtype=float)


def near(rgb: np.ndarray, colors, tol: float) -> np.ndarray:
    """Mask of pixels within ``tol`` (Euclidean, 0-255 units) of any of ``colors``."""
    flat = rgb.reshape(-1, 3).astype(np.float32)
    hit = np.zeros(len(flat), bool)
    for c in np.asarray(colors, dtype=np.float32).reshape(-1, 3):
        d = flat - c
        hit |= np.einsum("ij,ij->i", d, d) <= tol * tol
    return hit.reshape(rgb.shape[:2])


def crop(rgb: np.ndarray, box) -> np.ndarray:
    """``rgb`` inside the pixel box (x0, y0, x1, y1), clipped to the image."""
    x0, y0, x1, y1 = box
    return rgb[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]


def dark_grey(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the region outline (#222, thin and anti-aliased over light colours)."""
    rgb = rgb.astype(int)
    return (rgb.max(axis=-1) < 110) & (rgb.max(axis=-1) - rgb.min(axis=-1) < 25)


# Where a contiguous-USA map's southern third must show the range outline (west, south, east,
# north degrees): Texas and Florida; and northern Mexico, outside the grid, where only land draws.
TEXAS = (-104.0, 26.5, -94.0, 32.0)
FLORIDA = (-83.0, 25.5, -80.0, 30.0)
MEXICO = (-106.0, 19.0, -98.0, 24.0)


def usa_boxes(bounds: tuple[float, float, float, float]) -> dict:
    """The boxes :func:`south_painted` looks at, for a grid of ``bounds``."""
    west, south, east, north = bounds
    return {"texas": TEXAS, "florida": FLORIDA, "mexico": MEXICO, "grid": bounds,
            "south": (west, south, east, south + (north - south) / 3.0)}


def south_painted(rgb: np.ndarray, boxes: dict, where: tuple[str, ...] = ("texas", "florida")
                  ) -> bool:
    """The range outline in each box of ``where`` (Texas and Florida; ``("south",)`` for anywhere
    in the grid's southern third), the region outline along the southern third and the land of
    Mexico are all on screen (pixel boxes from :func:`usa_boxes`)."""
    from taxamap.writers.html import LAND_FILL, RANGE_COLOR

    purple = [hex_rgb(RANGE_COLOR)]
    return bool(all(near(crop(rgb, boxes[name]), purple, 30).sum() > 300 for name in where)
                and dark_grey(crop(rgb, boxes["south"])).sum() > 300
                and near(crop(rgb, boxes["mexico"]), [hex_rgb(LAND_FILL)], 4).sum() > 3000)
