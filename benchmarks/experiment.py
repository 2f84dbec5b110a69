"""``agiqa experiment`` against the same runs as separate ``fit`` processes, on a CPU.

A ``paper-main``-shaped plan (three data sets named from the real label files' subsets in
tests/data/experiment, the paper's model, R seeds each) on tiny models: the whole plan as one
``agiqa experiment`` process against one ``agiqa fit`` process per run (the same seeds, split,
caches and options), at the defaults (the fit defaults, with the tiny backbone and E epochs).
The caches are extracted once beforehand and shared, so both sides time training only (the
plan's side also writes its table, report and each run's report). Also checks that both give
the same metrics.

    python benchmarks/experiment.py                        # 3 sets x 2 seeds, 1 epoch
    python benchmarks/experiment.py --repeats 3 --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_process, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data" / "experiment"
SETS = {"agiqa-3k": ("data.csv", "mos_quality", 5.0),
        "aigciqa-20k": ("info_train.csv", "mos", 5.0),
        "aigciqa2023": ("AIGCIQA2023.csv", "quality_mos", 100.0)}


def make_sets(base: Path, size: int) -> dict[str, Path]:
    """The label subsets with generated images (brightness follows the MOS)."""
    rng = np.random.default_rng(0)
    roots = {}
    for name, (labels, column, scale) in SETS.items():
        root = base / name
        root.mkdir(parents=True)
        shutil.copy(DATA / name / labels, root / labels)
        with open(root / labels, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                level = 30 + 180 * float(r[column]) / scale
                a = np.clip(rng.normal(level, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / r["name"])
        roots[name] = root
    return roots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON file [default: results/experiment.json]")
    args = ap.parse_args()

    import agiqa
    from agiqa.models.mllm.tiny import build_tiny_mllm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        roots = make_sets(tmp / "sets", args.image_size)
        mllm = build_tiny_mllm("llava", tmp / "tiny-llava")
        caches = tmp / "caches"
        for name, root in roots.items():
            agiqa.extract_semantics(dataset=name, root=root, out=caches / "mplug-owl2" / name,
                                    model=str(mllm), progress=False)
        env = {"AGIQA_HOME": str(tmp / "home")}  # the pixel cache starts empty for both

        overrides = ["fit.backbone=tiny", f"fit.epochs={args.epochs}",
                     f"repeats={args.repeats}", f"caches.mplug-owl2.model={mllm}",
                     f"cache_dir={caches}"]
        cmd = [sys.executable, "-m", "agiqa", "experiment", "paper-main", "--out",
               str(tmp / "exp"), "-q"]
        cmd += [a for n, r in roots.items() for a in ("--root", f"{n}={r}")]
        cmd += [a for o in overrides for a in ("--set", o)]
        plan = run_process(cmd, env)

        env = {"AGIQA_HOME": str(tmp / "home-solo")}
        solo, diffs = [], []
        with open(tmp / "exp" / "results.csv", newline="", encoding="utf-8") as f:
            planned = {(r["train_dataset"], int(r["seed"])): float(r["srcc"])
                       for r in csv.DictReader(f)}
        for name, root in roots.items():
            for seed in range(20, 20 + args.repeats):
                out = tmp / "solo" / name / f"seed-{seed}"
                p = run_process([sys.executable, "-m", "agiqa", "fit", "--dataset", name,
                                 "--root", str(root), "--cache",
                                 str(caches / "mplug-owl2" / name), "--out", str(out),
                                 "--backbone", "tiny", "--epochs", str(args.epochs),
                                 "--seed", str(seed), "--split-seed", "20", "-q", "--json"],
                                env)
                solo.append({"dataset": name, "seed": seed, "seconds": p["seconds"],
                             "cpu_seconds": p["cpu_seconds"]})
                diffs.append(abs(_srcc(out) - planned[(name, seed)]))
    total = sum(s["seconds"] for s in solo)
    write_result("experiment", {
        "what": "a paper-main-shaped plan (3 data sets x R seeds, the paper's model on the "
                "tiny backbone, fit defaults otherwise) as one agiqa experiment process, "
                "against the same runs as one agiqa fit process each; caches extracted once "
                "beforehand, shared",
        "runs": len(solo), "repeats": args.repeats, "epochs": args.epochs,
        "images_per_set": 40, "image_size": args.image_size,
        "plan_seconds": plan["seconds"], "plan_cpu_seconds": plan["cpu_seconds"],
        "solo_seconds_sum": round(total, 3),
        "solo_cpu_seconds_sum": round(sum(s["cpu_seconds"] for s in solo), 2),
        "speedup_wall": round(total / plan["seconds"], 3),
        "speedup_cpu": round(sum(s["cpu_seconds"] for s in solo) / plan["cpu_seconds"], 3),
        "max_abs_srcc_difference": max(diffs), "solo": solo,
    }, args.out)


def _srcc(run: Path) -> float:
    import json

    return json.loads((run / "metrics.json").read_text())["test"]["srcc"]


if __name__ == "__main__":
    main()
