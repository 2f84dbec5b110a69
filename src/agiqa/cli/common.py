"""The ``agiqa`` click group and what its commands share: error handling, options, output."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from agiqa import __version__
from agiqa.errors import AgiqaError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AgiqaError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def dataset_options(fn):
    """--dataset/--root/--labels/--target/--image-column/--score-column."""
    opts = [
        click.option("--dataset", "dataset", default=None,
                     help="Data set preset: agiqa-3k, aigciqa-20k, aigciqa2023, koniq-10k, spaq, "
                          "csv."),
        click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Folder the label file's image paths are relative to."),
        click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Label file (default: the preset's file inside --root)."),
        click.option("--target", default=None,
                     help="Score to learn, e.g. mos_quality (default) or mos_align for AGIQA-3K."),
        click.option("--image-column", default=None, help="Image path column (csv preset)."),
        click.option("--score-column", default=None, help="Score column (csv preset)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def dataset_from_options(dataset, root, labels, target, image_column, score_column,
                         require_scores=True):
    from agiqa.data.datasets import load_dataset

    if root is None:
        raise click.BadParameter("--root is required with --dataset", param_hint="--root")
    return load_dataset(dataset, root, labels, target, image_column, score_column,
                        require_scores=require_scores)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="agiqa")
def cli():
    """agiqa: judge the quality of AI-generated images the MA-AGIQA way.

    \b
    Stage one  agiqa extract-semantics --model mplug-owl2 --images DIR --out CACHE
    Stage two  agiqa fit --dataset agiqa-3k --root DIR --cache CACHE --out RUN
    Evaluate   agiqa evaluate --model RUN --dataset agiqa-3k --root DIR --cache CACHE
    Score      agiqa score-folder DIR --model RUN
    Try it     agiqa demo
    """


def print_metrics_table(summary: dict) -> None:
    click.echo(f"{'':10s}{'SRCC':>9s}{'PLCC':>9s}{'KRCC':>9s}{'RMSE':>9s}")
    for name, m in summary["rows"].items():
        cells = "".join(f"{m[k]:9.4f}" for k in ("srcc", "plcc", "krcc", "rmse"))
        click.echo(f"{name:10s}{cells}")
    click.echo(f"run directory: {summary['out']}")
