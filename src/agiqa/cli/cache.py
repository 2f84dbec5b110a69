"""``agiqa cache``: inspect and verify semantic caches; import the official tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agiqa.cli.common import (
    CONTEXT,
    cli,
    dataset_from_options,
    dataset_options,
    echo_json,
    handle_errors,
)


# -- cache -------------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT)
def cache():
    """Inspect and verify semantic caches; import the official tensors.

    \b
    Examples:
      agiqa cache info cache/
      agiqa cache verify cache/ --images ./generated
      agiqa cache import-pt tensors/ --dataset agiqa-3k --root AGIQA-3K/ --out cache-3k/
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


@cache.command("import-pt", context_settings=CONTEXT)
@click.argument("tensor_root", type=click.Path(file_okay=False, exists=True, path_type=Path))
@dataset_options
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The cache folder (created, or resumed).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default=None,
              help="Shard format of a new cache  [default: zarr]")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--mllm", default="mplug-owl2", show_default=True,
              help="The mPLUG-Owl2 model (preset, hub id or folder) the tensors come from.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def cache_import_pt(tensor_root, dataset, root, labels, target, image_column, score_column, out,
                    fmt, shard_size, mllm, as_json):
    """Import the official MA-AGIQA tensors (getFeature.py's .pt files) into a cache.

    Reads TENSOR_ROOT/<name>_semantic_content.pt and <name>_coherence.pt (the image name
    without .jpg/.png; float16 [1, 4096]) for every image of the data set, without pickle.
    The cache takes the fingerprint of mPLUG-Owl2 under its official recipe, so `agiqa fit`
    trains on it and models trained on it score new images through mPLUG-Owl2. Images are
    hashed for `agiqa cache verify`. A missing or malformed file is reported with its reason
    and recorded as a failure (exit status 2).

    \b
    Example:
      agiqa cache import-pt tensors/ --dataset agiqa-3k --root AGIQA-3K/ --out cache-3k/
    """
    from agiqa.cache.imports import import_official_tensors
    from agiqa.stages.extraction.official import official_semantics

    if dataset is None:
        raise click.UsageError("--dataset is required")
    ds = dataset_from_options(dataset, root, labels, target, image_column, score_column,
                              require_scores=False)
    official = official_semantics(mllm)
    report = import_official_tensors(tensor_root, ds.root, sorted(ds.keys), out,
                                     official["semantics"], official["prompt_names"],
                                     official["dim"], fmt, shard_size)
    if as_json:
        echo_json(report.to_dict())
    else:
        for key, reason in sorted(report.failures.items()):
            click.echo(f"failed: {key}: {reason}", err=True)
        click.echo(f"{report.requested} images: {report.imported} imported, {report.reused} "
                   f"already in the cache, {len(report.failures)} failed -> {report.cache}")
    sys.exit(report.exit_code)
