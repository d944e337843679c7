"""Richness: per cell, how many species' ranges contain it.

Each species' map is thresholded with one rule, as ``taxamap threshold`` does it
(:mod:`taxamap.products.ranges`): ``percentile:P`` (the P-th percentile of that species' valid
cells, numpy's linear interpolation) or ``value:V``; a cell is in the range when its score is
``>= threshold``. ``maxtss`` needs each species' occurrences and is refused.

The species are taken a batch at a time: a batch's maps are scored over every cell (the cells
streamed from the stores a block at a time), each species' threshold is found from its own
scores, and the batch's in-range cells are added to the count; then the batch is dropped. Memory
holds one batch of maps (at most :data:`BATCH_BYTES`), flat in the number of species; each cell
block is read once per batch. ``on_batch`` receives each batch's binary rasters (for a per-species
stack) before they are dropped.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option

_log = logging.getLogger("taxamap")

#: The most bytes of float32 maps one batch of species holds.
BATCH_BYTES = 256 * 2**20

#: Never more species than this in one batch (a small grid would otherwise take them all).
MAX_BATCH = 512


def richness_rule(rule: str):
    """The parsed threshold rule for richness: ``percentile:P`` or ``value:V``; ``maxtss``
    (which needs each species' occurrences) is refused in one line."""
    from taxamap.products.ranges import parse_rule

    parsed = parse_rule(rule)
    if parsed.kind == "maxtss":
        raise TaxamapError(
            f"{option('rule', 'maxtss')} needs each species' own occurrences, which a richness "
            f"map does not have; use {option('rule', 'percentile:P')} (each species' top "
            f"(100-P) % of cells) or {option('rule', 'value:V')} (a score)")
    return parsed


def percentile_of(sorted_pairs: np.ndarray, n: int, q: float) -> np.ndarray:
    """numpy's ``percentile(values, q)`` (method "linear", float64) from the two order
    statistics around its virtual index, ``sorted_pairs`` (S, 2) float64: the values of rank
    floor(i) and floor(i) + 1 where i = q / 100 * (n - 1)."""
    index = q / 100.0 * (n - 1)
    t = index - np.floor(index)
    a, b = sorted_pairs[:, 0], sorted_pairs[:, 1]
    diff = b - a
    # numpy's _lerp: from a below the middle, back from b above it (bit for bit the same).
    return np.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)


def batch_size_for(n_cells: int) -> int:
    """Species per batch over ``n_cells`` cells: :data:`BATCH_BYTES` of float32 maps."""
    return int(max(1, min(MAX_BATCH, BATCH_BYTES // max(1, 4 * n_cells))))


@dataclass
class RichnessResult:
    """Per cell (the grid's kept cells, in order) the species counted, and per species its
    threshold and how many cells its range holds."""

    counts: np.ndarray
    valid: np.ndarray
    labels: list[str]
    thresholds: np.ndarray
    in_range: np.ndarray
    rule: str
    empty: list[str] = field(default_factory=list)

    def raster(self, grid) -> np.ndarray:
        """(height, width) float32 counts, NaN off the grid's cells and where no cell score."""
        values = np.where(self.valid, self.counts, np.nan).astype(np.float32)
        return grid.to_raster(values)


def richness(cell_source: Callable[[], Iterable[tuple[slice, Mapping[str, np.ndarray]]]],
             n: int, vectors: np.ndarray, labels: Sequence[str], rule: str, fusion: str, *,
             batch: int | None = None, progress: bool = True,
             on_batch: Callable[[slice, np.ndarray, np.ndarray], None] | None = None
             ) -> RichnessResult:
    """Count, at each of ``n`` cells, the species of unit ``vectors`` (S, D) whose range (its
    map cut at ``rule``) holds it. ``cell_source()`` yields the cells' blocks afresh for each
    batch of species (:mod:`taxamap.panel.cells`). ``on_batch(species, binary, thresholds)``
    gets each batch's uint8 (batch, n) rasters (1 in range, 0 out, 255 no score)."""
    from tqdm.auto import tqdm

    from taxamap.score import fuse_many

    parsed = richness_rule(rule)
    total = vectors.shape[0]
    if total == 0:
        raise TaxamapError("no species to count; give at least one")
    size = batch or batch_size_for(n)
    counts = np.zeros(n, dtype=np.int32)
    valid = None
    thresholds = np.empty(total, dtype=np.float64)
    in_range = np.zeros(total, dtype=np.int64)
    scores = np.empty((min(size, total), n), dtype=np.float32)
    with tqdm(total=total, desc="richness", unit="species", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, total, size):
            chunk = slice(first, min(first + size, total))
            part = scores[:chunk.stop - chunk.start]
            for rows, block in cell_source():
                fused, _ = fuse_many(dict(block), vectors[chunk], fusion)
                part[:, rows] = fused
            if valid is None:
                valid = np.isfinite(part[0])
                if not valid.any():
                    raise TaxamapError("no cell of the grid has a score; nothing to count")
            found = _thresholds(part, valid, parsed)
            thresholds[chunk] = found
            binary = np.empty(part.shape, dtype=np.uint8) if on_batch is not None else None
            inside = np.empty(n, dtype=bool)
            for i, row in enumerate(part):  # row by row: no (batch x cells) temporaries
                np.greater_equal(row, np.float32(found[i]), out=inside)  # NaN: out
                in_range[chunk.start + i] = np.count_nonzero(inside)
                counts += inside
                if binary is not None:
                    binary[i] = np.where(valid, inside, np.uint8(255))
            if on_batch is not None:
                on_batch(chunk, binary, found)
            bar.update(chunk.stop - chunk.start)
    empty = [labels[i] for i in np.flatnonzero(in_range == 0)]
    if len(empty) == total:
        raise TaxamapError(f"the rule {parsed.text} keeps no cell of any species' map; use "
                           f"{option('rule', 'percentile:P')} or a lower value")
    if empty:
        _log.info(f"{len(empty):,} of {total:,} species have no cell at {parsed.text} and add "
                  "nothing to the count")
    return RichnessResult(counts, valid, list(labels), thresholds, in_range, parsed.text, empty)


def _thresholds(part: np.ndarray, valid: np.ndarray, parsed) -> np.ndarray:
    """Each species' threshold under ``parsed`` from its scores on the ``valid`` cells, as
    :func:`taxamap.products.ranges.compute_threshold` finds it (exactly: the two order
    statistics around the percentile, then numpy's interpolation)."""
    if parsed.kind == "value":
        return np.full(part.shape[0], float(parsed.value), dtype=np.float64)
    n = int(valid.sum())
    index = parsed.value / 100.0 * (n - 1)
    low = int(np.floor(index))
    high = min(low + 1, n - 1)
    bounds = _brackets(part, valid, low, high)
    pairs = np.empty((part.shape[0], 2), dtype=np.float64)
    for i, row in enumerate(part):
        pairs[i] = _order_statistics(row, valid, low, high, *bounds[i])
    return percentile_of(pairs, n, parsed.value)


#: Cells of a strided sample whose scores bracket each species' percentile before the exact
#: count: the exact order statistics are then found among the few scores inside the bracket.
SAMPLE_CELLS = 20000


def _brackets(part: np.ndarray, valid: np.ndarray, low: int, high: int) -> np.ndarray:
    """Per species (lo, hi) scores that very likely hold its ``low``-th and ``high``-th smallest
    valid scores: quantiles of a strided sample of cells a few standard errors either side
    (-inf, inf where the sample is the grid)."""
    cells = np.flatnonzero(valid)
    n = cells.size
    out = np.tile(np.array([-np.inf, np.inf]), (part.shape[0], 1))
    if n <= 2 * SAMPLE_CELLS:
        return out
    sample = part[:, cells[np.linspace(0, n - 1, SAMPLE_CELLS).astype(np.int64)]]
    f_lo, f_hi = low / (n - 1), high / (n - 1)
    m = SAMPLE_CELLS
    # The sample quantile's standard error is sqrt(f (1 - f) / m): five of them either side.
    margin = 5.0 * np.sqrt(max(f_lo * (1 - f_lo), 1.0 / m) / m) + 2.0 / m
    k_lo = int(np.floor((f_lo - margin) * (m - 1)))
    k_hi = int(np.ceil((f_hi + margin) * (m - 1)))
    kth = [k for k in (k_lo, k_hi) if 0 <= k < m]
    if kth:
        sample.partition(kth, axis=1)
    if 0 <= k_lo < m:
        out[:, 0] = sample[:, k_lo]
    if 0 <= k_hi < m:
        out[:, 1] = sample[:, k_hi]
    return out


def _order_statistics(row: np.ndarray, valid: np.ndarray, low: int, high: int, lo: float,
                      hi: float) -> tuple[float, float]:
    """The ``low``-th and ``high``-th smallest valid values of ``row`` (NaN off ``valid``): from
    the values in [lo, hi] when the bracket holds both ranks, else from all of them."""
    if np.isfinite(lo) or np.isfinite(hi):
        below = np.count_nonzero(row < lo)  # NaN is never below
        inside = row[(row >= lo) & (row <= hi)]
        if below <= low and high < below + inside.size:
            inside.partition(sorted({low - below, high - below}))
            return float(inside[low - below]), float(inside[high - below])
    values = row[valid]
    values.partition(sorted({low, high}))
    return float(values[low]), float(values[high])


__all__ = ["BATCH_BYTES", "RichnessResult", "batch_size_for", "percentile_of", "richness",
           "richness_rule"]
