"""Stage one's loader: per-image uint8 pixels normalised on the device, bit for bit; the
loader-process default; bad files and killed loader processes fail alone, by name; no hang."""

import io
import os
import shutil
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agiqa.cache import open_cache
from agiqa.models.mllm import SemanticEncoder
from agiqa.models.mllm.mplug_owl2_processing import MplugOwl2ImageProcessor
from agiqa.presets import load_prompts
from agiqa.stages.extraction.extract import (
    KILLED,
    ExtractConfig,
    ImageSource,
    default_loader_workers,
    extract_semantics,
    ordered_load,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mplug_owl2"


def test_uint8_pixels_normalise_to_the_processors_floats_bit_for_bit():
    proc = MplugOwl2ImageProcessor()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(500, 700), (460, 460), (900, 452)]]
    floats = np.stack([proc.preprocess_one(im) for im in images])
    crops = torch.from_numpy(np.stack([proc.crop_uint8(im) for im in images]))
    assert crops.dtype == torch.uint8 and crops.shape == (3, 448, 448, 3)
    got = proc.normalize_uint8(crops)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert np.array_equal(got.numpy(), floats)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen25"])
def test_hf_pixels_leave_the_loader_as_uint8_and_equal_the_processors(family, request,
                                                                      photo_folder, tmp_path,
                                                                      monkeypatch):
    """LLaVA's CLIP processor and Qwen2.5-VL's patch processor split exactly: resize (and crop,
    or cut into patches) on uint8 in the loader, one rescale-and-normalise after the transfer.
    Their pixels, the text rows, and the vectors the whole run writes equal those of the
    processor run whole on each batch, bit for bit."""
    model = request.getfixturevalue(family)
    root, kinds = photo_folder
    enc = SemanticEncoder(str(model), load_prompts("paper")).load()
    prep = enc.prepare
    assert prep.uint8_pixels
    good = sorted(k for k, v in kinds.items() if v == "ok")[:6]
    images = [Image.open(root / k).convert("RGB") for k in good]
    items = [prep.image_item(im) for im in images]
    arrays = [i[0] if isinstance(i, tuple) else i for i in items]
    assert all(a.dtype == np.uint8 and a.shape[-3] == 3 for a in arrays)
    whole = prep.processor.image_processor(images=images, return_tensors="pt")
    pixels = prep.batch_pixels(items)
    assert pixels["pixel_values"].dtype == torch.uint8
    if family == "tiny_qwen25":  # uint8, one frame of the two: an eighth of the floats' bytes
        assert len({tuple(g) for g in pixels["image_grid_thw"].tolist()}) > 1
        assert pixels["pixel_values"].nbytes * 8 == whole["pixel_values"].nbytes
    assert torch.equal(prep.normalize(pixels["pixel_values"]), whole["pixel_values"])
    split = prep.all_prompts_pixels(pixels)
    ref = prep.all_prompts(images)
    assert len(split) == len(ref) == 1 and split[0]["pixel_values"].dtype == torch.uint8
    assert set(split[0]) == set(ref[0])
    for name, value in ref[0].items():
        if name != "pixel_values":
            same = torch.equal(split[0][name], value) if torch.is_tensor(value) \
                else split[0][name] == value
            assert same, name
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in good:
        shutil.copy(root / k, folder / Path(k).name)
    cfg = ExtractConfig(out=tmp_path / "split", mllm=str(model), batch_size=4,
                        loader_workers=0, progress=False)
    extract_semantics(cfg, ImageSource.from_folder(folder), enc)
    monkeypatch.setattr(type(prep), "uint8_pixels", property(lambda self: False))
    cfg = ExtractConfig(out=tmp_path / "batch", mllm=str(model), batch_size=4,
                        loader_workers=0, progress=False)
    extract_semantics(cfg, ImageSource.from_folder(folder), enc)
    keys = sorted(p.name for p in folder.iterdir())
    a, b = open_cache(tmp_path / "split").read(keys), open_cache(tmp_path / "batch").read(keys)
    np.testing.assert_array_equal(a["vectors"], b["vectors"])
    np.testing.assert_array_equal(a["zero_shot"], b["zero_shot"])


def test_loader_default_follows_the_device(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert default_loader_workers("cuda") == 8 and default_loader_workers("cpu") == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert default_loader_workers("cuda") == 1 and default_loader_workers("cpu") == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert default_loader_workers("cuda") == 0 and default_loader_workers("cpu") == 1


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 10,000 x 10,000 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", 10_000, 10_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.slow
def test_per_image_loading_fails_bad_files_and_killed_loaders_alone(owl2, tmp_path,
                                                                    kill_loader_on, deadline):
    """mPLUG-Owl2 loads per image: a decompression bomb, a truncated file and an image whose
    loader process is killed each fail by name; the rest equal a clean in-process run."""
    folder, images = owl2
    clean = tmp_path / "clean"
    shutil.copytree(images, clean)
    dirty = tmp_path / "dirty"
    shutil.copytree(images, dirty)
    first = sorted(p for p in clean.iterdir())[0]
    shutil.copy(first, dirty / f"kill_me{first.suffix}")
    (dirty / "bomb.png").write_bytes(_bomb_png())
    whole = first.read_bytes()
    (dirty / "truncated.jpg").write_bytes(whole[: len(whole) // 2] if first.suffix == ".jpg"
                                          else b"\xff\xd8\xff\xe0" + b"\0" * 40)
    kill_loader_on("kill_me")
    enc = SemanticEncoder(str(folder), load_prompts("paper")).load()
    assert enc.prepare.uint8_pixels
    ref = extract_semantics(ExtractConfig(out=tmp_path / "a", mllm=str(folder), batch_size=2,
                                          loader_workers=0, progress=False),
                            ImageSource.from_folder(clean), enc)
    got = extract_semantics(ExtractConfig(out=tmp_path / "b", mllm=str(folder), batch_size=2,
                                          loader_workers=2, progress=False),
                            ImageSource.from_folder(dirty), enc)
    assert got.loader_workers == 2 and got.to_dict()["loader_workers"] == 2
    assert set(got.failures) == {"kill_me" + first.suffix, "bomb.png", "truncated.jpg"}
    assert got.failures["kill_me" + first.suffix] == KILLED
    assert "decompression bomb" in got.failures["bomb.png"]
    # each image counted once: the three that failed are failures, not computed
    assert got.computed == ref.computed and got.computed + len(got.failures) == got.requested
    keys = sorted(p.name for p in clean.iterdir())
    a, b = open_cache(tmp_path / "a").read(keys), open_cache(tmp_path / "b").read(keys)
    np.testing.assert_array_equal(a["vectors"], b["vectors"])
    # batches differ in size (failed images leave gaps): float32 to the last bits
    np.testing.assert_allclose(a["zero_shot"], b["zero_shot"], rtol=1e-6)


@pytest.mark.slow
def test_batch_loading_retries_the_batch_of_a_killed_loader(tiny_qwen, photo_folder, tmp_path,
                                                            monkeypatch, kill_loader_on,
                                                            deadline):
    """A processor that runs whole in the loader (per batch; any processor whose pixels are
    not split): the batch of a killed loader process is run again one image at a time; only
    the marked image fails."""
    root, kinds = photo_folder
    good = sorted(k for k, v in kinds.items() if v == "ok")[:5]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in good:
        shutil.copy(root / k, folder / Path(k).name)
    shutil.copy(root / good[0], folder / ("kill_me" + Path(good[0]).suffix))
    kill_loader_on("kill_me")
    cfg = ExtractConfig(out=tmp_path / "c", mllm=str(tiny_qwen), batch_size=3,
                        loader_workers=1, progress=False)
    enc = SemanticEncoder(str(tiny_qwen), load_prompts("paper"))
    assert enc.prepare.uint8_pixels
    monkeypatch.setattr(type(enc.prepare), "uint8_pixels", property(lambda self: False))
    report = extract_semantics(cfg, ImageSource.from_folder(folder), enc)
    assert report.failures == {"kill_me" + Path(good[0]).suffix: KILLED}
    assert report.computed == len(good) and report.requested == len(good) + 1


def test_ordered_load_keeps_order_and_runs_in_process_without_workers():
    items = list(range(20))
    assert list(ordered_load(_square, items, 0, 4, lambda i: [i], None)) == \
        [i * i for i in items]
    assert list(ordered_load(_square, items, 2, 5, lambda i: [i], None)) == \
        [i * i for i in items]


def _square(i):
    return i * i


def _terminated_on_3(i):
    if i == 3:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal's handler has returned: the item goes on as if nothing were
    return i


def test_a_loader_ends_on_sigterm_without_running_its_parents_handler(tmp_path):
    """The pool ends its loaders with SIGTERM when one dies. A loader runs none of its parent's
    SIGTERM handler (Ray's, in a process that started a Ray node, shuts the node and its driver
    down): it ends, and its item fails by name."""
    ran = tmp_path / "parent-handler-ran"
    old = signal.signal(signal.SIGTERM, lambda *_: ran.write_text(str(os.getpid())))
    try:
        got = list(ordered_load(_terminated_on_3, list(range(6)), 2, 4, lambda i: [i],
                                lambda i: f"{i} died"))
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [0, 1, 2, "3 died", 4, 5]
    assert not ran.exists()


def test_compile_option_compiles_each_repeated_block_once(owl2):
    """``compile=True`` wraps every decoder layer and vision block in ``torch.compile`` (lazily:
    nothing compiles until a forward pass), not the modules inside them."""
    folder, _ = owl2
    enc = SemanticEncoder(str(folder), load_prompts("paper"), compile=True).load()
    model = enc.model.model
    blocks = [*model.layers, *model.vision_model.encoder.layers]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    inner = model.layers[0].self_attn.k_proj.multiway
    assert all(m._compiled_call_impl is None for m in inner)
    plain = SemanticEncoder(str(folder), load_prompts("paper")).load().model.model
    assert all(b._compiled_call_impl is None for b in plain.layers)
