"""Commands report failure as failure: a patch the server did not deliver, a typo in a region
kind, an empty climate array, the offline switch actually set, the files evaluate wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.wmsserver import WMSServer


def run(args, env=None, timeout=300):
    base = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1", PYTHONWARNINGS="ignore")
    if env is not None:
        base = {k: v for k, v in base.items() if k not in ("HF_HUB_OFFLINE", "TAXAMAP_OFFLINE")}
        base.update(env)
    return subprocess.run([sys.executable, "-m", "taxamap.cli", *args], capture_output=True,
                          text=True, env=base, timeout=timeout)


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("taxamap: error: ")
    return line


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# -- patches -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_patch_from_a_server_that_is_down_is_an_error(tmp_path):
    port = closed_port()
    out = tmp_path / "p"
    proc = run(["patches", "--lat", "40", "--lon", "-83", "--sat-url",
                f"http://127.0.0.1:{port}/wms", "--out", str(out), "--cache", str(tmp_path / "c")])
    line = error_line(proc)
    assert f"127.0.0.1:{port}" in line and "1 of 1 satellite patches" in line
    assert "--sat-url" in line and "drop the satellite modality" not in line
    assert "blocks already embedded" not in line
    assert list(out.iterdir()) == []  # no JSON pretending the patch is simply absent


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--lat", "41", "--lon", "-84"],
                                   ["--sat-source", "xyz"]])
def test_several_patches_or_tiles_from_a_server_that_is_down(tmp_path, extra):
    port = closed_port()
    url = (f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png" if "xyz" in extra
           else f"http://127.0.0.1:{port}/wms")
    proc = run(["patches", "--lat", "40", "--lon", "-83", *extra, "--sat-url", url,
                "--out", str(tmp_path / "p"), "--cache", str(tmp_path / "c")])
    line = error_line(proc)
    assert f"127.0.0.1:{port}" in line and "then run the same command again" in line
    assert "drop the satellite modality" not in line and "blocks already" not in line


@pytest.mark.slow
def test_a_failed_patch_among_good_ones_exits_2_and_keeps_the_good(tmp_path):
    out = tmp_path / "p"
    with WMSServer(faults={(40.0, -83.0): "503"}) as server:
        proc = run(["patches", "--lat", "40", "--lon", "-83", "--lat", "41", "--lon", "-84",
                    "--sat-url", server.url, "--out", str(out), "--cache", str(tmp_path / "c")])
    line = error_line(proc)
    assert "1 of 2 satellite patches could not be fetched from 127.0.0.1" in line
    assert "first at 40, -83" in line and "1 written to" in line
    assert sorted(p.name for p in out.iterdir()) == ["41_-84.json", "41_-84.png"]


@pytest.mark.slow
def test_genuinely_no_imagery_is_not_a_failure(tmp_path):
    out = tmp_path / "p"
    with WMSServer(faults={(40.0, -83.0): "blank"}) as server:
        proc = run(["patches", "--lat", "40", "--lon", "-83", "--sat-url", server.url,
                    "--out", str(out), "--cache", str(tmp_path / "c")])
    assert proc.returncode == 0, proc.stderr
    assert "no imagery at (40.0, -83.0)" in proc.stderr
    meta = json.loads((out / "40_-83.json").read_text())
    assert meta["missing"] is True and meta["failed"] is False


# -- regions, climate array, offline, evaluate -------------------------------------------------

@pytest.mark.slow
def test_regions_kind_typo_lists_the_kinds_and_the_listing_has_a_header():
    line = error_line(run(["regions", "--kind", "countries"]))
    assert "'countries'" in line and "did you mean 'country'" in line
    assert "world, continent, country, state, province" in line
    proc = run(["regions", "--kind", "Province"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "name\tkind\tcode"
    assert len(lines) > 5 and all(ln.split("\t")[1] == "province" for ln in lines[1:])


def test_python_regions_kind_typo(tmp_path):
    import taxamap
    from taxamap.errors import TaxamapError

    with pytest.raises(TaxamapError, match="did you mean 'state'"):
        taxamap.regions(kind="states")


@pytest.mark.slow
@pytest.mark.parametrize("content, why", [(b"", "the file is empty"),
                                          (b"plain text, not an array", "it is not a NumPy .npy array")])
def test_env_array_that_cannot_be_read_is_one_line(tmp_path, models_dir, content, why):
    bad = tmp_path / "bioclim.npy"
    bad.write_bytes(content)
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox=-84,39,-82,41",
                "--resolution", "0.5", "--models", str(models_dir), "--no-progress",
                "--modalities", "location,environment", "--env-array", str(bad),
                "--out", str(tmp_path / "o")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"cannot read environment array {bad}: {why}" in last and "--worldclim" in last


@pytest.mark.slow
@pytest.mark.parametrize("env, named", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                                        ({"TAXAMAP_OFFLINE": "1"}, "TAXAMAP_OFFLINE is set")])
def test_occurrences_offline_names_the_variable_set(tmp_path, env, named):
    proc = run(["occurrences", "--species", "Cardinalis cardinalis", "--bbox=-84,39,-82,41",
                "--out", str(tmp_path / "o.csv"), "--cache", str(tmp_path / "c")], env=env)
    line = error_line(proc)
    assert named in line and f"unset {named.split()[0]}" in line
    other = ({"HF_HUB_OFFLINE", "TAXAMAP_OFFLINE"} - set(env)).pop()
    assert other not in line


@pytest.mark.slow
def test_evaluate_prints_the_json_and_roc_it_wrote(tmp_path):
    from tests.helpers.maps import centres, write_map

    lat, lon = centres(-84.0, 41.0, 0.1, 20, 20)
    path = write_map(tmp_path / "m.tif", {"fused": (lat - 39).astype(np.float32)},
                     -84.0, 41.0, 0.1)
    occ = tmp_path / "occ.csv"
    occ.write_text("lat,lon\n40.9,-83.5\n40.7,-83.1\n40.5,-82.5\n40.8,-82.2\n")
    proc = run(["evaluate", str(path), "--occurrences", str(occ), "--n-background", "100",
                "--json", str(tmp_path / "m.json"), "--roc", str(tmp_path / "roc.png")])
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip().splitlines()
    assert printed[-2:] == [str(tmp_path / "m.json"), str(tmp_path / "roc.png")]
    assert (tmp_path / "m.json").is_file() and (tmp_path / "roc.png").is_file()
