"""What a report reads: a run's or an evaluation's predictions, a score file, and the images.

Everything a report shows comes from files ``fit``, ``evaluate --out`` and ``score-folder``
wrote, checked before use: a file edited by hand or written by another version is refused with
one line naming the file, the line and the reason. Thumbnails and patch maps are computed here,
at report time, for the images the page shows only (a bounded number).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agiqa.errors import ConfigError, DatasetError
from agiqa.fileio import read_json
from agiqa.options import spell
from agiqa.stages.rundir import (
    CONFIG,
    EVALUATION,
    METRICS,
    PREDICTIONS,
    finite_number,
    gate_columns,
    read_csv_table,
    read_predictions,
)

__all__ = ["THUMB_SIZE", "ImageRow", "RunData", "check_version", "encode_maps", "read_run",
           "read_score_file", "thumbnail"]

THUMB_SIZE = 160  # the longer side of an embedded thumbnail, in pixels
EVALUATION_FILE = EVALUATION


@dataclass
class ImageRow:
    """One image of a report: its name, the file it is read from and its numbers."""

    name: str
    path: Path | None
    score: float
    gates: list[float]
    mos: float | None = None
    zero_shot: float | None = None


@dataclass
class RunData:
    """A trained run (``fit``) or an evaluation (``evaluate --out``), as a report shows it."""

    kind: str  # "run" or "evaluation"
    folder: Path
    model_dir: Path
    config: dict[str, Any]
    dataset: dict[str, Any]
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    prompt_names: list[str]
    rows: list[ImageRow]
    cache: Path | None
    notes: list[str] = field(default_factory=list)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def check_version(where: Path, written_by: Any) -> None:
    """Refuse files of another agiqa release series (another major.minor than this one).

    Raises:
        ConfigError: naming the file and both versions.
    """
    from agiqa import __version__

    series = ".".join(__version__.split(".")[:2]) + ".x"
    if not isinstance(written_by, str) or not written_by:
        raise ConfigError(f"{where}: records no agiqa version (this agiqa {__version__} reads "
                          f"files of {series}); evaluate the model again with evaluate --out")
    if _version_tuple(written_by) != _version_tuple(__version__):
        raise ConfigError(f"{where}: written by agiqa {written_by}, this agiqa {__version__} "
                          f"reads files of {series}; use agiqa {written_by}, or evaluate the "
                          "model again with evaluate --out")


def _rows(path: Path, header: list[str], body: list[list[str]], name_col: str,
          root: Path | None) -> list[ImageRow]:
    from agiqa.data.images import resolve_key

    out: list[ImageRow] = []
    seen: set[str] = set()
    col = {c: i for i, c in enumerate(header)}
    gate_cols = [c for c in header if c.startswith("gate_")]
    for line, cells in enumerate(body, start=2):
        where = f"{path} line {line}"
        if len(cells) != len(header):
            raise DatasetError(f"{where}: {len(cells)} fields, the header has {len(header)}")
        name = cells[col[name_col]]
        if not name:
            raise DatasetError(f"{where}: empty {name_col}")
        if name in seen:
            raise DatasetError(f"{where}: {name!r} is listed twice")
        seen.add(name)
        out.append(ImageRow(
            name=name, path=None if root is None else resolve_key(root, name, source=where),
            score=finite_number(cells[col["score"]], where, "score"),
            gates=[finite_number(cells[col[g]], where, g) for g in gate_cols],
            mos=finite_number(cells[col["mos"]], where, "mos") if "mos" in col else None,
            zero_shot=finite_number(cells[col["zero_shot"]], where, "zero_shot", allow_empty=True)
            if "zero_shot" in col else None))
    return out


def read_score_file(path: Path, images: Path | None
                    ) -> tuple[list[ImageRow], dict[str, str], list[str]]:
    """Rows, failures and gate names of a ``score-folder --out`` file, ``.csv`` or ``.json``.

    Raises:
        DatasetError: the file is not what ``score-folder`` writes (one line: where and why).
    """
    if not path.is_file():
        raise DatasetError(f"{path}: score file not found")
    failures: dict[str, str] = {}
    if path.suffix == ".json":
        try:
            data = read_json(path)
            rows = data["rows"]
            failures = {str(k): str(v) for k, v in (data.get("failures") or {}).items()}
            header = list(rows[0]) if rows else ["path", "score", "gate_image"]
            body = [[str(r.get(c, "")) for c in header] for r in rows]
            if any(set(r) != set(header) for r in rows):
                raise DatasetError(f"{path}: rows do not all have the same fields")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{path}: not a score-folder JSON file ({e})") from None
    else:
        header, body = read_csv_table(path)
    names = gate_columns(path, header, ["path", "score"], None)
    return _rows(path, header, body, "path", images), failures, names


def _read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not {what}")
    return data


def read_run(folder: Path, root: Path | None = None, cache: Path | None = None) -> RunData:
    """A run directory of ``fit`` or the folder of ``evaluate --out``, checked.

    Args:
        folder: the folder.
        root: the image root (default: the one recorded).
        cache: the semantic cache for the zero-shot scores (default: the one recorded).

    Raises:
        ConfigError: not a run or an evaluation, no predictions, or written by another version.
        DatasetError: predictions.csv edited by hand.
    """
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (a run directory of fit or a folder of "
                          "evaluate --out)")
    if (folder / EVALUATION_FILE).is_file():
        meta = _read_json_file(folder / EVALUATION_FILE, "an evaluation")
        check_version(folder / EVALUATION_FILE, meta.get("agiqa_version"))
        model_dir = Path(meta.get("model", ""))
        config = _read_json_file(model_dir / CONFIG, "a model config") \
            if (model_dir / CONFIG).is_file() else {}
        kind, metrics, history = "evaluation", meta.get("metrics") or {}, []
        dataset = meta.get("dataset") or {}
        recorded_cache = meta.get("cache")
    elif (folder / CONFIG).is_file():
        config = _read_json_file(folder / CONFIG, "a run config")
        if config.get("architecture") != "ma-agiqa":
            raise ConfigError(f"{folder / CONFIG}: not an MA-AGIQA run")
        check_version(folder / CONFIG, config.get("agiqa_version"))
        model_dir, kind = folder, "run"
        metrics_file = folder / METRICS
        m = _read_json_file(metrics_file, "run metrics") if metrics_file.is_file() else {}
        metrics, history = m.get("test") or {}, m.get("history") or []
        training = config.get("training") or {}
        dataset = {**(config.get("dataset") or {}), "root": training.get("root"),
                   "labels": training.get("labels")}
        recorded_cache = training.get("cache")
    else:
        raise ConfigError(f"{folder}: neither a run directory of fit ({CONFIG}) nor a folder "
                          f"of evaluate --out ({EVALUATION_FILE})")
    pred = folder / PREDICTIONS
    if not pred.is_file():
        raise ConfigError(f"{folder}: no {PREDICTIONS} (an unfinished run? fit writes it at "
                          "the end, evaluate with --out)")
    p = read_predictions(pred, config.get("prompt_names"))
    keep = [ImageRow(name=k, path=None, score=p.scores[i], gates=p.gates[i], mos=p.mos[i],
                     zero_shot=p.zero_shot[i]) for i, k in enumerate(p.keys)
            if kind == "evaluation" or p.subsets[i] == "test"]
    data = RunData(kind=kind, folder=folder, model_dir=model_dir, config=config,
                   dataset=dataset, metrics=metrics, history=history,
                   prompt_names=p.gate_names[:-1], rows=keep,
                   cache=cache or (Path(recorded_cache) if recorded_cache else None))
    _locate_images(data, root)
    return data


def _locate_images(data: RunData, root: Path | None) -> None:
    """Point every row at its file under the image root (given or recorded)."""
    from agiqa.data.images import resolve_key

    root = root or (Path(data.dataset["root"]) if data.dataset.get("root") else None)
    if root is None or not root.is_dir():
        raise ConfigError(f"{data.folder}: the image root {root} is not a folder; pass "
                          f"{spell('root')} DIR (the folder the data set's images are in)")
    for r in data.rows:
        r.path = resolve_key(root, r.name, source=str(data.folder / PREDICTIONS))


def add_zero_shot(data: RunData) -> None:
    """The zero-shot score (mean over prompts) of each row, from the run's semantic cache."""
    if any(r.zero_shot is not None for r in data.rows):
        return
    if data.cache is None or not data.cache.is_dir():
        data.notes.append(f"zero-shot scores not shown: the semantic cache {data.cache} is not "
                          "there (pass --cache DIR)")
        return
    from agiqa.cache import open_cache

    try:
        zs = open_cache(data.cache).read([r.name for r in data.rows], ("zero_shot",))
    except Exception as e:  # noqa: BLE001 - any cache problem leaves the column out, said so
        data.notes.append(f"zero-shot scores not shown: {e}")
        return
    for r, z in zip(data.rows, zs["zero_shot"].mean(1).tolist(), strict=True):
        r.zero_shot = float(z)


def thumbnail(img) -> tuple[str, int, int]:
    """A JPEG thumbnail of a PIL image, longer side ``THUMB_SIZE``, as base64 text, with its
    width and height."""
    img = img.copy()
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height


def _png(rgba: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colour(values: np.ndarray, cmap: str, lo: float, hi: float) -> np.ndarray:
    from matplotlib import colormaps

    scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return (colormaps[cmap](np.clip(scaled, 0, 1)) * 255).astype(np.uint8)


def encode_maps(patch_score: np.ndarray, patch_weight: np.ndarray, contribution: np.ndarray
                ) -> dict[str, str]:
    """Three grid×grid maps of one image as small base64 PNGs: quality (0 to the image's
    largest), weight (0 to 1) and share of the score (diverging, symmetric about 0)."""
    c = float(np.abs(contribution).max())
    return {"quality": _png(_colour(patch_score, "magma", 0.0, float(patch_score.max()))),
            "weight": _png(_colour(patch_weight, "viridis", 0.0, 1.0)),
            "share": _png(_colour(contribution, "RdBu_r", -c, c))}
