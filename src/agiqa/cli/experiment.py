"""``agiqa experiment``: a plan of runs (data sets × variants × seeds), one table at the end."""

from __future__ import annotations

import click

from agiqa.cli.common import CONTEXT, EXIT_IMAGES_FAILED, cli, echo_json, handle_errors
from agiqa.cli.options import config_from, config_options, json_option
from agiqa.stages.configs import ExperimentConfig


@cli.command("experiment", context_settings=CONTEXT)
@config_options(ExperimentConfig)
@click.option("--list", "list_plans", is_flag=True, help="List the built-in and your plans.")
@json_option("Print the table as JSON.")
@click.pass_context
@handle_errors
def experiment_cmd(ctx, list_plans, as_json, **values):
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
      agiqa experiment paper-main --out /shared/exp --root ... --engine ray --ray-address auto
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
    if values["plan"] is None:
        raise click.UsageError("give a PLAN (a .toml file or a built-in plan: --list)")
    if values["out"] is None:
        raise click.UsageError("--out DIR is required")
    cfg = config_from(ExperimentConfig, {**values, "as_json": as_json}, ctx,
                      command="experiment")
    table = exp.experiment(cfg, log=None if cfg.progress else (lambda line: None))
    if table is None:
        return
    if as_json:
        import dataclasses

        echo_json({"out": str(table.out), "plan": table.plan,
                   "table": [dataclasses.asdict(r) for r in table.rows],
                   "failed": [dataclasses.asdict(r) for r in table.failed]})
    else:
        click.echo(table.to_markdown(), nl=False)
        out = cfg.out
        click.echo(f"{out / 'results.csv'}, {out / 'table.csv'}, {out / 'report.html'}")
    if table.failed:
        raise SystemExit(EXIT_IMAGES_FAILED)
