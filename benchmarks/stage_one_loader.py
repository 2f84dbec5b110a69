"""Stage one's loader alone: decode -> a batch in the main process, the previous path and
today's side by side in one run, on 1024 x 1024 photos with mPLUG-Owl2's processor.

* ``per-batch float32`` (the previous path): a torch ``DataLoader`` hands each worker a whole
  batch; the worker decodes, pads to a square, resizes (PIL bicubic) and normalises to float32,
  and the float32 batch crosses to the main process.
* ``per-image uint8`` (today's): each worker gets one image at a time, decodes, pads and
  resizes it, and hands back uint8; the main process stacks the batch (the normalisation runs
  on the model's device, inside the forward step, and is not timed here).

No model runs. Reports images/s per loader process (best of the repeats, and every run's
time: the machine may be shared) and the CPU milliseconds per image of the main process and
its loaders together (median), the figure least moved by other jobs and the one that decides
how many loader processes a GPU needs.

    python benchmarks/stage_one_loader.py [--images 48] [--workers 1] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, write_result  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mplug_owl2" / "checkpoint"


def write_photos(folder: Path, n: int, side: int = 1024) -> list[str]:
    from agiqa.pipeline.demo import demo_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(demo_photos().values())
    keys = []
    for i in range(n):
        a = photos[i % len(photos)]
        img = Image.fromarray(a).resize((side, side), Image.BICUBIC)
        key = f"img{i:05d}.jpg"
        img.save(folder / key, quality=92)
        keys.append(key)
    return keys


def previous_path(root: Path, batches: list[list[str]], prepare, workers: int) -> int:
    """The previous loader: one batch per worker, float32 out of the processor."""
    from torch.utils.data import DataLoader

    from agiqa.stages.extraction.extract import _LoadBatch

    task = _LoadBatch(root, prepare)
    loader = DataLoader(batches, batch_size=None, collate_fn=task, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    n = 0
    for keys, _, _, inputs in loader:
        assert inputs[0]["pixel_values"].dtype.is_floating_point
        n += len(keys)
    return n


def current_path(root: Path, batches: list[list[str]], prepare, workers: int) -> int:
    """Today's loader: one image per task, uint8 out, stacked in the main process."""
    from agiqa.stages.extraction.extract import KILLED, _LoadPixels, _pixel_batches, ordered_load

    keys = [k for b in batches for k in b]
    results = ordered_load(_LoadPixels(root, prepare), keys, workers,
                           max(2 * len(batches[0]), 4 * workers), split=lambda k: [k],
                           died=lambda k: (k, None, None, KILLED))
    n = 0
    for got, _, _, inputs in _pixel_batches(results, batches, prepare, pin=False):
        assert inputs[0]["pixel_values"].dtype.is_floating_point is False
        n += len(got)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from agiqa.models.mllm import SemanticEncoder
    from agiqa.presets import load_prompts

    load_before = load_average()
    enc = SemanticEncoder(str(FIXTURE), load_prompts("paper"))  # the processor only
    prepare = enc.prepare
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = write_photos(root, args.images)
        batches = [keys[i:i + args.batch_size] for i in range(0, len(keys), args.batch_size)]
        times: dict[str, list[float]] = {"per-batch float32": [], "per-image uint8": []}
        cpu: dict[str, list[float]] = {"per-batch float32": [], "per-image uint8": []}
        for _ in range(args.repeats):  # alternated, so both see the same machine load
            for name, run in (("per-batch float32", previous_path),
                              ("per-image uint8", current_path)):
                c, t = _cpu_seconds(), time.perf_counter()
                assert run(root, batches, prepare, args.workers) == len(keys)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(_cpu_seconds() - c)
        first = {}
        for name, run in (("per-batch float32", previous_path), ("per-image uint8", current_path)):
            first[name] = _first_batch_seconds(run, root, batches[:1], prepare, args.workers)
    rows = {}
    for name, ts in times.items():
        best = min(ts)
        rows[name] = {"seconds": [round(t, 3) for t in ts],
                      "images_per_second": round(len(keys) / best, 2),
                      "images_per_second_per_worker": round(
                          len(keys) / best / max(args.workers, 1), 2),
                      "first_batch_seconds": round(first[name], 3),
                      "cpu_seconds": [round(c, 3) for c in cpu[name]],
                      "cpu_ms_per_image": round(1000 * statistics.median(cpu[name]) / len(keys),
                                                2)}
    speedup = rows["per-image uint8"]["images_per_second"] / \
        rows["per-batch float32"]["images_per_second"]
    cpu_ratio = rows["per-batch float32"]["cpu_ms_per_image"] / \
        rows["per-image uint8"]["cpu_ms_per_image"]
    write_result("stage_one_loader", {
        "images": len(keys), "side": 1024, "workers": args.workers,
        "batch_size": args.batch_size, "repeats": args.repeats, "timing": "best of repeats",
        "load_average_before": load_before, "paths": rows,
        "speedup_per_worker": round(speedup, 2),
        "cpu_per_image_ratio": round(cpu_ratio, 2),
        "pixel_bytes_per_image": {"per-batch float32": 3 * 448 * 448 * 4,
                                  "per-image uint8": 3 * 448 * 448},
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
    }, args.out)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the loader processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _first_batch_seconds(run, root, batches, prepare, workers) -> float:
    t = time.perf_counter()
    run(root, batches, prepare, workers)
    return time.perf_counter() - t


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
