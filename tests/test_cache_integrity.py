"""The cache never serves vectors that do not belong: identity, integrity and freshness."""

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agiqa.cache import check_fresh, open_cache, verify_cache
from agiqa.cache.shards import ShardData
from agiqa.errors import CacheError, CacheMismatchError, ModelLoadError, StaleVectorsError
from agiqa.stages.extraction.extract import ExtractConfig, ImageSource, extract_semantics


def _extract(model_dir, root, out, **kw):
    kw.setdefault("loader_workers", 0)
    cfg = ExtractConfig(out=out, mllm=str(model_dir), progress=False, **kw)
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


@pytest.fixture(scope="module")
def _filled_once(tiny_llava, tmp_path_factory):
    folder = tmp_path_factory.mktemp("filled")
    keys = _images(folder / "imgs")
    _extract(tiny_llava, folder / "imgs", folder / "c", shard_size=2)
    return folder, keys


@pytest.fixture
def filled(_filled_once, tmp_path):
    """A folder of 4 images and a zarr cache of 2 shards of 2 (a copy of one extraction, its
    manifest naming the copy's image folder)."""
    folder, keys = _filled_once
    root, cache = tmp_path / "imgs", tmp_path / "c"
    shutil.copytree(folder / "imgs", root)
    shutil.copytree(folder / "c", cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["root"] == str((folder / "imgs").resolve())
    manifest["root"] = str(root.resolve())
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return root, list(keys), cache


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
def _rewrite_member(shard: Path, member: str, edit) -> None:
    """Rewrite the zip ``shard`` with ``member`` edited (``edit`` returns None to drop it)."""
    with zipfile.ZipFile(shard) as z:
        items = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(shard, "w") as z:
        for info, data in items:
            if info.filename == member:
                data = edit(data)
            if data is not None:
                z.writestr(info, data)


def _flip_vector_bytes(shard: Path, vectors: bytes) -> None:
    data = bytearray(shard.read_bytes())
    at = bytes(data).find(vectors[:64])
    assert at > 0
    data[at : at + 8] = bytes(8) if data[at : at + 8] != bytes(8) else b"\1" * 8
    shard.write_bytes(bytes(data))


DAMAGE = {
    "deleted vector chunk": lambda s, v: _rewrite_member(s, "vectors/c/0/0/0", lambda d: None),
    "vector chunk cut short": lambda s, v: _rewrite_member(s, "vectors/c/0/0/0",
                                                           lambda d: d[:-64]),
    "truncated shard file": lambda s, v: s.write_bytes(s.read_bytes()[:-64]),
    "flipped vector bytes": _flip_vector_bytes,
    "lost keys chunk": lambda s, v: _rewrite_member(s, "keys/c/0", lambda d: None),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_shard_is_named_never_read_and_rebuilt(tiny_llava, filled, damage):
    root, keys, out = filled
    before = open_cache(out).read(keys)["vectors"]
    cache = open_cache(out)
    shard, name = cache.shard_paths()[0], cache.shard_names()[0]
    assert shard.is_file() and shard.name.endswith(".zarr.zip")
    DAMAGE[damage](shard, cache.read_shard(name).vectors.tobytes())
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
    _flip_vector_bytes(shard, cache.read(keys)["vectors"].tobytes())
    with pytest.raises(CacheError, match="vectors fail their checksum"):
        open_cache(tmp_path / "c").read(keys)


def _small_cache(path: Path, fmt: str, p: int = 2, d: int = 8):
    from agiqa.cache import SemanticCache, semantic_spec

    names = [chr(ord("a") + i) for i in range(p)]
    spec = semantic_spec("m", "r", "float32", names, "x", ["good"])
    return SemanticCache.create(path, spec, names, d, fmt)


def _shard(keys, value, p=2, d=8):
    n = len(keys)
    return ShardData(list(keys), ["0" * 64] * n, np.full((n, p, d), value, np.float16),
                     np.full((n, p), value, np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_replacement_never_leaves_the_shard_absent(tmp_path, fmt):
    """Two writer processes replace one shard over and over while two readers read it: every
    read sees the whole key set and one writer's vectors, never a mix, never an error."""
    import subprocess
    import sys
    import textwrap

    cache = _small_cache(tmp_path / "c", fmt)
    keys = [f"k{i}" for i in range(6)]
    cache.write_shard("shard-x", _shard(keys, 0))
    script = textwrap.dedent("""
        import sys, time
        import numpy as np
        from agiqa.cache import open_cache
        from agiqa.cache.shards import ShardData
        role, value, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
        keys = [f"k{i}" for i in range(6)]
        end, n = time.time() + 1.5, 0
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
    assert [p.name for p in open_cache(tmp_path / "c").shard_paths()] == \
        [f"shard-x{'.zarr.zip' if fmt == 'zarr' else '.h5'}"]


def test_a_writer_killed_mid_write_leaves_the_old_shard(tmp_path):
    """SIGKILL while a large shard is being written: the old shard is still there, whole; the
    temporary file is removed by the next writer."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    cache = _small_cache(tmp_path / "c", "zarr", d=4096)
    keys = [f"k{i}" for i in range(256)]
    cache.write_shard("shard-x", _shard(keys, 1, d=4096))
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from agiqa.cache import open_cache
        from agiqa.cache.shards import ShardData
        cache, keys = open_cache(sys.argv[1]), [f"k{i}" for i in range(256)]
        print("go", flush=True)
        while True:
            cache.write_shard("shard-x", ShardData(keys, ["0" * 64] * 256,
                              np.full((256, 2, 4096), 2, np.float16),
                              np.full((256, 2), 2, np.float32)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "c")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    deadline = time.time() + 30
    while not list((tmp_path / "c").glob(".shard-x*.tmp")) and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got = open_cache(tmp_path / "c").read(keys)["vectors"]
    assert np.unique(got).tolist() in ([1.0], [2.0])  # one whole version
    _small_cache(tmp_path / "c", "zarr", d=4096)  # the next writer
    assert not list((tmp_path / "c").glob(".*.tmp"))


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
    from agiqa.data import images
    from agiqa.data.datasets import load_dataset
    from agiqa.stages.predict import inputs_of

    root, keys, out = filled
    labels = root.parent / "labels.csv"
    labels.write_text("image,mos\n" + "".join(f"{k},{i}\n" for i, k in enumerate(keys)))
    ds = load_dataset("csv", root, labels)
    monkeypatch.setattr(images, "file_sha256", lambda *a: pytest.fail("hashed apart"))
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
                                          ('{"format_version": 2}', "no format, fingerprint")])
def test_damaged_manifest_is_one_error(filled, text, reason):
    (filled[2] / "manifest.json").write_text(text)
    with pytest.raises(CacheError, match=reason):
        open_cache(filled[2])


# -- 4. caches that lie -----------------------------------------------------------------------


def _one_error_line(result, *needles):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_cache_of_the_folder_layout_is_refused_in_one_line(agiqa_cli, tmp_path):
    """A cache written by agiqa before single-file shards (shard folders behind version links;
    the fixture was written by that code) is refused, saying to re-extract."""
    from agiqa.cache import SemanticCache

    old = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "cache_v1", old, symlinks=True)
    assert (old / "shard-0123456789abcdef.zarr").is_symlink()
    with pytest.raises(CacheError, match="earlier agiqa.*re-extract"):
        open_cache(old)
    manifest = json.loads((old / "manifest.json").read_text())
    with pytest.raises(CacheError, match="re-extract"):
        SemanticCache.create(old, manifest["semantics"], manifest["prompt_names"], 4, "zarr")
    for command in (("cache", "info"), ("cache", "verify")):
        _one_error_line(agiqa_cli(*command, old, catch_exceptions=True), "re-extract", str(old))


def _edit_manifest(cache_dir: Path, **fields) -> None:
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


def _two_prompt_cache(tmp_path, fmt="zarr"):
    cache = _small_cache(tmp_path / "c", fmt)
    cache.write_shard("shard-x", _shard(["a.png", "b.png"], 1))
    return cache


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a"], ["a", "a"]])
def test_prompt_names_out_of_step_with_the_vectors_are_refused(agiqa_cli, tmp_path, names):
    cache = _two_prompt_cache(tmp_path)
    _edit_manifest(cache.path, prompt_names=names)
    with pytest.raises(CacheError, match="damaged manifest.*prompt"):
        open_cache(cache.path)  # so fit, evaluate and score-folder never read it
    _one_error_line(agiqa_cli("cache", "info", cache.path, catch_exceptions=True), "manifest.json",
                    "prompt")
    _one_error_line(agiqa_cli("cache", "info", "--json", cache.path, catch_exceptions=True),
                    "prompt")


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_consistently_edited_manifest_is_checked_against_the_shard_shapes(agiqa_cli, tmp_path,
                                                                            fmt):
    from agiqa.cache import fingerprint_of

    cache = _two_prompt_cache(tmp_path, fmt)
    spec = {**cache.spec, "prompts": ["a", "b", "c"]}
    _edit_manifest(cache.path, prompt_names=["a", "b", "c"], semantics=spec,
                   fingerprint=fingerprint_of(spec))
    edited = open_cache(cache.path)
    with pytest.raises(CacheError, match=r"shard-x.*shape \[2, 2, 8\].*3 prompt\(s\) of width 8"):
        edited.read(["a.png", "b.png"])
    with pytest.raises(CacheError, match="shape"):
        edited.read(["a.png"], ("zero_shot",))
    _one_error_line(agiqa_cli("cache", "info", cache.path, catch_exceptions=True), "shard-x",
                    "shape")
    assert agiqa_cli("cache", "verify", "--images", tmp_path, cache.path,
                     catch_exceptions=True).exit_code == 2


@pytest.mark.parametrize("dim", [-1, 0, 10**12, "8", True, 8.5])
def test_manifest_dim_out_of_range_is_one_line(agiqa_cli, tmp_path, dim):
    cache = _two_prompt_cache(tmp_path)
    _edit_manifest(cache.path, dim=dim)
    with pytest.raises(CacheError, match="damaged manifest.*dim"):
        open_cache(cache.path)
    _one_error_line(agiqa_cli("cache", "info", cache.path, catch_exceptions=True), "dim")


def test_manifest_json_bombs_are_one_line(agiqa_cli, tmp_path):
    cache = _two_prompt_cache(tmp_path)
    manifest = cache.path / "manifest.json"
    manifest.write_text("[" * 200_000 + "]" * 200_000)  # depth
    with pytest.raises(CacheError, match="damaged manifest.*nested"):
        open_cache(cache.path)
    _one_error_line(agiqa_cli("cache", "info", cache.path, catch_exceptions=True), "nested")
    inner = '{"x": ' + "[" * 40 + "1" + "]" * 40 + "}"
    manifest.write_text(inner)  # parses, but nests deeper than any manifest
    with pytest.raises(CacheError, match="nested"):
        open_cache(cache.path)
    with open(manifest, "wb") as f:  # size: a sparse file, refused before reading
        f.truncate((64 << 20) + 1)
    with pytest.raises(CacheError, match="damaged manifest.*bytes"):
        open_cache(cache.path)
    manifest.unlink()
    os.mkfifo(manifest)  # never opened for a blocking read
    with pytest.raises(CacheError, match="not a regular file"):
        open_cache(cache.path)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_shard_of_all_zero_vectors_reads_fine(tmp_path, fmt):
    cache = _small_cache(tmp_path / "c", fmt)
    cache.write_shard("shard-0", _shard(["a.png", "b.png"], 0))
    got = open_cache(cache.path).read(["a.png", "b.png"])
    assert got["vectors"].shape == (2, 2, 8) and not got["vectors"].any()
    assert not got["zero_shot"].any()
    assert open_cache(cache.path).check_shard("shard-0") is None


def test_verify_refuses_keys_outside_the_root_and_hashes_nothing_there(agiqa_cli, tmp_path,
                                                                       monkeypatch):
    from agiqa.cache.shards import publish_shard
    from agiqa.data import images

    root = tmp_path / "imgs"
    _images(root, 1)
    (tmp_path / "outside.png").write_bytes(b"not yours")
    cache = _small_cache(tmp_path / "c", "zarr")
    publish_shard(cache.path, "shard-a", _shard(["img0.png"], 1), "zarr")
    publish_shard(cache.path, "shard-b", _shard(["../outside.png", str(tmp_path / "outside.png")],
                                                1), "zarr")
    hashed = []
    real = images.file_sha256
    monkeypatch.setattr(images, "file_sha256", lambda p: hashed.append(Path(p)) or real(p))
    report = verify_cache(open_cache(cache.path), root)
    bad = str(cache.shard_path("shard-b"))
    assert list(report.damaged) == [bad] and "escapes the image root" in report.damaged[bad]
    assert hashed == [root.resolve() / "img0.png"]
    r = agiqa_cli("cache", "verify", "--images", root, cache.path, catch_exceptions=True)
    assert r.exit_code == 2 and f"damaged shard: {bad}: " in r.output
    assert "outside.png" not in "".join(str(p) for p in hashed)
    with pytest.raises(CacheError, match="escapes the image root"):
        check_fresh(open_cache(cache.path), ["../outside.png"], root)
    for key in ("../outside.png", "/etc/hostname", "a/../../b.png"):
        with pytest.raises(CacheError, match="absolute or leaves the image root"):
            cache.write_shard("shard-c", _shard([key], 1))  # refused on write as well
    assert not cache.has_shard("shard-c")


def test_planning_never_deletes_a_damaged_shard_the_run_does(tiny_llava, filled):
    from agiqa.stages.extraction.resume import plan_resume

    root, keys, out = filled
    cache = open_cache(out)
    cache.write_shard("shard-foreign", _shard(["img0.png"], 3, p=2, d=cache.dim))
    foreign = cache.shard_path("shard-foreign")
    foreign.write_bytes(foreign.read_bytes()[:-10])
    plan = plan_resume(open_cache(out), keys, root, 2, 0, 1)
    assert foreign.exists() and plan.discard == ["shard-foreign"]
    assert "shard-foreign" in plan.damaged
    report = _extract(tiny_llava, root, out, shard_size=2)
    assert not foreign.exists() and "shard-foreign" in report.damaged_shards
    assert open_cache(out).keys == keys and verify_cache(open_cache(out)).ok
