"""The config dataclasses of the commands: every option of a command, defined once.

Each field is declared with :func:`agiqa.options.option`: its type, default, help and limits
make both the Python check and the click option of the command line. The data set's fields
(``dataset`` … ``score_column``) are one piece, :class:`DatasetFields`, shared by every command
that reads a data set.

Kept free of heavy imports (torch, timm), so that the command line builds its options from them
without loading a model library.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from agiqa.errors import ConfigError, UsageError
from agiqa.options import check_options, cli_naming, option, spell
from agiqa.presets import DEFAULT_MLLM, DEFAULT_PROMPTS

__all__ = ["DTYPES", "FORMATS", "FUSIONS", "IMAGE_KEYS", "KEY_NORMS", "SCORE_NORMS", "SELECTIONS",
           "SEMANTIC_NORMS", "CacheInfoConfig", "CacheVerifyConfig", "DatasetFields",
           "DemoConfig", "EvaluateConfig", "ExperimentConfig", "ExtractConfig", "FitConfig",
           "ImportOfficialConfig", "ImportPtConfig", "ReportConfig", "ScoreConfig",
           "model_experts"]

SCORE_NORMS = ("none", "zscore")
SEMANTIC_NORMS = ("none", "zscore")
KEY_NORMS = ("none", "zscore")
IMAGE_KEYS = ("maniqa", "vit-stats")  # agiqa.models.maniqa.IMAGE_KEYS, without importing torch
SELECTIONS = ("paper", "last")
FORMATS = ("zarr", "hdf5")
DTYPES = ("auto", "bfloat16", "float16", "float32")
FUSIONS = ("moe", "concat", "mean")  # agiqa.models.moe.FUSIONS, without importing torch
SEED_MAX = 2**64 - 1  # torch.manual_seed takes 0 .. 2**64 - 1
RUNS_MAX = 1000  # runs of one series (--repeats, --split-seeds); the paper trains 10

_NOT_PAPER = "(not in the paper)"
_DEVICE = "auto, cpu, cuda or cuda:N."
_PROGRESS = "Progress bars on stderr; -q/--quiet (or --json) turns them off."


@dataclass(kw_only=True)
class DatasetFields:
    """The data set options, shared by every command that reads a labelled data set.

    ``REQUIRED`` (a class attribute) names the fields a command cannot do without.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ()

    dataset: str | None = option(
        None, help="Data set preset: agiqa-3k, aigciqa-20k, aigciqa2023, koniq-10k, spaq, csv "
                   "(agiqa presets list).")
    root: Path | None = option(None, file_okay=False,
                               help="Folder the label file's image paths are relative to.")
    labels: Path | None = option(None, dir_okay=False,
                                 help="Label file [default: the preset's file inside --root].")
    target: str | None = option(
        None, help="Score to learn, e.g. mos_quality (default) or mos_align for AGIQA-3K.")
    image_column: str | None = option(None, help="Image path column (csv preset).")
    score_column: str | None = option(None, help="Score column (csv preset).")


@dataclass(kw_only=True)
class ExtractConfig(DatasetFields):
    """Options of ``agiqa extract-semantics``: the images (a folder, or a data set's label
    file), the MLLM and how it runs, and the cache they fill."""

    images: Path | None = option(None, file_okay=False, help="A folder of images (recursive).")
    out: Path = option(help="The cache folder (created, or resumed / appended to).",
                       file_okay=False)
    mllm: str = option(
        DEFAULT_MLLM, deprecated=("--model",),
        help="MLLM: a preset name (mplug-owl2 is the paper's), Hugging Face hub id or local "
             "folder.")
    model: str | None = option(
        None, cli=False, cli_reason="the earlier name of mllm, accepted with a "
                                    "DeprecationWarning (the command line: --model, hidden)")
    revision: str | None = option(None, help="Hub revision (branch, tag or commit).")
    format: str | None = option(None, choices=FORMATS,
                                help="Shard format of a new cache [default: zarr].")
    prompts: str = option(DEFAULT_PROMPTS, help="Prompt preset, or a .json (preset schema) / "
                                                ".txt (one per line) file.")
    batch_size: int = option(8, min=1)
    shard_size: int = option(1024, min=1, help="Images per shard (the unit of resume and of "
                                               "worker assignment).")
    device: str = option("auto", help=_DEVICE)
    dtype: str = option("auto", choices=DTYPES,
                        help="auto: the recipe's GPU dtype on GPU (float16 for mPLUG-Owl2, "
                             "bfloat16 otherwise), float32 on CPU.")
    attn_implementation: str | None = option(
        None, help="transformers' attention implementation of the MLLM (sdpa, eager, "
                   "flash_attention_2) [default: the model's].")
    pad_square: bool | None = option(
        None, help="Pad each image to a square of the processor's mean colour before the "
                   "processor [default: the recipe's: on for mPLUG-Owl2, off otherwise].")
    fuse_prompts: bool = option(
        True, help="Run both prompts of a batch in one forward pass (batch rows: prompts x "
                   "images), the vision tower once per image; the vectors are unchanged.")
    trust_remote_code: bool = option(False, switch=True,
                                     help="Allow the model repository's own code.")
    retry_failed: bool = option(True, help="Try again the images that failed in an earlier "
                                           "run (--no-retry-failed leaves them alone).")
    workers: int | None = option(None, min=1, help="Number of independent workers filling "
                                                   "this cache [default: torchrun's].")
    worker: int | None = option(None, min=0, help="This worker's index, 0 to WORKERS-1 "
                                                  "[default: torchrun's RANK].")
    loader_workers: int | None = option(
        None, min=0, help="Background processes decoding and preprocessing images [default: "
                          "min(8, CPUs - 1) on a GPU, min(2, CPUs) on a CPU; the report says].")
    compile: bool = option(False, help="torch.compile each block of the language model and "
                                       "vision tower (minutes of compilation first; the vectors "
                                       "are unchanged to float tolerance).")
    engine: str = option(
        "local", choices=("local", "ray"),
        help="local: this process (with --workers/--worker or torchrun, the static split); "
             "ray: a pool of actors on a Ray cluster, shards handed out as actors free up, "
             "--workers actors [pip install \"agiqa[ray]\"].")
    ray_address: str | None = option(
        None, help="With --engine ray: auto (this machine's cluster), HOST:PORT, or none: "
                   "$RAY_ADDRESS if set, else Ray started for the run and stopped after it.")
    progress: bool = option(True, negate="--quiet", flags=("-q",), help=_PROGRESS)

    def __post_init__(self) -> None:
        if self.model is not None:
            warnings.warn("ExtractConfig(model=...) is the MLLM's earlier name; use mllm=",
                          DeprecationWarning, stacklevel=3)
            if self.mllm not in (DEFAULT_MLLM, self.model):
                raise UsageError(f"give the MLLM once: {spell('mllm')} (model= is its "
                                 "earlier name)")
            self.mllm, self.model = self.model, None
        check_options(self)
        if self.engine == "ray" and self.worker is not None:
            raise UsageError(f"{spell('worker')} is the static split's worker index; with "
                             f"{spell('engine', 'ray')} the shards are handed out as actors "
                             "free up")
        if self.workers is not None and self.worker is not None and \
                self.worker >= self.workers:
            raise UsageError(f"{self.worker} is not a worker index of "
                             f"{spell('workers', self.workers)} (0 to {self.workers - 1})")


@dataclass(kw_only=True)
class FitConfig(DatasetFields):
    """Options of ``agiqa fit``; the defaults are the official protocol.

    Each field is one option of the command line too (:func:`agiqa.options.option`); the data
    set fields (``dataset`` … ``score_column``) are :class:`DatasetFields`.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("dataset", "root")

    cache: Path = option(help="Semantic cache (stage one).", file_okay=False)
    out: Path = option(help="The run directory to write.", file_okay=False)
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
        help=f"zscore: standardise each value of the backbone's key during training "
             f"{_NOT_PAPER}; needs a frozen backbone (--backbone-lr 0) and --no-augment. "
             "Folded into the image expert: the saved model takes images as before.")
    image_key: str = option(
        "maniqa", choices=IMAGE_KEYS,
        help=f"What the image expert reads. maniqa: MANIQA's per-patch key (the paper's). "
             f"vit-stats: the mean and standard deviation over the patches of each channel of "
             f"the ViT blocks' outputs, the MANIQA layers unused {_NOT_PAPER}; with a frozen "
             "random backbone it sees noise and JPEG damage that the per-patch key loses.")
    dropout: float | None = option(
        None, min=0, max=1, max_open=True,
        help=f"Dropout of the MANIQA and MoE layers {_NOT_PAPER} [default: 0.1, the paper's].")
    experts: str | None = option(
        None, help=f"Ablation {_NOT_PAPER}: the experts used, comma-separated from image and "
                   "the cache's prompt names (e.g. image or image,semantic_content) [default: "
                   "all, the paper's].")
    fusion: str = option(
        "moe", choices=FUSIONS,
        help=f"Ablation: how the experts are fused: moe (the paper's gated mixture), concat "
             f"(their concatenation into the output layer) or mean (the mean of the experts' "
             f"scores) {_NOT_PAPER}.")
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
    progress: bool = option(True, negate="--quiet", flags=("-q",), help=_PROGRESS)

    def __post_init__(self) -> None:
        check_options(self)
        if self.key_norm != "none" and (self.backbone_lr != 0 or self.augment):
            raise ConfigError(f"{spell('key_norm', self.key_norm)} needs the backbone's keys "
                              f"fixed: add {spell('backbone_lr', 0)} and "
                              f"{spell('augment', False)}")
        if self.experts is not None:
            names = [e.strip() for e in self.experts.split(",")]
            if not all(names) or len(set(names)) != len(names):
                raise ConfigError(f"{spell('experts')} {self.experts!r}: give distinct names, "
                                  "comma-separated (image and the cache's prompt names)")
        if self.repeats > 1 and self.split_seeds > 1:
            raise ConfigError(f"{spell('repeats')} and {spell('split_seeds')} cannot be "
                              "combined; choose one")
        for name, first in (("seed", self.seed), ("split_seed", self.split_seed)):
            last = (first or 0) + max(self.repeats, self.split_seeds) - 1
            if isinstance(first, int) and last > SEED_MAX:
                raise ConfigError(f"{spell(name)} {first}: the series' last seed {last} is past "
                                  f"{SEED_MAX}, the largest seed torch takes")
        from agiqa.models.agiqa_net import resolve_pretrained

        resolve_pretrained(self.backbone, self.pretrained, self.backbone_weights)


def model_experts(experts: str | None, fusion: str, prompt_names: list[str],
                  where: str = "the cache", label: str | None = None) -> dict[str, object]:
    """The model arguments of ``--experts`` and ``--fusion`` for vectors of ``prompt_names``:
    ``semantic_experts`` (prompt indices, None: all), ``image_expert``, ``fusion``. ``label``
    names the value in a refusal (default: the option, as the caller spells it).

    Raises:
        ConfigError: a name that is neither ``image`` nor one of the prompts of ``where``.
    """
    if experts is None:
        return {"semantic_experts": None, "image_expert": True, "fusion": fusion}
    names = [e.strip() for e in experts.split(",")]
    known = ["image", *prompt_names]
    unknown = [n for n in names if n not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"{label or spell('experts')}: {unknown[0]!r} is not an expert of "
                          f"{where} (choose from {', '.join(known)}){hint}")
    index = [prompt_names.index(n) for n in prompt_names if n in names]  # the cache's order
    every = len(index) == len(prompt_names)
    return {"semantic_experts": None if every else index, "image_expert": "image" in names,
            "fusion": fusion}


@dataclass(kw_only=True)
class EvaluateConfig(DatasetFields):
    """Options of ``agiqa evaluate``: a model on a data set's split, vectors from a cache."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("dataset", "root")

    model: Path = option(help="Run or model directory.", file_okay=False)
    cache: Path = option(help="Semantic cache (stage one).", file_okay=False)
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
    loader_workers: int = option(2, min=0, help="Background image decoding processes.")
    progress: bool = option(True, negate="--quiet", flags=("-q",), help=_PROGRESS)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(kw_only=True)
class ScoreConfig:
    """Options of ``agiqa score-folder``: every image of a folder scored with a trained model."""

    folder: Path = option(help="The folder of images.", positional=True, file_okay=False)
    model: Path = option(help="A run directory or an imported official checkpoint.",
                         file_okay=False)
    cache: Path | None = option(None, file_okay=False,
                                help="Semantic cache to use and fill (default: one per MLLM "
                                     "fingerprint under $AGIQA_HOME, ~/.cache/agiqa).")
    out: Path | None = option(None, dir_okay=False,
                              help="Write the scores to a .csv or .json file.")
    report: Path | None = option(
        None, dir_okay=False, help="Also write an HTML report: gallery, histogram with a "
                                   "threshold slider, failures, gates and patch maps.")
    report_top_k: int = option(100, min=1, help="The report shows the K lowest and K highest "
                                                "scores (and links the CSV).")
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
    engine: str = option("local", choices=("local", "ray"),
                         help="local: this process; ray: a pool of actors on a Ray cluster "
                              "(pip install \"agiqa[ray]\").")
    ray_address: str | None = option(None, help="With --engine ray: auto (this machine's "
                                                "cluster), HOST:PORT, or none: $RAY_ADDRESS if "
                                                "set, else Ray started for the run.")
    workers: int | None = option(None, min=1, help="With --engine ray: the actors [default: one "
                                                   "per GPU of the cluster, or one per node].")
    shard_size: int = option(1024, min=1, help="With --engine ray: images per slice handed to "
                                               "an actor.")
    progress: bool = option(True, negate="--quiet", flags=("-q",), help=_PROGRESS)

    def __post_init__(self) -> None:
        check_options(self)
        if self.report is not None and self.report.suffix.lower() not in (".html", ".htm"):
            where = f"--report: {self.report}" if cli_naming() else f"report={str(self.report)!r}"
            raise UsageError(f"{where} does not end in .html")
        if self.out is not None and self.out.suffix.lower() not in (".csv", ".json"):
            where = f"--out: {self.out}" if cli_naming() else f"out={str(self.out)!r}"
            raise UsageError(f"{where} does not end in .csv or .json")


@dataclass(kw_only=True)
class ReportConfig:
    """Options of ``agiqa report``: the HTML page of a run, an evaluation or a score file."""

    source: Path = option(positional=True, exists=True,
                          help="A run directory of fit, a folder of evaluate --out, or the "
                               "--out file (CSV or JSON) of score-folder.")
    out: Path | None = option(None, dir_okay=False,
                              help="The HTML file [default: SOURCE/report.html for a folder, "
                                   "SOURCE with .html for a score file].")
    root: Path | None = option(None, file_okay=False,
                               help="Image root of a run, if not where the run records it.")
    cache: Path | None = option(None, file_okay=False,
                                help="Semantic cache for the zero-shot scores of a run, if not "
                                     "where the run records it.")
    images: Path | None = option(None, file_okay=False,
                                 help="The scored folder (needed for a score file).")
    model: Path | None = option(None, file_okay=False,
                                help="The model that scored a score file, for the patch maps.")
    max_images: int = option(100, min=1,
                             help="Run: the images shown, largest absolute error first.")
    top_k: int = option(100, min=1, help="Score file: the lowest and the highest K scores "
                                         "shown.")
    maps: bool = option(True, help="Compute the patch maps of the shown images (a backbone "
                                   "pass each).")
    device: str = option("auto", help="Where the patch maps are computed.")

    def __post_init__(self) -> None:
        check_options(self)
        if self.out is not None and self.out.suffix.lower() not in (".html", ".htm"):
            where = f"--out: {self.out}" if cli_naming() else f"out={str(self.out)!r}"
            raise UsageError(f"{where} does not end in .html; a report is an HTML page")
        if not self.source.is_dir() and self.images is None:
            images = "--images DIR" if cli_naming() else "images="
            raise UsageError(f"{images} is required with a score file (the folder that was "
                             "scored)")


@dataclass(kw_only=True)
class CacheInfoConfig:
    """Options of ``agiqa cache info``."""

    path: Path = option(positional=True, file_okay=False, help="The cache folder.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(kw_only=True)
class CacheVerifyConfig:
    """Options of ``agiqa cache verify``."""

    path: Path = option(positional=True, file_okay=False, help="The cache folder.")
    images: Path | None = option(None, file_okay=False,
                                 help="Image root [default: the one recorded at extraction].")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(kw_only=True)
class ImportPtConfig(DatasetFields):
    """Options of ``agiqa cache import-pt``: the official ``.pt`` tensors into a cache."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("dataset", "root")

    tensor_root: Path = option(positional=True, exists=True, file_okay=False,
                               help="The folder of getFeature.py's .pt files.")
    out: Path = option(file_okay=False, help="The cache folder (created, or resumed).")
    format: str | None = option(None, choices=FORMATS,
                                help="Shard format of a new cache [default: zarr].")
    shard_size: int = option(1024, min=1)
    mllm: str = option(DEFAULT_MLLM, help="The mPLUG-Owl2 model (preset, hub id or folder) the "
                                          "tensors come from.")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(kw_only=True)
class ImportOfficialConfig:
    """Options of ``agiqa import-official``: an official checkpoint into a model folder."""

    ckpt: Path = option(positional=True, dir_okay=False, help="The official .pt checkpoint.")
    out: Path = option(file_okay=False, help="The model folder to write.")
    mllm: str = option(DEFAULT_MLLM,
                       help="The mPLUG-Owl2 model (preset, hub id or folder) the checkpoint's "
                            "vectors come from; recorded with the official recipe.")
    dtype: str = option("float16", choices=DTYPES[1:],
                        help="The dtype the MLLM runs in when score-folder computes vectors "
                             "(the official vectors are float16).")
    cache: Path | None = option(None, file_okay=False,
                                help="Record this cache's fingerprint instead (its MLLM, recipe "
                                     "and prompts are then the ones score-folder and evaluate "
                                     "use).")
    vit_heads: int | None = option(None, min=1, help="Attention heads of a non-standard ViT "
                                                     "[default: width // 64].")

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(kw_only=True)
class DemoConfig:
    """Options of ``agiqa demo``."""

    out: Path = option(Path("agiqa-demo"), file_okay=False,
                       help="Folder for the demo's models, images, cache and run.")
    epochs: int | None = option(None, min=1, help="Training epochs [default: the CPU recipe's, "
                                                  "about a minute on a CPU].")
    progress: bool = option(True, negate="--quiet", flags=("-q",), help=_PROGRESS)

    def __post_init__(self) -> None:
        check_options(self)


def _entries(value: Any, name: str, what: str) -> tuple[str, ...] | dict[str, Any]:
    """A mapping as it is, or ``KEY=VALUE`` strings as a tuple; anything else refused."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) and k for k in value):
            raise ConfigError(f"{name} must map names to values, got {value!r}")
        return dict(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a mapping or a list of {what} strings, got "
                          f"{value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v.partition("=")[0]
           or not v.partition("=")[2]]
    if bad:
        raise UsageError(f"{name}: {bad[0]!r} is not {what}")
    return tuple(value)


@dataclass(kw_only=True)
class ExperimentConfig:
    """Options of ``agiqa experiment``: a plan of runs (data sets × variants × seeds, cross
    pairs) into one folder, one table at the end."""

    plan: Any = option(None, positional=True,
                       help="A TOML file or a built-in plan (agiqa experiment --list); in "
                            "Python also a loaded Plan.")
    out: Path | None = option(None, file_okay=False,
                              help="The experiment's folder (results.csv, table.md, table.csv, "
                                   "report.html, the runs).")
    roots: Any = option((), flag="--root", multiple=True, metavar="NAME=DIR",
                        help="The image folder of the plan's data set NAME (repeatable); in "
                             "Python a mapping {NAME: DIR} or NAME=DIR strings.")
    overrides: Any = option((), flag="--set", multiple=True, metavar="KEY=VALUE",
                            help="Change the plan: repeats=2, fit.epochs=5, "
                                 "caches.mplug-owl2.model=DIR (dotted keys, TOML values; "
                                 "repeatable); in Python also a mapping {KEY: value}.")
    resume: bool = option(False, switch=True,
                          help="Finish interrupted runs (their checkpoint.pt).")
    dry_run: bool = option(False, switch=True, help="Print the runs, the extractions and the "
                                                    "estimated time, and stop.")
    device: str | None = option(None, help="auto, cpu, cuda or cuda:N [default: the plan's or "
                                           "auto].")
    concurrent_runs: int | None = option(None, min=1,
                                         help="Runs of one data set and variant trained at "
                                              "once [default: fit's: on a GPU as many as fit, "
                                              "on a CPU 1].")
    engine: str = option("local", choices=("local", "ray"),
                         help="local: this process, one group after another; ray: each group "
                              "(data set × variant) one task on a Ray cluster, one GPU or CPU "
                              "slot each  [pip install \"agiqa[ray]\"]")
    ray_address: str | None = option(None,
                                     help="With --engine ray: auto (this machine's cluster), "
                                          "HOST:PORT, or none: $RAY_ADDRESS if set, else Ray "
                                          "started for the run and stopped after it.")
    reports: bool = option(True, cli=False,
                           cli_reason="the command line always writes each run's report.html; "
                                      "Python may skip them")
    progress: bool = option(True, negate="--quiet", flags=("-q",), help=_PROGRESS)

    def __post_init__(self) -> None:
        check_options(self)
        self.roots = _entries(self.roots, "--root" if cli_naming() else "roots=", "NAME=DIR")
        if isinstance(self.roots, tuple):  # NAME=DIR: a data set of the plan, its images
            self.roots = {name: path for name, _, path in (r.partition("=") for r in self.roots)}
        self.overrides = _entries(self.overrides, "--set" if cli_naming() else "overrides=",
                                  "KEY=VALUE")
        if isinstance(self.overrides, tuple):
            self.overrides = list(self.overrides)
