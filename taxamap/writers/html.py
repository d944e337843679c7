"""An interactive HTML map (folium/Leaflet): one image overlay per band in a layer control, the
region outline, a colour legend with units and the display stretch, the imagery credit, a title.

Leaflet shows images in Web Mercator, so each overlay's rows are re-picked at evenly spaced
Mercator northings before encoding; stretching a lat/lon raster over its bounds would misplace
rows north-south on large regions. User strings (query, prompt, region name) are HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np

import taxamap
from taxamap.writers.geotiff import _check_shapes
from taxamap.writers.style import (
    COLORMAP,
    STRETCH_PERCENTILE,
    UNITS,
    Stretch,
    atomic_path,
    colorize,
    gradient_css,
    imagery_credit,
    mercator_rows,
    stretch_of,
)

#: Largest overlay side in pixels; bigger rasters are subsampled (nearest) for the browser only.
MAX_OVERLAY_PIXELS = 4096

#: Overlay opacity: the basemap's labels and coastlines stay readable underneath.
OVERLAY_OPACITY = 0.85

OUTLINE_NAME = "region outline"


def overlay_rgba(raster: np.ndarray, grid, stretch: Stretch,
                 max_pixels: int = MAX_OVERLAY_PIXELS) -> tuple[np.ndarray, list[list[float]]]:
    """Colour ``raster`` for Leaflet: (rows, cols, 4) uint8 with rows at evenly spaced Web Mercator
    northings (NaN transparent), and its bounds ``[[south, west], [north, east]]``."""
    rows, south, north = mercator_rows(grid.north, grid.resolution, grid.height,
                                       max_rows=max_pixels)
    cols = np.arange(grid.width)
    if grid.width > max_pixels:
        cols = np.floor((np.arange(max_pixels) + 0.5) * grid.width / max_pixels).astype(np.int64)
    picked = np.asarray(raster)[rows][:, cols]
    return colorize(picked, stretch), [[south, grid.west], [north, grid.east]]


def _data_uri(rgba: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _title_html(scoremap) -> str:
    where = f" — {_esc(scoremap.region_name)}" if scoremap.region_name else ""
    prompt = ""
    if scoremap.prompt and scoremap.prompt != scoremap.query:
        prompt = ('<br><span style="font-size:11px;color:#444">'
                  f"prompt: {_esc(scoremap.prompt)}</span>")
    return (
        '<div id="taxamap-title" style="position:fixed;top:10px;left:50%;'
        "transform:translateX(-50%);z-index:1000;background:rgba(255,255,255,.92);"
        "padding:6px 12px;border-radius:4px;box-shadow:0 1px 4px rgba(0,0,0,.3);"
        'font:14px/1.3 sans-serif;max-width:70%;text-align:center">'
        f"<b>{_esc(scoremap.query)}</b>{where}{prompt}</div>"
    )


def _legend_html(scoremap, stretches: list[tuple[str, Stretch]]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(name)}</td><td style='text-align:right'>"
        + (f"{s.vmin:.3f} – {s.vmax:.3f}" if s.valid else "no valid cells")
        + "</td></tr>"
        for name, s in stretches
    )
    credit = imagery_credit(scoremap)
    imagery = (f"<div style='margin-top:4px'>Imagery: {_esc(credit[0])} (licence: "
               f"{_esc(credit[1])})</div>" if credit else "")
    return (
        '<div id="taxamap-legend" style="position:fixed;bottom:24px;left:12px;z-index:1000;'
        "background:rgba(255,255,255,.94);padding:8px 10px;border-radius:4px;"
        'box-shadow:0 1px 4px rgba(0,0,0,.3);font:12px/1.35 sans-serif;max-width:330px">'
        f"<b>Score</b>: {_esc(UNITS)}"
        f"<div style='height:12px;margin:4px 0 1px;background:{gradient_css(COLORMAP)}'></div>"
        "<div style='display:flex;justify-content:space-between;font-size:11px'>"
        "<span>≤ 90th percentile</span><span>maximum</span></div>"
        f"<div style='margin-top:4px'>Display stretch: each layer is clipped below the "
        f"{STRETCH_PERCENTILE:g}th percentile of its valid cells (lightest) up to its maximum "
        f"(darkest), colour map {COLORMAP}. Transparent: no data.</div>"
        f"<table style='margin-top:4px;font-size:11px'>{rows}</table>"
        "<div style='font-size:11px;color:#555'>The GeoTIFF holds the raw, unstretched values."
        "</div>"
        f"{imagery}"
        f"<div style='font-size:10px;color:#777'>taxamap {_esc(taxamap.__version__)}</div>"
        "</div>"
    )


def write_html(scoremap, path: str | os.PathLike) -> Path:
    """Write ``scoremap`` as an interactive folium map at ``path`` (atomically); return the path.

    One image overlay per band ("fused" shown, each modality toggleable in the layer control),
    the region outline, a legend stating units and the display stretch, and the imagery credit.
    """
    import folium
    import shapely
    from shapely.geometry import mapping

    bands = _check_shapes(scoremap)
    grid = scoremap.grid
    credit = imagery_credit(scoremap)

    m = folium.Map(tiles=None, control_scale=True)
    folium.TileLayer("OpenStreetMap", name="basemap (OpenStreetMap)").add_to(m)

    stretches = []
    bounds = None
    for i, (name, raster) in enumerate(bands):
        stretch = stretch_of(raster)
        stretches.append((name, stretch))
        rgba, bounds = overlay_rgba(raster, grid, stretch)
        options = {"attribution": f"Imagery: {_esc(credit[0])}"} if credit else {}
        folium.raster_layers.ImageOverlay(
            image=_data_uri(rgba),
            bounds=bounds,
            name=name,
            opacity=OVERLAY_OPACITY,
            pixelated=True,
            show=(i == 0),
            **options,
        ).add_to(m)

    region = scoremap.region_geometry
    if region is not None and not region.is_empty:
        # Cells are the map's resolution; a finer outline only makes the page heavier.
        simple = shapely.simplify(region, grid.resolution / 4.0, preserve_topology=True)
        feature = {"type": "FeatureCollection",
                   "features": [{"type": "Feature", "properties": {}, "geometry": mapping(simple)}]}
        folium.GeoJson(
            feature,
            name=OUTLINE_NAME,
            style_function=lambda _f: {"color": "#222222", "weight": 1.5, "fill": False},
        ).add_to(m)

    folium.LayerControl(collapsed=False).add_to(m)
    m.fit_bounds(bounds)

    root = m.get_root()
    title = str(scoremap.query) + (f" — {scoremap.region_name}" if scoremap.region_name else "")
    root.header.add_child(folium.Element(f"<title>taxamap: {_esc(title)}</title>"))
    root.html.add_child(folium.Element(_title_html(scoremap)))
    root.html.add_child(folium.Element(_legend_html(scoremap, stretches)))

    page = root.render()
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)
