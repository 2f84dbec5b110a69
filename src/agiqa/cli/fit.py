"""Stage two: ``agiqa fit``, ``agiqa evaluate`` and ``agiqa import-official``."""

from __future__ import annotations

import contextlib
import math
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


# -- stage two ---------------------------------------------------------------------------------
def _number(minimum: float, open_min: bool):
    """A click callback: a finite float ≥ (or >) ``minimum``; NaN and infinity are refused."""

    def check(ctx, param, value):
        if value is None:
            return value
        low_ok = value > minimum if open_min else value >= minimum
        if not (math.isfinite(value) and low_ok):
            sign = ">" if open_min else "≥"
            raise click.BadParameter(f"must be a finite number {sign} {minimum:g}, got {value}")
        return value

    return check


@contextlib.contextmanager
def _shown_warnings():
    """Protocol fallbacks and metric warnings as ``Warning: …`` lines on stderr, every time."""
    from agiqa.metrics import LogisticFitWarning
    from agiqa.stages.trainer import ProtocolWarning

    def show(message, category, *args, **kwargs):
        click.echo(f"Warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ProtocolWarning)
        warnings.simplefilter("always", LogisticFitWarning)
        warnings.showwarning = show
        yield


@cli.command("fit", context_settings=CONTEXT)
@dataset_options
@click.option("--cache", "cache_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Semantic cache (stage one).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The run directory to write.")
@click.option("--backbone", default="vit_base_patch8_224", show_default=True,
              help="vit_base_patch8_224 (the paper's) or tiny (CPU tests and demos).")
@click.option("--pretrained/--no-pretrained", default=None,
              help="Start the ViT from its published ImageNet weights (timm "
                   "vit_base_patch8_224.augreg_in21k_ft_in1k, the paper's) [default: when the "
                   "backbone has any; tiny has none].")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), default=None,
              help="A local file of those weights (offline machines): the hub's "
                   "model.safetensors or the original AugReg .npz.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True, callback=_number(0, True))
@click.option("--backbone-lr", type=float, default=None, callback=_number(0, False),
              help="Learning rate of the ViT and MANIQA layers (not in the paper) "
                   "[default: --lr]; 0 freezes them and trains the MoE head only.")
@click.option("--weight-decay", type=float, default=1e-5, show_default=True,
              callback=_number(0, False))
@click.option("--t-max", type=click.IntRange(min=1), default=50, show_default=True,
              help="Cosine annealing half-period in iterations (the official code: 50, "
                   "stepped every iteration).")
@click.option("--split", default="paper", show_default=True,
              help="paper, files (the data set's split files), random:0.7,0.1,0.2 or a split.csv.")
@click.option("--seed", type=int, default=20, show_default=True,
              help="Seed of the training (initialisation, order, augmentation, dropout).")
@click.option("--split-seed", type=int, default=None,
              help="Seed of the split's shuffle [default: --seed; the paper: 20].")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train N times on the same split, training seeds SEED..SEED+N-1 (the "
                   "official train_test_num); median and std into summary.json.")
@click.option("--split-seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train on N random splits (split seeds SPLIT_SEED..+N-1, not the paper's); "
                   "median and std into summary.json.")
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
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Dropout of the MANIQA and MoE layers (not in the paper) [default: 0.1, "
                   "the paper's].")
@click.option("--amp/--no-amp", default=False, show_default=True,
              help="bf16 autocast of training and scoring (not the paper's float32).")
@click.option("--compile", "compile_model", is_flag=True,
              help="Train through torch.compile (first steps compile; faster on GPUs).")
@click.option("--loader-workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@handle_errors
def fit_cmd(dataset, root, labels, target, image_column, score_column, cache_dir, out, backbone,
            pretrained, backbone_weights, epochs, batch_size, lr, backbone_lr, weight_decay, t_max,
            split, seed, split_seed, repeats, split_seeds, device, no_augment, dropout, score_norm,
            semantic_norm, amp, compile_model, loader_workers, resume, quiet, as_json):
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
                    split=split, seed=seed, split_seed=split_seed, device=device,
                    augment=not no_augment, dropout=dropout, score_norm=score_norm,
                    semantic_norm=semantic_norm, amp=amp, compile=compile_model,
                    loader_workers=loader_workers, resume=resume,
                    progress=not (quiet or as_json))
    with _shown_warnings():
        summary = fit_repeats(cfg, repeats, split_seeds)
    from agiqa.runtime import is_main

    if not is_main():  # under torchrun, rank 0 reports
        return
    if as_json:
        echo_json(summary)
    else:
        print_metrics_table(summary)


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
    from agiqa.stages.evaluate import evaluate_model

    if dataset is None:
        raise click.UsageError("--dataset is required")
    ds = dataset_from_options(dataset, root, labels, target, image_column, score_column)
    with _shown_warnings():
        result = evaluate_model(model_dir, ds, cache_dir, split, device, batch_size,
                                progress=not (quiet or as_json), amp=amp, out=out)
    if as_json:
        echo_json(result)
    else:
        print_metrics_table({"rows": {f"{dataset}/{split}": result}, "out": model_dir})


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
        from agiqa.stages.official import official_semantics

        official = official_semantics(mllm, mllm_dtype)
        semantics = {k: official[k] for k in ("semantics", "fingerprint", "prompt_names", "dim")}
        source = f"{official['semantics']['model']}, official recipe, {mllm_dtype}"
    model = import_official(ckpt, out, semantics, vit_heads)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"imported {ckpt} ({n / 1e6:.1f} M parameters in use) -> {out}")
    click.echo(f"semantic vectors: {source}")
