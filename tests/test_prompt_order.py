"""The prompt comes before the image for every family, under the real llava-hf chat template too;
extraction recipes and ``--pad-square``."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from agiqa.cache import fingerprint_of, open_cache, semantic_spec
from agiqa.cli import cli
from agiqa.data.images import load_image
from agiqa.errors import CacheMismatchError, ConfigError, ModelLoadError
from agiqa.models.mllm import SemanticEncoder
from agiqa.models.mllm.recipe import check_prompt_order, expand2square, pad_colour
from agiqa.presets import Recipe, load_prompts, load_recipe, recipe_for_model
from agiqa.stages.extraction.extract import ExtractConfig, ImageSource, extract_semantics

# LLaVA models built and run on a CPU.
pytestmark = pytest.mark.slow

PROMPTS = load_prompts("paper")

# chat_template.json of llava-hf/llava-1.5-7b-hf (the revision with the `generation` tag), as the
# hub serves it: every image of a turn is rendered before its text.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() "
    "+ ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text "
    "next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llava_hf(tiny_llava, tmp_path_factory):
    """The tiny LLaVA carrying llava-hf's real chat template."""
    folder = tmp_path_factory.mktemp("llava-hf") / "model"
    shutil.copytree(tiny_llava, folder)
    (folder / "chat_template.jinja").write_text(LLAVA_HF_TEMPLATE, encoding="utf-8")
    return folder


def _photos(root):
    root.mkdir()
    import skimage.data as d

    Image.fromarray(d.chelsea()).resize((120, 80)).save(root / "cat.png")
    Image.fromarray(d.rocket()).resize((64, 96)).save(root / "rocket.png")
    return ["cat.png", "rocket.png"]


def _direct_vectors(folder, root, keys, text, pad=False):
    """Mean last hidden state of ``text`` (one image, no padding) straight from transformers."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    out = []
    for key in keys:
        image, _ = load_image(root / key)
        if pad:
            image = expand2square(image, pad_colour(processor.image_processor))
        with torch.no_grad():
            enc = processor(text=[text], images=[image], return_tensors="pt")
            out.append(model(**enc, output_hidden_states=True).hidden_states[-1][0].mean(0))
    return torch.stack(out).numpy()


def test_llava_hf_template_gets_the_prompt_before_the_image(llava_hf, tmp_path):
    processor = AutoProcessor.from_pretrained(llava_hf)
    prompt = PROMPTS.texts[0]
    messages = [{"role": "user", "content": [{"type": "text", "text": prompt},
                                              {"type": "image"}]}]
    as_shipped = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert as_shipped == f"USER: <image>\n{prompt} ASSISTANT:"  # the template moves images first
    with pytest.raises(ModelLoadError, match="puts the image .* before the prompt"):
        check_prompt_order(processor, as_shipped, prompt, "llava-hf")

    enc = SemanticEncoder(str(llava_hf), PROMPTS)
    assert [e.text for e in enc.encodings] == [f"USER: {p}\n<image> ASSISTANT:"
                                              for p in PROMPTS.texts]

    root = tmp_path / "photos"
    keys = _photos(root)
    extract_semantics(ExtractConfig(out=tmp_path / "c", mllm=str(llava_hf), progress=False,
                                    loader_workers=0), ImageSource.from_folder(root))
    got = open_cache(tmp_path / "c").read(keys)["vectors"][:, 0].astype(np.float32)
    prompt_first = _direct_vectors(llava_hf, root, keys, f"USER: {prompt}\n<image> ASSISTANT:")
    image_first = _direct_vectors(llava_hf, root, keys, as_shipped)
    np.testing.assert_allclose(got, prompt_first, rtol=2e-3, atol=2e-3)
    assert np.abs(got - image_first).max() > 0.05


def test_every_family_keeps_the_prompt_first(tiny_mllm):
    enc = SemanticEncoder(str(tiny_mllm), PROMPTS)
    marker = enc.processor.image_token
    for e, prompt in zip(enc.encodings, PROMPTS.texts, strict=True):
        assert e.text.index(prompt) < e.text.index(marker)
    assert enc.recipe.name == "chat-template" and enc.pad_square is False


def test_a_template_that_hides_the_prompt_is_refused(tiny_llava, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llava, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}USER: <image>\n{{ m['content'][0]['text'] | upper }}{% endfor %}"
        " ASSISTANT:", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="does not render the prompt verbatim"):
        SemanticEncoder(str(folder), PROMPTS)


def test_expand2square_is_getfeature_padding():
    image = Image.new("RGB", (5, 2), (255, 0, 0))
    square = expand2square(image, (1, 2, 3))
    assert square.size == (5, 5)
    pixels = np.asarray(square)
    assert (pixels[1:3] == [255, 0, 0]).all()  # pasted at (0, (5 - 2) // 2)
    assert (pixels[0] == [1, 2, 3]).all() and (pixels[3:] == [1, 2, 3]).all()
    tall = expand2square(Image.new("RGB", (2, 5), (0, 255, 0)), (9, 9, 9))
    assert (np.asarray(tall)[:, 1:3] == [0, 255, 0]).all()
    assert expand2square(image.resize((3, 3)), (0, 0, 0)).size == (3, 3)

    class Processor:
        image_mean = [0.48145466, 0.4578275, 0.40821073]

    assert pad_colour(Processor()) == (122, 116, 104)


def test_pad_square_option_changes_vectors_and_fingerprint(llava_hf, tmp_path):
    root = tmp_path / "photos"
    keys = _photos(root)
    r = CliRunner().invoke(cli, ["extract-semantics", "--model", str(llava_hf), "--images",
                                 str(root), "--out", str(tmp_path / "pad"), "--pad-square", "-q",
                                 "--loader-workers", "0"])
    assert r.exit_code == 0, r.output
    cache = open_cache(tmp_path / "pad")
    assert cache.spec["recipe"] == {"turn": "chat_template, prompt first", "pad_square": True,
                                    "pooling": "mean"}
    got = cache.read(keys)["vectors"][:, 1].astype(np.float32)
    text = f"USER: {PROMPTS.texts[1]}\n<image> ASSISTANT:"
    np.testing.assert_allclose(got, _direct_vectors(llava_hf, root, keys, text, pad=True),
                               rtol=2e-3, atol=2e-3)
    assert np.abs(got - _direct_vectors(llava_hf, root, keys, text)).max() > 0.05
    with pytest.raises(CacheMismatchError, match="recipe"):
        extract_semantics(ExtractConfig(out=tmp_path / "pad", mllm=str(llava_hf),
                                        pad_square=False, progress=False, loader_workers=0),
                          ImageSource.from_folder(root))


def test_recipes_are_data():
    official = load_recipe("mplug-owl2-official")
    assert official.turn == "USER: {prompt}\n<|image|> ASSISTANT:"
    assert official.pad_square and official.gpu_dtype == "float16"
    assert recipe_for_model("mplug_owl2").name == "mplug-owl2-official"
    assert recipe_for_model(None, "one-align").name == "mplug-owl2-official"
    assert recipe_for_model("llava").name == "chat-template"
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        Recipe(name="x", pooling="max")
    with pytest.raises(ConfigError, match="has no {prompt}"):
        Recipe(name="x", turn="USER: <image>")
    with pytest.raises(ConfigError, match="unknown recipe preset 'nope'"):
        load_recipe("nope")
    old = semantic_spec("m", None, "float32", ["p"], "a", ["w"])
    assert old["recipe"] is None
    new = semantic_spec("m", None, "float32", ["p"], "a", ["w"], recipe=official.spec())
    assert fingerprint_of(new) != fingerprint_of(old)
    assert json.loads(json.dumps(new))["recipe"]["pad_square"] is True
