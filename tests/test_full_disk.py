"""A full disk is one line naming the folder and what the step needs; a rerun after freeing space
resumes. On a small tmpfs (needs root; skipped otherwise) and with a file-size limit (any user)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import shapely

from taxamap.io import DiskFull, atomic_write
from taxamap.store import EmbeddingStore
from tests.helpers.tileserver import TileServer

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


class SmallDisk:
    """A tmpfs of ``size`` bytes at ``path``; :meth:`fill` leaves ``free`` bytes, :meth:`free_up`
    deletes the filler (the user freeing space)."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.filler = path / "filler"

    def fill(self, free: int) -> None:
        left = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with open(self.filler, "ab") as fh:
            fh.write(b"\0" * max(0, left - free))

    def free_up(self) -> None:
        self.filler.unlink(missing_ok=True)

    def files(self, under: Path | None = None) -> list[str]:
        root = under or self.path
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p != self.filler)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={32 * MB}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield SmallDisk(mount, 32 * MB)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# -- the store ---------------------------------------------------------------------------------

def test_store_on_a_full_disk_names_the_folder_and_resumes(small_disk):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(1200, 512)).astype(np.float32)
    location = small_disk.path / "stores" / "location"
    store = EmbeddingStore.open(location, key="k", n_cells=1200, dim=512, attrs={},
                                chunk_cells=200)
    small_disk.fill(free=450_000)  # room for about two of the six 200 KB blocks
    with pytest.raises(DiskFull) as err:
        for i in range(store.n_chunks):
            store.write_chunk(i, values[store.chunk_slice(i)])
    message = str(err.value)
    assert str(location) in message and "no space left" in message and "\n" not in message
    assert "--cache" in message and "resumes" in message
    # What the unfinished blocks need (float16): some hundreds of KB, not bytes or GB.
    assert err.value.need == len(store.pending_chunks()) * 200 * 512 * 2 >= 600_000
    done_before = store.n_chunks - len(store.pending_chunks())
    assert 0 < done_before < store.n_chunks

    small_disk.free_up()
    store = EmbeddingStore.open(location, key="k", n_cells=1200, dim=512, attrs={},
                                chunk_cells=200)
    for i in store.pending_chunks():
        store.write_chunk(i, values[store.chunk_slice(i)])
    assert store.is_complete()
    np.testing.assert_array_equal(store.read(), values.astype(np.float16).astype(np.float32))


# -- the outputs -------------------------------------------------------------------------------

def _scoremap():
    from taxamap.dataset import provenance, scores_dataset
    from taxamap.grid import make_grid

    grid = make_grid(shapely.box(-20, 30, 20, 60), 0.1)  # 400 x 300: ~1 MB of two float32 bands
    rng = np.random.default_rng(1)
    fused = rng.normal(size=(1, grid.n_cells)).astype(np.float32)
    return scores_dataset(grid, fused, {"location": fused}, labels=["Testus fullus"],
                          prompts=[None], slugs=["testus-fullus"],
                          attrs=provenance(modalities=["location"], fusion="mean", models={},
                                           region_name="box"))


def test_geotiff_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    from taxamap.writers.geotiff import write_geotiff

    out = small_disk.path / "out"
    out.mkdir()
    (out / "testus-fullus.tif").write_bytes(b"the map of an earlier run")
    small_disk.fill(free=100_000)
    with pytest.raises(DiskFull) as err:
        write_geotiff(_scoremap(), out / "testus-fullus.tif")
    message = str(err.value)
    assert f"in {out}" in message and "--out" in message and "\n" not in message
    assert err.value.need > 100_000  # the COG's size: more than the room there was
    assert (out / "testus-fullus.tif").read_bytes() == b"the map of an earlier run"
    assert _temps(out) == []

    small_disk.free_up()
    path = write_geotiff(_scoremap(), out / "testus-fullus.tif")
    assert path.stat().st_size == err.value.need  # exactly what it said it needed


# -- the tile cache ----------------------------------------------------------------------------

def test_tile_cache_on_a_full_disk_names_it(small_disk):
    from taxamap.sources.tiles import XYZTileSource

    cache = small_disk.path / "tiles"
    cells = np.column_stack([np.linspace(-40, 40, 30), np.linspace(-120, 120, 30)])
    with TileServer(fmt="png") as server:
        small_disk.fill(free=60_000)  # a few PNG tiles (~20 KB each)
        with XYZTileSource(server.url_template, zoom=6, size=64, cache_dir=cache, workers=2,
                           timeout=(2.0, 2.0)) as src:
            with pytest.raises(DiskFull) as err:
                src.fetch(cells)
        message = str(err.value)
        assert f"in {cache}" in message and "--cache" in message and "\n" not in message
        assert _temps(cache) == []
        assert err.value.per_cell > 1000  # bytes per cell: the engine scales it by cells left

        small_disk.free_up()
        with XYZTileSource(server.url_template, zoom=6, size=64, cache_dir=cache,
                           workers=2) as src:
            assert all(p is not None for p in src.fetch(cells))


def test_wms_cache_on_a_full_disk_names_it(small_disk):
    from taxamap.sources.wms import WMSSource
    from tests.helpers.wmsserver import WMSServer

    cache = small_disk.path / "tiles"
    cells = np.column_stack([np.linspace(-40, 40, 30), np.linspace(-120, 120, 30)])
    with WMSServer(content="constant") as server:
        small_disk.fill(free=300_000)  # two GetMap answers (~135 KB each)
        with WMSSource(server.url, cache_dir=cache, workers=2, timeout=(2.0, 2.0)) as src:
            with pytest.raises(DiskFull) as err:
                src.fetch(cells)
        message = str(err.value)
        assert f"in {cache}" in message and "--cache" in message and "\n" not in message
        assert _temps(cache) == []
        assert err.value.per_cell > 100_000  # one answer per cell
        assert server.requests < len(cells)  # the queued requests were not sent for nothing

        small_disk.free_up()
        with WMSSource(server.url, cache_dir=cache, workers=2) as src:
            assert all(p is not None for p in src.fetch(cells))


# -- predict, end to end -----------------------------------------------------------------------

def _predict(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1", PYTHONWARNINGS="ignore",
               TAXAMAP_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "taxamap.cli", "predict", "--species",
                           "Cardinalis cardinalis", "--bbox=-84,39,-81,41", "--resolution", "0.05",
                           "--no-progress", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_predict_with_out_or_cache_on_a_full_disk(small_disk, tmp_path, models_dir):
    # --out full: the writers' line; nothing half-written; the store (elsewhere) is complete.
    out = small_disk.path / "maps"
    out.mkdir()
    small_disk.fill(free=20_000)
    full_out = _predict(["--models", str(models_dir), "--out", str(out)], tmp_path)
    assert full_out.returncode == 2, full_out.stderr
    (line,) = [ln for ln in full_out.stderr.splitlines() if "error" in ln]
    assert line.startswith("taxamap: error: writing") and f"no space left in {out}" in line
    assert "needs about" in line and "Traceback" not in full_out.stderr
    assert small_disk.files(out) == []

    # --cache full: the store's line; after freeing space the same command resumes and succeeds.
    small_disk.free_up()
    small_disk.fill(free=40_000)  # a store is written in whole 16 MB chunks (16384 x 512 x 2)
    cache = small_disk.path / "cache"
    args = ["--models", str(models_dir), "--cache", str(cache), "--out", str(tmp_path / "o")]
    full_cache = _predict(args, tmp_path)
    assert full_cache.returncode == 2, full_cache.stderr
    (line,) = [ln for ln in full_cache.stderr.splitlines() if "error" in ln]
    assert "embedding store failed: no space left in" in line and str(cache) in line
    assert "needs about 16.0 MB" in line and "Traceback" not in full_cache.stderr
    small_disk.free_up()
    again = _predict(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "o" / "cardinalis-cardinalis.tif").is_file()


# -- a file-size limit (EFBIG), without root -------------------------------------------------------

@pytest.mark.slow
def test_file_size_limit_is_reported_like_a_full_disk(tmp_path):
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        from taxamap.io import DiskFull, atomic_write
        try:
            atomic_write({str(tmp_path / "big.bin")!r}, b"x" * 200_000)
        except DiskFull as exc:
            print(exc)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2, proc.stderr
    assert "file-size limit is reached" in proc.stdout and str(tmp_path) in proc.stdout
    assert "195.3 KB" in proc.stdout  # how much the write needed
    assert list(tmp_path.iterdir()) == []  # no temp file left
    # Without a limit the same helper writes the file.
    atomic_write(tmp_path / "big.bin", b"x" * 200_000)
    assert (tmp_path / "big.bin").stat().st_size == 200_000
