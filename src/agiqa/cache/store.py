"""The semantic-vector store: a folder of whole shards plus ``manifest.json``.

Shards are found by listing the folder, so several uncoordinated workers can fill one cache;
the manifest carries the fingerprint and a summary that each writer rewrites atomically.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from agiqa.cache.fingerprint import CACHE_FORMAT_VERSION, fingerprint_of
from agiqa.cache.shards import (
    FORMATS,
    ShardData,
    read_shard,
    read_shard_keys,
    read_shard_vectors_into,
    shard_suffix,
    write_shard,
)
from agiqa.errors import CacheError, CacheMismatchError, ConfigError, MissingVectorsError
from agiqa.fileio import read_json, remove_stale_temporaries, write_json

__all__ = ["MANIFEST", "SemanticCache", "open_cache", "plan_shards"]

MANIFEST = "manifest.json"
READ_FIELDS = ("vectors", "zero_shot", "sha256")


def plan_shards(keys: list[str], shard_size: int) -> list[tuple[str, list[str]]]:
    """Cut sorted keys into shards of ``shard_size``; a shard is named by a hash of its keys.

    The plan depends only on the requested keys, so every worker of a run computes the same
    plan without talking to the others, and a rerun finds the shards it already wrote.
    """
    if shard_size < 1:
        raise ConfigError(f"shard size must be at least 1, got {shard_size}")
    keys = sorted(keys)
    plan = []
    for i in range(0, len(keys), shard_size):
        chunk = keys[i : i + shard_size]
        digest = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:16]
        plan.append((f"shard-{digest}", chunk))
    return plan


def _spec_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    parts = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, list) or isinstance(vb, list):
                parts.append(f"{k} differ")
            else:
                parts.append(f"{k}: {vb!r} in the cache vs {va!r} now")
    return "; ".join(parts)


class SemanticCache:
    """A semantic cache folder. Use :func:`open_cache` to read one, :meth:`create` to write."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._index: dict[str, Path] | None = None
        self._shard_keys: dict[Path, list[str]] = {}
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
                "created": now,
                "shards": {},
            }
            _create_if_absent(path / MANIFEST, manifest)
        cache = open_cache(path)
        if cache.fingerprint != fingerprint:
            raise CacheMismatchError(
                str(path), fingerprint, cache.fingerprint, _spec_diff(spec, cache.spec)
            )
        if fmt and fmt != cache.format:
            raise ConfigError(f"cache {path} holds {cache.format} shards; --format {fmt} given")
        remove_stale_temporaries(path)
        return cache

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
        return Path(self.manifest["root"]) if self.manifest.get("root") else None

    # -- shards -----------------------------------------------------------------------------
    def shard_path(self, name: str) -> Path:
        return self.path / f"{name}{shard_suffix(self.format)}"

    def shard_paths(self) -> list[Path]:
        suffix = shard_suffix(self.format)
        return sorted(p for p in self.path.glob(f"shard-*{suffix}") if not p.name.startswith("."))

    def refresh(self) -> None:
        """Forget the key index, so shards written since by other workers are seen."""
        self._index = None
        self._failures = None

    def _build_index(self) -> None:
        index: dict[str, Path] = {}
        failures: dict[str, str] = {}
        self._shard_keys = {}
        for p in self.shard_paths():
            keys, fails = read_shard_keys(p)
            self._shard_keys[p] = keys
            for k in keys:
                index.setdefault(k, p)
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
        if data.vectors.ndim != 3 or data.vectors.shape[1:] != (len(self.prompts), self.dim):
            raise CacheError(
                f"shard vectors have shape {data.vectors.shape[1:]}, the cache needs "
                f"({len(self.prompts)}, {self.dim})"
            )
        path = self.shard_path(name)
        write_shard(path, data, self.format)
        self.manifest.setdefault("shards", {})[name] = {
            "images": len(data.keys), "failed": len(data.failures),
        }
        self._rewrite_manifest()
        self.refresh()
        return path

    def _rewrite_manifest(self) -> None:
        # Other workers may have written shards: list the folder, so the summary holds them too.
        known = self.manifest.setdefault("shards", {})
        on_disk = {p.name[: -len(shard_suffix(self.format))] for p in self.shard_paths()}
        for name in on_disk - set(known):
            keys, fails = read_shard_keys(self.shard_path(name))
            known[name] = {"images": len(keys), "failed": len(fails)}
        self.manifest["shards"] = {k: v for k, v in sorted(known.items()) if k in on_disk}
        self.manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_json(self.path / MANIFEST, self.manifest)

    # -- reading ----------------------------------------------------------------------------
    def read(self, keys: list[str], fields: tuple[str, ...] = READ_FIELDS
             ) -> dict[str, Any]:
        """Vectors, zero-shot scores and file hashes of ``keys``, in that order, reading each
        shard once (``fields`` picks which; training needs only ``("vectors",)``).

        Returns ``{"vectors": float16 [n, P, D], "zero_shot": float32 [n, P], "sha256": [n]}``.
        A whole shard wanted in its own order is read straight into the result.
        Raises :class:`MissingVectorsError` naming the keys the cache lacks.
        """
        unknown = set(fields) - set(READ_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} (choose from {READ_FIELDS})")
        if self._index is None:
            self._build_index()
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise MissingVectorsError(missing, where=f"cache {self.path}")
        p, d = len(self.prompts), self.dim
        out: dict[str, Any] = {}
        if "vectors" in fields:
            out["vectors"] = np.empty((len(keys), p, d), dtype=np.float16)
        if "zero_shot" in fields:
            out["zero_shot"] = np.empty((len(keys), p), dtype=np.float32)
        if "sha256" in fields:
            out["sha256"] = [""] * len(keys)
        by_shard: dict[Path, list[int]] = {}
        for i, k in enumerate(keys):
            by_shard.setdefault(self._index[k], []).append(i)
        for shard_path, positions in by_shard.items():
            meta = read_shard(shard_path, vectors=False) \
                if {"zero_shot", "sha256"} & set(fields) else None
            shard_keys = meta.keys if meta else self._shard_keys[shard_path]
            wanted = [keys[i] for i in positions]
            first = positions[0]
            at: Any = slice(first, first + len(positions)) \
                if positions[-1] - first == len(positions) - 1 else positions
            if wanted == shard_keys:
                rows: Any = slice(None)
                row_list: Any = range(len(wanted))
            else:
                row = {k: j for j, k in enumerate(shard_keys)}
                row_list = [row[k] for k in wanted]
                rows = np.array(row_list)
            if "vectors" in fields:
                if isinstance(rows, slice) and isinstance(at, slice):
                    # The whole shard in its order, into a contiguous block: read it in place.
                    read_shard_vectors_into(shard_path, out["vectors"][at])
                else:
                    whole = np.empty((len(shard_keys), p, d), dtype=np.float16)
                    read_shard_vectors_into(shard_path, whole)
                    out["vectors"][at] = whole[rows]
            if meta is not None and "zero_shot" in fields:
                out["zero_shot"][at] = meta.zero_shot[rows]
            if meta is not None and "sha256" in fields:
                for i, r in zip(positions, row_list, strict=True):
                    out["sha256"][i] = meta.sha256[r]
        return out

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
            "prompts": [{"name": n, "text": t} for n, t in zip(self.prompt_names, self.prompts)],
            "dim": self.dim,
            "root": str(self.root) if self.root else None,
            "shards": len(self.shard_paths()),
            "images": len(self.keys),
            "failed": len(self.failures),
            "bytes": size,
            "created": self.manifest.get("created"),
            "updated": self.manifest.get("updated"),
        }


def _create_if_absent(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``path`` unless it exists; atomic against concurrent writers."""
    import json
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another worker's manifest is already there
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: check, then rename
            if not path.exists():
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_cache(path: str | os.PathLike) -> SemanticCache:
    """Open an existing semantic cache for reading."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(f"{path}: not a semantic cache (no {MANIFEST})")
    try:
        manifest = read_json(manifest_path)
    except ValueError as e:
        raise CacheError(f"{manifest_path}: damaged manifest ({e})") from None
    version = manifest.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {version}, this agiqa reads {CACHE_FORMAT_VERSION}"
        )
    return SemanticCache(path, manifest)
