"""``agiqa cache verify``: compare the hashes in a cache with the image files on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agiqa.cache.shards import read_shard
from agiqa.cache.store import SemanticCache
from agiqa.data.images import file_sha256
from agiqa.errors import CacheError

__all__ = ["VerifyReport", "verify_cache"]


@dataclass
class VerifyReport:
    root: str
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.failed)

    def to_dict(self) -> dict:
        return {"root": self.root, "checked": self.checked, "ok": self.ok,
                "missing": self.missing, "changed": self.changed, "failed": self.failed}


def verify_cache(cache: SemanticCache, root: str | os.PathLike | None = None) -> VerifyReport:
    """Hash every cached image file under ``root`` (default: the root recorded at extraction)."""
    root = Path(root) if root else cache.root
    if root is None:
        raise CacheError(f"{cache.path}: no image root recorded; pass --images ROOT")
    report = VerifyReport(root=str(root), failed=cache.failures)
    for shard_path in cache.shard_paths():
        shard = read_shard(shard_path)
        for key, digest in zip(shard.keys, shard.sha256):
            report.checked += 1
            path = root / key
            if not path.is_file():
                report.missing.append(key)
            elif file_sha256(path) != digest:
                report.changed.append(key)
    report.missing.sort()
    report.changed.sort()
    return report
