"""Inference and the demo: ``agiqa score-folder``, ``agiqa demo``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from agiqa.cli.common import (
    CONTEXT,
    cli,
    echo_json,
    handle_errors,
    print_metrics_table,
    printable,
)


# -- inference ---------------------------------------------------------------------------------
@cli.command("score-folder", context_settings=CONTEXT)
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A run directory or an imported official checkpoint.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Semantic cache to use and fill (default: one per MLLM "
              "fingerprint under $AGIQA_HOME, ~/.cache/agiqa).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the scores to a .csv or .json file.")
@click.option("--report", "report_html", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write an HTML report: gallery, histogram with a threshold "
              "slider, failures, gates and patch maps.")
@click.option("--report-top-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="The report shows the K lowest and K highest scores (and links the CSV).")
@click.option("--recursive/--no-recursive", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--loader-workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--revision", default=None,
              help="MLLM revision to load [default: the one the model was trained with].")
@click.option("--trust-remote-code/--no-trust-remote-code", default=None,
              help="Allow the MLLM repository's own code [default: as the model records].")
@click.option("--amp", is_flag=True, help="bf16 autocast of the scoring forward (not the "
              "paper's float32).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print rows and summary as JSON.")
@handle_errors
def score_folder_cmd(folder, model_dir, cache_dir, out, report_html, report_top_k, recursive,
                     device, batch_size, loader_workers, revision, trust_remote_code, amp, quiet,
                     as_json):
    """Score every image of a folder with a trained model.

    Stage one runs only for images the cache lacks, with the MLLM of the model's fingerprint
    at the revision it records. A --cache that extract-semantics filled for this folder is
    reused as it is; an image changed since then is computed again. Broken files are named
    with their reason; the exit status is then 2.

    \b
    Examples:
      agiqa score-folder ./generated --model runs/3k --out scores.csv
      agiqa score-folder ./generated --model runs/3k --cache cache/ --json
      agiqa score-folder ./generated --model runs/3k --out scores.csv --report scores.html
    """
    from agiqa.report.html import REPORT_SUFFIXES, check_report_output
    from agiqa.stages.scoring.results import SCORE_SUFFIXES, check_score_output
    from agiqa.stages.scoring.scorer import Scorer

    if report_html is not None and report_html.suffix.lower() not in REPORT_SUFFIXES:
        raise click.BadParameter(f"{report_html} does not end in .html", param_hint="--report")
    if out is not None and out.suffix.lower() not in SCORE_SUFFIXES:
        raise click.BadParameter(f"{out} does not end in .csv or .json", param_hint="--out")
    # Checked before any work: nothing of the user's is ever replaced.
    if out is not None:
        check_score_output(out)
    if report_html is not None:
        check_report_output(report_html, "--report")
        check_score_output(_report_table(out, report_html),
                           "--report (the CSV of every score, beside the page)")
    scorer = Scorer.from_pretrained(model_dir, cache_dir=cache_dir, device=device,
                                    batch_size=batch_size, loader_workers=loader_workers,
                                    progress=not quiet and not as_json, amp=amp,
                                    revision=revision, trust_remote_code=trust_remote_code)
    report = scorer.score_folder(folder, recursive)
    if out is not None:
        report.write(out)
    if report_html is not None:
        _write_report(report, folder, scorer.model, out, report_html, report_top_k, as_json)
    summary = report.summary()
    if as_json:
        echo_json(report.to_dict())
    else:
        if out is None:
            for r in report.rows:
                click.echo(f"{r['score']:9.4f}  {printable(r['path'])}")
        mean = "-" if summary["mean"] is None else f"{summary['mean']:.4f}"
        lo = "-" if summary["min"] is None else f"{summary['min']:.4f}"
        hi = "-" if summary["max"] is None else f"{summary['max']:.4f}"
        click.echo(f"count {summary['count']}  mean {mean}  min {lo}  max {hi}  "
                   f"failed {summary['failed']}" + (f"  -> {out}" if out else ""))
    if report.changed:
        more = f" and {len(report.changed) - 5} more" if len(report.changed) > 5 else ""
        click.echo(f"recomputed {len(report.changed)} image(s) that changed since their vectors "
                   "were cached: " + ", ".join(map(printable, report.changed[:5])) + more,
                   err=True)
    for path, reason in sorted(report.failures.items()):
        click.echo(f"failed: {printable(path)}: {printable(reason)}", err=True)
    if report.skipped_files:
        click.echo(f"skipped {len(report.skipped_files)} file(s) that are not images (or whose "
                   "names are not UTF-8): " + ", ".join(map(printable, report.skipped_files[:5])),
                   err=True)
    sys.exit(report.exit_code)


def _report_table(out: Path | None, html: Path) -> Path:
    """The CSV a score report links: ``--out`` if that is a CSV, else one beside the page."""
    return out if out is not None and out.suffix.lower() == ".csv" else html.with_suffix(".csv")


def _write_report(report, folder: Path, model, out: Path | None, html: Path, top_k: int,
                  as_json: bool) -> None:
    """The HTML report of a scored folder; it links a CSV of every score (``--out`` if that is
    a CSV, else one written beside the report)."""
    from agiqa.report.html import score_rows, write_score_report

    table = _report_table(out, html)
    if table != out:
        report.write(table)
    rows, gate_names = score_rows(report.rows, folder)
    href = Path(os.path.relpath(table.resolve(), html.resolve().parent)).as_posix()
    result = write_score_report(rows, report.failures, html, gate_names, model, top_k,
                                csv_href=href, source=str(folder))
    if not as_json:
        click.echo(f"report: {result.out} ({result.images_shown} of {result.images_total} "
                   f"images, {result.bytes / 1e6:.2f} MB)", err=True)


@cli.command("demo", context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="agiqa-demo",
              show_default=True, help="Folder for the demo's models, images, cache and run.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs [default: the demo's own, about a minute on a CPU].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def demo_cmd(out, epochs, quiet, as_json):
    """The whole pipeline offline on a CPU, in a few minutes, with tiny random models.

    Builds a tiny LLaVA, makes a labelled set from real photographs that ship with
    scikit-image and scikit-learn (blurred in six grades; the MOS falls with the blur), then
    runs extract-semantics, fit (the CPU recipe: frozen tiny backbone, MoE head trained),
    evaluate and score-folder on a photograph the model never saw. The tiny models are random:
    the numbers show the pipeline learning image damage, not the judgement of a real MLLM.
    --out must be new, empty or an earlier demo's folder; nothing else in it is deleted.

    \b
    Example:
      agiqa demo --out /tmp/agiqa-demo
    """
    from agiqa.pipeline.demo import CAVEAT, DEMO_EPOCHS, run_demo

    log = (lambda *_: None) if as_json else click.echo
    result = run_demo(out, epochs=epochs or DEMO_EPOCHS, progress=not (quiet or as_json),
                      log=log)
    if as_json:
        echo_json(result.to_dict())
        return
    print_metrics_table({"rows": result.metrics, "out": result.out / "run"})
    click.echo(CAVEAT)
    click.echo("plots: " + "  ".join(str(p) for p in result.plots))
    click.echo(f"scores of the unseen photograph -> {result.scores_csv}")
    for row in result.unseen:
        click.echo(f"  {row['score']:7.3f}  {row['path']}")
    click.echo(result.unseen_note)
    total = sum(result.seconds.values())
    click.echo(f"finished in {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                 result.seconds.items()) + ")")
