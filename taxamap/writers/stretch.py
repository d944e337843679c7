"""``--stretch``: the display range of a map band in the PNG and HTML (never the GeoTIFF).

``percentile:P`` clips below the P-th percentile of the band's valid cells and runs the colours
up to its maximum (``percentile:90``, the default, is what TaxaBind's own prototype did and what
:func:`taxamap.writers.style.stretch_of` gives); ``value:LO,HI`` puts every map on one fixed
scale, so several maps compare by colour; ``none`` runs from the band's minimum to its maximum.
The ``relative`` band always shows 0 to 1: its values already mean the same on every map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option

#: The stretch when none is given (the writers' historical display).
DEFAULT_STRETCH = "percentile:90"

#: Bands whose display scale is fixed whatever the stretch: (lo, hi).
FIXED_SCALES = {"relative": (0.0, 1.0)}

STRETCH_FORMS = "percentile:P (0-100), value:LO,HI (two scores, LO < HI) or none"


@dataclass(frozen=True)
class StretchRule:
    """A parsed ``--stretch``: ``kind`` "percentile" (``percentile`` set), "value" (``lo``,
    ``hi``) or "none"; ``text`` as given."""

    kind: str
    percentile: float | None = None
    lo: float | None = None
    hi: float | None = None
    text: str = DEFAULT_STRETCH


@dataclass(frozen=True)
class DisplayRange:
    """What a band's colours span: ``vmin`` (lowest colour; below is clipped) to ``vmax``; how
    (``rule``) and over how many ``valid`` cells (0: nothing to show). Writers colour with
    ``vmin``/``vmax`` as they do with :class:`taxamap.writers.style.Stretch`."""

    vmin: float
    vmax: float
    rule: StretchRule
    valid: int
    fixed: bool = False

    def describe(self) -> str:
        """One line for legends: what the colours mean."""
        if self.valid == 0:
            return "no valid cells"
        span = f"colours run {self.vmin:.3f} to {self.vmax:.3f}"
        if self.fixed:
            return f"display: fixed scale; {span}"
        if self.rule.kind == "percentile":
            return (f"display: clipped below the {self.rule.percentile:g}th percentile of valid "
                    f"cells; {span}")
        if self.rule.kind == "value":
            return f"display: fixed scale (--stretch {self.rule.text}); values outside are " \
                   f"clipped; {span}"
        return f"display: the band's minimum to its maximum; {span}"


def parse_stretch(text: str | None) -> StretchRule:
    """Parse ``percentile:P``, ``value:LO,HI`` or ``none`` (None: the default); bad text is one
    :class:`TaxamapError` line showing the forms."""
    raw = DEFAULT_STRETCH if text is None else str(text).strip()
    kind, _, arg = raw.partition(":")
    kind = kind.strip().lower()
    if kind == "none" and not arg.strip():
        return StretchRule("none", text=raw)
    try:
        if kind == "percentile":
            p = float(arg)
            if not (math.isfinite(p) and 0.0 <= p < 100.0):
                raise ValueError
            return StretchRule("percentile", percentile=p, text=raw)
        if kind == "value":
            parts = [float(v) for v in arg.split(",")]
            if len(parts) != 2 or not all(math.isfinite(v) for v in parts) or \
                    not parts[0] < parts[1]:
                raise ValueError
            return StretchRule("value", lo=parts[0], hi=parts[1], text=raw)
    except ValueError:
        raise TaxamapError(f"{option('stretch', raw)} is not a stretch; use {STRETCH_FORMS}, "
                           f"e.g. {option('stretch', 'value:0,0.15')}") from None
    raise TaxamapError(f"unknown {option('stretch', raw)}; use {STRETCH_FORMS}")


def display_range(raster: np.ndarray, stretch: str | StretchRule | None = None,
                  band: str | None = None) -> DisplayRange:
    """The (vmin, vmax) ``stretch`` gives ``raster`` (any shape; NaN ignored). ``band``
    ``relative`` (see :data:`FIXED_SCALES`) keeps its fixed scale whatever the stretch."""
    from taxamap.writers.style import stretch_of

    rule = stretch if isinstance(stretch, StretchRule) else parse_stretch(stretch)
    values = np.asarray(raster, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if band in FIXED_SCALES:
        lo, hi = FIXED_SCALES[band]
        return DisplayRange(lo, hi, rule, int(finite.size), fixed=True)
    if finite.size == 0:
        return DisplayRange(0.0, 1.0, rule, 0)
    if rule.kind == "percentile":
        s = stretch_of(finite, rule.percentile)  # the writers' own stretch, bit for bit
        return DisplayRange(s.vmin, s.vmax, rule, s.valid)
    if rule.kind == "value":
        return DisplayRange(float(rule.lo), float(rule.hi), rule, int(finite.size))
    lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-6)
    return DisplayRange(lo, hi, rule, int(finite.size))


def band_display(name: str, raster: np.ndarray, stretch: str | StretchRule | None = None
                 ) -> tuple[str, "DisplayRange"]:
    """(colour map, display range) of band ``name``: a trust band (uncertainty, novelty,
    disagreement, mess...) in its own colours over most of its range, whatever the stretch
    (:func:`taxamap.writers.style.display_of`); every other band in the score colours with
    ``stretch`` (:func:`display_range`)."""
    from taxamap.dataset import band_meaning
    from taxamap.writers.style import COLORMAP, display_of

    if band_meaning(name):
        return display_of(name, raster)
    return COLORMAP, display_range(raster, stretch, band=name)


__all__ = ["DEFAULT_STRETCH", "band_display", "DisplayRange", "FIXED_SCALES", "StretchRule", "display_range",
           "parse_stretch"]
