"""Map tiles for any species: ``GET /tiles/{query}/{z}/{x}/{y}.png`` (issue 21).

A tile's pixels are the map's cells it covers (finest level) or the exact mean of them (a coarse
pyramid level); a session that does not hold its cells in memory scores a tile's cells from the
stores and gives the same values; bad zooms, out-of-range tiles and malformed queries get 4xx.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from taxamap.options import MapOptions
from taxamap.serve.tiles import TILE_SIZE, TileScorer, tile_box
from taxamap.session import MapSession
from tests.helpers.serveserver import SPECIES, ServeServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

#: 300 columns at 0.1 deg: wider than a tile, so the grid gets one coarser level (2x).
WIDE_BBOX = (-100.0, 33.0, -70.0, 45.0)


def _options(models_dir, cache) -> MapOptions:
    return MapOptions(bbox=WIDE_BBOX, resolution=0.1, models=models_dir, cache=cache,
                      progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiles-cache")


@pytest.fixture(scope="module")
def in_memory(models_dir, cache):
    return MapSession(_options(models_dir, cache), in_memory=True)


@pytest.fixture(scope="module")
def from_disk(models_dir, cache, in_memory):
    session = MapSession(_options(models_dir, cache), in_memory=False)
    assert not session.scorer.in_memory
    return session


@pytest.fixture(scope="module")
def rasters(in_memory, from_disk):
    """Each session's own fused map: the in-memory session scores float16 cells (within the
    compact bound of the stores' float32 scores), the other scores the stores themselves."""
    return {"in_memory": np.asarray(in_memory.predict(species=SPECIES)["fused"].values),
            "from_disk": np.asarray(from_disk.predict(species=SPECIES)["fused"].values)}


def _tile_xy(lat: float, lon: float, z: int) -> tuple[int, int]:
    n = 2 ** z
    x = int((lon + 180.0) / 360.0 * n)
    y = int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n)
    return x, y


def _expected(raster: np.ndarray, grid, z: int, x: int, y: int, factor: int) -> np.ndarray:
    """The tile as the full map says: the value of the cell under each pixel, or the mean of the
    finite fine cells of the coarse cell under it."""
    box = tile_box(z, x, y)
    out = np.full((TILE_SIZE, TILE_SIZE), np.nan)
    for i, lat in enumerate(box.lats):
        for j, lon in enumerate(box.lons):
            row = int(math.floor((grid.north - lat) / (grid.resolution * factor)))
            col = int(math.floor((lon - grid.west) / (grid.resolution * factor)))
            if row < 0 or col < 0:
                continue
            block = raster[row * factor:(row + 1) * factor, col * factor:(col + 1) * factor]
            block = block[np.isfinite(block)]
            if block.size:
                out[i, j] = block.mean()
    return out


def test_zoom_picks_the_coarsest_level_no_larger_than_a_pixel(in_memory):
    tiler = TileScorer(in_memory)
    assert tiler.factors == [1, 2]
    assert tiler.factor_for(2) == 2  # 0.35 deg pixels: 0.2 deg cells
    assert tiler.factor_for(3) == 1  # 0.18 deg pixels: the grid's own 0.1 deg cells
    assert tiler.factor_for(12) == 1


@pytest.mark.parametrize("which", ["in_memory", "from_disk"])
@pytest.mark.parametrize("z, factor", [(7, 1), (2, 2)])
def test_tile_is_the_map_cells_or_their_exact_mean(request, rasters, which, z, factor):
    """Zoom 7 shows the grid's own cells, zoom 2 the 2x level: each pixel is the mean of the
    finite fine cells under its coarse cell, exactly (float32 rounding aside). The fine level
    is the session's own map; coarse levels come from the pyramid's float32 means, whatever
    the session holds, so they are the means of the stores' float32 scores."""
    session = request.getfixturevalue(which)
    raster = rasters[which] if factor == 1 else rasters["from_disk"]
    tiler = TileScorer(session)
    x, y = _tile_xy(40.0, -83.0, z)
    got = tiler.tile(session.embed(SPECIES).query.vector, "fused", z, x, y)
    want = _expected(raster, session.grid, z, x, y, factor)
    finite = np.isfinite(want)
    assert finite.sum() > 100
    assert np.array_equal(np.isfinite(got), finite)
    assert np.allclose(got[finite], want[finite], atol=1e-5 if factor > 1 else 2e-6)
    if factor > 1:  # a coarse mean is not any single fine cell's value: the level averages
        assert not np.isin(got[finite], raster[np.isfinite(raster)]).all()


@pytest.fixture(scope="module")
def client(from_disk):
    with ServeServer(from_disk) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        c.service = server.service
        yield c


def _rgba(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def test_tiled_session_maps_as_tiles(client):
    health = client.get("/api/health").json()
    assert health["tiles"] is True and health["cells"] > 0
    answer = client.get("/api/map", params={"species": SPECIES}).json()
    assert answer["overlay"] is None
    assert answer["tiles"].startswith("/tiles/Cardinalis%20cardinalis/{z}/{x}/{y}.png?")
    x, y = _tile_xy(40.0, -83.0, 6)
    url = answer["tiles"].replace("{z}", "6").replace("{x}", str(x)).replace("{y}", str(y))
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    rgba = _rgba(response.content)
    assert rgba.shape == (256, 256, 4) and (rgba[..., 3] > 0).sum() > 1000
    hits = client.service._tiles.cache_info().hits
    assert client.get(url).content == response.content
    assert client.service._tiles.cache_info().hits == hits + 1
    x, y = _tile_xy(0.0, -150.0, 6)  # the Pacific: no cell, a transparent tile
    empty = _rgba(client.get(f"/tiles/{SPECIES}/6/{x}/{y}.png").content)
    assert (empty[..., 3] == 0).all()


def test_cell_of_a_tiled_session_is_scored_from_the_stores(client, from_disk):
    got = client.get("/api/cell", params={"species": SPECIES, "lat": 40.05, "lon": -83.05}).json()
    ds = from_disk.predict(species=SPECIES)
    row, col = from_disk.cell_at(40.05, -83.05)
    assert got["scores"]["fused"] == pytest.approx(float(ds["fused"].values[row, col]), abs=2e-6)


@pytest.mark.parametrize("path, status, words", [
    ("/tiles/Cardinalis%20cardinalis/23/0/0.png", 400, "zoom must be 0 to 22"),
    ("/tiles/Cardinalis%20cardinalis/2/4/1.png", 400, "out of range"),
    ("/tiles/Cardinalis%20cardinalis/2/1/-1.png", 400, "whole number"),
    ("/tiles/Cardinalis%20cardinalis/z/1/1.png", 400, "whole number"),
    ("/tiles/Cardinalis%20cardinalis/2/1/1.png?band=nope", 400, "band must be one of"),
    ("/tiles/Zzyzx%20notaspecies/2/1/1.png", 404, "unknown species"),
    ("/tiles/" + "a" * 300 + "/2/1/1.png", 400, "longer than"),
    ("/tiles/bad%01name/2/1/1.png", 400, "control characters"),
    ("/tiles/0123456789abcdef01234567/2/1/1.png", 404, "upload"),
    ("/tiles/..%2F..%2Fetc%2Fpasswd/2/1/1.png", 404, "no such page"),
])
def test_bad_tile_requests_get_4xx_json(client, path, status, words):
    response = client.get(path)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
