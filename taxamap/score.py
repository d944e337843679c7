"""Scoring: cosine similarity of a query embedding with each cell's embeddings, and fusion.

All embeddings are L2-normalised before any dot product. Scores are raw cosines in [-1, 1]; any
display stretch belongs to the HTML/PNG writers.
"""

from __future__ import annotations

import numpy as np

from taxamap.options import DEFAULT_FUSION, check_fusion


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalise along ``axis`` (zero vectors stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cosine(embeddings: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``embeddings`` (N, D) with ``query`` (D,); NaN rows stay NaN."""
    q = normalize(np.asarray(query, dtype=np.float32).reshape(-1))
    e = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(e, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (e @ q) / norms
    return out.astype(np.float32)


def fuse_many(
    embeddings: dict[str, np.ndarray],
    queries: np.ndarray,
    fusion: str = DEFAULT_FUSION,
    row_norms: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Score cells against several queries at once: one matrix product per modality.

    ``embeddings`` maps modality -> (N, D) float array; a row of NaN marks a cell that modality
    could not embed (a missing tile, open water). ``queries`` is (S, D). Fusion uses only the
    modalities a cell has; a cell with none is NaN. Returns (fused (S, N), {modality: (S, N)}).
    ``row_norms`` (modality -> (N,) row norms, NaN or 0 where a cell has no embedding) saves the
    pass over the embeddings that computes them, for callers that score the same cells often.
    """
    fusion = check_fusion(fusion)
    q = normalize(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    per: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    norms: dict[str, np.ndarray] = {}
    for m, e in embeddings.items():
        e = np.asarray(e, dtype=np.float32)
        if row_norms is not None and m in row_norms:
            n = np.asarray(row_norms[m], dtype=np.float32)
        else:
            # One pass for the norms; a NaN row (a cell this modality could not embed) has a NaN
            # norm.
            n = np.sqrt(np.einsum("ij,ij->i", e, e))
        ok = np.isfinite(n) & (n > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = (e @ q.T).T / n  # (S, N)
        scores[:, ~ok] = np.nan
        per[m], valid[m], norms[m] = scores, ok, n
    if len(per) == 1:
        only = next(iter(per.values()))
        return only.copy(), per
    any_valid = np.logical_or.reduce(list(valid.values()))
    if fusion == "mean":
        stack = np.stack(list(per.values()))  # (M, S, N)
        finite = np.isfinite(stack)
        count = finite.sum(axis=0)
        total = np.where(finite, stack, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            fused = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    else:
        # TaxaBind's rule: normalise(sum of the normalised embeddings the cell has) . q
        total = np.zeros((any_valid.shape[0], q.shape[1]), dtype=np.float32)
        for m, e in embeddings.items():
            ok = valid[m]
            total[ok] += np.asarray(e, dtype=np.float32)[ok] / norms[m][ok, None]
        fused = (normalize(total) @ q.T).T
        fused[:, ~any_valid] = np.nan
    return fused.astype(np.float32), per


def fuse(
    embeddings: dict[str, np.ndarray],
    query: np.ndarray,
    fusion: str = DEFAULT_FUSION,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`fuse_many` for one query (D,): returns (fused (N,), {modality: (N,)})."""
    fused, per = fuse_many(embeddings, np.asarray(query).reshape(1, -1), fusion)
    return fused[0], {m: v[0] for m, v in per.items()}


def fuse_scored(per: dict[str, np.ndarray], fusion: str = DEFAULT_FUSION,
                sum_norms: np.ndarray | None = None) -> np.ndarray:
    """The fused (S, N) map of per-modality cosines ``per`` (NaN where a cell has no embedding
    of that modality), as :func:`fuse_many` fuses them: ``mean`` averages the cosines a cell
    has; ``sum`` (TaxaBind's rule) is their sum over ``sum_norms``, the length of the sum of
    the cell's unit embeddings (NaN where it has none): (sum of e_m / |e_m|) . q / |sum| is
    exactly that, so the fused score needs no embedding but the per-modality scores."""
    fusion = check_fusion(fusion)
    maps = list(per.values())
    if len(maps) == 1:
        return maps[0].copy()
    finite = [np.isfinite(m) for m in maps]
    total = np.zeros_like(maps[0])
    count = np.zeros(maps[0].shape, dtype=np.int32)
    for m, ok in zip(maps, finite):
        np.add(total, m, out=total, where=ok)
        count += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        if fusion == "mean":
            return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
        if sum_norms is None:
            raise ValueError("sum fusion of several modalities needs sum_norms")
        return np.where(count > 0, total / sum_norms, np.nan).astype(np.float32)

