"""HTML reports: ``agiqa report``."""

from __future__ import annotations

import click

from agiqa.cli.common import CONTEXT, cli, echo_json, handle_errors
from agiqa.cli.options import config_from, config_options, json_option
from agiqa.stages.configs import ReportConfig


@cli.command("report", context_settings=CONTEXT)
@config_options(ReportConfig)
@json_option("Print the result as JSON.")
@handle_errors
def report_cmd(as_json, **values):
    """One self-contained HTML page of a run, an evaluation or a score file.

    SOURCE is a run directory of fit, a folder of evaluate --out, or the --out file (CSV or
    JSON) of score-folder. The page needs no network: thumbnails, patch maps and plots are
    embedded.

    \b
    Examples:
      agiqa report runs/3k
      agiqa report eval-2023/ --out eval-2023.html
      agiqa report scores.csv --images ./generated --model runs/3k
    """
    from agiqa.pipeline.api import write_report

    result = write_report(config_from(ReportConfig, values))
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"{result.out}: {result.images_shown} of {result.images_total} images, "
                   f"{result.bytes / 1e6:.2f} MB")
