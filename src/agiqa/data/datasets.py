"""Data set adapters: read the official label files of AGI and photo quality data sets.

Each adapter is a preset (``presets/datasets/<name>.json``) naming the label file,
the image column and the score columns; ``csv`` takes any CSV. Image keys are paths relative
to the image root, with ``/`` separators; a key that escapes the root is refused.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agiqa.data.images import normalize_key, resolve_key
from agiqa.errors import DatasetError
from agiqa.presets import DatasetPreset, load_dataset_preset

__all__ = ["Dataset", "Sample", "load_dataset", "parse_number", "read_label_table"]


@dataclass(frozen=True)
class Sample:
    key: str
    mos: float | None


@dataclass
class Dataset:
    """A labelled image set: samples in label-file order, the image root and their source."""

    name: str
    root: Path
    samples: list[Sample]
    labels_path: Path | None
    target_column: str | None
    preset: DatasetPreset | None = None

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    def path(self, key: str) -> Path:
        return resolve_key(self.root, key, source=str(self.labels_path or self.root))

    def __len__(self) -> int:
        return len(self.samples)


# A number in a label file: decimal digits, an optional fraction and exponent. Python's float()
# also takes "4_987" (as 4987), "nan", "inf" and "infinity": none of them is a score.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def parse_number(text: str) -> float | None:
    """``text`` as a finite number by a strict rule (surrounding spaces aside), else None."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def read_label_table(path: str | os.PathLike
                     ) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """Read a CSV label file (LF or CRLF, optional BOM, quoted fields): its header, its rows
    and the line each row ends on (blank lines and quoted line breaks counted).

    Raises:
        DatasetError: no such file, an Excel file, not UTF-8 CSV, a column named twice, or a
            row with more fields than the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: label file not found")
    if path.suffix.lower() in (".xlsx", ".xls"):
        raise DatasetError(f"{path}: Excel label files are not read; save it as CSV first")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise DatasetError(f"{path}, line 1: the header names column(s) "
                                   f"{', '.join(map(repr, twice))} more than once")
            rows, lines = [], []
            for row in reader:
                if None in row:  # more fields than the header names
                    raise DatasetError(
                        f"{path}, line {reader.line_num}: {len(header) + len(row[None])} fields, "
                        f"the header names {len(header)}")
                rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: not a readable CSV file ({e})") from None
    if not header:
        raise DatasetError(f"{path}: empty label file (no header row)")
    return header, rows, lines


def _pick(header: list[str], wanted: str | None, candidates: list[str], what: str,
          path: Path) -> str | None:
    """The header's column for ``wanted`` (else the first of ``candidates`` present), matched
    without regard to case (``Image,MOS`` as ``image,mos``).

    Raises:
        DatasetError: ``wanted`` is not there, or two columns differ only in case and either
            could be meant.
    """
    def find(name: str) -> str | None:
        matches = [h for h in header if h.casefold() == name.casefold()]
        if len(matches) > 1:
            raise DatasetError(
                f"{path}, line 1: columns {', '.join(map(repr, matches))} differ only in case; "
                f"which is the {what} column is ambiguous: rename one")
        return matches[0] if matches else None

    if wanted:
        found = find(wanted)
        if found is None:
            raise DatasetError(
                f"{path}: no {what} column {wanted!r} (columns: {', '.join(header)})")
        return found
    for c in candidates:
        found = find(c)
        if found is not None:
            return found
    return None


def load_dataset(
    name: str,
    root: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    target: str | None = None,
    image_column: str | None = None,
    score_column: str | None = None,
    require_scores: bool = True,
) -> Dataset:
    """Load a data set preset's label file.

    Args:
        name: a preset name (``agiqa-3k``, ``aigciqa-20k``, ``aigciqa2023``, ``koniq-10k``,
            ``spaq``, ``csv``).
        root: the folder the image paths are relative to.
        labels: the label file; defaults to the preset's file name inside ``root``.
        target: a preset target name (e.g. ``mos_align``) or a column name.
        image_column: overrides the preset's image column.
        score_column: overrides the score column (``csv``); same as ``target``.
        require_scores: refuse rows whose score is missing or not a number.
    """
    preset = load_dataset_preset(name)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image root not found")
    labels_path = Path(labels) if labels else root / preset.labels
    header, rows, lines = read_label_table(labels_path)

    image_col = _pick(header, image_column, preset.image_columns, "image", labels_path)
    if image_col is None:
        raise DatasetError(
            f"{labels_path}: no image column (looked for {', '.join(preset.image_columns)}; "
            f"columns: {', '.join(header)}); name it with --image-column"
        )
    wanted = score_column or target
    if wanted in preset.targets:
        wanted = preset.targets[wanted]
    default_candidates = (
        [preset.targets[preset.default_target]] if preset.default_target else preset.score_columns
    )
    score_col = _pick(header, wanted, default_candidates, "score", labels_path)
    if score_col is None and require_scores:
        raise DatasetError(
            f"{labels_path}: no score column (looked for {', '.join(default_candidates)}; "
            f"columns: {', '.join(header)}); name it with --score-column or --target"
        )

    samples: list[Sample] = []
    seen: set[str] = set()
    for line, row in zip(lines, rows, strict=True):
        raw_key = row.get(image_col, "")
        if not raw_key:
            raise DatasetError(f"{labels_path}, line {line}: empty image path")
        resolve_key(root, raw_key, source=f"{labels_path}, line {line}")
        # One spelling per image, so ./a.jpg and sub/../a.jpg cannot sit in two splits.
        key = normalize_key(raw_key)
        if key in seen:
            raise DatasetError(f"{labels_path}, line {line}: image {key!r} is listed twice"
                               + (f" (as {raw_key!r})" if raw_key != key else ""))
        seen.add(key)
        mos = None
        if score_col is not None:
            raw = row.get(score_col, "")
            mos = parse_number(raw)
            if mos is None and require_scores:
                raise DatasetError(
                    f"{labels_path}, line {line}: score {raw!r} in column {score_col!r} is not "
                    "a finite number (digits, an optional fraction and exponent)")
        samples.append(Sample(key, mos))
    if not samples:
        raise DatasetError(f"{labels_path}: the label file has no rows")
    return Dataset(name, root, samples, labels_path, score_col, preset)
