"""Species name -> the seven-rank prompt TaxaBind's text encoder was trained on.

TaxaBind was trained on iNaturalist 2021 taxonomy strings, e.g.
``"Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"``. A user names a
species either by that full string (used as given) or by its binomial, which is resolved:

1. from the on-disk cache of earlier online answers;
2. online, from the iNaturalist taxa API (the taxonomy TaxaBind saw), then GBIF's backbone;
3. offline (``offline=True``, ``TAXAMAP_OFFLINE=1``, ``HF_HUB_OFFLINE=1``, or the network is down),
   from the table shipped in ``taxamap/data/taxonomy.csv``.

All HTTP goes through one :class:`TaxonomyClient`, which tests point at a local server.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import requests

from taxamap import __version__
from taxamap.errors import TaxamapError
from taxamap.io import DiskFull, atomic_write
from taxamap.sources import http

log = logging.getLogger(__name__)

INATURALIST_URL = "https://api.inaturalist.org/v1"
GBIF_URL = "https://api.gbif.org/v1"
USER_AGENT = http.USER_AGENT

#: The seven ranks of a prompt, in order.
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

#: First words that mark a full seven-rank string (iNaturalist's and GBIF's kingdoms).
KINGDOMS = frozenset(
    {"Animalia", "Plantae", "Fungi", "Chromista", "Protozoa", "Protista", "Bacteria", "Archaea",
     "Viruses"}
)

SEVEN_RANK_HINT = '--species "Kingdom Phylum Class Order Family Genus epithet"'

_WORD = re.compile(r"[A-Za-z][A-Za-z-]*\Z")
_TRUTHY = {"1", "true", "yes", "on"}

# Where other sources file taxa differently from iNaturalist (whose taxonomy TaxaBind learned).
# Applied to GBIF answers and to the shipped table; iNaturalist answers are taken as they are.
#: order name -> iNaturalist's order name.
ORDER_RENAMES: dict[str, str] = {
    "Cetartiodactyla": "Artiodactyla",
    "Cetacea": "Artiodactyla",  # iNaturalist: infraorder Cetacea inside order Artiodactyla
    "Soricomorpha": "Eulipotyphla",
    "Erinaceomorpha": "Eulipotyphla",
    "Crocodilia": "Crocodylia",
}
#: bird family -> iNaturalist's order (Clements checklist), whatever the source said.
FAMILY_ORDER: dict[str, str] = {
    "Trochilidae": "Apodiformes",
    "Apodidae": "Apodiformes",
    "Hemiprocnidae": "Apodiformes",
    "Tinamidae": "Tinamiformes",
    "Rheidae": "Rheiformes",
    "Casuariidae": "Casuariiformes",
    "Dromaiidae": "Casuariiformes",
    "Apterygidae": "Apterygiformes",
    "Struthionidae": "Struthioniformes",
}
#: Reptile orders that some backbones promote to classes; iNaturalist keeps class Reptilia.
_REPTILE_ORDERS = frozenset({"Squamata", "Testudines", "Crocodylia", "Crocodilia",
                             "Rhynchocephalia"})


@dataclass(frozen=True)
class Taxon:
    """A resolved species query.

    ``prompt`` is the seven-rank string fed to the text encoder; ``source`` says where it came
    from: "given" (the user typed all seven ranks), "inaturalist", "gbif", "table" (the shipped
    offline table) or "cache" (an earlier online answer stored on disk).
    """

    prompt: str
    binomial: str
    source: str
    common_name: str | None = None

    @property
    def ranks(self) -> dict[str, str]:
        """The prompt split into its seven named ranks ("species" is the epithet)."""
        return dict(zip(RANKS, self.prompt.split()))

    @property
    def slug(self) -> str:
        """A file-name stem, e.g. "cardinalis-cardinalis"."""
        return "-".join(self.binomial.lower().split())


class TaxonomyServiceError(Exception):
    """A taxonomy web service could not answer (network down, timeouts, HTTP error).

    ``unreachable`` is True when no connection could be made at all (no network, DNS failure,
    refused or timed-out connect): the caller falls back quietly instead of warning.
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class TaxonomyClient:
    """The one place taxamap's taxonomy code talks HTTP.

    Base URLs are configurable so tests (or a mirror) can stand in for iNaturalist and GBIF.
    The session (:func:`taxamap.sources.http.make_session`) retries 429, 5xx and read timeouts
    with backoff (``Retry-After`` honoured up to ``max_wait``); refused connections and DNS
    failures are not retried, so a machine without a network falls back to the offline table
    quickly. A ``session`` given by the caller is used as it is (its own retries, if any). A host that could not be connected
    to is not asked again by the same client.
    """

    def __init__(
        self,
        inaturalist_url: str = INATURALIST_URL,
        gbif_url: str = GBIF_URL,
        *,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (5.0, 10.0),
        retries: int = 2,
        backoff: float = 0.5,
        max_wait: float = 10.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.inaturalist_url = inaturalist_url.rstrip("/")
        self.gbif_url = gbif_url.rstrip("/")
        self.timeout = http.default_timeout(timeout)
        self.retries = retries
        if session is None:
            session = http.make_session(workers=4, retries=retries, connect_retries=0,
                                        backoff=backoff, max_backoff=max_wait,
                                        max_retry_after=max_wait, timeout=self.timeout)
        self.session = session
        self.session.headers["User-Agent"] = user_agent
        self.session.headers.setdefault("Accept", "application/json")
        self._unreachable: dict[str, str] = {}  # host -> why no connection could be made

    def get_json(self, url: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET ``url`` and decode its JSON body; raise :class:`TaxonomyServiceError` on failure."""
        host = urllib.parse.urlsplit(url).netloc
        if host in self._unreachable:
            raise TaxonomyServiceError(f"{url}: {self._unreachable[host]}", unreachable=True)
        try:
            response = self.session.get(url, params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            unreachable = _no_connection(exc)
            if unreachable is not None:
                # DNS failures, refused or timed-out connects: retrying would only delay the
                # fallback, and so would asking this host again.
                self._unreachable[host] = unreachable
                raise TaxonomyServiceError(f"{url}: {unreachable}", unreachable=True) from exc
            timed_out = "timeout" in type(exc).__name__.lower() or "Timeout" in str(exc)
            why = f"timed out ({exc.__class__.__name__})" if timed_out else \
                f"{exc.__class__.__name__}: {exc}"
            raise TaxonomyServiceError(f"{url}: {why}") from exc
        if response.status_code in http.RETRY_STATUS:
            raise TaxonomyServiceError(
                f"{url}: HTTP {response.status_code} after {self.retries + 1} attempts")
        if response.status_code != 200:
            raise TaxonomyServiceError(f"{url}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise TaxonomyServiceError(f"{url}: response is not JSON") from exc

    def inaturalist(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET an iNaturalist API path, e.g. ``"taxa"`` or ``"taxa/9083"``."""
        return self.get_json(f"{self.inaturalist_url}/{path.lstrip('/')}", params)

    def gbif(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET a GBIF API path, e.g. ``"species/match"``."""
        return self.get_json(f"{self.gbif_url}/{path.lstrip('/')}", params)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors inside it (requests wraps urllib3, which wraps the socket error)."""
    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        inner = seen.__cause__ or seen.__context__
        if inner is None:
            reason = getattr(seen, "reason", None)
            first = seen.args[0] if seen.args else None
            inner = reason if isinstance(reason, BaseException) else (
                first if isinstance(first, BaseException) else None)
        seen = inner
    return chain


def _no_connection(exc: BaseException) -> str | None:
    """Why no connection could be made (DNS, refused, connect timeout), or None for errors on a
    connection that was made (a dropped answer is a flake, not a missing network)."""
    import socket

    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    chain = _causes(exc)
    if not any(isinstance(e, (socket.gaierror, ConnectionRefusedError, NewConnectionError,
                              ConnectTimeoutError)) for e in chain):
        return None
    inner = chain[-1]
    return f"{inner.__class__.__name__}: {inner}"


# ---------------------------------------------------------------------------------------------
# Parsing user input


def normalize_binomial(text: str) -> str:
    """``"  cardinalis   CARDINALIS "`` -> ``"Cardinalis cardinalis"``.

    Raises TaxamapError when ``text`` is not two words of letters.
    """
    words = _words(text)
    if len(words) != 2:
        raise TaxamapError(
            f"species {text.strip()!r} is not a binomial (Genus epithet); give e.g. "
            f'--species "Cardinalis cardinalis" or the full seven ranks: {SEVEN_RANK_HINT}'
        )
    return f"{words[0].capitalize()} {words[1].lower()}"


def _words(text: str) -> list[str]:
    if not isinstance(text, str) or not text.strip():
        raise TaxamapError(f"species name is empty; give a binomial such as "
                           f'--species "Cardinalis cardinalis", or {SEVEN_RANK_HINT}')
    # iNaturalist 2021 folder names join ranks with underscores; accept them as spaces.
    words = text.replace("_", " ").split()
    bad = [w for w in words if not _WORD.match(w)]
    if bad:
        raise TaxamapError(
            f"species {text.strip()!r} contains {bad[0]!r}: names are letters only (no digits, "
            f'authors or punctuation), e.g. --species "Cardinalis cardinalis"'
        )
    return words


def parse_seven_rank(text: str) -> Taxon | None:
    """A full seven-rank string as a :class:`Taxon` (source "given"); None if not seven words.

    Spacing and capitalisation are tidied (ranks capitalised, epithet lower case), since the
    encoder was trained on that form; the taxonomy itself is used exactly as given.
    """
    words = _words(text)
    if len(words) != 7:
        return None
    kingdom = words[0].capitalize()
    if kingdom not in KINGDOMS:
        raise TaxamapError(
            f"species {text.strip()!r} has seven words but {words[0]!r} is not a kingdom "
            f"({', '.join(sorted(KINGDOMS))}); use {SEVEN_RANK_HINT}"
        )
    ranks = [w.capitalize() for w in words[:6]] + [words[6].lower()]
    return Taxon(prompt=" ".join(ranks), binomial=f"{ranks[5]} {ranks[6]}", source="given")


# ---------------------------------------------------------------------------------------------
# The shipped table


def harmonize_ranks(ranks: Mapping[str, str]) -> dict[str, str]:
    """Rename a source's higher ranks to iNaturalist's where they systematically differ.

    ``ranks`` maps kingdom/phylum/class/order/family/genus/species names; returns a new dict.
    """
    out = dict(ranks)
    if out.get("class") in _REPTILE_ORDERS:
        out["order"] = out.get("order") or out["class"]
        out["class"] = "Reptilia"
    order = out.get("order")
    if order in ORDER_RENAMES:
        out["order"] = ORDER_RENAMES[order]
    if out.get("class") == "Aves" and out.get("family") in FAMILY_ORDER:
        out["order"] = FAMILY_ORDER[out["family"]]
    return out


def _table_text() -> str:
    return resources.files("taxamap").joinpath("data/taxonomy.csv").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _table() -> dict[str, Taxon]:
    rows = csv.DictReader(_table_text().splitlines())
    table: dict[str, Taxon] = {}
    for row in rows:
        binomial = f"{row['genus']} {row['species']}"
        prompt = " ".join(row[rank] for rank in RANKS)
        table[binomial.lower()] = Taxon(prompt, binomial, "table", row.get("common_name") or None)
    return table


def lookup_table(binomial: str) -> Taxon | None:
    """The shipped table's entry for ``binomial`` (any case and spacing), or None."""
    return _table().get(normalize_binomial(binomial).lower())


def list_table_species() -> list[str]:
    """Every binomial in the shipped offline table, sorted."""
    return sorted(t.binomial for t in _table().values())


# ---------------------------------------------------------------------------------------------
# Online sources


def lookup_inaturalist(binomial: str, client: TaxonomyClient) -> Taxon | None:
    """Resolve through iNaturalist's taxa API; None when it has no such species.

    The search endpoint returns ``ancestor_ids`` only, so the matched taxon is fetched by id for
    its ``ancestors`` (each with ``rank`` and ``name``).
    """
    answer = client.inaturalist(
        "taxa", {"q": binomial, "rank": "species", "is_active": "true", "per_page": 30}
    )
    match = _pick_inaturalist(answer.get("results") or [], binomial)
    if match is None:
        return None
    ancestors = match.get("ancestors")
    if not ancestors:
        detail = client.inaturalist(f"taxa/{int(match['id'])}").get("results") or [{}]
        ancestors = detail[0].get("ancestors")
        if not ancestors and detail[0].get("ancestor_ids"):
            ids = [i for i in detail[0]["ancestor_ids"] if i != match["id"]]
            ancestors = client.inaturalist(f"taxa/{','.join(str(int(i)) for i in ids)}").get(
                "results"
            )
    by_rank = {a.get("rank"): a.get("name") for a in ancestors or []}
    name_words = str(match["name"]).split()
    if len(name_words) != 2:
        return None
    by_rank["genus"], by_rank["species"] = name_words
    taxon = _taxon_from_ranks(by_rank, "inaturalist", match.get("preferred_common_name"))
    if taxon is None:
        log.info("iNaturalist's %s lacks one of the seven ranks: %s", match["name"], by_rank)
    return taxon


def _pick_inaturalist(results: list[dict], binomial: str) -> dict | None:
    wanted = binomial.lower()
    species = [r for r in results if r.get("rank") == "species" and r.get("is_active", True)]
    for key in ("name", "matched_term"):  # the accepted name first, then a matched synonym
        for result in species:
            if str(result.get(key, "")).lower() == wanted:
                return result
    return None


def lookup_gbif(binomial: str, client: TaxonomyClient) -> Taxon | None:
    """Resolve through GBIF's backbone (``/species/match``); None without a species-level match.

    Exact matches and confident fuzzy ones (misspellings) are accepted; synonyms resolve to the
    accepted species. GBIF's higher ranks are renamed to iNaturalist's (:func:`harmonize_ranks`).
    """
    answer = client.gbif("species/match", {"name": binomial, "strict": "false"})
    match_type = answer.get("matchType", "NONE")
    if match_type not in ("EXACT", "FUZZY") or not answer.get("species"):
        return None
    if match_type == "FUZZY" and answer.get("confidence", 0) < 90:
        return None
    words = str(answer["species"]).split()
    if len(words) != 2:
        return None
    ranks = {rank: answer.get(rank) for rank in RANKS[:5]}
    ranks["genus"], ranks["species"] = words
    return _taxon_from_ranks(harmonize_ranks(ranks), "gbif", None)


def _taxon_from_ranks(ranks: Mapping[str, Any], source: str, common: str | None) -> Taxon | None:
    values = [ranks.get(rank) for rank in RANKS]
    if not all(isinstance(v, str) and _WORD.match(v) for v in values):
        return None
    return Taxon(" ".join(values), f"{values[5]} {values[6]}", source, common or None)


# ---------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``<cache root>/taxonomy``: ``$TAXAMAP_CACHE/taxonomy``, else the user cache dir's."""
    from taxamap.paths import cache_subdir

    return cache_subdir("taxonomy")


def _cache_path(cache_dir: Path, binomial: str) -> Path:
    # Binomials are validated to letters and hyphens, so this is a safe file name.
    return cache_dir / f"{binomial.lower().replace(' ', '_')}.json"


def _read_cache(cache_dir: Path, binomial: str) -> Taxon | None:
    path = _cache_path(cache_dir, binomial)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        taxon = _taxon_from_ranks(dict(zip(RANKS, data["prompt"].split())), "cache",
                                  data.get("common_name"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable taxonomy cache entry %s (%s)", path, exc)
        return None
    return taxon


def _write_cache(cache_dir: Path, query: str, taxon: Taxon) -> None:
    record = {**asdict(taxon), "query": query, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime()),
              "taxamap": __version__}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(_cache_path(cache_dir, query), json.dumps(record, indent=1))
    except (OSError, DiskFull) as exc:
        # A read-only or full cache only costs a repeat lookup next time.
        log.warning("could not cache taxonomy answer in %s (%s)", cache_dir, exc)


# ---------------------------------------------------------------------------------------------
# The entry point


def offline_variables() -> list[str]:
    """Which of ``TAXAMAP_OFFLINE`` and ``HF_HUB_OFFLINE`` are set to a true value (messages name
    the one actually set)."""
    return [name for name in ("TAXAMAP_OFFLINE", "HF_HUB_OFFLINE")
            if os.environ.get(name, "").strip().lower() in _TRUTHY]


def offline_requested() -> bool:
    """True when ``TAXAMAP_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return bool(offline_variables())


@lru_cache(maxsize=1)
def _default_client() -> TaxonomyClient:
    """The client of a process's lookups, shared so an unreachable host is tried only once per
    run (a species file on a machine without a network)."""
    return TaxonomyClient()


def resolve_species(
    text: str,
    *,
    offline: bool | None = None,
    cache_dir: Path | None = None,
    client: TaxonomyClient | None = None,
) -> Taxon:
    """Turn ``--species`` text into the seven-rank prompt.

    ``text`` is a binomial (any case, any spacing) or a full seven-rank string (used as given).
    ``offline=None`` reads ``TAXAMAP_OFFLINE`` / ``HF_HUB_OFFLINE``. Raises TaxamapError with a
    one-line fix for malformed input and for species that cannot be resolved.
    """
    given = parse_seven_rank(text)
    if given is not None:
        return given
    binomial = normalize_binomial(text)
    if offline is None:
        offline = offline_requested()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    cached = _read_cache(cache_dir, binomial)
    if cached is not None:
        return cached

    failure = None
    if not offline:
        client = client if client is not None else _default_client()
        for lookup in (lookup_inaturalist, lookup_gbif):
            try:
                taxon = lookup(binomial, client)
            except TaxonomyServiceError as exc:
                failure = str(exc)
                # No network at all is the common offline case: the caller reports the table as
                # the source, so stay quiet. A service that answers badly deserves a warning.
                (log.info if exc.unreachable else log.warning)(
                    "taxonomy lookup failed, trying the next source: %s", exc)
                continue
            except (LookupError, TypeError, ValueError, AttributeError) as exc:
                # An answer in a shape we do not know: treat the service as unavailable.
                failure = f"{lookup.__name__}: unexpected answer ({exc.__class__.__name__}: {exc})"
                log.warning("taxonomy lookup failed, trying the next source: %s", failure)
                continue
            if taxon is not None:
                _write_cache(cache_dir, binomial, taxon)
                return taxon

    taxon = lookup_table(binomial)
    if taxon is not None:
        return taxon
    if offline:
        where = "offline, and it is not in taxamap's built-in table"
    elif failure:
        where = f"the taxonomy services could not be reached ({failure}) and it is not in the " \
                "built-in table"
    else:
        where = "not found in iNaturalist, GBIF or the built-in table (check the spelling)"
    raise TaxamapError(
        f'unknown species "{binomial}": {where}; give all seven ranks instead: {SEVEN_RANK_HINT}'
    )


__all__ = [
    "GBIF_URL",
    "INATURALIST_URL",
    "KINGDOMS",
    "Taxon",
    "TaxonomyClient",
    "TaxonomyServiceError",
    "harmonize_ranks",
    "list_table_species",
    "lookup_gbif",
    "lookup_inaturalist",
    "lookup_table",
    "normalize_binomial",
    "offline_requested",
    "parse_seven_rank",
    "resolve_species",
]
