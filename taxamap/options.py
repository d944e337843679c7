"""Options, defined once: every option of the grid, the query, the fit and the files written is
one field of a frozen dataclass here, with its default, its help and its checks.

The CLI's arguments (:func:`add_options`, :func:`from_args`) and the Python API's keyword
signatures (:func:`keywords`) are derived from these fields, so a new option is one field: it
appears in ``taxamap predict --help``, in ``taxamap.predict``'s signature (tab completion and
``help()`` in a notebook) and in the request the library receives, checked in one place
(``__post_init__``). The API's keyword is the field's name; the CLI's flag is ``--`` plus the name
with dashes (``sat_url`` -> ``--sat-url``), so messages can name either (:mod:`taxamap.surface`).

>>> from taxamap.options import PredictOptions
>>> PredictOptions(species="Cardinalis cardinalis", region="ohio", modalities="location")
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Sequence

from taxamap.errors import TaxamapError
from taxamap.grid import DEFAULT_RESOLUTION
from taxamap.models.precision import PRECISIONS, check_precision
from taxamap.surface import option

PathLike = str | os.PathLike
BBoxLike = str | Sequence[float]

#: Fusion rules: "mean" averages the per-modality cosine maps; "sum" is TaxaBind's own rule
#: (normalise the sum of the cell's normalised modality embeddings, then the cosine).
FUSIONS = ("mean", "sum")
DEFAULT_FUSION = "mean"

#: What ``--cells`` keeps of a region: cells on land (the default), cells on water (ocean and
#: lakes: for fish and waterbirds), or every cell whose centre is in the region.
CELL_CHOICES = ("land", "water", "all")

#: Satellite imagery sources (taxamap.sources.satellite).
SAT_SOURCES = ("wms", "xyz", "file", "earthengine")

# Argument groups of ``--help``, in the order they are shown.
WHERE = "where"
EMBED = "what to embed"
SATELLITE = "satellite source (with --modalities ...,satellite)"
CLIMATE = "climate source (with --modalities ...,environment)"
QUERY = "query (one of)"
MAPS = "maps"
RANGES = "range products and overlays"
FIT = "fit on occurrences (few-shot maps)"
PANEL = "reference panel (readable scores)"


def opt(default: Any, group: str, help: str, *, metavar: str | None = None,
        choices: Sequence[str] | None = None, cli: bool = True, api: bool = True,
        flag: str | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is an option: its ``default``, its ``--help`` ``group`` and text,
    and how the CLI shows it (``metavar``, ``choices``, ``parse``: str -> value; a ``flag``
    other than ``--name``; ``cli``/``api`` False to leave it off one surface). A boolean whose
    default is True is a ``--no-...`` switch on the CLI."""
    meta = {"group": group, "help": help, "metavar": metavar, "choices": choices, "cli": cli,
            "api": api, "flag": flag, "parse": parse}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


def _path(value: Any) -> str | None:
    return None if value is None else os.fspath(value) if isinstance(value, os.PathLike) else value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen: normalised once, in __post_init__


def _positive(value: Any, name: str, what: str, kind: type = float) -> Any:
    """``value`` as a finite positive ``kind``, else a one-line error naming the option."""
    try:
        number = kind(value)
        ok = math.isfinite(number) and number > 0 and (kind is float or number == value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TaxamapError(f"{option(name.replace('_', '-'), value)} must be {what}")
    return number


def parse_modalities(text: str | Sequence[str]) -> list[str]:
    """``"location,satellite"`` -> the modalities in band order, de-duplicated; bad names raise."""
    from taxamap.modalities import list_modalities

    known = list_modalities()
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise TaxamapError(
            f"unknown modality {', '.join(unknown) or '(none)'}; choose from "
            f"{','.join(known)} ({option('modalities', 'location,satellite')})")
    return [m for m in known if m in names]


def check_cells(cells: str) -> str:
    """The ``cells`` choice, normalised ("Land " -> "land"); a one-line error for anything else."""
    value = cells.strip().lower() if isinstance(cells, str) else cells
    if value not in CELL_CHOICES:
        raise TaxamapError(f"{option('cells', cells)} is not one of land, water or all (land: "
                           "cells on land, the default; water: ocean and lakes; all: every cell in "
                           "the region)")
    return value


def check_fusion(fusion: str) -> str:
    """``fusion`` if it is a fusion rule; a one-line error naming the choices otherwise."""
    value = fusion.strip().lower() if isinstance(fusion, str) else fusion
    if value not in FUSIONS:
        raise TaxamapError(f"unknown {option('fusion', fusion)}; choose from {', '.join(FUSIONS)}")
    return value


@dataclass(frozen=True, kw_only=True)
class GridOptions:
    """Where the cells are, what embeds them and where the embeddings are kept: the options
    ``predict``, ``embed`` and ``serve`` share (grid, model, sources, runtime)."""

    region: PathLike | None = opt(
        None, WHERE, "preset name (usa = the contiguous states, world, a continent, a country "
        "name or ISO-3 code, a US state or Canadian province name/postal code; see 'taxamap "
        "regions'; a name of several presets, e.g. Georgia, is refused with the name of each) or "
        "a vector file (GeoJSON, GeoPackage, Shapefile; any CRS; at most 500,000 vertices, and "
        "outlines that cross themselves in at most 10,000 places)", metavar="NAME|FILE")
    bbox: BBoxLike | None = opt(
        None, WHERE, "lon/lat box in degrees; W > E crosses the antimeridian. With --region, "
        "the two are intersected", metavar="W,S,E,N")
    resolution: float = opt(
        DEFAULT_RESOLUTION, WHERE, f"cell size in degrees (default {DEFAULT_RESOLUTION}: the "
        "contiguous USA is 81,541 land cells, a ~12 s cold map on 2 CPU cores)",
        metavar="DEG", parse=float)
    cells: str = opt(
        "land", WHERE, "which cells of the region are kept: land (default; Natural Earth 1:50m "
        "land minus its lakes), water (ocean and lakes, for fish and waterbirds) or all (every "
        "cell whose centre is in the region)", choices=CELL_CHOICES, parse=str.lower)
    modalities: str | Sequence[str] = opt(
        ("location",), EMBED, "comma list of location,satellite,environment (default: "
        "location)", metavar="LIST")
    models: PathLike | None = opt(
        None, EMBED, "models folder DIR/<org>/<repo>/ (default: $TAXAMAP_MODELS, else the "
        "Hugging Face cache, downloading on first use)", metavar="DIR")
    device: str = opt("auto", EMBED, "auto|cpu|cuda (default auto)")
    precision: str = opt(
        "auto", EMBED, "precision of the location and environment encoders: auto (default: "
        "their MLP layers in bf16, projection and Fourier features in float32, where the "
        "hardware runs bf16 natively: CPUs with AVX512-BF16/AMX, CUDA GPUs; float32 elsewhere) "
        "or fp32 (force float32, as TaxaBind trained them). Stores and GeoTIFF tags record it, "
        "so maps of either precision never mix", choices=PRECISIONS, parse=str.lower)
    cache: PathLike | None = opt(
        None, EMBED, "cache for tiles, taxonomy answers and embedding stores (default: the user "
        "cache dir, or $TAXAMAP_CACHE)", metavar="DIR")
    store: PathLike | None = opt(
        None, EMBED, "embedding store location (a folder or fsspec URL); default: inside "
        "--cache", metavar="PATH")
    progress: bool = opt(True, EMBED, "hide progress bars")
    dask: str | None = opt(
        None, EMBED, "embed blocks on a Dask cluster: a scheduler address (tcp://host:8786) or "
        "local[:N] for a LocalCluster of N processes; the store must be reachable by every "
        "worker", metavar="ADDRESS")
    sat_source: str = opt(
        "wms", SATELLITE, "wms (default): exactly TaxaBind's training request, EOX Sentinel-2 "
        "cloudless 2020 by WMS GetMap; xyz tiles (default: the same EOX mosaic), a local raster, "
        "or Earth Engine; all deliver the same footprint", choices=SAT_SOURCES)
    sat_url: str | None = opt(
        None, SATELLITE, "WMS endpoint for wms (default https://tiles.maps.eox.at/wms), or an "
        "XYZ template with {z}/{x}/{y} for xyz (default: EOX s2cloudless-2020)", metavar="URL")
    sat_footprint: float | None = opt(
        None, SATELLITE, "ground size of a patch: a square in the cell's tangent plane (default "
        "2560, TaxaBind's training footprint)", metavar="METRES", parse=float)
    sat_size: int | None = opt(
        None, SATELLITE, "patch size in pixels (default 256, TaxaBind's; ~10 m/px)",
        metavar="PX", parse=int)
    sat_zoom: int | None = opt(
        None, SATELLITE, "xyz only: fix the tile zoom (default: chosen per cell from its "
        "latitude so tiles are at least as fine as the patch)", metavar="Z", parse=int)
    sat_file: PathLike | None = opt(
        None, SATELLITE, "raster for --sat-source file (COG, VRT, GeoTIFF; any CRS)",
        metavar="PATH")
    ee_project: str | None = opt(None, SATELLITE,
                                 "Google Cloud project for --sat-source earthengine")
    sat_year: int = opt(2020, SATELLITE, "composite year for Earth Engine (2020)", parse=int)
    workers: int = opt(8, SATELLITE, "concurrent satellite requests (default 8)", parse=int)
    worldclim: PathLike | None = opt(
        None, CLIMATE, "folder with WorldClim 2.1 5-minute rasters ('taxamap data worldclim "
        "DIR')", metavar="DIR")
    env_array: PathLike | None = opt(
        None, CLIMATE, "TaxaBind/SINR's pre-scaled bioclim_elevation_scaled.npy instead",
        metavar="NPY")

    def __post_init__(self) -> None:
        for name in ("region", "models", "cache", "store", "sat_file", "worldclim", "env_array"):
            _set(self, name, _path(getattr(self, name)))
        if self.bbox is not None and not isinstance(self.bbox, str):
            _set(self, "bbox", tuple(float(v) for v in self.bbox))
        _set(self, "resolution", _positive(self.resolution, "resolution",
                                           "a positive number of degrees"))
        _set(self, "cells", check_cells(self.cells))
        _set(self, "modalities", tuple(parse_modalities(self.modalities)))
        _set(self, "device", str(self.device or "auto").strip().lower())
        _set(self, "precision", check_precision(self.precision))
        _set(self, "workers", _positive(self.workers, "workers", "a whole number of 1 or more",
                                        int))
        if self.sat_source not in SAT_SOURCES:
            raise TaxamapError(f"unknown {option('sat-source', self.sat_source)}; choose from "
                               f"{', '.join(SAT_SOURCES)}")


@dataclass(frozen=True, kw_only=True)
class MapOptions(GridOptions):
    """A grid and how its modality scores are fused: what a map session is opened with."""

    fusion: str = opt(
        DEFAULT_FUSION, MAPS, "mean: average of per-modality cosine maps (default); sum: "
        "TaxaBind's rule, cosine with the renormalised sum of the cell's modality embeddings",
        choices=FUSIONS)
    relative: bool = opt(
        False, PANEL, "add the band 'relative': at each cell, the fraction of the reference "
        "panel's species scoring lower than the query (0-1, one fixed scale for every map), and "
        "warn when the query never stands out from the panel ('no signal'). The first use "
        "embeds the panel's prompts (once per text model) and its per-cell statistics (once per "
        "grid); later maps add milliseconds")
    panel: PathLike | None = opt(
        None, PANEL, "reference panel: one species name per line, or a CSV with a 'species' "
        "column (e.g. a regional checklist; bring one for plants, fishes or insects); default: "
        "taxamap's 2,435 table species (mostly birds and mammals). Implies --relative for maps",
        metavar="FILE")

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "fusion", check_fusion(self.fusion))
        _set(self, "panel", _path(self.panel))
        if self.panel is not None:
            _set(self, "relative", True)


@dataclass(frozen=True, kw_only=True)
class QueryOptions:
    """What to map: species name(s), a species file, a photo or a recording."""

    species: str | Sequence[str] | None = opt(
        None, QUERY, 'binomial ("Cardinalis cardinalis", any case), common name ("Northern '
        'Cardinal") or the full seven-rank string ("Animalia Chordata Aves ... Cardinalis '
        'cardinalis"); a name not found gets the closest ones ("did you mean ...?"); the prompt '
        "used is printed", metavar="SPECIES")
    species_file: PathLike | None = opt(
        None, QUERY, "many species: one name per line, or a CSV with a 'species' column; every "
        "name is checked first (unknown ones are counted and the first 10 named); species are "
        "then embedded, scored and written in batches, so memory stays flat however many there "
        "are; above 100 species the summary table goes to OUT/<file stem>_summary.csv",
        metavar="FILE")
    skip_unknown: bool = opt(
        False, QUERY, "with --species-file: map the names that resolve and list the unknown "
        "ones as skipped in the summary table (default: stop and list them)")
    image: PathLike | None = opt(None, QUERY, "photo of the species (JPEG, PNG, WebP)",
                                 metavar="IMAGE")
    audio: PathLike | None = opt(None, QUERY, "recording of the species (WAV, FLAC, MP3, OGG)",
                                 metavar="AUDIO")

    def __post_init__(self) -> None:
        for name in ("species_file", "image", "audio"):
            _set(self, name, _path(getattr(self, name)))
        if self.skip_unknown and not self.species_file:
            raise TaxamapError(f"{option('skip-unknown', True)} needs "
                               f"{option('species-file', metavar='FILE')} (a single species "
                               "that is unknown is an error)")
        if self.species is not None and not isinstance(self.species, str):
            _set(self, "species", tuple(str(s) for s in self.species))


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """A few-shot fit on occurrence points (``fitted`` and ``combined`` bands)."""

    occurrences: Any = opt(
        None, RANGES, "occurrence points (CSV lat/lon or GBIF columns, GeoPackage, Shapefile, "
        "GeoJSON) shown as clustered markers on the HTML map (a random sample of 10,000 when "
        "there are more, as its legend says); a file with no point on the map (e.g. lat/lon "
        "swapped) is said on stderr and in the legend; with --fit, the presences fitted",
        metavar="FILE")
    fit: bool = opt(
        False, FIT, "with --occurrences: add bands 'fitted' (logistic regression on the stored "
        "cell embeddings, presences vs background) and 'combined' (the same with the zero-shot "
        "score as an input), 'uncertainty' (their spread over 10 bootstrap refits) and "
        "'novelty' (distance to the training samples in embedding space); prints their spatial "
        "cross-validation, with held-out AUC and error by novelty and uncertainty tercile, and "
        "writes each sample's held-out values to <slug>_cv.csv. Needs presences in at least "
        "5 cells; warns under 10")
    background: Any = opt(
        None, FIT, "background points for --fit (default: 10,000 cells sampled uniformly)",
        metavar="FILE")
    cv_blocks: float = opt(
        1.0, FIT, "block size of the spatial 5-fold cross-validation (default 1 degree)",
        metavar="DEG", parse=float)
    seed: int = opt(0, FIT, "seed of the background sample and the fold assignment (default 0)",
                    parse=int)

    def __post_init__(self) -> None:
        if not self.fit:
            if self.background is not None:
                raise TaxamapError(f"{option('background')} is used by {option('fit', True)}; "
                                   f"add {option('fit', True)} or drop {option('background')}")
            return
        if self.occurrences is None:
            raise TaxamapError(f"{option('fit', True)} needs "
                               f"{option('occurrences', metavar='FILE')}: the presence records "
                               "to fit on")
        _set(self, "cv_blocks", _positive(self.cv_blocks, "cv_blocks",
                                          "a positive number of degrees"))


@dataclass(frozen=True, kw_only=True)
class PredictOptions(QueryOptions, MapOptions, FitOptions):
    """Everything :func:`taxamap.predict` takes: a query, a grid, fusion and an optional fit."""

    def __post_init__(self) -> None:
        QueryOptions.__post_init__(self)
        MapOptions.__post_init__(self)
        FitOptions.__post_init__(self)


@dataclass(frozen=True, kw_only=True)
class WriteOptions:
    """Which files :func:`taxamap.write` writes, where, and what is drawn on them."""

    out: PathLike = opt(".", MAPS, "output folder (default: current)", metavar="DIR")
    formats: str | Sequence[str] = opt(("tif", "html", "png"), MAPS,
                                       "files to write (default tif,html,png)", cli=False)
    threshold: str | None = opt(
        None, RANGES, "also write a binary range GeoTIFF and polygons (GeoPackage) cut at RULE: "
        "percentile:90 | value:0.25 | maxtss:OCC_FILE; the outline is drawn on the HTML; a rule "
        "that keeps no cell is an error giving the map's value range", metavar="RULE")
    occurrences: Any = opt(None, RANGES, "occurrence points drawn on the HTML map",
                           metavar="FILE")
    expert_range: Any = opt(
        None, RANGES, "an expert range (polygons, any CRS) drawn as a dashed outline on the "
        "HTML map; compare numerically with 'taxamap evaluate MAP --range FILE'", metavar="FILE")
    self_contained: bool = opt(
        False, RANGES, "one HTML file that renders with no internet (needs taxamap[offline])")
    stack: bool = opt(
        False, MAPS, "with --species-file: one multi-band GeoTIFF (a fused band per species) "
        "instead of files per species; it is built in memory, so it refuses more than 2 GB of "
        "maps")
    stack_name: str | None = opt(None, MAPS, "file stem of the --stack GeoTIFF", cli=False)
    stretch: str | None = opt(
        None, MAPS, "display scale of the PNG and HTML (never the GeoTIFF): percentile:P "
        "(default percentile:90: clipped below each band's P-th percentile), value:LO,HI (one "
        "fixed scale, so several maps compare by colour) or none (minimum to maximum); "
        "'relative' always shows 0-1", metavar="RULE")

    def __post_init__(self) -> None:
        _set(self, "out", _path(self.out))  # the stretch is checked with the files to write
        formats = (self.formats.split(",") if isinstance(self.formats, str)
                   else list(self.formats))
        # Checked against the writers' registry where files are written (taxamap.writers).
        _set(self, "formats", tuple(dict.fromkeys(str(f).strip().lower() for f in formats
                                                  if str(f).strip())))


@dataclass(frozen=True, kw_only=True)
class PanelOptions(MapOptions):
    """A grid and the reference panel (``--panel``, ``--clade``) whose species are ranked or
    counted: what ``species-at`` and ``richness`` share."""

    clade: str | None = opt(
        None, PANEL, "only the panel's species under this rank prefix, one to six ranks from "
        "the kingdom down ('Animalia Chordata Aves Passeriformes', any case)", metavar="PREFIX")


@dataclass(frozen=True, kw_only=True)
class SpeciesAtOptions(PanelOptions):
    """``taxamap species-at``: the panel ranked at one cell."""

    lat: float | None = opt(None, WHERE, "latitude of the place, degrees", metavar="LAT",
                            parse=float)
    lon: float | None = opt(None, WHERE, "longitude of the place, degrees", metavar="LON",
                            parse=float)
    top: int | None = opt(10, PANEL, "how many species to list (default 10)", metavar="K", parse=int)
    json: PathLike | None = opt(None, PANEL, "also write the ranking as JSON to FILE",
                                metavar="FILE")

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "json", _path(self.json))
        if self.lat is None or self.lon is None:
            raise TaxamapError(f"give the place: {option('lat', metavar='LAT')} and "
                               f"{option('lon', metavar='LON')} in degrees")
        if self.top is not None:  # None: the whole panel
            _set(self, "top", _positive(self.top, "top", "a whole number of species, 1 or more",
                                        int))


@dataclass(frozen=True, kw_only=True)
class RichnessOptions(PanelOptions):
    """``taxamap richness``: per cell, how many species' ranges hold it."""

    species_file: PathLike | None = opt(
        None, PANEL, "count these species (one name per line, or a CSV with a 'species' "
        "column) instead of the panel's", metavar="FILE")
    rule: str = opt(
        "percentile:90", PANEL, "each species' range, as 'taxamap threshold' cuts it: "
        "percentile:P (its top (100-P) %% of cells; default percentile:90) or value:V",
        metavar="RULE")

    def __post_init__(self) -> None:
        super().__post_init__()  # the rule is checked by taxamap.panel.richness, first thing
        _set(self, "species_file", _path(self.species_file))
        given = [n for n in ("species_file", "panel") if getattr(self, n) is not None]
        if len(given) > 1:
            raise TaxamapError(f"give one list of species: {option('species-file')} or "
                               f"{option('panel')}, not both")


# ------------------------------------------------------------------------------ derivations

def option_fields(*classes: type) -> list:
    """The option fields of ``classes``, in order, each name once (the first class wins)."""
    seen: dict[str, Any] = {}
    for cls in classes:
        for f in fields(cls):
            seen.setdefault(f.name, f)
    return list(seen.values())


def build(cls: type, given: dict[str, Any]):
    """``cls`` from the entries of ``given`` that are its fields (the rest are ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in names})


def values_of(options) -> dict[str, Any]:
    """The fields of an options dataclass, by name (e.g. to :func:`build` a wider one)."""
    return {f.name: getattr(options, f.name) for f in fields(options)}


def with_options(options, **changes):
    """``options`` with some fields changed (checked again)."""
    return replace(options, **changes)


def flag_of(f) -> str:
    """The CLI flag of option field ``f``."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def add_options(parser: argparse.ArgumentParser, *classes: type,
                only: Sequence[str] | None = None, skip: Sequence[str] = ()) -> None:
    """Add the CLI arguments of ``classes``' option fields to ``parser`` (``only`` those names,
    none of ``skip``), in ``--help`` groups; values arrive under the field names."""
    groups: dict[str, Any] = {}
    for f in option_fields(*classes):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip or (only is not None and f.name not in only):
            continue
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
            kwargs["default"] = f.default
        else:
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(map(str, default))
            kwargs["default"] = default
            for key in ("metavar", "choices"):
                if meta.get(key):
                    kwargs[key] = list(meta[key]) if key == "choices" else meta[key]
            if meta.get("parse"):
                kwargs["type"] = meta["parse"]
        group.add_argument(flag_of(f), **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides):
    """``cls`` from parsed CLI arguments (fields the parser lacks keep their defaults)."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given.update(overrides)
    return cls(**given)


def _resolved_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: show it as written
        return {f.name: f.type for f in fields(cls)}


def keywords(*classes: type) -> Callable:
    """Decorate an API function that takes ``**options``: its signature gains every option field
    of ``classes`` as a keyword (default and type shown in ``help()`` and completed by IPython),
    unknown keywords are a TypeError as for any Python function, and the function receives the
    options (defaults filled in) in ``**options``."""

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own}
        hints: dict[str, Any] = {}
        for cls in classes:
            for name, hint in _resolved_hints(cls).items():
                hints.setdefault(name, hint)
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                   annotation=hints.get(f.name, f.type))
                 for f in option_fields(*classes)
                 if f.metadata.get("api", True) and f.name not in taken
                 and f.default is not MISSING]
        trailing = [p for p in own if p.kind is p.KEYWORD_ONLY]
        leading = [p for p in own if p.kind is not p.KEYWORD_ONLY]
        full = sig.replace(parameters=leading + added + trailing)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            bound = full.bind(*args, **kwargs)
            bound.apply_defaults()
            return func(**bound.arguments)

        wrapper.__signature__ = full  # type: ignore[attr-defined]
        return wrapper

    return decorate


__all__ = ["CELL_CHOICES", "DEFAULT_FUSION", "DEFAULT_RESOLUTION", "FUSIONS", "FitOptions",
           "GridOptions", "MapOptions", "PanelOptions", "PredictOptions", "QueryOptions",
           "RichnessOptions", "SAT_SOURCES", "SpeciesAtOptions", "WriteOptions", "add_options", "build", "check_cells", "check_fusion", "flag_of",
           "from_args", "keywords", "option_fields", "parse_modalities", "values_of",
           "with_options"]
