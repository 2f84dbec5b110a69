"""``agiqa demo``: the whole pipeline offline, through the functions behind the commands."""

import csv
import shutil

import numpy as np
import pytest
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
    original = np.asarray(Image.open(tmp_path / "astronaut-0-none0.png"), dtype=np.float32)
    shuffled = np.asarray(Image.open(tmp_path / "astronaut-0-shuffle2.png"), dtype=np.float32)
    blurred = np.asarray(Image.open(tmp_path / "astronaut-0-blur2.png"), dtype=np.float32)
    # Shuffling moves tiles (same pixels, another place); blur removes high frequencies.
    assert np.abs(shuffled - original).mean() > 5
    assert abs(shuffled.mean() - original.mean()) < 2
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(original, axis=1)).mean()


@pytest.mark.slow
@pytest.mark.xdist_group("demo-and-ray")  # one worker builds the session's demo for its users
def test_demo_learns_and_says_why_the_numbers_are_no_judgement(demo_run):
    out, result, seconds = demo_run.out, demo_run.report, demo_run.seconds
    print(f"demo: {seconds:.0f} s, test SRCC {result['metrics']['test']['srcc']:.3f}, "
          f"steps {result['seconds']}")
    assert result["metrics"]["test"]["srcc"] >= 0.6
    assert "not a quality judgement" in result["caveat"]
    for name in ("run/model.safetensors", "run/split.csv", "run/scatter_test.png",
                 "run/training_curves.png", "cache/manifest.json", "images/labels.csv",
                 "evaluation-val/evaluation.json", "evaluation-test/predictions.csv",
                 "scores.csv"):
        assert (out / name).is_file(), name
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == [f"flower-0-{k}.png" for k in
                                               ("blur1", "blur2", "blur3", "blur4", "blur5",
                                                "none0")]
    assert {"gate_semantic_content", "gate_coherence", "gate_image", "zero_shot"} <= set(rows[0])
    # A second run, in the demo folder moved elsewhere (the old one gone), reuses the cache and
    # the trained model, scores the unseen photograph from its moved cache and prints the table
    # and the caveat.
    moved, away = out.parent / "moved-demo", out.parent / "demo-away"
    shutil.copytree(out, moved, symlinks=True)
    written = {p: p.stat().st_mtime_ns for p in (moved / "images").iterdir()}
    out.rename(away)
    try:
        again = CliRunner().invoke(cli, ["demo", "--out", str(moved), "-q"],
                                   catch_exceptions=False)
    finally:
        away.rename(out)
    assert again.exit_code == 0, again.output
    # The sets were reused, not written again, and so were the evaluations of the unchanged
    # model on its unchanged vectors.
    assert {p: p.stat().st_mtime_ns for p in (moved / "images").iterdir()} == written
    assert f"reusing {moved / 'evaluation-test'}" in again.output
    with open(moved / "scores.csv", newline="", encoding="utf-8") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [r["path"] for r in rows]
    assert "already holds a trained model; reusing it" in again.output
    test_row = next(ln for ln in again.output.splitlines() if ln.startswith("test "))
    assert abs(float(test_row.split()[1]) - result["metrics"]["test"]["srcc"]) < 1e-4
    assert "not a quality judgement" in again.output
    # The unseen photograph's scores are commented, whichever way they go.
    from scipy.stats import spearmanr

    grades = [int(r["path"][-5]) for r in rows]
    rho = spearmanr(grades, [float(r["score"]) for r in rows])[0]
    assert f"SRCC {rho:+.2f} against the blur grade" in result["unseen_note"]
    assert result["unseen_note"] in again.output


def test_the_unseen_note_says_which_way_the_scores_go():
    from agiqa.pipeline.demo import unseen_note

    rows = [{"path": f"flower-0-blur{g}.png", "score": s} for g, s in
            zip(range(6), (4.0, 3.5, 3.0, 2.5, 2.0, 1.0), strict=True)]
    assert "scores fall with the blur (SRCC -1.00" in unseen_note(rows)
    rising = [{**r, "score": -r["score"]} for r in rows]
    assert "scores rise with the blur (SRCC +1.00" in unseen_note(rising)
    assert "not on a photograph held out whole" in unseen_note(rising)


def test_demo_deletes_nothing_it_did_not_make(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 1
    assert "was not made by agiqa demo; choose another --out" in r.output
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / ".agiqa-demo").exists() and not (tmp_path / "images").exists()
