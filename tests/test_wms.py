"""The WMS source (TaxaBind's training request, the default) against a loopback WMS that checks
every parameter of every request (tests/wmsserver.py)."""

from __future__ import annotations

import json
import math
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import rasterio

from taxamap.errors import TaxamapError
from taxamap.sources.satellite import SatelliteSource, make_satellite_source
from taxamap.sources.wms import DEFAULT_WMS_URL, WMSSource
from tests.helpers.isatnat import TRAINING_ROWS
from tests.helpers.wmsserver import WMSServer

FAST = dict(backoff=0.001, max_backoff=0.01, timeout=(2.0, 2.0))
TRAINING_URL = ("https://tiles.maps.eox.at/wms?service=WMS&version=1.1.1&request=GetMap"
                "&layers=s2cloudless-2020&styles=&width=256&height=256&srs=EPSG:4326&bbox={bbox}"
                "&format=image/png")


def make(server: WMSServer, tmp_path, **kw) -> WMSSource:
    opts = dict(cache_dir=tmp_path / "cache", workers=4, **FAST)
    opts.update(kw)
    return WMSSource(server.url, **opts)


def test_every_request_is_the_training_request(tmp_path):
    cells = np.array([row[:2] for row in TRAINING_ROWS])
    with WMSServer() as server, make(server, tmp_path) as src:
        patches = src.fetch(cells)
        assert server.errors == []  # every parameter, its value and their order as in training
        assert all(p is not None and p.size == (256, 256) and p.mode == "RGB" for p in patches)
        assert server.requests == 4 and server.widths == [256] * 4
        got = {tuple(round(v, 6) for v in b): b for b in server.bboxes}
        for _lat, _lon, *bbox in TRAINING_ROWS:
            sent = got[tuple(round(v, 6) for v in bbox)]
            np.testing.assert_allclose(sent, bbox, rtol=0, atol=1e-9)
        (agent,) = server.user_agents
        assert agent.startswith("taxamap/")
    # The default endpoint's URL is the training table's, character for character but for the
    # last digit of float formatting.
    default = make_satellite_source(cache_dir=tmp_path)
    lat, lon, *bbox = TRAINING_ROWS[0]
    (url,) = default.explain(lat, lon)["requests"]
    want = TRAINING_URL.format(bbox=",".join(repr(v) for v in bbox))
    assert url.split("&bbox=")[0] == want.split("&bbox=")[0] and url.endswith("&format=image/png")
    sent = [float(v) for v in dict(parse_qsl(urlsplit(url).query))["bbox"].split(",")]
    np.testing.assert_allclose(sent, bbox, rtol=0, atol=1e-9)


def test_default_source_is_eox_wms_with_its_licence(tmp_path):
    src = make_satellite_source(cache_dir=tmp_path)
    assert isinstance(src, SatelliteSource) and isinstance(src, WMSSource)
    assert src.url == DEFAULT_WMS_URL == "https://tiles.maps.eox.at/wms"
    assert src.describe() == {"kind": "wms", "url": DEFAULT_WMS_URL, "layers": "s2cloudless-2020",
                              "version": "1.1.1", "srs": "EPSG:4326", "format": "image/png",
                              "footprint_m": 2560.0, "size": 256}
    assert "s2maps.eu" in src.attribution and "2020" in src.attribution and src.license == "CC BY-NC-SA 4.0"
    other = make_satellite_source("wms", size=128, footprint_m=1280, cache_dir=tmp_path)
    assert other.describe()["size"] == 128 and other.describe()["footprint_m"] == 1280
    for bad, match in [("ftp://x/wms", "http"), ("https://x/{z}/{x}/{y}.png", "--sat-source xyz"),
                       ("https://x/wms?request=GetMap&bbox=1,2,3,4", "endpoint only")]:
        with pytest.raises(TaxamapError, match=match):
            make_satellite_source("wms", url=bad, cache_dir=tmp_path)
    for kwargs, match in [({"footprint_m": 1}, "--sat-footprint"), ({"size": 8}, "--sat-size"),
                          ({"zoom": 14}, "--sat-zoom")]:
        with pytest.raises(TaxamapError, match=match):
            make_satellite_source("wms", cache_dir=tmp_path, **kwargs)


def test_endpoint_with_its_own_query_keeps_it(tmp_path):
    src = WMSSource("https://example.org/cgi?map=s2.map", cache=False)
    url = src.request_url((1.0, 2.0, 3.0, 4.0))
    assert url.startswith("https://example.org/cgi?map=s2.map&service=WMS&version=1.1.1&")


def test_antimeridian_box_is_two_requests_joined(tmp_path):
    with WMSServer() as server, make(server, tmp_path) as src:
        (patch,) = src.fetch([[0.0, 179.999]])
        assert server.errors == [] and server.requests == 2
        assert sum(server.widths) == 256
        west, east = sorted(server.bboxes, key=lambda b: -b[0])
        assert west[2] == 180.0 and east[0] == -180.0
    rgb = np.asarray(patch)
    split = server.widths[[b[0] for b in server.bboxes].index(west[0])]
    # West half (blue 100) first, its columns 0..split-1, then the east half's from 0 again.
    assert (rgb[:, :split, 2] == 100).all() and (rgb[:, split:, 2] == 200).all()
    np.testing.assert_array_equal(rgb[0, :split, 0], np.arange(split))
    np.testing.assert_array_equal(rgb[0, split:, 0], np.arange(256 - split))


def test_second_run_makes_no_request_and_the_cache_is_keyed_by_the_request(tmp_path):
    cells = np.array([[40.0, -83.0], [41.0, -82.0], [0.0, 179.999]])
    with WMSServer() as server:
        with make(server, tmp_path) as src:
            first = src.fetch(cells)
        assert server.requests == 4
        server.reset_counters()
        with make(server, tmp_path) as src:
            second = src.fetch(cells)
            assert src.stats.requests == 0 and src.stats.cache_hits == 4
        assert server.requests == 0
        for a, b in zip(first, second):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        with make(server, tmp_path, footprint_m=1280.0) as src:  # another box: another request
            src.fetch(cells[:1])
        assert server.requests == 1


def test_transient_errors_are_retried(tmp_path):
    cell = (40.0, -83.0)
    with WMSServer(faults={cell: ["500", "503", "truncated", "garbage"]}) as server, \
            make(server, tmp_path) as src:
        (patch,) = src.fetch([cell])
        assert patch is not None and server.requests == 5
        assert src.stats.retries == 4 and src.stats.failures == 0 and src.stats.fetched == 1


@pytest.mark.parametrize("fault", ["404", "blank", "transparent"])
def test_absent_imagery_is_missing_counted_and_remembered(tmp_path, fault):
    cell, other = (40.0, -83.0), (10.0, 10.0)
    with WMSServer(faults={cell: fault}) as server:
        with make(server, tmp_path) as src:
            patches, failed = src.fetch_status([cell, other])
            assert patches[0] is None and patches[1] is not None and failed == [False, False]
            assert src.stats.not_found == 1 and src.stats.cells_missing == 1 and src.stats.retries == 0
        server.reset_counters()
        with make(server, tmp_path) as src:
            assert src.fetch([cell])[0] is None
        assert server.requests == 0  # cached as absent


def test_still_failing_is_failed_not_cached_and_retried_by_a_rerun(tmp_path):
    cell = (40.0, -83.0)
    with WMSServer(faults={cell: "503"}) as server:
        with make(server, tmp_path, retries=1) as src:
            patches, failed = src.fetch_status([cell, (10.0, 10.0)])
            assert patches[0] is None and failed == [True, False]
            assert src.stats.failures == 1 and src.stats.retries == 1 and src.stats.cells_failed == 1
        server.faults = {}
        server.reset_counters()
        with make(server, tmp_path) as src:
            assert src.fetch([cell])[0] is not None
        assert server.requests == 1


def test_wrong_size_answer_is_not_a_patch(tmp_path):
    cell = (40.0, -83.0)
    with WMSServer(faults={cell: "wrongsize"}) as server, make(server, tmp_path, retries=1) as src:
        patches, failed = src.fetch_status([cell])
        assert patches == [None] and failed == [True] and server.requests == 2


def test_service_exception_is_one_line(tmp_path):
    with WMSServer(faults={(40.0, -83.0): "exception"}) as server, make(server, tmp_path) as src:
        with pytest.raises(TaxamapError, match="refused the GetMap request .*Invalid layer") as info:
            src.fetch([[40.0, -83.0]])
        assert "\n" not in str(info.value)
    # A layer the server does not have: its own check answers with a ServiceException.
    with WMSServer() as server, make(server, tmp_path, layer="s2cloudless-2099") as src:
        with pytest.raises(TaxamapError, match="layers='s2cloudless-2099'"):
            src.fetch([[40.0, -83.0]])


def test_dead_server_stops_the_run_with_one_line(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: every connection is refused
    src = WMSSource(f"http://127.0.0.1:{port}/wms", cache_dir=tmp_path, workers=2, retries=1,
                    **{k: v for k, v in FAST.items() if k != "retries"})
    cells = np.column_stack([np.linspace(-50, 50, 20), np.linspace(-100, 100, 20)])
    with src, pytest.raises(TaxamapError, match="no satellite patches could be fetched"):
        src.fetch(cells)


def test_stalled_server_ends_in_one_wave_of_timeouts(tmp_path):
    """A WMS that accepts and never answers: the breaker stops after the first wave of timeouts,
    one line naming the server, instead of every cell's retries."""
    from tests.helpers.stallserver import StallServer

    cells = np.column_stack([np.linspace(-50, 50, 40), np.linspace(-100, 100, 40)])
    with StallServer() as stall:
        with WMSSource(stall.url + "/wms", cache_dir=tmp_path, workers=8, timeout=(1.0, 0.3),
                       backoff=0.001) as src:
            with pytest.raises(TaxamapError, match="no satellite patches could be fetched") as info:
                src.fetch(cells)
        # One wave of 8 timeouts (two at most), not 40 cells x their retries.
        assert stall.accepted <= 16 and stall.host in str(info.value)
        assert "not answering" in str(info.value) and "\n" not in str(info.value)


def test_concurrency_is_bounded_by_workers(tmp_path):
    rng = np.random.default_rng(0)
    cells = np.column_stack([rng.uniform(-60, 60, 12), rng.uniform(-170, 170, 12)])
    with WMSServer(latency=0.05) as server, make(server, tmp_path, workers=3) as src:
        assert all(p is not None for p in src.fetch(cells))
        assert 2 <= server.max_concurrent <= 3


def test_pole_cell_sends_nothing(tmp_path):
    with WMSServer() as server, make(server, tmp_path) as src:
        assert src.fetch([[89.999, 0.0]]) == [None] and server.requests == 0


def test_predict_default_satellite_is_the_training_request(tmp_path, models_dir, monkeypatch):
    """A map with the satellite modality and no --sat-source: every request is the training one,
    one per cell, and the GeoTIFF says what the modality saw."""
    import taxamap

    with WMSServer() as server:
        ds = taxamap.predict(species="Cardinalis cardinalis", bbox="-83,40,-82.6,40.2",
                             resolution=0.1, modalities=["location", "satellite"],
                             models=models_dir, sat_url=server.url, workers=4,
                             cache=tmp_path / "cache", progress=False)
        paths = taxamap.write(ds, out=tmp_path / "o", formats=("tif",))
        n_cells = int(ds["fused"].notnull().sum())
        assert server.errors == [] and server.requests == n_cells == 8
    with rasterio.open(paths["cardinalis-cardinalis.tif"]) as ds:
        tags = ds.tags()
        sat = ds.read(3)
        lon, lat = ds.xy(0, 0)
    assert np.isfinite(sat).all()
    source = json.loads(tags["SATELLITE_SOURCE"])
    assert source["kind"] == "wms" and source["layers"] == "s2cloudless-2020"
    assert tags["SATELLITE_FOOTPRINT_M"] == "2560" and tags["SATELLITE_SIZE_PX"] == "256"
    assert "s2maps.eu" in tags["IMAGERY_ATTRIBUTION"]
    # The box of the first cell centre (lat/lon of the GeoTIFF's pixel centre) was requested.
    from taxamap.sources.footprint import footprint

    box = footprint(lat, lon).bbox
    assert any(max(abs(a - b) for a, b in zip(box, sent)) < 1e-9 for sent in server.bboxes)
    half_lon = 1280 / (111320 * math.cos(math.radians(lat)))
    assert box[2] - box[0] == pytest.approx(2 * half_lon, rel=0.01)


def test_answers_are_validated_before_use():
    """Every chunk's CRC is checked (a flipped byte, a cut body, another size are refused); real
    imagery is handed on undecoded, small answers are checked for blankness."""
    from taxamap.sources.wms import decode_answer
    from tests.helpers.wmsserver import png, texture

    body = png(texture(256))
    kind, img = decode_answer(body, (256, 256))
    assert kind == "image" and img.size == (256, 256) and np.asarray(img).shape == (256, 256, 3)
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0x40
    for bad in (bytes(damaged), body[:-6], body[: len(body) // 3]):
        with pytest.raises(ValueError, match="PNG"):
            decode_answer(bad, (256, 256))
    with pytest.raises(ValueError, match="asked for 128x128"):
        decode_answer(body, (128, 128))
    grey = png(np.full((256, 256, 3), 17, np.uint8))
    assert decode_answer(grey, (256, 256)) == ("blank", None)
