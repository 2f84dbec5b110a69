"""Stage one against a direct transformers computation of the semantic vectors."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from agiqa.cache import open_cache
from agiqa.data.images import load_image
from agiqa.presets import load_prompts
from agiqa.stages.extraction.extract import ExtractConfig, ImageSource, extract_semantics

# Stage one run on tiny MLLMs, several times per test.
pytestmark = pytest.mark.slow

PROMPTS = load_prompts("paper")


def _direct(model_dir, image, prompt):
    """The semantic vector straight from transformers: one image, no padding, no answer prefix."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        enc = processor(text=[text], images=[image], return_tensors="pt")
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1][0]
        vector = hidden.mean(0)
        sep = "" if text[-1].isspace() else " "
        enc2 = processor(text=[text + sep + PROMPTS.answer_prefix], images=[image],
                         return_tensors="pt")
        logits = model(**enc2).logits[0, -1]
    tok = processor.tokenizer
    base = tok(text + sep + PROMPTS.answer_prefix, add_special_tokens=False)["input_ids"]
    prefix = text + sep + PROMPTS.answer_prefix
    ids = [tok(prefix + w, add_special_tokens=False)["input_ids"][len(base)]
           for w in PROMPTS.rating_words]
    probs = torch.softmax(logits[ids], -1)
    return vector.numpy(), float(probs @ torch.tensor(PROMPTS.rating_weights))


def _extract(model_dir, root, out, **kw):
    kw.setdefault("loader_workers", 0)
    cfg = ExtractConfig(out=out, mllm=str(model_dir), progress=False, **kw)
    return extract_semantics(cfg, ImageSource.from_folder(root))


def test_vectors_equal_direct_transformers(tiny_mllm, photo_folder, tmp_path):
    root, kinds = photo_folder
    report = _extract(tiny_mllm, root, tmp_path / "c", batch_size=4)
    assert set(report.failures) == {k for k, v in kinds.items() if v == "broken"}
    cache = open_cache(tmp_path / "c")
    good = sorted(k for k, v in kinds.items() if v == "ok")
    assert cache.keys == good
    got = cache.read(good)
    assert got["vectors"].dtype == np.float16 and got["vectors"].shape[1] == 2
    for key in ["astronaut.jpg", "nested/coffee_rgba.png", "nested/deeper/chelsea_exif.jpg"]:
        img, _ = load_image(root / key)
        for p, prompt in enumerate(PROMPTS.texts):
            vec, zs = _direct(tiny_mllm, img, prompt)
            row = good.index(key)
            np.testing.assert_allclose(got["vectors"][row, p].astype(np.float32), vec,
                                       rtol=2e-3, atol=2e-3)
            assert abs(got["zero_shot"][row, p] - zs) < 1e-4
            assert 1.0 <= zs <= 5.0


def test_batch_size_invariance_with_left_padding(tiny_qwen, photo_folder, tmp_path):
    # Qwen2-VL gives each image size its own token count, so batches are really padded.
    root, _ = photo_folder
    _extract(tiny_qwen, root, tmp_path / "b1", batch_size=1)
    _extract(tiny_qwen, root, tmp_path / "b5", batch_size=5)
    a, b = open_cache(tmp_path / "b1"), open_cache(tmp_path / "b5")
    va, vb = a.read(a.keys), b.read(b.keys)
    np.testing.assert_allclose(va["vectors"].astype(np.float32), vb["vectors"].astype(np.float32),
                               atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(va["zero_shot"], vb["zero_shot"], atol=1e-4)


def test_zarr_and_hdf5_hold_the_same_vectors(tiny_llava, photo_folder, tmp_path):
    root, _ = photo_folder
    _extract(tiny_llava, root, tmp_path / "z", format="zarr", shard_size=4)
    _extract(tiny_llava, root, tmp_path / "h", format="hdf5", shard_size=4)
    z, h = open_cache(tmp_path / "z"), open_cache(tmp_path / "h")
    assert z.format == "zarr" and h.format == "hdf5"
    assert z.keys == h.keys and z.fingerprint == h.fingerprint
    assert z.failures == h.failures
    np.testing.assert_array_equal(z.read(z.keys)["vectors"], h.read(h.keys)["vectors"])


def test_resume_recomputes_only_missing_shards(tiny_llava, photo_folder, tmp_path):
    root, _ = photo_folder
    full = _extract(tiny_llava, root, tmp_path / "full", shard_size=3)
    _extract(tiny_llava, root, tmp_path / "part", shard_size=3)
    cache = open_cache(tmp_path / "part")
    shards = cache.shard_paths()
    from agiqa.fileio import remove_path

    for p in shards[::2]:  # as if the run had been killed before these were renamed in
        remove_path(p)
    # (failed images are left alone here: retrying them would rewrite their shards too)
    again = _extract(tiny_llava, root, tmp_path / "part", shard_size=3, retry_failed=False)
    assert again.shards_written == len(shards[::2])
    assert 0 < again.computed < full.computed
    a, b = open_cache(tmp_path / "full"), open_cache(tmp_path / "part")
    assert a.keys == b.keys and a.failures == b.failures
    np.testing.assert_array_equal(a.read(a.keys)["vectors"], b.read(b.keys)["vectors"])
    assert sorted(p.name for p in a.shard_paths()) == sorted(p.name for p in b.shard_paths())


def test_two_workers_fill_the_cache_of_one(tiny_llava, photo_folder, tmp_path):
    """Two worker processes started at the same moment (as array tasks are) fill one cache
    that equals one worker's."""
    import os
    import subprocess
    import sys

    root, _ = photo_folder
    _extract(tiny_llava, root, tmp_path / "one", shard_size=2)
    cmd = [sys.executable, "-m", "agiqa", "extract-semantics", "--model", str(tiny_llava),
           "--images", str(root), "--out", str(tmp_path / "two"), "--shard-size", "2",
           "--loader-workers", "0", "--workers", "2", "-q", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*cmd, "--worker", str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-2000:]  # 2: the folder's broken files are reported
        reports.append(json.loads(out))
    assert all(r["shards_written"] > 0 for r in reports)
    a, b = open_cache(tmp_path / "one"), open_cache(tmp_path / "two")
    assert a.keys == b.keys and a.failures == b.failures
    np.testing.assert_array_equal(a.read(a.keys)["vectors"], b.read(b.keys)["vectors"])


def test_workers_creating_one_cache_at_once_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from agiqa.cache import SemanticCache
    from agiqa.cache.fingerprint import semantic_spec

    spec = semantic_spec("m", None, "float32", ["a", "b"], "", ["good"])
    path = tmp_path / "cache"
    with ThreadPoolExecutor(8) as pool:
        caches = list(pool.map(lambda _: SemanticCache.create(path, spec, ["a", "b"], 8),
                               range(16)))
    assert len({c.fingerprint for c in caches}) == 1
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json"]


def test_one_forward_pass_per_image_and_prompt(tiny_llava, photo_folder, tmp_path,
                                               mllm_forwards):
    root, kinds = photo_folder
    report = _extract(tiny_llava, root, tmp_path / "c", batch_size=3)
    n_good = sum(v == "ok" for v in kinds.values())
    # Counted by the model itself: one row per image and prompt, both prompts of a batch of 3
    # in one pass.
    assert sum(mllm_forwards) == 2 * n_good and max(mllm_forwards) == 6
    assert report.forward_passes == sum(mllm_forwards)


def test_background_decoding_gives_the_same_vectors(tiny_llava, photo_folder, tmp_path):
    root, _ = photo_folder
    _extract(tiny_llava, root, tmp_path / "w0", loader_workers=0)
    _extract(tiny_llava, root, tmp_path / "w2", loader_workers=2)
    a, b = open_cache(tmp_path / "w0"), open_cache(tmp_path / "w2")
    np.testing.assert_array_equal(a.read(a.keys)["vectors"], b.read(b.keys)["vectors"])


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"loader_workers": -1}])
def test_bad_options(kw, tmp_path):
    from agiqa.errors import ConfigError

    with pytest.raises(ConfigError):
        ExtractConfig(out=tmp_path, **kw)


def test_batches_of_similar_size_cut_padding(photo_folder, tmp_path, monkeypatch):
    # A Qwen2-VL that gives larger images more tokens (up to 112×112 px): batches get padded.
    from agiqa.models.mllm.tiny import build_tiny_mllm
    from agiqa.stages.extraction import extract as semantics

    qwen = build_tiny_mllm("qwen2-vl", tmp_path / "qwen112", image_size=112)
    root, _ = photo_folder
    # A pass per prompt: the padding measured is that of image sizes alone.
    by_size = _extract(qwen, root, tmp_path / "sorted", batch_size=4, fuse_prompts=False)
    monkeypatch.setattr(semantics, "_largest_first", lambda root, keys: keys)
    plain = _extract(qwen, root, tmp_path / "plain", batch_size=4, fuse_prompts=False)
    single = _extract(qwen, root, tmp_path / "single", batch_size=1, fuse_prompts=False)
    assert single.padding_tokens == 0 and plain.padding_tokens > 0
    assert by_size.padding_tokens < plain.padding_tokens
    assert by_size.tokens - by_size.padding_tokens == plain.tokens - plain.padding_tokens
    a, b = open_cache(tmp_path / "sorted"), open_cache(tmp_path / "single")
    assert a.keys == b.keys
    np.testing.assert_allclose(a.read(a.keys)["vectors"].astype(np.float32),
                               b.read(a.keys)["vectors"].astype(np.float32), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_cache_reads_whole_shards_in_place_and_gathers_subsets(fmt, tmp_path):
    from agiqa.cache import SemanticCache
    from agiqa.cache.fingerprint import semantic_spec
    from agiqa.cache.shards import ShardData
    from agiqa.cache.store import plan_shards
    from agiqa.errors import CacheError

    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}.png" for i in range(50)]
    vectors = rng.standard_normal((50, 2, 24)).astype(np.float16)
    spec = semantic_spec("m", None, "float32", ["a", "b"], "", ["good"])
    cache = SemanticCache.create(tmp_path / fmt, spec, ["a", "b"], 24, fmt)
    for name, chunk in plan_shards(keys, 16):
        idx = [keys.index(k) for k in chunk]
        cache.write_shard(name, ShardData(chunk, ["0" * 64] * len(chunk), vectors[idx],
                                          np.zeros((len(chunk), 2), np.float32)))
    cache = open_cache(tmp_path / fmt)
    np.testing.assert_array_equal(cache.read(keys)["vectors"], vectors)
    subset = keys[::-3]
    np.testing.assert_array_equal(cache.read(subset)["vectors"],
                                  vectors[[keys.index(k) for k in subset]])
    shard = cache.shard_paths()[0]
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(CacheError, match="unreadable shard|truncated"):
        open_cache(tmp_path / fmt).read(keys)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "qwen2.5-vl"])
def test_fused_prompts_equal_one_pass_per_prompt(family, request, photo_folder, tmp_path,
                                                 mllm_forwards, vision_images):
    root, _ = photo_folder
    model = request.getfixturevalue(
        {"llava": "tiny_llava", "qwen2-vl": "tiny_qwen", "qwen2.5-vl": "tiny_qwen25"}[family])
    separate = _extract(model, root, tmp_path / "s", batch_size=3, fuse_prompts=False)
    calls_separate, vision_separate = list(mllm_forwards), list(vision_images)
    mllm_forwards.clear()
    vision_images.clear()
    fused = _extract(model, root, tmp_path / "f", batch_size=3)  # fused by default
    # One pass per batch holding both prompts (rows: prompt-major), half the calls.
    assert sum(mllm_forwards) == sum(calls_separate) == fused.forward_passes
    assert len(mllm_forwards) * 2 == len(calls_separate) == separate.model_calls
    assert max(mllm_forwards) == 6 and fused.model_calls == len(mllm_forwards)
    # The vision tower runs once per image for both prompts: half the images, half the calls.
    assert sum(vision_separate) == fused.forward_passes == 2 * sum(vision_images)
    assert len(vision_images) == len(mllm_forwards) and max(vision_images) == 3
    # The prompts differ in length, so the fused rows of the shorter one are left-padded.
    assert fused.to_dict()["padding_fraction"] > separate.to_dict()["padding_fraction"]
    a, b = open_cache(tmp_path / "s"), open_cache(tmp_path / "f")
    assert a.keys == b.keys
    ra, rb = a.read(a.keys), b.read(b.keys)
    np.testing.assert_allclose(rb["vectors"].astype(np.float32),
                               ra["vectors"].astype(np.float32), rtol=2**-9, atol=1e-4)
    np.testing.assert_allclose(rb["zero_shot"], ra["zero_shot"], atol=1e-5)
