"""Region presets shipped with taxamap (Natural Earth derived) and their registry.

Files in this folder (regenerate them with ``python grids/build_presets.py``):

- ``index.json``: one entry per preset (name, kind, code, the file and feature that hold its
  geometry) and the alias table that maps every accepted spelling to one preset.
- ``countries.json.gz``, ``subdivisions.json.gz``, ``continents.json.gz``: gzipped GeoJSON
  (EPSG:4326) of the preset outlines; QGIS opens them directly.
- ``land.json.gz``: the land mask (Natural Earth 1:50m land minus the 1:50m lakes, whose water
  the land polygons include), one polygon per feature.

Made with Natural Earth. Free vector and raster map data @ naturalearthdata.com.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import unicodedata
from pathlib import Path
from typing import NamedTuple, Optional

HERE = Path(__file__).resolve().parent

#: Order in which ``list_regions`` reports kinds.
KINDS = ("world", "continent", "country", "state", "province")

#: What a subdivision is, by the ISO-3 code of its country ("the US state Georgia").
SUBDIVISION_WORDS = {"USA": "US state", "CAN": "Canadian province", "BRA": "Brazilian state",
                     "AUS": "Australian state"}


def check_kind(kind: str) -> str:
    """``kind`` (any case) as one of :data:`KINDS`; TaxamapError listing them (and the closest)
    otherwise, so a typo such as "countries" is not an empty listing."""
    import difflib

    from taxamap.errors import TaxamapError

    given = str(kind).strip().lower()
    if given in KINDS:
        return given
    close = difflib.get_close_matches(given, KINDS, n=1, cutoff=0.6)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    raise TaxamapError(f"unknown region kind {kind!r}{guess}; kinds are {', '.join(KINDS)}")


class RegionInfo(NamedTuple):
    """One preset: ``name`` resolves back to it; ``code`` is the ISO-3 code of a country, the
    postal code of a US state / Canadian province, the ISO 3166-2 code of other subdivisions, or
    None; ``country`` is the ISO-3 code of the country a subdivision belongs to; ``title`` is a
    longer display name where the name is terse (``usa``); ``part_of`` the preset of the whole
    country where a country preset is only part of it (``usa``: United States of America)."""

    name: str
    kind: str
    code: Optional[str] = None
    country: Optional[str] = None
    title: Optional[str] = None
    part_of: Optional[str] = None


def normalize_name(text: str) -> str:
    """The lookup key of a region name: case-, accent- and punctuation-insensitive.

    "São Paulo", "sao-paulo" and "SAO PAULO" all give "sao paulo"; "D.C." gives "dc".
    """
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = text.replace("&", " and ")
    # Dots and apostrophes join their neighbours ("U.S.A." -> "usa", "Côte d'Ivoire" -> "cote divoire").
    text = re.sub(r"[.'\u2019`]", "", text)
    text = re.sub(r"[^0-9a-z]+", " ", text)
    return text.strip()


@functools.lru_cache(maxsize=1)
def _index() -> dict:
    with open(HERE / "index.json", encoding="utf-8") as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=None)
def _features(stem: str) -> list:
    with gzip.open(HERE / f"{stem}.json.gz", "rt", encoding="utf-8") as fh:
        return json.load(fh)["features"]


def list_regions() -> list[RegionInfo]:
    """Every preset, grouped by kind (world, continents, countries, states, provinces), each
    group sorted by name; a preset that is part of a country (``usa``) comes right after the
    whole country (United States of America)."""
    order = {kind: i for i, kind in enumerate(KINDS)}
    infos = [_info(e) for e in _index()["regions"]]
    return sorted(infos, key=lambda r: (order.get(r.kind, len(order)),
                                        normalize_name(r.part_of or r.name), r.part_of is not None))


def aliases() -> dict[str, str]:
    """Every accepted normalised spelling -> the preset's name."""
    return dict(_index()["aliases"])


def ambiguous() -> dict[str, list[str]]:
    """Normalised spellings that name several presets ("georgia": the country and the US state;
    "congo") -> those presets' names. Such spellings resolve to none of them."""
    return dict(_index().get("ambiguous", {}))


def candidates(name: str) -> list[RegionInfo]:
    """The presets an ambiguous ``name`` could mean (none when it is not ambiguous)."""
    return [_info(_entry(n)) for n in _index().get("ambiguous", {}).get(normalize_name(name), [])]


def lookup(name: str) -> Optional[RegionInfo]:
    """The preset that ``name`` (any case, accents, punctuation) denotes, or None."""
    target = _index()["aliases"].get(normalize_name(name))
    if target is None:
        return None
    return _info(_entry(target))


def _info(entry: dict) -> RegionInfo:
    return RegionInfo(entry["name"], entry["kind"], entry.get("code"), entry.get("country"),
                      entry.get("title"), entry.get("part_of"))


@functools.lru_cache(maxsize=1)
def _entries() -> dict:
    return {e["name"]: e for e in _index()["regions"]}


def _entry(name: str) -> dict:
    return _entries()[name]


@functools.lru_cache(maxsize=64)
def _geometry(name: str):
    import shapely

    entry = _entry(name)
    if entry["kind"] == "world":
        return shapely.box(-180.0, -90.0, 180.0, 90.0)
    feature = _features(entry["file"])[entry["feature"]]
    return shapely.from_geojson(json.dumps(feature["geometry"]))


def get_region(name: str):
    """The shapely geometry (EPSG:4326, lon/lat, not clipped to land) of preset ``name``.

    Raises KeyError for an unknown name; :func:`taxamap.geography.resolve_region` turns that into a
    user-facing error with suggestions.
    """
    info = lookup(name)
    if info is None:
        raise KeyError(name)
    return _geometry(info.name)


@functools.lru_cache(maxsize=1)
def land():
    """The land mask (Natural Earth 1:50m land minus 1:50m lakes) as one shapely MultiPolygon,
    cached: the Great Lakes, the Great Salt Lake, Lake Victoria... are holes in it."""
    import shapely

    with gzip.open(HERE / "land.json.gz", "rt", encoding="utf-8") as fh:
        collection = shapely.from_geojson(fh.read())
    return shapely.multipolygons(shapely.get_parts(collection))
