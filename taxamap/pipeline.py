"""The machinery behind :func:`taxamap.predict`, :func:`taxamap.write` and :func:`taxamap.embed`.

region + resolution -> Grid -> (stored) cell embeddings per modality; query -> q; scores -> an
``xarray.Dataset`` (:mod:`taxamap.dataset`); Dataset -> files. Cell embeddings do not depend on the
query, so they live in an :class:`EmbeddingStore` and a later query over the same grid only embeds
its prompt and takes one matrix product.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from taxamap.errors import ModelFilesMissing, TaxamapError
from taxamap.grid import DEFAULT_RESOLUTION, Grid, make_grid
from taxamap.modalities import licence_notice, plan_modality
from taxamap.paths import cache_subdir, check_folder, checked_cache_root
from taxamap.score import DEFAULT_FUSION, parse_modalities
from taxamap.surface import accepts, option

_logger = logging.getLogger("taxamap")
T = TypeVar("T")


def log(message: str) -> None:
    """Progress and facts for the user (the CLI shows them on stderr; stdout is for results)."""
    _logger.info(message)


@dataclass
class GridRequest:
    """Options shared by ``predict`` and ``embed``: where, how fine, which modalities, which data."""

    region: str | None = None
    bbox: str | None = None
    resolution: float = DEFAULT_RESOLUTION
    # which cells of the region: "land" (off lakes and sea), "water" (ocean + lakes) or "all"
    cells: str = "land"
    modalities: list[str] = field(default_factory=lambda: ["location"])
    models_dir: str | None = None
    device: str = "auto"
    cache_dir: str | None = None
    store: str | None = None
    # satellite source (default: the WMS request TaxaBind trained on; see sources/satellite.py)
    sat_source: str = "wms"
    sat_url: str | None = None
    sat_zoom: int | None = None
    sat_size: int | None = None
    sat_footprint: float | None = None
    sat_file: str | None = None
    ee_project: str | None = None
    sat_year: int = 2020
    workers: int = 8
    # environment source
    worldclim: str | None = None
    env_array: str | None = None
    progress: bool = True
    dask: str | None = None


@dataclass
class PredictRequest(GridRequest):
    """:func:`taxamap.predict`: a query (species name(s), photo or recording) + the grid options."""

    species: str | list[str] | tuple[str, ...] | None = None
    image: str | None = None
    audio: str | None = None
    species_file: str | None = None
    # with species_file: map the names that resolve and list the others in the summary
    skip_unknown: bool = False
    fusion: str = DEFAULT_FUSION
    # fit=True: a classifier on the stored cell embeddings at the occurrences (products.fit)
    occurrences: object = None
    background: object = None
    fit: bool = False
    cv_blocks: float = 1.0
    seed: int = 0


@dataclass
class WriteRequest:
    """:func:`taxamap.write`: which files, where, and the overlays/range products on them."""

    out: str = "."
    formats: tuple[str, ...] = ("tif", "html", "png")
    threshold: str | None = None
    occurrences: object = None
    self_contained: bool = False
    stack: bool = False
    stack_name: str | None = None
    expert_range: object = None


@dataclass
class Query:
    """One thing to map: its embedding, the prompt it came from, a label and a file slug."""

    vector: np.ndarray
    prompt: str | None
    label: str
    slug: str
    source: str


@dataclass
class PredictResult:
    """What the CLI prints after ``predict`` then ``write``."""

    #: The Dataset mapped (None for a streamed species file: see :func:`predict_and_write`).
    dataset: object
    paths: dict[str, Path]
    timings: dict[str, float]
    #: The summary table's rows (a long species file's last rows only: all are in summary_path).
    summary: list[dict] = field(default_factory=list)
    summary_path: Path | None = None
    summary_count: int = 0


def slugify(text: str) -> str:
    """'Cardinalis cardinalis' -> 'cardinalis-cardinalis' (safe as a file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:80] or "map"


#: How a map made from a file is named: the modality's word, then the file's name.
FILE_SLUG_PREFIX = {"image": "image", "audio": "sound"}


def file_digest(data: bytes | str | os.PathLike) -> str:
    """SHA-256 (hex) of a query file's bytes (or of the file at a path)."""
    import hashlib

    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with open(data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_slug(modality: str, name: str, digest: str) -> str:
    """The file stem of a map made from a photo or a recording, the same in the CLI, the Python
    API and the web app: ``image-bird-1a2b3c4d`` for ``bird.jpg`` (``sound-...`` for a
    recording): the file's name and the first 8 hex digits of its content's SHA-256 (``digest``),
    so bird.jpg and bird.webp, or two bird.jpg from different folders, never share a name, and
    the same photo always gets the same one. Prefixed, so it never names the input itself."""
    return f"{FILE_SLUG_PREFIX[modality]}-{slugify(Path(name).stem)[:60]}-{digest[:8]}"


def check_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove it is writable before any long work starts."""
    return check_folder(out, "--out")


def check_grid_paths(req: GridRequest) -> None:
    """The cache, the store and the models folder of ``req``, checked before any work: a
    read-only, misplaced or looping folder is one line naming it (see :func:`check_folder`)."""
    checked_cache_root(req.cache_dir)
    if req.store:
        # A store folder that exists may be read-only (a finished store, shared): whether it
        # must be written is known per modality, in embed_cells, before its first block.
        check_folder(req.store, "--store", write=not Path(str(req.store)).expanduser().exists())
    models = req.models_dir or os.environ.get("TAXAMAP_MODELS")
    if models:
        check_folder(models, "--models" if req.models_dir else "TAXAMAP_MODELS", write=False)


def build_grid(req: GridRequest):
    """Resolve the region and lay the grid over it; returns (region, grid).

    Logs the grid's size and, with ``cells`` "land" or "water", how many of the region's cells
    the mask removed.
    """
    from taxamap.geography import resolve_region
    from taxamap.grid import MAX_CELLS, count_cells

    region = resolve_region(req.region, req.bbox, cells=req.cells)
    grid = make_grid(region.geometry, req.resolution, cells=region.cells)
    log(f"region {region.name}: {grid.n_cells:,} cells of {grid.resolution} deg "
        f"({grid.width} x {grid.height} grid)")
    if region.cells != "all":
        west, south, east, north = region.outline.bounds
        # Counting the outline's cells is one more pass over its frame: skip it where that frame
        # is far larger than any grid taxamap accepts.
        if (east - west) * (north - south) / req.resolution ** 2 <= MAX_CELLS:
            removed = count_cells(region.outline, req.resolution) - grid.n_cells
            other = "water" if region.cells == "land" else "land"
            if removed > 0:  # a box wholly on land needs no word about the mask
                log(f"{region.cells} mask: {removed:,} {other} cells removed")
    return region, grid


@dataclass
class CellEmbeddings:
    """The stores of one grid, one per modality, with what the outputs must credit."""

    stores: dict
    model_refs: dict[str, str]
    attribution: str | None
    license: str | None
    computed_blocks: dict[str, int]
    #: Per modality, its source's describe() (what the satellite patches were: GeoTIFF tags).
    sources: dict[str, dict] = field(default_factory=dict)


def _complete_store(location: str, key: str):
    """The store at ``location`` if it exists, has ``key``, sound metadata and check records, and
    no unfinished or damaged block (by its records and file sizes; the CRCs are checked as the
    cells are read); else None."""
    from taxamap.store import EmbeddingStore

    try:
        store = EmbeddingStore.open_existing(location, key)
    except Exception:  # absent, half-created, another key, damaged: the full path below decides
        return None
    if store.check is None:  # format 1: its check records are made under the creation lock
        return None
    return store if store.is_complete() else None


def _fill_store(req: GridRequest, config: dict, modality: str, store, latlon: np.ndarray,
                embedder, chunks: list[int] | None = None) -> int:
    """Compute ``store``'s unfinished blocks (or ``chunks``) here or on Dask; returns how many
    this run computed."""
    from taxamap import engine

    if req.dask:
        from taxamap.distributed import embed_on_dask

        return embed_on_dask(req, config, modality, store, latlon, chunks=chunks)
    return engine.embed_to_store(latlon, embedder, store, progress=req.progress, chunks=chunks)


def embed_cells(req: GridRequest, grid: Grid, config: dict,
                device: Callable[[], str], *, region: str | None = None,
                verify: bool = False) -> CellEmbeddings:
    """Make sure every modality's store for ``grid`` is complete (computing only missing blocks).

    A complete store is used without loading its encoder at all: a warm query touches no weights
    but the query encoder's. Blocks found damaged are embedded again, with one line saying so;
    ``verify`` reads every block and checks it against its record first (``embed --verify``).
    ``region`` (its name) is recorded in a new store's attributes (``taxamap cache info``).
    """
    from taxamap.store import EmbeddingStore, damage_summary, store_key, store_location

    latlon = None
    stores, refs, computed, sources = {}, {}, {}, {}
    attribution = license_ = None
    for modality in req.modalities:
        plan = plan_modality(modality, req, config, device, grid.n_cells)
        key = store_key(grid.definition(), modality, plan.model_ref, plan.source)
        location, chosen = store_location(req.store, grid.key(), modality, key, req.cache_dir)
        store = None if verify else _complete_store(location, key)
        licence_notice(plan.attribution, plan.license)
        if store is not None:
            computed[modality] = 0
        else:
            if chosen:
                check_folder(req.store, "--store")
            embedder = plan.build()
            store = EmbeddingStore.open(
                location, key=key, n_cells=grid.n_cells, dim=embedder.dim,
                attrs={"grid": grid.definition(), "modality": modality, "model": plan.model_ref,
                       "source": plan.source, "region": region,
                       "resolution": grid.resolution},
                must_match=chosen,
            )
            if latlon is None:
                latlon = grid.cell_latlon()
            pending = store.pending_chunks(verify=verify)
            if store.damaged:
                them = "it" if len(store.damaged) == 1 else "them"
                log(f"{damage_summary(location, store.damaged, store.n_chunks)}; re-embedding {them}")
            fresh = len(pending) - len(store.damaged)
            if 0 < fresh and len(pending) < store.n_chunks:
                log(f"resuming {modality}: {fresh} of {store.n_chunks} blocks left in {location}")
            computed[modality] = _fill_store(req, config, modality, store, latlon, embedder,
                                             pending)
            missing = getattr(plan.stats, "cells_missing", 0) if plan.stats is not None else 0
            if missing:
                asked = getattr(plan.stats, "cells", 0)
                log(f"{modality}: {missing:,} of {asked:,} cells had no imagery (not found, or "
                    "still failing after retries); they are NaN in that band and fused over the "
                    "other modalities")
        store.touch()
        if plan.attribution:
            attribution, license_ = plan.attribution, plan.license
        stores[modality] = store
        refs[modality] = plan.model_ref
        sources[modality] = plan.source
    return CellEmbeddings(stores, refs, attribution, license_, computed, sources)


#: Rounds of "read, find a damaged block, embed it again" before a store is called failing.
REPAIR_ROUNDS = 3


def read_repairing(req: GridRequest, grid: Grid, config: dict, device: Callable[[], str],
                   cells: CellEmbeddings, read: Callable[[], T]) -> T:
    """``read()`` (which reads ``cells``' stores: scoring, a session's load); a block found
    damaged on the way is embedded again (one line saying so, after a full check of its store
    finds any other) and ``read()`` runs again. A store damaged again right after its repair is a
    one-line error about the disk."""
    from taxamap.store import StoreDamaged, damage_summary

    rounds = 0
    while True:
        try:
            return read()
        except StoreDamaged as exc:
            store = exc.store
            rounds += 1
            if rounds == REPAIR_ROUNDS:
                raise TaxamapError(
                    f"{exc.summary}, again after embedding it anew: the disk under "
                    f"{store.location} may be failing; check it, or pass --cache DIR (or --store) "
                    "on another disk") from None
            modality = next(m for m, s in cells.stores.items() if s is store)
            store.pending_chunks(verify=True)  # every other damaged block, in this one repair
            store.damaged.update(exc.blocks)
            damaged = dict(store.damaged)
            them = "it" if len(damaged) == 1 else "them"
            log(f"{damage_summary(store.location, damaged, store.n_chunks)}; re-embedding {them}")
            embedder = plan_modality(modality, req, config, device, grid.n_cells).build()
            n = _fill_store(req, config, modality, store, grid.cell_latlon(), embedder,
                            sorted(damaged))
            cells.computed_blocks[modality] = cells.computed_blocks.get(modality, 0) + n


def satellite_tags(source: dict | None) -> dict[str, str]:
    """GeoTIFF tags saying what the satellite modality saw: the source's settings (JSON), and its
    footprint and patch size on their own (empty without a satellite modality)."""
    import json

    if not source:
        return {}
    tags = {"SATELLITE_SOURCE": json.dumps(source, sort_keys=True)}
    if source.get("footprint_m") is not None:
        tags["SATELLITE_FOOTPRINT_M"] = f"{float(source['footprint_m']):g}"
    if source.get("size") is not None:
        tags["SATELLITE_SIZE_PX"] = str(int(source["size"]))
    return tags


def read_species_file(path: str | os.PathLike) -> list[str]:
    """Names from a text file (one per line, '#' comments) or a CSV with a ``species`` column."""
    import csv

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TaxamapError(f"cannot read --species-file {path}: {exc.strerror or exc}") from exc
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and "species" in [c.strip().lower() for c in next(csv.reader([lines[0]]))]:
        rows = list(csv.DictReader(lines))
        key = next(k for k in rows[0].keys() if k and k.strip().lower() == "species") if rows else None
        names = [r[key].strip() for r in rows if key and r.get(key) and r[key].strip()]
    else:
        names = [ln.strip() for ln in lines]
    names = list(dict.fromkeys(names))
    if not names:
        raise TaxamapError(f"--species-file {path} names no species (one per line, or a CSV "
                           "with a 'species' column)")
    return names


#: Messages and log lines quote at most this many names of a list (unknown species), then
#: give the count: a file of 100,000 misspelt names is one readable line, not megabytes.
NAMES_SHOWN = 10


def listed_names(names: list[str], limit: int = NAMES_SHOWN) -> str:
    """The first ``limit`` names quoted (each cut at 60 characters), then how many more."""
    shown = ", ".join('"' + (n if len(n) <= 60 else n[:57] + "...") + '"' for n in names[:limit])
    rest = len(names) - limit
    return f"{shown} and {rest:,} more" if rest > 0 else shown


def resolve_species_file(names: list[str], source: str, cache: Path | None,
                         skip_unknown: bool = False) -> tuple[list, list[str]]:
    """Resolve every name of a species file; returns (taxa, names skipped).

    Every name is tried before anything fails, so one message counts all the unknown (or
    malformed) ones and quotes the first :data:`NAMES_SHOWN`; with ``skip_unknown`` those are
    returned as skipped instead, unless none resolves.
    """
    from taxamap.taxonomy import resolve_species

    taxa, unknown = [], []
    for name in names:
        try:
            taxa.append(resolve_species(name, cache_dir=cache))
        except TaxamapError:
            unknown.append(name)
    if not unknown:
        return taxa, []
    listed = listed_names(unknown)
    if not taxa:
        raise TaxamapError(
            f"none of the {len(names):,} species in {source} could be resolved "
            f"({listed}); check the spelling, or give all seven ranks per line "
            '("Kingdom Phylum Class Order Family Genus epithet")'
        )
    if not skip_unknown:
        raise TaxamapError(
            f"{len(unknown):,} of {len(names):,} species in {source} are unknown: "
            f"{listed}; fix their spelling, give all seven ranks ('Kingdom Phylum Class Order "
            "Family Genus epithet'), remove them, or pass --skip-unknown to map the others"
        )
    log(f"skipping {len(unknown):,} unknown species of {len(names):,}: {listed}")
    return taxa, unknown


#: The options that name a query, with their placeholders.
QUERY_OPTIONS = (("species", "NAME"), ("species-file", "FILE"), ("image", "PATH"),
                 ("audio", "PATH"))


class QueryEncoders:
    """The query encoders of a request (text, photo, sound), each loaded on first use and kept:
    :func:`embed_queries` makes a fresh one per call; a long-lived caller (the web app's
    :class:`~taxamap.session.MapSession`) keeps one, so every encoder loads once per process."""

    def __init__(self, req: GridRequest, config: dict, device: Callable[[], str]):
        import threading

        self.req, self.config, self.device = req, config, device
        self._loaded: dict = {}
        self._lock = threading.Lock()

    def _get(self, key, load):
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load()
            return self._loaded[key]

    def text(self, n_prompts: int = 1):
        """The text encoder (NumPy for a few prompts, torch for many; see :func:`_text_encoder`)."""
        big = n_prompts >= TORCH_TEXT_MIN_PROMPTS
        return self._get(("text", big),
                         lambda: _text_encoder(self.req, self.config, self.device, n_prompts))

    def image(self):
        """The CLIP model that embeds photos."""
        from taxamap.models.clip import load_clip

        return self._get("image", lambda: load_clip(self.req.models_dir, device=self.device(),
                                                    config=self.config))

    def audio(self):
        """The CLAP audio encoder that embeds recordings."""
        from taxamap.models.audio import load_audio_encoder

        return self._get("audio", lambda: load_audio_encoder(
            models_dir=self.req.models_dir, device=self.device(), config=self.config))


def embed_queries(req: PredictRequest, config: dict, device: Callable[[], str],
                  skipped: list[str] | None = None,
                  encoders: QueryEncoders | None = None,
                  forward_lock=None, limit: Callable[[int], None] | None = None
                  ) -> tuple[list[Query], str]:
    """Embed the request's query or queries; returns them and the query encoder's ref.

    Every species prompt goes through the text encoder in one call. Names of a species file
    that ``req.skip_unknown`` leaves out are appended to ``skipped`` (when given). ``encoders``
    (kept by a long-lived caller) supplies already loaded encoders. A photo or a recording is
    decoded (and resized or resampled) first; only the encoder's own work (a recording's
    log-mel features, which seed NumPy's global RNG, and the forward pass) runs inside
    ``forward_lock`` (a context manager, e.g. a session's encoder lock), so decoding never
    holds up other queries. ``limit`` is called with the number of species once they are
    resolved, before any is embedded (it may refuse them).
    """
    given = [x for x in (req.species, req.image, req.audio, req.species_file) if x]
    if len(given) != 1:
        queries = [option(name, metavar=metavar) for name, metavar in QUERY_OPTIONS
                   if accepts(name)]
        *first, last = list(dict.fromkeys(queries))  # the web page has one control for two
        raise TaxamapError(f"give exactly one query: {', '.join(first)} or {last}")
    encoders = encoders if encoders is not None else QueryEncoders(req, config, device)
    forward_lock = forward_lock if forward_lock is not None else contextlib.nullcontext()
    if req.audio:
        from taxamap.models.audio import load_audio, model_rate

        # Decoded (and resampled, its work bounded) first: a bad file fails before any model loads.
        wave, rate = load_audio(req.audio, target_rate=model_rate(config))
        encoder = encoders.audio()
        with forward_lock:
            vector = encoder.encode([(wave, rate)])[0]
        name = Path(req.audio).name
        slug = file_slug("audio", name, file_digest(req.audio))
        return [Query(np.asarray(vector), None, f"sound {name}", slug, "audio")], encoder.ref
    if req.image:
        from taxamap.models.preprocess import load_image

        image = load_image(req.image)
        clip = encoders.image()
        name = Path(req.image).name
        pixels = clip.preprocess([image])
        del image  # the decoded photo (up to 40 Mpx) is not kept while waiting for the lock
        with forward_lock:
            vector = clip.encode_pixels(pixels)[0]
        slug = file_slug("image", name, file_digest(req.image))
        return [Query(vector, None, f"image {name}", slug, "image")], clip.ref
    taxa = resolve_taxa(req, skipped)
    if limit is not None:
        limit(len(taxa))
    text = encoders.text(n_prompts=len(taxa))
    return species_queries(taxa, text), text.ref


#: Prompts logged one line each; a longer species file logs the first ones and a count.
PROMPTS_LOGGED = 20


def resolve_taxa(req: PredictRequest, skipped: list[str] | None = None) -> list:
    """The request's species (``species`` or ``species_file``) resolved to taxa, each prompt
    once, in the given order; names a species file's ``skip_unknown`` leaves out are appended to
    ``skipped``."""
    from taxamap.taxonomy import resolve_species

    cache = cache_subdir("taxonomy", req.cache_dir)
    if isinstance(req.species, str):
        resolved = [resolve_species(req.species, cache_dir=cache)]
    elif req.species:
        names = list(dict.fromkeys(str(n).strip() for n in req.species if str(n).strip()))
        resolved, left_out = resolve_species_file(names, "species=[...]", cache, False)
    else:
        resolved, left_out = resolve_species_file(read_species_file(req.species_file),
                                                  f"--species-file {req.species_file}", cache,
                                                  req.skip_unknown)
        if skipped is not None:
            skipped.extend(left_out)
    taxa, seen = [], set()
    for taxon in resolved:
        if taxon.prompt in seen:  # spellings of one species would overwrite each other's files
            continue
        seen.add(taxon.prompt)
        if len(taxa) < PROMPTS_LOGGED:
            log(f"prompt: {taxon.prompt}  (taxonomy from {taxon.source})")
        taxa.append(taxon)
    if len(taxa) > PROMPTS_LOGGED:
        log(f"... and {len(taxa) - PROMPTS_LOGGED:,} more prompts: {len(taxa):,} species")
    return taxa


def species_queries(taxa: list, text) -> list[Query]:
    """The queries of ``taxa`` (see :func:`resolve_taxa`), their prompts embedded by ``text``."""
    vectors = text.encode_text([t.prompt for t in taxa])
    return [Query(v, t.prompt, t.binomial, slugify(t.binomial), t.source)
            for v, t in zip(vectors, taxa)]


#: Above this many prompts torch's faster kernels repay its ~1 s import; below, NumPy wins.
TORCH_TEXT_MIN_PROMPTS = 200


def _text_encoder(req: GridRequest, config: dict, device: Callable[[], str],
                  n_prompts: int = 1):
    """taxamap's own text tower (loads only the text weights, never imports open_clip: ~0.3 s
    instead of ~3 s); open_clip's full model for configurations it does not cover."""
    from taxamap.models.text import load_text_encoder

    # One prompt is microseconds of compute: run it on the CPU (NumPy, no torch import) unless
    # the user named a GPU.
    where = "cpu" if (req.device or "auto").lower() in ("auto", "cpu") else device()
    backend = "torch" if n_prompts >= TORCH_TEXT_MIN_PROMPTS else "auto"
    try:
        return load_text_encoder(req.models_dir, device=where, config=config, backend=backend)
    except ModelFilesMissing:
        raise
    except TaxamapError as exc:
        from taxamap.models.clip import load_clip

        log(f"text encoder: using open_clip ({exc})")
        return load_clip(req.models_dir, device=where, config=config)


def score_stores(stores: dict, queries: np.ndarray, fusion: str, block_cells: int = 65536):
    """Fused and per-modality scores (S, N) for all queries, streaming the stores block by block so
    memory holds a couple of blocks of embeddings however large the grid. The next block is read
    in a thread while the current one is scored."""
    from concurrent.futures import ThreadPoolExecutor

    from taxamap.score import fuse_many

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


def _warm_up_writers() -> None:
    """Import the writers' heavy libraries in the background while the query is embedded and the
    cells scored (they are needed last; ~1 s of imports overlaps with work)."""
    import threading

    def load() -> None:
        try:
            import folium  # noqa: F401
            import matplotlib.figure  # noqa: F401
            import rasterio  # noqa: F401
        except Exception:  # the writers will report a real problem themselves
            pass

    threading.Thread(target=load, name="taxamap-warm-up", daemon=True).start()


FORMATS = ("tif", "html", "png")


def check_write_request(wreq: WriteRequest) -> dict:
    """Check every input :func:`write_dataset` reads before any long work; returns what it read
    (``occurrences`` as (N, 2) lat/lon, ``out_dir``)."""
    unknown = [f for f in wreq.formats if f not in FORMATS]
    if unknown:
        raise TaxamapError(f"unknown output format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    if wreq.stack and (wreq.threshold or wreq.occurrences is not None or wreq.self_contained
                       or wreq.expert_range is not None):
        given = [name for name, value in (
            ("threshold", wreq.threshold), ("occurrences", wreq.occurrences is not None),
            ("expert-range", wreq.expert_range is not None),
            ("self-contained", wreq.self_contained)) if value]
        raise TaxamapError(f"{option('stack', True)} writes one multi-band GeoTIFF only; drop "
                           f"{' and '.join(option(n) for n in given)}, or map species one by one")
    read: dict = {"occurrences": None}
    if wreq.occurrences is not None:
        from taxamap.products.occurrences import as_latlon_points

        read["occurrences"] = as_latlon_points(wreq.occurrences, "occurrences")
    if wreq.threshold:
        from taxamap.products.ranges import parse_rule

        rule = parse_rule(wreq.threshold)
        if rule.kind == "maxtss":
            if rule.occurrences:
                from taxamap.products.occurrences import read_points

                read_points(rule.occurrences)
            elif read["occurrences"] is None:
                raise TaxamapError(f"{option('threshold', 'maxtss')} needs occurrences: "
                                   f"{option('threshold', 'maxtss:FILE')}, or "
                                   f"{option('occurrences', metavar='FILE')}")
    read["expert"] = None
    if wreq.expert_range is not None:
        from taxamap.products.expert import read_expert_range

        read["expert"] = read_expert_range(wreq.expert_range)
    if wreq.self_contained and "html" in wreq.formats:
        from taxamap.writers.assets import check_offline_assets

        check_offline_assets()  # a missing offline extra fails now, not after every cell
    read["out_dir"] = check_out_dir(wreq.out)
    return read


def region_spec(req: GridRequest) -> str:
    """How to resolve the request's region again (the HTML/PNG outline of a written Dataset)."""
    parts = []
    if req.region is not None:
        region = str(req.region)
        path = Path(region).expanduser()
        parts.append(f"region={path.resolve() if path.exists() else region}")
    if req.bbox is not None:
        box = req.bbox if isinstance(req.bbox, str) else ",".join(f"{v:g}" for v in req.bbox)
        parts.append(f"bbox={box}")
    return ";".join(parts)


def query_provenance(req: PredictRequest, region, cells: CellEmbeddings, config_ref: str,
                     query_ref: str, modalities: list[str]) -> dict[str, str]:
    """The provenance attrs of a map of the request's grid made with the query encoder
    ``query_ref`` (see :func:`taxamap.dataset.provenance`)."""
    from taxamap.dataset import provenance

    return provenance(
        modalities=modalities, fusion=req.fusion,
        models={"config": config_ref, "query": query_ref, **cells.model_refs},
        region_name=region.name, region_spec=region_spec(req), cells=req.cells,
        attribution=cells.attribution, license_=cells.license,
        extra=satellite_tags(cells.sources.get("satellite")),
    )


def check_scored(per: dict[str, np.ndarray]) -> None:
    """TaxamapError when a modality has no embedded cell at all."""
    for modality, scores in per.items():
        if not np.isfinite(scores).any():
            raise TaxamapError(
                f"no cell could be embedded from the {modality} modality (every input missing or "
                f"failed); check its source ({option('sat-url')}, the network, "
                f"{option('worldclim')}) and run again"
            )


def queries_dataset(req: PredictRequest, region, grid: Grid, cells: CellEmbeddings,
                    config_ref: str, queries: list[Query], query_ref: str, fused: np.ndarray,
                    per: dict[str, np.ndarray], *, more_attrs: dict | None = None,
                    extra: dict[str, np.ndarray] | None = None):
    """The Dataset of scored ``queries`` (fused (S, N), per modality (S, N), ``extra`` bands)
    with its provenance (plus ``more_attrs``); TaxamapError when a modality has no embedded
    cell at all."""
    from taxamap.dataset import scores_dataset

    check_scored(per)
    attrs = query_provenance(req, region, cells, config_ref, query_ref, list(per))
    attrs.update(more_attrs or {})
    ds = scores_dataset(grid, fused, per, labels=[q.label for q in queries],
                        prompts=[q.prompt for q in queries], slugs=[q.slug for q in queries],
                        attrs=attrs, extra=extra)
    if len(queries) > 1:
        ds = ds.assign_coords(taxonomy=("species", [q.source for q in queries]))
    return ds


#: :func:`predict_dataset` (``taxamap.predict``, ``--stack``) holds every species' maps in one
#: Dataset: above this many bytes of maps it refuses, pointing to ``predict --species-file``,
#: which writes each species as it is scored and holds one batch of maps at a time.
MAX_IN_MEMORY_BYTES = 2 * 2**30


def maps_bytes(n_species: int, grid: Grid, n_bands: int) -> int:
    """Bytes of the float32 (y, x) maps of ``n_species`` species with ``n_bands`` bands each."""
    return int(n_species) * int(n_bands) * grid.width * grid.height * 4


def check_in_memory(n_species: int, grid: Grid, n_bands: int) -> None:
    """TaxamapError when the maps of ``n_species`` species exceed :data:`MAX_IN_MEMORY_BYTES`."""
    from taxamap.io import format_bytes

    need = maps_bytes(n_species, grid, n_bands)
    if need > MAX_IN_MEMORY_BYTES:
        raise TaxamapError(
            f"{n_species:,} species over this {grid.width} x {grid.height} grid make "
            f"{format_bytes(need)} of maps, more than the {format_bytes(MAX_IN_MEMORY_BYTES)} "
            "taxamap.predict and --stack hold in memory at once; write one map per species as "
            "they are scored with 'taxamap predict --species-file FILE' (without --stack), or "
            "map fewer species at a time"
        )


def _prepare(req: PredictRequest):
    """The start of a prediction: options checked, the inputs read later read now (a bad one
    fails in seconds, not after the cells), the device, the config and the grid. Returns
    (occurrences, background, device, config, config_ref, region, grid)."""
    from taxamap.devices import lazy_device
    from taxamap.models.hub import load_config

    from taxamap.geography import check_cells

    req.modalities = parse_modalities(req.modalities)
    req.cells = check_cells(req.cells)
    check_grid_paths(req)
    # Inputs read later are checked now: a bad one fails in seconds, not after the cells.
    occurrences = None
    if req.occurrences is not None:
        from taxamap.products.occurrences import as_latlon_points

        occurrences = as_latlon_points(req.occurrences, "occurrences")
    background = _check_fit_inputs(req, occurrences)
    device = lazy_device(req.device)
    if (req.device or "auto").lower() not in ("auto", "cpu"):
        device()  # a GPU the user named must exist before any work starts
    config, config_ref = load_config(req.models_dir)
    region, grid = build_grid(req)
    return occurrences, background, device, config, config_ref, region, grid


def predict_dataset(req: PredictRequest) -> tuple[object, dict[str, float]]:
    """The score maps of the request's queries as an ``xarray.Dataset`` (see
    :mod:`taxamap.dataset`), and the seconds each stage took. Writes no output file (the
    embedding stores in the cache aside). Refuses (TaxamapError) species whose maps would pass
    :data:`MAX_IN_MEMORY_BYTES`."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    occurrences, background, device, config, config_ref, region, grid = _prepare(req)
    timings["grid"] = time.perf_counter() - t0
    if req.fit:
        from taxamap.products.fit import locate_occurrences

        locate_occurrences(occurrences, grid)  # wholly off the grid: fail before any embedding

    # The query first: a bad species name or file fails in seconds, not after the cells.
    t = time.perf_counter()
    skipped: list[str] = []
    queries, query_ref = embed_queries(
        req, config, device, skipped,
        limit=lambda n: check_in_memory(n, grid, len(req.modalities) + 1))
    timings["query"] = time.perf_counter() - t
    if req.fit and len(queries) > 1:
        raise TaxamapError(fit_one_species())

    t = time.perf_counter()
    cells = embed_cells(req, grid, config, device, region=region.name)
    timings["cells"] = time.perf_counter() - t

    t = time.perf_counter()
    vectors = np.stack([q.vector for q in queries])
    fused, per = read_repairing(req, grid, config, device, cells,
                                lambda: score_stores(cells.stores, vectors, req.fusion))
    check_scored(per)  # before a fit: a modality with no cell fails with its own message
    more_attrs = {"skipped_species": "; ".join(skipped)} if skipped else {}
    timings["score"] = time.perf_counter() - t
    extra = None
    if req.fit:
        from taxamap.products.fit import fit_grid

        t = time.perf_counter()
        fit = fit_grid(grid, cells.stores, fused[0], occurrences, background, seed=req.seed,
                       cv_blocks_deg=req.cv_blocks)
        timings["fit"] = time.perf_counter() - t
        log(fit.format_table())
        extra = {"fitted": fit.fitted[None], "combined": fit.combined[None]}
        more_attrs.update({k.lower(): v for k, v in fit.tags().items()})
    ds = queries_dataset(req, region, grid, cells, config_ref, queries, query_ref, fused, per,
                         more_attrs=more_attrs, extra=extra)
    timings["total"] = time.perf_counter() - t0
    return ds, timings


def region_outline_of(ds):
    """The outline of the region a Dataset was made over (from its ``region_spec`` attr), or None."""
    spec = str(ds.attrs.get("region_spec", "") or "")
    if not spec:
        return None
    from taxamap.geography import resolve_region

    given = dict(part.split("=", 1) for part in spec.split(";") if "=" in part)
    try:
        region = resolve_region(given.get("region"), given.get("bbox"), land_only=False)
    except TaxamapError:  # a region file moved since: draw no outline rather than fail
        return None
    return region.outline


def write_dataset(ds, wreq: WriteRequest, *, checked: dict | None = None,
                  outline=None) -> dict[str, Path]:
    """Write the files of :func:`taxamap.write` for every query of ``ds``; returns their paths."""
    from taxamap.dataset import check_dataset, iter_species

    ds = check_dataset(ds)
    checked = checked if checked is not None else check_write_request(wreq)
    out_dir = checked["out_dir"]
    paths: dict[str, Path] = {}
    if wreq.stack:
        from taxamap.writers.geotiff import write_stack

        stem = slugify(wreq.stack_name) if wreq.stack_name else str(
            ds.attrs.get("slug") or "taxamap")
        paths["stack.tif"] = write_stack(ds, out_dir / f"{stem}-stack.tif")
        return paths
    needs_outline = any(f in wreq.formats for f in ("html", "png"))
    if outline is None and needs_outline:
        outline = region_outline_of(ds)
    notes = ()
    if checked["occurrences"] is not None:
        notes = occurrence_notes(next(iter_species(ds)), checked["occurrences"])
    for one in iter_species(ds):
        files = write_outputs(one, out_dir, wreq.formats, threshold=wreq.threshold,
                              occurrences=checked["occurrences"],
                              self_contained=wreq.self_contained, outline=outline,
                              expert_geometry=checked["expert"], notes=notes)
        for ext, path in files.items():
            paths[f"{one.attrs['slug']}.{ext}"] = path
    return paths


def occurrence_notes(ds, occurrences: np.ndarray) -> tuple[str, ...]:
    """When no occurrence point falls on a scored cell of the (y, x) map ``ds`` (an empty file,
    latitude and longitude swapped, points outside the region), the reason, logged as one
    warning line, for the HTML legend; the map itself is still written."""
    from taxamap.products.evaluate import points_on_map

    try:
        points_on_map(ds, occurrences, "occurrence points")
    except TaxamapError as exc:
        _logger.warning(f"occurrences: {exc}")
        return (f"occurrences: {exc}",)
    return ()


def summary_rows(ds, paths: dict[str, Path]) -> list[dict]:
    """One row per query: label, taxonomy source, max and mean fused score, files written."""
    from taxamap.dataset import iter_species

    rows = []
    taxonomy = (list(map(str, ds["taxonomy"].values)) if "taxonomy" in ds.coords else [""])
    for i, one in enumerate(iter_species(ds)):
        values = np.asarray(one["fused"].values)
        valid = values[np.isfinite(values)]
        slug = one.attrs["slug"]
        rows.append({
            "species": one.attrs["query"], "taxonomy": taxonomy[min(i, len(taxonomy) - 1)],
            "max": float(valid.max()) if valid.size else float("nan"),
            "mean": float(valid.mean()) if valid.size else float("nan"),
            "files": ", ".join(str(p) for k, p in paths.items()
                               if k.startswith(f"{slug}.") or k == "stack.tif"),
        })
    skipped = str(ds.attrs.get("skipped_species", "") or "")
    rows.extend({"species": name, "taxonomy": "skipped", "max": float("nan"),
                 "mean": float("nan"), "files": "skipped: unknown species"}
                for name in skipped.split("; ") if name)
    return rows


def predict_and_write(req: PredictRequest, wreq: WriteRequest, *,
                      on_written: Callable[[dict[str, Path]], None] | None = None,
                      batch_size: int | None = None) -> PredictResult:
    """``taxamap predict``: :func:`predict_dataset` then :func:`write_dataset`, with every input
    the writing reads checked before any cell is embedded.

    A species file (without ``--stack``) is streamed instead: its species are embedded, scored
    and written ``batch_size`` at a time (default :func:`species_batch_size`), so memory holds
    one batch of maps however many species the file names; the result then has no Dataset. The
    files written are handed to ``on_written`` as they are written (and are then not kept in
    the result's ``paths``).
    """
    t0 = time.perf_counter()
    checked = check_write_request(wreq)
    _warm_up_writers()
    if req.species_file and not wreq.stack:
        result = _stream_species(req, wreq, checked, on_written, batch_size)
        result.timings["total"] = time.perf_counter() - t0
        return result
    ds, timings = predict_dataset(req)
    t = time.perf_counter()
    paths = write_dataset(ds, wreq, checked=checked)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    if on_written is not None:
        on_written(paths)
    return PredictResult(ds, {} if on_written is not None else paths, timings,
                         summary_rows(ds, paths))


#: Species a streamed species file scores and writes together (fewer on a large grid: see
#: :data:`BATCH_BYTES`).
SPECIES_BATCH = 256

#: The most bytes of maps one batch of a streamed species file holds.
BATCH_BYTES = 256 * 2**20

#: Up to this many rows, a species file's summary table is printed whole; above, it is written
#: to OUT/<file stem>_summary.csv as the species are written, and only its last
#: :data:`SUMMARY_TAIL` rows are kept (and printed).
SUMMARY_PRINTED = 100
SUMMARY_TAIL = 5
SUMMARY_COLUMNS = ("species", "prompt", "taxonomy", "max", "mean", "files")


def species_batch_size(grid: Grid, n_bands: int) -> int:
    """How many species a streamed species file scores at once over ``grid``: at most
    :data:`SPECIES_BATCH`, and no more than :data:`BATCH_BYTES` of maps."""
    return max(1, min(SPECIES_BATCH, BATCH_BYTES // maps_bytes(1, grid, n_bands)))


class SummaryTable:
    """A species file's summary rows as they come: all kept in ``rows`` when ``path`` is None;
    else written to the CSV ``path`` (replaced atomically when ``stack`` closes) with only the
    last :data:`SUMMARY_TAIL` rows kept. ``count`` is how many rows were added."""

    def __init__(self, path: Path | None, stack) -> None:
        import collections
        import csv

        from taxamap.io import atomic_path

        self.path, self.count = path, 0
        self.rows: list[dict] | collections.deque = []
        self._writer = None
        if path is not None:
            tmp = stack.enter_context(atomic_path(path, what=f"writing the summary {path}"))
            fh = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
            self._writer = csv.DictWriter(fh, SUMMARY_COLUMNS)
            self._writer.writeheader()
            self.rows = collections.deque(maxlen=SUMMARY_TAIL)

    def add(self, rows) -> None:
        for row in rows:
            if self._writer is not None:
                self._writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
            self.rows.append(row)
            self.count += 1


def _batch_rows(queries: list[Query], fused: np.ndarray, paths: dict[str, Path]):
    """Summary rows of a scored batch: max and mean fused score of each query's valid cells."""
    finite = np.isfinite(fused)
    valid = finite.sum(axis=1)
    top = np.where(finite, fused, -np.inf).max(axis=1, initial=-np.inf)
    mean = np.where(finite, fused, 0.0).sum(axis=1, dtype=np.float64) / np.maximum(valid, 1)
    for i, q in enumerate(queries):
        yield {"species": q.label, "prompt": q.prompt or "", "taxonomy": q.source,
               "max": float(top[i]) if valid[i] else float("nan"),
               "mean": float(mean[i]) if valid[i] else float("nan"),
               "files": ", ".join(str(p) for k, p in paths.items() if k.startswith(f"{q.slug}."))}


def _stream_species(req: PredictRequest, wreq: WriteRequest, checked: dict,
                    on_written: Callable[[dict[str, Path]], None] | None,
                    batch_size: int | None) -> PredictResult:
    """The species of ``req.species_file`` embedded, scored and written a batch at a time (see
    :func:`predict_and_write`); the summary of a long file goes to a CSV as it is written.
    Each batch logs "scored species I to J of N" at DEBUG level (the CLI does not show it)."""
    import contextlib
    import gc
    import sys

    from tqdm.auto import tqdm

    from taxamap.dataset import iter_species

    if req.fit:
        raise TaxamapError(fit_one_species())
    t0 = time.perf_counter()
    _, _, device, config, config_ref, region, grid = _prepare(req)
    timings = {"grid": time.perf_counter() - t0}
    # The query first: a bad species name or file fails in seconds, not after the cells.
    t = time.perf_counter()
    skipped: list[str] = []
    taxa = resolve_taxa(req, skipped)
    text = QueryEncoders(req, config, device).text(n_prompts=len(taxa))
    timings["query"] = time.perf_counter() - t
    t = time.perf_counter()
    cells = embed_cells(req, grid, config, device)
    timings["cells"] = time.perf_counter() - t
    timings["score"] = timings["write"] = 0.0

    size = batch_size or species_batch_size(grid, len(req.modalities) + 1)
    # Every map's tags name the skipped species: the first few and the count, not thousands.
    more_attrs = {"skipped_species": listed_names(skipped)} if skipped else {}
    many = len(taxa) + len(skipped) > SUMMARY_PRINTED
    csv_path = (checked["out_dir"] / f"{slugify(Path(req.species_file).stem)}_summary.csv"
                if many else None)
    paths: dict[str, Path] = {}

    def written(files: dict[str, Path]) -> None:
        if on_written is not None:
            on_written(files)
        else:
            paths.update(files)

    if len(taxa) > size:
        log(f"mapping {len(taxa):,} species, {size:,} at a time")
    with contextlib.ExitStack() as stack:
        # What is alive now (models, modules) stays: the collections after each batch need only
        # look at what the batches made (0.05 s instead of 0.5 s with torch loaded).
        stack.callback(gc.unfreeze)
        gc.freeze()
        table = SummaryTable(csv_path, stack)
        bar = stack.enter_context(tqdm(
            total=len(taxa), desc="mapping species", unit="species", file=sys.stderr,
            disable=not req.progress, dynamic_ncols=True))
        for start in range(0, len(taxa), size):
            t = time.perf_counter()
            queries = species_queries(taxa[start:start + size], text)
            timings["query"] += time.perf_counter() - t
            t = time.perf_counter()
            fused, per = score_stores(cells.stores, np.stack([q.vector for q in queries]),
                                      req.fusion)
            ds = queries_dataset(req, region, grid, cells, config_ref, queries, text.ref, fused,
                                 per, more_attrs=more_attrs)
            timings["score"] += time.perf_counter() - t
            _logger.debug("scored species %d to %d of %d", start + 1, start + len(queries),
                          len(taxa))
            files: dict[str, Path] = {}
            for one in iter_species(ds):  # each species' files are handed over once written
                t = time.perf_counter()
                done = write_dataset(one, wreq, checked=checked, outline=region.outline)
                timings["write"] += time.perf_counter() - t
                files.update(done)
                written(done)
                bar.update(1)
            table.add(_batch_rows(queries, fused, files))
            # xarray objects hold reference cycles: collect them now, or the maps of earlier
            # batches would wait for the cyclic collector and memory would grow with the file.
            del ds, fused, per, one
            gc.collect()
        table.add({"species": name, "prompt": "", "taxonomy": "skipped", "max": float("nan"),
                   "mean": float("nan"), "files": "skipped: unknown species"}
                  for name in skipped)
    if csv_path is not None:
        written({csv_path.name: csv_path})
    return PredictResult(None, paths, timings, list(table.rows), summary_path=csv_path,
                         summary_count=table.count)


def fit_one_species() -> str:
    """Why a fit refuses several species, in the caller's words."""
    return (f"{option('fit', True)} fits one species' occurrences: map one species at a time "
            f"({option('species', metavar='NAME')}, not several)")


def _check_fit_inputs(req: PredictRequest, occurrences: np.ndarray | None) -> np.ndarray | None:
    """Check the --fit options before any long work; returns the background points (or None)."""
    if not req.fit:
        if req.background is not None:
            raise TaxamapError(f"{option('background')} is used by {option('fit', True)}; add "
                               f"{option('fit', True)} or drop {option('background')}")
        return None
    if occurrences is None:
        raise TaxamapError(f"{option('fit', True)} needs {option('occurrences', metavar='FILE')}: "
                           "the presence records to fit on")
    import math

    if not (isinstance(req.cv_blocks, (int, float)) and math.isfinite(req.cv_blocks)
            and req.cv_blocks > 0):
        raise TaxamapError(f"{option('cv-blocks')} must be a positive number of degrees, not "
                           f"{req.cv_blocks!r}")
    if req.background is not None:
        from taxamap.products.occurrences import as_latlon_points

        return as_latlon_points(req.background, "background")
    return None


def output_names(stem: str, formats, threshold: bool) -> list[str]:
    """The files :func:`write_outputs` writes for ``stem`` (the GeoPackage goes with the range
    GeoTIFF)."""
    names = [f"{stem}.{ext}" for ext in ("tif", "html", "png") if ext in formats]
    return names + ([f"{stem}_range.tif"] if threshold else [])


def free_stem(out_dir: Path, slug: str, query: str, formats, threshold: bool) -> str:
    """``slug``, unless a file it would write in ``out_dir`` holds a map of another query (its
    recorded query differs): then the first of ``slug-2``, ``slug-3``, ... that is free or
    holds this query's own maps, said in one line. A rerun of the same query overwrites its own
    files; a map of another query is never silently replaced."""
    from taxamap.writers import recorded_query

    def other(stem: str) -> tuple[str, str] | None:
        for name in output_names(stem, formats, threshold):
            held = recorded_query(out_dir / name)
            if held is not None and held != query:
                return name, held
        return None

    clash = other(slug)
    if clash is None:
        return slug
    for n in range(2, 1000):
        stem = f"{slug}-{n}"
        if other(stem) is None:
            log(f"{out_dir / clash[0]} holds the map of {clash[1]!r}, not {query!r}: keeping it "
                f"and writing this map as {stem}.*")
            return stem
    raise TaxamapError(f"{out_dir} holds maps of other queries under every name {slug}-2 to "
                       f"{slug}-999; choose another --out")


def write_outputs(
    ds,
    out_dir: Path,
    formats=FORMATS,
    *,
    threshold: str | None = None,
    occurrences: np.ndarray | None = None,
    self_contained: bool = False,
    outline=None,
    expert_geometry=None,
    notes: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Write the requested files for the (y, x) Dataset ``ds`` into ``out_dir`` (each atomically).

    With ``threshold`` the binary range GeoTIFF and polygons are written beside the map and the
    range outline is drawn on the HTML map; ``occurrences`` (N, 2) (lat, lon) are overlaid on it;
    ``notes`` are warnings for the HTML legend.
    """
    from taxamap.writers.geotiff import write_geotiff

    slug = free_stem(out_dir, str(ds.attrs["slug"]), str(ds.attrs.get("query", "")), formats,
                     bool(threshold))
    paths: dict[str, Path] = {}
    range_geometry = result = None
    if threshold:
        from taxamap.products.ranges import cut_range

        # A rule keeping no cell fails before any file.
        result = cut_range(ds, threshold, occurrences)
    if "tif" in formats:
        paths["tif"] = write_geotiff(ds, out_dir / f"{slug}.tif")
    if result is not None:
        result.write(out_dir, stem=slug)
        paths["range.tif"] = result.paths["raster"]
        paths["range.gpkg"] = result.paths["polygons"]
        range_geometry = result.geometry
        log(f"range ({threshold}): threshold {result.threshold:.4f}, {result.n_in_range:,} of "
            f"{result.n_valid:,} cells, {result.area_km2:,.0f} km2")
        log(f"range EOO {result.eoo_km2:,.0f} km2, AOO {result.aoo_km2:,.0f} km2 (IUCN 2 km "
            f"grid): {result.criterion_b}")
    if "html" in formats:
        from taxamap.writers.html import write_html

        extras = {}
        if occurrences is not None:
            extras["occurrences"] = occurrences
        if range_geometry is not None:
            extras["range_geometry"] = range_geometry
            extras["range_label"] = threshold
        if self_contained:
            extras["self_contained"] = True
        if expert_geometry is not None:
            extras["expert_geometry"] = expert_geometry
        if notes:
            extras["notes"] = notes
        paths["html"] = write_html(ds, out_dir / f"{slug}.html", outline=outline, **extras)
    if "png" in formats:
        from taxamap.writers.png import write_png

        paths["png"] = write_png(ds, out_dir / f"{slug}.png", outline=outline)
    return paths


def embed(req: GridRequest, verify: bool = False) -> CellEmbeddings:
    """``taxamap embed``: fill the stores for a grid without making a map; with ``verify``, read
    every stored block back and embed again the ones that fail their check."""
    from taxamap.devices import lazy_device
    from taxamap.models.hub import load_config

    from taxamap.geography import check_cells

    req.modalities = parse_modalities(req.modalities)
    req.cells = check_cells(req.cells)
    check_grid_paths(req)
    device = lazy_device(req.device)
    config, _ = load_config(req.models_dir)
    region, grid = build_grid(req)
    return embed_cells(req, grid, config, device, region=region.name, verify=verify)
