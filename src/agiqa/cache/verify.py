"""``agiqa cache verify`` and the freshness check of stage two: compare a cache with itself
(every shard against its checksums) and with the image files on disk (their sha256)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agiqa.cache.store import SemanticCache
from agiqa.errors import CacheError, DatasetError, StaleVectorsError
from agiqa.options import spell

__all__ = ["VerifyReport", "changed_images", "check_fresh", "verify_cache"]


@dataclass
class VerifyReport:
    root: str
    checked: int = 0
    shards: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)  # shard file -> reason

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.failed or self.damaged)

    def to_dict(self) -> dict:
        return {"root": self.root, "checked": self.checked, "shards": self.shards, "ok": self.ok,
                "missing": self.missing, "changed": self.changed, "failed": self.failed,
                "damaged": self.damaged}


def _image_path(root: Path, key: str, shard: str) -> Path:
    """The file of cache key ``key`` under ``root``; a key that is absolute or escapes the root
    (the cache was edited) is refused, never hashed.

    Raises:
        CacheError: naming the shard and the key.
    """
    from agiqa.data.images import resolve_key  # the data package imports torch: only here

    try:
        return resolve_key(root, key, shard)
    except DatasetError as e:
        raise CacheError(f"{e}; the cache is damaged, rerun extract-semantics into a new "
                         "folder") from None


def verify_cache(cache: SemanticCache, root: str | os.PathLike | None = None) -> VerifyReport:
    """Check every shard against its checksums and hash every cached image file under ``root``
    (default: the root recorded at extraction). A shard with a key that is absolute or escapes
    the root is reported damaged, and none of its files is hashed."""
    root = Path(root) if root else cache.root
    if root is None:
        raise CacheError(f"{cache.path}: no image root recorded; pass {spell('images')} ROOT")
    from agiqa.data.images import file_sha256

    report = VerifyReport(root=str(root))
    failures: dict[str, str] = {}
    held: set[str] = set()
    for name in cache.shard_names():
        shard_path = str(cache.shard_path(name))
        report.shards += 1
        try:
            shard = cache.read_shard(name)
            paths = [_image_path(root, key, shard_path) for key in shard.keys]
        except CacheError as e:
            report.damaged[shard_path] = str(e)
            continue
        failures.update(dict(shard.failures))
        held.update(shard.keys)
        for key, path, digest in zip(shard.keys, paths, shard.sha256, strict=True):
            report.checked += 1
            if not path.is_file():
                report.missing.append(key)
            elif file_sha256(path) != digest:
                report.changed.append(key)
    report.failed = {k: r for k, r in sorted(failures.items()) if k not in held}
    report.missing.sort()
    report.changed.sort()
    return report


def changed_images(cache: SemanticCache, keys: list[str], root: str | os.PathLike
                   ) -> list[str]:
    """The ``keys`` whose file under ``root`` no longer has the sha256 the cache recorded
    (a missing file counts as changed).

    Raises:
        CacheError: a key is absolute or escapes ``root``.
    """
    from agiqa.data.images import file_sha256

    stored = cache.read(list(keys), ("sha256",))["sha256"]
    root = Path(root)
    changed = []
    for key, digest in zip(keys, stored, strict=True):
        path = _image_path(root, key, f"cache {cache.path}")
        try:
            if file_sha256(path) != digest:
                changed.append(key)
        except OSError:
            changed.append(key)
    return changed


def check_fresh(cache: SemanticCache, keys: list[str], root: str | os.PathLike) -> None:
    """Refuse to use vectors of images whose file changed since extraction.

    Raises:
        StaleVectorsError: naming the count and the first few changed keys.
    """
    changed = changed_images(cache, keys, root)
    if changed:
        raise StaleVectorsError(changed, str(cache.path))
