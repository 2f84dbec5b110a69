"""Stage two: ``agiqa fit`` against the official training loop, as whole processes.

Same images (real photographs saved as 512×512 JPEGs, as AGIQA-3K's generations), same
semantic vectors (random, D wide: the official loop reads them from one ``.pt`` file per image
and prompt, agiqa from a cache), same split (the paper's), same batch size and model. Reports
training images/s, seconds per epoch (training plus the validation pass), the same scaled to an
AGIQA-3K-sized epoch (2982 images, 70 % trained), peak memory and the speed-ups.

    python benchmarks/stage_two.py                                   # CPU: the tiny backbone
    python benchmarks/stage_two.py --backbone vit_base_patch8_224 \
        --images 2982 --epochs 3 --agiqa-batch-size 32               # GPU: the paper's model
    python benchmarks/stage_two.py --repeats 4                       # 4 runs together vs solo
    python benchmarks/stage_two.py --repeats 4 --recipe cpu --epochs 200   # the CPU recipe
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


def measure(work: Path, backbone: str, images: int, epochs: int, dim: int, workers: int,
            runs: list[tuple[str, int, bool | None, bool]], timeout: float | None = None,
            deadline: float | None = None) -> dict:
    """The official loop, then ``agiqa fit`` once per run (name, batch size, bf16 autocast
    (None: agiqa's default), --compile), on one data set written under ``work``. A process
    is killed after ``timeout`` seconds or at ``deadline`` (``time.perf_counter()``); the last
    run (``--compile``, where asked for) may use all the time left before the deadline; a run
    that has no time left is skipped."""
    import time

    def limit(last: bool = False) -> float | None:
        if deadline is None:
            return timeout
        left = deadline - time.perf_counter()
        return left if timeout is None or last else min(timeout, left)

    py = sys.executable
    root, features = work / f"images-{images}", work / f"features-{images}"
    cache = work / f"cache-{images}"
    if not (root / "labels.csv").is_file():
        write_dataset(root, features, cache, images, dim)
    official = run_process([py, str(HERE / "official_stage_two.py"), "--root", str(root),
                            "--labels", str(root / "labels.csv"), "--features", str(features),
                            "--epochs", str(epochs), "--backbone", backbone, "--dim", str(dim),
                            "--workers", str(workers)], timeout=limit())
    off = json.loads(official["stdout"].strip().splitlines()[-1])
    scale = AGIQA_3K_IMAGES / images
    result: dict = {
        "backbone": backbone, "images": images, "epochs": epochs, "dim": dim,
        "loader_workers": workers,
        "official": {
            "batch_size": 8, "precision": "float32", "process_seconds": official["seconds"],
            "train_images_per_second": steady(off["epochs"], "train_images_per_second"),
            "epoch_seconds": steady(off["epochs"], "seconds"),
            "agiqa_3k_epoch_seconds": round(steady(off["epochs"], "seconds") * scale, 1),
            "peak_rss_mib": official["peak_rss_mib"], "epochs_detail": off["epochs"]},
    }
    for i, (name, batch, amp, compiled) in enumerate(runs):
        last = i == len(runs) - 1
        if (limit(last) or 1e9) < 10:
            result[name] = {"failed": "skipped: out of time"}
            continue
        try:
            result[name] = _fit(work, root, cache, name, backbone, epochs, batch, amp, compiled,
                                workers, limit(last))
        except RuntimeError as e:
            result[name] = {"failed": str(e)[-800:]}
            continue
        row, base = result[name], result["official"]
        row["agiqa_3k_epoch_seconds"] = round(row["epoch_seconds"] * scale, 1)
        row["speedup_train_images_per_second"] = round(
            row["train_images_per_second"] / base["train_images_per_second"], 2)
        row["speedup_epoch"] = round(base["epoch_seconds"] / row["epoch_seconds"], 2)
        row["speedup_process"] = round(base["process_seconds"] / row["process_seconds"], 2)
    return result


def _fit(work: Path, root: Path, cache: Path, name: str, backbone: str, epochs: int,
         batch: int, amp: bool | None, compiled: bool, workers: int,
         timeout: float | None) -> dict:
    out = work / f"run-{name}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "agiqa", "fit", "--dataset", "csv", "--root", str(root),
           "--cache", str(cache), "--out", str(out), "--backbone", backbone, "--no-pretrained",
           "--epochs", str(epochs), "--batch-size", str(batch), "--loader-workers",
           str(workers), "-q", "--json"]
    if amp is not None:
        cmd.append("--amp" if amp else "--no-amp")
    if compiled:
        cmd.append("--compile")
    ours = run_process(cmd, timeout=timeout)
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    bf16 = torch.cuda.is_available() if amp is None else amp
    return {"batch_size": batch, "compile": compiled,
            "precision": "bf16 autocast" if bf16 else "float32",
            "process_seconds": ours["seconds"],
            "train_images_per_second": steady(history, "train_images_per_second"),
            "epoch_seconds": steady(history, "seconds"),
            "first_epoch_seconds": history[0]["seconds"],
            "peak_rss_mib": ours["peak_rss_mib"]}


def _series_history(out: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            for run in sorted(out.glob("seed-*"))]


# The CPU recipe's fit options (agiqa.pipeline.demo.CPU_RECIPE), not the paper's protocol.
CPU_RECIPE_ARGS = ["--backbone-lr", "0", "--no-augment", "--key-norm", "zscore", "--score-norm",
                   "zscore", "--semantic-norm", "zscore", "--lr", "3e-4", "--batch-size", "32",
                   "--t-max", "100000", "--selection", "last"]


def measure_series(work: Path, backbone: str, images: int, epochs: int, dim: int, workers: int,
                   repeats: int, concurrent: int | None, solo: bool = True,
                   timeout: float | None = None, recipe: str = "paper") -> dict:
    """``fit --repeats N`` as one process (runs trained together, ``--concurrent-runs K``;
    None: agiqa's choice) against N solo ``fit`` processes one after another (training seeds
    20..20+N-1, the same split), float32 at batch 8: the paper's protocol in each run, or with
    ``recipe="cpu"`` the CPU recipe (a frozen backbone, batch 32; not the paper's protocol).

    Both sides run at the defaults, the pixel cache included, each from an empty one: the
    series decodes every image once, the first solo process too, and the later solo processes
    read what it kept (what a user running them one after another gets)."""
    root, features = work / f"images-{images}", work / f"features-{images}"
    cache = work / f"cache-{images}"
    if not (root / "labels.csv").is_file():
        write_dataset(root, features, cache, images, dim)
    base = [sys.executable, "-m", "agiqa", "fit", "--dataset", "csv", "--root", str(root),
            "--cache", str(cache), "--backbone", backbone, "--no-pretrained", "--epochs",
            str(epochs), "--batch-size", "8", "--no-amp", "--loader-workers", str(workers),
            "-q", "--json", "--split-seed", "20"]
    if recipe == "cpu":
        base += CPU_RECIPE_ARGS
    homes = {side: work / f"home-{side}-{recipe}" for side in ("series", "solo")}
    import shutil

    out = work / f"series-{repeats}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*base, "--out", str(out), "--seed", "20", "--repeats", str(repeats)]
    if concurrent is not None:
        cmd += ["--concurrent-runs", str(concurrent)]
    shutil.rmtree(homes["series"], ignore_errors=True)
    together = run_process(cmd, env={"AGIQA_HOME": str(homes["series"])}, timeout=timeout)
    summary = json.loads((out / "summary.json").read_text())
    histories = _series_history(out)
    # runs trained together share each epoch's wall time: the group's images/s is their sum
    per_run = steady(histories[0], "train_images_per_second")
    k = summary["concurrency"]["concurrent_runs"]
    result: dict = {
        "backbone": backbone, "images": images, "epochs": epochs, "repeats": repeats,
        "protocol": ("float32, batch 8, each run the paper's loop" if recipe == "paper" else
                     "the CPU recipe (frozen backbone, keys computed once; not the paper's "
                     "protocol): " + " ".join(CPU_RECIPE_ARGS)),
        "pixel_cache": "on (the default), empty at the start of each side",
        "together": {"process_seconds": together["seconds"], "concurrent_runs": k,
                     "per_run_train_images_per_second": per_run,
                     "train_images_per_second": round(per_run * k, 2),
                     "epoch_seconds": steady(histories[0], "seconds"),
                     "peak_rss_mib": together["peak_rss_mib"],
                     "concurrency": summary["concurrency"]}}
    if solo:
        seconds, rates = [], []
        shutil.rmtree(homes["solo"], ignore_errors=True)
        for i in range(repeats):
            one = work / f"solo-{i}"
            shutil.rmtree(one, ignore_errors=True)
            proc = run_process([*base, "--out", str(one), "--seed", str(20 + i)],
                               env={"AGIQA_HOME": str(homes["solo"])}, timeout=timeout)
            seconds.append(proc["seconds"])
            history = [json.loads(line) for line in
                       (one / "train_log.jsonl").read_text().splitlines()]
            rates.append(steady(history, "train_images_per_second"))
        result["solo"] = {"processes": repeats, "process_seconds": round(sum(seconds), 2),
                          "each_process_seconds": seconds,
                          "train_images_per_second": round(statistics.median(rates), 2)}
        result["speedup_process"] = round(sum(seconds) / together["seconds"], 2)
        result["speedup_train_images_per_second"] = round(
            result["together"]["train_images_per_second"] / statistics.median(rates), 2)
    return result


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
    ap.add_argument("--repeats", type=int, default=0,
                    help="Instead: `fit --repeats N` in one process (runs trained together) "
                         "against N solo `fit` processes.")
    ap.add_argument("--concurrent-runs", type=int, default=None)
    ap.add_argument("--recipe", default="paper", choices=["paper", "cpu"],
                    help="With --repeats: the paper's protocol, or the CPU recipe (labelled).")
    ap.add_argument("--workdir", default=None, help="Keep the images and vectors here.")
    ap.add_argument("--out", default=None, help="The JSON result (default results/...).")
    args = ap.parse_args()
    if args.repeats:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure_series(Path(args.workdir or tmp), args.backbone, args.images,
                                    args.epochs, args.dim, args.loader_workers, args.repeats,
                                    args.concurrent_runs, recipe=args.recipe)
        suffix = "" if args.recipe == "paper" else f"_{args.recipe}_recipe"
        write_result(f"stage_two_repeats_{args.backbone}{suffix}", result, args.out)
        return
    runs: list[tuple[str, int, bool | None, bool]] = [("agiqa", 8, None, False)]
    if args.agiqa_batch_size != 8:
        runs.append((f"agiqa_batch{args.agiqa_batch_size}", args.agiqa_batch_size, None, False))
    if args.compile:
        runs.append(("agiqa_compile", args.agiqa_batch_size, None, True))
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(args.workdir or tmp), args.backbone, args.images, args.epochs,
                         args.dim, args.loader_workers, runs)
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
    write_result(f"stage_two_{args.backbone}", result, args.out)


if __name__ == "__main__":
    main()
