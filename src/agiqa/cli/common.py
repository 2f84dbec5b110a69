"""The ``agiqa`` click group and what its commands share: error handling, options, output."""

from __future__ import annotations

import functools
import json
import re

import click

from agiqa import __version__
from agiqa.errors import AgiqaError, UsageError
from agiqa.options import cli_names

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
    """Turn agiqa's errors, and the operating system's, into one ``Error: …`` line (exit 1; a
    :class:`~agiqa.errors.UsageError` exits 64). Within the command, messages name options by
    their flags (:func:`agiqa.options.cli_names`)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with cli_names():
                return fn(*args, **kwargs)
        except UsageError as e:
            raise click.UsageError(str(e)) from None
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


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@click.group(cls=AgiqaGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="agiqa")
def cli():
    """agiqa: judge the quality of AI-generated images the MA-AGIQA way.

    \b
    Stage one  agiqa extract-semantics --mllm mplug-owl2 --images DIR --out CACHE
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
