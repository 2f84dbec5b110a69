"""A cache reads only regular files of its own, with bounded reads, and each shard is the one
its name says: FIFOs, zip bombs, HDF5 links out of the shard and copied shards are refused."""

import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agiqa.cache import open_cache, verify_cache
from agiqa.cache.shards import ShardData
from agiqa.errors import CacheError


def _cache(path: Path, fmt: str, p: int = 2, d: int = 8):
    from agiqa.cache import SemanticCache, semantic_spec

    names = [chr(ord("a") + i) for i in range(p)]
    spec = semantic_spec("m", "r", "float32", names, "x", ["good"])
    return SemanticCache.create(path, spec, names, d, fmt)


def _shard(keys, value, p=2, d=8):
    n = len(keys)
    return ShardData(list(keys), ["0" * 64] * n, np.full((n, p, d), value, np.float16),
                     np.full((n, p), value, np.float32))


def _within(seconds: float, fn, unblock: Path | None = None):
    """``fn()`` run in a thread; the test fails if it is still running after ``seconds`` (a
    writer is then opened on the FIFO ``unblock`` so that the thread ends)."""
    out: list = []

    def run():
        try:
            out.append(("ok", fn()))
        except Exception as e:  # noqa: BLE001 - handed to the test
            out.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if unblock is not None:
            for _ in range(3):
                try:
                    os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
        pytest.fail(f"blocked for more than {seconds} s")
    return out[0]




@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_fifo_in_place_of_a_shard_is_refused_at_once(agiqa_cli, tmp_path, fmt):
    cache = _cache(tmp_path / "c", fmt)
    cache.write_shard("shard-a", _shard(["a.png"], 1))
    path = cache.shard_path("shard-a")
    path.unlink()
    os.mkfifo(path)
    kind, err = _within(10, lambda: open_cache(cache.path).read(["a.png"]), path)
    assert kind == "error" and isinstance(err, CacheError) and "not a regular file" in str(err)
    kind, report = _within(10, lambda: verify_cache(open_cache(cache.path), tmp_path), path)
    assert kind == "ok" and "not a regular file" in report.damaged[str(path)]
    r = _within(10, lambda: agiqa_cli("cache", "verify", "--images", tmp_path, cache.path,
                                      catch_exceptions=True), path)[1]
    assert r.exit_code == 2 and "not a regular file" in r.output


def _rewrite_zarr_json(shard: Path, compress: int, pad: int) -> None:
    with zipfile.ZipFile(shard) as z:
        items = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(shard, "w") as z:
        for info, data in items:
            if info.filename == "zarr.json":
                data = data + b" " * pad
                info.compress_type = compress
            z.writestr(info, data)


def test_a_compressed_member_of_a_shard_is_never_inflated(tmp_path, monkeypatch):
    """A zip bomb in the group's JSON (here 64 MiB of blanks in a few dozen KiB): every
    member agiqa writes is stored, so a compressed one is refused before a byte is inflated."""
    cache = _cache(tmp_path / "c", "zarr")
    cache.write_shard("shard-a", _shard(["a.png"], 1))
    path = cache.shard_path("shard-a")
    _rewrite_zarr_json(path, zipfile.ZIP_DEFLATED, 64 << 20)
    assert path.stat().st_size < 1 << 20
    inflated: list[int] = []
    real = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read",
                        lambda self, n=-1: inflated.append(n) or real(self, n))
    with pytest.raises(CacheError, match="zarr.json is compressed"):
        open_cache(cache.path).keys  # noqa: B018 - the index reads every shard
    report = verify_cache(open_cache(cache.path), tmp_path)
    assert "compressed" in report.damaged[str(path)] and not report.ok
    assert inflated == []


def test_a_stored_member_is_read_no_further_than_the_file(tmp_path):
    cache = _cache(tmp_path / "c", "zarr")
    cache.write_shard("shard-a", _shard(["a.png"], 1))
    path = cache.shard_path("shard-a")
    # A stored member claiming more bytes than the whole file has (its central record edited).
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while raw[at + 46:at + 46 + int.from_bytes(raw[at + 28:at + 30], "little")] \
            != b"zarr.json":
        at = raw.find(b"PK\x01\x02", at + 4)
        assert at > 0
    big = (len(raw) * 4).to_bytes(4, "little")
    raw[at + 20:at + 28] = big + big  # its compressed and uncompressed sizes
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="zarr.json claims"):
        open_cache(cache.path).keys  # noqa: B018


def _h5_with(path: Path, name: str, make) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        del f[name]
        make(f, name)


@pytest.mark.parametrize("how", ["external link to a FIFO", "external link to a file",
                                 "virtual dataset", "external storage", "soft link"])
def test_hdf5_arrays_that_point_outside_the_shard_are_refused(tmp_path, how):
    import h5py

    cache = _cache(tmp_path / "c", "hdf5")
    cache.write_shard("shard-a", _shard(["a.png", "b.png"], 1))
    path = cache.shard_path("shard-a")
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["vectors"] = np.full((2, 2, 8), 1, np.float16)
    fifo = tmp_path / "pipe.h5"
    if how == "external link to a FIFO":
        os.mkfifo(fifo)
        _h5_with(path, "vectors", lambda f, n: f.__setitem__(n, h5py.ExternalLink(fifo, "/v")))
    elif how == "external link to a file":
        _h5_with(path, "vectors",
                 lambda f, n: f.__setitem__(n, h5py.ExternalLink(outside, "/vectors")))
    elif how == "virtual dataset":
        def virtual(f, n):
            layout = h5py.VirtualLayout(shape=(2, 2, 8), dtype=np.float16)
            layout[:] = h5py.VirtualSource(outside, "vectors", shape=(2, 2, 8))
            f.create_virtual_dataset(n, layout)
        _h5_with(path, "vectors", virtual)
    elif how == "external storage":
        raw = tmp_path / "raw.bin"
        raw.write_bytes(np.full((2, 2, 8), 1, np.float16).tobytes())
        _h5_with(path, "vectors", lambda f, n: f.create_dataset(
            n, shape=(2, 2, 8), dtype=np.float16, external=[(str(raw), 0, 64)]))
    else:
        def soft(f, n):
            f["hidden"] = np.full((2, 2, 8), 1, np.float16)
            f[n] = h5py.SoftLink("/hidden")
        _h5_with(path, "vectors", soft)
    kind, err = _within(10, lambda: open_cache(cache.path).read(["a.png"]), fifo)
    assert kind == "error" and isinstance(err, CacheError), err
    assert str(path) in str(err) and "vectors" in str(err)
    kind, report = _within(10, lambda: verify_cache(open_cache(cache.path), tmp_path), fifo)
    assert kind == "ok" and str(path) in report.damaged


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_shard_copied_over_another_is_refused(agiqa_cli, tmp_path, fmt):
    """A shard replaced by a copy of another: the other's images are then held twice and this
    shard's images lost. The shard records its own name, so the copy is named damaged."""
    cache = _cache(tmp_path / "c", fmt)
    cache.write_shard("shard-a", _shard(["a.png"], 1))
    cache.write_shard("shard-b", _shard(["b.png"], 2))
    shutil.copyfile(cache.shard_path("shard-a"), cache.shard_path("shard-b"))
    report = verify_cache(open_cache(cache.path), tmp_path)
    bad = str(cache.shard_path("shard-b"))
    assert list(report.damaged) == [bad] and "holds shard 'shard-a'" in report.damaged[bad]
    with pytest.raises(CacheError, match="not its own"):
        open_cache(cache.path).read(["b.png"])
    r = agiqa_cli("cache", "verify", "--images", tmp_path, cache.path, catch_exceptions=True)
    assert r.exit_code == 2 and "not its own" in r.output


def test_a_cache_moved_with_its_images_finds_them(agiqa_cli, tmp_path):
    """The image root is recorded absolute and relative to the cache: a project folder moved
    whole (the old one gone) keeps its cache working, and verify hashes the moved images."""
    from agiqa.cache import SemanticCache, semantic_spec
    from agiqa.data.images import file_sha256

    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    (project / "images" / "a.png").write_bytes(b"not really a png")
    spec = semantic_spec("m", "r", "float32", ["a", "b"], "x", ["good"])
    cache = SemanticCache.create(project / "cache", spec, ["a", "b"], 8, "zarr",
                                 root=project / "images")
    data = _shard(["a.png"], 1)
    data.sha256[0] = file_sha256(project / "images" / "a.png")
    cache.write_shard("shard-a", data)
    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    project.rename(moved)
    reopened = open_cache(moved / "cache")
    assert reopened.root == (moved / "images").resolve()
    assert verify_cache(reopened).checked == 1 and verify_cache(reopened).ok
    r = agiqa_cli("cache", "verify", moved / "cache")
    assert r.exit_code == 0 and str((moved / "images").resolve()) in r.output
    # A copy, the original still there: the recorded folder is the root, except for files
    # that lie under the copy's own images only (scoring the copy with the copy's cache).
    moved.rename(project)
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    copied = open_cache(copy / "cache")
    assert copied.root == (project / "images").resolve()
    assert copied.root_for([copy / "images" / "a.png"]) == (copy / "images").resolve()
    assert copied.root_for([project / "images" / "a.png"]) == (project / "images").resolve()
    assert copied.root_for([tmp_path / "elsewhere.png"]) == (project / "images").resolve()


def test_a_fifo_in_place_of_a_table_or_text_file_is_refused_at_once(tmp_path):
    """The CSV tables agiqa writes (predictions.csv) and the text files it reads (plans,
    prompts, JSON) are opened without waiting and read within bounds."""
    from agiqa.errors import DatasetError
    from agiqa.fileio import read_text
    from agiqa.stages.rundir import read_predictions

    fifo = tmp_path / "predictions.csv"
    os.mkfifo(fifo)
    kind, err = _within(10, lambda: read_predictions(fifo), fifo)
    assert kind == "error" and isinstance(err, DatasetError)
    assert str(err) == f"{fifo}: cannot read it as CSV ({fifo} is not a regular file)"
    kind, err = _within(10, lambda: read_text(fifo, 100, "plan file"), fifo)
    assert kind == "error" and isinstance(err, ValueError) and "not a regular file" in str(err)
    big = tmp_path / "big.toml"
    big.write_text("x" * 101)
    with pytest.raises(ValueError, match="more than the 100 a plan file of agiqa may have"):
        read_text(big, 100, "plan file")
    latin = tmp_path / "latin.toml"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_text(latin, 100)
