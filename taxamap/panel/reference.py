"""A reference panel ready to score: its species, their prompt embeddings, and what is computed
from them over a grid (``relative``, "what lives here?", richness).

These functions take what a scorer of one grid holds (the grid, its EmbeddingStores per modality
or the same cells as arrays in memory, the fusion rule, a text encoder) and nothing else, so
``predict``, the web session and the CLI commands call the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from taxamap.panel.members import Panel


#: Panels up to this many species are counted exactly at every query (a user's checklist:
#: one (block x D) @ (D x P) product and a sort per block of cells); larger ones (a clade of
#: the default panel) keep per-cell statistics beside the stores, as the default panel does.
EXACT_MAX_SPECIES = 500


@dataclass(frozen=True, eq=False)
class ReferencePanel:
    """A :class:`Panel` with the unit prompt embeddings (P, D) of the text encoder ``ref``."""

    panel: Panel
    vectors: np.ndarray
    ref: str

    def __len__(self) -> int:
        return len(self.panel)

    def vector_of(self, prompt: str | None) -> np.ndarray | None:
        """A member's prompt embedding (no text encoding needed), or None for a non-member."""
        i = self.panel.position(prompt)
        return None if i is None else self.vectors[i]


def prepare_panel(panel: Panel, encoder, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> ReferencePanel:
    """``panel`` with its prompts embedded by ``encoder`` (from the panel cache where it has
    them; the first use of a panel embeds it, with a progress bar)."""
    from taxamap.panel.vectors import embed_prompts

    what = "reference panel" if panel.default else f"panel {panel.name}"
    vectors = embed_prompts(panel.prompts, encoder, cache_dir, progress=progress, what=what)
    return ReferencePanel(panel, vectors, encoder.ref)


def relative_scores(reference: ReferencePanel, stores: Mapping[str, object],
                    query_scores: np.ndarray, query_prompts: Sequence[str | None], fusion: str,
                    *, cache_dir: str | os.PathLike | None = None,
                    progress: bool = True) -> np.ndarray:
    """``relative`` (S, N) of queries with fused scores ``query_scores`` (S, N) and prompts
    ``query_prompts`` (None for a photo or a sound) over the cells of ``stores`` (one grid's
    EmbeddingStores). The default panel, and any panel of more than
    :data:`EXACT_MAX_SPECIES`, reads its per-cell statistics (computed and kept beside the
    stores the first time); smaller panels are counted exactly."""
    from taxamap.panel.cells import blocks
    from taxamap.panel.relative import exact_relative, load_or_build_stats

    members = [reference.panel.position(p) for p in query_prompts]
    if reference.panel.default or len(reference) > EXACT_MAX_SPECIES:
        stats = load_or_build_stats(stores, reference.ref, reference.panel.digest,
                                    reference.vectors, fusion, cache_dir=cache_dir,
                                    progress=progress)
        return stats.relative(query_scores, members)
    return exact_relative(blocks(stores), reference.vectors, query_scores, fusion, members)


def species_at(reference: ReferencePanel, grid, stores: Mapping[str, object], lat: float,
               lon: float, fusion: str, top: int | None = 10):
    """The panel's species ranked at the cell holding (``lat``, ``lon``), as a DataFrame
    (rank, name, prompt, score, relative; the cell and the ranking rule in ``attrs``).
    ``stores`` are the grid's EmbeddingStores or its cells as (N, D) arrays."""
    from taxamap.panel.cells import read_cell
    from taxamap.panel.species_at import cell_number, rank_at_cell, ranking_frame

    cell = cell_number(grid, lat, lon)
    ranking = rank_at_cell(read_cell(stores, cell), reference.vectors, fusion, cell)
    return ranking_frame(ranking, reference.panel, top, lat, lon)


def richness_of(reference: ReferencePanel, stores: Mapping[str, object], rule: str,
                fusion: str, *, progress: bool = True, on_batch=None, batch: int | None = None):
    """:func:`taxamap.panel.richness.richness` of the panel's species over ``stores`` (or the
    same cells as arrays)."""
    from taxamap.panel.cells import blocks, n_cells
    from taxamap.panel.richness import richness

    return richness(lambda: blocks(stores), n_cells(stores), reference.vectors,
                    list(reference.panel.labels), rule, fusion, progress=progress,
                    on_batch=on_batch, batch=batch)


def richness_dataset(result, grid, attrs: Mapping[str, str] | None = None):
    """The richness Dataset: variable ``richness`` (y, x) float32 (species counted; NaN off the
    cells), georeferenced like a score map, with the rule and the species count in attrs."""
    import xarray as xr

    from taxamap.dataset import georeference

    ys = grid.row_lats()
    xs = grid.column_lons()
    ds = xr.Dataset({"richness": (("y", "x"), result.raster(grid))}, coords={"y": ys, "x": xs})
    ds = georeference(ds, grid.crs, grid.transform)
    ds["richness"].attrs.update(units="species", long_name="species whose range holds the cell")
    ds.attrs.update({"rule": result.rule, "species_count": str(len(result.labels)),
                     "species_without_range": str(len(result.empty)), **dict(attrs or {})})
    return ds


__all__ = ["ReferencePanel", "prepare_panel", "relative_scores", "richness_dataset",
           "richness_of", "species_at"]
