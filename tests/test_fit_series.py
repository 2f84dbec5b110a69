"""Series of runs (``--repeats``): a run that diverges is named and the others finish."""

import json

import pytest
from click.testing import CliRunner

from agiqa.cli import cli
from agiqa.stages.training import together as together_module
from agiqa.stages.training import trainer as trainer_module

FIT = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
       "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q"]


def _series_args(graded) -> list:
    root, cache = graded
    return [*FIT, "--root", root, "--cache", cache, "--epochs", "1", "--lr", "3e-4", "--json"]


@pytest.fixture(scope="module")
def solo_seed_20(graded, tmp_path_factory) -> dict:
    """The test metrics of seed 20 trained alone."""
    out = tmp_path_factory.mktemp("solo") / "run"
    solo = CliRunner().invoke(cli, [str(a) for a in ["fit", *_series_args(graded), "--seed",
                                                     "20", "--out", out]])
    assert solo.exit_code == 0, solo.output
    return json.loads((out / "metrics.json").read_text())["test"]


@pytest.mark.slow
@pytest.mark.parametrize("concurrent", ["1", "3"])
def test_a_diverged_run_leaves_the_others_whole(graded, solo_seed_20, tmp_path, monkeypatch,
                                                concurrent):
    args = _series_args(graded)
    original = trainer_module.Trainer._step

    def nan_for_seed_21(self, *a):
        err, n = original(self, *a)
        return (float("nan"), n) if self.cfg.seed == 21 else (err, n)

    together_epoch = together_module._Group.epoch

    def nan_for_seed_21_together(self, *a):
        losses, steps, images, bad = together_epoch(self, *a)
        bad.update({r: "the loss became nan at epoch 0, step 0" for r, t in
                    enumerate(self.trainers) if t.cfg.seed == 21})
        return losses, steps, images, bad

    monkeypatch.setattr(trainer_module.Trainer, "_step", nan_for_seed_21)
    monkeypatch.setattr(together_module._Group, "epoch", nan_for_seed_21_together)
    r = CliRunner().invoke(cli, [str(a) for a in ["fit", *args, "--repeats", "3",
                                                  "--concurrent-runs", concurrent,
                                                  "--out", tmp_path / "series"]])
    assert r.exit_code == 0, r.output
    assert "seed 21" in r.stderr and "failed" in r.stderr
    summary = json.loads((tmp_path / "series" / "summary.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert [r["name"] for r in summary["runs"] if r["error"] is None] == ["seed 20", "seed 22"]
    assert runs["seed 21"]["seed"] == 21 and runs["seed 21"]["test"] is None
    assert "nan" in runs["seed 21"]["error"]
    assert summary["summary"]["srcc"]["n"] == 2
    assert (tmp_path / "series" / "seed-22" / "model.safetensors").is_file()
    assert abs(runs["seed 20"]["test"]["srcc"] - solo_seed_20["srcc"]) < 1e-6
