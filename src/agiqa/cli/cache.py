"""``agiqa cache``: inspect and verify semantic caches."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agiqa.cli.common import (
    CONTEXT,
    cli,
    echo_json,
    handle_errors,
)


# -- cache -------------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT)
def cache():
    """Inspect and verify semantic caches.

    \b
    Examples:
      agiqa cache info cache/
      agiqa cache verify cache/ --images ./generated
    """


@cache.command("info", context_settings=CONTEXT)
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def cache_info(path, as_json):
    """Show what a cache holds: model, prompts, width, images, failures, size."""
    from agiqa.cache import open_cache

    info = open_cache(path).info()
    if as_json:
        echo_json(info)
        return
    for k in ("path", "format", "model", "revision", "dtype", "dim", "root", "shards", "images",
              "failed", "bytes", "fingerprint", "created", "updated"):
        click.echo(f"{k:12s} {info[k]}")
    for prompt in info["prompts"]:
        click.echo(f"{'prompt':12s} {prompt['name']}: {prompt['text']}")


@cache.command("verify", context_settings=CONTEXT)
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Image root (default: the one recorded at extraction).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def cache_verify(path, images, as_json):
    """Check every shard against its checksums, and every cached image against its file:
    damaged shards, missing, changed (sha256) or failed images.

    Exits 0 when all match, 2 when some shard is damaged or some file is missing, changed or
    failed (a rerun of extract-semantics rebuilds damaged shards and recomputes changed images).
    """
    from agiqa.cache import open_cache, verify_cache

    report = verify_cache(open_cache(path), images)
    if as_json:
        echo_json(report.to_dict())
    else:
        for shard, reason in sorted(report.damaged.items()):
            click.echo(f"damaged shard: {reason}" if reason.startswith(shard)
                       else f"damaged shard: {shard}: {reason}")
        for key in report.missing:
            click.echo(f"missing: {key}")
        for key in report.changed:
            click.echo(f"changed: {key}")
        for key, reason in sorted(report.failed.items()):
            click.echo(f"failed: {key}: {reason}")
        click.echo(
            f"{report.shards} shards checked, {len(report.damaged)} damaged; "
            f"{report.checked} cached images checked under {report.root}: "
            f"{len(report.missing)} missing, {len(report.changed)} changed, "
            f"{len(report.failed)} failed at extraction"
        )
    sys.exit(0 if report.ok else 2)
