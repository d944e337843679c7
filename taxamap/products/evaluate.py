"""How good is a map? Presence/background metrics per band of a taxamap GeoTIFF.

:func:`evaluate_map` extracts every band's value at the presence points and at background points
(given, or sampled uniformly over the map's valid cells) and reports, per band (the fused score
and each modality, named by the band descriptions):

* ROC-AUC and average precision, presence = 1 and background = 0 (scikit-learn's
  ``roc_auc_score`` and ``average_precision_score``: one ROC/PR point per distinct value);
* the threshold maximising the true skill statistic, TSS = sensitivity + specificity - 1, where
  cells with ``value >= threshold`` are predicted present, and that TSS;
* the continuous Boyce index (Hirzel et al. 2006, Ecological Modelling 199:142-152): a window of
  :data:`BOYCE_WINDOW` of the value range slides over the range in :data:`BOYCE_STEPS` steps; in
  each window the predicted/expected ratio F = (share of presences) / (share of background) is
  computed (windows without background are skipped), and the index is the Spearman rank
  correlation (SciPy's ``spearmanr``) between F and the window centre. Near +1: presences
  concentrate where the map is high; near 0: no better than random; negative: the map points
  the wrong way.

Values are read at the pixel that contains the point (:func:`taxamap.dataset.sample_points`).
Points outside the map, or on a NaN (nodata) pixel of a band, are counted and reported per band,
never silently dropped. Neither max-TSS nor the continuous Boyce index is in scikit-learn or
SciPy: both are built here on their curves and rank correlation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from taxamap.dataset import (
    band_name,
    band_values,
    cell_centres,
    cell_values,
    map_file,
    sample_points,
    score_variables,
    single_map,
)
from taxamap.errors import TaxamapError
from taxamap.io import DiskFull, atomic_write
from taxamap.surface import option

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

#: Default number of background cells sampled when no background is given (as Maxent does).
DEFAULT_N_BACKGROUND = 10_000
#: Boyce window width as a fraction of the value range, and the number of window positions.
BOYCE_WINDOW = 0.1
BOYCE_STEPS = 100


# --- background cells -------------------------------------------------------------------------

def sample_background(
    ds: "xr.Dataset", n: int = DEFAULT_N_BACKGROUND, seed: int = 0, band: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample up to ``n`` distinct cells valid in ``band`` (default the first, the fused score)
    of a (y, x) map uniformly.

    Returns (values (bands, M) of every band, latlon (M, 2) of the cell centres);
    M = min(n, valid cells).
    """
    name = band or score_variables(ds)[0]
    valid = np.flatnonzero(np.isfinite(band_values(ds, name)).ravel())
    if valid.size == 0:
        raise TaxamapError(f"map {map_file(ds)} has no valid cells to sample background from")
    rng = np.random.default_rng(seed)
    take = valid if n >= valid.size else np.sort(rng.choice(valid, size=int(n), replace=False))
    rows, cols = np.divmod(take, ds.sizes["x"])
    return cell_values(ds, rows, cols), cell_centres(ds, rows, cols)


# --- metrics ----------------------------------------------------------------------------------

def _as_scores(presence: np.ndarray, background: np.ndarray):
    pos = np.asarray(presence, dtype=np.float64).ravel()
    neg = np.asarray(background, dtype=np.float64).ravel()
    return pos, neg


def _labelled(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) as scikit-learn takes them: presence = 1, background = 0."""
    return np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg]


def roc_curve(presence: np.ndarray, background: np.ndarray):
    """(false positive rate, true positive rate, thresholds), one point per distinct value,
    starting at (0, 0) with an infinite threshold (scikit-learn's ``roc_curve``)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    pos, neg = _as_scores(presence, background)
    if pos.size == 0 or neg.size == 0:
        return np.array([0.0]), np.array([0.0]), np.array([np.inf])
    fpr, tpr, thresholds = sk_roc_curve(*_labelled(pos, neg), drop_intermediate=False)
    return fpr, tpr, thresholds


def roc_auc(presence: np.ndarray, background: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn; ties count one half); NaN without both sides."""
    from sklearn.metrics import roc_auc_score

    pos, neg = _as_scores(presence, background)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    return float(roc_auc_score(*_labelled(pos, neg)))


def average_precision(presence: np.ndarray, background: np.ndarray) -> float:
    """Average precision (scikit-learn): sum over distinct values of (recall gain) x (precision
    there); NaN without both sides."""
    from sklearn.metrics import average_precision_score

    pos, neg = _as_scores(presence, background)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    return float(average_precision_score(*_labelled(pos, neg)))


def max_tss(presence: np.ndarray, background: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, TSS, sensitivity, specificity) at the threshold that maximises TSS.

    Cells with ``value >= threshold`` are predicted present; sensitivity and 1 - specificity are
    the ROC curve's rates at each distinct value. Of equally good thresholds the highest is
    returned (the tightest range).
    """
    pos, neg = _as_scores(presence, background)
    if pos.size == 0 or neg.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    fpr, tpr, thresholds = roc_curve(pos, neg)
    # The curve's first point (infinite threshold, nothing predicted) is no threshold to give.
    sensitivity, specificity, thresholds = tpr[1:], 1.0 - fpr[1:], thresholds[1:]
    tss = sensitivity + specificity - 1.0
    best = int(np.argmax(tss))
    return (float(thresholds[best]), float(tss[best]), float(sensitivity[best]),
            float(specificity[best]))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (SciPy; average ranks for ties); NaN when either side is
    constant or has fewer than two values."""
    import warnings

    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy warns of constant input, and returns NaN
        return float(spearmanr(a, b).statistic)


def boyce_curve(
    presence: np.ndarray, background: np.ndarray, window: float = BOYCE_WINDOW,
    steps: int = BOYCE_STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """(window centres, predicted/expected ratios) of the continuous Boyce index.

    Windows span ``window`` x (value range) and start at ``steps`` evenly spaced positions from
    the lowest to the highest value (presences and background together); both ends are inclusive.
    Windows holding no background are left out (their ratio is undefined).
    """
    pos, neg = _as_scores(presence, background)
    if pos.size == 0 or neg.size == 0:
        return np.empty(0), np.empty(0)
    lo = min(pos.min(), neg.min())
    hi = max(pos.max(), neg.max())
    width = (hi - lo) * float(window)
    if width <= 0:
        return np.empty(0), np.empty(0)
    starts = np.linspace(lo, hi - width, int(steps))
    stops = starts + width
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)

    def share(sorted_values: np.ndarray) -> np.ndarray:
        inside = (np.searchsorted(sorted_values, stops, side="right")
                  - np.searchsorted(sorted_values, starts, side="left"))
        return inside / sorted_values.size

    predicted, expected = share(pos_sorted), share(neg_sorted)
    keep = expected > 0
    return (starts + width / 2.0)[keep], predicted[keep] / expected[keep]


def boyce_index(
    presence: np.ndarray, background: np.ndarray, window: float = BOYCE_WINDOW,
    steps: int = BOYCE_STEPS,
) -> float:
    """The continuous Boyce index: Spearman correlation of :func:`boyce_curve`'s ratios with
    the window centres, in [-1, 1]; NaN when it is undefined (fewer than two windows)."""
    centres, ratios = boyce_curve(presence, background, window, steps)
    return spearman(centres, ratios)


# --- results ----------------------------------------------------------------------------------

@dataclass(eq=False)
class BandEvaluation:
    """Metrics of one band. ``presence_nodata`` / ``background_nodata``: points on the map but on
    a NaN pixel of this band (left out of its metrics)."""

    name: str
    n_presence: int
    n_background: int
    presence_nodata: int
    background_nodata: int
    auc: float
    average_precision: float
    tss: float
    tss_threshold: float
    sensitivity: float
    specificity: float
    boyce: float
    presence_values: np.ndarray = field(repr=False)
    background_values: np.ndarray = field(repr=False)

    def roc_curve(self):
        """(fpr, tpr, thresholds) of this band."""
        return roc_curve(self.presence_values, self.background_values)

    def to_dict(self) -> dict[str, Any]:
        keys = ("name", "n_presence", "n_background", "presence_nodata", "background_nodata",
                "auc", "average_precision", "tss", "tss_threshold", "sensitivity",
                "specificity", "boyce")
        return {k: json_value(getattr(self, k)) for k in keys}


@dataclass(eq=False)
class EvaluationResult:
    """Per-band metrics of a map against presences and background.

    ``presence_given``: presence points passed in; ``presence_outside``: of those, off the map
    (no band could use them); ``background``: "given" or "sampled"; ``background_given``: the
    number of background points passed in or sampled; ``background_outside``: given background
    points off the map.
    """

    map_path: str
    bands: list[BandEvaluation]
    presence_given: int
    presence_outside: int
    background: str
    background_given: int
    background_outside: int
    seed: int | None
    boyce_window: float = BOYCE_WINDOW
    boyce_steps: int = BOYCE_STEPS

    def band(self, name: str) -> BandEvaluation:
        """The metrics of the band named ``name`` ("fused", "location", ...)."""
        for b in self.bands:
            if b.name == name:
                return b
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "map": self.map_path,
            "presence": {"given": self.presence_given, "outside_map": self.presence_outside},
            "background": {"source": self.background, "given": self.background_given,
                           "outside_map": self.background_outside, "seed": self.seed},
            "boyce": {"window_fraction": self.boyce_window, "steps": self.boyce_steps},
            "threshold_rule": "value >= threshold is predicted present",
            "bands": [b.to_dict() for b in self.bands],
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (NaN as null), atomically; returns the path."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return write_file(path, text.encode("utf-8"))

    def format_table(self) -> str:
        return format_table(self)


def json_value(value: Any) -> Any:
    """A number ready for JSON: floats rounded to 6 digits (NaN/inf as None), NumPy ints as int."""
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def points_on_map(map_or_path: Any, latlon: np.ndarray,
                  what: str = "presence points") -> tuple[np.ndarray, np.ndarray]:
    """:func:`taxamap.dataset.sample_points` of ``latlon`` ((N, 2) lat/lon) on a (y, x) map (a
    Dataset or a GeoTIFF path), refusing in one line an empty set, or one of which no point falls
    on the map (often latitude and longitude swapped) or on any of its scored cells."""
    ds = single_map(map_or_path)
    if latlon.shape[0] == 0:
        raise TaxamapError(f"there are no {what}; check the occurrence file")
    values, inside = sample_points(ds, latlon)
    name = map_file(ds).name
    if not inside.any():
        raise TaxamapError(f"none of the {len(latlon)} {what} falls on the map "
                           f"{name}; check that the occurrences are in the map's "
                           "region (and latitude/longitude are not swapped)")
    if not np.isfinite(values).any():
        raise TaxamapError(f"none of the {len(latlon)} {what} falls on a scored cell of the map "
                           f"{name} ({int(inside.sum())} lie within its bounds, on "
                           "cells without a score: water, or outside the region); check that "
                           "the occurrences are in the map's region")
    return values, inside


def evaluate_map(
    map_or_path: Any,
    presences: np.ndarray,
    background: np.ndarray | None = None,
    n_background: int = DEFAULT_N_BACKGROUND,
    seed: int = 0,
    bands: Sequence[int | str] | None = None,
) -> EvaluationResult:
    """Evaluate every band (or ``bands``) of a (y, x) map: a score Dataset or a GeoTIFF path.

    ``presences``, ``background``: (N, 2) (lat, lon) degrees. Without ``background``, up to
    ``n_background`` distinct cells are drawn uniformly (with ``seed``) from the cells valid in
    band 1, and their centres are used. See the module docstring for the metrics.
    """
    if int(n_background) < 1:
        raise TaxamapError(f"{option('n-background')} must be at least 1, not {n_background}")
    ds = single_map(map_or_path)
    presences = _latlon(presences, "presences")
    pres_values, pres_inside = points_on_map(ds, presences, "presence points")
    if background is None:
        back_values, _ = sample_background(ds, n_background, seed)
        back_inside = np.ones(back_values.shape[1], dtype=bool)
        source, used_seed = "sampled", seed
    else:
        background = _latlon(background, "background")
        back_values, back_inside = sample_points(ds, background)
        source, used_seed = "given", None
    names = score_variables(ds)
    indices = (range(len(names)) if bands is None
               else [names.index(band_name(ds, b)) for b in bands])
    results = []
    for i in indices:
        p_all, b_all = pres_values[i], back_values[i]
        p_ok, b_ok = np.isfinite(p_all), np.isfinite(b_all)
        p, b = p_all[p_ok], b_all[b_ok]
        threshold, tss, sens, spec = max_tss(p, b)
        results.append(BandEvaluation(
            name=names[i], n_presence=int(p.size), n_background=int(b.size),
            presence_nodata=int((pres_inside & ~p_ok).sum()),
            background_nodata=int((back_inside & ~b_ok).sum()),
            auc=roc_auc(p, b), average_precision=average_precision(p, b), tss=tss,
            tss_threshold=threshold, sensitivity=sens, specificity=spec,
            boyce=boyce_index(p, b), presence_values=p, background_values=b,
        ))
    return EvaluationResult(
        map_path=str(map_file(ds)), bands=results, presence_given=int(len(presences)),
        presence_outside=int((~pres_inside).sum()), background=source,
        background_given=int(back_values.shape[1]),
        background_outside=int((~back_inside).sum()), seed=used_seed,
    )


def _latlon(points: Any, what: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise TaxamapError(f"{what} must be an (N, 2) array of (lat, lon) degrees")
    return arr


# --- output -----------------------------------------------------------------------------------

def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_table(result: EvaluationResult) -> str:
    """A plain-text table of the metrics (one row per band) with the point counts above it."""
    lines = [f"map: {result.map_path}"]
    lines.append(f"presences: {result.presence_given} given, {result.presence_outside} outside "
                 "the map")
    if result.background == "sampled":
        lines.append(f"background: {result.background_given} cells sampled uniformly from the "
                     f"map's valid cells (seed {result.seed})")
    else:
        lines.append(f"background: {result.background_given} given, "
                     f"{result.background_outside} outside the map")
    header = ("band", "presences", "background", "nodata p/b", "AUC", "AP", "max TSS",
              "threshold", "Boyce")
    rows = [header]
    for b in result.bands:
        rows.append((b.name, str(b.n_presence), str(b.n_background),
                     f"{b.presence_nodata}/{b.background_nodata}", _fmt(b.auc),
                     _fmt(b.average_precision), _fmt(b.tss), _fmt(b.tss_threshold, 4),
                     _fmt(b.boyce)))
    lines.extend(text_table(rows))
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table: ``rows[0]`` is the header (underlined with dashes), the
    first column left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def plot_roc(result: EvaluationResult, path: str | os.PathLike) -> Path:
    """Write a PNG with one ROC curve per band (AUC in the legend), atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.0), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="random (AUC 0.5)")
    for b in result.bands:
        fpr, tpr, _ = b.roc_curve()
        if fpr.size < 2:
            continue
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{b.name} (AUC {_fmt(b.auc)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC: {Path(result.map_path).name}", fontsize=10)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = _png_bytes(fig)
    return write_file(path, buffer)


def _png_bytes(fig) -> bytes:
    import io

    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`taxamap.io.atomic_write`), creating its
    folder; a path that cannot be written is one TaxamapError line."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, data, hint="free some space or choose another path")
    except DiskFull:
        raise
    except OSError as exc:
        raise TaxamapError(f"cannot write {path}: {exc.strerror or exc}; choose another path") \
            from None


def evaluate_files(
    map_path: str | os.PathLike,
    occurrences: str | os.PathLike,
    *,
    background: str | os.PathLike | None = None,
    presence_column: str | None = None,
    n_background: int = DEFAULT_N_BACKGROUND,
    seed: int = 0,
    json_path: str | os.PathLike | None = None,
    roc_path: str | os.PathLike | None = None,
) -> EvaluationResult:
    """``taxamap evaluate``: read the point files, evaluate every band, write the optional JSON
    and ROC figure. ``presence_column`` reads presences and background from one labelled file."""
    from taxamap.products.occurrences import read_labelled_points, read_points

    if presence_column:
        presences, given_background = read_labelled_points(occurrences, presence_column)
        if background is None:
            background_points = given_background
        else:
            background_points = read_points(background)
    else:
        presences = read_points(occurrences)
        background_points = read_points(background) if background else None
    result = evaluate_map(map_path, presences, background_points, n_background=n_background,
                          seed=seed)
    if json_path:
        result.to_json(json_path)
    if roc_path:
        plot_roc(result, roc_path)
    return result
