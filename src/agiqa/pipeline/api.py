"""The Python API: one function per command, each taking that command's config dataclass.

Every command of the ``agiqa`` tool has a config dataclass whose fields are its options
(:class:`ExtractConfig`, :class:`FitConfig`, :class:`EvaluateConfig`, :class:`ScoreConfig`).
Each function takes that config, or its main input as the first argument and the other fields
as keyword arguments::

    import agiqa

    report = agiqa.extract_semantics("imgs/", out="cache/", model="tiny-llava")
    result = agiqa.fit(dataset="csv", root="imgs/", labels="imgs/labels.csv", cache="cache/",
                        out="run/", backbone="tiny", epochs=5)
    metrics = agiqa.evaluate("run/", dataset="csv", root="imgs/", labels="imgs/labels.csv",
                             cache="cache/")
    scores = agiqa.score_folder("new/", model="run/")
    agiqa.fit(agiqa.FitConfig(dataset="csv", root="imgs/", cache="cache/", out="run-2/"))
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from agiqa.data.datasets import load_dataset
from agiqa.errors import ConfigError
from agiqa.stages.configs import EvaluateConfig, FitConfig, ScoreConfig
from agiqa.stages.extraction.extract import ExtractConfig, ExtractReport, ImageSource
from agiqa.stages.extraction.extract import extract_semantics as _extract
from agiqa.stages.scoring.evaluate import evaluate_model, run_label_columns
from agiqa.stages.scoring.results import ScoreReport
from agiqa.stages.scoring.scorer import Scorer
from agiqa.stages.training.fit import FitResult, fit_repeats

__all__ = ["EvaluateConfig", "ExtractConfig", "FitConfig", "FitResult", "ScoreConfig", "evaluate",
           "extract_semantics", "fit", "score_folder"]

C = TypeVar("C")


def _config(cls: type[C], first: Any, name: str | None, fields: dict[str, Any]) -> C:
    """``first`` as the config itself, or as the field ``name``, with ``fields`` added."""
    if isinstance(first, cls):
        if fields:
            raise ConfigError(f"give a {cls.__name__} or its fields as keywords, not both")
        return first
    if first is not None:
        if name is None:
            raise ConfigError(f"the first argument must be a {cls.__name__}; give the rest as "
                              "keywords")
        if name in fields:
            raise ConfigError(f"{name} given twice")
        fields = {name: first, **fields}
    return cls(**fields)


def extract_semantics(images: ExtractConfig | str | os.PathLike | None = None, /,
                      **fields: Any) -> ExtractReport:
    """Stage one (``agiqa extract-semantics``): fill the cache ``out`` with the semantic
    vectors of a folder's images (``images``) or of a data set's (``dataset``, ``root``)."""
    cfg = _config(ExtractConfig, images, "images", fields)
    if (cfg.images is None) == (cfg.dataset is None):
        raise ConfigError("give either images (a folder) or dataset and root")
    if cfg.images is not None:
        source = ImageSource.from_folder(cfg.images, exclude=cfg.out)
    else:
        if cfg.root is None:
            raise ConfigError("root is required with dataset")
        source = ImageSource.from_dataset(load_dataset(
            cfg.dataset, cfg.root, cfg.labels, image_column=cfg.image_column,
            require_scores=False))
    return _extract(cfg, source)


def fit(config: FitConfig | None = None, /, **fields: Any) -> FitResult:
    """Stage two (``agiqa fit``): train on cached vectors; each run's test metrics and selected
    epoch, and their mean ± sample std over ``repeats`` or ``split_seeds`` runs
    (:class:`FitResult`; one run is a series of one)."""
    return fit_repeats(_config(FitConfig, config, None, fields))


def evaluate(model: EvaluateConfig | str | os.PathLike | None = None, /,
             **fields: Any) -> dict[str, Any]:
    """``agiqa evaluate``: SRCC, PLCC, KRCC and RMSE of a model (a run folder) on a split of a
    data set, with vectors from ``cache``."""
    cfg = _config(EvaluateConfig, model, "model", fields)
    columns = {"image_column": cfg.image_column, "score_column": cfg.score_column,
               "target": cfg.target}
    if not any(columns.values()):  # the run's own label file: the columns it was trained with
        columns.update(run_label_columns(cfg.model, cfg.dataset, cfg.root, cfg.labels))
    ds = load_dataset(cfg.dataset, cfg.root, cfg.labels, columns["target"],
                      columns["image_column"], columns["score_column"])
    return evaluate_model(cfg.model, ds, cfg.cache, cfg.split, cfg.device, cfg.batch_size,
                          cfg.loader_workers, cfg.progress, cfg.amp, cfg.out)


def score_folder(folder: ScoreConfig | str | os.PathLike | None = None, /,
                 **fields: Any) -> ScoreReport:
    """``agiqa score-folder``: score every image of ``folder`` with the trained ``model``;
    images that cannot be scored are listed in the report's ``failures``."""
    cfg = _config(ScoreConfig, folder, "folder", fields)
    scorer = Scorer.from_pretrained(cfg.model, cache_dir=cfg.cache, device=cfg.device,
                                    batch_size=cfg.batch_size, loader_workers=cfg.loader_workers,
                                    progress=cfg.progress, amp=cfg.amp, revision=cfg.revision,
                                    trust_remote_code=cfg.trust_remote_code)
    return scorer.score_folder(cfg.folder, cfg.recursive)
