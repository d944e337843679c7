"""How maps are named: file slugs of queries (one rule for the CLI, the API and the web app)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def slugify(text: str) -> str:
    """'Cardinalis cardinalis' -> 'cardinalis-cardinalis' (safe as a file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:80] or "map"


#: How a map made from a file is named: the modality's word, then the file's name.
FILE_SLUG_PREFIX = {"image": "image", "audio": "sound"}


def file_digest(data: bytes | str | os.PathLike) -> str:
    """SHA-256 (hex) of a query file's bytes (or of the file at a path)."""

    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with open(data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_slug(modality: str, name: str, digest: str) -> str:
    """The file stem of a map made from a photo or a recording, the same in the CLI, the Python
    API and the web app: ``image-bird-1a2b3c4d`` for ``bird.jpg`` (``sound-...`` for a
    recording): the file's name and the first 8 hex digits of its content's SHA-256 (``digest``),
    so bird.jpg and bird.webp, or two bird.jpg from different folders, never share a name, and
    the same photo always gets the same one. Prefixed, so it never names the input itself."""
    return f"{FILE_SLUG_PREFIX[modality]}-{slugify(Path(name).stem)[:60]}-{digest[:8]}"
