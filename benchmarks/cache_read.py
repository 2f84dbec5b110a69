"""Stage-two input: reading cached semantic vectors against one ``torch.load`` per vector.

The official code saves one ``.pt`` file per image and prompt and loads two of them for every
sample of every epoch. agiqa reads whole shards (zarr or HDF5) once. Each reader runs in fresh
processes (``--repeats`` of them): the first read of a process (cold: it pays the format
library's import and first-call costs; the files are in the page cache, as they are once
written) and the median of ``--warm`` further reads (warm). agiqa is timed from
``open_cache(path)`` to the array; the official layout from the first ``torch.load`` to the
stacked array. The medians over the processes are reported, and the ratios cold to cold and
warm to warm.

    python benchmarks/cache_read.py --images 3000 --dim 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agiqa.cache import open_cache  # noqa: E402
from common import load_average, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent


def available_formats() -> tuple[str, ...]:
    """The cache formats this Python can write (zarr may be missing, HDF5 is always there)."""
    try:
        import zarr  # noqa: F401
    except ImportError:
        return ("hdf5",)
    return ("zarr", "hdf5")


def write_caches(root: Path, images: int, prompts: int, dim: int, shard_size: int,
                 formats: tuple[str, ...]) -> np.ndarray:
    """The same random float16 vectors as official ``.pt`` files (float32) under
    ``root/official`` and as agiqa caches ``root/FORMAT``; returns the vectors."""
    from agiqa.cache.fingerprint import semantic_spec
    from agiqa.cache.shards import ShardData
    from agiqa.cache.store import SemanticCache, plan_shards

    keys = _keys(images)
    vectors = np.random.default_rng(0).standard_normal((images, prompts, dim)).astype(np.float16)
    official = root / "official"
    official.mkdir(parents=True)
    for i, k in enumerate(keys):
        for p in range(prompts):
            torch.save(torch.from_numpy(vectors[i, p].astype(np.float32)),
                       official / f"{k}.p{p}.pt")
    spec = semantic_spec("bench/model", None, "float16", [f"prompt {p}" for p in range(prompts)],
                         "", ["good"])
    names = [f"p{p}" for p in range(prompts)]
    for fmt in formats:
        cache = SemanticCache.create(root / fmt, spec, names, dim, fmt, root=root)
        for name, chunk in plan_shards(keys, shard_size):
            idx = [int(k[3:9]) for k in chunk]
            cache.write_shard(name, ShardData(
                keys=chunk, sha256=["0" * 64] * len(chunk), vectors=vectors[idx],
                zero_shot=np.zeros((len(chunk), prompts), np.float32)))
    return vectors


def _keys(images: int) -> list[str]:
    return [f"img{i:06d}.jpg" for i in range(images)]


def read_vectors(kind: str, root: Path, images: int, prompts: int) -> np.ndarray:
    """All vectors [images, prompts, D]: ``kind`` is ``official`` or a cache format."""
    keys = _keys(images)
    if kind == "official":
        folder = root / "official"
        return np.stack([np.stack([torch.load(folder / f"{k}.p{p}.pt").numpy()
                                   for p in range(prompts)]) for k in keys])
    return open_cache(root / kind).read(keys, ("vectors",))["vectors"]


def _read_in_this_process(kind: str, root: Path, images: int, prompts: int, warm: int) -> dict:
    times = []
    for _ in range(1 + warm):
        t = time.perf_counter()
        out = read_vectors(kind, root, images, prompts)
        times.append(time.perf_counter() - t)
    assert out.shape[:2] == (images, prompts)
    return {"cold": times[0], "warm": statistics.median(times[1:]) if warm else times[0]}


def time_reader(kind: str, root: Path, images: int, prompts: int, warm: int,
                repeats: int) -> dict:
    """Cold and warm read times of ``kind`` over ``repeats`` fresh processes (medians)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--read", kind, "--dir", str(root),
             "--images", str(images), "--prompts", str(prompts), "--warm", str(warm)],
            check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold = [r["cold"] for r in runs]
    warm_s = [r["warm"] for r in runs]
    return {"cold_seconds": round(statistics.median(cold), 4),
            "warm_seconds": round(statistics.median(warm_s), 4),
            "cold_seconds_each": [round(c, 4) for c in cold],
            "vectors_per_second_warm": round(images * prompts / statistics.median(warm_s))}


def measure(root: Path, images: int, prompts: int, dim: int, shard_size: int, warm: int,
            repeats: int, formats: tuple[str, ...] | None = None) -> dict:
    """Write the data under ``root`` and time every reader; the result rows."""
    formats = formats or available_formats()
    vectors = write_caches(root, images, prompts, dim, shard_size, formats)
    result: dict = {"images": images, "prompts": prompts, "dim": dim, "shard_size": shard_size,
                    "processes": repeats, "warm_reads": warm}
    base = time_reader("official", root, images, prompts, warm, repeats)
    result["official_torch_load"] = base
    for fmt in formats:
        got = read_vectors(fmt, root, images, prompts)
        assert np.array_equal(got, vectors), f"{fmt} cache read back different vectors"
        row = time_reader(fmt, root, images, prompts, warm, repeats)
        row["speedup_cold"] = round(base["cold_seconds"] / row["cold_seconds"], 1)
        row["speedup_warm"] = round(base["warm_seconds"] / row["warm_seconds"], 1)
        result[f"agiqa_{fmt}"] = row
    result["load_average_after"] = load_average()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="Fresh processes per reader.")
    ap.add_argument("--warm", type=int, default=5, help="Warm reads per process (median).")
    ap.add_argument("--out", default=None)
    ap.add_argument("--read", default=None, help=argparse.SUPPRESS)  # one reader's process
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read:
        print(json.dumps(_read_in_this_process(args.read, Path(args.dir), args.images,
                                               args.prompts, args.warm)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.images, args.prompts, args.dim, args.shard_size,
                         args.warm, args.repeats)
    write_result("cache_read", result, args.out)


if __name__ == "__main__":
    main()
