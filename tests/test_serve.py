"""``taxamap serve`` over HTTP: a real uvicorn server on 127.0.0.1 (started here, in a thread)
serving a map session over a small bbox with tiny models, offline. Every endpoint of the
DESIGN.md contract, checked against the library's own answers (taxamap.predict, the writers'
overlay helpers, taxamap.threshold), and every error path: unknown species, empty queries,
points outside the grid, wrong and oversize uploads, path-traversal strings in every parameter,
malformed requests (the server must stay up)."""

from __future__ import annotations

import io
import math
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import taxamap  # noqa: E402
from taxamap.errors import TaxamapError  # noqa: E402
from tests.helpers.bombs import png_bomb  # noqa: E402
from tests.helpers.serveserver import (  # noqa: E402
    BBOX, PROMPT, SPECIES, ServeProcess, ServeServer, open_satellite_session, open_test_session)

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 256 * 1024  # the test server's upload limit (the default is 20 MB)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-cache")


@pytest.fixture(scope="module")
def session(models_dir, cache):
    return open_test_session(models_dir, cache)


@pytest.fixture(scope="module")
def server(session):
    with ServeServer(session, max_upload=LIMIT) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oneshot(models_dir, cache):
    """What taxamap.predict (the library's one-shot path, float32 from disk) makes of the same
    query."""
    return taxamap.predict(species=SPECIES, bbox=BBOX, resolution=0.1, models=models_dir,
                           cache=cache, progress=False)


@pytest.fixture(scope="module")
def reference(session):
    """What the library's session (float16 cells, the server's engine) makes of the same query:
    the server's answers must be exactly these."""
    return session.predict(species=SPECIES)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("photo") / "bird.jpg"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


# ------------------------------------------------------------------ the session (library API)

def test_session_predict_equals_taxamap_predict(session, oneshot):
    reference = oneshot
    ds = session.predict(species=SPECIES)
    assert list(ds.data_vars) == list(reference.data_vars) == ["fused", "location"]
    # The session scores float16 cells (mapped from the store): within the compact bound.
    np.testing.assert_allclose(ds["fused"].values, reference["fused"].values, atol=2e-3,
                               equal_nan=True)
    assert ds.attrs["prompt"] == PROMPT and ds.attrs["query"] == SPECIES
    assert ds.rio.transform() == reference.rio.transform()
    assert ds.attrs["models"] == reference.attrs["models"]
    assert session.predict(species=SPECIES.upper()) is session.predict(species=SPECIES)  # cached


def test_session_maps_are_identical_to_predicts(session, models_dir, cache):
    import xarray as xr

    session.predict(species=SPECIES)  # the first map; later ones are made like it
    for name in ("Cyanocitta cristata", "Poecile atricapillus"):
        ours = session.predict(species=name)
        theirs = taxamap.predict(species=name, bbox=BBOX, resolution=0.1, models=models_dir,
                                 cache=cache, progress=False)
        assert ours.attrs["created"] and theirs.attrs["created"]
        # Same values (the session scores float16 cells: within the compact bound) ...
        # (``created`` is each map's own time: it may fall on either side of a second)
        timeless = [d.copy() for d in (ours, theirs)]
        for d in timeless:
            d.attrs.pop("created")
        xr.testing.assert_allclose(*timeless, rtol=0, atol=2e-3)
        # ... and the same contract: coords (spatial_ref included), attrs, variable attrs.
        xr.testing.assert_identical(ours.coords.to_dataset(), theirs.coords.to_dataset())
        assert list(ours.data_vars) == list(theirs.data_vars)
        assert ({k: v for k, v in ours.attrs.items() if k != "created"}
                == {k: v for k, v in theirs.attrs.items() if k != "created"})
        for var in ours.data_vars:
            a, b = ours[var].attrs, theirs[var].attrs
            assert a.keys() == b.keys()
            assert all(a[k] == b[k] or (np.isnan(a[k]) and np.isnan(b[k])) for k in a)
            assert ours[var].rio.nodata is not None and np.isnan(ours[var].rio.nodata)
        assert ours.rio.crs == theirs.rio.crs and ours.rio.transform() == theirs.rio.transform()


def test_session_holds_no_float32_copy_of_the_cells(session):
    import torch

    scorer = session.scorer
    n, dim = session.n_cells, session.cells.stores["location"].dim
    # The cells are the store's float16 chunk files, mapped; the process holds their row
    # lengths only (a float32 copy would be n * dim * 4 bytes).
    assert scorer.mapped_bytes == n * dim * 2
    assert session.memory_bytes == scorer.memory_bytes == n * 4
    assert scorer.held_dtypes() == {torch.float16, np.dtype(np.float32)}


def test_session_several_species_and_cells(session):
    both = session.predict(species=[SPECIES, "Cyanocitta cristata"])
    assert both["fused"].dims == ("species", "y", "x")
    assert list(both["species"].values) == [SPECIES, "Cyanocitta cristata"]
    assert session.cell_at(40.05, -82.95) == (9, 10)
    assert session.cell_at(40.05, -82.95 + 360.0) == (9, 10)
    assert session.cell_at(41.5, -83.0) is None and session.cell_at(float("nan"), 0) is None
    with pytest.raises(TaxamapError, match="exactly one query"):
        session.predict()
    with pytest.raises(TaxamapError, match="empty species"):
        session.embed("   ")
    assert session.n_cells == 400 and session.bands == ["fused", "location"]


def test_open_session_is_lazy_public_api():
    assert "open_session" in dir(taxamap) and callable(taxamap.open_session)


# ------------------------------------------------------------------ endpoints

def test_health(client, session):
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["cells"] == 400
    assert body["modalities"] == ["location"] and body["region"] == session.region.name
    assert body["bounds"] == [[39.0, -84.0], [41.0, -82.0]]


def test_page_and_offline_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="species"', 'id="map"', 'id="status"', 'id="threshold"', 'id="cell"'):
        assert element in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("https://tile", "")  # no CDN: Leaflet is local
    leaflet = client.get("/lib/leaflet/leaflet.js")
    assert leaflet.status_code == 200 and "Leaflet" in leaflet.text[:2000]
    assert client.get("/lib/leaflet/leaflet.css").status_code == 200
    assert client.get("/static/app.js").status_code == 200


def test_search_suggests_from_the_shipped_table(client):
    hits = client.get("/api/search", params={"q": "cardinalis"}).json()
    assert hits[0] == {"name": SPECIES, "prompt": PROMPT, "common": "Northern Cardinal"}
    assert all(set(h) >= {"name", "prompt"} for h in hits)
    many = client.get("/api/search", params={"q": "a"}).json()
    assert len(many) == 20
    assert client.get("/api/search", params={"q": "northern card"}).json()[0]["name"] == SPECIES
    assert client.get("/api/search", params={"q": ""}).json() == []
    assert client.get("/api/search").json() == []


def test_map_answer_matches_the_library(client, reference, session):
    from PIL import Image

    from taxamap.writers.html import overlay_rgba
    from taxamap.writers.style import stretch_of

    body = client.get("/api/map", params={"species": SPECIES}).json()
    assert body["query"] == SPECIES and body["prompt"] == PROMPT
    assert body["bounds"] == [[pytest.approx(39.0), -84.0], [pytest.approx(41.0), -82.0]]
    assert set(body["bands"]) == {"fused", "location"}
    fused = reference["fused"].values
    valid = fused[np.isfinite(fused)]
    assert body["bands"]["fused"]["min"] == pytest.approx(float(valid.min()), abs=1e-6)
    assert body["bands"]["fused"]["max"] == pytest.approx(float(valid.max()), abs=1e-6)
    assert body["bands"]["fused"]["mean"] == pytest.approx(float(valid.mean()), abs=1e-6)
    assert body["elapsed_ms"] >= 0
    png = client.get(body["overlay"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(png.content)))
    expected, bounds = overlay_rgba(fused, session.grid, stretch_of(fused))
    np.testing.assert_array_equal(pixels, expected)
    assert body["bounds"] == [[pytest.approx(v) for v in p] for p in bounds]


def test_map_band_and_stretch(client, reference):
    body = client.get("/api/map", params={"species": SPECIES, "band": "location",
                                          "stretch": "50"}).json()
    assert body["band"] == "location"
    values = reference["location"].values
    assert body["stretch"]["vmin"] == pytest.approx(
        float(np.percentile(values[np.isfinite(values)], 50)), abs=1e-6)
    assert "band=location" in body["overlay"] and "stretch=50" in body["overlay"]


def test_cell_scores_and_outside(client, reference):
    body = client.get("/api/cell", params={"species": SPECIES, "lat": 40.0, "lon": -83.0}).json()
    row = int(np.argmin(np.abs(reference["y"].values - body["lat"])))
    col = int(np.argmin(np.abs(reference["x"].values - body["lon"])))
    assert (body["lat"], body["lon"]) == (pytest.approx(39.95), pytest.approx(-82.95))
    assert body["scores"]["fused"] == pytest.approx(float(reference["fused"].values[row, col]),
                                                    abs=1e-6)
    wrapped = client.get("/api/cell", params={"species": SPECIES, "lat": 40.0, "lon": 277.0})
    assert wrapped.json()["scores"] == body["scores"]
    for lat, lon in ((45.0, -83.0), (40.0, -90.0), (40.0, 0.0)):
        message = error_of(client.get("/api/cell", params={"species": SPECIES, "lat": lat,
                                                           "lon": lon}), 404)
        assert "no cell" in message
    error_of(client.get("/api/cell", params={"species": SPECIES, "lat": 95, "lon": 0}), 400)
    error_of(client.get("/api/cell", params={"species": SPECIES, "lat": "nan", "lon": 0}), 400)


def test_range_outline_is_taxamap_threshold(client, reference):
    fc = client.get("/api/range", params={"species": SPECIES, "threshold": "percentile:80"}).json()
    cut = taxamap.threshold(reference, "percentile:80")
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(cut.polygons)
    assert fc["n_in_range"] == cut.n_in_range and fc["threshold"] == pytest.approx(cut.threshold)
    assert fc["area_km2"] == pytest.approx(cut.area_km2)
    # A value above every cell is no range: a 400 giving the map's values, not an empty one.
    message = error_of(client.get("/api/range", params={"species": SPECIES,
                                                        "threshold": "value:2"}), 400)
    assert "keeps no cell" in message and "ranges from" in message


def test_range_outline_runs_along_cell_edges(client):
    """The outline the page draws follows the cells' edges exactly (never through a cell)."""
    from tests.helpers.maps import off_cell_edges

    health = client.get("/api/health").json()
    (south, west), (north, east) = health["bounds"]
    fc = client.get("/api/range", params={"species": SPECIES, "threshold": "percentile:70"}).json()
    rings = [ring for f in fc["features"] for ring in f["geometry"]["coordinates"]]
    assert sum(len(r) for r in rings) > 20
    assert off_cell_edges(rings, west, north, health["resolution"]) == 0


def test_downloads_are_what_write_and_threshold_make(client, reference, tmp_path):
    import geopandas as gpd
    import rasterio
    from PIL import Image

    tif = client.get("/api/download", params={"species": SPECIES, "format": "tif"})
    assert tif.status_code == 200
    assert 'filename="cardinalis-cardinalis.tif"' in tif.headers["content-disposition"]
    (tmp_path / "m.tif").write_bytes(tif.content)
    with rasterio.open(tmp_path / "m.tif") as src:
        assert src.count == 2 and src.descriptions == ("fused", "location")
        np.testing.assert_allclose(src.read(1), reference["fused"].values, atol=1e-6,
                                   equal_nan=True)
        assert src.tags()["PROMPT"] == PROMPT
    png = client.get("/api/download", params={"species": SPECIES, "format": "png"})
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).format == "PNG"
    gpkg = client.get("/api/download", params={"species": SPECIES, "format": "gpkg",
                                               "threshold": "percentile:80"})
    assert 'filename="cardinalis-cardinalis_range.gpkg"' in gpkg.headers["content-disposition"]
    (tmp_path / "r.gpkg").write_bytes(gpkg.content)
    frame = gpd.read_file(tmp_path / "r.gpkg")
    cut = taxamap.threshold(reference, "percentile:80")
    assert len(frame) == len(cut.polygons) and frame.crs.to_epsg() == 4326
    assert frame["area_km2"].sum() == pytest.approx(cut.area_km2)
    error_of(client.get("/api/download", params={"species": SPECIES, "format": "exe"}), 400)


def test_downloads_leave_nothing_behind(client, server):
    client.get("/api/download", params={"species": SPECIES, "format": "tif"})
    deadline = time.time() + 5
    while any(server.service.workdir.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    assert list(server.service.workdir.iterdir()) == []


def test_photo_upload_maps_like_predict_image(client, session, photo, models_dir, cache):
    with open(photo, "rb") as fh:
        body = client.post("/api/query", files={"file": ("bird.jpg", fh, "image/jpeg")}).json()
    assert body["query"] == "photo bird.jpg" and body["prompt"] is None
    assert set(body) >= {"bounds", "bands", "overlay", "elapsed_ms", "upload"}
    # The server's answer is its session's (float16 cells) exactly...
    mine = session.predict(image=photo)
    assert body["bands"]["fused"]["mean"] == pytest.approx(
        float(np.nanmean(mine["fused"].values)), abs=1e-6)
    # ...and predict's (float32 from disk) within the compact kernel's bound (a CPU with
    # AVX512-BF16/AMX rounds float16 products otherwise than one without: 1e-5 apart here).
    expected = taxamap.predict(image=photo, bbox=BBOX, resolution=0.1, models=models_dir,
                               cache=cache, progress=False)
    np.testing.assert_allclose(mine["fused"].values, expected["fused"].values, atol=2e-3,
                               equal_nan=True)
    again = client.get("/api/map", params={"upload": body["upload"]}).json()
    assert again["bands"] == body["bands"]
    assert client.get(body["overlay"]).headers["content-type"] == "image/png"
    cell = client.get("/api/cell", params={"upload": body["upload"], "lat": 40, "lon": -83})
    assert cell.status_code == 200
    error_of(client.get("/api/map", params={"upload": "0" * 24}), 404)


def test_recording_upload(client, tmp_path):
    import soundfile as sf

    t = np.arange(22050 * 2) / 22050
    sf.write(tmp_path / "song.wav", (0.3 * np.sin(2 * np.pi * 880 * t)).astype(np.float32),
             22050)
    with open(tmp_path / "song.wav", "rb") as fh:
        response = client.post("/api/query", files={"file": ("dawn song.wav", fh, "audio/wav")})
    body = response.json()
    assert response.status_code == 200, body
    assert body["query"] == "recording dawn song.wav" and "fused" in body["bands"]


def test_wrong_upload_types(client):
    cases = [
        (b"hello, not a photo", "notes.txt", 415),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "broken.png", 415),
        (b"\xff\xd8\xff\xe0" + b"garbage" * 10, "broken.jpg", 415),
        (b"RIFF\x10\0\0\0WAVEjunkjunk", "broken.wav", 415),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "x.svg", 415),
        (b"", "empty.jpg", 400),
    ]
    for data, name, status in cases:
        # The type comes from the content: a good extension or MIME type does not help.
        response = client.post("/api/query", files={"file": (name, data, "image/jpeg")})
        error_of(response, status)
    error_of(client.post("/api/query", files={"other": ("a.jpg", b"x", "image/jpeg")}), 400)
    error_of(client.post("/api/query", content=b"just bytes",
                         headers={"content-type": "application/octet-stream"}), 415)
    error_of(client.post("/api/query", content=b"--x\r\nbroken",
                         headers={"content-type": "multipart/form-data; boundary=x"}), 400)
    error_of(client.get("/api/query"), 405)


def test_oversize_uploads(client, photo):
    from taxamap.serve.app import DEFAULT_MAX_UPLOAD

    assert DEFAULT_MAX_UPLOAD == 20 * 2**20
    big = photo.read_bytes() + b"\0" * (LIMIT + 1024)
    error_of(client.post("/api/query", files={"file": ("big.jpg", big, "image/jpeg")}), 413)

    def chunks():  # no Content-Length: the server counts what it reads
        yield (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(40):
            yield b"\xff" * 16384
        yield b"\r\n--b--\r\n"

    response = client.post("/api/query", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert error_of(response, 413) == "the upload is larger than 0.25 MB"


def test_unknown_and_empty_species(client):
    message = error_of(client.get("/api/map", params={"species": "Nonexistus fictus"}), 404)
    assert message.startswith('unknown species "Nonexistus fictus"') and "offline" in message
    for params in ({"species": ""}, {"species": "   "}, {}):
        assert "species" in error_of(client.get("/api/map", params=params), 400)
    error_of(client.get("/api/map", params={"species": "x" * 500}), 400)
    error_of(client.get("/api/map", params={"species": "Cardinalis\x00cardinalis"}), 400)
    error_of(client.get("/api/map", params={"species": SPECIES, "band": "satellite"}), 400)
    error_of(client.get("/api/map", params={"species": SPECIES, "stretch": "101"}), 400)
    error_of(client.get("/api/range", params={"species": SPECIES, "threshold": "percentile:101"}),
             400)


TRAVERSALS = ["../../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd",
              "..\\..\\windows\\win.ini", "maxtss:/etc/passwd", "file:///etc/passwd",
              "C:\\Windows\\win.ini", "~/.ssh/id_rsa"]


def test_path_traversal_strings_in_every_parameter(client, server):
    base = {"species": SPECIES, "lat": "40", "lon": "-83", "band": "fused", "format": "tif",
            "threshold": "percentile:90", "stretch": "90"}
    endpoints = {
        "/api/map": ["species", "band", "stretch", "upload"],
        "/api/overlay.png": ["species", "band", "stretch", "upload"],
        "/api/cell": ["species", "lat", "lon", "upload"],
        "/api/range": ["species", "band", "threshold", "upload"],
        "/api/download": ["species", "format", "band", "threshold", "upload"],
        "/api/patch": ["lat", "lon"],
    }
    before = sorted(p.name for p in server.service.workdir.iterdir())
    for path, names in endpoints.items():
        for name in names:
            for evil in TRAVERSALS:
                params = dict(base, **{name: evil})
                response = client.get(path, params=params)
                assert 400 <= response.status_code < 500, (path, name, evil, response.text)
                assert "root:" not in response.text
                error_of(response, response.status_code)
    assert sorted(p.name for p in server.service.workdir.iterdir()) == before
    for raw in (b"/static/../../../../etc/passwd", b"/lib/leaflet/..%2f..%2f..%2fetc/passwd",
                b"/static/%2e%2e/%2e%2e/app.py"):
        answer = server.raw(b"GET " + raw + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Connection: close\r\n\r\n")
        assert answer.split(b" ", 2)[1] in (b"400", b"404"), answer[:200]
        assert b"root:" not in answer


def test_search_and_upload_names_stay_data(client):
    hits = client.get("/api/search", params={"q": "../../etc/passwd"}).json()
    assert hits == []
    evil = "../../<img src=x>.jpg"
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    body = client.post("/api/query", files={"file": (evil, buf.getvalue(), "image/png")}).json()
    assert body["query"] == "photo <img src=x>.jpg"  # the last path part, as text
    assert "/" not in body["slug"] and ".." not in body["slug"]


def test_an_upload_is_named_as_predict_names_the_same_photo(client, models_dir, cache,
                                                           tmp_path):
    """One naming rule for photos: the web app's slug (and so its download names) is the one
    `taxamap predict --image` / taxamap.predict(image=...) gives the same file."""
    from PIL import Image

    photo = tmp_path / "heron.jpg"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (32, 32, 3), dtype=np.uint8)
                    ).save(photo)
    body = client.post("/api/query", files={"file": ("heron.jpg", photo.read_bytes())}).json()
    ds = taxamap.predict(image=photo, bbox=BBOX, resolution=0.1, models=models_dir, cache=cache,
                         progress=False)
    assert body["slug"] == ds.attrs["slug"] and body["slug"].startswith("image-heron-")
    tif = client.get("/api/download", params={"upload": body["upload"], "format": "tif"})
    assert f'{body["slug"]}.tif' in tif.headers["content-disposition"]


def test_malformed_requests_do_not_crash_the_server(client, server):
    junk = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 50,  # a TLS hello
        b"GET /api/map?species=%ZZ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: zz\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\nConnection: close\r\n\r\n",
        b"NONSENSE\r\n\r\n",
    ]
    for data in junk:
        server.raw(data)
    for params in ({"species": SPECIES, "lat": "1e999", "lon": "0"},
                   {"species": SPECIES, "lat": "40", "lon": "inf"},
                   {"species": SPECIES, "lat": ["40", "41"], "lon": "-83"}):
        response = client.get("/api/cell", params=params)
        assert response.status_code in (200, 400, 404)
    error_of(client.get("/api/cell", params={"species": SPECIES, "lat": "x", "lon": "0"}), 400)
    assert server.alive and client.get("/api/health").json()["status"] == "ok"


def test_foreign_host_header_is_refused(server):
    answer = server.raw(b"GET /api/health HTTP/1.1\r\nHost: attacker.example\r\n"
                        b"Connection: close\r\n\r\n")
    assert answer.split(b" ", 2)[1] == b"400"
    ok = server.raw(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert ok.split(b" ", 2)[1] == b"200"


def test_unknown_route_and_method_are_json(client):
    error_of(client.get("/api/nothing"), 404)
    error_of(client.post("/api/map"), 405)


# ------------------------------------------------------------------ the command

@pytest.mark.slow
def test_cli_defaults_and_help():
    from taxamap.cli import build_parser

    from taxamap.serve.app import DEFAULT_MAX_UPLOADS, DEFAULT_READ_TIMEOUT, DEFAULT_UPLOAD_TIMEOUT

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_upload) == ("127.0.0.1", 8765, 20.0)
    assert (args.max_uploads, args.read_timeout, args.upload_timeout) == (
        DEFAULT_MAX_UPLOADS, DEFAULT_READ_TIMEOUT, DEFAULT_UPLOAD_TIMEOUT)
    out = subprocess.run([sys.executable, "-m", "taxamap.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "taxamap serve --region usa --resolution 0.05" in out and "--host" in out
    assert "--max-uploads N" in out and "503 + Retry-After" in out
    for bad in (["--max-uploads", "0"], ["--read-timeout", "0"], ["--upload-timeout", "-1"]):
        proc = subprocess.run([sys.executable, "-m", "taxamap.cli", "serve", *bad], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 2 and bad[0] in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_busy_port_fails_before_any_work():
    from taxamap.serve.server import bind, serve

    taken = bind("127.0.0.1", 0)
    taken.listen(1)
    port = taken.getsockname()[1]

    def never():
        raise AssertionError("the session must not be opened when the port is busy")

    try:
        with pytest.raises(TaxamapError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(never, host="127.0.0.1", port=port)
    finally:
        taken.close()


def test_exposed_host_warns_before_binding():
    from taxamap.serve.server import is_loopback, serve

    said = []
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the bind fails, nothing is exposed.
    with pytest.raises(TaxamapError, match="cannot listen on 192.0.2.1"):
        serve(lambda: None, host="192.0.2.1", port=0, say=said.append)
    assert said and said[0].startswith("warning: --host 192.0.2.1 makes the map reachable")
    assert not is_loopback("0.0.0.0") and is_loopback("localhost") and is_loopback("::1")


@pytest.mark.slow
def test_taxamap_serve_prints_its_url_and_serves(models_dir, cache):
    import os
    import signal

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "taxamap.cli", "serve", "--bbox=-84,39,-82,41",
         "--resolution", "0.1", "--models", str(models_dir), "--cache", str(cache),
         "--no-progress", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:") and line.endswith("/\n"), line
        port = int(line.rsplit(":", 1)[1].strip("/\n"))
        body = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=30).json()
        assert body["cells"] == 400
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "warning" not in err and "Traceback" not in err


@pytest.mark.slow
def test_taxamap_serve_on_every_interface_prints_an_openable_url_and_each_line_once(
        models_dir, cache):
    """`--host 0.0.0.0`: the `serving` line names a URL a browser can open (127.0.0.1), stderr
    names the network URLs; the warm-up species is not printed; after a photo upload (which
    loads CLIP) a later species' prompt line is printed once, not twice."""
    import os
    import signal
    import socket

    from PIL import Image

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "taxamap.cli", "serve", "--bbox=-84,39,-82,41",
         "--resolution", "0.1", "--models", str(models_dir), "--cache", str(cache),
         "--no-progress", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:") and line.endswith("/\n"), line
        port = int(line.rsplit(":", 1)[1].strip("/\n"))
        photo = io.BytesIO()
        Image.fromarray(np.random.default_rng(9).integers(0, 255, (40, 40, 3), dtype=np.uint8)
                        ).save(photo, format="JPEG")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as web:
            up = web.post("/api/query", files={"file": ("heron.jpg", photo.getvalue())})
            assert up.status_code == 200, up.text
            assert web.get("/api/map", params={"species": "Cyanocitta cristata"}).status_code \
                == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert not [x for x in lines if x.startswith("prompt:") and "Cyanocitta" not in x], err
    assert len([x for x in lines if "Cyanocitta cristata" in x]) == 1, err
    (note,) = [x for x in lines if x.startswith("listening on every interface")]
    assert f"http://{socket.gethostname()}:{port}/" in note


def test_missing_leaflet_is_one_line(monkeypatch, session):
    from taxamap.serve.app import create_app

    monkeypatch.setitem(sys.modules, "xstatic.pkg.leaflet", None)  # as if not installed
    with pytest.raises(TaxamapError, match=r"taxamap\[serve\]"):
        create_app(session)


def test_numbers_in_answers_are_json_finite(client):
    body = client.get("/api/map", params={"species": SPECIES}).json()
    for stats in body["bands"].values():
        assert all(v is None or math.isfinite(v) for v in stats.values())


# ------------------------------------------------------------------ satellite patches

@pytest.fixture(scope="module")
def satellite_server(models_dir, tmp_path_factory):
    """A server over 60 cells with the satellite modality fed by a loopback tile server whose
    tile 12/1104/1542 (the cell at 40.55, -82.95) is missing."""
    from tests.helpers.tileserver import TileServer

    with TileServer(latency=0.0, faults={(12, 1104, 1542): "404"}) as tiles:
        session = open_satellite_session(models_dir, tmp_path_factory.mktemp("sat-cache"),
                                         tiles.url_template)
        with ServeServer(session) as srv:
            yield srv, tiles


@pytest.mark.slow
def test_cell_popup_patch_is_the_embedded_patch(satellite_server):
    from PIL import Image

    from taxamap.crs import wrap_lon

    server, tiles = satellite_server
    with httpx.Client(base_url=server.url, timeout=60) as client:
        health = client.get("/api/health").json()
        assert health["patches"] is True and health["bands"] == ["fused", "location", "satellite",
                                                                  "disagreement"]
        # A multimodal grid's disagreement layer: its own legend says what high means.
        layer = client.get("/api/map", params={"species": SPECIES, "band": "disagreement"})
        legend = layer.json()["legend"]
        assert layer.status_code == 200 and "tell different stories" in legend["meaning"]
        assert legend["unit"].startswith("standard deviation")
        assert legend["gradient"].startswith("linear-gradient")
        assert "legend" not in client.get("/api/map", params={"species": SPECIES}).json()
        cell = client.get("/api/cell", params={"species": SPECIES, "lat": 40.21, "lon": -82.38})
        body = cell.json()
        assert body["scores"]["satellite"] is not None and body["patch"].startswith("/api/patch?")
        png = client.get(body["patch"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        shown = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
        assert shown.shape == (64, 64, 3)
        # The patch cut around the cell centre (40.25, -82.35), as the encoder was given it.
        session = server.session
        row, col = session.cell_at(40.21, -82.38)
        centre = [[session.grid.row_lats()[row], wrap_lon(session.grid.column_lons()[col])]]
        assert centre[0] == [pytest.approx(40.25), pytest.approx(-82.35)]
        from taxamap.sources.satellite import make_satellite_source

        fresh = make_satellite_source("xyz", url=tiles.url_template, zoom=12, size=64)
        expected = np.asarray(fresh.fetch(np.asarray(centre))[0].convert("RGB"))
        np.testing.assert_array_equal(shown, expected)
        elsewhere = client.get("/api/patch", params={"lat": 40.29, "lon": -82.31})  # same cell
        assert elsewhere.content == png.content
        # The cell whose tile is missing: NaN satellite score, no patch.
        missing = client.get("/api/cell", params={"species": SPECIES, "lat": 40.55, "lon": -82.95})
        assert missing.json()["scores"]["satellite"] is None
        message = error_of(client.get("/api/patch", params={"lat": 40.55, "lon": -82.95}), 404)
        assert "no patch" in message
        error_of(client.get("/api/patch", params={"lat": 45, "lon": -82.5}), 404)


def test_no_patches_without_the_satellite_modality(client):
    assert client.get("/api/health").json()["patches"] is False
    assert "patch" not in client.get("/api/cell", params={"species": SPECIES, "lat": 40,
                                                          "lon": -83}).json()
    assert "satellite" in error_of(client.get("/api/patch", params={"lat": 40, "lon": -83}), 404)


# ------------------------------------------------------------------ uploads that cost the server

@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 1.9 MB PNG declaring 12000 x 12000 pixels (432 MB of RGB once decoded)."""
    return png_bomb(tmp_path_factory.mktemp("bomb") / "huge.png", 12000, 12000)


@pytest.fixture(scope="module")
def served(models_dir, cache, session):
    """``taxamap serve`` in its own process (its RSS and stderr measured); ``session`` first, so
    the grid is stored."""
    with ServeProcess(models_dir, cache) as server:
        yield server


PART = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n")


def upload_head(length: int, path: bytes = b"/api/query") -> bytes:
    """The head of a multipart POST whose body (starting with PART) is ``length`` bytes."""
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def read_until_closed(conn: socket.socket, wait: float = 60.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection, and whether it closed it
    (False: still open after a generous ``wait`` s)."""
    conn.settimeout(wait)
    chunks = []
    try:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    except socket.timeout:
        return b"".join(chunks), False
    except ConnectionResetError:
        pass
    return b"".join(chunks), True


def json_error_of(answer: bytes, status: int) -> str:
    """The one-line error of a raw HTTP answer with ``status``."""
    import json

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == str(status).encode(), answer[:300]
    message = json.loads(body)["error"]
    assert "\n" not in message
    return message


@pytest.mark.slow
def test_pixel_bomb_is_refused_from_its_header(served, bomb):
    served.reset_peak()
    before = served.memory_kib()["VmRSS"]
    data = bomb.read_bytes()

    def post(_):
        return httpx.post(served.url + "api/query", timeout=120,
                          files={"file": ("huge.png", data, "image/png")})

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:  # three at once: the server's limit (4) lets them in
        answers = list(pool.map(post, range(3)))
    for response in answers:
        message = error_of(response, 400)
        assert "12,000 x 12,000 pixels" in message and "40 Mpx" in message
        assert "huge.png" in message and "upload-" not in message
    # Decoding one would take 432 MB; refused from the header, the server grows by its buffers.
    peak = served.memory_kib()["VmHWM"]
    assert peak - before < 100 * 1024, (before, peak)
    assert httpx.get(served.url + "api/health").json()["status"] == "ok"


@pytest.mark.slow
def test_dropped_upload_is_one_line_without_traceback(served):
    body = PART + b"\xff" * 200_000
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(upload_head(1_000_000) + body)  # a fifth of what it announced, then gone
    said = served.wait_for(lambda line: "dropped" in line or "Exception" in line)
    assert said, served.lines
    time.sleep(0.5)  # anything the server would add after it
    dropped = [line for line in served.lines if "dropped" in line]
    assert len(dropped) == 1, served.lines
    assert "0.2 MB of 1.0 MB" in dropped[0]
    assert not any("Traceback" in line or "Exception in ASGI" in line or "ClientDisconnect"
                   in line for line in served.lines), served.lines
    assert httpx.get(served.url + "api/health").json()["status"] == "ok"


def test_uploads_beyond_the_limit_get_503_with_retry_after(session, photo):
    # Deadlines far off: the two slow uploads must hold their slots however busy the machine.
    with ServeServer(session, max_upload=LIMIT, max_uploads=2, read_timeout=300,
                     upload_timeout=300) as server:
        holders = []
        try:
            for _ in range(2):  # two uploads arriving slowly hold both slots
                conn = socket.create_connection(("127.0.0.1", server.port))
                conn.sendall(upload_head(len(PART) + 100_000) + PART + b"\xff" * 1000)
                holders.append(conn)
            deadline = time.monotonic() + 60
            while server.service.uploads_in_progress < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.service.uploads_in_progress == 2
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for _ in range(3):
                    response = client.post("/api/query", files={
                        "file": ("bird.jpg", photo.read_bytes(), "image/jpeg")})
                    assert "busy" in error_of(response, 503)
                    assert response.headers["retry-after"] == "5"
        finally:
            for conn in holders:
                conn.close()
        deadline = time.monotonic() + 60
        while server.service.uploads_in_progress and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.post("/api/query", files={
                "file": ("bird.jpg", photo.read_bytes(), "image/jpeg")})
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def impatient(session):
    """A server with short deadlines: 1 s for a request's head or a stall, 3 s per upload."""
    with ServeServer(session, max_upload=LIMIT, read_timeout=1.0, upload_timeout=3.0) as srv:
        yield srv


@pytest.mark.slow
def test_idle_and_half_sent_requests_are_closed_by_the_server(impatient):
    port = impatient.port
    with socket.create_connection(("127.0.0.1", port)) as conn:  # connects, never speaks
        answer, closed = read_until_closed(conn)
    assert closed and answer == b""
    with socket.create_connection(("127.0.0.1", port)) as conn:  # half a head, then silence
        conn.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: appl")
        answer, closed = read_until_closed(conn)
    assert closed and "did not arrive within 1 s" in json_error_of(answer, 408)
    with socket.create_connection(("127.0.0.1", port)) as conn:  # a body that stops coming
        conn.sendall(upload_head(len(PART) + 100_000) + PART + b"\xff" * 1000)
        answer, closed = read_until_closed(conn)
    assert closed and "stalled" in json_error_of(answer, 408)
    with socket.create_connection(("127.0.0.1", port)) as conn:  # a body the app never reads
        conn.sendall(upload_head(100_000, b"/api/map") + b"x" * 10)
        answer, closed = read_until_closed(conn)
    assert closed and answer.startswith(b"HTTP/1.1 405")
    assert impatient.alive and impatient.service.uploads_in_progress == 0


@pytest.mark.slow
def test_trickling_upload_is_cut_off(session):
    # No stall deadline before the upload's own: only the total time can cut this upload off.
    with ServeServer(session, max_upload=LIMIT, read_timeout=60, upload_timeout=3) as server, \
            socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(upload_head(len(PART) + 100_000) + PART)
        conn.settimeout(0.25)
        answer, sent = b"", 0
        while sent < 100_000:  # 100 bytes every 0.25 s: never stalled, never done
            try:
                answer = conn.recv(65536)
                break
            except socket.timeout:
                pass
            try:
                conn.sendall(b"\xff" * 100)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 100
        rest, closed = read_until_closed(conn)
    assert closed and sent < 100_000
    assert "did not arrive within 3 s" in json_error_of(answer + rest, 408)


def test_photo_decoding_does_not_wait_for_the_encoder(session, bomb):
    refused = []

    def embed():
        try:
            session.embed(image=bomb)
        except TaxamapError as exc:
            refused.append(str(exc))

    worker = threading.Thread(target=embed)
    with session._embed_lock:  # another query is being embedded
        worker.start()
        worker.join(60)
        done_while_locked = not worker.is_alive()
    worker.join()
    assert done_while_locked and "12,000 x 12,000 pixels" in refused[0]


def wav(path: Path, data, rate: int, subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    sf.write(path, data, rate, subtype=subtype)
    return path.read_bytes()


def test_audio_bombs_are_refused_in_the_page_terms(client, server, tmp_path):
    one_hz = wav(tmp_path / "a.wav", np.zeros(3000, np.int16), 1)  # 3,000 s at 1 Hz
    message = error_of(client.post("/api/query", files={"file": ("slow.wav", one_hz,
                                                                 "audio/wav")}), 400)
    assert message.startswith("slow.wav declares a sample rate of 1 Hz")
    many = wav(tmp_path / "b.wav", np.zeros((10, 1000), np.float32), 22050)
    message = error_of(client.post("/api/query", files={"file": ("array.wav", many,
                                                                 "audio/wav")}), 400)
    assert "1,000 channels" in message and "mix it down to mono" in message
    assert "transpose" not in message and "frames" not in message
    t = np.arange(22050) / 22050
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    samples[100] = np.nan
    broken = wav(tmp_path / "c.wav", samples, 22050, "FLOAT")
    message = error_of(client.post("/api/query", files={"file": ("dawn song.wav", broken,
                                                                 "audio/wav")}), 400)
    assert message.startswith("dawn song.wav holds NaN")
    for shown in (str(server.service.workdir), tempfile.gettempdir() + "/", "upload-",
                  "audio.wav"):
        assert shown not in message
    long = wav(tmp_path / "d.flac", np.zeros(8000 * 660, np.int16), 8000)  # 11 min of silence
    assert len(long) < LIMIT
    message = error_of(client.post("/api/query", files={"file": ("walk.flac", long,
                                                                 "audio/flac")}), 400)
    assert "11 minutes long" in message and "up to 10 minutes" in message
