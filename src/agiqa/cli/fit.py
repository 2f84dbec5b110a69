"""Stage two: ``agiqa fit``, ``agiqa evaluate`` and ``agiqa import-official``."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import click

from agiqa.cli.common import (
    CONTEXT,
    cli,
    dataset_from_options,
    dataset_options,
    echo_json,
    handle_errors,
    print_metrics_table,
)
from agiqa.cli.options import config_from, config_options
from agiqa.stages.configs import FitConfig


# -- stage two ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _shown_warnings():
    """Protocol fallbacks and metric warnings as ``Warning: …`` lines on stderr, every time."""
    from agiqa.metrics import LogisticFitWarning
    from agiqa.stages.training.fit import RunFailedWarning
    from agiqa.stages.training.trainer import ProtocolWarning

    def show(message, category, *args, **kwargs):
        click.echo(f"Warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ProtocolWarning)
        warnings.simplefilter("always", LogisticFitWarning)
        warnings.simplefilter("always", RunFailedWarning)
        warnings.showwarning = show
        yield


@cli.command("fit", context_settings=CONTEXT)
@dataset_options
@config_options(FitConfig)
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@handle_errors
def fit_cmd(quiet, as_json, **values):
    """Stage two: train the MANIQA backbone and MoE head from cached vectors.

    The defaults are the official protocol: the 70/10/20 split of seed 20, Adam lr 1e-5,
    weight decay 1e-5, batch 8 (last partial batch dropped), 30 epochs, MSE, per-step cosine
    annealing, float32, the best epoch by raw validation SRCC + PLCC.

    \b
    Examples:
      agiqa fit --dataset agiqa-3k --root AGIQA-3K/ --cache cache-3k/ --out runs/3k
      agiqa fit --dataset csv --root imgs/ --labels scores.csv --cache c/ --out runs/x \\
          --backbone tiny --epochs 5
      torchrun --nproc-per-node 4 -m agiqa fit --dataset agiqa-3k --root AGIQA-3K/ \\
          --cache cache-3k/ --out runs/3k-ddp
    """
    from agiqa.stages.training.fit import fit_repeats

    if values["dataset"] is None:
        raise click.UsageError("--dataset is required")
    if values["root"] is None:
        raise click.BadParameter("--root is required with --dataset", param_hint="--root")
    cfg = config_from(FitConfig, values, progress=not (quiet or as_json))
    with _shown_warnings():
        result = fit_repeats(cfg)
    from agiqa.runtime import is_main

    if not is_main():  # under torchrun, rank 0 reports
        return
    if as_json:
        echo_json(result.to_dict())
    else:
        print_fit_result(result)


METRICS = ("srcc", "plcc", "krcc", "rmse")


def print_fit_result(result) -> None:
    """Each run's test metrics and selected epoch; for a series, mean ± sample std (n)."""
    click.echo(f"{'':12s}{'SRCC':>9s}{'PLCC':>9s}{'KRCC':>9s}{'RMSE':>9s}  epoch")
    for r in result.runs:
        label = "test" if len(result.runs) == 1 else r.name
        if r.ok:
            cells = "".join(f"{r.test[k]:9.4f}" for k in METRICS)
            click.echo(f"{label:12s}{cells}  {r.best_epoch}")
        else:
            click.echo(f"{label:12s}  failed: {r.error}")
    if len(result.runs) > 1 and result.summary:
        n = result.summary["srcc"].n
        cells = "".join(f"{result.summary[k].mean:9.4f}" for k in METRICS)
        click.echo(f"{'mean':12s}{cells}  (n={n})")
        if n > 1:
            cells = "".join(f"{result.summary[k].std:9.4f}" for k in METRICS)
            click.echo(f"{'± std':12s}{cells}  (sample std)")
    if len(result.runs) == 1:
        click.echo(f"run directory: {result.out}  (selected epoch {result.runs[0].best_epoch})")
    else:
        click.echo(f"series directory: {result.out}  (selected epochs: " + ", ".join(
            f"{r.name} {r.best_epoch}" for r in result.finished) + ")")


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
@click.option("--amp", is_flag=True, help="bf16 autocast of the forward (not the paper's "
              "float32).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for predictions.csv and evaluation.json (what agiqa report reads).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def evaluate_cmd(model_dir, dataset, root, labels, target, image_column, score_column, cache_dir,
                 split, device, batch_size, amp, out, quiet, as_json):
    """Evaluate a model: SRCC, PLCC, KRCC, RMSE on a data set (in- or cross-dataset).

    \b
    Examples:
      agiqa evaluate --model runs/3k --dataset agiqa-3k --root AGIQA-3K/ --cache cache-3k/
      agiqa evaluate --model runs/3k --dataset aigciqa2023 --root AIGCIQA2023/allimg \\
          --cache cache-2023/ --split all
    """
    from agiqa.stages.scoring.evaluate import evaluate_model, run_label_columns

    if dataset is None:
        raise click.UsageError("--dataset is required")
    if image_column is None and score_column is None and target is None:
        # The run's own label file: the columns it was trained with.
        recorded = run_label_columns(model_dir, dataset, root, labels)
        image_column, score_column = recorded.get("image_column"), recorded.get("score_column")
        target = recorded.get("target")
    ds = dataset_from_options(dataset, root, labels, target, image_column, score_column)
    with _shown_warnings():
        result = evaluate_model(model_dir, ds, cache_dir, split, device, batch_size,
                                progress=not (quiet or as_json), amp=amp, out=out)
    if as_json:
        echo_json(result)
    else:
        print_metrics_table({"rows": {f"{dataset}/{split}": result}, "out": model_dir},
                            label="model")
        if out is not None:
            click.echo(f"evaluation: {out}")


@cli.command("import-official", context_settings=CONTEXT)
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mllm", default="mplug-owl2", show_default=True,
              help="The mPLUG-Owl2 model (preset, hub id or folder) the checkpoint's vectors "
                   "come from; recorded with the official recipe.")
@click.option("--dtype", "mllm_dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              default="float16", show_default=True,
              help="The dtype the MLLM runs in when score-folder computes vectors (the official "
                   "vectors are float16).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Record this cache's fingerprint instead (its MLLM, recipe "
              "and prompts are then the ones score-folder and evaluate use).")
@click.option("--vit-heads", type=click.IntRange(min=1), default=None,
              help="Attention heads of a non-standard ViT (default: width // 64).")
@handle_errors
def import_official_cmd(ckpt, out, mllm, mllm_dtype, cache_dir, vit_heads):
    """Turn an official MA-AGIQA checkpoint (.pt) into an agiqa model directory.

    Read without pickle; the unused modules of the official class are dropped. The model
    records the fingerprint of mPLUG-Owl2 under its official recipe (the vectors the official
    checkpoints were trained on), so `agiqa score-folder IMAGES --model DIR` runs mPLUG-Owl2
    and then the imported model on new images.

    \b
    Examples:
      agiqa import-official MA_AGIQA_AGIQA3K.pt --out models/official-3k
      agiqa score-folder new-images/ --model models/official-3k --out scores.csv
      agiqa import-official MA_AGIQA_AGIQA3K.pt --out models/3k-own --cache cache-3k/
    """
    from agiqa.models.official import import_official

    if cache_dir is not None:
        from agiqa.cache import open_cache

        c = open_cache(cache_dir)
        semantics = {"semantics": c.spec, "fingerprint": c.fingerprint,
                     "prompt_names": c.prompt_names, "dim": c.dim}
        source = f"the vectors of cache {cache_dir}"
    else:
        from agiqa.stages.extraction.official import official_semantics

        official = official_semantics(mllm, mllm_dtype)
        semantics = {k: official[k] for k in ("semantics", "fingerprint", "prompt_names", "dim")}
        source = f"{official['semantics']['model']}, official recipe, {mllm_dtype}"
    model = import_official(ckpt, out, semantics, vit_heads)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"imported {ckpt} ({n / 1e6:.1f} M parameters in use) -> {out}")
    click.echo(f"semantic vectors: {source}")
