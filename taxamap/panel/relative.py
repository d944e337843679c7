"""The panel-relative score: at each cell, the fraction of the panel's species scoring lower.

``relative`` of a query at a cell is ``#{panel species p : score_p(cell) < score_q(cell)} / n``,
where ``n`` is the panel's size, less one when the query is itself a panel member (it is not
compared with itself). 0.97 reads "this cell matches the query better than 97 % of the panel's
species". It is computed on the score the map shows, ``fused`` (see the module notes in
``docs/panel.md`` for why not per modality).

Two ways to get it:

* **exact** (:func:`exact_relative`): the panel's scores of every cell, a block of cells at a
  time ((block x D) @ (D x P), fused as the map is), sorted per cell, and each query's score
  counted against them by binary search. Memory holds one block of scores; used for panels the
  size of a user's list.
* **from per-cell statistics** (:class:`PanelStats`): for the default panel (2,435 species) the
  K quantiles of the panel's scores at every cell, computed once per (stores, text model,
  panel, fusion) and kept beside the stores as float16 (N, K). A query's standing is the
  piecewise-linear interpolation of the panel's CDF between the two knots around its score.
  With knots at ranks ``r_k = round(k (P - 1) / (K - 1))`` the true count at a score between
  knots k-1 and k lies in ``[r_{k-1} + 1, r_k]``, and so does the interpolation: the error is at
  most ``(r_k - r_{k-1} - 1) / n`` <= ``1 / (K - 1)`` whatever the model's weights, plus what
  rounding the knots to float16 moves (measured: ``benchmarks/panel.py``).

Statistics are keyed by every store's key and check records (:meth:`EmbeddingStore.records_digest`),
the text model, the panel and the fusion: a store embedded again makes them stale, and they are
computed anew. A file that is missing, unreadable or fails its CRC is computed anew too, with one
line saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from taxamap.errors import TaxamapError

_log = logging.getLogger("taxamap")

#: Knots per cell of the default panel's statistics: the interpolation error is at most
#: 1 / (K - 1) = 0.0078 of the panel, leaving room under 0.01 for the float16 rounding.
STATS_KNOTS = 129

#: Bump when the statistics' layout or meaning changes: older files are then computed anew.
STATS_FORMAT = 1

#: Cells whose panel scores are scored, sorted and counted at once: (P x this) float32 scores.
SCORE_CELLS = 2048


def panel_scores(block: Mapping[str, np.ndarray], vectors: np.ndarray, fusion: str
                 ) -> np.ndarray:
    """The panel's fused scores (P, cells) of a block of cell embeddings, exactly as a map of
    each panel species would hold them (:func:`taxamap.score.fuse_many`)."""
    from taxamap.score import fuse_many

    fused, _ = fuse_many(dict(block), vectors, fusion)
    return fused


def count_below(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each cell c and query s, how many of ``rows[c]`` (ascending, (cells, P)) are strictly
    below ``values[s, c]`` ((S, cells)): a binary search run for all cells at once. NaN values
    give 0 (the caller masks them)."""
    rows = np.asarray(rows)
    values = np.atleast_2d(values)
    cells, width = rows.shape
    lo = np.zeros(values.shape, dtype=np.int32)
    hi = np.full(values.shape, width, dtype=np.int32)
    flat = rows.reshape(-1)
    base = (np.arange(cells, dtype=np.int64) * width)[None, :]
    for _ in range(int(np.ceil(np.log2(width + 1))) + 1):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        probe = flat[base + np.minimum(mid, width - 1)].astype(np.float32)
        with np.errstate(invalid="ignore"):
            right = active & (probe < values)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo


def _members_denominator(size: int, members: Sequence[int | None]) -> np.ndarray:
    """Per query, how many panel species it is compared with (itself left out)."""
    out = np.array([size - (m is not None) for m in members], dtype=np.float32)
    if (out < 1).any():
        raise TaxamapError("a reference panel of one species cannot rank its only member against "
                           "anything; give a panel of two species or more")
    return out


def exact_relative(cell_blocks: Iterable[tuple[slice, Mapping[str, np.ndarray]]],
                   vectors: np.ndarray, query_scores: np.ndarray, fusion: str,
                   members: Sequence[int | None] | None = None) -> np.ndarray:
    """``relative`` (S, N) of queries whose fused scores are ``query_scores`` (S, N), against the
    panel of unit ``vectors`` (P, D), computed exactly from the cells of ``cell_blocks``
    (:mod:`taxamap.panel.cells`). ``members[s]`` is query s's position in the panel when it is
    a member (its own scores are then the panel's, and it is left out of the count), else None.
    NaN where the query's score is NaN."""
    query_scores = np.atleast_2d(np.asarray(query_scores, dtype=np.float32))
    members = list(members) if members is not None else [None] * query_scores.shape[0]
    denominator = _members_denominator(vectors.shape[0], members)
    out = np.full(query_scores.shape, np.nan, dtype=np.float32)
    for rows, block in cell_blocks:
        for start in range(0, rows.stop - rows.start, SCORE_CELLS):
            sub = slice(start, min(start + SCORE_CELLS, rows.stop - rows.start))
            cols = slice(rows.start + sub.start, rows.start + sub.stop)
            scores = panel_scores({m: e[sub] for m, e in block.items()}, vectors, fusion)
            q = query_scores[:, cols].copy()
            for s, m in enumerate(members):
                if m is not None:  # bit for bit the panel's own score: never counted below itself
                    q[s] = scores[m]
            ordered = np.sort(scores.T, axis=1)  # NaN (cells without embedding) sort last
            counted = count_below(ordered, q).astype(np.float32) / denominator[:, None]
            out[:, cols] = np.where(np.isfinite(q), counted, np.nan)
    return out


# ---------------------------------------------------------------------------------------------
# Per-cell statistics of the default panel


def knot_ranks(size: int, knots: int = STATS_KNOTS) -> np.ndarray:
    """The ranks (0-based, in a panel of ``size`` sorted scores) the knots sit at."""
    k = min(knots, size)
    return np.rint(np.arange(k) * (size - 1) / max(k - 1, 1)).astype(np.int64)


def build_knots(cell_blocks: Iterable[tuple[slice, Mapping[str, np.ndarray]]], n: int,
                vectors: np.ndarray, fusion: str, knots: int = STATS_KNOTS,
                progress: bool = True) -> np.ndarray:
    """(n, K) float16: at each cell, the panel's scores at :func:`knot_ranks` (NaN rows where
    the cell has no embedding)."""
    from tqdm.auto import tqdm

    ranks = knot_ranks(vectors.shape[0], knots)
    out = np.empty((n, ranks.size), dtype=np.float16)
    with tqdm(total=n, desc="panel statistics", unit="cell", unit_scale=True, file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for rows, block in cell_blocks:
            for start in range(0, rows.stop - rows.start, SCORE_CELLS):
                sub = slice(start, min(start + SCORE_CELLS, rows.stop - rows.start))
                scores = panel_scores({m: e[sub] for m, e in block.items()}, vectors, fusion)
                ordered = np.sort(scores.T, axis=1)
                out[rows.start + sub.start:rows.start + sub.stop] = ordered[:, ranks]
                bar.update(sub.stop - sub.start)
    return out


def relative_from_knots(knots: np.ndarray, size: int, query_scores: np.ndarray,
                        members: Sequence[int | None] | None = None,
                        block_cells: int = 65536) -> np.ndarray:
    """``relative`` (S, N) interpolated from per-cell knots ((N, K) at :func:`knot_ranks` of a
    panel of ``size`` species) for fused ``query_scores`` (S, N); see the module notes."""
    query_scores = np.atleast_2d(np.asarray(query_scores, dtype=np.float32))
    members = list(members) if members is not None else [None] * query_scores.shape[0]
    denominator = _members_denominator(size, members)
    ranks = knot_ranks(size, knots.shape[1]).astype(np.float32)
    k = ranks.size
    n = query_scores.shape[1]
    out = np.full(query_scores.shape, np.nan, dtype=np.float32)
    for start in range(0, n, block_cells):
        cols = slice(start, min(start + block_cells, n))
        rows = knots[cols]
        q = query_scores[:, cols]
        j = count_below(rows, q)  # knots below the score: it lies in (knot j-1, knot j]
        lower = np.clip(j - 1, 0, k - 1)
        upper = np.clip(j, 0, k - 1)
        cells = np.arange(rows.shape[0])[None, :]
        v_lo = rows[cells, lower].astype(np.float32)
        v_hi = rows[cells, upper].astype(np.float32)
        r_lo = ranks[lower] + 1.0
        r_hi = ranks[upper]
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.clip((q - v_lo) / (v_hi - v_lo), 0.0, 1.0)
        count = r_lo + t * np.maximum(r_hi - r_lo, 0.0)
        count = np.where(j == 0, 0.0, np.where(j >= k, float(size), count))
        if any(m is not None for m in members):
            # A member's own score is among the panel's: the count of the others below it.
            count = np.minimum(count, denominator[:, None])
        value = (count / denominator[:, None]).astype(np.float32)
        finite = np.isfinite(q) & np.isfinite(rows[:, 0].astype(np.float32))[None, :]
        out[:, cols] = np.where(finite, value, np.nan)
    return out


def stats_family(store_keys: Mapping[str, str], text_ref: str, panel_digest: str, fusion: str,
                 knots: int = STATS_KNOTS) -> str:
    """What the statistics are of (stores, text model, panel, fusion, knots), without the
    stores' records: files of one family replace each other as the stores change."""
    blob = json.dumps({"format": STATS_FORMAT, "stores": dict(sorted(store_keys.items())),
                       "text": text_ref, "panel": panel_digest, "fusion": fusion,
                       "knots": knots}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def _stats_key(family: str, records: Mapping[str, str]) -> str:
    blob = json.dumps({"family": family, "records": dict(sorted(records.items()))},
                      sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def stats_folder(stores: Mapping[str, object], cache_dir: str | os.PathLike | None = None
                 ) -> Path:
    """Where the statistics of ``stores`` are kept: beside the first local store (a hidden
    folder deleted with it), else in the cache (stores on URLs, or a read-only store folder)."""
    from taxamap.paths import cache_subdir
    from taxamap.store import derived_folder

    first = next(iter(stores.values()))
    folder = derived_folder(str(first.location))
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    return cache_subdir("panels", cache_dir) / "stats"


@dataclass
class PanelStats:
    """The default panel's per-cell knots over one grid's stores, as read or computed."""

    knots: np.ndarray
    size: int
    path: Path | None
    computed: bool

    def relative(self, query_scores: np.ndarray,
                 members: Sequence[int | None] | None = None) -> np.ndarray:
        """``relative`` (S, N) of fused ``query_scores`` (S, N) (:func:`relative_from_knots`)."""
        return relative_from_knots(self.knots, self.size, query_scores, members)


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def _read_stats(path: Path, key: str, n: int, k: int) -> tuple[np.ndarray | None, str | None]:
    """(knots, None) when ``path`` holds sound statistics of ``key``; (None, why) otherwise
    (None, None when there is no file)."""
    meta_path = path.with_suffix(".json")
    if not path.exists() and not meta_path.exists():
        return None, None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        knots = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure to read is damage
        return None, f"unreadable ({type(exc).__name__})"
    if meta.get("key") != key or meta.get("format") != STATS_FORMAT:
        return None, "made for other stores or settings"
    if knots.dtype != np.float16 or knots.shape != (n, k):
        return None, f"shape {knots.shape} where ({n}, {k}) was expected"
    if _crc(knots) != int(meta.get("crc32", -1)):
        return None, "checksum mismatch"
    return knots, None


def _write_stats(path: Path, knots: np.ndarray, meta: dict) -> None:
    """The knots then their record, each atomically: a record only ever describes a whole file."""
    from taxamap.io import DiskFull, atomic_path, atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, what=f"writing panel statistics {path}") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, knots, allow_pickle=False)
        atomic_write(path.with_suffix(".json"),
                     json.dumps({**meta, "crc32": _crc(knots)}, indent=1))
    except (OSError, DiskFull) as exc:
        _log.warning(f"could not keep the panel statistics in {path.parent} ({exc}); they are "
                     "computed again next time")


def load_or_build_stats(stores: Mapping[str, object], text_ref: str, panel_digest: str,
                        vectors: np.ndarray, fusion: str, *,
                        cache_dir: str | os.PathLike | None = None,
                        knots: int = STATS_KNOTS, progress: bool = True) -> PanelStats:
    """The default panel's statistics over ``stores`` (EmbeddingStores of one grid): read from
    beside the stores when they match the stores as they are now, else computed from them and
    kept there."""
    from taxamap.panel.cells import blocks

    keys = {m: str(s.key) for m, s in stores.items()}
    records = {m: s.records_digest() for m, s in stores.items()}
    family = stats_family(keys, text_ref, panel_digest, fusion, knots)
    key = _stats_key(family, records)
    folder = stats_folder(stores, cache_dir)
    path = folder / f"panel-{family}-{key}.npy"
    n = next(iter(stores.values())).n_cells
    k = knot_ranks(vectors.shape[0], knots).size
    found, problem = _read_stats(path, key, n, k)
    if found is not None:
        return PanelStats(found, vectors.shape[0], path, computed=False)
    if problem is not None:
        _log.warning(f"panel statistics {path} are damaged ({problem}); computing them again")
    stale = [p for p in folder.glob(f"panel-{family}-*.npy") if p != path] if folder.exists() \
        else []
    if stale and problem is None:
        _log.info("the stores changed since the panel statistics were computed; computing them "
                  "again")
    _log.info(f"computing the reference panel's statistics over {n:,} cells (once per grid, "
              "model and panel)")
    built = build_knots(blocks(stores), n, vectors, fusion, knots, progress)
    _write_stats(path, built, {"format": STATS_FORMAT, "key": key, "family": family,
                               "stores": keys, "records": records, "text": text_ref,
                               "panel": panel_digest, "fusion": fusion, "knots": knots,
                               "cells": n})
    for old in stale:
        for p in (old, old.with_suffix(".json")):
            try:
                p.unlink()
            except OSError:
                pass
    return PanelStats(built, vectors.shape[0], path, computed=True)


# ---------------------------------------------------------------------------------------------
# "No signal"

#: A cell where the query stands at or above this ``relative`` counts as standing out.
STANDOUT = 0.9

#: The query must stand out on at least this fraction of the region's cells to have a signal.
MIN_STANDOUT_FRACTION = 0.01


@dataclass(frozen=True)
class SignalVerdict:
    """Whether a query ever stands out from the panel in the region: ``no_signal`` is True when
    fewer than ``min_fraction`` of the ``cells`` reach ``relative >= standout``; ``fraction``
    is the share that does, ``top`` the highest ``relative`` anywhere."""

    no_signal: bool
    fraction: float
    top: float
    cells: int
    standout: float = STANDOUT
    min_fraction: float = MIN_STANDOUT_FRACTION

    def message(self, query: str, panel: str) -> str:
        """The one warning line (empty when there is a signal)."""
        if not self.no_signal:
            return ""
        return (f"no signal for {query}: it stands above {self.standout:.0%} of the "
                f"{panel} panel's species on {self.fraction:.2%} of the cells (fewer than "
                f"{self.min_fraction:.0%}; highest standing {self.top:.2f}); the model sees "
                "nothing that sets it apart here, so its hotspots are not evidence of presence")

    def tags(self) -> dict[str, str]:
        """Dataset attrs / GeoTIFF tags recording the verdict and its numbers."""
        return {"no_signal": "yes" if self.no_signal else "no",
                "standout_fraction": f"{self.fraction:.6f}",
                "standout_rule": f"relative >= {self.standout:g} on >= "
                                 f"{self.min_fraction:.0%} of cells",
                "relative_max": f"{self.top:.6f}"}


def signal_verdict(relative: np.ndarray, standout: float = STANDOUT,
                   min_fraction: float = MIN_STANDOUT_FRACTION) -> SignalVerdict:
    """The "no signal" rule on one query's ``relative`` map (any shape; NaN cells ignored)."""
    values = np.asarray(relative, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise TaxamapError("the map has no scored cell to judge a signal on")
    fraction = float((values >= standout).mean())
    return SignalVerdict(fraction < min_fraction, fraction, float(values.max()), int(values.size),
                         standout, min_fraction)


__all__ = ["MIN_STANDOUT_FRACTION", "PanelStats", "STANDOUT", "STATS_KNOTS", "SignalVerdict",
           "build_knots", "count_below", "exact_relative", "knot_ranks", "load_or_build_stats",
           "panel_scores", "relative_from_knots", "signal_verdict", "stats_family",
           "stats_folder"]
