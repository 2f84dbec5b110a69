"""Stage-two input: the documented cache call against one ``torch.load`` per vector.

The official code saves one ``.pt`` file per image and prompt and loads them one by one. agiqa
reads whole single-file shards. Three readers, each in ``--repeats`` fresh processes:

* ``official_torch_load``: ``torch.load`` of every ``.pt`` file, stacked into one array;
* ``agiqa_<format>``: ``open_cache(path).read(keys)`` with its default fields (vectors,
  zero-shot scores and file hashes): the call the docs show;
* ``agiqa_<format>_vectors_only``: ``read(keys, ("vectors",))``, what ``agiqa fit`` reads.

Each process times its first read (cold: first calls of the process; the files are in the page
cache, as they are once written) and the median of ``--warm`` further reads (warm), from
``open_cache(path)`` (or the first ``torch.load``) to the arrays. The import of the reader's
library is timed apart (``import_seconds``), and the process records whether reading imported
zarr or torch. Medians over the processes are reported, with the ratios cold to cold and warm
to warm.

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

HERE = Path(__file__).resolve().parent
DEFAULT = "default"
VECTORS_ONLY = "vectors_only"


def available_formats() -> tuple[str, ...]:
    """The cache formats this Python can write (zarr may be missing, HDF5 is always there)."""
    try:
        import zarr  # noqa: F401
    except ImportError:
        return ("hdf5",)
    return ("zarr", "hdf5")


def _keys(images: int) -> list[str]:
    return [f"img{i:06d}.jpg" for i in range(images)]


def write_caches(root: Path, images: int, prompts: int, dim: int, shard_size: int,
                 formats: tuple[str, ...]) -> np.ndarray:
    """The same random float16 vectors as official ``.pt`` files (float32) under
    ``root/official`` and as agiqa caches ``root/FORMAT``; returns the vectors."""
    import torch

    from agiqa.cache import SemanticCache, ShardData, plan_shards, semantic_spec

    keys = _keys(images)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((images, prompts, dim)).astype(np.float16)
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
                keys=chunk, sha256=[f"{i:064x}" for i in idx], vectors=vectors[idx],
                zero_shot=rng.random((len(chunk), prompts)).astype(np.float32)))
    return vectors


def _reader(kind: str, fields: str, root: Path, images: int, prompts: int):
    """(import seconds, a function returning all vectors [images, prompts, D])."""
    keys = _keys(images)
    t = time.perf_counter()
    if kind == "official":
        import torch

        seconds = time.perf_counter() - t
        folder = root / "official"

        def read() -> np.ndarray:
            return np.stack([np.stack([torch.load(folder / f"{k}.p{p}.pt").numpy()
                                       for p in range(prompts)]) for k in keys])
        return seconds, read

    from agiqa.cache import open_cache

    seconds = time.perf_counter() - t

    def read() -> np.ndarray:
        if fields == DEFAULT:
            got = open_cache(root / kind).read(keys)  # the documented call
            assert len(got["sha256"]) == images and got["zero_shot"].shape == (images, prompts)
        else:
            got = open_cache(root / kind).read(keys, ("vectors",))
        return got["vectors"]
    return seconds, read


def _read_in_this_process(kind: str, fields: str, root: Path, images: int, prompts: int,
                          warm: int) -> dict:
    import_seconds, read = _reader(kind, fields, root, images, prompts)
    before = {m for m in ("zarr", "torch") if m in sys.modules}
    times = []
    for _ in range(1 + warm):
        t = time.perf_counter()
        out = read()
        times.append(time.perf_counter() - t)
    assert out.shape[:2] == (images, prompts)
    return {"cold": times[0], "warm": statistics.median(times[1:]) if warm else times[0],
            "import": import_seconds,
            "imported_by_reading": sorted({m for m in ("zarr", "torch") if m in sys.modules}
                                          - before)}


def time_reader(kind: str, fields: str, root: Path, images: int, prompts: int, warm: int,
                repeats: int) -> dict:
    """Cold and warm read times of one reader over ``repeats`` fresh processes (medians)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--read", kind, "--fields", fields,
             "--dir", str(root), "--images", str(images), "--prompts", str(prompts),
             "--warm", str(warm)],
            check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold = [r["cold"] for r in runs]
    warm_s = [r["warm"] for r in runs]
    return {"cold_seconds": round(statistics.median(cold), 4),
            "warm_seconds": round(statistics.median(warm_s), 4),
            "cold_seconds_each": [round(c, 4) for c in cold],
            "import_seconds": round(statistics.median(r["import"] for r in runs), 4),
            "imported_by_reading": sorted({m for r in runs for m in r["imported_by_reading"]}),
            "vectors_per_second_warm": round(images * prompts / statistics.median(warm_s))}


def measure(root: Path, images: int, prompts: int, dim: int, shard_size: int, warm: int,
            repeats: int, formats: tuple[str, ...] | None = None) -> dict:
    """Write the data under ``root`` and time every reader; the result rows."""
    from agiqa.cache import open_cache

    formats = formats or available_formats()
    vectors = write_caches(root, images, prompts, dim, shard_size, formats)
    result: dict = {"images": images, "prompts": prompts, "dim": dim, "shard_size": shard_size,
                    "processes": repeats, "warm_reads": warm,
                    "call": "open_cache(path).read(keys)"}
    base = time_reader("official", DEFAULT, root, images, prompts, warm, repeats)
    result["official_torch_load"] = base
    for fmt in formats:
        got = open_cache(root / fmt).read(_keys(images))["vectors"]
        assert np.array_equal(got, vectors), f"{fmt} cache read back different vectors"
        rows = {}
        for fields in (DEFAULT, VECTORS_ONLY):
            row = time_reader(fmt, fields, root, images, prompts, warm, repeats)
            row["speedup_cold"] = round(base["cold_seconds"] / row["cold_seconds"], 1)
            row["speedup_warm"] = round(base["warm_seconds"] / row["warm_seconds"], 1)
            rows[fields] = row
        rows[DEFAULT]["against_vectors_only_cold"] = round(
            rows[DEFAULT]["cold_seconds"] / rows[VECTORS_ONLY]["cold_seconds"], 2)
        result[f"agiqa_{fmt}"] = rows[DEFAULT]
        result[f"agiqa_{fmt}_vectors_only"] = rows[VECTORS_ONLY]
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
    ap.add_argument("--fields", default=DEFAULT, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read:
        print(json.dumps(_read_in_this_process(args.read, args.fields, Path(args.dir),
                                               args.images, args.prompts, args.warm)))
        return
    sys.path.insert(0, str(HERE))
    from common import load_average, write_result

    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.images, args.prompts, args.dim, args.shard_size,
                         args.warm, args.repeats)
    result["load_average_before"] = before
    result["load_average_after"] = load_average()
    write_result("cache_read", result, args.out)


if __name__ == "__main__":
    main()
