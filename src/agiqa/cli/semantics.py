"""Stage one: ``agiqa extract-semantics``."""

from __future__ import annotations

import sys

import click

from agiqa.cli.common import CONTEXT, cli, echo_json, handle_errors, printable
from agiqa.cli.options import config_from, config_options, json_option
from agiqa.stages.configs import ExtractConfig


# -- stage one ---------------------------------------------------------------------------------
@cli.command("extract-semantics", context_settings=CONTEXT)
@config_options(ExtractConfig)
@json_option("Print the report as JSON.")
@click.pass_context
@handle_errors
def extract_semantics_cmd(ctx, as_json, **values):
    """Stage one: run the MLLM once per image and prompt; cache the semantic vectors.

    \b
    Examples:
      agiqa extract-semantics --images ./generated --out cache/    # mPLUG-Owl2, official recipe
      agiqa extract-semantics --mllm llava-1.5-7b --images ./generated --out cache-llava/
      agiqa extract-semantics --mllm Qwen/Qwen2.5-VL-7B-Instruct \\
          --dataset agiqa-3k --root AGIQA-3K/ --out cache-3k/ --format hdf5
      torchrun --nproc-per-node 8 -m agiqa extract-semantics --images DIR --out cache/

    --model is the earlier name of --mllm, still accepted.
    """
    from agiqa.pipeline.api import extract_semantics

    cfg = config_from(ExtractConfig, {**values, "as_json": as_json}, ctx)
    report = extract_semantics(cfg)
    if as_json:
        echo_json(report.to_dict())
    else:
        _print_extract_summary(report)
    sys.exit(report.exit_code)


def _print_extract_summary(report) -> None:
    r = report
    if r.engine == "ray":
        click.echo(
            f"{r.requested} images: {r.computed} computed, {r.reused} already cached, "
            f"{len(r.failures)} failed  ({r.images_per_second:.1f} images/s over the cluster, "
            f"{r.workers} actor(s), {r.shards_written} shard(s) written, "
            f"{len(r.reassigned)} handed out again) -> {r.cache}")
        for name, c in r.actors.items():
            click.echo(f"  {name}: {c['shards']} shard(s), {c['images']} image(s)")
        for name in r.reassigned:
            click.echo(f"shard {name} handed out again: its actor died", err=True)
    else:
        click.echo(
            f"{r.requested} images: {r.computed} computed, {r.reused} already cached, "
            f"{len(r.failures)} failed  ({r.images_per_second:.1f} images/s, worker {r.worker} "
            f"of {r.workers}, {r.loader_workers} loader process(es)) -> {r.cache}"
        )
    for name, reason in sorted(r.damaged_shards.items()):
        click.echo(f"rebuilt damaged shard {name}: {reason}", err=True)
    if r.changed or r.retried:
        click.echo(f"recomputed {len(r.changed)} image(s) whose file changed, retried "
                   f"{len(r.retried)} that failed before", err=True)
    for key, reason in sorted(r.failures.items()):
        click.echo(f"failed: {printable(key)}: {printable(reason)}", err=True)
    if r.skipped_files:
        shown = ", ".join(map(printable, r.skipped_files[:5])) + \
            (" ..." if len(r.skipped_files) > 5 else "")
        click.echo(f"skipped {len(r.skipped_files)} file(s) that are not images (or whose names "
                   f"are not UTF-8): {shown}", err=True)
