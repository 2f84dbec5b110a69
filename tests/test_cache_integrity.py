"""The cache never serves vectors that do not belong: identity, integrity and freshness."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agiqa.cache import check_fresh, open_cache, verify_cache
from agiqa.cache.shards import ShardData
from agiqa.errors import CacheError, CacheMismatchError, ModelLoadError, StaleVectorsError
from agiqa.stages.semantics import ExtractConfig, ImageSource, extract_semantics


def _extract(model_dir, root, out, **kw):
    kw.setdefault("loader_workers", 0)
    cfg = ExtractConfig(out=out, model=str(model_dir), progress=False, **kw)
    return extract_semantics(cfg, ImageSource.from_folder(root))


def _images(root: Path, n: int = 4) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    keys = []
    for i in range(n):
        key = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / key)
        keys.append(key)
    return keys


@pytest.fixture
def filled(tiny_llava, tmp_path):
    """A folder of 4 images and a zarr cache of 2 shards of 2."""
    root = tmp_path / "imgs"
    keys = _images(root)
    _extract(tiny_llava, root, tmp_path / "c", shard_size=2)
    return root, keys, tmp_path / "c"


# -- 1. identity ------------------------------------------------------------------------------
def _perturb_weights(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.ones_like(tensors[name])
    save_file(tensors, path)


def test_swapped_weights_are_another_fingerprint(tiny_llava, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    root = tmp_path / "imgs"
    _images(root, 2)
    _extract(model, root, tmp_path / "c")
    _perturb_weights(model)  # same config.json, other weights
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        _extract(model, root, tmp_path / "c")


def test_local_model_is_recorded_by_absolute_path_and_hashed_once(tiny_llava, tmp_path,
                                                                   monkeypatch):
    import agiqa.fileio as fileio

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_llava, model)
    root = tmp_path / "imgs"
    _images(root, 2)
    monkeypatch.chdir(tmp_path / "models")
    _extract("tiny", root, tmp_path / "c")
    spec = open_cache(tmp_path / "c").spec
    assert spec["model"] == str(model.resolve())
    assert spec["revision"].startswith(fileio.LOCAL_REVISION_PREFIX)
    # From another folder the same model is the same cache; its files are not hashed again.
    monkeypatch.chdir(tmp_path)
    hashed = []
    real = fileio._file_sha256
    monkeypatch.setattr(fileio, "_file_sha256", lambda p: hashed.append(p) or real(p))
    report = _extract(model, root, tmp_path / "c")
    assert report.reused == 2 and hashed == []
    # A moved copy keeps the fingerprint: the path is a label, not part of it.
    moved = tmp_path / "elsewhere"
    shutil.copytree(model, moved)
    assert _extract(moved, root, tmp_path / "c").reused == 2


def test_truncated_weights_are_one_error_and_leave_no_cache(tiny_llava, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    root = tmp_path / "imgs"
    _images(root, 1)
    with pytest.raises(ModelLoadError, match="model.safetensors: truncated safetensors file"):
        _extract(model, root, tmp_path / "c")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_failed_model_load_writes_nothing(tiny_llava, tmp_path, monkeypatch):
    from agiqa.models.mllm import SemanticEncoder

    def fail(self, progress=True):
        raise ModelLoadError("cannot load MLLM weights: out of memory")

    monkeypatch.setattr(SemanticEncoder, "load", fail)
    root = tmp_path / "imgs"
    _images(root, 1)
    with pytest.raises(ModelLoadError):
        _extract(tiny_llava, root, tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_require_fingerprint_names_both(filled):
    cache = open_cache(filled[2])
    cache.require_fingerprint(cache.fingerprint, "the model")
    with pytest.raises(CacheMismatchError, match=f"has fingerprint {cache.fingerprint[:16]}.*"
                       f"needs fingerprint {'0' * 16}.*the model of run/"):
        cache.require_fingerprint("0" * 64, "the model of run/")


# -- 2. integrity -----------------------------------------------------------------------------
def _vector_chunk(shard: Path) -> Path:
    return shard / "vectors" / "c" / "0" / "0" / "0"


DAMAGE = {
    "deleted vector chunk": lambda s: _vector_chunk(s).unlink(),
    "truncated vector chunk": lambda s: _vector_chunk(s).write_bytes(
        _vector_chunk(s).read_bytes()[:-64]),
    "flipped vector bytes": lambda s: _vector_chunk(s).write_bytes(
        b"\x01\x02" + _vector_chunk(s).read_bytes()[2:]),
    "lost keys chunk": lambda s: (s / "keys" / "c" / "0").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_shard_is_named_never_read_and_rebuilt(tiny_llava, filled, damage):
    root, keys, out = filled
    before = open_cache(out).read(keys)["vectors"]
    shard = open_cache(out).shard_paths()[0]
    DAMAGE[damage](shard)
    with pytest.raises(CacheError, match=shard.name):
        open_cache(out).read(keys)
    report = verify_cache(open_cache(out))
    assert not report.ok and list(report.damaged) == [str(shard)]
    again = _extract(tiny_llava, root, out, shard_size=2)
    assert again.damaged_shards and again.shards_written == 1 and again.reused == 2
    np.testing.assert_array_equal(open_cache(out).read(keys)["vectors"], before)
    assert verify_cache(open_cache(out)).ok


def test_hdf5_shard_with_damaged_bytes_is_refused(tiny_llava, tmp_path):
    root = tmp_path / "imgs"
    keys = _images(root, 2)
    _extract(tiny_llava, root, tmp_path / "c", format="hdf5")
    cache = open_cache(tmp_path / "c")
    shard = cache.shard_paths()[0]
    data = bytearray(shard.read_bytes())
    vec = cache.read(keys)["vectors"].tobytes()
    at = bytes(data).find(vec[:64])
    assert at > 0
    data[at: at + 8] = bytes(8)
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="vectors fail their checksum"):
        open_cache(tmp_path / "c").read(keys)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_replacement_never_leaves_the_shard_absent(tmp_path, fmt):
    """Two writer processes replace one shard over and over while two readers read it: every
    read sees the whole key set and one writer's vectors, never a mix, never an error."""
    import subprocess
    import sys
    import textwrap

    from agiqa.cache import SemanticCache, semantic_spec

    spec = semantic_spec("m", "r", "float32", ["a", "b"], "x", ["good"])
    cache = SemanticCache.create(tmp_path / "c", spec, ["a", "b"], 8, fmt)
    keys = [f"k{i}" for i in range(6)]
    cache.write_shard("shard-x", ShardData(keys, ["0" * 64] * 6, np.zeros((6, 2, 8), np.float16),
                                           np.zeros((6, 2), np.float32)))
    script = textwrap.dedent("""
        import sys, time
        import numpy as np
        from agiqa.cache import open_cache
        from agiqa.cache.shards import ShardData
        role, value, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
        keys = [f"k{i}" for i in range(6)]
        end, n = time.time() + 2.0, 0
        while time.time() < end:
            cache = open_cache(path)
            if role == "write":
                vec = np.full((6, 2, 8), value, np.float16)
                cache.write_shard("shard-x", ShardData(keys, ["0" * 64] * 6, vec,
                                  np.full((6, 2), value, np.float32)))
            else:
                got = cache.read(keys)
                assert cache.keys == keys, cache.keys
                v = np.unique(got["vectors"])
                assert len(v) == 1 and v[0] in (0.0, 1.0, 2.0), v
                assert np.unique(got["zero_shot"]).tolist() == v.tolist(), got["zero_shot"]
            n += 1
        print(n)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, role, value, str(tmp_path / "c")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role, value in (("write", "1"), ("write", "2"), ("read", "0"), ("read", "0"))]
    results = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert int(out) > 0
    assert len(open_cache(tmp_path / "c").shard_paths()) == 1


def test_versions_left_by_killed_writers_are_pruned(tmp_path):
    import time

    from agiqa.cache import SemanticCache, semantic_spec
    from agiqa.cache.shards import publish_shard, resolve_shard

    spec = semantic_spec("m", "r", "float32", ["a"], "x", ["good"])
    cache = SemanticCache.create(tmp_path / "c", spec, ["a"], 4, "zarr")
    data = ShardData(["k"], ["0" * 64], np.full((1, 1, 4), 1, np.float16),
                     np.full((1, 1), 1, np.float32))
    link = publish_shard(cache.path, "shard-x", data, "zarr")
    assert link.is_symlink() and link.name == "shard-x.zarr"
    current = resolve_shard(link)
    # Killed writers: one left an older version behind, one a newer folder it never linked.
    older, orphan = (current.with_name(f"shard-x.{v}.zarr.data") for v in (5, 10**19))
    shutil.copytree(current, older)
    shutil.copytree(current, orphan)
    hour_ago = time.time() - 3600
    os.utime(orphan, (hour_ago, hour_ago))
    assert open_cache(cache.path).read(["k"])["vectors"].max() == 1
    SemanticCache.create(tmp_path / "c", spec, ["a"], 4, "zarr")
    assert sorted(p.name for p in cache.path.glob("shard-x*")) == [current.name, link.name]


# -- 3. freshness -----------------------------------------------------------------------------
def test_changed_image_is_recomputed_and_refused_by_check_fresh(tiny_llava, filled):
    root, keys, out = filled
    before = open_cache(out).read(keys)["vectors"]
    check_fresh(open_cache(out), keys, root)
    Image.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(root / "img1.png")
    with pytest.raises(StaleVectorsError, match="1 image.*changed.*img1.png"):
        check_fresh(open_cache(out), keys, root)
    report = _extract(tiny_llava, root, out, shard_size=2)
    assert report.changed == ["img1.png"] and report.computed == 1 and report.reused == 3
    after = open_cache(out).read(keys)["vectors"]
    assert not np.array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[[0, 2, 3]], before[[0, 2, 3]])
    check_fresh(open_cache(out), keys, root)


def test_fit_and_evaluate_inputs_refuse_a_changed_image_reading_each_file_once(filled,
                                                                                monkeypatch):
    """Stage two checks the bytes it decodes against the cached sha256 (no second read)."""
    from agiqa.cache import verify
    from agiqa.data.datasets import load_dataset
    from agiqa.stages.predict import inputs_of

    root, keys, out = filled
    labels = root.parent / "labels.csv"
    labels.write_text("image,mos\n" + "".join(f"{k},{i}\n" for i, k in enumerate(keys)))
    ds = load_dataset("csv", root, labels)
    monkeypatch.setattr(verify, "file_sha256", lambda *a: pytest.fail("hashed apart"))
    vectors, pixels = inputs_of(ds, keys, open_cache(out), workers=0, progress=False)
    np.testing.assert_array_equal(vectors.numpy(), open_cache(out).read(keys)["vectors"])
    assert pixels.shape == (4, 3, 224, 224) and pixels.dtype == torch.uint8
    Image.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(root / "img2.png")
    with pytest.raises(StaleVectorsError, match="1 image.*changed.*img2.png"):
        inputs_of(ds, keys, open_cache(out), workers=0, progress=False)


def test_failed_image_is_retried_once_fixed(tiny_llava, tmp_path):
    root = tmp_path / "imgs"
    keys = _images(root, 2)
    (root / "late.png").write_bytes(b"not yet an image")
    first = _extract(tiny_llava, root, tmp_path / "c")
    assert list(first.failures) == ["late.png"]
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "late.png")
    skipped = _extract(tiny_llava, root, tmp_path / "c", retry_failed=False)
    assert list(skipped.failures) == ["late.png"] and skipped.computed == 0
    second = _extract(tiny_llava, root, tmp_path / "c")
    assert second.failures == {} and second.retried == ["late.png"]
    assert open_cache(tmp_path / "c").keys == sorted([*keys, "late.png"])


# -- files ------------------------------------------------------------------------------------
def test_files_honour_the_umask(filled):
    from agiqa.fileio import write_json

    old = os.umask(0o022)
    try:
        write_json(filled[2] / "x.json", {})
        assert (filled[2] / "x.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("text, reason", [("[]", "a JSON object is needed"),
                                          ('{"format_version": 1}', "no format, fingerprint")])
def test_damaged_manifest_is_one_error(filled, text, reason):
    (filled[2] / "manifest.json").write_text(text)
    with pytest.raises(CacheError, match=reason):
        open_cache(filled[2])
