"""``agiqa experiment``: a plan of runs (data sets × variants × seeds), one table at the end."""

from __future__ import annotations

from pathlib import Path

import click

from agiqa.cli.common import CONTEXT, EXIT_IMAGES_FAILED, cli, echo_json, handle_errors


def _roots(values: tuple[str, ...]) -> dict[str, str]:
    roots = {}
    for v in values:
        name, eq, path = v.partition("=")
        if not eq or not name or not path:
            raise click.BadParameter(f"{v!r}: give NAME=DIR (a data set of the plan and its "
                                     "image folder)", param_hint="--root")
        roots[name] = path
    return roots


@cli.command("experiment", context_settings=CONTEXT)
@click.argument("plan", required=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="The experiment's folder (results.csv, table.md, table.csv, report.html, "
                   "the runs).")
@click.option("--root", "roots", multiple=True, metavar="NAME=DIR",
              help="The image folder of the plan's data set NAME (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change the plan: repeats=2, fit.epochs=5, caches.mplug-owl2.model=DIR "
                   "(dotted keys, TOML values; repeatable).")
@click.option("--resume", is_flag=True, help="Finish interrupted runs (their checkpoint.pt).")
@click.option("--dry-run", is_flag=True, help="Print the runs, the extractions and the "
                                                "estimated time, and stop.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: the plan's "
                                               "or auto].")
@click.option("--concurrent-runs", type=click.IntRange(min=1), default=None,
              help="Runs of one data set and variant trained at once [default: fit's: on a "
                   "GPU as many as fit, on a CPU 1].")
@click.option("--list", "list_plans", is_flag=True, help="List the built-in and your plans.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@handle_errors
def experiment_cmd(plan, out, roots, overrides, resume, dry_run, device, concurrent_runs,
                   list_plans, quiet, as_json):
    """Run a plan of experiments: data sets × variants × seeds, and cross pairs.

    PLAN is a TOML file or a built-in plan (--list). Each run goes through fit (and evaluate
    for cross pairs); DIR gets results.csv (a row per run), table.csv and table.md (mean ±
    sample std per variant and data set, the published figure beside it where the plan has
    one) and report.html. Running it again skips finished runs; a plan may only add runs to
    an existing DIR. Exit status 2: some runs failed (their rows carry the error).

    \b
    Examples:
      agiqa experiment --list
      agiqa experiment cpu-demo --out exp
      agiqa experiment paper-main --out exp/main --root agiqa-3k=AGIQA-3K/ \\
          --root aigciqa-20k=AIGCIQA-20K/ --root aigciqa2023=AIGCIQA2023/allimg/
      agiqa experiment my-plan.toml --out exp/mine --set repeats=3 --dry-run
    """
    from agiqa.pipeline import experiment as exp

    if list_plans:
        found = exp.list_plans()
        if as_json:
            echo_json(found)
            return
        width = max(map(len, found), default=0)
        for name, description in found.items():
            click.echo(f"  {name.ljust(width)}  {description}")
        return
    if plan is None:
        raise click.UsageError("give a PLAN (a .toml file or a built-in plan: --list)")
    if out is None:
        raise click.UsageError("--out DIR is required")
    log = (lambda line: None) if quiet or as_json else None
    table = exp.experiment(plan, out, roots=_roots(roots), overrides=list(overrides),
                       resume=resume, dry_run=dry_run, device=device,
                       concurrent_runs=concurrent_runs, progress=not (quiet or as_json),
                       log=log)
    if table is None:
        return
    if as_json:
        import dataclasses

        echo_json({"out": str(table.out), "plan": table.plan,
                   "table": [dataclasses.asdict(r) for r in table.rows],
                   "failed": [dataclasses.asdict(r) for r in table.failed]})
    else:
        click.echo(table.to_markdown(), nl=False)
        click.echo(f"{out / 'results.csv'}, {out / 'table.csv'}, {out / 'report.html'}")
    if table.failed:
        raise SystemExit(EXIT_IMAGES_FAILED)
