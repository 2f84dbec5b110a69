"""Train / validation / test splits: the paper's, a data set's own split files, or seeded ratios."""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

from agiqa.data.datasets import Dataset, parse_number, read_label_table
from agiqa.errors import ConfigError, DatasetError
from agiqa.fileio import atomic_path
from agiqa.options import spell

__all__ = ["SUBSETS", "Split", "make_split", "paper_split", "parse_ratios", "read_split_csv"]

SUBSETS = ("train", "val", "test")


@dataclass
class Split:
    """Keys per subset, each in the order the split produced them."""

    train: list[str]
    val: list[str]
    test: list[str]
    method: str

    def subset(self, name: str) -> list[str]:
        if name == "all":
            return self.train + self.val + self.test
        if name not in SUBSETS:
            raise ConfigError(f"unknown subset {name!r} (choose from train, val, test, all)")
        return getattr(self, name)

    def write_csv(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["key", "subset"])
                for name in SUBSETS:
                    w.writerows([k, name] for k in getattr(self, name))


def read_split_csv(path: str | os.PathLike) -> Split:
    header, rows, _ = read_label_table(path)
    if "key" not in header or "subset" not in header:
        raise DatasetError(f"{path}: a split file needs the columns key, subset")
    parts: dict[str, list[str]] = {s: [] for s in SUBSETS}
    for row in rows:
        if row["subset"] not in parts:
            raise DatasetError(f"{path}: unknown subset {row['subset']!r}")
        parts[row["subset"]].append(row["key"])
    return Split(**parts, method=f"file:{path}")


def paper_split(n: int, seed: int = 20, ratios=(0.7, 0.1, 0.2)) -> tuple[list[int], ...]:
    """The MA-AGIQA split (``dataset_general`` in the official ``utils/process.py``).

    ``random.seed(seed)``, ``random.shuffle(list(range(n)))`` over the label-file rows, then
    ``train = index[:int(n * 0.7)]``, ``val = index[int(n * 0.7):int(n * 0.8)]``,
    ``test = index[int(n * 0.8):]``: the cut points are truncated, not rounded (AGIQA-3K:
    2087 / 298 / 597). Other ratios cut at the truncated cumulative ratios the same way.
    """
    index = list(range(n))
    random.Random(seed).shuffle(index)
    # round() only removes float noise of the sum (0.7 + 0.1 = 0.7999999999999999).
    a = int(n * round(ratios[0], 12))
    b = int(n * round(ratios[0] + ratios[1], 12))
    return index[:a], index[a:b], index[b:]


def parse_ratios(text: str) -> tuple[float, float, float]:
    parts = tuple(parse_number(x) for x in text.split(","))
    if len(parts) != 3 or None in parts or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6:
        raise ConfigError(f"split ratios must be three numbers summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


def _file_split(ds: Dataset) -> Split:
    preset = ds.preset
    if preset is None or not preset.split_files:
        raise ConfigError(f"data set {ds.name} ships no split files; use "
                          f"{spell('split', 'paper')} or random")
    base = ds.labels_path.parent if ds.labels_path else ds.root
    column = next((c for c in preset.image_columns), "name")
    parts = {}
    known = set(ds.keys)
    for subset, fname in preset.split_files.items():
        _, rows, _ = read_label_table(base / fname)
        keys = [r.get(column, "") for r in rows]
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise DatasetError(
                f"{base / fname}: {len(unknown)} image(s) are not in {ds.labels_path}: "
                + ", ".join(unknown[:3])
            )
        parts[subset] = keys
    return Split(parts.get("train", []), parts.get("val", []), parts.get("test", []), "files")


def make_split(ds: Dataset, method: str = "paper", seed: int = 20) -> Split:
    """Split a data set.

    Args:
        ds: the data set, rows in label-file order.
        method: ``paper``, ``files``, ``random:0.7,0.1,0.2`` or a ``split.csv`` path.
        seed: the shuffle seed (the paper uses 20).
    """
    keys = ds.keys
    if method == "paper" or method.startswith("random"):
        ratios = (0.7, 0.1, 0.2)
        if method.startswith("random"):
            ratios = parse_ratios(method.partition(":")[2] or "0.7,0.1,0.2")
        tr, va, te = paper_split(len(keys), seed, ratios)
        split = Split([keys[i] for i in tr], [keys[i] for i in va], [keys[i] for i in te],
                      f"{method.split(':')[0]}(seed={seed})")
    elif method == "files":
        split = _file_split(ds)
    elif Path(method).is_file():
        split = read_split_csv(method)
    else:
        raise ConfigError(
            f"unknown split {method!r} (paper, files, random:TRAIN,VAL,TEST or a split.csv)"
        )
    return split
