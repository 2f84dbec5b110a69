"""Tiny runs and score lists for the tests of the HTML reports, built directly.

No MLLM and no training: a tiny random model saved as a run, photographs (or noise) as images,
and predictions written as ``fit`` writes them. Reports read only these files, so they are a
fair input; the numbers mean nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["TRICKY_NAME", "make_images", "make_run", "make_score_rows"]

# An image name that would inject markup and a script if a page did not escape it.
TRICKY_NAME = "x<img src=q onerror=alert(1)>&amp;\"quote'\nline.png"


def make_images(folder: Path, names: list[str], size: tuple[int, int] = (96, 64),
                seed: int = 0) -> None:
    """Smooth random colour images (PNG or JPEG by suffix) under ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        img.save(folder / name)


def make_run(folder: Path, root: Path, n: int = 10, dataset: str = "csv",
             target: str = "mos", names: list[str] | None = None, seed: int = 0) -> Path:
    """A finished ``fit`` run of a tiny random model over ``n`` images written under ``root``
    (half of them in the test subset)."""
    import torch

    from agiqa.models.agiqa_net import create_model, save_model

    names = names or [f"img_{i:02d}.png" for i in range(n)]
    make_images(root, names, seed=seed)
    torch.manual_seed(seed)
    model = create_model("tiny", num_prompts=2, semantic_dim=8, pretrained=False)
    save_model(model, folder, {
        "prompt_names": ["semantic_content", "coherence"],
        "dataset": {"name": dataset, "target": target, "split": "random"},
        "training": {"root": str(root), "cache": None, "labels": None},
    })
    rng = np.random.default_rng(seed)
    with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "subset", "mos", "score", "gate_semantic_content", "gate_coherence",
                    "gate_image"])
        for i, name in enumerate(names):
            mos, err = rng.uniform(1, 5), rng.normal(0, 0.7)
            gates = rng.normal(0.4, 0.3, 3)
            w.writerow([name, "test" if i % 2 == 0 else "train", f"{mos:.4f}",
                        f"{mos + err:.4f}", *[f"{g:.4f}" for g in gates]])
    history = [{"epoch": e, "loss": 2.0 / (e + 1), "val_srcc": 0.5 + 0.05 * e,
                "val_plcc": 0.55 + 0.04 * e} for e in range(4)]
    (folder / "metrics.json").write_text(json.dumps({
        "test": {"srcc": 0.61, "plcc": 0.66, "krcc": 0.45, "rmse": 0.71},
        "best_epoch": 3, "history": history}))
    return folder


def make_score_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows as ``score-folder`` returns them (names ``img_00000.png`` …)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        g = rng.normal(0.4, 0.3, 3)
        rows.append({"path": f"img_{i:05d}.png", "score": float(rng.normal(3.0, 0.8)),
                     "gate_semantic_content": float(g[0]), "gate_coherence": float(g[1]),
                     "gate_image": float(g[2]), "zero_shot": float(rng.uniform(1, 5))})
    return rows
