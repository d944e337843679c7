"""Issue 3's user story end to end: location + satellite (a loopback XYZ server) + environment
(synthetic WorldClim rasters with the official names), fused; a rerun makes no request."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from tests.helpers.tileserver import TileServer
from tests.helpers.worldclim_fixtures import write_rasters

# CLI runs over three modalities with loopback servers: end to end, out of the quick loop.
pytestmark = pytest.mark.slow

BBOX = "-83,40,-82,40.6"  # Ohio: 60 cells at 0.1 deg


def run(args, tmp_path, timeout=600, env=None):
    environ = dict(os.environ)
    environ.update({"HF_HUB_OFFLINE": "1", "TAXAMAP_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
                    "TAXAMAP_CACHE": str(tmp_path / "cache"), **(env or {})})
    return subprocess.run([sys.executable, "-m", "taxamap.cli", *args], capture_output=True,
                          text=True, env=environ, timeout=timeout)


@pytest.fixture(scope="module")
def worldclim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wc")
    write_rasters(folder, height=36, width=72)
    return folder


@pytest.mark.parametrize("fusion", ["mean", "sum"])
def test_three_modalities_fused_and_cached(tmp_path, models_dir, worldclim, fusion):
    with TileServer(latency=0.0, faults={(12, 1104, 1542): "404"}) as server:
        args = ["predict", "--species", "Cardinalis cardinalis", f"--bbox={BBOX}",
                "--resolution", "0.1", "--modalities", "location,satellite,environment",
                "--fusion", fusion, "--models", str(models_dir), "--worldclim", str(worldclim),
                "--sat-source", "xyz", "--sat-url", server.url_template, "--sat-zoom", "12",
                "--sat-size", "64", "--workers", "4", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o"),
                "--no-progress"]
        first = run(args, tmp_path)
        assert first.returncode == 0, first.stderr
        assert "had no imagery" in first.stderr  # the 404 tile is counted in the summary
        assert server.requests > 0
        server.reset_counters()
        second = run(args + ["--out", str(tmp_path / "o2")], tmp_path)
        assert second.returncode == 0, second.stderr
        assert server.requests == 0  # tiles and embeddings both come from the caches
    with rasterio.open(tmp_path / "o" / "cardinalis-cardinalis.tif") as ds:
        assert ds.descriptions == ("fused", "location", "satellite", "environment",
                                   "disagreement", "mess", "mess_variable")
        bands = ds.read()
        tags = {k.lower(): v for k, v in ds.tags().items()}
        assert "MEANING" in ds.tags(5) and ds.units[5].startswith("MESS, percent")
    assert tags["fusion"] == fusion
    assert "MVRL/ecosat@local-" in tags["models"] and "MVRL/ecoclim@local-" in tags["models"]
    fused, loc, sat, env, spread, mess, variable = bands
    # disagreement: the population spread of the raw cosines of the modalities scoring a cell.
    both = np.isfinite(loc) & np.isfinite(sat) & np.isfinite(env)
    assert np.allclose(spread[both], np.std(np.stack([loc, sat, env]), axis=0)[both], atol=1e-5)
    assert tags["disagreement_scale"].startswith("cosine")
    # mess against the region's own cells: never outside their range, 0 at an extreme.
    assert np.nanmin(mess) == pytest.approx(0.0, abs=1e-4) and np.nanmax(mess) <= 100
    assert set(np.unique(variable[np.isfinite(variable)])) <= set(range(20))
    assert tags["mess_reference"].startswith("the region's") and "bio_1" in tags["mess_variables"]
    valid = np.isfinite(loc)
    assert valid.sum() == 60
    # The cell at (40.55, -82.95) sits in tile 12/1104/1542, which the server answers 404: its
    # satellite value is missing (NaN), never a black-image embedding, and fusion skips it.
    assert np.isnan(sat[0, 0]) and np.isfinite(loc[0, 0]) and np.isfinite(env[0, 0])
    assert 40 <= np.isfinite(sat[valid]).sum() < 60
    if fusion == "mean":
        assert fused[0, 0] == pytest.approx((loc[0, 0] + env[0, 0]) / 2, abs=1e-5)
    if fusion == "mean":
        stack = np.stack([loc, sat, env])
        expected = np.nanmean(np.where(np.isfinite(stack), stack, np.nan), axis=0)
        assert np.allclose(fused[valid], expected[valid], atol=1e-5)
    else:
        assert np.isfinite(fused[valid]).all()
        assert not np.allclose(fused[valid], loc[valid], atol=1e-3)
    with rasterio.open(tmp_path / "o2" / "cardinalis-cardinalis.tif") as ds:
        assert np.array_equal(ds.read(), bands, equal_nan=True)
    html = (tmp_path / "o" / "cardinalis-cardinalis.html").read_text()
    for name in ("fused", "location", "satellite", "environment", "disagreement", "mess"):
        assert name in html
    assert "data-band='disagreement'" in html and "tell different stories" in html


def test_environment_without_climate_data_is_one_line(tmp_path, models_dir):
    proc = run(["predict", "--species", "Cardinalis cardinalis", f"--bbox={BBOX}",
                "--modalities", "location,environment", "--models", str(models_dir),
                "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2
    assert "--worldclim" in proc.stderr and "Traceback" not in proc.stderr


def test_default_imagery_is_eox_and_its_licence_is_announced_once(models_dir, caplog):
    from taxamap import modalities
    from taxamap.options import GridOptions
    from taxamap.models.hub import DEFAULT_CONFIG

    req = GridOptions(models=str(models_dir), modalities=["satellite"])
    plan = modalities.plan_modality("satellite", req, DEFAULT_CONFIG, lambda: "cpu")
    assert "s2maps.eu" in plan.attribution and "CC BY-NC-SA 4.0" in plan.license
    assert "s2cloudless-2020" in str(plan.source)
    modalities._NOTICES_SHOWN.clear()
    with caplog.at_level("INFO", logger="taxamap"):
        modalities.licence_notice(plan.attribution, plan.license)
        modalities.licence_notice(plan.attribution, plan.license)
    assert caplog.text.count("CC BY-NC-SA 4.0") == 1


def test_failed_tiles_leave_their_block_unfinished_and_a_rerun_fills_them(tmp_path, models_dir):
    """A tile still failing after retries is a hole in this map, never a permanent one: the block
    is not recorded complete, and the same command run again fetches just the missing tile."""
    with TileServer(latency=0.0, faults={(12, 1104, 1542): "500"}) as server:
        args = ["predict", "--species", "Cardinalis cardinalis", f"--bbox={BBOX}",
                "--resolution", "0.1", "--modalities", "location,satellite",
                "--models", str(models_dir), "--sat-source", "xyz", "--sat-url", server.url_template,
                "--sat-zoom", "12", "--sat-size", "64", "--workers", "4", "--cache", str(tmp_path / "cache"),
                "--out", str(tmp_path / "o"), "--no-progress"]
        first = run(args, tmp_path)
        assert first.returncode == 0, first.stderr
        assert "failed to fetch" in first.stderr and "again" in first.stderr
        with rasterio.open(tmp_path / "o" / "cardinalis-cardinalis.tif") as ds:
            assert np.isnan(ds.read(3)[0, 0])
        server.faults = {}
        server.reset_counters()
        second = run(args, tmp_path)
        assert second.returncode == 0, second.stderr
        assert 0 < server.requests <= 4  # only the tile that had failed
    with rasterio.open(tmp_path / "o" / "cardinalis-cardinalis.tif") as ds:
        satellite = ds.read(3)
        location = ds.read(2)
    assert np.isfinite(satellite[np.isfinite(location)]).all()


def test_image_query_never_overwrites_the_photo(tmp_path, models_dir):
    from PIL import Image

    photo = tmp_path / "bird.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    before = photo.read_bytes()
    proc = run(["predict", "--image", str(photo), f"--bbox={BBOX}", "--resolution", "0.2",
                "--models", str(models_dir), "--out", str(tmp_path), "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert photo.read_bytes() == before
    from taxamap.naming import file_digest

    stem = f"image-bird-{file_digest(photo)[:8]}"
    assert (tmp_path / f"{stem}.png").is_file() and (tmp_path / f"{stem}.tif").is_file()


def test_photos_named_alike_get_maps_of_their_own(tmp_path, models_dir):
    """`--image bird.jpg` then `--image bird.webp` into one --out: two maps, each named by the
    file's name and content (the rule the web app uses too), the first never replaced."""
    from PIL import Image

    from taxamap.naming import file_digest, file_slug
    from taxamap.writers import recorded_query

    (tmp_path / "a").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a" / "bird.jpg")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(tmp_path / "a" / "bird.webp")
    out = tmp_path / "maps"
    made = {}
    for name in ("bird.jpg", "bird.webp"):
        photo = tmp_path / "a" / name
        proc = run(["predict", "--image", str(photo), f"--bbox={BBOX}", "--resolution", "0.2",
                    "--models", str(models_dir), "--out", str(out), "--no-progress"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        made[name] = out / f"{file_slug('image', name, file_digest(photo))}.tif"
        assert str(made[name]) in proc.stdout + proc.stderr
    assert made["bird.jpg"] != made["bird.webp"]
    assert [recorded_query(made[n]) for n in made] == ["image bird.jpg", "image bird.webp"]
    assert made["bird.jpg"].name.startswith("image-bird-")


def test_stalled_tile_server_ends_the_run_in_one_line(tmp_path, models_dir):
    """A server that accepts connections and never answers: the breaker stops the run after the
    first wave of timeouts (exit 2, one line naming the server), instead of every tile's retries;
    the satellite blocks stay unfinished for a rerun."""
    import zarr

    from tests.helpers.stallserver import StallServer

    with StallServer() as stall:
        host = stall.host
        args = ["predict", "--species", "Cardinalis cardinalis", "--bbox=-83,40,-82.8,40.2",
                "--resolution", "0.1", "--modalities", "location,satellite",
                "--models", str(models_dir), "--sat-source", "xyz",
                "--sat-url", stall.url + "/tiles/{z}/{x}/{y}.jpg",
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o"), "--no-progress"]
        proc = run(args, tmp_path, env={"TAXAMAP_HTTP_TIMEOUT": "1,0.5"})
        # One wave of 0.5 s timeouts, then nothing more is sent: 4 cells x 4 tiles, each tried
        # once. (Without the breaker: 16 tiles x 5 attempts, plus backoff.)
        assert 1 <= stall.accepted <= 16
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if host in line]
    assert len(errors) == 1 and errors[0].startswith("taxamap: error: no satellite tiles")
    assert "not answering" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "cardinalis-cardinalis.tif").exists()
    (done,) = [zarr.open_group(str(p), mode="r")["done"][:]
               for p in (tmp_path / "cache" / "stores").glob("*/satellite-*") if p.is_dir()]
    assert not done.any()  # nothing recorded complete: a rerun computes every block
