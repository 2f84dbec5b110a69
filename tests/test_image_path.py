"""The one image path: every stage decodes a file to the same pixels, and a killed loader
process fails its images by name in evaluation and scoring as in stage one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from agiqa.data import load_dataset, read_pixels, resize_pixels
from agiqa.data.images import prepare_image
from agiqa.data.loader import KILLED, read_images
from agiqa.data.pixel_cache import PixelCache
from agiqa.errors import BadImageError
from agiqa.stages.extraction.extract import _decode as stage_one_decode
from agiqa.stages.predict import decode_pixels
from agiqa.stages.scoring.results import decoded


def _csv_dataset(root, keys, labels):
    """A csv data set of ``keys`` under ``root``, its label file ``labels`` (never written
    into the session's shared photo folder)."""
    labels.write_text("image,mos\n" + "".join(f"{k},3\n" for k in keys))
    return load_dataset("csv", root, labels)


def test_the_same_file_gives_the_same_pixels_from_every_entry_point(photo_folder, tmp_path):
    """Stage one, fit and evaluate, scoring (files and in-memory images) and the pixel cache:
    one image, one set of pixels, for every format and mode of the photo folder (16-bit,
    EXIF-rotated, palette, alpha, CMYK)."""
    root, kinds = photo_folder
    keys = sorted(k for k, v in kinds.items() if v == "ok")
    paths = [root / k for k in keys]
    images = [np.asarray(stage_one_decode(root, k)[0]) for k in keys]  # stage one's decoder
    for k, img in zip(keys, images, strict=True):
        in_memory = np.asarray(prepare_image(Image.open(root / k), k))  # Scorer.score(PIL)
        np.testing.assert_array_equal(in_memory, img, err_msg=k)
    scoring = [d.value for d in read_images([(p, k) for p, k in zip(paths, keys, strict=True)],
                                            1, pixels=False)]  # scoring's MLLM input
    for k, a, b in zip(keys, images, scoring, strict=True):
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=k)

    expected = torch.stack([resize_pixels(img) for img in images])
    ds = _csv_dataset(root, keys, tmp_path / "labels.csv")
    fit_pixels, shas = decode_pixels(ds, keys, workers=0, progress=False)  # fit and evaluate
    assert torch.equal(fit_pixels, expected)
    cache = PixelCache(tmp_path / "pixels")
    filled, _ = decode_pixels(ds, keys, workers=1, progress=False, pixel_cache=cache)
    assert torch.equal(filled, expected)
    assert all(cache.get(sha) is not None for sha in shas)
    from_cache, _ = decode_pixels(ds, keys, workers=0, progress=False, pixel_cache=cache)
    assert torch.equal(from_cache, expected)
    score_pixels = torch.stack([px for batch in decoded(paths, True, 4, 1, cache)
                                for _, px, _, _ in batch])  # score-folder's model input
    assert torch.equal(score_pixels, expected)
    assert all(torch.equal(read_pixels(p), e) for p, e in zip(paths, expected, strict=True))


def test_a_killed_loader_fails_its_image_by_name_in_scoring_and_evaluation(
        photo_folder, tmp_path, kill_loader_on, deadline):
    """A loader process killed by the operating system neither hangs nor ends the run: its
    chunk is read again one file per process, the others succeed, and the file whose process
    dies again fails by name (scoring), or is named in one error (fit and evaluate)."""
    root, kinds = photo_folder
    folder = tmp_path / "images"
    good = sorted(k for k, v in kinds.items() if v == "ok" and "/" not in k)
    folder.mkdir()
    for k in good:
        shutil.copy(root / k, folder / k)
    shutil.copy(root / good[0], folder / "kill_me.png")
    keys = sorted([*good, "kill_me.png"])
    kill_loader_on("kill_me")
    got = [d for batch in decoded([folder / k for k in keys], True, 2, 2) for d in batch]
    assert [i for i, *_ in got] == list(range(len(keys)))
    failed = {keys[i]: why for i, _, _, why in got if why is not None}
    assert failed == {"kill_me.png": KILLED}
    assert all(px is not None and px.shape == (3, 224, 224) for i, px, _, why in got
               if why is None)
    ds = _csv_dataset(folder, keys, tmp_path / "labels.csv")
    with pytest.raises(BadImageError, match="kill_me.png: its loader process was killed"):
        decode_pixels(ds, keys, workers=2, progress=False)


def test_fit_and_evaluate_name_every_image_that_cannot_be_read(photo_folder, tmp_path):
    root, kinds = photo_folder
    keys = sorted(k for k in kinds if kinds[k] != "skipped")
    ds = _csv_dataset(root, keys, tmp_path / "labels.csv")
    with pytest.raises(BadImageError) as e:
        decode_pixels(ds, keys, workers=0, progress=False)
    assert str(e.value).startswith("text_as.jpg: not an image")
    assert "2 other image(s) that cannot be read: truncated.jpg, zero_bytes.png" in str(e.value)


@pytest.mark.parametrize("make", ["I;16", "I", "exif", "palette", "rgba", "F"])
def test_in_memory_images_follow_the_rules_of_files(make, tmp_path):
    """``prepare_image`` gives an in-memory image the pixels of the same image saved and read
    back as a file: 16-bit and 32-bit integer samples shifted as OpenCV does, EXIF rotation
    applied, palette and alpha dropped alike; floating-point samples refused alike."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    name = "x.png"
    if make == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (24, 40), dtype=np.uint16))
        assert img.mode == "I;16"
    elif make == "I":
        img, name = Image.fromarray(rng.integers(0, 65536, (24, 40)).astype(np.int32)), "x.tif"
        assert img.mode == "I"
    elif make == "exif":
        img, name = rgb, "x.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.save(tmp_path / name, quality=95, exif=exif.tobytes())
    elif make == "palette":
        img = rgb.convert("P", palette=Image.ADAPTIVE)
        img.info["transparency"] = 3
    elif make == "rgba":
        img = rgb.convert("RGBA")
        img.putalpha(90)
    else:
        img, name = Image.fromarray(rng.random((24, 40), dtype=np.float32)), "x.tiff"
    if make != "exif":
        img.save(tmp_path / name)
    if make == "F":
        with pytest.raises(BadImageError, match="floating-point"):
            prepare_image(img, "in memory")
        with pytest.raises(BadImageError, match="floating-point"):
            read_pixels(tmp_path / name)
        return
    in_memory = Image.open(tmp_path / name) if make == "exif" else img
    got = np.asarray(prepare_image(in_memory, "in memory"))
    from_file = np.asarray(stage_one_decode(tmp_path, name)[0])
    np.testing.assert_array_equal(got, from_file)
    if make == "exif":
        assert got.shape == (40, 24, 3)  # rotated on display, as the file is read
    elif make in ("I;16", "I"):
        assert not np.array_equal(got, np.asarray(img.convert("RGB")))  # not PIL's clipping
