"""The vision towers of transformers families under agiqa: window attention batched by window
length (Qwen2-VL family), and one vision pass per image for every prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from agiqa.models.mllm.vision_paths import (
    GROUPED_ATTENTION,
    grouped_window_attention,
    supports_grouped_attention,
    vision_once,
)

# Qwen2-VL and LLaVA vision passes compared on a CPU.
pytestmark = pytest.mark.slow


def _load(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def _images() -> list[Image.Image]:
    """Real photos at sizes whose patch grids differ (8 × 6, 6 × 8, 8 × 8 patches)."""
    import skimage.data as d

    return [Image.fromarray(d.astronaut()).resize((112, 84)),
            Image.fromarray(d.coffee()).resize((84, 112)),
            Image.fromarray(d.chelsea()).resize((112, 112))]


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[int]:
    """Batch sizes of every SDPA call while the test runs."""
    calls: list[int] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[0])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def test_grouped_window_attention_equals_the_window_loop(tiny_qwen25, sdpa_calls):
    model, processor = _load(tiny_qwen25)
    assert supports_grouped_attention(model)
    inputs = processor.image_processor(images=_images(), return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 8], [1, 8, 6], [1, 8, 8]]
    visual = model.model.visual
    with torch.inference_mode():
        loop = visual(inputs["pixel_values"], grid_thw=grid).pooler_output
        loop_calls = list(sdpa_calls)
        sdpa_calls.clear()
        with grouped_window_attention(model):
            assert visual.config._attn_implementation == GROUPED_ATTENTION
            grouped = visual(inputs["pixel_values"], grid_thw=grid).pooler_output
    assert visual.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)
    # transformers: one call per window (layer 0, 4 × 4-patch windows: 4 + 4 + 4) and per
    # image (layer 1, full attention); agiqa: one per distinct length, windows stacked.
    assert loop_calls == [1] * 12 + [1] * 3
    assert sorted(sdpa_calls) == sorted([4, 8] + [1, 2])  # lengths 8 and 16; 48 and 64
    assert sum(sdpa_calls) == len(loop_calls)


def test_grouped_attention_only_where_transformers_loops(tiny_llava, tiny_qwen25):
    llava, _ = _load(tiny_llava)
    assert not supports_grouped_attention(llava)
    qwen, _ = _load(tiny_qwen25)
    qwen.model.visual.config._attn_implementation = "eager"  # a user's explicit choice stays
    assert not supports_grouped_attention(qwen)


def test_vision_once_repeats_features_prompt_major(tiny_qwen25):
    model, processor = _load(tiny_qwen25)
    inputs = processor.image_processor(images=_images()[:2], return_tensors="pt")
    base = model.model
    with torch.inference_mode():
        single = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        with vision_once(base, 2):
            twice = base.get_image_features(inputs["pixel_values"],
                                            inputs["image_grid_thw"].repeat(2, 1))
            with pytest.raises(ValueError, match="not a multiple of the 2 prompts"):
                base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"][:1])
    assert "get_image_features" not in vars(base)  # the class method is back
    one, two = single.pooler_output, twice.pooler_output
    assert len(two) == 4
    for i, feats in enumerate(two):
        np.testing.assert_array_equal(feats.numpy(), one[i % 2].numpy())
