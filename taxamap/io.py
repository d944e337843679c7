"""File-system helpers every writer shares: one atomic write, and one "disk full" message.

:func:`atomic_path` is the only way taxamap replaces a file: it writes a temporary file in the
same folder, flushes it to disk, and renames it onto the target, so a reader (or a rerun after a
crash, a kill, a full disk) sees either the old file or the complete new one, never a part. The
temporary file never outlives a failure.

A full file system (``ENOSPC``, a quota's ``EDQUOT``, or ``EFBIG`` from a file-size limit) is not
a bug to show as a traceback: :func:`disk_full_guard` and :func:`atomic_path` turn it into one
:class:`DiskFull` line that names the folder and roughly how much the step needs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from taxamap.errors import TaxamapError


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"``: sizes as messages give them (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TB"


class DiskFull(TaxamapError):
    """A write failed for lack of room; ``folder`` is where, ``need`` roughly how many bytes
    the step needs (None when unknown). One line; the CLI exits 2."""

    def __init__(self, folder: str | os.PathLike, need: int | None = None, *,
                 what: str = "writing", hint: str = "free some space or choose another folder",
                 reason: str = "no space left", per_cell: float | None = None):
        self.folder, self.need, self.what, self.hint, self.reason = str(folder), need, what, hint, reason
        #: Bytes per grid cell, when the writer knows it (a cache): whoever knows how many cells
        #: are left (the engine) turns it into the step's need with :meth:`needing`.
        self.per_cell = per_cell
        free = _free_bytes(folder)
        needs = f"; it needs about {format_bytes(need)}" if need else ""
        left = f" ({format_bytes(free)} free)" if free is not None and reason == "no space left" else ""
        super().__init__(f"{what} failed: {reason} in {folder}{left}{needs}; {hint}")

    def needing(self, need: int) -> "DiskFull":
        """The same error with a better estimate of what the step needs."""
        return DiskFull(self.folder, need, what=self.what, hint=self.hint, reason=self.reason)


def _free_bytes(folder: str | os.PathLike) -> int | None:
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_reason(exc: BaseException) -> str | None:
    """"no space left", "the disk quota is exceeded" or "the file-size limit is reached" when
    ``exc`` (or what it was raised from) is ENOSPC, EDQUOT or EFBIG (a file-size limit such as
    RLIMIT_FSIZE or FAT32's 4 GB); None for any other error. Libraries that hand the OS error
    back as text only (GDAL) are recognised by its wording."""
    seen = 0
    while exc is not None and seen < 8:
        code = getattr(exc, "errno", None)
        text = str(exc).lower()
        if code == errno.EDQUOT or "disk quota exceeded" in text:
            return "the disk quota is exceeded"
        if code == errno.EFBIG or "file too large" in text:
            return "the file-size limit is reached"
        if code == errno.ENOSPC or "no space left on device" in text:
            return "no space left"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


@contextlib.contextmanager
def disk_full_guard(folder: str | os.PathLike, need: int | Callable[[], int] | None = None, *,
                    what: str = "writing",
                    hint: str = "free some space or choose another folder") -> Iterator[None]:
    """Turn a disk-full error raised inside the block into :class:`DiskFull` (others pass).

    ``need`` may be a function, called only when the disk is full (an estimate that costs a read).
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        reason = disk_full_reason(exc)
        if reason is None:
            raise
        raise DiskFull(folder, need() if callable(need) else need, what=what, hint=hint,
                       reason=reason) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, need: int | None = None, what: str | None = None,
                hint: str = "free some space or choose another folder", fsync: bool = True,
                create: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally, flush it to disk
    (``fsync``) and rename it onto ``path``; on any error delete it.

    ``create=False`` yields a name that does not exist yet (for writers such as GDAL drivers
    that create the file themselves). A full disk raises :class:`DiskFull` naming the folder and
    ``need`` (bytes, a rough size of what is written); ``what`` names the step (default
    "writing <path>"). The result gets the usual permissions (``0o666`` less the umask).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    what = what or f"writing {path}"
    with disk_full_guard(folder, need, what=what, hint=hint):
        # Hidden, marked .tmp, and ending like the target, for drivers that go by the extension.
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                                    dir=folder)
        os.close(fd)
        tmp = Path(name)
        try:
            if not create:
                tmp.unlink()
            yield tmp
            if fsync:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


def atomic_write(path: str | os.PathLike, data: bytes | str, *, what: str | None = None,
                 hint: str = "free some space or choose another folder",
                 fsync: bool = True) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` through :func:`atomic_path`."""
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path, need=len(blob), what=what, hint=hint, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
    return Path(path)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on the file ``path``, made if needed, while
    the block runs: other processes taking the same lock wait. ``None`` (a store at a URL) and
    systems without ``fcntl`` go without. The kernel drops the lock when its process ends, so a
    crashed holder never leaves it taken."""
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_tree(folder: str | os.PathLike) -> None:
    """Delete ``folder`` so that nothing ever sees it half-deleted: it is renamed aside first
    (a dot name no reader looks for), then removed. Missing is fine."""
    folder = Path(folder)
    trash = folder.with_name(f".{folder.name}.{os.getpid()}.deleting")
    try:
        os.replace(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def out_folder(folder: str | os.PathLike, option_name: str = "--out") -> Path:
    """``folder`` (``~`` expanded), created with its parents when missing; a TaxamapError naming
    ``option_name`` when it cannot be."""
    out = Path(folder).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaxamapError(f"cannot create {out}: {exc.strerror or exc}; choose another "
                           f"{option_name}") from None
    return out
