"""Tiny LLaVA, Qwen2-VL and Qwen2.5-VL models built from config, for tests and the offline demo.

They are real transformers models with a byte-level BPE tokenizer trained on the spot with the
``tokenizers`` library, saved with ``save_pretrained`` and loaded back through the same
``AutoProcessor`` / ``AutoModelForImageTextToText`` path as hub models. Their weights are random:
they exercise the pipeline, they do not judge quality.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["FAMILIES", "SHAPES", "build_random_mllm", "build_tiny_mllm", "random_mllm_on_device",
           "shape_available"]

FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl")

_CORPUS = [
    "Evaluate the input image to determine if its quality is compromised due to a lack of "
    "meaningful semantic content.",
    "Evaluate if the image quality is compromised due to violations of coherence.",
    "The quality of the image is excellent. The quality of the image is good.",
    "The quality of the image is fair. The quality of the image is poor or bad.",
    "USER: ASSISTANT: system user assistant. Rate the quality of this picture, please.",
    "How sharp, clear, natural and pleasing is this photo? Describe its content.",
]

_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: "
    "{% endif %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: list[str], **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.padding_side = "left"
    return fast


def _build_llava(out: Path, hidden: int, layers: int, image_size: int,
                 shape: dict | None = None):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos_token="<s>",
                     eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                     extra_special_tokens={"image_token": "<image>"})
    shape = shape or {}
    patch = shape.get("patch", 8)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    vision = CLIPVisionConfig(**{"hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "projection_dim": 32, **shape.get("vision", {})},
                              image_size=image_size, patch_size=patch)
    text_kw = {"vocab_size": len(tok), "intermediate_size": 2 * hidden, "num_attention_heads": 4,
               "num_key_value_heads": 2, **shape.get("text", {})}
    text = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, **text_kw,
                       max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config), processor


def _build_qwen2_vl(out: Path, hidden: int, layers: int, image_size: int,
                    shape: dict | None = None, version: str = "2"):
    """Qwen2-VL, or Qwen2.5-VL (``version="2.5"``: window attention in the vision tower)."""
    import transformers
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL"}[version]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    processor_cls = getattr(transformers, f"{prefix}Processor")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     extra_special_tokens={"image_token": "<|image_pad|>",
                                           "video_token": "<|video_pad|>"})
    image_processor = Qwen2VLImageProcessor(
        min_pixels=28 * 28 * 4, max_pixels=image_size * image_size, patch_size=14,
        merge_size=2, temporal_patch_size=2,
    )
    processor = processor_cls(image_processor=image_processor, tokenizer=tok,
                              video_processor=Qwen2VLVideoProcessor(),
                              chat_template=_QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    shape = shape or {}
    text_kw = {"vocab_size": len(tok), "intermediate_size": 2 * hidden, "num_attention_heads": 4,
               "num_key_value_heads": 2, **shape.get("text", {})}
    head_dim = hidden // text_kw["num_attention_heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2}
    if version == "2.5":  # hidden_size is the tower's width, out_hidden_size the LM's
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "out_hidden_size": hidden, "window_size": 56, "fullatt_block_indexes": [1]}
    vision.update(shape.get("vision", {}))
    config = config_cls(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, **text_kw,
                         max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_scaling={"type": "mrope", "mrope_section": section}),
        vision_config=dict(**vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return model_cls(config), processor


def _build_qwen2_5_vl(out: Path, hidden: int, layers: int, image_size: int,
                      shape: dict | None = None):
    return _build_qwen2_vl(out, hidden, layers, image_size, shape, version="2.5")


# Full-size shapes with random weights, for timing (a forward pass costs the same whatever the
# weights): LLaVA-1.5-7B = CLIP ViT-L/14 at 336 px + LLaMA-2-7B.
SHAPES = {
    "llava-1.5-7b": {"family": "llava", "hidden": 4096, "layers": 32, "image_size": 336,
                     "patch": 14,
                     "vision": {"hidden_size": 1024, "intermediate_size": 4096,
                                "num_hidden_layers": 24, "num_attention_heads": 16,
                                "projection_dim": 768},
                     "text": {"vocab_size": 32064, "intermediate_size": 11008,
                              "num_attention_heads": 32, "num_key_value_heads": 32}},
    # Qwen2.5-VL-7B-Instruct: a 32-block window-attention ViT (1280 wide) + a 28-layer LM
    # (3584 wide, 4 KV heads). Images get (H/28)·(W/28) tokens, up to 1024 px by default here.
    "qwen2.5-vl-7b": {"family": "qwen2.5-vl", "hidden": 3584, "layers": 28, "image_size": 1024,
                      "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                                 "num_heads": 16, "window_size": 112,
                                 "fullatt_block_indexes": [7, 15, 23, 31]},
                      "text": {"vocab_size": 152064, "intermediate_size": 18944,
                               "num_attention_heads": 28, "num_key_value_heads": 4}},
}


# mPLUG-Owl2-7B (the paper's MLLM): CLIP ViT-L/14 at 448 px, a visual abstractor of 64 queries
# (65 visual tokens with the end token), LLaMA-2-7B (32 layers × 4096, vocabulary 32000) with
# modality-adaptive ("multiway") keys, values and norms.
SHAPES["mplug-owl2-7b"] = {
    "family": "mplug-owl2", "hidden": 4096, "layers": 32, "image_size": 448, "patch": 14,
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
               "num_attention_heads": 16},
    "abstractor": {},  # the official defaults: 6 layers, 1024 wide, 64 queries
    "text": {"vocab_size": 32000, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32},
}


def _owl2_tokenizer(out: Path) -> None:
    """A small LLaMA-style sentencepiece model (unk 0, bos 1, eos 2) as ``out/tokenizer.model``."""
    import io

    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_writer=buf, vocab_size=200,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())


def _build_mplug_owl2(out: Path, hidden: int, layers: int, image_size: int,
                      shape: dict | None = None):
    """mPLUG-Owl2 (agiqa's own implementation): ViT, visual abstractor, multiway LLaMA."""
    import json

    from agiqa.models.mllm.mplug_owl2 import MplugOwl2Config, MplugOwl2ForCausalLM
    from agiqa.models.mllm.mplug_owl2_processing import MplugOwl2Processor

    shape = shape or {}
    patch = shape.get("patch", 14)
    _owl2_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": image_size},
         "crop_size": {"height": image_size, "width": image_size}}))
    vision = {"image_size": image_size, "patch_size": patch,
              **shape.get("vision", {"hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 2, "num_attention_heads": 2})}
    abstractor = {"encoder_hidden_size": vision.get("hidden_size", 1024),
                  "grid_size": image_size // patch,
                  **shape.get("abstractor", {"hidden_size": 32, "num_hidden_layers": 2,
                                             "num_attention_heads": 2, "intermediate_size": 48})}
    text = {"vocab_size": 420, "intermediate_size": 2 * hidden, "num_attention_heads": 4,
            "num_key_value_heads": 4, **shape.get("text", {})}
    config = MplugOwl2Config(hidden_size=hidden, num_hidden_layers=layers, **text,
                             max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, visual_config={"visual_model": vision,
                                                            "visual_abstractor": abstractor})
    model = MplugOwl2ForCausalLM(config)
    processor = MplugOwl2Processor.from_pretrained(str(out),
                                                   num_image_tokens=config.num_image_tokens)
    return model, processor


def _owl2_builder():
    """The mPLUG-Owl2 builder, or None where this agiqa lacks the family."""
    try:
        from agiqa.models.mllm import mplug_owl2  # noqa: F401 - the family's own module
    except ImportError:
        return None
    return _build_mplug_owl2


def _builder(family: str):
    if family == "mplug-owl2":
        return _owl2_builder()
    return {"llava": _build_llava, "qwen2-vl": _build_qwen2_vl,
            "qwen2.5-vl": _build_qwen2_5_vl}.get(family)


def shape_available(spec: dict) -> bool:
    """Whether this agiqa can build a model of the shape ``spec`` (a ``SHAPES`` entry)."""
    return _builder(spec["family"]) is not None


def random_mllm_on_device(spec: dict, out: str | os.PathLike, device: str | torch.device,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A model of the shape ``spec`` with random weights created on ``device`` directly.

    The parameters are allocated and randomly initialised on ``device`` (no CPU copy of a
    7B model); only the config and the processor are written to ``out``, so that
    ``AutoConfig``/``AutoProcessor`` (and agiqa's ``SemanticEncoder``) load them from there.
    Returns the model in eval mode.
    """
    build = _builder(spec["family"])
    if build is None:
        raise ValueError(f"the {spec['family']} model family is not available in this agiqa")
    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed_all(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model, processor = build(out, spec["hidden"], spec["layers"],
                                         spec["image_size"], spec)
        finally:
            torch.set_default_dtype(default)
    model.to(device).eval()  # moves only a stray tensor made on the CPU, if any
    model.config.save_pretrained(out)
    if hasattr(processor, "save_pretrained"):  # mPLUG-Owl2's files are written by its builder
        processor.save_pretrained(out)
    return model


def build_random_mllm(shape: str, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> Path:
    """A full-size model of ``shape`` (see ``SHAPES``) with random weights, saved to ``out``."""
    spec = SHAPES[shape]
    build = {"llava": _build_llava, "qwen2-vl": _build_qwen2_vl,
             "qwen2.5-vl": _build_qwen2_5_vl}[spec["family"]]
    out = Path(out)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model, processor = build(out, spec["hidden"], spec["layers"], spec["image_size"],
                                     spec)
        finally:
            torch.set_default_dtype(default)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_mllm(family: str, out: str | os.PathLike, hidden: int = 64, layers: int = 2,
                    image_size: int | None = None, seed: int = 0) -> Path:
    """Build a tiny random-weight MLLM of ``family`` and save model and processor to ``out``.

    Args:
        family: ``llava``, ``qwen2-vl`` or ``qwen2.5-vl``.
        out: the folder to write; load it with ``agiqa extract-semantics --mllm OUT``.
        hidden: the language model's width (the semantic vector size D).
        layers: the language model's depth.
        image_size: the vision input size (LLaVA) or the largest image area's side (Qwen2-VL).
        seed: the seed of the random weights.
    """
    builders = {"llava": (_build_llava, 32), "qwen2-vl": (_build_qwen2_vl, 56),
                "qwen2.5-vl": (_build_qwen2_5_vl, 56)}
    if family not in builders:
        raise ValueError(f"unknown family {family!r} (choose from {', '.join(FAMILIES)})")
    build, default_size = builders[family]
    out = Path(out)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, processor = build(out, hidden, layers, image_size or default_size)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.eval().save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return out
