"""The store's documented on-disk format (docs/store.md): plain zarr/xarray open it, with a
lat/lon coordinate per cell and the grid, model, precision and encoding in its attributes; stores
made before the coordinates still score and are upgraded in place; the encoder's precision keys
the store (fp32 and bf16 never mix) and tags the maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import taxamap
from taxamap.cells import build_grid
from taxamap.options import GridOptions
from taxamap.scorer import CellMatrix
from taxamap.store import EmbeddingStore, store_key

xr = pytest.importorskip("xarray")

BBOX = (-84.0, 39.0, -82.0, 41.0)
SPECIES = "Cardinalis cardinalis"


def _stores(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "stores").glob("*/location-*")
                  if p.is_dir() and p.suffix not in (".pyramid", ".claims"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("format-cache")


@pytest.fixture(scope="module")
def fp32_map(models_dir, cache):
    return taxamap.predict(species=SPECIES, bbox=BBOX, resolution=0.1, models=models_dir,
                           cache=cache, progress=False, precision="fp32")


def test_plain_xarray_opens_a_store_with_cell_coordinates_and_attrs(fp32_map, cache):
    (path,) = _stores(cache)
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["emb"].dims == ("cell", "feature") and ds["emb"].dtype == np.float16
    assert set(ds["emb"].coords) == {"lat", "lon"}
    _, grid = build_grid(GridOptions(bbox=BBOX, resolution=0.1))
    np.testing.assert_array_equal(np.c_[ds["lat"].values, ds["lon"].values], grid.cell_latlon())
    assert ds["lat"].attrs["units"] == "degrees_north" and ds["lon"].attrs["units"] == "degrees_east"
    attrs = ds.attrs
    assert attrs["grid"] == json.loads(json.dumps(grid.definition()))
    assert attrs["model"].startswith("MVRL/ecogeo@") and attrs["modality"] == "location"
    assert attrs["precision"] == "fp32" and attrs["encoding"] == "float16"
    assert "row-major" in attrs["cell_order"]
    # The embeddings read by xarray are the store's own.
    store = EmbeddingStore.open_existing(str(path), attrs["key"])
    np.testing.assert_array_equal(ds["emb"].values.astype(np.float32), store.read())


def test_precision_keys_the_store_and_tags_the_map(fp32_map, models_dir, cache, tmp_path):
    assert fp32_map.attrs["precision_location"] == "fp32"
    mixed = taxamap.predict(species=SPECIES, bbox=BBOX, resolution=0.1, models=models_dir,
                            cache=cache, progress=False, precision="bf16-mixed")
    assert mixed.attrs["precision_location"] == "bf16-mixed"
    stores = _stores(cache)
    assert len(stores) == 2  # one per precision, side by side
    precisions = {xr.open_zarr(p, consolidated=False).attrs["precision"] for p in stores}
    assert precisions == {"fp32", "bf16-mixed"}
    a, b = fp32_map["location"].values, mixed["location"].values
    assert not np.array_equal(a, b) and np.nanmax(np.abs(a - b)) < 0.02
    # GeoTIFF tags are the attrs, upper-cased.
    import rasterio

    taxamap.write(mixed, out=tmp_path, formats="tif")
    (tif,) = tmp_path.glob("*.tif")
    with rasterio.open(tif) as src:
        assert src.tags()["PRECISION_LOCATION"] == "bf16-mixed"


def test_fp32_keys_are_those_of_stores_made_before_precisions():
    grid, source = {"west": 1}, {"kind": "coordinates"}
    assert store_key(grid, "location", "m@1", source, "fp32") == store_key(
        grid, "location", "m@1", source)
    assert store_key(grid, "location", "m@1", source, "bf16-mixed") != store_key(
        grid, "location", "m@1", source)


def _strip_to_old_layout(path: Path) -> None:
    """What taxamap wrote before the coordinates: no lat/lon, no dimension names."""
    import shutil

    for name in ("lat", "lon"):
        shutil.rmtree(path / name)
    for name in ("emb", "check", "done"):
        meta = path / name / "zarr.json"
        doc = json.loads(meta.read_text())
        doc.pop("dimension_names", None)
        doc["attributes"] = {}
        meta.write_text(json.dumps(doc))


def test_a_store_made_before_the_coordinates_scores_and_is_upgraded(models_dir, tmp_path):
    cache = tmp_path / "cache"
    first = taxamap.predict(species=SPECIES, bbox=BBOX, resolution=0.1, models=models_dir,
                            cache=cache, progress=False, precision="fp32")
    (path,) = _stores(cache)
    _strip_to_old_layout(path)
    with pytest.raises(KeyError, match="dimension_names"):
        xr.open_zarr(path, consolidated=False)
    key = json.loads((path / "zarr.json").read_text())["attributes"]["key"]
    old = EmbeddingStore.open_existing(str(path), key)
    assert not old.has_coordinates()
    cells = CellMatrix.from_store(old)  # an old store maps and scores as it is
    assert all(cells.mapped) and cells.held_bytes == old.n_cells * 4
    # The next run over it: the same map, nothing embedded again, the store upgraded in place.
    again = taxamap.predict(species=SPECIES, bbox=BBOX, resolution=0.1, models=models_dir,
                            cache=cache, progress=False, precision="fp32")
    np.testing.assert_array_equal(again["fused"].values, first["fused"].values)
    assert _stores(cache) == [path]
    ds = xr.open_zarr(path, consolidated=False)
    assert set(ds["emb"].coords) == {"lat", "lon"} and ds.attrs["encoding"] == "float16"
    assert EmbeddingStore.open_existing(str(path), key).is_complete()
