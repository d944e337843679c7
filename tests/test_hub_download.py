"""The download paths, for real, against a loopback Hub: `taxamap models download DIR`, and the
first `predict` without a models folder filling the Hugging Face cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import rasterio

from tests.helpers.hubserver import COMMIT, HubServer

# CLI subprocesses downloading from a loopback Hub: end to end, out of the quick loop.
pytestmark = pytest.mark.slow


def run(args, env_extra, timeout=300):
    env = dict(os.environ)
    env.update({"TAXAMAP_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    env.pop("HF_HUB_OFFLINE", None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "taxamap.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_models_download_fills_a_models_folder(tmp_path, models_dir):
    with HubServer(models_dir) as hub:
        proc = run(["models", "download", str(tmp_path / "dl"), "--repos",
                    "MVRL/ecogeo,MVRL/taxabind-vit-b-16"],
                   {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr
    for repo, name in (("MVRL/ecogeo", "model.safetensors"),
                       ("MVRL/taxabind-vit-b-16", "open_clip_model.safetensors")):
        got = (tmp_path / "dl" / repo / name).read_bytes()
        assert got == (models_dir / repo / name).read_bytes()


def test_first_predict_downloads_into_the_hf_cache(tmp_path, models_dir):
    env = {"HF_HOME": str(tmp_path / "hf"), "TAXAMAP_CACHE": str(tmp_path / "c")}
    args = ["predict", "--species", "Cardinalis cardinalis", "--bbox=-83,40,-82.5,40.5",
            "--resolution", "0.1", "--out", str(tmp_path / "o"), "--no-progress"]
    with HubServer(models_dir) as hub:
        env["HF_ENDPOINT"] = hub.endpoint
        proc = run(args, env)
        assert proc.returncode == 0, proc.stderr
        assert any(m == "GET" and "ecogeo" in p for m, p in hub.requests)
    snapshot = tmp_path / "hf" / "hub" / "models--MVRL--ecogeo" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()
    with rasterio.open(tmp_path / "o" / "cardinalis-cardinalis.tif") as ds:
        assert any(f"MVRL/ecogeo@{COMMIT}" in v for v in ds.tags().values())
    # Then offline: the cache alone serves the same run.
    offline = run(args + ["--out", str(tmp_path / "o2")], {**env, "HF_HUB_OFFLINE": "1",
                                                           "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0, offline.stderr
    # And with the Hub unreachable but HF_HUB_OFFLINE unset: the cache serves, without retries.
    unreachable = run(args + ["--out", str(tmp_path / "o3")],
                      {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert unreachable.returncode == 0, unreachable.stderr
    assert "Retry" not in unreachable.stderr


def closed_port() -> int:
    """A loopback port nobody listens on: connecting to it is refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_hub_fails_fast_in_one_line(tmp_path):
    """No network and no HF_HUB_OFFLINE: one probe, one line naming both ways, exit 2, no retries."""
    env = {"HF_HOME": str(tmp_path / "hf"), "TAXAMAP_CACHE": str(tmp_path / "c"),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox=-83,40,-82.5,40.5",
                "--resolution", "0.1", "--out", str(tmp_path / "o"), "--no-progress"], env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("taxamap: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert "cannot be reached" in errors[0] and "Connection refused" in errors[0]
    assert "taxamap models download DIR" in errors[0] and "--models DIR" in errors[0]
    assert "Hugging Face cache" in errors[0] and "HF_HUB_OFFLINE" not in errors[0]
    assert "Retry" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(lines) <= 3, proc.stderr  # the region and prompt lines, then the error
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # The download command, too, says at once that it needs a network.
    proc = run(["models", "download", str(tmp_path / "dl")], env)
    assert proc.returncode == 2 and "cannot be reached" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

