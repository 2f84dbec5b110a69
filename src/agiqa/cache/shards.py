"""Shard files: one Zarr group or HDF5 file per shard, written whole and renamed into place.

A shard holds ``keys`` (str), ``sha256`` (str, of the file bytes), ``vectors`` float16
[n, P, D], ``zero_shot`` float32 [n, P] and the failures of that shard as (key, reason) pairs.
Arrays are written in one contiguous slice each and read whole: one call per array, never one
per sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agiqa.errors import CacheError
from agiqa.fileio import atomic_path

__all__ = ["FORMATS", "ShardData", "read_shard", "read_shard_keys", "read_shard_vectors_into",
           "shard_suffix", "write_shard"]

FORMATS = ("zarr", "hdf5")
_SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


def shard_suffix(fmt: str) -> str:
    return _SUFFIX[fmt]


@dataclass
class ShardData:
    keys: list[str]
    sha256: list[str]
    vectors: np.ndarray  # float16 [n, P, D]
    zero_shot: np.ndarray  # float32 [n, P]
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if len(self.sha256) != n or self.vectors.shape[0] != n or self.zero_shot.shape[0] != n:
            raise ValueError("keys, sha256, vectors and zero_shot must have one row per image")


def _write_zarr(path: Path, data: ShardData) -> None:
    import zarr

    g = zarr.open_group(str(path), mode="w")
    n, p, d = data.vectors.shape
    rows = max(n, 1)
    for name, arr, chunks in (
        ("keys", np.array(data.keys, dtype=str), (rows,)),
        ("sha256", np.array(data.sha256, dtype=str), (rows,)),
        ("vectors", data.vectors.astype(np.float16), (rows, p, d)),
        ("zero_shot", data.zero_shot.astype(np.float32), (rows, p)),
    ):
        dtype = str if arr.dtype.kind == "U" else arr.dtype
        # Hidden-state means are noise to a compressor: store the vectors raw, read at disk speed.
        # The keys are stored raw too, so the index is read without importing zarr.
        kw = {"compressors": None} if name in ("vectors", "keys") else {}
        a = g.create_array(name, shape=arr.shape, dtype=dtype, chunks=chunks, **kw)
        if n:
            a[:] = arr
    g.attrs["failures"] = [list(f) for f in data.failures]


def _write_hdf5(path: Path, data: ShardData) -> None:
    import h5py

    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=np.array(data.keys, dtype=object), dtype=str_dt)
        f.create_dataset("sha256", data=np.array(data.sha256, dtype=object), dtype=str_dt)
        f.create_dataset("vectors", data=data.vectors.astype(np.float16))
        f.create_dataset("zero_shot", data=data.zero_shot.astype(np.float32))
        f.attrs["failures"] = json.dumps([list(x) for x in data.failures])


def write_shard(path: str | os.PathLike, data: ShardData, fmt: str) -> None:
    """Write a shard to a temporary name and rename it into place (atomic)."""
    with atomic_path(path, is_dir=(fmt == "zarr")) as tmp:
        (_write_zarr if fmt == "zarr" else _write_hdf5)(tmp, data)


def _fmt_of(path: Path) -> str:
    return "zarr" if path.suffix == ".zarr" else "hdf5"


def read_shard_keys(path: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """The keys and failures of a shard, without reading its vectors."""
    path = Path(path)
    try:
        if _fmt_of(path) == "zarr":
            fast = _zarr_raw_keys(path)
            if fast is not None:
                return fast
            import zarr

            g = zarr.open_group(str(path), mode="r")
            return [str(k) for k in g["keys"][:]], [tuple(f) for f in g.attrs.get("failures", [])]
        import h5py

        with h5py.File(path, "r") as f:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][:]]
            return keys, [tuple(x) for x in json.loads(f.attrs.get("failures", "[]"))]
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged shard
        raise CacheError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None


def _zarr_raw_keys(path: Path) -> tuple[list[str], list[tuple[str, str]]] | None:
    """Keys and failures of a Zarr shard whose keys are one uncompressed ``vlen-utf8`` chunk
    (how agiqa writes them), parsed without importing zarr (whose import costs more than
    reading a whole cache); None for any other layout, which zarr then reads."""
    try:
        group = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        meta = json.loads((path / "keys" / "zarr.json").read_text(encoding="utf-8"))
        n = meta["shape"][0]
        if (meta.get("zarr_format") != 3 or meta.get("data_type") != "string"
                or meta.get("codecs") != [{"name": "vlen-utf8", "configuration": {}}]
                or meta["chunk_grid"]["configuration"]["chunk_shape"] != [max(n, 1)]
                or meta.get("chunk_key_encoding") != _DEFAULT_KEYS
                or meta.get("storage_transformers")):
            return None
        failures = [tuple(f) for f in group.get("attributes", {}).get("failures", [])]
        if n == 0:
            return [], failures
        raw = (path / "keys" / "c" / "0").read_bytes()
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if len(raw) < 4 or int.from_bytes(raw[:4], "little") != n:
        return None
    keys, at = [], 4
    for _ in range(n):
        size = int.from_bytes(raw[at : at + 4], "little")
        keys.append(raw[at + 4 : at + 4 + size].decode("utf-8"))
        at += 4 + size
    return (keys, failures) if at == len(raw) else None


def read_shard(path: str | os.PathLike, vectors: bool = True) -> ShardData:
    """Read a whole shard: every array in one call (``vectors=False``: all but the vectors,
    which :func:`read_shard_vectors_into` then reads straight into the caller's array)."""
    path = Path(path)
    try:
        if _fmt_of(path) == "zarr":
            import zarr

            g = zarr.open_group(str(path), mode="r")
            zero_shot = np.asarray(g["zero_shot"][:])
            return ShardData(
                keys=[str(k) for k in g["keys"][:]],
                sha256=[str(k) for k in g["sha256"][:]],
                vectors=np.asarray(g["vectors"][:]) if vectors else
                np.empty((len(zero_shot), 0, 0), np.float16),
                zero_shot=zero_shot,
                failures=[tuple(f) for f in g.attrs.get("failures", [])],
            )
        import h5py

        with h5py.File(path, "r") as f:
            dec = (lambda a: [k.decode() if isinstance(k, bytes) else str(k) for k in a])
            zero_shot = f["zero_shot"][:]
            return ShardData(
                keys=dec(f["keys"][:]),
                sha256=dec(f["sha256"][:]),
                vectors=f["vectors"][:] if vectors else
                np.empty((len(zero_shot), 0, 0), np.float16),
                zero_shot=zero_shot,
                failures=[tuple(x) for x in json.loads(f.attrs.get("failures", "[]"))],
            )
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CacheError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None


_RAW_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]
_DEFAULT_KEYS = {"name": "default", "configuration": {"separator": "/"}}


def _zarr_single_raw_chunk(array: Path, out: np.ndarray) -> Path | None:
    """The file of a Zarr v3 array kept as one uncompressed little-endian chunk of exactly
    ``out``'s shape and type (how agiqa writes vectors), else None."""
    import sys

    try:
        meta = json.loads((array / "zarr.json").read_text(encoding="utf-8"))
        shape = meta["shape"]
        ok = (meta.get("zarr_format") == 3 and meta.get("codecs") == _RAW_CODECS
              and meta["chunk_grid"]["configuration"]["chunk_shape"] == shape
              and meta.get("chunk_key_encoding") == _DEFAULT_KEYS
              and not meta.get("storage_transformers") and sys.byteorder == "little"
              and list(out.shape) == shape and np.dtype(meta["data_type"]) == out.dtype)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    chunk = array.joinpath("c", *["0"] * len(shape))
    if not ok or not chunk.is_file() or chunk.stat().st_size != out.nbytes:
        return None
    return chunk


def read_shard_vectors_into(path: str | os.PathLike, out: np.ndarray) -> None:
    """Read a shard's vectors into ``out`` (C-contiguous float16 [n, P, D]) with no extra copy:
    one ``readinto`` of the raw chunk for agiqa's Zarr shards, ``read_direct`` for HDF5."""
    path = Path(path)
    try:
        if _fmt_of(path) == "zarr":
            chunk = _zarr_single_raw_chunk(path / "vectors", out) if out.flags.c_contiguous \
                else None
            if chunk is not None:
                with open(chunk, "rb") as f:
                    if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                        raise CacheError(f"{chunk}: truncated vector chunk")
                return
            import zarr

            out[...] = zarr.open_group(str(path), mode="r")["vectors"][:]
            return
        import h5py

        with h5py.File(path, "r") as f:
            ds = f["vectors"]
            if ds.shape != out.shape:
                raise CacheError(f"{path}: vectors of shape {ds.shape}, expected {out.shape}")
            if out.flags.c_contiguous and ds.dtype == out.dtype:
                ds.read_direct(out)
            else:
                out[...] = ds[:]
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CacheError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
