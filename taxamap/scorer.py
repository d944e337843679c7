"""The one scorer: a grid and its cell embeddings, scoring query vectors into the Dataset contract.

A :class:`Scorer` is opened over :class:`~taxamap.options.MapOptions`: it checks the folders,
resolves the region, lays the grid and loads the TaxaBind config (in seconds, so a bad input
fails before any cell is embedded); :meth:`Scorer.embed_cells` completes the stores. It then
scores queries either

* from disk (``taxamap predict``): the stores are read block by block, the next block in a
  thread while the current one is scored, so memory holds a couple of blocks however large the
  grid; or
* from memory (:meth:`Scorer.load`: ``taxamap.open_session``, the web app): every modality's
  blocks are read once (CRC-checked, row lengths kept), then memory-mapped from the store as
  float16 (:class:`CellMatrix`: no float32 copy of the grid), and each query (or several, as
  one product) is one float16 matrix product per modality.

Both end in :meth:`Scorer.dataset`, the only place a score Dataset is assembled
(:func:`taxamap.dataset.scores_dataset`, with the request's provenance), and a block found
damaged while read is embedded again (:func:`taxamap.cells.read_repairing`).
"""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import numpy as np

from taxamap.cells import (CellEmbeddings, build_grid, check_grid_paths, embed_cells, log,
                           read_repairing)
from taxamap.errors import TaxamapError
from taxamap.score import fuse_many, fuse_scored, normalize
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


class CellMatrix:
    """One modality's cells, held for scoring in memory without a float32 copy of the grid.

    ``blocks``: (first row, float16 tensor of rows) per store block; a block is a
    memory-mapped view of the store's chunk file where the store is a local folder of plain
    bytes (:meth:`~taxamap.store.EmbeddingStore.mapped_block`: nothing copied, file cache
    pages), else a float16 copy of its rows (the store's own bytes: scores are the same).
    ``inv_norms``: 1 / row length in float32 (NaN for a cell the modality could not embed), so
    a cosine is one float16 dot product scaled once, and the NaN cells stay NaN.
    """

    def __init__(self, n_cells: int, blocks: list, inv_norms: np.ndarray, mapped: list[bool]):
        self.n_cells, self.blocks, self.inv_norms, self.mapped = n_cells, blocks, inv_norms, mapped

    @classmethod
    def from_store(cls, store) -> "CellMatrix":
        """Each block of ``store`` read once (its CRC checked: :meth:`EmbeddingStore.read`) for
        its row lengths, then mapped (or, where it cannot be, kept as float16)."""
        import torch

        inv = np.full(store.n_cells, np.nan, dtype=np.float32)
        blocks, mapped = [], []
        for b in range(store.n_chunks):
            rows = store.chunk_slice(b)
            block = store.read(rows)
            length = np.sqrt(np.einsum("ij,ij->i", block, block))
            ok = np.isfinite(length) & (length > 0)
            inv[rows][ok] = 1.0 / length[ok]
            view = store.mapped_block(b)
            mapped.append(view is not None)
            rows16 = view if view is not None else block.astype(np.float16)
            del block
            blocks.append((rows.start, torch.from_numpy(rows16)))
        return cls(store.n_cells, blocks, inv, mapped)

    @property
    def held_bytes(self) -> int:
        """Bytes this process holds for these cells (the copies and the row lengths; mapped
        blocks are the OS's file cache)."""
        copies = sum(t.numel() * t.element_size()
                     for (_, t), m in zip(self.blocks, self.mapped) if not m)
        return int(copies + self.inv_norms.nbytes)

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the store's chunk files mapped (read from the file cache while scoring)."""
        return int(sum(t.numel() * t.element_size()
                       for (_, t), m in zip(self.blocks, self.mapped) if m))

    @property
    def dtypes(self) -> set:
        """The element types held (float16 only: no float32 copy of the cells)."""
        return {t.dtype for _, t in self.blocks} | {self.inv_norms.dtype}

    def cosines(self, queries: np.ndarray) -> np.ndarray:
        """(S, N) float32 cosines of unit ``queries`` (S, D) with every cell (NaN where the cell
        has no embedding).

        Kernel: torch's float16 GEMM on CPU, one ``torch.mm`` (queries x block rows) per
        block, which reads the float16 rows once, widens them in registers and accumulates in
        float32. Scoring is bound by reading the rows, so half the bytes of float32 is about
        half the time; NumPy has no float16 BLAS kernel (its ``matmul`` on float16 loops in C,
        ~60x slower) and a float32 copy would double the memory. ``torch.mm`` rather than
        ``torch.mv`` for one query too: 32 vs 47 ms over the USA at 0.05 deg on a 2-core
        AVX512/AMX Xeon (not measured elsewhere), and its value for a cell does not depend on
        which other cells are in the product, so :meth:`cosines_at` (a tile's cells) gives the
        very same values. The float16 result (relative rounding 2^-11) is scaled by the row
        lengths in float32.
        """
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(torch.float16)
        raw = torch.empty((q.shape[0], self.n_cells), dtype=torch.float16)
        for start, rows in self.blocks:
            stop = start + rows.shape[0]
            if q.shape[0] == 1:
                torch.mm(q, rows.T, out=raw[:, start:stop])  # contiguous: no temporary
            else:
                raw[:, start:stop] = torch.mm(q, rows.T)
        return (raw.float() * torch.from_numpy(self.inv_norms)).numpy()

    def cosines_at(self, queries: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """(S, len(cells)) float32 cosines of unit ``queries`` with the cells numbered ``cells``
        (sorted): a map tile's cells, gathered from the blocks that hold them and scored with
        :meth:`cosines`' kernel, so a tile shows the very values of the map."""
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(torch.float16)
        raw = torch.full((q.shape[0], cells.size), float("nan"), dtype=torch.float16)
        for start, rows in self.blocks:
            lo, hi = (int(v) for v in np.searchsorted(cells, [start, start + rows.shape[0]]))
            if hi > lo:
                picked = rows[torch.from_numpy(cells[lo:hi] - start)]
                raw[:, lo:hi] = torch.mm(q, picked.T)
        return (raw.float() * torch.from_numpy(self.inv_norms[cells])).numpy()


def sum_norms(cells: dict[str, CellMatrix]) -> np.ndarray:
    """Per cell, the length of the sum of its modalities' unit embeddings (NaN where it has
    none): what the ``sum`` fusion divides by (:func:`~taxamap.score.fuse_scored`)."""
    n = next(iter(cells.values())).n_cells
    out = np.full(n, np.nan, dtype=np.float32)
    for start in range(0, n, BLOCK_CELLS):
        stop = min(start + BLOCK_CELLS, n)
        total = np.zeros((stop - start, 1), dtype=np.float32)
        held = np.zeros(stop - start, dtype=bool)
        for matrix in cells.values():
            inv = matrix.inv_norms[start:stop]
            ok = np.isfinite(inv)
            total = total + np.where(ok[:, None], _rows(matrix, start, stop) * inv[:, None], 0)
            held |= ok
        out[start:stop] = np.where(held, np.linalg.norm(total, axis=1), np.nan)
    return out


def _rows(matrix: CellMatrix, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``matrix`` as float32 (a block-sized copy)."""
    parts = []
    for first, block in matrix.blocks:
        lo, hi = max(start, first), min(stop, first + block.shape[0])
        if lo < hi:
            parts.append(block[lo - first:hi - first].float().numpy())
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


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
        self._memory: dict[str, CellMatrix] | None = None
        self._sum_norms: np.ndarray | None = None  # the sum fusion's divisor, in memory
        # (extra bands, the first one-query Dataset with them): later ones are made like it
        self._template: tuple[tuple[str, ...], "xr.Dataset"] | None = None
        self._region_mess = None  # the cells' MESS against the region, made once per grid

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
        """Make every modality's cells ready to score from memory without a float32 copy of the
        grid: each block is read once (its CRC checked; a block found damaged on the way is
        embedded again first), its row lengths kept, its float16 rows memory-mapped from the
        store (or copied as float16 where the store cannot be mapped): :class:`CellMatrix`."""
        def read() -> dict:
            return {m: CellMatrix.from_store(store) for m, store in self.cells.stores.items()}

        self._memory = self._repairing(read)
        for modality, matrix in self._memory.items():
            if not np.isfinite(matrix.inv_norms).any():
                check_scored({modality: matrix.inv_norms})
        if self.options.fusion == "sum" and len(self._memory) > 1:
            self._sum_norms = sum_norms(self._memory)

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    @property
    def memory_bytes(self) -> int:
        """Bytes of cell data this process holds for in-memory scoring (float16 copies, row
        lengths; 0 when scoring from disk). Mapped store files are :attr:`mapped_bytes`."""
        extra = 0 if self._sum_norms is None else self._sum_norms.nbytes
        return int(sum(m.held_bytes for m in (self._memory or {}).values()) + extra)

    @property
    def mapped_bytes(self) -> int:
        """Bytes of store files memory-mapped for in-memory scoring."""
        return int(sum(m.mapped_bytes for m in (self._memory or {}).values()))

    def held_dtypes(self) -> set:
        """The element types of the cell data held for in-memory scoring."""
        return set().union(*(m.dtypes for m in (self._memory or {}).values()))

    def embedded_cells(self) -> dict[str, int]:
        """Cells each modality has an embedding for (held in memory, or by the stores' check
        records)."""
        if self._memory is not None:
            return {m: int(np.isfinite(c.inv_norms).sum()) for m, c in self._memory.items()}
        stores = self.cells.stores if self.cells else {}
        return {m: int(s.embedded_cells() or 0) for m, s in stores.items()}

    def cells_held(self) -> int:
        """Cells with an embedding from at least one modality held in memory: the cells a map
        can score."""
        held = np.zeros(self.grid.n_cells, dtype=bool)
        for matrix in (self._memory or {}).values():
            held |= np.isfinite(matrix.inv_norms)
        return int(held.sum())

    # ------------------------------------------------------------------ scores

    def score(self, vectors: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused (S, N) and per-modality {modality: (S, N)} raw cosines of query ``vectors``
        (S, D) over the grid's cells (in :meth:`~taxamap.grid.Grid.cell_index` order)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        fusion = self.options.fusion
        if self._memory is not None:
            unit = normalize(vectors)
            per = {m: matrix.cosines(unit) for m, matrix in self._memory.items()}
            return fuse_scored(per, fusion, self._sum_norms), per
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
            unit = normalize(vectors)
            per = {m: matrix.cosines_at(unit, cells) for m, matrix in self._memory.items()}
            norms = None if self._sum_norms is None else self._sum_norms[cells]
            return fuse_scored(per, fusion, norms), per
        return fuse_many({m: store.gather(cells) for m, store in self.cells.stores.items()},
                         vectors, fusion)

    @functools.cached_property
    def _outline_wkt(self) -> str:
        """The region outline as the maps carry it (simplifying it took ~2 ms a web map)."""
        from taxamap.dataset import outline_text

        return outline_text(self.region.outline, self.grid.resolution)

    def provenance(self, query_ref: str, modalities: Sequence[str]) -> dict[str, str]:
        """The provenance attrs of a map of this grid made with the query encoder ``query_ref``
        (see :func:`taxamap.dataset.provenance`)."""
        from taxamap.dataset import provenance

        cells = self.cells
        return provenance(
            modalities=modalities, fusion=self.options.fusion,
            models={"config": self.config_ref, "query": query_ref, **cells.model_refs},
            region_name=self.region.name, region_spec=region_spec(self.options),
            region_outline=self._outline_wkt, resolution=self.grid.resolution,
            cells=self.options.cells, attribution=cells.attribution, license_=cells.license,
            extra={**satellite_tags(cells.sources.get("satellite")),
                   **{f"precision_{m}": p for m, p in cells.precisions.items()}},
        )

    # ------------------------------------------------------------------ trust bands

    def climate_mess(self, reference_latlon: np.ndarray | None = None):
        """MESS (:func:`taxamap.products.trust.climate_mess`) of the grid's cells' WorldClim
        variables against the cells at ``reference_latlon`` ((M, 2) lat/lon: a fit's presence
        and background cells), else against the region's own cells (made once per grid)."""
        from taxamap.products.trust import climate_mess
        from taxamap.sources.worldclim import WorldClimFeatures

        if reference_latlon is None and self._region_mess is not None:
            return self._region_mess
        features = WorldClimFeatures(self.options.worldclim, env_array=self.options.env_array)
        result = climate_mess(features, self.grid.cell_latlon(), reference_latlon)
        if reference_latlon is None:
            self._region_mess = result
        return result

    def trust_bands(self, per: dict[str, np.ndarray], *, mess: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The bands saying where a zero-shot map can be trusted, (S, N) each, and their attrs:
        ``disagreement`` (two or more modalities: the spread of the raw per-modality cosines)
        and, with the environment modality and ``mess``, ``mess`` and ``mess_variable`` against
        the region's climate."""
        from taxamap.products.trust import DISAGREEMENT_SCALES, disagreement

        bands: dict[str, np.ndarray] = {}
        attrs: dict[str, str] = {}
        if len(per) >= 2:
            bands["disagreement"] = disagreement(per)
            attrs["disagreement_scale"] = f"cosine: {DISAGREEMENT_SCALES['cosine']}"
        if mess and "environment" in per:
            result = self.climate_mess()
            bands.update(mess_bands(result, next(iter(per.values())).shape[0]))
            attrs.update(mess_attrs(result, f"the region's {self.grid.n_cells:,} cells"))
        return bands, attrs

    def band_names(self) -> list[str]:
        """The bands of this grid's zero-shot maps, in order: ``fused``, each modality, then
        the trust bands :meth:`trust_bands` adds."""
        mods = self.modalities
        return ["fused", *mods, *(["disagreement"] if len(mods) >= 2 else []),
                *(["mess", "mess_variable"] if "environment" in mods else [])]

    def dataset(self, queries: Sequence["Query"], query_ref: str, *,
                scores: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
                extra: dict[str, np.ndarray] | None = None,
                more_attrs: dict[str, str] | None = None) -> "xr.Dataset":
        """The score Dataset of ``queries`` (dims (y, x) for one, (species, y, x) for several):
        ``fused``, one variable per modality, then ``extra`` (S, N) bands; provenance attrs
        (plus ``more_attrs``). ``scores`` are :meth:`score`'s result when the caller has them.
        TaxamapError when a modality has no embedded cell at all."""
        from taxamap.dataset import in_band_order, scores_dataset

        queries = list(queries)
        if not queries:
            raise TaxamapError("no query to map")
        fused, per = scores if scores is not None else self.score(
            np.stack([q.vector for q in queries]))
        check_scored(per)
        attrs = self.provenance(query_ref, list(per))
        trust, trust_attrs = self.trust_bands(per, mess="mess" not in (extra or {}))
        attrs.update(trust_attrs)
        attrs.update(more_attrs or {})
        bands = tuple(extra or ())
        if len(queries) == 1 and self._template is not None and self._template[0] == bands:
            return self._like(queries[0], fused[0],
                              {m: v[0] for m, v in {**per, **trust}.items()},
                              {k: v[0] for k, v in (extra or {}).items()}, attrs)
        ds = scores_dataset(self.grid, fused, per, labels=[q.label for q in queries],
                            prompts=[q.prompt for q in queries], slugs=[q.slug for q in queries],
                            attrs=attrs, extra=in_band_order({**(extra or {}), **trust}) or None)
        if len(queries) > 1:
            ds = ds.assign_coords(taxonomy=("species", [q.source for q in queries]))
        elif bands in ((), ("relative",)):  # the web session's maps: with or without relative
            self._template = (bands, ds)
        return ds

    def _like(self, query: "Query", fused: np.ndarray, per: dict[str, np.ndarray],
              extra: dict[str, np.ndarray], attrs: dict[str, str]) -> "xr.Dataset":
        """A one-query Dataset made like the first one (same coords, CRS, transform, nodata and
        variable attrs) holding these scores: building it again through rioxarray costs more
        than scoring every cell; this is a shallow copy."""
        template = self._template[1]
        ds = template.copy(deep=False)
        for name, values in (("fused", fused), *per.items(), *extra.items()):
            ds[name].values = self.grid.to_raster(values)
        ds.attrs = {**attrs, "bands": template.attrs["bands"], "query": str(query.label),
                    "prompt": query.prompt or "", "slug": str(query.slug)}
        return ds


def mess_bands(result, n_queries: int = 1) -> dict[str, np.ndarray]:
    """``mess`` and ``mess_variable`` (float32, NaN where a cell has no climate) of a
    :class:`~taxamap.products.trust.MessResult`, repeated for ``n_queries`` maps: (S, N)."""
    variable = np.where(result.variable >= 0, result.variable, np.nan).astype(np.float32)
    return {"mess": np.tile(result.mess, (n_queries, 1)),
            "mess_variable": np.tile(variable, (n_queries, 1))}


def mess_attrs(result, reference: str) -> dict[str, str]:
    """The attrs (GeoTIFF tags) recording a MESS: its unit, the variables ``mess_variable``
    indexes, and the reference climate."""
    return {**{k.lower(): v for k, v in result.tags().items()}, "mess_reference": reference}


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
            f"{scorer.mapped_bytes / 2**20:,.0f} MiB of float16 cell embeddings mapped from "
            f"the stores, {scorer.memory_bytes / 2**20:,.0f} MiB held "
            f"({', '.join(scorer.modalities)})")
    return scorer
