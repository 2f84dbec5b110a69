"""``agiqa cache import-pt``: the official getFeature.py tensors into a cache that ``fit`` reads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from agiqa.cache import open_cache
from agiqa.cache.imports import official_tensor_name
from agiqa.stages.extraction.official import official_semantics

DIM = 4096  # mPLUG-Owl2's width, as the official tensors have it


class Opaque:
    """Pickled as a class instance: refused by a weights-only load."""

    def __init__(self):
        self.vector = [0.0] * 4




def _save(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


@pytest.fixture(scope="module")
def official(tmp_path_factory, real_photos):
    """Images, a label file and the tensors getFeature.py would write, some of them broken."""
    base = tmp_path_factory.mktemp("official")
    root, tensors = base / "images", base / "tensors"
    (root / "sub").mkdir(parents=True)
    rows, good = ["image,mos"], {}
    generator = torch.Generator().manual_seed(0)
    photos = list(real_photos().values())
    names = [f"img{i}.jpg" for i in range(16)] + ["sub/deep.png", "x.jpg_v2.jpg", "p2.png",
                                                  "p3.png"]
    for i, name in enumerate(names):
        Image.fromarray(photos[i % len(photos)]).convert("RGB").resize((64, 48)).save(root / name)
        rows.append(f"{name},{1 + (i % 5)}")
        # getFeature.py saves `output_tensors[j]`: a [1, 4096] float16 view of the batch output.
        pair = (torch.randn(2, 1, DIM, generator=generator) * (1 + i)).half()
        _save(tensors / official_tensor_name(name, "semantic_content"), pair[0])
        _save(tensors / official_tensor_name(name, "coherence"), pair[1])
        good[name] = pair[:, 0].float().numpy()
    broken = {
        "missing.jpg": "missing ",
        "flat.jpg": "shape [4096], expected [1, 4096]",
        "dict.png": "holds a dict, not a tensor",
        "pickled.jpg": "not loadable without pickle",
        "bitmap.bmp": "the official code names tensors only for .jpg and .png images",
    }
    for i, name in enumerate(broken):
        Image.fromarray(photos[i]).convert("RGB").resize((40, 40)).save(root / name)
        rows.append(f"{name},3")
        stem = name.rsplit(".", 1)[0]
        _save(tensors / f"{stem}_semantic_content.pt", torch.zeros(1, DIM).half())
    _save(tensors / "flat_coherence.pt", torch.zeros(DIM))
    _save(tensors / "dict_coherence.pt", {"x": torch.zeros(1, DIM)})
    _save(tensors / "pickled_coherence.pt", Opaque())
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "labels_good.csv").write_text("\n".join(rows[: len(names) + 1]) + "\n")
    return root, tensors, good, broken


def test_official_tensor_names_follow_getfeature():
    assert official_tensor_name("a/b.jpg", "coherence") == "a/b_coherence.pt"
    assert official_tensor_name("x.jpg_v2.jpg", "semantic_content") == "x_v2_semantic_content.pt"
    assert official_tensor_name("c.png", "coherence") == "c_coherence.pt"
    assert official_tensor_name("d.JPG", "coherence") is None


@pytest.mark.slow
def test_import_names_every_broken_file_and_fit_reads_the_cache(agiqa_cli, official, tmp_path):
    root, tensors, good, broken = official
    cache_dir = tmp_path / "cache"
    r = agiqa_cli("cache", "import-pt", tensors, "--dataset", "csv", "--root", root, "--out",
                  cache_dir,
            "--shard-size", "5")
    assert r.exit_code == 2, r.output
    for name, reason in broken.items():
        line = next(x for x in r.stderr.splitlines() if x.startswith(f"failed: {name}: "))
        assert reason in line, line
    assert "missing.jpg: missing " + str(tensors / "missing_coherence.pt") in r.stderr
    assert f"{len(good) + len(broken)} images: {len(good)} imported" in r.stdout

    cache = open_cache(cache_dir)
    assert cache.fingerprint == official_semantics()["fingerprint"]
    assert cache.spec["model"] == "MAGAer13/mplug-owl2-llama2-7b"
    assert cache.spec["dtype"] == "float16" and cache.spec["recipe"]["pad_square"] is True
    assert cache.prompt_names == ["semantic_content", "coherence"] and cache.dim == DIM
    assert cache.keys == sorted(good) and set(cache.failures) == set(broken)
    data = cache.read(sorted(good))
    for i, key in enumerate(sorted(good)):
        np.testing.assert_array_equal(data["vectors"][i].astype(np.float32), good[key])
    assert np.isnan(data["zero_shot"]).all()

    verify = agiqa_cli("cache", "verify", cache_dir, "--json")
    report = json.loads(verify.stdout)
    assert report["checked"] == len(good) and not report["missing"] and not report["changed"]
    original = (root / "p3.png").read_bytes()
    Image.new("RGB", (8, 8)).save(root.parent / "changed.png")
    (root / "p3.png").write_bytes((root.parent / "changed.png").read_bytes())
    report = json.loads(agiqa_cli("cache", "verify", cache_dir, "--json").stdout)
    assert report["changed"] == ["p3.png"]
    (root / "p3.png").write_bytes(original)  # fit refuses vectors of a changed image

    again = agiqa_cli("cache", "import-pt", tensors, "--dataset", "csv", "--root", root, "--out",
                cache_dir, "--shard-size", "5")
    assert f"0 imported, {len(good) + len(broken)} already in the cache" in again.stdout

    fit = agiqa_cli("fit", "--dataset", "csv", "--root", root, "--labels", root / "labels_good.csv",
              "--cache", cache_dir, "--out", tmp_path / "run", "--backbone", "tiny",
              "--no-pretrained", "--batch-size", "4", "--split", "random:0.4,0.3,0.3",
              "--epochs", "1", "--loader-workers", "0", "-q", "--json")
    assert fit.exit_code == 0, fit.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["fingerprint"] == cache.fingerprint
    assert config["model"]["semantic_dim"] == DIM


def test_import_refuses_a_non_owl2_model_and_another_cache(agiqa_cli, official, tiny_llava,
                                                           tmp_path):
    root, tensors, _, _ = official
    r = agiqa_cli("cache", "import-pt", tensors, "--dataset", "csv", "--root", root, "--out",
            tmp_path / "c", "--mllm", tiny_llava)
    assert r.exit_code == 1 and "is not an mPLUG-Owl2 model (model_type 'llava')" in r.output
    other = tmp_path / "other"
    agiqa_cli("extract-semantics", "--model", tiny_llava, "--images", root / "sub", "--out", other,
        "-q", "--loader-workers", "0")
    r = agiqa_cli("cache", "import-pt", tensors, "--dataset", "csv", "--root", root, "--out", other)
    assert r.exit_code == 1 and "use another --out/--cache folder" in r.output
