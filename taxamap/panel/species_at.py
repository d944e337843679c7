""""What lives here?": the panel's species ranked at one cell.

At the cell holding (lat, lon) every panel species is scored exactly as its own map would score
that cell (the fused score of its prompt's embedding against the cell's embeddings), and the
species are ranked by that score, highest first. ``relative`` is each species' standing among
the others at that cell: the fraction of the rest of the panel scoring lower there, the same
number the species' own ``relative`` band holds at that cell. The cell is embedded once and the
panel's prompts come from the panel cache, so no text is encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from taxamap.errors import TaxamapError

#: How the ranking is made, in words (printed with the table, kept in the DataFrame's attrs).
RANKING_RULE = ("ranked by score at this cell (the fused cosine similarity of the species' "
                "prompt with the cell's embedding, as its own map holds it); relative = the "
                "fraction of the other panel species scoring lower here")


def cell_number(grid, lat: float, lon: float) -> int:
    """Index (into the grid's per-cell arrays and stores) of the kept cell holding (``lat``,
    ``lon``) degrees; one :class:`TaxamapError` line when the point is not on a kept cell. Any
    longitude works: it is moved by whole turns into the grid's frame."""
    try:
        lat, lon = float(lat), float(lon)
    except (TypeError, ValueError):
        raise TaxamapError(f"lat and lon must be numbers of degrees, not {lat!r}, {lon!r}") \
            from None
    if not (np.isfinite(lat) and np.isfinite(lon)) or not -90.0 <= lat <= 90.0:
        raise TaxamapError(f"lat {lat} / lon {lon} is not a place on Earth; give degrees, "
                           "latitude in -90..90")
    wrapped = grid.west + (lon - grid.west) % 360.0
    row = int(np.floor((grid.north - lat) / grid.resolution))
    col = int(np.floor((wrapped - grid.west) / grid.resolution))
    west, south, east, north = grid.bounds
    where = f"the grid covers lat {south:g}..{north:g}, lon {west:g}..{east:g}"
    if not (0 <= row < grid.height and 0 <= col < grid.width):
        raise TaxamapError(f"lat {lat:g}, lon {lon:g} is outside the grid ({where}); give a "
                           "point inside the region")
    cell = int(grid.cells_at(np.array([row]), np.array([col]))[0])
    if cell < 0:
        raise TaxamapError(f"lat {lat:g}, lon {lon:g} falls on no cell of the grid (outside "
                           f"the region or its {grid.cells} cells; {where})")
    return cell


@dataclass(frozen=True)
class CellRanking:
    """The panel ranked at one cell: positions into the panel (best first), their scores and
    their standing among the others there."""

    cell: int
    order: np.ndarray
    scores: np.ndarray
    relative: np.ndarray


def rank_at_cell(cell_embeddings: Mapping[str, np.ndarray], vectors: np.ndarray, fusion: str,
                 cell: int = -1) -> CellRanking:
    """Rank the panel of unit ``vectors`` (P, D) at one cell given its embeddings
    ({modality: (1, D)}); species with no score (the cell could not be embedded) are refused."""
    from taxamap.panel.relative import panel_scores

    scores = panel_scores(cell_embeddings, vectors, fusion)[:, 0]
    if not np.isfinite(scores).any():
        raise TaxamapError("this cell has no embedding in any modality (no imagery or climate "
                           "there), so nothing can be ranked at it; pick another point")
    size = scores.shape[0]
    order = np.argsort(-scores, kind="stable")
    ascending = np.sort(scores)
    below = np.searchsorted(ascending, scores, side="left")
    relative = below.astype(np.float32) / max(size - 1, 1)
    return CellRanking(cell, order, scores[order], relative[order])


def ranking_frame(ranking: CellRanking, panel, top: int | None, lat: float, lon: float):
    """The ranking as a DataFrame: rank, name, prompt, score, relative (best first, ``top``
    rows), with the cell and the rule in ``attrs``."""
    import pandas as pd

    if top is not None and (not isinstance(top, (int, np.integer)) or top < 1):
        raise TaxamapError(f"top must be a whole number of species, 1 or more, not {top!r}")
    n = len(ranking.order) if top is None else min(int(top), len(ranking.order))
    idx = ranking.order[:n]
    frame = pd.DataFrame({
        "rank": np.arange(1, n + 1),
        "name": [panel.labels[i] for i in idx],
        "prompt": [panel.prompts[i] for i in idx],
        "score": ranking.scores[:n].astype(np.float64),
        "relative": ranking.relative[:n].astype(np.float64),
    })
    frame.attrs.update(lat=float(lat), lon=float(lon), cell=int(ranking.cell),
                       panel=panel.describe(), rule=RANKING_RULE)
    return frame


__all__ = ["CellRanking", "RANKING_RULE", "cell_number", "rank_at_cell", "ranking_frame"]
