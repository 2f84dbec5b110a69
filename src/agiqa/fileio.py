"""Atomic file writes (a reader sees the old file or the new one, never half of one), the
per-user data folder, and content hashes of model folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agiqa.errors import ConfigError

__all__ = ["LOCAL_REVISION_PREFIX", "MODEL_FILE_PATTERNS", "agiqa_home", "atomic_path",
           "check_safetensors", "current_umask", "exclusive_lock", "folder_content_hash",
           "read_json", "read_regular", "read_text", "remove_path", "remove_stale_temporaries",
           "temporary_sibling", "write_json", "write_text"]

_HOST = socket.gethostname().replace(".", "_")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and rename it into place when the block succeeds.

    The temporary name lives in the same folder, so the final rename is atomic on POSIX file
    systems. On an exception the temporary file or folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The owner is in the name, so a later run can remove what a killed one left behind.
        prefix = f".{_short(path.name)}.{_HOST}-{os.getpid()}."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    # mkstemp creates 0600 whatever the umask; a shared cache needs the user's usual mode.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    if is_dir:
        tmp_path.unlink()
    try:
        yield tmp_path
        if not is_dir and not tmp_path.is_symlink():
            # The user's usual mode, whatever the writer did: safetensors, for one, recreates
            # the file with mode 0600.
            os.chmod(tmp_path, 0o666 & ~current_umask())
        if is_dir and path.exists():
            # A folder cannot be renamed over a full one: move the old one aside first (the name
            # is absent for an instant; cache shards use versioned names instead, see cache/).
            old = _aside_name(path)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        os.replace(tmp_path, path)
    except BaseException as e:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and (e.filename is None or e.filename == str(tmp_path)):
            raise _naming(e, path) from None
        raise


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` (a full disk's ``write`` names no file, a temporary's name would
    mean nothing to the user)."""
    if e.filename is not None and e.filename != str(path) and not str(e.filename).endswith(
            ".tmp"):
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def agiqa_home() -> Path:
    """The per-user data folder: ``$AGIQA_HOME``, else ``~/.cache/agiqa``.

    Raises:
        ConfigError: it exists and is not a folder (naming the setting it came from).
    """
    setting = os.environ.get("AGIQA_HOME")
    home = Path(setting or Path.home() / ".cache" / "agiqa")
    if home.exists() and not home.is_dir():
        where = "AGIQA_HOME" if setting else "the default agiqa folder (set AGIQA_HOME)"
        raise ConfigError(f"{where} {home} is a file, not a folder")
    return home


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if absent) for the block.

    The operating system releases it when the process ends, killed or not, so a crashed run
    leaves no stale lock.

    Raises:
        ConfigError: another process holds it (``what`` names what is busy).
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{what} is in use by another agiqa process; wait for it to "
                              "finish, or choose another folder") from None
        yield
    finally:
        os.close(fd)


def temporary_sibling(path: str | os.PathLike) -> Path:
    """An unused name beside ``path`` for a temporary file or folder of this process, named so
    that :func:`remove_stale_temporaries` removes it if the process is killed."""
    path = Path(path)
    return path.parent / f".{_short(path.name)}.{_HOST}-{os.getpid()}.{os.urandom(6).hex()}.tmp"


def _short(name: str, limit: int = 120) -> str:
    """``name`` cut to ``limit`` bytes, so a temporary beside a 255-byte name still fits."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    cut = os.fsdecode(raw[:limit])
    while cut and "\udc80" <= cut[-1] <= "\udcff":  # a character cut in two
        cut = cut[:-1]
    return cut


_aside_name = temporary_sibling


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or folder by first renaming it aside (atomic), then deleting it.

    A reader either finds the whole thing under its name or finds no such name, never a
    half-deleted folder there.
    """
    path = Path(path)
    old = _aside_name(path)
    try:
        os.replace(path, old)
    except FileNotFoundError:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


JSON_LIMIT = 64 << 20  # bytes: agiqa's own JSON files (manifests, configs) are far smaller


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``, refused with a ``ValueError`` unless it is a regular file (or a
    link to one) of at most ``limit`` bytes. The open never waits (a FIFO would block forever)
    and the read is bounded, whatever the file claims or grows to meanwhile.

    Raises:
        OSError: the file cannot be opened or read.
        ValueError: not a regular file, or larger than ``limit`` (naming ``path``).
    """
    path = Path(path)
    with open(path, "rb", opener=_open_nonblocking) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{path} has {st.st_size} bytes, more than the {limit} a {what} "
                             "of agiqa may have")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} has more than the {limit} bytes a {what} of agiqa may have")
    return data


def read_text(path: str | os.PathLike, limit: int = JSON_LIMIT, what: str = "text file") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped), read as
    :func:`read_regular` reads: a regular file within ``limit`` bytes, never a FIFO.

    Raises:
        OSError: the file cannot be opened or read.
        ValueError: not a regular file, too large, or not UTF-8 (naming ``path``).
    """
    data = read_regular(path, limit, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | os.PathLike, limit: int = JSON_LIMIT) -> Any:
    """A JSON file agiqa reads (a manifest, a run's config, a preset), refused with a
    ``ValueError`` unless it is a regular file of at most ``limit`` bytes nested at most a few
    hundred levels deep: a FIFO would block forever, a huge or deeply nested file would take
    minutes and gigabytes before failing."""
    path = Path(path)
    data = read_regular(path, limit, "JSON file")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be one of agiqa's JSON files") from None


def _open_nonblocking(path: str, flags: int) -> int:
    """``open`` that does not wait on a FIFO (the check after it refuses one)."""
    return os.open(path, flags | os.O_NONBLOCK)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Remove temporaries left by killed writers of this host (other hosts' are kept)."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        owner = tmp.name[: -len(".tmp")].rsplit(".", 2)
        if len(owner) < 3 or "-" not in owner[1]:
            continue
        host, _, pid = owner[1].rpartition("-")
        if host != _HOST or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# What determines a model folder's outputs: weights and their index, configuration, tokenizer,
# processor and chat template files, and any code of the model's own.
MODEL_FILE_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "*.model", "*.tiktoken", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "image_processing*.json", "chat_template.*", "*.jinja",
    "*.py",
)
_HASH_INDEX = "file-hashes.json"
# The revision recorded for a local model folder: this prefix and its content hash.
LOCAL_REVISION_PREFIX = "local-sha256-"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_safetensors(path: Path, size: int) -> None:
    """Refuse a safetensors file whose header promises more bytes than the file has."""
    from agiqa.errors import ModelLoadError

    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ModelLoadError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items()
                       if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{path}: damaged safetensors header") from None
    if 8 + n + end != size:
        raise ModelLoadError(
            f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})")


def folder_content_hash(folder: str | os.PathLike,
                        patterns: tuple[str, ...] = MODEL_FILE_PATTERNS) -> str:
    """sha256 over the names and contents of the files of ``folder`` that match ``patterns``.

    Each file is hashed once: its sha256 is kept under :func:`agiqa_home` keyed by absolute
    path, size and modification time, so a 14 GB model folder is read in full only when a file
    changes. Safetensors files are checked for truncation on the way.
    """
    import fnmatch

    folder = Path(folder).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    index_path = agiqa_home() / _HASH_INDEX
    try:
        index = read_json(index_path) if index_path.is_file() else {}
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    total, changed = hashlib.sha256(), False
    for p in files:
        st = p.stat()
        if p.suffix == ".safetensors":
            check_safetensors(p, st.st_size)
        stamp = [st.st_size, st.st_mtime_ns]
        entry = index.get(str(p))
        if not (isinstance(entry, list) and entry[:2] == stamp and len(entry) == 3):
            entry = [*stamp, _file_sha256(p)]
            index[str(p)] = entry
            changed = True
        total.update(f"{p.relative_to(folder).as_posix()}\0{entry[2]}\n".encode())
    if changed:
        with contextlib.suppress(OSError):  # a read-only home only costs hashing again
            write_json(index_path, index)
    return total.hexdigest()
