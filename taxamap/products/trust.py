"""Where a map can be trusted: modality disagreement, climate extrapolation (MESS), embedding
novelty, and masks that drop the cells a model cannot vouch for.

* :func:`disagreement`: per cell, the spread of the per-modality scores (population standard
  deviation over the modalities that scored the cell); 0 when all modalities agree. It works on
  whatever scale it is given: raw cosines (as ``taxamap predict`` writes them) or the
  panel-relative standing (``relative``, 0-1) where that exists; the caller records which
  (:data:`DISAGREEMENT_SCALES`; the Dataset attr ``disagreement_scale``).
* :func:`mess`: the multivariate environmental similarity surface of Elith, Kearney & Phillips
  (2010, Methods Ecol. Evol. 1: 330-342, appendix S3) of each cell's climate against a
  reference set of cells, and the most dissimilar variable (``mess_variable``).
* :class:`Novelty`: per cell, how far its embedding is from the training samples of a fit
  (cosine distance to the nearest one), in units of the training samples' own typical spacing.
* :func:`parse_mask` / :func:`mask_cells`: ``"novelty>2"``-style conditions that drop cells
  from a range (:func:`taxamap.products.ranges.cut_range`).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from taxamap.errors import TaxamapError

#: Scales :func:`disagreement` is computed on, and what its unit then is.
DISAGREEMENT_SCALES = {
    "cosine": "standard deviation of the per-modality cosine similarities",
    "relative": "standard deviation of the per-modality panel-relative standings (0-1)",
}
#: Cells scored at a time by the nearest-neighbour search (a block of this many rows against the
#: reference set is the largest temporary: 2048 x 10,000 float32 = 82 MB).
NOVELTY_BLOCK = 2048
#: Cosine distances below this are float32 rounding of identical embeddings: 0.
ROUNDING = 1e-6


# --- modality disagreement ----------------------------------------------------------------------

def disagreement(scores: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> np.ndarray:
    """Per cell, the population standard deviation of the per-modality scores (float32, the
    shape of one score array).

    ``scores``: two or more arrays of one shape (a mapping modality -> array, or a sequence), on
    one scale (raw cosines, or the panel-relative standing). NaN entries (a modality that could
    not score a cell) are left out; cells scored by fewer than two modalities are NaN. 0 means
    every modality gives the cell the same score."""
    arrays = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
    if len(arrays) < 2:
        raise TaxamapError(f"disagreement needs the scores of at least 2 modalities, not "
                           f"{len(arrays)}; map with --modalities location,environment (or more)")
    stack = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    finite = np.isfinite(stack)
    count = finite.sum(axis=0)
    values = np.where(finite, stack, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = values.sum(axis=0) / count
        var = np.where(finite, (stack - mean) ** 2, 0.0).sum(axis=0) / count
    out = np.sqrt(np.maximum(var, 0.0)).astype(np.float32)
    out[count < 2] = np.nan
    return out


# --- MESS (Elith et al. 2010) -------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class MessResult:
    """``mess`` (N,) float32, in percent: negative where some variable lies outside the
    reference range, NaN where a cell has no climate value; ``variable`` (N,) int16: index of the
    most dissimilar variable (the one giving the minimum) into ``names``, -1 where ``mess`` is
    NaN."""

    mess: np.ndarray
    variable: np.ndarray
    names: tuple[str, ...]

    def tags(self) -> dict[str, str]:
        """Band tags for ``mess`` and ``mess_variable``."""
        return {"MESS_UNITS": "percent (Elith et al. 2010): <0 outside the reference range of "
                              "at least one variable, 100 at the reference median of all",
                "MESS_VARIABLES": ",".join(self.names)}


def mess(values: np.ndarray, reference: np.ndarray,
         names: Sequence[str] | None = None) -> MessResult:
    """The multivariate environmental similarity surface of ``values`` (N, V) against
    ``reference`` (M, V): Elith, Kearney & Phillips (2010), appendix S3.

    For each variable i with reference values r_i1..r_iM (min_i, max_i) and a cell's value p,
    f_i = 100 x (share of reference values strictly smaller than p), and the similarity is
    (p - min_i) / (max_i - min_i) x 100 when f_i = 0, 2 f_i when 0 < f_i <= 50,
    2 (100 - f_i) when 50 <= f_i < 100, and (max_i - p) / (max_i - min_i) x 100 when f_i = 100.
    MESS is the minimum over the variables; the argmin is the most dissimilar variable (MoD).
    So a cell at the reference median of every variable scores 100, a cell at a reference
    extreme about 0 and a cell outside the reference range is negative, by how far outside in
    percent of the reference range.

    NaN values (a variable missing at a cell, or in the reference) are left out of that
    variable; a variable constant over the reference scores 0 at that value and -100 elsewhere
    (it has no range to measure the distance in). Rank-based and per variable, so any
    increasing affine scaling of a variable (e.g. the z-scores the environment encoder reads)
    gives the same surface."""
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if values.ndim != 2 or reference.ndim != 2 or values.shape[1] != reference.shape[1]:
        raise TaxamapError(f"mess needs (N, V) values and (M, V) reference values, not "
                           f"{values.shape} and {reference.shape}")
    n_var = values.shape[1]
    names = tuple(names) if names is not None else tuple(f"var{i + 1}" for i in range(n_var))
    if len(names) != n_var:
        raise TaxamapError(f"mess got {len(names)} variable names for {n_var} variables")
    sims = np.full(values.shape, np.nan)
    for i in range(n_var):
        ref = np.sort(reference[:, i][np.isfinite(reference[:, i])])
        if ref.size < 2:
            raise TaxamapError(f"the MESS reference has {ref.size} valid value(s) of "
                               f"{names[i]}; it needs at least 2 reference cells with climate")
        p = values[:, i]
        lo, hi = ref[0], ref[-1]
        f = 100.0 * np.searchsorted(ref, p, side="left") / ref.size
        s = np.where(f <= 50.0, 2.0 * f, 2.0 * (100.0 - f))
        if hi > lo:
            s = np.where(f == 0.0, (p - lo) / (hi - lo) * 100.0, s)
            s = np.where(f == 100.0, (hi - p) / (hi - lo) * 100.0, s)
        else:
            s = np.where(p == lo, 0.0, -100.0)
        sims[:, i] = np.where(np.isfinite(p), s, np.nan)
    scored = np.isfinite(sims).any(axis=1)
    filled = np.where(np.isfinite(sims), sims, np.inf)
    variable = np.where(scored, np.argmin(filled, axis=1), -1).astype(np.int16)
    out = np.where(scored, filled.min(axis=1), np.nan).astype(np.float32)
    return MessResult(out, variable, names)


def climate_mess(worldclim, cell_latlon: np.ndarray,
                 reference_latlon: np.ndarray | None = None) -> MessResult:
    """:func:`mess` of the cells' WorldClim variables (``worldclim``: a
    :class:`taxamap.sources.worldclim.WorldClimFeatures`; ``mess_variable`` indexes
    :data:`~taxamap.sources.worldclim.WORLDCLIM_FILES`, named ``elev``, ``bio_1``...) against
    the reference places: the occurrence and background points when given, else the cells
    themselves (the region). Cells with no climate at all (open water) are NaN / -1; a layer
    missing at a single place reads as that layer's global mean (the features' own filling)."""
    from taxamap.sources.worldclim import WORLDCLIM_FILES

    names = tuple(name.removeprefix("wc2.1_5m_").removesuffix(".tif") for name in WORLDCLIM_FILES)
    cell_latlon = np.asarray(cell_latlon, dtype=np.float64).reshape(-1, 2)
    values = worldclim.features(cell_latlon)
    if reference_latlon is None:
        reference = values
    else:
        reference = worldclim.features(np.asarray(reference_latlon, dtype=np.float64).reshape(-1, 2))
    return mess(values, reference, names)


# --- novelty in embedding space -----------------------------------------------------------------

class Novelty:
    """Distance of cells' embeddings to a fit's training samples, on a scale where 0 means "on a
    training sample" and 1 means "as far from the training data as a typical training sample is
    from its nearest other training sample".

    Rows are the cells' embeddings, one (unit-normalised) block per modality concatenated and
    scaled by 1/sqrt(number of modalities), so a dot product is the mean of the per-modality
    cosines (the zero-shot score's geometry). The raw distance is 1 - that mean cosine to the
    nearest training sample; :attr:`spacing` is the median, over the distinct training samples,
    of each one's distance to its nearest *other* sample (leave-one-out); novelty = raw
    distance / spacing. Values of a few mean the cell lies well outside the cloud of embeddings
    the model was fitted on: its prediction extrapolates."""

    def __init__(self, reference: np.ndarray, spacing: float | None = None) -> None:
        ref = np.asarray(reference, dtype=np.float32)
        if ref.ndim != 2 or ref.shape[0] < 2:
            raise TaxamapError("novelty needs at least 2 training samples")
        # Duplicate rows (several points in one cell) would give a leave-one-out distance of 0.
        self.reference = np.unique(ref, axis=0)
        if self.reference.shape[0] < 2:
            raise TaxamapError("novelty needs at least 2 distinct training samples")
        if spacing is None:
            spacing = _spacing(self.distance(self.reference, exclude_self=True))
        #: Median leave-one-out nearest-neighbour distance of the training samples.
        self.spacing = float(spacing)

    def distance(self, rows: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
        """Raw cosine distance (1 - cosine) of each row to its nearest reference sample; with
        ``exclude_self`` (``rows`` is the reference itself) to its nearest other one. All-zero
        rows (no embedding) are NaN."""
        rows = np.asarray(rows, dtype=np.float32)
        out = np.empty(rows.shape[0], dtype=np.float32)
        ref_t = np.ascontiguousarray(self.reference.T)
        for start in range(0, rows.shape[0], NOVELTY_BLOCK):
            stop = min(start + NOVELTY_BLOCK, rows.shape[0])
            sims = rows[start:stop] @ ref_t
            if exclude_self:
                sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
            out[start:stop] = 1.0 - sims.max(axis=1)
        # float32 rounding leaves ~1e-7 at a training sample itself: that is distance 0.
        out[out < ROUNDING] = 0.0
        out[~np.any(rows != 0, axis=1)] = np.nan
        return out

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Novelty (float32) of ``rows``: raw distance / :attr:`spacing`."""
        return (self.distance(rows) / np.float32(self.spacing)).astype(np.float32)


def _spacing(loo: np.ndarray) -> float:
    spacing = float(np.nanmedian(loo)) if np.isfinite(loo).any() else 0.0
    return spacing if spacing > 1e-9 else 1.0


def held_out_novelty(rows: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, float]:
    """Novelty of each training sample against the samples of the *other* folds, on the scale
    a fit without its fold would use (that fold set's own leave-one-out spacing), and the
    spacing of all samples together (for the map's :class:`Novelty`).

    ``rows``: one row per distinct sample cell (:func:`joint_rows`), ``fold``: its fold. One
    pass of blocked products over the samples: per sample, its nearest sample in each fold
    (itself excluded); every fold's reference set is then a union of folds."""
    rows = np.asarray(rows, dtype=np.float32)
    fold = np.asarray(fold)
    folds = np.unique(fold)
    order = np.argsort(fold, kind="stable")
    ranked = rows[order]
    bounds = np.searchsorted(fold[order], np.r_[folds, np.inf])
    # nearest[i, j]: the largest cosine of sample i to a sample of fold j (itself excluded).
    nearest = np.full((rows.shape[0], folds.size), -np.inf, dtype=np.float32)
    ranked_t = np.ascontiguousarray(ranked.T)
    for start in range(0, rows.shape[0], NOVELTY_BLOCK):
        stop = min(start + NOVELTY_BLOCK, rows.shape[0])
        sims = ranked[start:stop] @ ranked_t
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        for j in range(folds.size):
            if bounds[j + 1] > bounds[j]:
                nearest[start:stop, j] = sims[:, bounds[j]:bounds[j + 1]].max(axis=1)
    distance = np.maximum(1.0 - nearest, 0.0)
    distance[distance < ROUNDING] = 0.0
    own = np.searchsorted(folds, fold[order])
    out_ranked = np.full(rows.shape[0], np.nan, dtype=np.float32)
    for j in range(folds.size):
        others = np.delete(np.arange(folds.size), j)
        if others.size == 0:
            continue
        train = own != j
        loo = distance[train][:, others].min(axis=1)  # nearest other sample, fold j left out
        test = own == j
        out_ranked[test] = distance[test][:, others].min(axis=1) / _spacing(loo)
    empty = ~np.any(ranked != 0, axis=1)
    out_ranked[empty] = np.nan
    out = np.empty_like(out_ranked)
    out[order] = out_ranked
    full = distance.min(axis=1)
    return out, _spacing(np.where(empty, np.nan, full))


def joint_rows(unit_blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Per-modality unit embedding blocks (each (N, D_m), zero rows where missing) -> the rows
    :class:`Novelty` compares: concatenated, scaled by 1/sqrt(number of modalities)."""
    scale = np.float32(1.0 / math.sqrt(len(unit_blocks)))
    return np.concatenate([np.asarray(b, dtype=np.float32) * scale for b in unit_blocks], axis=1)


# --- masks: drop cells a model cannot vouch for ------------------------------------------------

_OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")
MASK_FORMS = "BAND>V, BAND>=V, BAND<V or BAND<=V, several joined by commas (e.g. novelty>2)"


@dataclass(frozen=True)
class Condition:
    """One mask condition: cells where ``band op value`` holds are dropped."""

    band: str
    op: str
    value: float

    @property
    def text(self) -> str:
        return f"{self.band}{self.op}{self.value:g}"


def parse_mask(mask: str) -> list[Condition]:
    """``"novelty>2,uncertainty>=0.1"`` -> the conditions (TaxamapError on anything else)."""
    conditions = []
    for part in str(mask).split(","):
        m = _CONDITION.match(part)
        value = None
        if m:
            try:
                value = float(m.group(3))
            except ValueError:
                value = None
        if m is None or value is None or not math.isfinite(value):
            raise TaxamapError(f"cannot read the mask {part.strip()!r}; give {MASK_FORMS}")
        conditions.append(Condition(m.group(1).lower(), m.group(2), value))
    return conditions


def mask_cells(bands: Mapping[str, np.ndarray], conditions: Sequence[Condition],
               where: str = "the map") -> np.ndarray:
    """Boolean array, True where any condition holds (cells to drop). ``bands``: band name ->
    array (one shape); a condition on a band the map lacks is a TaxamapError naming the bands
    there are. NaN values never satisfy a condition."""
    lowered = {str(k).lower(): v for k, v in bands.items()}
    drop = None
    for c in conditions:
        if c.band not in lowered:
            raise TaxamapError(f"the mask names band {c.band!r}, which {where} lacks; its bands "
                               f"are {', '.join(map(str, bands))}")
        values = np.asarray(lowered[c.band], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            hit = _OPERATORS[c.op](values, c.value) & np.isfinite(values)
        drop = hit if drop is None else drop | hit
    if drop is None:
        raise TaxamapError(f"an empty mask; give {MASK_FORMS}")
    return drop
