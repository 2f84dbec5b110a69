"""Runs of a series trained together (one batched computation) equal the same runs alone."""

import csv
import json
import math

import pytest
import torch
from click.testing import CliRunner

from agiqa.cli import cli
from agiqa.models.agiqa_net import create_model
from agiqa.models.noise import Dropout, draw_noise, record_noise, replay_noise
from agiqa.stages.configs import FitConfig
from agiqa.stages.predict import predict
from agiqa.stages.training import together as together_module
from agiqa.stages.training import trainer as trainer_module
from agiqa.stages.training.together import RunInputs, run_memory, train_together
from agiqa.stages.training.trainer import Trainer

FIT = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
       "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q"]


def test_masks_drawn_ahead_are_the_masks_drawn_during_the_forward():
    torch.manual_seed(0)
    model = create_model("tiny", 2, 16).train()
    x, s = torch.rand(2, 3, 224, 224), torch.randn(2, 2, 16)
    with torch.no_grad(), record_noise() as rec:
        model(x, s)
    assert len(rec.spec) > 10 and all(0 < keep < 1 for _, keep in rec.spec)
    with torch.no_grad(), draw_noise(torch.Generator().manual_seed(5)):
        lazy = model(x, s)
    gen = torch.Generator().manual_seed(5)
    masks = [torch.rand(shape, generator=gen) < keep for shape, keep in rec.spec]
    with torch.no_grad(), replay_noise(masks):
        ahead = model(x, s)
    assert torch.equal(lazy, ahead)
    with torch.no_grad(), draw_noise(torch.Generator().manual_seed(6)):
        other = model(x, s)
    assert not torch.equal(lazy, other)  # the masks do change the forward
    with pytest.raises(RuntimeError, match="dropout mask [0-9]+: the forward asks for"):
        with torch.no_grad(), replay_noise(masks[1:]):
            model(x, s)


def test_dropout_without_a_source_is_torch_dropout():
    torch.manual_seed(1)
    a = Dropout(0.5).train()(torch.ones(1000))
    torch.manual_seed(1)
    b = torch.nn.Dropout(0.5).train()(torch.ones(1000))
    assert torch.equal(a, b)


def _trainers(tmp_path, seeds, epochs=2, n=20, dim=16):
    """Trainers of the tiny model on random pixels, one per seed, each in its own folder."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=gen)
    vectors = torch.randn(n, 2, dim, generator=gen)
    targets = torch.rand(n, generator=gen) * 4 + 1
    part = {"train": torch.arange(0, 12), "val": torch.arange(12, 16),
            "val_used": torch.arange(12, 16), "test": torch.arange(16, 20)}
    out = []
    for seed in seeds:
        cfg = FitConfig(dataset="csv", root=tmp_path, cache=tmp_path, out=tmp_path / f"s{seed}",
                        backbone="tiny", epochs=epochs, batch_size=4, seed=seed,
                        progress=False)
        cfg.out.mkdir(parents=True)
        torch.manual_seed(seed)
        model = create_model("tiny", 2, dim)
        optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=cfg.t_max, eta_min=0)
        out.append(Trainer(cfg, model, optim, sched, torch.Generator().manual_seed(seed),
                           torch.device("cpu")))
    return out, pixels, RunInputs(vectors, targets, part)


@pytest.mark.slow
def test_runs_trained_together_equal_the_runs_trained_alone(tmp_path):
    """Three seeds as one batched computation against each seed's own loop, float32 CPU:
    parameters, validation figures and the selected epoch agree (tolerance 1e-4)."""
    group, pixels, inp = _trainers(tmp_path / "together", [3, 4, 5])
    alone, _, _ = _trainers(tmp_path / "alone", [3, 5])
    assert train_together(group, pixels, [inp] * 3, _spec(group[0], 4)) == {}
    for t in alone:
        t.train(pixels, inp.vectors, inp.targets, inp.part)
    for a, b in ((group[0], alone[0]), (group[2], alone[1])):
        assert a.epoch == b.epoch == 2
        # Adam moves a parameter by about lr whatever its gradient's size, so parameters whose
        # gradients are near 0 drift apart by float rounding; the scores must not
        pa = predict(a.model, pixels, inp.vectors, torch.device("cpu"))
        pb = predict(b.model, pixels, inp.vectors, torch.device("cpu"))
        assert (pa - pb).abs().max() < 1e-4, (pa - pb).abs().max()
        assert a.best_epoch == b.best_epoch
        for ra, rb in zip(a.history, b.history, strict=True):
            assert abs(ra["val_srcc"] - rb["val_srcc"]) < 1e-4
            assert abs(ra["loss"] - rb["loss"]) < 1e-4 * max(1.0, abs(rb["loss"]))
            assert ra["lr"] == rb["lr"]
        ck_a = torch.load(a.cfg.out / "checkpoint.pt", weights_only=True)
        ck_b = torch.load(b.cfg.out / "checkpoint.pt", weights_only=True)
        # the checkpoint of a run trained with others is its own Adam's: same keys and shapes
        sa, sb = ck_a["optim"]["state"], ck_b["optim"]["state"]
        assert sa.keys() == sb.keys()
        assert all(sa[i]["exp_avg"].shape == sb[i]["exp_avg"].shape for i in sa)
        # each run its own: the seeds did not collapse into one model
    p0 = predict(group[0].model, pixels, inp.vectors, torch.device("cpu"))
    p1 = predict(group[1].model, pixels, inp.vectors, torch.device("cpu"))
    assert (p0 - p1).abs().max() > 1e-2


def _spec(trainer, batch):
    return run_memory(trainer.model, batch, 2, 16, torch.device("cpu"), False)[1]


@pytest.mark.slow
def test_a_nan_in_one_run_leaves_the_others_whole(tmp_path):
    group, pixels, inp = _trainers(tmp_path / "together", [3, 4, 5])
    alone, _, _ = _trainers(tmp_path / "alone", [5])
    bad = RunInputs(inp.vectors, inp.targets.clone(), inp.part)
    bad.targets[inp.part["train"]] = float("nan")
    failed = train_together(group, pixels, [inp, bad, inp], _spec(group[0], 4))
    assert list(failed) == [1] and "nan" in str(failed[1]) and "epoch 0" in str(failed[1])
    assert group[1].epoch == 0 and group[0].epoch == group[2].epoch == 2
    alone[0].train(pixels, inp.vectors, inp.targets, inp.part)
    state = dict(group[2].model.state_dict())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    pa = predict(group[2].model, pixels, inp.vectors, torch.device("cpu"))
    pb = predict(alone[0].model, pixels, inp.vectors, torch.device("cpu"))
    assert (pa - pb).abs().max() < 1e-4


def test_concurrent_runs_must_be_at_least_one(graded, tmp_path):
    root, cache = graded
    for bad in ("0", "-2"):
        r = CliRunner().invoke(cli, ["fit", *FIT, "--root", str(root), "--cache", str(cache),
                                     "--out", str(tmp_path / "run"), "--repeats", "2",
                                     "--concurrent-runs", bad])
        assert r.exit_code == 64, r.output
        assert "--concurrent-runs" in r.output
    assert not (tmp_path / "run").exists()


def test_too_many_concurrent_runs_are_refused_before_training(graded, tmp_path, monkeypatch):
    root, cache = graded
    monkeypatch.setattr(together_module, "free_memory", lambda device: 2**29)  # 0.5 GiB
    r = CliRunner().invoke(cli, ["fit", *FIT, "--root", str(root), "--cache", str(cache),
                                 "--out", str(tmp_path / "run"), "--repeats", "3",
                                 "--concurrent-runs", "3", "--epochs", "1"])
    assert r.exit_code != 0
    assert "--concurrent-runs 3: 3 runs together need about" in r.output
    assert "GiB per run" in r.output and "0.50 GiB free" in r.output
    assert not list((tmp_path / "run").glob("seed-*/train_log.jsonl"))


def _predictions(folder):
    with open(folder / "predictions.csv", newline="", encoding="utf-8") as f:
        return {r["key"]: float(r["score"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_fit_repeats_trains_together_resumes_and_equals_solo_runs(graded, tmp_path,
                                                                  monkeypatch):
    """`fit --repeats 3` trains its runs together (the summary says how many at once), an
    interrupted series resumes every unfinished run, and each run equals its solo `fit`."""
    root, cache = graded
    args = [*FIT, "--root", root, "--cache", cache, "--epochs", "2",
            "--split-seed", "20"]
    run = CliRunner().invoke
    solo = run(cli, [str(a) for a in ["fit", *args, "--seed", "22", "--out", tmp_path / "solo"]])
    assert solo.exit_code == 0, solo.output

    original = Trainer.end_epoch

    def stop_seed_22(self, *a, **kw):
        if self.cfg.seed == 22 and self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(trainer_module.Trainer, "end_epoch", stop_seed_22)
    series = [str(a) for a in ["fit", *args, "--seed", "20", "--repeats", "3", "--out",
                               tmp_path / "series", "--concurrent-runs", "3"]]
    r = run(cli, series)
    assert r.exit_code != 0
    assert (tmp_path / "series" / "seed-22" / "checkpoint.pt").is_file()
    monkeypatch.setattr(trainer_module.Trainer, "end_epoch", original)
    r = run(cli, [*series, "--resume", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "series" / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"] if r["error"] is None] == \
        ["seed 20", "seed 21", "seed 22"]
    assert (tmp_path / "series" / ".agiqa-finished").is_file()
    assert summary["concurrency"]["concurrent_runs"] == 3
    a = _predictions(tmp_path / "series" / "seed-22")
    b = _predictions(tmp_path / "solo")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-4
    alone = json.loads((tmp_path / "solo" / "metrics.json").read_text())
    together = json.loads((tmp_path / "series" / "seed-22" / "metrics.json").read_text())
    assert together["best_epoch"] == alone["best_epoch"]
    assert [row["epoch"] for row in together["history"]] == [0, 1]
    assert math.isclose(together["test"]["srcc"], alone["test"]["srcc"], abs_tol=1e-4)
