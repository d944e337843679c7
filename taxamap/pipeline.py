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

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.grid import DEFAULT_RESOLUTION, Grid, make_grid
from taxamap.score import DEFAULT_FUSION, ScoreMap, fuse, parse_modalities


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
    # satellite source
    sat_source: str = "xyz"
    sat_url: str | None = None
    sat_zoom: int | None = None
    sat_size: int | None = None
    sat_file: str | None = None
    ee_project: str | None = None
    sat_year: int = 2020
    workers: int = 8
    # environment source
    worldclim: str | None = None
    env_array: str | None = None
    progress: bool = True


@dataclass
class PredictRequest(GridRequest):
    """``taxamap predict``: a query (species name or photo) plus the grid options."""

    species: str | None = None
    image: str | None = None
    fusion: str = DEFAULT_FUSION
    out: str = "."
    formats: tuple[str, ...] = ("tif", "html", "png")


@dataclass
class PredictResult:
    paths: dict[str, Path]
    n_cells: int
    prompt: str | None
    timings: dict[str, float]
    scoremap: ScoreMap


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


def _modality_embedder(modality: str, req: GridRequest, config: dict, device: str):
    from taxamap import engine

    if modality == "location":
        from taxamap.models.location import load_location_encoder

        return engine.location_embedder(
            load_location_encoder(req.models_dir, device=device, config=config)
        )
    if modality == "satellite":
        from taxamap.models.satellite import load_satellite_encoder
        from taxamap.sources.satellite import make_satellite_source

        source = make_satellite_source(
            req.sat_source, url=req.sat_url, zoom=req.sat_zoom, size=req.sat_size,
            file=req.sat_file, ee_project=req.ee_project, year=req.sat_year,
            cache_dir=req.cache_dir, workers=req.workers,
        )
        encoder = load_satellite_encoder(req.models_dir, device=device, config=config)
        return engine.satellite_embedder(encoder, source)
    if modality == "environment":
        from taxamap.models.environment import load_environment_encoder
        from taxamap.sources.worldclim import WorldClimFeatures

        if not req.worldclim and not req.env_array:
            raise TaxamapError(
                "the environment modality needs climate data: pass --worldclim DIR (fill it once "
                "with 'taxamap data worldclim DIR') or --env-array bioclim_elevation_scaled.npy"
            )
        features = WorldClimFeatures(req.worldclim, env_array=req.env_array)
        encoder = load_environment_encoder(req.models_dir, device=device, config=config)
        return engine.environment_embedder(encoder, features)
    raise TaxamapError(f"unknown modality {modality!r}")


@dataclass
class CellEmbeddings:
    """The stores of one grid, one per modality, with what the outputs must credit."""

    stores: dict
    model_refs: dict[str, str]
    attribution: str | None
    license: str | None
    computed_blocks: dict[str, int]


def embed_cells(req: GridRequest, grid: Grid, config: dict, device: str) -> CellEmbeddings:
    """Make sure every modality's store for ``grid`` is complete (computing only missing blocks)."""
    from taxamap import engine
    from taxamap.store import EmbeddingStore, store_key, store_location

    latlon = None
    stores, refs, computed = {}, {}, {}
    attribution = license_ = None
    for modality in req.modalities:
        embedder = _modality_embedder(modality, req, config, device)
        key = store_key(grid.definition(), modality, embedder.model_ref, embedder.source)
        location, chosen = store_location(req.store, grid.key(), modality, key, req.cache_dir)
        store = EmbeddingStore.open(
            location, key=key, n_cells=grid.n_cells, dim=embedder.dim,
            attrs={
                "grid": grid.definition(), "modality": modality, "model": embedder.model_ref,
                "source": embedder.source,
            },
            must_match=chosen,
        )
        if store.is_complete():
            computed[modality] = 0
        else:
            if latlon is None:
                latlon = grid.cell_latlon()
            pending = len(store.pending_chunks())
            if pending < store.n_chunks:
                log(f"resuming {modality}: {pending} of {store.n_chunks} blocks left in {location}")
            computed[modality] = engine.embed_to_store(latlon, embedder, store, progress=req.progress)
        if embedder.attribution:
            attribution, license_ = embedder.attribution, embedder.license
        stores[modality] = store
        refs[modality] = embedder.model_ref
    return CellEmbeddings(stores, refs, attribution, license_, computed)


def embed_query(req: PredictRequest, config: dict, device: str):
    """The query embedding (512,), its prompt, a label, a file slug and the encoder ref."""
    from taxamap.models.clip import load_clip

    if bool(req.species) == bool(req.image):
        raise TaxamapError("give exactly one query: --species NAME or --image PATH")
    if req.species:
        from taxamap.taxonomy import resolve_species

        taxon = resolve_species(req.species, cache_dir=req.cache_dir and Path(req.cache_dir) / "taxonomy")
        log(f"prompt: {taxon.prompt}  (taxonomy from {taxon.source})")
        clip = load_clip(req.models_dir, device=device, config=config)
        q = clip.encode_text([taxon.prompt])[0]
        return q, taxon.prompt, taxon.binomial, slugify(taxon.binomial), clip.ref
    from taxamap.models.preprocess import load_image

    image = load_image(req.image)
    clip = load_clip(req.models_dir, device=device, config=config)
    q = clip.encode_image([image])[0]
    stem = Path(req.image).stem
    return q, None, f"image {Path(req.image).name}", slugify(stem), clip.ref


def predict(req: PredictRequest) -> PredictResult:
    """Make the map for one query and write its files; returns their paths."""
    from taxamap.devices import pick_device
    from taxamap.models.hub import load_config

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    req.modalities = parse_modalities(req.modalities)
    out_dir = check_out_dir(req.out)
    device = pick_device(req.device)
    config, config_ref = load_config(req.models_dir)

    region, grid = build_grid(req)
    log(f"region {region.name}: {grid.n_cells:,} cells of {grid.resolution} deg "
        f"({grid.width} x {grid.height} grid)")
    timings["grid"] = time.perf_counter() - t0

    t = time.perf_counter()
    cells = embed_cells(req, grid, config, device)
    timings["cells"] = time.perf_counter() - t

    t = time.perf_counter()
    q, prompt, label, slug, query_ref = embed_query(req, config, device)
    timings["query"] = time.perf_counter() - t

    t = time.perf_counter()
    embeddings = {m: s.read() for m, s in cells.stores.items()}
    fused, per = fuse(embeddings, q, req.fusion)
    timings["score"] = time.perf_counter() - t

    models = {"config": config_ref, "query": query_ref, **cells.model_refs}
    scoremap = ScoreMap(
        grid=grid,
        fused=grid.to_raster(fused),
        layers={m: grid.to_raster(v) for m, v in per.items()},
        query=label,
        prompt=prompt,
        fusion=req.fusion,
        models=models,
        attribution=cells.attribution,
        region_name=region.name,
        region_geometry=getattr(region, "outline", None) or region.geometry,
        slug=slug,
        extra_tags={"imagery_license": cells.license} if cells.license else {},
    )
    t = time.perf_counter()
    paths = write_outputs(scoremap, out_dir, req.formats)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return PredictResult(paths, grid.n_cells, prompt, timings, scoremap)


def write_outputs(scoremap: ScoreMap, out_dir: Path, formats=("tif", "html", "png")) -> dict[str, Path]:
    """Write the requested files for ``scoremap`` into ``out_dir`` (each atomically)."""
    from taxamap.writers.geotiff import write_geotiff
    from taxamap.writers.html import write_html
    from taxamap.writers.png import write_png

    writers = {"tif": write_geotiff, "html": write_html, "png": write_png}
    paths = {}
    for ext in formats:
        paths[ext] = writers[ext](scoremap, out_dir / f"{scoremap.slug}.{ext}")
    return paths


def embed(req: GridRequest) -> CellEmbeddings:
    """``taxamap embed``: fill the stores for a grid without making a map."""
    from taxamap.devices import pick_device
    from taxamap.models.hub import load_config

    req.modalities = parse_modalities(req.modalities)
    device = pick_device(req.device)
    config, _ = load_config(req.models_dir)
    region, grid = build_grid(req)
    log(f"region {region.name}: {grid.n_cells:,} cells of {grid.resolution} deg")
    return embed_cells(req, grid, config, device)
