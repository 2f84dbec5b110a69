"""``agiqa experiment`` end to end on tiny models: the built-in plans on small generated images
laid out like the real sets and named from their label files (tests/data/experiment), fewer
repeats; the table against the runs' own metrics.json; reruns that retrain nothing."""

from __future__ import annotations

import csv
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import agiqa
from agiqa.cli import cli
from agiqa.fileio import read_json
from agiqa.pipeline.experiment import RESULT_COLUMNS, TABLE_COLUMNS

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "experiment"
SETS = {"agiqa-3k": ("data.csv", "mos_quality", 5.0),
        "aigciqa-20k": ("info_train.csv", "mos", 5.0),
        "aigciqa2023": ("AIGCIQA2023.csv", "quality_mos", 100.0)}


@pytest.fixture(scope="session")
def sets(tmp_path_factory, tiny_llava):
    """Three 40-image sets named from the real label files, and their caches extracted once
    (where the plans' cache ``mplug-owl2`` looks with ``cache_dir``)."""
    base = tmp_path_factory.mktemp("experiment-sets")
    rng = np.random.default_rng(0)
    roots = {}
    for name, (labels, column, scale) in SETS.items():
        root = base / name
        root.mkdir()
        shutil.copy(DATA / name / labels, root / labels)
        with open(root / labels, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):  # tiny images whose brightness follows the MOS
                level = int(30 + 180 * float(r[column]) / scale)
                a = np.clip(rng.normal(level, 15, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / r["name"])
        roots[name] = root
        agiqa.extract_semantics(dataset=name, root=root, out=base / "caches" / "mplug-owl2" /
                                name, model=str(tiny_llava), loader_workers=0, progress=False)
    return {"roots": roots, "caches": base / "caches", "mllm": tiny_llava}


def _fast(sets, *more: str) -> list[str]:
    """The plan on the tiny backbone, frozen, one epoch; the shared caches."""
    overrides = ["fit.backbone=tiny", "fit.backbone_lr=0", "fit.augment=false", "fit.epochs=1",
                 "fit.loader_workers=0", f"caches.mplug-owl2.model={sets['mllm']}",
                 f"cache_dir={sets['caches']}", *more]
    return [a for o in overrides for a in ("--set", o)]


def _roots(sets, *names: str) -> list[str]:
    return [a for n in names for a in ("--root", f"{n}={sets['roots'][n]}")]


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _check_table_by_hand(out: Path, cells: int) -> None:
    """table.csv against the mean and sample std of the runs' own metrics.json."""
    header, results = _csv(out / "results.csv")
    assert header == [*RESULT_COLUMNS, "error"]
    by_cell: dict[tuple, list[dict]] = {}
    for r in results:
        assert r["error"] == ""
        m = read_json(Path(r["run_dir"]) / "metrics.json")
        if r["test_dataset"] == r["train_dataset"]:
            assert float(r["srcc"]) == m["test"]["srcc"]
            assert int(r["best_epoch"]) == m["best_epoch"]
            by_cell.setdefault((r["variant"], r["train_dataset"]), []).append(m["test"])
    header, table = _csv(out / "table.csv")
    assert header == list(TABLE_COLUMNS)
    in_set = [t for t in table if t["train_dataset"] == t["test_dataset"]]
    assert len(in_set) == cells
    for t in in_set:
        runs = by_cell[(t["variant"], t["train_dataset"])]
        assert int(t["n"]) == len(runs)
        for k in ("srcc", "plcc", "krcc", "rmse"):
            values = [m[k] for m in runs]
            assert float(t[f"{k}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
            if len(values) > 1:  # the sample std (ddof 1); none of one run
                assert float(t[f"{k}_std"]) == pytest.approx(statistics.stdev(values),
                                                             abs=1e-12)
            else:
                assert t[f"{k}_std"] == ""


def test_paper_main_end_to_end_then_a_rerun_retrains_nothing(tmp_path, sets):
    out = tmp_path / "main"
    args = ["experiment", "paper-main", "--out", str(out),
            *_roots(sets, *SETS), *_fast(sets, "repeats=2"), "-q"]
    first = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    _check_table_by_hand(out, cells=3)
    md = (out / "table.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| ma-agiqa | agiqa-3k |"))
    assert "0.8939 / 0.9273" in line and "Wang et al., ACM MM 2024" in line
    html = (out / "report.html").read_text()
    assert 'href="./reports/ma-agiqa/agiqa-3k/seed-20.html"' in html
    assert (out / "reports" / "ma-agiqa" / "agiqa-3k" / "seed-20.html").is_file()
    before = _snapshot(out / "runs")

    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert _snapshot(out / "runs") == before  # nothing retrained, nothing rewritten
    assert again.output == first.output  # the same table

    changed = CliRunner().invoke(cli, [*args, "--set", "fit.epochs=2"])
    assert changed.exit_code == 1
    assert changed.output.count("\n") == 1 and "paper-main.toml: the plan changes run " \
        "ma-agiqa on agiqa-3k" in changed.output
    assert _snapshot(out / "runs") == before


def test_paper_cross_through_the_api_and_a_plan_that_adds_runs(tmp_path, sets):
    out = tmp_path / "cross"
    roots = {k: sets["roots"][k] for k in ("agiqa-3k", "aigciqa-20k")}
    fast = _fast(sets, "repeats=1")[1::2]
    table = agiqa.experiment("paper-cross", out=out, roots=roots, overrides=fast,
                             progress=False, log=lambda line: None)
    assert isinstance(table, agiqa.ExperimentTable)
    assert [(r.train_dataset, r.test_dataset, r.n) for r in table.rows] == [
        ("agiqa-3k", "agiqa-3k", 1), ("agiqa-3k", "aigciqa-20k", 1),
        ("aigciqa-20k", "aigciqa-20k", 1), ("aigciqa-20k", "agiqa-3k", 1)]
    run = out / "runs" / "ma-agiqa" / "agiqa-3k" / "seed-20"
    by_hand = agiqa.evaluate(run, dataset="aigciqa-20k", root=roots["aigciqa-20k"],
                             cache=sets["caches"] / "mplug-owl2" / "aigciqa-20k", split="all",
                             loader_workers=0, progress=False)
    assert table.row("ma-agiqa", "agiqa-3k", "aigciqa-20k").srcc_mean == by_hand["srcc"]
    before = _snapshot(out / "runs" / "ma-agiqa" / "agiqa-3k" / "seed-20")

    more = agiqa.experiment("paper-cross", out=out, roots=roots,
                            overrides=[*fast, "repeats=2"], progress=False, log=print)
    assert _snapshot(out / "runs" / "ma-agiqa" / "agiqa-3k" / "seed-20") == before
    assert [r.n for r in more.rows] == [2, 2, 2, 2]
    assert (out / "runs" / "ma-agiqa" / "agiqa-3k" / "seed-21" / "metrics.json").is_file()
    assert more.row("ma-agiqa", "agiqa-3k", "aigciqa-20k").srcc_std > 0


def test_paper_ablation_variants_recorded_scored_and_reported(tmp_path, sets):
    out = tmp_path / "ablation"
    r = CliRunner().invoke(cli, ["experiment", "paper-ablation", "--out", str(out),
                                 *_roots(sets, "agiqa-3k"), *_fast(sets, "repeats=1"), "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    _check_table_by_hand(out, cells=6)
    expected = {"ma-agiqa": (None, True, "moe"), "image-only": ([], True, "moe"),
                "semantic-content-only": ([0], False, "moe"),
                "coherence-only": ([1], False, "moe"),
                "concat": (None, True, "concat"), "mean": (None, True, "mean")}
    for variant, (prompts, image, fusion) in expected.items():
        config = read_json(out / "runs" / variant / "agiqa-3k" / "seed-20" / "config.json")
        model = config["model"]
        assert (model["semantic_experts"], model["image_expert"], model["fusion"]) == \
            (prompts, image, fusion), variant
        assert config["training"]["fusion"] == fusion
    # score-folder scores an ablation like any run: the run's own test predictions again
    for variant in ("image-only", "mean"):
        run = out / "runs" / variant / "agiqa-3k" / "seed-20"
        _, preds = _csv(run / "predictions.csv")
        report = agiqa.score_folder(sets["roots"]["agiqa-3k"], model=run,
                                    cache=sets["caches"] / "mplug-owl2" / "agiqa-3k",
                                    loader_workers=0)
        scored = {Path(row["path"]).name: row["score"] for row in report.rows}
        for p in preds:
            assert scored[p["key"]] == pytest.approx(float(p["score"]), rel=1e-4, abs=1e-4)
        if variant == "mean":
            assert {(p["gate_semantic_content"], p["gate_coherence"], p["gate_image"])
                    for p in preds} == {("0.333333",) * 3}
        else:
            assert {p["gate_semantic_content"] for p in preds} == {"0"}


def test_a_failed_run_is_a_row_and_an_interrupted_one_waits_for_resume(tmp_path, sets):
    plan = tmp_path / "plan.toml"
    plan.write_text("""
[datasets.agiqa-3k]
[caches.mplug-owl2]
model = "mplug-owl2"
[variants.ok]
[variants.tiny-split]
split = "random:0.05,0.05,0.9"
""")
    out = tmp_path / "exp"
    args = ["experiment", str(plan), "--out", str(out), *_roots(sets, "agiqa-3k"),
            *_fast(sets)]
    r = CliRunner().invoke(cli, [*args, "-q"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    _, rows = _csv(out / "results.csv")
    assert [(x["variant"], x["error"] == "") for x in rows] == [("ok", True),
                                                                ("tiny-split", False)]
    assert "the val split has 2 image(s)" in rows[1]["error"]
    # A run killed mid-training: its folder holds checkpoint.pt; without --resume it waits.
    killed = out / "runs" / "ok" / "agiqa-3k" / "seed-21"
    killed.mkdir()
    (killed / ".agiqa-run").write_text("")
    (killed / "checkpoint.pt").write_bytes(b"")
    r = CliRunner().invoke(cli, [*args, "--set", "repeats=2"], catch_exceptions=False)
    assert r.exit_code == 2
    _, rows = _csv(out / "results.csv")
    waiting = [x for x in rows if x["run_dir"] == str(killed)]
    assert len(waiting) == 1 and "rerun with --resume" in waiting[0]["error"]
    assert [x["error"] for x in rows if x["variant"] == "ok" and x["seed"] == "20"] == [""]


def test_cpu_demo_runs_and_its_table_is_the_runs_by_hand(tmp_path):
    out = tmp_path / "exp"
    args = ["experiment", "cpu-demo", "--out", str(out), "--set", "repeats=2",
            "--set", "fit.epochs=5", "--set", "datasets.demo.crops=1"]
    r = CliRunner().invoke(cli, [*args, "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    _check_table_by_hand(out, cells=3)
    dry = CliRunner().invoke(cli, [*args, "--dry-run"], catch_exceptions=False)
    assert "6 finished, 0 to train" in dry.output
    assert "1 needed, 1 already cached" in dry.output
