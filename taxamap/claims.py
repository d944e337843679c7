"""Block claims: runs (and Dask workers) on one store share its blocks instead of computing each
twice.

A run claims a block just before it starts fetching or embedding it and gives the claim up once
the block is written. A claim is the file ``<store>.claims/<block>``, locked with ``flock`` and
holding who claimed it (pid, host, time) for the messages. The kernel drops the lock when its
process ends, however it ends (kill -9, a crash), so the claim of a dead run is stale by
construction and the next run takes it over: no clock to trust, no race between two takers. While
it holds claims, a run touches their files every :data:`HEARTBEAT_S` seconds; a claim still locked
but untouched for :data:`TIMEOUT_S` (a stopped process, a hung network mount) is not waited for.

A run that finds the blocks it still needs claimed by other runs waits for them, checking each as
it lands (:func:`wait_for_blocks`), instead of computing them again. Stores at URLs (fsspec) and
file systems without ``flock`` go without claims: runs there may duplicate work, never corrupt a
block (each is written whole, with its check record).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from taxamap.store import EmbeddingStore, beside, damage_summary

try:
    import fcntl
except ImportError:  # Windows: no claims
    fcntl = None  # type: ignore[assignment]

#: Seconds between two touches of a held claim.
HEARTBEAT_S = 10.0
#: A claim untouched this long is not waited for, even while its lock is held.
TIMEOUT_S = 600.0
#: Seconds between two looks at the blocks another run is embedding.
POLL_S = 0.5

_log = logging.getLogger("taxamap")


def _who(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data) if data else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class BlockClaims:
    """The claims one run holds on one store's blocks. A context manager: leaving it gives every
    claim up. ``label`` (the modality) starts its messages."""

    def __init__(self, location: str, label: str = "store"):
        self.folder: Path | None = beside(str(location), ".claims") if fcntl is not None else None
        self.label = label
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "BlockClaims":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _path(self, block: int) -> Path:
        return self.folder / str(block)

    def take(self, block: int) -> bool:
        """Claim ``block``: True when this run may compute it (claimed, or this store has no
        claims), False while another live run holds it."""
        if self.folder is None or block in self._held:
            return True
        path = self._path(block)
        for _ in range(8):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # another run removed the empty folder meanwhile
                continue
            except OSError:  # a read-only cache: runs there cannot share, but still work
                self.folder = None
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                quiet = time.time() - os.fstat(fd).st_mtime
                os.close(fd)
                if quiet <= TIMEOUT_S:
                    return False
                # Held, but its holder has stopped beating (stopped, hung): not waited for.
                _log.info(f"{self.label}: block {block + 1} is claimed by {_who(holder)}, silent "
                          f"for {quiet / 60:.0f} min; computing it here")
                return True
            except OSError:  # no flock on this file system
                os.close(fd)
                self.folder = None
                return True
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder finished and removed it while we were opening it
                os.close(fd)
                continue
            previous = _read(fd)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            with self._lock:
                self._held[block] = fd
            self._start_heartbeat()
            if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (
                    me["pid"], me["host"]):
                # A released claim is removed: one left behind is a run that ended mid-block.
                _log.info(f"{self.label}: block {block + 1} was claimed by {_who(previous)}, "
                          "which ended without finishing it; taking it over")
            return True
        return True

    def release(self, block: int) -> None:
        """Give the claim on ``block`` up (its file goes, then its lock)."""
        with self._lock:
            fd = self._held.pop(block, None)
            if fd is None:
                return
            try:
                if os.fstat(fd).st_ino == os.stat(self._path(block)).st_ino:
                    os.unlink(self._path(block))
            except OSError:
                pass
            os.close(fd)

    def close(self) -> None:
        """Give every claim up, stop the heartbeat, and remove the folder if no claim is left."""
        for block in list(self._held):
            self.release(block)
        self._stop.set()
        if self.folder is not None:
            try:
                self.folder.rmdir()
            except OSError:  # another run's claims are in it (or it is gone already)
                pass

    def holder(self, block: int) -> dict | None:
        """Who else holds ``block`` (``pid``, ``host``, ``since``, and ``quiet_s``: seconds since
        its last heartbeat), or None when nobody else does."""
        if self.folder is None or block in self._held:
            return None
        try:
            fd = os.open(self._path(block), os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                info["quiet_s"] = time.time() - os.fstat(fd).st_mtime
                return info
            except OSError:
                return None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _start_heartbeat(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._beating, name="taxamap-claims", daemon=True)
            self._beat.start()

    def _beating(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:  # release() closes descriptors under the same lock
                for fd in self._held.values():
                    try:
                        os.utime(fd)
                    except OSError:
                        pass


def wait_for_blocks(store: EmbeddingStore, claims: BlockClaims, blocks: list[int]) -> list[int]:
    """Wait while other runs embed ``blocks``, checking each block in full as it lands. Returns
    the blocks this run must compute after all (empty once every one landed sound): those whose
    claim ended without the block finished, those that landed damaged, and those whose holder
    has been silent for :data:`TIMEOUT_S`."""
    left = sorted(set(blocks))
    announced = False
    while True:
        mine: list[int] = []
        released: list[int] = []
        landed = store.finished(left)
        for b in list(left):
            if b in landed:
                left.remove(b)
                problem = store.verify_block(b)
                if problem is not None:
                    store.forget({b: problem})
                    _log.info(f"{damage_summary(store.location, {b: problem}, store.n_chunks)}; "
                              "embedding it here")
                    mine.append(b)
                continue
            holder = claims.holder(b)
            if holder is None:
                released.append(b)
            elif holder["quiet_s"] > TIMEOUT_S:
                left.remove(b)
                mine.append(b)
        # A claim given up since the flags were read is a block written meanwhile (its run
        # writes, then releases) or one its run dropped: one more look at the flags tells which.
        if released:
            written = store.finished(released)
            for b in released:
                if b not in written:
                    left.remove(b)
                    mine.append(b)  # the written ones are checked next round
        if mine or not left:
            return mine
        if not announced:
            holders = {_who(h) for h in (claims.holder(b) for b in left) if h}
            them = "it" if len(left) == 1 else "them"
            _log.info(f"{claims.label}: {len(left):,} of {store.n_chunks:,} blocks are being "
                      f"embedded by another run ({', '.join(sorted(holders))}); waiting for {them}")
            announced = True
        time.sleep(POLL_S)
