"""mPLUG-Owl2, native on transformers' LLaMA blocks (no remote code).

Paper: Ye et al., "mPLUG-Owl2: Revolutionizing Multi-modal Large Language Model with Modality
Collaboration", CVPR 2024. Code: https://github.com/X-PLUG/mPLUG-Owl/tree/main/mPLUG-Owl2
(vendored by MA-AGIQA: https://github.com/wangpuyi/MA-AGIQA). Q-Align / OneAlign checkpoints
(`q-future/one-align`, `q-future/q-align-*`) share the architecture and load the same way.
The visual side lives in `mplug_owl2_vision.py`, tokenizer and image preprocessing (equal to the
official slow path, through the `sentencepiece` package) in `mplug_owl2_processing.py`.

Interface used by the MLLM adapter:

- `is_mplug_owl2(model_id_or_folder, revision)`: `config.json` says `model_type: mplug_owl2`.
- `load_mplug_owl2(model_id_or_folder, revision, dtype, device)` -> `(model, processor)`, from a
  hub id or a hub-layout folder (sharded `.bin` + index, or safetensors).
- `processor(text=[...], images=[PIL, ...], return_tensors="pt", padding=True)` -> `input_ids`,
  `attention_mask`, `pixel_values`. Each text holds one `<|image|>`; the ids equal the official
  `tokenizer_image_token` with the image slot already expanded to `IMAGE_TOKEN_INDEX` repeated
  once per visual token (65), so ids, mask and hidden states share one length. Padding follows
  `processor.tokenizer.padding_side` ("left" by default). Images are not padded to a square
  here; `expand2square(image, processor.image_processor.mean_color)` does the official padding.
- `model.model(input_ids=, attention_mask=, pixel_values=, use_cache=False).last_hidden_state`:
  the final normed hidden state (the official `hidden_states[-1]`); `model(...)` gives `logits`
  (`logits_to_keep` supported); `model.get_output_embeddings()` is the LM head.
  `image_repeats=k` lets n images serve k·n sequences (several prompts, one vision pass);
  `image_features=` (from `encode_images`) stands for `pixel_values` when one vision pass
  serves several calls.

Speed: the modality-adaptive modules never route tokens by `nonzero` per module, as the official
`MultiwayNetwork` does, so a forward pass on a GPU never waits for the device (without padding,
pass no `attention_mask`). When every row holds its visual slots at the same columns (one image
per sequence under one template; the paper's prompts, left-padded together, too, since they
differ before the image only), the route slices: the image weights run on those columns, the
text weights on the columns before and after them; `image_span_of` finds the span on host ids,
and `image_span=` passes it for ids already on a device. Otherwise an index sorted once per pass
gathers each modality's tokens and scatters the results back (`ModalityRoute`). Both give every
branch the same rows in the same order, so their outputs are bit-identical.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils import cached_file

from agiqa.fileio import read_json
from agiqa.models.mllm.mplug_owl2_processing import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    MplugOwl2ImageProcessor,
    MplugOwl2Processor,
    MplugOwl2Tokenizer,
    expand2square,
)
from agiqa.models.mllm.mplug_owl2_vision import (
    AbstractorMultiHeadAttention,
    AbstractorSettings,
    VisionEmbeddings,
    VisionModel,
    VisionSettings,
    VisualAbstractor,
)

__all__ = [
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "MplugOwl2Config",
    "MplugOwl2ForCausalLM",
    "MplugOwl2ImageProcessor",
    "MplugOwl2Model",
    "MplugOwl2Processor",
    "MplugOwl2Tokenizer",
    "expand2square",
    "image_span_of",
    "is_mplug_owl2",
    "load_mplug_owl2",
]


def _settings(cls: type, values: dict[str, Any] | None) -> Any:
    """Build a settings dataclass from a hub sub-dict, which also carries generic config keys."""
    values = values or {}
    return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})


@strict
class MplugOwl2Config(LlamaConfig):
    """LLaMA fields plus `visual_config = {"visual_model": {...}, "visual_abstractor": {...}}`."""

    model_type = "mplug_owl2"
    visual_config: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.visual_config is None:
            self.visual_config = {"visual_model": {}, "visual_abstractor": {}}
        super().__post_init__(**kwargs)

    @property
    def vision_settings(self) -> VisionSettings:
        """The vision encoder's settings."""
        return _settings(VisionSettings, self.visual_config.get("visual_model"))

    @property
    def abstractor_settings(self) -> AbstractorSettings:
        """The visual abstractor's settings."""
        return _settings(AbstractorSettings, self.visual_config.get("visual_abstractor"))

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image in the language model: the queries plus `vit_eos`."""
        return self.abstractor_settings.num_learnable_queries + 1


def image_span_of(input_ids: torch.Tensor) -> tuple[int, int] | None:
    """Where the image slots of a batch on the host sit when every row holds them as one run at
    the same columns: ``(start, count)``; ``None`` when the layout differs between rows, a row
    holds several runs, there are no slots, or the ids are not on the host (reading them there
    would wait for the device).

    One image per sequence under one prompt template gives such a layout; with left padding,
    rows of different lengths do not.
    """
    if input_ids.device.type != "cpu" or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        return None
    is_image = input_ids == IMAGE_TOKEN_INDEX
    first = is_image[0].nonzero().flatten().tolist()
    if not first:
        return None
    start, count = first[0], len(first)
    if first[-1] - start + 1 != count or not bool(is_image[:, start:start + count].all()) \
            or int(is_image.sum()) != count * input_ids.shape[0]:
        return None
    return start, count


class ModalityRoute:
    """Where the text and image tokens of a batch sit, built once per forward pass.

    Two ways, both without waiting for the device:

    * by slicing, when the caller says where the image tokens sit (``span``): every row holds
      them at columns ``[start, start + count)``. The text branch runs on the columns before and
      after that span, joined along the sequence, and the image branch on the span: no index,
      no gather or scatter.
    * otherwise by an index: the tokens of the flattened batch are sorted by modality (text
      first, stable) once per pass; each multiway module gathers its rows, runs every branch on
      its own part and scatters the results back.

    Either way each branch sees the same rows in the same order (batch-major, then position),
    as one contiguous matrix, so the two give bit-identical results. The part sizes come from
    shapes the caller knows (the number of visual tokens), and the token count is checked
    against them asynchronously on an accelerator.

    Args:
        modality: (batch, length), 0 text, 1 image.
        image_tokens: how many entries of ``modality`` are 1.
        span: ``(start, count)`` of the image tokens, the same in every row (see
            :func:`image_span_of`); ``None`` routes by an index.
    """

    def __init__(self, modality: torch.Tensor, image_tokens: int,
                 span: tuple[int, int] | None = None):
        self.modality = modality  # for code that routes by mask, such as the official baseline
        self.total = modality.numel()
        self.counts = [self.total - image_tokens, image_tokens]
        self.single = next((i for i, c in enumerate(self.counts) if c == self.total), None)
        self.order = None
        self.span = None
        if self.single is not None:
            return
        if span is not None:
            start, count = int(span[0]), int(span[1])
            rows, length = modality.shape
            if count * rows != image_tokens or start < 0 or start + count > length:
                raise ValueError(f"an image span of {count} tokens at column {start} does not "
                                 f"fit {image_tokens} image tokens in {rows} rows of {length}")
            inside = modality[:, start:start + count].all()
            if modality.device.type == "cpu":
                if not bool(inside):
                    raise ValueError(f"the image tokens are not at columns [{start}, "
                                     f"{start + count}) in every row")
            else:
                torch._assert_async(inside)
            self.span = (start, count)
        else:
            self.order = torch.argsort(modality.flatten().to(torch.uint8), stable=True)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The text and image rows of ``x`` (batch, length, width), each a contiguous matrix."""
        width = x.shape[-1]
        if self.span is not None:
            start, count = self.span
            text = torch.cat([x[:, :start], x[:, start + count:]], dim=1)
            return [text.view(-1, width), x[:, start:start + count].reshape(-1, width)]
        return list(x.reshape(self.total, width).index_select(0, self.order).split(self.counts))

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split`: (batch, length, width) from the per-modality rows."""
        rows, length = self.modality.shape
        width = parts[0].shape[-1]
        if self.span is not None:
            start, count = self.span
            text = parts[0].view(rows, length - count, width)
            image = parts[1].view(rows, count, width)
            return torch.cat([text[:, :start], image, text[:, start:]], dim=1)
        out = parts[0].new_empty(self.total, width)
        out.index_copy_(0, self.order, torch.cat(parts))
        return out.view(rows, length, width)


class MultiwayNetwork(nn.Module):
    """Two copies of a module; a token goes through the copy of its modality (0 text, 1 image)."""

    def __init__(self, branches: list[nn.Module], out_features: int):
        super().__init__()
        self.multiway = nn.ModuleList(branches)
        self.out_features = out_features

    def forward(self, x: torch.Tensor, route: ModalityRoute) -> torch.Tensor:
        if route.single is not None:
            return self.multiway[route.single](x)
        parts = route.split(x)
        return route.merge([branch(p) for branch, p in zip(self.multiway, parts, strict=True)])


class ModalityAdaptiveAttention(nn.Module):
    """LLaMA attention whose key and value projections are chosen per token by modality."""

    def __init__(self, config: MplugOwl2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        width, bias = config.hidden_size, config.attention_bias
        kv_width = self.num_kv_heads * self.head_dim

        def kv() -> MultiwayNetwork:
            branches = [nn.Linear(width, kv_width, bias=bias) for _ in range(2)]
            return MultiwayNetwork(branches, kv_width)

        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj, self.v_proj = kv(), kv()
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=bias)

    def forward(self, x: torch.Tensor, route: ModalityRoute,
                rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x, route).view(shape).transpose(1, 2)
        v = self.v_proj(x, route).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))


class ModalityAdaptiveDecoderLayer(nn.Module):
    """LLaMA block with per-modality RMSNorms and key/value projections."""

    def __init__(self, config: MplugOwl2Config):
        super().__init__()
        width, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = ModalityAdaptiveAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = MultiwayNetwork([LlamaRMSNorm(width, eps) for _ in range(2)], width)
        self.post_attention_layernorm = MultiwayNetwork(
            [LlamaRMSNorm(width, eps) for _ in range(2)], width
        )

    def forward(self, x: torch.Tensor, route: ModalityRoute,
                rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x, route), route, rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x, route))


class MplugOwl2PreTrainedModel(PreTrainedModel):
    """Shared loading rules: official key names, SDPA attention."""

    config_class = MplugOwl2Config
    config: MplugOwl2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["ModalityAdaptiveDecoderLayer", "VisionLayer", "AbstractorLayer"]
    _supports_sdpa = True
    # Checkpoints saved by transformers < 4.32 carry the rotary frequencies, recomputed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, VisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, VisualAbstractor):
            init.normal_(module.query_embeds, std=std)
            init.normal_(module.vit_eos, std=std)
        elif isinstance(module, AbstractorMultiHeadAttention):
            module.reset_positions()


def _check_slots(is_image: torch.Tensor, features: torch.Tensor | None) -> int:
    """The number of visual tokens, which the image slots of ``input_ids`` must take exactly;
    on an accelerator the check is queued on the device (``torch._assert_async``) rather than
    waited for."""
    visual = 0 if features is None else features.shape[0] * features.shape[1]
    slots = is_image.sum()
    if is_image.device.type != "cpu":
        torch._assert_async(slots == visual)
        return visual
    if int(slots) == visual:
        return visual
    if features is None:
        raise ValueError(f"input_ids hold {int(slots)} image slots but no pixel_values came")
    raise ValueError(
        f"input_ids hold {int(slots)} image slots, but {features.shape[0]} image(s) give "
        f"{visual} visual tokens ({features.shape[1]} each)")


def _attention_mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """Causal mask with padded keys hidden; every row keeps its own position, so none is empty."""
    length = mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal & mask[:, None, None, :].bool()
    return allowed | torch.eye(length, dtype=torch.bool, device=mask.device)


class MplugOwl2Model(MplugOwl2PreTrainedModel):
    """Vision encoder, abstractor and modality-adaptive LLaMA; returns the final normed states."""

    def __init__(self, config: MplugOwl2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            ModalityAdaptiveDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.vision_model = VisionModel(config.vision_settings)
        self.visual_abstractor = VisualAbstractor(config.abstractor_settings, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens for the LLM, (images, queries + 1, hidden)."""
        dtype = self.vision_model.embeddings.patch_embed.weight.dtype
        return self.visual_abstractor(self.vision_model(pixel_values.to(dtype)))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_repeats: int = 1, image_span: tuple[int, int] | None = None,
              image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, ModalityRoute]:
        """Token embeddings with the visual tokens written at the image slots, and their route.

        With ``image_repeats=k`` the n images of ``pixel_values`` fill the slots of k·n sequences:
        image i those of sequences i, n + i, 2n + i, ... (one vision pass serves every prompt).
        ``image_features`` (from :meth:`encode_images`) stand for the images of ``pixel_values``
        when the vision pass has already run. ``image_span`` says where the slots sit (see
        :func:`image_span_of`); ids on the host are read for it, ids on a device are not (no
        wait), and without a span the route is an index.
        """
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.embed_tokens(input_ids.clamp(min=0))
        features = image_features
        if features is None and pixel_values is not None:
            features = self.encode_images(pixel_values)
        if features is not None:
            features = features.to(embeds.dtype)
            if image_repeats > 1:
                features = features.repeat(image_repeats, 1, 1)
        visual = _check_slots(is_image, features)
        if features is not None:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1),
                                           features.reshape(-1, embeds.shape[-1]))
        if image_span is None:
            image_span = image_span_of(input_ids)
        return embeds, ModalityRoute(is_image, visual, image_span)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, use_cache: bool = False,
                image_repeats: int = 1, image_span: tuple[int, int] | None = None,
                image_features: torch.Tensor | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        """Run the language model over an expanded sequence (see the module docstring).

        Args:
            input_ids: (batch, length), `IMAGE_TOKEN_INDEX` at every visual slot.
            attention_mask: 1 for real tokens, 0 for padding; positions count real tokens only.
            pixel_values: (images, 3, H, W), one image per run of visual slots, in order.
            position_ids: overrides the positions derived from the mask.
            output_hidden_states: also return the input of every layer and the final normed output.
            use_cache: accepted for interface parity; no cache is kept.
            image_repeats: sequences per image (see `embed`): several prompts, one vision pass.
            image_span: ``(start, count)``: every row holds its visual slots at columns
                ``[start, start + count)``, as :func:`image_span_of` finds on the host ids; the
                multiway modules then route by slicing. Found here when the ids are on the host.
            image_features: (images, tokens, hidden) from `encode_images`, in place of
                ``pixel_values`` (a vision pass that serves several calls).
            **kwargs: ignored generation arguments.

        Nothing here waits for the device. On an accelerator a given ``attention_mask`` is
        always applied (finding out whether it holds padding would wait); pass ``None`` for a
        batch without padding, which then runs the causal kernel without a mask.
        """
        hidden, route = self.embed(input_ids, pixel_values, image_repeats, image_span,
                                   image_features)
        mask = None
        if attention_mask is not None and (attention_mask.device.type != "cpu"
                                           or not bool(attention_mask.all())):
            mask = _attention_mask_4d(attention_mask)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        rope = self.rotary_emb(hidden, position_ids)
        states = []
        for layer in self.layers:
            states.append(hidden)
            hidden = layer(hidden, route, rope, mask)
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=(*states, hidden) if output_hidden_states else None,
        )


class MplugOwl2ForCausalLM(MplugOwl2PreTrainedModel):
    """`MplugOwl2Model` plus the LM head (official class `MPLUGOwl2LlamaForCausalLM`)."""

    def __init__(self, config: MplugOwl2Config):
        super().__init__(config)
        self.model = MplugOwl2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, logits_to_keep: int = 0,
                output_hidden_states: bool = False, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits over the sequence; `logits_to_keep=k` keeps the last k positions (0: all)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         pixel_values=pixel_values, output_hidden_states=output_hidden_states,
                         **kwargs)
        hidden = out.last_hidden_state
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), hidden_states=out.hidden_states)


def _read_config(model_id_or_folder: str, revision: str | None) -> dict[str, Any] | None:
    path = cached_file(str(model_id_or_folder), "config.json", revision=revision,
                       _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    return read_json(path)  # a regular file, within bounds


def is_mplug_owl2(model_id_or_folder: str, revision: str | None = None) -> bool:
    """Whether the model's `config.json` names the mPLUG-Owl2 architecture (Q-Align included)."""
    config = _read_config(model_id_or_folder, revision)
    return config is not None and config.get("model_type") == MplugOwl2Config.model_type


def load_mplug_owl2(model_id_or_folder: str, revision: str | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    ) -> tuple[MplugOwl2ForCausalLM, MplugOwl2Processor]:
    """Load an mPLUG-Owl2 checkpoint in the hub layout and its processor.

    Args:
        model_id_or_folder: hub id (`MAGAer13/mplug-owl2-llama2-7b`, `q-future/one-align`) or a
            folder with `config.json`, the weights, the tokenizer files and
            `preprocessor_config.json`.
        revision: hub revision (branch, tag or commit).
        dtype: parameter dtype.
        device: where the model goes.

    Returns:
        The model in eval mode and its processor.
    """
    model = MplugOwl2ForCausalLM.from_pretrained(model_id_or_folder, revision=revision, dtype=dtype)
    model = model.to(device).eval()
    processor = MplugOwl2Processor.from_pretrained(
        model_id_or_folder, revision=revision, num_image_tokens=model.config.num_image_tokens
    )
    return model, processor
