"""Species names -> seven-rank prompts: the shipped table, input parsing, and the online path
against a real HTTP server on 127.0.0.1 that answers in iNaturalist's and GBIF's shapes."""

from __future__ import annotations

import csv
import json
import re
import socket
from pathlib import Path

import pytest

from taxamap.errors import TaxamapError
from taxamap.taxonomy import (
    Taxon,
    TaxonomyClient,
    harmonize_ranks,
    list_table_species,
    lookup_table,
    resolve_species,
)
from tests.helpers.taxonomy_server import (
    CARDINAL_DETAIL,
    CARDINAL_SEARCH,
    GBIF,
    GBIF_NONE,
    HUMMINGBIRD_DETAIL,
    HUMMINGBIRD_SEARCH,
    INAT,
    NO_RESULTS,
    TaxonomyServer,
    gbif_match,
)

CARDINAL = "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"
HINT = '--species "Kingdom Phylum Class Order Family Genus epithet"'
TABLE = Path(__file__).resolve().parents[1] / "taxamap" / "data" / "taxonomy.csv"
SEED = Path(__file__).resolve().parents[2] / "shared" / "data" / "taxonomy" / "animals_7rank.csv"


@pytest.fixture(autouse=True)
def _online_by_default(monkeypatch):
    # The environment may mark the whole test run offline; these tests choose for themselves.
    monkeypatch.delenv("TAXAMAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def server():
    srv = TaxonomyServer()
    yield srv
    srv.close()


def client_for(server: TaxonomyServer, **kwargs) -> TaxonomyClient:
    return TaxonomyClient(server.inaturalist_url, server.gbif_url, backoff=0.01, **kwargs)


def serve_cardinal(server: TaxonomyServer) -> None:
    server.answer(f"{INAT}/taxa", (200, CARDINAL_SEARCH))
    server.answer(f"{INAT}/taxa/9083", (200, CARDINAL_DETAIL))


# --- the shipped table ----------------------------------------------------------------------


def test_table_lookup_normalises_case_and_spaces(tmp_path):
    taxon = resolve_species("  cardinalis   CARDINALIS ", offline=True, cache_dir=tmp_path)
    assert taxon == Taxon(CARDINAL, "Cardinalis cardinalis", "table", "Northern Cardinal")
    assert taxon.slug == "cardinalis-cardinalis"
    assert taxon.ranks["order"] == "Passeriformes" and taxon.ranks["species"] == "cardinalis"
    assert lookup_table("CALYPTE\tanna").binomial == "Calypte anna"
    assert lookup_table("Imaginaria nonexistens") is None


def test_table_uses_inaturalist_orders():
    assert lookup_table("Calypte anna").prompt == (
        "Animalia Chordata Aves Apodiformes Trochilidae Calypte anna")
    assert lookup_table("Collocalia linchi").prompt.split()[3] == "Apodiformes"  # a swift
    assert lookup_table("Tursiops aduncus").prompt.split()[3] == "Artiodactyla"
    assert lookup_table("Crypturellus soui").prompt.split()[3] == "Tinamiformes"
    with open(TABLE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    orders = {r["order"] for r in rows}
    assert not orders & {"Cetartiodactyla", "Cetacea", "Soricomorpha", "Crocodilia"}
    assert {r["order"] for r in rows if r["family"] == "Trochilidae"} == {"Apodiformes"}
    assert {r["order"] for r in rows if r["family"] in ("Delphinidae", "Balaenopteridae")} == {
        "Artiodactyla"}


def test_table_is_consistent_and_complete():
    with open(TABLE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) > 2400
    word = re.compile(r"[A-Za-z][A-Za-z-]*\Z")
    family_order, genus_family = {}, {}
    for row in rows:
        ranks = {k: row[k] for k in ("kingdom", "phylum", "class", "order", "family", "genus",
                                     "species")}
        assert all(word.match(v) for v in ranks.values()), row
        assert harmonize_ranks(ranks) == ranks, row  # no row left to fix
        assert family_order.setdefault(row["family"], row["order"]) == row["order"], row
        assert genus_family.setdefault(row["genus"], row["family"]) == row["family"], row
    names = list_table_species()
    assert names == sorted(set(names)) and len(names) == len(rows)
    for extra in ("Cardinalis cardinalis", "Danaus plexippus", "Quercus alba", "Amanita muscaria"):
        assert extra in names
    assert lookup_table("Quercus alba").prompt.startswith("Plantae Tracheophyta Magnoliopsida")


@pytest.mark.skipif(not SEED.exists(), reason="seed table (../shared/data/taxonomy) not present")
def test_shipped_table_is_the_documented_rebuild_of_the_seed():
    from tests.helpers.taxonomy_build import build

    assert build(SEED) == TABLE.read_text(encoding="utf-8")


# --- parsing user input ---------------------------------------------------------------------


def test_seven_rank_string_is_used_as_given_without_network(server, tmp_path):
    text = "  animalia Chordata  Aves Passeriformes Cardinalidae Cardinalis CARDINALIS "
    taxon = resolve_species(text, cache_dir=tmp_path, client=client_for(server))
    assert taxon == Taxon(CARDINAL, "Cardinalis cardinalis", "given", None)
    # A taxonomy no source knows is still passed through untouched.
    odd = "Plantae Tracheophyta Magnoliopsida Rosales Rosaceae Imaginaria nonexistens"
    assert resolve_species(odd, cache_dir=tmp_path, client=client_for(server)).prompt == odd
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", [
    "", "   ", "Cardinalis", "Cardinalis 123", "cardinalis c4rdinalis", "Cardinalis cardinalis L.",
    "Canis lupus familiaris", "Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis x",
])
def test_invalid_input_is_one_line_error(text, tmp_path):
    with pytest.raises(TaxamapError) as err:
        resolve_species(text, offline=True, cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "species" in message


def test_unknown_species_offline_suggests_seven_ranks(tmp_path):
    with pytest.raises(TaxamapError) as err:
        resolve_species("imaginaria  NONEXISTENS", offline=True, cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert '"Imaginaria nonexistens"' in message and "offline" in message
    assert HINT in message


@pytest.mark.parametrize("variable", ["TAXAMAP_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_environment_variables_skip_the_network(variable, server, tmp_path, monkeypatch):
    serve_cardinal(server)
    monkeypatch.setenv(variable, "1")
    taxon = resolve_species("Cardinalis cardinalis", cache_dir=tmp_path, client=client_for(server))
    assert taxon.source == "table" and taxon.prompt == CARDINAL
    assert server.requests == []


# --- online: iNaturalist, GBIF, cache, retries ------------------------------------------------


def test_inaturalist_prompt_is_built_from_ancestors(server, tmp_path):
    server.answer(f"{INAT}/taxa", (200, HUMMINGBIRD_SEARCH))
    server.answer(f"{INAT}/taxa/6359", (200, HUMMINGBIRD_DETAIL))
    taxon = resolve_species("calypte ANNA", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    # subphylum, subfamily and tribe in the lineage are skipped; the seven ranks remain.
    assert taxon == Taxon("Animalia Chordata Aves Apodiformes Trochilidae Calypte anna",
                          "Calypte anna", "inaturalist", "Anna's Hummingbird")
    assert server.paths() == [f"{INAT}/taxa", f"{INAT}/taxa/6359"]
    _, query, headers = server.requests[0]
    assert query["q"] == ["Calypte anna"] and query["rank"] == ["species"]
    assert headers["User-Agent"].startswith("taxamap/")
    assert "+https://github.com/taxamap" in headers["User-Agent"]


def test_second_lookup_is_served_from_disk_cache(server, tmp_path):
    serve_cardinal(server)
    first = resolve_species("Cardinalis cardinalis", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    assert first.source == "inaturalist" and first.prompt == CARDINAL
    made = len(server.requests)
    assert made == 2
    second = resolve_species(" CARDINALIS cardinalis", offline=False, cache_dir=tmp_path,
                             client=client_for(server))
    assert len(server.requests) == made  # zero new requests
    assert (second.prompt, second.binomial, second.source, second.common_name) == (
        CARDINAL, "Cardinalis cardinalis", "cache", "Northern Cardinal")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["cardinalis_cardinalis.json"]  # no temporary file left behind
    record = json.loads((tmp_path / files[0]).read_text())
    assert record["prompt"] == CARDINAL and record["source"] == "inaturalist"
    # The cache also answers offline, ahead of the table.
    assert resolve_species("Cardinalis cardinalis", offline=True, cache_dir=tmp_path).source == \
        "cache"


def test_corrupt_cache_entry_is_refetched(server, tmp_path):
    serve_cardinal(server)
    (tmp_path / "cardinalis_cardinalis.json").write_text("{not json")
    taxon = resolve_species("Cardinalis cardinalis", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    assert taxon.source == "inaturalist" and len(server.requests) == 2
    assert json.loads((tmp_path / "cardinalis_cardinalis.json").read_text())["prompt"] == CARDINAL


def test_gbif_is_asked_when_inaturalist_has_no_match(server, tmp_path):
    # iNaturalist answers, but only with another species of the genus.
    server.answer(f"{INAT}/taxa", (200, CARDINAL_SEARCH))
    server.answer(f"{GBIF}/species/match", (200, gbif_match(
        "Animalia", "Chordata", "Aves", "Passeriformes", "Cardinalidae", "Cardinalis",
        "Cardinalis sinuatus")))
    taxon = resolve_species("Cardinalis sinuatus", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    assert taxon == Taxon(
        "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis sinuatus",
        "Cardinalis sinuatus", "gbif", None)
    assert server.paths() == [f"{INAT}/taxa", f"{GBIF}/species/match"]
    assert server.requests[1][1]["name"] == ["Cardinalis sinuatus"]


def test_gbif_answers_are_renamed_to_inaturalist_ranks(server, tmp_path):
    server.answer(f"{INAT}/taxa", (200, NO_RESULTS))
    server.answer(f"{GBIF}/species/match", (200, gbif_match(
        "Animalia", "Chordata", "Mammalia", "Cetartiodactyla", "Delphinidae", "Tursiops",
        "Tursiops truncatus")))
    taxon = resolve_species("Tursiops truncatus", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    assert taxon.source == "gbif"
    assert taxon.prompt == "Animalia Chordata Mammalia Artiodactyla Delphinidae Tursiops truncatus"


def test_unknown_everywhere_online(server, tmp_path):
    server.answer(f"{INAT}/taxa", (200, NO_RESULTS))
    server.answer(f"{GBIF}/species/match", (200, GBIF_NONE))
    with pytest.raises(TaxamapError) as err:
        resolve_species("Imaginaria nonexistens", offline=False, cache_dir=tmp_path,
                        client=client_for(server))
    assert "not found in iNaturalist, GBIF" in str(err.value) and HINT in str(err.value)
    assert list(tmp_path.iterdir()) == []  # misses are not cached
    # Both services miss but the table knows it: the table answers.
    taxon = resolve_species("Calypte anna", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    assert taxon.source == "table"


def test_server_error_then_success_is_retried(server, tmp_path):
    server.answer(f"{INAT}/taxa", (500, {"error": "boom"}), (200, CARDINAL_SEARCH))
    server.answer(f"{INAT}/taxa/9083", (200, CARDINAL_DETAIL))
    taxon = resolve_species("Cardinalis cardinalis", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    assert taxon.source == "inaturalist" and taxon.prompt == CARDINAL
    assert server.paths() == [f"{INAT}/taxa", f"{INAT}/taxa", f"{INAT}/taxa/9083"]


def test_persistent_errors_give_up_then_fall_back(server, tmp_path):
    server.answer(f"{INAT}/taxa", (503, {"error": "down"}))
    server.answer(f"{GBIF}/species/match", (429, {"error": "slow down"}))
    client = client_for(server, retries=2)
    taxon = resolve_species("Cardinalis cardinalis", offline=False, cache_dir=tmp_path,
                            client=client)
    assert taxon.source == "table" and taxon.prompt == CARDINAL
    assert server.paths() == [f"{INAT}/taxa"] * 3 + [f"{GBIF}/species/match"] * 3
    # Other client errors are not retried.
    server.requests.clear()
    server.answer(f"{INAT}/taxa", (422, {"error": "bad request"}))
    server.answer(f"{GBIF}/species/match", (400, {"error": "bad request"}))
    resolve_species("Calypte anna", offline=False, cache_dir=tmp_path, client=client)
    assert server.paths() == [f"{INAT}/taxa", f"{GBIF}/species/match"]


def test_unreachable_network_falls_back_to_table(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    client = TaxonomyClient(dead + INAT, dead + GBIF, backoff=0.01)
    taxon = resolve_species("Cardinalis cardinalis", offline=False, cache_dir=tmp_path,
                            client=client)
    assert taxon.source == "table" and taxon.prompt == CARDINAL
    with pytest.raises(TaxamapError) as err:
        resolve_species("Imaginaria nonexistens", offline=False, cache_dir=tmp_path,
                        client=client)
    assert "could not be reached" in str(err.value) and HINT in str(err.value)
    assert "\n" not in str(err.value)



def test_unreachable_network_falls_back_quietly_and_once(tmp_path, caplog):
    """No network: no warnings (the caller reports the table as the source), and each host is
    tried once per client, not once per species."""
    import logging

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    client = TaxonomyClient(dead + INAT, dead + GBIF, backoff=0.01)
    attempts = []
    real_get = client.session.get
    client.session.get = lambda url, **kw: attempts.append(url) or real_get(url, **kw)
    with caplog.at_level(logging.INFO, logger="taxamap.taxonomy"):
        for name in ("Cardinalis cardinalis", "Calypte anna"):
            taxon = resolve_species(name, offline=False, cache_dir=tmp_path, client=client)
            assert taxon.source == "table"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(attempts) == 1  # one refused connect to the shared host, then remembered


def test_dropped_connection_still_warns(tmp_path, caplog):
    """A server that accepts and hangs up is a flake, not a missing network: it is reported."""
    import logging
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def hang_up():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    live = f"http://127.0.0.1:{listener.getsockname()[1]}"
    client = TaxonomyClient(live + INAT, live + GBIF, backoff=0.01)
    try:
        with caplog.at_level(logging.INFO, logger="taxamap.taxonomy"):
            taxon = resolve_species("Cardinalis cardinalis", offline=False, cache_dir=tmp_path,
                                    client=client)
    finally:
        listener.close()
    assert taxon.source == "table"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_harmonize_ranks_rules():
    assert harmonize_ranks({"class": "Aves", "order": "Caprimulgiformes",
                            "family": "Apodidae"})["order"] == "Apodiformes"
    assert harmonize_ranks({"class": "Mammalia", "order": "Cetacea"})["order"] == "Artiodactyla"
    # Backbones that promote reptile orders to classes are folded back into Reptilia.
    assert harmonize_ranks({"class": "Squamata", "order": None}) == {"class": "Reptilia",
                                                                     "order": "Squamata"}
    unchanged = {"class": "Aves", "order": "Passeriformes", "family": "Cardinalidae"}
    assert harmonize_ranks(unchanged) == unchanged


def test_answer_in_unknown_shape_falls_back(server, tmp_path):
    server.answer(f"{INAT}/taxa", (200, ["not", "an", "object"]))
    server.answer(f"{GBIF}/species/match", (200, {"matchType": "EXACT", "species": 42}))
    taxon = resolve_species("Cardinalis cardinalis", offline=False, cache_dir=tmp_path,
                            client=client_for(server))
    assert taxon.source == "table" and taxon.prompt == CARDINAL
