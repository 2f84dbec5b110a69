"""``agiqa demo``: the whole pipeline offline, through the functions behind the commands."""

import csv
import json

from click.testing import CliRunner
from PIL import Image

from agiqa.cli import cli
from agiqa.pipeline.demo import make_graded_set


def test_graded_set_labels_follow_the_damage(tmp_path):
    labels = make_graded_set(tmp_path, distortions=("blur", "shuffle"), grades=3,
                             photos=["astronaut", "coffee"])
    with open(labels, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (1 + 2 * 2)
    for r in rows:
        assert Image.open(tmp_path / r["image"]).size == (160, 120)
        expected = 5 - 4 * int(r["grade"]) / 2
        assert abs(float(r["mos"]) - expected) < 0.5
    shuffled = Image.open(tmp_path / "astronaut-0-shuffle2.png")
    original = Image.open(tmp_path / "astronaut-0-none0.png")
    assert sorted(shuffled.getdata()) != [] and list(shuffled.getdata()) != list(original.getdata())


def test_demo_runs_offline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--epochs", "1", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "SRCC" in r.output and "\ntest " in r.output
    for name in ("run/model.safetensors", "run/split.csv", "run/scatter_test.png",
                 "run/training_curves.png", "cache/manifest.json", "images/labels.csv",
                 "scores.csv"):
        assert (out / name).is_file(), name
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and all(r["path"].startswith("flower-") for r in rows)
    assert {"gate_semantic_content", "gate_coherence", "gate_image", "zero_shot"} <= set(rows[0])
    # A second run reuses the cache and the trained model, and --json is machine-readable.
    again = CliRunner().invoke(cli, ["demo", "--out", str(out), "--epochs", "1", "-q", "--json"],
                               catch_exceptions=False)
    result = json.loads(again.stdout)
    assert set(result["metrics"]) == {"val", "test"} and len(result["unseen"]) == 7
