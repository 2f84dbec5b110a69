"""The ``agiqa`` click group and what its commands share: error handling, options, output."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import click

from agiqa import __version__
from agiqa.errors import AgiqaError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Exit codes: 0 all fine, 1 error, 2 finished with some images failed, 64 usage error
# (EX_USAGE of sysexits.h; click's own 2 would read as "some images failed").
EXIT_OK, EXIT_ERROR, EXIT_IMAGES_FAILED, EXIT_USAGE = 0, 1, 2, 64


# Characters that would end a line, move the cursor or drive the terminal, and lone surrogates
# (the undecodable bytes of a non-UTF-8 file name, which stdout cannot encode).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: object) -> str:
    """``text`` for a line of plain output: control characters escaped as ``\\n``, ``\\x1b``
    …, so that a file name cannot forge a line or drive the terminal (CSV and JSON output
    carry names exactly)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                            str(text))


def handle_errors(fn):
    """Turn agiqa's errors, and the operating system's, into one ``Error: …`` line (exit 1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AgiqaError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None

    return wrapper


class AgiqaGroup(click.Group):
    """A click group whose usage errors exit with :data:`EXIT_USAGE`, in every subcommand."""

    group_class = type  # subgroups (``agiqa cache``) are AgiqaGroups too

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            e.exit_code = EXIT_USAGE
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            e.exit_code = EXIT_USAGE
            raise


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


@click.group(cls=AgiqaGroup, context_settings=CONTEXT)
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


def print_metrics_table(summary: dict, label: str = "run directory") -> None:
    click.echo(f"{'':10s}{'SRCC':>9s}{'PLCC':>9s}{'KRCC':>9s}{'RMSE':>9s}")
    for name, m in summary["rows"].items():
        cells = "".join(f"{m[k]:9.4f}" for k in ("srcc", "plcc", "krcc", "rmse"))
        click.echo(f"{name:10s}{cells}")
    click.echo(f"{label}: {summary['out']}")
