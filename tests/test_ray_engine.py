"""``--engine ray``: stage one and scoring on a two-node Ray cluster equal a local run, survive a
node that dies mid-run, refuse a node that does not share the paths; the local engine never
imports Ray.

The cluster is Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``, the
``ray_cluster`` fixture): a head without CPUs and two nodes of one CPU each, started once and
shared with the documentation's pages; ``pytest -n 2 --dist loadgroup`` keeps them on one worker
(``xdist_group("demo-and-ray")``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from agiqa.cli import cli

FIT = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
       "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q", "--epochs", "1"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in [SRC, os.environ.get("PYTHONPATH")] if p)}


@pytest.fixture
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def images(tmp_path_factory, real_photos) -> Path:
    """Twelve small real photos: four photographs at three sizes."""
    root = tmp_path_factory.mktemp("ray-images")
    photos = real_photos()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = Image.fromarray(photos[name]).convert("RGB")
        for i, size in enumerate([(48, 40), (40, 56), (36, 36)]):
            img.resize(size).save(root / f"{name}_{i}.png")
    return root


def _kill_node_of(cluster, who: dict) -> None:
    """A node dies: its actor's process and the node's Ray processes, without warning."""
    os.kill(who["pid"], signal.SIGKILL)
    for node in list(cluster.worker_nodes):
        if node.node_id == who["node"]:
            cluster.remove_node(node, allow_graceful=False)
            return
    raise AssertionError(f"no worker node {who['node']}")


def _cache_equal(a: Path, b: Path) -> None:
    from agiqa.cache import open_cache

    ca, cb = open_cache(a), open_cache(b)
    assert ca.shard_names() == cb.shard_names()
    assert ca.keys == cb.keys and ca.failures == cb.failures
    ra, rb = ca.read(ca.keys), cb.read(ca.keys)
    np.testing.assert_array_equal(ra["vectors"], rb["vectors"])
    np.testing.assert_array_equal(ra["zero_shot"], rb["zero_shot"])
    assert ra["sha256"] == rb["sha256"]
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("updated", None)
        m.pop("created", None)
    assert ma == mb


@pytest.fixture(scope="module")
def local_cache(tiny_llava, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-local") / "cache"
    r = run("extract-semantics", "--model", tiny_llava, "--images", images, "--out", out,
            "--shard-size", "2", "--loader-workers", "0", "-q")
    assert r.exit_code == 0, r.output
    return out


# -- without a cluster -----------------------------------------------------------------------
def test_engine_ray_without_ray_names_the_extra(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = CliRunner().invoke(cli, ["extract-semantics", "--model", "tiny", "--images",
                                 str(tmp_path), "--out", str(tmp_path / "c"), "--engine", "ray"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        'Error: --engine ray needs Ray, which is not installed: pip install "agiqa[ray]"']
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_local_engine_never_imports_ray(tiny_llava, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    code = ("import sys; from agiqa.cli import main; sys.argv = ['agiqa', 'extract-semantics', "
            f"'--model', {str(tiny_llava)!r}, '--images', {str(tmp_path)!r}, '--out', "
            f"{str(tmp_path / 'c')!r}, '-q', '--loader-workers', '0']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('ray' in sys.modules, [m for m in sys.modules if m.startswith('ray.')])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False []"
    assert (tmp_path / "c" / "manifest.json").is_file()


def test_unreachable_ray_address_is_one_line_within_30_s(tmp_path):
    pytest.importorskip("ray", reason="Ray is installed by the test extra")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    start = time.monotonic()
    r = CliRunner().invoke(cli, ["extract-semantics", "--model", "tiny", "--images",
                                 str(tmp_path), "--out", str(tmp_path / "c"), "--engine", "ray",
                                 "--ray-address", "127.0.0.1:9"])
    assert time.monotonic() - start < 30
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "Error: cannot reach the Ray cluster at 127.0.0.1:9: Connection refused"]


# -- on the two-node cluster -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.xdist_group("demo-and-ray")
def test_extraction_on_two_nodes_equals_a_local_run(cluster, tiny_llava, images, local_cache,
                                                     tmp_path):
    out = tmp_path / "cache"
    r = run("extract-semantics", "--model", tiny_llava, "--images", images, "--out", out,
            "--shard-size", "2", "--loader-workers", "0", "-q", "--engine", "ray", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["engine"] == "ray" and report["workers"] == 2
    assert report["computed"] == 12 and report["shards_written"] == 6
    assert sorted(c["shards"] for c in report["actors"].values()) != [0, 6]  # both worked
    assert sum(c["images"] for c in report["actors"].values()) == 12
    assert report["reassigned"] == []
    _cache_equal(local_cache, out)
    v = run("cache", "verify", out)
    assert v.exit_code == 0, v.output
    assert not list(out.glob(".agiqa-probe-*"))
    # The counts add up as a local run's: a broken file is failed, not also computed.
    more = tmp_path / "more"
    shutil.copytree(images, more)
    (more / "zz_broken.png").write_bytes(b"not an image")
    r = run("extract-semantics", "--model", tiny_llava, "--images", more, "--out",
            tmp_path / "more-cache", "--shard-size", "2", "--loader-workers", "0", "-q",
            "--engine", "ray", "--json")
    assert r.exit_code == 2, r.output
    counts = json.loads(r.stdout)
    assert (counts["computed"], counts["reused"], list(counts["failures"])) == \
        (12, 0, ["zz_broken.png"])
    # A model that does not load on the actors: its own line, and no cache folder left behind.
    bad = tmp_path / "bad-cache"
    r = run("extract-semantics", "--model", tmp_path / "no-model", "--images", images, "--out",
            bad, "--workers", "1", "-q", "--engine", "ray")
    assert r.exit_code == 1
    (line,) = r.output.strip().splitlines()
    assert line.startswith("Error: cannot load MLLM") and "no-model" in line
    assert not bad.exists()


@pytest.mark.slow
@pytest.mark.xdist_group("demo-and-ray")
def test_a_node_dying_mid_extraction_loses_nothing(cluster, tiny_llava, images, local_cache,
                                                   tmp_path):
    from agiqa.pipeline.ray_engine import extract_on_ray
    from agiqa.stages.extraction.extract import ExtractConfig, ImageSource

    out = tmp_path / "cache"
    before: dict[str, tuple[int, int]] = {}

    def on_shard(name: str, who: dict) -> None:
        if not before:  # its actor has already been handed its next shard
            before.update({p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                           for p in out.glob("shard-*")})
            _kill_node_of(cluster, who)

    cfg = ExtractConfig(out=out, mllm=str(tiny_llava), shard_size=2, loader_workers=0,
                        progress=False, engine="ray")
    try:
        report = extract_on_ray(cfg, ImageSource.from_folder(images), on_shard=on_shard)
    finally:
        cluster.add_node(num_cpus=1)
    assert report.reassigned, "the dead actor held a shard: it must have been handed out again"
    assert report.computed == 12 and not report.failures
    _cache_equal(local_cache, out)
    # The shards written before the node died were not written again.
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}
    assert before and all(after[n] == sig for n, sig in before.items())
    v = run("cache", "verify", out, "--json")
    assert v.exit_code == 0, v.output


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _numbers(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(v) for k, v in r.items() if k != "path"] for r in rows])


@pytest.fixture(scope="module")
def model_dir(graded, tmp_path_factory) -> Path:
    root, cache = graded
    out = tmp_path_factory.mktemp("ray-run") / "run"
    r = run("fit", *FIT, "--root", root, "--cache", cache, "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("demo-and-ray")
def test_scoring_with_a_node_dying_equals_a_local_run(cluster, graded, model_dir, tmp_path):
    from agiqa.pipeline.ray_engine import score_on_ray
    from agiqa.stages.configs import ScoreConfig

    root, _ = graded
    # Batches of 2 on both engines: the same images share a forward pass.
    local = run("score-folder", root, "--model", model_dir, "--cache", tmp_path / "local",
                "--loader-workers", "0", "--batch-size", "2", "--out", tmp_path / "local.csv", "-q")
    assert local.exit_code == 0, local.output
    killed = []

    def on_part(index: int, who: dict) -> None:
        if not killed:
            killed.append(index)
            _kill_node_of(cluster, who)

    cfg = ScoreConfig(folder=root, model=model_dir, cache=tmp_path / "ray", loader_workers=0,
                      batch_size=2, engine="ray", shard_size=6)
    try:
        report = score_on_ray(cfg, on_part=on_part)
    finally:
        cluster.add_node(num_cpus=1)
    assert killed and report.reassigned == 1
    report.write(tmp_path / "ray.csv")
    # Slices of 6 images: the model sees other batches than a local run's chunk of 30, so the
    # numbers agree to float32 rounding; rows, order and columns are the same.
    ray_rows, local_rows = (_rows(tmp_path / f"{n}.csv") for n in ("ray", "local"))
    assert len(ray_rows) == 30
    assert [r["path"] for r in ray_rows] == [r["path"] for r in local_rows]
    assert list(ray_rows[0]) == list(local_rows[0])
    np.testing.assert_allclose(_numbers(ray_rows), _numbers(local_rows), rtol=1e-5, atol=1e-6)
    v = run("cache", "verify", tmp_path / "ray")
    assert v.exit_code == 0, v.output


@pytest.mark.slow
@pytest.mark.xdist_group("demo-and-ray")
def test_a_node_that_does_not_share_the_path_is_refused(cluster, tiny_llava, images, tmp_path):
    """A third node in a mount namespace of its own, where the cache folder is an empty tmpfs:
    the same path, another filesystem."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (a mount namespace) to give one node another filesystem")
    import ray

    out = tmp_path / "cache"
    out.mkdir()
    script = (f'mount -t tmpfs tmpfs "{out}" && exec "{sys.executable}" -m ray.scripts.scripts '
              f'start --address={cluster.address} --num-cpus=1 --block')
    node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < 4:
            assert time.monotonic() < deadline, "the third node did not join"
            time.sleep(0.5)
        r = run("extract-semantics", "--model", tiny_llava, "--images", images, "--out", out,
                "--workers", "3", "--loader-workers", "0", "-q", "--engine", "ray")
        assert r.exit_code == 1
        (line,) = r.output.strip().splitlines()
        assert line.startswith("Error: node ")
        assert f"does not see {out} as this machine does" in line
        assert not (out / "manifest.json").exists() and not list(out.iterdir())
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        deadline = time.monotonic() + 30
        while sum(n["Alive"] for n in ray.nodes()) > 3 and time.monotonic() < deadline:
            time.sleep(0.5)
