"""Model inputs of stage one, made on the CPU (in data-loader workers): the rendered prompts
with their answer prefix and rating tokens, and the batches of every prompt, fused or not."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from agiqa.errors import ModelLoadError
from agiqa.models.mllm.recipe import expand2square, render_prompt_first

__all__ = ["BatchPreparer", "PromptEncoding", "fuse_batches"]


class PromptEncoding:
    """The rendered text of one prompt, the appended answer-prefix ids and the rating ids.

    Args:
        processor: the model's processor.
        prompt: the quality prompt.
        answer_prefix: the text appended for the zero-shot score.
        rating_words: the rating words whose first tokens are scored.
        turn: the recipe's turn with ``{prompt}``; ``None`` renders the model's chat template
            with the prompt before the image.
        model_id: the model's name, for error messages.
    """

    def __init__(self, processor: Any, prompt: str, answer_prefix: str, rating_words: list[str],
                 turn: str | None = None, model_id: str = "the MLLM"):
        tok = processor.tokenizer
        self.prompt = prompt
        if turn is not None:
            self.text = turn.replace("{prompt}", prompt)
        else:
            marker = getattr(processor, "image_token", None)
            if not marker:
                raise ModelLoadError(f"{model_id}: the processor names no image token")
            self.text = render_prompt_first(processor, prompt, marker, model_id)
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
            raise ModelLoadError(
                f"rating words {rating_words} share first tokens {self.rating_ids}")


class BatchPreparer:
    """Turns images into model inputs on the CPU; holds the processor but no weights, so
    data-loader workers can run it (and pickle it) cheaply.

    Args:
        processor: the model's processor.
        encodings: one per prompt.
        pad_to: pad images to a square of this colour first (``None``: as they are).
        fuse: :meth:`all_prompts` gives one batch holding every prompt (one forward pass).
        share_images: with ``fuse``, the pixels come once and the model reuses them for every
            prompt (``image_repeats``), so the vision tower runs once per image.
        pad_token_id: the id left padding uses when prompts of different length are fused.
        processor_repeats: the processor itself takes ``image_repeats`` (mPLUG-Owl2's): with
            ``share_images`` and prompts whose answer prefixes have one length, one processor
            call then makes the fused batch.
    """

    def __init__(self, processor: Any, encodings: list[PromptEncoding],
                 pad_to: tuple[int, ...] | None = None, fuse: bool = False,
                 share_images: bool = False, pad_token_id: int = 0,
                 processor_repeats: bool = False):
        self.processor = processor
        self.encodings = encodings
        self.pad_to = pad_to
        self.fuse = fuse
        self.share_images = share_images and fuse
        self.pad_token_id = pad_token_id
        self.processor_repeats = processor_repeats
        self._text_rows: dict[tuple, dict[str, Any]] = {}  # uint8 path: text rows by shape
        self._split: str | None = None  # "owl", "torchvision", "patches" or "": uint8_pixels

    def __call__(self, images: list[Image.Image], prompt_index: int) -> dict[str, Any]:
        """Processor output for one prompt and a batch of images, answer prefix appended.

        Adds ``pool_mask`` (1 on the real tokens of the rendered prompt, 0 on padding and on
        the appended answer prefix) and ``prompt_rows`` (the prompt of each row).
        """
        if self.pad_to is not None:
            images = [expand2square(im, self.pad_to) for im in images]
        return self._rows(images, [prompt_index])

    @property
    def uint8_pixels(self) -> bool:
        """Whether the pixels can leave the loader as uint8 and be normalised on the device
        (:meth:`image_item`, :meth:`all_prompts_pixels`, :meth:`normalize`), the split exact:
        the image side is agiqa's own (mPLUG-Owl2); or a Hugging Face image processor whose
        pipeline is the torchvision backend's standard one (resize and crop on uint8, then one
        rescale-and-normalise) with a fixed output size (LLaVA's CLIP processor); or Qwen2-VL's
        (resize on uint8, then rescale-and-normalise, then cut into patches: the patches are
        cut on uint8 in the loader, one frame of each, and normalised after the transfer)."""
        return self._kind != ""

    @property
    def _kind(self) -> str:
        """``_split_kind`` of the processor, worked out once (a probe of the processor)."""
        if self._split is None:
            self._split = _split_kind(self.processor)
        return self._split

    def image_item(self, image: Image.Image) -> Any:
        """One image's pixels as the loader hands them over: padded to a square if the recipe
        says so, resized and cropped, uint8: (H, W, 3) for mPLUG-Owl2, (3, H, W) for a fixed
        crop; for Qwen2-VL's patches, ``(patches, grid)``: the (n, 3, p, p) first frame of each
        patch (the frames of an image's patch are copies) and its ``image_grid_thw`` row."""
        if self.pad_to is not None:
            image = expand2square(image, self.pad_to)
        ip = self.processor.image_processor
        if not self.uint8_pixels:
            raise ValueError("this processor's pixels cannot be split into uint8 and a device step")
        if self._kind == "owl":
            return ip.crop_uint8(image)
        out = ip(images=[image], do_rescale=False, do_normalize=False, return_tensors="pt")
        pixels = out["pixel_values"]
        if pixels.dtype != torch.uint8:
            raise ValueError(f"the image processor gave {pixels.dtype} pixels before "
                             "normalisation, not uint8")
        if self._kind != "patches":
            return pixels[0].numpy()
        t, p = ip.temporal_patch_size, ip.patch_size
        frames = pixels.view(pixels.shape[0], -1, t, p, p)
        if not bool((frames == frames[:, :, :1]).all()):
            raise ValueError("the image processor's patch frames differ")
        return frames[:, :, 0].contiguous().numpy(), out["image_grid_thw"][0].numpy()

    def batch_pixels(self, items: list[Any], pin: bool = False) -> dict[str, torch.Tensor]:
        """Items of :meth:`image_item` -> the batch's pixel inputs: uint8 ``pixel_values`` in
        one tensor (pinned with ``pin``, for a copy to a GPU that does not wait), stacked, or
        for patches concatenated with their ``image_grid_thw``."""
        # numpy's copy: torch's uint8 copy_ into slices is many times slower on a CPU
        if self._kind == "patches":
            arrays = [a for a, _ in items]
            out = torch.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]),
                              dtype=torch.uint8, pin_memory=pin)
            np.concatenate(arrays, out=out.numpy())
            grid = torch.from_numpy(np.stack([g for _, g in items]).astype(np.int64))
            return {"pixel_values": out, "image_grid_thw": grid}
        out = torch.empty((len(items), *items[0].shape), dtype=torch.uint8, pin_memory=pin)
        np.stack(items, out=out.numpy())
        return {"pixel_values": out}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``pixel_values`` of :meth:`batch_pixels`, on any device -> the processor's
        float32 ``pixel_values``, bit for bit on a CPU: (n, 3, H, W), or for patches the
        processor's (n, 3 * frames * p * p) rows."""
        ip = self.processor.image_processor
        if self._kind == "owl":
            return ip.normalize_uint8(pixels)
        out = ip.rescale_and_normalize(pixels, ip.do_rescale, ip.rescale_factor,
                                       ip.do_normalize, ip.image_mean, ip.image_std)
        if self._kind == "patches":  # every frame of a patch is the image: elementwise, exact
            t = ip.temporal_patch_size
            out = out.unsqueeze(2).expand(-1, -1, t, -1, -1).reshape(out.shape[0], -1)
        return out

    def all_prompts_pixels(self, pixels: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """As :meth:`all_prompts`, from the pixel inputs of :meth:`batch_pixels`;
        ``pixel_values`` stays uint8 until the encoder normalises it."""
        return self.all_prompts(None, pixels)

    def all_prompts(self, images: list[Image.Image] | None,
                    pixels: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
        """The inputs of every prompt for ``images``: a batch per prompt, or one fused batch.

        Either way the rows run prompt by prompt: prompt 0 for every image, then prompt 1...
        With ``share_images`` the pixels are kept once for all prompts (and a processor that
        takes ``image_repeats`` reads each image once).
        """
        if pixels is None and self.pad_to is not None:
            images = [expand2square(im, self.pad_to) for im in images]
        prompts = list(range(len(self.encodings)))
        if self.share_images and self.processor_repeats \
                and len({len(e.suffix_ids) for e in self.encodings}) == 1:
            batch = self._rows(images, prompts, pixels, image_repeats=len(prompts))
            batch["image_repeats"] = len(prompts)
            return [batch]
        batches = [self._rows(images, [p], pixels) for p in prompts]
        if not self.fuse or len(batches) == 1:
            return batches
        return [fuse_batches(batches, self.pad_token_id, self.share_images)]

    def _rows(self, images: list[Image.Image] | None, prompts: list[int],
              pixels: dict[str, torch.Tensor] | None = None, **processor_kw: Any
              ) -> dict[str, Any]:
        """One processor call: the rows of ``prompts`` (each over every image, prompt-major),
        answer prefixes appended; the prompts' prefixes must have one length. With the uint8
        ``pixels`` of :meth:`batch_pixels` only the text is processed."""
        encs = [self.encodings[p] for p in prompts]
        if pixels is None:
            n = len(images)
        else:
            grid = pixels.get("image_grid_thw")
            n = pixels["pixel_values"].shape[0] if grid is None else grid.shape[0]
        texts = [e.text for e in encs for _ in range(n)]
        if pixels is None:
            batch = dict(self.processor(text=texts, images=images, return_tensors="pt",
                                        padding=True, **processor_kw))
            return self._rows_of(batch, prompts, n)
        # the text side of n images depends on their patch grids alone (none: a fixed crop)
        sizes = () if grid is None else tuple(map(tuple, grid.tolist()))
        key = (tuple(prompts), n, sizes, tuple(sorted(processor_kw.items())))
        if key not in self._text_rows:
            if self._kind == "owl":
                batch = dict(self.processor.text_batch(texts, n, **processor_kw))
            elif self._kind == "patches":  # the processor's own expansion of the image tokens
                marks = [self.processor.replace_image_token({"image_grid_thw": grid}, i)
                         for i in range(n)] * len(prompts)
                texts, _ = self.processor.get_text_with_replacements(list(texts), marks)
                batch = dict(self.processor(text=texts, return_tensors="pt", padding=True,
                                            **processor_kw))
            else:  # the processor's own text rows for blank images of the crop size
                batch = dict(self.processor(text=texts, images=_blank_images(
                    self.processor.image_processor, n), return_tensors="pt", padding=True,
                    **processor_kw))
                del batch["pixel_values"]
            if len(self._text_rows) >= 256:  # sizes vary: keep the memory bounded
                self._text_rows.clear()
            self._text_rows[key] = self._rows_of(batch, prompts, n)
        return {**self._text_rows[key], **pixels}

    def _rows_of(self, batch: dict[str, Any], prompts: list[int], n: int) -> dict[str, Any]:
        """The processor's rows with the answer prefixes appended, ``pool_mask`` and
        ``prompt_rows`` added."""
        encs = [self.encodings[p] for p in prompts]
        ids = batch["input_ids"]
        rows, k = ids.shape[0], len(encs[0].suffix_ids)
        suffix = torch.tensor([e.suffix_ids for e in encs], dtype=ids.dtype)
        suffix = suffix.repeat_interleave(n, dim=0)
        pool_mask = torch.cat([batch["attention_mask"], torch.zeros(rows, k, dtype=torch.long)],
                              1)
        for name, value in list(batch.items()):
            if _per_token(name, value, ids):
                if name == "input_ids":
                    tail = suffix
                elif name == "attention_mask":
                    tail = torch.ones(rows, k, dtype=value.dtype)
                else:
                    tail = torch.zeros(rows, k, dtype=value.dtype)
                batch[name] = torch.cat([value, tail], dim=1)
        batch["pool_mask"] = pool_mask
        batch["prompt_rows"] = torch.tensor(prompts, dtype=torch.long).repeat_interleave(n)
        return batch


# What a processor with the standard torchvision pipeline may return besides the pixels: the
# text rows alone (nothing else that depends on an image's size or content).
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}


def _blank_images(ip: Any, n: int) -> list[Image.Image]:
    size = ip.crop_size
    return [Image.new("RGB", (size.width, size.height)) for _ in range(n)]


def _split_kind(processor: Any) -> str:
    """``"owl"``, ``"torchvision"``, ``"patches"`` or ``""``: how :class:`BatchPreparer`
    splits the pixels (see :attr:`BatchPreparer.uint8_pixels`)."""
    ip = getattr(processor, "image_processor", None)
    if hasattr(processor, "text_batch") and hasattr(ip, "crop_uint8"):
        return "owl"
    try:
        from transformers.image_processing_backends import TorchvisionBackend
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    except ImportError:
        return ""
    if not isinstance(ip, TorchvisionBackend) \
            or type(ip).rescale_and_normalize is not TorchvisionBackend.rescale_and_normalize:
        return ""
    token = getattr(processor, "image_token", None)
    if not token:
        return ""
    if isinstance(ip, Qwen2VLImageProcessor):  # resize, normalise, then cut into patches
        if type(ip)._preprocess is not Qwen2VLImageProcessor._preprocess \
                or type(ip).patchify is not Qwen2VLImageProcessor.patchify \
                or not hasattr(processor, "replace_image_token") \
                or not hasattr(processor, "get_text_with_replacements"):
            return ""
        kind, blank, image_keys = "patches", [Image.new("RGB", (56, 56))], {"image_grid_thw"}
    else:
        if type(ip)._preprocess is not TorchvisionBackend._preprocess \
                or not getattr(ip, "do_center_crop", False) or getattr(ip, "do_pad", False) \
                or getattr(ip, "crop_size", None) is None or not ip.crop_size.height:
            return ""
        kind, blank, image_keys = "torchvision", _blank_images(ip, 1), set()
    probe = dict(processor(text=[f"{token} ."], images=blank, return_tensors="pt", padding=True))
    return kind if set(probe) - {"pixel_values"} - image_keys <= _TEXT_KEYS else ""


def _per_token(name: str, value: Any, ids: torch.Tensor) -> bool:
    """Whether a processor output has one entry per token (ids, masks, token types)."""
    return torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == ids.shape \
        and not name.startswith(("pixel", "image"))


def fuse_batches(batches: list[dict[str, Any]], pad_token_id: int = 0,
                 share_images: bool = False) -> dict[str, Any]:
    """One batch holding the rows of ``batches`` in order, left-padded to the longest.

    Per-token tensors are padded (``pad_token_id`` for ids, 0 elsewhere, so padding stays out
    of attention and pooling); per-image tensors are concatenated, except that with
    ``share_images`` the pixels are taken once from the first batch and the batch is marked
    ``image_repeats`` for the model (per-image metadata such as ``image_grid_thw`` stays one entry
    per row: the language side places and positions an image in every row).
    """
    ids = [b["input_ids"] for b in batches]
    length = max(i.shape[1] for i in ids)
    fused: dict[str, Any] = {}
    for name, first in batches[0].items():
        values = [b[name] for b in batches]
        if _per_token(name, first, ids[0]):
            fill = pad_token_id if name == "input_ids" else 0
            padded = []
            for v in values:
                out = v.new_full((v.shape[0], length, *v.shape[2:]), fill)
                out[:, length - v.shape[1]:] = v
                padded.append(out)
            fused[name] = torch.cat(padded)
        elif share_images and name.startswith("pixel"):
            fused[name] = first
        elif torch.is_tensor(first):
            fused[name] = torch.cat(values)
        else:
            raise ValueError(f"cannot fuse the processor output {name!r} ({type(first).__name__})")
    if share_images:
        fused["image_repeats"] = len(batches)
    return fused
