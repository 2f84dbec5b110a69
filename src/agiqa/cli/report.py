"""HTML reports: ``agiqa report``."""

from __future__ import annotations

from pathlib import Path

import click

from agiqa.cli.common import CONTEXT, cli, echo_json, handle_errors


@cli.command("report", context_settings=CONTEXT)
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file, new or a report agiqa wrote [default: SOURCE/report.html for a "
              "folder, SOURCE with .html for a score file].")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Image root of a run, if not where the run records it.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Semantic cache for the zero-shot scores of a run, if not "
              "where the run records it.")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The scored folder (needed for a score file).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="The model that scored a score file, for the patch maps.")
@click.option("--max-images", type=click.IntRange(min=1), default=100, show_default=True,
              help="Run: the images shown, largest absolute error first.")
@click.option("--top-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Score file: the lowest and the highest K scores shown.")
@click.option("--maps/--no-maps", default=True, show_default=True,
              help="Compute the patch maps of the shown images (a backbone pass each).")
@click.option("--device", default="auto", show_default=True,
              help="Where the patch maps are computed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def report_cmd(source, out, root, cache_dir, images, model_dir, max_images, top_k, maps,
               device, as_json):
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
    from agiqa.report.html import REPORT_SUFFIXES, write_run_report, write_score_file_report

    if out is not None and out.suffix.lower() not in REPORT_SUFFIXES:
        raise click.BadParameter(f"{out} does not end in .html; a report is an HTML page",
                                 param_hint="--out")
    if source.is_dir():
        result = write_run_report(source, out, root, cache_dir, max_images, maps, device)
    else:
        if images is None:
            raise click.UsageError("--images DIR is required with a score file (the folder "
                                   "that was scored)")
        result = write_score_file_report(source, images, out, model_dir if maps else None,
                                         top_k, device)
    if as_json:
        echo_json({"out": str(result.out), "images_shown": result.images_shown,
                   "images_total": result.images_total, "bytes": result.bytes})
    else:
        click.echo(f"{result.out}: {result.images_shown} of {result.images_total} images, "
                   f"{result.bytes / 1e6:.2f} MB")
