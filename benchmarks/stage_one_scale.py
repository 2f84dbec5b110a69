"""Stage one scale-out: W independent workers filling one cache against one worker.

Each worker is a whole ``agiqa extract-semantics --workers W --worker R`` process with the same
share of the machine as the single worker (``--threads`` each; on a GPU machine, one GPU each),
as W SLURM array tasks or ``torchrun`` ranks would be. Reports the wall time of both, the
speed-up, the scaling efficiency (speed-up / W, target ≥ 0.9) and whether the W-worker cache
holds exactly the vectors of the one-worker cache.

    python benchmarks/stage_one_scale.py --workers 2 --threads 1
    python benchmarks/stage_one_scale.py --engine ray --images 48 --shard-size 4

``--engine ray`` times, as whole processes on the same images: one local worker, the static
split into two workers, and ``--engine ray`` with one and with two actors (each run starting and
stopping its own Ray instance); Ray's own overhead on a small job (start-up, actors ready, per
shard); and a straggler: of two workers pinned to one core each, the second shares its core
with a busy process, for the static split (it waits for the slow worker's half) and for Ray (two
actors on two nodes of a ``ray.cluster_utils.Cluster``, their processes pinned the same way).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_process, write_result  # noqa: E402
from stage_one import SHAPES, prepare_inputs  # noqa: E402


def extract(model: Path, images: Path, cache: Path, workers: int, worker: int,
            batch_size: int, shard_size: int) -> list[str]:
    return [sys.executable, "-m", "agiqa", "extract-semantics", "--mllm", str(model),
            "--images", str(images), "--out", str(cache), "--batch-size", str(batch_size),
            "--shard-size", str(shard_size), "--loader-workers", "0", "--workers", str(workers),
            "--worker", str(worker), "-q", "--json"]


def _busy(cpu: int) -> subprocess.Popen:
    """A process that keeps one core busy (the straggler's neighbour)."""
    return subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c",
                             "while True: pass"])


def _identical(a_path: Path, b_path: Path) -> bool:
    from agiqa.cache import open_cache

    a, b = open_cache(a_path), open_cache(b_path)
    return a.keys == b.keys and np.array_equal(a.read(a.keys)["vectors"],
                                               b.read(a.keys)["vectors"])


def _static(model, images, cache, workers, args, env, cpus=None) -> float:
    """The static split: ``workers`` whole processes started together (on ``cpus[r]``)."""
    t = time.perf_counter()
    procs = []
    for r in range(workers):
        cmd = extract(model, images, cache, workers, r, args.batch_size, args.shard_size)
        if cpus is not None:
            cmd = ["taskset", "-c", str(cpus[r]), *cmd]
        procs.append(subprocess.Popen(cmd, env={**os.environ, **env},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a worker failed ({p.returncode}):\n{err[-3000:]}")
    return round(time.perf_counter() - t, 3)


def ray_cmd(model, images, cache, actors, args, address=None) -> list[str]:
    cmd = [sys.executable, "-m", "agiqa", "extract-semantics", "--engine", "ray", "--model",
           str(model), "--images", str(images), "--out", str(cache), "--batch-size",
           str(args.batch_size), "--shard-size", str(args.shard_size), "--loader-workers", "0",
           "--workers", str(actors), "-q", "--json"]
    return cmd + (["--ray-address", address] if address else [])


def _ray_straggler(model, images, cache, args) -> dict:
    """Two actors on a two-node ``Cluster``, driven from this process: from the first written
    shard on, actor 0 is pinned alone to core 0 and actor 1 to core 1, beside the busy process.
    The actors' own processes are pinned, as soon as the driver knows them."""
    import ray
    from ray.cluster_utils import Cluster

    from agiqa.pipeline.ray_engine import extract_on_ray
    from agiqa.stages.extraction.extract import ExtractConfig, ImageSource

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    pinned: dict[int, int] = {}
    pids: dict[str, int] = {}

    def on_shard(name: str, who: dict) -> None:
        pids.setdefault(str(who["actor"]), who["pid"])
        if len(pids) == 2 and not pinned:
            for actor, pid in pids.items():
                pinned[pid] = int(actor)
                os.sched_setaffinity(pid, {int(actor)})

    cfg = ExtractConfig(out=cache, model=str(model), batch_size=args.batch_size,
                        shard_size=args.shard_size, loader_workers=0, progress=False,
                        engine="ray", workers=2)
    t = time.perf_counter()
    try:
        report = extract_on_ray(cfg, ImageSource.from_folder(images), on_shard=on_shard)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"ray seconds (driver, cluster already up)": round(time.perf_counter() - t, 3),
            "ray engine_seconds": report.engine_seconds,
            "ray shards per actor (actor 0 on the free core, actor 1 beside the busy process)":
                {name: c["shards"] for name, c in sorted(report.actors.items())},
            "pinned after the first shards": bool(pinned)}


def ray_suite(args, env) -> dict:
    import json
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model, images = prepare_inputs(work, args.shape, args.images)
        small = work / "small-images"
        small.mkdir(exist_ok=True)
        for f in sorted(images.iterdir())[:args.small_images]:
            shutil.copy(f, small / f.name)

        def fresh(name: str) -> Path:
            shutil.rmtree(work / name, ignore_errors=True)
            return work / name

        rows: dict[str, dict] = {}
        one = run_process(extract(model, images, fresh("one"), 1, 0, args.batch_size,
                                  args.shard_size), env)
        rows["local, one worker"] = {"seconds": one["seconds"]}
        rows["static split, two workers"] = {
            "seconds": _static(model, images, fresh("static"), 2, args, env)}
        for n in (1, 2):
            r = run_process(ray_cmd(model, images, fresh(f"ray{n}"), n, args), env)
            report = json.loads(r["stdout"])
            rows[f"ray, {n} actor(s)"] = {
                "seconds": r["seconds"], "engine_seconds": report["engine_seconds"],
                "shards_per_actor": [a["shards"] for a in report["actors"].values()],
                "identical_to_local": _identical(work / "one", work / f"ray{n}")}
        rows["static split, two workers"]["identical_to_local"] = _identical(
            work / "one", work / "static")
        # Ray's own overhead on a small job: the same images, local against one actor.
        local_small = run_process(extract(model, small, fresh("small-local"), 1, 0,
                                          args.batch_size, args.shard_size), env)
        r = run_process(ray_cmd(model, small, fresh("small-ray"), 1, args), env)
        report = json.loads(r["stdout"])
        shards = report["shards_written"]
        local_report = json.loads(local_small["stdout"])
        overhead = {
            "images": args.small_images, "shards": shards,
            "local_seconds": local_small["seconds"], "ray_seconds": r["seconds"],
            "local_extraction_seconds": local_report["seconds"],
            "ray_engine_seconds": report["engine_seconds"],
            "ray_minus_local_seconds": round(r["seconds"] - local_small["seconds"], 3),
        }
        # A straggler: worker 0 alone on core 0, worker 1 sharing core 1 with a busy process.
        busy = _busy(1)
        try:
            static_slow = _static(model, images, fresh("static-slow"), 2, args, env, [0, 1])
            ray_slow = _ray_straggler(model, images, fresh("ray-slow"), args)
        finally:
            busy.kill()
            busy.wait()
        straggler = {"static split seconds": static_slow, **ray_slow,
                     "ray identical_to_local": _identical(work / "one", work / "ray-slow")}
    return {"shape": args.shape, "images": args.images, "shard_size": args.shard_size,
            "batch_size": args.batch_size, "threads_per_worker": args.threads,
            "runs": rows, "ray_overhead_small_job": overhead, "straggler": straggler}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of every worker.")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--engine", choices=["static", "ray"], default="static",
                    help="ray: the static split and one local worker against --engine ray "
                         "with 1 and 2 actors, Ray's overhead and a straggler.")
    ap.add_argument("--small-images", type=int, default=8,
                    help="With --engine ray: the images of the small job (Ray's overhead).")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.engine == "ray":
        write_result(f"stage_one_scale_ray_{args.shape}", ray_suite(args, env), args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model, images = prepare_inputs(work, args.shape, args.images)
        one_cache, many_cache = work / "cache-one", work / "cache-many"
        for c in (one_cache, many_cache):
            if c.exists():
                import shutil

                shutil.rmtree(c)
        one = run_process(extract(model, images, one_cache, 1, 0, args.batch_size,
                                  args.shard_size), env)
        # W workers started together, as an array job would start them.
        t = time.perf_counter()
        procs = [subprocess.Popen(extract(model, images, many_cache, args.workers, r,
                                          args.batch_size, args.shard_size),
                                  env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
                 for r in range(args.workers)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a worker failed ({p.returncode}):\n{err[-3000:]}")
        many_seconds = time.perf_counter() - t
        from agiqa.cache import open_cache

        a, b = open_cache(one_cache), open_cache(many_cache)
        identical = a.keys == b.keys and np.array_equal(a.read(a.keys)["vectors"],
                                                        b.read(a.keys)["vectors"])
        speedup = one["seconds"] / many_seconds
        result = {
            "shape": args.shape, "images": args.images, "workers": args.workers,
            "threads_per_worker": args.threads, "shard_size": args.shard_size,
            "one_worker_seconds": one["seconds"], "w_workers_seconds": round(many_seconds, 3),
            "speedup": round(speedup, 3), "efficiency": round(speedup / args.workers, 3),
            "caches_identical": bool(identical),
        }
    write_result(f"stage_one_scale_{args.shape}", result, args.out)


if __name__ == "__main__":
    main()
