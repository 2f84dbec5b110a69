"""The config dataclasses of the stages: every option of a command, defined once.

Kept free of heavy imports (torch, timm), so that the command line builds its options from them
without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agiqa.errors import ConfigError
from agiqa.options import check_options, option

__all__ = ["KEY_NORMS", "SCORE_NORMS", "SELECTIONS", "SEMANTIC_NORMS", "EvaluateConfig",
           "FitConfig", "ScoreConfig"]

SCORE_NORMS = ("none", "zscore")
SEMANTIC_NORMS = ("none", "zscore")
KEY_NORMS = ("none", "zscore")
SELECTIONS = ("paper", "last")
SEED_MAX = 2**64 - 1  # torch.manual_seed takes 0 .. 2**64 - 1
RUNS_MAX = 1000  # runs of one series (--repeats, --split-seeds); the paper trains 10

_NOT_PAPER = "(not in the paper)"


@dataclass
class FitConfig:
    """Options of ``agiqa fit``; the defaults are the official protocol.

    Each field is one option of the command line too (:func:`agiqa.options.option`). The data
    set fields (``dataset`` … ``score_column``) are the shared ``--dataset`` options.
    """

    dataset: str = option(help="Data set preset or csv.", cli=False)
    root: Path = option(help="Image folder.", cli=False)
    cache: Path = option(help="Semantic cache (stage one).", file_okay=False)
    out: Path = option(help="The run directory to write.", file_okay=False)
    labels: Path | None = option(None, cli=False)
    target: str | None = option(None, cli=False)
    image_column: str | None = option(None, cli=False)
    score_column: str | None = option(None, cli=False)
    backbone: str = option(
        "vit_base_patch8_224",
        help="A backbone preset: vit_base_patch8_224 (the paper's), tiny (CPU tests and demos) "
             "or one of $AGIQA_HOME/presets/backbones.")
    pretrained: bool | None = option(
        None, help="Start the ViT from its published ImageNet weights (timm "
                   "vit_base_patch8_224.augreg_in21k_ft_in1k, the paper's) [default: when the "
                   "backbone has any; tiny has none].")
    backbone_weights: str | None = option(
        None, help="A local file of those weights (offline machines): the hub's "
                   "model.safetensors or the original AugReg .npz.")
    epochs: int = option(30, min=1)
    batch_size: int = option(8, min=1)
    lr: float = option(1e-5, min=0, min_open=True)
    backbone_lr: float | None = option(
        None, min=0, help=f"Learning rate of the ViT and MANIQA layers {_NOT_PAPER} "
                          "[default: --lr]; 0 freezes them and trains the MoE head only.")
    weight_decay: float = option(1e-5, min=0)
    t_max: int = option(50, min=1, help="Cosine annealing half-period in iterations (the "
                                        "official code: 50, stepped every iteration).")
    split: str = option("paper", help="paper, files (the data set's split files), "
                                      "random:0.7,0.1,0.2 or a split.csv.")
    seed: int = option(20, min=0, max=SEED_MAX, help="Seed of the training (initialisation, "
                                                     "order, augmentation, dropout).")
    split_seed: int | None = option(None, min=0, max=SEED_MAX, help="Seed of the split's "
                                    "shuffle [default: --seed; the paper: 20].")
    repeats: int = option(1, min=1, max=RUNS_MAX,
                          help="Train N times on the same split, training seeds SEED..SEED+N-1 "
                               "(the official train_test_num); mean, sample std and n into "
                               "summary.json.")
    split_seeds: int = option(1, min=1, max=RUNS_MAX,
                              help="Train on N random splits (split seeds SPLIT_SEED..+N-1, not "
                                   "the paper's); mean, sample std and n into summary.json.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    augment: bool = option(True, help="Rotation/flip augmentation (the paper's).")
    score_norm: str = option(
        "none", choices=SCORE_NORMS,
        help=f"zscore: train on standardised MOS {_NOT_PAPER}; helps short runs and random "
             "backbones. The saved model still outputs MOS.")
    semantic_norm: str = option(
        "none", choices=SEMANTIC_NORMS,
        help=f"zscore: standardise each semantic dimension during training {_NOT_PAPER}. "
             "Folded into the model: it still takes raw vectors.")
    selection: str = option(
        "paper", choices=SELECTIONS,
        help=f"paper: keep the epoch of the best validation SRCC + PLCC; last: keep the last "
             f"epoch {_NOT_PAPER}, for validation splits too small to choose with.")
    key_norm: str = option(
        "none", choices=KEY_NORMS,
        help=f"zscore: standardise each patch of the backbone's key during training "
             f"{_NOT_PAPER}; needs a frozen backbone (--backbone-lr 0) and --no-augment. "
             "Folded into the image expert: the saved model takes images as before.")
    dropout: float | None = option(
        None, min=0, max=1, max_open=True,
        help=f"Dropout of the MANIQA and MoE layers {_NOT_PAPER} [default: 0.1, the paper's].")
    amp: bool = option(False, help="bf16 autocast of training and scoring (not the paper's "
                                   "float32).")
    compile: bool = option(False, switch=True, help="Train through torch.compile (first steps "
                                                    "compile; faster on GPUs).")
    tf32: bool = option(False, switch=True, help="TF32 matrix products and convolutions on "
                                                 "CUDA (not the paper's float32).")
    concurrent_runs: int | None = option(
        None, min=1, help="Runs of --repeats/--split-seeds trained at once, as one batched "
                          "computation; 1 trains them one after another [default: on a GPU as "
                          "many as fit in its free memory; on a CPU 1].")
    loader_workers: int = option(2, min=0, help="Background image decoding processes.")
    pixel_cache: bool = option(True, help="Keep decoded 224x224 pixels under $AGIQA_HOME/pixels "
                                          "(147 KiB per image), so later runs decode nothing.")
    eval_batch_size: int = option(32, min=1, help="Batch size of validation and test scoring.")
    resume: bool = option(False, switch=True, help="Continue an interrupted run in --out.")
    progress: bool = option(True, cli=False)

    def __post_init__(self) -> None:
        self.root, self.cache, self.out = Path(self.root), Path(self.cache), Path(self.out)
        check_options(self)
        if self.key_norm != "none" and (self.backbone_lr != 0 or self.augment):
            raise ConfigError(f"--key-norm {self.key_norm} needs the backbone's keys fixed: "
                              "add --backbone-lr 0 and --no-augment")
        if self.repeats > 1 and self.split_seeds > 1:
            raise ConfigError("--repeats and --split-seeds cannot be combined; choose one")
        for flag, first in (("--seed", self.seed), ("--split-seed", self.split_seed)):
            last = (first or 0) + max(self.repeats, self.split_seeds) - 1
            if isinstance(first, int) and last > SEED_MAX:
                raise ConfigError(f"{flag} {first}: the series' last seed {last} is past "
                                  f"{SEED_MAX}, the largest seed torch takes")
        from agiqa.models.agiqa_net import resolve_pretrained

        resolve_pretrained(self.backbone, self.pretrained, self.backbone_weights)


@dataclass
class EvaluateConfig:
    """Options of ``agiqa evaluate``: a model on a data set's split, vectors from a cache."""

    model: Path = option(help="Run or model directory.", flag="--model", file_okay=False)
    dataset: str = option(help="Data set preset or csv.", cli=False)
    root: Path = option(help="Image folder.", cli=False)
    cache: Path = option(help="Semantic cache (stage one).", file_okay=False)
    labels: Path | None = option(None, cli=False)
    target: str | None = option(None, cli=False)
    image_column: str | None = option(None, cli=False)
    score_column: str | None = option(None, cli=False)
    split: str = option("test", choices=("test", "val", "train", "all"),
                        help="test: the run's own test split; all: every image "
                             "(cross-dataset).")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    batch_size: int = option(32, min=1)
    amp: bool = option(False, switch=True, help="bf16 autocast of the forward (not the paper's "
                                                "float32).")
    out: Path | None = option(None, file_okay=False,
                              help="Folder for predictions.csv and evaluation.json (what "
                                   "agiqa report reads).")
    loader_workers: int = option(2, min=0, cli=False)
    progress: bool = option(True, cli=False)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class ScoreConfig:
    """Options of ``agiqa score-folder``: every image of a folder scored with a trained model."""

    folder: Path = option(help="The folder of images.", cli=False)
    model: Path = option(help="A run directory or an imported official checkpoint.",
                         file_okay=False)
    cache: Path | None = option(None, file_okay=False,
                                help="Semantic cache to use and fill (default: one per MLLM "
                                     "fingerprint under $AGIQA_HOME, ~/.cache/agiqa).")
    recursive: bool = option(True, help="Walk subfolders.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    batch_size: int = option(8, min=1)
    loader_workers: int = option(2, min=0)
    revision: str | None = option(None, help="MLLM revision to load [default: the one the "
                                             "model was trained with].")
    trust_remote_code: bool | None = option(None, help="Allow the MLLM repository's own code "
                                                       "[default: as the model records].")
    amp: bool = option(False, switch=True, help="bf16 autocast of the scoring forward (not the "
                                                "paper's float32).")
    progress: bool = option(False, cli=False)

    def __post_init__(self) -> None:
        check_options(self)
