"""The GeoTIFF users open in QGIS: a Cloud-Optimized GeoTIFF of raw cosine scores.

Band 1 is the fused score, then one band per modality in the Dataset's order; float32, NaN nodata,
the grid's CRS and exact transform (pixel centres are the embedded points), internal overviews
when the raster is larger than one block, and provenance tags. Values are never stretched.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from taxamap.dataset import (OUTLINE_ATTR, UNITS, band_meaning, band_unit, check_dataset,
                             grid_of, is_product, iter_species, map_bands, modality_bands,
                             one_map, score_variables, tag_key)
from taxamap.options import DEFAULT_FUSION
from taxamap.version import __version__
from taxamap.writers.style import imagery_credit, output_path, write_bytes

#: Tile size of the COG. 256 keeps overviews for grids as small as the USA at 0.1 degree.
BLOCKSIZE = 256

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


#: Above this many pixels (all bands) the COG is built on disk, from bands written in row
#: blocks, rather than in memory: the world at 0.05 deg is 25 M pixels a band.
IN_MEMORY_PIXELS = 16_000_000
#: Rows written at a time when building on disk, and GDAL's block cache meanwhile (MB).
ROW_BLOCK = 1024
GDAL_CACHE_MB = 256


#: Dataset attrs that are not GeoTIFF tags: the file name stem, where a map was read from, and
#: the region's outline (drawn, not recorded).
NOT_TAGS = ("slug", "source_path", OUTLINE_ATTR)


def geotiff_tags(ds, created: datetime | None = None) -> dict[str, str]:
    """The dataset-level tags of a one-query map: its provenance attrs, upper-cased (the GeoTIFF
    tags are these; :func:`taxamap.dataset.open_map` reads them back lower-cased), with the
    bands written and this taxamap's version."""
    attrs = ds.attrs
    tags = {tag_key(k): str(v) for k, v in attrs.items()
            if k not in NOT_TAGS and isinstance(v, (str, int, float))}
    tags.update(
        QUERY=str(attrs.get("query", "map")), PROMPT=str(attrs.get("prompt") or ""),
        MODALITIES=",".join(modality_bands(ds)), FUSION=str(attrs.get("fusion", DEFAULT_FUSION)),
        BANDS=",".join(score_variables(ds)), UNITS=UNITS, TAXAMAP_VERSION=__version__)
    if "CREATED" not in tags:
        tags["CREATED"] = (created or datetime.now(timezone.utc)).replace(
            microsecond=0).isoformat()
    credit = imagery_credit(ds)
    if credit:
        tags["IMAGERY_ATTRIBUTION"], tags["IMAGERY_LICENSE"] = credit
    return tags


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
    if grid.width * grid.height * len(bands) > IN_MEMORY_PIXELS:
        return _write_cog_on_disk(path, profile, bands, tags, band_tags, units)
    # Build the bands in memory, then let GDAL's COG driver lay out tiles and overviews, also in
    # memory: the file is then written by Python in one go, so a full disk is an OSError we can
    # name (GDAL would print its own lines and fail with "TIFFAppendToStrip: Seek error").
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            for i, (_, raster) in enumerate(bands, start=1):
                ds.write(np.asarray(raster, dtype=np.float32), i)
            _describe(ds, bands, tags, band_tags, units)
        with mem.open() as src, MemoryFile() as cog:
            rasterio.shutil.copy(src, cog.name, driver="COG", **COG_OPTIONS)
            data = cog.read()
    return write_bytes(path, data)


def write_bands(path: str | os.PathLike, grid, bands: list[tuple[str, np.ndarray]],
                tags: dict[str, str], band_tags: list[dict], units: list[str]) -> Path:
    """Named float32 ``bands`` over ``grid`` as a COG at ``path`` (atomically), with dataset
    ``tags`` and per-band tags and units: a stack that is not a score map (``richness
    --stack``)."""
    return _write_cog(path, grid, bands, tags, band_tags, units)


def _describe(ds, bands, tags, band_tags, units) -> None:
    for i, (name, _) in enumerate(bands, start=1):
        ds.set_band_description(i, name)
        ds.set_band_unit(i, units[i - 1] if units else "cosine similarity")
        ds.update_tags(i, **(band_tags[i - 1] if band_tags else {"MODALITY": name}))
    ds.update_tags(**tags)


def _write_cog_on_disk(path, profile: dict, bands, tags, band_tags, units) -> Path:
    """A large COG: the bands go to a tiled GeoTIFF beside the output ``ROW_BLOCK`` rows at a
    time, GDAL's COG driver lays out tiles and overviews from it (reading blocks, its cache
    bounded), into a temporary name renamed onto ``path``. Memory stays at a few row blocks
    whatever the grid's size (the bands may be memory-mapped or lazily computed arrays)."""
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window

    from taxamap.writers.style import atomic_path

    height, width = profile["height"], profile["width"]
    need = height * width * len(bands) * 4  # the staging bands; the COG is about as large
    with atomic_path(path, need=2 * need) as tmp:
        staging = tmp.with_name(tmp.name + ".bands.tif")
        try:
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
                with rasterio.open(staging, "w", **profile, tiled=True, blockxsize=BLOCKSIZE,
                                   blockysize=BLOCKSIZE, BIGTIFF="IF_SAFER") as ds:
                    for i, (_, raster) in enumerate(bands, start=1):
                        for r0 in range(0, height, ROW_BLOCK):
                            r1 = min(height, r0 + ROW_BLOCK)
                            ds.write(np.asarray(raster[r0:r1], dtype=np.float32), i,
                                     window=Window(0, r0, width, r1 - r0))
                    _describe(ds, bands, tags, band_tags, units)
                rasterio.shutil.copy(staging, tmp, driver="COG", **COG_OPTIONS)
        finally:
            staging.unlink(missing_ok=True)
    return Path(path)


def write_geotiff(ds, path: str | os.PathLike) -> Path:
    """Write a one-query (y, x) score Dataset as a Cloud-Optimized GeoTIFF at ``path``
    (atomically) and return it.

    Band 1 is "fused", then one band per modality in the Dataset's order, then the product bands
    (``fitted``, ...), each described by its name and unit; float32, NaN nodata, the grid's CRS
    and exact transform; the Dataset's provenance attrs become the tags (upper-cased). Raises
    :class:`TaxamapError` when the folder is missing or unwritable.
    """
    ds = one_map(ds)
    bands = map_bands(ds)
    # A product band is a classifier's output, not a modality's cosine: say so per band.
    band_tags = [{"PRODUCT": name} if is_product(name) else {"MODALITY": name}
                 for name, _ in bands]
    units = [band_unit(name) for name, _ in bands]
    for tags, (name, _) in zip(band_tags, bands):
        if band_meaning(name):  # a trust band: its unit and what high means, in its own tags
            tags.update(UNITS=band_unit(name), MEANING=band_meaning(name))
    return _write_cog(path, grid_of(ds), bands, geotiff_tags(ds), band_tags, units)


def write_stack(ds, path: str | os.PathLike) -> Path:
    """One GeoTIFF with a fused-score band per species (``taxamap predict --stack``) from a
    (species, y, x) Dataset: each band is described by its species and tagged with its prompt;
    the provenance (modalities, fusion, models) is the Dataset's."""
    ds = check_dataset(ds)
    maps = list(iter_species(ds))
    first = maps[0]
    bands = [(one.attrs["query"], np.asarray(one["fused"].values, dtype=np.float32))
             for one in maps]
    prompts = [one.attrs.get("prompt") or one.attrs["query"] for one in maps]
    tags = geotiff_tags(first)
    tags["QUERY"] = "; ".join(name for name, _ in bands)
    tags["PROMPT"] = "; ".join(prompts)
    tags["BANDS"] = ",".join(name for name, _ in bands)
    tags["STACK"] = "fused score per species"
    band_tags = [{"SPECIES": name, "PROMPT": prompts[i]} for i, (name, _) in enumerate(bands)]
    return _write_cog(path, grid_of(first), bands, tags, band_tags)
