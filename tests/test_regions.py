"""Region presets, bounding boxes and vector files -> land geometry -> grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from taxamap import grids
from taxamap.errors import TaxamapError
from taxamap.grid import make_grid
from taxamap.geography import parse_bbox, resolve_region

KANSAS = (-98.0, 38.5)
ANCHORAGE = (-149.9, 61.2)
HAWAII = (-155.5, 19.6)  # the Big Island


def inside(geom, lon, lat) -> bool:
    return bool(shapely.contains_xy(geom, lon, lat))


def write_vector(path: Path, geoms, crs: str, driver: str) -> None:
    import pyogrio

    pyogrio.raw.write(path, np.array([shapely.to_wkb(g) for g in geoms], dtype=object),
                      field_data=[], fields=[], driver=driver, geometry_type="Polygon", crs=crs)


def test_usa_is_the_contiguous_united_states():
    usa = resolve_region("usa")
    assert usa.kind == "country" and usa.slug == "usa"
    assert inside(usa.geometry, *KANSAS)
    assert not inside(usa.geometry, *ANCHORAGE)
    assert not inside(usa.geometry, *HAWAII)
    west, south, east, north = usa.bounds
    assert -125.5 < west and east < -66 and 24 < south and north < 49.5
    # The whole country is a different preset that does include Alaska and Hawaii.
    whole = resolve_region("United States")
    assert inside(whole.geometry, *ANCHORAGE) and inside(whole.geometry, *HAWAII)
    # Land clipping: the ocean off California is in neither the outline nor the geometry, and the
    # geometry never extends past the outline.
    assert not inside(usa.geometry, -126.0, 38.0)
    assert usa.outline.buffer(1e-6).contains(usa.geometry)


def test_usa_grid_has_a_plausible_number_of_land_cells():
    grid = make_grid(resolve_region("usa").geometry, 0.5)
    # ~8.1 M km^2 of land at ~2400 km^2 per 0.5 degree cell around 38 N.
    assert 3000 < grid.n_cells < 3700
    lat, lon = grid.cell_latlon().T
    assert lon.min() > -125 and lon.max() < -66.5 and lat.min() > 24.5 and lat.max() < 49.5


def test_state_by_name_postal_code_and_iso_code():
    by_name = resolve_region("ohio")
    assert by_name.kind == "state" and by_name.slug == "ohio"
    for spelling in ("OH", "Ohio", " OHIO ", "us-oh"):
        assert resolve_region(spelling).geometry.equals(by_name.geometry), spelling
    assert inside(by_name.geometry, -83.0, 40.0)  # Columbus
    assert not inside(by_name.geometry, -86.0, 40.0)  # Indiana
    bc = resolve_region("BC")
    assert bc.kind == "province"
    assert resolve_region("British-Columbia").geometry.equals(bc.geometry)
    assert inside(bc.geometry, -122.75, 53.92)  # Prince George


def test_country_by_iso3_where_natural_earth_has_minus_99():
    france = resolve_region("france")
    assert resolve_region("FRA").geometry.equals(france.geometry)
    assert inside(france.geometry, 2.35, 48.85)  # Paris
    norway = resolve_region("NOR")
    assert resolve_region("norway").geometry.equals(norway.geometry)
    assert inside(norway.geometry, 10.75, 59.91)  # Oslo
    assert resolve_region("São Paulo").geometry.equals(resolve_region("sao paulo").geometry)


def test_a_country_and_a_state_of_one_name_each_have_their_own():
    assert grids.lookup("georgia") is None  # refused as ambiguous (tests/test_names.py)
    assert grids.lookup("GEO").name == "Georgia (country)"
    assert grids.lookup("GA").name == "Georgia (USA)"
    assert inside(resolve_region("Georgia (country)").geometry, 44.8, 41.7)  # Tbilisi
    assert inside(resolve_region("GA").geometry, -84.4, 33.75)  # Atlanta


def test_continents_and_world():
    africa = resolve_region("africa")
    assert africa.kind == "continent"
    assert inside(africa.geometry, 25.0, 0.0) and not inside(africa.geometry, 10.0, 50.0)
    world = resolve_region("WORLD")
    assert inside(world.geometry, *KANSAS) and not inside(world.geometry, -30.0, 0.0)
    assert world.geometry is grids.land() or world.geometry.equals(grids.land())


def test_every_listed_preset_resolves_to_itself():
    infos = grids.list_regions()
    kinds = {i.kind for i in infos}
    assert kinds == {"world", "continent", "country", "state", "province"}
    assert sum(i.kind == "continent" for i in infos) == 7
    assert sum(i.kind == "country" for i in infos) > 200
    assert {"OH", "BC", "FRA", "NOR"} <= {i.code for i in infos}
    for info in infos:
        assert grids.lookup(info.name) == info, info
        assert not grids.get_region(info.name).is_empty, info


def test_unknown_region_suggests_a_close_name():
    with pytest.raises(TaxamapError, match="Ohio") as err:
        resolve_region("Ohioo")
    assert "taxamap regions" in str(err.value)
    with pytest.raises(TaxamapError, match=r"'New Brunswick' \(NB\) or the Canadian province "
                                           r"'Nova Scotia' \(NS\)"):
        resolve_region("acadia")


def test_region_crossing_the_antimeridian_is_one_compact_frame():
    fiji = resolve_region("fiji")
    west, _, east, _ = fiji.bounds
    assert east - west < 10 and east > 180
    russia = resolve_region("russia")
    assert russia.bounds[2] - russia.bounds[0] < 180


def test_antimeridian_bbox_keeps_land_on_both_sides():
    region = resolve_region(bbox="170,-20,-170,10")
    assert region.kind == "bbox"
    assert region.bounds[0] >= 170 and region.bounds[2] <= 190
    grid = make_grid(region.geometry, 0.05)
    lat, lon = grid.cell_latlon().T
    assert ((lon > 178) & (lon < 180)).any()  # Vanua Levu, west of 180
    assert ((lon < -178) & (lon >= -180)).any()  # Lau islands, east of 180
    assert lon.min() >= -180 and lon.max() < 180
    # Cells east of 180 sit on land: compare with the land mask in ordinary coordinates.
    east = lon < 0
    assert shapely.contains_xy(grids.land(), lon[east], lat[east]).all()
    # Fiji clipped to a box across 180 gives the same cells as the box, on Fiji only.
    fiji_box = resolve_region("fiji", bbox="175,-20,-178,-15")
    assert fiji_box.bounds[0] > 175 and 180 < fiji_box.bounds[2] < 182


def test_ocean_only_bbox_is_an_error():
    with pytest.raises(TaxamapError, match="land"):
        make_grid(resolve_region(bbox="-140,-50,-130,-45").geometry, 0.1)
    # A speck of land that no cell centre of a coarse grid hits: make_grid's own error.
    bermuda = resolve_region("bermuda")
    with pytest.raises(TaxamapError, match="no cell centre"):
        make_grid(bermuda.geometry, 1.0)


def test_land_only_false_keeps_the_ocean():
    region = resolve_region(bbox=(-130, 30, -120, 40), land_only=False)
    assert inside(region.geometry, -126.0, 35.0)
    assert region.bounds == (-130.0, 30.0, -120.0, 40.0)


@pytest.mark.parametrize("bad", ["10,50,20,40", "0,-95,10,0", "1,2,3", "a,b,c,d", "0,0,0,10",
                                 "-200,0,10,10", (1, 2, 3), "nan,0,1,1"])
def test_bad_bbox_is_an_error(bad):
    with pytest.raises(TaxamapError, match="bbox"):
        resolve_region(bbox=bad)


def test_parse_bbox_unwraps_the_antimeridian():
    assert parse_bbox(" 170, -20 ,-170,10 ") == (170.0, -20.0, 190.0, 10.0)
    assert parse_bbox((-1, 2, 3, 4.5)) == (-1.0, 2.0, 3.0, 4.5)


def test_region_and_bbox_intersect():
    region = resolve_region("usa", bbox="-100,35,-95,40")
    assert region.bounds == pytest.approx((-100, 35, -95, 40))
    assert "bbox" in region.slug and region.slug.startswith("usa")
    with pytest.raises(TaxamapError, match="does not overlap"):
        resolve_region("ohio", bbox="0,0,10,10")


def test_neither_region_nor_bbox_is_an_error():
    with pytest.raises(TaxamapError, match="--region"):
        resolve_region()


def test_geojson_in_web_mercator_is_reprojected(tmp_path):
    from pyproj import Transformer

    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x0, y0 = to_merc.transform(-100.0, 37.0)
    x1, y1 = to_merc.transform(-95.0, 40.0)
    path = tmp_path / "kansas-ish.geojson"
    write_vector(path, [shapely.box(x0, y0, x1, y1)], "EPSG:3857", "GeoJSON")
    assert "3857" in json.dumps(json.loads(path.read_text()).get("crs"))
    region = resolve_region(str(path))
    assert region.kind == "file" and region.slug == "kansas-ish"
    assert region.bounds == pytest.approx((-100.0, 37.0, -95.0, 40.0), abs=1e-6)
    from_file = make_grid(region.geometry, 0.25)
    from_box = make_grid(resolve_region(bbox="-100,37,-95,40").geometry, 0.25)
    assert from_file.definition() == from_box.definition()


def test_geopackage_in_utm_is_reprojected_and_unioned(tmp_path):
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32614", always_xy=True)
    centre = to_utm.transform(-98.0, 38.5)
    # Two overlapping discs: the region is their union.
    discs = [shapely.Point(centre).buffer(50_000), shapely.Point(centre[0] + 60_000, centre[1])
             .buffer(50_000)]
    path = tmp_path / "discs.gpkg"
    write_vector(path, discs, "EPSG:32614", "GPKG")
    region = resolve_region(str(path))
    assert inside(region.geometry, *KANSAS)
    assert region.geometry.geom_type == "Polygon"  # unioned, not two parts
    west, south, east, north = region.bounds
    # 50 km is ~0.45 degrees of latitude; the discs span ~160 km east-west (~1.8 degrees).
    assert 38.5 - 0.5 < south < 38.5 - 0.4 and 38.5 + 0.4 < north < 38.5 + 0.5
    assert west == pytest.approx(-98.0 - 0.57, abs=0.05)
    assert east - west == pytest.approx(1.8, abs=0.15)


def test_unreadable_or_missing_vector_file_is_an_error(tmp_path):
    broken = tmp_path / "broken.geojson"
    broken.write_text("this is not json")
    with pytest.raises(TaxamapError, match="cannot read region file"):
        resolve_region(str(broken))
    with pytest.raises(TaxamapError, match="not found"):
        resolve_region(str(tmp_path / "missing.gpkg"))


def test_land_is_cached_and_valid():
    assert grids.land() is grids.land()
    assert grids.land().is_valid


def test_shipped_presets_match_the_build_script(tmp_path):
    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "naturalearth"
    if not source.exists():
        pytest.skip("Natural Earth source data not present")
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_presets",
                                                  Path(grids.__file__).with_name("build_presets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.build(source, tmp_path, 0.005)
    shipped = json.loads(Path(grids.__file__).with_name("index.json").read_text(encoding="utf-8"))
    assert rebuilt["regions"] == shipped["regions"]
    assert rebuilt["aliases"] == shipped["aliases"]
    # The shipped land mask is the script's land minus lakes (compared as geometry: GEOS versions
    # may order vertices differently).
    import gzip

    with gzip.open(tmp_path / "land.json.gz", "rt", encoding="utf-8") as fh:
        land = shapely.get_parts(shapely.from_geojson(fh.read()))
    assert len(land) == len(shapely.get_parts(grids.land()))
    assert shapely.area(land).sum() == pytest.approx(grids.land().area, rel=1e-6)


def test_bbox_on_one_meridian_has_no_width():
    import pytest

    from taxamap.errors import TaxamapError
    from taxamap.geography import parse_bbox

    for text in ("180,-20,-180,-15", "10,0,10,1"):
        with pytest.raises(TaxamapError, match="no width"):
            parse_bbox(text)
    assert parse_bbox("-180,-10,180,10") == (-180.0, -10.0, 180.0, 10.0)
