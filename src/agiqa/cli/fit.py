"""Stage two: ``agiqa fit``, ``agiqa evaluate`` and ``agiqa import-official``."""

from __future__ import annotations

import contextlib
import warnings

import click

from agiqa.cli.common import CONTEXT, cli, echo_json, handle_errors, print_metrics_table
from agiqa.cli.options import config_from, config_options, json_option, recipe_option
from agiqa.stages.configs import EvaluateConfig, FitConfig, ImportOfficialConfig


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
@config_options(FitConfig)
@recipe_option("fit")
@json_option("Print the metrics as JSON.")
@click.pass_context
@handle_errors
def fit_cmd(ctx, as_json, **values):
    """Stage two: train the MANIQA backbone and MoE head from cached vectors.

    The defaults are the official protocol: the 70/10/20 split of seed 20, Adam lr 1e-5,
    weight decay 1e-5, batch 8 (last partial batch dropped), 30 epochs, MSE, per-step cosine
    annealing, float32, the best epoch by raw validation SRCC + PLCC.

    \b
    Examples:
      agiqa fit --dataset agiqa-3k --root AGIQA-3K/ --cache cache-3k/ --out runs/3k
      agiqa fit --dataset csv --root imgs/ --labels scores.csv --cache c/ --out runs/x \\
          --recipe cpu --epochs 50
      torchrun --nproc-per-node 4 -m agiqa fit --dataset agiqa-3k --root AGIQA-3K/ \\
          --cache cache-3k/ --out runs/3k-ddp
    """
    from agiqa.pipeline.api import fit

    cfg = config_from(FitConfig, {**values, "as_json": as_json}, ctx, command="fit")
    with _shown_warnings():
        result = fit(cfg)
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
@config_options(EvaluateConfig)
@json_option("Print the metrics as JSON.")
@handle_errors
def evaluate_cmd(as_json, **values):
    """Evaluate a model: SRCC, PLCC, KRCC, RMSE on a data set (in- or cross-dataset).

    \b
    Examples:
      agiqa evaluate --model runs/3k --dataset agiqa-3k --root AGIQA-3K/ --cache cache-3k/
      agiqa evaluate --model runs/3k --dataset aigciqa2023 --root AIGCIQA2023/allimg \\
          --cache cache-2023/ --split all
    """
    from agiqa.pipeline.api import evaluate

    cfg = config_from(EvaluateConfig, {**values, "as_json": as_json})
    with _shown_warnings():
        result = evaluate(cfg)
    if as_json:
        echo_json(result.to_dict())
    else:
        print_metrics_table({"rows": {f"{cfg.dataset}/{cfg.split}": result.metrics},
                             "out": cfg.model}, label="model")
        if result.out is not None:
            click.echo(f"evaluation: {result.out}")


@cli.command("import-official", context_settings=CONTEXT)
@config_options(ImportOfficialConfig)
@handle_errors
def import_official_cmd(**values):
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

    cfg = config_from(ImportOfficialConfig, values)
    ckpt, out, cache_dir = cfg.ckpt, cfg.out, cfg.cache
    if cache_dir is not None:
        from agiqa.cache import open_cache

        c = open_cache(cache_dir)
        semantics = {"semantics": c.spec, "fingerprint": c.fingerprint,
                     "prompt_names": c.prompt_names, "dim": c.dim}
        source = f"the vectors of cache {cache_dir}"
    else:
        from agiqa.stages.extraction.official import official_semantics

        official = official_semantics(cfg.mllm, cfg.dtype)
        semantics = {k: official[k] for k in ("semantics", "fingerprint", "prompt_names", "dim")}
        source = f"{official['semantics']['model']}, official recipe, {cfg.dtype}"
    model = import_official(ckpt, out, semantics, cfg.vit_heads)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"imported {ckpt} ({n / 1e6:.1f} M parameters in use) -> {out}")
    click.echo(f"semantic vectors: {source}")
