"""Regenerate the region presets in grids/ from Natural Earth GeoJSON.

Usage (from the repository root)::

    python grids/build_presets.py [--source ../shared/data/naturalearth] [--tolerance 0.005]

Reads ne_50m_admin_0_countries.json, ne_50m_admin_1_states_provinces.json, ne_50m_land.json and
ne_50m_lakes.json (Natural Earth 1:50m, public domain) and writes, next to this script:

- countries.json.gz     every admin-0 feature (241), simplified
- subdivisions.json.gz  US states (+DC), Canadian provinces/territories, Brazilian and
                        Australian states, and the ``usa`` preset (lower 48 + DC, dissolved)
- continents.json.gz    the union of the countries of each Natural Earth CONTINENT
- land.json.gz          the land mask: land minus lakes (Natural Earth's land polygons include
                        large lakes), one polygon per feature
- index.json            names, kinds, codes and the alias table used by taxamap.grids

Geometries are made valid and simplified with ``--tolerance`` degrees (topology preserving;
0.005 degrees is a tenth of a 0.05 degree cell), coordinates rounded to 1e-5 degrees (~1 m).
Aliases that two presets claim equally are left out (listed under "ambiguous" in index.json), and
so are names that are the own name or code of two presets (Georgia: the country and the US
state) and the short forms in ``AMBIGUOUS_FORMS`` (Congo): taxamap refuses them and lists the
candidates, each by a name of its own ("Georgia (country)", "Georgia (USA)"). Otherwise the
stronger claim wins (an explicit preset such as ``usa`` over the ISO-3 code of the whole country).

Made with Natural Earth. Free vector and raster map data @ naturalearthdata.com.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import shapely

HERE = Path(__file__).resolve().parent


def _registry():
    """grids/__init__.py loaded by path, so the script runs without taxamap installed; its
    normaliser must be the one the registry applies to user input."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_taxamap_grids", HERE / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_REGISTRY = _registry()
normalize_name = _REGISTRY.normalize_name

CONTINENTS = ("Africa", "Antarctica", "Asia", "Europe", "North America", "Oceania", "South America")
SUBDIVISION_COUNTRIES = {"USA": "state", "CAN": "province", "BRA": "state", "AUS": "state"}
#: Postal codes are unique only among US states and Canadian provinces (Brazil's "MA" would clash
#: with Massachusetts), so only those two countries get them as aliases.
POSTAL_COUNTRIES = ("USA", "CAN")

#: Display names where Natural Earth's ADMIN is needlessly formal.
DISPLAY_NAMES = {
    "Republic of Serbia": "Serbia",
    "United Republic of Tanzania": "Tanzania",
    "Hong Kong S.A.R.": "Hong Kong",
    "Macao S.A.R": "Macao",
}

#: Common English forms that Natural Earth's name fields lack; target is the display name.
COMMON_FORMS = {
    "United States of America": ["united states", "us", "america", "the united states"],
    "United Kingdom": ["uk", "great britain", "britain", "the united kingdom"],
    "Netherlands": ["holland", "the netherlands"],
    "Czechia": ["czech republic"],
    "Ivory Coast": ["cote divoire"],
    "Democratic Republic of the Congo": ["drc", "dr congo", "congo kinshasa", "dem rep congo"],
    "Republic of the Congo": ["congo brazzaville", "congo republic"],
    "East Timor": ["timor leste"],
    "Swaziland": ["eswatini"],
    "Macedonia": ["north macedonia"],
    "Myanmar": ["burma"],
    "Cabo Verde": ["cape verde"],
    "United Arab Emirates": ["uae"],
    "Vatican": ["vatican city", "holy see"],
    "South Korea": ["korea south", "republic of korea"],
    "North Korea": ["korea north"],
    "Russia": ["russian federation"],
    "Vietnam": ["viet nam"],
    "Laos": ["lao pdr"],
    "Bosnia and Herzegovina": ["bosnia"],
    "Falkland Islands": ["malvinas"],
    "Federated States of Micronesia": ["micronesia"],
}

#: Short forms that name several countries equally: refused with the candidates.
AMBIGUOUS_FORMS = {
    "congo": ["Democratic Republic of the Congo", "Republic of the Congo"],
    "korea": ["North Korea", "South Korea"],
    "virgin islands": ["British Virgin Islands", "United States Virgin Islands"],
}

#: How a subdivision named like a country is told apart, e.g. "Georgia (US state)".
SUBDIVISION_WORDS = _REGISTRY.SUBDIVISION_WORDS

USA_PRESET = {
    "name": "usa",
    "title": "Contiguous United States (lower 48 + DC)",
    # Unlike every other ISO-3 code: USA names the contiguous states, listed beside the whole.
    "part_of": "United States of America",
    "aliases": ["usa", "conus", "contiguous united states", "contiguous usa", "contiguous us",
                "lower 48", "lower48", "us48", "us 48", "continental united states"],
}
WORLD_ALIASES = ["world", "global", "globe", "earth"]

# Claim strengths: lower wins an alias.
P_PRESET, P_CONTINENT, P_COUNTRY, P_SUBDIVISION, P_COUNTRY_ALT, P_SUBDIVISION_ALT = range(6)


def _load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)["features"]


def _clean(geom, tolerance: float):
    geom = shapely.make_valid(geom)
    # make_valid can leave lines/points next to polygons; only areas matter for a grid.
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
    geom = shapely.union_all(parts) if len(parts) > 1 else parts[0]
    if tolerance > 0:
        geom = shapely.simplify(geom, tolerance, preserve_topology=True)
    geom = shapely.set_precision(geom, 1e-5)
    return geom


def _write_collection(path: Path, features: list[dict]) -> None:
    collection = {"type": "FeatureCollection", "features": features}
    tmp = path.with_name(path.name + ".tmp")
    # mtime=0 keeps the file byte-identical across rebuilds of the same input.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(json.dumps(collection, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    os.replace(tmp, path)


def _feature(geom, **props) -> dict:
    return {"type": "Feature", "properties": props, "geometry": json.loads(shapely.to_geojson(geom))}


def _iso3(p: dict) -> str:
    for key in ("ISO_A3", "ISO_A3_EH", "ADM0_A3"):
        value = p.get(key)
        if value and value != "-99":
            return value
    return p["ADM0_A3"]


def build(source: Path, out: Path, tolerance: float) -> dict:
    regions: list[dict] = []
    claims: dict[str, list[tuple[int, str]]] = defaultdict(list)

    def claim(alias, strength: int, name: str) -> None:
        if alias:
            key = normalize_name(alias)
            if key:
                claims[key].append((strength, name))

    # World.
    regions.append({"name": "world", "kind": "world", "code": None, "title": "Whole world"})
    for a in WORLD_ALIASES:
        claim(a, P_PRESET, "world")

    # Countries. One named like a subdivision (Georgia) is "Georgia (country)": the bare name
    # is ambiguous, and each preset must have a name of its own.
    subdivisions = [f for f in _load(source / "ne_50m_admin_1_states_provinces.json")
                    if f["properties"]["adm0_a3"] in SUBDIVISION_COUNTRIES]
    subdivision_names = {f["properties"]["name"] for f in subdivisions}
    countries = _load(source / "ne_50m_admin_0_countries.json")
    country_features = []
    by_continent: dict[str, list] = defaultdict(list)
    admin_names = {}
    for f in countries:
        p = f["properties"]
        geom = _clean(shapely.from_geojson(json.dumps(f["geometry"])), tolerance)
        name = DISPLAY_NAMES.get(p["ADMIN"], p["ADMIN"])
        code = _iso3(p)
        admin_names[name] = name
        if name in subdivision_names:
            name = f"{name} (country)"
            claim(name, P_COUNTRY, name)
        by_continent[p["CONTINENT"]].append(geom)
        if name in CONTINENTS:
            # Antarctica is both; the continent preset serves both, and takes the country's codes.
            for key in ("ISO_A3", "ISO_A3_EH", "ADM0_A3"):
                if p.get(key) and p[key] != "-99":
                    claim(p[key], P_COUNTRY, name)
            continue
        regions.append({"name": name, "kind": "country", "code": code, "file": "countries",
                        "feature": len(country_features)})
        country_features.append(_feature(geom, name=name, code=code, continent=p["CONTINENT"]))
        for key in ("ADMIN", "NAME"):
            claim(p.get(key), P_COUNTRY, name)
        for key in ("ISO_A3", "ISO_A3_EH", "ADM0_A3"):
            if p.get(key) and p[key] != "-99":
                claim(p[key], P_COUNTRY, name)
        for key in ("NAME_LONG", "GEOUNIT", "SUBUNIT", "BRK_NAME", "FORMAL_EN", "NAME_SORT",
                    "NAME_CIAWF"):
            claim(p.get(key), P_COUNTRY_ALT, name)
        for alt in (p.get("NAME_ALT") or "").split("|"):
            claim(alt, P_COUNTRY_ALT, name)
    for target, forms in COMMON_FORMS.items():
        if target not in admin_names:
            print(f"warning: common forms for unknown country {target!r} skipped", file=sys.stderr)
            continue
        for form in forms:
            claim(form, P_COUNTRY_ALT, target)

    # Continents: dissolved unions of their countries.
    continent_features = []
    for continent in CONTINENTS:
        geom = shapely.union_all(by_continent[continent], grid_size=1e-5)
        geom = _clean(geom, tolerance)
        regions.append({"name": continent, "kind": "continent", "code": None,
                        "file": "continents", "feature": len(continent_features)})
        continent_features.append(_feature(geom, name=continent))
        claim(continent, P_CONTINENT, continent)

    # Subdivisions and the contiguous USA.
    subdivision_features = []
    lower48 = []
    for f in subdivisions:
        p = f["properties"]
        country = p["adm0_a3"]
        geom = _clean(shapely.from_geojson(json.dumps(f["geometry"])), tolerance)
        name = p["name"]
        iso = p["iso_3166_2"] if "~" not in (p["iso_3166_2"] or "~") else None
        code = p["postal"] if country in POSTAL_COUNTRIES else iso
        if name in admin_names:
            # A subdivision named like a country (Georgia): keep it reachable by a distinct name.
            claim(f"{name} ({SUBDIVISION_WORDS[country]})", P_SUBDIVISION, f"{name} ({country})")
            name = f"{name} ({country})"
        regions.append({"name": name, "kind": SUBDIVISION_COUNTRIES[country], "code": code,
                        "country": country, "file": "subdivisions",
                        "feature": len(subdivision_features)})
        subdivision_features.append(_feature(geom, name=name, code=code, country=country))
        claim(name, P_SUBDIVISION, name)
        claim(p["name"], P_SUBDIVISION, name)
        claim(f"{p['name']} {p['iso_a2']}", P_SUBDIVISION, name)
        claim(iso, P_SUBDIVISION, name)
        if country in POSTAL_COUNTRIES:
            claim(p["postal"], P_SUBDIVISION, name)
        for alt in (p.get("name_alt") or "").split("|"):
            claim(alt, P_SUBDIVISION_ALT, name)
        if country == "USA" and p["postal"] not in ("AK", "HI"):
            # Dissolve the unsimplified states: states simplified one by one no longer share
            # their borders exactly, and their union keeps cracks along them.
            lower48.append(shapely.make_valid(shapely.from_geojson(json.dumps(f["geometry"]))))
    if len(lower48) != 49:
        raise SystemExit(f"expected 48 states + DC for the usa preset, found {len(lower48)}")
    usa = _clean(shapely.union_all(lower48, grid_size=1e-5), tolerance)
    # Dissolving neighbours that were simplified independently can leave slivers as holes.
    usa = shapely.polygons(shapely.get_exterior_ring(shapely.get_parts(usa)))
    usa = shapely.union_all(usa)
    regions.append({"name": USA_PRESET["name"], "kind": "country", "code": "USA",
                    "title": USA_PRESET["title"], "part_of": USA_PRESET["part_of"],
                    "file": "subdivisions",
                    "feature": len(subdivision_features)})
    subdivision_features.append(_feature(usa, name="usa", code="USA"))
    for a in USA_PRESET["aliases"]:
        claim(a, P_PRESET, "usa")

    # Land mask, one polygon per feature so a reader can index it spatially. Natural Earth's land
    # polygons include the large lakes (the Great Lakes, Great Salt Lake, Victoria, Baikal...):
    # cut the 1:50m lakes out before simplifying, so lake shores get the same tolerance as coasts.
    # No lake crosses the antimeridian, so both files share one longitude frame.
    lakes = shapely.union_all([shapely.make_valid(shapely.from_geojson(json.dumps(f["geometry"])))
                               for f in _load(source / "ne_50m_lakes.json")])
    shapely.prepare(lakes)
    land_parts = []
    for f in _load(source / "ne_50m_land.json"):
        geom = shapely.make_valid(shapely.from_geojson(json.dumps(f["geometry"])))
        if shapely.intersects(lakes, geom):
            geom = shapely.difference(geom, lakes)
            if geom.is_empty:
                continue
        geom = _clean(geom, tolerance)
        land_parts.extend(p for p in shapely.get_parts(geom)
                          if not p.is_empty and p.geom_type == "Polygon")
    land_features = [{"type": "Feature", "properties": {},
                      "geometry": json.loads(shapely.to_geojson(p))} for p in land_parts]

    # Resolve aliases: strongest claim wins; equal claims by different presets are ambiguous, and
    # so is a preset's own name or code claimed by another one (unless a preset was chosen).
    alias_table, ambiguous = {}, {}
    for key, cl in sorted(claims.items()):
        best = min(s for s, _ in cl)
        winners = sorted({n for s, n in cl if s == best})
        own = sorted({n for s, n in cl if P_CONTINENT <= s <= P_SUBDIVISION})
        if key in AMBIGUOUS_FORMS:
            continue
        if len(winners) > 1:
            ambiguous[key] = winners
        elif best != P_PRESET and len(own) > 1:
            ambiguous[key] = own
        else:
            alias_table[key] = winners[0]
    for key, names in AMBIGUOUS_FORMS.items():
        missing = [n for n in names if n not in {e["name"] for e in regions}]
        if missing:
            raise SystemExit(f"AMBIGUOUS_FORMS[{key!r}] names unknown presets {missing}")
        ambiguous[key] = names
    for e in regions:
        # Every preset must be reachable by its own listed name.
        if alias_table.get(normalize_name(e["name"])) != e["name"]:
            raise SystemExit(f"preset {e['name']!r} is shadowed by "
                             f"{alias_table.get(normalize_name(e['name']))!r}")

    out.mkdir(parents=True, exist_ok=True)
    _write_collection(out / "countries.json.gz", country_features)
    _write_collection(out / "continents.json.gz", continent_features)
    _write_collection(out / "subdivisions.json.gz", subdivision_features)
    _write_collection(out / "land.json.gz", land_features)
    index = {
        "attribution": "Made with Natural Earth. Free vector and raster map data @ naturalearthdata.com.",
        "source": "Natural Earth 1:50m (ne_50m_admin_0_countries, ne_50m_admin_1_states_provinces, "
                  "ne_50m_land minus ne_50m_lakes)",
        "simplify_tolerance_deg": tolerance,
        "regions": regions,
        "aliases": alias_table,
        "ambiguous": ambiguous,
    }
    tmp = out / "index.json.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(index, fh, ensure_ascii=False, indent=0, sort_keys=True)
    os.replace(tmp, out / "index.json")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path,
                        default=HERE.parent.parent / "shared" / "data" / "naturalearth",
                        help="folder with the Natural Earth GeoJSON files")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: grids/)")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="simplification tolerance in degrees (default 0.005)")
    args = parser.parse_args(argv)
    index = build(args.source, args.out, args.tolerance)
    kinds = defaultdict(int)
    for e in index["regions"]:
        kinds[e["kind"]] += 1
    print(f"{len(index['regions'])} presets ({dict(kinds)}), {len(index['aliases'])} aliases, "
          f"{len(index['ambiguous'])} ambiguous: {sorted(index['ambiguous'])}")
    for name in ("countries", "subdivisions", "continents", "land"):
        path = args.out / f"{name}.json.gz"
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
