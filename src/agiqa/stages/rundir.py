"""The run folder of ``agiqa fit`` and the folder of ``agiqa evaluate --out``: every file name,
whether a folder may be written, the one ``predictions.csv`` writer and reader, the typed
``config.json`` and the marker that says a run finished.

A run folder holds, in the order ``fit`` writes them: ``.agiqa-run`` (agiqa made the folder),
``training.json`` (the configuration the run started with, compared on ``--resume``),
``split.csv``, ``train_log.jsonl``, ``checkpoint.pt`` (while the run is unfinished), then
``model.safetensors``, ``config.json``, ``predictions.csv``, ``metrics.json``, the two plots
and, last, ``.agiqa-finished``. A series (``--repeats``/``--split-seeds``) holds a run folder
per run (``seed-S``/``split-S``), then ``summary.json`` and its own ``.agiqa-finished``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from agiqa.cache.fingerprint import SemanticSpec
from agiqa.data.splits import Split, read_split_csv
from agiqa.errors import CheckpointError, ConfigError, DatasetError
from agiqa.fileio import (
    atomic_path,
    exclusive_lock,
    read_json,
    read_text,
    write_json,
    write_text,
)
from agiqa.options import spell

__all__ = [
    "CHECKPOINT", "CONFIG", "CURVES_PLOT", "EVALUATION", "EVALUATION_MARKER", "FINISHED", "LOCK",
    "MARKER", "METRICS", "MODEL", "PREDICTIONS", "RUN_FILES", "SCATTER_PLOT", "SPLIT", "SUMMARY",
    "TRAINING", "TRAIN_LOG", "Predictions", "RunConfig", "check_evaluation_out", "check_out",
    "check_resume", "check_split_unchanged", "evaluation_folder", "finite_number", "gate_columns",
    "is_finished", "mark_finished", "read_config", "read_csv_table", "read_metrics",
    "read_predictions", "read_training", "run_folder", "selection_text", "training_dict",
    "write_metrics", "write_outputs", "write_predictions", "write_training",
]

# -- file names --------------------------------------------------------------------------------
MODEL = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
SPLIT = "split.csv"
CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"
TRAINING = "training.json"
SCATTER_PLOT = "scatter_test.png"
CURVES_PLOT = "training_curves.png"
SUMMARY = "summary.json"
EVALUATION = "evaluation.json"
# agiqa writes only into a run folder it made: it marks it with MARKER when it creates it, and
# holds a lock on LOCK while it writes there. FINISHED is written last, once every other file
# of the run (or, in a series folder, summary.json) is in place.
MARKER = ".agiqa-run"
LOCK = ".agiqa-run.lock"
FINISHED = ".agiqa-finished"
# An evaluate --out folder agiqa wrote: its files may be replaced by the next evaluation.
EVALUATION_MARKER = ".agiqa-evaluation"

# What a run directory holds; ``seed-*``/``split-*`` are the runs of --repeats/--split-seeds.
RUN_FILES = frozenset({MODEL, CONFIG, METRICS, PREDICTIONS, SPLIT, TRAIN_LOG, TRAINING,
                       SCATTER_PLOT, CURVES_PLOT, CHECKPOINT, SUMMARY, FINISHED})


def _is_run_entry(p: Path) -> bool:
    if p.name in RUN_FILES or p.name in (MARKER, LOCK) or \
            (p.name.startswith(".") and p.name.endswith(".tmp")):
        return True
    return p.is_dir() and p.name.partition("-")[0] in ("seed", "split")


# -- finished ----------------------------------------------------------------------------------
def is_finished(out: Path) -> bool:
    """Whether ``out`` holds a finished run (or a finished series): its ``.agiqa-finished``.

    A run folder of agiqa 0.1 has no marker (nor ``training.json``): it counts as finished when
    it holds ``model.safetensors`` and no ``checkpoint.pt`` (0.1 removed the checkpoint last),
    and a series folder of 0.1 when it holds ``summary.json``.
    """
    if (out / FINISHED).is_file():
        return True
    if (out / TRAINING).is_file():  # written by this version: the marker alone says finished
        return False
    if (out / SUMMARY).is_file():
        return True
    return (out / MODEL).is_file() and not (out / CHECKPOINT).exists()


def mark_finished(out: Path) -> None:
    """Write the marker, the last file of a run or a series."""
    write_text(out / FINISHED, "finished\n")


# -- may --out be used -------------------------------------------------------------------------
def check_out(out: Path, resume: bool, series: bool = False) -> None:
    """Refuse an ``--out`` that would mix runs or clobber unrelated files; cheap, no writes.

    A new or empty folder, or a run folder agiqa made (marked with ``.agiqa-run``) holding only
    files of a run killed before its first checkpoint, starts a new run. ``checkpoint.pt``
    needs ``--resume``; a finished run, any folder holding other files, and a non-empty folder
    agiqa did not mark (whatever its files are named) are refused: agiqa never replaces a file
    it did not write. ``series``: ``out`` is the folder of a series (its runs are checked one
    by one).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{spell('out', str(out))} is a file, not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not (out / MARKER).is_file():
        shown = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"{spell('out', str(out))} is not empty and agiqa did not make it "
                          f"(it holds {shown}; no {MARKER} file); choose a new or empty folder")
    foreign = [p.name for p in entries if not _is_run_entry(p)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(f"{spell('out', str(out))} is not empty and is not an agiqa run (it "
                          f"holds {shown}); choose a new or empty folder")
    if series:
        if (out / MODEL).is_file() or (out / CHECKPOINT).is_file():
            raise ConfigError(f"{spell('out', str(out))} holds a single run; a series "
                              f"({spell('repeats')}, {spell('split_seeds')}) needs another "
                              f"{spell('out')}")
        if is_finished(out) and not resume:
            raise ConfigError(f"{out} holds a finished series ({SUMMARY}); choose another "
                              f"{spell('out')} for a new one")
        return
    if any(p.is_dir() and p.name.partition("-")[0] in ("seed", "split") for p in entries):
        raise ConfigError(f"{spell('out', str(out))} holds a series ({spell('repeats')}, "
                          f"{spell('split_seeds')}); a single run needs another {spell('out')}")
    if is_finished(out):
        raise ConfigError(f"{out} holds a finished run ({MODEL}); nothing to resume, "
                          f"choose another {spell('out')} for a new run")
    if (out / CHECKPOINT).is_file():
        if not resume:
            raise ConfigError(f"{out} holds an interrupted run ({CHECKPOINT}); pass "
                              f"{spell('resume', True)} to continue it, or choose another "
                              f"{spell('out')}")
        return
    if resume:
        raise ConfigError(f"{spell('resume', True)}: {out / CHECKPOINT} not found (nothing to "
                          "resume)")


@contextlib.contextmanager
def run_folder(out: Path, resume: bool, main: bool = True, series: bool = False
               ) -> Iterator[None]:
    """Check ``out`` (:func:`check_out`), then create and mark it and hold its lock for the
    block, so that two processes never write one run folder. Only the ``main`` process (rank 0
    under torchrun) writes, so only it locks.

    Raises:
        ConfigError: as :func:`check_out`, or another process is writing ``out``.
    """
    check_out(out, resume, series)
    if not main:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():  # out is new or empty (check_out): agiqa makes it a run
        write_text(out / MARKER, "an agiqa run folder: agiqa writes here\n")
    try:
        with exclusive_lock(out / LOCK, spell("out", str(out))):
            check_out(out, resume, series)  # again, under the lock: another process came first?
            yield
    except BaseException:
        # A run that failed before writing anything (a bad split, a model that did not load)
        # leaves no folder behind it made.
        if created and {p.name for p in out.iterdir()} <= {MARKER, LOCK}:
            for name in (LOCK, MARKER):
                (out / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


# -- the configuration a run started with, and what a resume may change -----------------------
# Options that cannot change what a run computes: a resume may give them anew. --epochs may
# grow (the schedule does not depend on it: the epochs already trained are those of a longer
# run), never shrink below what the run recorded.
RESUMABLE = frozenset({"resume", "progress", "loader_workers", "pixel_cache", "device",
                       "eval_batch_size", "concurrent_runs", "out", "repeats", "split_seeds"})
_PATHS = ("root", "labels", "cache", "backbone_weights")
# Options added after runs were first recorded, with the value a run that lacks them trained
# with: such a run resumes under that value, and is refused under another.
ADDED = {"image_key": "maniqa"}


def _comparable(training: dict[str, Any]) -> dict[str, Any]:
    out = dict(training)
    for k in _PATHS:
        if out.get(k) not in (None, ""):
            out[k] = str(Path(out[k]).expanduser().resolve())
    return out


def write_training(out: Path, training: dict[str, Any]) -> None:
    """Record the configuration a run starts with (``training.json``)."""
    write_json(out / TRAINING, {k: str(v) if isinstance(v, Path) else v
                                for k, v in training.items()})


def read_training(out: Path) -> dict[str, Any] | None:
    """The configuration a run started with; None for a run of agiqa 0.1 (no such file)."""
    path = out / TRAINING
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a training configuration")
    return data


def check_resume(out: Path, training: dict[str, Any]) -> None:
    """Refuse a ``--resume`` whose options would change the run recorded in ``out``.

    Raises:
        ConfigError: naming each changed option, its recorded and its new value.
    """
    recorded = read_training(out)
    if recorded is None:
        return  # a run of agiqa 0.1: its split is still compared (check_split_unchanged)
    new = _comparable({k: str(v) if isinstance(v, Path) else v for k, v in training.items()})
    old = _comparable({**ADDED, **recorded})
    changed = []
    for k in sorted(set(old) | set(new)):
        if k in RESUMABLE or old.get(k) == new.get(k):
            continue
        if k == "epochs" and isinstance(old.get(k), int) and isinstance(new.get(k), int) and \
                new[k] >= old[k]:
            continue
        changed.append(f"{k} {old.get(k)!r} -> {new.get(k)!r}")
    if changed:
        raise ConfigError(f"{spell('resume', True)}: {out} was started with other options "
                          f"({'; '.join(changed)}); a resume continues the same run: give the "
                          f"recorded options ({out / TRAINING}), or choose another "
                          f"{spell('out')} for a new run")


def check_split_unchanged(out: Path, split: Split) -> None:
    """Refuse a resume whose split differs from the run's ``split.csv``."""
    path = out / SPLIT
    if not path.is_file():
        return
    recorded = read_split_csv(path)
    if any(recorded.subset(s) != split.subset(s) for s in ("train", "val", "test")):
        raise ConfigError(f"{spell('resume', True)}: {path} holds another split than these "
                          f"options make (another {spell('split')}, {spell('split_seed')}, "
                          f"{spell('seed')} or labels file?); a resume continues the same run")


# -- config.json -------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """``config.json`` of a run folder (or of an imported official checkpoint), typed.

    Reads the files of agiqa 0.1 (the same keys, untyped). Keys this version does not know are
    kept in ``extra`` and written back.
    """

    model: dict[str, Any]
    architecture: str = "ma-agiqa"
    agiqa_version: str | None = None
    semantics: SemanticSpec | None = None
    fingerprint: str | None = None
    prompt_names: list[str] | None = None
    dim: int | None = None
    score_norm: dict[str, Any] | None = None
    semantic_norm: dict[str, Any] | None = None
    key_norm: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    backbone_weights: dict[str, Any] | None = None
    processes: int | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = CONFIG) -> RunConfig:
        """Raises CheckpointError (one line naming ``where``) for anything but an MA-AGIQA
        config."""
        if not isinstance(d, dict) or d.get("architecture") != "ma-agiqa":
            raise CheckpointError(f"{where}: not an MA-AGIQA model")
        if not isinstance(d.get("model"), dict):
            raise CheckpointError(f"{where}: no model arguments")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        try:
            if values.get("semantics"):
                values["semantics"] = SemanticSpec.from_dict(values["semantics"],
                                                             f"{where}: semantics")
            else:
                values.pop("semantics", None)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        for k, kind in (("training", dict), ("dataset", dict), ("prompt_names", list)):
            if k in values and not isinstance(values[k], kind):
                raise CheckpointError(f"{where}: {k} is not a {kind.__name__}")
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["semantics"] = self.semantics.to_dict() if self.semantics else None
        for k in ("dim",):
            if d[k] is None:
                del d[k]
        if not d["trust_remote_code"]:
            del d["trust_remote_code"]
        return {**d, **self.extra}

    @property
    def gate_names(self) -> list[str]:
        """The prompt names, or ``prompt1``… when none were recorded."""
        if self.prompt_names:
            return list(self.prompt_names)
        n = len(self.semantics.prompts) if self.semantics else int(self.model["num_prompts"])
        return [f"prompt{i + 1}" for i in range(n)]


def read_config(folder: Path) -> RunConfig:
    """The typed ``config.json`` of a run or model folder.

    Raises:
        CheckpointError: missing, not JSON, or not an MA-AGIQA config.
    """
    path = Path(folder) / CONFIG
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a model directory (needs {CONFIG} and "
                              f"{MODEL})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    return RunConfig.from_dict(data, path)


# -- predictions.csv ---------------------------------------------------------------------------
@dataclass
class Predictions:
    """The rows of a ``predictions.csv``: each image's key, subset, MOS, score, gates (the
    prompts' then the image expert's) and zero-shot score (None where not recorded: ``fit``'s
    files of agiqa 0.1 have no such column)."""

    keys: list[str]
    subsets: list[str]
    mos: list[float]
    scores: list[float]
    gates: list[list[float]]
    gate_names: list[str]  # the prompts' names, then "image"
    zero_shot: list[float | None]


def write_predictions(path: Path, keys: Sequence[str], subsets: Sequence[str], mos, scores, gates,
                      prompt_names: Sequence[str], zero_shot=None) -> None:
    """The one ``predictions.csv`` writer: ``key, subset, mos, score, gate_<prompt>…,
    gate_image, zero_shot`` (zero_shot empty where unknown)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["key", "subset", "mos", "score", *[f"gate_{n}" for n in prompt_names],
                        "gate_image", "zero_shot"])
            for i, k in enumerate(keys):
                z = "" if zero_shot is None else f"{float(zero_shot[i]):.6g}"
                w.writerow([k, subsets[i], f"{float(mos[i]):.6g}", f"{float(scores[i]):.6g}",
                            *[f"{float(g):.6g}" for g in gates[i]], z])


TABLE_LIMIT = 4 << 30  # bytes: a CSV table of agiqa (predictions, scores of millions of files)


def finite_number(text: str, where: str, column: str, allow_empty: bool = False
                  ) -> float | None:
    """A cell of a table agiqa wrote: a finite number (or None for an empty ``allow_empty``
    cell); anything else is a :class:`DatasetError` naming ``where`` and ``column``."""
    if allow_empty and text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: {column} is {text}, not a finite number")
    return value


def read_csv_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a CSV file agiqa wrote; one line naming the file otherwise."""
    try:  # a regular file within bounds: a FIFO never blocks the read
        rows = list(csv.reader(io.StringIO(read_text(path, TABLE_LIMIT, "CSV table"),
                                           newline="")))
    except (OSError, ValueError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read it as CSV ({e})") from None
    if not rows:
        raise DatasetError(f"{path}: empty file (no header)")
    return rows[0], rows[1:]


def gate_columns(path: Path, header: list[str], first: list[str],
                 prompt_names: Sequence[str] | None) -> list[str]:
    """The gate names of a header ``first + gate_* (image last) + [zero_shot]``, as
    ``predictions.csv`` and ``score-folder``'s files have it; any other header is refused."""
    gates = [c for c in header if c.startswith("gate_")]
    expected = [*first, *gates] + (["zero_shot"] if "zero_shot" in header else [])
    names = [g.removeprefix("gate_") for g in gates]
    if header != expected or not gates or names[-1] != "image" or \
            (prompt_names is not None and names != [*prompt_names, "image"]):
        want = ", ".join([*first, *(f"gate_{n}" for n in (prompt_names or ["..."])),
                          "gate_image"])
        raise DatasetError(f"{path}: unexpected columns {', '.join(header)} (expected {want}"
                           "[, zero_shot]); edited by hand or written by another version?")
    return names


def read_predictions(path: Path, prompt_names: Sequence[str] | None = None) -> Predictions:
    """Read a ``predictions.csv`` of ``fit`` or ``evaluate --out``, this version's or 0.1's
    (without the ``zero_shot`` column).

    Raises:
        DatasetError: any other layout, a bad number or a repeated key (one line: where, why).
    """
    header, body = read_csv_table(path)
    names = gate_columns(path, header, ["key", "subset", "mos", "score"], prompt_names)
    gates = [f"gate_{n}" for n in names]
    has_zero_shot = "zero_shot" in header
    p = Predictions([], [], [], [], [], names, [])
    seen: set[str] = set()
    for line, cells in enumerate(body, start=2):
        where = f"{path} line {line}"
        if len(cells) != len(header):
            raise DatasetError(f"{where}: {len(cells)} fields, the header has {len(header)}")
        key = cells[0]
        if not key:
            raise DatasetError(f"{where}: empty key")
        if key in seen:
            raise DatasetError(f"{where}: {key!r} is listed twice")
        seen.add(key)
        p.keys.append(key)
        p.subsets.append(cells[1])
        p.mos.append(finite_number(cells[2], where, "mos"))
        p.scores.append(finite_number(cells[3], where, "score"))
        p.gates.append([finite_number(c, where, g)
                        for c, g in zip(cells[4:4 + len(gates)], gates, strict=True)])
        p.zero_shot.append(finite_number(cells[-1], where, "zero_shot", allow_empty=True)
                           if has_zero_shot else None)
    return p


# -- metrics.json ------------------------------------------------------------------------------
def selection_text(selection: str) -> str:
    """How the run's epoch was chosen, as ``metrics.json`` records it."""
    if selection == "last":
        return "the last epoch (--selection last)"
    return "raw validation SRCC + Pearson PLCC"


def write_metrics(out: Path, test: dict[str, float], best_epoch: int, best_value: float,
                  selection: str, history: list[dict[str, Any]]) -> None:
    write_json(out / METRICS, {"test": test, "best_epoch": best_epoch,
                               "best_val_srcc_plcc": best_value,
                               "selection": selection_text(selection), "history": history})


def read_metrics(out: Path) -> dict[str, Any]:
    """``metrics.json`` of a finished run: ``test``, ``best_epoch``, ``history``…"""
    path = out / METRICS
    try:
        m = read_json(path)
        if not isinstance(m, dict) or not isinstance(m.get("test"), dict):
            raise ValueError("no test metrics")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not the metrics of a finished run ({e})") from None
    return m


def write_outputs(out: Path, keys: list[str], split: Split, targets, scores, gates,
                  prompt_names: list[str], metrics: dict[str, float], trainer: Any,
                  selection: str = "paper", zero_shot=None) -> None:
    """predictions.csv, metrics.json and the two plots of a finished run (the marker is the
    caller's, once the rest of the run is written)."""
    from agiqa.plots import plot_history, plot_scatter

    subset = {k: name for name in ("train", "val", "test") for k in split.subset(name)}
    write_predictions(out / PREDICTIONS, keys, [subset[k] for k in keys], targets.tolist(),
                      scores.tolist(), gates.tolist(), prompt_names,
                      None if zero_shot is None else zero_shot.tolist())
    write_metrics(out, metrics, trainer.best_epoch, trainer.best_value, selection,
                  trainer.history)
    test = [i for i, k in enumerate(keys) if subset[k] == "test"]
    plot_scatter(scores[test].numpy(), targets[test].numpy(), out / SCATTER_PLOT,
                 title=f"test SRCC {metrics['srcc']:.4f}  PLCC {metrics['plcc']:.4f}")
    plot_history(trainer.history, out / CURVES_PLOT)


# -- evaluate --out ----------------------------------------------------------------------------
def _agiqa_evaluation(out: Path) -> bool:
    """Whether ``out`` is a folder ``evaluate --out`` wrote (its marker, or agiqa 0.1's
    ``evaluation.json``, which records the version and the metrics)."""
    if (out / EVALUATION_MARKER).is_file():
        return True
    try:
        meta = read_json(out / EVALUATION)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and "agiqa_version" in meta and "metrics" in meta


def check_evaluation_out(out: Path, model_dir: Path) -> None:
    """Refuse an ``evaluate --out`` that would replace a file agiqa did not write there, or a
    run's own files; cheap, no writes.

    Raises:
        ConfigError: one line naming the folder and the reason.
    """
    out, model_dir = Path(out), Path(model_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{spell('out', str(out))} is a file, not a folder")
    if not out.is_dir():
        return
    with contextlib.suppress(OSError):
        if out.resolve() == model_dir.resolve():
            raise ConfigError(f"{spell('out', str(out))} is the model's own folder; evaluate "
                              f"writes {PREDICTIONS} and {EVALUATION}, which would replace the "
                              "run's: choose another folder")
    if (out / MARKER).is_file() or (out / CONFIG).is_file() or (out / MODEL).is_file():
        raise ConfigError(f"{spell('out', str(out))} is a run or model folder; choose another "
                          "folder for "
                          "the evaluation")
    ours = [n for n in (PREDICTIONS, EVALUATION) if (out / n).exists()]
    if ours and not _agiqa_evaluation(out):
        raise ConfigError(f"{spell('out', str(out))} holds {' and '.join(ours)} that agiqa "
                          "evaluate did not "
                          "write; choose another folder")


@contextlib.contextmanager
def evaluation_folder(out: Path, model_dir: Path) -> Iterator[Path]:
    """Check (:func:`check_evaluation_out`), create and mark an ``evaluate --out`` folder."""
    check_evaluation_out(out, model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / EVALUATION_MARKER).is_file():
        write_text(out / EVALUATION_MARKER, "an agiqa evaluation: agiqa evaluate writes here\n")
    yield out


def training_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as ``config.json``/``training.json`` record it (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
