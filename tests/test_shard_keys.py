"""Zarr shard keys are read without zarr where agiqa wrote them, through zarr otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from agiqa.cache.checksums import failures_crc, text_crc
from agiqa.cache.shards import (
    ShardData,
    _zarr_raw_index,
    read_shard_keys,
    write_shard,
)
from agiqa.errors import CacheError

zarr = pytest.importorskip("zarr")

KEYS = ["a.jpg", "sub/béta.png", "c d.webp"]


def _data(keys):
    n = len(keys)
    return ShardData(keys, ["0" * 64] * n, np.ones((n, 2, 4), np.float16),
                     np.zeros((n, 2), np.float32), [("bad.jpg", "not an image")])


@pytest.mark.parametrize("keys", [KEYS, []])
def test_agiqa_zarr_shard_keys_parse_without_zarr(tmp_path, keys):
    path = tmp_path / "shard-x.zarr"
    write_shard(path, _data(keys), "zarr")
    fast = _zarr_raw_index(path)
    assert fast is not None and fast[:2] == (keys, [("bad.jpg", "not an image")])
    assert fast[2]["keys"] == text_crc(keys)
    g = zarr.open_group(str(path), mode="r")
    assert [str(k) for k in g["keys"][:]] == keys
    assert read_shard_keys(path) == fast[:2]


def test_compressed_keys_of_older_shards_go_through_zarr(tmp_path):
    path = tmp_path / "shard-y.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("keys", shape=(3,), dtype=str, chunks=(3,))[:] = np.array(KEYS, dtype=str)
    g.attrs["failures"] = []
    assert _zarr_raw_index(path) is None  # zstd-compressed: not parsed by hand
    with pytest.raises(CacheError, match="no checksum"):
        read_shard_keys(path)  # and, without checksums, refused
    g.attrs["checksums"] = {"keys": text_crc(KEYS), "failures": failures_crc([])}
    assert read_shard_keys(path) == (KEYS, [])  # read through zarr and checked
