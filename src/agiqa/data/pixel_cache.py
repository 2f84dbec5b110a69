"""Decoded pixels kept across runs and processes, by the sha256 of the image file's bytes.

Stage two decodes every image once per process and resizes it to the model's uint8 224×224
input. The pixel cache keeps that result, so a second ``fit`` or ``evaluate`` on the same images
(another seed, another split, an ablation) only reads and hashes the files: it decodes none.

* **Key**: the sha256 of the file's bytes, so an image rewritten at the same path is a new key
  and its old pixels are never used for it.
* **Layout**: ``$AGIQA_HOME/pixels/224/<first two hex digits>/<sha256>.u8``: the 32 bytes of the
  image's sha256, the 150,528 bytes of ``uint8 [3, 224, 224]``, then the CRC-32 of both
  (4 bytes, little-endian): **147 KiB per image** (AGIQA-3K: 2,982 images, 428 MiB).
* **Bound to its image**: the entry holds the sha256 of the bytes it was decoded from, so an
  entry copied or renamed over another image's name is not used for that image.
* **Checked on read**: only a regular file is opened (a FIFO at an entry's name is never waited
  on) and at most one entry's length is read; a file of another length, of another image's
  hash, or whose CRC-32 does not match is not used (the image is decoded again and the file
  rewritten). Writes are atomic.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch

from agiqa.data.pixels import INPUT_SIZE
from agiqa.fileio import agiqa_home, atomic_path, read_regular

__all__ = ["ENTRY_BYTES", "PIXEL_BYTES", "PixelCache"]

PIXEL_BYTES = 3 * INPUT_SIZE * INPUT_SIZE
_DIGEST = 32
ENTRY_BYTES = _DIGEST + PIXEL_BYTES + 4  # the image's sha256, the pixels, their CRC-32


class PixelCache:
    """uint8 [3, 224, 224] pixels by the sha256 of the bytes they were decoded from."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else \
            agiqa_home() / "pixels" / str(INPUT_SIZE)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.folder / sha256[:2] / f"{sha256}.u8"

    def get(self, sha256: str) -> torch.Tensor | None:
        """The pixels of the image whose bytes hash to ``sha256``; None when absent, damaged
        or unreadable."""
        path = self._path(sha256)
        try:
            data = read_regular(path, ENTRY_BYTES, "pixel-cache entry")
        except (OSError, ValueError):
            return None
        if len(data) != ENTRY_BYTES or data[:_DIGEST] != bytes.fromhex(sha256):
            return None
        body = data[:-4]
        if zlib.crc32(body).to_bytes(4, "little") != data[-4:]:
            return None
        arr = np.frombuffer(body, np.uint8, offset=_DIGEST).reshape(3, INPUT_SIZE, INPUT_SIZE)
        return torch.from_numpy(arr.copy())

    def put(self, sha256: str, pixels: torch.Tensor) -> None:
        """Keep ``pixels`` (uint8 [3, 224, 224]); a write that fails is skipped, not fatal: the
        cache only saves decoding time."""
        if pixels.dtype != torch.uint8 or tuple(pixels.shape) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"expected uint8 [3, {INPUT_SIZE}, {INPUT_SIZE}] pixels, got "
                             f"{pixels.dtype} {list(pixels.shape)}")
        path = self._path(sha256)
        body = bytes.fromhex(sha256) + pixels.contiguous().numpy().tobytes()
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(body + zlib.crc32(body).to_bytes(4, "little"))
        except OSError:
            pass
