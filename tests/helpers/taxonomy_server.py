"""A real HTTP server on 127.0.0.1 that answers like iNaturalist's and GBIF's APIs (for tests).

Bodies follow the public response shapes: iNaturalist ``GET /v1/taxa?q=..`` returns
``{"total_results", "page", "per_page", "results": [taxon]}`` whose taxa carry ``ancestor_ids`` but
no ``ancestors``; ``GET /v1/taxa/{id}`` returns the same envelope with ``ancestors`` (each with
``id``, ``rank``, ``name``). GBIF ``GET /v1/species/match?name=..`` returns one flat object with
``usageKey, scientificName, canonicalName, rank, status, confidence, matchType, kingdom, phylum,
class, order, family, genus, species`` and their ``*Key`` ids, or ``{"matchType": "NONE", ...}``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

INAT = "/inat/v1"
GBIF = "/gbif/v1"


def inat_taxon(taxon_id: int, name: str, rank: str, common: str | None = None, **extra) -> dict:
    """An iNaturalist taxon record (the fields taxamap reads plus a few real neighbours)."""
    rank_levels = {"kingdom": 70, "phylum": 60, "subphylum": 57, "class": 50, "order": 40,
                   "family": 30, "subfamily": 27, "tribe": 25, "genus": 20, "species": 10,
                   "stateofmatter": 100}
    record = {"id": taxon_id, "name": name, "rank": rank, "rank_level": rank_levels[rank],
              "is_active": True, "extinct": False, "iconic_taxon_name": "Aves"}
    if common:
        record["preferred_common_name"] = common
    record.update(extra)
    return record


def inat_species(taxon_id: int, name: str, common: str, lineage: list[tuple[int, str, str]],
                 matched_term: str | None = None) -> tuple[dict, dict]:
    """(search response, detail response) for a species with ``lineage`` = [(id, rank, name)]."""
    ids = [i for i, _, _ in lineage] + [taxon_id]
    base = dict(ancestor_ids=ids, ancestry="/".join(str(i) for i in ids[:-1]),
                parent_id=ids[-2], observations_count=1234)
    search_hit = inat_taxon(taxon_id, name, "species", common,
                            matched_term=matched_term or name, **base)
    detail = inat_taxon(taxon_id, name, "species", common, **base)
    detail["ancestors"] = [inat_taxon(i, n, r) for i, r, n in lineage]
    envelope = lambda results: {"total_results": len(results), "page": 1,  # noqa: E731
                                "per_page": max(len(results), 1), "results": results}
    return envelope([search_hit]), envelope([detail])


CARDINAL_SEARCH, CARDINAL_DETAIL = inat_species(
    9083, "Cardinalis cardinalis", "Northern Cardinal",
    [(48460, "stateofmatter", "Life"), (1, "kingdom", "Animalia"), (2, "phylum", "Chordata"),
     (355675, "subphylum", "Vertebrata"), (3, "class", "Aves"), (7251, "order", "Passeriformes"),
     (9079, "family", "Cardinalidae"), (9082, "genus", "Cardinalis")],
)

HUMMINGBIRD_SEARCH, HUMMINGBIRD_DETAIL = inat_species(
    6359, "Calypte anna", "Anna's Hummingbird",
    [(48460, "stateofmatter", "Life"), (1, "kingdom", "Animalia"), (2, "phylum", "Chordata"),
     (355675, "subphylum", "Vertebrata"), (3, "class", "Aves"), (6544, "order", "Apodiformes"),
     (5767, "family", "Trochilidae"), (1244, "subfamily", "Trochilinae"),
     (1296, "tribe", "Mellisugini"), (6358, "genus", "Calypte")],
)

NO_RESULTS = {"total_results": 0, "page": 1, "per_page": 30, "results": []}


def gbif_match(kingdom, phylum, klass, order, family, genus, species, *, match_type="EXACT",
               confidence=99, status="ACCEPTED") -> dict:
    """A GBIF /species/match answer for a species."""
    return {
        "usageKey": 2490384, "scientificName": f"{species} (Linnaeus, 1758)",
        "canonicalName": species, "rank": "SPECIES", "status": status, "confidence": confidence,
        "matchType": match_type, "kingdom": kingdom, "phylum": phylum, "order": order,
        "family": family, "genus": genus, "species": species, "kingdomKey": 1, "phylumKey": 44,
        "classKey": 212, "orderKey": 729, "familyKey": 9285, "genusKey": 2490381,
        "speciesKey": 2490384, "synonym": status == "SYNONYM", "class": klass,
    }


GBIF_NONE = {"confidence": 100, "matchType": "NONE", "synonym": False}


class TaxonomyServer:
    """Serves queued answers per path; records every request (path, query, headers).

    ``answer(path, *responses)`` queues (status, body) pairs for ``path`` (query string ignored);
    the last one repeats. Unknown paths get 404.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self._answers: dict[str, list[tuple[int, object]]] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                parts = urlsplit(self.path)
                with server._lock:
                    server.requests.append((parts.path, parse_qs(parts.query), dict(self.headers)))
                    queue = server._answers.get(parts.path)
                    status, body = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue \
                        else (404, {"error": "not found"})
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        self.base = f"http://{host}:{port}"
        self.inaturalist_url = self.base + INAT
        self.gbif_url = self.base + GBIF

    def answer(self, path: str, *responses: tuple[int, object]) -> None:
        with self._lock:
            self._answers[path] = list(responses)

    def paths(self) -> list[str]:
        with self._lock:
            return [p for p, _, _ in self.requests]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
