"""Names as people type them (species typos, common names, ambiguous regions) and errors in the
caller's vocabulary: the same bad input through the CLI, the Python API and the web app names
each surface's own parameters (``--species``, ``species=``, the species box)."""

from __future__ import annotations

import re

import pytest

import taxamap
from taxamap import grids, taxonomy
from taxamap.cli import main
from taxamap.errors import TaxamapError
from taxamap.geography import resolve_region
from taxamap.taxonomy import TaxonomyClient, resolve_species
from tests.helpers.taxonomy_server import (
    CARDINAL_DETAIL,
    CARDINAL_SEARCH,
    GBIF,
    GBIF_NONE,
    INAT,
    NO_RESULTS,
    TaxonomyServer,
    inat_species,
    inat_taxon,
)

PROMPT = "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"
SEVEN = "Kingdom Phylum Class Order Family Genus epithet"
TYPO = "Cardinalis cardinalus"
BBOX = (-84.0, 39.0, -82.0, 41.0)
BBOX_TEXT = "-84,39,-82,41"
FLAG = re.compile(r"(?<![\w-])--[a-z]")


@pytest.fixture
def online(monkeypatch):
    """The tests that talk to the loopback services choose online themselves."""
    monkeypatch.delenv("TAXAMAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    srv = TaxonomyServer()
    yield srv
    srv.close()


def client_for(server: TaxonomyServer) -> TaxonomyClient:
    return TaxonomyClient(server.inaturalist_url, server.gbif_url, backoff=0.01)


def unknown_message(text: str, **kwargs) -> str:
    with pytest.raises(TaxamapError) as err:
        resolve_species(text, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- species: did you mean ----------------------------------------------------------------------


def test_a_typo_gets_the_closest_name_of_the_table(tmp_path):
    message = unknown_message(TYPO, offline=True, cache_dir=tmp_path)
    assert message.startswith(f'unknown species "{TYPO}"')
    assert 'did you mean "Cardinalis cardinalis" (Northern Cardinal)?' in message
    assert f'--species "{SEVEN}"' in message  # the CLI's words when no surface is set
    # A mistyped common name is answered with the common name.
    assert 'did you mean "Northern Cardinal" (Cardinalis cardinalis)?' in unknown_message(
        "Nothern Cardinal", offline=True, cache_dir=tmp_path)
    # Nothing alike: no suggestion, still the seven-rank way out.
    message = unknown_message("Imaginaria nonexistens", offline=True, cache_dir=tmp_path)
    assert "did you mean" not in message and SEVEN in message


def test_a_typo_online_gets_the_services_suggestions(online, tmp_path):
    online.answer(f"{INAT}/taxa", (200, NO_RESULTS))
    online.answer(f"{GBIF}/species/match", (200, GBIF_NONE))
    online.answer(f"{INAT}/taxa/autocomplete", (200, {"total_results": 1, "page": 1,
                                                      "per_page": 10, "results": [inat_taxon(
        41, "Imaginaria nonexistens", "species", "Fictional Finch")]}))
    online.answer(f"{GBIF}/species/suggest", (200, [
        {"key": 7, "canonicalName": "Imaginaria inventa", "rank": "SPECIES"},
        {"key": 8, "canonicalName": "Imaginaria", "rank": "GENUS"}]))
    message = unknown_message("Imaginaria nonexistans", offline=False, cache_dir=tmp_path,
                              client=client_for(online))
    assert "not found in iNaturalist, GBIF or the built-in table" in message
    # Neither is in the shipped table: both come from the services, the closer one first.
    assert ('did you mean "Imaginaria nonexistens" (Fictional Finch) or "Imaginaria inventa"?'
            in message)
    assert f"{INAT}/taxa/autocomplete" in online.paths()
    _, query, _ = online.requests[online.paths().index(f"{GBIF}/species/suggest")]
    assert query["q"] == ["Imaginaria nonexistans"] and query["rank"] == ["SPECIES"]


def test_unreachable_services_still_suggest_from_the_table(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = TaxonomyClient(dead + INAT, dead + GBIF, backoff=0.01)
    message = unknown_message(TYPO, offline=False, cache_dir=tmp_path, client=client)
    assert "could not be reached" in message and '"Cardinalis cardinalis"' in message


# --- species: common names ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Northern Cardinal", "northern cardinal", " NORTHERN   cardinal ",
                                  "Northern-Cardinal"])
def test_common_names_of_the_table_resolve_offline(text, tmp_path):
    taxon = resolve_species(text, offline=True, cache_dir=tmp_path)
    assert (taxon.prompt, taxon.binomial, taxon.common_name) == (
        PROMPT, "Cardinalis cardinalis", "Northern Cardinal")


def test_common_names_with_apostrophes_and_accents(tmp_path):
    for text in ("Anna's Hummingbird", "anna\u2019s hummingbird", "Annas Hummingbird"):
        assert resolve_species(text, offline=True, cache_dir=tmp_path).binomial == "Calypte anna"
    pere = taxonomy.lookup_common_name("Pere David's Deer")
    assert [t.common_name for t in pere] == ["Père David's deer"]


def test_a_common_name_online_resolves_its_binomial_through_the_services(online, tmp_path):
    online.answer(f"{INAT}/taxa", (200, CARDINAL_SEARCH))
    online.answer(f"{INAT}/taxa/9083", (200, CARDINAL_DETAIL))
    taxon = resolve_species("northern cardinal", offline=False, cache_dir=tmp_path,
                            client=client_for(online))
    assert taxon.prompt == PROMPT and taxon.source == "inaturalist"
    assert online.requests[0][1]["q"] == ["Cardinalis cardinalis"]


def test_a_common_name_the_table_lacks_is_asked_of_inaturalist(online, tmp_path):
    search, detail = inat_species(
        77, "Imaginaria nonexistens", "Fictional Rock Wren",
        [(1, "kingdom", "Animalia"), (2, "phylum", "Chordata"), (3, "class", "Aves"),
         (7251, "order", "Passeriformes"), (9999, "family", "Troglodytidae"),
         (9998, "genus", "Imaginaria")], matched_term="Fictional Rock Wren")
    online.answer(f"{INAT}/taxa", (200, search))
    online.answer(f"{INAT}/taxa/77", (200, detail))
    client = client_for(online)
    taxon = resolve_species("fictional rock  wren", offline=False, cache_dir=tmp_path,
                            client=client)
    assert taxon.binomial == "Imaginaria nonexistens" and taxon.source == "inaturalist"
    assert taxon.prompt.split()[4] == "Troglodytidae"
    assert online.requests[0][1]["q"] == ["fictional rock wren"]
    assert GBIF + "/species/match" not in online.paths()  # GBIF matches scientific names only
    made = len(online.requests)
    again = resolve_species("Fictional Rock Wren", offline=True, cache_dir=tmp_path)
    assert again.prompt == taxon.prompt and again.source == "cache"
    assert len(online.requests) == made
    assert [p.name for p in tmp_path.iterdir()] == ["common_fictional_rock_wren.json"]


def test_a_shared_common_name_lists_its_species(tmp_path):
    message = unknown_message("Staghorn Coral", offline=True, cache_dir=tmp_path)
    assert "common name of 3 species" in message
    for binomial in ("Acropora acuminata", "Acropora cervicornis", "Acropora millepora"):
        assert f'"{binomial}"' in message


# --- species: one ranking for suggestions and the web search ------------------------------------


def test_whole_words_rank_before_parts_of_words():
    found = taxonomy.search_table("robin", limit=None)
    names = [t.binomial for t in found]
    assert names[0] == "Turdus migratorius"  # American Robin
    robins = [i for i, t in enumerate(found)
              if re.search(r"\brobin\b", (t.common_name or "").lower())]
    assert len(robins) > 10 and max(robins) < names.index("Marmosa robinsoni")
    # Exact names first, then names being typed.
    assert taxonomy.search_table("Northern Cardinal")[0].binomial == "Cardinalis cardinalis"
    assert taxonomy.search_table("cardinalis cardin")[0].binomial == "Cardinalis cardinalis"
    # Similar spellings come last, when nothing else matches.
    assert taxonomy.search_table(TYPO)[0].binomial == "Cardinalis cardinalis"
    assert taxonomy.search_table("zzzz qqqq") == []
    rows = [("Marmosa robinsoni", "Robinson's Mouse Opossum"), ("Turdus migratorius",
                                                                "American Robin")]
    assert taxonomy.rank_names("robin", rows) == [1, 0]


# --- regions --------------------------------------------------------------------------------


def test_an_ambiguous_region_is_refused_with_each_candidates_own_name():
    with pytest.raises(TaxamapError) as err:
        resolve_region("Georgia")
    message = str(err.value)
    assert message.startswith("region 'Georgia' is ambiguous: the country 'Georgia (country)' "
                              "(GEO) or the US state 'Georgia (USA)' (GA)")
    with pytest.raises(TaxamapError, match=r"'Democratic Republic of the Congo' \(COD\) or the "
                                           r"country 'Republic of the Congo' \(COG\)"):
        resolve_region("congo")
    tbilisi, atlanta = (44.8, 41.7), (-84.4, 33.75)
    import shapely

    for name in ("Georgia (country)", "GEO", "georgia country"):
        assert shapely.contains_xy(resolve_region(name).geometry, *tbilisi), name
    for name in ("Georgia (USA)", "Georgia (US state)", "GA", "US-GA"):
        assert shapely.contains_xy(resolve_region(name).geometry, *atlanta), name


def test_every_ambiguous_name_resolves_to_none_and_its_candidates_to_themselves():
    table = grids.ambiguous()
    assert {"georgia", "congo", "korea", "virgin islands"} <= set(table)
    for key, names in table.items():
        assert grids.lookup(key) is None, key
        assert len(names) > 1
        for name in names:
            assert grids.lookup(name).name == name


def test_an_ambiguous_region_exits_2_on_the_cli_and_raises_in_the_api(tmp_path, capsys):
    code = main(["occurrences", "--species", "Cardinalis cardinalis", "--region", "Georgia",
                 "--out", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ambiguous" in err[0] and "'taxamap regions'" in err[0]
    with pytest.raises(TaxamapError) as caught:
        taxamap.region("Congo")
    assert "ambiguous" in str(caught.value) and "taxamap.regions()" in str(caught.value)


def test_usa_is_listed_beside_the_whole_country():
    infos = grids.list_regions()
    names = [i.name for i in infos]
    usa = infos[names.index("usa")]
    assert usa.part_of == "United States of America" and usa.code == "USA"
    assert names.index("usa") == names.index("United States of America") + 1
    assert resolve_region("usa").name == "Contiguous United States (lower 48 + DC)"
    assert "Alaska" not in resolve_region("usa").name


def test_readme_lists_every_region_kind():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `taxamap regions"))
    for kind in {i.kind for i in grids.list_regions()}:
        assert f"`{kind}`" in row, kind
    for word in ("Georgia (country)", "Georgia (USA)", "United States of America"):
        assert word in readme


# --- one bad input, three surfaces ----------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("names-cache")


@pytest.fixture(scope="module")
def ds(models_dir, cache):
    return taxamap.predict(species="Cardinalis cardinalis", bbox=BBOX, resolution=0.1,
                           models=models_dir, cache=cache, progress=False)


@pytest.fixture(scope="module")
def client(models_dir, cache, ds):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from tests.helpers.serveserver import ServeServer, open_test_session

    with ServeServer(open_test_session(models_dir, cache)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            yield c


def web_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


def cli_error(argv: list[str], capsys) -> str:
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("taxamap: error: "), lines
    return lines[-1]


def test_common_names_on_the_cli_the_api_and_the_web(models_dir, cache, client, ds, tmp_path,
                                                     capsys):
    code = main(["predict", "--species", "northern CARDINAL", "--bbox", BBOX_TEXT,
                 "--resolution", "0.1", "--models", str(models_dir), "--cache", str(cache),
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert f"prompt: {PROMPT}" in capsys.readouterr().err  # the prompt used is printed
    assert (tmp_path / "cardinalis-cardinalis.tif").is_file()
    api = taxamap.predict(species="Northern Cardinal", bbox=BBOX, resolution=0.1,
                          models=models_dir, cache=cache, progress=False)
    assert api.attrs["prompt"] == PROMPT
    assert float(abs(api["fused"] - ds["fused"]).max()) == 0.0
    web = client.get("/api/map", params={"species": "Northern Cardinal"})
    assert web.status_code == 200 and web.json()["prompt"] == PROMPT


def test_the_web_search_ranks_as_the_cli_suggests(client, tmp_path):
    hits = client.get("/api/search", params={"q": "robin"}).json()
    assert hits[0]["name"] == "Turdus migratorius" and hits[0]["common"] == "American Robin"
    typo = client.get("/api/search", params={"q": TYPO}).json()
    assert typo[0]["name"] == "Cardinalis cardinalis"
    assert f'"{typo[0]["name"]}"' in unknown_message(TYPO, offline=True, cache_dir=tmp_path)


def test_an_unknown_species_in_each_surfaces_words(models_dir, cache, client, tmp_path, capsys):
    line = cli_error(["predict", "--species", TYPO, "--bbox", BBOX_TEXT, "--resolution", "0.1",
                      "--models", str(models_dir), "--cache", str(cache), "--out",
                      str(tmp_path), "--no-progress"], capsys)
    assert 'did you mean "Cardinalis cardinalis"' in line and f'--species "{SEVEN}"' in line
    with pytest.raises(TaxamapError) as err:
        taxamap.predict(species=TYPO, bbox=BBOX, resolution=0.1, models=models_dir,
                        cache=cache, progress=False)
    api = str(err.value)
    assert 'did you mean "Cardinalis cardinalis"' in api and f'species="{SEVEN}"' in api
    assert not FLAG.search(api)
    web = web_error(client.get("/api/map", params={"species": TYPO}), 404)
    assert 'did you mean "Cardinalis cardinalis"' in web
    assert f'"{SEVEN}" in the species box' in web
    assert not FLAG.search(web) and "species=" not in web


def test_a_bad_threshold_in_each_surfaces_words(ds, client, tmp_path, capsys):
    tif = taxamap.write(ds, out=tmp_path, formats=("tif",))["cardinalis-cardinalis.tif"]
    line = cli_error(["threshold", str(tif), "--rule", "percentile:150"], capsys)
    assert "out of range" in line and "maxtss:OCC_FILE" in line
    with pytest.raises(TaxamapError) as err:
        taxamap.threshold(ds, "percentile:150")
    assert "maxtss:OCC_FILE" in str(err.value)  # the API takes occurrences
    with pytest.raises(TaxamapError, match=r"or occurrences=\.\.\.") as err:
        taxamap.threshold(ds, "maxtss")
    assert not FLAG.search(str(err.value))
    web = web_error(client.get("/api/range", params={"species": "Cardinalis cardinalis",
                                                     "threshold": "percentile:150"}), 400)
    assert "out of range" in web and "the range slider" in web
    assert "maxtss" not in web and "file" not in web.lower()


def test_web_errors_never_quote_flags_files_or_maxtss(client):
    species = "Cardinalis cardinalis"
    requests = [
        ("/api/map", {"species": TYPO}), ("/api/map", {"species": "Cardinalis 123"}),
        ("/api/map", {"species": "Canis lupus familiaris"}),
        ("/api/map", {"species": "Staghorn Coral"}),
        ("/api/map", {"species": species, "band": "nope"}),
        ("/api/range", {"species": species, "threshold": "value:abc"}),
        ("/api/range", {"species": species, "threshold": "maxtss:/tmp/points.csv"}),
        ("/api/range", {"species": species, "threshold": "percentile:-1"}),
        ("/api/download", {"species": species, "format": "gpkg", "threshold": "maxtss"}),
    ]
    for path, params in requests:
        response = client.get(path, params=params)
        assert 400 <= response.status_code < 500, (path, params, response.text)
        message = response.json()["error"]
        assert not FLAG.search(message), message
        assert "maxtss" not in message and "OCC_FILE" not in message, message


def test_occurrences_offline_in_each_surfaces_words(tmp_path, capsys):
    line = cli_error(["occurrences", "--species", "Cardinalis cardinalis", "--region", "ohio",
                      "--out", str(tmp_path / "o.csv")], capsys)
    assert "offline" in line and "your own --occurrences FILE" in line
    with pytest.raises(TaxamapError) as err:
        taxamap.occurrences("Cardinalis cardinalis", region="ohio")
    assert "your own occurrences=..." in str(err.value) and not FLAG.search(str(err.value))


def test_grid_options_in_python_are_keywords(models_dir, cache):
    cases = [(dict(bbox="1,2,3"), 'bbox="1,2,3" is not four numbers W,S,E,N'),
             (dict(bbox=BBOX, resolution=20.0), "resolution=20.0 is coarser than 10 degrees"),
             (dict(bbox=BBOX, device="tpu"), 'unknown device="tpu"'),
             (dict(bbox=BBOX, fusion="median"), 'unknown fusion="median"')]
    for kwargs, needle in cases:
        with pytest.raises(TaxamapError) as err:
            taxamap.predict(species="Cardinalis cardinalis", models=models_dir, cache=cache,
                            progress=False, **kwargs)
        assert needle in str(err.value) and not FLAG.search(str(err.value)), str(err.value)


def test_option_renders_per_surface_and_api_entry_keeps_an_outer_surface():
    from taxamap.surface import accepts, api_entry, current, option, speaking_to

    said = {}
    for surface in ("cli", "api", "web"):
        with speaking_to(surface):
            said[surface] = (option("species", "Cardinalis cardinalis"),
                             option("occurrences", metavar="FILE"), option("fit", True),
                             accepts("occurrences"))
    assert said["cli"] == ('--species "Cardinalis cardinalis"', "--occurrences FILE", "--fit",
                           True)
    assert said["api"] == ('species="Cardinalis cardinalis"', "occurrences=...", "fit=True", True)
    assert said["web"][0] == '"Cardinalis cardinalis" in the species box'
    assert said["web"][3] is False  # the page takes no occurrence file

    @api_entry
    def surface_inside() -> str:
        return current()

    assert current() == "cli" and surface_inside() == "api"
    with speaking_to("web"):
        assert surface_inside() == "web"  # the web app calls the API: its words stay the page's
    assert current() == "cli"
