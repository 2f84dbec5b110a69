import io

import numpy as np
import pytest
from PIL import Image

from agiqa.data.images import decode_image, list_images, load_image, resolve_key
from agiqa.errors import BadImageError, DatasetError


def test_folder_listing_separates_non_images(photo_folder):
    root, kinds = photo_folder
    images, others = list_images(root)
    assert others == ["notes.txt"]
    assert set(images) == {k for k, v in kinds.items() if v != "skipped"}
    assert all("\\" not in k and not k.startswith("/") for k in images)


@pytest.mark.parametrize("key", [
    "nested/camera_gray.png", "nested/chelsea_palette.gif", "nested/coffee_rgba.png",
    "nested/deeper/rocket_cmyk.jpg", "nested/deeper/camera_16bit.png", "coffee.webp",
])
def test_modes_become_rgb(photo_folder, key):
    root, _ = photo_folder
    img, sha = load_image(root / key)
    assert img.mode == "RGB"
    assert len(sha) == 64
    arr = np.asarray(img)
    assert arr.std() > 5  # real content survived the conversion


def test_sixteen_bit_is_scaled_not_clipped(photo_folder):
    root, _ = photo_folder
    gray16, _ = load_image(root / "nested/deeper/camera_16bit.png")
    gray8, _ = load_image(root / "nested/camera_gray.png")
    diff = np.abs(np.asarray(gray16, int) - np.asarray(gray8, int))
    assert diff.max() <= 1


def test_exif_orientation_is_applied(photo_folder):
    root, _ = photo_folder
    img, _ = load_image(root / "nested/deeper/chelsea_exif.jpg")
    assert img.size == (80, 120)  # stored 120×80, displayed rotated


@pytest.mark.parametrize("key,reason", [
    ("zero_bytes.png", "empty file (0 bytes)"),
    ("truncated.jpg", "truncated"),
    ("text_as.jpg", "not an image"),
])
def test_broken_files_name_the_file_and_reason(photo_folder, key, reason):
    root, _ = photo_folder
    with pytest.raises(BadImageError) as err:
        load_image(root / key, key)
    assert str(err.value).startswith(f"{key}: ")
    assert reason in err.value.reason


def test_missing_file():
    with pytest.raises(BadImageError, match="file not found"):
        load_image("/nonexistent/x.png", "x.png")


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, "PNG")
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(buf.getvalue(), "bomb.png")


@pytest.mark.parametrize("key", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd"])
def test_keys_escaping_the_root_are_refused(tmp_path, key):
    with pytest.raises(DatasetError, match="escapes the image root|absolute"):
        resolve_key(tmp_path, key)
