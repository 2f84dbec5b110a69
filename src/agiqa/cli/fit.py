"""Stage two: ``agiqa fit``, ``agiqa evaluate`` and ``agiqa import-official``."""

from __future__ import annotations

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
@handle_errors
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
                    resume=resume, progress=not (quiet or as_json))
    summary = fit_repeats(cfg, repeats)
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
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
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
    ds = dataset_from_options(dataset, root, labels, target, image_column, score_column)
    result = evaluate_model(model_dir, ds, cache_dir, split, device, batch_size,
                            progress=not quiet)
    if as_json:
        echo_json(result)
    else:
        print_metrics_table({"rows": {f"{dataset}/{split}": result}, "out": model_dir})


@cli.command("import-official", context_settings=CONTEXT)
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="The cache whose vectors the checkpoint expects (records its "
              "fingerprint, so score-folder and evaluate use that MLLM).")
@click.option("--vit-heads", type=click.IntRange(min=1), default=None,
              help="Attention heads of a non-standard ViT (default: width // 64).")
@handle_errors
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
