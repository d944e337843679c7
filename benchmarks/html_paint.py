"""Seconds until a contiguous-USA HTML map shows its range outline, in a real browser.

    python benchmarks/html_paint.py PAGE.html [PAGE.html ...] [--timeout 60] [--runs 3]

Each page (e.g. the ``--self-contained`` HTML of ``taxamap predict --region usa --resolution 0.05
--threshold percentile:95``) is opened in Debian's chromium through Playwright at 1280 x 800 px
with every network name unresolvable. Printed per run: seconds from navigation start to the load
event, and seconds from the load event until a screenshot (taken once the map has reached its
final view) shows the range outline in the grid's southern third (``--where texas,florida``: in
both, as ``tests/test_browser.py`` checks its map), the region outline along the southern third
and the land of Mexico.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import browser  # noqa: E402

# The first image overlay's bounds, [[south, west], [north, east]]: the grid's extent.
_BOUNDS = re.compile(r'L\.imageOverlay\(\s*"data:image/png;base64,[A-Za-z0-9+/=]*",\s*'
                     r"\[\[([-\d.e]+),\s*([-\d.e]+)\],\s*\[([-\d.e]+),\s*([-\d.e]+)\]\]")


def grid_bounds(page: Path) -> tuple[float, float, float, float]:
    """(west, south, east, north) of the map's grid, read from the page."""
    match = _BOUNDS.search(page.read_text(encoding="utf-8"))
    if not match:
        raise SystemExit(f"{page}: no taxamap image overlay found")
    south, west, north, east = (float(v) for v in match.groups())
    return west, south, east, north


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="+", type=Path)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="give up this many seconds after the load event")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--where", default="south",
                        help="comma-separated boxes that must show the outline: south (the "
                             "grid's southern third), texas, florida")
    args = parser.parse_args()
    where = tuple(w.strip() for w in args.where.split(","))
    painted = functools.partial(browser.south_painted, where=where)
    why = browser.missing()
    if why:
        raise SystemExit(why)
    print("| page | MB | run | load event (s) | outline painted after load (s) |")
    print("|---|---|---|---|---|")
    with browser.launch() as chromium:
        for page in args.pages:
            bounds = grid_bounds(page)
            for run in range(1, args.runs + 1):
                shot = browser.open_map(chromium, page, (1280, 800), bounds=bounds,
                                        boxes=browser.usa_boxes(bounds),
                                        painted=painted, timeout=args.timeout)
                seconds = (f"{shot.painted_s:.2f}" if shot.painted_s is not None
                           else f"not within {args.timeout:g}")
                extra = f" (requests: {len(shot.requests)})" if shot.requests else ""
                print(f"| {page} | {page.stat().st_size / 1e6:.1f} | {run} | {shot.load_s:.2f} | "
                      f"{seconds}{extra} |", flush=True)


if __name__ == "__main__":
    main()
