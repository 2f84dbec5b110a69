"""What scoring reads and writes: the score report and decoded files."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from agiqa.cache import SemanticCache
from agiqa.data.images import load_image
from agiqa.data.pixels import resize_pixels
from agiqa.errors import BadImageError, ConfigError
from agiqa.fileio import atomic_path, read_json, write_json

__all__ = ["SCORE_SUFFIXES", "ScoreReport", "cached_items", "check_score_output", "decoded"]

SCORE_SUFFIXES = (".csv", ".json")


def _is_score_file(path: Path) -> bool:
    """Whether ``path`` is a score file that ``score-folder`` wrote (a CSV whose header is
    ``path,score,…``, or a JSON document of rows, failures and a summary)."""
    try:
        if path.suffix.lower() == ".json":
            data = read_json(path)
            return isinstance(data, dict) and {"rows", "failures", "summary"} <= set(data)
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as f:
            if not os.path.isfile(path):
                return False
            head = f.read(4096).split(b"\n", 1)[0].rstrip(b"\r")
        return head == b"path,score" or head.startswith(b"path,score,")
    except (OSError, ValueError):
        return False


def check_score_output(path: str | os.PathLike, option: str = "--out",
                       inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """``path`` if ``score-folder`` may write its scores there: a ``.csv`` or ``.json`` name
    that is no input, and is new or a score file agiqa wrote (never a file of the user's).

    Raises:
        ConfigError: naming ``option``, the file and the reason.
    """
    path = Path(path)
    if path.suffix.lower() not in SCORE_SUFFIXES:
        raise ConfigError(f"{option} {path}: the scores are written as .csv or .json; name "
                          "the file so")
    for other in inputs:
        if os.path.exists(other) and os.path.exists(path) and os.path.samefile(other, path):
            raise ConfigError(f"{option} {path} is an input of this command; choose another "
                              "file")
    if (path.exists() or path.is_symlink()) and not _is_score_file(path):
        raise ConfigError(f"{option} {path} exists and is not a score file agiqa wrote; "
                          "agiqa never replaces it: choose another file, or remove it")
    return path

@dataclass
class ScoreReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    computed: int = 0  # images whose vectors were computed by the MLLM in this run
    # images (named as in rows) computed again because their file changed since it was cached
    changed: list[str] = field(default_factory=list)
    # the CSV columns when there are no rows (path, score, the gates, zero_shot)
    columns: list[str] = field(default_factory=lambda: ["path", "score", "gate_image"])

    @property
    def exit_code(self) -> int:
        return 2 if self.failures else 0

    def summary(self) -> dict[str, Any]:
        scores = [r["score"] for r in self.rows]
        return {"count": len(scores), "failed": len(self.failures), "computed": self.computed,
                "changed": len(self.changed),
                "mean": sum(scores) / len(scores) if scores else None,
                "min": min(scores) if scores else None, "max": max(scores) if scores else None}

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "failures": self.failures, "summary": self.summary(),
                "skipped_files": self.skipped_files, "changed": self.changed}

    def write(self, out: str | os.PathLike) -> None:
        """Write the rows atomically: ``.json`` (rows, failures, summary) or ``.csv``.

        Raises:
            ConfigError: ``out`` is another kind of file, or a file agiqa did not write.
        """
        out = check_score_output(out)
        if out.suffix.lower() == ".json":
            write_json(out, self.to_dict())
            return
        columns = list(self.rows[0]) if self.rows else list(self.columns)
        with atomic_path(out) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(self.rows)


class _Files(TorchDataset):
    """Decodes one file per item; ``pixels=True`` gives the model's uint8 224×224 input."""

    def __init__(self, paths: list[Path], pixels: bool):
        self.paths, self.pixels = paths, pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img, sha = load_image(self.paths[i])
        except BadImageError as e:
            return i, None, None, e.reason
        return i, resize_pixels(img) if self.pixels else img, sha, None


def decoded(paths: list[Path], pixels: bool, batch_size: int, workers: int):
    """Batches of ``(index, image or pixels, sha256, failure reason)``, decoded in workers."""
    loader = DataLoader(_Files(paths, pixels), batch_size=batch_size, num_workers=workers,
                        collate_fn=list)
    yield from loader


def cached_items(cache: SemanticCache | None, items: list[tuple[str, Path, str]],
                 failures: dict[str, str], report: ScoreReport) -> list[tuple[str, Path, str]]:
    """The ``(label, path, key)`` items whose vectors ``cache`` holds; each other one fails in
    ``report`` with its reason from ``failures``, else the cache's, else "no semantic vector"."""
    ready = []
    for label, path, key in items:
        if cache is not None and key in cache:
            ready.append((label, path, key))
        else:
            why = failures.get(key) or (cache.failures.get(key) if cache else None)
            report.failures[label] = why or "no semantic vector"
    return ready
