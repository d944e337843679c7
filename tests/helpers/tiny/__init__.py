"""Tiny checkpoints in the released TaxaBind file layouts, written by the tests.

Each module ``tests/helpers/tiny/<name>.py`` exposes ``write(repo_dir: Path, seed: int = 0) ->
None`` that writes exactly the files of its hub repo (same names, same config keys, same state-dict keys as the
released checkpoint) with small hidden sizes and 512-d outputs. They load through taxamap's real
resolver and loaders, from a models folder or from a Hugging Face cache.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

#: hub repo -> module in this package that writes it.
WRITERS = {
    "MVRL/taxabind-config": "config",
    "MVRL/ecogeo": "location",
    "MVRL/taxabind-vit-b-16": "clip",
    "MVRL/ecosat": "satellite",
    "MVRL/ecoclim": "environment",
    "MVRL/ecosound": "audio",
    "laion/clap-htsat-fused": "audio_processor",
}


def available() -> dict[str, str]:
    """The repos whose writer module exists (modalities land one by one)."""
    out = {}
    for repo, mod in WRITERS.items():
        try:
            importlib.import_module(f"tests.helpers.tiny.{mod}")
        except ModuleNotFoundError:
            continue
        out[repo] = mod
    return out


def write_repo(root: Path, repo: str, seed: int = 0) -> Path:
    """Write one repo's tiny files into ``root/<org>/<name>/`` and return that folder."""
    folder = Path(root) / repo
    folder.mkdir(parents=True, exist_ok=True)
    importlib.import_module(f"tests.helpers.tiny.{WRITERS[repo]}").write(folder, seed=seed)
    return folder


def write_models_dir(root: Path, repos: list[str] | None = None, seed: int = 0) -> Path:
    """A complete models folder (``--models DIR`` layout) with every available tiny repo."""
    for repo in repos or list(available()):
        write_repo(root, repo, seed=seed)
    return Path(root)


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def write_hf_cache(hub_dir: Path, repo: str, commit: str, seed: int = 0,
                   source: Path | None = None) -> Path:
    """Lay ``repo``'s tiny files out as a Hugging Face hub cache (``models--org--name/snapshots/
    <commit>/`` plus ``refs/main``) under ``hub_dir``; copies from ``source`` if given."""
    import shutil
    import tempfile

    base = Path(hub_dir) / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        src = Path(source) if source is not None else write_repo(Path(staging), repo, seed=seed)
        for f in src.iterdir():
            shutil.copy(f, snap / f.name)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return snap
