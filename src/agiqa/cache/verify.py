"""``agiqa cache verify`` and the freshness check of stage two: compare a cache with itself
(every shard against its checksums) and with the image files on disk (their sha256)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agiqa.cache.shards import check_shard, read_shard
from agiqa.cache.store import SemanticCache
from agiqa.data.images import file_sha256
from agiqa.errors import CacheError, StaleVectorsError

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


def verify_cache(cache: SemanticCache, root: str | os.PathLike | None = None) -> VerifyReport:
    """Check every shard against its checksums and hash every cached image file under ``root``
    (default: the root recorded at extraction)."""
    root = Path(root) if root else cache.root
    if root is None:
        raise CacheError(f"{cache.path}: no image root recorded; pass --images ROOT")
    report = VerifyReport(root=str(root))
    failures: dict[str, str] = {}
    held: set[str] = set()
    for shard_path in cache.shard_paths():
        report.shards += 1
        reason = check_shard(shard_path)
        if reason is not None:
            report.damaged[str(shard_path)] = reason
            continue
        shard = read_shard(shard_path, vectors=False)
        failures.update(dict(shard.failures))
        held.update(shard.keys)
        for key, digest in zip(shard.keys, shard.sha256, strict=True):
            report.checked += 1
            path = root / key
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
    (a missing file counts as changed)."""
    stored = cache.read(list(keys), ("sha256",))["sha256"]
    root = Path(root)
    changed = []
    for key, digest in zip(keys, stored, strict=True):
        try:
            if file_sha256(root / key) != digest:
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
