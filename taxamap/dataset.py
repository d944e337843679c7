"""The one data contract after scoring: an ``xarray.Dataset`` of score maps.

``taxamap.predict`` returns it; writers, range products, evaluation and the web app take it (or a
GeoTIFF written from it, read back into the same shape by :func:`open_map`).

* dims ``("y", "x")`` for one query, ``("species", "y", "x")`` for several;
* data variables ``fused`` and one per modality used (``location``, ``satellite``,
  ``environment``; later ``fitted``, ``combined``), float32 raw cosines, NaN off the cells and
  declared as nodata (``ds[v].rio.nodata`` is NaN);
* coords ``y`` (cell-centre latitude, descending), ``x`` (cell-centre longitude, in the grid's
  own frame: past 180 for grids across the antimeridian), ``species`` (query labels) with
  ``prompt`` and ``slug`` along it, and rioxarray's ``spatial_ref`` (CRS + the grid's exact
  transform);
* ``attrs``: the provenance the GeoTIFF tags carry (query, prompt, modalities, fusion, models with
  revisions, taxamap version, region, units, imagery credit), as strings.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from taxamap.version import __version__
from taxamap.errors import TaxamapError

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from taxamap.grid import Grid

#: What the band values are; written into every output.
UNITS = "cosine similarity, raw, [-1, 1]"

#: Unit of a cosine band (``fused`` and each modality).
COSINE_UNIT = "cosine similarity"

#: Bands that are not cosines (placed after the modalities): their unit, in the Dataset's
#: variable attrs, the GeoTIFF band units and the legends. The one list of product bands.
PRODUCT_BANDS = {
    "relative": "fraction of the reference panel's species scoring lower (0-1)",
    "richness": "species whose range holds the cell",
    "fitted": "relative suitability (0-1)",
    "combined": "relative suitability (0-1)",
    "uncertainty": "standard deviation of fitted over bootstrap refits (0-0.5)",
    "novelty": "nearest cosine distance to a training sample / the training samples' median "
               "spacing (0 = like the training data)",
    "disagreement": "standard deviation of the per-modality raw cosine similarities",
    "mess": "MESS, percent (Elith et al. 2010): < 0 outside the reference climate",
    "mess_variable": "index of the most dissimilar WorldClim variable (see MESS_VARIABLES)",
}

#: The order of the bands after ``fused`` and the modalities (DESIGN.md's band contract): the
#: panel-relative standing, the zero-shot trust bands, then a fit's bands.
BAND_ORDER = ("relative", "disagreement", "mess", "mess_variable", "fitted", "combined",
              "uncertainty", "novelty")


def in_band_order(bands: dict) -> dict:
    """``bands`` ({name: values}) in :data:`BAND_ORDER`, any other names after them as given."""
    rank = {name: i for i, name in enumerate(BAND_ORDER)}
    return dict(sorted(bands.items(), key=lambda kv: rank.get(kv[0], len(rank))))


#: The trust bands (issue 19): what a high value means, for band tags and legends. A band
#: here is not a suitability: it says where the map can be trusted.
TRUST_BANDS = {
    "uncertainty": "high: the fit changes with which records it got; trust it less here",
    "novelty": "high: the cell's embedding is unlike every training sample, so the fit "
               "extrapolates; above ~2, treat the fitted value as a guess",
    "disagreement": "high: location, satellite and climate tell different stories about "
                    "this cell; 0: every modality gives it the same score",
    "mess": "low or negative: the cell's climate lies outside the reference cells' (the "
            "occurrences and background, else the region), so the map extrapolates",
    "mess_variable": "the WorldClim variable most unlike the reference climate (the one "
                     "setting MESS)",
}


#: Attrs of one query's map that a map of several keeps per query, as coordinates along
#: ``species`` (:func:`iter_species` turns them back into attrs): the "no signal" verdict.
PER_QUERY_ATTRS = ("no_signal", "standout_fraction", "relative_max")


def is_product(name: str) -> bool:
    """Whether band ``name`` is a product (``fitted``, ...) rather than a cosine."""
    return name in PRODUCT_BANDS


def signal_note(ds: "xr.Dataset") -> str | None:
    """The "no signal" notice of a one-query map (None when it has a signal or no verdict): the
    query never stands out from the reference panel in the region (``no_signal`` attrs)."""
    if str(ds.attrs.get("no_signal", "")).lower() != "yes":
        return None
    try:
        share = f"{float(ds.attrs.get('standout_fraction', 'nan')):.2%}"
    except ValueError:
        share = "?"
    panel = ds.attrs.get("panel") or "reference"
    return (f"No signal: {ds.attrs.get('query', 'this query')} stands out from the {panel} "
            f"panel on only {share} of the cells (rule: {ds.attrs.get('standout_rule', '')}); "
            "its hotspots are not evidence of presence")


def band_unit(name: str) -> str:
    """The unit of band ``name``."""
    return PRODUCT_BANDS.get(name, COSINE_UNIT)


def band_meaning(name: str) -> str:
    """What a high value of trust band ``name`` means ("" for a score band)."""
    return TRUST_BANDS.get(name, "")


#: Prefix of the per-sample cross-validation table's variables (dim ``sample``) in a fitted
#: map's Dataset: ``cv_lat``, ``cv_presence``, ``cv_fitted``, ``cv_novelty`` ...
CV_PREFIX = "cv_"


def with_cv_table(ds: "xr.Dataset", table: Any) -> "xr.Dataset":
    """``ds`` with a fit's per-sample table (a DataFrame) as variables ``cv_<column>`` along a
    ``sample`` dim: it travels with the map (``to_netcdf`` keeps it); :func:`cv_table` reads
    it back."""
    return ds.assign({f"{CV_PREFIX}{c}": ("sample", np.asarray(table[c])) for c in table.columns})


def cv_table(ds: "xr.Dataset") -> Any:
    """The per-sample cross-validation table of a map made with ``fit=True`` (a DataFrame:
    ``cell, lat, lon, presence, fold, fused, fitted, combined, novelty, uncertainty``), or None."""
    names = [str(v) for v in ds.data_vars if ds[v].dims == ("sample",)
             and str(v).startswith(CV_PREFIX)]
    if not names:
        return None
    import pandas as pd

    return pd.DataFrame({n[len(CV_PREFIX):]: np.asarray(ds[n].values) for n in names})


def _rio():
    """rioxarray registers the ``.rio`` accessor on import."""
    try:
        import rioxarray  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise TaxamapError("taxamap needs rioxarray: pip install rioxarray") from exc


def scores_dataset(
    grid: "Grid",
    fused: np.ndarray,
    per_modality: dict[str, np.ndarray],
    *,
    labels: Sequence[str],
    prompts: Sequence[str | None],
    slugs: Sequence[str],
    attrs: dict[str, Any] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> "xr.Dataset":
    """Score arrays per cell -> the Dataset contract.

    ``fused`` and each ``per_modality[m]`` are (S, N): S queries by the grid's N kept cells (in
    :meth:`Grid.cell_index` order); ``extra`` holds more (S, N) bands (e.g. ``fitted``) placed
    after the modalities. One query gives dims (y, x), several (species, y, x).
    """
    import xarray as xr

    _rio()
    fused = np.atleast_2d(np.asarray(fused, dtype=np.float32))
    s = fused.shape[0]
    if not (len(labels) == len(prompts) == len(slugs) == s):
        raise ValueError("labels, prompts and slugs must have one entry per query")
    bands = {"fused": fused, **{m: np.atleast_2d(v) for m, v in per_modality.items()},
             **{k: np.atleast_2d(v) for k, v in (extra or {}).items()}}
    coords = {"y": ("y", grid.row_lats()), "x": ("x", grid.column_lons())}
    if s == 1:
        data = {name: (("y", "x"), grid.to_raster(v[0])) for name, v in bands.items()}
    else:
        data = {name: (("species", "y", "x"), np.stack([grid.to_raster(row) for row in v]))
                for name, v in bands.items()}
        coords["species"] = ("species", list(labels))
        coords["prompt"] = ("species", [p or "" for p in prompts])
        coords["slug"] = ("species", list(slugs))
    ds = xr.Dataset(data, coords=coords)
    ds["y"].attrs.update(standard_name="latitude", units="degrees_north", axis="Y")
    ds["x"].attrs.update(standard_name="longitude", units="degrees_east", axis="X")
    for name in ds.data_vars:
        ds[name].attrs.update(long_name=name, units=band_unit(name))
        if band_meaning(name):
            ds[name].attrs["meaning"] = band_meaning(name)
    ds.attrs.update({k: v for k, v in (attrs or {}).items() if v is not None})
    ds.attrs["bands"] = ",".join(bands)
    if s == 1:
        ds.attrs["query"] = str(labels[0])
        ds.attrs["prompt"] = prompts[0] or ""
        ds.attrs["slug"] = str(slugs[0])
    return georeference(ds, grid.crs, grid.transform)


def georeference(ds: "xr.Dataset", crs: Any, transform: Any) -> "xr.Dataset":
    """Attach ``crs`` and the exact ``transform`` (rioxarray's ``spatial_ref``) and NaN nodata."""
    _rio()
    ds = ds.rio.write_crs(crs).rio.write_transform(transform)
    for name in ds.data_vars:
        if np.issubdtype(ds[name].dtype, np.floating):
            ds[name] = ds[name].rio.write_nodata(np.nan, encoded=False)
    return ds


def provenance(
    *,
    modalities: Sequence[str],
    fusion: str,
    models: dict[str, str],
    region_name: str = "",
    region_spec: str = "",
    region_outline: Any = None,
    resolution: float | None = None,
    cells: str = "",
    attribution: str | None = None,
    license_: str | None = None,
    created: datetime | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The provenance attrs of a Dataset (the GeoTIFF tags are these, upper-cased)."""
    created = created or datetime.now(timezone.utc)
    attrs = {
        "modalities": ",".join(modalities),
        "fusion": str(fusion),
        "units": UNITS,
        "taxamap_version": __version__,
        "created": created.replace(microsecond=0).isoformat(),
    }
    if region_name:
        attrs["region"] = str(region_name)
    if region_spec:
        attrs["region_spec"] = str(region_spec)
    if region_outline is not None:
        attrs[OUTLINE_ATTR] = outline_text(region_outline, resolution)
    if cells:
        attrs["cells"] = str(cells)
    for name, ref in models.items():
        attrs[f"model_{tag_key(name).lower()}"] = str(ref)
    if models:
        attrs["models"] = "; ".join(f"{k}={v}" for k, v in models.items())
    if attribution:
        attrs["imagery_attribution"] = str(attribution)
        if license_:
            attrs["imagery_license"] = str(license_)
    for key, value in (extra or {}).items():
        attrs[str(key).lower()] = str(value)
    return attrs


#: The attr holding the region's outline (WKT, EPSG:4326), drawn by the HTML and PNG writers. It
#: travels with the Dataset (a string, so ``to_netcdf`` keeps it) and is not a GeoTIFF tag.
OUTLINE_ATTR = "region_outline"


def outline_text(outline: Any, resolution: float | None = None) -> str:
    """A region outline as WKT for :data:`OUTLINE_ATTR`: simplified by a tenth of a cell (never
    visible beside the cells) and rounded to 1e-6 degrees. A string is taken as WKT made so
    already (a session makes it once, not once per map)."""
    import shapely

    if isinstance(outline, str):
        return outline
    if resolution:
        outline = outline.simplify(float(resolution) / 10.0, preserve_topology=True)
    return shapely.to_wkt(outline, rounding_precision=6)


def outline_of(ds: "xr.Dataset") -> Any:
    """The outline of the region ``ds`` was made over, a shapely geometry (EPSG:4326), or None.

    From its :data:`OUTLINE_ATTR`; a map read back from a GeoTIFF has only the region's name
    (``region_spec``), resolved again: a preset always, a vector file while it exists (else one
    line says why no outline is drawn)."""
    import logging

    import shapely

    text = ds.attrs.get(OUTLINE_ATTR)
    if text:
        return shapely.from_wkt(str(text))
    spec = str(ds.attrs.get("region_spec", "") or "")
    if not spec:
        return None
    from taxamap.geography import resolve_region

    given = dict(part.split("=", 1) for part in spec.split(";") if "=" in part)
    try:
        return resolve_region(given.get("region"), given.get("bbox"), land_only=False).outline
    except TaxamapError as exc:
        logging.getLogger("taxamap").warning(f"no region outline drawn: {exc}")
        return None


def tag_key(name: str) -> str:
    """A GDAL metadata key from a free-form name: upper case, [A-Z0-9_] only."""
    key = "".join(c if c.isalnum() else "_" for c in str(name).upper()).strip("_")
    return key or "UNNAMED"


def score_variables(ds: "xr.Dataset") -> list[str]:
    """The Dataset's map bands in GeoTIFF order: fused, then the others as stored."""
    names = [str(v) for v in ds.data_vars if {"y", "x"} <= set(ds[v].dims)]
    return sorted(names, key=lambda n: (n != "fused", names.index(n)))


def one_map(ds: Any) -> "xr.Dataset":
    """``ds`` if it is a one-query (y, x) score Dataset; a one-line error saying how to pick one
    query otherwise (writers draw one map at a time)."""
    ds = check_dataset(ds)
    if "species" in ds.dims:
        raise TaxamapError("this writer takes one map; select a species first "
                           "(ds.isel(species=0)) or use taxamap.write, which writes them all")
    return ds


def map_bands(ds: "xr.Dataset") -> list[tuple[str, np.ndarray]]:
    """(name, float32 (y, x) values) of a one-query map's bands, in GeoTIFF order."""
    return [(name, np.asarray(ds[name].values, dtype=np.float32))
            for name in score_variables(ds)]


def modality_bands(ds: "xr.Dataset") -> list[str]:
    """The map's bands that are cell modalities (location, satellite, environment), in order."""
    from taxamap.modalities import list_modalities

    known = set(list_modalities())
    return [n for n in score_variables(ds) if n in known]


def map_title(ds: "xr.Dataset") -> str:
    """"<query> — <region>" of a one-query map."""
    region = ds.attrs.get("region") or ""
    return str(ds.attrs.get("query", "map")) + (f" — {region}" if region else "")


def iter_species(ds: "xr.Dataset") -> Iterator["xr.Dataset"]:
    """One (y, x) Dataset per query, with ``query``/``prompt``/``slug`` in its attrs."""
    if "species" not in ds.dims:
        yield ds
        return
    for i in range(ds.sizes["species"]):
        one = ds.isel(species=i)
        label = str(one["species"].values)
        own = {c: str(one[c].values) for c in PER_QUERY_ATTRS if c in one.coords}
        one = one.drop_vars([c for c in ("species", "prompt", "slug", *own) if c in one.coords])
        one.attrs = {**ds.attrs, **own, "query": label,
                     "prompt": str(ds["prompt"].values[i]) if "prompt" in ds.coords else "",
                     "slug": str(ds["slug"].values[i]) if "slug" in ds.coords else label}
        yield one


def check_dataset(ds: Any) -> "xr.Dataset":
    """``ds`` if it is a taxamap score Dataset; TaxamapError saying what is wrong otherwise."""
    import xarray as xr

    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset(name=str(ds.name or "fused"))
    if not isinstance(ds, xr.Dataset):
        raise TaxamapError(f"expected an xarray.Dataset from taxamap.predict (or a GeoTIFF path), "
                           f"got {type(ds).__name__}")
    if not {"y", "x"} <= set(ds.dims) or not score_variables(ds):
        raise TaxamapError("the Dataset has no (y, x) score bands; pass what taxamap.predict "
                           "returned")
    _rio()
    if ds.rio.crs is None:
        raise TaxamapError("the Dataset has no CRS; set one with ds.rio.write_crs('EPSG:4326')")
    return ds


def as_dataset(map_or_path: Any) -> "xr.Dataset":
    """A Dataset as is, or a GeoTIFF path read with :func:`open_map`."""
    if isinstance(map_or_path, (str, os.PathLike)):
        return open_map(map_or_path)
    return check_dataset(map_or_path)


def open_map(path: str | os.PathLike) -> "xr.Dataset":
    """Read a taxamap GeoTIFF (any float map GeoTIFF will do) into the Dataset contract.

    Band descriptions name the variables (``bandN`` where a band has none); dataset tags become
    lower-case attrs; nodata and non-finite pixels are NaN. Raises TaxamapError when the file is
    missing, not a raster, or has no CRS.
    """
    import rasterio
    import xarray as xr

    _rio()
    import rioxarray

    path = Path(path).expanduser()
    if not path.is_file():
        raise TaxamapError(f"map {path} not found; give the .tif written by taxamap predict")
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise TaxamapError(f"map {path} has no CRS; taxamap maps are EPSG:4326 (assign "
                                   "one, e.g. gdal_edit.py -a_srs EPSG:4326)")
            bands = rioxarray.open_rasterio(src, mask_and_scale=True).load()
            # Closed here, values kept: a file manager left to the interpreter's shutdown makes
            # Python 3.13 print "Error in sys.excepthook" after the command's last line.
            bands.close()
            # Tags and descriptions as written: rioxarray's attrs turn numeric-looking tags into
            # numbers and mix band 1's tags in.
            names = [(d or f"band{i}") for i, d in enumerate(src.descriptions, start=1)]
            transform, crs, tags = src.transform, src.crs, src.tags()
    except rasterio.errors.RasterioError as exc:
        raise TaxamapError(f"cannot read map {path}: {exc}; give a GeoTIFF") from None
    values = np.asarray(bands.values, dtype=np.float32)
    values[~np.isfinite(values)] = np.nan
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    ds = xr.Dataset({n: (("y", "x"), values[i]) for i, n in enumerate(unique)},
                    coords={"y": bands["y"].values, "x": bands["x"].values})
    ds.attrs = {k.lower(): v for k, v in tags.items()}
    ds.attrs["source_path"] = str(path)
    return georeference(ds, crs, transform)


def grid_of(ds: "xr.Dataset"):
    """The :class:`~taxamap.grid.Grid` a (y, x) Dataset lies on (kept cells = any finite band)."""
    from taxamap.grid import Grid

    t = ds.rio.transform()
    if abs(abs(t.a) - abs(t.e)) > 1e-9 * abs(t.a) or t.b or t.d:
        raise TaxamapError("the map's pixels are not square and north-up; resample it to a "
                           "regular lon/lat grid first")
    names = score_variables(ds)
    finite = np.zeros((ds.sizes["y"], ds.sizes["x"]), dtype=bool)
    for name in names:
        v = np.isfinite(np.asarray(ds[name].values))
        finite |= v if v.ndim == 2 else v.any(axis=0)
    return Grid(west=float(t.c), north=float(t.f), resolution=float(t.a), width=ds.sizes["x"],
                height=ds.sizes["y"], mask=finite, crs=ds.rio.crs.to_string())


# --- one (y, x) map as the products read it: its file, a band by name or number, points ------

def single_map(map_or_path: Any) -> "xr.Dataset":
    """A (y, x) score Dataset, or a GeoTIFF path read with :func:`open_map`; a Dataset of several
    species is refused (products cut, sample and evaluate one map)."""
    ds = as_dataset(map_or_path)
    if "species" in ds.dims:
        raise TaxamapError("this Dataset holds several species; select one first "
                           "(ds.isel(species=0) or ds.sel(species=NAME))")
    return ds


def map_file(ds: "xr.Dataset") -> Path:
    """The map's file (``attrs["source_path"]``, set by :func:`open_map`), else
    ``<slug>.tif``: what messages name, and where range files go by default."""
    source = ds.attrs.get("source_path")
    return Path(source) if source else Path(f"{ds.attrs.get('slug') or 'map'}.tif")


def band_name(ds: "xr.Dataset", band: int | str) -> str:
    """The score variable ``band`` names: a 1-based number or a name ("fused"), in any case."""
    from taxamap.surface import option

    names = score_variables(ds)
    if isinstance(band, str) and not band.strip().isdigit():
        lowered = [n.lower() for n in names]
        if band.strip().lower() in lowered:
            return names[lowered.index(band.strip().lower())]
        raise TaxamapError(f"{map_file(ds).name} has no band {band!r}; its bands are "
                           f"{', '.join(names)} (or give a number 1..{len(names)})")
    number = int(band)
    if not 1 <= number <= len(names):
        raise TaxamapError(f"{map_file(ds).name} has {len(names)} bands; give "
                           f"{option('band')} 1..{len(names)} or a name ({', '.join(names)})")
    return names[number - 1]


def band_values(ds: "xr.Dataset", name: str) -> np.ndarray:
    """Band ``name`` as a (y, x) float32 array, NaN where it has no finite score (read only)."""
    values = np.asarray(ds[name].values, dtype=np.float32)
    if np.isinf(values).any():
        values = np.where(np.isinf(values), np.float32(np.nan), values)
    return values


def cell_values(ds: "xr.Dataset", rows: np.ndarray, cols: np.ndarray,
                bands: Sequence[str] | None = None) -> np.ndarray:
    """(bands, N) float64 values of the cells (``rows``, ``cols``) in each of ``bands`` (default
    every score band, in :func:`score_variables` order)."""
    names = score_variables(ds) if bands is None else list(bands)
    return np.stack([band_values(ds, n)[rows, cols] for n in names]).astype(np.float64)


def pixels_of(ds: "xr.Dataset", latlon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, inside) of the cells holding (lat, lon) points; ``inside`` is False for points
    off the map (their rows and cols are 0). A point is also tried one turn over, for maps in
    degrees whose grid runs past +/-180."""
    from rasterio.transform import rowcol

    from taxamap.crs import from_lonlat

    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    transform, crs = ds.rio.transform(), ds.rio.crs
    height, width = ds.sizes["y"], ds.sizes["x"]
    x, y = from_lonlat(latlon[:, 1], latlon[:, 0], crs)

    def locate(x: np.ndarray, y: np.ndarray):
        with np.errstate(invalid="ignore"):
            rows, cols = rowcol(transform, x, y, op=np.floor)  # floats: NaN stays off the map
            inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        return (np.where(inside, rows, 0).astype(np.int64),
                np.where(inside, cols, 0).astype(np.int64), inside)

    rows, cols, inside = locate(x, y)
    if getattr(crs, "is_geographic", False):
        for shift in (360.0, -360.0):
            retry = ~inside & np.isfinite(x)
            if not retry.any():
                break
            r2, c2, in2 = locate(x[retry] + shift, y[retry])
            idx = np.flatnonzero(retry)[in2]
            rows[idx], cols[idx], inside[idx] = r2[in2], c2[in2], True
    return rows, cols, inside


def sample_points(ds: "xr.Dataset", latlon: np.ndarray,
                  bands: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values (bands, N) float64, NaN off the map or on nodata; inside (N,) bool) of the cells
    holding (lat, lon) points (:func:`pixels_of`), in each of ``bands`` (default: all)."""
    rows, cols, inside = pixels_of(ds, latlon)
    values = cell_values(ds, rows, cols, bands)
    values[:, ~inside] = np.nan
    return values, inside


def cell_centres(ds: "xr.Dataset", rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(N, 2) (lat, lon) of the centres of cells (``rows``, ``cols``), in EPSG:4326 (longitudes
    wrapped into [-180, 180))."""
    from rasterio.transform import xy

    from taxamap.crs import is_wgs84, to_lonlat, wrap_lon

    x, y = xy(ds.rio.transform(), np.asarray(rows), np.asarray(cols), offset="center")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    lon, lat = (wrap_lon(x), y) if is_wgs84(ds.rio.crs) else to_lonlat(x, y, ds.rio.crs)
    return np.column_stack([lat, lon])
