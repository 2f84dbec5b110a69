"""What a run of stage one still has to compute, given what the cache already holds.

Every shard this worker is responsible for is checked before it is trusted: a shard that fails
its checksums is rebuilt; an image whose file changed since extraction (another sha256) is
recomputed; an image that failed before is tried again (unless told not to). A shard that needs
any of that is written again whole, keeping the vectors of its other images.

Planning only reads: a damaged shard of an earlier plan, whose keys cannot be known, is listed
in :attr:`ResumePlan.discard`, and the run removes it (:func:`discard_damaged`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agiqa.cache import SemanticCache, ShardData, plan_shards
from agiqa.data.images import file_sha256, resolve_key
from agiqa.errors import AgiqaError, CacheError

__all__ = ["ResumePlan", "ShardJob", "discard_damaged", "plan_resume"]


@dataclass
class ShardJob:
    """One shard to write: ``order`` is every key it will hold (vectors or failure),
    ``compute`` the keys to run through the MLLM, ``kept`` the rows reused from its old version."""

    name: str
    order: list[str]
    compute: list[str]
    kept: ShardData | None = None


@dataclass
class ResumePlan:
    jobs: list[ShardJob] = field(default_factory=list)
    reused: int = 0
    changed: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> reason
    # Damaged shards of earlier plans: their keys are unknown, their images planned anew.
    discard: list[str] = field(default_factory=list)


def _is_fresh(root: Path, key: str, digest: str) -> bool:
    try:
        return file_sha256(resolve_key(root, key, "cache")) == digest
    except (OSError, AgiqaError):
        return False  # gone or unreadable: computing it again records why


def _inspect(cache: SemanticCache, name: str, order: list[str], root: Path, wanted: set[str],
             retry_failed: bool, plan: ResumePlan) -> ShardJob | None:
    """The job that brings shard ``name`` up to date, or None if it already is."""
    if not cache.has_shard(name):
        return ShardJob(name, order, list(order))
    try:
        old = cache.read_shard(name)  # every array checked
    except CacheError as e:
        plan.damaged[name] = str(e)
        return ShardJob(name, order, list(order))
    held = {k: i for i, k in enumerate(old.keys)}
    failed = dict(old.failures)
    changed = [k for k in old.keys if k in wanted and not _is_fresh(root, k, old.sha256[held[k]])]
    retried = [k for k in failed if k in wanted and retry_failed]
    new = [k for k in order if k not in held and k not in failed]
    compute = set(changed) | set(retried) | set(new)
    if not compute:
        plan.reused += sum(1 for k in old.keys if k in wanted)
        return None
    plan.changed += changed
    plan.retried += retried
    plan.reused += sum(1 for k in old.keys if k in wanted and k not in compute)
    rows = [held[k] for k in old.keys if k not in compute]
    kept = ShardData([old.keys[i] for i in rows], [old.sha256[i] for i in rows],
                     old.vectors[rows] if rows else old.vectors[:0],
                     old.zero_shot[rows] if rows else old.zero_shot[:0],
                     [(k, r) for k, r in old.failures if k not in compute])
    full_order = list(dict.fromkeys([*order, *old.keys, *failed]))
    return ShardJob(name, full_order, [k for k in full_order if k in compute], kept)


def plan_resume(cache: SemanticCache | None, keys: list[str], root: Path, shard_size: int,
                rank: int, world: int, retry_failed: bool = True) -> ResumePlan:
    """This worker's shards still to write, with the keys to compute in each.

    Worker ``rank`` of ``world`` takes the planned shards whose index is ``rank`` modulo
    ``world``, and in the same way the shards of earlier runs (other plans) that hold keys of
    this run. Keys that those earlier shards hold are not planned again.
    """
    plan = ResumePlan()
    shards = plan_shards(keys, shard_size)
    if cache is None:
        plan.jobs = [ShardJob(n, ks, list(ks)) for i, (n, ks) in enumerate(shards)
                     if i % world == rank]
        return plan
    planned = {n for n, _ in shards}
    wanted = set(keys)
    elsewhere: dict[str, list[str]] = {}
    for name in cache.shard_names():
        if name in planned:
            continue
        try:
            held, fails = cache.shard_keys(name)
        except CacheError as e:
            # Its keys are unknown: the run discards it, and plans its images anew.
            plan.damaged[name] = str(e)
            plan.discard.append(name)
            continue
        if wanted & (set(held) | {k for k, _ in fails}):
            elsewhere[name] = held + [k for k, _ in fails]
    cached_elsewhere = {k for ks in elsewhere.values() for k in ks}
    existing = set(cache.shard_names())
    todo = [(name, [k for k in shard_keys if k not in cached_elsewhere])
            for name, shard_keys in shards]
    todo += [(name, elsewhere[name]) for name in sorted(elsewhere)]
    for i, (name, order) in enumerate(todo):
        if not order:
            continue
        if i % world != rank:  # another worker's shard: counted, not checked
            if name in existing:
                plan.reused += sum(1 for k in order if k in wanted)
            continue
        job = _inspect(cache, name, order, root, wanted, retry_failed, plan)
        if job is not None:
            plan.jobs.append(job)
    return plan


def discard_damaged(cache: SemanticCache, plan: ResumePlan) -> None:
    """Remove the damaged shards of earlier plans that ``plan`` found (those still damaged)."""
    for name in plan.discard:
        cache.discard_damaged_shard(name)


def merge_rows(kept: ShardData | None, new: ShardData, order: list[str]) -> ShardData:
    """The rows of ``kept`` and ``new`` (and their failures) in ``order``."""
    if kept is None or (not kept.keys and not kept.failures):
        parts = [new]
    else:
        parts = [kept, new]
    position = {k: i for i, k in enumerate(order)}
    rows = sorted(((position.get(k, len(order)), k, p, i) for p, part in enumerate(parts)
                   for i, k in enumerate(part.keys)), key=lambda r: r[:2])
    keys = [k for _, k, _, _ in rows]
    sha = [parts[p].sha256[i] for _, _, p, i in rows]
    vec = np.stack([parts[p].vectors[i] for _, _, p, i in rows]) if rows else new.vectors[:0]
    zs = np.stack([parts[p].zero_shot[i] for _, _, p, i in rows]) if rows else new.zero_shot[:0]
    held = set(keys)
    fails = {k: r for part in parts for k, r in part.failures if k not in held}
    failures = sorted(fails.items(), key=lambda kv: (position.get(kv[0], len(order)), kv[0]))
    return ShardData(keys, sha, vec.astype(np.float16), zs.astype(np.float32), failures)
