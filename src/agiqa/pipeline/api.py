"""The Python API: one function per command, each taking that command's config dataclass.

Every command of the ``agiqa`` tool has a config dataclass whose fields are its options
(:class:`ExtractConfig`, :class:`FitConfig`, :class:`EvaluateConfig`, :class:`ScoreConfig`,
:class:`ReportConfig`). Each function takes that config, or its main input as the first
argument and the other fields as keyword arguments, and returns a typed result with a
``to_dict()`` (what the command's ``--json`` prints)::

    import agiqa

    report = agiqa.extract_semantics("imgs/", out="cache/", mllm="tiny-llava")
    result = agiqa.fit(dataset="csv", root="imgs/", labels="imgs/labels.csv", cache="cache/",
                       out="run/", recipe="cpu", epochs=5)
    metrics = agiqa.evaluate("run/", dataset="csv", root="imgs/", labels="imgs/labels.csv",
                             cache="cache/")
    scores = agiqa.score_folder("new/", model="run/")
    agiqa.fit(agiqa.FitConfig(dataset="csv", root="imgs/", cache="cache/", out="run-2/"))

A keyword that is not an option raises :class:`~agiqa.errors.ConfigError` with the close names
(``fit(epoch=3)``: ``did you mean 'epochs'?``); values are checked against the same types,
choices and bounds as on the command line.

``agiqa.experiment(plan, out=...)`` (``agiqa experiment``, :class:`ExperimentConfig`) runs a
plan of such runs and returns the table (:class:`ExperimentTable`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from agiqa.data.datasets import load_dataset
from agiqa.errors import ConfigError, UsageError
from agiqa.options import check_known, cli_naming, spell
from agiqa.pipeline.experiment import ExperimentTable, experiment
from agiqa.presets import load_options_recipe
from agiqa.report.html import ReportResult
from agiqa.stages.configs import (
    EvaluateConfig,
    ExperimentConfig,
    ExtractConfig,
    FitConfig,
    ReportConfig,
    ScoreConfig,
)
from agiqa.stages.extraction.extract import ExtractReport, ImageSource
from agiqa.stages.extraction.extract import extract_semantics as _extract
from agiqa.stages.scoring.evaluate import EvaluateResult, evaluate_model, run_label_columns
from agiqa.stages.scoring.results import ScoreReport
from agiqa.stages.scoring.scorer import Scorer
from agiqa.stages.training.fit import FitResult, fit_repeats

__all__ = ["EvaluateConfig", "EvaluateResult", "ExperimentConfig", "ExperimentTable",
           "ExtractConfig", "FitConfig",
           "FitResult", "ReportConfig", "ScoreConfig", "evaluate", "experiment",
           "extract_semantics", "fit", "image_source", "score_folder", "write_report"]

C = TypeVar("C")


def _config(cls: type[C], first: Any, name: str | None, fields: dict[str, Any], command: str,
            recipes: bool = False) -> C:
    """``first`` as the config itself, or as the field ``name``, with ``fields`` added; with
    ``recipes``, ``recipe=NAME`` fills the fields not given from a recipe preset."""
    if isinstance(first, cls):
        if fields:
            raise ConfigError(f"give a {cls.__name__} or its fields as keywords, not both")
        return first
    fields = dict(fields)
    recipe = fields.pop("recipe", None) if recipes else None
    check_known(cls, fields, command)
    if first is not None:
        if name is None:
            raise ConfigError(f"the first argument must be a {cls.__name__}; give the rest as "
                              "keywords")
        if name in fields:
            raise ConfigError(f"{name} given twice")
        fields = {name: first, **fields}
    if recipe is not None:
        preset = load_options_recipe(recipe, command)
        check_known(cls, preset.options, f"recipe {recipe}")
        fields = {**preset.options, **fields}
    return cls(**fields)


def image_source(cfg: ExtractConfig) -> ImageSource:
    """The images of stage one: a folder's (``images``), or a data set's label file's."""
    if (cfg.images is None) == (cfg.dataset is None):
        raise UsageError("give either --images DIR or --dataset NAME --root DIR" if cli_naming()
                         else "give either images= (a folder) or dataset= and root=")
    if cfg.images is not None:
        return ImageSource.from_folder(cfg.images, exclude=cfg.out)
    if cfg.root is None:
        raise UsageError(f"{spell('root')} is required with {spell('dataset')}")
    return ImageSource.from_dataset(load_dataset(
        cfg.dataset, cfg.root, cfg.labels, cfg.target, cfg.image_column, cfg.score_column,
        require_scores=False))


def extract_semantics(images: ExtractConfig | str | os.PathLike | None = None, /,
                      **fields: Any) -> ExtractReport:
    """Stage one (``agiqa extract-semantics``): fill the cache ``out`` with the semantic
    vectors of a folder's images (``images``) or of a data set's (``dataset``, ``root``), from
    the MLLM ``mllm``."""
    cfg = _config(ExtractConfig, images, "images", fields, "extract-semantics")
    return run_extraction(cfg, image_source(cfg))


def run_extraction(cfg: ExtractConfig, source: ImageSource) -> ExtractReport:
    """Stage one on ``cfg.engine``: this process (the static split of ``--workers`` /
    ``--worker`` or ``torchrun``) or a Ray cluster; Ray is imported only for the latter."""
    if cfg.engine == "ray":
        from agiqa.pipeline.ray_engine import extract_on_ray

        return extract_on_ray(cfg, source)
    return _extract(cfg, source)


def fit(config: FitConfig | None = None, /, **fields: Any) -> FitResult:
    """Stage two (``agiqa fit``): train on cached vectors; each run's test metrics and selected
    epoch, and their mean ± sample std over ``repeats`` or ``split_seeds`` runs
    (:class:`FitResult`; one run is a series of one). ``recipe="cpu"`` (a recipe preset of fit)
    fills the options not given."""
    return fit_repeats(_config(FitConfig, config, None, fields, "fit", recipes=True))


def evaluate(model: EvaluateConfig | str | os.PathLike | None = None, /,
             **fields: Any) -> EvaluateResult:
    """``agiqa evaluate``: SRCC, PLCC, KRCC and RMSE of a trained model (a run folder) on a
    split of a data set, with vectors from ``cache``."""
    cfg = _config(EvaluateConfig, model, "model", fields, "evaluate")
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
    images that cannot be scored are listed in the report's ``failures``. With ``out`` the rows
    are written to a ``.csv`` or ``.json`` file; with ``report`` an HTML page too."""
    cfg = _config(ScoreConfig, folder, "folder", fields, "score-folder")
    _check_score_outputs(cfg)
    if cfg.engine == "ray":
        from agiqa.pipeline.ray_engine import score_on_ray

        report, model = score_on_ray(cfg), None
    else:
        scorer = Scorer.from_pretrained(
            cfg.model, cache_dir=cfg.cache, device=cfg.device, batch_size=cfg.batch_size,
            loader_workers=cfg.loader_workers, progress=cfg.progress, amp=cfg.amp,
            revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        report, model = scorer.score_folder(cfg.folder, cfg.recursive), scorer.model
    if cfg.out is not None:
        report.write(cfg.out)
        report.out = cfg.out
    if cfg.report is not None:
        if model is None:
            from agiqa.models.agiqa_net import load_model

            model = load_model(cfg.model)
        report.html = _score_report(report, cfg, model)
    return report


def _report_table(cfg: ScoreConfig) -> Path:
    """The CSV a score report links: ``out`` if that is a CSV, else one beside the page."""
    if cfg.out is not None and cfg.out.suffix.lower() == ".csv":
        return Path(cfg.out)
    return Path(cfg.report).with_suffix(".csv")


def _check_score_outputs(cfg: ScoreConfig) -> None:
    """Checked before any work (the model is not even loaded): nothing of the user's is ever
    replaced, by the scores, the page or the CSV beside it."""
    from agiqa.report.html import check_report_output
    from agiqa.stages.scoring.results import check_score_output

    if cfg.out is not None:
        check_score_output(cfg.out, spell("out"))
    if cfg.report is not None:
        check_report_output(cfg.report, spell("report"))
        check_score_output(_report_table(cfg),
                           f"{spell('report')} (the CSV of every score, beside the page)")


def _score_report(report: ScoreReport, cfg: ScoreConfig, model) -> ReportResult:
    """The HTML report of a scored folder; it links a CSV of every score (``out`` if that is
    a CSV, else one written beside the report)."""
    from agiqa.report.html import score_rows, write_score_report

    html = Path(cfg.report)
    table = _report_table(cfg)
    if table != cfg.out:
        report.write(table)
    rows, gate_names = score_rows(report.rows, cfg.folder)
    href = Path(os.path.relpath(table.resolve(), html.resolve().parent)).as_posix()
    return write_score_report(rows, report.failures, html, gate_names, model, cfg.report_top_k,
                              csv_href=href, source=str(cfg.folder))


def write_report(source: ReportConfig | str | os.PathLike | None = None, /,
                 **fields: Any) -> ReportResult:
    """``agiqa report``: one self-contained HTML page of a run folder, a folder of
    ``evaluate(out=...)``, or a score file of ``score_folder(out=...)`` (with ``images``)."""
    from agiqa.report.html import write_run_report, write_score_file_report

    cfg = _config(ReportConfig, source, "source", fields, "report")
    if cfg.source.is_dir():
        return write_run_report(cfg.source, cfg.out, cfg.root, cfg.cache, cfg.max_images,
                                cfg.maps, cfg.device)
    return write_score_file_report(cfg.source, cfg.images, cfg.out,
                                   cfg.model if cfg.maps else None, cfg.top_k, cfg.device)
