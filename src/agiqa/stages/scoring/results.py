"""What scoring reads and writes: the score report and decoded files."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agiqa.cache import SemanticCache
from agiqa.data.loader import read_images
from agiqa.data.pixel_cache import PixelCache
from agiqa.errors import ConfigError
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
    """What ``agiqa score-folder`` (and :class:`~agiqa.Scorer`) scored.

    Attributes:
        rows: one per scored image: ``path`` (relative to the folder, with ``/``), ``score``,
            ``zero_shot`` (the MLLM's own rating) and ``gate_<prompt>``/``gate_image`` (the
            experts' weights).
        failures: image → the reason it could not be scored.
        skipped_files: files of the folder that are not images (or whose names are not UTF-8).
        computed: images whose vectors the MLLM computed in this run (the others came from the
            cache).
        changed: images computed again because their file changed since it was cached.
        out: the ``.csv`` or ``.json`` file the rows were written to, if one was asked for.
        reassigned: on Ray (``engine="ray"``), the slices handed out again after their actor
            died.
        html: the HTML report written (``agiqa.report.html.ReportResult``: ``out``,
            ``images_shown``, ``images_total``, ``bytes``), if one was asked for.
        columns: the CSV columns when there are no rows (path, score, the gates,
            zero_shot).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    computed: int = 0
    changed: list[str] = field(default_factory=list)
    out: Path | None = None
    html: Any = None
    # On Ray (score-folder --engine ray): slices handed out again after their actor died.
    reassigned: int = 0
    # the CSV columns when there are no rows (path, score, the gates, zero_shot)
    columns: list[str] = field(default_factory=lambda: ["path", "score", "gate_image"])

    @property
    def exit_code(self) -> int:
        """The command line's exit status: 2 when some image failed, else 0."""
        return 2 if self.failures else 0

    def summary(self) -> dict[str, Any]:
        """``count``, ``failed``, ``computed``, ``changed`` and the scores' ``mean``, ``min``
        and ``max`` (None without scores)."""
        scores = [r["score"] for r in self.rows]
        return {"count": len(scores), "failed": len(self.failures), "computed": self.computed,
                "changed": len(self.changed),
                "mean": sum(scores) / len(scores) if scores else None,
                "min": min(scores) if scores else None, "max": max(scores) if scores else None}

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``score-folder --json`` and of a ``.json`` ``--out``."""
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


def decoded(paths: list[Path], pixels: bool, batch_size: int, workers: int,
            pixel_cache: PixelCache | None = None):
    """Batches of ``(index, image or pixels, sha256, failure reason)``, read by the one image
    path (:func:`agiqa.data.loader.read_images`): the model's pixels through ``pixel_cache``,
    and a file whose loader process is killed fails by name."""
    batch = []
    for d in read_images([(p, str(p)) for p in paths], workers, pixels=pixels,
                         pixel_cache=pixel_cache):
        batch.append(tuple(d))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


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
