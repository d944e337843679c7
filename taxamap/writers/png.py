"""A static PNG of the score map (matplotlib, Agg): the fused map, small per-modality panels when
there are several, a title, colour bars with units and the display stretch, the region outline and
coastlines, and the imagery credit.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from pathlib import Path

import numpy as np

from taxamap.version import __version__
from taxamap.crs import clip_wrapped
from taxamap.dataset import (band_meaning, band_unit, grid_of, is_product, map_bands, map_title,
                             modality_bands, one_map, outline_of, signal_note)
from taxamap.options import DEFAULT_FUSION
from taxamap.writers import PNG_QUERY_KEY
from taxamap.writers.style import (
    COLORMAP,
    NODATA_COLOR,
    UNITS,
    imagery_credit,
    write_bytes,
)
from taxamap.writers.stretch import band_display, display_range, parse_stretch

DPI = 150
#: Small band panels per row under the main map.
PANELS_PER_ROW = 4


def coastlines(bounds: tuple[float, float, float, float]):
    """Coastlines (boundaries of ``taxamap.grids.land()``) clipped to ``bounds``, or None when no
    land data is available. ``west`` may be below -180 and ``east`` above 180: copies of the
    coastline shifted by 360 degrees cover those parts.
    """
    try:
        from taxamap.grids import land  # Natural Earth land shipped with the region presets
    except ImportError:
        return None
    try:
        geom = land()
    except Exception:  # noqa: BLE001 - coastlines are decoration; never fail a map over them
        return None
    if geom is None or geom.is_empty:
        return None
    import shapely

    # Clip lines, not polygons: a clipped polygon's boundary would draw the clip frame too.
    parts = clip_wrapped(shapely.boundary(geom), bounds, "LineString")
    return shapely.MultiLineString(parts) if parts else None


def _outline_segments(geom) -> list[np.ndarray]:
    """The boundary of a (multi)polygon or line geometry as a list of (K, 2) coordinate arrays."""
    import shapely

    if geom is None or geom.is_empty:
        return []
    out = []
    for part in shapely.get_parts(geom):
        if part.geom_type == "Polygon":
            out.extend(_outline_segments(shapely.boundary(part)))
        elif part.geom_type in ("LineString", "LinearRing") and not part.is_empty:
            out.append(shapely.get_coordinates(part))
        elif part.geom_type.startswith("Multi") or part.geom_type == "GeometryCollection":
            out.extend(_outline_segments(part))
    return out


def _short(rule) -> str:
    """A colour bar's few words for the stretch ``rule``."""
    if rule.kind == "percentile":
        return f"p{rule.percentile:g}–max"
    return f"{rule.lo:g}–{rule.hi:g}" if rule.kind == "value" else "min–max"


def _stretch_words(rule) -> str:
    """The stretch ``rule`` in a sentence for the footer."""
    if rule.kind == "percentile":
        return (f"each map is clipped below the {rule.percentile:g}th percentile of its valid "
                "cells (lightest green) up to its maximum")
    if rule.kind == "value":
        return (f"one fixed scale, {rule.lo:g} (lightest green) to {rule.hi:g} (darkest), for "
                "every map drawn with it")
    return "each map runs from its minimum (lightest green) to its maximum"


def _wrap_lon(x: float, _pos=None) -> str:
    lon = (x + 180.0) % 360.0 - 180.0
    return f"{180.0 if lon == -180.0 else lon:g}°"


def _draw_map(ax, raster, grid, stretch, region, land, cmap):
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    from matplotlib.ticker import FuncFormatter

    west, south, east, north = grid.bounds
    ax.set_facecolor(NODATA_COLOR)
    image = ax.imshow(
        np.ma.masked_invalid(raster),
        extent=(west, east, south, north),
        origin="upper",
        interpolation="nearest",
        cmap=cmap,
        norm=Normalize(stretch.vmin, stretch.vmax, clip=False),
    )
    if land is not None:
        ax.add_collection(LineCollection(_outline_segments(land), colors="#6b6b6b",
                                         linewidths=0.4, zorder=3))
    if region is not None:
        ax.add_collection(LineCollection(_outline_segments(region), colors="#1a1a1a",
                                         linewidths=0.8, zorder=4))
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    mid = math.radians(min(max((north + south) / 2.0, -80.0), 80.0))
    # Equirectangular with the scale true at the middle latitude: shapes look right locally.
    ax.set_aspect(1.0 / math.cos(mid))
    ax.xaxis.set_major_formatter(FuncFormatter(_wrap_lon))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p=None: f"{y:g}°"))
    ax.tick_params(labelsize=7)
    return image


def write_png(ds, path: str | os.PathLike, *, outline=None, stretch: str | None = None) -> Path:
    """Render a one-query (y, x) score Dataset to a PNG at ``path`` (atomically) and return the
    path; ``outline`` is the region boundary to draw (default: the Dataset's region).

    The fused map is drawn large, with one small panel per other band when there are several.
    Each map uses the display ``stretch`` (:mod:`taxamap.writers.stretch`; default: clip below
    the 90th percentile of its valid cells, "Greens"; ``relative`` always 0-1), stated in its
    colour-bar label and the footer; a map without signal against its panel says so.
    """
    import matplotlib
    from matplotlib.figure import Figure

    ds = one_map(ds)
    bands = map_bands(ds)
    grid = grid_of(ds)
    layers = modality_bands(ds)
    query, prompt = str(ds.attrs.get("query", "map")), ds.attrs.get("prompt") or None
    west, south, east, north = grid.bounds
    cmap = matplotlib.colormaps[COLORMAP].with_extremes(bad=NODATA_COLOR)
    region = outline if outline is not None else outline_of(ds)
    land = coastlines(grid.bounds)

    mid = math.radians(min(max((north + south) / 2.0, -80.0), 80.0))
    ratio = (north - south) / max(east - west, 1e-9) / math.cos(mid)
    panels = bands[1:] if len(bands) > 2 else []
    # Panels in rows of at most PANELS_PER_ROW: a fitted multimodal map has up to ten bands.
    per_row = min(len(panels), PANELS_PER_ROW)
    n_rows = -(-len(panels) // PANELS_PER_ROW)
    map_w = 8.0
    map_h = min(max(map_w * ratio, 2.5), 9.0)
    panel_h = min(max(map_w / max(per_row, 1) * ratio, 1.6), 4.0) if panels else 0.0
    fig_h = map_h + panel_h * n_rows + 2.0
    fig = Figure(figsize=(map_w + 2.0, fig_h), dpi=DPI, layout="constrained")

    if panels:
        gs = fig.add_gridspec(1 + n_rows, per_row, height_ratios=[map_h] + [panel_h] * n_rows)
        main_ax = fig.add_subplot(gs[0, :])
        panel_axes = [fig.add_subplot(gs[1 + i // per_row, i % per_row])
                      for i in range(len(panels))]
    else:
        main_ax = fig.add_subplot(1, 1, 1)
        panel_axes = []

    fused_name, fused = bands[0]
    rule = parse_stretch(stretch)
    shown = display_range(fused, rule, band=fused_name)
    image = _draw_map(main_ax, fused, grid, shown, region, land, cmap)
    bar = fig.colorbar(image, ax=main_ax, extend="min", shrink=0.9)
    bar.set_label(f"{fused_name} score: {UNITS}\n{shown.describe()}", fontsize=8,
                  parse_math=False)
    bar.ax.tick_params(labelsize=7)
    fusion = ds.attrs.get("fusion", DEFAULT_FUSION)
    main_ax.set_title(f"{fused_name}" + (f" ({fusion} of {', '.join(layers)})"
                                         if len(layers) > 1 else f" = {next(iter(layers), '')}"),
                      fontsize=9, parse_math=False)

    trust = []
    for ax, (name, raster) in zip(panel_axes, panels):
        name_cmap, s = band_display(name, raster, rule)
        meaning = band_meaning(name)
        panel_cmap = (cmap if not meaning else
                      matplotlib.colormaps[name_cmap].with_extremes(bad=NODATA_COLOR))
        im = _draw_map(ax, raster, grid, s, region, land, panel_cmap)
        ax.set_title(name, fontsize=8, parse_math=False)
        fixed = meaning or getattr(s, "fixed", False)
        b = fig.colorbar(im, ax=ax, extend="neither" if fixed else "min", shrink=0.8)
        b.ax.tick_params(labelsize=6)
        b.set_label("p2–p98" if meaning and name not in ("mess", "mess_variable") else
                    "index" if name == "mess_variable" else "0-centred" if meaning else
                    band_unit(name) if is_product(name) else _short(rule), fontsize=6,
                    parse_math=False)
        if meaning:
            trust.append(f"{name} ({band_unit(name)}): {meaning}")

    lines = [map_title(ds)]
    if prompt and prompt != query:
        lines.append(textwrap.shorten(f"prompt: {prompt}", 140))
    if signal_note(ds):
        lines.append("no signal: the query never stands out from the reference panel here")
    fig.suptitle("\n".join(lines), fontsize=11, parse_math=False)

    footer = [
        f"Scores are {UNITS} (the GeoTIFF holds them unchanged). Display stretch: "
        f"{_stretch_words(rule)}; grey = no data."
        + (" 'relative' runs 0 to 1 on every map: the share of the reference panel's species "
           "scoring lower." if any(name == "relative" for name, _ in bands) else ""),
    ]
    note = signal_note(ds)
    if note:
        footer.insert(0, note)
    if trust:
        footer.append("Trust layers (their own colours, 2nd-98th percentile): " + "; ".join(trust)
                      + (f"; mess_variable indexes {ds.attrs['mess_variables']}"
                         if ds.attrs.get("mess_variables") else ""))
    credit = imagery_credit(ds)
    if credit:
        footer.append(f"Imagery: {credit[0]} — licence: {credit[1]}")
    footer.append(f"taxamap {__version__}")
    fig.supxlabel("\n".join(textwrap.fill(f, 150) for f in footer), fontsize=6.5,
                  parse_math=False)

    buffer = io.BytesIO()  # rendered first, so a full disk knows the size it needed
    fig.savefig(buffer, format="png", dpi=DPI, metadata={PNG_QUERY_KEY: query})
    return write_bytes(path, buffer.getvalue())
