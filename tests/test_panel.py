"""Reference panels (issue 18): ``relative``, "what lives here?", richness, the "no signal" rule,
clades, the panel prompt cache and ``--stretch``. Tiny models, offline; every expected value is
computed from the members' own maps (``taxamap.predict``) or ``taxamap.threshold``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import taxamap
from taxamap.errors import TaxamapError
from taxamap.panel import (Panel, default_panel, panel_from_file, prepare_panel, relative_scores,
                           resolve_panel, richness_of, select_clade, signal_verdict, species_at)
from taxamap.panel.cells import array_blocks, blocks
from taxamap.panel.relative import (build_knots, count_below, exact_relative, knot_ranks,
                                    load_or_build_stats, relative_from_knots)
from taxamap.panel.vectors import bank_path, cached_vectors, embed_prompts, read_bank, text_ref

BBOX = (-84.0, 39.0, -82.0, 41.0)
MEMBERS = ["Cardinalis cardinalis", "Cyanocitta cristata", "Turdus migratorius",
           "Ursus americanus", "Odocoileus virginianus", "Felis silvestris"]
#: Scores this close are a floating-point tie: whether one counts below the other depends on
#: how a product was blocked, so the expected counts allow either side there.
TIE = 1e-5


@pytest.fixture(scope="module")
def session(models_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("panel-cache")
    return taxamap.open_session(bbox=BBOX, resolution=0.1, models=models_dir, cache=cache,
                                progress=False)


def own_map(session, species: str):
    """A species' own map as ``taxamap predict`` makes it: scored from the stores in float32,
    as the panel's relative, species-at and richness are (a session scores float16 cells)."""
    return taxamap.predict(species=species, bbox=BBOX, resolution=0.1,
                           models=session.options.models, cache=session.options.cache,
                           progress=False)


@pytest.fixture(scope="module")
def panel_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("panel") / "checklist.csv"
    path.write_text("species,note\n" + "\n".join(f"{n},x" for n in MEMBERS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(session, panel_file, tmp_path_factory):
    cache = tmp_path_factory.mktemp("bank")
    panel = panel_from_file(panel_file)
    return prepare_panel(panel, session.encoders.text(), cache, progress=False), cache


@pytest.fixture(scope="module")
def member_maps(session):
    """Each member's own fused map over the grid's cells, (P, N), as taxamap.predict gives it."""
    cells = session.grid.mask
    return np.stack([own_map(session, name)["fused"].values[cells] for name in MEMBERS])


def expected_counts(maps: np.ndarray, scores: np.ndarray, leave_out: int | None):
    """(low, high) counts of the maps' values below ``scores`` at each cell, with ties within
    :data:`TIE` counted on either side; ``leave_out`` is the query's own row."""
    others = np.delete(maps, leave_out, axis=0) if leave_out is not None else maps
    low = (others < scores[None] - TIE).sum(axis=0)
    high = (others < scores[None] + TIE).sum(axis=0)
    return low, high


def test_relative_of_a_member_is_the_fraction_of_the_others_below_it(session, reference,
                                                                       member_maps):
    ref, cache = reference
    prompts = list(ref.panel.prompts)
    got = relative_scores(ref, session.cells.stores, member_maps, prompts, session.fusion,
                          cache_dir=cache)
    p = len(MEMBERS)
    exact = 0
    for i in range(p):
        low, high = expected_counts(member_maps, member_maps[i], leave_out=i)
        counts = got[i] * (p - 1)
        assert np.all(np.abs(counts - np.rint(counts)) < 1e-4)
        assert np.all((low <= np.rint(counts)) & (np.rint(counts) <= high)), MEMBERS[i]
        exact += int(np.sum(low == high))
    assert exact > 0.95 * member_maps.size  # ties are rare: almost every cell is checked exactly
    assert got.min() == 0.0 and got.max() == 1.0


def test_relative_of_another_query_counts_the_whole_panel(session, reference, member_maps):
    ref, cache = reference
    ds = own_map(session, "Passer domesticus")
    scores = ds["fused"].values[session.grid.mask][None]
    got = relative_scores(ref, session.cells.stores, scores, [ds.attrs["prompt"]],
                          session.fusion, cache_dir=cache)[0]
    low, high = expected_counts(member_maps, scores[0], leave_out=None)
    assert np.all((low <= np.rint(got * len(MEMBERS))) & (np.rint(got * len(MEMBERS)) <= high))


def test_species_at_ranks_as_the_members_maps_do_at_that_cell(session, reference, member_maps):
    ref, _ = reference
    lat, lon = 40.23, -83.41
    table = species_at(ref, session.grid, session.cells.stores, lat, lon, session.fusion,
                       top=None)
    cell = int(np.count_nonzero(session.grid.mask.reshape(-1)[:session.grid.mask.reshape(-1)
                                                               .size]
                                 [:_flat(session.grid, lat, lon)]))
    values = member_maps[:, cell]
    assert list(table["name"]) == [MEMBERS[i] for i in np.argsort(-values, kind="stable")]
    assert np.allclose(table["score"], np.sort(values)[::-1], atol=1e-5)
    below = [(np.delete(values, i) < values[i]).sum() / (len(MEMBERS) - 1)
             for i in np.argsort(-values, kind="stable")]
    assert np.allclose(table["relative"], below)
    assert table.attrs["rule"].startswith("ranked by score")
    top2 = species_at(ref, session.grid, session.cells.stores, lat, lon, session.fusion, top=2)
    assert list(top2["name"]) == list(table["name"][:2])


def _flat(grid, lat, lon):
    row = int(np.floor((grid.north - lat) / grid.resolution))
    col = int(np.floor((lon - grid.west) / grid.resolution))
    return row * grid.width + col


@pytest.mark.parametrize("rule", ["percentile:80", "value:0.02"])
def test_richness_is_the_sum_of_the_members_threshold_rasters(session, reference, rule):
    ref, _ = reference
    stacked = {}
    result = richness_of(ref, session.cells.stores, rule, session.fusion, progress=False,
                         batch=4, on_batch=lambda sl, binary, thr: stacked.update(
                             {i: b for i, b in zip(range(sl.start, sl.stop), binary)}))
    total = np.zeros(session.grid.mask.shape)
    for i, name in enumerate(MEMBERS):
        cut = taxamap.threshold(own_map(session, name), rule)
        raster = cut.raster.values
        total += np.nan_to_num(raster)
        assert result.thresholds[i] == pytest.approx(cut.threshold, abs=1e-6)
        inside = stacked[i][...]
        assert np.array_equal(session.grid.to_raster(inside.astype(np.float32)) == 1,
                              raster == 1), name
    got = result.raster(session.grid)
    assert np.array_equal(np.nan_to_num(got), total)
    assert np.isnan(got[~session.grid.mask]).all()


def test_richness_refuses_maxtss_and_a_rule_keeping_nothing(session, reference):
    ref, _ = reference
    with pytest.raises(TaxamapError, match="maxtss needs each species' own occurrences"):
        richness_of(ref, session.cells.stores, "maxtss", session.fusion, progress=False)
    with pytest.raises(TaxamapError, match="keeps no cell of any species"):
        richness_of(ref, session.cells.stores, "value:5", session.fusion, progress=False)


def test_no_signal_fires_on_a_crafted_query_and_not_on_a_present_one(session, reference):
    ref, _ = reference
    from taxamap.score import fuse_many

    cells = session.cells.stores["location"].read()
    mean = cells.mean(axis=0)
    absent = -mean / np.linalg.norm(mean)       # points away from every cell: never stands out
    present = cells[len(cells) // 2] / np.linalg.norm(cells[len(cells) // 2])  # a cell itself
    queries = np.stack([absent, present])
    fused, _ = fuse_many({"location": cells}, queries, session.fusion)
    rel = exact_relative(blocks(session.cells.stores), ref.vectors, fused, session.fusion)
    off, on = signal_verdict(rel[0]), signal_verdict(rel[1])
    assert off.no_signal and off.fraction < 0.01 and off.cells == cells.shape[0]
    assert "no signal for Absent" in off.message("Absent", ref.panel.describe())
    assert not on.no_signal and on.fraction >= 0.01 and on.top == 1.0
    assert on.message("Present", "x") == "" and on.tags()["no_signal"] == "no"
    assert off.tags()["no_signal"] == "yes"


def test_knots_interpolate_within_one_knot_gap_of_exact():
    rng = np.random.default_rng(3)
    cells = rng.normal(size=(700, 64)).astype(np.float32)
    panel = rng.normal(size=(500, 64)).astype(np.float32)
    panel /= np.linalg.norm(panel, axis=1, keepdims=True)
    queries = rng.normal(size=(5, 64)).astype(np.float32)
    from taxamap.score import fuse_many

    q, _ = fuse_many({"location": cells}, queries, "mean")
    exact = exact_relative(array_blocks({"location": cells}), panel, q, "mean")
    for k in (17, 33, 65):
        knots = build_knots(array_blocks({"location": cells}), len(cells), panel, "mean", k,
                            progress=False)
        approx = relative_from_knots(knots, len(panel), q)
        gaps = np.diff(knot_ranks(len(panel), k)).max()
        # Interpolation error at most one knot gap, plus what float16 knots move (a few species).
        assert np.abs(approx - exact).max() <= (gaps + 3) / len(panel), k
    everything = build_knots(array_blocks({"location": cells}), len(cells), panel[:40], "mean",
                             129, progress=False)
    assert everything.shape == (700, 40)  # a small panel keeps every score: no interpolation


def test_count_below_is_searchsorted_left():
    rng = np.random.default_rng(0)
    rows = np.sort(rng.normal(size=(50, 37)).astype(np.float32), axis=1)
    values = rng.normal(size=(3, 50)).astype(np.float32)
    values[0, :10] = rows[:10, 5]  # exact ties count as not below
    got = count_below(rows, values)
    want = np.array([[np.searchsorted(rows[c], values[s, c], side="left") for c in range(50)]
                     for s in range(3)])
    assert np.array_equal(got, want)


def test_default_panel_statistics_are_kept_beside_the_store_and_rebuilt(session, caplog,
                                                                         tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stores = session.cells.stores
    args = (stores, "text@1", "digest", vectors, session.fusion)
    first = load_or_build_stats(*args, progress=False, knots=33)
    assert first.computed and first.path.exists()
    assert first.path.parent.name.startswith(".location-")  # beside the store, hidden
    again = load_or_build_stats(*args, progress=False, knots=33)
    assert not again.computed and np.array_equal(again.knots, first.knots)
    # Damaged: flip bytes inside the array.
    blob = bytearray(first.path.read_bytes())
    blob[-50:-40] = bytes(10)
    first.path.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="taxamap"):
        mended = load_or_build_stats(*args, progress=False, knots=33)
    assert mended.computed and "damaged (checksum mismatch)" in caplog.text
    assert np.array_equal(mended.knots, first.knots)
    # Another text model or fusion: other statistics, the first ones stay.
    other = load_or_build_stats(stores, "text@2", "digest", vectors, session.fusion,
                                progress=False, knots=33)
    assert other.computed and other.path != first.path and first.path.exists()
    # A store embedded again (its records change): the stale statistics are replaced.
    store = stores["location"]
    block = store.read(store.chunk_slice(0))
    store.write_chunk(0, block + np.float32(1e-3))
    try:
        fresh = load_or_build_stats(*args, progress=False, knots=33)
        assert fresh.computed and fresh.path != first.path and not first.path.exists()
    finally:
        store.write_chunk(0, block)
    # Relative from the statistics is within a knot gap of exact.
    q = np.stack([own_map(session, n)["fused"].values[session.grid.mask]
                  for n in MEMBERS[:2]])
    exact = exact_relative(blocks(stores), vectors, q, session.fusion)
    approx = mended.relative(q)
    assert np.abs(approx - exact).max() <= (np.diff(knot_ranks(300, 33)).max() + 3) / 300


def test_a_default_panel_reads_its_statistics(session, tmp_path):
    """relative_scores takes the statistics path for the default panel (here a small one: every
    score is a knot, exact but for the float16 rounding of the knots, which may count a member's
    own score, or a near tie, on the other side: one species at most)."""
    enc = session.encoders.text()
    small = Panel(tuple(MEMBERS), tuple(taxamap.taxonomy.resolve_species(n).prompt
                                        for n in MEMBERS), "table", default=True)
    ref = prepare_panel(small, enc, tmp_path, progress=False)
    maps = np.stack([own_map(session, n)["fused"].values[session.grid.mask]
                     for n in MEMBERS])
    got = relative_scores(ref, session.cells.stores, maps, list(small.prompts), session.fusion,
                          cache_dir=tmp_path, progress=False)
    folder = next(iter(session.cells.stores.values())).location
    from taxamap.store import derived_folder

    assert list(derived_folder(folder).glob("panel-*.npy"))
    for i in range(len(MEMBERS)):
        low, high = expected_counts(maps, maps[i], leave_out=i)
        counts = np.rint(got[i] * (len(MEMBERS) - 1))
        assert np.all((low - 1 <= counts) & (counts <= high + 1))
        assert np.mean((low <= counts) & (counts <= high)) > 0.3


# ------------------------------------------------------------------------ panels and clades


def test_default_panel_is_the_table_and_clades_select_from_it():
    panel = default_panel()
    assert len(panel) == len(taxamap.taxonomy.list_table_species()) and panel.default
    birds = select_clade(panel, "animalia chordata AVES")
    assert birds.clade == "Animalia Chordata Aves" and not birds.default
    assert 0 < len(birds) < len(panel)
    assert all(p.startswith("Animalia Chordata Aves ") for p in birds.prompts)
    cardinals = resolve_panel(None, "Animalia_Chordata_Aves_Passeriformes_Cardinalidae")
    assert "Cardinalis cardinalis" in cardinals.labels


def test_unknown_clade_is_one_line_with_close_prefixes(panel_file):
    with pytest.raises(TaxamapError) as err:
        select_clade(default_panel(), "Animalia Chordata Avez")
    message = str(err.value)
    assert "\n" not in message and "'Animalia Chordata Aves'" in message
    with pytest.raises(TaxamapError) as err:
        resolve_panel(panel_file, "Animalia Chordata Reptilia")
    assert "no species of the checklist.csv" in str(err.value)
    assert "Animalia Chordata Aves" in str(err.value)  # what the panel does hold
    with pytest.raises(TaxamapError, match="one to six ranks"):
        select_clade(default_panel(), "Animalia Chordata Aves Passeriformes Cardinalidae "
                                      "Cardinalis cardinalis")


def test_empty_and_clade_panels_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(TaxamapError, match="names no species"):
        panel_from_file(empty)
    with pytest.raises(TaxamapError, match="holds no species"):
        Panel((), (), "x")
    clades = tmp_path / "clades.txt"
    clades.write_text("Animalia Chordata Aves\n")
    with pytest.raises(TaxamapError, match="names clades, not species"):
        panel_from_file(clades)


def test_clade_prompts_resolve_and_map(session):
    from taxamap.taxonomy import resolve_species

    family = resolve_species("animalia chordata aves passeriformes cardinalidae")
    assert (family.prompt, family.binomial, family.rank, family.source) == (
        "Animalia Chordata Aves Passeriformes Cardinalidae", "Cardinalidae", "family", "table")
    unknown = resolve_species("Plantae Tracheophyta Pinopsida")  # not in the table: as given
    assert unknown.source == "given" and unknown.rank == "class"
    with pytest.raises(TaxamapError, match="did you mean 'Animalia Chordata Aves'"):
        resolve_species("Animalia Chordata Avez")
    assert resolve_species("Cardinalis cardinalis").rank == "species"
    ds = own_map(session, "Animalia Chordata Aves Passeriformes Cardinalidae")
    assert ds.attrs["prompt"] == "Animalia Chordata Aves Passeriformes Cardinalidae"
    assert ds.attrs["slug"] == "cardinalidae" and np.isfinite(ds["fused"].values).any()


# ------------------------------------------------------------------------ the prompt cache


def test_panel_prompts_are_cached_per_text_model_and_a_damaged_cache_is_recomputed(
        session, models_dir, tmp_path, caplog):
    enc = session.encoders.text()
    prompts = [taxamap.taxonomy.resolve_species(n).prompt for n in MEMBERS[:3]]
    assert cached_vectors(prompts, enc.ref, tmp_path) is None
    first = embed_prompts(prompts, enc, tmp_path, progress=False)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert text_ref(models_dir) == enc.ref  # found without loading the weights
    # A panel species needs no text encoder now: its embedding comes from the cache.
    assert np.array_equal(cached_vectors(prompts[1:], enc.ref, tmp_path), first[1:])
    assert bank_path(enc.ref, tmp_path) != bank_path(enc.ref + "x", tmp_path)
    path = bank_path(enc.ref, tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING, logger="taxamap"):
        assert cached_vectors(prompts, enc.ref, tmp_path) is None
        again = embed_prompts(prompts, enc, tmp_path, progress=False)
    assert "is damaged" in caplog.text
    assert np.allclose(again, first, atol=1e-6)
    assert len(read_bank(enc.ref, tmp_path).prompts) == 3
    # Tampered values fail the checksum.
    with np.load(path) as data:
        arrays = dict(data)
    arrays["vectors"] = arrays["vectors"] * 2
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    assert json.loads(str(arrays["meta"]))["count"] == 3
    assert cached_vectors(prompts, enc.ref, tmp_path) is None


def test_lat_lon_off_the_grid_is_one_line(session, reference):
    ref, _ = reference
    for lat, lon, words in ((10.0, -83.0, "outside the grid"), (95.0, 0.0, "not a place"),
                            (float("nan"), 0.0, "not a place")):
        with pytest.raises(TaxamapError, match=words) as err:
            species_at(ref, session.grid, session.cells.stores, lat, lon, session.fusion)
        assert "\n" not in str(err.value)
    with pytest.raises(TaxamapError, match="top must be"):
        species_at(ref, session.grid, session.cells.stores, 40.2, -83.4, session.fusion, top=0)


@pytest.mark.parametrize("q", [0.0, 0.5, 37.3, 90.0, 99.99, 100.0])
def test_richness_thresholds_are_numpys_percentiles_on_large_grids(q):
    """Above the sample size the percentile is found inside a sampled bracket: bit for bit what
    np.percentile (taxamap threshold's rule) gives, ties and NaN cells included."""
    from taxamap.panel.richness import SAMPLE_CELLS, _thresholds, richness_rule

    rng = np.random.default_rng(7)
    n = 2 * SAMPLE_CELLS + 12345
    part = rng.normal(size=(5, n)).astype(np.float32)
    part[1] = np.round(part[1], 2)  # heavy ties
    part[2] = np.sort(part[2])  # ordered along the cells: a strided sample still brackets it
    part[3, : n // 2] = 0.25  # half the cells one value
    valid = rng.random(n) > 0.1
    part[:, ~valid] = np.nan
    got = _thresholds(part, valid, richness_rule(f"percentile:{q}"))
    want = [np.percentile(row[valid].astype(np.float64), q) for row in part]
    assert np.array_equal(got, np.array(want))
