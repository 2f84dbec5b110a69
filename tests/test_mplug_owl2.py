"""mPLUG-Owl2 parity with the official code (transformers 4.31).

The expected values come from `tests/fixtures/mplug_owl2/generate.py`, run once in the official
environment on the committed tiny checkpoint: token ids, pixel values, the last hidden state,
its mean (the `getFeature.py` vector) and the last-position logits, in float32.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agiqa.models.mllm.mplug_owl2 import (
    IMAGE_TOKEN_INDEX,
    MplugOwl2ForCausalLM,
    expand2square,
    is_mplug_owl2,
    load_mplug_owl2,
)

# The official mPLUG-Owl2 checkpoint loaded and run on a CPU.
pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "mplug_owl2"
META = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
EXPECTED = dict(np.load(FIXTURE / "expected.npz"))
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A copy of the committed checkpoint, so nothing writes into the repository."""
    return Path(shutil.copytree(FIXTURE / "checkpoint", tmp_path_factory.mktemp("owl2") / "ckpt"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_mplug_owl2(str(checkpoint))


@pytest.fixture(scope="module")
def images(loaded) -> list[Image.Image]:
    _, processor = loaded
    background = processor.image_processor.mean_color
    return [expand2square(Image.open(FIXTURE / "images" / name).convert("RGB"), background)
            for name in META["images"]]


def _vectors(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean of the last hidden state, and the state itself."""
    with torch.no_grad():
        hidden = model.model(**batch, use_cache=False).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1), hidden


def test_loads_every_key_of_the_official_checkpoint(checkpoint):
    model, info = MplugOwl2ForCausalLM.from_pretrained(str(checkpoint), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    official = {k for k in META["state_dict_keys"] if not k.endswith("rotary_emb.inv_freq")}
    assert set(model.state_dict()) == official
    assert model.config.num_image_tokens == 65
    assert is_mplug_owl2(str(checkpoint))


def test_is_mplug_owl2_rejects_other_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert not is_mplug_owl2(str(tmp_path))


def test_bin_shards_load_with_weights_only(checkpoint, monkeypatch):
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    MplugOwl2ForCausalLM.from_pretrained(str(checkpoint))
    assert len(calls) == 3 and all(flag is True for flag in calls), calls


@pytest.mark.parametrize("text", list(META["texts"]))
def test_plain_tokenisation_equals_official(loaded, text):
    _, processor = loaded
    assert processor.tokenizer(text).input_ids == META["texts"][text]


@pytest.mark.parametrize("key", list(META["prompts"]))
def test_image_prompt_ids_equal_official_and_expand(loaded, key):
    _, processor = loaded
    prompt = META["prompts"][key]
    assert prompt["text"] == f"USER: {prompt['prompt']}\n<|image|> ASSISTANT:"
    assert processor.tokenizer_image_token(prompt["text"]) == prompt["input_ids"]
    ids = processor(text=[prompt["text"]], images=[Image.new("RGB", (9, 9))])["input_ids"][0]
    expected = []
    for i in prompt["input_ids"]:
        expected += [i] * 65 if i == IMAGE_TOKEN_INDEX else [i]
    assert ids.tolist() == expected


def test_pixel_values_are_bit_identical(loaded, images):
    _, processor = loaded
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert pixels.dtype == torch.float32 and pixels.shape[1:] == (3, 448, 448)
    digests = [hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in pixels]
    assert digests == META["pixel_values_sha256"]
    np.testing.assert_array_equal(pixels.numpy()[:, :, ::7, ::7], EXPECTED["pixel_values_strided"])


@pytest.mark.parametrize("key", list(META["prompts"]))
def test_vectors_and_logits_equal_official(loaded, images, key):
    model, processor = loaded
    batch = processor(text=[META["prompts"][key]["text"]] * len(images), images=images)
    vectors, hidden = _vectors(model, batch)
    hidden_diff = (hidden - torch.from_numpy(EXPECTED[f"{key}/last_hidden_state"])).abs().max()
    vector_diff = (vectors - torch.from_numpy(EXPECTED[f"{key}/vectors"])).abs().max()
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
    logit_diff = (logits - torch.from_numpy(EXPECTED[f"{key}/last_logits"])).abs().max()
    assert hidden.shape == EXPECTED[f"{key}/last_hidden_state"].shape
    assert float(hidden_diff) <= TOLERANCE
    assert float(vector_diff) <= TOLERANCE
    assert float(logit_diff) <= TOLERANCE


def test_left_padded_batch_equals_batch_of_one(loaded, images):
    model, processor = loaded
    assert processor.tokenizer.padding_side == "left"
    texts = [META["prompts"][k]["text"] for k in META["prompts"]]
    batch = processor(text=texts, images=images[:2])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1] and batch["attention_mask"][1, 0] == 0
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    vectors, _ = _vectors(model, batch)
    for row, (text, image) in enumerate(zip(texts, images[:2], strict=True)):
        single, _ = _vectors(model, processor(text=[text], images=[image]))
        assert float((vectors[row] - single[0]).abs().max()) <= 1e-5
    for row, key in enumerate(META["prompts"]):
        official = torch.from_numpy(EXPECTED[f"{key}/vectors"][row])
        assert float((vectors[row] - official).abs().max()) <= TOLERANCE


def test_safetensors_resave_loads_and_matches(loaded, images, checkpoint, tmp_path):
    model, processor = loaded
    folder = tmp_path / "resaved"
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json"):
        shutil.copy(checkpoint / name, folder / name)
    reloaded, info = MplugOwl2ForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    again, processor2 = load_mplug_owl2(str(folder))
    batch = processor2(text=[META["prompts"]["coherence"]["text"]], images=images[:1])
    vectors, _ = _vectors(again, batch)
    official = torch.from_numpy(EXPECTED["coherence/vectors"][:1])
    assert float((vectors - official).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_finite(checkpoint, images, dtype):
    model, processor = load_mplug_owl2(str(checkpoint), dtype=dtype)
    assert model.lm_head.weight.dtype == dtype
    texts = [META["prompts"][k]["text"] for k in META["prompts"]]
    batch = processor(text=texts, images=images[:2])
    with torch.no_grad():
        hidden = model.model(**batch, use_cache=False).last_hidden_state
    assert hidden.dtype == dtype
    assert torch.isfinite(hidden).all()
    vectors, _ = _vectors(model, batch)
    official = torch.from_numpy(EXPECTED["semantic_content/vectors"][0])
    assert float((vectors[0] - official).abs().max()) <= 0.1


def test_mismatched_images_are_refused(loaded):
    _, processor = loaded
    with pytest.raises(ValueError, match="1 <\\|image\\|> markers for 2 images"):
        processor(text=["USER: hi\n<|image|>"], images=[Image.new("RGB", (9, 9))] * 2)


def test_one_vision_pass_serves_every_prompt(loaded, images):
    """``image_repeats``: the pixels come once; rows run prompt by prompt over the images."""
    model, processor = loaded
    texts = [META["prompts"][k]["text"] for k in META["prompts"]]
    n = len(images)
    rows = [t for t in texts for _ in range(n)]
    repeated = processor(text=rows, images=images * len(texts))
    shared = dict(repeated, pixel_values=processor.image_processor(images)["pixel_values"],
                  image_repeats=len(texts))
    calls = []
    hook = model.model.vision_model.register_forward_hook(
        lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        a, _ = _vectors(model, repeated)
        b, _ = _vectors(model, shared)
    finally:
        hook.remove()
    assert calls == [n * len(texts), n]
    assert float((a - b).abs().max()) <= 1e-6
    for p, key in enumerate(META["prompts"]):
        official = torch.from_numpy(EXPECTED[f"{key}/vectors"])
        assert float((b[p * n:(p + 1) * n] - official).abs().max()) <= TOLERANCE
    with pytest.raises(ValueError, match=f"{n} image\\(s\\) give {n * 65} visual tokens"):
        _vectors(model, dict(shared, image_repeats=1))


def test_a_forward_pass_never_reads_values_back_from_the_device(loaded, images, monkeypatch):
    """On the meta device no value exists: a forward pass that runs there never waits for the
    device's data (no ``nonzero``, ``.item()`` or ``bool(tensor)``), so on a GPU it queues
    without a host synchronisation. The official routing (``nonzero`` per module) cannot."""
    import copy

    from agiqa.models.mllm.mplug_owl2 import MultiwayNetwork

    model, processor = loaded
    texts = [META["prompts"][k]["text"] for k in META["prompts"]]
    n = len(images)
    batch = processor(text=[t for t in texts for _ in range(n)], images=images, image_repeats=2)
    assert not bool(batch["attention_mask"].all())  # the shorter prompt is padded
    meta = copy.deepcopy(model).to("meta")
    inputs = {k: v.to("meta") for k, v in batch.items()}
    with torch.no_grad():
        hidden = meta.model(**inputs, image_repeats=2).last_hidden_state
        assert hidden.shape == (2 * n, batch["input_ids"].shape[1], model.config.hidden_size)
        unpadded = processor(text=[texts[0]] * n, images=images)
        del unpadded["attention_mask"]
        meta.model(**{k: v.to("meta") for k, v in unpadded.items()})

    def official(self, hidden_states, route):  # mplug_owl2/model/multiway.py
        out = hidden_states.new_empty(*hidden_states.shape[:-1], self.out_features)
        for idx, subway in enumerate(self.multiway):
            local = route.modality.eq(idx).nonzero(as_tuple=True)
            out[local] = subway(hidden_states[local].unsqueeze(1)).squeeze(1)
        return out

    monkeypatch.setattr(MultiwayNetwork, "forward", official)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="nonzero"):
        meta.model(**inputs, image_repeats=2)


def _routes(monkeypatch) -> list:
    """The routes the model builds while the test runs."""
    from agiqa.models.mllm import mplug_owl2

    built = []
    original = mplug_owl2.ModalityRoute.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(mplug_owl2.ModalityRoute, "__init__", recording)
    return built


def _by_mask(network, x, modality):
    """Multiway routing as the official code does it: each branch on its tokens, by mask."""
    out = x.new_empty(*x.shape[:-1], network.out_features)
    for idx, branch in enumerate(network.multiway):
        local = modality.eq(idx).nonzero(as_tuple=True)
        out[local] = branch(x[local])
    return out


def test_image_span_is_found_on_the_host_only_for_one_run_per_row_at_one_offset():
    from agiqa.models.mllm.mplug_owl2 import image_span_of

    ids = torch.arange(40).view(4, 10)
    assert image_span_of(ids) is None  # no image slots
    ids[:, 3:7] = IMAGE_TOKEN_INDEX
    assert image_span_of(ids) == (3, 4)
    assert image_span_of(ids.to("meta")) is None  # not read on a device
    shifted = ids.clone()
    shifted[1] = torch.cat([shifted[1, 1:], torch.tensor([0])])  # one row starts a column early
    assert image_span_of(shifted) is None
    split = ids.clone()
    split[2, 5] = 7  # a row with two runs
    assert image_span_of(split) is None
    extra = ids.clone()
    extra[3, 9] = IMAGE_TOKEN_INDEX  # a row with a slot outside the span
    assert image_span_of(extra) is None


def test_a_wrong_image_span_is_refused():
    from agiqa.models.mllm.mplug_owl2 import ModalityRoute

    modality = torch.zeros(2, 10, dtype=torch.bool)
    modality[:, 2:6] = True
    assert ModalityRoute(modality, 8, (2, 4)).span == (2, 4)
    with pytest.raises(ValueError, match="not at columns"):
        ModalityRoute(modality, 8, (3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        ModalityRoute(modality, 8, (2, 3))


@pytest.mark.parametrize("start", [0, 5, 12])
def test_sliced_routing_equals_index_routing_and_the_official_one_in_every_module(start):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from agiqa.models.mllm.mplug_owl2 import ModalityRoute, MultiwayNetwork

    torch.manual_seed(start)
    rows, length, count, width = 3, 17, 5, 48
    modality = torch.zeros(rows, length, dtype=torch.bool)
    modality[:, start:start + count] = True
    x = torch.randn(rows, length, width)
    sliced = ModalityRoute(modality, rows * count, (start, count))
    indexed = ModalityRoute(modality, rows * count)
    assert sliced.order is None and indexed.order is not None and indexed.span is None
    for network in (MultiwayNetwork([torch.nn.Linear(width, 32) for _ in range(2)], 32),
                    MultiwayNetwork([LlamaRMSNorm(width) for _ in range(2)], width)):
        for p in network.parameters():
            torch.nn.init.normal_(p)
        with torch.no_grad():
            a, b = network(x, sliced), network(x, indexed)
            official = _by_mask(network, x, modality)
        assert a.shape == (rows, length, network.out_features)
        assert torch.equal(a, b)
        assert torch.equal(a, official)


def test_a_uniform_batch_routes_by_slicing_bit_identical_to_the_index(loaded, images,
                                                                      monkeypatch):
    from agiqa.models.mllm import mplug_owl2

    model, processor = loaded
    batch = processor(text=[META["prompts"]["coherence"]["text"]] * len(images), images=images)
    span = mplug_owl2.image_span_of(batch["input_ids"])
    assert span is not None and span[1] == 65
    routes = _routes(monkeypatch)
    with torch.no_grad():
        sliced = model(**batch, output_hidden_states=True)
        monkeypatch.setattr(mplug_owl2, "image_span_of", lambda ids: None)
        indexed = model(**batch, output_hidden_states=True)
    assert [r.span for r in routes] == [span, None]
    assert routes[0].order is None and routes[1].order is not None
    assert torch.equal(sliced.logits, indexed.logits)
    for a, b in zip(sliced.hidden_states, indexed.hidden_states, strict=True):
        assert torch.equal(a, b)
    official = torch.from_numpy(EXPECTED["coherence/last_hidden_state"])
    assert float((sliced.hidden_states[-1] - official).abs().max()) <= TOLERANCE


def test_rows_with_the_image_at_different_columns_route_by_the_index(loaded, images,
                                                                     monkeypatch):
    """Text after the image that differs in length: left padding puts the image of the
    shorter row later, so there is no common span; the index route gives the same states as
    the official routing by mask. (The paper's prompts differ before the image only: padded,
    their images share columns and route by slicing.)"""
    from agiqa.models.mllm import mplug_owl2

    model, processor = loaded
    base = META["prompts"]["coherence"]["text"]
    batch = processor(text=[base, base + " Describe the image in a few words."],
                      images=images[:2])
    assert not bool(batch["attention_mask"].all())
    assert mplug_owl2.image_span_of(batch["input_ids"]) is None
    paper = processor(text=[META["prompts"][k]["text"] for k in META["prompts"]],
                      images=images[:2])
    assert not bool(paper["attention_mask"].all())
    assert mplug_owl2.image_span_of(paper["input_ids"]) is not None
    routes = _routes(monkeypatch)
    with torch.no_grad():
        ours = model.model(**batch).last_hidden_state
    assert len(routes) == 1 and routes[0].span is None and routes[0].order is not None

    def official(self, x, route):
        return _by_mask(self, x, route.modality)

    monkeypatch.setattr(mplug_owl2.MultiwayNetwork, "forward", official)
    with torch.no_grad():
        reference = model.model(**batch).last_hidden_state
    assert torch.equal(ours, reference)
