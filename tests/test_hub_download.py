"""The download paths, for real, against a loopback Hub: `taxamap models download DIR`, and the
first `predict` without a models folder filling the Hugging Face cache."""

from __future__ import annotations

import os
import subprocess
import sys

import rasterio

from tests.hubserver import COMMIT, HubServer


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
