"""Stage one: ``agiqa extract-semantics``."""

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
    printable,
)


# -- stage one ---------------------------------------------------------------------------------
@cli.command("extract-semantics", context_settings=CONTEXT)
@click.option("--model", "model", default="mplug-owl2", show_default=True,
              help="MLLM: a preset name (mplug-owl2 is the paper's), Hugging Face hub id or "
                   "local folder.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A folder of images (recursive).")
@dataset_options
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The cache folder (created, or resumed / appended to).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default=None,
              help="Shard format of a new cache  [default: zarr]")
@click.option("--prompts", default="paper", show_default=True,
              help="Prompt preset, or a .json (preset schema) / .txt (one per line) file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Images per shard (the unit of resume and of worker assignment).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              default="auto", show_default=True,
              help="auto: the recipe's GPU dtype on GPU (float16 for mPLUG-Owl2, bfloat16 "
                   "otherwise), float32 on CPU.")
@click.option("--pad-square/--no-pad-square", default=None,
              help="Pad each image to a square of the processor's mean colour before the "
                   "processor  [default: the recipe's: on for mPLUG-Owl2, off otherwise]")
@click.option("--fuse-prompts/--no-fuse-prompts", default=True, show_default=True,
              help="Run both prompts of a batch in one forward pass (batch rows: prompts x "
                   "images), the vision tower once per image; the vectors are unchanged")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own code.")
@click.option("--no-retry-failed", "no_retry_failed", is_flag=True,
              help="Leave images that failed in an earlier run alone (default: try them again).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Number of independent workers filling this cache (default: torchrun's).")
@click.option("--worker", type=click.IntRange(min=0), default=None,
              help="This worker's index, 0 to WORKERS-1 (default: torchrun's RANK).")
@click.option("--loader-workers", type=click.IntRange(min=0), default=None,
              help="Background processes decoding and preprocessing images  [default: "
                   "min(8, CPUs - 1) on a GPU, min(2, CPUs) on a CPU; the report says]")
@click.option("--compile/--no-compile", "compile_blocks", default=False, show_default=True,
              help="torch.compile each block of the language model and vision tower (minutes "
                   "of compilation first; the vectors are unchanged to float tolerance)")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="local: this process (with --workers/--worker or torchrun, the static split); "
                   "ray: a pool of actors on a Ray cluster, shards handed out as actors free up, "
                   "--workers actors  [pip install \"agiqa[ray]\"]")
@click.option("--ray-address", default=None,
              help="With --engine ray: auto (this machine's cluster), HOST:PORT, or none: "
                   "$RAY_ADDRESS if set, else Ray started for the run and stopped after it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def extract_semantics_cmd(model, revision, images, dataset, root, labels, target, image_column,
                          score_column, out, fmt, prompts, batch_size, shard_size, device, dtype,
                          pad_square, fuse_prompts, trust_remote_code, no_retry_failed, workers,
                          worker, loader_workers, compile_blocks, engine, ray_address, quiet,
                          as_json):
    """Stage one: run the MLLM once per image and prompt; cache the semantic vectors.

    \b
    Examples:
      agiqa extract-semantics --images ./generated --out cache/    # mPLUG-Owl2, official recipe
      agiqa extract-semantics --model llava-1.5-7b --images ./generated --out cache-llava/
      agiqa extract-semantics --model Qwen/Qwen2.5-VL-7B-Instruct \\
          --dataset agiqa-3k --root AGIQA-3K/ --out cache-3k/ --format hdf5
      torchrun --nproc-per-node 8 -m agiqa extract-semantics --images DIR --out cache/
      agiqa extract-semantics --engine ray --ray-address auto --images DIR --out cache/
    """
    from agiqa.pipeline.api import run_extraction
    from agiqa.stages.extraction.extract import ExtractConfig, ImageSource

    if engine == "ray" and worker is not None:
        raise click.BadParameter("the static split's worker index; with --engine ray the "
                                 "shards are handed out as actors free up", param_hint="--worker")

    if workers is not None and worker is not None and worker >= workers:
        raise click.BadParameter(f"{worker} is not a worker index of --workers {workers} (0 to "
                                 f"{workers - 1})", param_hint="--worker")
    if (images is None) == (dataset is None):
        raise click.UsageError("give either --images DIR or --dataset NAME --root DIR")
    if images is not None:
        source = ImageSource.from_folder(images, exclude=out)
    else:
        ds = dataset_from_options(dataset, root, labels, target, image_column, score_column,
                           require_scores=False)
        source = ImageSource.from_dataset(ds)
    cfg = ExtractConfig(out=out, model=model, revision=revision, format=fmt, prompts=prompts,
                        batch_size=batch_size, shard_size=shard_size, device=device, dtype=dtype,
                        pad_square=pad_square, fuse_prompts=fuse_prompts,
                        trust_remote_code=trust_remote_code,
                        retry_failed=not no_retry_failed,
                        workers=workers, worker=worker,
                        loader_workers=loader_workers, compile=compile_blocks,
                        progress=not quiet, engine=engine, ray_address=ray_address)
    report = run_extraction(cfg, source)
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
