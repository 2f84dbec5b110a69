"""Experiment plans: parsing, the one-line refusals naming the plan file and the field, the
built-in plans, the table's statistics (fast: nothing trains)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from agiqa.cli import cli
from agiqa.pipeline.experiment import (
    RESULT_COLUMNS,
    TABLE_COLUMNS,
    PlanError,
    ResultRow,
    load_plan,
    plan_groups,
    summarise,
)

BASE = """
repeats = 2
[datasets.a]
preset = "csv"
root = "{root}"
labels = "{root}/labels.csv"
[caches.owl]
model = "mplug-owl2"
"""


def _plan(tmp_path: Path, extra: str = "", base: str = BASE) -> Path:
    (tmp_path / "labels.csv").write_text("image,mos\n")
    f = tmp_path / "plan.toml"
    f.write_text(base.format(root=tmp_path) + extra)
    return f


def _refused(path, match, **kw):
    with pytest.raises(PlanError) as e:
        load_plan(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)) or str(path) in msg, msg
    assert match in msg, msg
    return msg


def test_an_unknown_variant_option_names_the_file_the_field_and_the_close_one(tmp_path):
    f = _plan(tmp_path, "[variants.fast]\nepoch = 3\n")
    msg = _refused(f, "variants.fast.epoch: unknown fit option")
    assert "did you mean epochs" in msg


def test_a_dataset_without_root(tmp_path):
    f = _plan(tmp_path, "[datasets.b]\npreset = \"agiqa-3k\"\n")
    _refused(f, "datasets.b.root: missing; give the image folder with roots={'b': DIR}")
    plan = load_plan(f, roots={"b": tmp_path})
    assert plan.datasets["b"].root == tmp_path
    # The command line names its flags.
    r = CliRunner().invoke(cli, ["experiment", str(f), "--out", str(tmp_path / "x"),
                                 "--dry-run"])
    assert r.exit_code == 1 and "give the image folder with --root b=DIR" in r.output
    r = CliRunner().invoke(cli, ["experiment", str(f), "--out", str(tmp_path / "x"),
                                 "--root", "b=/x", "--root", "c=/y", "--dry-run"])
    assert r.exit_code == 1 and "--root 'c': the plan has no such data set" in r.output


def test_a_cross_pair_of_different_scales_needs_score_norm(tmp_path):
    extra = ('[datasets.k]\npreset = "agiqa-3k"\nroot = "/x"\n'
             '[datasets.w]\npreset = "aigciqa2023"\nroot = "/y"\n'
             '[[cross]]\ntrain = "k"\ntest = "w"\n')
    f = _plan(tmp_path, extra)
    _refused(f, "cross[0]: k (0 to 5) and w (0 to 100) have different score scales")
    assert load_plan(f, overrides=["fit.score_norm=zscore"]).cross[0].test == "w"


def test_a_variant_the_caches_prompts_cannot_run(tmp_path):
    f = _plan(tmp_path, "[variants.x]\nexperts = \"image,colour\"\n")
    _refused(f, "variants.x.experts: 'colour' is not an expert of cache owl")


def test_a_plan_that_does_not_parse(tmp_path):
    f = _plan(tmp_path, "[variants.x\n")
    _refused(f, "not valid TOML")


def test_unknown_keys_and_values_are_refused_with_their_field(tmp_path):
    _refused(_plan(tmp_path, "repeat = 3\n"), "repeat: unknown key")
    _refused(_plan(tmp_path, "[variants.x]\nfusion = \"sum\"\n"),
             "variants.x: fusion= must be one of moe, concat, mean")
    _refused(_plan(tmp_path, "[variants.x]\nseed = 3\n"), "variants.x.seed: set by the plan")
    _refused(_plan(tmp_path, "[variants.x]\nsemantics = \"llava\"\n"),
             "variants.x.semantics: no cache 'llava'")
    _refused(_plan(tmp_path), "overrides= 'oops': give KEY=VALUE", overrides=["oops"])
    with pytest.raises(PlanError, match="plan file not found"):
        load_plan(tmp_path / "missing.toml")


def test_overrides_set_dotted_keys_as_toml_values(tmp_path):
    f = _plan(tmp_path, "[variants.x]\n")
    plan = load_plan(f, overrides=["repeats=3", "fit.epochs=2", "fit.backbone=tiny",
                                   "caches.owl.model=/models/owl"])
    assert plan.repeats == 3 and plan.caches["owl"].model == "/models/owl"
    assert plan.variants["x"].options == {"epochs": 2, "backbone": "tiny"}
    groups = plan_groups(plan, tmp_path / "exp")
    assert [(g.variant, g.dataset) for g in groups] == [("x", "a")]
    assert [r.run_dir.name for r in groups[0].runs] == ["seed-20", "seed-21", "seed-22"]
    assert groups[0].fit.cache == tmp_path / "exp" / "caches" / "owl" / "a"
    split = load_plan(f, overrides={"repeats": 1, "split_seeds": 2})
    assert [r.run_dir.name for r in plan_groups(split, tmp_path)[0].runs] == ["split-20",
                                                                             "split-21"]


def test_the_built_in_plans_load_and_list():
    from agiqa.pipeline.demo import CPU_RECIPE
    from agiqa.report.html import PUBLISHED

    roots = {"agiqa-3k": "/a", "aigciqa-20k": "/b", "aigciqa2023": "/c"}
    main = load_plan("paper-main", roots=roots)
    assert list(main.datasets) == ["agiqa-3k", "aigciqa-20k", "aigciqa2023"]
    assert main.repeats == 10 and main.caches["mplug-owl2"].model == "mplug-owl2"
    assert main.variants["ma-agiqa"].options == {}  # the fit defaults: the official protocol
    for p in main.published:  # the figures the run reports show, from one place
        assert (p["srcc"], p["plcc"]) == (PUBLISHED[p["train_dataset"]]["srcc"],
                                          PUBLISHED[p["train_dataset"]]["plcc"])
    cross = load_plan("paper-cross", roots={k: roots[k] for k in ("agiqa-3k", "aigciqa-20k")})
    assert [(c.train, c.test, c.split) for c in cross.cross] == [
        ("agiqa-3k", "aigciqa-20k", "all"), ("aigciqa-20k", "agiqa-3k", "all")]
    ablation = load_plan("paper-ablation", roots={"agiqa-3k": "/a"})
    assert {k: v.options for k, v in ablation.variants.items()} == {
        "ma-agiqa": {}, "image-only": {"experts": "image"},
        "semantic-content-only": {"experts": "semantic_content"},
        "coherence-only": {"experts": "coherence"}, "concat": {"fusion": "concat"},
        "mean": {"fusion": "mean"}}
    demo = load_plan("cpu-demo")
    assert {k: v for k, v in demo.fit.items() if k != "loader_workers"} == CPU_RECIPE
    r = CliRunner().invoke(cli, ["experiment", "--list"])
    assert r.exit_code == 0 and all(n in r.output for n in
                                    ("paper-main", "paper-cross", "paper-ablation", "cpu-demo"))
    r = CliRunner().invoke(cli, ["presets", "list", "--kind", "plans"])
    assert r.exit_code == 0 and "paper-ablation" in r.output
    r = CliRunner().invoke(cli, ["experiment", "paper-main", "--out", "x"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and "paper-main.toml: datasets.agiqa-3k.root" \
        in r.output and len(r.output.strip().splitlines()) == 1


def test_the_table_is_the_mean_and_sample_std_of_finished_runs():
    def row(seed, srcc, error=""):
        if srcc is None:
            return ResultRow("v", "a", "a", seed, 20, None, None, None, None, None,
                             f"r/{seed}", error)
        return ResultRow("v", "a", "a", seed, 20, srcc, srcc / 2, srcc / 3, 1 - srcc, 3,
                         f"r/{seed}", error)

    runs = [row(20, 0.8), row(21, 0.7), row(22, 0.9), row(23, None, "diverged")]
    (t,) = summarise(runs, [{"train_dataset": "a", "srcc": 0.5, "source": "x"}])
    assert t.n == 3 and t.failed == 1
    assert t.srcc_mean == pytest.approx(statistics.mean([0.8, 0.7, 0.9]))
    assert t.srcc_std == pytest.approx(statistics.stdev([0.8, 0.7, 0.9]))  # ddof 1
    assert t.rmse_std == pytest.approx(statistics.stdev([0.2, 0.3, 0.1]))
    assert t.published["source"] == "x"
    (one,) = summarise([row(20, 0.8)])
    assert one.n == 1 and math.isnan(one.srcc_std)
    assert RESULT_COLUMNS == ("variant", "train_dataset", "test_dataset", "seed", "split_seed",
                              "srcc", "plcc", "krcc", "rmse", "best_epoch", "run_dir")
    assert TABLE_COLUMNS[4:] == ("srcc_mean", "srcc_std", "plcc_mean", "plcc_std",
                                 "krcc_mean", "krcc_std", "rmse_mean", "rmse_std")
