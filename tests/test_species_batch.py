"""``--species-file`` with unknown names: all are named at once, before any cell is embedded;
``--skip-unknown`` maps the others and lists the skipped ones in the summary table. Offline: the
names resolve through taxamap's built-in table."""

from __future__ import annotations

import pytest

from taxamap.errors import TaxamapError
from taxamap.options import PredictOptions
from taxamap.queries import embed_queries
from tests.helpers.cli import run

KNOWN = ["Cardinalis cardinalis", "Cyanocitta cristata", "Turdus migratorius"]
UNKNOWN = ["Nonexistus imaginarius", "Fakeus birdus"]


def write_file(tmp_path, names):
    path = tmp_path / "birds.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def mixed(tmp_path):
    # Unknown names among known ones, one of them first and one last.
    return write_file(tmp_path, [UNKNOWN[0], KNOWN[0], KNOWN[1], "cardinalis 3", KNOWN[2],
                                 UNKNOWN[1]])


def test_every_unknown_name_is_listed_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXAMAP_OFFLINE", "1")
    req = PredictOptions(species_file=str(mixed(tmp_path)))
    with pytest.raises(TaxamapError) as err:
        embed_queries(req, config={}, device=lambda: "cpu")
    message = str(err.value)
    for name in [*UNKNOWN, "cardinalis 3"]:
        assert name in message, message
    assert "3 of 6" in message and "--skip-unknown" in message
    assert not any(name in message for name in KNOWN)


def test_skip_unknown_on_a_file_of_unknown_names_only_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXAMAP_OFFLINE", "1")
    req = PredictOptions(species_file=str(write_file(tmp_path, UNKNOWN)), skip_unknown=True)
    with pytest.raises(TaxamapError, match="none of the 2 species"):
        embed_queries(req, config={}, device=lambda: "cpu")


@pytest.mark.slow
def test_cli_unknown_names_fail_before_any_cell_is_embedded(tmp_path, models_dir):
    out = tmp_path / "o"
    proc = run(["predict", "--species-file", str(mixed(tmp_path)), "--bbox=-83,40,-82,41",
                "--resolution", "0.1", "--models", str(models_dir), "--out", str(out),
                "--cache", str(tmp_path / "c")])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "embedding" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert all(name in last for name in UNKNOWN) and "cardinalis 3" in last
    assert not list(out.glob("*.tif")) if out.exists() else True
    assert not (tmp_path / "c" / "stores").exists()  # no cell embedded, no store made


@pytest.mark.slow
def test_cli_skip_unknown_maps_the_others_and_lists_the_skipped(tmp_path, models_dir):
    out = tmp_path / "o"
    proc = run(["predict", "--species-file", str(mixed(tmp_path)), "--skip-unknown",
                "--bbox=-83,40,-82,41", "--resolution", "0.1", "--models", str(models_dir),
                "--out", str(out), "--cache", str(tmp_path / "c"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.tif")) == [
        "cardinalis-cardinalis.tif", "cyanocitta-cristata.tif", "turdus-migratorius.tif"]
    table = proc.stderr[proc.stderr.index("species "):]
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()[1:]}
    for name in KNOWN:
        assert name in rows and "skipped" not in rows[name]
    for name in [*UNKNOWN, "cardinalis 3"]:
        assert name in rows and "skipped" in rows[name], table


@pytest.mark.slow
def test_skip_unknown_needs_a_species_file(tmp_path, models_dir):
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--skip-unknown",
                "--bbox=-83,40,-82,41", "--models", str(models_dir), "--out", str(tmp_path)])
    assert proc.returncode == 2 and "--species-file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
