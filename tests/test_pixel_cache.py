"""Decoded pixels are kept by the sha256 of the image bytes: a second fit decodes nothing."""

from __future__ import annotations

import shutil

import pytest
import torch

from agiqa.data.pixel_cache import ENTRY_BYTES, PixelCache

FIT = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
       "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q", "--epochs", "1"]


def test_pixels_round_trip_and_damage_is_never_used(tmp_path):
    cache = PixelCache(tmp_path)
    sha = "ab" + "0" * 62
    px = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)
    assert cache.get(sha) is None
    cache.put(sha, px)
    path = tmp_path / "ab" / f"{sha}.u8"
    assert path.stat().st_size == ENTRY_BYTES
    assert torch.equal(cache.get(sha), px)
    data = bytearray(path.read_bytes())
    data[1000] ^= 1  # one flipped bit: the CRC-32 no longer matches
    path.write_bytes(bytes(data))
    assert cache.get(sha) is None
    path.write_bytes(bytes(data[:-10]))  # short
    assert cache.get(sha) is None
    with pytest.raises(ValueError, match="not a sha256"):
        cache.get("../../etc/passwd")


def test_an_entry_copied_over_another_images_name_is_not_used(tmp_path):
    """The entry holds its image's hash: a copy under another image's name is refused, and
    the other image is decoded again."""
    cache = PixelCache(tmp_path)
    a, b = "ab" + "1" * 62, "cd" + "2" * 62
    cache.put(a, torch.zeros((3, 224, 224), dtype=torch.uint8))
    cache.put(b, torch.full((3, 224, 224), 255, dtype=torch.uint8))
    (tmp_path / "cd" / f"{b}.u8").write_bytes((tmp_path / "ab" / f"{a}.u8").read_bytes())
    assert cache.get(b) is None
    assert cache.get(a) is not None and not cache.get(a).any()


def test_a_fifo_at_an_entry_is_never_waited_on(tmp_path):
    import os
    import threading

    cache = PixelCache(tmp_path)
    sha = "ef" + "3" * 62
    (tmp_path / "ef").mkdir()
    os.mkfifo(tmp_path / "ef" / f"{sha}.u8")
    got: list = []
    reader = threading.Thread(target=lambda: got.append(cache.get(sha)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader, then fail
        os.close(os.open(tmp_path / "ef" / f"{sha}.u8", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("PixelCache.get blocked on a FIFO")
    assert got == [None]
    cache.put(sha, torch.ones((3, 224, 224), dtype=torch.uint8))  # replaces the FIFO
    assert cache.get(sha) is not None


@pytest.mark.slow
def test_a_second_fit_decodes_none_of_the_images(graded, tmp_path, agiqa_cli, decoded_names):
    root, cache = graded
    images = tmp_path / "images"
    shutil.copytree(root, images)
    decoded = decoded_names

    def fit(out, *extra):
        r = agiqa_cli("fit", *FIT, "--root", images, "--cache", cache, "--out", tmp_path / out,
                      *extra)
        assert r.exit_code == 0, r.output

    n = sum(1 for _ in images.glob("*.jpg"))
    fit("first")
    assert len(decoded) == n
    decoded.clear()
    fit("second", "--seed", "21")
    assert decoded == []  # every image read and hashed, none decoded
    fit("third", "--no-pixel-cache")
    assert len(decoded) == n
