"""Few-shot maps: fit a presence/background classifier on a grid's stored cell embeddings.

:func:`fit_maps` trains two models on the cells that hold a user's occurrences (presences) against
background cells (the user's background points, else a uniform sample of the grid's cells):

* ``fitted``: L2-regularised logistic regression on the cell embeddings of the modalities in use,
  each L2-normalised (as the zero-shot score sees them), concatenated and standardised;
* ``combined``: the same model with the zero-shot ``fused`` score as one more input, so the records
  refine the prior instead of replacing it.

Why this model: the zero-shot score is itself linear in the normalised cell embedding (a cosine
with the query), so a linear model on the same features is a *learned query*: it can express
everything the prior can, and a whole-grid prediction is one matrix-vector product per modality,
streamed block by block from the stores (no cell is re-embedded; seconds on a stored grid).
Logistic regression with an L2 penalty is the standard, well-kept (scikit-learn, lbfgs) choice
for presence/background data with many correlated features; MaxEnt itself is equivalent to a
penalised logistic regression of presences against background (Fithian & Hastie 2013).

Regularisation: features are standardised with the mean and standard deviation over *all* grid
cells (label-free, so no information leaks from held-out points); classes are weighted so
presences and background carry equal total weight (``class_weight="balanced"``: the outputs are a
relative suitability in [0, 1], not a probability of presence, which presence/background data
cannot give). The penalty strength ``C`` is chosen from :data:`DEFAULT_CS` (decades, strongest
first) by the mean held-out ROC-AUC of the same spatial folds that are reported, ties going to the
stronger penalty. With ~500-1500 dimensions and often tens of presences a strong penalty is
needed; picking one of a few values on the reported folds makes the reported figures very
slightly optimistic (say so when quoting them). In ``combined`` the standardised fused score is
multiplied by :data:`PRIOR_SCALE`, which divides the penalty on its weight by ``PRIOR_SCALE**2``:
the prior enters almost unpenalised, the embedding weights correct it.

Cells a modality could not embed (NaN rows) get that modality's mean (0 after standardising);
cells no modality could embed are NaN in both outputs.

Cross-validation: spatially blocked k-fold (Roberts et al. 2017): the samples are grouped in
square blocks of ``cv_blocks_deg`` degrees (of cell-centre latitude/longitude), and whole blocks go
to the folds, greedily balancing presences (then background) over folds in an order shuffled
with ``seed``. The same folds score ``fused`` (no training), ``fitted`` and ``combined``: ROC-AUC,
average precision and the continuous Boyce index of :mod:`taxamap.products.evaluate`, per fold.

Trust layers (issue 19), beside ``fitted``:

* ``uncertainty``: the standard deviation of the ``fitted`` probability over
  :data:`DEFAULT_BOOTSTRAP` refits at the chosen ``C``, each on a bootstrap resample of the
  training samples drawn within presences and within background (so both keep their counts),
  warm-started from the full fit. It measures how much the fit depends on which records it got;
  it is a point bootstrap, so it understates what spatially clustered records leave open.
* ``novelty``: per cell, the cosine distance of its embedding to the nearest training sample
  (presences and background), divided by the training samples' own median leave-one-out
  nearest-neighbour distance (:class:`taxamap.products.trust.Novelty`): 0 on a training
  sample, 1 as far out as training samples typically lie from each other.
* The per-sample table (``samples``, written as ``<slug>_cv.csv``) gives each training sample's
  held-out prediction with the ``novelty`` and ``uncertainty`` it gets from a fit *without its
  fold* (the fold's training samples as reference, the fold's own bootstrap refits), and
  :meth:`FitResult.trust_table` the held-out AUC and mean absolute error by tercile of each.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.products.evaluate import (
    DEFAULT_N_BACKGROUND,
    average_precision,
    boyce_index,
    json_value,
    roc_auc,
    text_table,
)
from taxamap.surface import option

log = logging.getLogger(__name__)

#: Penalty strengths tried (scikit-learn's C: inverse L2 strength), strongest first.
DEFAULT_CS = (1e-5, 1e-4, 1e-3, 1e-2)
#: Scale of the standardised fused score in ``combined`` (its penalty is divided by the square).
PRIOR_SCALE = 10.0
#: Default number of folds and block size (degrees) of the spatial cross-validation.
DEFAULT_FOLDS = 5
DEFAULT_CV_BLOCKS_DEG = 1.0
#: Fewer presence cells than this are refused. Five is the least that can put a presence in each
#: of the 5 spatial folds the fit is judged by, and it sits at the bottom of what van Proosdij et
#: al. (2016, Ecography 39: 542-552) found any model needs to beat chance: 3 records for the
#: narrowest-ranged virtual species (a figure they call flawed by statistical artefacts), 13 for
#: widespread ones, and 14-25 in their real (African) study area.
MIN_FIT_PRESENCES = 5
#: Fewer presences than this (but at least MIN_FIT_PRESENCES) get a warning: the fit and its CV
#: figures are then fragile.
MIN_PRESENCES = 10
#: Cells read from a store at a time.
BLOCK_CELLS = 32768
#: Bands reported by the cross-validation, in order.
CV_BANDS = ("fused", "fitted", "combined")
#: Bootstrap refits behind ``uncertainty`` (of the map, and of each fold's held-out samples).
DEFAULT_BOOTSTRAP = 10
#: Columns of the per-sample table, in order (``<slug>_cv.csv``).
SAMPLE_COLUMNS = ("cell", "lat", "lon", "presence", "fold", "fused", "fitted", "combined",
                  "novelty", "uncertainty")


class EmbeddingSource(Protocol):
    """What :func:`fit_maps` reads embeddings from: an (N, D) array, or a store with ``n_cells``
    and ``read(slice) -> (rows, D) float32`` (:class:`taxamap.store.EmbeddingStore`)."""

    n_cells: int

    def read(self, rows: slice) -> np.ndarray: ...


@dataclass(eq=False)
class FitResult:
    """The two fitted bands over every cell, and the cross-validation that scores them.

    ``fitted``, ``combined``: (N,) float32 in [0, 1] in cell order, NaN where no modality has an
    embedding; ``uncertainty`` and ``novelty`` likewise (None when switched off, see
    :func:`fit_maps`). ``cv``: one row per (band, fold) with ``band``, ``fold`` (1-based),
    ``n_presence``, ``n_background``, ``auc``, ``ap``, ``boyce``. ``samples``: one row per
    training sample with the columns of :data:`SAMPLE_COLUMNS`: ``cell``, ``lat``, ``lon``,
    ``presence`` (1/0), ``fold``, the held-out (out-of-fold) value of each band, and the
    ``novelty`` and ``uncertainty`` computed without the sample's fold. ``C``: the chosen
    penalty.
    """

    fitted: np.ndarray = field(repr=False)
    combined: np.ndarray = field(repr=False)
    cv: Any = field(repr=False)
    samples: Any = field(repr=False)
    C: float
    modalities: list[str]
    n_presence: int
    n_background: int
    background: str
    seed: int
    cv_blocks_deg: float
    folds: int
    warnings: list[str] = field(default_factory=list)
    uncertainty: np.ndarray | None = field(default=None, repr=False)
    novelty: np.ndarray | None = field(default=None, repr=False)
    n_boot: int = 0
    novelty_spacing: float = math.nan

    def trust_table(self):
        """Held-out ``fitted`` by tercile of the samples' ``novelty`` and ``uncertainty`` (each
        computed without the sample's fold): a DataFrame with ``measure``, ``tercile`` (1 =
        lowest third), ``low``/``high`` (its range), ``n``, ``n_presence``, ``auc`` and
        ``mean_abs_error`` (mean |presence - held-out fitted|)."""
        import pandas as pd

        records = []
        y = self.samples["presence"].to_numpy()
        pred = self.samples["fitted"].to_numpy()
        for measure in ("novelty", "uncertainty"):
            if measure not in self.samples:
                continue
            v = self.samples[measure].to_numpy(dtype=np.float64)
            ok = np.isfinite(v) & np.isfinite(pred)
            if ok.sum() < 3:
                continue
            cuts = np.quantile(v[ok], [1 / 3, 2 / 3])
            tercile = np.where(ok, 1 + (v > cuts[0]).astype(int) + (v > cuts[1]), 0)
            for t in (1, 2, 3):
                sel = tercile == t
                records.append({
                    "measure": measure, "tercile": t,
                    "low": float(v[sel].min()) if sel.any() else math.nan,
                    "high": float(v[sel].max()) if sel.any() else math.nan,
                    "n": int(sel.sum()), "n_presence": int((y[sel] == 1).sum()),
                    "auc": roc_auc(pred[sel & (y == 1)], pred[sel & (y == 0)]),
                    "mean_abs_error": float(np.abs(y[sel] - pred[sel]).mean())
                    if sel.any() else math.nan})
        return pd.DataFrame.from_records(
            records, columns=["measure", "tercile", "low", "high", "n", "n_presence", "auc",
                              "mean_abs_error"])

    def summary(self):
        """Per band: mean and standard deviation over folds of AUC, AP and Boyce (a DataFrame
        indexed by band)."""
        table = self.cv.groupby("band", sort=False)[["auc", "ap", "boyce"]]
        mean, sd = table.mean(), table.std(ddof=0)
        out = mean.join(sd.add_suffix("_sd"))
        out["folds_scored"] = self.cv.groupby("band", sort=False)["auc"].count()
        return out[["auc", "auc_sd", "ap", "ap_sd", "boyce", "boyce_sd", "folds_scored"]]

    def format_table(self) -> str:
        """The CV table as text: a header line, then one row per band (mean (sd) over folds)."""
        lines = [f"spatial {self.folds}-fold CV (blocks of {self.cv_blocks_deg:g} deg, seed "
                 f"{self.seed}): {self.n_presence} presence and {self.n_background} background "
                 f"cells ({self.background}); logistic regression C = {self.C:g}"]
        rows = [("band", "AUC", "AP", "Boyce", "folds")]
        for band, r in self.summary().iterrows():
            rows.append((str(band), _pm(r.auc, r.auc_sd), _pm(r.ap, r.ap_sd),
                         _pm(r.boyce, r.boyce_sd), str(int(r.folds_scored))))
        lines += text_table(rows)
        trust = self.trust_table()
        if len(trust):
            lines.append("held-out fitted by tercile of novelty and uncertainty (each computed "
                         "without the sample's fold):")
            rows = [("measure", "tercile", "range", "samples", "AUC", "mean |error|")]
            for r in trust.itertuples():
                rows.append((r.measure, str(r.tercile), f"{r.low:.3g}-{r.high:.3g}",
                             f"{r.n} ({r.n_presence} pres.)", _pm(r.auc, math.nan),
                             _pm(r.mean_abs_error, math.nan)))
            lines += text_table(rows)
        return "\n".join(lines)

    def tags(self) -> dict[str, str]:
        """GeoTIFF tags recording the fit and its CV (``FIT_CV`` is JSON: summary and folds)."""
        summary = self.summary()
        cv = {
            "summary": {band: {k: json_value(v) for k, v in row.items()}
                        for band, row in summary.iterrows()},
            "folds": [{k: json_value(v) for k, v in rec.items()}
                      for rec in self.cv.to_dict("records")],
        }
        return {
            "FIT_MODEL": "L2 logistic regression (scikit-learn lbfgs, balanced class weights) on "
                         f"standardised {'+'.join(self.modalities)} embeddings; combined adds the "
                         "fused score",
            "FIT_C": f"{self.C:g}",
            "FIT_PRESENCES": str(self.n_presence),
            "FIT_BACKGROUND": f"{self.n_background} ({self.background})",
            "FIT_SEED": str(self.seed),
            "FIT_CV_BLOCKS_DEG": f"{self.cv_blocks_deg:g}",
            "FIT_FOLDS": str(self.folds),
            "FIT_CV": json.dumps(cv, allow_nan=False, separators=(",", ":")),
            **({"FIT_UNCERTAINTY": f"standard deviation of fitted over {self.n_boot} bootstrap "
                                   "refits (presences and background resampled separately)"}
               if self.uncertainty is not None else {}),
            **({"FIT_NOVELTY": "cosine distance of the cell's embedding to the nearest training "
                               "sample / the training samples' median leave-one-out nearest "
                               f"distance ({self.novelty_spacing:.4g}); 0 = on a training sample"}
               if self.novelty is not None else {}),
        }


def _pm(mean: float, sd: float) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.3f} ({sd:.3f})" if math.isfinite(sd) else f"{mean:.3f}"


def cells_of_points(points: np.ndarray, grid) -> np.ndarray:
    """Index (into the grid's cell order) of the kept cell holding each (lat, lon) point, -1 for
    points off the grid or on a cell the grid does not keep. Antimeridian grids (longitudes past
    +/-180) are handled by trying each point one turn over."""
    latlon = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.full(latlon.shape[0], -1, dtype=np.int64)
    if latlon.shape[0] == 0:
        return out
    cell_index = grid.cell_index()
    flat_mask = np.asarray(grid.mask).ravel()
    with np.errstate(invalid="ignore"):
        row = np.floor((grid.north - latlon[:, 0]) / grid.resolution)
        for shift in (0.0, 360.0, -360.0):
            col = np.floor((latlon[:, 1] + shift - grid.west) / grid.resolution)
            ok = ((out < 0) & np.isfinite(row) & np.isfinite(col) & (row >= 0)
                  & (row < grid.height) & (col >= 0) & (col < grid.width))
            if not ok.any():
                continue
            flat = row[ok].astype(np.int64) * grid.width + col[ok].astype(np.int64)
            kept = flat_mask[flat]
            idx = np.flatnonzero(ok)[kept]
            out[idx] = np.searchsorted(cell_index, flat[kept])
    return out


def spatial_folds(latlon: np.ndarray, presence: np.ndarray, block_deg: float = 1.0,
                  folds: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold (0..folds-1) of each sample: samples share a fold with every sample of their
    ``block_deg`` x ``block_deg`` degree block; blocks are dealt greedily, largest first, to the
    fold holding the smallest share of presences plus share of background so far (ties in an
    order shuffled with ``seed``), so folds hold similar numbers of both."""
    if not (math.isfinite(block_deg) and block_deg > 0):
        raise TaxamapError(f"{option('cv-blocks')} must be a positive number of degrees, not "
                           f"{block_deg}")
    if int(folds) < 2:
        raise TaxamapError(f"cross-validation needs at least 2 folds, not {folds}")
    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    presence = np.asarray(presence).astype(bool)
    lon = (latlon[:, 1] + 180.0) % 360.0 - 180.0
    by = np.floor((latlon[:, 0] + 90.0) / block_deg + 1e-9).astype(np.int64)
    bx = np.floor((lon + 180.0) / block_deg + 1e-9).astype(np.int64)
    blocks, inverse = np.unique(by * 1_000_003 + bx, return_inverse=True)
    n_pres = np.bincount(inverse, weights=presence, minlength=blocks.size)
    n_back = np.bincount(inverse, weights=~presence, minlength=blocks.size)
    # Each block's share of the presences plus its share of the background; the largest blocks
    # are dealt first, each to the fold whose combined share stays smallest (ties: shuffled order).
    share = n_pres / max(n_pres.sum(), 1.0) + n_back / max(n_back.sum(), 1.0)
    order = np.random.default_rng(seed).permutation(blocks.size)
    order = order[np.argsort(-share[order], kind="stable")]
    load = np.zeros(int(folds))
    block_fold = np.empty(blocks.size, dtype=np.int64)
    for b in order:
        f = int(np.argmin(load))
        block_fold[b] = f
        load[f] += share[b]
    return block_fold[inverse]


def _as_source(name: str, source: Any, n: int):
    if hasattr(source, "read") and hasattr(source, "n_cells"):
        if int(source.n_cells) != n:
            raise TaxamapError(f"{name} embeddings have {source.n_cells} cells, the map {n}")
        return source.read
    array = np.asarray(source)
    if array.ndim != 2 or array.shape[0] != n:
        raise TaxamapError(f"{name} embeddings must be ({n}, D), not {array.shape}")
    return lambda rows: np.asarray(array[rows], dtype=np.float32)


def _unit_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised rows, valid) of an embedding block; invalid rows (NaN, zero) become 0."""
    block = np.asarray(block, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    valid = np.isfinite(norms) & (norms > 0)
    out = np.zeros_like(block)
    out[valid] = block[valid] / norms[valid, None]
    return out, valid


def _read_pass(readers: dict, n: int, wanted: np.ndarray):
    """One streaming pass: per modality, the mean and sd of the unit rows over valid cells and
    the unit rows (with validity) of the ``wanted`` cells (sorted unique indices)."""
    stats, rows = {}, {}
    for m, read in readers.items():
        total = sq = None
        count = 0
        gathered, gathered_ok = [], []
        for start in range(0, n, BLOCK_CELLS):
            stop = min(start + BLOCK_CELLS, n)
            unit, valid = _unit_rows(read(slice(start, stop)))
            if total is None:
                total, sq, count = np.zeros(unit.shape[1]), np.zeros(unit.shape[1]), 0
            # Invalid rows are zeros: summing every row needs no masked copy of the block.
            total += unit.sum(axis=0, dtype=np.float64)
            sq += np.einsum("ij,ij->j", unit, unit).astype(np.float64)
            count += int(valid.sum())
            lo, hi = np.searchsorted(wanted, [start, stop])
            local = wanted[lo:hi] - start
            gathered.append(unit[local])
            gathered_ok.append(valid[local])
        if not count:
            raise TaxamapError(f"no cell has a {m} embedding; the store is empty or failed")
        mean = total / count
        sd = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
        sd = np.where(sd > 1e-8, sd, 1.0)
        stats[m] = (mean.astype(np.float32), sd.astype(np.float32))
        rows[m] = (np.concatenate(gathered), np.concatenate(gathered_ok))
    return stats, rows


def _design(unit: np.ndarray, valid: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    x = (unit - mean) / sd
    x[~valid] = 0.0  # a missing modality takes its mean
    return x


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def _fit_lr(x: np.ndarray, y: np.ndarray, cs: Sequence[float]):
    """One model per C (warm-started from the previous, stronger one); returns the models' (coef,
    intercept) per C."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=cs[0], class_weight="balanced", max_iter=500, warm_start=True)
    out = []
    with warnings.catch_warnings():
        # A path point that stops at max_iter is still a usable, strongly regularised model.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            model.set_params(C=float(c))
            model.fit(x, y)
            out.append((model.coef_[0].astype(np.float64).copy(), float(model.intercept_[0])))
    return out


#: The bootstrap refits stop when no training sample's logit moves by more than this in a step
#: (the steps shrink geometrically, so what is left is of the same order: a change of the
#: fitted probability below 3e-5).
BOOTSTRAP_TOL = 1e-4
BOOTSTRAP_MAX_STEPS = 200


def _bootstrap(x: np.ndarray, y: np.ndarray, c: float, n_boot: int, seed: int,
               start: tuple[np.ndarray, float]) -> tuple[np.ndarray, np.ndarray]:
    """``n_boot`` refits at penalty ``c`` on bootstrap resamples of the samples ``x``, ``y``,
    warm-started at ``start`` (coef, intercept): coefficients (D, n_boot), intercepts (n_boot,).

    Each refit minimises the same objective as scikit-learn's ``LogisticRegression(C=c,
    class_weight="balanced")`` with a resample's multiplicities as sample weights (drawn within
    presences and within background, so both keep their counts and the balanced class weights
    stay as in the fit). The solver is Newton's method with the Hessian held at ``start``: a
    resample's Hessian differs from it by resampling noise, so the steps contract quickly
    (about twenty, each two products with the samples, for all refits at once), where lbfgs
    would start over for each refit. A refit that has not converged after
    :data:`BOOTSTRAP_MAX_STEPS` steps is finished by scikit-learn's lbfgs from where it stands.
    """
    from scipy.linalg import cho_factor, cho_solve

    # The products with the samples in float32 (half the memory traffic of float64): the
    # Hessian only preconditions, and the tolerance is well above float32's rounding.
    x32 = np.asarray(x, dtype=np.float32)
    x32_t = np.ascontiguousarray(x32.T)
    n, d = x32.shape
    rng = np.random.default_rng(seed)
    pres, back = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    class_weight = np.where(y == 1, n / (2.0 * pres.size), n / (2.0 * back.size))
    counts = np.empty((n, n_boot))
    for i in range(n_boot):
        counts[:, i] = (np.bincount(rng.choice(pres, pres.size), minlength=n)
                        + np.bincount(rng.choice(back, back.size), minlength=n))
    weight = counts * class_weight[:, None]
    penalty = np.r_[np.full(d, 1.0 / float(c)), 0.0]  # the intercept is not penalised
    z0 = x32 @ start[0].astype(np.float32) + np.float32(start[1])
    p0 = 1.0 / (1.0 + np.exp(-z0.astype(np.float64)))
    curvature = (class_weight * p0 * (1.0 - p0)).astype(np.float32)
    hessian = np.diag(penalty)
    hessian[:d, :d] += x32_t @ (x32 * curvature[:, None])
    hessian[:d, d] += x32_t @ curvature
    hessian[d, :d] = hessian[:d, d]
    hessian[d, d] += curvature.sum(dtype=np.float64)
    factor = cho_factor(hessian)
    beta = np.tile(np.r_[start[0], start[1]][:, None], (1, n_boot))
    z = np.tile(z0.astype(np.float64)[:, None], (1, n_boot))
    yf = y.astype(np.float64)[:, None]
    active = np.ones(n_boot, dtype=bool)
    for _ in range(BOOTSTRAP_MAX_STEPS):
        b, za = beta[:, active], z[:, active]
        residual = weight[:, active] * (1.0 / (1.0 + np.exp(-za)) - yf)
        grad = np.vstack([x32_t @ residual.astype(np.float32), residual.sum(axis=0)])
        step = cho_solve(factor, grad + penalty[:, None] * b)
        b = b - step
        beta[:, active] = b
        z_new = x32 @ b[:d].astype(np.float32) + b[d]
        moved = np.abs(z_new - za).max(axis=0)
        z[:, active] = z_new
        still = np.flatnonzero(active)[moved > BOOTSTRAP_TOL]
        active[:] = False
        active[still] = True
        if not active.any():
            break
    for i in np.flatnonzero(active):  # rare: let lbfgs finish what the fixed Hessian did not
        beta[:, i] = _lbfgs_weighted(x, y, c, counts[:, i], beta[:, i])
    return beta[:d], beta[d]


def _lbfgs_weighted(x: np.ndarray, y: np.ndarray, c: float, sample_weight: np.ndarray,
                    beta: np.ndarray) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=float(c), class_weight="balanced", max_iter=500,
                               warm_start=True)
    model.coef_, model.intercept_ = beta[None, :-1].copy(), beta[-1:].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y, sample_weight=sample_weight)
    return np.r_[model.coef_[0], model.intercept_[0]]


def _spread(z: np.ndarray) -> np.ndarray:
    """Standard deviation (ddof=1) over the last axis of the probabilities of logits ``z``."""
    return _sigmoid(z).std(axis=-1, ddof=1).astype(np.float32)


def fit_maps(
    embeddings: Mapping[str, np.ndarray | EmbeddingSource],
    fused: np.ndarray,
    cell_latlon: np.ndarray,
    presence_cells: np.ndarray,
    background_cells: np.ndarray | None = None,
    *,
    seed: int = 0,
    cv_blocks_deg: float = DEFAULT_CV_BLOCKS_DEG,
    folds: int = DEFAULT_FOLDS,
    n_background: int = DEFAULT_N_BACKGROUND,
    thin: bool = True,
    cs: Sequence[float] = DEFAULT_CS,
    n_boot: int = DEFAULT_BOOTSTRAP,
    novelty: bool = True,
) -> FitResult:
    """Fit ``fitted`` and ``combined`` over every cell and cross-validate them (module docstring).

    ``embeddings``: modality -> (N, D) array or store, rows in cell order (NaN row = not
    embedded). ``fused``: (N,) zero-shot fused score. ``cell_latlon``: (N, 2) cell centres.
    ``presence_cells`` / ``background_cells``: indices into the N cells (see
    :func:`cells_of_points`; negative entries are ignored); without background, up to
    ``n_background`` distinct cells with embeddings are drawn uniformly with ``seed``. ``thin``
    keeps one sample per cell (duplicates add no information and weight clustered records);
    ``thin=False`` keeps one sample per point, as point-based tools do. ``n_boot`` bootstrap
    refits give ``uncertainty`` (0: none, and no uncertainty column); ``novelty=False`` skips
    the novelty band and column.
    """
    from threadpoolctl import threadpool_limits

    fused = np.asarray(fused, dtype=np.float32).reshape(-1)
    n = fused.shape[0]
    cell_latlon = np.asarray(cell_latlon, dtype=np.float64).reshape(-1, 2)
    if cell_latlon.shape[0] != n:
        raise TaxamapError(f"cell_latlon has {cell_latlon.shape[0]} rows for {n} cells")
    if not embeddings:
        raise TaxamapError("fitting needs the embeddings of at least one modality")
    readers = {m: _as_source(m, src, n) for m, src in embeddings.items()}
    n_boot = int(n_boot)
    if n_boot == 1 or n_boot < 0:
        raise TaxamapError(f"uncertainty needs at least 2 bootstrap refits (or 0 for none), "
                           f"not {n_boot}")
    notes: list[str] = []
    has_cell = np.isfinite(fused)

    def clean(cells: np.ndarray | None, what: str) -> np.ndarray:
        cells = np.asarray(cells if cells is not None else [], dtype=np.int64).reshape(-1)
        cells = cells[(cells >= 0) & (cells < n)]
        empty = ~has_cell[cells]
        if empty.any():
            notes.append(f"{int(empty.sum())} {what} on cells without embeddings were left out")
        cells = cells[~empty]
        return np.unique(cells) if thin else cells

    presence = clean(presence_cells, "presences")
    if presence.size == 0:
        raise TaxamapError("no presences to fit on: none of the occurrences falls on a grid cell "
                           "with embeddings; check the occurrence file and the region")
    check_enough_presences(np.unique(presence).size, "with embeddings")
    if background_cells is None:
        if int(n_background) < 1:
            raise TaxamapError(f"n_background must be at least 1, not {n_background}")
        valid = np.flatnonzero(has_cell)
        rng = np.random.default_rng(seed)
        background = (valid if n_background >= valid.size
                      else np.sort(rng.choice(valid, size=int(n_background), replace=False)))
        source = "sampled uniformly"
    else:
        background = clean(background_cells, "background points")
        source = "given"
        if background.size == 0:
            raise TaxamapError("no background point falls on a grid cell with embeddings; check "
                               "the background file")
    if presence.size < MIN_PRESENCES:
        notes.append(f"only {presence.size} presence cells (fewer than {MIN_PRESENCES}): the fit "
                     "and its cross-validation are fragile")

    sample_cells = np.r_[presence, background]
    y = np.r_[np.ones(presence.size, dtype=np.int64), np.zeros(background.size, dtype=np.int64)]
    wanted, position = np.unique(sample_cells, return_inverse=True)
    stats, rows = _read_pass(readers, n, wanted)
    x_unique = np.concatenate([_design(*rows[m], *stats[m]) for m in readers], axis=1)
    # float64 once: scikit-learn's lbfgs works in float64 and would convert on every fit.
    x = np.ascontiguousarray(x_unique[position], dtype=np.float64)
    f_valid = fused[has_cell].astype(np.float64)
    f_mean, f_sd = float(f_valid.mean()), float(f_valid.std()) or 1.0
    prior = PRIOR_SCALE * np.nan_to_num((fused[sample_cells] - f_mean) / f_sd, nan=0.0)
    x_comb = np.column_stack([x, prior])

    fold = spatial_folds(cell_latlon[sample_cells], y, cv_blocks_deg, folds, seed)
    cs = sorted(float(c) for c in cs)
    oof = {c: np.full(y.size, np.nan) for c in cs}
    oof_comb = np.full(y.size, np.nan)
    scored = []
    fold_models: dict[int, dict[float, tuple[np.ndarray, float]]] = {}
    with threadpool_limits(limits=1):  # small problems: extra BLAS threads only contend
        for k in range(int(folds)):
            train, test = fold != k, fold == k
            if not test.any():
                continue
            if y[train].min(initial=1) == 1 or y[train].max(initial=0) == 0:
                notes.append(f"fold {k + 1}: its training folds lack presences or background; "
                             "not scored")
                continue
            scored.append(k)
            fold_models[k] = dict(zip(cs, _fit_lr(x[train], y[train], cs)))
            for c, (coef, b) in fold_models[k].items():
                oof[c][test] = x[test] @ coef + b
        if not scored:
            raise TaxamapError("cross-validation impossible: the presences lie in one spatial "
                               f"block of {cv_blocks_deg:g} deg; use a smaller "
                               f"{option('cv-blocks')}")

        def mean_auc(values: np.ndarray) -> float:
            aucs = [roc_auc(values[(fold == k) & (y == 1)], values[(fold == k) & (y == 0)])
                    for k in scored]
            finite = [a for a in aucs if math.isfinite(a)]
            return float(np.mean(finite)) if finite else -math.inf

        best = cs[0]
        for c in cs[1:]:
            if mean_auc(oof[c]) > mean_auc(oof[best]):
                best = c
        for k in scored:
            train, test = fold != k, fold == k
            (coef, b), = _fit_lr(x_comb[train], y[train], [best])
            oof_comb[test] = x_comb[test] @ coef + b
        (coef_fit, b_fit), = _fit_lr(x, y, [best])
        (coef_comb, b_comb), = _fit_lr(x_comb, y, [best])
        trust: dict[str, np.ndarray] = {}
        boot = None
        if n_boot:
            # Each fold's held-out samples get the spread of that fold's own refits: the same
            # figure the map gets from refits on all samples, as if the fold were new ground.
            trust["uncertainty"] = np.full(y.size, np.nan)
            for k in scored:
                train, test = fold != k, fold == k
                w, b0 = _bootstrap(x[train], y[train], best, n_boot, seed + 1 + k,
                                   fold_models[k][best])
                trust["uncertainty"][test] = _spread(x[test] @ w + b0)
            boot = _bootstrap(x, y, best, n_boot, seed, (coef_fit, b_fit))

    index = None
    if novelty:
        from taxamap.products.trust import Novelty, held_out_novelty, joint_rows

        joint = joint_rows([rows[m][0] for m in readers])  # per distinct sample cell
        # A cell lies in one spatial block, hence one fold.
        cell_fold = np.empty(wanted.size, dtype=np.int64)
        cell_fold[position] = fold
        per_cell, spacing = held_out_novelty(joint, cell_fold)
        trust["novelty"] = per_cell[position].astype(np.float64)
        index = Novelty(joint, spacing)
    fitted, combined, uncertainty, novelty_map = _predict_all(
        readers, n, stats, coef_fit, b_fit, coef_comb, b_comb, fused, f_mean, f_sd, has_cell,
        boot, index, wanted)
    held_out = {"fused": fused[sample_cells].astype(np.float64), "fitted": _sigmoid(oof[best]),
                "combined": _sigmoid(oof_comb)}
    cv = _cv_table(held_out, y, fold, folds)
    import pandas as pd

    samples = pd.DataFrame({
        "cell": sample_cells, "lat": cell_latlon[sample_cells, 0],
        "lon": cell_latlon[sample_cells, 1], "presence": y, "fold": fold + 1,
        **{band: np.asarray(v, dtype=np.float64) for band, v in held_out.items()},
        **{name: trust[name] for name in ("novelty", "uncertainty") if name in trust},
    })
    for note in notes:
        log.warning("fit: %s", note)
    return FitResult(fitted, combined, cv, samples, best, list(readers), int(presence.size),
                     int(background.size), source, int(seed), float(cv_blocks_deg), int(folds),
                     notes, uncertainty, novelty_map, n_boot,
                     index.spacing if index is not None else math.nan)


def _predict_all(readers, n, stats, coef_fit, b_fit, coef_comb, b_comb, fused, f_mean, f_sd,
                 has_cell, boot=None, index=None, sample_cells=None):
    """Both models over every cell, streaming the embeddings block by block; with ``boot``
    (bootstrap coefficients, intercepts) the spread of the refits, with ``index`` (a
    :class:`~taxamap.products.trust.Novelty`) each cell's novelty, in the same pass; the
    training cells (``sample_cells``, sorted) have novelty 0 without a search."""
    dims = [stats[m][0].shape[0] for m in readers]
    bounds = np.cumsum([0] + dims)
    fitted = np.full(n, np.nan, dtype=np.float32)
    combined = np.full(n, np.nan, dtype=np.float32)
    uncertainty = np.full(n, np.nan, dtype=np.float32) if boot is not None else None
    novelty = np.full(n, np.nan, dtype=np.float32) if index is not None else None
    w_prior = coef_comb[-1] * PRIOR_SCALE / f_sd
    for start in range(0, n, BLOCK_CELLS):
        stop = min(start + BLOCK_CELLS, n)
        z_fit = np.full(stop - start, b_fit)
        z_comb = np.full(stop - start, b_comb)
        z_boot = np.tile(boot[1], (stop - start, 1)) if boot is not None else None
        units = []
        for i, (m, read) in enumerate(readers.items()):
            unit, valid = _unit_rows(read(slice(start, stop)))
            units.append(unit)
            x = _design(unit, valid, *stats[m])
            z_fit += x @ coef_fit[bounds[i]:bounds[i + 1]].astype(np.float32)
            z_comb += x @ coef_comb[bounds[i]:bounds[i + 1]].astype(np.float32)
            if z_boot is not None:
                z_boot += x @ boot[0][bounds[i]:bounds[i + 1]].astype(np.float32)
        f = fused[start:stop].astype(np.float64)
        z_comb += np.where(np.isfinite(f), (f - f_mean) * w_prior, 0.0)
        ok = has_cell[start:stop]
        fitted[start:stop][ok] = _sigmoid(z_fit[ok])
        combined[start:stop][ok] = _sigmoid(z_comb[ok])
        if z_boot is not None:
            uncertainty[start:stop][ok] = _spread(z_boot[ok])
        if index is not None:
            from taxamap.products.trust import joint_rows

            search = ok.copy()
            if sample_cells is not None:
                lo, hi = np.searchsorted(sample_cells, [start, stop])
                search[sample_cells[lo:hi] - start] = False
                novelty[sample_cells[lo:hi]] = 0.0
            novelty[start:stop][search] = index(joint_rows(units)[search])
    return fitted, combined, uncertainty, novelty


def _cv_table(held_out: dict, y: np.ndarray, fold: np.ndarray, folds: int):
    import pandas as pd

    records = []
    for band in CV_BANDS:
        values = held_out[band]
        for k in range(int(folds)):
            test = (fold == k) & np.isfinite(values)
            p, b = values[test & (y == 1)], values[test & (y == 0)]
            records.append({"band": band, "fold": k + 1, "n_presence": int(p.size),
                            "n_background": int(b.size), "auc": roc_auc(p, b),
                            "ap": average_precision(p, b), "boyce": boyce_index(p, b)})
    return pd.DataFrame.from_records(records)


def locate_occurrences(occurrences: np.ndarray, grid) -> np.ndarray:
    """:func:`cells_of_points` of the presences, refusing an empty set or one wholly off the grid
    (a one-line TaxamapError, which ``predict --fit`` raises before embedding any cell)."""
    occurrences = np.asarray(occurrences, dtype=np.float64).reshape(-1, 2)
    if occurrences.shape[0] == 0:
        raise TaxamapError("no presences to fit on: the occurrence file holds no points")
    cells = cells_of_points(occurrences, grid)
    if not (cells >= 0).any():
        raise TaxamapError(f"none of the {cells.size} occurrences falls on a cell of the grid; "
                           "check that they are in the region (and latitude/longitude are not "
                           "swapped)")
    check_enough_presences(np.unique(cells[cells >= 0]).size, "of the grid", cells.size)
    return cells


def check_enough_presences(n_cells: int, where: str, n_points: int | None = None) -> None:
    """TaxamapError when the presences fill fewer than :data:`MIN_FIT_PRESENCES` distinct cells
    (``where``: which cells counted), before any fitting (or, from predict, any embedding)."""
    if n_cells >= MIN_FIT_PRESENCES:
        return
    points = f"the occurrences ({n_points})" if n_points is not None else "the presences"
    raise TaxamapError(
        f"{points} fall in only {n_cells} cell{'' if n_cells == 1 else 's'} {where}; a fit "
        f"needs presences in at least {MIN_FIT_PRESENCES} cells (fewer "
        f"cannot fill the {DEFAULT_FOLDS} folds it is judged by, and models from so few records "
        "rarely beat chance); give more occurrences, or map without the fit")


def fit_grid(
    grid,
    embeddings: Mapping[str, np.ndarray | EmbeddingSource],
    fused: np.ndarray,
    occurrences: np.ndarray,
    background: np.ndarray | None = None,
    **options,
) -> FitResult:
    """:func:`fit_maps` from points: ``occurrences`` and ``background`` are (N, 2) (lat, lon)
    degrees, placed on the cells of ``grid`` (a :class:`taxamap.grid.Grid`); ``options`` are
    :func:`fit_maps`'s keywords (seed, cv_blocks_deg, folds, n_background, n_boot, novelty).
    Points off the grid are counted in a warning; TaxamapError when no occurrence falls on it."""
    presence = locate_occurrences(occurrences, grid)
    off = int((presence < 0).sum())
    if off:
        log.warning("fit: %d of %d occurrences fall outside the grid's cells and are not used",
                    off, presence.size)
    back = None
    if background is not None:
        back = cells_of_points(np.asarray(background, dtype=np.float64).reshape(-1, 2), grid)
        if not (back >= 0).any():
            raise TaxamapError(f"none of the {back.size} background points falls on a cell of the "
                               "grid; check the background file")
        if (back < 0).any():
            log.warning("fit: %d of %d background points fall outside the grid's cells and are "
                        "not used", int((back < 0).sum()), back.size)
        back = back[back >= 0]
    return fit_maps(embeddings, fused, grid.cell_latlon(), presence[presence >= 0], back,
                    **options)
