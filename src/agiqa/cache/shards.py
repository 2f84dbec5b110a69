"""Shard files: one file per shard, written whole and published atomically.

A shard holds ``keys`` (str), ``sha256`` (str, of the image file bytes), ``vectors`` float16
[n, P, D], ``zero_shot`` float32 [n, P] and the failures of that shard as (key, reason) pairs.
Two formats, each a single file:

* ``shard-<digest>.zarr.zip``: a Zarr v3 group in a zip file (zarr's ``ZipStore``), every array
  one uncompressed chunk (written even when all its values are zero), the failures and the
  checksums in the group's attributes. Any Zarr v3 reader opens it; agiqa reads it with the
  standard library's ``zipfile``: the small arrays decoded from their chunk, the vectors read
  straight into the caller's array with one ``readinto``.
* ``shard-<digest>.h5``: an HDF5 file with the same datasets; failures and checksums are
  attributes.

Integrity: the shard records a checksum of every array (and of the failure list); every read
checks what it read against it, so a missing chunk, a truncated or damaged one, is an error,
never data. Small arrays carry a CRC-32; the vectors, read at disk speed, a position-weighted
sum of their 64-bit words (:mod:`agiqa.cache.checksums`).

Replacement: a shard is written whole to a temporary file beside its name and renamed over it
with ``os.replace``. The name is never absent, a killed writer leaves the old shard, and a
reader reads everything from the one file it opened: a writer replacing the shard meanwhile
never mixes two versions.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import sys
import zipfile
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
from agiqa.errors import CacheError
from agiqa.fileio import JSON_LIMIT, current_umask, temporary_sibling

__all__ = ["FORMATS", "ShardData", "ShardReader", "check_shard", "checksums_of", "open_shard",
           "publish_shard", "read_shard", "read_shard_index", "shard_name", "shard_suffix",
           "write_shard"]

FORMATS = ("zarr", "hdf5")
_SUFFIX = {"zarr": ".zarr.zip", "hdf5": ".h5"}


def shard_suffix(fmt: str) -> str:
    return _SUFFIX[fmt]


def shard_name(path: Path) -> str:
    """``shard-<digest>`` of ``shard-<digest>.zarr.zip`` or ``shard-<digest>.h5``."""
    return path.name.split(".")[0]


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


def checksums_of(data: ShardData) -> dict[str, str]:
    return {"keys": text_crc(data.keys), "sha256": text_crc(data.sha256),
            "vectors": vector_checksum(data.vectors),
            "zero_shot": array_crc(data.zero_shot, "f4"),
            "failures": failures_crc(data.failures)}


# -- writing -----------------------------------------------------------------------------------
def _arrays(data: ShardData) -> list[tuple[str, np.ndarray]]:
    return [("keys", np.array(data.keys, dtype=str)),
            ("sha256", np.array(data.sha256, dtype=str)),
            ("vectors", np.ascontiguousarray(data.vectors, dtype=np.float16)),
            ("zero_shot", np.ascontiguousarray(data.zero_shot, dtype=np.float32))]


def _write_zarr(path: Path, data: ShardData, name: str) -> None:
    import zarr
    from zarr.storage import ZipStore

    store = ZipStore(path, mode="w")
    try:
        # One write per member: the group's metadata, checksums included, comes first.
        group = zarr.create_group(store, attributes={
            "failures": [list(f) for f in data.failures], "checksums": checksums_of(data),
            "shard": name})
        for name, arr in _arrays(data):
            a = group.create_array(
                name, shape=arr.shape, dtype=str if arr.dtype.kind == "U" else arr.dtype,
                chunks=(max(arr.shape[0], 1), *arr.shape[1:]),
                # Raw chunks: hidden-state means are noise to a compressor, and raw chunks are
                # read without zarr. Chunks of zeros are written like any other: a chunk that
                # is absent is damage, never a run of zeros.
                compressors=None, config={"write_empty_chunks": True})
            if arr.shape[0]:
                a[...] = arr
    finally:
        store.close()


def _write_hdf5(path: Path, data: ShardData, name: str) -> None:
    import h5py

    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=np.array(data.keys, dtype=object), dtype=str_dt)
        f.create_dataset("sha256", data=np.array(data.sha256, dtype=object), dtype=str_dt)
        f.create_dataset("vectors", data=np.ascontiguousarray(data.vectors, dtype=np.float16))
        f.create_dataset("zero_shot", data=np.ascontiguousarray(data.zero_shot, np.float32))
        f.attrs["failures"] = json.dumps([list(x) for x in data.failures])
        f.attrs["checksums"] = json.dumps(checksums_of(data))
        f.attrs["shard"] = name


def write_shard(path: str | os.PathLike, data: ShardData, fmt: str) -> Path:
    """Write ``data`` as the shard file ``path``: whole to a temporary file beside it, synced,
    then renamed over ``path`` (atomic: readers see the old shard or the new, never a part)."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        (_write_zarr if fmt == "zarr" else _write_hdf5)(tmp, data, shard_name(path))
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def publish_shard(folder: Path, name: str, data: ShardData, fmt: str) -> Path:
    """Write ``data`` as shard ``name`` of the cache ``folder``, replacing any older one."""
    return write_shard(folder / f"{name}{shard_suffix(fmt)}", data, fmt)


# -- reading -----------------------------------------------------------------------------------
def _fmt_of(path: Path) -> str:
    return "zarr" if path.name.endswith(_SUFFIX["zarr"]) else "hdf5"


def _damaged(path: Path, e: BaseException) -> CacheError:
    return CacheError(f"{path}: unreadable shard ({type(e).__name__}: {e})")


def _decode_vlen_utf8(path: Path, what: str, raw: bytes, n: int) -> list[str]:
    """The ``n`` strings of a Zarr ``vlen-utf8`` chunk: a little-endian uint32 count, then a
    uint32 length and the UTF-8 bytes of each item."""
    if len(raw) < 4 or int.from_bytes(raw[:4], "little") != n:
        raise CacheError(f"{path}: the {what} chunk holds another number of items than {n}")
    out, at, end = [], 4, len(raw)
    for _ in range(n):
        if at + 4 > end:
            break
        size = int.from_bytes(raw[at : at + 4], "little")
        out.append(raw[at + 4 : at + 4 + size].decode("utf-8", "strict"))
        at += 4 + size
    if at != end or len(out) != n:
        raise CacheError(f"{path}: the {what} chunk is truncated or damaged")
    return out


_RAW = [{"name": "bytes", "configuration": {"endian": "little"}}]
_VLEN = [{"name": "vlen-utf8", "configuration": {}}]
_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}
_ZARR_TYPES = {"keys": ("string", _VLEN), "sha256": ("string", _VLEN),
               "vectors": ("float16", _RAW), "zero_shot": ("float32", _RAW)}
_SHAPE_TAIL = {"keys": 0, "sha256": 0, "vectors": 2, "zero_shot": 1}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length


class ShardReader:
    """One shard file, opened once: everything read through it comes from that one version,
    whatever writers do to the name meanwhile. Use :func:`open_shard`.

    ``identity`` changes whenever the file is replaced. ``shape`` is (P, D) of the vectors,
    when the caller knows what they must be (the cache's prompts and width): a shard of
    another shape is refused rather than read.
    """

    def __init__(self, path: Path, shape: tuple[int, int] | None = None):
        self.path = path
        self.shape = shape
        self.identity: object = None
        # The name the shard was written under (None for shards that do not record it).
        self._recorded_name: str | None = None
        self._index: tuple[list[str], list[tuple[str, str]], dict[str, str]] | None = None
        self._n: int | None = None

    # -- the common part ------------------------------------------------------------------------
    def index(self) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
        """Keys, failures and recorded checksums (keys and failures checked against them)."""
        if self._index is None:
            checksums, failures = self._meta()
            if self._recorded_name is not None and self._recorded_name != shard_name(self.path):
                raise CacheError(
                    f"{self.path}: holds shard {self._recorded_name!r}, not its own (a copy of "
                    "another shard?); its own images have no vectors here: rerun "
                    "extract-semantics to rebuild it")
            keys = self._strings("keys")
            require_checksum(self.path, "keys", checksums, text_crc(keys))
            require_checksum(self.path, "failures", checksums, failures_crc(failures))
            self._index = keys, failures, checksums
            # Cheap (metadata only), and what the manifest's prompt count and width must match.
            for what in ("vectors", "zero_shot"):
                self._check_shape(what, self.array_shape(what))
        return self._index

    def small(self, checksums: dict[str, str]) -> tuple[list[str], np.ndarray]:
        """The sha256 list and the zero-shot scores [n, P], checked."""
        sha = self._strings("sha256")
        zero_shot = self._zero_shot()
        require_checksum(self.path, "sha256", checksums, text_crc(sha))
        require_checksum(self.path, "zero_shot", checksums, array_crc(zero_shot, "f4"))
        return sha, zero_shot

    def vectors_into(self, out: np.ndarray, expected: str | None) -> None:
        """Read the vectors into ``out`` (float16 [n, P, D], C-contiguous) and check them."""
        if out.dtype != np.float16 or not out.flags.c_contiguous:
            raise ValueError("vectors are read into a C-contiguous float16 array")
        self._vectors_into(out)
        recorded = {"vectors": expected} if expected else {}
        require_checksum(self.path, "vectors", recorded, vector_checksum(out))

    def array_shape(self, name: str) -> tuple[int, ...]:
        """The shape of array ``name`` (``vectors`` or ``zero_shot``), from its metadata."""
        raise NotImplementedError

    def _check_shape(self, what: str, shape: tuple[int, ...]) -> None:
        n = len(self._index[0]) if self._index is not None else shape[0]
        tail = shape[1:]
        if self.shape is not None:
            want = {"vectors": tuple(self.shape), "zero_shot": (self.shape[0],)}[what]
            if tail != want:
                raise CacheError(
                    f"{self.path}: the shard's {what} have shape {list(shape)}, the cache's "
                    f"manifest needs [n, {', '.join(map(str, want))}] ({self.shape[0]} prompt(s) "
                    f"of width {self.shape[1]}); rerun extract-semantics into a new folder")
        if shape[0] != n:
            raise CacheError(f"{self.path}: the shard's {what} have {shape[0]} rows for {n} keys")

    # -- per format -------------------------------------------------------------------------------
    def _meta(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        raise NotImplementedError

    def _strings(self, name: str) -> list[str]:
        raise NotImplementedError

    def _zero_shot(self) -> np.ndarray:
        raise NotImplementedError

    def _vectors_into(self, out: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _recorded(path: Path, name: Any) -> str | None:
    if name is None:
        return None
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if not isinstance(name, str):
        raise CacheError(f"{path}: the shard's metadata is damaged (its name)")
    return name


def _checked_meta(path: Path, checksums: Any, failures: Any
                  ) -> tuple[dict[str, str], list[tuple[str, str]]]:
    if not isinstance(checksums, dict) or not isinstance(failures, list) or not all(
            isinstance(f, list | tuple) and len(f) == 2 for f in failures):
        raise CacheError(f"{path}: the shard's metadata is damaged (checksums or failures)")
    return {str(k): str(v) for k, v in checksums.items()}, [(str(k), str(r)) for k, r in failures]


class _ZipShard(ShardReader):
    """A Zarr v3 group in a zip file, read with :mod:`zipfile` (no zarr import): agiqa writes
    each array as one uncompressed chunk, and only that layout is accepted."""

    def __init__(self, path: Path, shape: tuple[int, int] | None = None):
        super().__init__(path, shape)
        # O_NONBLOCK: a FIFO at the shard's name must not block the open (refused below).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        self._file = os.fdopen(fd, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CacheError(f"{path}: not a regular file; refused without reading it")
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            self.identity = _identity(st)
            self._size = st.st_size
            self._zip = zipfile.ZipFile(self._file)
            self._members = {i.filename: i for i in self._zip.infolist()}
        except CacheError:
            self._file.close()
            raise
        except Exception as e:  # noqa: BLE001 - not a zip, cut short
            self._file.close()
            raise _damaged(path, e) from None

    def close(self) -> None:
        self._file.close()

    def _member(self, name: str, limit: int | None = None) -> bytes:
        """The bytes of member ``name``, read only if it is stored (agiqa compresses none, so
        no member can inflate) and no larger than the file and ``limit``."""
        info = self._members.get(name)
        if info is None:
            raise CacheError(f"{self.path}: the shard lacks {name}")
        bound = self._size if limit is None else min(limit, self._size)
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CacheError(f"{self.path}: {name} is compressed; agiqa writes every member "
                             "stored, so the shard was not written by agiqa")
        if info.file_size > bound:
            raise CacheError(f"{self.path}: {name} claims {info.file_size} bytes, more than "
                             f"the {bound} it may have")
        try:
            with self._zip.open(info) as f:  # CRC-32 checked by zipfile
                data = f.read(bound + 1)
        except Exception as e:  # noqa: BLE001
            raise _damaged(self.path, e) from None
        if len(data) > bound:
            raise CacheError(f"{self.path}: {name} is longer than the {bound} bytes it may have")
        return data

    def _json(self, name: str) -> Any:
        try:
            return json.loads(self._member(name, JSON_LIMIT))
        except ValueError as e:
            raise CacheError(f"{self.path}: damaged {name} ({e})") from None

    def _meta(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        group = self._json("zarr.json")
        if not isinstance(group, dict) or group.get("zarr_format") != 3 \
                or group.get("node_type") != "group":
            raise CacheError(f"{self.path}: not a Zarr v3 shard of agiqa")
        attrs = group.get("attributes") or {}
        self._recorded_name = _recorded(self.path, attrs.get("shard"))
        return _checked_meta(self.path, attrs.get("checksums", {}), attrs.get("failures", []))

    def _array(self, name: str) -> tuple[tuple[int, ...], zipfile.ZipInfo | None]:
        """The shape of array ``name`` and the zip member of its one chunk (None when empty),
        after checking that it is laid out as agiqa writes it."""
        meta = self._json(f"{name}/zarr.json")
        data_type, codecs = _ZARR_TYPES[name]
        try:
            shape = tuple(int(s) for s in meta["shape"])
            chunk = [int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"]]
            ok = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
                  and meta.get("data_type") == data_type and meta.get("codecs") == codecs
                  and meta["chunk_grid"].get("name") == "regular"
                  and meta.get("chunk_key_encoding") == _KEY_ENCODING
                  and not meta.get("storage_transformers")
                  and len(shape) == 1 + _SHAPE_TAIL[name] and min(shape, default=0) >= 0
                  and chunk == [max(shape[0], 1), *shape[1:]])
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise CacheError(f"{self.path}: array {name} is not laid out as agiqa writes it "
                             "(one raw chunk); rerun extract-semantics to rebuild the shard")
        if shape[0] == 0 or 0 in shape:
            return shape, None
        key = f"{name}/c/" + "/".join("0" * len(shape))
        info = self._members.get(key)
        if info is None:
            raise CacheError(f"{self.path}: the {name} chunk is missing")
        return shape, info

    def _strings(self, name: str) -> list[str]:
        shape, info = self._array(name)
        if info is None:
            return []
        return _decode_vlen_utf8(self.path, name, self._member(info.filename), shape[0])

    def _raw(self, name: str, info: zipfile.ZipInfo, nbytes: int) -> int:
        """The file offset of the raw bytes of chunk ``info`` (``nbytes`` long)."""
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes \
                or info.compress_size != nbytes:
            raise CacheError(f"{self.path}: the {name} chunk is truncated or damaged "
                             f"({info.file_size} of {nbytes} bytes)")
        f = self._file
        f.seek(info.header_offset)
        head = f.read(_LOCAL_HEADER.size)
        if len(head) != _LOCAL_HEADER.size:
            raise CacheError(f"{self.path}: the {name} chunk is truncated")
        sig, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        if sig != b"PK\x03\x04":
            raise CacheError(f"{self.path}: the {name} chunk is damaged")
        return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def _zero_shot(self) -> np.ndarray:
        shape, info = self._array("zero_shot")
        self._check_shape("zero_shot", shape)
        if info is None:
            return np.empty(shape, np.float32)
        raw = self._member(info.filename)
        if len(raw) != 4 * int(np.prod(shape)):
            raise CacheError(f"{self.path}: the zero_shot chunk is truncated")
        return np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)

    def array_shape(self, name: str) -> tuple[int, ...]:
        return self._array(name)[0]

    def _vectors_into(self, out: np.ndarray) -> None:
        shape, info = self._array("vectors")
        self._check_shape("vectors", shape)
        if shape != out.shape:
            raise CacheError(f"{self.path}: vectors of shape {list(shape)}, expected "
                             f"{list(out.shape)}")
        if info is None:
            return
        start = self._raw("vectors", info, out.nbytes)
        self._file.seek(start)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self._file.readinto(view) != out.nbytes:
            raise CacheError(f"{self.path}: the vectors chunk is truncated")
        if sys.byteorder != "little":
            out.byteswap(inplace=True)


class _H5Shard(ShardReader):
    def __init__(self, path: Path, shape: tuple[int, int] | None = None):
        super().__init__(path, shape)
        import h5py

        if not path.is_file():  # h5py's own message for a folder or a FIFO is unclear
            raise FileNotFoundError(path) if not path.exists() else \
                CacheError(f"{path}: not a regular file")
        try:
            self._f = h5py.File(path, "r")
        except Exception as e:  # noqa: BLE001
            raise _damaged(path, e) from None
        try:
            self._check_local()
        except BaseException:
            self._f.close()
            raise
        try:
            self.identity = _identity(os.fstat(self._f.id.get_vfd_handle()))
        except Exception:  # noqa: BLE001 - a driver without a file handle
            self.identity = _identity(path.stat())

    def _check_local(self) -> None:
        """Refuse what would read another file: an external or soft link in place of an
        array, a virtual dataset, external raw storage (agiqa writes none of them; following
        one could read anything, or block on a FIFO)."""
        import h5py

        for name in _ZARR_TYPES:
            link = self._read(lambda n=name: self._f.get(n, getlink=True))
            if link is None:
                continue  # reported as missing when it is read
            if not isinstance(link, h5py.HardLink):
                raise CacheError(f"{self.path}: {name} is a {type(link).__name__}, not an "
                                 "array of the shard; agiqa does not follow it")
            ds = self._read(lambda n=name: self._f[n])
            if not isinstance(ds, h5py.Dataset) or self._read(lambda d=ds: d.is_virtual) \
                    or self._read(lambda d=ds: d.external):
                raise CacheError(f"{self.path}: {name} is a virtual dataset or stored in "
                                 "external files; agiqa reads only arrays inside the shard")

    def close(self) -> None:
        self._f.close()

    def _read(self, fn: Any) -> Any:
        try:
            return fn()
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - any h5py failure is a damaged shard
            raise _damaged(self.path, e) from None

    def _meta(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        def meta() -> tuple[Any, Any, Any]:
            return (json.loads(self._f.attrs.get("checksums", "{}")),
                    json.loads(self._f.attrs.get("failures", "[]")), self._f.attrs.get("shard"))

        checksums, failures, name = self._read(meta)
        self._recorded_name = _recorded(self.path, name)
        return _checked_meta(self.path, checksums, failures)

    def _strings(self, name: str) -> list[str]:
        items = self._read(lambda: self._f[name][:])
        return [k.decode() if isinstance(k, bytes) else str(k) for k in items]

    def _zero_shot(self) -> np.ndarray:
        zs = self._read(lambda: np.asarray(self._f["zero_shot"][:], dtype=np.float32))
        self._check_shape("zero_shot", zs.shape)
        return zs

    def array_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(lambda: self._f[name].shape))

    def _vectors_into(self, out: np.ndarray) -> None:
        ds = self._read(lambda: self._f["vectors"])
        self._check_shape("vectors", tuple(ds.shape))
        if tuple(ds.shape) != out.shape:
            raise CacheError(f"{self.path}: vectors of shape {list(ds.shape)}, expected "
                             f"{list(out.shape)}")
        if out.size:
            self._read(lambda: ds.read_direct(out) if ds.dtype == out.dtype
                       else out.__setitem__(Ellipsis, ds[:]))


def open_shard(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> ShardReader:
    """Open a shard file for reading (a context manager). ``shape``: the (P, D) its vectors
    must have. Raises FileNotFoundError for an absent file, :class:`CacheError` for any other
    failure."""
    path = Path(path)
    if _fmt_of(path) == "zarr":
        return _ZipShard(path, shape)
    return _H5Shard(path, shape)


def read_shard_index(path: str | os.PathLike
                     ) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    """The keys, failures and recorded checksums of a shard (keys and failures checked)."""
    with _opened(path) as shard:
        return shard.index()


def read_shard(path: str | os.PathLike, vectors: bool = True,
               shape: tuple[int, int] | None = None) -> ShardData:
    """Read a whole shard from one open file, every array checked against its checksum
    (``vectors=False``: all but the vectors, left empty)."""
    with _opened(path, shape) as shard:
        keys, failures, checksums = shard.index()
        sha, zero_shot = shard.small(checksums)
        if vectors:
            vec = np.empty((len(keys), *shard.array_shape("vectors")[1:]), np.float16)
            shard.vectors_into(vec, checksums.get("vectors"))
        else:
            vec = np.empty((len(keys), 0, 0), np.float16)
    return ShardData(keys=keys, sha256=sha, vectors=vec, zero_shot=zero_shot,
                     failures=failures, checksums=checksums)


def _opened(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> ShardReader:
    try:
        return open_shard(path, shape)
    except FileNotFoundError:
        raise CacheError(f"{path}: no such shard") from None
    except OSError as e:
        raise CacheError(f"{path}: unreadable shard ({e.strerror or e})") from None


def check_shard(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> str | None:
    """Read a whole shard and check every array: None if it is whole, else the reason."""
    try:
        read_shard(path, shape=shape)
    except CacheError as e:
        return str(e)
    return None
