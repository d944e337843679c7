"""Prompt embeddings of reference panels, computed once per text model and kept in the cache.

One bank per text encoder revision (its ``ref``, ``repo@revision``) at
``<cache>/panels/<ref hash>/prompts.npz``: the prompts it holds and their unit-norm float32
embeddings, with a CRC-32 of both. Any panel's prompts are looked up there; the missing ones are
embedded (with a progress bar when there are many: the first use of the default panel embeds
its 2,435 prompts) and the bank is rewritten atomically with them. A bank that cannot be read or
fails its CRC is set aside with one line and its prompts embedded again: a damaged cache is
never trusted. Two runs adding prompts at once each write a complete bank; the last one wins and
the other's new prompts are embedded again the next time they are needed.

A species of a panel therefore needs no text encoding once its panel was embedded:
:func:`cached_vectors` answers it from the bank without loading the text encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from taxamap.errors import TaxamapError

_log = logging.getLogger("taxamap")

#: Bump when the bank's layout changes: older banks are then left alone and rebuilt.
BANK_FORMAT = 1

#: Prompts embedded per step of the progress bar.
ENCODE_BATCH = 64

#: Embedding this many prompts or more shows a progress bar.
PROGRESS_MIN = 200


def bank_path(ref: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the prompt bank of the text encoder ``ref`` lives in the cache."""
    from taxamap.paths import cache_subdir

    tag = hashlib.sha1(ref.encode("utf-8")).hexdigest()[:16]
    return cache_subdir("panels", cache_dir) / tag / "prompts.npz"


def _checksum(prompts: np.ndarray, vectors: np.ndarray) -> int:
    crc = zlib.crc32("\n".join(prompts.tolist()).encode("utf-8"))
    return zlib.crc32(np.ascontiguousarray(vectors, dtype="<f4").tobytes(), crc)


@dataclass
class PromptBank:
    """The prompt embeddings of one text encoder (``ref``) held in memory: ``prompts`` (P,)
    and ``vectors`` (P, D) float32, with ``row`` prompt -> index."""

    ref: str
    prompts: list[str]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        self.row = {p: i for i, p in enumerate(self.prompts)}

    def get(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """(vectors of ``prompts`` (len, D), NaN rows where missing; indices of the missing)."""
        dim = self.vectors.shape[1] if self.vectors.ndim == 2 and self.vectors.shape[1] else 0
        out = np.full((len(prompts), dim), np.nan, dtype=np.float32)
        missing = []
        for i, prompt in enumerate(prompts):
            j = self.row.get(prompt)
            if j is None:
                missing.append(i)
            else:
                out[i] = self.vectors[j]
        return out, missing

    def add(self, prompts: Sequence[str], vectors: np.ndarray) -> None:
        fresh = [(p, v) for p, v in zip(prompts, vectors) if p not in self.row]
        if not fresh:
            return
        extra = np.stack([v for _, v in fresh]).astype(np.float32)
        self.vectors = extra if not self.prompts else np.concatenate([self.vectors, extra])
        for p, _ in fresh:
            self.row[p] = len(self.prompts)
            self.prompts.append(p)


def read_bank(ref: str, cache_dir: str | os.PathLike | None = None) -> PromptBank:
    """The bank of ``ref`` as on disk; an empty one when there is none, or when the file is
    damaged (unreadable, another encoder's, failing its CRC), which is said in one line."""
    path = bank_path(ref, cache_dir)
    empty = PromptBank(ref, [], np.zeros((0, 0), dtype=np.float32))
    if not path.exists():
        return empty
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            prompts = data["prompts"]
            vectors = np.asarray(data["vectors"], dtype=np.float32)
        problem = None
        if meta.get("format") != BANK_FORMAT or meta.get("ref") != ref:
            problem = "it belongs to another text encoder or format"
        elif vectors.ndim != 2 or vectors.shape[0] != prompts.shape[0]:
            problem = "its arrays disagree in shape"
        elif _checksum(prompts, vectors) != int(meta.get("crc32", -1)):
            problem = "checksum mismatch"
    except Exception as exc:  # noqa: BLE001 - a damaged file is any failure to read it
        problem = f"unreadable ({type(exc).__name__})"
    if problem is not None:
        _log.warning(f"panel prompt cache {path} is damaged ({problem}); embedding its prompts "
                     "again")
        return empty
    return PromptBank(ref, [str(p) for p in prompts.tolist()], vectors)


def write_bank(bank: PromptBank, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Write ``bank`` atomically; a cache that cannot be written costs only a repeat embedding
    next time (one line says so), so it is not an error."""
    from taxamap.io import DiskFull, atomic_path

    path = bank_path(bank.ref, cache_dir)
    prompts = np.asarray(bank.prompts, dtype=str)
    vectors = np.ascontiguousarray(bank.vectors, dtype=np.float32)
    meta = json.dumps({"format": BANK_FORMAT, "ref": bank.ref,
                       "crc32": _checksum(prompts, vectors), "count": len(bank.prompts)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, what=f"writing the panel prompt cache {path}") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, meta=np.asarray(meta), prompts=prompts, vectors=vectors)
    except (OSError, DiskFull) as exc:
        _log.warning(f"could not cache panel prompt embeddings in {path.parent} ({exc})")
        return None
    return path


_LOCK = threading.Lock()


def embed_prompts(prompts: Sequence[str], encoder, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, what: str = "panel") -> np.ndarray:
    """Unit-norm float32 (len(prompts), D) embeddings of ``prompts`` by the text ``encoder``
    (anything with ``.ref`` and ``.encode_text``), from the bank where it has them; the others
    are embedded (a progress bar from :data:`PROGRESS_MIN` prompts on) and added to the bank."""
    prompts = list(prompts)
    with _LOCK:
        bank = read_bank(encoder.ref, cache_dir)
        vectors, missing = bank.get(prompts)
        if not missing:
            return vectors
        todo = list(dict.fromkeys(prompts[i] for i in missing))
        fresh = _encode(todo, encoder, progress and len(todo) >= PROGRESS_MIN, what)
        bank.add(todo, fresh)
        write_bank(bank, cache_dir)
        done, still = bank.get(prompts)
        if still:  # pragma: no cover - the bank was just given every prompt
            raise TaxamapError("internal error: prompts missing from the panel cache")
        return done


def _encode(prompts: list[str], encoder, progress: bool, what: str) -> np.ndarray:
    import sys

    from tqdm.auto import tqdm

    if not progress:
        return np.asarray(encoder.encode_text(prompts), dtype=np.float32)
    _log.info(f"embedding {len(prompts):,} {what} prompts with {encoder.ref} (once per text "
              "model; kept in the cache)")
    out = []
    with tqdm(total=len(prompts), desc=f"embedding {what} prompts", unit="prompt",
              file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), ENCODE_BATCH):
            chunk = prompts[start:start + ENCODE_BATCH]
            out.append(np.asarray(encoder.encode_text(chunk), dtype=np.float32))
            bar.update(len(chunk))
    return np.concatenate(out)


def cached_vectors(prompts: Sequence[str], ref: str,
                   cache_dir: str | os.PathLike | None = None) -> np.ndarray | None:
    """The bank's embeddings of ``prompts`` for the text encoder ``ref``, or None unless it
    holds every one of them: a panel species' query needs no text encoder at all."""
    vectors, missing = read_bank(ref, cache_dir).get(list(prompts))
    return None if missing else vectors


def text_ref(models_dir: str | os.PathLike | None = None, config: dict | None = None) -> str:
    """``repo@revision`` of the text encoder taxamap would load (the bank's key), found from its
    files without loading its weights."""
    from taxamap.models import hub

    if config is None:
        config, _ = hub.load_config(models_dir)
    repo_id = hub.encoder_repo(config, "clip")
    return hub.resolve(repo_id, hub.REPO_FILES.get(repo_id), models_dir=models_dir).ref


__all__ = ["PromptBank", "bank_path", "cached_vectors", "embed_prompts", "read_bank",
           "text_ref", "write_bank"]
