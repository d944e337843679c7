"""taxamap's Python API: what a notebook imports, and what the CLI and the web app call.

>>> import taxamap
>>> ds = taxamap.predict(species="Cardinalis cardinalis", region="usa", resolution=0.1)
>>> paths = taxamap.write(ds, out="maps", formats=("tif", "html", "png"))
>>> rng = taxamap.threshold(ds, "percentile:90")   # .threshold, .raster, .polygons
>>> table = taxamap.evaluate(ds, occurrences=gdf)  # a pandas.DataFrame, one row per band

Keyword names are the CLI's option names in snake_case, with Python types. Score maps are
``xarray.Dataset`` objects (:mod:`taxamap.dataset`), vector things ``geopandas.GeoDataFrame``
(EPSG:4326 out, any CRS in), tables ``pandas.DataFrame``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from taxamap.errors import TaxamapError
from taxamap.options import (FitOptions, GridOptions, MapOptions, PredictOptions, QueryOptions,
                             RichnessOptions, SpeciesAtOptions, WriteOptions, keywords)
from taxamap.products.ranges import Range  # noqa: F401  (taxamap.Range)
from taxamap.surface import api_entry

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import pandas as pd
    import xarray as xr

    from taxamap.session import MapSession

PathLike = str | os.PathLike
BBoxLike = str | Sequence[float]


@api_entry
@keywords(QueryOptions, MapOptions, FitOptions)
def predict(species: str | Sequence[str] | None = None, **options: Any) -> "xr.Dataset":
    """Score maps of a query over a region, as an ``xarray.Dataset``; writes no output file.

    The query is one of ``species`` (a binomial, a common name, a seven-rank string, or a list of
    them), ``species_file`` (``skip_unknown`` maps the names that resolve), ``image`` (a photo)
    or ``audio`` (a recording). The region is ``region`` (a preset name or vector file) and/or
    ``bbox=(W, S, E, N)``; ``cells`` keeps the region's "land" cells (default; lakes and sea are
    not land), its "water" cells (ocean and lakes) or "all". Cell embeddings are computed
    once per grid and modality and stored in the cache (``cache``/``store``); a later query on
    the same grid only embeds its prompt. Every keyword is an option of ``taxamap predict``
    (:mod:`taxamap.options`: its name in snake_case, a Python value).

    Returns dims ``("y", "x")`` (one query) or ``("species", "y", "x")``; variables ``fused``
    and one per modality (raw cosines, NaN off the cells); coords ``y``/``x`` (cell centres)
    and rioxarray's ``spatial_ref`` (``ds.rio.crs``, ``ds.rio.transform()``); ``attrs`` the
    provenance (query, prompt, modalities, fusion, models, version, region, imagery credit).

    With ``fit=True`` and ``occurrences`` (presence points: a file, GeoDataFrame, DataFrame or
    (N, 2) lat/lon; ``background`` likewise, else ``seed``-sampled cells) two more variables:
    ``fitted``, a presence/background classifier on the stored cell embeddings (in [0, 1]), and
    ``combined``, the same with the zero-shot fused score as an input; the spatially blocked
    cross-validation (``cv_blocks`` degrees, 5 folds) is logged and kept in ``attrs["fit_cv"]``;
    the trust bands ``uncertainty`` (bootstrap spread) and ``novelty`` (distance to the training
    samples in embedding space) follow, and the per-sample held-out table travels along a
    ``sample`` dim (``taxamap.dataset.cv_table(ds)``, a DataFrame; ``<slug>_cv.csv`` when
    written). Maps of two or more modalities have ``disagreement``, maps with the environment
    modality ``mess`` and ``mess_variable`` (README: "Reading the trust layers").
    """
    from taxamap.pipeline import predict_dataset

    ds, _timings = predict_dataset(PredictOptions(species=species, **options))
    return ds


@api_entry
@keywords(MapOptions)
def open_session(*, prompt_cache: int = 1024, map_cache: int = 32,
                 **options: Any) -> "MapSession":
    """A :class:`~taxamap.session.MapSession` over one grid (what ``taxamap serve`` runs): the
    grid is built and its stores completed (embedding what is missing) once, the cell embeddings
    held in memory; ``session.predict(species=... | image=... | audio=...)`` then returns
    :func:`predict`'s Dataset in milliseconds. Grid keywords as :func:`predict`; the last
    ``prompt_cache`` prompt embeddings and ``map_cache`` maps are kept."""
    from taxamap.session import MapSession

    return MapSession(MapOptions(**options), prompt_cache=prompt_cache, map_cache=map_cache)


@api_entry
@keywords(SpeciesAtOptions)
def species_at(lat: float, lon: float, **options: Any) -> "pd.DataFrame":
    """"What lives here?": the reference panel's species (``panel``: a file, default the
    table's 2,435 species; ``clade``: a rank prefix) ranked at the cell holding (``lat``,
    ``lon``) by the score their own maps have there, best first: a DataFrame with rank, name,
    prompt, score and relative (the share of the other panel species scoring lower there), the
    first ``top`` rows; the cell, the panel and the ranking rule in ``attrs``. ``json`` also
    writes it as JSON. Grid keywords as :func:`predict`; no text is encoded once the panel's
    prompts are cached."""
    from taxamap.panel.questions import species_at_table

    return species_at_table(SpeciesAtOptions(lat=lat, lon=lon, **options))


@api_entry
@keywords(RichnessOptions)
def richness(*, stack: bool = False, **options: Any) -> "xr.Dataset":
    """Per cell, how many species' ranges hold it: each species' map (``species_file``'s
    species, else the panel's: ``panel`` or the table's, under ``clade``) cut at ``rule``
    (``percentile:P`` or ``value:V``) as :func:`threshold` cuts it. Returns a Dataset with
    ``richness`` (y, x) and, with ``stack``, ``in_range`` (species, y, x). Species are scored a
    batch at a time: memory is flat in their number. Write it with ``taxamap.write``."""
    from taxamap.panel.questions import richness_map

    return richness_map(RichnessOptions(**options), stack=stack)


@api_entry
@keywords(WriteOptions)
def write(ds: "xr.Dataset", out: PathLike = ".", formats: Sequence[str] = ("tif", "html", "png"),
          *, outline: Any = None, **options: Any) -> dict[str, Path]:
    """Write what ``taxamap predict`` writes from a Dataset of :func:`predict`: per species a
    COG GeoTIFF, an HTML map and a PNG named by its slug (``formats`` picks), plus with
    ``threshold`` the range GeoTIFF and GeoPackage; ``occurrences`` (file, GeoDataFrame,
    DataFrame or (N, 2) lat/lon) are drawn on the HTML map; ``stack`` writes one multi-band
    GeoTIFF of the fused bands instead. ``outline`` (shapely, EPSG:4326) overrides the region
    boundary drawn (default: the Dataset's region). Returns ``{name: path}``."""
    from taxamap.writers.files import write_dataset

    opts = WriteOptions(out=out, formats=formats, **options)
    if "in_range" in getattr(ds, "data_vars", ()):  # a richness map with its --stack
        from taxamap.panel.questions import write_richness

        return write_richness(ds, opts)
    return write_dataset(ds, opts, outline=outline)


@api_entry
@keywords(GridOptions)
def embed(**options: Any) -> dict[str, str]:
    """Fill the embedding stores of a grid (resumable) without making a map; returns
    ``{modality: store location}``. Grid keywords as :func:`predict`."""
    from taxamap.pipeline import embed as embed_grid

    filled = embed_grid(GridOptions(**options))
    return {m: str(s.location) for m, s in filled.stores.items()}


@api_entry
def threshold(
    map: Any,
    rule: str = "percentile:90",
    *,
    band: int | str = "fused",
    occurrences: Any = None,
    out: PathLike | None = None,
    seed: int = 0,
    mask: str | None = None,
) -> Range:
    """Cut ``map`` (a Dataset of :func:`predict`, or a taxamap GeoTIFF path) at ``rule``
    (``percentile:P``, ``value:V`` or ``maxtss[:OCC]``; ``occurrences`` serve a bare
    ``maxtss``) into a :class:`Range` (``.raster``, ``.polygons``, areas, EOO/AOO). ``mask``
    drops the cells a model cannot vouch for, e.g. ``"novelty>2"`` or
    ``"novelty>2,uncertainty>0.1"`` (they become NaN, neither in nor out). With ``out`` the
    range GeoTIFF and GeoPackage are written there too (``.paths``)."""
    from taxamap.dataset import single_map
    from taxamap.products.ranges import cut_range

    ds = single_map(map)
    if occurrences is not None and not isinstance(occurrences, (str, os.PathLike)):
        from taxamap.products.occurrences import as_latlon_points

        occurrences = as_latlon_points(occurrences, "occurrences")
    result = cut_range(ds, rule, occurrences, band, seed, mask=mask)
    if out is not None:
        result.write(out)
    return result


@api_entry
def survey(
    map: Any,
    occurrences: Any = None,
    *,
    n: int = 50,
    min_distance: float = 10.0,
    weights: str | Sequence[str] | dict | None = None,
    out: PathLike | None = None,
) -> "gpd.GeoDataFrame":
    """Where to survey next on ``map`` (a Dataset of :func:`predict`, best with ``fit=True``,
    or a GeoTIFF path): up to ``n`` sites ranked by the weighted geometric mean of their
    percentile ranks in ``weights`` (default suitability plus the map's ``uncertainty`` and
    ``novelty``), each at least ``min_distance`` km (geodesic) from every record in
    ``occurrences`` and from every other site. A GeoDataFrame (EPSG:4326: ``rank``, ``lat``,
    ``lon``, ``priority``, the bands' values, ``nearest_record_km``); with ``out`` also
    ``<name>_survey.gpkg/.csv/.gpx/.html`` there (their paths in ``.attrs["paths"]``)."""
    from taxamap.dataset import as_dataset
    from taxamap.products.survey import survey_map

    is_file = isinstance(map, (str, os.PathLike))
    plan = survey_map(map if is_file else as_dataset(map), occurrences, n=n,
                      min_distance_km=min_distance, weights=weights,
                      out_dir=out)
    sites = plan.sites
    sites.attrs["paths"] = {k: str(v) for k, v in plan.paths.items()}
    sites.attrs["description"] = plan.describe()
    return sites


@api_entry
def evaluate(
    map: Any,
    occurrences: Any = None,
    *,
    background: Any = None,
    presence_column: str | None = None,
    range: Any = None,
    rule: str = "maxf1",
    n_background: int = 10_000,
    seed: int = 0,
    bands: Sequence[int | str] | None = None,
    out: PathLike | None = None,
    json: PathLike | None = None,
    roc: PathLike | None = None,
) -> "pd.DataFrame":
    """How good is ``map`` (a Dataset of :func:`predict` or a GeoTIFF path)? A
    ``pandas.DataFrame`` indexed by band.

    Against ``occurrences`` (presence points: files, GeoDataFrames in any CRS, DataFrames with
    lat/lon columns or (N, 2) (lat, lon) arrays; ``background`` likewise, else cells sampled with
    ``seed``; ``presence_column`` splits one labelled file): ROC-AUC, average precision, the
    max-TSS threshold and its TSS, the continuous Boyce index and point counts.

    Against an expert ``range`` (polygons: a file in any CRS, a GeoDataFrame or a shapely
    geometry), the SINR protocol on H3 resolution-5 cells: ``range_ap``, ``range_auc``, and at
    the threshold ``rule`` (default: the one maximising F1) ``precision``, ``recall``, ``f1``,
    ``jaccard``, with ``n_h3_cells`` and ``n_h3_positive``; ``out`` also writes the agreement
    raster (1 both, 2 map only, 3 expert only). ``json`` and ``roc`` write the records and the
    ROC curves. The table's ``attrs`` hold the point counts and the background source.
    """
    import pandas as pd

    from taxamap.products.evaluate import evaluate_map, plot_roc
    from taxamap.products.occurrences import as_latlon_points, read_labelled_points

    if occurrences is None and range is None:
        raise TaxamapError("give occurrences (presence points) and/or range (an expert range) "
                           "to evaluate the map against")
    table = None
    records: dict = {}
    if occurrences is not None:
        if presence_column:
            presences, labelled_background = read_labelled_points(occurrences, presence_column)
            back = labelled_background if background is None else as_latlon_points(
                background, "background")
        else:
            presences = as_latlon_points(occurrences, "occurrences")
            back = None if background is None else as_latlon_points(background, "background")
        result = evaluate_map(map, presences, back, n_background=n_background, seed=seed,
                              bands=bands)
        if roc is not None:
            plot_roc(result, roc)
        records["occurrences"] = result.to_dict()
        table = pd.DataFrame([b.to_dict() for b in result.bands]).rename(columns={"name": "band"})
        table = table.set_index("band")
        table.attrs.update({k: v for k, v in result.to_dict().items() if k != "bands"})
    if range is not None:
        from taxamap.products.expert import compare_files

        comparison = compare_files(map, range, rule=rule, out_dir=out,
                                   occurrences=None if occurrences is None else presences,
                                   seed=seed)
        records["range"] = comparison.to_records()
        expert = comparison.table.set_index("band")
        if bands is not None:
            expert = expert.loc[[b for b in expert.index if b in set(_band_names(bands, expert))]]
        table = expert if table is None else table.join(expert, how="outer",
                                                         rsuffix="_range")
        table.attrs["range_files"] = {k: str(v) for k, v in comparison.paths.items()}
    if json is not None:
        from taxamap.products.expert import write_json

        only = next(iter(records.values())) if len(records) == 1 else records
        write_json(json, only)
    return table


def _band_names(bands: Sequence[int | str], table) -> list[str]:
    """Band names of ``bands`` (1-based numbers or names) among the rows of ``table``."""
    names = list(table.index)
    return [names[int(b) - 1] if str(b).isdigit() else str(b) for b in bands]


@api_entry
def occurrences(
    species: str,
    *,
    region: str | PathLike | None = None,
    bbox: BBoxLike | None = None,
    limit: int = 5000,
    cache: PathLike | None = None,
    client: Any = None,
) -> "gpd.GeoDataFrame":
    """GBIF occurrences of ``species`` inside ``region``/``bbox`` as a GeoDataFrame (EPSG:4326),
    paged and cached (needs the internet on first call). ``client`` is the HTTP boundary
    (default: a :class:`taxamap.taxonomy.TaxonomyClient` for api.gbif.org)."""
    from taxamap.products.occurrences import download_occurrences, load_points, points_frame
    from taxamap.paths import cache_subdir, checked_cache_root
    from taxamap.geography import resolve_region

    checked_cache_root(cache)
    where = resolve_region(region, bbox, land_only=False)
    result = download_occurrences(species, where.outline, None, limit=limit, client=client,
                                  cache_dir=cache_subdir("occurrences", cache), offline=False
                                  if client is not None else None)
    points = load_points(result.path)
    frame = points_frame(points.latlon, species=result.scientific_name)
    frame.attrs.update(count=result.count, n_records=result.n_records,
                       taxon_key=result.taxon_key)
    return frame


@api_entry
def region(name: str | PathLike | None = None, *, bbox: BBoxLike | None = None,
           land: bool = False) -> "gpd.GeoDataFrame":
    """A region preset, vector file and/or bbox as a one-row GeoDataFrame (EPSG:4326): its
    ``name``, ``kind`` and geometry (the outline; with ``land=True`` clipped to land)."""
    import geopandas as gpd

    from taxamap.geography import resolve_region

    if name is not None and isinstance(name, os.PathLike):
        name = os.fspath(name)
    r = resolve_region(name, bbox, land_only=land)
    geometry = r.geometry if land else r.outline
    return gpd.GeoDataFrame({"name": [r.name], "kind": [r.kind], "slug": [r.slug]},
                            geometry=[geometry], crs="EPSG:4326")


@api_entry
def regions(kind: str | None = None) -> "pd.DataFrame":
    """The region presets (``taxamap regions``) as a DataFrame: name, kind, code, title."""
    import pandas as pd

    from taxamap.grids import check_kind, list_regions

    kind = None if kind is None else check_kind(kind)
    rows = [info._asdict() for info in list_regions() if kind is None or info.kind == kind]
    return pd.DataFrame(rows)
