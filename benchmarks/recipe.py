"""The CPU recipe (``agiqa fit --recipe cpu``) on graded sets it was not tuned on, on a CPU.

Builds sets of real photographs with :func:`agiqa.pipeline.demo.make_graded_set` (15
photographs × 4 crops × 5 grades = 300 images each), extracts their vectors with a tiny random
LLaVA and trains the recipe on each, over several split seeds (``fit(split_seeds=N)``):

- the five blur-graded sets of tests/test_fit.py (``UNSEEN_SETS``: photograph/crop seeds
  3000-3004 at five sizes);
- JPEG-graded and noise-graded sets made the same way (224×224, seeds ``--seeds``; 3000 is the
  set the docs' figures come from).

It reports each set's test SRCC and PLCC per split seed, their mean ± sample std and n, the
seconds of each fit and the total. ``--set KEY=VALUE`` changes one option of the recipe (a
variant; the value is read as JSON, else as a string).

    python benchmarks/recipe.py                              # -> results/recipe_cpu.json
    python benchmarks/recipe.py --only jpeg,noise --seeds 3001 3002
    python benchmarks/recipe.py --set epochs=100 --out /tmp/recipe_e100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

# tests/test_fit.py's blur-graded sets: (photograph/crop seed, image size).
UNSEEN_SETS = [(3000, (224, 224)), (3001, (200, 150)), (3002, (256, 192)), (3003, (180, 180)),
               (3004, (240, 160))]
KINDS = ("blur", "jpeg", "noise")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def summary(values: list[float]) -> dict[str, Any]:
    """Mean ± sample standard deviation (n − 1) and n, as papers report."""
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "n": len(values)}


def sets_to_run(only: tuple[str, ...], seeds: list[int]) -> list[tuple[str, int, tuple[int, int]]]:
    out = []
    if "blur" in only:
        out += [("blur", seed, size) for seed, size in UNSEEN_SETS]
    for kind in ("jpeg", "noise"):
        if kind in only:
            out += [(kind, seed, (224, 224)) for seed in seeds]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="cpu", help="recipe preset [default: cpu]")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="one fit option replacing the recipe's (repeatable)")
    ap.add_argument("--only", default="blur,jpeg,noise",
                    help="which sets, comma-separated from blur,jpeg,noise [default: all]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3000],
                    help="photograph/crop seeds of the JPEG and noise sets [default: 3000]")
    ap.add_argument("--split-seed", type=int, default=20, help="first split seed [default: 20]")
    ap.add_argument("--split-seeds", type=int, default=3, help="split seeds per set [default: 3]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads [default: 1]")
    ap.add_argument("--out", default=None, help="JSON file [default: results/recipe_RECIPE.json]")
    args = ap.parse_args(argv)
    only = tuple(k.strip() for k in args.only.split(",") if k.strip())
    if not only or set(only) - set(KINDS):
        ap.error(f"--only takes names from {','.join(KINDS)}")
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.replace("-", "_")] = _value(value)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import agiqa
    from agiqa.models.mllm.tiny import build_tiny_mllm
    from agiqa.pipeline.demo import demo_photos, make_graded_set
    from agiqa.presets import load_options_recipe

    recipe = dict(load_options_recipe(args.recipe, "fit").options)
    names = sorted(demo_photos())
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mllm = build_tiny_mllm("llava", tmp / "tiny-llava")
        for kind, seed, size in sets_to_run(only, args.seeds):
            photos = [str(n) for n in np.random.default_rng(seed).choice(names, 15, replace=False)]
            root = tmp / f"{kind}-{seed}"
            t = time.perf_counter()
            labels = make_graded_set(root, photos=photos, distortions=(kind,), grades=5,
                                     crops=4, size=size, seed=seed)
            agiqa.extract_semantics(dataset="csv", root=root, labels=labels, mllm=str(mllm),
                                    out=tmp / f"cache-{kind}-{seed}", loader_workers=0,
                                    progress=False)
            prepared = time.perf_counter() - t
            t = time.perf_counter()
            result = agiqa.fit(recipe=args.recipe, dataset="csv", root=root, labels=labels,
                               cache=tmp / f"cache-{kind}-{seed}", out=tmp / f"run-{kind}-{seed}",
                               split_seed=args.split_seed, split_seeds=args.split_seeds,
                               loader_workers=0, progress=False, **overrides)
            fit_seconds = time.perf_counter() - t
            runs = [{"split_seed": args.split_seed + i, "srcc": round(r.test["srcc"], 4),
                     "plcc": round(r.test["plcc"], 4)} for i, r in enumerate(result.runs)]
            row = {"distortion": kind, "seed": seed, "size": list(size), "images": 300,
                   "runs": runs, "srcc": summary([r["srcc"] for r in runs]),
                   "plcc": summary([r["plcc"] for r in runs]),
                   "seconds": {"build_and_extract": round(prepared, 1),
                               "fit": round(fit_seconds, 1)}}
            rows.append(row)
            print(f"{kind} {seed} {size}: SRCC {row['srcc']['mean']:+.3f} ± "
                  f"{row['srcc']['std'] or 0:.3f} (n {row['srcc']['n']}), fit "
                  f"{fit_seconds:.0f} s", file=sys.stderr, flush=True)
    by_kind = {}
    for kind in only:
        means = [r["srcc"]["mean"] for r in rows if r["distortion"] == kind]
        every = [x["srcc"] for r in rows if r["distortion"] == kind for x in r["runs"]]
        by_kind[kind] = {"set_means": summary(means), "all_runs": summary(every)}
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "recipe": args.recipe, "recipe_options": recipe, "overrides": overrides,
              "split_seeds": [args.split_seed + i for i in range(args.split_seeds)],
              "threads": args.threads, "sets": rows, "srcc_by_distortion": by_kind,
              "seconds": round(time.perf_counter() - started, 1)}
    name = f"recipe_{args.recipe}"
    write_result(name, result, args.out)


if __name__ == "__main__":
    main()
