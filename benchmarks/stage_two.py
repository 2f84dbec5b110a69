"""Stage two: ``agiqa fit`` against the official training loop, as whole processes.

Same images (real photographs saved as 512×512 JPEGs, as AGIQA-3K's generations), same
semantic vectors (random, D wide: the official loop reads them from one ``.pt`` file per image
and prompt, agiqa from a cache), same split (the paper's), same batch size and model. Reports
training images/s, seconds per epoch (training plus the validation pass), the same scaled to an
AGIQA-3K-sized epoch (2982 images, 70 % trained), peak memory and the speed-ups.

    python benchmarks/stage_two.py                                   # CPU: the tiny backbone
    python benchmarks/stage_two.py --backbone vit_base_patch8_224 \
        --images 2982 --epochs 3 --agiqa-batch-size 32               # GPU: the paper's model
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_process, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
AGIQA_3K_IMAGES = 2982


def write_dataset(folder: Path, features: Path, cache: Path, n: int, dim: int) -> None:
    """n JPEGs with labels, their vectors as official ``.pt`` files and as an agiqa cache."""
    from agiqa.cache.fingerprint import semantic_spec
    from agiqa.cache.shards import ShardData
    from agiqa.cache.store import SemanticCache, plan_shards
    from agiqa.pipeline.demo import demo_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(demo_photos().values())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        s = min(h, w)
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        Image.fromarray(a[y : y + s, x : x + s]).resize((512, 512)).save(
            folder / f"img{i:05d}.jpg", quality=95)
        rows.append((f"img{i:05d}.jpg", f"{rng.uniform(1, 5):.3f}"))
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "mos"), *rows])
    keys = [r[0] for r in rows]
    vectors = rng.standard_normal((n, 2, dim)).astype(np.float16)
    for p in range(2):
        (features / f"prompt{p}").mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(keys):
            torch.save(torch.from_numpy(vectors[i, p].astype(np.float32)),
                       features / f"prompt{p}" / f"{Path(k).stem}.pt")
    spec = semantic_spec("bench/random-vectors", None, "float16", ["prompt 0", "prompt 1"], "",
                         ["good"])
    store = SemanticCache.create(cache, spec, ["semantic_content", "coherence"], dim, "hdf5",
                                 root=folder)
    index = {k: i for i, k in enumerate(keys)}
    for name, chunk in plan_shards(keys, 1024):
        idx = [index[k] for k in chunk]
        sha = [hashlib.sha256((folder / k).read_bytes()).hexdigest() for k in chunk]
        store.write_shard(name, ShardData(keys=chunk, sha256=sha,
                                          vectors=vectors[idx],
                                          zero_shot=np.zeros((len(chunk), 2), np.float32)))


def steady(epochs: list[dict], key: str) -> float:
    """The median over the epochs after the first (the first warms up), else the first."""
    values = [e[key] for e in epochs[1:]] or [epochs[0][key]]
    return float(statistics.median(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "vit_base_patch8_224"])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--agiqa-batch-size", type=int, default=8,
                    help="Also time agiqa at this batch size (8 is the paper's).")
    ap.add_argument("--compile", action="store_true", help="Time agiqa with --compile as well.")
    ap.add_argument("--workdir", default=None, help="Keep the images and vectors here.")
    ap.add_argument("--out", default=None, help="The JSON result (default results/...).")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        images, features = work / f"images-{args.images}", work / f"features-{args.images}"
        cache = work / f"cache-{args.images}"
        if not (images / "labels.csv").is_file():
            write_dataset(images, features, cache, args.images, args.dim)
        official = run_process([py, str(HERE / "official_stage_two.py"), "--root", str(images),
                                "--labels", str(images / "labels.csv"), "--features",
                                str(features), "--epochs", str(args.epochs), "--backbone",
                                args.backbone, "--dim", str(args.dim), "--workers",
                                str(args.loader_workers)])
        off = json.loads(official["stdout"].strip().splitlines()[-1])
        scale = AGIQA_3K_IMAGES / args.images
        result = {
            "backbone": args.backbone, "images": args.images, "epochs": args.epochs,
            "dim": args.dim, "loader_workers": args.loader_workers,
            "official": {
                "batch_size": 8, "precision": "float32", "process_seconds": official["seconds"],
                "train_images_per_second": steady(off["epochs"], "train_images_per_second"),
                "epoch_seconds": steady(off["epochs"], "seconds"),
                "agiqa_3k_epoch_seconds": round(steady(off["epochs"], "seconds") * scale, 1),
                "peak_rss_mib": official["peak_rss_mib"], "epochs_detail": off["epochs"]},
        }
        runs = [("agiqa", 8, False)]
        if args.agiqa_batch_size != 8:
            runs.append((f"agiqa_batch{args.agiqa_batch_size}", args.agiqa_batch_size, False))
        if args.compile:
            runs.append(("agiqa_compile", args.agiqa_batch_size, True))
        for name, batch, compiled in runs:
            out = work / f"run-{name}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            cmd = [py, "-m", "agiqa", "fit", "--dataset", "csv", "--root", str(images),
                   "--cache", str(cache), "--out", str(out), "--backbone", args.backbone,
                   "--no-pretrained", "--epochs", str(args.epochs), "--batch-size", str(batch),
                   "--loader-workers", str(args.loader_workers), "-q", "--json"]
            if compiled:
                cmd.append("--compile")
            ours = run_process(cmd)
            history = [json.loads(line) for line in
                       (out / "train_log.jsonl").read_text().splitlines()]
            epoch_s = steady(history, "seconds")
            result[name] = {
                "batch_size": batch, "compile": compiled,
                "precision": "bf16 autocast" if torch.cuda.is_available() else "float32",
                "process_seconds": ours["seconds"],
                "train_images_per_second": steady(history, "train_images_per_second"),
                "epoch_seconds": epoch_s,
                "agiqa_3k_epoch_seconds": round(epoch_s * scale, 1),
                "peak_rss_mib": ours["peak_rss_mib"],
                "speedup_train_images_per_second": round(
                    steady(history, "train_images_per_second")
                    / result["official"]["train_images_per_second"], 2),
                "speedup_epoch": round(result["official"]["epoch_seconds"] / epoch_s, 2),
                "speedup_process": round(official["seconds"] / ours["seconds"], 2),
            }
        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
    write_result(f"stage_two_{args.backbone}", result, args.out)


if __name__ == "__main__":
    main()
