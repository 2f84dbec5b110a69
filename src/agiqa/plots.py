"""PNG plots of a run: predictions against MOS with the fitted logistic, and training curves."""

from __future__ import annotations

import os

import numpy as np

from agiqa.fileio import atomic_path
from agiqa.metrics import fit_logistic, logistic

__all__ = ["plot_history", "plot_scatter"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_scatter(pred, mos, path: str | os.PathLike, title: str = "") -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(pred, mos, s=8, alpha=0.6)
    if len(pred) >= 4:
        _, beta = fit_logistic(pred, mos)
        xs = np.linspace(np.min(pred), np.max(pred), 200)
        ax.plot(xs, logistic(xs, *beta), color="C3", label="4-parameter logistic")
        ax.legend(loc="lower right")
    ax.set_xlabel("predicted score")
    ax.set_ylabel("MOS")
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)


def plot_history(history: list[dict], path: str | os.PathLike) -> None:
    plt = _figure()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("training MSE")
    b.plot(epochs, [h["val_srcc"] for h in history], marker="o", label="SRCC")
    b.plot(epochs, [h["val_plcc"] for h in history], marker="o", label="PLCC")
    b.set_xlabel("epoch")
    b.set_ylabel("validation")
    b.legend()
    _save(fig, path)
    plt.close(fig)
