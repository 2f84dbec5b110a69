"""Inference and the demo: ``agiqa score-folder``, ``agiqa demo``."""

from __future__ import annotations

import sys

import click

from agiqa.cli.common import (
    CONTEXT,
    cli,
    echo_json,
    handle_errors,
    print_metrics_table,
    printable,
)
from agiqa.cli.options import config_from, config_options, json_option
from agiqa.stages.configs import DemoConfig, ScoreConfig


# -- inference ---------------------------------------------------------------------------------
@cli.command("score-folder", context_settings=CONTEXT)
@config_options(ScoreConfig)
@json_option("Print rows and summary as JSON.")
@handle_errors
def score_folder_cmd(as_json, **values):
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
    from agiqa.pipeline.api import score_folder

    cfg = config_from(ScoreConfig, {**values, "as_json": as_json})
    report = score_folder(cfg)
    out = cfg.out
    if report.html is not None and not as_json:
        h = report.html
        click.echo(f"report: {h.out} ({h.images_shown} of {h.images_total} images, "
                   f"{h.bytes / 1e6:.2f} MB)", err=True)
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
    if report.reassigned:
        click.echo(f"{report.reassigned} slice(s) handed out again after their actor died",
                   err=True)
    for path, reason in sorted(report.failures.items()):
        click.echo(f"failed: {printable(path)}: {printable(reason)}", err=True)
    if report.skipped_files:
        click.echo(f"skipped {len(report.skipped_files)} file(s) that are not images (or whose "
                   "names are not UTF-8): " + ", ".join(map(printable, report.skipped_files[:5])),
                   err=True)
    sys.exit(report.exit_code)


@cli.command("demo", context_settings=CONTEXT)
@config_options(DemoConfig)
@json_option("Print the result as JSON.")
@handle_errors
def demo_cmd(as_json, **values):
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

    cfg = config_from(DemoConfig, {**values, "as_json": as_json})
    log = (lambda *_: None) if as_json else click.echo
    result = run_demo(cfg.out, epochs=cfg.epochs or DEMO_EPOCHS, progress=cfg.progress, log=log)
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
