"""``agiqa cache``: inspect and verify semantic caches; import the official tensors."""

from __future__ import annotations

import sys

import click

from agiqa.cli.common import CONTEXT, cli, echo_json, handle_errors
from agiqa.cli.options import config_from, config_options, json_option
from agiqa.stages.configs import CacheInfoConfig, CacheVerifyConfig, ImportPtConfig


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
@config_options(CacheInfoConfig)
@json_option("Print JSON.")
@handle_errors
def cache_info(as_json, **values):
    """Show what a cache holds: model, prompts, width, images, failures, size."""
    from agiqa.cache import open_cache

    cfg = config_from(CacheInfoConfig, values)
    info = open_cache(cfg.path).info()
    if as_json:
        echo_json(info)
        return
    for k in ("path", "format", "model", "revision", "dtype", "dim", "root", "shards", "images",
              "failed", "bytes", "fingerprint", "created", "updated"):
        click.echo(f"{k:12s} {info[k]}")
    for prompt in info["prompts"]:
        click.echo(f"{'prompt':12s} {prompt['name']}: {prompt['text']}")


@cache.command("verify", context_settings=CONTEXT)
@config_options(CacheVerifyConfig)
@json_option("Print JSON.")
@handle_errors
def cache_verify(as_json, **values):
    """Check every shard against its checksums, and every cached image against its file:
    damaged shards, missing, changed (sha256) or failed images.

    Exits 0 when all match, 2 when some shard is damaged or some file is missing, changed or
    failed (a rerun of extract-semantics rebuilds damaged shards and recomputes changed images).
    """
    from agiqa.cache import open_cache, verify_cache

    cfg = config_from(CacheVerifyConfig, values)
    report = verify_cache(open_cache(cfg.path), cfg.images)
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
@config_options(ImportPtConfig)
@json_option("Print the report as JSON.")
@handle_errors
def cache_import_pt(as_json, **values):
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
    from agiqa.data.datasets import load_dataset
    from agiqa.stages.extraction.official import official_semantics

    cfg = config_from(ImportPtConfig, values)
    ds = load_dataset(cfg.dataset, cfg.root, cfg.labels, cfg.target, cfg.image_column,
                      cfg.score_column, require_scores=False)
    official = official_semantics(cfg.mllm)
    report = import_official_tensors(cfg.tensor_root, ds.root, sorted(ds.keys), cfg.out,
                                     official["semantics"], official["prompt_names"],
                                     official["dim"], cfg.format, cfg.shard_size)
    if as_json:
        echo_json(report.to_dict())
    else:
        for key, reason in sorted(report.failures.items()):
            click.echo(f"failed: {key}: {reason}", err=True)
        click.echo(f"{report.requested} images: {report.imported} imported, {report.reused} "
                   f"already in the cache, {len(report.failures)} failed -> {report.cache}")
    sys.exit(report.exit_code)
