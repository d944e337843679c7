"""The one scorer: a grid and its cell embeddings, scoring query vectors into the Dataset contract.

A :class:`Scorer` is opened over :class:`~taxamap.options.MapOptions`: it checks the folders,
resolves the region, lays the grid and loads the TaxaBind config (in seconds, so a bad input
fails before any cell is embedded); :meth:`Scorer.embed_cells` completes the stores. It then
scores queries either

* from disk (``taxamap predict``): the stores are read block by block, the next block in a
  thread while the current one is scored, so memory holds a couple of blocks however large the
  grid; or
* from memory (:meth:`Scorer.load`: ``taxamap.open_session``, the web app): every modality's
  L2-normalised embeddings are read once and each query is one matrix product.

Both end in :meth:`Scorer.dataset`, the only place a score Dataset is assembled
(:func:`taxamap.dataset.scores_dataset`, with the request's provenance), and a block found
damaged while read is embedded again (:func:`taxamap.cells.read_repairing`).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import numpy as np

from taxamap.cells import (CellEmbeddings, build_grid, check_grid_paths, embed_cells, log,
                           read_repairing)
from taxamap.errors import TaxamapError
from taxamap.score import fuse_many
from taxamap.surface import option

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from taxamap.options import MapOptions
    from taxamap.queries import Query

#: Cells read from a store per block: while scoring from disk, and while loading into memory.
BLOCK_CELLS = 65536
#: Above this many cells a session scores from the stores rather than holding every cell's
#: embeddings in memory (2.5 M cells of 512-d float32 are ~5 GB); the web app draws such grids
#: as map tiles from the embedding pyramids.
MEMORY_CELLS = 2_500_000


def satellite_tags(source: dict | None) -> dict[str, str]:
    """Provenance of the satellite modality: the source's settings (JSON), and its footprint and
    patch size on their own (empty without a satellite modality)."""
    if not source:
        return {}
    tags = {"SATELLITE_SOURCE": json.dumps(source, sort_keys=True)}
    if source.get("footprint_m") is not None:
        tags["SATELLITE_FOOTPRINT_M"] = f"{float(source['footprint_m']):g}"
    if source.get("size") is not None:
        tags["SATELLITE_SIZE_PX"] = str(int(source["size"]))
    return tags


def check_scored(per: dict[str, np.ndarray]) -> None:
    """TaxamapError when a modality has no embedded cell at all."""
    for modality, scores in per.items():
        if not np.isfinite(scores).any():
            raise TaxamapError(
                f"no cell could be embedded from the {modality} modality (every input missing or "
                f"failed); check its source ({option('sat-url')}, the network, "
                f"{option('worldclim')}) and run again")


def _normalised(store) -> tuple[np.ndarray, np.ndarray]:
    """A store's embeddings as one L2-normalised float32 (N, D) array, read block by block, and
    the row norms to hand :func:`~taxamap.score.fuse_many` (1 for embedded cells, NaN for cells
    the modality could not embed, whose rows are zeroed)."""
    n, dim = store.n_cells, store.dim
    out = np.empty((n, dim), dtype=np.float32)
    norms = np.empty(n, dtype=np.float32)
    for start in range(0, n, BLOCK_CELLS):
        rows = slice(start, min(start + BLOCK_CELLS, n))
        block = store.read(rows)
        length = np.sqrt(np.einsum("ij,ij->i", block, block))
        ok = np.isfinite(length) & (length > 0)
        block[~ok] = 0.0
        block[ok] /= length[ok, None]
        out[rows] = block
        norms[rows] = np.where(ok, 1.0, np.nan)
    return out, norms


def score_stores(stores: dict, queries: np.ndarray, fusion: str,
                 block_cells: int = BLOCK_CELLS) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fused and per-modality scores (S, N) of ``queries`` (S, D), streaming the stores block by
    block; the next block is read (and its check records verified) in a thread while the current
    one is scored."""
    n = next(iter(stores.values())).n_cells
    s = queries.shape[0]
    fused = np.empty((s, n), dtype=np.float32)
    per = {m: np.empty((s, n), dtype=np.float32) for m in stores}
    starts = list(range(0, n, block_cells))

    def read(start: int) -> dict:
        rows = slice(start, min(start + block_cells, n))
        return {m: st.read(rows) for m, st in stores.items()}

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="taxamap-read") as pool:
        nxt = pool.submit(read, starts[0])
        for i, start in enumerate(starts):
            block = nxt.result()
            if i + 1 < len(starts):
                nxt = pool.submit(read, starts[i + 1])
            rows = slice(start, min(start + block_cells, n))
            f, p = fuse_many(block, queries, fusion)
            fused[:, rows] = f
            for m in per:
                per[m][:, rows] = p[m]
    return fused, per


class Scorer:
    """A grid and its cell embeddings (:mod:`taxamap.scorer`); ``options`` are the grid's
    :class:`~taxamap.options.MapOptions` (fusion included)."""

    def __init__(self, options: "MapOptions"):
        from taxamap.devices import lazy_device
        from taxamap.models.hub import load_config

        check_grid_paths(options)
        self.options = options
        self.device = lazy_device(options.device)
        if options.device not in ("auto", "cpu"):
            self.device()  # a GPU the user named must exist before any work starts
        self.config, self.config_ref = load_config(options.models)
        self.region, self.grid = build_grid(options)
        self.cells: CellEmbeddings | None = None
        self._memory: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._template = None  # the first one-query Dataset: later ones are made like it

    # ------------------------------------------------------------------ cells

    @property
    def modalities(self) -> list[str]:
        return list(self.options.modalities)

    def embed_cells(self, verify: bool = False) -> CellEmbeddings:
        """Complete every modality's store (computing only missing or damaged blocks)."""
        self.cells = embed_cells(self.options, self.grid, self.config, self.device,
                                 region=self.region.name, verify=verify)
        return self.cells

    def _repairing(self, read):
        if self.cells is None:
            self.embed_cells()
        return read_repairing(self.options, self.grid, self.config, self.device, self.cells, read)

    def load(self) -> None:
        """Hold every modality's L2-normalised cell embeddings in memory (a block found damaged
        on the way is embedded again first)."""
        def read() -> dict:
            return {m: _normalised(store) for m, store in self.cells.stores.items()}

        self._memory = self._repairing(read)
        for modality, (_, norms) in self._memory.items():
            if not np.isfinite(norms).any():
                check_scored({modality: norms})

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    @property
    def memory_bytes(self) -> int:
        """Bytes of cell embeddings held in memory (0 when scoring from disk)."""
        return int(sum(e.nbytes + n.nbytes for e, n in (self._memory or {}).values()))

    def embedded_cells(self) -> dict[str, int]:
        """Cells each modality has an embedding for (held in memory, or by the stores' check
        records)."""
        if self._memory is not None:
            return {m: int(np.isfinite(n).sum()) for m, (_, n) in self._memory.items()}
        stores = self.cells.stores if self.cells else {}
        return {m: int(s.embedded_cells() or 0) for m, s in stores.items()}

    def cells_held(self) -> int:
        """Cells with an embedding from at least one modality held in memory: the cells a map
        can score."""
        held = np.zeros(self.grid.n_cells, dtype=bool)
        for _, norms in (self._memory or {}).values():
            held |= np.isfinite(norms)
        return int(held.sum())

    # ------------------------------------------------------------------ scores

    def score(self, vectors: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused (S, N) and per-modality {modality: (S, N)} raw cosines of query ``vectors``
        (S, D) over the grid's cells (in :meth:`~taxamap.grid.Grid.cell_index` order)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        fusion = self.options.fusion
        if self._memory is not None:
            return fuse_many({m: e for m, (e, _) in self._memory.items()}, vectors, fusion,
                             row_norms={m: n for m, (_, n) in self._memory.items()})
        return self._repairing(lambda: score_stores(self.cells.stores, vectors, fusion))

    def score_cells(self, vectors: np.ndarray, cells: np.ndarray
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """As :meth:`score`, over the cells numbered ``cells`` only (sorted, unique): what a map
        tile shows. From memory it gathers their rows; from disk, the spans of the stores that
        hold them (:meth:`~taxamap.store.EmbeddingStore.gather`)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        cells = np.asarray(cells, dtype=np.int64)
        fusion = self.options.fusion
        if self._memory is not None:
            return fuse_many({m: e[cells] for m, (e, _) in self._memory.items()}, vectors,
                             fusion, row_norms={m: n[cells] for m, (_, n) in self._memory.items()})
        return fuse_many({m: store.gather(cells) for m, store in self.cells.stores.items()},
                         vectors, fusion)

    def provenance(self, query_ref: str, modalities: Sequence[str]) -> dict[str, str]:
        """The provenance attrs of a map of this grid made with the query encoder ``query_ref``
        (see :func:`taxamap.dataset.provenance`)."""
        from taxamap.dataset import provenance

        cells = self.cells
        return provenance(
            modalities=modalities, fusion=self.options.fusion,
            models={"config": self.config_ref, "query": query_ref, **cells.model_refs},
            region_name=self.region.name, region_spec=region_spec(self.options),
            region_outline=self.region.outline, resolution=self.grid.resolution,
            cells=self.options.cells, attribution=cells.attribution, license_=cells.license,
            extra=satellite_tags(cells.sources.get("satellite")),
        )

    def dataset(self, queries: Sequence["Query"], query_ref: str, *,
                scores: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
                extra: dict[str, np.ndarray] | None = None,
                more_attrs: dict[str, str] | None = None) -> "xr.Dataset":
        """The score Dataset of ``queries`` (dims (y, x) for one, (species, y, x) for several):
        ``fused``, one variable per modality, then ``extra`` (S, N) bands; provenance attrs
        (plus ``more_attrs``). ``scores`` are :meth:`score`'s result when the caller has them.
        TaxamapError when a modality has no embedded cell at all."""
        from taxamap.dataset import scores_dataset

        queries = list(queries)
        if not queries:
            raise TaxamapError("no query to map")
        fused, per = scores if scores is not None else self.score(
            np.stack([q.vector for q in queries]))
        check_scored(per)
        attrs = self.provenance(query_ref, list(per))
        attrs.update(more_attrs or {})
        if len(queries) == 1 and not extra and self._template is not None:
            return self._like(queries[0], fused[0], {m: v[0] for m, v in per.items()}, attrs)
        ds = scores_dataset(self.grid, fused, per, labels=[q.label for q in queries],
                            prompts=[q.prompt for q in queries], slugs=[q.slug for q in queries],
                            attrs=attrs, extra=extra)
        if len(queries) > 1:
            ds = ds.assign_coords(taxonomy=("species", [q.source for q in queries]))
        elif not extra:
            self._template = ds
        return ds

    def _like(self, query: "Query", fused: np.ndarray, per: dict[str, np.ndarray],
              attrs: dict[str, str]) -> "xr.Dataset":
        """A one-query Dataset made like the first one (same coords, CRS, transform, nodata and
        variable attrs) holding these scores: building it again through rioxarray costs more
        than scoring every cell; this is a shallow copy."""
        template = self._template
        ds = template.copy(deep=False)
        for name, values in (("fused", fused), *per.items()):
            ds[name].values = self.grid.to_raster(values)
        ds.attrs = {**attrs, "bands": template.attrs["bands"], "query": str(query.label),
                    "prompt": query.prompt or "", "slug": str(query.slug)}
        return ds


def region_spec(options) -> str:
    """How to resolve the options' region again (a GeoTIFF read back has no outline of its own)."""
    from pathlib import Path

    parts = []
    if options.region is not None:
        region = str(options.region)
        path = Path(region).expanduser()
        parts.append(f"region={path.resolve() if path.exists() else region}")
    if options.bbox is not None:
        box = options.bbox if isinstance(options.bbox, str) else ",".join(
            f"{v:g}" for v in options.bbox)
        parts.append(f"bbox={box}")
    return ";".join(parts)


def open_scorer(options: "MapOptions", *, in_memory: bool | None = False, verify: bool = False
                ) -> Scorer:
    """A :class:`Scorer` with its stores complete (and, ``in_memory``, loaded; None: loaded when
    the grid has at most :data:`MEMORY_CELLS` cells)."""
    t0 = time.perf_counter()
    scorer = Scorer(options)
    scorer.embed_cells(verify=verify)
    if in_memory is None:
        in_memory = scorer.grid.n_cells <= MEMORY_CELLS
        if not in_memory:
            log(f"{scorer.grid.n_cells:,} cells: more than the {MEMORY_CELLS:,} held in memory, "
                "so maps are scored from the stores (and drawn as tiles)")
    if in_memory:
        scorer.load()
        log(f"cells ready in {time.perf_counter() - t0:.1f} s: "
            f"{scorer.memory_bytes / 2**20:,.0f} MiB of cell embeddings in memory "
            f"({', '.join(scorer.modalities)})")
    return scorer
