"""Named presets kept as data: ``presets/<kind>/<name>.json``, looked up by file stem.

Every lookup returns a fresh object, so callers may change what they get.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agiqa.errors import ConfigError

__all__ = [
    "DatasetPreset",
    "MllmPreset",
    "PromptSet",
    "Recipe",
    "list_presets",
    "load_dataset_preset",
    "load_mllm_preset",
    "load_prompts",
    "load_recipe",
    "recipe_for_model",
    "resolve_model_id",
]

DEFAULT_MLLM = "mplug-owl2"
DEFAULT_PROMPTS = "paper"


def _preset_dir(kind: str):
    return resources.files("agiqa.presets") / kind


def list_presets(kind: str) -> list[str]:
    """Names of the presets of one kind (``prompts``, ``mllms``, ``datasets``)."""
    return sorted(p.name[:-5] for p in _preset_dir(kind).iterdir() if p.name.endswith(".json"))


def _load(kind: str, name: str) -> dict[str, Any]:
    path = _preset_dir(kind) / f"{name}.json"
    if not path.is_file():
        names = list_presets(kind)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown {kind[:-1]} preset {name!r} (choose from {', '.join(names)}){hint}"
        )
    return json.loads(path.read_text(encoding="utf-8"))


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
            "prompts": [{"name": n, "text": t} for n, t in zip(self.names, self.texts)],
            "answer_prefix": self.answer_prefix,
            "rating_words": list(self.rating_words),
            "rating_weights": list(self.rating_weights),
        }


def load_prompts(spec: str | os.PathLike = DEFAULT_PROMPTS) -> PromptSet:
    """A prompt preset name, a JSON file (the preset schema) or a text file (one prompt a line)."""
    path = Path(spec)
    if path.suffix in (".json", ".txt") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: prompt file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                return PromptSet.from_dict(json.loads(text), str(path))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return PromptSet(names=[f"prompt{i + 1}" for i in range(len(lines))], texts=lines)
    return PromptSet.from_dict(_load("prompts", str(spec)), f"prompt preset {spec}")


@dataclass
class MllmPreset:
    name: str
    model: str
    description: str = ""
    hidden_size: int | None = None
    parameters: str = ""
    download: str = ""
    gpu_memory: str = ""
    revision: str | None = None


def load_mllm_preset(name: str) -> MllmPreset:
    return MllmPreset(name=name, **_load("mllms", name))


def resolve_model_id(spec: str | os.PathLike) -> str:
    """A preset name → its hub id; a local folder or hub id is returned as given."""
    spec = str(spec)
    if "/" not in spec and not Path(spec).exists() and spec in list_presets("mllms"):
        return load_mllm_preset(spec).model
    return spec


@dataclass
class DatasetPreset:
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


def load_dataset_preset(name: str) -> DatasetPreset:
    return DatasetPreset(name=name, **_load("datasets", name))


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


def load_recipe(name: str = DEFAULT_RECIPE) -> Recipe:
    """The recipe preset ``presets/recipes/<name>.json``."""
    d = _load("recipes", name)
    try:
        return Recipe(name=name, **d)
    except TypeError as e:
        raise ConfigError(f"recipe preset {name}: {e}") from None


def recipe_for_model(model_type: str | None, preset: str | None = None) -> Recipe:
    """The recipe that lists ``model_type`` (or the MLLM preset ``preset``), else the default."""
    for name in list_presets("recipes"):
        recipe = load_recipe(name)
        if (model_type and model_type in recipe.model_types) or \
                (preset and preset in recipe.presets):
            return recipe
    return load_recipe(DEFAULT_RECIPE)
