"""The semantic-vector cache: shards, manifest, fingerprint, reader and verification."""

from agiqa.cache.fingerprint import (
    CACHE_FORMAT_VERSION,
    SemanticSpec,
    fingerprint_of,
    semantic_spec,
)
from agiqa.cache.shards import FORMATS, ShardData
from agiqa.cache.store import MANIFEST, SemanticCache, open_cache, plan_shards
from agiqa.cache.verify import VerifyReport, changed_images, check_fresh, verify_cache

__all__ = [
    "CACHE_FORMAT_VERSION",
    "FORMATS",
    "MANIFEST",
    "SemanticCache",
    "SemanticSpec",
    "ShardData",
    "VerifyReport",
    "changed_images",
    "check_fresh",
    "fingerprint_of",
    "open_cache",
    "plan_shards",
    "semantic_spec",
    "verify_cache",
]
