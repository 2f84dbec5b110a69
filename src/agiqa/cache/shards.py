"""Shard files: one Zarr group or HDF5 file per shard, written whole and published atomically.

A shard holds ``keys`` (str), ``sha256`` (str, of the file bytes), ``vectors`` float16
[n, P, D], ``zero_shot`` float32 [n, P] and the failures of that shard as (key, reason) pairs.
Arrays are written in one contiguous slice each and read whole: one call per array, never one
per sample.

Integrity: the shard's metadata, written last, records a checksum of every array (and of the
failure list); every read checks what it read against it, so a missing chunk (which Zarr would
serve as zeros, its fill value), a truncated or damaged one, is an error, never data. Small
arrays carry a CRC-32; the vectors, read at disk speed, carry a position-weighted sum of their
64-bit words (two sums over 32 KiB blocks and the byte length; about 60 GB/s in numpy, where
CRC-32 runs at 3): any changed word, a zeroed or moved block, a short read all change it.

Replacement: a shard is written whole beside the old one and then takes its name atomically
(HDF5: the file is renamed over the old one; Zarr: the name is a symbolic link to a version
folder, and a new link is renamed over it); the old version is removed only afterwards, so the
shard's name is never absent. A reader reads one version; if a writer removed it under the
reader, the reader looks again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agiqa.cache.checksums import (
    array_crc,
    failures_crc,
    require_checksum,
    text_crc,
    vector_checksum,
)
from agiqa.cache.versions import (
    DATA,
    link_version,
    prune_versions,
    resolve_shard,
    shard_identity,
    shard_name,
    version_names,
)
from agiqa.errors import CacheError
from agiqa.fileio import atomic_path, remove_path, temporary_sibling

__all__ = ["FORMATS", "ShardData", "check_shard", "checksums_of", "named_by_link",
           "prune_versions", "publish_shard", "read_shard", "read_shard_index", "read_shard_keys",
           "read_shard_vectors_into", "resolve_shard", "shard_identity", "shard_name",
           "shard_suffix", "vector_checksum", "version_names", "write_shard"]

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
    checksums: dict[str, str] = field(default_factory=dict)  # as recorded in the shard

    def __post_init__(self) -> None:
        n = len(self.keys)
        if len(self.sha256) != n or self.vectors.shape[0] != n or self.zero_shot.shape[0] != n:
            raise ValueError("keys, sha256, vectors and zero_shot must have one row per image")


# -- checksums ---------------------------------------------------------------------------------
def checksums_of(data: ShardData) -> dict[str, str]:
    return {"keys": text_crc(data.keys), "sha256": text_crc(data.sha256),
            "vectors": vector_checksum(data.vectors),
            "zero_shot": array_crc(data.zero_shot, "f4"),
            "failures": failures_crc(data.failures)}


# -- writing -----------------------------------------------------------------------------------
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
    # Written last: a shard whose metadata lacks its checksums was never finished.
    g.attrs.update({"failures": [list(f) for f in data.failures],
                    "checksums": checksums_of(data)})


def _write_hdf5(path: Path, data: ShardData) -> None:
    import h5py

    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=np.array(data.keys, dtype=object), dtype=str_dt)
        f.create_dataset("sha256", data=np.array(data.sha256, dtype=object), dtype=str_dt)
        f.create_dataset("vectors", data=data.vectors.astype(np.float16))
        f.create_dataset("zero_shot", data=data.zero_shot.astype(np.float32))
        f.attrs["failures"] = json.dumps([list(x) for x in data.failures])
        f.attrs["checksums"] = json.dumps(checksums_of(data))


def write_shard(path: str | os.PathLike, data: ShardData, fmt: str) -> None:
    """Write a shard to a temporary name and rename it into place (atomic)."""
    with atomic_path(path, is_dir=(fmt == "zarr")) as tmp:
        (_write_zarr if fmt == "zarr" else _write_hdf5)(tmp, data)


def publish_shard(folder: Path, name: str, data: ShardData, fmt: str) -> Path:
    """Write ``data`` as shard ``name``, replacing any older version atomically.

    Never deletes first: the new version is complete beside the old one before the name moves
    to it, and only then is the old one removed.
    """
    link = folder / f"{name}{shard_suffix(fmt)}"
    tmp = temporary_sibling(link)
    try:
        (_write_zarr if fmt == "zarr" else _write_hdf5)(tmp, data)
        if fmt == "hdf5":
            os.replace(tmp, link)
            return link
        while not link_version(tmp, link, name):
            # A concurrent writer removed our version before our link landed: write it again.
            (_write_zarr)(tmp, data)
    except BaseException:
        remove_path(tmp)
        raise
    return link


# -- reading -----------------------------------------------------------------------------------
def _fmt_of(path: Path) -> str:
    return "zarr" if path.name.endswith((".zarr", f".zarr{DATA}")) else "hdf5"


def _decode(items: Any) -> list[str]:
    return [k.decode() if isinstance(k, bytes) else str(k) for k in items]


def _open_meta(path: Path) -> tuple[Any, dict[str, str], list[tuple[str, str]], Any]:
    """(group or file, checksums, failures, closer) of a shard."""
    if not path.exists():
        raise FileNotFoundError(path)
    if _fmt_of(path) == "zarr":
        import zarr

        g = zarr.open_group(str(path), mode="r")
        attrs = g.attrs.asdict()
        return g, dict(attrs.get("checksums") or {}), \
            [tuple(f) for f in attrs.get("failures", [])], None
    import h5py

    f = h5py.File(path, "r")
    checksums = json.loads(f.attrs.get("checksums", "{}"))
    return f, checksums, [tuple(x) for x in json.loads(f.attrs.get("failures", "[]"))], f


def _damaged(path: Path, e: Exception) -> CacheError:
    return CacheError(f"{path}: unreadable shard ({type(e).__name__}: {e})")


def read_shard_index(path: str | os.PathLike
                     ) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    """The keys, failures and recorded checksums of a shard (keys and failures checked)."""
    path = Path(path)
    fast = _zarr_raw_index(path) if _fmt_of(path) == "zarr" else None
    if fast is not None:
        keys, failures, checksums = fast
    else:
        keys, failures, checksums = _read_index(path)
    require_checksum(path, "keys", checksums, text_crc(keys))
    require_checksum(path, "failures", checksums, failures_crc(failures))
    return keys, failures, checksums


def _read_index(path: Path) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    closer = None
    try:
        g, checksums, failures, closer = _open_meta(path)
        return _decode(g["keys"][:]), failures, checksums
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged shard
        raise _damaged(path, e) from None
    finally:
        if closer is not None:
            closer.close()


def read_shard_keys(path: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """The keys and failures of a shard, checked against its checksums, without its vectors."""
    keys, failures, _ = read_shard_index(path)
    return keys, failures


def _zarr_raw_index(path: Path
                    ) -> tuple[list[str], list[tuple[str, str]], dict[str, str]] | None:
    """Keys, failures and checksums of a Zarr shard whose keys are one uncompressed
    ``vlen-utf8`` chunk (how agiqa writes them), parsed without importing zarr (whose import
    costs more than reading a whole cache); None for any other layout, which zarr then reads."""
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
        attrs = group.get("attributes", {})
        failures = [tuple(f) for f in attrs.get("failures", [])]
        checksums = dict(attrs.get("checksums") or {})
        if n == 0:
            return [], failures, checksums
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
    return (keys, failures, checksums) if at == len(raw) else None


def read_shard(path: str | os.PathLike, vectors: bool = True) -> ShardData:
    """Read a whole shard, every array in one call and checked against its checksum
    (``vectors=False``: all but the vectors, which :func:`read_shard_vectors_into` then reads
    straight into the caller's array, checked against ``checksums["vectors"]``)."""
    path = Path(path)
    closer = None
    try:
        g, checksums, failures, closer = _open_meta(path)
        zero_shot = np.asarray(g["zero_shot"][:], dtype=np.float32)
        keys, sha = _decode(g["keys"][:]), _decode(g["sha256"][:])
        vec = None
        if vectors:
            vec = np.empty((len(keys), *g["vectors"].shape[1:]), np.float16)
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _damaged(path, e) from None
    finally:
        if closer is not None:
            closer.close()
    for what, got in (("keys", text_crc(keys)), ("sha256", text_crc(sha)),
                      ("zero_shot", array_crc(zero_shot, "f4")),
                      ("failures", failures_crc(failures))):
        require_checksum(path, what, checksums, got)
    if vec is not None:
        read_shard_vectors_into(path, vec, checksums.get("vectors"))
    return ShardData(keys=keys, sha256=sha, zero_shot=zero_shot, failures=failures,
                     checksums=checksums,
                     vectors=vec if vec is not None else np.empty((len(keys), 0, 0), np.float16))


_RAW_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]
_DEFAULT_KEYS = {"name": "default", "configuration": {"separator": "/"}}


def _zarr_single_raw_chunk(array: Path, out: np.ndarray) -> Path | None:
    """The file of a Zarr v3 array kept as one uncompressed little-endian chunk of exactly
    ``out``'s shape and type (how agiqa writes vectors), else None. A missing or short chunk
    file is an error here: Zarr would serve its fill value (zeros) instead."""
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
    if not ok or out.size == 0:
        return None
    chunk = array.joinpath("c", *["0"] * len(shape))
    if not chunk.is_file():
        raise CacheError(f"{array.parent}: the vector chunk {chunk.name} is missing")
    if chunk.stat().st_size != out.nbytes:
        raise CacheError(f"{array.parent}: the vector chunk is truncated "
                         f"({chunk.stat().st_size} of {out.nbytes} bytes)")
    return chunk


def _read_whole(chunk: Path, out: np.ndarray) -> None:
    with open(chunk, "rb", buffering=0) as f:
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise CacheError(f"{chunk}: truncated vector chunk")


def read_shard_vectors_into(path: str | os.PathLike, out: np.ndarray,
                            expected: str | None = None) -> None:
    """Read a shard's vectors into ``out`` (float16 [n, P, D]) with no extra copy and check
    them against the shard's checksum (``expected``, else read from the shard): one
    ``readinto`` per block of the raw chunk for agiqa's Zarr shards, ``read_direct`` for HDF5."""
    path = Path(path)
    try:
        if expected is None:
            _, checksums, _, closer = _open_meta(path)
            if closer is not None:
                closer.close()
            expected = checksums.get("vectors")
        direct = out.flags.c_contiguous and out.dtype == np.float16
        if _fmt_of(path) == "zarr":
            chunk = _zarr_single_raw_chunk(path / "vectors", out) if direct else None
            if chunk is not None:
                _read_whole(chunk, out)
            else:
                import zarr

                out[...] = zarr.open_group(str(path), mode="r")["vectors"][:]
        else:
            import h5py

            with h5py.File(path, "r") as f:
                ds = f["vectors"]
                if ds.shape != out.shape:
                    raise CacheError(f"{path}: vectors of shape {ds.shape}, expected {out.shape}")
                if direct and ds.dtype == out.dtype and out.size:
                    ds.read_direct(out)
                else:
                    out[...] = ds[:]
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _damaged(path, e) from None
    recorded = {"vectors": expected} if expected else {}
    require_checksum(path, "vectors", recorded, vector_checksum(out))


def named_by_link(error: CacheError, path: Path) -> CacheError:
    """``error`` with the version folder it names replaced by the shard's own name ``path``."""
    try:
        version = str(resolve_shard(path))
    except OSError:
        return error
    if version == str(path) or version not in str(error):
        return error
    return CacheError(str(error).replace(version, str(path)))


def check_shard(path: str | os.PathLike) -> str | None:
    """Read a whole shard (one version) and check every array: None if it is whole, else the
    reason."""
    path = Path(path)
    try:
        read_shard(resolve_shard(path))
    except OSError as e:
        return f"{path}: unreadable shard ({e})"
    except CacheError as e:
        return str(named_by_link(e, path))
    return None
