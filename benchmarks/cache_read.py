"""Stage-two input: reading cached semantic vectors against one ``torch.load`` per vector.

The official code saves one ``.pt`` file per image and prompt and loads two of them for every
sample of every epoch. agiqa reads whole shards (zarr or HDF5) once.

    python benchmarks/cache_read.py --images 3000 --dim 4096
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agiqa.cache import open_cache  # noqa: E402
from agiqa.cache.fingerprint import semantic_spec  # noqa: E402
from agiqa.cache.shards import ShardData  # noqa: E402
from agiqa.cache.store import SemanticCache, plan_shards  # noqa: E402
from common import write_result  # noqa: E402


def timed(fn, repeats: int):
    """The median wall time of ``repeats`` calls (files warm in the page cache) and a result."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5, help="Median of this many reads.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    keys = [f"img{i:05d}.jpg" for i in range(args.images)]
    vectors = rng.standard_normal((args.images, args.prompts, args.dim)).astype(np.float16)
    result: dict = {"images": args.images, "prompts": args.prompts, "dim": args.dim,
                    "repeats": args.repeats, "shard_size": args.shard_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The official layout: one .pt per image and prompt (float32 tensors [D]).
        official = tmp / "official"
        official.mkdir()
        for i, k in enumerate(keys):
            for p in range(args.prompts):
                torch.save(torch.from_numpy(vectors[i, p].astype(np.float32)),
                           official / f"{k}.p{p}.pt")
        def load_all():
            return np.stack([np.stack([torch.load(official / f"{k}.p{p}.pt").numpy()
                                       for p in range(args.prompts)]) for k in keys])

        base, loaded = timed(load_all, args.repeats)
        assert np.allclose(loaded, vectors.astype(np.float32))
        result["official_torch_load"] = {"seconds": round(base, 4),
                                         "vectors_per_second": round(loaded.shape[0] *
                                                                     args.prompts / base)}
        spec = semantic_spec("bench/model", None, "float16",
                             [f"prompt {p}" for p in range(args.prompts)], "", ["good"])
        names = [f"p{p}" for p in range(args.prompts)]
        for fmt in ("zarr", "hdf5"):
            cache = SemanticCache.create(tmp / fmt, spec, names, args.dim, fmt, root=tmp)
            for name, chunk in plan_shards(keys, args.shard_size):
                idx = [int(k[3:8]) for k in chunk]
                cache.write_shard(name, ShardData(
                    keys=chunk, sha256=["0" * 64] * len(chunk), vectors=vectors[idx],
                    zero_shot=np.zeros((len(chunk), args.prompts), np.float32)))
            # What training reads: the vectors of every key (as the .pt files hold them).
            sec, got = timed(lambda f=fmt: open_cache(tmp / f).read(keys, ("vectors",))
                             ["vectors"], args.repeats)
            assert np.array_equal(got, vectors)
            result[f"agiqa_{fmt}"] = {"seconds": round(sec, 4),
                                      "vectors_per_second": round(args.images * args.prompts
                                                                  / sec),
                                      "speedup_vs_official": round(base / sec, 1)}
    write_result("cache_read", result, args.out)


if __name__ == "__main__":
    main()
