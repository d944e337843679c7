"""Files from a score Dataset: the output formats (one registry) and what ``taxamap predict``,
:func:`taxamap.write` and the web app's downloads write, with every input checked first.

Each format is a writer taking a one-query (y, x) Dataset and a path (:data:`FORMATS`); the
range products (``--threshold``) go beside the map (:mod:`taxamap.products.ranges`). A map is
named by its query's slug, never silently replacing a map of another query (:func:`free_stem`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.naming import slugify
from taxamap.paths import check_folder
from taxamap.surface import option

if TYPE_CHECKING:  # pragma: no cover
    from taxamap.options import WriteOptions

_logger = logging.getLogger("taxamap")


def log(message: str) -> None:
    _logger.info(message)


def _geotiff(ds, path, **_context) -> Path:
    from taxamap.writers.geotiff import write_geotiff

    return write_geotiff(ds, path)


def _html(ds, path, **context) -> Path:
    from taxamap.writers.html import write_html

    return write_html(ds, path, **context)


def _png(ds, path, *, outline=None, stretch=None, **_context) -> Path:
    from taxamap.writers.png import write_png

    return write_png(ds, path, outline=outline, stretch=stretch)


@dataclass(frozen=True)
class OutputFormat:
    """One output format: its file ``suffix``, HTTP ``media_type`` and ``write(ds, path,
    **context)`` (``context``: what the HTML map draws beside the bands, e.g. ``outline``,
    ``occurrences``, ``range_geometry``; each writer takes what it uses)."""

    suffix: str
    media_type: str
    write: Callable[..., Path]


#: The output formats, by name (``--formats``/``formats=``, the web app's downloads).
FORMATS: dict[str, OutputFormat] = {
    "tif": OutputFormat(".tif", "image/tiff", _geotiff),
    "html": OutputFormat(".html", "text/html", _html),
    "png": OutputFormat(".png", "image/png", _png),
}


def list_formats() -> list[str]:
    """The output formats' names, in writing order."""
    return list(FORMATS)


def get_format(name: str) -> OutputFormat:
    """Output format ``name``; a one-line error naming the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise TaxamapError(f"unknown output format {name!r}; choose from "
                           f"{', '.join(FORMATS)}") from None


def warm_up() -> None:
    """Import the writers' heavy libraries in the background while the query is embedded and the
    cells scored (they are needed last; ~1 s of imports overlaps with work)."""
    import threading

    def load() -> None:
        try:
            import folium  # noqa: F401
            import matplotlib.figure  # noqa: F401
            import rasterio  # noqa: F401
        except Exception:  # the writers will report a real problem themselves
            pass

    threading.Thread(target=load, name="taxamap-warm-up", daemon=True).start()


def check_out_dir(out) -> Path:
    """Create ``out`` and prove it is writable before any long work starts."""
    return check_folder(out, "--out")


def check_write(opts: "WriteOptions") -> dict:
    """Check every input :func:`write_dataset` reads before any long work; returns what it read
    (``occurrences`` as (N, 2) lat/lon, ``expert`` geometry, ``out_dir``)."""
    from taxamap.writers.stretch import parse_stretch

    for name in opts.formats:
        get_format(name)
    parse_stretch(opts.stretch)
    if opts.stack and (opts.threshold or opts.occurrences is not None or opts.self_contained
                       or opts.expert_range is not None):
        given = [name for name, value in (
            ("threshold", opts.threshold), ("occurrences", opts.occurrences is not None),
            ("expert-range", opts.expert_range is not None),
            ("self-contained", opts.self_contained)) if value]
        raise TaxamapError(f"{option('stack', True)} writes one multi-band GeoTIFF only; drop "
                           f"{' and '.join(option(n) for n in given)}, or map species one by one")
    read: dict = {"occurrences": None}
    if opts.occurrences is not None:
        from taxamap.products.occurrences import as_latlon_points

        read["occurrences"] = as_latlon_points(opts.occurrences, "occurrences")
    if opts.threshold:
        from taxamap.products.ranges import parse_rule

        rule = parse_rule(opts.threshold)
        if rule.kind == "maxtss":
            if rule.occurrences:
                from taxamap.products.occurrences import read_points

                read_points(rule.occurrences)
            elif read["occurrences"] is None:
                raise TaxamapError(f"{option('threshold', 'maxtss')} needs occurrences: "
                                   f"{option('threshold', 'maxtss:FILE')}, or "
                                   f"{option('occurrences', metavar='FILE')}")
    read["expert"] = None
    if opts.expert_range is not None:
        from taxamap.products.expert import read_expert_range

        read["expert"] = read_expert_range(opts.expert_range)
    if opts.self_contained and "html" in opts.formats:
        from taxamap.writers.assets import check_offline_assets

        check_offline_assets()  # a missing offline extra fails now, not after every cell
    read["out_dir"] = check_out_dir(opts.out)
    return read


def write_dataset(ds, opts: "WriteOptions", *, checked: dict | None = None,
                  outline=None) -> dict[str, Path]:
    """Write the files of :func:`taxamap.write` for every query of ``ds`` (``outline``: the
    region boundary to draw, default the Dataset's own); returns ``{name: path}``."""
    from taxamap.dataset import check_dataset, iter_species, outline_of

    ds = check_dataset(ds)
    checked = checked if checked is not None else check_write(opts)
    out_dir = checked["out_dir"]
    paths: dict[str, Path] = {}
    if opts.stack:
        from taxamap.writers.geotiff import write_stack

        stem = slugify(opts.stack_name) if opts.stack_name else str(
            ds.attrs.get("slug") or "taxamap")
        paths["stack.tif"] = write_stack(ds, out_dir / f"{stem}-stack.tif")
        return paths
    if outline is None and any(f in opts.formats for f in ("html", "png")):
        outline = outline_of(ds)
    notes = ()
    if checked["occurrences"] is not None:
        notes = occurrence_notes(next(iter_species(ds)), checked["occurrences"])
    for one in iter_species(ds):
        files = write_outputs(one, out_dir, opts.formats, threshold=opts.threshold,
                              occurrences=checked["occurrences"],
                              self_contained=opts.self_contained, outline=outline,
                              expert_geometry=checked["expert"], notes=notes,
                              stretch=opts.stretch)
        for ext, path in files.items():
            paths[f"{one.attrs['slug']}.{ext}"] = path
    return paths


def occurrence_notes(ds, occurrences: np.ndarray) -> tuple[str, ...]:
    """When no occurrence point falls on a scored cell of the (y, x) map ``ds`` (an empty file,
    latitude and longitude swapped, points outside the region), the reason, logged as one
    warning line, for the HTML legend; the map itself is still written."""
    from taxamap.products.evaluate import points_on_map

    try:
        points_on_map(ds, occurrences, "occurrence points")
    except TaxamapError as exc:
        _logger.warning(f"occurrences: {exc}")
        return (f"occurrences: {exc}",)
    return ()


def output_names(stem: str, formats, threshold: bool) -> list[str]:
    """The files :func:`write_outputs` writes for ``stem`` (the GeoPackage goes with the range
    GeoTIFF)."""
    names = [f"{stem}{fmt.suffix}" for name, fmt in FORMATS.items() if name in formats]
    return names + ([f"{stem}_range.tif"] if threshold else [])


def free_stem(out_dir: Path, slug: str, query: str, formats, threshold: bool) -> str:
    """``slug``, unless a file it would write in ``out_dir`` holds a map of another query (its
    recorded query differs): then the first of ``slug-2``, ``slug-3``, ... that is free or
    holds this query's own maps, said in one line. A rerun of the same query overwrites its own
    files; a map of another query is never silently replaced."""
    from taxamap.writers import recorded_query

    def other(stem: str) -> tuple[str, str] | None:
        for name in output_names(stem, formats, threshold):
            held = recorded_query(out_dir / name)
            if held is not None and held != query:
                return name, held
        return None

    clash = other(slug)
    if clash is None:
        return slug
    for n in range(2, 1000):
        stem = f"{slug}-{n}"
        if other(stem) is None:
            log(f"{out_dir / clash[0]} holds the map of {clash[1]!r}, not {query!r}: keeping it "
                f"and writing this map as {stem}.*")
            return stem
    raise TaxamapError(f"{out_dir} holds maps of other queries under every name {slug}-2 to "
                       f"{slug}-999; {option('out', metavar='DIR')} elsewhere")


def write_outputs(ds, out_dir: Path, formats=tuple(FORMATS), *, threshold: str | None = None,
                  occurrences: np.ndarray | None = None, self_contained: bool = False,
                  outline=None, expert_geometry=None, notes: tuple[str, ...] = (),
                  stretch: str | None = None) -> dict[str, Path]:
    """Write the requested files for the one-query (y, x) Dataset ``ds`` into ``out_dir`` (each
    atomically), in :data:`FORMATS` order; returns ``{format: path}``.

    With ``threshold`` the binary range GeoTIFF and polygons are written beside the map and the
    range outline is drawn on the HTML map; ``occurrences`` (N, 2) (lat, lon) are overlaid on it;
    ``notes`` are warnings for the HTML legend; ``stretch`` the PNG's and HTML's display scale.
    """
    from taxamap.dataset import cv_table
    from taxamap.io import atomic_write

    slug = free_stem(out_dir, str(ds.attrs["slug"]), str(ds.attrs.get("query", "")), formats,
                     bool(threshold))
    cut = None
    if threshold:
        from taxamap.products.ranges import cut_range

        cut = cut_range(ds, threshold, occurrences)  # a rule keeping no cell fails before any file
    context = {"outline": outline, "occurrences": occurrences, "notes": tuple(notes),
               "self_contained": self_contained, "expert_geometry": expert_geometry,
               "range_geometry": None if cut is None else cut.geometry,
               "range_label": threshold if cut is not None else None, "stretch": stretch}
    paths: dict[str, Path] = {}
    for name, fmt in FORMATS.items():
        if name in formats:
            paths[name] = fmt.write(ds, out_dir / f"{slug}{fmt.suffix}", **context)
    samples = cv_table(ds)
    if samples is not None:
        # A fitted map's per-sample cross-validation: held-out prediction, novelty, uncertainty.
        paths["cv.csv"] = atomic_write(out_dir / f"{slug}_cv.csv",
                                       samples.to_csv(index=False, float_format="%.6g"),
                                       hint="free some space or choose another --out")
    if cut is not None:
        written = cut.write(out_dir, stem=slug)
        paths["range.tif"], paths["range.gpkg"] = written["raster"], written["polygons"]
        log(f"range ({threshold}): threshold {cut.threshold:.4f}, {cut.n_in_range:,} of "
            f"{cut.n_valid:,} cells, {cut.area_km2:,.0f} km2")
        log(f"range EOO {cut.eoo_km2:,.0f} km2, AOO {cut.aoo_km2:,.0f} km2 (IUCN 2 km "
            f"grid): {cut.criterion_b}")
    return paths
