"""Reading occurrence files (CSV/TSV/vector, any CRS) and downloading GBIF occurrences."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from taxamap.errors import TaxamapError
from taxamap.products.occurrences import (
    download_occurrences,
    geometry_wkt,
    load_points,
    read_labelled_points,
    read_points,
)
from taxamap.taxonomy import TaxonomyClient
from tests.helpers.occurrence_server import OccurrenceServer, occurrence
from tests.helpers.samples import ariolimax_path

# --- reading files ------------------------------------------------------------------------------

def test_csv_lat_lon_and_missing_rows_counted(tmp_path):
    path = tmp_path / "occ.csv"
    path.write_text("id,Lat,LON\n1,37.5,-122.25\n2,,-121\n3,NA,5\n4,38,-120.5\n5,95,10\n")
    points = load_points(path)
    np.testing.assert_allclose(points.latlon, [[37.5, -122.25], [38.0, -120.5]])
    assert (points.n_rows, points.n_missing, points.n_invalid) == (5, 2, 1)
    assert "2 without coordinates" in points.summary()
    assert read_points(path).shape == (2, 2)


def test_semicolon_latitude_longitude(tmp_path):
    path = tmp_path / "occ.csv"
    path.write_text("name;Latitude;Longitude\na;10,5;20,25\nb;-3;4\n")
    np.testing.assert_allclose(read_points(path), [[10.5, 20.25], [-3.0, 4.0]])


def test_gbif_tab_separated_download(tmp_path):
    # GBIF "simple" downloads are tab-separated (even when named .csv) and carry stray quotes.
    header = "gbifID\tdatasetKey\tlocality\tdecimalLatitude\tdecimalLongitude\teventDate"
    rows = ['1\tab\tNear "the" creek, CA\t36.9\t-121.8\t2020-01-01',
            '2\tab\tsomewhere\t\t\t2020-01-02',
            '3\tab\tx\t37.1\t-122.0\t']
    path = tmp_path / "0001234-240101.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    points = load_points(path)
    np.testing.assert_allclose(points.latlon, [[36.9, -121.8], [37.1, -122.0]])
    assert points.n_missing == 1


def test_no_coordinate_columns_says_which_are_accepted(tmp_path):
    path = tmp_path / "occ.csv"
    path.write_text("x_coord,y_coord\n1,2\n")
    with pytest.raises(TaxamapError) as err:
        read_points(path)
    message = str(err.value)
    assert "decimalLatitude/decimalLongitude" in message and "lat/lon" in message
    assert "x_coord" in message and "\n" not in message
    with pytest.raises(TaxamapError, match="not found"):
        read_points(tmp_path / "nope.csv")
    (tmp_path / "bad.gpkg").write_bytes(b"not a geopackage")
    with pytest.raises(TaxamapError, match="cannot read"):
        read_points(tmp_path / "bad.gpkg")


def _write_points(path: Path, lonlat: np.ndarray, crs: str, driver: str, labels=None) -> None:
    import pyogrio
    import shapely
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lonlat[:, 0],
                                                                           lonlat[:, 1])
    geoms = shapely.to_wkb(shapely.points(np.column_stack([x, y])))
    kwargs = dict(field_data=[], fields=[])
    if labels is not None:
        kwargs = dict(field_data=[np.asarray(labels, dtype=np.int64)], fields=["presence"])
    pyogrio.raw.write(path, geometry=np.asarray(geoms, dtype=object), geometry_type="Point",
                      crs=crs, driver=driver, **kwargs)


@pytest.mark.parametrize("suffix,driver,crs", [
    (".gpkg", "GPKG", "EPSG:32610"),
    (".shp", "ESRI Shapefile", "EPSG:3310"),
    (".geojson", "GeoJSON", "EPSG:4326"),
])
def test_vector_files_any_crs(tmp_path, suffix, driver, crs):
    rng = np.random.default_rng(1)
    lonlat = np.column_stack([rng.uniform(-123, -117, 50), rng.uniform(33, 41, 50)])
    path = tmp_path / f"pts{suffix}"
    _write_points(path, lonlat, crs, driver)
    latlon = read_points(path)
    np.testing.assert_allclose(latlon, lonlat[:, ::-1], atol=1e-7)


def test_vector_labels_and_polygons_rejected(tmp_path):
    import pyogrio
    import shapely

    lonlat = np.array([[-120.0, 35.0], [-119.0, 36.0], [-118.0, 37.0]])
    path = tmp_path / "pa.gpkg"
    _write_points(path, lonlat, "EPSG:4326", "GPKG", labels=[1, 0, 1])
    presence, background = read_labelled_points(path)
    np.testing.assert_allclose(presence, [[35.0, -120.0], [37.0, -118.0]])
    np.testing.assert_allclose(background, [[36.0, -119.0]])

    poly = tmp_path / "poly.gpkg"
    pyogrio.raw.write(poly, geometry=np.array([shapely.to_wkb(shapely.box(0, 0, 1, 1))],
                                              dtype=object),
                      geometry_type="Polygon", crs="EPSG:4326", driver="GPKG", field_data=[],
                      fields=[])
    with pytest.raises(TaxamapError, match="point features"):
        read_points(poly)


def test_elapid_ariolimax_sample_reads_presence_and_background():
    path = ariolimax_path()
    if path is None:
        pytest.skip("elapid is not installed (pip install elapid)")
    presence, background = read_labelled_points(path)
    assert presence.shape == (1595, 2) and background.shape == (4990, 2)
    # EPSG:32610 (UTM 10N) reprojected into California.
    for pts in (presence, background):
        assert 32.0 < pts[:, 0].min() and pts[:, 0].max() < 42.5
        assert -124.5 < pts[:, 1].min() and pts[:, 1].max() < -114.0


# --- GBIF download ----------------------------------------------------------------------------

def _records(n: int, taxon_key: int = 2293456) -> list[dict]:
    rng = np.random.default_rng(0)
    lat = rng.uniform(36.0, 38.0, n)
    lon = rng.uniform(-123.0, -121.0, n)
    return [occurrence(i, float(a), float(b), taxon_key) for i, (a, b) in enumerate(zip(lat, lon))]


@pytest.fixture
def gbif():
    servers = []

    def start(**kwargs) -> tuple[OccurrenceServer, TaxonomyClient]:
        server = OccurrenceServer(**kwargs)
        servers.append(server)
        client = TaxonomyClient(gbif_url=server.gbif_url, retries=3, backoff=0.01, max_wait=0.05)
        return server, client

    yield start
    for server in servers:
        server.close()


def test_download_pages_up_to_the_limit(tmp_path, gbif):
    server, client = gbif(records=_records(700))
    out = tmp_path / "occ" / "ariolimax.csv"
    result = download_occurrences("ariolimax  BUTTONI", (-123.5, 35.5, -120.5, 38.5), out,
                                  limit=650, client=client, offline=False,
                                  cache_dir=tmp_path / "cache", delay=0)
    assert (result.n_records, result.count, result.taxon_key) == (650, 700, 2293456)
    assert result.truncated and not result.from_cache
    pages = server.search_requests()
    assert [(q["offset"][0], q["limit"][0]) for q in pages] == [("0", "300"), ("300", "300"),
                                                                 ("600", "50")]
    first = pages[0]
    assert first["taxonKey"] == ["2293456"] and first["hasCoordinate"] == ["true"]
    assert first["hasGeospatialIssue"] == ["false"]
    assert first["decimalLatitude"] == ["35.5,38.5"]
    assert first["decimalLongitude"] == ["-123.5,-120.5"]
    headers = server.requests[0][2]
    assert headers["User-Agent"].startswith("taxamap/")
    # The CSV reads back through read_points, in the server's order.
    latlon = read_points(out)
    expected = [(r["decimalLatitude"], r["decimalLongitude"]) for r in server.records[:650]]
    np.testing.assert_allclose(latlon, expected)
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["decimalLatitude", "decimalLongitude", "gbifID"]
    assert "basisOfRecord" in header and "eventDate" in header
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]

    # An identical request is answered from the cache, even offline.
    again = download_occurrences("Ariolimax buttoni", (-123.5, 35.5, -120.5, 38.5),
                                 tmp_path / "copy.csv", limit=650, offline=True,
                                 cache_dir=tmp_path / "cache")
    assert again.from_cache and again.n_records == 650
    assert (tmp_path / "copy.csv").read_bytes() == out.read_bytes()
    assert len(server.search_requests()) == 3


def test_download_stops_at_end_of_records_and_retries_transient_errors(tmp_path, gbif):
    server, client = gbif(records=_records(120), fail_first=[503, 429])
    result = download_occurrences("Ariolimax buttoni", "-123.5,35.5,-120.5,38.5",
                                  tmp_path / "o.csv", limit=5000, client=client, offline=False,
                                  cache_dir=tmp_path / "cache", delay=0)
    assert result.n_records == 120 and not result.truncated
    assert len(server.search_requests()) == 3  # two failures, then one page


def test_download_with_polygon_sends_counter_clockwise_wkt(tmp_path, gbif):
    import shapely

    server, client = gbif(records=_records(10))
    clockwise = shapely.Polygon([(-123, 36), (-123, 38), (-121, 38), (-121, 36)])
    download_occurrences("Ariolimax buttoni", clockwise, tmp_path / "o.csv", limit=10,
                         client=client, offline=False, cache_dir=tmp_path / "c", delay=0)
    wkt = server.search_requests()[0]["geometry"][0]
    sent = shapely.from_wkt(wkt)
    assert sent.exterior.is_ccw and sent.equals(clockwise)
    # Across the antimeridian: split into two parts inside [-180, 180].
    across = shapely.from_wkt(geometry_wkt(shapely.box(170, -20, 190, 10)))
    assert across.geom_type == "MultiPolygon"
    assert across.bounds == (-180.0, -20.0, 180.0, 10.0)
    assert abs(across.area - 600.0) < 1e-6


def test_download_errors_are_one_line(tmp_path, gbif, monkeypatch):
    monkeypatch.setenv("TAXAMAP_OFFLINE", "1")
    with pytest.raises(TaxamapError, match="offline") as err:
        download_occurrences("Ariolimax buttoni", (-123, 36, -121, 38), tmp_path / "o.csv",
                             cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)

    # Nothing listens on this port: the connection is refused at once.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = TaxonomyClient(gbif_url=f"http://127.0.0.1:{port}/v1", retries=0)
    with pytest.raises(TaxamapError, match="could not be reached") as err:
        download_occurrences("Ariolimax buttoni", (-123, 36, -121, 38), tmp_path / "o.csv",
                             client=client, offline=False, cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o.csv").exists()

    server, client = gbif(records=[], match={"matchType": "NONE", "confidence": 100})
    with pytest.raises(TaxamapError, match="does not know"):
        download_occurrences("Nonexistus fakeus", (-123, 36, -121, 38), tmp_path / "o.csv",
                             client=client, offline=False, cache_dir=tmp_path / "c")
    with pytest.raises(TaxamapError, match="out of range"):
        download_occurrences("Ariolimax buttoni", (-123, 36, -121, 38), tmp_path / "o.csv",
                             limit=200_000, client=client, offline=False)


def test_api_occurrences_is_a_geodataframe_from_the_cache(tmp_path, gbif):
    import taxamap

    server, client = gbif(records=_records(120))
    gdf = taxamap.occurrences("Ariolimax buttoni", bbox=(-123.5, 35.5, -120.5, 38.5), limit=100,
                              cache=tmp_path / "cache", client=client)
    assert gdf.crs.to_epsg() == 4326 and len(gdf) == 100
    assert {"lat", "lon", "species"} <= set(gdf.columns)
    np.testing.assert_allclose(gdf.geometry.y, gdf["lat"])
    assert gdf.attrs["count"] == 120 and not list(tmp_path.glob("*.csv"))
    again = taxamap.occurrences("Ariolimax buttoni", bbox=(-123.5, 35.5, -120.5, 38.5),
                                limit=100, cache=tmp_path / "cache", client=client)
    assert len(server.search_requests()) == 1  # the second answer came from the cache
    assert again.equals(gdf)
