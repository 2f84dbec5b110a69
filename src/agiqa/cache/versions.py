"""Versions of Zarr shards: the name of a shard is a link to its current version folder.

Zarr shards are folders, and a folder cannot be renamed over another: each version is written
to its own folder ``shard-<digest>.<version>.zarr.data`` and the shard's name is a symbolic
link to the current one, replaced atomically (a link is renamed over a link). The name is never
absent, a directory listing always shows it, and a reader reads the one version the link
pointed to when it looked. HDF5 shards are single files, renamed over the old file.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from agiqa.fileio import remove_path, temporary_sibling

__all__ = ["DATA", "link_version", "prune_versions", "resolve_shard", "shard_identity",
           "shard_name", "version_names"]


def shard_name(path: Path) -> str:
    """``shard-<digest>`` of ``shard-<digest>.zarr|.h5`` (and of a version folder)."""
    return path.name.split(".")[0]


DATA = ".data"
_STALE_S = 600.0  # an unlinked version folder older than this was left by a killed writer


def resolve_shard(path: Path) -> Path:
    """The version a shard name points to now (the name itself for files and plain folders)."""
    return path.parent / os.readlink(path) if path.is_symlink() else path


def shard_identity(path: Path) -> object:
    """What changes whenever shard ``path`` is replaced (None if it is absent)."""
    try:
        if path.is_symlink():
            return os.readlink(path)
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _versions(folder: Path, name: str) -> list[tuple[int, Path]]:
    out = []
    for p in folder.glob(f"{name}.*.zarr{DATA}"):
        v = p.name.split(".")[1]
        if v.isdigit():
            out.append((int(v), p))
    return sorted(out)


def link_version(tmp: Path, link: Path, name: str) -> bool:
    folder = link.parent
    while True:
        version = time.time_ns()
        target = folder / f"{name}.{version}.zarr{DATA}"
        try:
            os.rename(tmp, target)  # refuses an existing (same-nanosecond) version folder
            break
        except OSError:
            if not target.exists():
                raise
    pointer = temporary_sibling(link)
    os.symlink(target.name, pointer)
    if link.is_dir() and not link.is_symlink():
        remove_path(link)  # a shard of the unversioned layout: replaced once, then linked
    os.replace(pointer, link)
    for v, p in _versions(folder, name):
        if v < version:
            _remove_unless_linked(link, p)
    return target.exists()


def _remove_unless_linked(link: Path, version: Path) -> None:
    """Remove a version folder unless the shard's link shows it: moved aside first, and moved
    back should a concurrent writer have linked it meanwhile."""
    if link.is_symlink() and os.readlink(link) == version.name:
        return
    aside = temporary_sibling(version)
    try:
        os.replace(version, aside)
    except FileNotFoundError:
        return
    if link.is_symlink() and os.readlink(link) == version.name:
        os.replace(aside, version)
        return
    shutil.rmtree(aside, ignore_errors=True)


def prune_versions(folder: Path, name: str) -> int:
    """Remove the version folders of shard ``name`` that its link no longer shows: older ones
    at once, newer ones (a writer about to link them) only once stale. Returns how many."""
    link = folder / f"{name}.zarr"
    current = os.readlink(link) if link.is_symlink() else None
    current_v = next((v for v, p in _versions(folder, name) if p.name == current), None)
    removed = 0
    for v, p in _versions(folder, name):
        if p.name == current:
            continue
        try:
            stale = time.time() - p.stat().st_mtime > _STALE_S
        except OSError:
            continue
        if stale or (current_v is not None and v < current_v):
            _remove_unless_linked(link, p)
            removed += 1
    return removed


def version_names(folder: Path) -> set[str]:
    """Names of the shards that have version folders (linked or not)."""
    return {shard_name(p) for p in folder.glob(f"shard-*.zarr{DATA}")}
