"""The published pipeline end to end on the tiny official mPLUG-Owl2: ``extract-semantics`` gives
the official vectors, and an imported official checkpoint scores a folder through mPLUG-Owl2."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from agiqa.cache import open_cache
from agiqa.cli import cli
from agiqa.data import normalize, read_pixels
from agiqa.models.agiqa_net import load_model
from agiqa.models.mllm import SemanticEncoder
from agiqa.models.mllm.mplug_owl2 import IMAGE_TOKEN_INDEX
from agiqa.models.official import import_official
from agiqa.presets import load_prompts
from agiqa.stages.extraction.official import official_semantics

# The tiny mPLUG-Owl2 of the official code, run end to end.
pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "mplug_owl2"
META = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
EXPECTED = dict(np.load(FIXTURE / "expected.npz"))
ORDER = ["semantic_content", "coherence"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def owl2(tmp_path_factory):
    """Copies of the committed tiny checkpoint and photos (nothing writes into the repository)."""
    base = tmp_path_factory.mktemp("owl2")
    shutil.copytree(FIXTURE / "checkpoint", base / "ckpt")
    shutil.copytree(FIXTURE / "images", base / "images")
    return base / "ckpt", base / "images"


def _official_vectors() -> np.ndarray:
    """The official getFeature.py vectors [n, P, D] in the fixture's image order."""
    return np.stack([EXPECTED[f"{name}/vectors"] for name in ORDER], 1)


def test_the_official_turn_with_one_bos(owl2):
    folder, images = owl2
    enc = SemanticEncoder(str(folder), load_prompts("paper"))
    assert enc.recipe.name == "mplug-owl2-official" and enc.pad_square
    assert enc.dtype == "float32"  # float16 is the recipe's GPU default only
    from PIL import Image

    batch = enc.prepare([Image.open(images / META["images"][0]).convert("RGB")], 0)
    ids = batch["input_ids"][0][batch["pool_mask"][0].bool()].tolist()
    official = []
    for i in META["prompts"]["semantic_content"]["input_ids"]:
        official += [i] * 65 if i == IMAGE_TOKEN_INDEX else [i]
    assert ids == official and ids.count(1) == 1


def test_extract_semantics_gives_the_official_vectors(owl2, tmp_path):
    folder, images = owl2
    r = run("extract-semantics", "--model", folder, "--images", images, "--out", tmp_path / "c",
            "--batch-size", "3", "-q", "--loader-workers", "0")
    assert r.exit_code == 0, r.output
    cache = open_cache(tmp_path / "c")
    assert cache.spec["recipe"] == {"turn": "USER: {prompt}\n<|image|> ASSISTANT:",
                                    "pad_square": True, "pooling": "mean"}
    assert cache.prompt_names == ORDER
    got = cache.read(META["images"])
    np.testing.assert_allclose(got["vectors"].astype(np.float32), _official_vectors(),
                               rtol=2**-10, atol=1e-4)  # float16 storage precision
    assert ((got["zero_shot"] >= 1) & (got["zero_shot"] <= 5)).all()
    unpadded = run("extract-semantics", "--model", folder, "--images", images, "--out",
                   tmp_path / "u", "--no-pad-square", "-q", "--loader-workers", "0")
    assert unpadded.exit_code == 0, unpadded.output
    plain = open_cache(tmp_path / "u").read(META["images"])["vectors"].astype(np.float32)
    assert np.abs(plain - _official_vectors()).max() > 1e-2


def test_official_checkpoint_scores_a_folder_through_mplug_owl2(owl2, official_ma_agiqa, tmp_path):
    """The official module's state dict at the tiny mPLUG-Owl2's width (64: the first 64 input
    columns of the semantic layers), imported and run by ``score-folder``, scores as the
    official-parity model (tests/test_model.py) does on the official vectors padded with zeros
    to 4096, where the dropped columns meet zeros."""
    folder, images = owl2
    checkpoint = official_ma_agiqa.checkpoint(semantic_dim=64)
    heads = str(official_ma_agiqa.model("narrow")["vit"]["num_heads"])

    default = run("import-official", checkpoint, "--out", tmp_path / "x", "--vit-heads", heads)
    assert default.exit_code == 1
    assert "width 64, but MAGAer13/mplug-owl2-llama2-7b gives 4096" in default.output

    r = run("import-official", checkpoint, "--out", tmp_path / "m", "--mllm", folder,
            "--dtype", "float32", "--vit-heads", heads)
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    expected = official_semantics(str(folder), "float32")
    assert config["fingerprint"] == expected["fingerprint"]
    assert config["semantics"]["model"] == str(folder.resolve())
    assert config["prompt_names"] == ORDER

    scored = run("score-folder", images, "--model", tmp_path / "m", "--json", "-q",
                 "--loader-workers", "0")
    assert scored.exit_code == 0, scored.output
    rows = {row["path"]: row["score"] for row in json.loads(scored.stdout)["rows"]}
    assert sorted(rows) == sorted(META["images"])

    import_official(official_ma_agiqa.checkpoint(), tmp_path / "full", vit_heads=int(heads))
    full = load_model(tmp_path / "full")
    vectors = torch.from_numpy(_official_vectors().astype(np.float16).astype(np.float32))
    padded = torch.nn.functional.pad(vectors, (0, 4096 - vectors.shape[-1]))
    pixels = torch.stack([normalize(read_pixels(images / name)) for name in META["images"]])
    with torch.no_grad():
        want = full(pixels, padded)
    got = torch.tensor([rows[name] for name in META["images"]])
    assert want.std() > 1e-2
    assert (got - want).abs().max() <= official_ma_agiqa.tolerance(want)


def test_the_default_fingerprint_is_the_papers():
    official = official_semantics()
    spec = official["semantics"]
    assert spec["model"] == "MAGAer13/mplug-owl2-llama2-7b"
    assert spec["revision"] == "200342bbdd0eef019b02b4d7c9b17df235bba4ad"
    assert spec["dtype"] == "float16" and official["dim"] == 4096
    assert spec["prompts"] == load_prompts("paper").texts
    assert spec["recipe"]["turn"] == "USER: {prompt}\n<|image|> ASSISTANT:"


def test_both_prompts_in_one_pass_with_one_vision_pass_per_image(owl2, tmp_path):
    """mPLUG-Owl2 fuses the prompts by default: half the model calls, one vision pass per
    image; ``fuse_prompts=False`` runs a pass per prompt. Both give the official vectors."""
    from agiqa.stages.extraction.extract import ExtractConfig, ImageSource, extract_semantics

    folder, images = owl2
    got = {}
    for fuse in (None, False):
        enc = SemanticEncoder(str(folder), load_prompts("paper"), fuse_prompts=fuse).load()
        seen = []
        enc.model.model.vision_model.register_forward_hook(
            lambda _m, args, _out, seen=seen: seen.append(args[0].shape[0]))
        cfg = ExtractConfig(out=tmp_path / str(fuse), model=str(folder), batch_size=2,
                            loader_workers=0, progress=False)
        report = extract_semantics(cfg, ImageSource.from_folder(images), enc)
        n = len(META["images"])
        assert report.forward_passes == 2 * n and sum(seen) == (n if fuse is None else 2 * n)
        assert report.model_calls == (1 if fuse is None else 2) * -(-n // 2)
        got[fuse] = open_cache(tmp_path / str(fuse)).read(META["images"])
    assert enc.fuse_prompts is False
    for run_ in got.values():
        np.testing.assert_allclose(run_["vectors"].astype(np.float32), _official_vectors(),
                                   rtol=2**-10, atol=1e-4)
    np.testing.assert_allclose(got[None]["zero_shot"], got[False]["zero_shot"], atol=1e-5)


def test_fused_inputs_read_each_image_once(owl2, monkeypatch):
    """The fused mPLUG-Owl2 batch comes from one processor call (each image preprocessed once)
    and equals the per-prompt batches merged row by row."""
    from PIL import Image

    from agiqa.models.mllm import fuse_batches

    folder, images = owl2
    enc = SemanticEncoder(str(folder), load_prompts("paper"))
    imgs = [Image.open(images / name).convert("RGB") for name in META["images"]]
    seen = []
    original = type(enc.processor.image_processor).preprocess_one
    monkeypatch.setattr(type(enc.processor.image_processor), "preprocess_one",
                        lambda self, im: seen.append(im.size) or original(self, im))
    (fused,) = enc.prepare.all_prompts(imgs)
    assert len(seen) == len(imgs) and fused["image_repeats"] == 2
    merged = fuse_batches([enc.prepare(imgs, 0), enc.prepare(imgs, 1)],
                          enc.processor.tokenizer.pad_token_id or 0, share_images=True)
    assert sorted(fused) == sorted(merged)
    for name, value in fused.items():
        if torch.is_tensor(value):
            assert torch.equal(value, merged[name]), name
        else:
            assert value == merged[name], name
    assert fused["prompt_rows"].tolist() == [0] * len(imgs) + [1] * len(imgs)


def test_a_stage_one_step_reads_nothing_back_from_the_device(owl2):
    """A whole batch of stage one (inputs moved, both prompts in one pass, pooling, zero-shot
    score) runs on the meta device, where any read-back of a value fails: on a GPU it queues
    without waiting, and the results are copied back once per shard."""
    import copy

    from PIL import Image

    folder, images = owl2
    enc = SemanticEncoder(str(folder), load_prompts("paper")).load(progress=False)
    enc.attach(copy.deepcopy(enc.model).to("meta"))
    enc.device = torch.device("meta")
    imgs = [Image.open(images / name).convert("RGB") for name in META["images"]]
    vectors, zero_shot = enc.encode_all(enc.prepare.all_prompts(imgs))
    assert vectors.device.type == zero_shot.device.type == "meta"
    assert vectors.shape == (len(imgs), 2, enc.dim) and zero_shot.shape == (len(imgs), 2)


def test_length_groups_of_a_fused_mask():
    from agiqa.models.mllm.adapter import length_groups

    def mask(*lengths, width=4):
        return torch.tensor([[0] * (width - n) + [1] * n for n in lengths])

    assert length_groups(mask(2, 2, 4, 4), 2) == [(2, [0]), (4, [1])]
    assert length_groups(mask(3, 3, 4, 4, 3, 3), 3) == [(3, [0, 2]), (4, [1])]
    assert length_groups(mask(4, 4, 4, 4), 2) is None  # no padding: one pass without a mask
    assert length_groups(mask(2, 3, 4, 4), 2) is None  # a block of two lengths
    assert length_groups(mask(2, 2, 4), 2) is None  # rows not in equal blocks
    assert length_groups(mask(2, 2, 4, 4).flip(1), 2) is None  # right padding
    assert length_groups(mask(0, 0, 4, 4), 2) is None  # empty rows


def _language_calls(model) -> list:
    """(ids shape, attention mask) of each language-model call, and the vision tower's images."""
    calls, vision = [], []
    hooks = [
        model.model.register_forward_pre_hook(
            lambda _m, _args, kw: calls.append((tuple(kw["input_ids"].shape),
                                                kw.get("attention_mask"))), with_kwargs=True),
        model.model.vision_model.register_forward_hook(
            lambda _m, args, _out: vision.append(args[0].shape[0])),
    ]
    return calls, vision, hooks


def test_fused_prompts_run_by_length_without_padding(owl2, monkeypatch):
    """The fused batch's prompts differ in length: each runs unpadded and unmasked, fed by one
    vision pass, and the vectors and scores equal one pass per prompt bit for bit; the padded
    pass (the fallback) gives them to rounding."""
    from PIL import Image

    from agiqa.models.mllm import adapter

    folder, images = owl2
    imgs = [Image.open(images / name).convert("RGB") for name in META["images"]]
    n = len(imgs)
    fused = SemanticEncoder(str(folder), load_prompts("paper")).load(progress=False)
    separate = SemanticEncoder(str(folder), load_prompts("paper"), fuse_prompts=False)
    separate.attach(fused.model)
    (batch,) = fused.prepare.all_prompts(imgs)
    mask = batch["attention_mask"]
    lengths = [int(mask[0].sum()), int(mask[n].sum())]
    assert lengths[0] != lengths[1] and max(lengths) == mask.shape[1]
    assert fused.tokens_run(batch) == (n * sum(lengths), 0)
    assert separate.tokens_run(separate.prepare(imgs, 0)) == (n * lengths[0], 0)
    calls, vision, hooks = _language_calls(fused.model)
    try:
        grouped = fused.encode_all([batch])
        assert [c[0] for c in calls] == [(n, lengths[0]), (n, lengths[1])]
        assert all(c[1] is None for c in calls) and vision == [n]
        calls.clear()
        one_per_prompt = separate.encode_all(separate.prepare.all_prompts(imgs))
        assert len(calls) == 2
        calls.clear()
        vision.clear()
        monkeypatch.setattr(adapter, "length_groups", lambda _mask, _blocks: None)
        padded = fused.encode_all([batch])
        assert [c[0] for c in calls] == [(2 * n, mask.shape[1])] and vision == [n]
        assert calls[0][1] is not None
    finally:
        for hook in hooks:
            hook.remove()
    for a, b in zip(grouped, one_per_prompt, strict=True):
        assert torch.equal(a, b)
    assert float((grouped[0] - padded[0]).abs().max()) <= 1e-5
    assert float((grouped[1] - padded[1]).abs().max()) <= 1e-5
    official = torch.from_numpy(_official_vectors())
    assert float((grouped[0] - official).abs().max()) <= 1e-4


def test_fused_prompts_of_one_length_share_a_pass(owl2):
    """Three prompts, the first and last of one length: two language-model passes (the equal
    ones together), one vision pass, the rows back in prompt order."""
    from PIL import Image

    from agiqa.presets import PromptSet

    folder, images = owl2
    paper = load_prompts("paper")
    prompts = PromptSet(names=["a", "b", "c"], texts=[*paper.texts, paper.texts[0]])
    imgs = [Image.open(images / name).convert("RGB") for name in META["images"][:2]]
    fused = SemanticEncoder(str(folder), prompts).load(progress=False)
    separate = SemanticEncoder(str(folder), prompts, fuse_prompts=False)
    separate.attach(fused.model)
    calls, vision, hooks = _language_calls(fused.model)
    try:
        vectors, zero_shot = fused.encode_all(fused.prepare.all_prompts(imgs))
    finally:
        for hook in hooks:
            hook.remove()
    assert [c[0][0] for c in calls] == [4, 2] and vision == [2]
    expected_v, expected_z = separate.encode_all(separate.prepare.all_prompts(imgs))
    assert vectors.shape == expected_v.shape == (2, 3, fused.dim)
    assert float((vectors - expected_v).abs().max()) <= 1e-5
    assert float((zero_shot - expected_z).abs().max()) <= 1e-5
    assert float((vectors[:, 0] - vectors[:, 2]).abs().max()) <= 1e-5
