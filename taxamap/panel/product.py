"""The reference panel of one scorer's grid, as the product uses it: the ``relative`` band and its
"no signal" verdict for maps, "what lives here?" and richness.

:class:`GridPanel` is made over a :class:`~taxamap.scorer.Scorer` (disk or memory) and the map
options (``panel``, ``clade``); its prompt embeddings come from the panel cache, and the text
encoder is loaded only for prompts the cache lacks (the first use of a panel), so a panel
species' map, ranking or count needs no text encoding at all.
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from taxamap.panel.members import Panel, resolve_panel
from taxamap.panel.reference import ReferencePanel

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_log = logging.getLogger("taxamap")

#: The Dataset variable (and GeoTIFF band) of the panel-relative score.
RELATIVE_BAND = "relative"


class LazyText:
    """A text encoder that loads on its first ``encode_text``: its ``ref`` (the prompt cache's
    key) is read from the model files without loading the weights."""

    def __init__(self, ref: str, load: Callable[[], object]):
        self.ref = ref
        self._load = load
        self._encoder = None
        self._lock = threading.Lock()

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load()
        return self._encoder.encode_text(list(prompts))


class GridPanel:
    """The reference panel (``panel``: a file, or None for the table's species; ``clade``: a
    rank prefix) over ``scorer``'s grid. ``text(n)`` returns a loaded text encoder for ``n``
    prompts (a :class:`~taxamap.queries.QueryEncoders`' ``text``)."""

    def __init__(self, scorer, text: Callable[[int], object], *, panel=None,
                 clade: str | None = None, progress: bool = True):
        from taxamap.panel.vectors import text_ref

        self.scorer = scorer
        self.options = scorer.options
        self.cache = self.options.cache
        self.progress = progress
        self._spec = (panel, clade)
        self._text = text
        self._ref = text_ref(self.options.models, scorer.config)
        self._lock = threading.Lock()
        self._ready: ReferencePanel | None = None

    @cached_property
    def panel(self) -> Panel:
        """The panel's species (a bad file or clade fails here, in one line)."""
        panel, clade = self._spec
        return resolve_panel(panel, clade, self.cache)

    @property
    def ready(self) -> bool:
        """Whether the panel's prompt embeddings are held (no encoding needed any more)."""
        return self._ready is not None

    @property
    def reference(self) -> ReferencePanel:
        """The panel with its prompt embeddings (embedded now where the cache lacks them)."""
        from taxamap.panel.reference import prepare_panel

        with self._lock:
            if self._ready is None:
                encoder = LazyText(self._ref, lambda: self._text(len(self.panel)))
                self._ready = prepare_panel(self.panel, encoder, self.cache,
                                            progress=self.progress)
            return self._ready

    def load_cached(self) -> bool:
        """Hold the panel's embeddings if the cache has every one (never encodes); whether it
        did."""
        from taxamap.panel.vectors import cached_vectors

        if self._ready is None:
            vectors = cached_vectors(self.panel.prompts, self._ref, self.cache)
            if vectors is not None:
                with self._lock:
                    self._ready = ReferencePanel(self.panel, vectors, self._ref)
        return self._ready is not None

    def vector_of(self, prompt: str | None) -> np.ndarray | None:
        """A member's prompt embedding once the panel is held (else None: encode it)."""
        return None if self._ready is None else self._ready.vector_of(prompt)

    @property
    def text_ref(self) -> str:
        """``repo@revision`` of the text encoder the panel's embeddings come from."""
        return self._ref

    # ------------------------------------------------------------------ maps

    def warm(self) -> None:
        """Embed the panel's prompts and compute (or read) its per-cell statistics now, so the
        first map does not wait for them."""
        from taxamap.panel.reference import EXACT_MAX_SPECIES

        reference = self.reference
        if reference.panel.default or len(reference) > EXACT_MAX_SPECIES:
            self.relative(np.zeros((1, self.scorer.grid.n_cells), dtype=np.float32), [None])

    def relative(self, fused: np.ndarray, prompts: Sequence[str | None]) -> np.ndarray:
        """``relative`` (S, N) of fused scores (S, N) of queries with these ``prompts``."""
        from taxamap.panel.reference import relative_scores

        scorer = self.scorer
        return relative_scores(self.reference, scorer.cells.stores, fused, list(prompts),
                               self.options.fusion, cache_dir=self.cache,
                               progress=self.progress)

    def relative_band(self, fused: np.ndarray, queries: Sequence) -> tuple[np.ndarray, list[dict]]:
        """The ``relative`` (S, N) of ``queries`` (with ``.prompt`` and ``.label``) scored
        ``fused``, and each one's verdict attrs; a query without signal is one warning line."""
        from taxamap.panel.relative import signal_verdict

        relative = self.relative(fused, [q.prompt for q in queries])
        verdicts = []
        for query, row in zip(queries, relative):
            verdict = signal_verdict(row)
            if verdict.no_signal:
                _log.warning(verdict.message(query.label, self.panel.describe()))
            verdicts.append({**verdict.tags(), "panel": self.panel.describe()})
        return relative, verdicts

    # ------------------------------------------------------------------ questions

    def species_at(self, lat: float, lon: float, top: int | None = 10) -> "pd.DataFrame":
        """The panel's species ranked at the cell holding (``lat``, ``lon``)."""
        from taxamap.panel.reference import species_at

        scorer = self.scorer
        # One cell's rows, read from the stores (a session's cells are float16 blocks mapped
        # from them, not arrays to index).
        return species_at(self.reference, scorer.grid, scorer.cells.stores, lat, lon,
                          self.options.fusion, top)


def mark_verdicts(ds, verdicts: list[dict]):
    """``ds`` (a map of several queries) with each query's verdict as coordinates along
    ``species`` (:data:`taxamap.dataset.PER_QUERY_ATTRS`); one query's verdict goes in its
    attrs when it is made (``more_attrs``)."""
    from taxamap.dataset import PER_QUERY_ATTRS

    if "species" not in ds.dims:
        ds.attrs.update(verdicts[0])
        return ds
    return ds.assign_coords({k: ("species", [v[k] for v in verdicts]) for k in PER_QUERY_ATTRS})


def shared_attrs(verdicts: list[dict]) -> dict[str, str]:
    """The verdict attrs every query of a map shares (the panel, the rule)."""
    from taxamap.dataset import PER_QUERY_ATTRS

    return {k: v for k, v in verdicts[0].items() if k not in PER_QUERY_ATTRS} if verdicts else {}


__all__ = ["GridPanel", "LazyText", "RELATIVE_BAND", "mark_verdicts", "shared_attrs"]
