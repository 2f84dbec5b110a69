"""The offline demo: a small labelled set made from real photographs, and the whole pipeline on it.

The photographs ship inside installed packages (scikit-image and scikit-learn sample images), so
nothing is downloaded. Each photo is cropped a few times and damaged in grades: Gaussian blur,
JPEG compression, noise, and semantic damage by shuffling image patches. The mean opinion score
(MOS) falls with the total damage, so a model that learns anything about quality ranks them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from agiqa.errors import AgiqaError, ConfigError
from agiqa.fileio import atomic_path, read_json, write_json

__all__ = ["CAVEAT", "CPU_RECIPE", "DEMO_EPOCHS", "DISTORTIONS", "DemoResult", "demo_photos",
           "make_graded_set", "run_demo", "unseen_note"]

DISTORTIONS = ("blur", "jpeg", "noise", "shuffle")
# The CPU recipe, the built-in recipe preset `cpu` (`agiqa fit --recipe cpu`, not the paper's
# protocol): the random tiny backbone frozen, each image's key (the mean and std over the
# patches of each ViT channel, ``image_key="vit-stats"``) computed once and standardised; the
# MoE head trained at batch 32 and lr 3e-4 on standardised MOS and vectors for 200 epochs, the
# last one kept (validation splits of a few dozen images are too small to choose an epoch
# with). It needs a few hundred images: the demo's set has 384.
CPU_RECIPE: dict[str, Any] = json.loads(
    (resources.files("agiqa.presets") / "recipes" / "cpu.json").read_text(encoding="utf-8")
)["options"]
DEMO_EPOCHS = CPU_RECIPE["epochs"]
# Written into the demo's folder: the demo deletes only what a demo created.
MARKER = ".agiqa-demo"
CAVEAT = ("The MLLM is a tiny random model and the MOS is synthetic (it falls with the blur "
          "grade): the numbers show the pipeline learning image damage, not a quality judgement.")


def demo_photos() -> dict[str, np.ndarray]:
    """Real photographs bundled with scikit-image and scikit-learn, as RGB uint8 arrays."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(sk, name)() for name in (
        "astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field",
        "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon", "clock", "coins")}
    left, right = sk.stereo_motorcycle()[:2]
    photos["motorcycle"] = left
    samples = load_sample_images()
    for path, img in zip(samples.filenames, samples.images, strict=True):
        photos[Path(path).stem] = img
    # Not in the demo's own set: for sets of other photographs (the recipe's unseen sets).
    photos.update(cell=sk.cell(), page=sk.page(), text=sk.text(), motorcycle_right=right)
    out = {}
    for name, a in photos.items():
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(a[..., :3].astype(np.uint8))
    return out


def _crops(img: np.ndarray, n: int, rng: np.random.Generator, aspect: float = 4 / 3):
    h, w = img.shape[:2]
    ch = int(min(h, w / aspect) * 0.8)
    cw = int(ch * aspect)
    for _ in range(n):
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        yield img[y : y + ch, x : x + cw]


def _damage(img: Image.Image, kind: str, grade: int, rng: np.random.Generator) -> Image.Image:
    """Grade 0 leaves the image alone; higher grades damage it more."""
    if grade == 0:
        return img
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(1.2 * grade))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=max(2, 40 // (2 ** (grade - 1))))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "noise":
        a = np.asarray(img, dtype=np.float32)
        a = a + rng.normal(0, 12.0 * grade, a.shape)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if kind == "shuffle":  # semantic damage: tiles of the image in a random order
        tiles = 2 ** grade
        a = np.asarray(img)
        th, tw = a.shape[0] // tiles, a.shape[1] // tiles
        a = a[: th * tiles, : tw * tiles]
        blocks = [a[i * th : (i + 1) * th, j * tw : (j + 1) * tw]
                  for i in range(tiles) for j in range(tiles)]
        order = rng.permutation(len(blocks))
        rows = [np.concatenate([blocks[order[i * tiles + j]] for j in range(tiles)], axis=1)
                for i in range(tiles)]
        return Image.fromarray(np.concatenate(rows, axis=0))
    raise ValueError(f"unknown distortion {kind!r} (choose from {', '.join(DISTORTIONS)})")


def make_graded_set(out: str | os.PathLike, distortions: tuple[str, ...] = DISTORTIONS,
                    grades: int = 4, crops: int = 1, size: tuple[int, int] = (160, 120),
                    photos: list[str] | None = None, seed: int = 0) -> Path:
    """Write graded images and ``labels.csv`` (image, mos, photo, distortion, grade) into ``out``.

    Every crop of every photo appears once undamaged and, for each distortion, at grades
    1..grades-1. The MOS is ``5 − 4·grade/(grades−1)``, plus a little rater noise, so undamaged
    images score about 5 and the worst about 1. Returns the path of ``labels.csv``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    library = demo_photos()
    names = photos or list(library)
    unknown = sorted(set(names) - set(library))
    if unknown:
        raise ValueError(f"unknown demo photo(s) {unknown} (choose from {sorted(library)})")
    if grades < 2:
        raise ValueError(f"grades must be at least 2, got {grades}")
    rows = []
    for name in names:
        for c, crop in enumerate(_crops(library[name], crops, rng)):
            base = Image.fromarray(crop).resize(size, Image.Resampling.BICUBIC)
            versions = [("none", 0)] + [(d, g) for d in distortions for g in range(1, grades)]
            for kind, grade in versions:
                img = _damage(base, kind, grade, rng)
                key = f"{name}-{c}-{kind}{grade}.png"
                img.save(out / key)
                mos = 5.0 - 4.0 * grade / (grades - 1) + float(rng.normal(0, 0.1))
                rows.append([key, f"{mos:.3f}", name, kind, grade])
    labels = out / "labels.csv"
    with atomic_path(labels) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "mos", "photo", "distortion", "grade"])
            w.writerows(rows)
    return labels


@dataclass
class DemoResult:
    """What ``agiqa demo`` made: folders, metrics and the scores of the unseen photo."""

    out: Path
    metrics: dict[str, dict[str, float]]
    plots: list[Path]
    scores_csv: Path
    unseen: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "metrics": self.metrics,
                "plots": [str(p) for p in self.plots], "scores_csv": str(self.scores_csv),
                "unseen": self.unseen, "unseen_note": self.unseen_note,
                "seconds": self.seconds, "caveat": CAVEAT}

    @property
    def unseen_note(self) -> str:
        """What the unseen photograph's scores show: their rank correlation with its blur
        grade (the grade is in each file's name), said plainly either way."""
        return unseen_note(self.unseen)


def unseen_note(rows: list[dict[str, Any]]) -> str:
    """One line on the held-out photograph's scores against its blur grades (0 sharp to 5)."""
    import re

    from scipy.stats import spearmanr

    graded = [(int(m.group(1)), r["score"]) for r in rows
              if (m := re.search(r"-[a-z]+(\d+)\.[a-z]+$", r["path"]))]
    if len(graded) < 3:
        return "too few scores of the unseen photograph to compare with its blur"
    rho = float(spearmanr([g for g, _ in graded], [s for _, s in graded])[0])
    trend = "fall" if rho <= -0.5 else "rise" if rho >= 0.5 else "do not follow"
    verdict = ("the model ranks the blur of a photograph it never saw" if rho <= -0.5 else
               "as expected: trained on 16 photographs with a random MLLM, the model ranks "
               "damage within the photographs it saw, not on a photograph held out whole")
    return (f"the unseen photograph's scores {trend} with the blur (SRCC {rho:+.2f} against "
            f"the blur grade, where the MOS would give -1): {verdict}")


def _claim(out: Path) -> None:
    """Make ``out`` the demo's folder; refuse a non-empty folder a demo did not make."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out}: folder exists, is not empty and was not made by agiqa demo; "
                          "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by agiqa demo; its subfolders may be rebuilt\n")


HELD_OUT = "flower"
# The photographs of the demo's labelled set (the unseen photo and the extra ones left out).
DEMO_SET = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field",
            "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon", "clock",
            "coins", "motorcycle", "china")


class _Laps:
    """Seconds per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 2)
        self._t = now


def _prepare(out: Path, seed: int, log) -> tuple[Path, Path, Path, bool]:
    """The tiny MLLM, the blur-graded set and the unseen photograph; and whether the sets are
    an earlier demo's, reused."""
    from agiqa.models.mllm.tiny import build_tiny_mllm

    names = list(DEMO_SET)
    log(f"[1/6] tiny MLLM and a blur-graded set of {len(names)} real photographs -> {out}")
    mllm = out / "tiny-llava"
    if not (mllm / "config.json").is_file():
        build_tiny_mllm("llava", mllm)
    images = out / "images"
    labels = images / "labels.csv"
    made = _made_sets(out)
    wanted = {"seed": seed, "photos": names}
    # An earlier demo's sets of the same seed are reused while every file is there: a rerun
    # writes no image (the sets are a function of the seed).
    reused = made.get("seed") == seed and made.get("photos") == names and all(
        (out / f).is_file() for f in made.get("files", [])) and labels.is_file()
    if not reused:
        make_graded_set(images, photos=names, distortions=("blur",), grades=6, crops=4,
                        seed=seed)
        unseen = out / "unseen"
        make_graded_set(unseen, photos=[HELD_OUT], distortions=("blur",), grades=6,
                        seed=seed + 1)
        (unseen / "labels.csv").unlink()
        with open(labels, newline="", encoding="utf-8") as f:
            files = [f"images/{r['image']}" for r in csv.DictReader(f)]
        files += sorted(f"unseen/{p.name}" for p in unseen.iterdir() if p.suffix == ".png")
        write_json(out / SETS, {**wanted, "files": ["images/labels.csv", *files]})
    return mllm, images, labels, reused


def _saved_metrics(folder: Path) -> dict[str, float] | None:
    """The metrics of an evaluation folder the demo wrote (None when there is none whole)."""
    from agiqa.stages.rundir import EVALUATION

    try:
        metrics = read_json(folder / EVALUATION)["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    keys = ("srcc", "plcc", "krcc", "rmse")
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), float)
                                                for k in keys):
        return None
    return metrics


SETS = ".agiqa-demo-sets.json"  # the seed, photographs and files of the sets the demo wrote


def _made_sets(out: Path) -> dict[str, Any]:
    """What an earlier demo recorded of its sets ({} when nothing, or nothing readable)."""
    try:
        made = read_json(out / SETS)  # a regular file, read within bounds
    except (OSError, ValueError):
        return {}
    return made if isinstance(made, dict) and isinstance(made.get("files"), list) else {}


def _fit(run: Path, images: Path, labels: Path, cache: Path, epochs: int, lr: float,
         progress: bool, log) -> bool:
    """The CPU recipe (:data:`CPU_RECIPE`): frozen random tiny backbone, MoE head trained.
    Returns whether an earlier demo's trained model was reused."""
    from agiqa.pipeline.api import fit
    from agiqa.stages.rundir import is_finished

    log(f"[3/6] fit (stage two): frozen tiny backbone, MoE head trained, {epochs} epochs")
    if is_finished(run):
        log(f"      {run} already holds a trained model; reusing it")
        return True
    import shutil

    # An interrupted run of this demo starts over (the marker says the demo made it).
    shutil.rmtree(run, ignore_errors=True)
    result = fit(recipe="cpu", dataset="csv", root=images, labels=labels, cache=cache, out=run,
                 epochs=epochs, lr=lr, seed=20, loader_workers=0, progress=progress)
    log(f"      selected epoch {result.runs[0].best_epoch}")
    return False


def run_demo(out: str | os.PathLike, epochs: int = DEMO_EPOCHS, lr: float = CPU_RECIPE["lr"],
             seed: int = 0, progress: bool = True, log=print) -> DemoResult:
    """The whole pipeline offline on a CPU, through the functions behind the real commands.

    1. builds a tiny LLaVA (random weights, locally trained tokenizer) in ``out/tiny-llava``;
    2. writes a blur-graded set of real photographs (``out/images``, ``labels.csv``: four
       crops of each of 16, six grades), holding one photograph out (``out/unseen``);
    3. ``extract-semantics`` → ``out/cache``; ``fit`` → ``out/run`` with the CPU recipe
       (:data:`CPU_RECIPE`: the random ``tiny`` backbone frozen, its pooled ViT keys computed
       once and standardised, the MoE head trained on z-scored MOS and vectors at batch 32 and
       lr 3e-4 for 200 epochs, the last kept); ``evaluate`` on the validation and test splits →
       ``out/evaluation-val``, ``out/evaluation-test``; ``score-folder`` on the unseen photo →
       ``out/scores.csv``.

    ``out`` must be new, empty or an earlier demo's folder (it holds a marker file); an earlier
    demo's sets, cache and trained model are reused, and its evaluations too while the model,
    the images and their vectors are unchanged. The tiny models are random, so the numbers show
    the pipeline learning from image damage, not the quality judgement of a real MLLM.
    """
    from agiqa.pipeline.api import evaluate, extract_semantics, score_folder
    from agiqa.stages.rundir import CURVES_PLOT, SCATTER_PLOT

    out = Path(out)
    _claim(out)
    lap = _Laps()
    mllm, images, labels, sets_reused = _prepare(out, seed, log)
    lap("prepare")

    log("[2/6] extract-semantics (stage one)")
    cache = out / "cache"
    data = {"dataset": "csv", "root": images, "labels": labels}
    report = extract_semantics(**data, out=cache, mllm=str(mllm), loader_workers=0,
                               progress=progress)
    log(f"      {report.computed} computed, {report.reused} already cached, "
        f"{len(report.failures)} failed ({report.images_per_second:.1f} images/s)")
    lap("extract")

    run = out / "run"
    fit_reused = _fit(run, images, labels, cache, epochs, lr, progress, log)
    lap("fit")

    log("[4/6] evaluate")
    # An evaluation is a function of the model, the images and their vectors: when none of
    # them changed since an earlier demo evaluated them, its evaluation folders are read back.
    unchanged = sets_reused and fit_reused and report.computed == 0 and not report.changed
    metrics = {}
    for name in ("val", "test"):
        folder = out / f"evaluation-{name}"
        metrics[name] = _saved_metrics(folder) if unchanged else None
        if metrics[name] is None:
            metrics[name] = evaluate(run, **data, cache=cache, split=name, loader_workers=0,
                                     progress=False, out=folder).metrics
        else:
            log(f"      {name}: the model, its images and their vectors are unchanged; "
                f"reusing {folder}")
    lap("evaluate")

    log("[5/6] score-folder on a photograph the model never saw")
    scores_csv = out / "scores.csv"
    scored = score_folder(out / "unseen", model=run, cache=out / "score-cache", loader_workers=0,
                          progress=progress, out=scores_csv)
    if scored.failures or not scored.rows:  # the demo's own files: any failure is a fault
        name, why = next(iter(scored.failures.items()), ("", "no image found"))
        raise AgiqaError(f"{out / 'unseen'}: {len(scored.failures)} of the unseen photograph's "
                         f"files could not be scored ({name}: {why})")
    lap("score")
    log("[6/6] done")
    plots = [run / SCATTER_PLOT, run / CURVES_PLOT]
    unseen = [{"path": r["path"], "score": r["score"]} for r in scored.rows]
    return DemoResult(out, {k: {m: v[m] for m in ("srcc", "plcc", "krcc", "rmse")}
                            for k, v in metrics.items()}, plots, scores_csv, unseen, lap.seconds)
