"""A map session: one grid kept ready to map any query in milliseconds (the web app's engine).

:func:`taxamap.open_session` opens a :class:`~taxamap.scorer.Scorer` over one grid, completes its
stores (embedding the missing blocks, with progress) and keeps every modality's cell embeddings
ready in memory: float16 rows memory-mapped from the stores, 4 bytes per cell held
(:class:`~taxamap.scorer.CellMatrix`). A :class:`MapSession` is that scorer plus the query encoders (text, photo, sound: loaded
on first use, kept) and bounded caches of embedded species and of recent maps: each
:meth:`MapSession.predict` is one matrix product per modality and returns the same
``xarray.Dataset`` as :func:`taxamap.predict` (:mod:`taxamap.dataset`).

>>> import taxamap
>>> session = taxamap.open_session(region="usa", resolution=0.05)
>>> ds = session.predict(species="Cardinalis cardinalis")     # a fraction of a second
>>> ds = session.predict(image="bird.jpg")
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from taxamap.cells import log
from taxamap.errors import TaxamapError
from taxamap.options import MapOptions, PredictOptions, build, values_of
from taxamap.queries import Query, QueryEncoders, embed_queries
from taxamap.scorer import open_scorer
from taxamap.surface import api_entry

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr


@dataclass(frozen=True, eq=False)
class EmbeddedQuery:
    """A query embedded once: the :class:`~taxamap.queries.Query` (vector, prompt, label, slug)
    and the ``repo@revision`` of the encoder that made it. Equal (and hashed) by what makes its
    map: label, prompt, encoder and vector."""

    query: Query
    ref: str

    @property
    def label(self) -> str:
        return self.query.label

    @functools.cached_property
    def _identity(self) -> tuple:
        q = self.query
        return (q.label, q.prompt, self.ref, np.asarray(q.vector, dtype=np.float32).tobytes())

    def __eq__(self, other) -> bool:
        return isinstance(other, EmbeddedQuery) and self._identity == other._identity

    def __hash__(self) -> int:
        return hash(self._identity)


def with_query(options: MapOptions, **query) -> PredictOptions:
    """``options`` (a grid and its fusion) with a query (``species=``, ``image=``, ``audio=``)."""
    return build(PredictOptions, {**values_of(options), **query})


class MapSession:
    """One grid with its cell embeddings in memory, mapping queries on demand.

    Build it with :func:`taxamap.open_session`. ``predict`` is thread-safe: a web server may call
    it from many threads; at most ``compute_slots`` maps are computed at once (more only thrash
    memory bandwidth), while cached maps never wait. Returned Datasets are shared with the cache:
    treat them as read-only.
    """

    def __init__(self, options: MapOptions, *, prompt_cache: int = 1024, map_cache: int = 32,
                 compute_slots: int | None = None, in_memory: bool | None = None):
        t0 = time.perf_counter()
        self.options = options
        # None: in memory unless the grid is too large for it (the world at 0.05 deg)
        self.scorer = open_scorer(options, in_memory=in_memory)
        self.encoders = QueryEncoders(options, self.scorer.config, self.scorer.device)
        # One query embedded at a time: the encoders are not all thread-safe (the NumPy text
        # tower narrows BLAS threads process-wide while it runs), and each takes milliseconds.
        self._embed_lock = threading.Lock()
        self._compute = threading.BoundedSemaphore(compute_slots or max(1, os.cpu_count() or 1))
        self._satellite = None  # the satellite source, made on the first patch asked for
        self._species = functools.lru_cache(maxsize=max(prompt_cache, 0))(self._embed_name)
        self._maps = functools.lru_cache(maxsize=max(map_cache, 0))(self._map_of)
        self.panel = self._open_panel()
        self.load_seconds = time.perf_counter() - t0
        log(f"session ready in {self.load_seconds:.1f} s")

    def _open_panel(self):
        """The reference panel: prepared now (prompts embedded once, statistics over the grid)
        when maps carry ``relative``; else held only if the cache has it, and prepared on the
        first "what lives here?"."""
        from taxamap.panel.product import GridPanel

        panel = GridPanel(self.scorer, lambda n: self.encoders.text(n_prompts=n),
                          panel=self.options.panel, progress=self.options.progress)
        if self.options.relative:
            panel.warm()
            log(f"reference panel ready: {panel.panel.describe()}")
        else:
            panel.load_cached()
        return panel

    # ------------------------------------------------------------------ facts

    @property
    def region(self):
        return self.scorer.region

    @property
    def grid(self):
        return self.scorer.grid

    @property
    def cells(self):
        return self.scorer.cells

    @property
    def config(self) -> dict:
        return self.scorer.config

    @property
    def fusion(self) -> str:
        return self.options.fusion

    @property
    def modalities(self) -> list[str]:
        """The cell modalities scored, in band order."""
        return self.scorer.modalities

    @property
    def bands(self) -> list[str]:
        """The Dataset's score variables: ``fused``, each modality, the trust bands
        (``disagreement`` with two or more modalities; ``mess``, ``mess_variable`` with the
        environment modality), then ``relative`` when the session has it."""
        from taxamap.dataset import in_band_order

        first = ["fused", *self.modalities]
        rest = [b for b in self.scorer.band_names() if b not in first]
        rest += ["relative"] if self.options.relative else []
        return [*first, *in_band_order(dict.fromkeys(rest))]

    @property
    def n_cells(self) -> int:
        return self.grid.n_cells

    @property
    def embedded_cells(self) -> dict[str, int]:
        """Per modality, the cells it holds an embedding for (the others are NaN in its band)."""
        return self.scorer.embedded_cells()

    @property
    def cells_held(self) -> int:
        """Cells with an embedding from at least one modality: the cells a map can score."""
        return self.scorer.cells_held()

    @property
    def memory_bytes(self) -> int:
        """Bytes of cell embeddings held in memory."""
        return self.scorer.memory_bytes

    def cell_at(self, lat: float, lon: float) -> tuple[int, int] | None:
        """(row, col) of the kept cell containing (``lat``, ``lon``) degrees, or None outside the
        grid's cells. Any longitude works: it is moved by whole turns into the grid's frame."""
        g = self.grid
        if not (np.isfinite(lat) and np.isfinite(lon)):
            return None
        lon = g.west + (float(lon) - g.west) % 360.0
        row = int(np.floor((g.north - float(lat)) / g.resolution))
        col = int(np.floor((lon - g.west) / g.resolution))
        if not (0 <= row < g.height and 0 <= col < g.width):
            return None
        if g.cells_at(np.array([row]), np.array([col]))[0] < 0:
            return None
        return row, col

    def satellite_patch(self, lat: float, lon: float) -> tuple[np.ndarray | None, dict]:
        """The satellite patch the encoder was given for the cell holding (``lat``, ``lon``):
        (an (size, size, 3) uint8 RGB array or None where the source has none, and
        :func:`taxamap.sources.satellite.patch_at`'s description: footprint, request, credit,
        why it is missing). TaxamapError without a satellite modality or outside the cells."""
        from taxamap.crs import wrap_lon
        from taxamap.modalities import plan_modality
        from taxamap.sources.satellite import patch_at

        if "satellite" not in self.modalities:
            raise TaxamapError("this session has no satellite modality, so no patches")
        where = self.cell_at(lat, lon)
        if where is None:
            raise TaxamapError(f"no cell of this grid at lat {lat:.4f}, lon {lon:.4f}")
        with self._embed_lock:
            if self._satellite is None:
                plan = plan_modality("satellite", self.options, self.config, self.scorer.device,
                                     self.grid.n_cells)
                self._satellite = plan.data_source
        row, col = where
        # The cell centre: the point the patch was cut around when the cell was embedded.
        return patch_at(self._satellite, float(self.grid.row_lats()[row]),
                        float(wrap_lon(self.grid.column_lons()[col])))

    # ------------------------------------------------------------------ queries

    def _embed(self, lock, **query) -> EmbeddedQuery:
        queries, ref = embed_queries(with_query(self.options, **query), self.config,
                                     self.scorer.device, encoders=self.encoders,
                                     forward_lock=lock, panel=self.panel)
        return EmbeddedQuery(queries[0], ref)

    def _embed_name(self, name: str) -> EmbeddedQuery:
        with self._embed_lock:
            return self._embed(None, species=name)

    @api_entry
    def embed(self, species: str | None = None, *, image: str | os.PathLike | None = None,
              audio: str | os.PathLike | None = None) -> EmbeddedQuery:
        """Embed one query (a species name, a photo or a recording file) with the session's
        encoders; species are cached by name."""
        if species is not None and not isinstance(species, str):
            raise TaxamapError("embed takes one species name; use predict for several")
        if species is not None and image is None and audio is None:
            key = " ".join(species.split())
            if not key:
                raise TaxamapError("empty species name; type a binomial such as "
                                   "'Cardinalis cardinalis'")
            return self._species(key.lower())
        # A file: decoded outside the lock, which holds only its forward pass.
        return self._embed(self._embed_lock, species=species, image=image, audio=audio)

    def _map_of(self, embedded: EmbeddedQuery) -> "xr.Dataset":
        with self._compute:
            if not self.options.relative:
                return self.scorer.dataset([embedded.query], embedded.ref)
            scores = self.scorer.score(embedded.query.vector[None])
            relative, verdicts = self.panel.relative_band(scores[0], [embedded.query])
            return self.scorer.dataset([embedded.query], embedded.ref, scores=scores,
                                       extra={"relative": relative}, more_attrs=verdicts[0])

    @api_entry
    def species_at(self, lat: float, lon: float, top: int | None = 10) -> "pd.DataFrame":
        """The reference panel's species ranked at the cell holding (``lat``, ``lon``), best
        first (:func:`taxamap.species_at`); the panel is prepared on the first call."""
        return self.panel.species_at(lat, lon, top)

    def dataset(self, queries: EmbeddedQuery | Sequence[EmbeddedQuery]) -> "xr.Dataset":
        """The score Dataset of embedded ``queries`` (one: dims (y, x); several: (species, y, x));
        single queries are cached (least recently used out) by label, prompt, encoder and
        vector."""
        many = list(queries) if isinstance(queries, (list, tuple)) else [queries]
        if not many:
            raise TaxamapError("no query to map")
        if len(many) == 1:
            return self._maps(many[0])
        with self._compute:
            return self.scorer.dataset([m.query for m in many], many[0].ref)

    @api_entry
    def predict(self, species: str | Sequence[str] | None = None, *,
                image: str | os.PathLike | None = None,
                audio: str | os.PathLike | None = None) -> "xr.Dataset":
        """Score maps of a query, as :func:`taxamap.predict` returns them: ``species`` (a name,
        or a list of names), ``image`` (a photo file) or ``audio`` (a recording file)."""
        given = [x for x in (species, image, audio) if x is not None]
        if len(given) != 1:
            raise TaxamapError("give exactly one query: species=NAME, image=PATH or audio=PATH")
        if species is not None and not isinstance(species, str):
            names = list(dict.fromkeys(" ".join(str(n).split()) for n in species))
            names = [n for n in names if n]
            if not names:
                raise TaxamapError("no species given")
            embedded = [self.embed(n) for n in names]
            unique = list({e.query.prompt: e for e in embedded}.values())
            return self.dataset(unique if len(unique) > 1 else unique[0])
        return self.dataset(self.embed(species, image=image, audio=audio))

    def __repr__(self) -> str:
        return (f"MapSession({self.region.name!r}, {self.n_cells:,} cells of "
                f"{self.grid.resolution} deg, modalities={','.join(self.modalities)})")

