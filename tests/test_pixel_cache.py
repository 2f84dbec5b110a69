"""Decoded pixels are kept by the sha256 of the image bytes: a second fit decodes nothing."""

from __future__ import annotations

import shutil

import pytest
import torch

from agiqa.data.pixel_cache import PIXEL_BYTES, PixelCache

FIT = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
       "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q", "--epochs", "1"]


def test_pixels_round_trip_and_damage_is_never_used(tmp_path):
    cache = PixelCache(tmp_path)
    sha = "ab" + "0" * 62
    px = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)
    assert cache.get(sha) is None
    cache.put(sha, px)
    path = tmp_path / "ab" / f"{sha}.u8"
    assert path.stat().st_size == PIXEL_BYTES + 4
    assert torch.equal(cache.get(sha), px)
    data = bytearray(path.read_bytes())
    data[1000] ^= 1  # one flipped bit: the CRC-32 no longer matches
    path.write_bytes(bytes(data))
    assert cache.get(sha) is None
    path.write_bytes(bytes(data[:-10]))  # short
    assert cache.get(sha) is None
    with pytest.raises(ValueError, match="not a sha256"):
        cache.get("../../etc/passwd")


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
