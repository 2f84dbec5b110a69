"""``agiqa experiment --engine ray``: a plan's groups as tasks on the two-node test cluster (the
``ray_cluster`` fixture) give the results and run folders of a local run, also when the node
running a group dies mid-training."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agiqa.cli import cli

METRICS = ("srcc", "plcc", "krcc", "rmse")


def _plan(folder: Path, graded, tiny_llava, epochs: int) -> list[str]:
    """Two groups (the paper's head and the mean of the experts) on the graded photos, one
    seed each, the tiny backbone frozen; the graded set's cache, where the plan looks."""
    root, cache = graded
    caches = folder / "caches"
    (caches / "tiny").mkdir(parents=True, exist_ok=True)
    if not (caches / "tiny" / "graded").exists():
        (caches / "tiny" / "graded").symlink_to(cache)
    plan = folder / "plan.toml"
    plan.write_text(f"""
cache_dir = "{caches}"
[fit]
backbone = "tiny"
pretrained = false
backbone_lr = 0.0
augment = false
batch_size = 6
epochs = {epochs}
split = "random:0.6,0.2,0.2"
loader_workers = 0
[datasets.graded]
preset = "csv"
root = "{root}"
[caches.tiny]
model = "{tiny_llava}"
[variants.ma-agiqa]
[variants.mean]
fusion = "mean"
""")
    return ["experiment", str(plan), "-q"]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "runs").rglob("*"))


def _same_results(ray_out: Path, local_out: Path) -> None:
    """The same rows (metrics to 1e-6, the run folder in its own experiment), the same files."""
    ray_rows, local_rows = _rows(ray_out), _rows(local_out)
    assert len(ray_rows) == len(local_rows) == 2
    for a, b in zip(ray_rows, local_rows, strict=True):
        assert Path(a["run_dir"]).relative_to(ray_out) == Path(b["run_dir"]).relative_to(local_out)
        assert {k: v for k, v in a.items() if k not in (*METRICS, "run_dir")} == \
            {k: v for k, v in b.items() if k not in (*METRICS, "run_dir")}
        assert a["error"] == ""
        np.testing.assert_allclose([float(a[k]) for k in METRICS],
                                   [float(b[k]) for k in METRICS], rtol=0, atol=1e-6)
    assert _files(ray_out) == _files(local_out)
    assert (ray_out / "table.md").is_file() and (ray_out / "report.html").is_file()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, graded, tiny_llava) -> Path:
    folder = tmp_path_factory.mktemp("experiment-local")
    out = folder / "exp"
    r = CliRunner().invoke(cli, [*_plan(folder, graded, tiny_llava, EPOCHS), "--out", str(out)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


EPOCHS = 4


def test_engine_ray_without_ray_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = CliRunner().invoke(cli, ["experiment", "cpu-demo", "--out", str(tmp_path / "exp"),
                                 "--engine", "ray"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        'Error: --engine ray needs Ray, which is not installed: pip install "agiqa[ray]"']
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("demo-and-ray")
def test_a_plan_on_two_nodes_equals_a_local_run(ray_cluster, local_run, graded, tiny_llava,
                                                tmp_path):
    out = tmp_path / "exp"
    r = CliRunner().invoke(cli, [*_plan(tmp_path, graded, tiny_llava, EPOCHS), "--out", str(out),
                                 "--engine", "ray"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    _same_results(out, local_run)
    assert not list(out.glob(".agiqa-probe-*"))


@pytest.mark.slow
@pytest.mark.xdist_group("demo-and-ray")
def test_a_node_dying_mid_training_reruns_its_group_from_the_checkpoint(
        ray_cluster, local_run, graded, tiny_llava, tmp_path, monkeypatch):
    from agiqa.pipeline import ray_engine

    out, seen = tmp_path / "exp", tmp_path / "started"
    seen.mkdir()

    def on_start(group, node):  # runs in the task: where each group runs
        import json as js
        from pathlib import Path as P

        tmp = P(str(seen)) / f".{group.variant}-{node['pid']}"
        tmp.write_text(js.dumps({**node, "run": str(group.runs[0].run_dir)}))
        tmp.rename(tmp.with_name(f"{tmp.name[1:]}.json"))  # whole, for the killer below

    monkeypatch.setattr(ray_engine, "groups_on_ray",
                        functools.partial(ray_engine.groups_on_ray, on_start=on_start))
    killed: list[dict] = []
    stop = threading.Event()

    def killer() -> None:  # the node of the first group whose checkpoint exists, mid-training
        while not stop.is_set():
            for f in seen.glob("*.json"):
                who = json.loads(f.read_text())
                run = Path(who["run"])
                if (run / "checkpoint.pt").is_file() and not (run / "metrics.json").exists():
                    os.kill(who["pid"], signal.SIGKILL)
                    for node in list(ray_cluster.worker_nodes):
                        if node.node_id == who["node"]:
                            ray_cluster.remove_node(node, allow_graceful=False)
                    killed.append(who)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        r = CliRunner().invoke(cli, [*_plan(tmp_path, graded, tiny_llava, EPOCHS), "--out",
                                     str(out), "--engine", "ray"], catch_exceptions=False)
    finally:
        stop.set()
        thread.join()
        if killed:  # the cluster as the other tests know it
            ray_cluster.add_node(num_cpus=1)
    assert killed, "no group was caught mid-training"
    assert r.exit_code == 0, r.output
    # The killed group ran twice: the second time from the checkpoint of the first.
    assert len([f for f in seen.glob("*.json")
                if json.loads(f.read_text())["run"] == killed[0]["run"]]) == 2
    _same_results(out, local_run)
