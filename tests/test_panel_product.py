"""The reference panel in the product (issue 18): the ``relative`` band through predict, the files
and the web app; ``--stretch``; ``species-at`` and ``richness`` from the API and the CLI; their
bad input. Tiny models, offline; expected values come from the members' own maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

import taxamap
from taxamap.errors import TaxamapError
from tests.helpers.cli import run

BBOX = (-84.0, 39.0, -82.0, 41.0)
MEMBERS = ["Cardinalis cardinalis", "Cyanocitta cristata", "Turdus migratorius",
           "Ursus americanus", "Odocoileus virginianus", "Felis silvestris"]
TIE = 1e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("panel-product-cache")


@pytest.fixture(scope="module")
def panel_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("panel") / "checklist.txt"
    path.write_text("# my checklist\n" + "\n".join(MEMBERS) + "\n")
    return path


@pytest.fixture(scope="module")
def grid(models_dir, cache):
    return dict(bbox=BBOX, resolution=0.1, models=models_dir, cache=cache, progress=False)


@pytest.fixture(scope="module")
def member_maps(grid):
    ds = taxamap.predict(species=MEMBERS, **grid)
    mask = np.isfinite(ds["fused"].values[0])
    return ds["fused"].values[:, mask], mask


def test_predict_relative_band_counts_the_panel_below(grid, panel_file, member_maps, tmp_path):
    maps, mask = member_maps
    ds = taxamap.predict(species="Cyanocitta cristata", panel=panel_file, **grid)
    assert list(ds.data_vars) == ["fused", "location", "relative"]
    got = ds["relative"].values[mask] * (len(MEMBERS) - 1)
    others = np.delete(maps, 1, axis=0)
    low = (others < maps[1] - TIE).sum(axis=0)
    high = (others < maps[1] + TIE).sum(axis=0)
    assert np.all((low <= np.rint(got)) & (np.rint(got) <= high))
    assert ds.attrs["no_signal"] in ("yes", "no") and "checklist.txt" in ds.attrs["panel"]
    paths = taxamap.write(ds, out=tmp_path, formats=("tif",))
    with rasterio.open(paths["cyanocitta-cristata.tif"]) as src:
        assert src.descriptions == ("fused", "location", "relative")
        assert src.units[2].startswith("fraction of the reference panel")
        assert src.tags(3) == {"PRODUCT": "relative"}
        assert src.tags()["NO_SIGNAL"] == ds.attrs["no_signal"]
        assert np.allclose(src.read(3), ds["relative"].values, equal_nan=True)


def test_several_species_keep_their_own_verdicts(grid, panel_file, tmp_path):
    ds = taxamap.predict(species=MEMBERS[:2], panel=panel_file, **grid)
    assert ds["relative"].dims == ("species", "y", "x")
    assert list(ds["no_signal"].values) == [v for v in ds["no_signal"].values]
    paths = taxamap.write(ds, out=tmp_path, formats=("tif",))
    for i, name in enumerate(("cardinalis-cardinalis", "cyanocitta-cristata")):
        with rasterio.open(paths[f"{name}.tif"]) as src:
            assert src.tags()["STANDOUT_FRACTION"] == str(ds["standout_fraction"].values[i])


def test_the_no_signal_notice_is_in_the_legend_and_not_without_it(grid, panel_file, tmp_path):
    ds = taxamap.predict(species="Cardinalis cardinalis", panel=panel_file, **grid)
    quiet = ds.copy()
    quiet.attrs.update(no_signal="no")
    loud = ds.copy()
    loud.attrs.update(no_signal="yes", standout_fraction="0.002")
    a = taxamap.write(quiet, out=tmp_path / "a", formats=("html",))
    b = taxamap.write(loud, out=tmp_path / "b", formats=("html",))
    assert "taxamap-no-signal" not in a["cardinalis-cardinalis.html"].read_text()
    page = b["cardinalis-cardinalis.html"].read_text()
    assert "taxamap-no-signal" in page and "No signal: Cardinalis cardinalis" in page
    assert "0.20% of the cells" in page


def _overlays(page: str) -> list[str]:
    import re

    return re.findall(r'"data:image/png;base64,[^"]+"', page)


def test_stretch_changes_png_and_html_colours_not_the_geotiff(grid, panel_file, tmp_path):
    ds = taxamap.predict(species="Cardinalis cardinalis", panel=panel_file, **grid)
    plain = taxamap.write(ds, out=tmp_path / "plain")
    fixed = taxamap.write(ds, out=tmp_path / "fixed", stretch="value:-0.5,0.5")
    tif = "cardinalis-cardinalis.tif"
    with rasterio.open(plain[tif]) as a, rasterio.open(fixed[tif]) as b:
        assert np.array_equal(a.read(), b.read(), equal_nan=True)
    png = "cardinalis-cardinalis.png"
    assert plain[png].read_bytes() != fixed[png].read_bytes()
    html_a = plain["cardinalis-cardinalis.html"].read_text()
    html_b = fixed["cardinalis-cardinalis.html"].read_text()
    (fused_a, location_a, relative_a), (fused_b, location_b, relative_b) = (
        _overlays(html_a), _overlays(html_b))
    assert fused_a != fused_b and location_a != location_b
    assert relative_a == relative_b  # 'relative' keeps its 0-1 scale whatever the stretch
    assert "one fixed scale for every map (--stretch value:-0.5,0.5)" in html_b
    with pytest.raises(TaxamapError, match="is not a stretch"):
        taxamap.write(ds, out=tmp_path / "bad", stretch="value:1,0")


def test_species_at_api_and_cli_rank_as_the_members_maps(grid, panel_file, member_maps,
                                                         models_dir, cache, tmp_path):
    maps, mask = member_maps
    lat, lon = 40.23, -83.41
    table = taxamap.species_at(lat=lat, lon=lon, panel=panel_file, top=None, **grid)
    row = int(np.floor((BBOX[3] - lat) / 0.1))
    col = int(np.floor((lon - BBOX[0]) / 0.1))
    cell = int(np.count_nonzero(mask.reshape(-1)[:row * mask.shape[1] + col]))
    values = maps[:, cell]
    assert list(table["name"]) == [MEMBERS[i] for i in np.argsort(-values, kind="stable")]
    assert np.allclose(table["score"], np.sort(values)[::-1], atol=1e-5)
    out = tmp_path / "here.json"
    done = run(["species-at", f"--lat={lat}", f"--lon={lon}", "--bbox=-84,39,-82,41",
                "--resolution", "0.1", "--models", str(models_dir), "--cache", str(cache),
                "--panel", str(panel_file), "--top", "3", "--json", str(out), "--no-progress"])
    assert done.returncode == 0, done.stderr
    body = json.loads(out.read_text())
    assert [s["name"] for s in body["species"]] == list(table["name"][:3])
    assert body["species"][0]["name"] in done.stdout and "ranked by score" in done.stderr


@pytest.mark.parametrize("args, words", [
    (["--lat=10", "--lon=-83"], "outside the grid"),
    (["--lat=40.2", "--lon=-83.4", "--clade", "Animalia Chordata Avez"], "did you mean"),
    (["--lat=40.2"], "give the place"),
])
def test_species_at_bad_input_is_one_line(args, words, models_dir, cache, tmp_path):
    done = run(["species-at", *args, "--bbox=-84,39,-82,41", "--resolution", "0.1",
                "--models", str(models_dir), "--cache", str(cache), "--no-progress"])
    assert done.returncode == 2 and words in done.stderr
    assert done.stderr.count("\n") <= 2 and "Traceback" not in done.stderr


def test_empty_panel_is_refused_by_the_cli(models_dir, cache, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# none yet\n")
    done = run(["predict", "--species", "Cardinalis cardinalis", "--panel", str(empty),
                "--bbox=-84,39,-82,41", "--models", str(models_dir), "--cache", str(cache),
                "--out", str(tmp_path / "o"), "--no-progress"])
    assert done.returncode == 2 and "names no species" in done.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_richness_api_and_cli_sum_the_members_threshold_rasters(grid, panel_file, models_dir,
                                                                cache, tmp_path):
    rule = "percentile:80"
    ds = taxamap.richness(panel=panel_file, rule=rule, stack=True, **grid)
    total = np.zeros(ds["richness"].shape)
    for i, name in enumerate(MEMBERS):
        cut = taxamap.threshold(taxamap.predict(species=name, **grid), rule).raster.values
        total += np.nan_to_num(cut)
        assert np.array_equal(np.nan_to_num(ds["in_range"].values[i], nan=-1),
                              np.nan_to_num(cut, nan=-1)), name
    assert np.array_equal(np.nan_to_num(ds["richness"].values), total)
    done = run(["richness", "--panel", str(panel_file), "--rule", rule, "--bbox=-84,39,-82,41",
                "--resolution", "0.1", "--models", str(models_dir), "--cache", str(cache),
                "--out", str(tmp_path), "--stack", "--no-progress"])
    assert done.returncode == 0, done.stderr
    written = done.stdout.split()
    tif = next(p for p in written if p.endswith("_richness.tif"))
    stack = next(p for p in written if p.endswith("_stack.tif"))
    with rasterio.open(tif) as src:
        assert src.descriptions == ("richness",)
        assert np.array_equal(np.nan_to_num(src.read(1)), total)
    with rasterio.open(stack) as src:
        assert src.count == len(MEMBERS) and src.descriptions[0] == MEMBERS[0]
    bad = run(["richness", "--rule", "maxtss", "--bbox=-84,39,-82,41", "--models",
               str(models_dir), "--cache", str(cache), "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "maxtss needs each species' own occurrences" in bad.stderr


def test_clade_prompt_maps_the_clade(grid):
    ds = taxamap.predict(species="Animalia Chordata Aves Passeriformes Cardinalidae", **grid)
    assert ds.attrs["prompt"] == "Animalia Chordata Aves Passeriformes Cardinalidae"
    assert ds.attrs["slug"] == "cardinalidae"


# ------------------------------------------------------------------------ the web app

@pytest.fixture(scope="module")
def client(grid, panel_file):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from tests.helpers.serveserver import ServeServer

    session = taxamap.open_session(panel=panel_file, **grid)
    with ServeServer(session) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        c.session = session
        yield c


def test_web_map_has_relative_on_its_fixed_scale_and_a_verdict(client):
    body = client.get("/api/map", params={"species": "Cardinalis cardinalis",
                                          "band": "relative", "stretch": 50}).json()
    assert body["band"] == "relative" and "relative" in body["bands"]
    assert body["stretch"]["fixed"] and (body["stretch"]["vmin"], body["stretch"]["vmax"]) == (0, 1)
    assert "no_signal" in body
    assert client.get("/api/health").json()["bands"] == ["fused", "location", "relative"]
    # A panel species' query vector is the panel cache's: no text encoding.
    embedded = client.session.embed("Cardinalis cardinalis")
    assert np.shares_memory(embedded.query.vector,
                            client.session.panel.reference.vectors)


def test_web_species_at_answers_json_and_refuses_bad_input(client):
    body = client.get("/api/species", params={"lat": 40.23, "lon": -83.41, "top": 3}).json()
    table = client.session.species_at(40.23, -83.41, 3)
    assert [s["name"] for s in body["species"]] == list(table["name"])
    assert set(body["species"][0]) == {"name", "prompt", "score", "relative"}
    for params, status in (({"lat": "x", "lon": 1}, 400), ({"lat": 10, "lon": -83}, 404),
                           ({"lat": 40.2, "lon": -83.4, "top": 0}, 400),
                           ({"lat": 40.2, "lon": -83.4, "top": 2.5}, 400), ({"lon": 1}, 400)):
        r = client.get("/api/species", params=params)
        assert r.status_code == status and set(r.json()) == {"error"}, params
        assert "\n" not in r.json()["error"]
