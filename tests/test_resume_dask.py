"""Never lose a night's run: kill -9 mid-embed then rerun; and Dask workers equal a local run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

# CLI subprocesses killed and resumed, a Dask cluster: end to end, out of the quick loop.
pytestmark = pytest.mark.slow

# ~60 k land-and-sea cells at 0.05 deg over the eastern US: several 16 k-cell blocks.
BBOX = "-90,30,-75,45"


def _cmd(models_dir, store, *extra):
    return [sys.executable, "-m", "taxamap.cli", "embed", f"--bbox={BBOX}", "--resolution", "0.05",
            "--models", str(models_dir), "--store", str(store), "--no-progress", *extra]


def _env(tmp_path):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TAXAMAP_OFFLINE": "1", "TAXAMAP_CACHE": str(tmp_path / "c"),
                "PYTHONWARNINGS": "ignore", "TAXAMAP_THREADS": "1"})
    return env


def _done(store_dir):
    try:
        return int(np.asarray(zarr.open_group(str(store_dir / "location"), mode="r")["done"][:]).sum())
    except Exception:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("full")
    proc = subprocess.run(_cmd(models_dir, tmp / "store"), env=_env(tmp), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return zarr.open_group(str(tmp / "store" / "location"), mode="r")


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, models_dir, uninterrupted):
    store = tmp_path / "store"
    n_chunks = uninterrupted["done"].shape[0]
    assert n_chunks >= 3
    # Slow the run down so that the kill lands mid-way: one thread, and kill right after the first
    # block's completion record appears.
    proc = subprocess.Popen(_cmd(models_dir, store), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _done(store) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_after_kill = _done(store)
    assert 1 <= done_after_kill < n_chunks, "the kill should land mid-run"
    resumed = subprocess.run(_cmd(models_dir, store), env=_env(tmp_path), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    computed = int(resumed.stdout.split("\t")[2].split()[0])
    assert computed == n_chunks - done_after_kill  # only the unfinished blocks
    group = zarr.open_group(str(store / "location"), mode="r")
    assert np.asarray(group["done"][:]).all()
    assert np.array_equal(np.asarray(group["emb"][:]), np.asarray(uninterrupted["emb"][:]), equal_nan=True)
    assert group.attrs["key"] == uninterrupted.attrs["key"]


def test_dask_local_cluster_equals_single_process(tmp_path, models_dir, uninterrupted):
    pytest.importorskip("distributed")
    store = tmp_path / "dstore"
    proc = subprocess.run(_cmd(models_dir, store, "--dask", "local:2"), env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    group = zarr.open_group(str(store / "location"), mode="r")
    assert np.asarray(group["done"][:]).all()
    a = np.asarray(group["emb"][:], dtype=np.float32)
    b = np.asarray(uninterrupted["emb"][:], dtype=np.float32)
    # Same blocks through the same code; only thread counts differ, so at most fp16 rounding.
    assert np.allclose(a, b, atol=1e-3, equal_nan=True)
    assert group.attrs["key"] == uninterrupted.attrs["key"]
