"""The panel's two questions as commands: "what lives here?" (:func:`species_at_table`) and
"how many species' ranges hold each cell?" (:func:`richness_map`), over a grid's stores.

``taxamap species-at`` / :func:`taxamap.species_at` and ``taxamap richness`` /
:func:`taxamap.richness` call these with their options; every input is checked (the panel, the
clade, the place, the rule) before any cell is embedded.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.naming import slugify

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

    from taxamap.options import RichnessOptions, SpeciesAtOptions

_log = logging.getLogger("taxamap")

#: ``--stack`` holds every species' in/out raster in memory (one byte per cell): above this many
#: bytes it refuses, pointing to a smaller clade or a coarser grid.
MAX_STACK_BYTES = 2 * 2**30


def _grid_panel(opts, panel=None):
    """(scorer with its grid laid, its :class:`GridPanel`) with the panel's species resolved
    (a bad file or clade fails here, before any cell is embedded)."""
    from taxamap.panel.product import GridPanel
    from taxamap.queries import QueryEncoders
    from taxamap.scorer import Scorer

    scorer = Scorer(opts)
    encoders = QueryEncoders(opts, scorer.config, scorer.device)
    grid_panel = GridPanel(scorer, lambda n: encoders.text(n_prompts=n),
                           panel=opts.panel if panel is None else panel, clade=opts.clade,
                           progress=opts.progress)
    grid_panel.panel  # noqa: B018 - resolves (and checks) the species now
    return scorer, grid_panel


def species_at_table(opts: "SpeciesAtOptions") -> "pd.DataFrame":
    """The panel's species ranked at the cell holding (``opts.lat``, ``opts.lon``): rank, name,
    prompt, score, relative (best first, ``opts.top`` rows; the cell, the panel and the ranking
    rule in ``attrs``); with ``opts.json`` also written there as JSON."""
    from taxamap.panel.species_at import cell_number

    t0 = time.perf_counter()
    scorer, grid_panel = _grid_panel(opts)
    cell_number(scorer.grid, opts.lat, opts.lon)  # a place off the grid fails before any work
    scorer.embed_cells()
    table = grid_panel.species_at(opts.lat, opts.lon, opts.top)
    table.attrs["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if opts.json is not None:
        from taxamap.io import atomic_write

        atomic_write(Path(opts.json).expanduser(), json.dumps(ranking_json(table), indent=1))
    return table


def ranking_json(table: "pd.DataFrame") -> dict:
    """A species-at table as the web app's ``/api/species`` answers it."""
    return {"lat": table.attrs["lat"], "lon": table.attrs["lon"],
            "panel": table.attrs.get("panel", ""), "rule": table.attrs.get("rule", ""),
            "species": [{"name": r.name, "prompt": r.prompt, "score": round(float(r.score), 6),
                         "relative": round(float(r.relative), 6)}
                        for r in table.itertuples(index=False)]}


def richness_map(opts: "RichnessOptions", stack: bool = False) -> "xr.Dataset":
    """Per cell, how many species' ranges hold it (each species' map cut at ``opts.rule`` as
    ``taxamap threshold`` cuts it), as a Dataset with variable ``richness``; the species are
    ``opts.species_file``'s, else the panel's (``opts.panel``, default the table's), under
    ``opts.clade`` when given. With ``stack``, also a variable ``in_range`` (species, y, x): 1
    in the species' range, 0 outside, NaN off the cells."""
    from taxamap.panel.members import panel_from_file
    from taxamap.panel.reference import richness_dataset, richness_of
    from taxamap.panel.richness import richness_rule

    richness_rule(opts.rule)
    panel = panel_from_file(opts.species_file, opts.cache) if opts.species_file else None
    scorer, grid_panel = _grid_panel(opts, panel)
    grid = scorer.grid
    species = grid_panel.panel
    if stack and len(species) * grid.width * grid.height > MAX_STACK_BYTES:
        raise TaxamapError(f"--stack of {len(species):,} species over this {grid.width} x "
                           f"{grid.height} grid needs more than 2 GB; count a clade "
                           "(--clade PREFIX) or a coarser --resolution, or drop --stack")
    scorer.embed_cells()
    reference = grid_panel.reference
    rasters = np.zeros((len(species), grid.n_cells), dtype=np.uint8) if stack else None

    def keep(chunk: slice, binary: np.ndarray, _thresholds) -> None:
        rasters[chunk] = binary

    result = richness_of(reference, scorer.cells.stores, opts.rule, opts.fusion,
                         progress=opts.progress, on_batch=keep if stack else None)
    provenance = scorer.provenance(grid_panel.text_ref, scorer.modalities)
    name = species.clade or (Path(opts.species_file).stem if opts.species_file else species.name)
    ds = richness_dataset(result, grid, {
        **provenance, "query": f"richness: {species.describe()}", "prompt": "",
        "slug": f"{slugify(name)}_richness", "panel": species.describe(),
        "units": "species"})
    ds.attrs["bands"] = "richness"
    if stack:
        import xarray as xr

        layers = np.where(rasters == 255, np.float32(np.nan), rasters.astype(np.float32))
        cube = np.stack([grid.to_raster(row) for row in layers])
        ds["in_range"] = xr.DataArray(cube, dims=("species", "y", "x"),
                                      coords={"species": list(species.labels)})
        ds["in_range"].attrs.update(units="1 in range, 0 outside", rule=result.rule)
    _log.info(f"richness of {species.describe()} at {result.rule}: up to "
              f"{int(result.counts.max()):,} species per cell")
    return ds


def write_richness(ds: "xr.Dataset", wopts) -> dict[str, Path]:
    """The richness map's files (``wopts.formats``: GeoTIFF, HTML, PNG as for a map, with
    ``wopts.stretch``) and, when ``ds`` holds ``in_range``, ``<slug>_stack.tif``: one band per
    species (1 in range, 0 outside)."""
    from dataclasses import replace

    from taxamap.writers.files import check_write, write_dataset
    from taxamap.writers.geotiff import geotiff_tags, write_bands

    plain = replace(wopts, stack=False)
    checked = check_write(plain)
    main = ds.drop_vars(["in_range", "species"]) if "in_range" in ds else ds
    paths = write_dataset(main, plain, checked=checked)
    if "in_range" in ds:
        from taxamap.dataset import grid_of

        cube = ds["in_range"]
        names = [str(s) for s in cube["species"].values]
        tags = {**geotiff_tags(main), "BANDS": ",".join(names),
                "STACK": f"in range per species ({cube.attrs.get('rule', '')})"}
        path = checked["out_dir"] / f"{main.attrs['slug']}_stack.tif"
        paths["stack.tif"] = write_bands(path, grid_of(main), [
            (n, cube.values[i]) for i, n in enumerate(names)], tags,
            [{"SPECIES": n} for n in names], ["1 in range, 0 outside"] * len(names))
    return paths


__all__ = ["MAX_STACK_BYTES", "ranking_json", "richness_map", "species_at_table",
           "write_richness"]
