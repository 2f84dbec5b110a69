"""The manifest of a semantic cache, and the shard plan that every worker computes alike."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from agiqa.cache.fingerprint import CACHE_FORMAT_VERSION, fingerprint_of
from agiqa.cache.shards import FORMATS
from agiqa.errors import CacheError, ConfigError
from agiqa.fileio import current_umask

__all__ = ["MANIFEST", "create_if_absent", "plan_shards", "read_bounded_json", "read_manifest",
           "spec_diff"]

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
    """Write ``obj`` as JSON to ``path`` unless it exists; atomic against concurrent writers.

    Raises:
        OSError: naming ``path`` (a full disk's write names no file of its own).
    """
    try:
        _create_if_absent(path, obj)
    except OSError as e:
        if e.filename is None or str(e.filename).endswith(".tmp"):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def _create_if_absent(path: Path, obj: dict[str, Any]) -> None:
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


_MAX_MANIFEST_BYTES = 64 << 20  # a million shards' summaries fit many times over
_MAX_DEPTH = 32  # the manifest nests 4 deep
_MAX_DIM = 1 << 16  # wider than any language model's hidden state


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of ``obj``, stopping past ``limit`` (iterative: no recursion to blow)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def read_bounded_json(path: Path, max_bytes: int = _MAX_MANIFEST_BYTES,
                      max_depth: int = _MAX_DEPTH) -> Any:
    """The JSON document of the regular file ``path``, of at most ``max_bytes`` and
    ``max_depth`` levels of nesting.

    Raises:
        ValueError: not a regular file, too large, too deep, or not JSON (the reason).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{st.st_size} bytes, more than the {max_bytes} allowed")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"more than the {max_bytes} bytes allowed")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if _depth(obj, max_depth) > max_depth:
        raise ValueError(f"nested more than {max_depth} levels deep")
    return obj


def _earlier_format(path: Path, version: Any) -> CacheError:
    return CacheError(
        f"{path}: a cache of an earlier agiqa (cache format {version}; this agiqa reads format "
        f"{CACHE_FORMAT_VERSION}, single-file shards): re-extract it with agiqa "
        "extract-semantics into a new --out folder")


def _check_fields(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """Types and counts that readers rely on, cross-checked with each other."""
    def bad(reason: str) -> CacheError:
        return CacheError(f"{manifest_path}: damaged manifest ({reason})")

    if manifest["format"] not in FORMATS:
        raise bad(f"format {manifest['format']!r} is none of {', '.join(FORMATS)}")
    spec = manifest["semantics"]
    if not isinstance(spec, dict) or not isinstance(spec.get("prompts"), list) \
            or not all(isinstance(t, str) for t in spec["prompts"]) or not spec["prompts"]:
        raise bad("semantics lack their list of prompts")
    names = manifest["prompt_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise bad("prompt_names must be distinct non-empty names")
    if len(names) != len(spec["prompts"]):
        raise bad(f"{len(names)} prompt name(s) for {len(spec['prompts'])} prompt(s)")
    dim = manifest["dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= _MAX_DIM:
        raise bad(f"dim {dim!r} is not a width from 1 to {_MAX_DIM}")
    fingerprint = manifest["fingerprint"]
    if not isinstance(fingerprint, str) or fingerprint != fingerprint_of(spec):
        raise bad("its fingerprint is not that of its semantics")
    if not isinstance(manifest.get("shards", {}), dict):
        raise bad("shards must be an object")
    root = manifest.get("root")
    if root is not None and not isinstance(root, str):
        raise bad("root must be a path")
    relative = manifest.get("root_relative")
    if relative is not None and not isinstance(relative, str):
        raise bad("root_relative must be a path")


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the cache folder ``path``.

    Raises:
        CacheError: no manifest, or one that is damaged, inconsistent, too large or too deep,
            or of another format version (one line each).
    """
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CacheError(f"{path}: not a semantic cache (no {MANIFEST})")
    try:
        manifest = read_bounded_json(manifest_path)
    except ValueError as e:
        raise CacheError(f"{manifest_path}: damaged manifest ({e})") from None
    except OSError as e:
        raise CacheError(f"{manifest_path}: unreadable manifest ({e.strerror or e})") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{manifest_path}: damaged manifest (a JSON object is needed, found "
                         f"{type(manifest).__name__})")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) \
            and version < CACHE_FORMAT_VERSION:
        raise _earlier_format(path, version)
    lacking = [k for k in _MANIFEST_FIELDS if k not in manifest]
    if lacking:
        raise CacheError(f"{manifest_path}: damaged manifest (no {', '.join(lacking)})")
    if version != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {version!r}, this agiqa reads {CACHE_FORMAT_VERSION}"
        )
    _check_fields(manifest_path, manifest)
    return manifest
