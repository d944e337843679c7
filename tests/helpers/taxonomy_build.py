"""Rebuild ``taxamap/data/taxonomy.csv`` from the seed table (kept here so the table is reproducible).

    python -m tests.helpers.taxonomy_build ../shared/data/taxonomy/animals_7rank.csv taxamap/data/taxonomy.csv

Steps: rename higher ranks to iNaturalist's (``taxamap.taxonomy.harmonize_ranks``), fix the seed's
individual errors (``ROW_FIXES``), capitalise all-lower-case common names, add ``ADDITIONS``,
sort by binomial. ``taxamap/data/taxonomy.md`` documents every change.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from taxamap.taxonomy import RANKS, harmonize_ranks

COLUMNS = [*RANKS, "common_name"]

#: genus -> family, for seed rows filed in the wrong family (iNaturalist 2021 / Clements).
ROW_FIXES: dict[str, dict[str, str]] = {
    # Australasian parrots are Psittaculidae; the seed mixed Psittacidae and Psittaculidae.
    "Alisterus": {"family": "Psittaculidae"},
    "Barnardius": {"family": "Psittaculidae"},
    "Melopsittacus": {"family": "Psittaculidae"},
    "Neophema": {"family": "Psittaculidae"},
    "Platycercus": {"family": "Psittaculidae"},
    # The eastern water dragon's family was given as the infraorder "Iguania".
    "Intellagama": {"family": "Agamidae"},
    # Garter/ribbon snakes: Colubridae (subfamily Natricinae), as the seed's other Thamnophis row.
    "Thamnophis": {"family": "Colubridae"},
}

#: Well-known species missing from the seed (iNaturalist's taxonomy).
ADDITIONS: list[tuple[str, ...]] = [
    ("Animalia", "Chordata", "Aves", "Apodiformes", "Trochilidae", "Archilochus", "colubris",
     "Ruby-throated Hummingbird"),
    ("Animalia", "Chordata", "Aves", "Apodiformes", "Apodidae", "Chaetura", "pelagica",
     "Chimney Swift"),
    ("Animalia", "Chordata", "Mammalia", "Artiodactyla", "Delphinidae", "Tursiops", "truncatus",
     "Common Bottlenose Dolphin"),
    ("Animalia", "Chordata", "Mammalia", "Artiodactyla", "Balaenopteridae", "Megaptera",
     "novaeangliae", "Humpback Whale"),
    ("Animalia", "Chordata", "Reptilia", "Testudines", "Emydidae", "Chrysemys", "picta",
     "Painted Turtle"),
    ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus",
     "Monarch"),
    ("Animalia", "Arthropoda", "Insecta", "Hymenoptera", "Apidae", "Apis", "mellifera",
     "Western Honey Bee"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus", "alba",
     "White Oak"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Sapindales", "Sapindaceae", "Acer", "rubrum",
     "Red Maple"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Gentianales", "Apocynaceae", "Asclepias",
     "syriaca", "Common Milkweed"),
    ("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita",
     "muscaria", "Fly Agaric"),
]

#: Must be present (the README's example species).
REQUIRED = ("Cardinalis cardinalis",)

_SMALL_WORDS = {"of", "and", "the", "de", "la", "du", "von", "van"}


def capitalize_common_name(name: str) -> str:
    """``"black-headed grosbeak"`` -> ``"Black-headed Grosbeak"``; mixed-case names are kept."""
    if not name or name != name.lower():
        return name
    words = name.split(" ")
    return " ".join(
        w if (i and w in _SMALL_WORDS) else w[:1].upper() + w[1:] for i, w in enumerate(words)
    )


def build(seed_csv: Path) -> str:
    """The shipped table's CSV text built from ``seed_csv``."""
    with open(seed_csv, newline="", encoding="utf-8") as handle:
        rows = [dict(r) for r in csv.DictReader(handle)]
    rows += [dict(zip(COLUMNS, extra)) for extra in ADDITIONS]
    table: dict[str, dict[str, str]] = {}
    for row in rows:
        row = harmonize_ranks(row)
        row.update(ROW_FIXES.get(row["genus"], {}))
        row["common_name"] = capitalize_common_name(row.get("common_name") or "")
        table.setdefault(f"{row['genus']} {row['species']}", row)  # the seed wins over ADDITIONS
    missing = [name for name in REQUIRED if name not in table]
    if missing:
        raise SystemExit(f"required species missing from the table: {missing}")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for key in sorted(table):
        writer.writerow(table[key])
    return out.getvalue()


if __name__ == "__main__":
    seed, target = map(Path, sys.argv[1:3])
    target.write_text(build(seed), encoding="utf-8")
    print(f"wrote {target}")
