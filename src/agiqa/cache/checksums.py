"""Checksums of shard arrays: CRC-32 for the small ones, a position-weighted 64-bit sum for the
vectors (about 60 GB/s in numpy, where CRC-32 runs at 3, so reads stay at disk speed): any
changed word, a zeroed or moved block, a short read all change it."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from agiqa.errors import CacheError

__all__ = ["array_crc", "failures_crc", "require_checksum", "text_crc", "vector_checksum"]


def _crc(data: np.ndarray, value: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(data).reshape(-1).view(np.uint8), value)


def _fmt_crc(value: int) -> str:
    return f"crc32:{value & 0xFFFFFFFF:08x}"


def text_crc(items: list[str]) -> str:
    # NUL never occurs in a path or a hex digest: an unambiguous separator.
    return _fmt_crc(zlib.crc32("\0".join(items).encode("utf-8")))


def array_crc(arr: np.ndarray, dtype: str) -> str:
    return _fmt_crc(_crc(np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<"))))


_SUM_BLOCK = 4096  # 64-bit words per block: 32 KiB


def vector_checksum(arr: np.ndarray) -> str:
    """``sum64:<bytes>:<s1>:<s2>`` of the little-endian float16 bytes of ``arr``: s1 the sum of
    its 64-bit words, s2 the sum of its 32 KiB block sums weighted by block number (mod 2**64)."""
    b = np.ascontiguousarray(arr, dtype="<f2").reshape(-1).view(np.uint8)
    full = b.size // (8 * _SUM_BLOCK) * (8 * _SUM_BLOCK)
    blocks = b[:full].view(np.uint64).reshape(-1, _SUM_BLOCK).sum(1, dtype=np.uint64)
    tail = b[full:]
    if tail.size:
        padded = np.zeros(-(-tail.size // 8) * 8, np.uint8)
        padded[: tail.size] = tail
        blocks = np.append(blocks, padded.view(np.uint64).sum(dtype=np.uint64))
    weights = np.arange(1, blocks.size + 1, dtype=np.uint64)
    s1 = int(blocks.sum(dtype=np.uint64))
    s2 = int((blocks * weights).sum(dtype=np.uint64))
    return f"sum64:{b.size:x}:{s1:016x}:{s2:016x}"


def failures_crc(failures: list[tuple[str, str]]) -> str:
    return _fmt_crc(zlib.crc32(json.dumps([list(f) for f in failures]).encode("utf-8")))


def require_checksum(path: Path, what: str, expected: dict[str, str], got: str) -> None:
    if what not in expected:
        raise CacheError(f"{path}: the shard records no checksum of its {what} (written by an "
                         "older agiqa or cut short); rerun extract-semantics to rebuild it")
    if expected[what] != got:
        raise CacheError(f"{path}: the shard's {what} fail their checksum (a chunk is missing, "
                         "truncated or damaged); rerun extract-semantics to rebuild it")
