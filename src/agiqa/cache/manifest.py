"""The manifest of a semantic cache, and the shard plan that every worker computes alike."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agiqa.cache.fingerprint import CACHE_FORMAT_VERSION
from agiqa.cache.shards import FORMATS
from agiqa.errors import CacheError, ConfigError
from agiqa.fileio import current_umask, read_json

__all__ = ["MANIFEST", "create_if_absent", "plan_shards", "read_manifest", "spec_diff"]

MANIFEST = "manifest.json"
_MANIFEST_FIELDS = ("format_version", "format", "fingerprint", "semantics", "prompt_names", "dim")


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


def spec_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    """What differs between two semantic specs, field by field (``b`` is the cache's)."""
    parts = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, list) or isinstance(vb, list):
                parts.append(f"{k} differ")
            else:
                parts.append(f"{k}: {vb!r} in the cache vs {va!r} now")
    return "; ".join(parts)


def create_if_absent(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``path`` unless it exists; atomic against concurrent writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
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


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the cache folder ``path``.

    Raises:
        CacheError: no manifest, or one that is damaged or of another format version.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(f"{path}: not a semantic cache (no {MANIFEST})")
    try:
        manifest = read_json(manifest_path)
    except ValueError as e:
        raise CacheError(f"{manifest_path}: damaged manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{manifest_path}: damaged manifest (a JSON object is needed, found "
                         f"{type(manifest).__name__})")
    version = manifest.get("format_version")
    if version is not None and version != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {version}, this agiqa reads {CACHE_FORMAT_VERSION}"
        )
    lacking = [k for k in _MANIFEST_FIELDS if k not in manifest]
    if lacking:
        raise CacheError(f"{manifest_path}: damaged manifest (no {', '.join(lacking)})")
    if manifest["format"] not in FORMATS or not isinstance(manifest["semantics"], dict) \
            or not isinstance(manifest["semantics"].get("prompts"), list):
        raise CacheError(f"{manifest_path}: damaged manifest (bad format or semantics)")
    if version != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {version}, this agiqa reads {CACHE_FORMAT_VERSION}"
        )
    return manifest
