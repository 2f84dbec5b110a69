"""``agiqa evaluate``: a trained model on a data set's images and cached vectors.

In-dataset (``--split test``: the test keys of the run's own ``split.csv``) or cross-dataset
(``--split all``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agiqa.cache import open_cache
from agiqa.data.datasets import Dataset
from agiqa.data.pixel_cache import PixelCache
from agiqa.data.splits import read_split_csv
from agiqa.errors import CacheMismatchError, ConfigError, DatasetError, MissingVectorsError
from agiqa.fileio import write_json
from agiqa.metrics import evaluate
from agiqa.models.agiqa_net import load_model
from agiqa.options import spell
from agiqa.runtime import resolve_device
from agiqa.stages.predict import inputs_of, predict
from agiqa.stages.rundir import (
    EVALUATION,
    PREDICTIONS,
    SPLIT,
    RunConfig,
    check_evaluation_out,
    evaluation_folder,
    read_config,
    write_predictions,
)

__all__ = ["EvaluateResult", "check_fingerprint", "evaluate_model", "run_label_columns"]


@dataclass
class EvaluateResult:
    """What ``agiqa evaluate`` measured.

    Attributes:
        model: the run or model folder, as given.
        dataset: the data set's name (its preset).
        split: ``test``, ``val``, ``train`` (the run's own ``split.csv``) or ``all``.
        images: how many images were scored.
        amp: whether the forward ran under bf16 autocast (float32 otherwise, as the paper).
        metrics: ``srcc``, ``plcc``, ``krcc``, ``rmse`` (after the official logistic fit) and
            ``plcc_raw`` (before it).
        out: the folder of ``predictions.csv`` and ``evaluation.json``, when one was asked for.
    """

    model: str
    dataset: str
    split: str
    images: int
    amp: bool
    metrics: dict[str, float] = field(default_factory=dict)
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``evaluate --json``: the fields, with the metrics at the top level."""
        d = {"model": self.model, "dataset": self.dataset, "split": self.split,
             "images": self.images, "amp": self.amp, **self.metrics}
        if self.out is not None:
            d["out"] = self.out
        return d

    def __getitem__(self, key: str) -> Any:
        """``result["srcc"]``: the keys of :meth:`to_dict` (earlier releases returned it)."""
        return self.to_dict()[key]


def run_label_columns(model_dir: str | os.PathLike, dataset: str | None,
                      root: str | os.PathLike | None, labels: str | os.PathLike | None
                      ) -> dict[str, str]:
    """The ``image_column``, ``score_column`` and ``target`` the run in ``model_dir`` was
    trained with, when it is evaluated on the same label file (the same preset, and the same
    file once resolved): they need not be given again. Empty for another file (a cross-set
    evaluation names its own columns) or a model that records none."""
    from agiqa.fileio import read_json
    from agiqa.presets import load_dataset_preset

    try:
        config = read_json(Path(model_dir) / "config.json")
        training = config.get("training") or {}
        if not dataset or training.get("dataset") != dataset or root is None:
            return {}
        preset = load_dataset_preset(dataset)
        mine = Path(labels) if labels else Path(root) / preset.labels
        theirs = Path(training["labels"]) if training.get("labels") else \
            Path(training["root"]) / preset.labels
        if not (mine.is_file() and theirs.is_file() and os.path.samefile(mine, theirs)):
            return {}
    except Exception:  # noqa: BLE001 - unreadable or unknown: the loader reports what matters
        return {}
    return {k: training[k] for k in ("image_column", "score_column", "target")
            if isinstance(training.get(k), str)}


def check_fingerprint(model_config: RunConfig, cache) -> None:
    """Refuse a cache whose vectors come from another MLLM setup than the model was trained on."""
    expected = model_config.fingerprint
    if expected and expected != cache.fingerprint:
        trained = model_config.semantics.model if model_config.semantics else "?"
        raise CacheMismatchError(str(cache.path), expected, cache.fingerprint,
                                 f"the model was trained on vectors of {trained}, the cache "
                                 f"holds vectors of {cache.spec['model']}")


def evaluate_model(model_dir: str | os.PathLike, ds: Dataset, cache_dir: str | os.PathLike,
                   split: str = "test", device: str = "auto", batch_size: int = 32,
                   loader_workers: int = 2, progress: bool = True, amp: bool = False,
                   out: str | os.PathLike | None = None, pixel_cache: bool = True
                   ) -> EvaluateResult:
    """SRCC, PLCC, KRCC, RMSE (and raw PLCC) of a model on a split of ``ds``.

    The forward runs in float32 (the official code) unless ``amp`` (bf16 autocast). With
    ``out``, the folder gets ``predictions.csv`` (each image's MOS, score, gates and zero-shot
    score) and ``evaluation.json`` (the metrics and what was evaluated), which
    ``agiqa report`` reads. ``out`` may be a new folder or one ``evaluate`` wrote, never the
    model's own folder nor one holding such files agiqa did not write (ConfigError, before
    any work). The model's pixels are kept and reused in the pixel cache of ``fit``
    (``$AGIQA_HOME/pixels``) unless ``pixel_cache`` is false.
    """
    if out is not None:
        check_evaluation_out(Path(out), Path(model_dir))
    model = load_model(model_dir)
    config = read_config(Path(model_dir))
    cache = open_cache(cache_dir)
    check_fingerprint(config, cache)
    if split == "all":
        keys = ds.keys
    elif split in ("test", "val", "train"):
        split_file = Path(model_dir) / SPLIT
        if not split_file.is_file():
            raise ConfigError(f"{model_dir} has no {SPLIT}; use {spell('split', 'all')}")
        keys = read_split_csv(split_file).subset(split)
        known = set(ds.keys)
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise DatasetError(f"{len(unknown)} {split} image(s) of {split_file} are not in "
                               f"{ds.labels_path}: {', '.join(unknown[:3])}; on another data "
                               f"set, evaluate every image with {spell('split', 'all')}")
    else:
        raise ConfigError(f"unknown {spell('split')} {split!r} (test, val, train or all)")
    if len(keys) < 3:
        raise DatasetError(f"the {split} split has {len(keys)} image(s); metrics need 3")
    missing = [k for k in keys if k not in cache]
    if missing:
        raise MissingVectorsError(missing, where=f"cache {cache.path}")
    dev = resolve_device(device)
    model.to(dev)
    # Each file is read once; vectors of an image changed since extraction are refused.
    vectors, pixels = inputs_of(ds, keys, cache, loader_workers, progress,
                                PixelCache() if pixel_cache else None)
    scores, gates = predict(model, pixels, vectors, dev, batch_size, amp, with_gates=True)
    mos = {s.key: s.mos for s in ds.samples}
    metrics = evaluate(scores.numpy(), [mos[k] for k in keys])
    result = {"model": str(model_dir), "dataset": ds.name, "split": split, "images": len(keys),
              "amp": amp, **metrics}
    if out is not None:
        zero_shot = cache.read(keys, ("zero_shot",))["zero_shot"].mean(1)
        _write_evaluation(Path(out), Path(model_dir), config, ds, cache, keys,
                          [mos[k] for k in keys], scores, gates, zero_shot, result)
    return EvaluateResult(str(model_dir), ds.name, split, len(keys), amp, dict(metrics),
                          None if out is None else str(out))


def _write_evaluation(out: Path, model_dir: Path, config: RunConfig, ds: Dataset, cache, keys,
                      mos, scores, gates, zero_shot, result: dict) -> None:
    from agiqa import __version__

    with evaluation_folder(out, model_dir):
        write_predictions(out / PREDICTIONS, keys, [result["split"]] * len(keys), mos,
                          scores.tolist(), gates.tolist(), config.gate_names, zero_shot.tolist())
        metrics = {k: v for k, v in result.items() if k not in ("model", "dataset", "split",
                                                                 "images", "amp")}
        write_json(out / EVALUATION, {
            "agiqa_version": __version__, "model": str(Path(result["model"]).resolve()),
            "dataset": {"name": ds.name, "target": ds.target_column,
                        "root": str(ds.root.resolve()),
                        "labels": str(ds.labels_path) if ds.labels_path else None},
            "split": result["split"], "cache": str(Path(cache.path).resolve()),
            "images": result["images"], "amp": result["amp"], "metrics": metrics})
