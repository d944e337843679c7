"""The library behind ``taxamap predict`` and ``taxamap embed``: one function each.

region + resolution -> Grid -> (stored) cell embeddings per modality; query -> q; scores -> files.
Cell embeddings do not depend on the query, so they live in an :class:`EmbeddingStore` and a later
query over the same grid only embeds its prompt, takes one matrix product and writes files.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from taxamap.errors import ModelFilesMissing, TaxamapError
from taxamap.grid import DEFAULT_RESOLUTION, Grid, make_grid
from taxamap.paths import cache_subdir
from taxamap.score import DEFAULT_FUSION, ScoreMap, parse_modalities


def log(message: str) -> None:
    """Progress and facts for the user go to stderr; stdout is kept for results (paths)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class GridRequest:
    """Options shared by ``predict`` and ``embed``: where, how fine, which modalities, which data."""

    region: str | None = None
    bbox: str | None = None
    resolution: float = DEFAULT_RESOLUTION
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
    """``taxamap predict``: a query (species name or photo) plus the grid options."""

    species: str | None = None
    image: str | None = None
    audio: str | None = None
    species_file: str | None = None
    stack: bool = False
    fusion: str = DEFAULT_FUSION
    out: str = "."
    formats: tuple[str, ...] = ("tif", "html", "png")
    threshold: str | None = None
    occurrences: str | None = None
    self_contained: bool = False


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
    paths: dict[str, Path]
    n_cells: int
    prompt: str | None
    timings: dict[str, float]
    scoremap: ScoreMap | None
    summary: list[dict] = field(default_factory=list)


def slugify(text: str) -> str:
    """'Cardinalis cardinalis' -> 'cardinalis-cardinalis' (safe as a file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:80] or "map"


def check_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove it is writable before any long work starts."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".taxamap-probe-"):
            pass
    except OSError as exc:
        raise TaxamapError(
            f"cannot write to --out {path}: {exc.strerror or exc}; choose a writable folder"
        ) from exc
    return path


def build_grid(req: GridRequest):
    """Resolve the region and lay the grid over it; returns (region, grid)."""
    from taxamap.regions import resolve_region

    region = resolve_region(req.region, req.bbox)
    grid = make_grid(region.geometry, req.resolution)
    return region, grid


#: On CUDA, compile the satellite encoder when at least this many cells are to be embedded (the
#: ~25 s compile pays for itself at ~11 k vs ~8 k tiles/s on an H100).
COMPILE_MIN_CELLS = 200_000


@dataclass
class ModalityPlan:
    """What identifies a modality's embeddings (model ref, source settings), known without
    loading any weights, and how to build its :class:`~taxamap.engine.CellEmbedder` when cells
    actually need embedding."""

    modality: str
    model_ref: str
    source: dict
    build: Callable[[], object]
    attribution: str | None = None
    license: str | None = None
    stats: object | None = None


_NOTICES_SHOWN: set[str] = set()


def _licence_notice(attribution: str | None, license_: str | None) -> None:
    """Say once per process which imagery licence the outputs inherit."""
    if license_ and license_ not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(license_)
        log(f"imagery: {attribution} -- licence {license_}. Maps made from it carry this notice "
            "(GeoTIFF tags, HTML attribution, PNG footer); non-commercial licences apply to them.")


def _modality_plan(modality: str, req: GridRequest, config: dict, device: Callable[[], str],
                   n_cells: int = 0) -> ModalityPlan:
    """``device`` is called only when an encoder is built: a warm query never imports torch."""
    from taxamap import engine
    from taxamap.models import hub

    def ref_of(encoder: str, files) -> str:
        return hub.resolve(hub.encoder_repo(config, encoder), files, models_dir=req.models_dir).ref

    if modality == "location":
        from taxamap.models.location import LOCATION_FILES, load_location_encoder

        return ModalityPlan(
            modality, ref_of("location", LOCATION_FILES), {"kind": "coordinates"},
            lambda: engine.location_embedder(
                load_location_encoder(req.models_dir, device=device(), config=config)),
        )
    if modality == "satellite":
        from taxamap.models.satellite import FILES, load_satellite_encoder
        from taxamap.sources.satellite import make_satellite_source

        source = make_satellite_source(
            req.sat_source, url=req.sat_url, zoom=req.sat_zoom, size=req.sat_size,
            footprint_m=req.sat_footprint, file=req.sat_file, ee_project=req.ee_project, year=req.sat_year,
            cache_dir=cache_subdir("tiles", req.cache_dir), workers=req.workers,
        )
        return ModalityPlan(
            modality, ref_of("satellite", FILES), source.describe(),
            lambda: engine.satellite_embedder(load_satellite_encoder(
                req.models_dir, device=device(), config=config,
                compile=device().startswith("cuda") and n_cells >= COMPILE_MIN_CELLS,
            ), source),
            attribution=getattr(source, "attribution", None),
            license=getattr(source, "license", None),
            stats=getattr(source, "stats", None),
        )
    if modality == "environment":
        from taxamap.models.environment import FILES as ENV_FILES
        from taxamap.models.environment import load_environment_encoder
        from taxamap.sources.worldclim import WorldClimFeatures

        if not req.worldclim and not req.env_array:
            raise TaxamapError(
                "the environment modality needs climate data: pass --worldclim DIR (fill it once "
                "with 'taxamap data worldclim DIR') or --env-array bioclim_elevation_scaled.npy"
            )
        features = WorldClimFeatures(req.worldclim, env_array=req.env_array)
        return ModalityPlan(
            modality, ref_of("environment", ENV_FILES), features.describe(),
            lambda: engine.environment_embedder(
                load_environment_encoder(req.models_dir, device=device(), config=config), features),
        )
    raise TaxamapError(f"unknown modality {modality!r}")


def _modality_embedder(modality: str, req: GridRequest, config: dict, device: str,
                       n_cells: int = 0):
    """Build the embedder of ``modality`` (loads its encoder)."""
    return _modality_plan(modality, req, config, lambda: device, n_cells).build()


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
    """The store at ``location`` if it exists, has ``key`` and is complete; else None."""
    from taxamap.store import EmbeddingStore

    try:
        store = EmbeddingStore.open_existing(location, key)
    except Exception:  # absent, half-created or another key: the full path below decides
        return None
    return store if store.is_complete() else None


def embed_cells(req: GridRequest, grid: Grid, config: dict,
                device: Callable[[], str]) -> CellEmbeddings:
    """Make sure every modality's store for ``grid`` is complete (computing only missing blocks).

    A complete store is used without loading its encoder at all: a warm query touches no weights
    but the query encoder's.
    """
    from taxamap import engine
    from taxamap.store import EmbeddingStore, store_key, store_location

    latlon = None
    stores, refs, computed, sources = {}, {}, {}, {}
    attribution = license_ = None
    for modality in req.modalities:
        plan = _modality_plan(modality, req, config, device, grid.n_cells)
        key = store_key(grid.definition(), modality, plan.model_ref, plan.source)
        location, chosen = store_location(req.store, grid.key(), modality, key, req.cache_dir)
        store = _complete_store(location, key)
        _licence_notice(plan.attribution, plan.license)
        if store is not None:
            computed[modality] = 0
        else:
            embedder = plan.build()
            store = EmbeddingStore.open(
                location, key=key, n_cells=grid.n_cells, dim=embedder.dim,
                attrs={"grid": grid.definition(), "modality": modality, "model": plan.model_ref,
                       "source": plan.source},
                must_match=chosen,
            )
            if latlon is None:
                latlon = grid.cell_latlon()
            pending = len(store.pending_chunks())
            if 0 < pending < store.n_chunks:
                log(f"resuming {modality}: {pending} of {store.n_chunks} blocks left in {location}")
            if req.dask:
                from taxamap.distributed import embed_on_dask

                computed[modality] = embed_on_dask(req, config, modality, store, latlon)
            else:
                computed[modality] = engine.embed_to_store(
                    latlon, embedder, store, progress=req.progress
                )
            missing = getattr(plan.stats, "cells_missing", 0) if plan.stats is not None else 0
            if missing:
                asked = getattr(plan.stats, "cells", 0)
                log(f"{modality}: {missing:,} of {asked:,} cells had no imagery (not found, or "
                    "still failing after retries); they are NaN in that band and fused over the "
                    "other modalities")
        if plan.attribution:
            attribution, license_ = plan.attribution, plan.license
        stores[modality] = store
        refs[modality] = plan.model_ref
        sources[modality] = plan.source
    return CellEmbeddings(stores, refs, attribution, license_, computed, sources)


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


def embed_queries(req: PredictRequest, config: dict,
                  device: Callable[[], str]) -> tuple[list[Query], str]:
    """Embed the request's query or queries; returns them and the query encoder's ref.

    Every species prompt goes through the text encoder in one batch.
    """
    given = [x for x in (req.species, req.image, req.audio, req.species_file) if x]
    if len(given) != 1:
        raise TaxamapError(
            "give exactly one query: --species NAME, --species-file FILE, --image PATH or --audio PATH"
        )
    if req.audio:
        from taxamap.models.audio import embed_audio_query

        vector, ref = embed_audio_query(req.audio, req.models_dir, device=device(), config=config)
        name = Path(req.audio).name
        # Prefixed: an output named like the input would overwrite the user's recording.
        slug = "sound-" + slugify(Path(name).stem)
        return [Query(np.asarray(vector), None, f"sound {name}", slug, "audio")], ref
    if req.image:
        from taxamap.models.clip import load_clip
        from taxamap.models.preprocess import load_image

        image = load_image(req.image)
        clip = load_clip(req.models_dir, device=device(), config=config)
        name = Path(req.image).name
        vector = clip.encode_image([image])[0]
        # Prefixed: `--image bird.png` must never be overwritten by the map bird.png.
        slug = "image-" + slugify(Path(name).stem)
        return [Query(vector, None, f"image {name}", slug, "image")], clip.ref
    from taxamap.taxonomy import resolve_species

    names = [req.species] if req.species else read_species_file(req.species_file)
    cache = cache_subdir("taxonomy", req.cache_dir)
    taxa, seen = [], set()
    for name in names:
        taxon = resolve_species(name, cache_dir=cache)
        if taxon.prompt in seen:  # spellings of one species would overwrite each other's files
            continue
        seen.add(taxon.prompt)
        log(f"prompt: {taxon.prompt}  (taxonomy from {taxon.source})")
        taxa.append(taxon)
    text = _text_encoder(req, config, device, n_prompts=len(taxa))
    vectors = text.encode_text([t.prompt for t in taxa])
    queries = [
        Query(v, t.prompt, t.binomial, slugify(t.binomial), t.source) for v, t in zip(vectors, taxa)
    ]
    return queries, text.ref


#: Above this many prompts torch's faster kernels repay its ~1 s import; below, NumPy wins.
TORCH_TEXT_MIN_PROMPTS = 200


def _text_encoder(req: PredictRequest, config: dict, device: Callable[[], str],
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


def predict(req: PredictRequest) -> PredictResult:
    """Make the map(s) for the request's query or queries and write the files."""
    from taxamap.devices import lazy_device
    from taxamap.models.hub import load_config

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    req.modalities = parse_modalities(req.modalities)
    if req.stack and (req.threshold or req.occurrences or req.self_contained):
        raise TaxamapError("--stack writes one multi-band GeoTIFF only; drop --threshold, "
                           "--occurrences and --self-contained, or map species one by one")
    # Inputs read at the end are checked now: a bad one fails in seconds, not after the cells.
    occurrences = None
    if req.occurrences:
        from taxamap.occurrences import read_points

        occurrences = read_points(req.occurrences)
    if req.threshold:
        from taxamap.ranges import parse_rule

        rule = parse_rule(req.threshold)
        if str(req.threshold).strip().lower().startswith("maxtss"):
            source = str(req.threshold).split(":", 1)[1] if ":" in str(req.threshold) else None
            if source:
                from taxamap.occurrences import read_points

                read_points(source)
            elif occurrences is None:
                raise TaxamapError("--threshold maxtss needs occurrences: maxtss:FILE, or "
                                   "--occurrences FILE")
        del rule
    out_dir = check_out_dir(req.out)
    _warm_up_writers()
    device = lazy_device(req.device)
    if (req.device or "auto").lower() not in ("auto", "cpu"):
        device()  # a GPU the user named must exist before any work starts
    config, config_ref = load_config(req.models_dir)

    region, grid = build_grid(req)
    log(f"region {region.name}: {grid.n_cells:,} cells of {grid.resolution} deg "
        f"({grid.width} x {grid.height} grid)")
    timings["grid"] = time.perf_counter() - t0

    # The query first: a bad species name or file fails in seconds, not after the cells.
    t = time.perf_counter()
    queries, query_ref = embed_queries(req, config, device)
    timings["query"] = time.perf_counter() - t

    t = time.perf_counter()
    cells = embed_cells(req, grid, config, device)
    timings["cells"] = time.perf_counter() - t

    t = time.perf_counter()
    fused, per = score_stores(cells.stores, np.stack([q.vector for q in queries]), req.fusion)
    timings["score"] = time.perf_counter() - t
    for modality, scores in per.items():
        if not np.isfinite(scores).any():
            raise TaxamapError(
                f"no cell could be embedded from the {modality} modality (every input missing or "
                "failed); check its source (--sat-url, the network, --worldclim) and run again"
            )

    models = {"config": config_ref, "query": query_ref, **cells.model_refs}
    outline = getattr(region, "outline", None) or region.geometry
    t = time.perf_counter()
    paths: dict[str, Path] = {}
    summary, last = [], None
    for i, query in enumerate(queries):
        scoremap = ScoreMap(
            grid=grid,
            fused=grid.to_raster(fused[i]),
            layers={m: grid.to_raster(v[i]) for m, v in per.items()},
            query=query.label,
            prompt=query.prompt,
            fusion=req.fusion,
            models=models,
            attribution=cells.attribution,
            region_name=region.name,
            region_geometry=outline,
            slug=query.slug,
            extra_tags={**({"IMAGERY_LICENSE": cells.license} if cells.license else {}),
                        **satellite_tags(cells.sources.get("satellite"))},
        )
        files = {} if req.stack else write_outputs(
            scoremap, out_dir, req.formats, threshold=req.threshold, occurrences=occurrences,
            self_contained=req.self_contained,
        )
        for ext, path in files.items():
            paths[f"{query.slug}.{ext}"] = path
        valid = fused[i][np.isfinite(fused[i])]
        summary.append({
            "species": query.label, "taxonomy": query.source,
            "max": float(valid.max()) if valid.size else float("nan"),
            "mean": float(valid.mean()) if valid.size else float("nan"),
            "files": ", ".join(str(p) for p in files.values()),
        })
        last = scoremap
    if req.stack:
        from taxamap.writers.geotiff import write_stack

        stem = slugify(Path(req.species_file).stem) if req.species_file else queries[0].slug
        path = write_stack(
            last, [(q.label, grid.to_raster(fused[i])) for i, q in enumerate(queries)],
            out_dir / f"{stem}-stack.tif", prompts=[q.prompt or q.label for q in queries],
        )
        paths["stack.tif"] = path
        for row in summary:
            row["files"] = str(path)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return PredictResult(paths, grid.n_cells, queries[0].prompt, timings,
                         last if len(queries) == 1 else None, summary)


def write_outputs(
    scoremap: ScoreMap,
    out_dir: Path,
    formats=("tif", "html", "png"),
    *,
    threshold: str | None = None,
    occurrences: np.ndarray | None = None,
    self_contained: bool = False,
) -> dict[str, Path]:
    """Write the requested files for ``scoremap`` into ``out_dir`` (each atomically).

    With ``threshold`` the binary range GeoTIFF and polygons are written beside the map and the
    range outline is drawn on the HTML map; ``occurrences`` (N, 2) (lat, lon) are overlaid on it.
    """
    from taxamap.writers.geotiff import write_geotiff

    paths: dict[str, Path] = {}
    range_geometry = None
    if "tif" in formats or threshold:
        paths["tif"] = write_geotiff(scoremap, out_dir / f"{scoremap.slug}.tif")
    if threshold:
        from taxamap.ranges import threshold_map

        result = threshold_map(paths["tif"], threshold, out_dir, occurrences=occurrences)
        paths["range.tif"] = result.paths["raster"]
        paths["range.gpkg"] = result.paths["polygons"]
        range_geometry = result.geometry
        log(f"range ({threshold}): threshold {result.threshold:.4f}, {result.n_in_range:,} of "
            f"{result.n_valid:,} cells, {result.area_km2:,.0f} km2")
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
        paths["html"] = write_html(scoremap, out_dir / f"{scoremap.slug}.html", **extras)
    if "png" in formats:
        from taxamap.writers.png import write_png

        paths["png"] = write_png(scoremap, out_dir / f"{scoremap.slug}.png")
    return paths


def embed(req: GridRequest) -> CellEmbeddings:
    """``taxamap embed``: fill the stores for a grid without making a map."""
    from taxamap.devices import lazy_device
    from taxamap.models.hub import load_config

    req.modalities = parse_modalities(req.modalities)
    device = lazy_device(req.device)
    config, _ = load_config(req.models_dir)
    region, grid = build_grid(req)
    log(f"region {region.name}: {grid.n_cells:,} cells of {grid.resolution} deg")
    return embed_cells(req, grid, config, device)
