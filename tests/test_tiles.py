"""XYZ tile source and tile cache against a real loopback tile server (tests/tileserver.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from taxamap.errors import TaxamapError
from taxamap.sources.cache import cache_clear, cache_info, source_id
from taxamap.sources.satellite import SatelliteSource, make_satellite_source
from taxamap.sources.tiles import DEFAULT_URL, EOX_LICENSE, XYZTileSource
from tests.helpers.tileserver import TileServer

FAST = dict(backoff=0.001, max_backoff=0.01, timeout=(2.0, 2.0))


def world_pixel(lat: float, lon: float, zoom: int, tile: int = 256) -> tuple[float, float]:
    """Slippy-map pixel coordinates from the textbook formula (independent of taxamap's code)."""
    n = tile * 2**zoom
    x = (lon + 180.0) / 360.0 * n
    y = (1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n
    return x, y


def expected_patch(server: TileServer, lat: float, lon: float, zoom: int, size: int) -> np.ndarray:
    """Cut the patch pixel by pixel from the decoded tiles the server sends."""
    gx, gy = world_pixel(lat, lon, zoom)
    x0, y0 = math.floor(gx - size / 2 + 0.5), math.floor(gy - size / 2 + 0.5)
    n = 2**zoom
    out = np.zeros((size, size, 3), np.uint8)
    tiles: dict = {}
    for r in range(size):
        py = y0 + r
        for c in range(size):
            px = x0 + c
            key = ((px // 256) % n, py // 256)
            if key not in tiles:
                tiles[key] = server.tile_image(zoom, *key)
            out[r, c] = tiles[key][py % 256, px % 256]
    return out


def make_source(server: TileServer, tmp_path, **kw) -> XYZTileSource:
    # footprint_m=None: native tile pixels, so patches can be compared with the tiles bit for bit.
    opts = dict(zoom=8, size=256, footprint_m=None, cache_dir=tmp_path / "cache", workers=4, **FAST)
    opts.update(kw)
    return XYZTileSource(server.url_template, **opts)


@pytest.mark.parametrize(
    "lat, lon, size",
    [(40.123, -83.456, 256), (-12.5, 130.77, 320), (0.3, 0.3, 64), (10.0, 179.99, 256)],
)
def test_patch_is_centred_mosaic_of_tiles(tmp_path, lat, lon, size):
    with TileServer() as server, make_source(server, tmp_path, size=size) as src:
        (patch,) = src.fetch(np.array([[lat, lon]]))
        assert patch is not None and patch.mode == "RGB" and patch.size == (size, size)
        np.testing.assert_array_equal(np.asarray(patch), expected_patch(server, lat, lon, 8, size))


def test_patch_straddling_four_tiles_fetches_each_once(tmp_path):
    # A point exactly on a tile corner at zoom 8: the patch takes a quarter of four tiles.
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 100 / 256))))
    lon = 77 / 256 * 360 - 180
    with TileServer() as server, make_source(server, tmp_path) as src:
        out = src.fetch(np.array([[lat, lon], [lat, lon]]))
        assert sorted(server.by_tile) == ["8/76/100", "8/76/99", "8/77/100", "8/77/99"]
        assert server.requests == 4  # shared tiles are fetched once for both cells
        patch = np.asarray(out[0])
        np.testing.assert_array_equal(patch[:128, :128], server.tile_image(8, 76, 99)[128:, 128:])
        np.testing.assert_array_equal(patch[128:, 128:], server.tile_image(8, 77, 100)[:128, :128])


def test_500_then_ok_is_retried(tmp_path):
    with TileServer(faults={"8/76/99": ["500", "503"]}) as server, make_source(server, tmp_path, size=64) as src:
        lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 99.5 / 256))))
        lon = 76.5 / 256 * 360 - 180
        (patch,) = src.fetch([[lat, lon]])
        assert patch is not None
        assert server.by_tile["8/76/99"] == 3
        assert src.stats.retries == 2 and src.stats.failures == 0


def test_429_retry_after_is_honoured(tmp_path):
    with TileServer(faults={"8/76/99": ["429"]}, retry_after=1) as server, \
            make_source(server, tmp_path, size=64) as src:
        lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 99.5 / 256))))
        (patch,) = src.fetch([[lat, 76.5 / 256 * 360 - 180]])
        assert patch is not None
        first, second = server.times["8/76/99"]
        assert second - first >= 0.95  # waited the server's Retry-After, not the 1 ms backoff


@pytest.mark.parametrize("fault", ["truncated", "garbage"])
def test_bad_body_is_retried_and_never_cached(tmp_path, fault):
    with TileServer(faults={"8/76/99": [fault]}) as server, make_source(server, tmp_path, size=64) as src:
        lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 99.5 / 256))))
        (patch,) = src.fetch([[lat, 76.5 / 256 * 360 - 180]])
        assert patch is not None and server.by_tile["8/76/99"] == 2
        assert server.faults_served[fault] == 1
        np.testing.assert_array_equal(np.asarray(patch), expected_patch(server, lat, 76.5 / 256 * 360 - 180, 8, 64))


def test_404_is_none_without_retry_and_remembered(tmp_path):
    # One of the four tiles is missing: the cell is None, its neighbour (other tiles) is not.
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 100 / 256))))
    lon = 77 / 256 * 360 - 180
    far = [lat - 20.0, lon + 20.0]
    with TileServer(faults={"8/77/100": "404"}) as server, make_source(server, tmp_path) as src:
        out = src.fetch([[lat, lon], far])
        assert out[0] is None and out[1] is not None
        assert server.by_tile["8/77/100"] == 1
        assert src.stats.not_found == 1 and src.stats.retries == 0 and src.stats.cells_missing == 1
        before = server.requests
        again = src.fetch([[lat, lon], far])
        assert again[0] is None and server.requests == before  # the 404 is cached too


def test_stall_times_out_and_masks_the_cell_after_retries(tmp_path):
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 99.5 / 256))))
    lon = 76.5 / 256 * 360 - 180
    with TileServer(faults={"8/76/99": "stall"}, stall=30.0) as server, \
            make_source(server, tmp_path, size=64, retries=2, timeout=(1.0, 0.2)) as src:
        (patch,) = src.fetch([[lat, lon]])
        assert patch is None
        assert server.by_tile["8/76/99"] == 3
        # Each attempt ended on the client's 0.2 s read timeout: it hung up while the server was
        # still stalling (30 s), and no attempt got an answer. (The server's handler notices the
        # last hang-up a moment after fetch returns: wait for it, however busy the machine.)
        assert server.wait_idle()
        assert server.abandoned["8/76/99"] == 3
        assert src.stats.failures == 1 and src.stats.retries == 2
        # A failure is not cached: the next run asks again.
        src.fetch([[lat, lon]])
        assert server.by_tile["8/76/99"] >= 4


def test_concurrency_never_exceeds_workers(tmp_path):
    rng = np.random.default_rng(0)
    cells = np.column_stack([rng.uniform(-60, 60, 12), rng.uniform(-170, 170, 12)])
    with TileServer(latency=0.05) as server, make_source(server, tmp_path, workers=3, zoom=10) as src:
        out = src.fetch(cells)
        assert all(p is not None for p in out)
        assert server.requests >= 12
        assert 2 <= server.max_concurrent <= 3


def test_second_run_makes_zero_requests_and_shares_the_cache(tmp_path):
    cells = np.array([[40.0, -83.0], [41.0, -82.0], [-33.9, 18.4]])
    with TileServer() as server:
        with make_source(server, tmp_path) as src:
            first = src.fetch(cells)
        assert server.requests > 0
        server.reset_counters()
        with make_source(server, tmp_path) as src:  # a new run on the same cache folder
            second = src.fetch(cells)
            assert src.stats.cache_hits > 0 and src.stats.requests == 0
        assert server.requests == 0
        for a, b in zip(first, second):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_cache_entry_is_refetched(tmp_path):
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 99.5 / 256))))
    lon = 76.5 / 256 * 360 - 180
    with TileServer() as server:
        with make_source(server, tmp_path, size=64) as src:
            src.fetch([[lat, lon]])
            entry = src.cache.dir / "8" / "76" / "99.img"
        good = entry.read_bytes()
        entry.write_bytes(good[: len(good) // 3])  # a half-written file from some crash
        server.reset_counters()
        with make_source(server, tmp_path, size=64) as src:
            (patch,) = src.fetch([[lat, lon]])
        assert patch is not None and server.by_tile["8/76/99"] == 1
        assert entry.read_bytes() == good


def test_cache_info_and_clear(tmp_path):
    cache = tmp_path / "cache"
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * 100 / 256))))
    lon = 77 / 256 * 360 - 180
    with TileServer(faults={"8/77/100": "404"}) as server:
        with make_source(server, tmp_path) as src:
            src.fetch([[lat, lon]])
        info = cache_info(cache)
        assert info["entries"] == 3 and info["missing"] == 1 and info["bytes"] > 0
        (row,) = info["sources"]
        assert row["id"] == source_id(server.url_template) and row["label"] == server.url_template
        # A second source in the same cache, then clear one of them by template.
        with TileServer(fmt="png") as png_server, make_source(png_server, tmp_path, size=64) as src3:
            src3.fetch([[10.0, 10.0]])
            assert len(cache_info(cache)["sources"]) == 2
            assert cache_clear(cache, source=server.url_template) == 4
            info = cache_info(cache)
            assert [s["label"] for s in info["sources"]] == [png_server.url_template]
            with pytest.raises(TaxamapError, match="cache info"):
                cache_clear(cache, source="http://nowhere/{z}/{x}/{y}.png")
            assert cache_clear(cache) == info["entries"] + info["missing"] > 0
        assert cache_info(cache)["entries"] == 0
        assert cache_info(tmp_path / "never")["sources"] == []


def test_fail_fast_when_nothing_can_be_fetched(tmp_path):
    with TileServer(faults={}, fault_rate=1.0, rate_faults=("503",)) as server, \
            make_source(server, tmp_path, retries=0, fail_fast_after=4) as src:
        cells = np.column_stack([np.linspace(-50, 50, 10), np.linspace(-100, 100, 10)])
        with pytest.raises(TaxamapError, match="no satellite tile"):
            src.fetch(cells)


def test_user_agent_and_pool(tmp_path):
    with TileServer() as server, make_source(server, tmp_path) as src:
        src.fetch([[1.0, 1.0]])
        (agent,) = server.user_agents
        assert agent.startswith("taxamap/")


def test_template_checks_and_defaults(tmp_path):
    with pytest.raises(TaxamapError, match=r"\{z\}"):
        XYZTileSource("https://example.org/tiles/{z}/{x}.png", cache=False)
    with pytest.raises(TaxamapError, match="http"):
        XYZTileSource("ftp://example.org/{z}/{x}/{y}.png", cache=False)
    src = make_satellite_source("xyz", cache_dir=tmp_path)  # no request is made by construction
    assert isinstance(src, SatelliteSource)
    assert src.url == DEFAULT_URL and "{y}/{x}" in DEFAULT_URL
    assert src.license == EOX_LICENSE and "EOX" in src.attribution and "2020" in src.attribution
    # The default is TaxaBind's footprint (2,560 m, 256 px) with the zoom chosen per cell.
    assert src.describe() == {"kind": "xyz", "url": DEFAULT_URL, "zoom": "auto", "size": 256, "tile_size": 256,
                              "footprint_m": 2560.0, "max_zoom": 19, "resampling": "triangle"}
    custom = make_satellite_source("xyz", url="https://example.org/{z}/{x}/{y}.png", zoom=12, size=128,
                                   cache_dir=tmp_path)
    assert custom.attribution is None and custom.license is None and custom.describe()["zoom"] == 12
    assert custom.tile_url(3, 1, 2) == "https://example.org/3/1/2.png"
    tms = XYZTileSource("https://{s}.example.org/{z}/{x}/{-y}.png", cache=False)
    assert tms.tile_url(3, 1, 2) in {f"https://{s}.example.org/3/1/5.png" for s in "abc"}
    with pytest.raises(TaxamapError, match="unknown satellite source"):
        make_satellite_source("sentinel")
    with pytest.raises(TaxamapError, match="--sat-zoom applies to --sat-source xyz only"):
        make_satellite_source("wms", zoom=14, cache_dir=tmp_path)
    with pytest.raises(TaxamapError, match="--sat-file"):
        make_satellite_source("file")
    with pytest.raises(TaxamapError, match="--workers"):
        make_satellite_source("xyz", workers=0, cache_dir=tmp_path)


def test_unwritable_cache_is_one_clear_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with TileServer() as server, make_source(server, tmp_path) as src:
        with pytest.raises(TaxamapError, match="cannot write the tile cache"):
            src.fetch([[1.0, 1.0]])


def test_concurrent_fetch_calls_share_tiles(tmp_path):
    import threading

    cells = np.column_stack([np.linspace(40, 40.2, 30), np.linspace(-83, -82.8, 30)])
    with TileServer(latency=0.01) as server, make_source(server, tmp_path, zoom=9, workers=3) as src:
        results = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, src.fetch(cells))) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert len(results) == 3 and all(p is not None for r in results.values() for p in r)
        assert max(server.by_tile.values()) == 1  # no tile requested twice across the calls
        # Cache hits finish before their callbacks are attached: must not deadlock either.
        again = src.fetch(cells)
        assert all(p is not None for p in again)


def test_stalled_server_trips_the_breaker(tmp_path):
    from taxamap.http import CircuitOpen
    from tests.helpers.stallserver import StallServer

    cells = np.column_stack([np.linspace(-50, 50, 40), np.linspace(-100, 100, 40)])
    with StallServer() as stall:
        host = stall.host
        src = XYZTileSource(stall.url + "/tiles/{z}/{x}/{y}.png", zoom=8, size=256,
                            cache_dir=tmp_path / "cache", workers=4, backoff=0.001,
                            timeout=(1.0, 0.3))
        with pytest.raises(CircuitOpen) as err:
            src.fetch(cells)
        src.close()
        # Two waves of 4 timeouts open it (8 first requests, none answered), not 40 cells x 5 tries.
        assert stall.accepted <= 12
    message = str(err.value)
    assert host in message and "not answering" in message and "\n" not in message
    assert err.value.host == host and src.breaker.is_open
    with pytest.raises(CircuitOpen):  # stays open: nothing more is sent
        src.fetch(cells[:1])


def test_breaker_rules():
    from taxamap.http import CircuitBreaker, CircuitOpen

    first = CircuitBreaker("tiles", first=3, consecutive=5, settle=0)
    for _ in range(2):
        first.failure("h:1", "ReadTimeoutError")
    first.check()  # two of the first three: not yet
    first.failure("h:1", "ReadTimeoutError")
    with pytest.raises(CircuitOpen, match="no tiles could be fetched: the server h:1 is not answering"):
        first.check()
    later = CircuitBreaker("tiles", first=3, consecutive=5, settle=0)
    later.success()
    for _ in range(4):
        later.failure("h:2", "HTTP 503", answered=True)
    later.success()  # an answer resets the run of failures
    for _ in range(4):
        later.failure("h:2", "HTTP 503", answered=True)
    later.check()
    later.failure("h:2", "HTTP 503", answered=True)
    with pytest.raises(CircuitOpen, match="tiles stopped coming: the server h:2 keeps failing"):
        later.check()


def test_server_error_storm_trips_the_breaker_between_retries(tmp_path):
    from taxamap.http import CircuitOpen

    cells = np.column_stack([np.linspace(-50, 50, 20), np.linspace(-100, 100, 20)])
    with TileServer(faults={}, fault_rate=1.0, rate_faults=("503",)) as server, \
            make_source(server, tmp_path, retries=3, fail_fast_after=6, workers=2) as src:
        with pytest.raises(CircuitOpen, match="keeps failing .*HTTP 503"):
            src.fetch(cells)
        assert server.requests <= 6 + 2  # stopped mid-retries; the pool was not left stuck
