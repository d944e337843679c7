"""Degenerate input is refused (or said plainly), never dressed up as a result: a threshold that
keeps no cell, a fit on too few presences, occurrences that all miss the map."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import taxamap
from taxamap.errors import TaxamapError
from tests.helpers.maps import centres, write_map

BBOX = "-84,39,-82,41"


def run(args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "taxamap.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("taxamap: error: ")
    return line


@pytest.fixture
def low_map(tmp_path):
    """A map whose scores run from 0.05 to 0.15 (raw cosines are small), NaN in one corner."""
    lat, lon = centres(-84.0, 41.0, 0.1, 20, 20)
    fused = (0.05 + 0.1 * (lat - lat.min()) / (lat.max() - lat.min())).astype(np.float32)
    fused[:3, :3] = np.nan
    (tmp_path / "maps").mkdir()
    return write_map(tmp_path / "maps" / "low.tif", {"fused": fused, "location": fused},
                     -84.0, 41.0, 0.1)


# -- a threshold that keeps no cell ------------------------------------------------------------

@pytest.mark.slow
def test_threshold_command_refuses_an_empty_range(low_map, tmp_path):
    out = tmp_path / "ranges"
    proc = run(["threshold", str(low_map), "--rule", "value:5", "--out", str(out)])
    line = error_line(proc)
    assert "value:5 keeps no cell" in line and "ranges from 0.05 to 0.15" in line
    assert "EOO" not in proc.stderr and "Critically" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in low_map.parent.iterdir()) == ["low.tif"]
    # At the maximum itself the range is the top row: written, with its EOO and AOO.
    proc = run(["threshold", str(low_map), "--rule", "value:0.15", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert (out / "low_range.gpkg").is_file() and "EOO" in proc.stderr


def test_python_threshold_refuses_an_empty_range(low_map, tmp_path):
    with pytest.raises(TaxamapError, match=r"keeps no cell: band 'fused' .* 0\.05 to 0\.15"):
        taxamap.threshold(low_map, "value:0.2", out=tmp_path / "r")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.slow
def test_predict_threshold_keeping_no_cell_writes_nothing(tmp_path, models_dir):
    out = tmp_path / "out"
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", BBOX,
                "--resolution", "0.2", "--models", str(models_dir), "--out", str(out),
                "--threshold", "value:5", "--no-progress"])
    line = error_line(proc)
    assert "value:5 keeps no cell" in line and "ranges from" in line
    assert list(out.iterdir()) == []  # no map without its requested range, no half range


# -- a fit on too few presences ----------------------------------------------------------------

def _fit(models_dir, tmp_path, points, name):
    occ = tmp_path / f"{name}.csv"
    occ.write_text("lat,lon\n" + "".join(f"{a},{b}\n" for a, b in points))
    out = tmp_path / name
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", BBOX, "--resolution",
                "0.1", "--models", str(models_dir), "--out", str(out), "--no-progress",
                "--occurrences", str(occ), "--fit"])
    return proc, out


@pytest.mark.slow
def test_fit_with_too_few_presence_cells_is_refused(tmp_path, models_dir):
    # One record; then six records in four cells (two pairs share a 0.1 degree cell).
    one, out = _fit(models_dir, tmp_path, [(40.05, -83.05)], "one")
    line = error_line(one)
    assert "fall in only 1 cell of the grid" in line and "at least 5 cells" in line
    assert not out.exists() or list(out.iterdir()) == []
    assert "prompt:" not in one.stderr  # refused before the query and the cells
    few = [(40.05, -83.05), (40.06, -83.04), (39.55, -82.55), (39.56, -82.56), (40.55, -83.55),
           (39.25, -83.75)]
    four, out = _fit(models_dir, tmp_path, few, "four")
    assert "the occurrences (6) fall in only 4 cells of the grid" in error_line(four)
    assert not out.exists() or list(out.iterdir()) == []


def test_fit_maps_refuses_fewer_than_five_cells_and_warns_above():
    from taxamap.products.fit import MIN_FIT_PRESENCES, MIN_PRESENCES, fit_maps

    assert MIN_FIT_PRESENCES == 5 < MIN_PRESENCES
    rng = np.random.default_rng(0)
    n = 400
    latlon = np.column_stack([np.repeat(np.arange(20) * 0.5, 20), np.tile(np.arange(20) * 0.5, 20)])
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    fused = rng.normal(size=n).astype(np.float32)
    with pytest.raises(TaxamapError, match="only 4 cells with embeddings"):
        fit_maps({"location": emb}, fused, latlon, np.array([3, 3, 50, 120, 300]), None,
                 n_background=100, cs=(1e-3,))
    fit = fit_maps({"location": emb}, fused, latlon, np.array([3, 50, 120, 300, 390]), None,
                   n_background=100, cs=(1e-3,))
    assert any("fewer than 10" in w for w in fit.warnings)


# -- occurrences that miss the map -------------------------------------------------------------

@pytest.mark.parametrize("rows, needle", [
    ("-83.1,40.2\n-82.5,40.5\n", "none of the 2 occurrence points falls on the map"),
    ("", "there are no occurrence points"),
])
@pytest.mark.slow
def test_occurrences_missing_the_map_are_said(tmp_path, models_dir, rows, needle):
    occ = tmp_path / "occ.csv"
    occ.write_text("lat,lon\n" + rows)  # swapped columns, or a header only
    out = tmp_path / "out"
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", BBOX,
                "--resolution", "0.2", "--models", str(models_dir), "--out", str(out),
                "--no-progress", "--occurrences", str(occ)])
    assert proc.returncode == 0, proc.stderr  # the map itself is sound: written, with the note
    said = [ln for ln in proc.stderr.splitlines() if needle in ln]
    assert len(said) == 1 and said[0].startswith("occurrences: ")
    page = (out / "cardinalis-cardinalis.html").read_text()
    assert "&#9888; occurrences: " + needle in page


def test_points_on_unscored_cells_are_refused_by_evaluate(low_map):
    from taxamap.products.evaluate import evaluate_map

    # Inside the map's bounds, but all on its NaN corner.
    corner = np.array([[40.95, -83.95], [40.85, -83.85], [40.75, -83.75]])
    with pytest.raises(TaxamapError, match="none of the 3 presence points falls on a scored cell"):
        evaluate_map(low_map, corner, n_background=50)
    with pytest.raises(TaxamapError, match="latitude/longitude are not swapped"):
        evaluate_map(low_map, corner[:, ::-1], n_background=50)
