"""The MLLM adapter of stage one: semantic vectors and a zero-shot score from one forward pass.

Any Hugging Face image-text-to-text model that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load works. For each (image, prompt) the user turn puts the
prompt text before the image (as MA-AGIQA did), the model's own processor renders it with
``apply_chat_template(add_generation_prompt=True)``, and the answer prefix
``The quality of the image is`` is appended. One forward pass then gives

* the semantic vector: the mean of the last (normed) hidden state over the real tokens before
  the answer prefix. Causal attention keeps the appended tokens invisible to those, so the
  vector equals that of the plain rendered prompt; left padding is masked out.
* the zero-shot score (Q-Align): softmax over the last position's logits of the rating words,
  weighted 5..1. Only the last position's logits are computed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from agiqa.errors import ModelLoadError
from agiqa.presets import PromptSet, resolve_model_id
from agiqa.runtime import DTYPES, resolve_device, resolve_dtype

__all__ = ["BatchPreparer", "PromptEncoding", "SemanticEncoder"]

def _resolved_revision(model_id: str, revision: str | None, config: Any) -> str | None:
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return commit
    cfg_file = Path(model_id) / "config.json"
    if cfg_file.is_file():
        return "local-" + hashlib.sha256(cfg_file.read_bytes()).hexdigest()[:16]
    return revision


class PromptEncoding:
    """The rendered text of one prompt, the appended answer-prefix ids and the rating ids."""

    def __init__(self, processor: Any, prompt: str, answer_prefix: str, rating_words: list[str]):
        tok = processor.tokenizer
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                  {"type": "image"}]}]
        self.text = processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        sep = "" if self.text[-1:].isspace() else " "
        full = self.text + sep + answer_prefix

        def ids(s: str) -> list[int]:
            return tok(s, add_special_tokens=False)["input_ids"]

        base, with_prefix = ids(self.text), ids(full)
        if with_prefix[: len(base)] == base:
            self.suffix_ids = with_prefix[len(base):]
        else:  # the tokenizer merged across the boundary: tokenize the prefix on its own
            self.suffix_ids = ids(sep + answer_prefix)
        self.rating_ids = []
        for word in rating_words:
            extended = ids(full + word)
            first = extended[len(with_prefix)] if extended[: len(with_prefix)] == with_prefix \
                and len(extended) > len(with_prefix) else ids(word)[0]
            self.rating_ids.append(first)
        if len(set(self.rating_ids)) != len(self.rating_ids):
            raise ModelLoadError(f"rating words {rating_words} share first tokens {self.rating_ids}")


class BatchPreparer:
    """Turns images into model inputs on the CPU; holds the processor but no weights, so
    data-loader workers can run it (and pickle it) cheaply."""

    def __init__(self, processor: Any, encodings: list[PromptEncoding]):
        self.processor = processor
        self.encodings = encodings

    def __call__(self, images: list[Image.Image], prompt_index: int) -> dict[str, torch.Tensor]:
        """Processor output for one prompt and a batch of images, answer prefix appended.

        Adds ``pool_mask``: 1 on the real tokens of the rendered prompt, 0 on padding and on
        the appended answer prefix.
        """
        enc = self.encodings[prompt_index]
        batch = self.processor(text=[enc.text] * len(images), images=images,
                               return_tensors="pt", padding=True)
        batch = dict(batch)
        ids = batch["input_ids"]
        n, k = ids.shape[0], len(enc.suffix_ids)
        suffix = torch.tensor(enc.suffix_ids, dtype=ids.dtype).expand(n, k)
        pool_mask = torch.cat([batch["attention_mask"], torch.zeros(n, k, dtype=torch.long)], 1)
        for name, value in list(batch.items()):
            if torch.is_tensor(value) and value.shape[:2] == ids.shape:
                if name == "input_ids":
                    tail = suffix
                elif name == "attention_mask":
                    tail = torch.ones(n, k, dtype=value.dtype)
                else:
                    tail = torch.zeros(n, k, dtype=value.dtype)
                batch[name] = torch.cat([value, tail], dim=1)
        batch["pool_mask"] = pool_mask
        return batch


class SemanticEncoder:
    """Loads an MLLM and its processor; turns images into semantic vectors and zero-shot scores.

    Args:
        model: a preset name, hub id or local folder.
        prompts: the prompt set (one semantic expert per prompt).
        revision: a hub revision (branch, tag or commit).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16``, ``float32``.
        trust_remote_code: allow the model's own code (off unless asked for).
        load_weights: False loads only the config and processor (for fingerprints and plans).
    """

    def __init__(
        self,
        model: str,
        prompts: PromptSet,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        from transformers import AutoConfig, AutoProcessor

        self.model_id = resolve_model_id(model)
        self.prompts = prompts
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self.attn_implementation = attn_implementation
        self.revision = revision
        kw = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            self.config = AutoConfig.from_pretrained(self.model_id, **kw)
            self.processor = AutoProcessor.from_pretrained(self.model_id, **kw)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load MLLM {self.model_id!r}: {e}") from None
        if getattr(self.processor, "tokenizer", None) is None:
            raise ModelLoadError(f"{self.model_id}: the processor has no tokenizer")
        self.processor.tokenizer.padding_side = "left"
        self.dim = int(self.config.get_text_config().hidden_size)
        self.encodings = [
            PromptEncoding(self.processor, t, prompts.answer_prefix, prompts.rating_words)
            for t in prompts.texts
        ]
        self.prepare = BatchPreparer(self.processor, self.encodings)
        self.rating_weights = torch.tensor(prompts.rating_weights, dtype=torch.float32)
        self.model = None

    @property
    def resolved_revision(self) -> str | None:
        """The hub commit the weights come from (a content label for a local folder)."""
        return _resolved_revision(self.model_id, self.revision, self.config)

    def load(self, progress: bool = True) -> SemanticEncoder:
        """Load the weights (once); ``progress=False`` hides transformers' loading bar."""
        if self.model is not None:
            return self
        from transformers import AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()

        kw: dict[str, Any] = {"revision": self.revision, "trust_remote_code": self.trust_remote_code,
                              "dtype": DTYPES[self.dtype]}
        if self.attn_implementation:
            kw["attn_implementation"] = self.attn_implementation
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.model_id, **kw)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load MLLM weights {self.model_id!r}: {e}") from None
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        return self.attach(model.to(self.device))

    def attach(self, model: Any) -> SemanticEncoder:
        """Use ``model`` (already on ``self.device``, in ``self.dtype``) instead of loading the
        weights: for models built in memory, e.g. random full-size models for benchmarks."""
        self.model = model.eval()
        self._base = getattr(self.model, "model", None)
        self._head = self.model.get_output_embeddings()
        return self

    @torch.inference_mode()
    def encode(self, batch: dict[str, torch.Tensor], prompt_index: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: float32 vectors [B, D] and zero-shot scores [B], on the CPU."""
        vectors, zero_shot = self.encode_on_device(batch, prompt_index)
        return vectors.cpu(), zero_shot.cpu()

    @torch.inference_mode()
    def encode_on_device(self, batch: dict[str, torch.Tensor], prompt_index: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`encode`, the results left on the model's device.

        Nothing here waits for the device: inputs (pinned by the loader) are copied with
        ``non_blocking``, so the next batch is queued while this one computes; the caller
        copies results to the host when it needs them (stage one: once per shard).
        """
        if self.model is None:
            self.load()
        batch = dict(batch)
        pool_mask = batch.pop("pool_mask").to(self.device, non_blocking=True)
        inputs = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, non_blocking=True)
                if v.is_floating_point():
                    v = v.to(DTYPES[self.dtype])
            inputs[k] = v
        if self._base is not None:
            hidden = self._base(**inputs, use_cache=False).last_hidden_state
        else:
            out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1,
                             use_cache=False)
            hidden = out.hidden_states[-1]
        m = pool_mask.to(torch.float32)
        vectors = torch.bmm(m[:, None, :], hidden.float())[:, 0] / m.sum(1, keepdim=True)
        logits = self._head(hidden[:, -1]).float()
        ids = self.encodings[prompt_index].rating_ids
        probs = torch.softmax(logits[:, ids], dim=-1)
        if self.rating_weights.device != probs.device:  # once: a blocking copy syncs
            self.rating_weights = self.rating_weights.to(probs.device)
        zero_shot = probs @ self.rating_weights
        return vectors, zero_shot
