"""A store that cannot lie: every kind of damage to a two-block store is found and repaired by
the next ``predict``, ``embed`` or ``serve`` (never a hole of NaN, never a traceback), damaged
metadata is one line or a repair, and concurrent runs share the blocks instead of computing each
twice. Real stores, the real CLI (in-process and as subprocesses), tiny models, offline."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import taxamap
from taxamap.cli import main
from taxamap.store import EmbeddingStore, store_key

SPECIES = "Cardinalis cardinalis"
# 130 x 130 cells of 0.02 deg, every one kept: 16,900 cells, so two blocks of 16,384 + 516.
BBOX = (-84.0, 39.0, -81.4, 41.6)
GRID = dict(bbox=BBOX, resolution=0.02, cells="all")
N_CELLS = 16_900


def _store_dir(cache: Path) -> Path:
    (found,) = [p for p in (cache / "stores").glob("*/location-*")
                if (p / "zarr.json").exists() and p.suffix != ".pyramid"]
    return found


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, models_dir):
    """A cache holding the grid's complete two-block store, and the map made from it."""
    cache = tmp_path_factory.mktemp("pristine")
    taxamap.embed(**GRID, models=models_dir, cache=cache, progress=False)
    ds = taxamap.predict(species=SPECIES, **GRID, models=models_dir, cache=cache, progress=False)
    fused = np.asarray(ds["fused"].values)
    assert np.isfinite(fused).sum() == N_CELLS  # every cell of the box embeds
    return cache, fused


def _copy(pristine, tmp_path) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(pristine[0], cache)
    return cache, _store_dir(cache)


def _overwrite(path: Path, data: bytes, offset: int = 0) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# Every damage kind of the issue (plus the check records' own files), to the second block or to
# the metadata. Sizes: a chunk file is 16,384 x 512 float16 = 16 MiB whatever its real rows.
DAMAGE = {
    "chunk deleted": lambda s: (s / "emb/c/1/0").unlink(),
    "chunk zeroed": lambda s: _overwrite(s / "emb/c/1/0", bytes((s / "emb/c/1/0").stat().st_size)),
    "chunk random": lambda s: _overwrite(s / "emb/c/1/0", np.random.default_rng(1).bytes(
        (s / "emb/c/1/0").stat().st_size)),
    "200 kB overwritten": lambda s: _overwrite(s / "emb/c/1/0",
                                               np.random.default_rng(2).bytes(200_000), 100_000),
    "chunk cut short": lambda s: os.truncate(s / "emb/c/1/0", 4_194_304),
    "chunk empty": lambda s: os.truncate(s / "emb/c/1/0", 0),
    "done chunk empty": lambda s: os.truncate(s / "done/c/0", 0),
    "check record empty": lambda s: os.truncate(s / "check/c/1/0", 0),
    "emb/zarr.json garbage": lambda s: (s / "emb/zarr.json").write_bytes(
        np.random.default_rng(3).bytes(300)),
    "done/zarr.json garbage": lambda s: (s / "done/zarr.json").write_text('{"garbage'),
    "check/zarr.json garbage": lambda s: (s / "check/zarr.json").write_text("[]"),
    "group zarr.json garbage": lambda s: (s / "zarr.json").write_text("not json"),
    "shape edited": lambda s: _edit_json(s / "emb/zarr.json",
                                         lambda d: d["shape"].__setitem__(0, 4000)),
}


def _verified(store_dir: Path) -> EmbeddingStore:
    key = json.loads((store_dir / "zarr.json").read_text())["attributes"]["key"]
    store = EmbeddingStore.open_existing(store_dir, key)
    assert store.pending_chunks(verify=True) == [] and store.damaged == {}
    return store


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_predict_repairs_every_damage_kind(kind, pristine, models_dir, tmp_path, caplog):
    """Before: holes of NaN (exit 0, 'done'), or tracebacks on every rerun."""
    cache, store_dir = _copy(pristine, tmp_path)
    DAMAGE[kind](store_dir)
    caplog.set_level(logging.INFO, logger="taxamap")
    ds = taxamap.predict(species=SPECIES, **GRID, models=models_dir, cache=cache, progress=False)
    fused = np.asarray(ds["fused"].values)
    # NaN only where a cell cannot be embedded: here, nowhere.
    assert np.isfinite(fused).sum() == N_CELLS
    np.testing.assert_allclose(fused, pristine[1], atol=2e-3, equal_nan=True)
    said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert said and all(str(store_dir) in line for line in said), said
    _verified(store_dir)
    caplog.clear()
    again = taxamap.predict(species=SPECIES, **GRID, models=models_dir, cache=cache,
                            progress=False)
    assert np.isfinite(np.asarray(again["fused"].values)).sum() == N_CELLS
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]  # repaired for good


@pytest.mark.slow
def test_predict_cli_says_it_in_one_line(pristine, models_dir, tmp_path):
    """The issue's run: a zeroed second block, `taxamap predict` as a user types it."""
    import rasterio

    cache, store_dir = _copy(pristine, tmp_path)
    DAMAGE["chunk zeroed"](store_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TAXAMAP_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "taxamap.cli", "predict", "--species", SPECIES,
         "--bbox=-84,39,-81.4,41.6", "--resolution", "0.02", "--cells", "all", "--models",
         str(models_dir), "--cache", str(cache), "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert lines == [f"store {store_dir}: block 2 of 2 damaged (checksum mismatch); "
                     "re-embedding it"]
    assert "Traceback" not in proc.stderr
    with rasterio.open(tmp_path / "out" / "cardinalis-cardinalis.tif") as tif:
        assert np.isfinite(tif.read(1)).sum() == N_CELLS


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _embed_args(models_dir, cache, *extra):
    return ["embed", "--bbox=-84,39,-81.4,41.6", "--resolution", "0.02", "--cells", "all",
            "--models", str(models_dir), "--cache", str(cache), "--no-progress", *extra]


def test_embed_repairs_and_verify_checks_everything(pristine, models_dir, tmp_path, capsys):
    """Before: `embed` on a damaged store said '0 blocks computed' and never repaired it."""
    cache, store_dir = _copy(pristine, tmp_path)
    DAMAGE["chunk deleted"](store_dir)
    rc, out, err = _cli(capsys, *_embed_args(models_dir, cache))
    assert rc == 0 and out.endswith("\t1 blocks computed\n"), err
    assert "block 2 of 2 damaged (its chunk file is missing); re-embedding it" in err
    _verified(store_dir)

    DAMAGE["chunk zeroed"](store_dir)  # same size: only reading it back tells
    rc, out, _ = _cli(capsys, *_embed_args(models_dir, cache))
    assert rc == 0 and out.endswith("\t0 blocks computed\n")
    rc, out, err = _cli(capsys, *_embed_args(models_dir, cache, "--verify"))
    assert rc == 0 and out.endswith("\t1 blocks computed\n")
    assert "block 2 of 2 damaged (checksum mismatch); re-embedding it" in err
    _verified(store_dir)


def test_cache_verify_finds_damage_and_marks_it_for_the_next_run(pristine, models_dir, tmp_path,
                                                                 capsys):
    cache, store_dir = _copy(pristine, tmp_path)
    rc, out, _ = _cli(capsys, "cache", "verify", "--cache", str(cache))
    assert rc == 0 and "2 blocks sound" in out and "all sound" in out
    DAMAGE["200 kB overwritten"](store_dir)
    rc, out, _ = _cli(capsys, "cache", "verify", "--cache", str(cache))
    assert rc == 1
    assert f"store {store_dir}: block 2 of 2 damaged (checksum mismatch)" in out
    # Marked not done: even the cheap check of a plain `embed` now re-embeds it.
    rc, out, _ = _cli(capsys, *_embed_args(models_dir, cache))
    assert rc == 0 and out.endswith("\t1 blocks computed\n")
    _verified(store_dir)


def test_damaged_metadata_of_a_named_store_is_one_line(models_dir, tmp_path, capsys):
    """A --store folder whose group metadata cannot be read: which store, what to do, exit 2."""
    store = tmp_path / "mine"
    args = ["embed", "--bbox=-84,39,-83,40", "--resolution", "0.1", "--models", str(models_dir),
            "--store", str(store), "--no-progress"]
    assert _cli(capsys, *args)[0] == 0
    (store / "location" / "zarr.json").write_bytes(b"\x00\xff garbage")
    rc, out, err = _cli(capsys, *args)
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()[-1:]
    assert line.startswith(f"taxamap: error: the embedding store at {store / 'location'} is "
                           "damaged (zarr.json is unreadable")
    assert "delete it" in line and "Traceback" not in err
    # Array metadata of a store whose key still reads is rewritten, even under --store.
    shutil.rmtree(store)
    assert _cli(capsys, *args)[0] == 0
    _edit_json(store / "location" / "emb" / "zarr.json", lambda d: d["shape"].__setitem__(0, 7))
    rc, out, err = _cli(capsys, *args)
    assert rc == 0 and out.endswith("\t0 blocks computed\n")
    assert "its metadata is damaged (emb/zarr.json gives shape (7, 512), not (100, 512))" in err


def test_serve_session_repairs_at_start_and_health_counts_what_it_holds(pristine, models_dir,
                                                                       tmp_path, caplog):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from tests.helpers.serveserver import ServeServer

    cache, store_dir = _copy(pristine, tmp_path)
    DAMAGE["chunk zeroed"](store_dir)
    caplog.set_level(logging.INFO, logger="taxamap")
    session = taxamap.open_session(**GRID, models=models_dir, cache=cache, progress=False)
    assert any("block 2 of 2 damaged (checksum mismatch); re-embedding it" in r.getMessage()
               for r in caplog.records)
    assert np.isfinite(np.asarray(session.predict(species=SPECIES)["fused"].values)).sum() \
        == N_CELLS
    with ServeServer(session) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        health = client.get("/api/health").json()
        # A cell in the second block (the south of the box) scores: no hole.
        cell = client.get("/api/cell", params={"lat": 39.05, "lon": -81.5,
                                               "species": SPECIES}).json()
    assert health["cells"] == N_CELLS and health["grid_cells"] == N_CELLS
    assert health["embedded"] == {"location": N_CELLS}
    assert cell["scores"]["fused"] is not None


def test_health_counts_cells_no_modality_could_embed(pristine, models_dir, tmp_path):
    """Cells a modality could not embed (NaN rows, written as such) are not counted as held."""
    cache, store_dir = _copy(pristine, tmp_path)
    key = json.loads((store_dir / "zarr.json").read_text())["attributes"]["key"]
    store = EmbeddingStore.open_existing(store_dir, key)
    values = store.read(store.chunk_slice(1))
    values[:16] = np.nan  # 16 cells the modality had nothing for (e.g. no imagery)
    store.write_chunk(1, values)
    session = taxamap.open_session(**GRID, models=models_dir, cache=cache, progress=False)
    from taxamap.serve.app import create_app
    from taxamap.serve.server import allowed_hosts_for

    health = create_app(session, allowed_hosts=allowed_hosts_for("127.0.0.1")).state.service.health()
    assert health["cells"] == N_CELLS - 16 and health["grid_cells"] == N_CELLS
    assert health["embedded"] == {"location": N_CELLS - 16}


# ------------------------------------------------------------------ the store on its own

def test_format_1_store_opens_and_gains_check_records(tmp_path, caplog):
    """A store written before the check records (no `check` array, format 1) keeps its blocks."""
    from taxamap.store import StoreDamaged

    kw = dict(key=store_key({"g": 1}, "location", "m@1", {}), n_cells=10, dim=4, attrs={},
              chunk_cells=4)
    store = EmbeddingStore.open(tmp_path / "s", **kw)
    values = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    for i in range(3):
        store.write_chunk(i, values[store.chunk_slice(i)])
    group = zarr.open_group(str(tmp_path / "s"), mode="a")
    del group["check"]  # as taxamap 0.x wrote it
    group.attrs["format"] = 1
    caplog.set_level(logging.INFO, logger="taxamap")
    old = EmbeddingStore.open(tmp_path / "s", **kw)
    assert old.check is not None and old.attrs["format"] == 2
    assert any("recording the checksums of its 3 finished blocks" in r.getMessage()
               for r in caplog.records)
    assert old.pending_chunks(verify=True) == []
    np.testing.assert_allclose(old.read(), values, atol=1e-2)
    _overwrite(tmp_path / "s" / "emb" / "c" / "1" / "0", bytes(8))  # damage after the upgrade
    with pytest.raises(StoreDamaged, match=r"block 2 of 3 damaged \(checksum mismatch\)"):
        EmbeddingStore.open(tmp_path / "s", **kw).read()


def test_read_marks_damaged_blocks_not_done(tmp_path):
    from taxamap.store import StoreDamaged

    kw = dict(key="k", n_cells=10, dim=4, attrs={}, chunk_cells=4)
    store = EmbeddingStore.open(tmp_path / "s", **kw)
    for i in range(3):
        store.write_chunk(i, np.ones((len(range(10)[store.chunk_slice(i)]), 4), np.float32))
    _overwrite(tmp_path / "s" / "emb" / "c" / "2" / "0", np.float16([0.5]).tobytes())
    reopened = EmbeddingStore.open(tmp_path / "s", **kw)
    assert reopened.pending_chunks() == []  # same size: the cheap check cannot tell
    assert np.allclose(reopened.read(slice(0, 8)), 1.0)  # blocks 1 and 2 read and check fine
    with pytest.raises(StoreDamaged) as err:
        reopened.read(slice(6, 10))
    assert err.value.blocks == {2: "checksum mismatch"}
    assert "run the same command again" in str(err.value)
    assert EmbeddingStore.open(tmp_path / "s", **kw).pending_chunks() == [2]  # persisted


# ------------------------------------------------------------------ runs sharing one store

# ~58 k land cells at 0.05 deg over the eastern US: four blocks, seconds of work each.
SHARED_BBOX = "-90,30,-75,45"


def _embed_cmd(models_dir, cache):
    return [sys.executable, "-m", "taxamap.cli", "embed", f"--bbox={SHARED_BBOX}",
            "--resolution", "0.05", "--models", str(models_dir), "--cache", str(cache),
            "--no-progress"]


def _env(cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TAXAMAP_OFFLINE": "1",
            "TAXAMAP_CACHE": str(cache), "PYTHONWARNINGS": "ignore", "TAXAMAP_THREADS": "1"}


def _computed(stdout: str) -> int:
    return int(stdout.split("\t")[2].split()[0])


@pytest.mark.slow
def test_two_concurrent_embeds_compute_each_block_once(models_dir, tmp_path):
    """Before: both runs computed every block (two runs' CPU for one run's work)."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(_embed_cmd(models_dir, cache), env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    n_chunks = zarr.open_group(str(_store_dir(cache)), mode="r")["done"].shape[0]
    assert n_chunks >= 3
    assert sum(_computed(out) for out, _ in results) == n_chunks
    _verified(_store_dir(cache))
    assert not list((cache / "stores").glob("*/*.claims"))  # every claim given back


def test_a_dead_runs_claim_is_taken_over(models_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["embed", "--bbox=-84,39,-81.4,41.6", "--resolution", "0.02", "--cells", "all",
            "--models", str(models_dir), "--cache", str(cache), "--no-progress"]
    # Create the store (and so its path), then leave block 2 claimed by a process that is gone.
    assert _cli(capsys, *args)[0] == 0
    store_dir = _store_dir(cache)
    zarr.open_group(str(store_dir), mode="a")["done"][1] = 0  # block 2 unfinished...
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims = Path(f"{store_dir}.claims")
    claims.mkdir(exist_ok=True)
    (claims / "1").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                          "since": time.time() - 60}))
    rc, out, err = _cli(capsys, *args)
    assert rc == 0 and out.endswith("\t1 blocks computed\n"), err
    assert (f"location: block 2 was claimed by pid {dead.pid} on {socket.gethostname()}, which "
            "ended without finishing it; taking it over") in err
    assert not claims.exists()  # given back, folder and all
    _verified(store_dir)


@pytest.mark.slow
def test_a_live_claim_is_waited_for_and_checked_not_recomputed(pristine, models_dir, tmp_path):
    from taxamap.claims import BlockClaims

    cache, store_dir = _copy(pristine, tmp_path)
    key = json.loads((store_dir / "zarr.json").read_text())["attributes"]["key"]
    block = EmbeddingStore.open_existing(store_dir, key).read(slice(16384, N_CELLS))
    store = EmbeddingStore.open_existing(store_dir, key)
    store.forget([1])
    with BlockClaims(str(store_dir)) as claims:
        assert claims.take(1)  # "another run" (this test) is embedding block 2
        proc = subprocess.Popen(
            [sys.executable, "-m", "taxamap.cli", *_embed_args(models_dir, cache)],
            env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waited = ""
        deadline = time.time() + 300
        while "waiting for it" not in waited and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            waited += line
        assert "location: 1 of 2 blocks are being embedded by another run (pid " \
               f"{os.getpid()} on {socket.gethostname()}); waiting for it" in waited
        store.write_chunk(1, block)  # that run finishes the block...
        claims.release(1)  # ...and gives its claim up
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.endswith("\t0 blocks computed\n")  # checked, not computed again
    _verified(store_dir)


def test_a_silent_claim_is_not_waited_for(tmp_path, monkeypatch, caplog):
    """A claim still locked but untouched for the timeout (a stopped process) is computed here."""
    from taxamap import claims as claims_module
    from taxamap.claims import BlockClaims

    monkeypatch.setattr(claims_module, "TIMEOUT_S", 60.0)
    location = str(tmp_path / "s")
    with BlockClaims(location) as holder, BlockClaims(location, label="location") as other:
        assert holder.take(0)
        assert other.take(0) is False and other.holder(0)["pid"] == os.getpid()
        silent = time.time() - 120
        os.utime(tmp_path / "s.claims" / "0", (silent, silent))
        caplog.set_level(logging.INFO, logger="taxamap")
        assert other.take(0) is True
    assert any(r.getMessage().startswith(f"location: block 1 is claimed by pid {os.getpid()}")
               and r.getMessage().endswith("silent for 2 min; computing it here")
               for r in caplog.records)


def test_a_dask_worker_leaves_a_claimed_block_alone(tmp_path):
    from taxamap.claims import BlockClaims
    from taxamap.distributed import _embed_block

    store = EmbeddingStore.open(tmp_path / "s", key="k", n_cells=8, dim=4, attrs={}, chunk_cells=4)
    with BlockClaims(str(tmp_path / "s")) as claims:
        assert claims.take(0)
        # Claimed elsewhere: the worker returns before building any encoder or writing a byte.
        assert _embed_block(None, {}, "location", str(tmp_path / "s"), "k", 0,
                            np.zeros((4, 2), np.float32)) is False
    assert store.pending_chunks() == [0, 1]
    assert not (tmp_path / "s" / "emb" / "c" / "0").exists()


# ------------------------------------------------------------------ cache info / clear

def test_cache_info_lists_stored_grids_and_clear_selects_them(models_dir, tmp_path, capsys):
    """Before: `cache info` showed the tile cache only (0 bytes beside 641 MB of stores)."""
    cache = tmp_path / "cache"
    common = ["--resolution", "0.5", "--models", str(models_dir), "--cache", str(cache),
              "--no-progress"]
    assert _cli(capsys, "embed", "--region", "ohio", *common)[0] == 0
    assert _cli(capsys, "embed", "--region", "indiana", *common)[0] == 0
    rc, out, _ = _cli(capsys, "cache", "info", "--cache", str(cache))
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("  ") and not line.split()[0] == "region"}
    assert set(rows) >= {"Ohio", "Indiana"}
    ohio = rows["Ohio"]
    assert ohio[1] == "0.5" and ohio[3] == "location" and ohio[4].startswith("MVRL/ecogeo@")
    assert int(ohio[2].replace(",", "")) > 0 and ohio[6] in ("KB", "MB")
    assert "embedding stores: 2 (" in out and "tiles: 0 entries" in out

    rc, _, err = _cli(capsys, "cache")
    assert rc == 2 and err.strip() == ("taxamap: error: usage: taxamap cache info|verify|clear "
                                       "(see 'taxamap cache --help')")
    rc, out, err = _cli(capsys, "cache", "clear", "--region", "atlantis", "--cache", str(cache))
    assert rc == 2 and "no stored grid of region 'atlantis'" in err and "Ohio" in err
    rc, out, _ = _cli(capsys, "cache", "clear", "--older-than", "1", "--cache", str(cache))
    assert rc == 0 and out.startswith("removed 0 embedding stores")
    indiana = [p for p in (cache / "stores").glob("*/location-*")
               if (p / "zarr.json").exists() and p.suffix != ".pyramid"
               and json.loads((p / "zarr.json").read_text())["attributes"]["region"] == "Indiana"]
    old = time.time() - 3 * 86400
    os.utime(f"{indiana[0]}.lock", (old, old))
    rc, out, _ = _cli(capsys, "cache", "clear", "--older-than", "2", "--cache", str(cache))
    assert rc == 0 and out.startswith("removed 1 embedding stores")
    assert not indiana[0].exists()
    rc, out, _ = _cli(capsys, "cache", "clear", "--tiles", "--cache", str(cache))
    assert rc == 0 and out == "removed 0 tile entries\n" and _store_dir(cache).exists()
    rc, out, _ = _cli(capsys, "cache", "clear", "--region", "ohio", "--cache", str(cache))
    assert rc == 0 and out.startswith("removed 1 embedding stores")
    assert not list((cache / "stores").iterdir())


def test_a_block_that_lands_while_its_holder_is_looked_up_is_not_computed_again(tmp_path):
    """The window CI hit (two embeds computed 6 blocks of 5): the waiting run looked at the
    flags (block not finished), then the other run wrote the block and gave its claim up, then
    the waiting run asked who held it (nobody) and computed it a second time."""
    from taxamap.claims import BlockClaims, wait_for_blocks

    kw = dict(key="k", n_cells=10, dim=4, attrs={}, chunk_cells=4)
    store = EmbeddingStore.open(tmp_path / "s", **kw)
    for i in (0, 1):
        store.write_chunk(i, np.ones((4, 4), np.float32))
    other = BlockClaims(str(tmp_path / "s"))  # "another run", embedding block 3
    assert other.take(2)

    class LandsRightAfterTheFlagsAreRead(EmbeddingStore):
        looks = 0

        def finished(self, blocks):
            seen = super().finished(blocks)
            LandsRightAfterTheFlagsAreRead.looks += 1
            if LandsRightAfterTheFlagsAreRead.looks == 1:  # the other run finishes just now
                EmbeddingStore.open(tmp_path / "s", **kw).write_chunk(2, np.ones((2, 4)))
                other.release(2)
            return seen

    waiting = EmbeddingStore.open(tmp_path / "s", **kw)
    waiting.__class__ = LandsRightAfterTheFlagsAreRead
    with BlockClaims(str(tmp_path / "s")) as claims:
        assert wait_for_blocks(waiting, claims, [2]) == []  # landed, checked: nothing to compute
    assert LandsRightAfterTheFlagsAreRead.looks >= 2
    assert EmbeddingStore.open(tmp_path / "s", **kw).pending_chunks() == []
    other.close()
