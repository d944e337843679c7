"""An interactive HTML map (folium/Leaflet): one image overlay per band in a layer control, the
region outline, a colour legend with units and the display stretch, the imagery credit, a title;
optionally occurrence points (clustered markers) and a range outline, and a self-contained variant
that embeds Leaflet (from an installed package, see :mod:`taxamap.writers.assets`) and draws
Natural Earth land instead of web tiles, so it opens with no internet.

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

from taxamap.version import __version__
from taxamap.crs import clip_wrapped
from taxamap.dataset import (band_meaning, band_unit, grid_of, is_product, map_bands, map_title,
                             one_map, outline_of, signal_note)
from taxamap.writers import HTML_QUERY_META
from taxamap.writers.style import (
    COLORMAP,
    UNITS,
    Stretch,
    colorize,
    gradient_css,
    imagery_credit,
    mercator_rows,
    write_bytes,
)
from taxamap.writers.stretch import band_display, parse_stretch

#: Largest overlay side in pixels; bigger rasters are subsampled (nearest) for the browser only.
MAX_OVERLAY_PIXELS = 4096

#: Overlay opacity: the basemap's labels and coastlines stay readable underneath.
OVERLAY_OPACITY = 0.85

OUTLINE_NAME = "region outline"


def overlay_rgba(raster: np.ndarray, grid, stretch: Stretch,
                 max_pixels: int = MAX_OVERLAY_PIXELS,
                 cmap: str = COLORMAP) -> tuple[np.ndarray, list[list[float]]]:
    """Colour ``raster`` for Leaflet: (rows, cols, 4) uint8 with rows at evenly spaced Web Mercator
    northings (NaN transparent), and its bounds ``[[south, west], [north, east]]``."""
    rows, south, north = mercator_rows(grid.north, grid.resolution, grid.height,
                                       max_rows=max_pixels)
    cols = np.arange(grid.width)
    if grid.width > max_pixels:
        cols = np.floor((np.arange(max_pixels) + 0.5) * grid.width / max_pixels).astype(np.int64)
    picked = np.asarray(raster)[rows][:, cols]
    return colorize(picked, stretch, cmap), [[south, grid.west], [north, grid.east]]


def _data_uri(rgba: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _title_html(ds) -> str:
    query, region = ds.attrs.get("query", "map"), ds.attrs.get("region") or ""
    where = f" — {_esc(region)}" if region else ""
    prompt = ""
    if ds.attrs.get("prompt") and ds.attrs["prompt"] != query:
        prompt = ('<br><span style="font-size:11px;color:#444">'
                  f"prompt: {_esc(ds.attrs['prompt'])}</span>")
    return (
        '<div id="taxamap-title" style="position:fixed;top:10px;left:50%;'
        "transform:translateX(-50%);z-index:1000;background:rgba(255,255,255,.92);"
        "padding:6px 12px;border-radius:4px;box-shadow:0 1px 4px rgba(0,0,0,.3);"
        'font:14px/1.3 sans-serif;max-width:70%;text-align:center">'
        f"<b>{_esc(query)}</b>{where}{prompt}</div>"
    )


def _legend_html(ds, stretches: list[tuple[str, Stretch]], extras: str = "",
                 footer: str = "", stretch: str | None = None) -> str:
    rule = parse_stretch(stretch)
    rows = "".join(
        f"<tr><td>{_esc(name)}</td><td style='text-align:right'>"
        + (f"{s.vmin:.3f} – {s.vmax:.3f}" if s.valid else "no valid cells")
        + (f" <span style='color:#555'>({_esc(band_unit(name))}; fixed scale)</span>"
           if is_product(name) and getattr(s, "fixed", False) else "")
        + "</td></tr>"
        for name, s in stretches
    )
    if rule.kind == "percentile":
        how = (f"each layer is clipped below the {rule.percentile:g}th percentile of its valid "
               "cells (lightest) up to its maximum (darkest)")
        ends = (f"≤ {rule.percentile:g}th percentile", "maximum")
    elif rule.kind == "value":
        how = (f"one fixed scale for every map (--stretch {rule.text}): {rule.lo:g} (lightest) "
               f"to {rule.hi:g} (darkest), values outside clipped")
        ends = (f"≤ {rule.lo:g}", f"≥ {rule.hi:g}")
    else:
        how = "each layer runs from its minimum (lightest) to its maximum (darkest)"
        ends = ("minimum", "maximum")
    if any(name == "relative" for name, _ in stretches):
        how += ("; 'relative' always runs 0 to 1 (the share of the reference panel's species "
                "scoring lower), so maps of different species compare directly")
    note = signal_note(ds)
    if note:
        extras = (f"<div id='taxamap-no-signal' style='color:#a40000;margin-top:4px'>&#9888; "
                  f"{_esc(note)}</div>") + extras
    credit = imagery_credit(ds)
    imagery = (f"<div style='margin-top:4px'>Imagery: {_esc(credit[0])} (licence: "
               f"{_esc(credit[1])})</div>" if credit else "")
    return (
        '<div id="taxamap-legend" style="position:fixed;bottom:56px;left:12px;z-index:1000;'
        "background:rgba(255,255,255,.94);padding:8px 10px;border-radius:4px;"
        'box-shadow:0 1px 4px rgba(0,0,0,.3);font:12px/1.35 sans-serif;max-width:330px">'
        f"<b>Score</b>: {_esc(UNITS)}"
        f"<div style='height:12px;margin:4px 0 1px;background:{gradient_css(COLORMAP)}'></div>"
        "<div style='display:flex;justify-content:space-between;font-size:11px'>"
        f"<span>{_esc(ends[0])}</span><span>{_esc(ends[1])}</span></div>"
        f"<div style='margin-top:4px'>Display stretch: {_esc(how)}; colour map {COLORMAP}. "
        "Transparent: no data.</div>"
        f"<table style='margin-top:4px;font-size:11px'>{rows}</table>"
        "<div style='font-size:11px;color:#555'>The GeoTIFF holds the raw, unstretched values."
        "</div>"
        f"{extras}{imagery}{footer}"
        f"<div style='font-size:10px;color:#777'>taxamap {_esc(__version__)}</div>"
        "</div>"
    )


def _trust_legend(ds, trust: list[tuple[str, str, Stretch]]) -> str:
    """One legend entry per trust layer: its colour ramp and range, its unit and what a high
    value means (the layers are not suitability)."""
    if not trust:
        return ""
    parts = ["<div style='margin-top:6px;border-top:1px solid #ccc;padding-top:4px'>"
             "<b>Where the map can be trusted</b> (layers in the layer control)</div>"]
    for name, cmap, stretch in trust:
        scale = (f"{stretch.vmin:.3g} – {stretch.vmax:.3g}" if stretch.valid
                 else "no valid cells")
        if name == "mess_variable" and ds.attrs.get("mess_variables"):
            scale = "0 – 19: " + str(ds.attrs["mess_variables"]).replace(",", ", ")
        parts.append(
            f"<div class='taxamap-trust' data-band='{_esc(name)}' style='margin-top:4px'>"
            f"<b>{_esc(name)}</b>: {_esc(band_unit(name))}"
            f"<div style='height:8px;margin:2px 0;background:{gradient_css(cmap)}'></div>"
            f"<div style='font-size:11px'>{_esc(scale)}; {_esc(band_meaning(name))}</div></div>")
    return "".join(parts)


# ---------------------------------------------------------------- extra layers

LAND_NAME = "land (Natural Earth)"
OCCURRENCES_NAME = "occurrences"

#: The most occurrence points an HTML map draws: larger sets are drawn as a random sample (a
#: fixed seed, so a rerun draws the same points) and the legend says so. Two million records
#: made a 46 MB page; every record still counts where numbers are computed (--threshold maxtss,
#: --fit, evaluate).
MAX_DRAWN_OCCURRENCES = 10_000
RANGE_NAME = "range outline"

#: Colours of the offline base (sea behind, land on top) and of the extra layers. Orange points
#: and a purple outline stay distinct from the green score ramp and from each other.
SEA_COLOR = "#d5e3ec"
LAND_FILL = "#f3f0e8"
LAND_LINE = "#9a9a9a"
RANGE_COLOR = "#7b3294"
#: The expert range (``predict --expert-range``): dashed, so it reads apart from the range cut.
EXPERT_NAME = "expert range"
EXPERT_COLOR = "#d95f02"
POINT_FILL = "#ff7f00"
POINT_LINE = "#5a2d00"

#: Deepest zoom; web tiles stop near here, and a coarse score grid has nothing finer to show.
MAX_ZOOM = 18

# Panes keep the drawing order fixed however layers are toggled: land under the scores, the
# scores under the outlines (overlayPane, 400), points and clusters above everything.
_LAND_PANE = ("taxamap-land", 250)
_SCORE_PANE = ("taxamap-scores", 350)


def _frame_shift(x: float, west: float, east: float) -> float:
    """The multiple of 360 that moves longitude ``x`` nearest the middle of [west, east]."""
    return 360.0 * round(((west + east) / 2.0 - x) / 360.0)


def _to_frame(geom, west: float, east: float):
    """``geom`` with each part moved by whole turns so it lies in the map's longitude frame
    (a grid across the antimeridian runs e.g. 170..190; GeoJSON sources use -180..180)."""
    import shapely
    from shapely import affinity

    parts = []
    for part in shapely.get_parts(geom):
        lo, _, hi, _ = part.bounds
        shift = _frame_shift((lo + hi) / 2.0, west, east)
        parts.append(affinity.translate(part, xoff=shift) if shift else part)
    if len(parts) == 1:
        return parts[0]
    if all(p.geom_type == "Polygon" for p in parts):
        return shapely.multipolygons(parts)
    return shapely.GeometryCollection(parts)


#: Decimals kept in the page's GeoJSON: 1e-6 degree is about 0.1 m, far below any cell, and the
#: shortest float text keeps a fragmented range outline's page about half the size.
GEOJSON_DECIMALS = 6


def _feature_collection(geom) -> dict:
    import json

    import shapely

    rounded = shapely.transform(geom, lambda xy: np.round(xy, GEOJSON_DECIMALS))
    # shapely's C GeoJSON writer: several times faster than __geo_interface__ on 10^4 rings.
    return {"type": "FeatureCollection",
            "features": [{"type": "Feature", "properties": {},
                          "geometry": json.loads(shapely.to_geojson(rounded))}]}


def land_context(bounds: tuple[float, float, float, float], tolerance: float):
    """Natural Earth land (``taxamap.grids.land()``) clipped to ``bounds`` (west, south, east,
    north; west < -180 or east > 180 allowed: shifted copies fill those parts), simplified by
    ``tolerance`` degrees; None when there is no land there or no land data."""
    try:
        from taxamap.grids import land

        geom = land()
    except Exception:  # noqa: BLE001 - context only; never fail a map over it
        return None
    if geom is None or geom.is_empty:
        return None
    polys = clip_wrapped(geom, bounds, "Polygon")
    if not polys:
        return None
    import shapely

    out = shapely.simplify(shapely.multipolygons(polys), tolerance, preserve_topology=True)
    return None if out.is_empty else out


def _view_bounds(grid) -> tuple[float, float, float, float]:
    """The grid's bounds with a margin (so panning a little still shows context), clipped to
    Web Mercator's latitudes."""
    from taxamap.writers.style import MERCATOR_MAX_LAT

    south = grid.north - grid.height * grid.resolution
    east = grid.west + grid.width * grid.resolution
    margin = max(5.0, 0.5 * max(east - grid.west, grid.north - south))
    return (grid.west - margin, max(south - margin, -MERCATOR_MAX_LAT),
            east + margin, min(grid.north + margin, MERCATOR_MAX_LAT))


def _occurrence_points(occurrences) -> tuple[np.ndarray, int]:
    """(N, 2) (lat, lon) rows with finite coordinates, and how many rows were dropped."""
    from taxamap.errors import TaxamapError

    try:
        pts = np.asarray(occurrences, dtype=np.float64)
    except (TypeError, ValueError):
        raise TaxamapError("occurrences must be an (N, 2) array of (lat, lon) degrees") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise TaxamapError(f"occurrences must be an (N, 2) array of (lat, lon) degrees; got shape "
                           f"{pts.shape}")
    ok = np.isfinite(pts).all(axis=1)
    if (np.abs(pts[ok, 0]) > 90.0).any():
        raise TaxamapError("occurrence latitudes must lie in [-90, 90]; are the columns in "
                           "(lon, lat) order? pass (lat, lon)")
    return pts[ok], int((~ok).sum())


# Leaflet code run per occurrence row [lat, lon-in-map-frame]; the popup shows lon in -180..180.
_POINT_CALLBACK = """function (row) {
    var lon = ((row[1] + 540) %% 360) - 180;
    var marker = L.circleMarker(new L.LatLng(row[0], row[1]), {
        radius: 5, weight: 1, color: "%s", fillColor: "%s", fillOpacity: 0.95});
    marker.bindPopup("occurrence<br>lat " + row[0].toFixed(5) + ", lon " + lon.toFixed(5));
    return marker;
}""" % (POINT_LINE, POINT_FILL)

_CLUSTER_ICON = """function (cluster) {
    var n = cluster.getChildCount();
    var size = n < 10 ? 28 : (n < 100 ? 34 : 42);
    return L.divIcon({html: "<div><span>" + n + "</span></div>",
                      className: "marker-cluster taxamap-cluster",
                      iconSize: new L.Point(size, size)});
}"""

_CLUSTER_CSS = f"""<style>
.marker-cluster.taxamap-cluster {{ background: {POINT_FILL}66; border-radius: 50%; }}
.marker-cluster.taxamap-cluster div {{ width: calc(100% - 8px); height: calc(100% - 8px);
  margin: 4px; border-radius: 50%; background: {POINT_FILL}; color: #fff; display: flex;
  align-items: center; justify-content: center; font: bold 12px sans-serif; }}
.marker-cluster.taxamap-cluster span {{ line-height: 1; }}
</style>"""


def drawn_sample(points: np.ndarray, limit: int = MAX_DRAWN_OCCURRENCES) -> np.ndarray:
    """``points`` when there are at most ``limit``, else ``limit`` of them drawn at random with a
    fixed seed (kept in their order)."""
    if len(points) <= limit:
        return points
    keep = np.random.default_rng(0).choice(len(points), size=limit, replace=False)
    return points[np.sort(keep)]


def _extras_legend(n_points: int | None, dropped: int, range_state: str | None,
                   range_label: str | None, n_records: int | None = None) -> str:
    rows = []
    if n_points is not None:
        note = f" ({dropped:,} without coordinates not shown)" if dropped else ""
        shown = (f"showing {n_points:,} of {n_records:,} records (random sample)"
                 if n_records is not None and n_records > n_points else f"{n_points:,}")
        rows.append(
            f"<div><span style='display:inline-block;width:10px;height:10px;border-radius:50%;"
            f"background:{POINT_FILL};border:1px solid {POINT_LINE};margin-right:5px;"
            f"vertical-align:middle'></span>occurrences: {shown}{note}, clustered</div>")
    if range_state is not None:
        label = f" ({_esc(range_label)})" if range_label else ""
        text = "range outline" if range_state == "drawn" else "range: no cell reaches the threshold"
        rows.append(
            f"<div><span style='display:inline-block;width:16px;height:0;border-top:3px solid "
            f"{RANGE_COLOR};margin-right:5px;vertical-align:middle'></span>{text}{label}</div>")
    return f"<div style='margin-top:4px'>{''.join(rows)}</div>" if rows else ""


def _offline_footer(libraries) -> str:
    libs = ", ".join(f"{_esc(lib.name)} {_esc(lib.version)} ({_esc(lib.license)})"
                     for lib in libraries)
    return ("<div style='font-size:10px;color:#555;margin-top:4px'>Offline map: land from Natural "
            f"Earth (public domain); map library {libs}, embedded in this file (licence notices "
            "in the page source).</div>")


#: Shown by the ordinary (CDN) page until its map library has loaded: offline, the page would
#: otherwise be blank but for the title and legend.
NOTICE_ID = "taxamap-needs-internet"


def _needs_internet_html() -> str:
    """A visible line saying the page loads its scripts from the internet and how to get a file
    that does not, then a script (its own element, so it runs even when the map's script fails)
    that hides the line once Leaflet has loaded."""
    return (
        f'<div id="{NOTICE_ID}" role="alert" style="position:fixed;top:64px;left:50%;'
        "transform:translateX(-50%);z-index:1001;background:#fff3cd;color:#5c3c00;"
        "border:1px solid #d9a400;padding:6px 12px;border-radius:4px;font:13px/1.35 sans-serif;"
        'width:max-content;max-width:90vw;text-align:center">This map needs the internet to load its scripts '
        "(Leaflet). For a file that opens offline, write it with <code>--self-contained</code> "
        "(Python: <code>self_contained=True</code>; needs <code>pip install "
        "'taxamap[offline]'</code>).</div>"
        f'<script>if (typeof L !== "undefined") {{ '
        f'document.getElementById("{NOTICE_ID}").style.display = "none"; }}</script>'
    )


def write_html(ds, path: str | os.PathLike, *, occurrences: np.ndarray | None = None,
               range_geometry=None, range_label: str | None = None,
               self_contained: bool = False, outline=None, expert_geometry=None,
               notes: tuple[str, ...] = (), stretch: str | None = None) -> Path:
    """Write a one-query (y, x) score Dataset as an interactive folium map at ``path``
    (atomically); return the path. ``outline``: the region boundary to draw (shapely,
    EPSG:4326; default: the Dataset's region).

    One image overlay per band ("fused" shown, each modality toggleable in the layer control),
    the region outline, a legend stating units and the display stretch, and the imagery credit.

    ``occurrences``: (N, 2) (lat, lon) degrees, drawn as clustered markers with lat/lon popups in
    their own layer (rows with NaN are skipped and counted in the legend); more than
    :data:`MAX_DRAWN_OCCURRENCES` are drawn as a random sample, which the legend states.
    ``range_geometry``: a shapely geometry in EPSG:4326 (e.g. :func:`taxamap.products.ranges.range_outline`)
    drawn as an outline in its own layer; ``range_label`` (e.g. the threshold rule) names it.
    ``expert_geometry``: an expert range (shapely, EPSG:4326) drawn as a dashed outline in its
    own layer, to compare with the map by eye.
    ``notes``: warnings shown in the legend (e.g. that no occurrence falls on the map); a
    map without signal against its reference panel says so there too.
    ``stretch``: the display scale (:mod:`taxamap.writers.stretch`; default percentile:90);
    ``relative`` always shows 0 to 1.
    ``self_contained``: embed Leaflet and the marker-cluster plugin from the installed
    ``taxamap[offline]`` packages (TaxamapError naming them when missing), drop the web basemap
    and draw Natural Earth land instead, so the one file renders with no network.

    Every vector layer is drawn on Leaflet's canvas renderer, so a continent-sized grid's range
    outline (thousands of rings) paints in well under a second.
    """
    import folium
    import shapely
    from folium.plugins import FastMarkerCluster

    from taxamap.errors import TaxamapError
    from taxamap.writers import assets

    ds = one_map(ds)
    bands = map_bands(ds)
    grid = grid_of(ds)
    credit = imagery_credit(ds)
    # Fail before any work when the offline assets are missing.
    libraries = assets.offline_libraries() if self_contained else None
    points, dropped = (_occurrence_points(occurrences) if occurrences is not None
                       else (None, 0))
    n_records = None if points is None else len(points)
    if points is not None:
        points = drawn_sample(points)
    if range_geometry is not None and not isinstance(range_geometry, shapely.Geometry):
        raise TaxamapError("range_geometry must be a shapely geometry in EPSG:4326 (lon, lat)")
    east = grid.west + grid.width * grid.resolution

    # Canvas, not SVG: one <canvas> per pane redraws thousands of rings (a fragmented range at
    # 0.05 deg, the land, a detailed region outline) in milliseconds, where Chromium took 5-20 s
    # to paint as many SVG paths (benchmarks/html_paint.py). The cluster plugin's points are
    # L.circleMarker vectors, so they go on the canvas too.
    m = folium.Map(tiles=None, control_scale=True, prefer_canvas=True)
    # Without a tile layer the map has no zoom limit, which the cluster plugin refuses.
    m.options["max_zoom"] = MAX_ZOOM
    if self_contained:
        # Only Leaflet itself (plus the cluster plugin's own files) is used; folium's jQuery,
        # Bootstrap and icon fonts serve features this map does not draw.
        m.default_js = [js for js in m.default_js if js[0] == "leaflet"]
        m.default_css = [css for css in m.default_css if css[0] == "leaflet_css"]
        m.get_root().header.add_child(folium.Element(
            f"<style>.folium-map.leaflet-container {{ background: {SEA_COLOR}; }}</style>"))
    else:
        folium.TileLayer("OpenStreetMap", name="basemap (OpenStreetMap)").add_to(m)
    for pane, z in (_LAND_PANE, _SCORE_PANE):
        folium.map.CustomPane(pane, z_index=z, pointer_events=False).add_to(m)

    if self_contained:
        view = _view_bounds(grid)
        land = land_context(view, tolerance=max(east - grid.west, 1.0) / 1500.0)
        if land is not None:
            folium.GeoJson(
                _feature_collection(land), name=LAND_NAME, pane=_LAND_PANE[0],
                interactive=False, attribution="Land: Natural Earth",
                style_function=lambda _f: {"color": LAND_LINE, "weight": 0.8,
                                           "fillColor": LAND_FILL, "fillOpacity": 1.0},
            ).add_to(m)

    stretches = []
    bounds = None
    trust = []
    for i, (name, raster) in enumerate(bands):
        cmap, shown = band_display(name, raster, stretch)
        if band_meaning(name):
            trust.append((name, cmap, shown))
        else:
            stretches.append((name, shown))
        rgba, bounds = overlay_rgba(raster, grid, shown, cmap=cmap)
        options = {"attribution": f"Imagery: {_esc(credit[0])}"} if credit else {}
        folium.raster_layers.ImageOverlay(
            image=_data_uri(rgba),
            bounds=bounds,
            name=name,
            opacity=OVERLAY_OPACITY,
            pixelated=True,
            show=(i == 0),
            pane=_SCORE_PANE[0],
            **options,
        ).add_to(m)

    region = outline if outline is not None else outline_of(ds)
    if region is not None and not region.is_empty:
        # Cells are the map's resolution; a finer outline only makes the page heavier.
        simple = shapely.simplify(region, grid.resolution / 4.0, preserve_topology=True)
        folium.GeoJson(
            _feature_collection(simple),
            name=OUTLINE_NAME,
            # Outlines have no popups: out of the canvas's hit testing, mouse moves stay cheap
            # and clicks reach the occurrence points.
            interactive=False,
            style_function=lambda _f: {"color": "#222222", "weight": 1.5, "fill": False},
        ).add_to(m)

    range_state = None
    if range_geometry is not None:
        range_state = "empty" if range_geometry.is_empty else "drawn"
        if range_state == "drawn":
            # Not simplified: the outline runs along cell edges at every zoom.
            outline = _to_frame(range_geometry, grid.west, east)
            label = f"{RANGE_NAME} ({range_label})" if range_label else RANGE_NAME
            folium.GeoJson(
                _feature_collection(outline),
                name=_esc(label),
                interactive=False,
                style_function=lambda _f: {"color": RANGE_COLOR, "weight": 2.5, "fill": False},
            ).add_to(m)

    if expert_geometry is not None and not expert_geometry.is_empty:
        folium.GeoJson(
            _feature_collection(_to_frame(shapely.simplify(
                expert_geometry, grid.resolution / 4.0, preserve_topology=True), grid.west, east)),
            name=EXPERT_NAME,
            style_function=lambda _f: {"color": EXPERT_COLOR, "weight": 2.5, "fill": False,
                                       "dashArray": "6 4"},
        ).add_to(m)

    if points is not None and len(points):
        lon = points[:, 1] + 360.0 * np.round(((grid.west + east) / 2.0 - points[:, 1]) / 360.0)
        # Five decimals is about a metre: plenty for a marker, and it keeps the page small.
        data = np.round(np.column_stack([points[:, 0], lon]), 5).tolist()
        FastMarkerCluster(
            data,
            callback=_POINT_CALLBACK,
            name=(f"{OCCURRENCES_NAME} ({len(points)})" if len(points) == n_records else
                  f"{OCCURRENCES_NAME} ({len(points):,} of {n_records:,})"),
            icon_create_function=_CLUSTER_ICON,
            showCoverageOnHover=False,
            chunkedLoading=True,
        ).add_to(m)
        m.get_root().header.add_child(folium.Element(_CLUSTER_CSS))

    folium.LayerControl(collapsed=False).add_to(m)
    # The map opens on the grid directly: an animated zoom from folium's world view would draw
    # every layer twice (once at the world zoom, once at the grid's).
    fit = folium.map.FitBounds(bounds)
    fit.options["animate"] = False
    fit.add_to(m)

    root = m.get_root()
    root.header.add_child(folium.Element(f"<title>taxamap: {_esc(map_title(ds))}</title>"))
    # Read back before a later map would replace this file (taxamap.writers.recorded_query).
    root.header.add_child(folium.Element(
        f'<meta name="{HTML_QUERY_META}" content="{_esc(ds.attrs.get("query", "map"))}">'))
    root.html.add_child(folium.Element(_title_html(ds)))
    extras = _extras_legend(None if points is None else len(points), dropped, range_state,
                            range_label, n_records)
    extras += "".join(f"<div style='color:#a40000;margin-top:4px'>&#9888; {_esc(note)}</div>"
                      for note in notes)
    extras += _trust_legend(ds, trust)
    footer = _offline_footer(libraries) if libraries else ""
    root.html.add_child(folium.Element(_legend_html(ds, stretches, extras, footer, stretch)))
    if not self_contained:
        root.html.add_child(folium.Element(_needs_internet_html()))

    page = root.render()
    if self_contained:
        page = assets.inline_assets(page, libraries)
        left = assets.external_urls(page)
        if left:
            raise TaxamapError(f"--self-contained page still loads {left[0]}; this is a taxamap "
                               "bug, please report it (or write the map without --self-contained)")
    return write_bytes(path, page)
