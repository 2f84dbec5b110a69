"""mPLUG-Owl2 text and image preprocessing, equal to the official slow path.

Tokens: the official code uses transformers 4.31's slow `LlamaTokenizer` (sentencepiece, legacy
mode): the text is split on the special tokens, each piece in between is encoded by sentencepiece
as is. `tokenizer_image_token` then tokenises each chunk around `<|image|>` with its own BOS and
keeps only the first one. Images: transformers 4.31's `CLIPImageProcessor` (PIL bicubic resize of
the shortest edge, center crop, rescale in float64 then float32, normalise in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchEncoding, BatchFeature
from transformers.utils import cached_file

from agiqa.fileio import read_json
from agiqa.models.mllm.recipe import expand2square

__all__ = [
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "MplugOwl2ImageProcessor",
    "MplugOwl2Processor",
    "MplugOwl2Tokenizer",
    "expand2square",
]

IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_INDEX = -200


def _hub_file(source: str, name: str, revision: str | None, required: bool = True) -> str | None:
    return cached_file(str(source), name, revision=revision,
                       _raise_exceptions_for_missing_entries=required)


def _token_text(value: Any) -> str | None:
    """Special tokens are strings or serialised `AddedToken`s in the hub files."""
    return value.get("content") if isinstance(value, dict) else value


class MplugOwl2Tokenizer:
    """The LLaMA sentencepiece tokenizer in transformers 4.31's slow, legacy behaviour.

    Args:
        vocab_file: `tokenizer.model`.
        bos_token: begin-of-sequence text.
        eos_token: end-of-sequence text.
        unk_token: unknown-token text.
        pad_token: padding text; the unknown token when None, as the official pipelines pad.
        add_bos_token: prepend BOS when `add_special_tokens` is on.
        add_eos_token: append EOS when `add_special_tokens` is on.
        padding_side: "left" or "right".
    """

    def __init__(self, vocab_file: str, bos_token: str = "<s>", eos_token: str = "</s>",
                 unk_token: str = "<unk>", pad_token: str | None = None,
                 add_bos_token: bool = True, add_eos_token: bool = False,
                 padding_side: str = "left"):
        import sentencepiece

        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
        self.vocab_file = str(vocab_file)
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token or unk_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.padding_side = padding_side
        self._special = {t: self.sp_model.piece_to_id(t) for t in (bos_token, eos_token, unk_token)}

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None = None, **kwargs: Any
                        ) -> MplugOwl2Tokenizer:
        """Read `tokenizer.model`, `tokenizer_config.json` and `special_tokens_map.json`."""
        options: dict[str, Any] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = _hub_file(source, name, revision, required=False)
            if path is not None:
                options.update(read_json(path))  # a regular file, within bounds
        known = {"bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token",
                 "add_eos_token"}
        args = {k: _token_text(v) if k.endswith("_token") else v
                for k, v in options.items() if k in known and v is not None}
        return cls(_hub_file(source, "tokenizer.model", revision), **{**args, **kwargs})

    @property
    def bos_token_id(self) -> int:
        return self._special[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self._special[self.eos_token]

    @property
    def unk_token_id(self) -> int:
        return self._special[self.unk_token]

    @property
    def pad_token_id(self) -> int:
        return self.sp_model.piece_to_id(self.pad_token)

    def __len__(self) -> int:
        return self.sp_model.get_piece_size()

    def _split_special(self, text: str) -> list[str]:
        """Split around special-token texts, keeping them.

        As transformers 4.31 does, the text on either side of a special token loses its
        whitespace on that side.
        """
        parts, start, i = [], 0, 0
        names = sorted(self._special, key=len, reverse=True)
        while i < len(text):
            hit = next((n for n in names if text.startswith(n, i)), None)
            if hit is None:
                i += 1
                continue
            parts += [text[start:i], hit]
            start = i = i + len(hit)
        parts.append(text[start:])
        for k in range(1, len(parts), 2):
            parts[k - 1] = parts[k - 1].rstrip()
            parts[k + 1] = parts[k + 1].lstrip()
        return [p for p in parts if p]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text."""
        ids: list[int] = []
        for part in self._split_special(text):
            ids += [self._special[part]] if part in self._special else self.sp_model.encode(part)
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids
            ids += [self.eos_token_id] * self.add_eos_token
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Token strings of one text, without BOS/EOS."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.sp_model.piece_to_id(tokens)
        return [self.sp_model.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.sp_model.id_to_piece(ids)
        return [self.sp_model.id_to_piece(int(i)) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids; placeholders for image slots are dropped."""
        specials = set(self._special.values()) if skip_special_tokens else set()
        return self.sp_model.decode([int(i) for i in ids if i >= 0 and int(i) not in specials])

    def pad(self, sequences: list[list[int]], padding: bool = True,
            return_tensors: str | None = None) -> BatchEncoding:
        """Pad id lists to the longest, on `padding_side`, with an attention mask."""
        longest = max(len(s) for s in sequences)
        if not padding and any(len(s) != longest for s in sequences):
            raise ValueError("sequences differ in length; pass padding=True")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        left = self.padding_side == "left"
        ids, masks = [], []
        for seq in sequences:
            pad, ones = [self.pad_token_id] * (longest - len(seq)), [1] * len(seq)
            ids.append(pad + seq if left else seq + pad)
            masks.append([0] * len(pad) + ones if left else ones + [0] * len(pad))
        data = {"input_ids": ids, "attention_mask": masks}
        return BatchEncoding(data, tensor_type=return_tensors)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 padding: bool = False, return_tensors: str | None = None) -> BatchEncoding:
        """Encode one text or a batch, like a Hugging Face tokenizer."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)},
                                 tensor_type=return_tensors)
        return self.pad([self.encode(t, add_special_tokens) for t in text], padding, return_tensors)


def _size(value: Any) -> tuple[int, int] | int:
    """(height, width) for a fixed size, an int for a shortest edge."""
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        return int(value["height"]), int(value["width"])
    return int(value)


class MplugOwl2ImageProcessor:
    """transformers 4.31 `CLIPImageProcessor`, slow path, as mPLUG-Owl2's hub config sets it.

    Args:
        size: shortest edge after resizing (int), or a fixed (height, width).
        crop_size: center-crop size.
        image_mean: per-channel mean.
        image_std: per-channel standard deviation.
        resample: PIL resampling filter (3: bicubic).
        rescale_factor: factor applied to the uint8 values.
    """

    def __init__(self, size: tuple[int, int] | int = 448, crop_size: tuple[int, int] | int = 448,
                 image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
                 resample: int = 3, rescale_factor: float = 1 / 255):
        self.size, self.resample, self.rescale_factor = size, resample, rescale_factor
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None = None) -> MplugOwl2ImageProcessor:
        """Read `preprocessor_config.json`; without one (LoRA-merged Q-Align folders lack it),
        the mPLUG-Owl2 hub settings apply."""
        path = _hub_file(source, "preprocessor_config.json", revision, required=False)
        config = read_json(path) if path else {}
        keys = ("image_mean", "image_std", "resample", "rescale_factor")
        args: dict[str, Any] = {k: config[k] for k in keys if config.get(k) is not None}
        for key in ("size", "crop_size"):
            if config.get(key) is not None:
                args[key] = _size(config[key])
        return cls(**args)

    @property
    def mean_color(self) -> tuple[int, ...]:
        """The background `expand2square` uses: the mean in 0-255, truncated."""
        return tuple(int(x * 255) for x in self.image_mean)

    def _resize(self, image: Image.Image) -> Image.Image:
        if isinstance(self.size, tuple):
            height, width = self.size
        else:
            w, h = image.size
            short, long = min(w, h), max(w, h)
            new_short, new_long = self.size, int(self.size * long / short)
            height, width = (new_long, new_short) if w <= h else (new_short, new_long)
        return image.resize((width, height), resample=self.resample)

    def crop_uint8(self, image: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8: the resized, center-cropped image, before any arithmetic."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        array = np.array(self._resize(image))
        crop_h, crop_w = self.crop_size
        height, width = array.shape[:2]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        if top < 0 or left < 0:
            raise ValueError(f"resized image {width}x{height} is smaller than the crop size")
        return np.ascontiguousarray(array[top:top + crop_h, left:left + crop_w])

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32 pixel values of one image."""
        array = self.crop_uint8(image)
        scaled = (array * self.rescale_factor).astype(np.float32)
        mean = np.array(self.image_mean, dtype=np.float32)
        std = np.array(self.image_std, dtype=np.float32)
        return ((scaled - mean) / std).transpose(2, 0, 1)

    def normalize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 from :meth:`crop_uint8` -> (n, 3, H, W) float32 pixel values, on
        the tensor's device, bit-identical to :meth:`preprocess_one` (rescaled in float64, then
        normalised in float32, as numpy does it)."""
        scaled = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=pixels.device)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=pixels.device)
        return ((scaled - mean) / std).permute(0, 3, 1, 2).contiguous()

    def __call__(self, images: Image.Image | Sequence[Image.Image],
                 return_tensors: str | None = "pt") -> BatchFeature:
        """`pixel_values` of a batch of images."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        pixels = np.stack([self.preprocess_one(image) for image in images])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    preprocess = __call__


class MplugOwl2Processor:
    """Tokenizer and image processor together; image slots come out expanded.

    Args:
        tokenizer: the sentencepiece tokenizer.
        image_processor: the CLIP-style image processor.
        num_image_tokens: visual tokens per image (learnable queries + 1).
    """

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer: MplugOwl2Tokenizer, image_processor: MplugOwl2ImageProcessor,
                 num_image_tokens: int = 65):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None = None,
                        num_image_tokens: int = 65) -> MplugOwl2Processor:
        """Read the tokenizer and image-processor files of a hub id or folder."""
        return cls(MplugOwl2Tokenizer.from_pretrained(source, revision),
                   MplugOwl2ImageProcessor.from_pretrained(source, revision), num_image_tokens)

    def tokenizer_image_token(self, text: str) -> list[int]:
        """The official `tokenizer_image_token`: one `IMAGE_TOKEN_INDEX` per image marker."""
        chunks = [self.tokenizer.encode(c) if c else [] for c in text.split(IMAGE_TOKEN)]
        ids: list[int] = []
        offset = 0
        if chunks and chunks[0] and chunks[0][0] == self.tokenizer.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        separator = [IMAGE_TOKEN_INDEX] * (offset + 1)
        for i, chunk in enumerate(chunks):
            if i:
                ids += separator[offset:]
            ids += chunk[offset:]
        return ids

    def expand(self, ids: list[int]) -> list[int]:
        """Repeat each image slot once per visual token."""
        out: list[int] = []
        for i in ids:
            out += [i] * self.num_image_tokens if i == IMAGE_TOKEN_INDEX else [i]
        return out

    def text_batch(self, texts: list[str], images: int, image_repeats: int = 1,
                   return_tensors: str | None = "pt", padding: bool = True) -> BatchEncoding:
        """As :meth:`__call__` without the pixels: the ids and mask of ``texts`` for ``images``
        images whose pixels come separately (e.g. as uint8, normalised on the device)."""
        sequences = [self.expand(self.tokenizer_image_token(t)) for t in texts]
        markers = sum(t.count(IMAGE_TOKEN) for t in texts)
        if markers != images * image_repeats:
            raise ValueError(f"the texts hold {markers} {IMAGE_TOKEN} markers for {images} "
                             f"images x {image_repeats}")
        return self.tokenizer.pad(sequences, padding=padding, return_tensors=return_tensors)

    def __call__(self, text: str | list[str], images: Image.Image | list[Image.Image] | None = None,
                 return_tensors: str | None = "pt", padding: bool = True,
                 image_repeats: int = 1) -> BatchEncoding:
        """Expanded `input_ids`, `attention_mask` and, with images, `pixel_values`.

        ``image_repeats=k``: the texts hold k markers per image (the model's `image_repeats`:
        the same images under several prompts); `pixel_values` holds each image once.
        """
        texts = [text] if isinstance(text, str) else list(text)
        sequences = [self.expand(self.tokenizer_image_token(t)) for t in texts]
        markers = sum(t.count(IMAGE_TOKEN) for t in texts)
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        if markers != len(images) * image_repeats:
            repeats = f" x {image_repeats}" if image_repeats != 1 else ""
            raise ValueError(
                f"the texts hold {markers} {IMAGE_TOKEN} markers for {len(images)} images"
                f"{repeats}"
            )
        batch = self.tokenizer.pad(sequences, padding=padding, return_tensors=return_tensors)
        if images:
            pixels = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
            batch["pixel_values"] = pixels
        return batch
