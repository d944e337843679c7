"""Shared pieces of the writers: units, the display stretch, colouring, credits, atomic writes.

The GeoTIFF holds raw cosines. Everything here that changes values (the stretch, the colour map)
is for the PNG and HTML only, and every display that uses it states it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from taxamap import io
from taxamap.dataset import UNITS  # noqa: F401  (what a band value is: tags and legends)
from taxamap.errors import TaxamapError

#: TaxaBind's own map prototype clipped the raw cosines below their 90th percentile and drew them
#: with matplotlib's "Greens" colour map; the PNG and HTML do the same.
STRETCH_PERCENTILE = 90.0
COLORMAP = "Greens"

#: Colour of cells with no value (outside the region or mask) in the PNG.
NODATA_COLOR = "#dfe3e8"

#: Web Mercator's latitude limit: Leaflet cannot show anything beyond it.
MERCATOR_MAX_LAT = 85.0511287798066

#: Licences of imagery sources taxamap knows, keyed by a lower-case fragment of their attribution.
#: EOX publishes Sentinel-2 cloudless 2018 and later under CC BY-NC-SA 4.0 (2016 was CC BY 4.0).
KNOWN_IMAGERY_LICENSES = {
    "s2cloudless 2016": "CC BY 4.0",
    "sentinel-2 cloudless 2016": "CC BY 4.0",
    "s2cloudless": "CC BY-NC-SA 4.0",
    "sentinel-2 cloudless": "CC BY-NC-SA 4.0",
}


@dataclass(frozen=True)
class Stretch:
    """A display stretch of one raster: values are clipped to [vmin, vmax] before colouring.

    ``vmin`` is the ``percentile`` of the valid cells and ``vmax`` their maximum; ``valid`` is the
    number of finite cells (0 means there is nothing to show).
    """

    vmin: float
    vmax: float
    percentile: float
    valid: int
    #: How a stretch that is not a percentile clip was made (the trust bands'), said instead.
    text: str = ""

    def describe(self) -> str:
        """One line saying what the colours mean, for legends and footers."""
        if self.valid == 0:
            return "no valid cells"
        if self.text:
            return f"display: {self.text}; colours run {self.vmin:.3g} to {self.vmax:.3g}"
        return (
            f"display: clipped below the {self.percentile:g}th percentile of valid cells; "
            f"colours run {self.vmin:.3f} to {self.vmax:.3f}"
        )


def stretch_of(raster: np.ndarray, percentile: float = STRETCH_PERCENTILE) -> Stretch:
    """The display stretch of ``raster``: its ``percentile`` of finite values up to its maximum."""
    values = np.asarray(raster, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Stretch(0.0, 1.0, percentile, 0)
    vmin = float(np.percentile(values, percentile))
    vmax = float(values.max())
    if not vmax > vmin:
        # A constant layer (or a percentile equal to the maximum) still needs a non-empty range.
        vmax = vmin + max(abs(vmin) * 1e-6, 1e-6)
    return Stretch(vmin, vmax, percentile, int(values.size))


#: Colour maps of the trust bands (:data:`taxamap.dataset.TRUST_BANDS`), apart from the
#: green scores so a layer is never mistaken for suitability. ``mess`` diverges around 0 (red:
#: outside the reference climate).
TRUST_COLORMAPS = {"uncertainty": "Oranges", "novelty": "Purples", "disagreement": "RdPu",
                   "mess": "RdBu", "mess_variable": "tab20"}
#: Trust bands are drawn over most of their range (these percentiles), not the top tenth:
#: where they are low matters as much as where they are high.
TRUST_PERCENTILES = (2.0, 98.0)


def display_of(name: str, raster: np.ndarray,
               percentile: float = STRETCH_PERCENTILE) -> tuple[str, Stretch]:
    """(colour map, stretch) that draw band ``name``: the scores in :data:`COLORMAP` clipped
    below ``percentile``; a trust band in its own colour map over most of its range (``mess``
    symmetric around 0, ``mess_variable`` one colour per variable index)."""
    cmap = TRUST_COLORMAPS.get(name)
    if cmap is None:
        return COLORMAP, stretch_of(raster, percentile)
    values = np.asarray(raster, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return cmap, Stretch(0.0, 1.0, 0.0, 0)
    lo_p, hi_p = TRUST_PERCENTILES
    if name == "mess_variable":
        return cmap, Stretch(0.0, 19.0, 0.0, int(values.size),
                             "one colour per WorldClim variable (index 0-19)")
    lo, hi = (float(v) for v in np.percentile(values, [lo_p, hi_p]))
    if name == "mess":
        edge = max(abs(lo), abs(hi), 1e-6)
        return cmap, Stretch(-edge, edge, 0.0, int(values.size),
                             f"symmetric around 0 to the larger of the {lo_p:g}th and "
                             f"{hi_p:g}th percentiles' magnitudes (red: below 0)")
    if not hi > lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-6)
    return cmap, Stretch(lo, hi, 0.0, int(values.size),
                         f"{lo_p:g}th to {hi_p:g}th percentile of valid cells")


@functools.lru_cache(maxsize=16)
def _packed_lut(cmap: str) -> np.ndarray:
    """The colour map as 257 RGBA pixels packed in uint32: 256 colours, then the first colour
    fully transparent (for NaN)."""
    import matplotlib

    # A 256-entry lookup table is what matplotlib's colour maps use internally; indexing it
    # directly is several times faster on world-sized rasters.
    lut = matplotlib.colormaps[cmap].resampled(256)(np.linspace(0.0, 1.0, 256), bytes=True)
    lut = np.concatenate([lut, lut[:1]]).astype(np.uint8)
    lut[256, 3] = 0
    packed = np.ascontiguousarray(lut).view(np.uint32).reshape(257)
    packed.setflags(write=False)
    return packed


def colorize(raster: np.ndarray, stretch: Stretch, cmap: str = COLORMAP) -> np.ndarray:
    """(H, W) floats -> (H, W, 4) uint8 RGBA with the stretch and colour map; NaN transparent."""
    raster = np.asarray(raster, dtype=np.float32)
    scaled = (raster - np.float32(stretch.vmin)) * np.float32(
        255.0 / (stretch.vmax - stretch.vmin))
    np.clip(scaled, 0, 255, out=scaled)
    np.rint(scaled, out=scaled)
    # One 4-byte pixel per cell from the packed table (a gather of 4-byte rows is ~3x slower).
    index = np.where(np.isfinite(raster), scaled, np.float32(256)).astype(np.intp, order="C")
    return _packed_lut(cmap)[index].view(np.uint8).reshape(*raster.shape, 4)


def gradient_css(cmap: str = COLORMAP, stops: int = 11) -> str:
    """A CSS ``linear-gradient`` (left = low, right = high) of the colour map."""
    import matplotlib
    from matplotlib.colors import to_hex

    colormap = matplotlib.colormaps[cmap]
    colors = [to_hex(colormap(i / (stops - 1))) for i in range(stops)]
    return "linear-gradient(to right, " + ", ".join(colors) + ")"


def imagery_credit(ds) -> tuple[str, str] | None:
    """(attribution, licence) of the imagery behind a map (a score Dataset), or None when no
    imagery was used.

    The licence is the Dataset's ``imagery_license`` attr when it has one, else the one taxamap
    knows for that source, else it says it is not stated.
    """
    attribution = ds.attrs.get("imagery_attribution")
    if not attribution:
        return None
    license_ = ds.attrs.get("imagery_license")
    if not license_:
        low = str(attribution).lower()
        license_ = next((v for k, v in KNOWN_IMAGERY_LICENSES.items() if k in low), None)
    return str(attribution), str(license_ or "not stated; see the imagery provider's terms")


def mercator_y(lat: np.ndarray | float) -> np.ndarray:
    """Web Mercator northing of ``lat`` degrees, in radians (unit sphere)."""
    lat = np.radians(np.clip(lat, -MERCATOR_MAX_LAT, MERCATOR_MAX_LAT))
    return np.arcsinh(np.tan(lat))


def mercator_rows(north: float, resolution: float, height: int,
                  max_rows: int = 4096) -> tuple[np.ndarray, float, float]:
    """Rows of a lat/lon raster to show at evenly spaced Web Mercator northings.

    Returns (source row per output row, south, north) where south/north are the latitudes the
    output image spans (the raster's, clipped to Web Mercator's limit). Picking rows this way
    (nearest neighbour) keeps raw cell values and NaN edges intact, unlike interpolating colours.
    The output has enough rows that its finest source row still gets at least one output row.
    """
    south = north - height * resolution
    top = min(north, MERCATOR_MAX_LAT)
    bottom = max(south, -MERCATOR_MAX_LAT)
    if not top > bottom:
        raise TaxamapError("the grid lies entirely beyond Web Mercator's +/-85 degree limit; "
                           "the HTML map cannot show it (use the GeoTIFF or PNG)")
    y_top, y_bottom = float(mercator_y(top)), float(mercator_y(bottom))
    # The thinnest row in Mercator is the one nearest the equator.
    nearest_equator = 0.0 if bottom <= 0.0 <= top else min(abs(top), abs(bottom))
    thinnest = resolution * math.pi / 180.0 / math.cos(math.radians(nearest_equator))
    n_out = int(min(max_rows, max(1, math.ceil((y_top - y_bottom) / thinnest))))
    n_out = max(n_out, min(height, max_rows))
    ys = y_top - (np.arange(n_out) + 0.5) * (y_top - y_bottom) / n_out
    lats = np.degrees(np.arctan(np.sinh(ys)))
    rows = np.floor((north - lats) / resolution).astype(np.int64)
    return np.clip(rows, 0, height - 1), bottom, top


def output_path(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be written (its folder exists and is a folder) and return it."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise TaxamapError(f"cannot write {path}: folder {folder} does not exist; create it or "
                           "choose another --out")
    if not folder.is_dir():
        raise TaxamapError(f"cannot write {path}: {folder} is not a folder; choose another --out")
    if path.is_dir():
        raise TaxamapError(f"cannot write {path}: a folder has that name; choose another --out")
    return path


#: What to do when --out is full: said by every writer's disk-full line.
OUT_FULL_HINT = "free some space or choose another --out"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it
    (:func:`taxamap.io.atomic_path`, after :func:`output_path`'s checks).

    Readers of ``path`` see either the old file or the complete new one, never a partial write.
    A full disk is one :class:`~taxamap.io.DiskFull` line naming the folder and ``need`` (bytes).
    """
    path = output_path(path)
    try:
        with io.atomic_path(path, need=need, hint=OUT_FULL_HINT) as tmp:
            yield tmp
    except io.DiskFull:
        raise
    except OSError as exc:
        raise TaxamapError(f"cannot write {path}: {exc.strerror or exc}; choose another --out") \
            from exc


def write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a whole output file atomically (see :func:`atomic_path`); returns its path."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, need=len(blob)) as tmp:
        tmp.write_bytes(blob)
    return Path(path)
