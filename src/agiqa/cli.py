"""The ``agiqa`` command line: thin commands over library functions.

Library code raises :class:`agiqa.errors.AgiqaError`; only this module turns errors into
``Error: …`` lines and exit codes (0 all fine, 1 error, 2 finished with some images failed).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from agiqa import __version__
from agiqa.errors import AgiqaError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AgiqaError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def dataset_options(fn):
    """--dataset/--root/--labels/--target/--image-column/--score-column."""
    opts = [
        click.option("--dataset", "dataset", default=None,
                     help="Data set preset: agiqa-3k, aigciqa-20k, aigciqa2023, koniq-10k, spaq, csv."),
        click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Folder the label file's image paths are relative to."),
        click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Label file (default: the preset's file inside --root)."),
        click.option("--target", default=None,
                     help="Score to learn, e.g. mos_quality (default) or mos_align for AGIQA-3K."),
        click.option("--image-column", default=None, help="Image path column (csv preset)."),
        click.option("--score-column", default=None, help="Score column (csv preset)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _load_dataset(dataset, root, labels, target, image_column, score_column, require_scores=True):
    from agiqa.data.datasets import load_dataset

    if root is None:
        raise click.BadParameter("--root is required with --dataset", param_hint="--root")
    return load_dataset(dataset, root, labels, target, image_column, score_column,
                        require_scores=require_scores)


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="agiqa")
def cli():
    """agiqa: judge the quality of AI-generated images the MA-AGIQA way.

    \b
    Stage one  agiqa extract-semantics --model llava-1.5-7b --images DIR --out CACHE
    Stage two  agiqa fit --dataset agiqa-3k --root DIR --cache CACHE --out RUN
    Evaluate   agiqa evaluate --model RUN --dataset agiqa-3k --root DIR --cache CACHE
    Score      agiqa score-folder DIR --model RUN
    Try it     agiqa demo
    """


# -- stage one ---------------------------------------------------------------------------------
@cli.command("extract-semantics", context_settings=CONTEXT)
@click.option("--model", "model", default="llava-1.5-7b", show_default=True,
              help="MLLM: a preset name, Hugging Face hub id or local folder.")
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
              default="auto", show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own code.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Number of independent workers filling this cache (default: torchrun's).")
@click.option("--worker", type=click.IntRange(min=0), default=None,
              help="This worker's index, 0 to WORKERS-1 (default: torchrun's RANK).")
@click.option("--loader-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Background processes decoding and preprocessing images.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_handle_errors
def extract_semantics_cmd(model, revision, images, dataset, root, labels, target, image_column,
                          score_column, out, fmt, prompts, batch_size, shard_size, device, dtype,
                          trust_remote_code, workers, worker, loader_workers, quiet, as_json):
    """Stage one: run the MLLM once per image and prompt; cache the semantic vectors.

    \b
    Examples:
      agiqa extract-semantics --model llava-1.5-7b --images ./generated --out cache/
      agiqa extract-semantics --model Qwen/Qwen2.5-VL-7B-Instruct \\
          --dataset agiqa-3k --root AGIQA-3K/ --out cache-3k/ --format hdf5
      torchrun --nproc-per-node 8 -m agiqa extract-semantics --images DIR --out cache/
    """
    from agiqa.stages.semantics import ExtractConfig, ImageSource, extract_semantics

    if (images is None) == (dataset is None):
        raise click.UsageError("give either --images DIR or --dataset NAME --root DIR")
    if images is not None:
        source = ImageSource.from_folder(images)
    else:
        ds = _load_dataset(dataset, root, labels, target, image_column, score_column,
                           require_scores=False)
        source = ImageSource.from_dataset(ds)
    cfg = ExtractConfig(out=out, model=model, revision=revision, format=fmt, prompts=prompts,
                        batch_size=batch_size, shard_size=shard_size, device=device, dtype=dtype,
                        trust_remote_code=trust_remote_code, workers=workers, worker=worker,
                        loader_workers=loader_workers, progress=not quiet)
    report = extract_semantics(cfg, source)
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_extract_summary(report)
    sys.exit(report.exit_code)


def _print_extract_summary(report) -> None:
    r = report
    click.echo(
        f"{r.requested} images: {r.computed} computed, {r.reused} already cached, "
        f"{len(r.failures)} failed  ({r.images_per_second:.1f} images/s, worker {r.worker} of "
        f"{r.workers}) -> {r.cache}"
    )
    for key, reason in sorted(r.failures.items()):
        click.echo(f"failed: {key}: {reason}", err=True)
    if r.skipped_files:
        shown = ", ".join(r.skipped_files[:5]) + (" ..." if len(r.skipped_files) > 5 else "")
        click.echo(f"skipped {len(r.skipped_files)} file(s) that are not images: {shown}", err=True)


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
@_handle_errors
def cache_info(path, as_json):
    """Show what a cache holds: model, prompts, width, images, failures, size."""
    from agiqa.cache import open_cache

    info = open_cache(path).info()
    if as_json:
        _echo_json(info)
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
@_handle_errors
def cache_verify(path, images, as_json):
    """Check every cached image against its file: missing, changed (sha256) or failed.

    Exits 0 when all match, 2 when some file is missing, changed or failed.
    """
    from agiqa.cache import open_cache, verify_cache

    report = verify_cache(open_cache(path), images)
    if as_json:
        _echo_json(report.to_dict())
    else:
        for key in report.missing:
            click.echo(f"missing: {key}")
        for key in report.changed:
            click.echo(f"changed: {key}")
        for key, reason in sorted(report.failed.items()):
            click.echo(f"failed: {key}: {reason}")
        click.echo(
            f"{report.checked} cached images checked under {report.root}: "
            f"{len(report.missing)} missing, {len(report.changed)} changed, "
            f"{len(report.failed)} failed at extraction"
        )
    sys.exit(0 if report.ok else 2)


# -- stage two ---------------------------------------------------------------------------------
@cli.command("fit", context_settings=CONTEXT)
@dataset_options
@click.option("--cache", "cache_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Semantic cache (stage one).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The run directory to write.")
@click.option("--backbone", default="vit_base_patch8_224", show_default=True,
              help="vit_base_patch8_224 (the paper's) or tiny (CPU tests and demos).")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Start the ViT from ImageNet weights (timm).")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="A local file of the ViT's ImageNet weights (offline machines).")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--backbone-lr", type=float, default=None,
              help="Learning rate of the ViT and MANIQA layers (not in the paper) "
                   "[default: --lr]; 0 freezes them and trains the MoE head only.")
@click.option("--weight-decay", type=float, default=1e-5, show_default=True)
@click.option("--t-max", type=click.IntRange(min=1), default=50, show_default=True,
              help="Cosine annealing half-period in iterations (the official code: 50, "
                   "stepped every iteration).")
@click.option("--split", default="paper", show_default=True,
              help="paper, files (the data set's split files), random:0.7,0.1,0.2 or a split.csv.")
@click.option("--seed", type=int, default=20, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train N times on seeds SEED..SEED+N-1; report median and std.")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-augment", is_flag=True, help="Turn off rotation/flip augmentation.")
@click.option("--score-norm", type=click.Choice(["none", "zscore"]), default="none",
              show_default=True,
              help="zscore: train on standardised MOS (not in the paper; helps short runs and "
                   "random backbones). The saved model still outputs MOS.")
@click.option("--semantic-norm", type=click.Choice(["none", "zscore"]), default="none",
              show_default=True,
              help="zscore: standardise each semantic dimension during training (not in the "
                   "paper). Folded into the model: it still takes raw vectors.")
@click.option("--amp/--no-amp", default=None,
              help="bf16 mixed precision [default: on for CUDA, off otherwise].")
@click.option("--compile", "compile_model", is_flag=True,
              help="Train through torch.compile (first steps compile; faster on GPUs).")
@click.option("--loader-workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_handle_errors
def fit_cmd(dataset, root, labels, target, image_column, score_column, cache_dir, out, backbone,
            pretrained, backbone_weights, epochs, batch_size, lr, backbone_lr, weight_decay, t_max,
            split, seed, repeats, device, no_augment, score_norm, semantic_norm, amp,
            compile_model, loader_workers, resume, quiet, as_json):
    """Stage two: train the MANIQA backbone and MoE head from cached vectors.

    The defaults are the paper's protocol: Adam lr 1e-5, weight decay 1e-5, batch 8,
    30 epochs, MSE, cosine annealing, the paper's 70/10/20 split with seed 20.

    \b
    Examples:
      agiqa fit --dataset agiqa-3k --root AGIQA-3K/ --cache cache-3k/ --out runs/3k
      agiqa fit --dataset csv --root imgs/ --labels scores.csv --cache c/ --out runs/x \\
          --backbone tiny --no-pretrained --epochs 5
      torchrun --nproc-per-node 4 -m agiqa fit --dataset agiqa-3k --root AGIQA-3K/ \\
          --cache cache-3k/ --out runs/3k-ddp
    """
    from agiqa.stages.fit import FitConfig, fit_repeats

    if dataset is None:
        raise click.UsageError("--dataset is required")
    if root is None:
        raise click.BadParameter("--root is required with --dataset", param_hint="--root")
    cfg = FitConfig(dataset=dataset, root=root, labels=labels, target=target,
                    image_column=image_column, score_column=score_column, cache=cache_dir,
                    out=out, backbone=backbone, pretrained=pretrained,
                    backbone_weights=backbone_weights, epochs=epochs, batch_size=batch_size,
                    lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay, t_max=t_max,
                    split=split, seed=seed, device=device, augment=not no_augment,
                    score_norm=score_norm, semantic_norm=semantic_norm, amp=amp,
                    compile=compile_model, loader_workers=loader_workers,
                    resume=resume, progress=not quiet)
    summary = fit_repeats(cfg, repeats)
    from agiqa.distributed import is_main

    if not is_main():  # under torchrun, rank 0 reports
        return
    if as_json:
        _echo_json(summary)
    else:
        _print_metrics_table(summary)


def _print_metrics_table(summary: dict) -> None:
    click.echo(f"{'':10s}{'SRCC':>9s}{'PLCC':>9s}{'KRCC':>9s}{'RMSE':>9s}")
    for name, m in summary["rows"].items():
        click.echo(f"{name:10s}" + "".join(f"{m[k]:9.4f}" for k in ("srcc", "plcc", "krcc", "rmse")))
    click.echo(f"run directory: {summary['out']}")


@cli.command("evaluate", context_settings=CONTEXT)
@click.option("--model", "model_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Run or model directory.")
@dataset_options
@click.option("--cache", "cache_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["test", "val", "train", "all"]),
              help="test: the run's own test split; all: every image (cross-dataset).")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@_handle_errors
def evaluate_cmd(model_dir, dataset, root, labels, target, image_column, score_column, cache_dir,
                 split, device, batch_size, quiet, as_json):
    """Evaluate a model: SRCC, PLCC, KRCC, RMSE on a data set (in- or cross-dataset).

    \b
    Examples:
      agiqa evaluate --model runs/3k --dataset agiqa-3k --root AGIQA-3K/ --cache cache-3k/
      agiqa evaluate --model runs/3k --dataset aigciqa2023 --root AIGCIQA2023/allimg \\
          --cache cache-2023/ --split all
    """
    from agiqa.stages.evaluate import evaluate_model

    if dataset is None:
        raise click.UsageError("--dataset is required")
    ds = _load_dataset(dataset, root, labels, target, image_column, score_column)
    result = evaluate_model(model_dir, ds, cache_dir, split, device, batch_size,
                            progress=not quiet)
    if as_json:
        _echo_json(result)
    else:
        _print_metrics_table({"rows": {f"{dataset}/{split}": result}, "out": model_dir})


@cli.command("import-official", context_settings=CONTEXT)
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="The cache whose vectors the checkpoint expects (records its "
              "fingerprint, so score-folder and evaluate use that MLLM).")
@click.option("--vit-heads", type=click.IntRange(min=1), default=None,
              help="Attention heads of a non-standard ViT (default: width // 64).")
@_handle_errors
def import_official_cmd(ckpt, out, cache_dir, vit_heads):
    """Turn an official MA-AGIQA checkpoint (.pt) into an agiqa model directory.

    Read without pickle; the unused modules of the official class are dropped.

    \b
    Example:
      agiqa import-official MA_AGIQA_AGIQA3K.pt --out models/official-3k --cache cache-3k/
    """
    from agiqa.models.official import import_official

    semantics = None
    if cache_dir is not None:
        from agiqa.cache import open_cache

        c = open_cache(cache_dir)
        semantics = {"semantics": c.spec, "fingerprint": c.fingerprint,
                     "prompt_names": c.prompt_names}
    model = import_official(ckpt, out, semantics, vit_heads)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"imported {ckpt} ({n / 1e6:.1f} M parameters in use) -> {out}")


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
@click.option("--recursive/--no-recursive", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--loader-workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print rows and summary as JSON.")
@_handle_errors
def score_folder_cmd(folder, model_dir, cache_dir, out, recursive, device, batch_size,
                     loader_workers, quiet, as_json):
    """Score every image of a folder with a trained model.

    Stage one runs only for images the cache lacks, with the MLLM of the model's fingerprint.
    Broken files are named with their reason; the exit status is then 2.

    \b
    Examples:
      agiqa score-folder ./generated --model runs/3k --out scores.csv
      agiqa score-folder ./generated --model runs/3k --cache cache/ --json
    """
    from agiqa.stages.score import Scorer

    scorer = Scorer.from_pretrained(model_dir, cache_dir=cache_dir, device=device,
                                    batch_size=batch_size, loader_workers=loader_workers,
                                    progress=not quiet)
    report = scorer.score_folder(folder, recursive)
    if out is not None:
        report.write(out)
    summary = report.summary()
    if as_json:
        _echo_json({"rows": report.rows, "failures": report.failures, "summary": summary})
    else:
        if out is None:
            for r in report.rows:
                click.echo(f"{r['score']:9.4f}  {r['path']}")
        mean = "-" if summary["mean"] is None else f"{summary['mean']:.4f}"
        lo = "-" if summary["min"] is None else f"{summary['min']:.4f}"
        hi = "-" if summary["max"] is None else f"{summary['max']:.4f}"
        click.echo(f"count {summary['count']}  mean {mean}  min {lo}  max {hi}  "
                   f"failed {summary['failed']}" + (f"  -> {out}" if out else ""))
    for path, reason in sorted(report.failures.items()):
        click.echo(f"failed: {path}: {reason}", err=True)
    if report.skipped_files:
        click.echo(f"skipped {len(report.skipped_files)} file(s) that are not images: "
                   + ", ".join(report.skipped_files[:5]), err=True)
    sys.exit(report.exit_code)


@cli.command("demo", context_settings=CONTEXT)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="agiqa-demo",
              show_default=True, help="Folder for the demo's models, images, cache and run.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs [default: the demo's own, about a minute on a CPU].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handle_errors
def demo_cmd(out, epochs, quiet, as_json):
    """The whole pipeline offline on a CPU, in a few minutes, with tiny random models.

    Builds a tiny LLaVA, makes a labelled set from real photographs that ship with
    scikit-image and scikit-learn (blur, JPEG, noise and patch shuffling in grades), then runs
    extract-semantics, fit (tiny backbone), evaluate and score-folder on a photograph the model
    never saw. The tiny models are random: the numbers show the pipeline learning image damage,
    not the judgement of a real MLLM.

    \b
    Example:
      agiqa demo --out /tmp/agiqa-demo
    """
    from agiqa.pipeline.demo import DEMO_EPOCHS, run_demo

    log = (lambda *_: None) if as_json else click.echo
    result = run_demo(out, epochs=epochs or DEMO_EPOCHS, progress=not quiet, log=log)
    if as_json:
        _echo_json(result.to_dict())
        return
    _print_metrics_table({"rows": result.metrics, "out": result.out / "run"})
    click.echo("plots: " + "  ".join(str(p) for p in result.plots))
    click.echo(f"scores of the unseen photograph -> {result.scores_csv}")
    for row in result.unseen:
        click.echo(f"  {row['score']:7.3f}  {row['path']}")
    total = sum(result.seconds.values())
    click.echo(f"finished in {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                 result.seconds.items()) + ")")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="agiqa")


if __name__ == "__main__":
    main()
