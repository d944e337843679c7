"""A folder taxamap cannot use (read-only, a file in the way, a loop of symbolic links, a place
where no file can be made) is one line naming it and what to do, exit 2, before any cell is
embedded: for --cache, TAXAMAP_CACHE, --store, --out and --models, in the CLI, the Python API
and the web app's start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import taxamap
from taxamap.errors import TaxamapError

BBOX = "-84,39,-82,41"


def run(args, env_extra=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TAXAMAP_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "taxamap.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture
def read_only(tmp_path):
    """An empty folder no one can write to, made the way this machine allows: a read-only
    tmpfs (root with mount rights), an immutable folder (root with chattr), or mode 555 (any
    other user); skipped where none works (root in a container without those capabilities)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if mounted:
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if not immutable:
        pytest.skip("no way to make a read-only folder here (mount and chattr refused)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


@pytest.fixture
def blocked(tmp_path):
    """Folders that cannot be used on any machine, as any user: a file in the way, a loop of
    symbolic links, a path under a file, and one under /proc."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    return {"file": (afile, "is a file, not a folder"),
            "under a file": (afile / "sub", f"{afile} is a file, not a folder"),
            "loop": (tmp_path / "loop1", "loop of symbolic links"),
            "inside a loop": (tmp_path / "loop1" / "s", "loop of symbolic links"),
            "proc": (Path("/proc/taxamap-cache"), "no file can be created there"),
            # Read-only in containers (EROFS), refused elsewhere (EPERM): works without mounts.
            "sys": (Path("/sys/taxamap-cache"), ("read-only file system", "permission denied"))}


def _one_line(proc, folder) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # Nothing before it: the check comes before the region, the prompt and any cell.
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("taxamap: error: cannot use ") and str(folder) in line
    return line


def _predict(models_dir, tmp_path, *extra, env_extra=None):
    return run(["predict", "--species", "Cardinalis cardinalis", "--bbox", BBOX, "--resolution",
                "0.5", "--models", str(models_dir), "--no-progress", *extra],
               env_extra=env_extra)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["file", "under a file", "loop", "inside a loop", "proc", "sys"])
def test_cache_that_cannot_be_used_is_one_line(blocked, case, models_dir, tmp_path):
    folder, why = blocked[case]
    out = tmp_path / "out"
    proc = _predict(models_dir, tmp_path, "--cache", str(folder), "--out", str(out))
    line = _one_line(proc, folder)
    assert "(--cache)" in line and "--cache DIR" in line
    assert any(w in line for w in ((why,) if isinstance(why, str) else why)), line
    assert not any(out.iterdir())


@pytest.mark.slow
def test_read_only_cache_env_store_and_out(read_only, models_dir, tmp_path):
    out = tmp_path / "out"
    proc = _predict(models_dir, tmp_path, "--cache", str(read_only), "--out", str(out))
    line = _one_line(proc, read_only)
    assert "(--cache)" in line and ("read-only" in line or "permission denied" in line)

    proc = _predict(models_dir, tmp_path, "--out", str(out),
                    env_extra={"TAXAMAP_CACHE": str(read_only)})
    line = _one_line(proc, read_only)
    assert "(TAXAMAP_CACHE)" in line and "set TAXAMAP_CACHE to a writable folder" in line

    proc = _predict(models_dir, tmp_path, "--store", str(read_only / "s"), "--out", str(out))
    assert "(--store)" in _one_line(proc, read_only / "s")

    proc = _predict(models_dir, tmp_path, "--out", str(read_only / "maps"))
    assert "(--out)" in _one_line(proc, read_only / "maps")
    assert not any(out.iterdir()) and not any(read_only.iterdir())


@pytest.mark.slow
def test_store_out_and_models_in_a_loop_or_a_file(blocked, models_dir, tmp_path):
    loop, _ = blocked["inside a loop"]
    proc = _predict(models_dir, tmp_path, "--store", str(loop), "--out", str(tmp_path / "o"))
    assert "(--store)" in _one_line(proc, loop)
    proc = _predict(models_dir, tmp_path, "--out", str(loop))
    assert "(--out)" in _one_line(proc, loop)
    afile, _ = blocked["file"]
    proc = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", BBOX,
                "--models", str(afile), "--out", str(tmp_path / "o")])
    line = _one_line(proc, afile)
    assert "(--models)" in line and "is a file" in line and "taxamap models download" in line
    proc = run(["embed", "--bbox", BBOX, "--resolution", "0.5"], env_extra={"TAXAMAP_MODELS": str(blocked["loop"][0])})
    assert "(TAXAMAP_MODELS)" in _one_line(proc, blocked["loop"][0])


@pytest.mark.slow
def test_a_finished_store_on_a_read_only_folder_is_still_read(read_only, models_dir, tmp_path):
    """Only a store that must be filled needs to be writable: a shared, finished one is read."""
    if os.geteuid() != 0:
        pytest.skip("needs root to bind-mount a finished store read-only")
    store = tmp_path / "store"
    first = _predict(models_dir, tmp_path, "--store", str(store), "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    if subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(store)]).returncode:
        pytest.skip("cannot bind-mount read-only here")
    try:
        again = _predict(models_dir, tmp_path, "--store", str(store), "--out", str(tmp_path / "b"))
        assert again.returncode == 0, again.stderr
        finer = run(["predict", "--species", "Cardinalis cardinalis", "--bbox", BBOX,
                     "--resolution", "0.25", "--models", str(models_dir), "--store", str(store),
                     "--out", str(tmp_path / "c"), "--no-progress"])
        # A new grid's store must be filled: refused before its first block.
        assert finer.returncode == 2 and "Traceback" not in finer.stderr
        last = finer.stderr.strip().splitlines()[-1]
        assert f"cannot use {store} as the embedding store folder (--store)" in last
        assert "read-only" in last
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


@pytest.mark.slow
def test_api_and_serve_give_the_same_error(blocked, models_dir, tmp_path):
    afile, _ = blocked["file"]
    with pytest.raises(TaxamapError, match="cannot use .*afile as the cache folder"):
        taxamap.predict(species="Cardinalis cardinalis", bbox=BBOX, resolution=0.5,
                        models=models_dir, cache=afile, progress=False)
    loop, _ = blocked["inside a loop"]
    with pytest.raises(TaxamapError, match="loop of symbolic links"):
        taxamap.embed(bbox=BBOX, resolution=0.5, models=models_dir, store=loop, progress=False)
    proc = run(["serve", "--bbox", BBOX, "--resolution", "0.5", "--models", str(models_dir),
                "--cache", str(afile), "--port", "0"], timeout=120)
    assert "(--cache)" in _one_line(proc, afile)


def test_check_folder_creates_a_usable_folder(tmp_path):
    from taxamap.paths import check_folder

    made = check_folder(tmp_path / "a" / "b", "--cache")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe file is gone
    with pytest.raises(TaxamapError, match="does not exist"):
        check_folder(tmp_path / "nothing", "--models", write=False)
