"""A map session: one grid kept ready to map any query in milliseconds (the web app's engine).

:func:`taxamap.open_session` builds the grid once, makes sure its embedding stores are complete
(embedding the missing blocks, with progress), and loads every modality's cell embeddings into
memory once, L2-normalised float32. The query encoders (text, photo, sound) load on first use and
stay loaded; prompt embeddings and recent maps are kept in LRU caches. Each
:meth:`MapSession.predict` is then one matrix product per modality
(:func:`taxamap.score.fuse_many`) and returns the same ``xarray.Dataset`` as
:func:`taxamap.predict` (:mod:`taxamap.dataset`).

>>> import taxamap
>>> session = taxamap.open_session(region="usa", resolution=0.05)
>>> ds = session.predict(species="Cardinalis cardinalis")     # a fraction of a second
>>> ds = session.predict(image="bird.jpg")
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.score import DEFAULT_FUSION, FUSIONS, parse_modalities
from taxamap.surface import api_entry
from taxamap.surface import option

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from taxamap.pipeline import GridRequest, Query

#: Cells read from a store per block while loading (bounds the float16 -> float32 temporary).
LOAD_BLOCK_CELLS = 65536


@dataclass(frozen=True)
class EmbeddedQuery:
    """A query embedded once: the :class:`~taxamap.pipeline.Query` (vector, prompt, label,
    slug) and the ``repo@revision`` of the encoder that made it."""

    query: "Query"
    ref: str

    @property
    def label(self) -> str:
        return self.query.label


class LRUCache:
    """A small thread-safe least-recently-used mapping (size 0 keeps nothing)."""

    def __init__(self, size: int):
        self.size = max(0, int(size))
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        if not self.size:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _load_normalised(store) -> tuple[np.ndarray, np.ndarray]:
    """A store's embeddings as one L2-normalised float32 (N, D) array, read block by block, and
    the row norms to hand :func:`~taxamap.score.fuse_many` (1 for embedded cells, NaN for cells
    the modality could not embed, whose rows are zeroed)."""
    n, dim = store.n_cells, store.dim
    out = np.empty((n, dim), dtype=np.float32)
    norms = np.empty(n, dtype=np.float32)
    for start in range(0, n, LOAD_BLOCK_CELLS):
        rows = slice(start, min(start + LOAD_BLOCK_CELLS, n))
        block = store.read(rows)
        length = np.sqrt(np.einsum("ij,ij->i", block, block))
        ok = np.isfinite(length) & (length > 0)
        block[~ok] = 0.0
        block[ok] /= length[ok, None]
        out[rows] = block
        norms[rows] = np.where(ok, 1.0, np.nan)
    return out, norms


class MapSession:
    """One grid with its cell embeddings in memory, mapping queries on demand.

    Build it with :func:`taxamap.open_session`. ``predict`` is thread-safe: a web server may call
    it from many threads. Returned Datasets are shared with the cache: treat them as read-only.
    """

    def __init__(self, req: "GridRequest", fusion: str = DEFAULT_FUSION, *,
                 prompt_cache: int = 1024, map_cache: int = 32):
        import time

        from taxamap.devices import lazy_device
        from taxamap.geography import check_cells
        from taxamap.models.hub import load_config
        from taxamap.pipeline import (GridRequest, PredictRequest, QueryEncoders, build_grid,
                                      check_grid_paths, embed_cells, log, read_repairing)

        if fusion not in FUSIONS:
            raise TaxamapError(f"unknown {option('fusion', fusion)}; choose from "
                               f"{', '.join(FUSIONS)}")
        t0 = time.perf_counter()
        grid_options = {f.name: getattr(req, f.name) for f in fields(GridRequest)}
        self.request = PredictRequest(**grid_options, fusion=fusion)
        self.request.modalities = parse_modalities(self.request.modalities)
        self.request.cells = check_cells(self.request.cells)
        check_grid_paths(self.request)
        self.fusion = fusion
        self._device = lazy_device(self.request.device)
        if (self.request.device or "auto").lower() not in ("auto", "cpu"):
            self._device()  # a GPU the user named must exist before any work starts
        self.config, self.config_ref = load_config(self.request.models_dir)
        self.region, self.grid = build_grid(self.request)
        self.cells = embed_cells(self.request, self.grid, self.config, self._device,
                                 region=self.region.name)
        self._embeddings: dict[str, np.ndarray] = {}
        self._norms: dict[str, np.ndarray] = {}

        def load() -> None:
            for modality, store in self.cells.stores.items():
                self._embeddings[modality], self._norms[modality] = _load_normalised(store)

        # A block found damaged while loading is embedded again before the session opens.
        read_repairing(self.request, self.grid, self.config, self._device, self.cells, load)
        for modality in self.cells.stores:
            if not np.isfinite(self._norms[modality]).any():
                raise TaxamapError(
                    f"no cell could be embedded from the {modality} modality (every input "
                    f"missing or failed); check its source ({option('sat-url')}, the network, "
                    f"{option('worldclim')}) and run again")
        self.encoders = QueryEncoders(self.request, self.config, self._device)
        # One query embedded at a time: the encoders are not all thread-safe (the NumPy text
        # tower narrows BLAS threads process-wide while it runs), and each takes milliseconds.
        self._embed_lock = threading.Lock()
        self._maps = LRUCache(map_cache)
        self._template = None  # the first one-query Dataset: later ones are made like it
        self._satellite = None  # the satellite source, made on the first patch asked for
        self._species = LRUCache(max(prompt_cache, 0))
        self._pixel_cell = np.full(self.grid.height * self.grid.width, -1, dtype=np.int64)
        self._pixel_cell[self.grid.cell_index()] = np.arange(self.grid.n_cells)
        self.load_seconds = time.perf_counter() - t0
        log(f"session ready in {self.load_seconds:.1f} s: {self.memory_bytes / 2**20:,.0f} MiB "
            f"of cell embeddings in memory ({', '.join(self.modalities)})")

    # ------------------------------------------------------------------ facts

    @property
    def modalities(self) -> list[str]:
        """The cell modalities scored, in band order."""
        return list(self._embeddings)

    @property
    def bands(self) -> list[str]:
        """The Dataset's score variables: ``fused`` then each modality."""
        return ["fused", *self.modalities]

    @property
    def n_cells(self) -> int:
        return self.grid.n_cells

    @property
    def embedded_cells(self) -> dict[str, int]:
        """Per modality, the cells it holds an embedding for (the others are NaN in its band)."""
        return {m: int(np.isfinite(n).sum()) for m, n in self._norms.items()}

    @property
    def cells_held(self) -> int:
        """Cells with an embedding from at least one modality: the cells a map can score."""
        held = np.zeros(self.n_cells, dtype=bool)
        for norms in self._norms.values():
            held |= np.isfinite(norms)
        return int(held.sum())

    @property
    def memory_bytes(self) -> int:
        """Bytes of cell embeddings held in memory."""
        return int(sum(e.nbytes + self._norms[m].nbytes for m, e in self._embeddings.items()))

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
        if self._pixel_cell[row * g.width + col] < 0:
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
                plan = plan_modality("satellite", self.request, self.config, self._device,
                                     self.grid.n_cells)
                self._satellite = plan.data_source
        row, col = where
        # The cell centre: the point the patch was cut around when the cell was embedded.
        return patch_at(self._satellite, float(self.grid.row_lats()[row]),
                        float(wrap_lon(self.grid.column_lons()[col])))

    # ------------------------------------------------------------------ queries

    @api_entry
    def embed(self, species: str | None = None, *, image: str | os.PathLike | None = None,
              audio: str | os.PathLike | None = None) -> EmbeddedQuery:
        """Embed one query (a species name, a photo or a recording file) with the session's
        encoders; species are cached by name."""
        from taxamap.pipeline import embed_queries

        if species is not None and not isinstance(species, str):
            raise TaxamapError("embed takes one species name; use predict for several")
        key = None
        if species is not None and image is None and audio is None:
            key = " ".join(species.split()).lower()
            if not key:
                raise TaxamapError("empty species name; type a binomial such as "
                                   "'Cardinalis cardinalis'")
            hit = self._species.get(key)
            if hit is not None:
                return hit
        req = replace(self.request, species=species,
                      image=None if image is None else os.fspath(image),
                      audio=None if audio is None else os.fspath(audio), species_file=None)
        if key is None:  # a file: decoded outside the lock, which holds only its forward pass
            queries, ref = embed_queries(req, self.config, self._device, encoders=self.encoders,
                                         forward_lock=self._embed_lock)
        else:
            with self._embed_lock:
                queries, ref = embed_queries(req, self.config, self._device,
                                             encoders=self.encoders)
        embedded = EmbeddedQuery(queries[0], ref)
        if key is not None:
            self._species.put(key, embedded)
        return embedded

    @staticmethod
    def _map_key(embedded: EmbeddedQuery) -> tuple:
        q = embedded.query
        return (q.label, q.prompt, embedded.ref, q.vector.tobytes())

    def cached_dataset(self, embedded: EmbeddedQuery) -> "xr.Dataset | None":
        """The cached Dataset of a one-query map, or None (nothing is computed)."""
        return self._maps.get(self._map_key(embedded))

    def dataset(self, queries: EmbeddedQuery | Sequence[EmbeddedQuery]) -> "xr.Dataset":
        """The score Dataset of embedded ``queries`` (one: dims (y, x); several: (species, y, x));
        single queries are cached (LRU) by their label, prompt and encoder."""
        from taxamap.pipeline import queries_dataset
        from taxamap.score import fuse_many

        many = list(queries) if isinstance(queries, (list, tuple)) else [queries]
        if not many:
            raise TaxamapError("no query to map")
        key = None
        if len(many) == 1:
            key = self._map_key(many[0])
            hit = self._maps.get(key)
            if hit is not None:
                return hit
        vectors = np.stack([m.query.vector for m in many]).astype(np.float32)
        fused, per = fuse_many(self._embeddings, vectors, self.fusion, row_norms=self._norms)
        template = self._template
        if key is None or template is None:
            ds = queries_dataset(self.request, self.region, self.grid, self.cells,
                                 self.config_ref, [m.query for m in many], many[0].ref, fused, per)
            if key is not None:
                self._template = ds
        else:
            ds = self._like(template, many[0], fused[0], {m: v[0] for m, v in per.items()})
        if key is not None:
            self._maps.put(key, ds)
        return ds

    def _like(self, template, embedded: EmbeddedQuery, fused: np.ndarray,
              per: dict[str, np.ndarray]):
        """A one-query Dataset made like ``template`` (the first one ``queries_dataset`` made:
        same coords, CRS, transform, nodata and variable attrs) holding these scores. Building it
        again through rioxarray costs more than scoring every cell; this is a shallow copy."""
        from taxamap.pipeline import query_provenance

        ds = template.copy(deep=False)
        for name, values in (("fused", fused), *per.items()):
            ds[name].values = self.grid.to_raster(values)
        q = embedded.query
        ds.attrs = {**query_provenance(self.request, self.region, self.cells, self.config_ref,
                                       embedded.ref, list(per)),
                    "bands": template.attrs["bands"], "query": str(q.label),
                    "prompt": q.prompt or "", "slug": str(q.slug)}
        return ds

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
