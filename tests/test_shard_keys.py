"""Zarr shards are standard Zarr v3 zip files that agiqa reads without importing zarr."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from agiqa.cache.checksums import text_crc
from agiqa.cache.shards import ShardData, read_shard, read_shard_index, write_shard
from agiqa.errors import CacheError

zarr = pytest.importorskip("zarr")

KEYS = ["a.jpg", "sub/béta.png", "c d.webp"]


def _data(keys):
    n = len(keys)
    rng = np.random.default_rng(n)
    return ShardData(keys, [f"{i:064x}" for i in range(n)],
                     rng.standard_normal((n, 2, 4)).astype(np.float16),
                     rng.standard_normal((n, 2)).astype(np.float32),
                     [("bad.jpg", "not an image")])


@pytest.mark.parametrize("keys", [KEYS, []])
def test_a_shard_is_one_zarr_v3_zip_that_zarr_and_agiqa_read_alike(tmp_path, keys):
    from zarr.storage import ZipStore

    path = write_shard(tmp_path / "shard-x.zarr.zip", _data(keys), "zarr")
    assert path.is_file() and zipfile.is_zipfile(path)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-x.zarr.zip"]  # no temporaries
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert len(names) == len(set(names))  # every member written once
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    ours = read_shard(path)
    store = ZipStore(path, mode="r")
    g = zarr.open_group(store, mode="r")
    assert [str(k) for k in g["keys"][:]] == ours.keys == keys
    assert [str(k) for k in g["sha256"][:]] == ours.sha256
    np.testing.assert_array_equal(g["vectors"][:], ours.vectors)
    np.testing.assert_array_equal(g["zero_shot"][:], ours.zero_shot)
    assert g.attrs["failures"] == [["bad.jpg", "not an image"]] and ours.failures == \
        [("bad.jpg", "not an image")]
    store.close()
    index = read_shard_index(path)
    assert index[:2] == (keys, [("bad.jpg", "not an image")])
    assert index[2]["keys"] == text_crc(keys)


def test_reading_a_cache_does_not_import_zarr(tmp_path):
    from agiqa.cache import SemanticCache, semantic_spec

    spec = semantic_spec("m", None, "float32", ["p", "q"], "", ["good"])
    cache = SemanticCache.create(tmp_path / "c", spec, ["p", "q"], 4, "zarr")
    cache.write_shard("shard-x", _data(KEYS))
    script = textwrap.dedent("""
        import json, sys
        from agiqa.cache import open_cache
        cache = open_cache(sys.argv[1])
        got = cache.read(cache.keys)
        info = cache.info()
        print(json.dumps({"zarr": "zarr" in sys.modules, "torch": "torch" in sys.modules,
                          "keys": cache.keys, "sha": got["sha256"],
                          "zs": got["zero_shot"].tolist(), "images": info["images"]}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out)
    assert got["zarr"] is False and got["torch"] is False
    assert got["keys"] == sorted(KEYS) and got["images"] == 3
    order = [KEYS.index(k) for k in sorted(KEYS)]
    assert got["sha"] == [f"{i:064x}" for i in order]
    np.testing.assert_array_equal(np.array(got["zs"], np.float32), _data(KEYS).zero_shot[order])


def test_a_layout_agiqa_does_not_write_is_refused(tmp_path):
    """A zstd-compressed (zarr's default) array is refused, never decoded by hand."""
    from zarr.storage import ZipStore

    path = tmp_path / "shard-y.zarr.zip"
    store = ZipStore(path, mode="w")
    g = zarr.create_group(store, attributes={"failures": [], "checksums": {}})
    g.create_array("keys", shape=(3,), dtype=str, chunks=(3,))[:] = np.array(KEYS, dtype=str)
    store.close()
    with pytest.raises(CacheError, match="keys is not laid out as agiqa writes it"):
        read_shard_index(path)


def test_a_shard_that_is_not_a_zip_is_one_error(tmp_path):
    path = tmp_path / "shard-z.zarr.zip"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CacheError, match="shard-z.zarr.zip: unreadable shard"):
        read_shard(path)
    with pytest.raises(CacheError, match="no such shard"):
        read_shard(tmp_path / "shard-absent.zarr.zip")
