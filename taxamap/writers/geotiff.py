"""The GeoTIFF users open in QGIS: a Cloud-Optimized GeoTIFF of raw cosine scores.

Band 1 is the fused score, then one band per modality in the ScoreMap's order; float32, NaN nodata,
the grid's CRS and exact transform (pixel centres are the embedded points), internal overviews
when the raster is larger than one block, and provenance tags. Values are never stretched.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import taxamap
from taxamap.dataset import tag_key
from taxamap.errors import TaxamapError
from taxamap.score import as_scoremap
from taxamap.writers.style import UNITS, imagery_credit, output_path, write_bytes

#: Tile size of the COG. 256 keeps overviews for grids as small as the USA at 0.1 degree.
BLOCKSIZE = 256

#: Unit of the ``fitted`` / ``combined`` bands (``taxamap predict --fit``).
FITTED_UNIT = "relative suitability (0-1)"

#: Options of GDAL's COG driver. DEFLATE with the floating-point predictor is lossless.
COG_OPTIONS = {
    "BLOCKSIZE": str(BLOCKSIZE),
    "COMPRESS": "DEFLATE",
    "PREDICTOR": "YES",
    "OVERVIEWS": "AUTO",
    "OVERVIEW_RESAMPLING": "AVERAGE",
    "RESAMPLING": "NEAREST",
    "BIGTIFF": "IF_SAFER",
}


def geotiff_tags(scoremap, created: datetime | None = None) -> dict[str, str]:
    """The dataset-level tags written into the GeoTIFF (all values are strings)."""
    created = created or datetime.now(timezone.utc)
    modalities = list(scoremap.layers)
    tags = {
        "QUERY": str(scoremap.query),
        "PROMPT": "" if scoremap.prompt is None else str(scoremap.prompt),
        "MODALITIES": ",".join(modalities),
        "FUSION": str(scoremap.fusion),
        "BANDS": ",".join(name for name, _ in scoremap.bands()),
        "UNITS": UNITS,
        "TAXAMAP_VERSION": taxamap.__version__,
        "CREATED": created.replace(microsecond=0).isoformat(),
    }
    if scoremap.region_name:
        tags["REGION"] = str(scoremap.region_name)
    models = dict(scoremap.models or {})
    for name, ref in models.items():
        tags[f"MODEL_{tag_key(name)}"] = str(ref)
    if models:
        tags["MODELS"] = "; ".join(f"{k}={v}" for k, v in models.items())
    credit = imagery_credit(scoremap)
    if credit:
        tags["IMAGERY_ATTRIBUTION"], tags["IMAGERY_LICENSE"] = credit
    for key, value in (scoremap.extra_tags or {}).items():
        tags[str(key)] = str(value)
    return tags


def check_shapes(scoremap) -> list[tuple[str, np.ndarray]]:
    grid = scoremap.grid
    bands = scoremap.bands()
    for name, raster in bands:
        if np.shape(raster) != (grid.height, grid.width):
            raise TaxamapError(
                f"score band {name!r} has shape {np.shape(raster)}, but the grid is "
                f"{grid.height} x {grid.width}; build rasters with grid.to_raster"
            )
    return bands


def _write_cog(path, grid, bands: list[tuple[str, np.ndarray]], tags: dict[str, str],
               band_tags: list[dict] | None = None, units: list[str] | None = None) -> Path:
    """Write float32 ``bands`` over ``grid`` as a COG at ``path``, atomically."""
    import rasterio
    import rasterio.shutil
    from rasterio.io import MemoryFile

    output_path(path)  # a bad --out fails before the COG is built
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": len(bands),
        "dtype": "float32",
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": float("nan"),
    }
    # Build the bands in memory, then let GDAL's COG driver lay out tiles and overviews, also in
    # memory: the file is then written by Python in one go, so a full disk is an OSError we can
    # name (GDAL would print its own lines and fail with "TIFFAppendToStrip: Seek error").
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            for i, (name, raster) in enumerate(bands, start=1):
                ds.write(np.asarray(raster, dtype=np.float32), i)
                ds.set_band_description(i, name)
                ds.set_band_unit(i, units[i - 1] if units else "cosine similarity")
                ds.update_tags(i, **(band_tags[i - 1] if band_tags else {"MODALITY": name}))
            ds.update_tags(**tags)
        with mem.open() as src, MemoryFile() as cog:
            rasterio.shutil.copy(src, cog.name, driver="COG", **COG_OPTIONS)
            data = cog.read()
    return write_bytes(path, data)


def write_geotiff(scoremap, path: str | os.PathLike) -> Path:
    """Write a (y, x) score Dataset (or a :class:`~taxamap.score.ScoreMap`) as a Cloud-Optimized
    GeoTIFF at ``path`` (atomically) and return it.

    Band 1 is "fused", then one band per modality in the Dataset's order, each described by its
    name; float32 raw cosines, NaN nodata, the grid's CRS and exact transform; the Dataset's
    provenance attrs become the tags (upper-cased). Raises :class:`TaxamapError` when the folder
    is missing or unwritable.
    """
    scoremap = as_scoremap(scoremap)
    bands = check_shapes(scoremap)
    extra = set(getattr(scoremap, "extra_bands", None) or {})
    # Fitted bands are a classifier's output, not a modality's cosine: say so per band.
    band_tags = [{"PRODUCT": name} if name in extra else {"MODALITY": name} for name, _ in bands]
    units = [FITTED_UNIT if name in extra else "cosine similarity" for name, _ in bands]
    return _write_cog(path, scoremap.grid, bands, geotiff_tags(scoremap), band_tags, units)


def write_stack(ds, path: str | os.PathLike) -> Path:
    """One GeoTIFF with a fused-score band per species (``taxamap predict --stack``) from a
    (species, y, x) Dataset: each band is described by its species and tagged with its prompt;
    the provenance (modalities, fusion, models) is the Dataset's."""
    from taxamap.dataset import check_dataset, iter_species

    ds = check_dataset(ds)
    maps = list(iter_species(ds))
    first = as_scoremap(maps[0])
    bands = [(one.attrs["query"], np.asarray(one["fused"].values, dtype=np.float32))
             for one in maps]
    prompts = [one.attrs.get("prompt") or one.attrs["query"] for one in maps]
    tags = geotiff_tags(first)
    tags["QUERY"] = "; ".join(name for name, _ in bands)
    tags["PROMPT"] = "; ".join(prompts)
    tags["BANDS"] = ",".join(name for name, _ in bands)
    tags["STACK"] = "fused score per species"
    tags.pop("SLUG", None)
    band_tags = [{"SPECIES": name, "PROMPT": prompts[i]} for i, (name, _) in enumerate(bands)]
    return _write_cog(path, first.grid, bands, tags, band_tags)
