"""Exceptions raised by agiqa. Only ``agiqa.cli`` turns them into exit codes."""

from __future__ import annotations

__all__ = [
    "AgiqaError",
    "BadImageError",
    "CacheError",
    "CacheMismatchError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "MissingVectorsError",
    "ModelLoadError",
    "StaleVectorsError",
    "TrainingError",
    "UsageError",
]


class AgiqaError(Exception):
    """Base class of every error agiqa raises on purpose."""


class ConfigError(AgiqaError):
    """An option, preset or configuration file is invalid."""


class UsageError(ConfigError):
    """Options missing, or given together where they cannot be (the command line's usage
    error, exit status 64)."""


class BadImageError(AgiqaError):
    """An image file cannot be used; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class DatasetError(AgiqaError):
    """A label file or image root is unusable."""


class CacheError(AgiqaError):
    """A semantic cache is missing, damaged or unreadable."""


class CacheMismatchError(CacheError):
    """A cache was made with another fingerprint than the one asked for."""

    def __init__(self, path: str, expected: str, found: str, detail: str = ""):
        msg = (
            f"cache {path} has fingerprint {found[:16]}, but this run needs fingerprint "
            f"{expected[:16]}"
        )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg + "; use another --out/--cache folder")
        self.expected = expected
        self.found = found


class MissingVectorsError(CacheError):
    """Semantic vectors are missing for some keys."""

    def __init__(self, keys: list[str], where: str = "the cache"):
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        super().__init__(f"{len(keys)} image(s) have no semantic vectors in {where}: {shown}")
        self.keys = list(keys)


class StaleVectorsError(CacheError):
    """Cached vectors belong to an older version of their image file."""

    def __init__(self, keys: list[str], cache: str):
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        super().__init__(
            f"{len(keys)} image(s) changed since cache {cache} was filled: {shown}; rerun "
            "extract-semantics on them to recompute their vectors")
        self.keys = list(keys)


class ModelLoadError(AgiqaError):
    """A multimodal model or processor cannot be loaded."""


class CheckpointError(AgiqaError):
    """A model directory or official checkpoint is unusable."""


class TrainingError(AgiqaError):
    """Training cannot go on (for example a NaN loss)."""
