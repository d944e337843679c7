"""Which species make up a reference panel: the shipped table's, a user's list, or a clade of either.

A :class:`Panel` is an ordered list of species (label + seven-rank prompt) with a digest that
names it in caches. The default panel is every species of taxamap's shipped taxonomy table
(:func:`taxamap.taxonomy.table_taxa`: 2,431 animals, most of them birds and mammals, plus 3
plants and 1 fungus); ``--panel FILE`` gives the user's own list (one name per line, or a CSV
with a ``species`` column, as ``--species-file``); ``--clade PREFIX`` keeps the panel's species
whose prompt starts with the given ranks (any case).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from taxamap.errors import TaxamapError
from taxamap.surface import option

#: What the default panel is, for messages and tags.
DEFAULT_PANEL_NAME = "table"


@dataclass(frozen=True, eq=False)
class Panel:
    """An ordered reference panel: ``labels`` (binomials) and their seven-rank ``prompts``.

    ``name`` says where it came from ("table", a file's name, with ``clade`` when one was
    selected); ``default`` is True for the shipped table's species (all of them), the one panel
    whose per-cell statistics are kept beside the stores.
    """

    labels: tuple[str, ...]
    prompts: tuple[str, ...]
    name: str
    default: bool = False
    clade: str | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise TaxamapError(f"the reference panel {self.name!r} holds no species; give "
                               f"{option('panel', metavar='FILE')} naming at least one")
        if len(self.labels) != len(self.prompts):
            raise ValueError("labels and prompts differ in length")

    def __len__(self) -> int:
        return len(self.prompts)

    @cached_property
    def digest(self) -> str:
        """A short hash of the prompts in order: the panel's identity in caches."""
        return hashlib.sha1("\n".join(self.prompts).encode("utf-8")).hexdigest()[:16]

    @cached_property
    def index(self) -> dict[str, int]:
        """Prompt (lower case) -> position in the panel."""
        return {p.lower(): i for i, p in enumerate(self.prompts)}

    def position(self, prompt: str | None) -> int | None:
        """Where the species of ``prompt`` stands in the panel, or None if it is no member."""
        return None if not prompt else self.index.get(" ".join(prompt.split()).lower())

    def describe(self) -> str:
        """``"table (2,435 species)"``: what the panel is, in a few words."""
        under = f", clade {self.clade}" if self.clade else ""
        return f"{self.name}{under} ({len(self):,} species)"


def default_panel() -> Panel:
    """Every species of the shipped taxonomy table, sorted by binomial."""
    from taxamap.taxonomy import table_taxa

    taxa = table_taxa()
    return Panel(tuple(t.binomial for t in taxa), tuple(t.prompt for t in taxa),
                 DEFAULT_PANEL_NAME, default=True)


def panel_from_file(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    skip_unknown: bool = False) -> Panel:
    """The panel a user's list names (one name per line, ``#`` comments, or a CSV with a
    ``species`` column): every name resolved to its seven-rank prompt, each species once, in
    the file's order. Unknown names are one error listing them (``skip_unknown`` leaves them
    out instead); a name that resolves to a clade, not a species, is refused."""
    from taxamap.paths import cache_subdir
    from taxamap.queries import read_species_file, resolve_species_file

    path = Path(path).expanduser()
    names = read_species_file(path)
    taxa, _ = resolve_species_file(names, f"--panel {path}", cache_subdir("taxonomy", cache_dir),
                                   skip_unknown)
    clades = [t.prompt for t in taxa if getattr(t, "rank", "species") != "species"]
    if clades:
        raise TaxamapError(f"--panel {path} names clades, not species ({clades[0]!r}); a panel "
                           "lists species, one per line (select a clade with "
                           f"{option('clade', metavar='PREFIX')})")
    labels, prompts, seen = [], [], set()
    for taxon in taxa:
        if taxon.prompt.lower() in seen:
            continue
        seen.add(taxon.prompt.lower())
        labels.append(taxon.binomial)
        prompts.append(taxon.prompt)
    return Panel(tuple(labels), tuple(prompts), path.name)


def select_clade(panel: Panel, prefix: str) -> Panel:
    """The species of ``panel`` whose prompt starts with the ranks ``prefix`` (one to six ranks
    from the kingdom down, any case; ``_`` as spaces). A prefix no member is under is one
    :class:`TaxamapError` naming the panel's clades it may have meant."""
    from taxamap.taxonomy import close_rank_prefixes, rank_prefixes

    words = str(prefix).replace("_", " ").split()
    if not words:
        raise TaxamapError(f"{option('clade', metavar='PREFIX')} is empty; give ranks from the "
                           f"kingdom down, e.g. {option('clade', 'Animalia Chordata Aves')}")
    if len(words) > 6:
        raise TaxamapError(f"{option('clade', ' '.join(words))} has {len(words)} ranks; a clade "
                           "is one to six ranks from the kingdom down (seven name a species: "
                           f"map it with {option('species', metavar='NAME')})")
    wanted = [w.lower() for w in words]
    keep = [i for i, p in enumerate(panel.prompts) if p.lower().split()[:len(wanted)] == wanted]
    if not keep:
        known = rank_prefixes(panel.prompts)
        close = close_rank_prefixes(" ".join(words), known, limit=5, cutoff=0.0)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        raise TaxamapError(
            f"no species of the {panel.describe()} panel is in the clade "
            f"{' '.join(words)!r}{hint} Give ranks from the kingdom down, e.g. "
            f"{option('clade', 'Animalia Chordata Aves Passeriformes')}")
    spelt = " ".join(panel.prompts[keep[0]].split()[:len(words)])
    return Panel(tuple(panel.labels[i] for i in keep), tuple(panel.prompts[i] for i in keep),
                 panel.name, default=False, clade=spelt)


def resolve_panel(panel: str | os.PathLike | Panel | None = None, clade: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Panel:
    """The panel a request names: ``panel`` (a file, or a :class:`Panel`; None for the shipped
    table's species), then, with ``clade``, its species under that rank prefix."""
    chosen = (panel if isinstance(panel, Panel) else
              default_panel() if panel is None else panel_from_file(panel, cache_dir))
    return select_clade(chosen, clade) if clade else chosen


__all__ = ["DEFAULT_PANEL_NAME", "Panel", "default_panel", "panel_from_file", "resolve_panel",
           "select_clade"]
