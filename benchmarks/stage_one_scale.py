"""Stage one scale-out: W independent workers filling one cache against one worker.

Each worker is a whole ``agiqa extract-semantics --workers W --worker R`` process with the same
share of the machine as the single worker (``--threads`` each; on a GPU machine, one GPU each),
as W SLURM array tasks or ``torchrun`` ranks would be. Reports the wall time of both, the
speed-up, the scaling efficiency (speed-up / W, target ≥ 0.9) and whether the W-worker cache
holds exactly the vectors of the one-worker cache.

    python benchmarks/stage_one_scale.py --workers 2 --threads 1
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of every worker.")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
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
