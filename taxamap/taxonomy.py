"""Species name -> the seven-rank prompt TaxaBind's text encoder was trained on.

TaxaBind was trained on iNaturalist 2021 taxonomy strings, e.g.
``"Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"``. A user names a
species either by that full string (used as given) or by its binomial, which is resolved:

1. from the on-disk cache of earlier online answers;
2. online, from the iNaturalist taxa API (the taxonomy TaxaBind saw), then GBIF's backbone;
3. offline (``offline=True``, ``TAXAMAP_OFFLINE=1``, ``HF_HUB_OFFLINE=1``, or the network is down),
   from the table shipped in ``taxamap/data/taxonomy.csv``.

A common name ("Northern Cardinal") of that table stands for its binomial; one the table lacks is
asked of iNaturalist. A name nobody knows is refused with the closest names ("did you mean ...?"),
ranked by :func:`search_table`'s rules (the web app's search uses the same), from the table and,
online, from iNaturalist's autocomplete and GBIF's name suggestions.

All HTTP goes through one :class:`TaxonomyClient`, which tests point at a local server.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import os
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import requests

from taxamap.version import __version__
from taxamap.errors import TaxamapError
from taxamap.grids import normalize_name
from taxamap.io import DiskFull, atomic_write
from taxamap import http
from taxamap.surface import option

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

#: The form of a full seven-rank name, as an example value.
SEVEN_RANKS = "Kingdom Phylum Class Order Family Genus epithet"

#: Least similarity (difflib ratio of the normalised names) for a "did you mean" suggestion.
SIMILAR = 0.8


def seven_rank_hint() -> str:
    """How the caller gives all seven ranks: ``--species "Kingdom ..."`` on the CLI,
    ``species="Kingdom ..."`` in Python, the species box on the web page."""
    return option("species", SEVEN_RANKS)

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
    #: The rank the prompt ends at: "species" for the seven ranks, else the rank of a clade's
    #: prompt (a prefix of the ranks: "family" for "Animalia ... Passeriformes Cardinalidae"),
    #: whose ``binomial`` is then the clade's own name ("Cardinalidae").
    rank: str = "species"

    @property
    def ranks(self) -> dict[str, str]:
        """The prompt split into its named ranks ("species" is the epithet; a clade's prompt
        has the ranks down to its own)."""
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
    The session (:func:`taxamap.http.make_session`) retries 429, 5xx and read timeouts
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
            f'{option("species", "Cardinalis cardinalis")} or the full seven ranks: '
            f"{seven_rank_hint()}"
        )
    return f"{words[0].capitalize()} {words[1].lower()}"


def _words(text: str) -> list[str]:
    if not isinstance(text, str) or not text.strip():
        raise TaxamapError(f"species name is empty; give a binomial such as "
                           f'{option("species", "Cardinalis cardinalis")}, or {seven_rank_hint()}')
    # iNaturalist 2021 folder names join ranks with underscores; accept them as spaces.
    words = text.replace("_", " ").split()
    bad = [w for w in words if not _WORD.match(w)]
    if bad:
        raise TaxamapError(
            f"species {text.strip()!r} contains {bad[0]!r}: names are letters only (no digits, "
            f'authors or punctuation), e.g. {option("species", "Cardinalis cardinalis")}'
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
            f"({', '.join(sorted(KINGDOMS))}); use {seven_rank_hint()}"
        )
    ranks = [w.capitalize() for w in words[:6]] + [words[6].lower()]
    return Taxon(prompt=" ".join(ranks), binomial=f"{ranks[5]} {ranks[6]}", source="given")


def parse_rank_prefix(text: str) -> Taxon | None:
    """A clade given by the first one to six of the seven ranks, kingdom first
    (``"Animalia Chordata Aves Passeriformes Cardinalidae"``), as a :class:`Taxon` whose prompt
    is that prefix and whose ``rank`` is the last rank given; None when ``text`` is not such a
    prefix (its first word is not a kingdom, or it is a binomial such as ``"Bacteria peruviana"``,
    a stick insect).

    Ranks the shipped table knows are spelt as the table spells them (source "table"); a rank
    the table lacks under a known parent is accepted as given (source "given": the table is not
    the tree of life) unless it is a near miss of one the table has, which is refused with the
    names it may have meant.
    """
    words = text.replace("_", " ").split() if isinstance(text, str) else []
    if (not 1 <= len(words) <= 6 or words[0].capitalize() not in KINGDOMS
            or not all(_WORD.match(w) for w in words)):
        return None
    prefixes = _table_prefixes()
    known = prefixes.get(" ".join(words).lower())
    # Two words after a kingdom's name may be a binomial of a genus named like it (Bacteria is a
    # genus of stick insects): a clade's second rank is capitalised, an epithet is not.
    if len(words) == 2 and known is None and not words[1][:1].isupper():
        return None
    rank = RANKS[len(words) - 1]
    if known is not None:
        return Taxon(prompt=known, binomial=known.split()[-1], source="table", rank=rank)
    given = [w.capitalize() for w in words]
    close = close_rank_prefixes(" ".join(given))
    if close:
        raise TaxamapError(
            f'"{" ".join(given)}" is not a clade taxamap\'s table knows; did you mean '
            f"{' or '.join(repr(c) for c in close)}? Give the ranks from the kingdom down, e.g. "
            f'{option("species", "Animalia Chordata Aves Passeriformes Cardinalidae")}')
    return Taxon(prompt=" ".join(given), binomial=given[-1], source="given", rank=rank)


def rank_prefixes(prompts: Sequence[str]) -> dict[str, str]:
    """Every clade of ``prompts`` (seven-rank strings) as a rank prefix of one to six ranks:
    lower case -> its spelling in the prompts."""
    out: dict[str, str] = {}
    for prompt in prompts:
        words = prompt.split()
        for n in range(1, min(len(words), 7)):
            prefix = " ".join(words[:n])
            out.setdefault(prefix.lower(), prefix)
    return out


@lru_cache(maxsize=1)
def _table_prefixes() -> dict[str, str]:
    """The clades of the shipped table (:func:`rank_prefixes` of its prompts)."""
    return rank_prefixes([t.prompt for t in _table().values()])


def table_clade(prefix: str) -> str | None:
    """The table's spelling of the clade ``prefix`` (one to six ranks, any case and spacing),
    or None when no species of the table is in it."""
    return _table_prefixes().get(" ".join(str(prefix).replace("_", " ").split()).lower())


#: Least similarity (difflib ratio) of a rank name to one of the table's for a "did you mean":
#: lower than :data:`SIMILAR`, since rank names are short ("Avez" is 0.75 alike to "Aves").
SIMILAR_RANK = 0.7


def close_rank_prefixes(prefix: str, known: Mapping[str, str] | None = None, limit: int = 3,
                        cutoff: float = SIMILAR_RANK) -> list[str]:
    """Clades of ``known`` (:func:`rank_prefixes`; default the table's) that ``prefix`` (ranks
    from the kingdom down) may have meant, the most alike first: clades of as many ranks that
    share its ranks as far as ``known`` has them and whose next rank is at least ``cutoff``
    alike to its own. Empty when ``prefix`` is a clade of ``known`` or none is alike."""
    known = _table_prefixes() if known is None else known
    words = " ".join(str(prefix).replace("_", " ").split()).lower().split()
    depth = 0
    while depth < len(words) and " ".join(words[:depth + 1]) in known:
        depth += 1
    if depth == len(words):
        return []
    parent = " ".join(words[:depth])
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(" ".join(words))
    scored = []
    for key, spelt in known.items():
        parts = key.split()
        if len(parts) != len(words) or (depth and not key.startswith(parent + " ")):
            continue
        if difflib.SequenceMatcher(None, parts[depth], words[depth]).ratio() < cutoff:
            continue
        matcher.set_seq1(key)
        scored.append((-matcher.ratio(), spelt))
    return [spelt for _, spelt in sorted(scored)[:limit]]


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


def table_taxa() -> list[Taxon]:
    """Every species of the shipped offline table, sorted by binomial (the default reference
    panel: :mod:`taxamap.panel`)."""
    return sorted(_table().values(), key=lambda t: t.binomial)


@lru_cache(maxsize=1)
def _common_names() -> dict[str, list[Taxon]]:
    index: dict[str, list[Taxon]] = {}
    for taxon in _table().values():
        if taxon.common_name:
            index.setdefault(normalize_name(taxon.common_name), []).append(taxon)
    return index


def lookup_common_name(text: str) -> list[Taxon]:
    """The shipped table's species whose common name is ``text`` ("northern cardinal", case,
    accents, hyphens and apostrophes ignored): usually one, several where species share a name,
    none when the table has no such name."""
    return list(_common_names().get(normalize_name(text), ()))


# ---------------------------------------------------------------------------------------------
# Ranking names against what a person typed (the web app's suggestions and "did you mean")


def _phrase_match(query: tuple[str, ...], name: tuple[str, ...]) -> tuple[int, int] | None:
    """Where ``query``'s words occur in ``name``'s, the last one possibly still being typed, as
    (tier, ends): tier 0 the whole name, 1 whole words from its start, 2 whole words inside it,
    3 from its start with the last word partly typed, 4 inside it so; ``ends`` is 0 when the
    match reaches the name's last word (its head noun: "robin" in "American Robin" rather than
    in "Robin-chat"). None when the words do not occur."""
    k, best = len(query), None
    for i in range(len(name) - k + 1):
        if name[i:i + k - 1] != query[:-1]:
            continue
        last = name[i + k - 1]
        if last == query[-1]:
            tier = 0 if i == 0 and k == len(name) else 1 if i == 0 else 2
        elif last.startswith(query[-1]):
            tier = 3 if i == 0 else 4
        else:
            continue
        found = (tier, 0 if i + k == len(name) else 1)
        best = found if best is None or found < best else best
    return best


def _letter_counts(names: Sequence[str]):
    """(len(names), 128) counts of each character of each (normalised, ASCII) name."""
    import numpy as np

    counts = np.zeros((len(names), 128), np.int16)
    for row, name in enumerate(names):
        codes = np.frombuffer(name.encode("ascii", "ignore"), np.uint8)
        counts[row] = np.bincount(codes, minlength=128)[:128]
    return counts


def _alike(key: str, rows: "_Keyed", counts=None) -> list[tuple[float, int, int]]:
    """(ratio, row, name) of the names of ``rows`` at least :data:`SIMILAR` alike to ``key``
    (difflib's ratio). ``counts`` (:func:`_letter_counts` of the names, row by row) bound every
    ratio at once, as difflib's quick_ratio does one by one, so few pairs are compared in full."""
    import numpy as np

    flat = [(i, j, name) for i, names in enumerate(rows) for j, (name, _) in enumerate(names)]
    if counts is None:
        counts = _letter_counts([name for _, _, name in flat])
    query = _letter_counts([key])[0]
    bound = 2.0 * np.minimum(counts, query).sum(axis=1) / (counts.sum(axis=1) + len(key))
    matcher = difflib.SequenceMatcher(None)
    matcher.set_seq2(key)  # the cached side, as in difflib.get_close_matches
    found = []
    for k in np.flatnonzero(bound >= SIMILAR):
        i, j, name = flat[k]
        matcher.set_seq1(name)
        ratio = matcher.ratio()
        if ratio >= SIMILAR:
            found.append((ratio, i, j))
    return found


_Keyed = Sequence[tuple[tuple[str, tuple[str, ...]], ...]]


def _keyed(names: Sequence[Sequence[str | None]]) -> list[tuple[tuple[str, tuple[str, ...]], ...]]:
    """Each row's names as (normalised key, its words), empty names left out."""
    rows = []
    for row in names:
        keys = (normalize_name(n) for n in row if n)
        rows.append(tuple((k, tuple(k.split())) for k in keys if k))
    return rows


def _rank(query: str, rows: _Keyed, limit: int | None = None,
          counts=None) -> list[tuple[int, int]]:
    """(row, name) indexes of the ``rows`` that match ``query``, best first: exact names, then
    whole words from a name's start, whole words inside it (ending the name first), a partly
    typed last word from the start, then inside, then the text anywhere; when nothing matches
    so (a misspelling of four letters or more), the names at least :data:`SIMILAR` alike, most
    alike first. Ties go alphabetically. ``counts``: the names' :func:`_letter_counts`, if known."""
    key = normalize_name(query)
    words = tuple(key.split())
    if not words:
        return []
    scored = []
    for i, names in enumerate(rows):
        best = None
        for j, (name, name_words) in enumerate(names):
            if key not in name:  # every word match is also a substring: skip the rest quickly
                continue
            found = _phrase_match(words, name_words) or (5, 1)
            candidate = (*found, 0.0, name, j)
            best = candidate if best is None or candidate < best else best
        if best is not None:
            scored.append((best, i))
    if not scored and len(key) >= 4:
        best_of: dict[int, tuple] = {}
        for ratio, i, j in _alike(key, rows, counts):
            candidate = (6, 1, -ratio, rows[i][j][0], j)
            if i not in best_of or candidate < best_of[i]:
                best_of[i] = candidate
        scored = [(best, i) for i, best in best_of.items()]
    scored.sort()
    return [(i, best[-1]) for best, i in scored[:limit]]


def rank_names(query: str, names: Sequence[Sequence[str | None]],
               limit: int | None = None) -> list[int]:
    """Indexes of ``names`` (rows of alternative names, e.g. (binomial, common name)) that match
    ``query`` as a person types it, best first (see :func:`search_table`)."""
    return [i for i, _ in _rank(query, _keyed(names), limit)]


@lru_cache(maxsize=1)
def _search_rows() -> tuple[list[Taxon], list]:
    taxa = sorted(_table().values(), key=lambda t: t.binomial)
    return taxa, _keyed([(t.binomial, t.common_name) for t in taxa])


@lru_cache(maxsize=1)
def _search_counts():
    _, rows = _search_rows()
    return _letter_counts([name for names in rows for name, _ in names])


def search_table(query: str, limit: int | None = 20) -> list[Taxon]:
    """The shipped table's species matching ``query`` by scientific or common name, best first:
    exact names, whole words ("robin" finds American Robin before *Marmosa robinsoni*), names
    being typed, the text anywhere; failing those, similar spellings ("Cardinalis cardinalus")."""
    taxa, rows = _search_rows()
    return [taxa[i] for i, _ in _rank(query, rows, limit, _search_counts())]


def _suggestions(query: str, online: Sequence[tuple[str, str | None]] = (),
                 limit: int = 3) -> list[str]:
    """Names to offer for an unknown ``query``: the shipped table's and the online services'
    candidates ranked together (as the name matched: a mistyped common name gets common names),
    then any other online candidates (the services match in ways the ranking cannot)."""
    taxa, rows = _search_rows()
    known = {t.binomial.lower() for t in taxa}
    extra = [(b, c) for b, c in dict(online).items() if b.lower() not in known]
    names = [(t.binomial, t.common_name) for t in taxa] + extra
    import numpy as np

    more = _keyed(extra)
    counts = np.vstack([_search_counts(),
                        _letter_counts([name for names in more for name, _ in names])])
    shown, ranked = [], set()
    for i, j in _rank(query, rows + more, limit, counts):
        binomial, common = names[i]
        ranked.add(i)
        shown.append(_shown(common, binomial) if j == 1 else _shown(binomial, common))
    shown += [_shown(b, c) for k, (b, c) in enumerate(extra) if len(taxa) + k not in ranked]
    return shown[:limit]


def _shown(name: str, other: str | None) -> str:
    return f'"{name}" ({other})' if other else f'"{name}"'


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
    wanted = normalize_name(binomial)
    species = [r for r in results if r.get("rank") == "species" and r.get("is_active", True)]
    # The accepted name first, then a matched synonym or common name, then the English name.
    for key in ("name", "matched_term", "preferred_common_name"):
        for result in species:
            if normalize_name(str(result.get(key) or "")) == wanted:
                return result
    return None


def online_suggestions(query: str, client: TaxonomyClient) -> list[tuple[str, str | None]]:
    """Species the online services offer for ``query`` (iNaturalist's taxa autocomplete, GBIF's
    name suggestions) as (binomial, common name) pairs; a service that cannot answer adds none."""
    found: dict[str, str | None] = {}
    asks = (
        (client.inaturalist, "taxa/autocomplete",
         {"q": query, "rank": "species", "is_active": "true", "per_page": 10}, "name",
         "preferred_common_name"),
        (client.gbif, "species/suggest", {"q": query, "rank": "SPECIES", "limit": 10},
         "canonicalName", None),
    )
    for get, path, params, name_field, common_field in asks:
        try:
            answer = get(path, params)
            records = answer.get("results") if isinstance(answer, dict) else answer
            for record in records or []:
                name = " ".join(str(record.get(name_field) or "").split())
                if str(record.get("rank", "")).lower() != "species" or not _is_binomial(name):
                    continue
                common = record.get(common_field) if common_field else None
                found.setdefault(name, str(common) if common else None)
        except TaxonomyServiceError as exc:
            log.info("no suggestions from %s: %s", path, exc)
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            log.info("no suggestions from %s: unexpected answer (%s)", path, exc)
    return list(found.items())


def _is_binomial(text: str) -> bool:
    words = text.split()
    return len(words) == 2 and all(_WORD.match(w) for w in words)


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
    if not _is_binomial(binomial):
        # A common name: normalised to letters, digits and spaces, a safe file name too.
        return cache_dir / f"common_{normalize_name(binomial).replace(' ', '_')}.json"
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
    suggest: bool = True,
) -> Taxon:
    """Turn ``--species`` text into the seven-rank prompt.

    ``text`` is a binomial (any case, any spacing), a common name ("Northern Cardinal": the
    shipped table's, or online iNaturalist's), a full seven-rank string (used as given) or a
    clade: the first one to six ranks from the kingdom down (:func:`parse_rank_prefix`), whose
    map is that prefix's prompt.
    ``offline=None`` reads ``TAXAMAP_OFFLINE`` / ``HF_HUB_OFFLINE``. Raises TaxamapError with a
    one-line fix for malformed input and for species that cannot be resolved, offering the
    closest names ("did you mean ...?") of the table and, online, of iNaturalist and GBIF
    (``suggest=False`` skips them: a species file reports its unknown names all at once).
    """
    if isinstance(text, str) and text.strip() and _table_entry(text) is None:
        clade = parse_rank_prefix(text)
        if clade is not None:
            return clade
    if isinstance(text, str) and text.strip():
        shared = lookup_common_name(text) if _table_entry(text) is None else []
        if len(shared) > 1:
            names = " or ".join(_shown(t.binomial, None) for t in shared)
            raise TaxamapError(f'"{" ".join(text.split())}" is the common name of {len(shared)} '
                               f"species: {names}; give one of those names")
        if shared:
            taxon = _resolve_name(shared[0].binomial, offline, cache_dir, client, suggest)
            return taxon if taxon.common_name else replace(taxon,
                                                           common_name=shared[0].common_name)
        words = text.replace("_", " ").split()
        latin = all(_WORD.match(w) for w in words)
        if not (latin and len(words) in (2, 7)) and _COMMON.match(" ".join(words)):
            # Neither a binomial nor seven ranks: a common name the table lacks?
            return _resolve_name(" ".join(words), offline, cache_dir, client, suggest)
    given = parse_seven_rank(text)
    if given is not None:
        return given
    return _resolve_name(normalize_binomial(text), offline, cache_dir, client, suggest)


#: What a common name may hold: words of letters (any alphabet) joined by spaces, hyphens,
#: apostrophes or slashes. Digits and dots (authors, years: "L. 1758") are not names.
_COMMON = re.compile(r"[^\W\d_]+(?:[ '\u2019/-]+[^\W\d_]+)*'?\Z")


def _table_entry(text: str) -> Taxon | None:
    """:func:`lookup_table` for any text: None (no error) when ``text`` is not a binomial."""
    return _table().get(" ".join(text.replace("_", " ").split()).lower())


def _resolve_name(name: str, offline: bool | None, cache_dir: Path | None,
                  client: TaxonomyClient | None, suggest: bool = True) -> Taxon:
    """A binomial (or a common name the table lacks) through the cache, iNaturalist and GBIF,
    then the shipped table; TaxamapError with suggestions when none knows it."""
    binomial = _is_binomial(name)
    if offline is None:
        offline = offline_requested()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    cached = _read_cache(cache_dir, name)
    if cached is not None:
        return cached

    failure = None
    if not offline:
        client = client if client is not None else _default_client()
        # GBIF's backbone matches scientific names only.
        for lookup in (lookup_inaturalist, lookup_gbif) if binomial else (lookup_inaturalist,):
            try:
                taxon = lookup(name, client)
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
                _write_cache(cache_dir, name, taxon)
                return taxon

    taxon = lookup_table(name) if binomial else None
    if taxon is not None:
        return taxon
    sources = "iNaturalist, GBIF or the built-in table" if binomial else \
        "iNaturalist or the built-in table (as a common name)"
    if offline:
        where = "offline, and it is not in taxamap's built-in table"
    elif failure:
        where = f"the taxonomy services could not be reached ({failure}) and it is not in the " \
                "built-in table"
    else:
        where = f"not found in {sources} (check the spelling)"
    if not binomial:
        where = f"not a binomial (Genus epithet); {where}"
    if not suggest:  # ~40 ms each: 20,000 unknown names of a species file took 15 minutes
        raise TaxamapError(f'unknown species "{name}": {where}')
    online = [] if offline or failure else online_suggestions(name, client)
    close = _suggestions(name, online)
    hint = f"did you mean {' or '.join(close)}? Otherwise give" if close else "give"
    raise TaxamapError(f'unknown species "{name}": {where}; {hint} all seven ranks instead: '
                       f"{seven_rank_hint()}")


__all__ = [
    "GBIF_URL",
    "INATURALIST_URL",
    "KINGDOMS",
    "Taxon",
    "TaxonomyClient",
    "TaxonomyServiceError",
    "harmonize_ranks",
    "list_table_species",
    "lookup_common_name",
    "lookup_gbif",
    "lookup_inaturalist",
    "lookup_table",
    "normalize_binomial",
    "offline_requested",
    "online_suggestions",
    "parse_rank_prefix",
    "parse_seven_rank",
    "rank_names",
    "resolve_species",
    "search_table",
    "seven_rank_hint",
    "table_clade",
    "table_taxa",
]
