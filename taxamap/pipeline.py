"""The orchestration behind :func:`taxamap.predict`, :func:`taxamap.write` and
:func:`taxamap.embed`: options -> a :class:`~taxamap.scorer.Scorer` over the grid -> queries
(:mod:`taxamap.queries`) -> the score Dataset -> files (:mod:`taxamap.writers.files`).

Cell embeddings do not depend on the query, so they are stored once per grid and modality
(:mod:`taxamap.cells`) and a later query over the same grid only embeds its prompt and takes one
matrix product. A species file is streamed: embedded, scored and written a batch at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from taxamap.cells import CellEmbeddings
from taxamap.errors import TaxamapError
from taxamap.grid import Grid
from taxamap.naming import slugify
from taxamap.options import GridOptions, PredictOptions, WriteOptions
from taxamap.queries import (Query, QueryEncoders, embed_queries, listed_names, resolve_taxa,
                             species_queries)
from taxamap.scorer import Scorer, open_scorer
from taxamap.surface import option
from taxamap.writers.files import check_write, warm_up, write_dataset

_logger = logging.getLogger("taxamap")


def log(message: str) -> None:
    """Progress and facts for the user (the CLI shows them on stderr; stdout is for results)."""
    _logger.info(message)


@dataclass
class PredictResult:
    """What the CLI prints after ``predict`` then ``write``."""

    #: The Dataset mapped (None for a streamed species file: see :func:`predict_and_write`).
    dataset: object
    paths: dict[str, Path]
    timings: dict[str, float]
    #: The summary table's rows (a long species file's last rows only: all are in summary_path).
    summary: list[dict] = field(default_factory=list)
    summary_path: Path | None = None
    summary_count: int = 0


#: :func:`predict_dataset` (``taxamap.predict``, ``--stack``) holds every species' maps in one
#: Dataset: above this many bytes of maps it refuses, pointing to ``predict --species-file``,
#: which writes each species as it is scored and holds one batch of maps at a time.
MAX_IN_MEMORY_BYTES = 2 * 2**30


def maps_bytes(n_species: int, grid: Grid, n_bands: int) -> int:
    """Bytes of the float32 (y, x) maps of ``n_species`` species with ``n_bands`` bands each."""
    return int(n_species) * int(n_bands) * grid.width * grid.height * 4


def check_in_memory(n_species: int, grid: Grid, n_bands: int) -> None:
    """TaxamapError when the maps of ``n_species`` species exceed :data:`MAX_IN_MEMORY_BYTES`."""
    from taxamap.io import format_bytes

    need = maps_bytes(n_species, grid, n_bands)
    if need > MAX_IN_MEMORY_BYTES:
        raise TaxamapError(
            f"{n_species:,} species over this {grid.width} x {grid.height} grid make "
            f"{format_bytes(need)} of maps, more than the {format_bytes(MAX_IN_MEMORY_BYTES)} "
            "taxamap.predict and --stack hold in memory at once; write one map per species as "
            "they are scored with 'taxamap predict --species-file FILE' (without --stack), or "
            "map fewer species at a time"
        )


def read_fit_points(opts: PredictOptions) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The fit's presences and background as (N, 2) lat/lon, read now: a bad file fails in
    seconds, not after the cells."""
    from taxamap.products.occurrences import as_latlon_points

    if not opts.fit:
        return None, None
    occurrences = as_latlon_points(opts.occurrences, "occurrences")
    background = (None if opts.background is None
                  else as_latlon_points(opts.background, "background"))
    return occurrences, background


def predict_dataset(opts: PredictOptions) -> tuple[object, dict[str, float]]:
    """The score maps of the options' queries as an ``xarray.Dataset`` (see
    :mod:`taxamap.dataset`), and the seconds each stage took. Writes no output file (the
    embedding stores in the cache aside). Refuses (TaxamapError) species whose maps would pass
    :data:`MAX_IN_MEMORY_BYTES`."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    occurrences, background = read_fit_points(opts)
    scorer = Scorer(opts)
    grid = scorer.grid
    timings["grid"] = time.perf_counter() - t0
    if opts.fit:
        from taxamap.products.fit import locate_occurrences

        locate_occurrences(occurrences, grid)  # wholly off the grid: fail before any embedding

    # The query first: a bad species name or file fails in seconds, not after the cells.
    t = time.perf_counter()
    skipped: list[str] = []
    encoders = QueryEncoders(opts, scorer.config, scorer.device)
    panel = open_panel(scorer, encoders, opts)
    queries, query_ref = embed_queries(
        opts, scorer.config, scorer.device, skipped, encoders=encoders, panel=panel,
        limit=lambda n: check_in_memory(n, grid, len(scorer.band_names()) + opts.relative))
    timings["query"] = time.perf_counter() - t
    if opts.fit and len(queries) > 1:
        raise TaxamapError(fit_one_species())

    t = time.perf_counter()
    cells = scorer.embed_cells()
    timings["cells"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = scorer.score(np.stack([q.vector for q in queries]))
    more_attrs = {"skipped_species": "; ".join(skipped)} if skipped else {}
    timings["score"] = time.perf_counter() - t
    extra: dict[str, np.ndarray] = {}
    verdicts: list[dict] = []
    if panel is not None:
        from taxamap.panel.product import shared_attrs
        from taxamap.scorer import check_scored

        check_scored(scores[1])
        t = time.perf_counter()
        extra["relative"], verdicts = panel.relative_band(scores[0], queries)
        timings["relative"] = time.perf_counter() - t
        more_attrs.update(shared_attrs(verdicts) if len(queries) > 1 else verdicts[0])
    if opts.fit:
        from taxamap.products.fit import fit_grid
        from taxamap.scorer import check_scored

        check_scored(scores[1])  # before a fit: a modality with no cell fails with its own line
        t = time.perf_counter()
        fit = fit_grid(grid, cells.stores, scores[0][0], occurrences, background,
                       seed=opts.seed, cv_blocks_deg=opts.cv_blocks)
        timings["fit"] = time.perf_counter() - t
        log(fit.format_table())
        fit_extra, fit_attrs = fit_bands(scorer, fit)
        extra.update(fit_extra)
        more_attrs.update(fit_attrs)
    ds = scorer.dataset(queries, query_ref, scores=scores, extra=extra or None,
                        more_attrs=more_attrs)
    if len(queries) > 1 and verdicts:
        from taxamap.panel.product import mark_verdicts

        ds = mark_verdicts(ds, verdicts)
    if opts.fit:
        from taxamap.dataset import with_cv_table

        ds = with_cv_table(ds, fit.samples)
    timings["total"] = time.perf_counter() - t0
    return ds, timings


def open_panel(scorer: Scorer, encoders: QueryEncoders, opts):
    """The reference panel of ``scorer``'s grid when the options ask for ``relative`` (else
    None); a bad panel file fails now, and a panel already in the cache is held at once, so its
    species need no text encoding."""
    if not opts.relative:
        return None
    from taxamap.panel.product import GridPanel

    panel = GridPanel(scorer, lambda n: encoders.text(n_prompts=n), panel=opts.panel,
                      progress=opts.progress)
    panel.panel  # noqa: B018 - resolves (and checks) the panel's species now
    panel.load_cached()
    return panel


def fit_bands(scorer: Scorer, fit) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The bands a fit adds to the map, (1, N) each, and their attrs: ``fitted``,
    ``combined``, ``uncertainty`` and ``novelty``; with the environment modality ``mess`` and
    ``mess_variable`` against the climate of the fit's presence and background cells."""
    from taxamap.scorer import mess_attrs, mess_bands

    extra = {"fitted": fit.fitted[None], "combined": fit.combined[None]}
    for name in ("uncertainty", "novelty"):
        if getattr(fit, name) is not None:
            extra[name] = getattr(fit, name)[None]
    attrs = {k.lower(): v for k, v in fit.tags().items()}
    if "environment" in scorer.modalities:
        reference = fit.samples[["lat", "lon"]].to_numpy(dtype=np.float64)
        result = scorer.climate_mess(reference)
        extra.update(mess_bands(result))
        attrs.update(mess_attrs(result, f"the fit's {fit.n_presence:,} presence and "
                                        f"{fit.n_background:,} background cells"))
    return extra, attrs


def summary_rows(ds, paths: dict[str, Path]) -> list[dict]:
    """One row per query: label, taxonomy source, max and mean fused score, files written."""
    from taxamap.dataset import iter_species

    rows = []
    taxonomy = (list(map(str, ds["taxonomy"].values)) if "taxonomy" in ds.coords else [""])
    for i, one in enumerate(iter_species(ds)):
        values = np.asarray(one["fused"].values)
        valid = values[np.isfinite(values)]
        slug = one.attrs["slug"]
        rows.append({
            "species": one.attrs["query"], "taxonomy": taxonomy[min(i, len(taxonomy) - 1)],
            "max": float(valid.max()) if valid.size else float("nan"),
            "mean": float(valid.mean()) if valid.size else float("nan"),
            "files": ", ".join(str(p) for k, p in paths.items()
                               if k.startswith(f"{slug}.") or k == "stack.tif"),
        })
    skipped = str(ds.attrs.get("skipped_species", "") or "")
    rows.extend({"species": name, "taxonomy": "skipped", "max": float("nan"),
                 "mean": float("nan"), "files": "skipped: unknown species"}
                for name in skipped.split("; ") if name)
    return rows


def predict_and_write(opts: PredictOptions, wopts: WriteOptions, *,
                      on_written: Callable[[dict[str, Path]], None] | None = None,
                      batch_size: int | None = None) -> PredictResult:
    """``taxamap predict``: :func:`predict_dataset` then :func:`write_dataset`, with every input
    the writing reads checked before any cell is embedded.

    A species file (without ``--stack``) is streamed instead: its species are embedded, scored
    and written ``batch_size`` at a time (default :func:`species_batch_size`), so memory holds
    one batch of maps however many species the file names; the result then has no Dataset. The
    files written are handed to ``on_written`` as they are written (and are then not kept in
    the result's ``paths``).
    """
    t0 = time.perf_counter()
    if wopts.stack and not opts.species_file:
        raise TaxamapError(f"{option('stack', True)} needs "
                           f"{option('species-file', metavar='FILE')}")
    checked = check_write(wopts)
    warm_up()
    if opts.species_file and not wopts.stack:
        result = _stream_species(opts, wopts, checked, on_written, batch_size)
        result.timings["total"] = time.perf_counter() - t0
        return result
    ds, timings = predict_dataset(opts)
    t = time.perf_counter()
    paths = write_dataset(ds, wopts, checked=checked)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    if on_written is not None:
        on_written(paths)
    return PredictResult(ds, {} if on_written is not None else paths, timings,
                         summary_rows(ds, paths))


#: Species a streamed species file scores and writes together (fewer on a large grid: see
#: :data:`BATCH_BYTES`).
SPECIES_BATCH = 256

#: The most bytes of maps one batch of a streamed species file holds.
BATCH_BYTES = 256 * 2**20

#: Up to this many rows, a species file's summary table is printed whole; above, it is written
#: to OUT/<file stem>_summary.csv as the species are written, and only its last
#: :data:`SUMMARY_TAIL` rows are kept (and printed).
SUMMARY_PRINTED = 100
SUMMARY_TAIL = 5
SUMMARY_COLUMNS = ("species", "prompt", "taxonomy", "max", "mean", "files")


def species_batch_size(grid: Grid, n_bands: int) -> int:
    """How many species a streamed species file scores at once over ``grid``: at most
    :data:`SPECIES_BATCH`, and no more than :data:`BATCH_BYTES` of maps."""
    return max(1, min(SPECIES_BATCH, BATCH_BYTES // maps_bytes(1, grid, n_bands)))


class SummaryTable:
    """A species file's summary rows as they come: all kept in ``rows`` when ``path`` is None;
    else written to the CSV ``path`` (replaced atomically when ``stack`` closes) with only the
    last :data:`SUMMARY_TAIL` rows kept. ``count`` is how many rows were added."""

    def __init__(self, path: Path | None, stack) -> None:
        import collections
        import csv

        from taxamap.io import atomic_path

        self.path, self.count = path, 0
        self.rows: list[dict] | collections.deque = []
        self._writer = None
        if path is not None:
            tmp = stack.enter_context(atomic_path(path, what=f"writing the summary {path}"))
            fh = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
            self._writer = csv.DictWriter(fh, SUMMARY_COLUMNS)
            self._writer.writeheader()
            self.rows = collections.deque(maxlen=SUMMARY_TAIL)

    def add(self, rows) -> None:
        for row in rows:
            if self._writer is not None:
                self._writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
            self.rows.append(row)
            self.count += 1


def _batch_rows(queries: list[Query], fused: np.ndarray, paths: dict[str, Path]):
    """Summary rows of a scored batch: max and mean fused score of each query's valid cells."""
    finite = np.isfinite(fused)
    valid = finite.sum(axis=1)
    top = np.where(finite, fused, -np.inf).max(axis=1, initial=-np.inf)
    mean = np.where(finite, fused, 0.0).sum(axis=1, dtype=np.float64) / np.maximum(valid, 1)
    for i, q in enumerate(queries):
        yield {"species": q.label, "prompt": q.prompt or "", "taxonomy": q.source,
               "max": float(top[i]) if valid[i] else float("nan"),
               "mean": float(mean[i]) if valid[i] else float("nan"),
               "files": ", ".join(str(p) for k, p in paths.items() if k.startswith(f"{q.slug}."))}


def _stream_species(opts: PredictOptions, wopts: WriteOptions, checked: dict,
                    on_written: Callable[[dict[str, Path]], None] | None,
                    batch_size: int | None) -> PredictResult:
    """The species of ``opts.species_file`` embedded, scored and written a batch at a time (see
    :func:`predict_and_write`); the summary of a long file goes to a CSV as it is written.
    Each batch logs "scored species I to J of N" at DEBUG level (the CLI does not show it)."""
    import contextlib
    import gc
    import sys

    from tqdm.auto import tqdm

    from taxamap.dataset import iter_species

    if opts.fit:
        raise TaxamapError(fit_one_species())
    t0 = time.perf_counter()
    scorer = Scorer(opts)
    grid = scorer.grid
    timings = {"grid": time.perf_counter() - t0}
    # The query first: a bad species name or file fails in seconds, not after the cells.
    t = time.perf_counter()
    skipped: list[str] = []
    taxa = resolve_taxa(opts, skipped)
    encoders = QueryEncoders(opts, scorer.config, scorer.device)
    panel = open_panel(scorer, encoders, opts)
    text = encoders.text(n_prompts=len(taxa))
    timings["query"] = time.perf_counter() - t
    t = time.perf_counter()
    scorer.embed_cells()
    timings["cells"] = time.perf_counter() - t
    timings["score"] = timings["write"] = 0.0

    size = batch_size or species_batch_size(grid, len(scorer.band_names()))
    # Every map's tags name the skipped species: the first few and the count, not thousands.
    more_attrs = {"skipped_species": listed_names(skipped)} if skipped else {}
    many = len(taxa) + len(skipped) > SUMMARY_PRINTED
    csv_path = (checked["out_dir"] / f"{slugify(Path(opts.species_file).stem)}_summary.csv"
                if many else None)
    paths: dict[str, Path] = {}

    def written(files: dict[str, Path]) -> None:
        if on_written is not None:
            on_written(files)
        else:
            paths.update(files)

    if len(taxa) > size:
        log(f"mapping {len(taxa):,} species, {size:,} at a time")
    with contextlib.ExitStack() as stack:
        # What is alive now (models, modules) stays: the collections after each batch need only
        # look at what the batches made (0.05 s instead of 0.5 s with torch loaded).
        stack.callback(gc.unfreeze)
        gc.freeze()
        table = SummaryTable(csv_path, stack)
        bar = stack.enter_context(tqdm(
            total=len(taxa), desc="mapping species", unit="species", file=sys.stderr,
            disable=not opts.progress, dynamic_ncols=True))
        for start in range(0, len(taxa), size):
            t = time.perf_counter()
            queries = species_queries(taxa[start:start + size], text)
            timings["query"] += time.perf_counter() - t
            t = time.perf_counter()
            fused, per = scorer.score(np.stack([q.vector for q in queries]))
            ds = _scored_batch(scorer, panel, queries, text.ref, (fused, per), more_attrs)
            timings["score"] += time.perf_counter() - t
            _logger.debug("scored species %d to %d of %d", start + 1, start + len(queries),
                          len(taxa))
            files: dict[str, Path] = {}
            for one in iter_species(ds):  # each species' files are handed over once written
                t = time.perf_counter()
                done = write_dataset(one, wopts, checked=checked, outline=scorer.region.outline)
                timings["write"] += time.perf_counter() - t
                files.update(done)
                written(done)
                bar.update(1)
            table.add(_batch_rows(queries, fused, files))
            # xarray objects hold reference cycles: collect them now, or the maps of earlier
            # batches would wait for the cyclic collector and memory would grow with the file.
            del ds, fused, per, one
            gc.collect()
        table.add({"species": name, "prompt": "", "taxonomy": "skipped", "max": float("nan"),
                   "mean": float("nan"), "files": "skipped: unknown species"}
                  for name in skipped)
    if csv_path is not None:
        written({csv_path.name: csv_path})
    return PredictResult(None, paths, timings, list(table.rows), summary_path=csv_path,
                         summary_count=table.count)


def _scored_batch(scorer: Scorer, panel, queries: list[Query], ref: str, scores, more_attrs):
    """A streamed batch's Dataset, with its ``relative`` band and verdicts when asked for."""
    if panel is None:
        return scorer.dataset(queries, ref, scores=scores, more_attrs=more_attrs)
    from taxamap.panel.product import mark_verdicts, shared_attrs

    relative, verdicts = panel.relative_band(scores[0], queries)
    attrs = {**more_attrs, **(shared_attrs(verdicts) if len(queries) > 1 else verdicts[0])}
    ds = scorer.dataset(queries, ref, scores=scores, extra={"relative": relative},
                        more_attrs=attrs)
    return mark_verdicts(ds, verdicts) if len(queries) > 1 else ds


def fit_one_species() -> str:
    """Why a fit refuses several species, in the caller's words."""
    return (f"{option('fit', True)} fits one species' occurrences: map one species at a time "
            f"({option('species', metavar='NAME')}, not several)")


def embed(opts: GridOptions, verify: bool = False) -> CellEmbeddings:
    """``taxamap embed``: fill the stores for a grid without making a map; with ``verify``, read
    every stored block back and embed again the ones that fail their check. Grids wider than a
    map tile get their stores' embedding pyramids too (built once; again after a resume)."""
    from taxamap.options import MapOptions, build, values_of
    from taxamap.pyramid import ensure_pyramid

    scorer = open_scorer(build(MapOptions, values_of(opts)), verify=verify)
    for store in scorer.cells.stores.values():
        try:
            ensure_pyramid(store, scorer.grid)
        except OSError as exc:  # a read-only store: taxamap serve scores the grid's own cells
            log(f"no embedding pyramid beside {store.location}: {exc.strerror or exc}")
    return scorer.cells
