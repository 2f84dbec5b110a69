"""A new user's first real run: a folder laid out as AGIQA-3K (its real label file, cut to its
first 400 rows), the paper split. The split of the whole file is checked in test_data.py."""

import csv
import json
import random

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from agiqa.cli import cli

ROWS = 400


@pytest.mark.slow
def test_extract_and_fit_with_the_paper_split_on_agiqa3k_names(tmp_path, tiny_llava, label_files):
    root = tmp_path / "AGIQA-3K"
    root.mkdir()
    # The first 400 rows: every image's backbone keys cost about 25 ms on a CPU core.
    with open(label_files / "agiqa-3k" / "data.csv", newline="", encoding="utf-8") as f:
        header, *lines = f.read().splitlines(keepends=True)
    (root / "data.csv").write_text(header + "".join(lines[:ROWS]), encoding="utf-8")
    with open(root / "data.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ROWS
    rng = np.random.default_rng(0)
    for r in rows:  # tiny images whose brightness follows the MOS
        level = int(40 + 40 * float(r["mos_quality"]))
        a = np.clip(rng.normal(level, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / r["name"], quality=90)
    run = CliRunner().invoke
    cache, out = tmp_path / "cache", tmp_path / "run"
    r = run(cli, ["extract-semantics", "--model", str(tiny_llava), "--dataset", "agiqa-3k",
                  "--root", str(root), "--out", str(cache), "--batch-size", "64", "-q",
                  "--loader-workers", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    # The backbone frozen (its keys computed once); the split, the steps and the validation
    # images are the protocol's all the same.
    r = run(cli, ["fit", "--dataset", "agiqa-3k", "--root", str(root), "--cache", str(cache),
                  "--out", str(out), "--split", "paper", "--backbone", "tiny",
                  "--backbone-lr", "0", "--no-augment", "--epochs", "1", "--batch-size", "32",
                  "--loader-workers", "0", "-q", "--json"],
            catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for name in ("model.safetensors", "config.json", "metrics.json", "predictions.csv",
                 "split.csv", "train_log.jsonl", "scatter_test.png", "training_curves.png"):
        assert (out / name).is_file(), name
    # The official split (dataset_general): random.seed(20); random.shuffle(range(n)); cut at
    # int(n * 0.7) and int(n * 0.8).
    index = list(range(len(rows)))
    random.seed(20)
    random.shuffle(index)
    a, b = int(len(rows) * 0.7), int(len(rows) * 0.8)
    expected = {rows[i]["name"]: "train" for i in index[:a]}
    expected.update({rows[i]["name"]: "val" for i in index[a:b]})
    expected.update({rows[i]["name"]: "test" for i in index[b:]})
    with open(out / "split.csv", newline="", encoding="utf-8") as f:
        written = {row["key"]: row["subset"] for row in csv.DictReader(f)}
    assert written == expected
    counts = [sum(v == s for v in written.values()) for s in ("train", "val", "test")]
    assert counts == [280, 40, 80]
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == {"name": "agiqa-3k", "target": "mos_quality",
                                 "split": "paper(seed=20)"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["test"]["srcc"])
    # full batches only (drop_last): 280 // 32 steps; validation 40 - 40 % 32 images
    row = metrics["history"][0]
    assert (row["steps"], row["train_images"], row["val_images"]) == (8, 256, 32)
    assert config["training"]["amp"] is False
    assert config["backbone_weights"]["pretrained"] is False
