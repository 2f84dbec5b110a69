"""The semantic-vector store: a folder of whole shards plus ``manifest.json``.

Shards are found by listing the folder, so several uncoordinated workers can fill one cache;
the manifest carries the fingerprint and a summary that each writer rewrites atomically.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import numpy as np

from agiqa.cache.fingerprint import CACHE_FORMAT_VERSION, fingerprint_of
from agiqa.cache.manifest import (
    MANIFEST,
    create_if_absent,
    plan_shards,
    read_manifest,
    spec_diff,
)
from agiqa.cache.shards import (
    FORMATS,
    ShardData,
    ShardReader,
    check_shard,
    open_shard,
    publish_shard,
    read_shard,
    shard_name,
    shard_suffix,
)
from agiqa.errors import CacheError, CacheMismatchError, ConfigError, MissingVectorsError
from agiqa.fileio import remove_path, remove_stale_temporaries, write_json
from agiqa.options import spell

__all__ = ["MANIFEST", "SemanticCache", "open_cache", "plan_shards"]

READ_FIELDS = ("vectors", "zero_shot", "sha256")


class SemanticCache:
    """A semantic cache folder. Use :func:`open_cache` to read one, :meth:`create` to write."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._index: dict[str, str] | None = None  # key -> shard name
        # shard name -> (identity of the version read, its keys, its recorded checksums)
        self._shard_meta: dict[str, tuple[object, list[str], dict[str, str]]] = {}
        self._failures: dict[str, str] | None = None

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        spec: dict[str, Any],
        prompt_names: list[str],
        dim: int,
        fmt: str | None = None,
        root: str | os.PathLike | None = None,
    ) -> SemanticCache:
        """Open a cache for writing, creating it if needed; refuse one of another fingerprint.

        Safe when several workers start at once: the manifest is created only if absent (a hard
        link of a finished temporary file), and whoever loses the race opens the winner's.
        """
        path = Path(path)
        try:
            return cls._create(path, spec, prompt_names, dim, fmt, root)
        except PermissionError as e:
            raise CacheError(f"{e.filename or path}: cannot write the cache "
                             f"({e.strerror or 'permission denied'})") from None
        except OSError as e:
            if e.errno == 30:  # EROFS
                raise CacheError(f"{path}: cannot write the cache (read-only file system)") \
                    from None
            raise

    @classmethod
    def _create(cls, path: Path, spec: dict[str, Any], prompt_names: list[str], dim: int,
                fmt: str | None, root: str | os.PathLike | None) -> SemanticCache:
        fingerprint = fingerprint_of(spec)
        if not (path / MANIFEST).is_file():
            # Another worker's temporaries, or its manifest landing just now, are no obstacle.
            own = [p for p in path.iterdir() if not p.name.endswith(".tmp")
                   and p.name != MANIFEST] if path.is_dir() else []
            if own:
                raise CacheError(f"{path}: folder exists, is not empty and has no {MANIFEST}")
            new_fmt = fmt or "zarr"
            if new_fmt not in FORMATS:
                raise ConfigError(
                    f"unknown cache format {new_fmt!r} (choose from {', '.join(FORMATS)})")
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            manifest = {
                "format_version": CACHE_FORMAT_VERSION,
                "format": new_fmt,
                "fingerprint": fingerprint,
                "semantics": spec,
                "prompt_names": list(prompt_names),
                "dim": int(dim),
                "root": str(Path(root).resolve()) if root else None,
                "root_relative": _relative_root(path, root) if root else None,
                "created": now,
                "shards": {},
            }
            create_if_absent(path / MANIFEST, manifest)
        cache = open_cache(path)
        if cache.fingerprint != fingerprint:
            raise CacheMismatchError(
                str(path), fingerprint, cache.fingerprint, spec_diff(spec, cache.spec)
            )
        if fmt and fmt != cache.format:
            raise ConfigError(f"cache {path} holds {cache.format} shards; {spell('format', fmt)} "
                              "given")
        if not _writable(path):
            raise CacheError(f"{path}: cannot write the cache (permission denied)")
        remove_stale_temporaries(path)
        return cache

    def require_fingerprint(self, expected: str | None, what: str) -> None:
        """Refuse this cache unless its fingerprint is ``expected`` (what ``what`` needs).

        Raises:
            CacheMismatchError: naming both fingerprints and ``what``.
        """
        if expected and expected != self.fingerprint:
            raise CacheMismatchError(str(self.path), expected, self.fingerprint, what)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["semantics"]

    @property
    def prompts(self) -> list[str]:
        return list(self.spec["prompts"])

    @property
    def prompt_names(self) -> list[str]:
        return list(self.manifest["prompt_names"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def root(self) -> Path | None:
        """The image folder the keys are relative to: the recorded absolute path, or, when
        that folder is gone and the cache was moved together with its images, the same
        folder relative to the cache (recorded at creation as ``root_relative``)."""
        if not self.manifest.get("root"):
            return None
        recorded = Path(self.manifest["root"])
        return recorded if recorded.is_dir() else self._relative_root() or recorded

    def _relative_root(self) -> Path | None:
        relative = self.manifest.get("root_relative")
        if not relative:
            return None
        moved = (self.path / relative).resolve()
        return moved if moved.is_dir() else None

    def root_for(self, files: list[Path]) -> Path | None:
        """The image root for ``files``: :attr:`root`, unless every file lies under the
        folder relative to the cache and not under the recorded one (a cache copied with its
        images, the original still there). Each file's bytes are still checked against the
        sha256 the cache holds for it."""
        root = self.root
        moved = self._relative_root()
        if root is None or moved is None or moved == root or not files:
            return root

        def holds(folder: Path) -> bool:
            return all(f.resolve().is_relative_to(folder) for f in files)

        return moved if holds(moved) and not holds(root) else root

    # -- shards -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(prompts, width) of every vector of this cache."""
        return len(self.prompt_names), self.dim

    def shard_path(self, name: str) -> Path:
        return self.path / f"{name}{shard_suffix(self.format)}"

    def shard_paths(self) -> list[Path]:
        """Every shard file, sorted by name."""
        suffix = shard_suffix(self.format)
        return sorted(p for p in self.path.glob(f"shard-*{suffix}") if not p.name.startswith("."))

    def shard_names(self) -> list[str]:
        return [shard_name(p) for p in self.shard_paths()]

    def has_shard(self, name: str) -> bool:
        """Whether shard ``name`` exists (whole or not: see :meth:`check_shard`)."""
        return self.shard_path(name).exists()

    def read_shard(self, name: str, vectors: bool = True) -> ShardData:
        """Shard ``name`` whole, every array checked (``vectors=False``: all but the vectors).

        Raises:
            CacheError: the shard is absent, damaged or of another shape than the cache's.
        """
        return read_shard(self.shard_path(name), vectors, self.shape)

    def shard_keys(self, name: str) -> tuple[list[str], list[tuple[str, str]]]:
        """The keys and the failures (key, reason) of shard ``name``, checked, without its
        vectors. Raises :class:`CacheError` as :meth:`read_shard` does."""
        keys, failures, _ = self._open_index(self.shard_path(name))
        return keys, failures

    def check_shard(self, name: str) -> str | None:
        """None if shard ``name`` reads whole and checks out, else the reason (naming it)."""
        return check_shard(self.shard_path(name), self.shape)

    def discard_damaged_shard(self, name: str) -> bool:
        """Remove shard ``name`` if it is damaged now (checked again first, so a shard that a
        writer has just replaced whole is kept). Returns whether it was removed."""
        path = self.shard_path(name)
        if not path.exists() or self.check_shard(name) is None:
            return False
        remove_path(path)
        self.refresh()
        return True

    def refresh(self) -> None:
        """Forget the key index, so shards written since by other workers are seen."""
        self._index = None
        self._failures = None

    def _open_index(self, path: Path) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
        try:
            shard = open_shard(path, self.shape)
        except FileNotFoundError:
            raise CacheError(f"{path}: no such shard") from None
        except OSError as e:
            raise CacheError(f"{path}: unreadable shard ({e.strerror or e})") from None
        with shard:
            keys, failures, checksums = shard.index()
            self._shard_meta[shard_name(path)] = (shard.identity, keys, checksums)
        return keys, failures, checksums

    def _build_index(self) -> None:
        index: dict[str, str] = {}
        failures: dict[str, str] = {}
        self._shard_meta = {}
        for path in self.shard_paths():
            try:
                keys, fails, _ = self._open_index(path)
            except CacheError:
                if not path.exists():  # removed since the folder was listed
                    continue
                raise
            name = shard_name(path)
            for k in keys:
                index.setdefault(k, name)
            for k, reason in fails:
                failures.setdefault(k, reason)
        self._index = index
        self._failures = {k: r for k, r in failures.items() if k not in index}

    @property
    def keys(self) -> list[str]:
        """Every key with vectors, sorted."""
        if self._index is None:
            self._build_index()
        return sorted(self._index)

    @property
    def failures(self) -> dict[str, str]:
        """Keys whose extraction failed (and that no shard holds vectors for) → reason."""
        if self._failures is None:
            self._build_index()
        return dict(self._failures)

    def __contains__(self, key: str) -> bool:
        if self._index is None:
            self._build_index()
        return key in self._index

    def __len__(self) -> int:
        return len(self.keys)

    def write_shard(self, name: str, data: ShardData) -> Path:
        """Write one whole shard atomically and record it in the manifest."""
        if data.vectors.ndim != 3 or data.vectors.shape[1:] != self.shape \
                or data.zero_shot.shape[1:] != self.shape[:1]:
            raise CacheError(
                f"shard vectors have shape {data.vectors.shape[1:]}, the cache needs "
                f"{self.shape}"
            )
        escaping = [k for k in [*data.keys, *(k for k, _ in data.failures)]
                    if not k or k.startswith(("/", "\\")) or os.path.isabs(k)
                    or ".." in k.replace("\\", "/").split("/")]
        if escaping:
            raise CacheError(f"{self.path}: shard {name}: key {escaping[0]!r} is absolute or "
                             "leaves the image root; keys are paths relative to it")
        try:
            path = publish_shard(self.path, name, data, self.format)
        except OSError as e:
            raise CacheError(f"{self.path}: cannot write shard {name} "
                             f"({e.strerror or type(e).__name__})") from None
        self.manifest.setdefault("shards", {})[name] = {
            "images": len(data.keys), "failed": len(data.failures),
        }
        self._rewrite_manifest()
        self.refresh()
        return path

    def _rewrite_manifest(self) -> None:
        # Other workers may have written shards: list the folder, so the summary holds them too.
        known = self.manifest.setdefault("shards", {})
        on_disk = set(self.shard_names())
        for name in on_disk - set(known):
            try:
                keys, fails = self.shard_keys(name)
            except CacheError:
                continue  # damaged: a rerun rebuilds it
            known[name] = {"images": len(keys), "failed": len(fails)}
        self.manifest["shards"] = {k: v for k, v in sorted(known.items()) if k in on_disk}
        self.manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_json(self.path / MANIFEST, self.manifest)

    # -- reading ----------------------------------------------------------------------------
    def read(self, keys: list[str], fields: tuple[str, ...] = READ_FIELDS
             ) -> dict[str, Any]:
        """Vectors, zero-shot scores and file hashes of ``keys``, in that order, reading each
        shard file once (``fields`` picks which; training needs only ``("vectors",)``).

        Returns ``{"vectors": float16 [n, P, D], "zero_shot": float32 [n, P], "sha256": [n]}``.
        Every array is checked against the shard's checksums. A whole shard wanted in its own
        order is read straight into the result.
        Raises :class:`MissingVectorsError` naming the keys the cache lacks, and
        :class:`CacheError` naming a damaged shard.
        """
        unknown = set(fields) - set(READ_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} (choose from {READ_FIELDS})")
        if self._index is None:
            self._build_index()
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise MissingVectorsError(missing, where=f"cache {self.path}")
        p, d = self.shape
        out: dict[str, Any] = {}
        if "vectors" in fields:
            out["vectors"] = np.empty((len(keys), p, d), dtype=np.float16)
        if "zero_shot" in fields:
            out["zero_shot"] = np.empty((len(keys), p), dtype=np.float32)
        if "sha256" in fields:
            out["sha256"] = [""] * len(keys)
        by_shard: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            by_shard.setdefault(self._index[k], []).append(i)
        for name, positions in by_shard.items():
            path = self.shard_path(name)
            try:
                shard = open_shard(path, self.shape)
            except FileNotFoundError:
                raise CacheError(f"{path}: no such shard (removed while reading)") from None
            except OSError as e:
                raise CacheError(f"{path}: unreadable shard ({e.strerror or e})") from None
            with shard:
                self._read_rows(shard, name, keys, positions, fields, out)
        return out

    def _read_rows(self, shard: ShardReader, name: str, keys: list[str], positions: list[int],
                   fields: tuple[str, ...], out: dict[str, Any]) -> None:
        """Fill ``out`` at ``positions`` from one open shard file, every array checked. The
        keys are those of that file (the index's, unless a writer replaced it since)."""
        known = self._shard_meta.get(name)
        if known is not None and known[0] == shard.identity:
            _, shard_keys, checksums = known
        else:
            shard_keys, _, checksums = shard.index()
        wanted = [keys[i] for i in positions]
        first = positions[0]
        at: Any = slice(first, first + len(positions)) \
            if positions[-1] - first == len(positions) - 1 else positions
        if wanted == shard_keys:
            rows: Any = slice(None)
            row_list: Any = range(len(wanted))
        else:
            row = {k: j for j, k in enumerate(shard_keys)}
            lost = [k for k in wanted if k not in row]
            if lost:
                raise MissingVectorsError(lost, where=f"shard {shard.path}")
            row_list = [row[k] for k in wanted]
            rows = np.array(row_list)
        if "vectors" in fields:
            expected = checksums.get("vectors")
            if isinstance(rows, slice) and isinstance(at, slice):
                # The whole shard in its order, into a contiguous block: read it in place.
                shard.vectors_into(out["vectors"][at], expected)
            else:
                whole = np.empty((len(shard_keys), *self.shape), np.float16)
                shard.vectors_into(whole, expected)
                out["vectors"][at] = whole[rows]
        if {"zero_shot", "sha256"} & set(fields):
            sha, zero_shot = shard.small(checksums)
            if "zero_shot" in fields:
                out["zero_shot"][at] = zero_shot[rows]
            if "sha256" in fields:
                for i, r in zip(positions, row_list, strict=True):
                    out["sha256"][i] = sha[r]

    def info(self) -> dict[str, Any]:
        """A summary for ``agiqa cache info``."""
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {
            "path": str(self.path),
            "format": self.format,
            "fingerprint": self.fingerprint,
            "model": self.spec["model"],
            "revision": self.spec["revision"],
            "dtype": self.spec["dtype"],
            "prompts": [{"name": n, "text": t}
                        for n, t in zip(self.prompt_names, self.prompts, strict=True)],
            "dim": self.dim,
            "root": str(self.root) if self.root else None,
            "shards": len(self.shard_paths()),
            "images": len(self.keys),
            "failed": len(self.failures),
            "bytes": size,
            "created": self.manifest.get("created"),
            "updated": self.manifest.get("updated"),
        }


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def open_cache(path: str | os.PathLike) -> SemanticCache:
    """Open an existing semantic cache for reading."""
    path = Path(path)
    return SemanticCache(path, read_manifest(path))


def _relative_root(cache: Path, root: str | os.PathLike) -> str | None:
    """The image root relative to the cache folder (None where no relative path exists, as
    across Windows drives)."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), cache.resolve())).as_posix()
    except ValueError:
        return None
