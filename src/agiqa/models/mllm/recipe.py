"""Applying an extraction recipe: which model a name means, how its turn is rendered (prompt
before the image), how its images are padded, and the check that the order holds.

MA-AGIQA conditions the image tokens on the quality prompt: the prompt comes first, then the
image. Some chat templates move every image before the text (llava-hf's LLaVA-1.5 template
renders ``USER: <image>\\n{prompt} ASSISTANT:``); agiqa then renders the turn itself, with the
image block moved after the prompt (``USER: {prompt}\\n<image> ASSISTANT:``), and checks the
processed token ids of every family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from agiqa.errors import ConfigError, ModelLoadError
from agiqa.fileio import LOCAL_REVISION_PREFIX, folder_content_hash, read_json
from agiqa.options import spell
from agiqa.presets import (
    Recipe,
    list_presets,
    load_mllm_preset,
    recipe_for_model,
    resolve_model_id,
)

__all__ = ["MllmIdentity", "check_prompt_order", "expand2square", "identify_mllm",
           "pad_colour", "render_prompt_first"]

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class MllmIdentity:
    """What a model name means, known without loading weights.

    Attributes:
        model_id: the hub id or local folder.
        preset: the MLLM preset the name came from, if any.
        revision: the revision to load (the preset's pinned commit when none is asked for).
        resolved_revision: the commit (hub) or content label (folder) the weights come from,
            when known before loading.
        model_type: ``model_type`` of the model's ``config.json``, when it could be read.
        dim: the language model's width, when known.
        recipe: the extraction recipe of this model.
    """

    model_id: str
    preset: str | None
    revision: str | None
    resolved_revision: str | None
    model_type: str | None
    dim: int | None
    recipe: Recipe
    # The hub cannot be reached (HF_HUB_OFFLINE, or one probe failed): every file comes from
    # the local Hugging Face cache, with no request (no retries) on the way.
    offline: bool = False


def local_revision_label(folder: Path) -> str:
    """The content label of a local model folder: a hash of the files that shape its outputs
    (weights, config, tokenizer, processor, chat template), cached by size and mtime."""
    return LOCAL_REVISION_PREFIX + folder_content_hash(folder)


def _text_width(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") or {}
    width = text.get("hidden_size") or config.get("hidden_size")
    return int(width) if width else None


_REACHABLE: bool | None = None  # the hub, probed once per process


def hub_offline() -> bool:
    """Whether the Hugging Face hub is out of reach: ``HF_HUB_OFFLINE`` is set, or one request
    to it failed (no DNS, no route, a 5 s timeout). Probed once per process, without retries:
    offline, the first failure is final."""
    global _REACHABLE
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:
        return True
    if constants.HF_HUB_OFFLINE:
        return True
    if _REACHABLE is None:
        try:
            get_session().head(constants.ENDPOINT, timeout=5)
            _REACHABLE = True
        except Exception:  # noqa: BLE001 - any failure to connect means offline
            _REACHABLE = False
    return not _REACHABLE


def _hub_config(model_id: str, revision: str | None) -> tuple[dict[str, Any], str | None] | None:
    """The hub ``config.json`` and the commit it came from (the local hub cache first; the
    network only when the hub is reachable)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    for local_only in (True, False):
        if not local_only and hub_offline():
            break
        try:
            # A short timeout: offline, one quick answer beats a minute of retries.
            path = Path(hf_hub_download(model_id, "config.json", revision=revision,
                                        local_files_only=local_only, etag_timeout=5))
        except Exception:  # noqa: BLE001 - not cached / offline / unknown repository
            continue
        commit = path.parent.name if _COMMIT.match(path.parent.name) else None
        try:
            return read_json(path), commit
        except (OSError, ValueError):
            return None
    return None


def identify_mllm(model: str, revision: str | None = None, fetch: bool = True,
                  require: bool = False) -> MllmIdentity:
    """Resolve a preset name, hub id or local folder to its :class:`MllmIdentity`.

    Args:
        model: a preset name, hub id or local folder.
        revision: a hub revision; default: the preset's pinned commit, if any.
        fetch: read a hub model's ``config.json`` (from the hub cache, else the network).
        require: the model is about to be loaded: a hub model that is neither in the local hub
            cache nor reachable is an error now, in one line, rather than after minutes of
            retries in the loader.
    """
    model = str(model)
    preset = None
    folder = Path(model)
    if not folder.exists():
        names = list_presets("mllms")
        for name in names:
            p = load_mllm_preset(name)
            if model == name or model == p.model:
                preset, model = name, p.model
                revision = revision or p.revision
                break
        else:  # neither a folder nor a preset: a hub id (owner/name), else did-you-mean
            model = resolve_model_id(model)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"cannot load MLLM {model!r}: the folder has no config.json")
        try:
            config = read_json(folder / "config.json")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
        model_type = config.get("model_type")
        # The absolute path is a label (the same run works from any folder); the content hash
        # is the identity.
        model = str(folder.resolve())
        return MllmIdentity(model, None, revision, local_revision_label(folder), model_type,
                            _text_width(config), recipe_for_model(model_type))
    found = _hub_config(model, revision) if fetch else None
    if found is None and fetch and require:
        raise ModelLoadError(
            f"MLLM {model!r}{f' (revision {revision})' if revision else ''} is neither in the "
            "local Hugging Face cache nor reachable on the hub"
            + (" (offline: HF_HUB_OFFLINE is set, or the hub did not answer)"
               if hub_offline() else "")
            + f"; download it on a connected machine (huggingface-cli download {model}) into "
            "this machine's cache, or give a local folder holding it instead "
            "(extract-semantics --mllm FOLDER)")
    config, commit = found if found else ({}, None)
    if commit is None and revision and _COMMIT.match(revision):
        commit = revision
    model_type = config.get("model_type")
    dim = _text_width(config)
    if dim is None and preset:
        dim = load_mllm_preset(preset).hidden_size
    return MllmIdentity(model, preset, revision, commit, model_type, dim,
                        recipe_for_model(model_type, preset),
                        offline=bool(fetch and found is not None and hub_offline()))


def pad_colour(image_processor: Any) -> tuple[int, ...]:
    """``getFeature.py``'s background: the processor's mean, ``int(x * 255)`` per channel."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None:
        raise ConfigError(f"{spell('pad_square', True)} needs the image processor's image_mean, "
                          f"and {type(image_processor).__name__} has none")
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    return tuple(int(x * 255) for x in mean)


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Centre ``image`` on a square of ``background`` (``getFeature.py``'s offsets)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, (0, (width - height) // 2) if width > height else
                 ((height - width) // 2, 0))
    return result


def render_prompt_first(processor: Any, prompt: str, image_marker: str, model_id: str) -> str:
    """The model's chat template rendering of one user turn, with the prompt before the image.

    The turn ``[text, image]`` is rendered with ``apply_chat_template``. When the template has
    moved the image before the prompt, the image block (from the first image marker to the
    prompt, e.g. ``<image>\\n``) is moved after the prompt with its separator in front:
    ``USER: <image>\\n{prompt} ASSISTANT:`` becomes ``USER: {prompt}\\n<image> ASSISTANT:``.
    """
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt},
                                              {"type": "image"}]}]
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - no template, or one that refuses the turn
        raise ModelLoadError(f"{model_id}: its chat template cannot render a user turn of text "
                             f"and image ({type(e).__name__}: {e})") from None
    at_prompt, at_image = text.find(prompt), text.find(image_marker)
    if at_prompt < 0:
        raise ModelLoadError(f"{model_id}: its chat template does not render the prompt "
                             f"verbatim ({text!r}); the prompt cannot be put before the image")
    if at_image < 0 or at_prompt < at_image:
        # In order, or an image placeholder of another spelling: the token-id check decides.
        return text
    block = text[at_image:at_prompt]
    core = block.rstrip()
    separator = block[len(core):]
    end = at_prompt + len(prompt)
    if text.find(image_marker, end) >= 0 or text[at_image:end].count(prompt) != 1:
        raise ModelLoadError(f"{model_id}: its chat template renders {text!r}; agiqa cannot "
                             "move the image after the prompt")
    return text[:at_image] + prompt + separator + core + text[end:]


def _image_token_id(processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        return token_id
    token = getattr(processor, "image_token", None)
    if token:
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
        return token_id if isinstance(token_id, int) else None
    return None


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def check_prompt_order(processor: Any, text: str, prompt: str, model_id: str,
                       image_token_id: int | None = None) -> None:
    """Refuse a rendering whose processed ``input_ids`` do not put the prompt before the image.

    The processor runs on ``text`` with one small image; the prompt's first token is found by
    its following tokens (the first may merge with the text before it).
    """
    image_token_id = image_token_id if image_token_id is not None else _image_token_id(processor)
    if image_token_id is None:
        raise ModelLoadError(f"{model_id}: the processor names no image token; the prompt order "
                             "cannot be checked")
    probe = Image.new("RGB", (64, 64), (128, 128, 128))
    ids = processor(text=[text], images=[probe], return_tensors="pt")["input_ids"][0].tolist()
    if image_token_id not in ids:
        raise ModelLoadError(f"{model_id}: the processed turn holds no image token "
                             f"({image_token_id})")
    first_image = ids.index(image_token_id)
    tok = processor.tokenizer
    at_prompt = -1
    for variant in (prompt, " " + prompt):
        pieces = tok(variant, add_special_tokens=False)["input_ids"]
        needle = pieces[1:6] if len(pieces) > 1 else pieces
        found = _find(ids, needle)
        if found >= 0:
            at_prompt = found - (1 if len(pieces) > 1 else 0)
            break
    if at_prompt < 0:
        raise ModelLoadError(f"{model_id}: the prompt's tokens are not found in the processed "
                             "turn; the prompt order cannot be checked")
    if at_prompt > first_image:
        raise ModelLoadError(
            f"{model_id}: the processed turn puts the image (token {first_image}) before the "
            f"prompt (token {at_prompt}); MA-AGIQA needs the prompt first")
