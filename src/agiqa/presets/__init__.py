"""Named presets kept as data: ``presets/<kind>/<name>.json``, looked up by file stem.

Kinds: ``mllms``, ``prompts``, ``datasets``, ``backbones``, ``recipes`` (stage one's way of
reading an image, chosen by the MLLM; or a command's options, chosen with ``--recipe``, such as
``cpu`` for ``fit``) and ``plans`` (experiment plans, ``presets/plans/<name>.toml``, read by
:mod:`agiqa.pipeline.experiment`). Built-in presets ship inside the
package; a user adds presets (or overrides a built-in one of the same name) with files in
``$AGIQA_HOME/presets/<kind>/<name>.json`` (``AGIQA_HOME`` defaults to ``~/.cache/agiqa``).
Each file becomes a typed dataclass, ``Cls(**d)``, so an unknown key raises
:class:`~agiqa.errors.ConfigError`. Every lookup returns a fresh object, so callers may change
what they get. This package imports nothing of agiqa above it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agiqa.errors import ConfigError
from agiqa.fileio import agiqa_home, read_json, read_text

__all__ = [
    "DEFAULT_MLLM",
    "DEFAULT_PROMPTS",
    "KINDS",
    "BackbonePreset",
    "DatasetPreset",
    "MllmPreset",
    "OptionsRecipe",
    "PlanPreset",
    "PromptSet",
    "Recipe",
    "agiqa_home",
    "describe_presets",
    "is_hub_id",
    "list_presets",
    "load_backbone_preset",
    "load_dataset_preset",
    "load_mllm_preset",
    "load_options_recipe",
    "load_plan_preset",
    "load_prompt_preset",
    "load_prompts",
    "load_recipe",
    "preset_source",
    "recipe_for_model",
    "resolve_model_id",
]

DEFAULT_MLLM = "mplug-owl2"
DEFAULT_PROMPTS = "paper"
# Preset kinds (folder name → what one preset is, for messages).
KINDS: dict[str, str] = {"mllms": "MLLM", "prompts": "prompt", "datasets": "data set",
                         "backbones": "backbone", "recipes": "recipe",
                         "plans": "experiment plan"}
# The file suffix of a kind's presets (JSON unless named here).
_SUFFIX: dict[str, str] = {"plans": ".toml"}
# A Hugging Face repository id: owner/name, each part starting with a letter or digit.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _user_dir(kind: str) -> Path:
    return agiqa_home() / "presets" / kind


def _preset_files(kind: str) -> dict[str, tuple[Any, bool]]:
    """Name → (file, is the user's) of every preset of ``kind``; a user's file shadows a
    built-in one of the same name."""
    files: dict[str, tuple[Any, bool]] = {}
    suffix = _SUFFIX.get(kind, ".json")
    builtin = resources.files("agiqa.presets") / kind
    if builtin.is_dir():
        files.update({p.name[: -len(suffix)]: (p, False) for p in builtin.iterdir()
                      if p.name.endswith(suffix)})
    user = _user_dir(kind)
    if user.is_dir():
        # Only regular files: a FIFO or a folder named *.json is not a preset (and a FIFO
        # would block the reader forever).
        files.update({p.stem: (p, True) for p in user.glob(f"*{suffix}") if p.is_file()})
    return files


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown preset kind {kind!r} (choose from {', '.join(KINDS)})"
                          + _did_you_mean(kind, list(KINDS)))


def list_presets(kind: str) -> list[str]:
    """Names of the presets of one kind (``mllms``, ``prompts``, ``datasets``, ``backbones``,
    ``recipes``), sorted by name.

    Raises:
        ConfigError: for a kind that does not exist.
    """
    _check_kind(kind)
    return sorted(_preset_files(kind))


def preset_source(kind: str, name: str) -> str:
    """``built-in``, or the path of the user's file that defines the preset."""
    path, is_user = _preset_files(kind).get(name, (None, False))
    return str(path) if is_user else "built-in"


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _load(kind: str, name: str) -> dict[str, Any]:
    """The JSON object of preset ``name``; an unknown name suggests the close ones."""
    files = _preset_files(kind)
    path = files[name][0] if name in files else None
    label = KINDS.get(kind, kind.rstrip("s"))
    if path is None:
        names = sorted(files)
        raise ConfigError(f"unknown {label} preset {name!r} (choose from {', '.join(names)})"
                          + _did_you_mean(name, names))
    try:
        d = read_json(path, limit=1 << 20) if isinstance(path, Path) else \
            json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{label} preset {path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{label} preset {path}: a JSON object is needed")
    return d


def _build(cls: type, d: dict[str, Any], source: str) -> Any:
    """``cls(**d)``, with unknown and missing keys reported as a :class:`ConfigError`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{source}: missing keys {missing}")
    return cls(**d)


# -- prompts -------------------------------------------------------------------------------------
@dataclass
class PromptSet:
    """The quality prompts (one semantic expert each) and the zero-shot rating recipe."""

    names: list[str]
    texts: list[str]
    answer_prefix: str = "The quality of the image is"
    rating_words: list[str] = field(
        default_factory=lambda: [" excellent", " good", " fair", " poor", " bad"]
    )
    rating_weights: list[float] = field(default_factory=lambda: [5.0, 4.0, 3.0, 2.0, 1.0])
    description: str = ""

    def __post_init__(self) -> None:
        self.rating_weights = [float(w) for w in self.rating_weights]
        if not self.texts:
            raise ConfigError("at least one prompt is needed")
        if len(self.names) != len(self.texts) or len(set(self.names)) != len(self.names):
            raise ConfigError(f"prompt names must be unique, one per prompt: {self.names}")
        if len(self.rating_words) != len(self.rating_weights) or not self.rating_words:
            raise ConfigError("rating_words and rating_weights must have the same, non-zero length")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> PromptSet:
        try:
            prompts = d["prompts"]
            names = [p["name"] if isinstance(p, dict) else f"prompt{i + 1}" for i, p in
                     enumerate(prompts)]
            texts = [p["text"] if isinstance(p, dict) else str(p) for p in prompts]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source}: a prompt file needs a 'prompts' list ({e})") from None
        extra = {k: d[k] for k in ("answer_prefix", "rating_words", "rating_weights",
                                   "description") if k in d}
        unknown = set(d) - {"prompts", *extra}
        if unknown:
            raise ConfigError(f"{source}: unknown keys {sorted(unknown)}")
        return cls(names=names, texts=texts, **extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": [{"name": n, "text": t}
                        for n, t in zip(self.names, self.texts, strict=True)],
            "answer_prefix": self.answer_prefix,
            "rating_words": list(self.rating_words),
            "rating_weights": list(self.rating_weights),
        }

    def summary(self) -> dict[str, Any]:
        return {"prompts": len(self.texts), "names": list(self.names),
                "description": self.description}


def load_prompts(spec: str | os.PathLike = DEFAULT_PROMPTS) -> PromptSet:
    """A prompt preset name, a JSON file (the preset schema) or a text file (one prompt a line)."""
    path = Path(spec)
    if path.suffix in (".json", ".txt") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: prompt file not found")
        try:
            text = read_text(path, 1 << 20, "prompt file")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not readable ({e})") from None
        if path.suffix == ".json":
            try:
                return PromptSet.from_dict(json.loads(text), str(path))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise ConfigError(f"{path}: no prompt in the file (one prompt a line)")
        return PromptSet(names=[f"prompt{i + 1}" for i in range(len(lines))], texts=lines)
    return load_prompt_preset(str(spec))


def load_prompt_preset(name: str) -> PromptSet:
    return PromptSet.from_dict(_load("prompts", name), f"prompt preset {name}")


# -- MLLMs ---------------------------------------------------------------------------------------
@dataclass
class MllmPreset:
    """A tested MLLM: its hub id (and optionally a pinned revision) and what it costs."""

    name: str
    model: str
    description: str = ""
    hidden_size: int | None = None
    parameters: str = ""
    download: str = ""
    gpu_memory: str = ""
    revision: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "revision": self.revision, "width": self.hidden_size,
                "parameters": self.parameters, "download": self.download,
                "gpu_memory": self.gpu_memory, "description": self.description}


def load_mllm_preset(name: str) -> MllmPreset:
    return _build(MllmPreset, {"name": name, **_load("mllms", name)}, f"MLLM preset {name}")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a Hugging Face repository id, ``owner/name``."""
    return bool(_HUB_ID.fullmatch(spec)) and ".." not in spec


def resolve_model_id(spec: str | os.PathLike) -> str:
    """A local folder as given, a preset name → its hub id, a hub id (``owner/name``) as given.

    Anything else is refused before any hub call, with the close preset names.
    """
    spec = str(spec)
    if Path(spec).exists():
        return spec
    names = list_presets("mllms")
    if spec in names:
        return load_mllm_preset(spec).model
    if is_hub_id(spec):
        return spec
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or os.sep in spec:
        raise ConfigError(f"cannot load MLLM {spec!r}: no such folder (nor a preset or hub id)")
    raise ConfigError(f"MLLM {spec!r} is neither a preset ({', '.join(names)}), an existing "
                      "folder nor a hub id (owner/name)" + _did_you_mean(spec, names))


# -- data sets -----------------------------------------------------------------------------------
@dataclass
class DatasetPreset:
    """A labelled data set: its label file, columns, targets, split files and score range."""

    name: str
    labels: str
    image_columns: list[str]
    targets: dict[str, str]
    default_target: str | None
    split_files: dict[str, str] = field(default_factory=dict)
    score_columns: list[str] = field(default_factory=list)
    score_range: list[float] | None = None
    description: str = ""
    url: str = ""

    def summary(self) -> dict[str, Any]:
        return {"labels": self.labels, "targets": list(self.targets),
                "default_target": self.default_target, "score_range": self.score_range,
                "split_files": sorted(self.split_files), "description": self.description,
                "url": self.url}


def load_dataset_preset(name: str) -> DatasetPreset:
    return _build(DatasetPreset, {"name": name, **_load("datasets", name)},
                  f"data set preset {name}")


# -- backbones -----------------------------------------------------------------------------------
@dataclass
class BackbonePreset:
    """A vision backbone: the timm ViT, its overrides and the MANIQA widths that follow."""

    name: str
    timm_name: str
    feature_blocks: list[int]
    maniqa_dim: int
    vit_args: dict[str, Any] = field(default_factory=dict)
    swin_heads: int = 4
    dim_mlp: int = 768
    score_bias_init: float | None = None
    pretrained: bool = False  # timm_name names published weights the ViT can start from
    description: str = ""

    def architecture(self) -> dict[str, Any]:
        """The model arguments (``ModelConfig`` fields) this backbone sets."""
        d = {"timm_name": self.timm_name, "vit_args": dict(self.vit_args),
             "feature_blocks": list(self.feature_blocks), "maniqa_dim": self.maniqa_dim,
             "swin_heads": self.swin_heads, "dim_mlp": self.dim_mlp}
        if self.score_bias_init is not None:
            d["score_bias_init"] = self.score_bias_init
        return d

    def summary(self) -> dict[str, Any]:
        return {"timm_name": self.timm_name, "width": self.vit_args.get("embed_dim", 768),
                "maniqa_width": self.maniqa_dim, "feature_blocks": list(self.feature_blocks),
                "description": self.description}


def load_backbone_preset(name: str) -> BackbonePreset:
    return _build(BackbonePreset, {"name": name, **_load("backbones", name)},
                  f"backbone preset {name}")


# -- experiment plans ----------------------------------------------------------------------------
@dataclass
class PlanPreset:
    """An experiment plan preset: its TOML text and where it comes from. The plan itself is
    parsed and checked by :mod:`agiqa.pipeline.experiment`."""

    name: str
    source: str
    text: str

    def table(self) -> dict[str, Any]:
        from agiqa.tomlio import parse_toml

        return parse_toml(self.text, self.source)

    def summary(self) -> dict[str, Any]:
        d = self.table()
        runs = d.get("repeats", 1) if not d.get("split_seeds") else d["split_seeds"]
        return {"description": d.get("description", ""), "datasets": list(d.get("datasets", {})),
                "variants": list(d.get("variants", {})), "repeats": runs}


def load_plan_preset(name: str) -> PlanPreset:
    files = _preset_files("plans")
    if name not in files:
        names = sorted(files)
        raise ConfigError(f"unknown experiment plan {name!r} (choose from {', '.join(names)}, "
                          "or give a .toml file)" + _did_you_mean(name, names))
    path = files[name][0]
    try:
        text = read_text(path, 1 << 20, "plan file") if isinstance(path, Path) else \
            path.read_text(encoding="utf-8")  # a built-in plan, inside the package
    except (OSError, ValueError) as e:
        raise ConfigError(f"experiment plan {path}: not readable ({e})") from None
    return PlanPreset(name, str(path), text)


# -- listing -------------------------------------------------------------------------------------
def _load_any_recipe(name: str) -> Any:
    d = _load("recipes", name)
    return load_options_recipe(name) if "command" in d else load_recipe(name)


_LOADERS: dict[str, Callable[[str], Any]] = {
    "mllms": load_mllm_preset,
    "prompts": load_prompt_preset,
    "datasets": load_dataset_preset,
    "backbones": load_backbone_preset,
    "recipes": _load_any_recipe,
    "plans": load_plan_preset,
}


def describe_presets(kinds: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every preset of ``kinds`` (default: all) as ``{kind: [{"name", "source", ...}]}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds or list(_LOADERS):
        _check_kind(kind)
        out[kind] = [{"name": name, "source": preset_source(kind, name),
                      **_LOADERS[kind](name).summary()} for name in list_presets(kind)]
    return out



# -- extraction recipes --------------------------------------------------------------------------
DEFAULT_RECIPE = "chat-template"
RECIPE_POOLINGS = ("mean",)


@dataclass
class Recipe:
    """How stage one turns (image, prompt) into a vector, beyond the model's weights.

    Attributes:
        name: the preset's file stem.
        turn: the user turn with ``{prompt}`` and the model's image marker, rendered as is after
            the tokenizer's BOS; ``None`` renders the model's own chat template, prompt first.
        pad_square: pad the image to a square of the image processor's mean colour, centred
            (``expand2square``), before the processor.
        pooling: ``mean``: the mean of the final normed hidden state over every real token of
            the rendered sequence (BOS, text and image tokens).
        gpu_dtype: the dtype that ``--dtype auto`` picks on a GPU (float32 on a CPU).
        model_types: the ``model_type`` values of ``config.json`` that use this recipe.
        presets: the MLLM presets that use it (known without reading their ``config.json``).
    """

    name: str
    description: str = ""
    turn: str | None = None
    pad_square: bool = False
    pooling: str = "mean"
    gpu_dtype: str = "bfloat16"
    model_types: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.turn is not None and "{prompt}" not in self.turn:
            raise ConfigError(f"recipe {self.name}: the turn {self.turn!r} has no {{prompt}}")
        if self.pooling not in RECIPE_POOLINGS:
            raise ConfigError(f"recipe {self.name}: unknown pooling {self.pooling!r} "
                              f"(choose from {', '.join(RECIPE_POOLINGS)})")
        if self.gpu_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"recipe {self.name}: unknown gpu_dtype {self.gpu_dtype!r}")

    def spec(self, pad_square: bool | None = None) -> dict[str, Any]:
        """What the cache fingerprints: the turn, the padding (``pad_square`` overrides the
        recipe's) and the pooling; the dtype is fingerprinted on its own."""
        return {"turn": self.turn if self.turn is not None else "chat_template, prompt first",
                "pad_square": self.pad_square if pad_square is None else bool(pad_square),
                "pooling": self.pooling}

    def summary(self) -> dict[str, Any]:
        used = [*self.presets, *self.model_types] if (self.presets or self.model_types) \
            else ["any other MLLM"]
        return {"used_by": f"extract-semantics: {', '.join(dict.fromkeys(used))}",
                "description": self.description}


@dataclass
class OptionsRecipe:
    """Options of one command under a name (``agiqa fit --recipe cpu``): they replace the
    command's defaults, and the options given replace them."""

    name: str
    command: str
    options: dict[str, Any]
    description: str = ""

    def summary(self) -> dict[str, Any]:
        return {"used_by": f"{self.command} --recipe {self.name}", "options": dict(self.options),
                "description": self.description}


def load_options_recipe(name: str, command: str | None = None) -> OptionsRecipe:
    """The recipe preset ``presets/recipes/<name>.json`` of a command's options.

    Raises:
        ConfigError: unknown name (with the close ones), a stage-one recipe, or a recipe of
            another command than ``command``.
    """
    d = _load("recipes", name)
    if "command" not in d:
        raise ConfigError(f"recipe preset {name} is stage one's way of reading an image, not a "
                          f"set of options" + (f" of {command}" if command else ""))
    recipe = _build(OptionsRecipe, {"name": name, **d}, f"recipe preset {name}")
    if command is not None and recipe.command != command:
        raise ConfigError(f"recipe preset {name} holds options of {recipe.command}, not of "
                          f"{command}")
    if not isinstance(recipe.options, dict):
        raise ConfigError(f"recipe preset {name}: 'options' must be a JSON object")
    return recipe


def load_recipe(name: str = DEFAULT_RECIPE) -> Recipe:
    """The stage-one recipe preset ``presets/recipes/<name>.json``."""
    d = _load("recipes", name)
    if "command" in d:
        raise ConfigError(f"recipe preset {name} holds options of {d['command']}, not stage "
                          "one's way of reading an image")
    try:
        return Recipe(name=name, **d)
    except TypeError as e:
        raise ConfigError(f"recipe preset {name}: {e}") from None


def recipe_for_model(model_type: str | None, preset: str | None = None) -> Recipe:
    """The recipe that lists ``model_type`` (or the MLLM preset ``preset``), else the default."""
    for name in list_presets("recipes"):
        if "command" in _load("recipes", name):
            continue
        recipe = load_recipe(name)
        if (model_type and model_type in recipe.model_types) or \
                (preset and preset in recipe.presets):
            return recipe
    return load_recipe(DEFAULT_RECIPE)
