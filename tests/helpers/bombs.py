"""Small files that declare huge work: what the decoders must refuse from the header.

    png_bomb(path, 12000, 12000)   # 1.9 MB on disk, 432 MB of RGB once decoded
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_bomb(path: Path, width: int, height: int, level: int = 1) -> Path:
    """A valid 8-bit RGB PNG of ``width`` x ``height`` black pixels, written row by row (the
    test never holds the decoded image): zlib ``level`` 1 makes 12000 x 12000 a 1.9 MB file in
    ~1.4 s, level 9 a 0.42 MB file in ~3.6 s."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = bytes(1 + 3 * width)  # filter byte 0, then black pixels
    packer = zlib.compressobj(6)
    idat = bytearray()
    for _ in range(height):
        idat += packer.compress(row)
    idat += packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(idat))
                     + chunk(b"IEND", b""))
    return path
