"""A real HTTP server on 127.0.0.1 answering like GBIF's occurrence search API (for tests).

Shapes follow GBIF's public API: ``GET /v1/species/match?name=..`` returns one flat object
(``usageKey, scientificName, canonicalName, rank, status, matchType, confidence, species, ...``);
``GET /v1/occurrence/search?taxonKey=..&offset=..&limit=..`` returns
``{"offset", "limit", "endOfRecords", "count", "results": [occurrence], "facets": []}`` with at
most 300 results per page; each occurrence carries ``key``, ``gbifID`` (a string),
``decimalLatitude``, ``decimalLongitude``, ``eventDate``, ``basisOfRecord`` and more.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

BASE = "/gbif/v1"
MAX_PAGE = 300


def occurrence(i: int, lat: float, lon: float, taxon_key: int = 2293456) -> dict:
    """One occurrence record with the fields GBIF's search returns (a realistic subset)."""
    return {
        "key": 4000000000 + i, "gbifID": str(4000000000 + i),
        "datasetKey": "50c9509d-22c7-4a22-a47d-8c48425ef4a7",
        "occurrenceID": f"https://www.inaturalist.org/observations/{1000 + i}",
        "basisOfRecord": "HUMAN_OBSERVATION", "taxonKey": taxon_key, "speciesKey": taxon_key,
        "scientificName": "Ariolimax buttoni (Pilsbry & Vanatta, 1896)",
        "species": "Ariolimax buttoni", "decimalLatitude": lat, "decimalLongitude": lon,
        "coordinateUncertaintyInMeters": 25.0, "countryCode": "US", "year": 2020,
        "eventDate": "2020-03-14T10:21:00", "issues": [], "license":
        "http://creativecommons.org/licenses/by-nc/4.0/legalcode",
        "hasGeospatialIssues": False,
    }


class OccurrenceServer:
    """Serves ``records`` (list of occurrence dicts) for ``taxon_key``, paged like GBIF.

    ``fail_first``: HTTP statuses answered to the first occurrence-search requests (e.g.
    ``[503, 429]``) before the real pages; ``match``: the species/match answer.
    Every request is recorded as (path, query dict, headers).
    """

    def __init__(self, records: list[dict], match: dict | None = None,
                 fail_first: list[int] | None = None) -> None:
        self.records = records
        self.match = match if match is not None else {
            "usageKey": 2293456, "scientificName": "Ariolimax buttoni (Pilsbry & Vanatta, 1896)",
            "canonicalName": "Ariolimax buttoni", "rank": "SPECIES", "status": "ACCEPTED",
            "confidence": 99, "matchType": "EXACT", "kingdom": "Animalia", "phylum": "Mollusca",
            "order": "Stylommatophora", "family": "Ariolimacidae", "genus": "Ariolimax",
            "species": "Ariolimax buttoni", "speciesKey": 2293456, "synonym": False,
            "class": "Gastropoda",
        }
        self.fail_first = list(fail_first or [])
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                with server._lock:
                    server.requests.append((parts.path, query, dict(self.headers)))
                status, body = server._answer(parts.path, query)
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
        self.gbif_url = f"http://{host}:{port}{BASE}"

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, object]:
        if path == BASE + "/species/match":
            return 200, self.match
        if path != BASE + "/occurrence/search":
            return 404, {"error": "not found"}
        with self._lock:
            if self.fail_first:
                return self.fail_first.pop(0), {"error": "try later"}
        offset = int(query.get("offset", ["0"])[0])
        limit = min(int(query.get("limit", ["20"])[0]), MAX_PAGE)
        key = int(query.get("taxonKey", ["0"])[0])
        matching = [r for r in self.records if r["taxonKey"] == key]
        page = matching[offset:offset + limit]
        return 200, {"offset": offset, "limit": limit,
                     "endOfRecords": offset + limit >= len(matching),
                     "count": len(matching), "results": page, "facets": []}

    def search_requests(self) -> list[dict[str, list[str]]]:
        with self._lock:
            return [q for p, q, _ in self.requests if p.endswith("/occurrence/search")]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
