"""WorldClim features: order, global z-scoring, lookup, masks, stats cache, download."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from taxamap.errors import TaxamapError
from taxamap.sources.worldclim import (
    MANIFEST_FILE,
    STATS_FILE,
    WORLDCLIM_FILES,
    WORLDCLIM_ZIPS,
    WorldClimFeatures,
    cell_index,
    download_worldclim,
)
from tests.helpers.worldclim_fixtures import NODATA, official_zips, write_raster, write_rasters


def reference_scaled(raw: np.ndarray) -> np.ndarray:
    """Independent version of the training preprocessing: (20, H, W) -> (20, H, W), NaN kept."""
    vals = raw.astype(np.float64)
    vals[vals < -1e6] = np.nan
    mean = np.nanmean(vals, axis=(1, 2), keepdims=True)
    std = np.nanstd(vals, axis=(1, 2), keepdims=True)
    return (vals - mean) / std


def reference_index(lat: float, lon: float, h: int, w: int) -> tuple[int, int]:
    x = int((lon + 180) * w / 360)
    y = int((90 - lat) * h / 180)
    return min(max(y, 0), h - 1), min(max(x, 0), w - 1)


@pytest.fixture()
def wc(tmp_path):
    return write_rasters(tmp_path / "wc", height=18, width=36, seed=1)


# A few land points, the edges, and random points all over the globe.
EDGE_POINTS = [(0.0, 0.0), (-90.0, 180.0), (90.0, -180.0), (-90.0, 0.0), (0.0, 180.0),
               (45.5, -83.2), (-33.9, 151.2), (89.999, 179.999), (12.0, 120.0)]


def test_files_are_official_names_in_feature_order():
    assert len(WORLDCLIM_FILES) == 20
    assert WORLDCLIM_FILES[0] == "wc2.1_5m_elev.tif"
    assert WORLDCLIM_FILES[1:] == tuple(f"wc2.1_5m_bio_{i}.tif" for i in range(1, 20))
    assert sorted(sum(WORLDCLIM_ZIPS.values(), ())) == sorted(WORLDCLIM_FILES)


def test_lookup_index_matches_formula():
    h, w = 18, 36
    pts = np.array(EDGE_POINTS)
    rows, cols = cell_index(pts, h, w)
    for (lat, lon), r, c in zip(EDGE_POINTS, rows, cols):
        assert (r, c) == reference_index(lat, lon, h, w), (lat, lon)
    # lon = 180 and lat = -90 fall off the formula's range and are clipped to the last cell.
    assert cols[1] == w - 1 and rows[1] == h - 1
    assert (rows[0], cols[0]) == (h // 2, w // 2)
    with pytest.raises(TaxamapError):
        cell_index(np.array([[np.nan, 0.0]]), h, w)
    with pytest.raises(TaxamapError):
        cell_index(np.zeros((3, 3)), h, w)


def test_features_equal_independent_computation(wc):
    feats = WorldClimFeatures(wc.folder)
    rng = np.random.default_rng(5)
    pts = np.column_stack([rng.uniform(-90, 90, 400), rng.uniform(-180, 180, 400)])
    pts = np.vstack([pts, EDGE_POINTS])
    got = feats.features(pts)
    assert got.shape == (len(pts), 20) and got.dtype == np.float32
    ref = reference_scaled(wc.raw)
    for i, (lat, lon) in enumerate(pts):
        r, c = reference_index(lat, lon, wc.height, wc.width)
        if wc.ocean[r, c]:
            assert np.isnan(got[i]).all()
            continue
        expect = np.nan_to_num(ref[:, r, c], nan=0.0)
        np.testing.assert_allclose(got[i], expect, rtol=1e-5, atol=1e-5)
    assert np.isnan(got).any(axis=1).sum() > 0  # the ocean band was hit


def test_feature_order_layer_k_in_column_k(wc):
    feats = WorldClimFeatures(wc.folder)
    stats = feats.stats()
    r, c = 5, 20  # a land cell with every layer present
    assert not wc.ocean[r, c] and not wc.partial[:, r, c].any()
    lat = 90 - (r + 0.5) * 180 / wc.height
    lon = -180 + (c + 0.5) * 360 / wc.width
    row = feats.features(np.array([[lat, lon]]))[0]
    means = np.array([stats[n][0] for n in WORLDCLIM_FILES])
    stds = np.array([stats[n][1] for n in WORLDCLIM_FILES])
    raw_back = row * stds + means
    # Layer k's values sit around 1000 * k: the column says which layer it came from.
    np.testing.assert_array_equal(np.round(raw_back / 1000), np.arange(20))
    np.testing.assert_allclose(raw_back, wc.raw[:, r, c], rtol=1e-5)


def test_ocean_row_is_nan_and_partial_missing_is_zero(wc):
    feats = WorldClimFeatures(wc.folder)
    h, w = wc.height, wc.width

    def centre(r, c):
        return 90 - (r + 0.5) * 180 / h, -180 + (c + 0.5) * 360 / w

    out = feats.features(np.array([centre(3, 0), centre(1, w - 1), centre(2, w - 2)]))
    assert np.isnan(out[0]).all()
    assert not np.isnan(out[1:]).any()
    assert out[1, 3] == 0.0 and out[1, 7] == 0.0 and out[1, 4] != 0.0
    assert out[2, 0] == 0.0 and out[2, 1] != 0.0
    # The partly missing values are left out of the stats, not counted as zeros.
    mean_bio3 = np.nanmean(np.where(wc.raw[3] < -1e6, np.nan, wc.raw[3].astype(np.float64)))
    assert feats.stats()["wc2.1_5m_bio_3.tif"][0] == pytest.approx(mean_bio3, rel=1e-9)


def test_env_array_path(wc, tmp_path):
    ref = reference_scaled(wc.raw)
    arr = np.nan_to_num(np.moveaxis(ref, 0, -1), nan=0.0).astype(np.float16)  # H x W x 20
    path = tmp_path / "bioclim_elevation_scaled.npy"
    np.save(path, arr)
    feats = WorldClimFeatures(env_array=path)
    assert (feats.height, feats.width) == (wc.height, wc.width)
    pts = np.array(EDGE_POINTS)
    got = feats.features(pts)
    for i, (lat, lon) in enumerate(EDGE_POINTS):
        r, c = reference_index(lat, lon, wc.height, wc.width)
        if wc.ocean[r, c]:
            assert np.isnan(got[i]).all()
        else:
            np.testing.assert_array_equal(got[i], arr[r, c].astype(np.float32))
    d = feats.describe()
    assert d["source"] == "env_array" and d["grid"] == [wc.height, wc.width]
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 8, 3), dtype=np.float16))
    with pytest.raises(TaxamapError, match="H x W x 20"):
        WorldClimFeatures(env_array=bad)


def test_stats_cache_written_once_reused_and_invalidated(wc):
    pts = np.array([[45.0, 10.0], [-20.0, 60.0]])
    first = WorldClimFeatures(wc.folder).features(pts)
    cache = wc.folder / STATS_FILE
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    data = json.loads(cache.read_text())
    assert set(data["layers"]) == set(WORLDCLIM_FILES)

    again = WorldClimFeatures(wc.folder).features(pts)
    np.testing.assert_array_equal(first, again)
    assert cache.stat().st_mtime_ns == mtime

    # Proof that the cached numbers are what gets used: edit one mean in the cache.
    data["layers"]["wc2.1_5m_bio_2.tif"]["mean"] += 10 * data["layers"]["wc2.1_5m_bio_2.tif"]["std"]
    cache.write_text(json.dumps(data))
    edited = WorldClimFeatures(wc.folder).features(pts)
    np.testing.assert_allclose(edited[:, 2], first[:, 2] - 10, rtol=1e-5)
    np.testing.assert_array_equal(edited[:, 3], first[:, 3])

    # Replacing a raster invalidates its entry (only), and the result follows the new data.
    new = wc.raw.copy()
    land = new[5] > -1e6
    new[5][land] = new[5][land] * 3 + 7
    write_raster(wc.folder / WORLDCLIM_FILES[5], new[5])
    feats = WorldClimFeatures(wc.folder)
    got = feats.features(pts)
    ref = reference_scaled(new)
    for i, (lat, lon) in enumerate(pts):
        r, c = reference_index(lat, lon, wc.height, wc.width)
        np.testing.assert_allclose(got[i, 5], ref[5, r, c], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 2], edited[:, 2])  # untouched layers keep their entries
    refreshed = json.loads(cache.read_text())
    assert refreshed["layers"]["wc2.1_5m_bio_5.tif"] != data["layers"]["wc2.1_5m_bio_5.tif"]
    assert not [p for p in wc.folder.iterdir() if p.name.endswith(".tmp")]


def test_describe_changes_with_data(wc):
    d1 = WorldClimFeatures(wc.folder).describe()
    assert d1["source"] == "worldclim-2.1-5m" and d1["features"][:2] == ["elev", "bio_1"]
    assert json.loads(json.dumps(d1)) == d1
    write_raster(wc.folder / WORLDCLIM_FILES[0], wc.raw[0] + 1)
    assert WorldClimFeatures(wc.folder).describe()["fingerprint"] != d1["fingerprint"]


def test_missing_files_error_names_them(tmp_path):
    wc = write_rasters(tmp_path / "wc", names=WORLDCLIM_FILES[:-2])
    with pytest.raises(TaxamapError) as err:
        WorldClimFeatures(wc.folder)
    msg = str(err.value)
    assert "wc2.1_5m_bio_18.tif" in msg and "wc2.1_5m_bio_19.tif" in msg
    assert "wc2.1_5m_bio_1.tif," not in msg
    assert f"taxamap data worldclim {wc.folder}" in msg and "\n" not in msg
    with pytest.raises(TaxamapError, match="taxamap data worldclim"):
        WorldClimFeatures(tmp_path / "nowhere")
    with pytest.raises(TaxamapError, match="exactly one"):
        WorldClimFeatures()


def test_non_global_raster_refused(wc):
    import rasterio
    from rasterio.transform import from_origin

    path = wc.folder / WORLDCLIM_FILES[4]
    with rasterio.open(path, "w", driver="GTiff", height=18, width=36, count=1, dtype="float32",
                       crs="EPSG:4326", transform=from_origin(-10, 50, 0.1, 0.1),
                       nodata=NODATA) as dst:
        dst.write(wc.raw[4], 1)
    with pytest.raises(TaxamapError, match="not a global"):
        WorldClimFeatures(wc.folder)


# -- download against a loopback server ---------------------------------------------------------

class _Server:
    """Serves {name: bytes} with Range support; can drop the first response for some names."""

    def __init__(self, files: dict[str, bytes], drop_first: set[str] = frozenset(),
                 ignore_range: bool = False):
        self.files, self.drop = files, set(drop_first)
        self.ignore_range = ignore_range
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                body = outer.files.get(name)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and not outer.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if name in outer.drop:
                    outer.drop.discard(name)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/climate/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def zips():
    # 36 x 72 makes the bio zip ~150 KB, so the dropped first half spans whole 64 KiB chunks.
    return official_zips(height=36, width=72, seed=2)


def _zip_member(data: bytes, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read(name)


def test_download_resumes_and_is_idempotent(tmp_path, zips):
    target = tmp_path / "wc"
    with _Server(zips, drop_first={"wc2.1_5m_bio.zip"}) as srv:
        paths = download_worldclim(target, base_url=srv.url, progress=True, backoff=0)
        assert paths == [target / n for n in WORLDCLIM_FILES]
        bio = [rng for name, rng in srv.requests if name == "wc2.1_5m_bio.zip"]
        half = len(zips["wc2.1_5m_bio.zip"]) // 2
        assert bio == [None, f"bytes={half}-"]  # resumed exactly where the drop left off
        for zip_name, members in WORLDCLIM_ZIPS.items():
            for name in members:
                assert (target / name).read_bytes() == _zip_member(zips[zip_name], name)
        manifest = json.loads((target / MANIFEST_FILE).read_text())
        for zip_name, data in zips.items():
            assert manifest["zips"][zip_name]["sha256"] == hashlib.sha256(data).hexdigest()
            assert manifest["zips"][zip_name]["size"] == len(data)
        leftovers = {p.name for p in target.iterdir()} - set(WORLDCLIM_FILES) - {MANIFEST_FILE}
        assert leftovers == set()  # no .part, zip, or temp folder left behind

        n = len(srv.requests)
        again = download_worldclim(target, base_url=srv.url, progress=False, backoff=0)
        assert again == paths and len(srv.requests) == n  # already there: no request

        # A deleted raster brings back only its own zip.
        os.remove(target / "wc2.1_5m_elev.tif")
        download_worldclim(target, base_url=srv.url, progress=False, backoff=0)
        assert [name for name, _ in srv.requests[n:]] == ["wc2.1_5m_elev.zip"]
    feats = WorldClimFeatures(target).features(np.array([[10.0, 20.0]]))
    assert feats.shape == (1, 20)


def test_download_restarts_when_server_ignores_range(tmp_path, zips):
    target = tmp_path / "wc"
    with _Server(zips, drop_first={"wc2.1_5m_elev.zip"}, ignore_range=True) as srv:
        download_worldclim(target, base_url=srv.url, progress=False, backoff=0)
    elev = _zip_member(zips["wc2.1_5m_elev.zip"], "wc2.1_5m_elev.tif")
    assert (target / "wc2.1_5m_elev.tif").read_bytes() == elev


def test_download_errors_are_one_line(tmp_path, zips):
    with _Server({"wc2.1_5m_elev.zip": zips["wc2.1_5m_elev.zip"]}) as srv:
        with pytest.raises(TaxamapError, match="HTTP 404") as err:
            download_worldclim(tmp_path / "wc", base_url=srv.url, progress=False, backoff=0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "wc" / "wc2.1_5m_bio_1.tif").exists()
    bad = {name: b"not a zip at all" for name in zips}
    with _Server(bad) as srv:
        with pytest.raises(TaxamapError, match="corrupt"):
            download_worldclim(tmp_path / "wc2", base_url=srv.url, progress=False, backoff=0)
    assert not [p for p in (tmp_path / "wc2").iterdir() if p.suffix in (".tif", ".zip")]


def test_download_accepts_rasters_and_zips_placed_by_hand(tmp_path, zips):
    target = tmp_path / "wc"
    write_rasters(target, names=WORLDCLIM_ZIPS["wc2.1_5m_bio.zip"])  # bio unpacked by hand
    (target / "wc2.1_5m_elev.zip").write_bytes(zips["wc2.1_5m_elev.zip"])  # zip fetched by hand
    with _Server({}) as srv:  # serves nothing: any request would fail the download
        download_worldclim(target, base_url=srv.url, progress=False, backoff=0)
        assert srv.requests == []
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == set(WORLDCLIM_FILES)
    elev = _zip_member(zips["wc2.1_5m_elev.zip"], "wc2.1_5m_elev.tif")
    assert (target / "wc2.1_5m_elev.tif").read_bytes() == elev


def test_stalled_download_server_stops_in_two_timeouts(tmp_path):
    from tests.helpers.stallserver import StallServer

    with StallServer() as stall:
        host, url = stall.host, stall.url
        with pytest.raises(TaxamapError) as err:
            download_worldclim(tmp_path / "wc", base_url=stall.url + "/climate/", progress=False,
                               backoff=0.001, timeout=(1.0, 0.3))
        assert stall.accepted == 2  # one timeout per zip, then the breaker: not 6 attempts x 2
    message = str(err.value)
    assert host in message and "not answering" in message and "\n" not in message
    # What to fetch by hand, from where, to where.
    assert (f"download wc2.1_5m_elev.zip and wc2.1_5m_bio.zip from {url}/climate/"
            in message and f"into {tmp_path / 'wc'}" in message), message
    assert not [p for p in (tmp_path / "wc").iterdir() if p.suffix in (".tif", ".zip")]


def test_offline_download_names_the_zips_still_missing(tmp_path, zips):
    """Offline, with the elevation zip already fetched by hand: the one line names the zip still
    needed, the official folder it comes from and the folder it goes in."""
    import socket

    from taxamap.sources.worldclim import WORLDCLIM_BASE_URL

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connections are refused
    target = tmp_path / "wc"
    target.mkdir()
    (target / "wc2.1_5m_elev.zip").write_bytes(zips["wc2.1_5m_elev.zip"])
    with pytest.raises(TaxamapError) as err:
        download_worldclim(target, base_url=f"http://127.0.0.1:{port}/base", progress=False,
                           backoff=0.001, timeout=(1.0, 0.3))
    message = str(err.value)
    assert f"download wc2.1_5m_bio.zip from http://127.0.0.1:{port}/base/ " in message, message
    assert "wc2.1_5m_elev.zip" not in message and f"into {target}" in message
    assert "worldclim.org" in message and WORLDCLIM_BASE_URL.startswith("https://geodata.ucdavis")
