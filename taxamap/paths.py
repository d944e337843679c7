"""Where taxamap keeps what it caches: one root with a folder per kind.

``--cache DIR`` (or ``TAXAMAP_CACHE``, else the user cache dir, e.g. ``~/.cache/taxamap``) holds
``tiles/`` (satellite tiles), ``taxonomy/`` (name lookups), ``occurrences/`` (GBIF downloads) and
``stores/`` (embedding stores).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from taxamap.errors import TaxamapError


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root in effect: ``cache_dir``, else ``$TAXAMAP_CACHE``, else the user cache dir."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("TAXAMAP_CACHE"):
        return Path(os.environ["TAXAMAP_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("taxamap"))


def cache_subdir(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache root>/<kind>`` (tiles, taxonomy, occurrences, stores)."""
    return cache_root(cache_dir) / kind


#: What each path option is for, and how to fix it (the option as the user gave it: a flag or
#: an environment variable).
_ROLES = {
    "--cache": ("cache folder", "choose a writable folder with --cache DIR"),
    "TAXAMAP_CACHE": ("cache folder", "set TAXAMAP_CACHE to a writable folder, or pass --cache DIR"),
    "default cache": ("cache folder", "pass --cache DIR (or set TAXAMAP_CACHE=DIR) naming a "
                      "writable folder"),
    "--store": ("embedding store folder", "choose a writable folder with --store DIR, or drop "
                "--store to keep stores in the cache"),
    "--out": ("output folder", "choose a writable folder with --out DIR"),
    "--models": ("models folder", "pass --models DIR naming the folder 'taxamap models download "
                 "DIR' filled, or drop --models to use the Hugging Face cache"),
    "TAXAMAP_MODELS": ("models folder", "set TAXAMAP_MODELS to the folder 'taxamap models "
                       "download DIR' filled, or unset it to use the Hugging Face cache"),
}


def _first_file(path: Path) -> Path | None:
    """The first component of ``path`` (from the root down) that exists and is not a folder."""
    for part in reversed([path, *path.parents]):
        try:
            if not stat.S_ISDIR(os.stat(part).st_mode):
                return part
        except OSError:
            return None
    return None


def _why(exc: OSError, path: Path) -> str:
    """An OSError on ``path`` in words a user can act on."""
    code = exc.errno
    try:
        os.stat(path)  # mkdir on a link into a loop says EEXIST, stat says ELOOP
    except OSError as again:
        code = errno.ELOOP if again.errno == errno.ELOOP else code
    if code == errno.ELOOP:
        return "it lies inside a loop of symbolic links"
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _first_file(path)
        if blocker is not None:
            return ("it is a file, not a folder" if blocker == path
                    else f"{blocker} is a file, not a folder")
    if code == errno.EROFS:
        return "it is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOENT:  # e.g. under /proc: the folder exists or not, files cannot
        return "no file can be created there"
    return exc.strerror or str(exc)


def check_folder(path: str | os.PathLike, option: str, *, write: bool = True) -> Path:
    """``path`` as a usable folder for ``option`` (a key of :data:`_ROLES`: ``--cache``,
    ``TAXAMAP_CACHE``, ``--store``, ``--out``, ``--models``...), checked before any long work.

    ``write=True`` creates it if needed and proves a file can be made in it; ``write=False``
    (a folder only read, such as ``--models``) needs it to exist. A read-only file system, a
    file in the way, a loop of symbolic links or a missing folder is one :class:`TaxamapError`
    naming the folder and what to do. URLs (``s3://...``) are left to their file system.
    """
    what, hint = _ROLES[option]
    if "://" in str(path):
        return Path(path)
    folder = Path(path).expanduser()
    given = " (the default)" if option == "default cache" else f" ({option})"
    try:
        if write:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".taxamap-probe-"):
                pass
        elif not stat.S_ISDIR(os.stat(folder).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
    except OSError as exc:
        why = ("it does not exist" if not write and exc.errno == errno.ENOENT
               else _why(exc, folder))
        raise TaxamapError(f"cannot use {folder} as the {what}{given}: {why}; {hint}") from None
    return folder


def checked_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """:func:`cache_root`, checked writable by :func:`check_folder` under the name the user gave
    it (``--cache``, ``TAXAMAP_CACHE`` or the default)."""
    option = ("--cache" if cache_dir else "TAXAMAP_CACHE" if os.environ.get("TAXAMAP_CACHE")
              else "default cache")
    return check_folder(cache_root(cache_dir), option)
