"""The ``taxamap`` command: parse options, call one library function, print results.

Results (written paths, tables) go to stdout; progress and notices to stderr. A bad input ends in
one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from taxamap.version import __version__
from taxamap.errors import TaxamapError
from taxamap.options import (SATELLITE, FitOptions, GridOptions, MapOptions, PredictOptions,
                             QueryOptions, RichnessOptions, SpeciesAtOptions, WriteOptions,
                             add_options, from_args, option_fields)
from taxamap.surface import speaking_to

EXAMPLES_PREDICT = """examples:
  taxamap predict --species "Cardinalis cardinalis" --region usa
  taxamap predict --species "animalia chordata aves passeriformes cardinalidae cardinalis cardinalis" --bbox -90,30,-75,45
  taxamap predict --species "American Robin" --region "Georgia (USA)"   # common name; the US state
  taxamap predict --image bird.jpg --region ohio --resolution 0.05 --out maps/
  taxamap predict --species-file birds.txt --region ohio --out maps/   # written as they are scored
  taxamap predict --species "Ursus arctos" --region canada --modalities location,environment --worldclim ~/data/worldclim
  taxamap predict --species "Cardinalis cardinalis" --region ohio --modalities location,satellite
  taxamap patches --lat 40.0 --lon -83.0 --out patches/
"""


EXAMPLES_SERVE = """examples:
  taxamap serve --region usa --resolution 0.05        # embeds the grid first if it is not stored
  # -> serving http://127.0.0.1:8765/  (open it in a browser; Ctrl-C stops the server)
  taxamap serve --region ohio --modalities location,satellite --port 8080
  taxamap serve --bbox -84,39,-82,41 --models ~/taxabind-models --host 0.0.0.0
  taxamap serve --region usa --max-upload 10 --max-uploads 2 --upload-timeout 60
  taxamap serve --region world --resolution 0.05      # drawn as map tiles (8.5 M cells)

HTTP API (what the page uses; scripts may too):
  GET  /api/health | /api/search?q=TEXT | /api/map?species=NAME[&band=B]
  GET  /api/cell?species=NAME&lat=LAT&lon=LON
  GET  /tiles/NAME/Z/X/Y.png[?band=B]  (256-px Web Mercator map tiles, any zoom)
  GET  /api/download?species=NAME&format=tif|png|gpkg[&threshold=percentile:90]
  POST /api/query  (multipart field 'file': a photo or a recording)
       413: larger than --max-upload; 503 + Retry-After: --max-uploads already arriving;
       408: the body stalled (--read-timeout) or took longer than --upload-timeout.
       Photos are decoded up to 40 Mpx (larger JPEGs at 1/2-1/8 size), recordings up to 10 min.
"""


EXAMPLES_PANEL = """examples:
  taxamap species-at --lat 40.0 --lon -83.0 --region ohio --top 15
  taxamap species-at --lat 40.0 --lon -83.0 --region ohio --clade "Animalia Chordata Mammalia" --json here.json
  taxamap species-at --lat 40.0 --lon -83.0 --region ohio --panel ohio_checklist.txt
  taxamap richness --region usa --resolution 0.05 --out maps/            # all 2,435 table species
  taxamap richness --region ohio --clade "Animalia Chordata Aves Passeriformes" --rule percentile:95
  taxamap richness --region ohio --species-file birds.txt --stack --stretch value:0,40
  taxamap predict --species "Animalia Chordata Aves Passeriformes Cardinalidae" --region usa   # a clade's own map
  taxamap predict --species "Turdus merula" --region ohio --relative    # + band 'relative', 'no signal' warning
"""


#: The satellite source options (``patches`` takes them with ``--cache``).
SATELLITE_OPTIONS = tuple(f.name for f in option_fields(GridOptions)
                          if f.metadata["group"] == SATELLITE)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2), keeps the examples'
    line breaks, and takes ``--debug`` after any command (``taxamap predict ... --debug``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand that is not given --debug leaves the top-level value alone.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show tracebacks on errors")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _grid_options(p: argparse.ArgumentParser) -> None:
    """The grid, model, source and runtime options (:class:`taxamap.options.GridOptions`)."""
    add_options(p, GridOptions)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taxamap",
        description="Zero-shot species-distribution maps from TaxaBind embeddings.",
        epilog="Run 'taxamap COMMAND --help' for a command's options.\n\n" + EXAMPLES_PREDICT,
    )
    parser.add_argument("--version", action="version", version=f"taxamap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "predict", help="make a species-distribution map (GeoTIFF, HTML, PNG)",
        description="Score every cell of a region against a species name or a photo and write "
        "OUT/<slug>.tif (raw cosine similarities, band 1 fused, then one band per modality), "
        "OUT/<slug>.html (interactive map) and OUT/<slug>.png.",
        epilog=EXAMPLES_PREDICT,
    )
    add_options(p, QueryOptions, GridOptions, MapOptions, WriteOptions, FitOptions)

    p = sub.add_parser(
        "embed", help="embed a grid's cells into a store, for instant later predictions",
        description="Compute and store the query-independent cell embeddings of a grid. "
        "Resumable: rerun the same command after an interruption. Runs on the same grid share "
        "the work: each block is computed once, by whichever run claims it first. Stored blocks "
        "that are missing or cut short are embedded again; --verify reads every block back and "
        "checks its checksum too.",
        epilog="examples:\n  taxamap embed --region usa --resolution 0.05\n"
        "  taxamap embed --region usa --resolution 0.05 --verify   # check (and repair) the store\n"
        "  taxamap embed --region world --resolution 0.05 --modalities location"
        "   # and its tile pyramids",
    )
    _grid_options(p)
    p.add_argument("--verify", action="store_true",
                   help="read every stored block back and check it against its checksum; "
                   "damaged blocks are embedded again")

    p = sub.add_parser(
        "serve", help="a local web app: map any species on a stored grid in under a second",
        description="Open a map session over one grid (embedding its cells first when they are "
        "not stored) and serve a web page and an HTTP API on it: type a species (or drop a "
        "photo or a recording) and see its map; switch layers, stretch, threshold, compare, "
        "download. Prints 'serving http://HOST:PORT/' on stdout when ready.",
        epilog=EXAMPLES_SERVE,
    )
    add_options(p, MapOptions)
    w = p.add_argument_group("web server")
    w.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
                   "exposes the app to the network, with a warning)")
    w.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one)")
    w.add_argument("--max-upload", type=float, default=20.0, metavar="MB",
                   help="largest photo or recording accepted (default 20 MB)")
    w.add_argument("--max-uploads", type=int, default=4, metavar="N",
                   help="uploads received and embedded at once; one more is answered 503 with "
                   "Retry-After (default 4)")
    w.add_argument("--read-timeout", type=float, default=20.0, metavar="S",
                   help="seconds a request's head may take to arrive and an upload may stall "
                   "before the connection is closed (408; default 20)")
    w.add_argument("--upload-timeout", type=float, default=120.0, metavar="S",
                   help="seconds an upload's whole body may take to arrive (408; default 120)")

    p = sub.add_parser(
        "species-at", help="what lives here? the reference panel's species ranked at one place",
        description="Rank the reference panel's species (default: taxamap's 2,435 table "
        "species; --panel FILE, --clade PREFIX) at the cell holding --lat/--lon by the score "
        "each species' own map has there, best first; 'relative' is the share of the other "
        "panel species scoring lower there. Prints a table (and the ranking rule); --json "
        "writes it too. The grid's cells are embedded first when they are not stored.",
        epilog=EXAMPLES_PANEL)
    add_options(p, SpeciesAtOptions, skip=("relative",))

    p = sub.add_parser(
        "richness", help="species richness: per cell, how many species' ranges hold it",
        description="Cut every species' map at --rule (as 'taxamap threshold' does) and count, "
        "per cell, the species whose range holds it: OUT/<name>_richness.tif (band "
        "'richness'), .html and .png; --stack also writes OUT/<name>_richness_stack.tif, one "
        "in/out band per species. Species: --species-file's, else the reference panel's "
        "(--panel FILE, default the table's 2,435), under --clade PREFIX. Streamed in batches "
        "of species: memory stays flat.",
        epilog=EXAMPLES_PANEL)
    add_options(p, RichnessOptions, skip=("relative",))
    add_options(p, WriteOptions, only=("out", "stack", "stretch", "self_contained"))

    p = sub.add_parser(
        "evaluate", help="score a map against occurrence points (AUC, AP, max TSS, Boyce) or an "
        "expert range (H3 cells: AP, AUC, precision, recall, F1, Jaccard)",
        description="Per band of MAP (fused and each modality): with --occurrences, ROC-AUC, "
        "average precision, the threshold maximising TSS and that TSS, and the continuous Boyce "
        "index (points outside the map or on nodata are counted and reported); with --range, "
        "the SINR protocol on every H3 resolution-5 cell whose centre is on the map: AP and "
        "ROC-AUC against the expert range, and precision, recall, F1 and Jaccard at --rule.",
        epilog="examples:\n  taxamap evaluate cardinalis-cardinalis.tif --occurrences gbif.csv\n"
        "  taxamap evaluate map.tif --occurrences pres.gpkg --background bg.gpkg --json m.json\n"
        "  taxamap evaluate map.tif --range iucn_range.gpkg --out compare/",
    )
    p.add_argument("map", help="a GeoTIFF written by taxamap predict")
    p.add_argument("--occurrences", metavar="FILE",
                   help="presences: CSV (lat/lon, latitude/longitude or GBIF's decimalLatitude/"
                   "decimalLongitude), GeoPackage, Shapefile or GeoJSON in any CRS")
    p.add_argument("--range", metavar="FILE", dest="expert_range",
                   help="an expert range map: polygons in a vector file (any CRS)")
    p.add_argument("--rule", default="maxf1", help="with --range: threshold for precision/"
                   "recall/F1/Jaccard: maxf1 (default) | percentile:P | value:V | maxtss:OCC_FILE")
    p.add_argument("--band", default="1", help="with --range --out: band of the agreement "
                   "raster (number or name; default 1 = fused)")
    p.add_argument("--out", metavar="DIR", help="with --range: write MAP_agreement.tif "
                   "(1 both, 2 map only, 3 expert only) and its QGIS style there")
    p.add_argument("--background", metavar="FILE", help="absence/background points (default: "
                   "sampled uniformly over the map's valid cells)")
    p.add_argument("--presence-column", metavar="COL", help="one file with a 1/0 column COL "
                   "holding both presences (1) and background (0)")
    p.add_argument("--n-background", type=int, default=10000, help="sampled background size")
    p.add_argument("--seed", type=int, default=0, help="background sampling seed (default 0)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--roc", metavar="PNG", help="also write ROC curves (PNG)")

    p = sub.add_parser(
        "threshold", help="cut a map into a binary range GeoTIFF and polygons",
        epilog="examples:\n  taxamap threshold map.tif --rule percentile:90\n"
        "  taxamap threshold map.tif --rule maxtss:gbif.csv --out ranges/\n"
        "  taxamap threshold map.tif --band combined --rule value:0.5 --mask novelty>2",
    )
    p.add_argument("map", help="a GeoTIFF written by taxamap predict")
    p.add_argument("--rule", default="percentile:90",
                   help="percentile:P | value:V | maxtss:OCC_FILE (default percentile:90); a "
                   "rule that keeps no cell is an error giving the map's value range")
    p.add_argument("--band", default="1", help="band number or name (default 1 = fused)")
    p.add_argument("--mask", metavar="COND", help="drop the cells where a trust band says the "
                   "model cannot vouch for them (nodata, neither in nor out), after the rule "
                   "set the threshold: BAND>V, BAND<V (>=, <=), comma-separated, e.g. "
                   "novelty>2 or novelty>2,uncertainty>0.1")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the map's folder)")

    p = sub.add_parser(
        "survey", help="where to survey next: suitable but uncertain or novel cells, far from "
        "every known record (GeoPackage, CSV, GPX waypoints, HTML map)",
        description="Rank the valid cells of MAP by the weighted geometric mean of their "
        "percentile ranks in the --weights bands (suitability = combined, else fitted, else "
        "fused) and pick up to --n sites, best first, each at least --min-distance km "
        "(geodesic) from every record and from every other site. Writes MAP_survey.gpkg, "
        ".csv, .gpx and .html.",
        epilog="examples:\n  taxamap survey maps/ariolimax.tif --occurrences records.csv\n"
        "  taxamap survey map.tif --occurrences gbif.csv --n 20 --min-distance 25 "
        "--weights suitability:2,novelty --out field/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("map", help="a GeoTIFF written by taxamap predict (with --fit for the "
                   "uncertainty and novelty bands)")
    p.add_argument("--occurrences", metavar="FILE", help="the known records: CSV (lat/lon, "
                   "latitude/longitude or decimalLatitude/decimalLongitude), GeoPackage, "
                   "Shapefile or GeoJSON in any CRS")
    p.add_argument("--n", type=int, default=50, help="number of sites (default 50)")
    p.add_argument("--min-distance", type=float, default=10.0, metavar="KM",
                   help="least geodesic distance from every record and between sites, km "
                   "(default 10)")
    p.add_argument("--weights", metavar="LIST", help="bands to rank by, as names or name:weight "
                   "(default: suitability plus the map's uncertainty and novelty bands), e.g. "
                   "suitability,uncertainty,novelty or suitability:2,novelty:1")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the map's folder)")

    p = sub.add_parser(
        "occurrences", help="download GBIF occurrences of a species in a region (needs internet)",
        epilog='example:\n  taxamap occurrences --species "Cardinalis cardinalis" --region ohio '
        "--out cardinal.csv",
    )
    p.add_argument("--species", required=True, help="binomial")
    p.add_argument("--region", help="preset name or vector file")
    p.add_argument("--bbox", metavar="W,S,E,N", help="lon/lat box")
    p.add_argument("--out", required=True, metavar="FILE", help="CSV to write")
    p.add_argument("--limit", type=int, default=5000, help="most records to fetch (default 5000)")
    p.add_argument("--cache", metavar="DIR", default=None, help="cache folder")

    p = sub.add_parser(
        "patches", help="write the satellite patches the encoder sees at some points",
        description="For each --lat/--lon pair, write OUT/<lat>_<lon>.png, the exact RGB patch\n"
        "handed to the satellite encoder's preprocessing, and OUT/<lat>_<lon>.json with its\n"
        "footprint (bbox, metres per pixel), the source and the request(s) or tiles used.",
        epilog="examples:\n  taxamap patches --lat 40.0 --lon -83.0 --out patches/\n"
        "  taxamap patches --lat 60.1 --lon 24.9 --lat -70 --lon 140 --sat-source xyz --out p/",
    )
    p.add_argument("--lat", type=float, action="append", required=True, metavar="LAT",
                   help="latitude in degrees (repeat, one per --lon)")
    p.add_argument("--lon", type=float, action="append", required=True, metavar="LON",
                   help="longitude in degrees (repeat, one per --lat)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_options(p, GridOptions, only=("cache", *SATELLITE_OPTIONS))

    p = sub.add_parser("regions", help="list region presets",
                       description="List the region presets --region accepts, one per line: "
                       "name, kind and code, tab-separated, after a header line.")
    p.add_argument("--kind", help="only this kind (world, continent, country, state, province; "
                   "any other is an error)")

    p = sub.add_parser("models", help="manage model weights")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", parser_class=_Parser)
    d = msub.add_parser("download", help="fill a models folder for air-gapped machines",
                        epilog="example:\n  taxamap models download ~/taxabind-models\n"
                        "  taxamap predict --models ~/taxabind-models ...")
    d.add_argument("dir", help="target folder (gets DIR/<org>/<repo>/ files)")
    d.add_argument("--repos", help="comma list of hub repos (default: all TaxaBind repos)")

    p = sub.add_parser(
        "cache", help="inspect, check or clear the cache (embedding stores and tiles)",
        epilog="examples:\n  taxamap cache info\n  taxamap cache verify\n"
        "  taxamap cache clear --region Ohio          # the stored grids of one region\n"
        "  taxamap cache clear --older-than 30        # stores unused for 30 days\n"
        "  taxamap cache clear --tiles                # every cached tile, no store",
    )
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    for name, helptext in (
            ("info", "each stored grid (region, resolution, cells, modality, model, size, last "
                     "use) and the tile cache"),
            ("verify", "read every stored block back and check it against its checksum; "
                       "damaged blocks are embedded again by the next run over their grid"),
            ("clear", "delete embedding stores and cached tiles (default: all of both)")):
        c = csub.add_parser(name, help=helptext, description=helptext)
        c.add_argument("--cache", metavar="DIR", default=None, help="cache folder")
        if name == "clear":
            c.add_argument("--stores", action="store_true", help="only embedding stores")
            c.add_argument("--tiles", action="store_true", help="only cached tiles")
            c.add_argument("--region", metavar="NAME",
                           help="only the stores of this region (as 'cache info' names it)")
            c.add_argument("--older-than", metavar="DAYS", type=float,
                           help="only the stores last used more than DAYS days ago")
            c.add_argument("--source", help="only this source's tiles")

    p = sub.add_parser("data", help="download reference data")
    dsub = p.add_subparsers(dest="data_command", metavar="DATASET", parser_class=_Parser)
    w = dsub.add_parser("worldclim", help="WorldClim 2.1 5-minute rasters (elevation + bio1-19)")
    w.add_argument("dir", help="target folder")
    return parser


def _print_paths(paths: dict) -> None:
    """Written files on stdout as they are written (a long species file shows results at once)."""
    for path in paths.values():
        print(path, flush=True)


def _cmd_predict(args) -> int:
    from taxamap.pipeline import predict_and_write

    stem = os.path.splitext(os.path.basename(args.species_file))[0] if args.species_file else None
    result = predict_and_write(from_args(PredictOptions, args),
                               from_args(WriteOptions, args, stack_name=stem),
                               on_written=_print_paths)
    t = result.timings
    fit = f", fit {t['fit']:.1f} s" if "fit" in t else ""
    _say(f"done in {t['total']:.1f} s (cells {t['cells']:.1f} s, query {t['query']:.1f} s, "
         f"score {t['score']:.1f} s{fit}, write {t['write']:.1f} s)")
    if result.summary_path is not None:
        _say(f"summary table of all {result.summary_count:,} rows: {result.summary_path}; "
             f"the last {len(result.summary)}:")
    if len(result.summary) > 1:
        _say(f"{'species':<32} {'taxonomy':<12} {'max':>7} {'mean':>7}")
        for row in result.summary:
            if row["taxonomy"] == "skipped":
                _say(f"{row['species'][:32]:<32} {'skipped':<12} {'-':>7} {'-':>7}  unknown species")
                continue
            _say(f"{row['species'][:32]:<32} {row['taxonomy']:<12} {row['max']:>7.3f} "
                 f"{row['mean']:>7.3f}")
    return 0


def _cmd_species_at(args) -> int:
    from taxamap.panel.questions import species_at_table

    table = species_at_table(from_args(SpeciesAtOptions, args))
    a = table.attrs
    _say(f"cell at lat {a['lat']:g}, lon {a['lon']:g}; panel {a['panel']}; {a['rule']}")
    print(f"{'rank':>4}  {'species':<34} {'score':>8} {'relative':>8}")
    for row in table.itertuples(index=False):
        print(f"{row.rank:>4}  {row.name[:34]:<34} {row.score:>8.4f} {row.relative:>8.3f}")
    if args.json:
        print(args.json)
    return 0


def _cmd_richness(args) -> int:
    from taxamap.panel.questions import richness_map, write_richness

    opts = from_args(RichnessOptions, args)
    wopts = from_args(WriteOptions, args)
    from taxamap.writers.files import check_write

    check_write(wopts)  # a bad --out or --stretch fails before any species is counted
    _print_paths(write_richness(richness_map(opts, stack=args.stack), wopts))
    return 0


def _cmd_embed(args) -> int:
    from taxamap.pipeline import embed

    cells = embed(from_args(GridOptions, args), verify=args.verify)
    for modality, store in cells.stores.items():
        print(f"{modality}\t{store.location}\t{cells.computed_blocks[modality]} blocks computed")
    return 0


def _cmd_serve(args) -> int:
    from taxamap.serve.server import serve
    from taxamap.session import MapSession

    if not args.max_upload > 0:
        raise TaxamapError(f"--max-upload must be a positive number of MB, got {args.max_upload}")
    if args.max_uploads < 1:
        raise TaxamapError(f"--max-uploads must be at least 1, got {args.max_uploads}")
    for flag in ("read_timeout", "upload_timeout"):
        if not getattr(args, flag) > 0:
            raise TaxamapError(f"--{flag.replace('_', '-')} must be a positive number of "
                               f"seconds, got {getattr(args, flag)}")
    options = from_args(MapOptions, args)
    return serve(lambda: MapSession(options), host=args.host, port=args.port,
                 max_upload=int(args.max_upload * 2**20), say=_say,
                 max_uploads=args.max_uploads, read_timeout=args.read_timeout,
                 upload_timeout=args.upload_timeout)


def _cmd_patches(args) -> int:
    from taxamap.paths import cache_subdir, check_folder, checked_cache_root
    from taxamap.sources.satellite import make_satellite_source, write_patches

    if len(args.lat) != len(args.lon):
        raise TaxamapError(f"give one --lon per --lat ({len(args.lat)} --lat, {len(args.lon)} --lon)")
    checked_cache_root(args.cache)
    check_folder(args.out, "--out")
    source = make_satellite_source(
        args.sat_source, url=args.sat_url, zoom=args.sat_zoom, size=args.sat_size,
        footprint_m=args.sat_footprint, file=args.sat_file, ee_project=args.ee_project,
        year=args.sat_year, cache_dir=cache_subdir("tiles", args.cache), workers=args.workers,
    )
    with source:
        written = write_patches(list(zip(args.lat, args.lon)), args.out, source)
    for item in written:
        if item.png is None:
            print(f"no imagery at ({item.lat}, {item.lon}): see {item.json}", file=sys.stderr)
        else:
            print(item.png)
        print(item.json)
    return 0


def _cmd_regions(args) -> int:
    from taxamap.grids import check_kind, list_regions

    kind = None if args.kind is None else check_kind(args.kind)
    print("name\tkind\tcode")
    for info in list_regions():
        if kind and info.kind != kind:
            continue
        print(f"{info.name}\t{info.kind}\t{info.code or ''}")
    return 0


def _cmd_models(args) -> int:
    if args.models_command != "download":
        raise TaxamapError("usage: taxamap models download DIR")
    from taxamap.models.hub import download_models

    repos = [r.strip() for r in args.repos.split(",")] if args.repos else None
    for path in download_models(args.dir, repos):
        print(path)
    return 0


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows as aligned columns (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _cmd_cache(args) -> int:
    import time

    from taxamap.io import format_bytes
    from taxamap.paths import cache_root, cache_subdir
    from taxamap.sources.cache import cache_clear, cache_info
    from taxamap.store import default_store_root
    from taxamap.store_cache import cached_stores, clear_stores, verify_store

    if not getattr(args, "cache_command", None):
        raise TaxamapError("usage: taxamap cache info|verify|clear (see 'taxamap cache --help')")
    tiles = cache_subdir("tiles", args.cache)
    if args.cache_command == "info":
        stores = cached_stores(args.cache)
        info = cache_info(tiles)
        print(f"cache: {cache_root(args.cache)}")
        total = sum(s.bytes for s in stores)
        print(f"embedding stores: {len(stores)} ({format_bytes(total)}) in "
              f"{default_store_root(args.cache)}")
        if stores:
            rows = [["region", "resolution", "cells", "modality", "model", "size", "last use"]]
            for s in stores:
                rows.append([
                    s.region + ("" if s.readable else " (damaged)"),
                    "?" if s.resolution is None else f"{s.resolution:g}",
                    "?" if s.cells is None else f"{s.cells:,}", s.modality, s.model,
                    format_bytes(s.bytes), time.strftime("%Y-%m-%d %H:%M",
                                                         time.localtime(s.last_used))])
            print("\n".join(_table(rows)))
        print(f"tiles: {info['entries']:,} entries ({format_bytes(info['bytes'])}), "
              f"{info['missing']:,} not-found markers in {info['path']}")
        if info["sources"]:
            rows = [["source", "entries", "size", "not found"]]
            rows += [[t["label"], f"{t['entries']:,}", format_bytes(t["bytes"]),
                      f"{t['missing']:,}"] for t in info["sources"]]
            print("\n".join(_table(rows)))
        return 0
    if args.cache_command == "verify":
        stores = cached_stores(args.cache)
        damaged = 0
        for s in stores:
            sound, unfinished, problem = verify_store(s)
            if problem:
                damaged += 1
                print(problem)
                continue
            left = f", {unfinished} unfinished" if unfinished else ""
            res = "?" if s.resolution is None else f"{s.resolution:g} deg"
            print(f"{s.region} {res} {s.modality}: {sound:,} block{'s' * (sound != 1)} sound"
                  f"{left} ({s.path})")
        print(f"checked {len(stores)} embedding stores: "
              + (f"{damaged} damaged" if damaged else "all sound"))
        return 1 if damaged else 0
    if args.cache_command == "clear":
        store_filter = args.region is not None or args.older_than is not None
        do_stores = args.stores or store_filter
        do_tiles = args.tiles or args.source is not None
        if not (do_stores or do_tiles):
            do_stores = do_tiles = True
        if store_filter and do_tiles and not do_stores:
            raise TaxamapError("--region and --older-than select embedding stores; drop --tiles")
        if args.older_than is not None and not args.older_than >= 0:
            raise TaxamapError(f"--older-than takes a number of days >= 0, got {args.older_than}")
        said = []
        if do_stores:
            names = sorted({s.region for s in cached_stores(args.cache)})
            if args.region is not None and args.region.strip().lower() not in {
                    n.lower() for n in names}:
                raise TaxamapError(f"no stored grid of region {args.region!r}; the cache holds "
                                   f"{', '.join(names) or 'none'} (see 'taxamap cache info')")
            gone = clear_stores(args.cache, region=args.region, older_than_days=args.older_than)
            said.append(f"{len(gone)} embedding stores ({format_bytes(sum(s.bytes for s in gone))})")
        if do_tiles:
            said.append(f"{cache_clear(tiles, source=args.source):,} tile entries")
        print("removed " + " and ".join(said))
        return 0
    raise TaxamapError(f"unknown cache action {args.cache_command!r}")


def _cmd_data(args) -> int:
    if args.data_command != "worldclim":
        raise TaxamapError("usage: taxamap data worldclim DIR")
    from taxamap.sources.worldclim import download_worldclim

    for path in download_worldclim(args.dir):
        print(path)
    return 0


def _cmd_evaluate(args) -> int:
    from taxamap.products.evaluate import evaluate_files, format_table

    if not args.occurrences and not args.expert_range:
        raise TaxamapError("give --occurrences FILE (presence points) and/or --range FILE (an "
                           "expert range) to evaluate the map against")
    result = comparison = None
    if args.occurrences:
        result = evaluate_files(
            args.map, args.occurrences, background=args.background,
            presence_column=args.presence_column, n_background=args.n_background,
            seed=args.seed, json_path=None if args.expert_range else args.json,
            roc_path=args.roc,
        )
        print(format_table(result))
        for path in (None if args.expert_range else args.json, args.roc):
            if path:
                print(path)  # written by evaluate_files, as every command lists what it wrote
    if args.expert_range:
        from taxamap.products.expert import compare_files, write_json

        band = int(args.band) if args.band.isdigit() else args.band
        comparison = compare_files(args.map, args.expert_range, rule=args.rule, band=band,
                                   out_dir=args.out, occurrences=args.occurrences,
                                   seed=args.seed)
        print(comparison.format_table())
        for path in comparison.paths.values():
            print(path)
        if args.json:
            records = comparison.to_records()
            print(write_json(args.json, records if result is None
                             else {"occurrences": result.to_dict(), "range": records}))
    return 0


def _cmd_threshold(args) -> int:
    from taxamap.products.ranges import threshold_map

    band = int(args.band) if args.band.isdigit() else args.band
    result = threshold_map(args.map, args.rule, args.out, band=band, mask=args.mask)
    print(result.paths["raster"])
    print(result.paths["polygons"])
    print(f"threshold {result.threshold:.4f}: {result.n_in_range:,} of {result.n_valid:,} cells, "
          f"{result.area_km2:,.0f} km2", file=sys.stderr)
    print(f"EOO {result.eoo_km2:,.0f} km2, AOO {result.aoo_km2:,.0f} km2 (IUCN 2 km grid): "
          f"{result.criterion_b}", file=sys.stderr)
    return 0


def _cmd_survey(args) -> int:
    from taxamap.products.survey import survey_map

    plan = survey_map(args.map, args.occurrences, n=args.n, min_distance_km=args.min_distance,
                      weights=args.weights, out_dir=args.out)
    _print_paths(plan.paths)
    print(plan.describe(), file=sys.stderr)
    return 0


def _cmd_occurrences(args) -> int:
    from taxamap.products.occurrences import download_occurrences
    from taxamap.geography import resolve_region

    region = resolve_region(args.region, args.bbox, land_only=False)
    from taxamap.paths import cache_subdir, checked_cache_root

    checked_cache_root(args.cache)
    result = download_occurrences(args.species, region.outline, args.out, limit=args.limit,
                                  cache_dir=cache_subdir("occurrences", args.cache))
    print(result.path)
    print(f"{result.n_records:,} records of {result.count:,} for {result.scientific_name}"
          + (" (truncated at --limit)" if result.truncated else ""), file=sys.stderr)
    return 0


COMMANDS = {
    "evaluate": _cmd_evaluate,
    "threshold": _cmd_threshold,
    "survey": _cmd_survey,
    "occurrences": _cmd_occurrences,
    "predict": _cmd_predict,
    "species-at": _cmd_species_at,
    "richness": _cmd_richness,
    "embed": _cmd_embed,
    "serve": _cmd_serve,
    "regions": _cmd_regions,
    "patches": _cmd_patches,
    "models": _cmd_models,
    "cache": _cmd_cache,
    "data": _cmd_data,
}


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--bbox -84,39,-82,41`` would read as an unknown option to argparse: join it as
    ``--bbox=-84,39,-82,41`` so users need not remember the '=' form."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--bbox", "--resolution", "--lat", "--lon") and i + 1 < len(argv) \
                and argv[i + 1].startswith("-") and len(argv[i + 1]) > 1 \
                and (argv[i + 1][1].isdigit() or argv[i + 1][1] == "."):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _StderrHandler(logging.Handler):
    """The library's progress and notices, one line each on stderr (resolved at emit time, so a
    redirected or captured stderr is honoured): INFO and up from the "taxamap" logger itself,
    where the pipeline speaks to users; only warnings and errors from the modules' own loggers
    ("taxamap.taxonomy", ...), whose INFO lines are details (e.g. an offline service skipped),
    and from other libraries."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "taxamap" or record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _say(self.format(record))
        except Exception:  # a closed stderr must not end a long run
            self.handleError(record)


def _install_logging() -> None:
    """Configure logging once for the whole process, on the root logger: a library that logs
    through the root logger (open_clip's ``logging.info`` when a photo query loads CLIP) would
    otherwise run ``logging.basicConfig()`` and print every later line a second time."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    logging.getLogger("taxamap").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _install_logging()
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("TAXAMAP_DEBUG") == "1"
    try:
        with speaking_to("cli"):
            return COMMANDS[args.command](args)
    except TaxamapError as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())
        print(f"taxamap: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taxamap: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`taxamap regions | head`): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
