"""`taxamap` end to end, as a user runs it: a subprocess, tiny models in the released layouts,
no network. The GeoTIFF is checked against an independent computation at its pixel centres."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.helpers import reference
from tests.helpers.cli import run

# Every test runs the CLI in a subprocess: end to end, out of the quick loop (-m "not slow").
pytestmark = pytest.mark.slow

PROMPT = "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"
BBOX = "-84,39,-82,41"


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, models_dir):
    out = tmp_path_factory.mktemp("out")
    cache = tmp_path_factory.mktemp("cache")
    proc = run(["predict", "--species", "  cardinalis CARDINALIS ", "--bbox", BBOX,
                "--resolution", "0.1", "--models", str(models_dir), "--out", str(out),
                "--cache", str(cache), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    return out, cache, proc


def test_predict_writes_three_files_and_prints_paths(predicted):
    out, _, proc = predicted
    printed = proc.stdout.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["cardinalis-cardinalis.html", "cardinalis-cardinalis.png",
                     "cardinalis-cardinalis.tif"]
    assert all(Path(p).is_file() for p in printed)
    assert PROMPT in proc.stderr  # the prompt used is printed
    assert "400 cells" in proc.stderr
    assert not list(out.glob(".*"))  # no temporary leftovers


def test_geotiff_contract_and_values(predicted, models_dir):
    out, _, _ = predicted
    with rasterio.open(out / "cardinalis-cardinalis.tif") as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.count == 2 and ds.descriptions == ("fused", "location")
        assert ds.dtypes == ("float32", "float32")
        t = ds.transform
        assert (t.a, t.e, t.c, t.f) == pytest.approx((0.1, -0.1, -84.0, 41.0))
        assert (ds.width, ds.height) == (20, 20)
        tags = ds.tags()
        band1 = ds.read(1)
        band2 = ds.read(2)
    assert tags["PROMPT"] == PROMPT if "PROMPT" in tags else tags.get("prompt") == PROMPT
    lowered = {k.lower(): v for k, v in tags.items()}
    assert lowered["fusion"] == "mean"
    assert "location" in lowered["modalities"]
    assert any("MVRL/ecogeo@local-" in v for v in tags.values())
    assert any("MVRL/taxabind-vit-b-16@local-" in v for v in tags.values())
    assert np.array_equal(band1, band2, equal_nan=True)  # one modality: fused == location
    # Independent computation at the pixel centres.
    rows, cols = np.mgrid[0:20, 0:20]
    lon = -84.0 + (cols + 0.5) * 0.1
    lat = 41.0 - (rows + 0.5) * 0.1
    latlon = np.stack([lat.ravel(), lon.ravel()], axis=1)
    emb = reference.location_embeddings(models_dir / "MVRL/ecogeo/model.safetensors", latlon)
    q = reference.clip_text_embedding(models_dir / "MVRL/taxabind-vit-b-16", PROMPT)
    expected = (emb @ q).reshape(20, 20)
    valid = np.isfinite(band1)
    assert valid.sum() > 300  # Ohio/Indiana/Kentucky: land everywhere but the Ohio river edge
    # float16 storage of the embeddings bounds the error at ~1e-3.
    assert np.abs(band1[valid] - expected[valid]).max() < 2e-3
    assert np.all(np.abs(band1[valid]) <= 1.0)


def test_second_query_reuses_the_store(predicted, models_dir, tmp_path):
    _, cache, _ = predicted
    proc = run(["embed", "--bbox", BBOX, "--resolution", "0.1", "--models", str(models_dir),
                "--cache", str(cache), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert "0 blocks computed" in proc.stdout


def test_hf_cache_layout_offline(tmp_path, models_dir):
    """No --models: the tiny repos sit in a Hugging Face cache and HF_HUB_OFFLINE=1 is set."""
    from tests.helpers.tiny import write_hf_cache

    commit = "f" * 40
    for repo in ("MVRL/taxabind-config", "MVRL/ecogeo", "MVRL/taxabind-vit-b-16"):
        write_hf_cache(tmp_path / "hf" / "hub", repo, commit, source=models_dir / repo)
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", "-83,40,-82.5,40.5",
                "--resolution", "0.1", "--out", str(tmp_path / "o"), "--no-progress"],
               env_extra={"HF_HOME": str(tmp_path / "hf"), "TAXAMAP_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(tmp_path / "o" / "cardinalis-cardinalis.tif") as ds:
        assert any(f"MVRL/ecogeo@{commit}" in v for v in ds.tags().values())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--region", "atlantis"], "taxamap regions"),
        (["--bbox", "-80,45,-85,40"], "bbox"),
        (["--bbox", "-84,39,-82,41", "--resolution", "0"], "resolution"),
        (["--bbox", "-84,39,-82,41", "--resolution", "-1"], "resolution"),
        (["--region", "world", "--resolution", "0.0005"], "resolution"),
        (["--bbox", "-84,39,-82,41", "--modalities", "sonar"], "modality"),
    ],
)
def test_bad_grid_inputs_one_line_exit_2(tmp_path, models_dir, args, needle):
    out = tmp_path / "o"
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--models", str(models_dir),
                "--out", str(out), *args])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert needle in lines[0].lower()
    assert not out.exists() or not any(out.iterdir())


def test_bad_query_inputs(tmp_path, models_dir):
    base = ["predict", "--bbox", "-83,40,-82.5,40.5", "--models", str(models_dir)]
    cases = [
        (["--species", "Nonexistus imaginarius"], "Kingdom Phylum"),
        (["--image", str(tmp_path / "missing.jpg")], "missing.jpg"),
        (["--species", "Cardinalis cardinalis", "--models", str(tmp_path / "empty")], "taxamap models download"),
    ]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    cases.append((["--image", str(tmp_path / "bad.jpg")], "bad.jpg"))
    from tests.helpers.bombs import png_bomb

    bomb = png_bomb(tmp_path / "huge.png", 12000, 12000)  # refused from its header
    cases.append((["--image", str(bomb)], "huge.png is 12,000 x 12,000 pixels (144 Mpx)"))
    for extra, needle in cases:
        out = tmp_path / f"o{len(extra)}{abs(hash(extra[-1])) % 1000}"
        proc = run([*base, "--out", str(out), *extra])
        assert proc.returncode == 2, (extra, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines and needle.lower() in lines[-1].lower(), (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not list(out.glob("*.tif")) if out.exists() else True


def test_unwritable_out(tmp_path, models_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", "-83,40,-82.5,40.5",
                "--models", str(models_dir), "--out", str(blocker / "sub")])
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr


def test_help_has_examples():
    proc = run(["predict", "--help"])
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "--species" in proc.stdout and "--fusion" in proc.stdout


def test_regions_lists_presets():
    proc = run(["regions"])
    assert proc.returncode == 0
    names = {line.split("\t")[0].lower() for line in proc.stdout.splitlines()}
    assert {"usa", "world", "ohio", "france"} <= names


def test_species_file_maps_each_species_and_stack(tmp_path, models_dir):
    species = tmp_path / "birds.csv"
    species.write_text("species,notes\nCardinalis cardinalis,red\nCyanocitta cristata,blue\n"
                       "Cardinalis cardinalis,dup\n")
    common = ["--bbox=-83,40,-82,41", "--resolution", "0.1", "--models", str(models_dir),
              "--cache", str(tmp_path / "c"), "--no-progress"]
    proc = run(["predict", "--species-file", str(species), "--out", str(tmp_path / "each"), *common])
    assert proc.returncode == 0, proc.stderr
    tifs = sorted(p.name for p in (tmp_path / "each").glob("*.tif"))
    assert tifs == ["cardinalis-cardinalis.tif", "cyanocitta-cristata.tif"]
    assert "Cyanocitta cristata" in proc.stderr  # summary table
    proc = run(["predict", "--species-file", str(species), "--stack", "--out", str(tmp_path / "st"),
                *common])
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(tmp_path / "st" / "birds-stack.tif") as ds:
        assert ds.descriptions == ("Cardinalis cardinalis", "Cyanocitta cristata")
        stacked = ds.read()
    with rasterio.open(tmp_path / "each" / "cyanocitta-cristata.tif") as ds:
        assert np.array_equal(stacked[1], ds.read(1), equal_nan=True)
    assert not np.array_equal(stacked[0], stacked[1], equal_nan=True)


def test_evaluate_and_threshold_commands(predicted, tmp_path):
    out, _, _ = predicted
    tif = out / "cardinalis-cardinalis.tif"
    occ = tmp_path / "occ.csv"
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(39.05, 40.95, 40), rng.uniform(-83.95, -82.05, 40)
    occ.write_text("decimalLatitude\tdecimalLongitude\n" + "".join(
        f"{a:.4f}\t{b:.4f}\n" for a, b in zip(lat, lon)) + "10.0\t10.0\n")
    proc = run(["evaluate", str(tif), "--occurrences", str(occ), "--json", str(tmp_path / "m.json"),
                "--roc", str(tmp_path / "roc.png"), "--n-background", "200"])
    assert proc.returncode == 0, proc.stderr
    assert "fused" in proc.stdout and "location" in proc.stdout and "auc" in proc.stdout.lower()
    import json

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert "1" in json.dumps(metrics)  # the point outside the map is counted, not dropped
    proc = run(["threshold", str(tif), "--rule", "percentile:80", "--out", str(tmp_path / "r")])
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(tmp_path / "r" / "cardinalis-cardinalis_range.tif") as ds:
        binary = ds.read(1)
    assert set(np.unique(binary)) <= {0, 1, 255} and (binary == 1).sum() > 0
    assert (tmp_path / "r" / "cardinalis-cardinalis_range.gpkg").is_file()
    bad = run(["threshold", str(tif), "--rule", "top:5"])
    assert bad.returncode == 2 and "percentile" in bad.stderr and "Traceback" not in bad.stderr


def test_predict_with_threshold_occurrences_self_contained(tmp_path, models_dir):
    pytest.importorskip("xstatic.pkg.leaflet")
    occ = tmp_path / "occ.csv"
    occ.write_text("lat,lon\n40.2,-82.9\n40.4,-82.6\n40.7,-82.3\n")
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox=-83,40,-82,41",
                "--resolution", "0.1", "--models", str(models_dir), "--out", str(tmp_path / "o"),
                "--cache", str(tmp_path / "c"), "--threshold", "percentile:90", "--occurrences",
                str(occ), "--self-contained", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "o"
    assert (out / "cardinalis-cardinalis_range.tif").is_file()
    assert (out / "cardinalis-cardinalis_range.gpkg").is_file()
    html = (out / "cardinalis-cardinalis.html").read_text()
    assert "occurrences (3)" in html and "percentile:90" in html
    assert "<script src=\"http" not in html and "unpkg.com" not in html.split("-->", 1)[-1]


def test_late_inputs_are_checked_before_any_work(tmp_path, models_dir):
    base = ["predict", "--species", "Cardinalis cardinalis", "--bbox=-83,40,-82,41",
            "--models", str(models_dir), "--out", str(tmp_path / "o")]
    cases = [
        (["--occurrences", str(tmp_path / "nope.csv")], "nope.csv"),
        (["--threshold", "maxtss"], "occurrences"),
        (["--species-file", str(tmp_path / "x.txt"), "--stack", "--threshold", "value:0.1"], "--stack"),
    ]
    for extra, needle in cases:
        args = base + extra if "--species-file" not in extra else [
            a for a in base if a not in ("--species", "Cardinalis cardinalis")] + extra
        proc = run(args)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert "embedding" not in proc.stderr  # failed before the cells
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.tif"))


def test_store_path_with_trailing_slash_lands_inside(tmp_path, models_dir):
    proc = run(["embed", "--bbox=-83,40,-82.5,40.5", "--resolution", "0.1", "--models",
                str(models_dir), "--store", f"{tmp_path}/st/", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "st" / "location").is_dir()


def test_self_contained_without_the_offline_extra_fails_before_any_cell(tmp_path, models_dir):
    # A user without the taxamap[offline] extra: a sitecustomize module, run at interpreter start,
    # makes `import xstatic.pkg.leaflet` fail as if XStatic-Leaflet were not installed.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\nsys.modules['xstatic.pkg.leaflet'] = None\n")
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(shim), str(root), os.environ.get("PYTHONPATH")) if p)
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", BBOX,
                "--resolution", "0.1", "--models", str(models_dir), "--out", str(out),
                "--cache", str(cache), "--self-contained", "--no-progress"],
               env_extra={"PYTHONPATH": path})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'taxamap[offline]'" in lines[0], lines
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # Nothing was embedded or written: no store in the cache, no file in --out.
    for folder in (cache, out):
        assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()], folder
