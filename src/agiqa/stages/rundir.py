"""The run directory of ``agiqa fit``: whether ``--out`` may be used; a finished run's files."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agiqa.data.splits import Split
from agiqa.errors import ConfigError
from agiqa.fileio import atomic_path, exclusive_lock, write_json, write_text

__all__ = ["MARKER", "RUN_FILES", "check_out", "run_folder", "write_outputs"]

# agiqa writes only into a run folder it made: it marks it with this file when it creates it,
# and holds a lock on LOCK while it writes there.
MARKER = ".agiqa-run"
LOCK = ".agiqa-run.lock"

# What a run directory holds; ``seed-*``/``split-*`` are the runs of --repeats/--split-seeds.
RUN_FILES = frozenset({
    "model.safetensors", "config.json", "metrics.json", "predictions.csv", "split.csv",
    "train_log.jsonl", "scatter_test.png", "training_curves.png", "checkpoint.pt",
    "summary.json",
})


def _is_run_entry(p: Path) -> bool:
    if p.name in RUN_FILES or p.name in (MARKER, LOCK) or \
            (p.name.startswith(".") and p.name.endswith(".tmp")):
        return True
    return p.is_dir() and p.name.partition("-")[0] in ("seed", "split")


def check_out(out: Path, resume: bool) -> None:
    """Refuse an ``--out`` that would mix runs or clobber unrelated files; cheap, no writes.

    A new or empty folder, or a run folder agiqa made (marked with ``.agiqa-run``) holding only
    files of a run killed before its first checkpoint, starts a new run. ``checkpoint.pt``
    needs ``--resume``; a finished run (``model.safetensors`` without a checkpoint), any folder
    holding other files, and a non-empty folder agiqa did not mark (whatever its files are
    named) are refused: agiqa never replaces a file it did not write.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not (out / MARKER).is_file():
        shown = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"--out {out} is not empty and agiqa did not make it (it holds "
                          f"{shown}; no {MARKER} file); choose a new or empty folder")
    foreign = [p.name for p in entries if not _is_run_entry(p)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(f"--out {out} is not empty and is not an agiqa run (it holds {shown}); "
                          "choose a new or empty folder")
    if (out / "checkpoint.pt").is_file():
        if not resume:
            raise ConfigError(f"{out} holds an interrupted run (checkpoint.pt); pass --resume to "
                              "continue it, or choose another --out")
        return
    if (out / "model.safetensors").is_file():
        raise ConfigError(f"{out} holds a finished run (model.safetensors); nothing to resume, "
                          "choose another --out for a new run")
    if resume:
        raise ConfigError(f"--resume: {out / 'checkpoint.pt'} not found (nothing to resume)")


@contextlib.contextmanager
def run_folder(out: Path, resume: bool, main: bool = True) -> Iterator[None]:
    """Check ``out`` (:func:`check_out`), then create and mark it and hold its lock for the
    block, so that two processes never write one run folder. Only the ``main`` process (rank 0
    under torchrun) writes, so only it locks.

    Raises:
        ConfigError: as :func:`check_out`, or another process is writing ``out``.
    """
    check_out(out, resume)
    if not main:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():  # out is new or empty (check_out): agiqa makes it a run
        write_text(out / MARKER, "an agiqa run folder: agiqa writes here\n")
    try:
        with exclusive_lock(out / LOCK, f"--out {out}"):
            check_out(out, resume)  # again, under the lock: another process may have come first
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


def write_outputs(out: Path, keys: list[str], split: Split, targets, scores, gates,
                  prompt_names: list[str], metrics: dict[str, float], trainer: Any) -> None:
    """predictions.csv, metrics.json and the two plots of a finished run."""
    from agiqa.plots import plot_history, plot_scatter

    subset = {k: name for name in ("train", "val", "test") for k in split.subset(name)}
    with atomic_path(out / "predictions.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["key", "subset", "mos", "score",
                        *[f"gate_{n}" for n in prompt_names], "gate_image"])
            for i, k in enumerate(keys):
                w.writerow([k, subset[k], f"{targets[i]:.6g}", f"{scores[i]:.6g}",
                            *[f"{g:.6g}" for g in gates[i].tolist()]])
    write_json(out / "metrics.json", {"test": metrics, "best_epoch": trainer.best_epoch,
                                      "best_val_srcc_plcc": trainer.best_value,
                                      "selection": "raw validation SRCC + Pearson PLCC",
                                      "history": trainer.history})
    test = [i for i, k in enumerate(keys) if subset[k] == "test"]
    plot_scatter(scores[test].numpy(), targets[test].numpy(), out / "scatter_test.png",
                 title=f"test SRCC {metrics['srcc']:.4f}  PLCC {metrics['plcc']:.4f}")
    plot_history(trainer.history, out / "training_curves.png")
