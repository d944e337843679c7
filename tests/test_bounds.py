"""What the CLI holds and how long it works is bounded by what its inputs mean, not by their
size (issue 15, section 4): a species file is mapped in batches and written as it goes, unknown
names are counted rather than all quoted, a region file that crosses itself everywhere is
refused at once, and an HTML map draws a bounded sample of the occurrences. Offline, with the
tiny models."""

from __future__ import annotations

import json
import math
import re
import tracemalloc

import numpy as np
import pytest
import shapely

from taxamap.errors import TaxamapError
from taxamap.geography import MAX_REGION_VERTICES, MAX_REPAIR_CROSSINGS, resolve_region
from taxamap.cells import build_grid
from taxamap.options import GridOptions, PredictOptions, WriteOptions
from taxamap.pipeline import maps_bytes, predict_and_write
from taxamap.queries import NAMES_SHOWN
from tests.helpers.cli import run

BBOX = "-84,39,-82,41"  # Ohio: every cell on land


def prompts(n: int) -> list[str]:
    """``n`` distinct seven-rank prompts (and binomials) from a few words, so that tokenizing
    thousands of them stays quick."""
    side = math.isqrt(n - 1) + 1
    words = ["".join(chr(97 + (i // 26 ** k) % 26) for k in range(3)) for i in range(side)]
    return [f"Animalia Chordata Aves Passeriformes Fringillidae G{g} s{e}"
            for g in words for e in words][:n]


def species_file(tmp_path, names, name="birds.txt"):
    path = tmp_path / name
    path.write_text("\n".join(names) + "\n")
    return path


def stream(tmp_path, models_dir, path, formats=(), **kwargs):
    return predict_and_write(
        PredictOptions(species_file=str(path), bbox=BBOX, resolution=kwargs.pop("resolution", 0.1),
                       models=str(models_dir), cache=str(tmp_path / "cache"),
                       progress=False, skip_unknown=kwargs.pop("skip_unknown", False)),
        WriteOptions(out=str(tmp_path / "out"), formats=formats), **kwargs)


# --- species files --------------------------------------------------------------------------

@pytest.mark.slow
def test_species_file_memory_is_flat_in_the_number_of_species(tmp_path, models_dir):
    # 4N species must not hold more memory than N: only one batch of maps is alive at a time.
    resolution = 0.025  # 80 x 80 cells: 51 kB of maps per species (fused + location)

    def peak(n: int, traced: bool = True) -> int:
        path = species_file(tmp_path, prompts(n), f"birds{n}.txt")
        if traced:
            tracemalloc.start()
        result = stream(tmp_path, models_dir, path, resolution=resolution)
        size = tracemalloc.get_traced_memory()[1] if traced else 0
        tracemalloc.stop()
        assert result.summary_count == n and result.dataset is None
        return size

    peak(300, traced=False)  # encoders loaded, modules imported, cells stored
    small, large = peak(400), peak(1600)
    _, grid = build_grid(GridOptions(bbox=BBOX, resolution=resolution))
    extra_maps = maps_bytes(1200, grid, 2)  # what the maps of 1,200 more species weigh
    assert extra_maps > 50e6
    assert large - small < 0.25 * extra_maps, (small, large, extra_maps)


def test_species_files_are_written_as_their_batch_is_scored(tmp_path, models_dir):
    import logging

    names = prompts(5)
    binomials = [" ".join(n.split()[-2:]) for n in names]
    slugs = [b.lower().replace(" ", "-") for b in binomials]
    out = tmp_path / "out"
    events = []  # one timeline: batches scored (the pipeline's DEBUG log) and files handed over

    class Scored(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("scored species"):
                events.append(record.getMessage())

    def on_written(paths):
        assert all(p.is_file() for p in paths.values())  # on disk when handed over
        events.append(" ".join(sorted(p.name for p in paths.values())))

    logger = logging.getLogger("taxamap")
    handler, level = Scored(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        result = stream(tmp_path, models_dir, species_file(tmp_path, names), formats=("tif",),
                        batch_size=2, on_written=on_written)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert events == [
        "scored species 1 to 2 of 5", f"{slugs[0]}.tif", f"{slugs[1]}.tif",
        "scored species 3 to 4 of 5", f"{slugs[2]}.tif", f"{slugs[3]}.tif",
        "scored species 5 to 5 of 5", f"{slugs[4]}.tif",
    ]
    assert sorted(f.name for f in out.glob("*.tif")) == sorted(f"{s}.tif" for s in slugs)
    assert result.paths == {}  # handed over, not accumulated
    assert [row["species"] for row in result.summary] == binomials


def test_a_long_species_file_writes_its_summary_to_csv(tmp_path, models_dir):
    import csv

    names = prompts(150)
    path = species_file(tmp_path, names + ["Nonexistus imaginarius"], "many birds.txt")
    result = stream(tmp_path, models_dir, path, skip_unknown=True)
    assert result.summary_path == tmp_path / "out" / "many-birds_summary.csv"
    with open(result.summary_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == result.summary_count == 151
    assert [r["prompt"] for r in rows[:150]] == names
    assert all(-1 <= float(r["max"]) <= 1 for r in rows[:150])
    assert rows[-1]["species"] == "Nonexistus imaginarius" and rows[-1]["taxonomy"] == "skipped"
    # Only the last rows are kept in memory (and printed by the CLI).
    assert [r["species"] for r in result.summary] == [r["species"] for r in rows[-5:]]


def test_taxamap_predict_refuses_more_maps_than_fit_in_memory(tmp_path, models_dir):
    import taxamap

    # 100 species x 2 bands over 2,950 x 1,300 cells: 3 GB of maps.
    with pytest.raises(TaxamapError) as err:
        taxamap.predict(species=prompts(100), bbox="-125,24,-66,50", cells="all",
                        resolution=0.02, models=models_dir, cache=tmp_path / "cache",
                        progress=False)
    message = str(err.value)
    assert "100 species" in message and "2.0 GB" in message and "--species-file" in message
    assert not (tmp_path / "cache" / "stores").exists()  # refused before any cell was embedded


# --- unknown names --------------------------------------------------------------------------

def unknown_names(n: int) -> list[str]:
    return [f"Nonexistus {''.join(chr(97 + (i // 26 ** k) % 26) for k in range(4))}"
            for i in range(n)]


@pytest.mark.slow
def test_thousands_of_unknown_names_make_a_short_error(tmp_path, models_dir):
    path = species_file(tmp_path, unknown_names(20_000))
    proc = run(["predict", "--species-file", str(path), "--bbox", BBOX, "--models",
                str(models_dir), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("taxamap: error:") and len(error) < 1_000, len(proc.stderr)
    assert "none of the 20,000 species" in error and "and 19,990 more" in error
    assert error.count('"Nonexistus ') == NAMES_SHOWN


@pytest.mark.slow
def test_skip_unknown_logs_a_count_and_the_first_names(tmp_path, models_dir, caplog):
    path = species_file(tmp_path, prompts(3) + unknown_names(5_000))
    with caplog.at_level("INFO", logger="taxamap"):
        result = stream(tmp_path, models_dir, path, formats=(), skip_unknown=True)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping"))
    assert line.startswith("skipping 5,000 unknown species of 5,003:") and "and 4,990 more" in line
    assert len(line) < 1_000
    assert result.summary_count == 5_003


# --- region files ---------------------------------------------------------------------------

def star_file(tmp_path, n: int):
    """A star of ``n`` vertices drawn with crossing edges (each edge jumps almost half way
    round), as a GeoJSON file."""
    k = n // 2 - 1
    while math.gcd(n, k) != 1:
        k -= 1
    angle = 2 * np.pi * np.arange(n + 1) * k / n
    ring = np.round(np.column_stack([-83 + np.cos(angle), 40 + np.sin(angle)]), 6)
    path = tmp_path / f"star{n}.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {},
        "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]}}]}))
    return path


@pytest.mark.slow
def test_a_star_of_1000_crossing_vertices_is_refused_in_one_line(tmp_path, models_dir):
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--region",
                str(star_file(tmp_path, 1000)), "--models", str(models_dir), "--out",
                str(tmp_path / "out"), "--cache", str(tmp_path / "c")])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "crosses itself" in lines[0], proc.stderr
    assert f"{MAX_REPAIR_CROSSINGS:,}" in lines[0]


@pytest.mark.slow
def test_a_million_vertex_region_is_refused_with_the_limit(tmp_path):
    with pytest.raises(TaxamapError) as err:
        resolve_region(str(star_file(tmp_path, 1_000_000)), cells="all")
    assert "1,000,001 vertices" in str(err.value) and f"{MAX_REGION_VERTICES:,}" in str(err.value)
    assert "simplify" in str(err.value)


def test_an_outline_with_a_few_crossings_is_repaired(tmp_path):
    # A bow tie crosses itself once: both triangles are kept. A 100-vertex star crosses itself
    # 4,800 times (under the limit): the repaired region is the area its outline encloses.
    bow = tmp_path / "bow.geojson"
    bow.write_text(json.dumps({"type": "Polygon", "coordinates": [
        [[-84, 39], [-82, 41], [-82, 39], [-84, 41], [-84, 39]]]}))
    region = resolve_region(str(bow), cells="all")
    assert region.geometry.is_valid and region.geometry.area == pytest.approx(2.0)
    star = resolve_region(str(star_file(tmp_path, 100)), cells="all")
    assert star.geometry.is_valid
    assert shapely.Point(-83, 40).within(star.geometry)  # the centre is enclosed, not a hole
    assert star.geometry.area == pytest.approx(math.pi / 2, rel=0.01)


# --- occurrences on the HTML map -----------------------------------------------------------

def drawn_points(page: str) -> list:
    return json.loads(re.search(r"var data = (\[.*?\]);\n", page, re.S).group(1))


def test_html_draws_a_bounded_sample_of_many_occurrences(tmp_path, models_dir):
    import taxamap
    from taxamap.writers.html import MAX_DRAWN_OCCURRENCES

    ds = taxamap.predict(species="Cardinalis cardinalis", bbox=BBOX, resolution=0.1,
                         models=models_dir, cache=tmp_path / "cache", progress=False)
    rng = np.random.default_rng(1)
    many = np.column_stack([rng.uniform(39, 41, 200_000), rng.uniform(-84, -82, 200_000)])
    first = taxamap.write(ds, tmp_path / "a", formats=("html",), occurrences=many)
    again = taxamap.write(ds, tmp_path / "b", formats=("html",), occurrences=many)
    page = next(iter(first.values())).read_text()
    points = drawn_points(page)
    assert len(points) == MAX_DRAWN_OCCURRENCES == 10_000
    assert points == drawn_points(next(iter(again.values())).read_text())  # the same sample
    assert "showing 10,000 of 200,000 records (random sample)" in page
    assert len(page.encode()) < 1_500_000  # all 200,000 points made a 4.6 MB page
    few = taxamap.write(ds, tmp_path / "c", formats=("html",), occurrences=many[:50])
    page = next(iter(few.values())).read_text()
    assert len(drawn_points(page)) == 50 and "random sample" not in page
