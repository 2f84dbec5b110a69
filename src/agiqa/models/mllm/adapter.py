"""The MLLM adapter of stage one: semantic vectors and a zero-shot score from one forward pass.

Any Hugging Face image-text-to-text model that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load works, and mPLUG-Owl2 (the paper's model, native in
agiqa). Each model follows an extraction recipe (``agiqa.presets.Recipe``): the user turn puts
the prompt text before the image (as MA-AGIQA did), either the recipe's own turn (mPLUG-Owl2:
``USER: {prompt}\n<|image|> ASSISTANT:``) or the model's chat template, checked and reordered
when it moves the image first; the image may be padded to a square first. The answer prefix
``The quality of the image is`` is appended. One forward pass then gives

* the semantic vector: the mean of the last (normed) hidden state over the real tokens before
  the answer prefix. Causal attention keeps the appended tokens invisible to those, so the
  vector equals that of the plain rendered prompt; left padding is masked out.
* the zero-shot score (Q-Align): softmax over the last position's logits of the rating words,
  weighted 5..1. Only the last position's logits are computed.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from agiqa.errors import ModelLoadError
from agiqa.models.mllm.inputs import BatchPreparer, PromptEncoding
from agiqa.models.mllm.recipe import check_prompt_order, identify_mllm, pad_colour
from agiqa.models.mllm.vision_paths import (
    grouped_window_attention,
    supports_grouped_attention,
    vision_once,
)
from agiqa.presets import PromptSet
from agiqa.runtime import DTYPES, resolve_device, resolve_dtype

__all__ = ["BatchPreparer", "PromptEncoding", "SemanticEncoder", "compile_blocks"]

MPLUG_OWL2 = "mplug_owl2"
_BATCH_METADATA = ("pool_mask", "prompt_rows", "image_repeats")  # not model inputs


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` every repeated block (the children of each ``ModuleList`` of two or
    more modules of one class: decoder layers, vision blocks) in place; returns how many.

    Blocks, not the whole model: one compiled graph serves every layer of a stack, the batch
    shapes that vary (sequence lengths) are marked dynamic after their first change, and the
    Python around the blocks (routing, pooling) stays as it is."""
    inside: set[int] = set()  # modules within a block already compiled
    count = 0
    for module in model.modules():  # parents before children
        if id(module) in inside or not isinstance(module, torch.nn.ModuleList) \
                or len(module) < 2 or len({type(m) for m in module}) != 1:
            continue
        for block in module:
            inside.update(id(m) for m in block.modules())
            block.compile(dynamic=None)
            count += 1
    return count


class SemanticEncoder:
    """Loads an MLLM and its processor; turns images into semantic vectors and zero-shot scores.

    Args:
        model: a preset name, hub id or local folder.
        prompts: the prompt set (one semantic expert per prompt).
        revision: a hub revision (branch, tag or commit); default: the preset's pinned one.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (the recipe's GPU dtype on a GPU, float32 on a CPU), ``bfloat16``,
            ``float16``, ``float32``.
        trust_remote_code: allow the model's own code (off unless asked for).
        attn_implementation: transformers' attention implementation (``sdpa``, ``eager``...).
        pad_square: pad images to a square of the processor's mean colour before the
            processor; ``None`` follows the recipe.
        fuse_prompts: run every prompt of a batch of images in one forward pass, the vision
            tower once per image for all prompts (``None``: on; see :meth:`set_fuse_prompts`).
        compile: compile each block of the language model and the vision tower with
            ``torch.compile`` when the weights are attached (off by default: the compilation
            costs minutes before the first batch).

    Only the config and processor load here (for fingerprints and plans); :meth:`load` loads
    the weights.
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
        pad_square: bool | None = None,
        fuse_prompts: bool | None = None,
        compile: bool = False,
    ):
        self.compile = bool(compile)
        self.identity = identify_mllm(model, revision, require=True)
        self.model_id = self.identity.model_id
        self.recipe = self.identity.recipe
        self.family = MPLUG_OWL2 if self.identity.model_type == MPLUG_OWL2 else "transformers"
        self.prompts = prompts
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, self.recipe.gpu_dtype)
        self.trust_remote_code = trust_remote_code
        self.attn_implementation = attn_implementation
        self.revision = self.identity.revision
        self.pad_square = self.recipe.pad_square if pad_square is None else bool(pad_square)
        self.model = None
        self.config: Any = None
        if self.family == MPLUG_OWL2:
            self._init_mplug_owl2()
        else:
            self._init_transformers()
        if getattr(self.processor, "tokenizer", None) is None:
            raise ModelLoadError(f"{self.model_id}: the processor has no tokenizer")
        self.processor.tokenizer.padding_side = "left"
        self.encodings = [
            PromptEncoding(self.processor, t, prompts.answer_prefix, prompts.rating_words,
                           self.recipe.turn, self.model_id)
            for t in prompts.texts
        ]
        for enc in self.encodings:
            check_prompt_order(self.processor, enc.text, enc.prompt, self.model_id,
                               self._image_token_id)
        self.set_fuse_prompts(fuse_prompts)
        self.rating_weights = torch.tensor(prompts.rating_weights, dtype=torch.float32)
        self.rating_ids = torch.tensor([e.rating_ids for e in self.encodings], dtype=torch.long)

    def set_fuse_prompts(self, fuse: bool | None) -> None:
        """Run every prompt of a batch in one forward pass, or one pass per prompt; rebuilds
        :attr:`prepare`.

        Fused, the vision tower runs once per image and its features serve every prompt's rows
        (mPLUG-Owl2: ``image_repeats``; transformers families: :func:`vision_once`). ``None``
        means on: the vectors are those of separate passes, and on an H200 fusing was faster for
        every family measured (LLaVA-1.5, Qwen2.5-VL, mPLUG-Owl2), though chat-template prompts
        of different lengths leave the shorter one's rows left-padded. mPLUG-Owl2 runs no
        padding: the language model runs once per prompt length, unpadded, after the one
        vision pass, and its vectors equal those of separate passes bit for bit.
        """
        owl = self.family == MPLUG_OWL2
        self.fuse_prompts = True if fuse is None else bool(fuse)
        pad_to = pad_colour(self.processor.image_processor) if self.pad_square else None
        pad_id = getattr(self.processor.tokenizer, "pad_token_id", None)
        self.prepare = BatchPreparer(self.processor, self.encodings, pad_to, self.fuse_prompts,
                                     share_images=True, pad_token_id=pad_id or 0,
                                     processor_repeats=owl)

    def _init_transformers(self) -> None:
        from transformers import AutoConfig, AutoProcessor

        kw = {"revision": self.revision, "trust_remote_code": self.trust_remote_code,
              **self._offline_kw()}
        try:
            self.config = AutoConfig.from_pretrained(self.model_id, **kw)
            self.processor = AutoProcessor.from_pretrained(self.model_id, **kw)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load MLLM {self.model_id!r}: {e}") from None
        self.dim = int(self.config.get_text_config().hidden_size)
        self._image_token_id = None

    def _offline_kw(self) -> dict[str, Any]:
        """``local_files_only`` when the hub is out of reach: files come from the local cache
        at once, with no request retried on the way."""
        return {"local_files_only": True} if self.identity.offline else {}

    def _init_mplug_owl2(self) -> None:
        from agiqa.models.mllm.mplug_owl2 import (
            IMAGE_TOKEN_INDEX,
            MplugOwl2Config,
            MplugOwl2Processor,
        )

        try:
            self.config = MplugOwl2Config.from_pretrained(self.model_id, revision=self.revision)
            self.processor = MplugOwl2Processor.from_pretrained(
                self.model_id, revision=self.revision,
                num_image_tokens=self.config.num_image_tokens)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot load MLLM {self.model_id!r}: {e}") from None
        self.dim = int(self.config.hidden_size)
        self._image_token_id = IMAGE_TOKEN_INDEX

    @property
    def resolved_revision(self) -> str | None:
        """The hub commit the weights come from (a content label for a local folder)."""
        commit = getattr(self.config, "_commit_hash", None)
        return commit or self.identity.resolved_revision or self.revision

    @property
    def recipe_spec(self) -> dict[str, Any]:
        """The recipe as the cache fingerprints it (turn, padding, pooling)."""
        return self.recipe.spec(self.pad_square)

    def load(self, progress: bool = True) -> SemanticEncoder:
        """Load the weights (once); ``progress=False`` hides transformers' loading bar."""
        if self.model is not None:
            return self
        if self.family == MPLUG_OWL2:
            from agiqa.models.mllm.mplug_owl2 import load_mplug_owl2

            try:
                model, _ = load_mplug_owl2(self.model_id, revision=self.revision,
                                           dtype=DTYPES[self.dtype])
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise ModelLoadError(
                    f"cannot load MLLM weights {self.model_id!r}: {e}") from None
        else:
            model = self._load_transformers(progress)
        return self.attach(model.to(self.device))

    def attach(self, model: Any) -> SemanticEncoder:
        """Use ``model`` (already on ``self.device``, in ``self.dtype``) instead of loading the
        weights: for models built in memory, e.g. random full-size models for benchmarks."""
        self.model = model.eval()
        if self.compile:
            compile_blocks(self.model)
        self._base = getattr(self.model, "model", None)
        self._head = self.model.get_output_embeddings()
        self._grouped = self.family != MPLUG_OWL2 and supports_grouped_attention(self.model)
        return self

    def _load_transformers(self, progress: bool) -> Any:
        from transformers import AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        kw: dict[str, Any] = {"revision": self.revision, "dtype": DTYPES[self.dtype],
                              "trust_remote_code": self.trust_remote_code, **self._offline_kw()}
        if self.attn_implementation:
            kw["attn_implementation"] = self.attn_implementation
        try:
            return AutoModelForImageTextToText.from_pretrained(self.model_id, **kw)
        except Exception as e:  # noqa: BLE001 - SafetensorError derives from Exception only
            raise ModelLoadError(f"cannot load MLLM weights {self.model_id!r}: {e}") from None
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()

    @torch.inference_mode()
    def encode(self, batch: dict[str, Any], prompt_index: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: float32 vectors [rows, D] and zero-shot scores [rows], on the CPU."""
        vectors, zero_shot = self.encode_on_device(batch, prompt_index)
        return vectors.cpu(), zero_shot.cpu()

    @torch.inference_mode()
    def encode_all(self, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors [images, prompts, D] and zero-shot scores [images, prompts], on the model's
        device, from what :meth:`BatchPreparer.all_prompts` made (one pass per batch)."""
        out = [self.encode_on_device(b) for b in batches]
        vectors = torch.cat([v for v, _ in out])
        zero_shot = torch.cat([z for _, z in out])
        n_prompts = len(self.encodings)
        vectors = vectors.view(n_prompts, -1, vectors.shape[-1]).transpose(0, 1)
        return vectors, zero_shot.view(n_prompts, -1).t()

    @torch.inference_mode()
    def encode_on_device(self, batch: dict[str, Any], prompt_index: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`encode`, the results left on the model's device.

        The batch says which prompt each row holds (``prompt_rows``); ``prompt_index`` serves
        batches without it. Nothing here waits for the device: inputs (pinned by the loader)
        are copied with ``non_blocking``, so the next batch is queued while this one computes;
        the caller copies results to the host when it needs them (stage one: once per shard).
        """
        if self.model is None:
            self.load()
        batch = dict(batch)
        pool_mask = batch.pop("pool_mask")
        rows = batch.pop("prompt_rows", None)
        repeats = batch.pop("image_repeats", None)
        if rows is None:
            rows = torch.full((pool_mask.shape[0],), prompt_index or 0, dtype=torch.long)
        if self.family == MPLUG_OWL2:
            vectors, last = self._mplug_owl2_pass(batch, pool_mask, repeats or 1)
        else:
            inputs = self._to_device(batch)
            with ExitStack() as stack:
                if self._grouped:
                    stack.enter_context(grouped_window_attention(self.model))
                if repeats:
                    base = self._base if self._base is not None else self.model
                    stack.enter_context(vision_once(base, repeats))
                if self._base is not None:
                    hidden = self._base(**inputs, use_cache=False).last_hidden_state
                else:
                    out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1,
                                     use_cache=False)
                    hidden = out.hidden_states[-1]
            vectors = _mean_pool(pool_mask.to(self.device, non_blocking=True), hidden)
            last = hidden[:, -1]
        logits = self._head(last).float()
        if self.rating_weights.device != logits.device:  # once: a blocking copy syncs
            self.rating_weights = self.rating_weights.to(logits.device)
            self.rating_ids = self.rating_ids.to(logits.device)
        ids = self.rating_ids[rows.to(logits.device, non_blocking=True)]
        probs = torch.softmax(logits.gather(1, ids), dim=-1)
        zero_shot = probs @ self.rating_weights
        return vectors, zero_shot

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the model's device (copied without waiting), uint8 pixels
        normalised there, floating-point tensors in the model's dtype."""
        inputs = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, non_blocking=True)
                if k == "pixel_values" and v.dtype == torch.uint8:
                    v = self.prepare.normalize(v)  # on the device, bit-identical to the CPU's
                if v.is_floating_point():
                    v = v.to(DTYPES[self.dtype])
            inputs[k] = v
        return inputs

    def tokens_run(self, batch: dict[str, Any]) -> tuple[int, int]:
        """The tokens the language model runs for ``batch`` (as :meth:`encode_on_device` gets
        it) and how many of them are padding, counted on the host copies."""
        mask = batch["attention_mask"]
        groups = self._length_groups(
            {k: v for k, v in batch.items() if k not in _BATCH_METADATA},
            batch.get("image_repeats") or 1)
        if groups is None:
            return mask.numel(), mask.numel() - int(mask.sum())
        rows = mask.shape[0] // (batch.get("image_repeats") or 1)
        return sum(length * rows * len(blocks) for length, blocks in groups), 0

    def _length_groups(self, batch: dict[str, Any], repeats: int
                       ) -> list[tuple[int, list[int]]] | None:
        """How an mPLUG-Owl2 batch (model inputs only) runs grouped by length, or ``None`` for
        one pass (see :func:`length_groups`)."""
        mask = batch.get("attention_mask")
        if self.family != MPLUG_OWL2 or mask is None or mask.device.type != "cpu" \
                or not set(batch) <= {"input_ids", "attention_mask", "pixel_values"}:
            return None
        return length_groups(mask, repeats)

    def _mplug_owl2_pass(self, batch: dict[str, Any], pool_mask: torch.Tensor, repeats: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled vectors and last-position states of an mPLUG-Owl2 batch whose ``repeats``
        blocks of rows share the images (``image_repeats``).

        When each block's rows have one length (one prompt per block), the blocks run grouped
        by length: a language-model pass per length, its padding columns cut off and no
        attention mask, all fed by one vision pass. Otherwise one pass over the padded batch.
        The host copies of the ids and masks say which (nothing waits for the device), and
        where the image slots sit, so the multiway modules route by slicing when they can.
        """
        from agiqa.models.mllm.mplug_owl2 import image_span_of

        ids, mask = batch["input_ids"], batch.get("attention_mask")
        groups = self._length_groups(batch, repeats)
        if groups is None:
            if mask is not None and mask.device.type == "cpu" and bool(mask.all()):
                del batch["attention_mask"]  # no padding: causal attention alone, no mask
            inputs = self._to_device(batch)
            if repeats > 1:
                inputs["image_repeats"] = repeats
            hidden = self._base(**inputs, image_span=image_span_of(ids),
                                use_cache=False).last_hidden_state
            return _mean_pool(pool_mask.to(self.device, non_blocking=True), hidden), hidden[:, -1]
        features = None  # one vision pass for every group
        if batch.get("pixel_values") is not None:
            pixels = self._to_device({"pixel_values": batch["pixel_values"]})["pixel_values"]
            features = self._base.encode_images(pixels)
        n = ids.shape[0] // repeats
        vectors: list[Any] = [None] * repeats
        last: list[Any] = [None] * repeats
        for length, blocks in groups:
            rows = [slice(b * n, (b + 1) * n) for b in blocks]
            group_ids = torch.cat([ids[r, -length:] for r in rows])
            group_pool = torch.cat([pool_mask[r, -length:] for r in rows])
            hidden = self._base(
                input_ids=group_ids.to(self.device, non_blocking=True),
                image_features=features, image_repeats=len(blocks),
                image_span=image_span_of(group_ids), use_cache=False,
            ).last_hidden_state
            pooled = _mean_pool(group_pool.to(self.device, non_blocking=True), hidden)
            for j, b in enumerate(blocks):
                vectors[b] = pooled[j * n:(j + 1) * n]
                last[b] = hidden[j * n:(j + 1) * n, -1]
        return torch.cat(vectors), torch.cat(last)


def _mean_pool(pool_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """float32 mean of ``hidden`` (rows, length, D) over the positions ``pool_mask`` marks."""
    m = pool_mask.to(torch.float32)
    return torch.bmm(m[:, None, :], hidden.float())[:, 0] / m.sum(1, keepdim=True)


def length_groups(mask: torch.Tensor, blocks: int) -> list[tuple[int, list[int]]] | None:
    """Blocks of rows that can run without padding, grouped by length.

    ``mask`` (rows, length) on the host, 1 on real tokens, left-padded, holds ``blocks`` equal
    blocks of consecutive rows (a fused batch: one block per prompt). When every block's rows
    share one real length, returns ``(length, [block, ...])`` per distinct length, in order of
    first appearance; ``None`` when the batch holds no padding (one pass needs no mask) or
    its layout is not that one (right padding, rows of one block of different lengths).
    """
    rows, width = mask.shape
    if blocks < 1 or rows == 0 or rows % blocks:
        return None
    lengths = mask.sum(1)
    if bool((lengths == width).all()) or bool((lengths == 0).any()):
        return None
    left_padded = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    if not torch.equal(mask.bool(), left_padded):
        return None
    per_block = lengths.view(blocks, rows // blocks)
    if not bool((per_block == per_block[:, :1]).all()):
        return None
    groups: dict[int, list[int]] = {}
    for block, length in enumerate(per_block[:, 0].tolist()):
        groups.setdefault(int(length), []).append(block)
    return list(groups.items())
