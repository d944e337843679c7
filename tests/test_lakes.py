"""Lakes are not land: ``--cells land|water|all`` and the Natural Earth lake mask."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import rasterio

from taxamap.errors import TaxamapError
from taxamap.cells import build_grid
from taxamap.options import GridOptions
from taxamap.geography import resolve_region
from tests.helpers.cli import run

#: (lat, lon) well inside large lakes of the contiguous USA.
LAKES = {
    "Lake Michigan": (43.5, -87.0),
    "Lake Superior": (47.7, -87.5),
    "Lake Erie": (42.2, -81.2),
    "Great Salt Lake": (41.1, -112.5),
    "Lake Okeechobee": (26.95, -80.83),
}
COLUMBUS = (39.96, -83.0)


@functools.lru_cache(maxsize=None)
def usa_grid(cells: str):
    return build_grid(GridOptions(region="usa", resolution=0.1, cells=cells))[1]


def is_cell(grid, lat: float, lon: float) -> bool:
    """True when the cell whose footprint holds (lat, lon) is kept in ``grid``."""
    row = int((grid.north - lat) // grid.resolution)
    col = int((lon - grid.west) // grid.resolution)
    if not (0 <= row < grid.height and 0 <= col < grid.width):
        return False
    return bool(grid.mask[row, col])


def test_shipped_land_mask_has_the_lakes_cut_out():
    from pathlib import Path

    import shapely

    from taxamap import grids

    land = grids.land()
    for lake, (lat, lon) in {**LAKES, "Lake Victoria": (-1.0, 33.0),
                             "Lake Baikal": (53.5, 108.0)}.items():
        assert not shapely.contains_xy(land, lon, lat), lake
    assert shapely.contains_xy(land, COLUMBUS[1], COLUMBUS[0])
    # Package data stays small: the lakes add ~80 kB to the ~460 kB land file.
    assert Path(grids.__file__).with_name("land.json.gz").stat().st_size < 600_000


@pytest.mark.parametrize("lake", sorted(LAKES))
def test_lakes_are_cells_of_water_and_all_but_not_land(lake):
    lat, lon = LAKES[lake]
    assert not is_cell(usa_grid("land"), lat, lon), lake
    assert is_cell(usa_grid("water"), lat, lon), lake
    assert is_cell(usa_grid("all"), lat, lon), lake


def test_land_cell_is_a_cell_of_land_and_all_not_water():
    assert is_cell(usa_grid("land"), *COLUMBUS)
    assert is_cell(usa_grid("all"), *COLUMBUS)
    assert not is_cell(usa_grid("water"), *COLUMBUS)


def test_land_and_water_partition_all():
    land, water, every = usa_grid("land"), usa_grid("water"), usa_grid("all")

    def centres(grid) -> set:
        return {tuple(p) for p in np.round(grid.cell_latlon(), 6)}

    a, b, c = centres(land), centres(water), centres(every)
    assert not a & b
    assert a | b == c
    # The US parts of the Great Lakes are ~150,000 km2, ~1,700 cells of ~90 km2 at 0.1 degree.
    assert len(b) > 1_500


def test_grid_and_store_keys_differ_across_cell_choices():
    from taxamap.store import store_key

    grids = {c: usa_grid(c) for c in ("land", "water", "all")}
    assert {g.definition()["cells"] for g in grids.values()} == {"land", "water", "all"}
    assert len({g.key() for g in grids.values()}) == 3
    keys = {store_key(g.definition(), "location", "MVRL/ecogeo@x", {"kind": "coordinates"})
            for g in grids.values()}
    assert len(keys) == 3


def test_all_and_land_keys_differ_even_where_there_is_no_water():
    # A box in Kansas: no ocean, no lake, so the masks are the same; the stores still are not.
    land = build_grid(GridOptions(bbox="-99,38,-98,39", resolution=0.1, cells="land"))[1]
    every = build_grid(GridOptions(bbox="-99,38,-98,39", resolution=0.1, cells="all"))[1]
    assert np.array_equal(land.mask, every.mask)
    assert land.key() != every.key()


def test_unknown_cells_value_is_an_error():
    with pytest.raises(TaxamapError, match="--cells"):
        resolve_region("usa", cells="fish")
    with pytest.raises(TaxamapError, match="land, water or all"):
        build_grid(GridOptions(region="ohio", cells="Lakes"))


def test_water_only_region_without_water_is_an_error():
    with pytest.raises(TaxamapError, match="no water"):
        resolve_region(bbox="-99,38,-98,39", cells="water")


def test_mask_logs_how_many_cells_it_removed(caplog):
    def logged(**options) -> str:
        caplog.clear()
        with caplog.at_level("INFO", logger="taxamap"):
            build_grid(GridOptions(region="usa", resolution=0.1, **options))
        return caplog.text

    land = usa_grid("land")
    err = logged(cells="land")
    removed = usa_grid("all").n_cells - land.n_cells
    assert f"land mask: {removed:,} water cells removed" in err
    assert f"water mask: {land.n_cells:,} land cells removed" in logged(cells="water")
    assert "mask" not in logged(cells="all")


@pytest.mark.slow
def test_cli_cells_water_on_lake_erie(tmp_path, models_dir):
    """A box over Cleveland and Lake Erie: a water map scores the lake and leaves the shore
    blank; an unknown --cells value is one line, exit 2, before any work."""
    common = ["predict", "--species", "Cardinalis cardinalis", "--bbox=-82,41.3,-81,42.5",
              "--resolution", "0.1", "--models", str(models_dir), "--cache", str(tmp_path / "c"),
              "--no-progress", "--out"]
    proc = run([*common, str(tmp_path / "water"), "--cells", "water"])
    assert proc.returncode == 0, proc.stderr
    assert "water mask:" in proc.stderr and "land cells removed" in proc.stderr
    with rasterio.open(tmp_path / "water" / "cardinalis-cardinalis.tif") as ds:
        band = ds.read(1)

        def value(lon, lat):
            row, col = ds.index(lon, lat)
            inside = 0 <= row < ds.height and 0 <= col < ds.width
            return band[row, col] if inside else np.nan

        assert np.isfinite(value(-81.2, 42.2))  # Lake Erie
        assert np.isnan(value(-81.7, 41.4))  # Cleveland's suburbs, south of the shore
    bad = run([*common, str(tmp_path / "bad"), "--cells", "fish"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "--cells" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_help_documents_cells_and_lakes():
    for command in ("predict", "embed"):
        proc = run([command, "--help"])
        assert proc.returncode == 0
        text = " ".join(proc.stdout.split())
        assert "--cells {land,water,all}" in text and "lakes" in text, command
