"""Content-keyed shards: vectors filed under the sha256 of the image bytes, not a path.

``score-folder`` fills a cache that is shared across folders this way: the same image scored
from two places is computed once.
"""

from __future__ import annotations

import hashlib

import torch

from agiqa.cache.shards import ShardData
from agiqa.cache.store import SemanticCache

__all__ = ["CONTENT_KEY_PREFIX", "content_key", "write_content_shard"]

CONTENT_KEY_PREFIX = "sha256/"


def content_key(sha256: str) -> str:
    """The key of a file's vectors in a content-addressed cache."""
    return CONTENT_KEY_PREFIX + sha256


def write_content_shard(cache: SemanticCache,
                         entries: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """Write ``(sha256, vectors [P, D], zero_shot [P])`` entries as one shard, keyed by content."""
    unique = {sha: (v, z) for sha, v, z in entries}
    shas = sorted(unique)
    keys = [content_key(s) for s in shas]
    name = "shard-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    if cache.has_shard(name):
        return
    vectors = torch.stack([unique[s][0] for s in shas]).to(torch.float16).numpy()
    zero_shot = torch.stack([unique[s][1] for s in shas]).to(torch.float32).numpy()
    cache.write_shard(name, ShardData(keys, shas, vectors, zero_shot, []))
