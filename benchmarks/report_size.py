"""Size and time of a score-folder HTML report of many images.

Builds ``--rows`` score rows (score-folder's columns), writes the images the page shows (the
``--top-k`` lowest and highest; the others are never read by the report) as ``--image-size``
square JPEGs of smooth noise, and times :func:`agiqa.report.html.write_score_report` with the
patch maps of a random model of ``--backbone`` (``tiny``, or ``vit_base_patch8_224`` for the
paper's backbone: random weights, the same cost). Records the page size, the time, and the
time of the same page without maps.

    python benchmarks/report_size.py --rows 10000 --top-k 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agiqa.models.agiqa_net import create_model  # noqa: E402
from agiqa.report.html import score_rows, write_score_report  # noqa: E402
from common import write_result  # noqa: E402


def make_score_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` random rows in score-folder's columns (names ``img_00000.png`` …)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        g = rng.normal(0.4, 0.3, 3)
        rows.append({"path": f"img_{i:05d}.png", "score": float(rng.normal(3.0, 0.8)),
                     "gate_semantic_content": float(g[0]), "gate_coherence": float(g[1]),
                     "gate_image": float(g[2]), "zero_shot": float(rng.uniform(1, 5))})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "vit_base_patch8_224"])
    ap.add_argument("--out", default=None, help="result JSON [default: benchmarks/results/]")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = make_score_rows(args.rows)
    ordered = sorted(rows, key=lambda r: r["score"])
    shown = ordered[:args.top_k] + ordered[-args.top_k:]
    torch.manual_seed(0)
    model = create_model(args.backbone, num_prompts=2, semantic_dim=8, pretrained=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        s = args.image_size
        for r in shown:
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((s, s), Image.BICUBIC).save(folder / r["path"],
                                                                       quality=92)
        items, gate_names = score_rows(rows, folder)
        t = time.perf_counter()
        write_score_report(items, {}, Path(tmp) / "plain.html", gate_names, None, args.top_k)
        plain_s = time.perf_counter() - t
        t = time.perf_counter()
        result = write_score_report(items, {"broken.png": "not an image"}, Path(tmp) / "r.html",
                                    gate_names, model, args.top_k, csv_href="scores.csv",
                                    source="benchmark")
        total_s = time.perf_counter() - t
    write_result(f"report_size_{args.backbone}", {
        "rows": args.rows, "top_k": args.top_k, "images_shown": result.images_shown,
        "image_size": args.image_size, "backbone": args.backbone,
        "page_bytes": result.bytes, "page_mib": round(result.bytes / 2**20, 3),
        "report_seconds": round(total_s, 2), "without_maps_seconds": round(plain_s, 2),
        "note": "in-process time of write_score_report (thumbnails, maps, histogram, render), "
                "imports excluded; the machine was shared with other jobs (see load_average)",
    }, args.out)


if __name__ == "__main__":
    main()
