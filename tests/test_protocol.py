"""Stage two follows the official ``main.py`` point by point; its faults end in one clear line.

Most tests here train the tiny backbone for an epoch on 50 small images whose vectors are
written straight into a cache (no MLLM), so each takes seconds.
"""

import csv
import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from agiqa.cache import SemanticCache, ShardData, semantic_spec
from agiqa.data import load_dataset, make_split
from agiqa.errors import CheckpointError, ConfigError, ModelLoadError
from agiqa.metrics import fit_logistic
from agiqa.stages.training.trainer import (
    ProtocolWarning,
    select_epoch,
    steps_per_epoch,
    validation_figures,
    validation_images,
)


def official_split(label_file, seed=20):
    """``dataset_general(..., 'random')`` of the official ``utils/process.py``, re-typed."""
    with open(label_file, newline="", encoding="utf-8") as f:
        names = [row["name"] for row in csv.DictReader(f)]
    sel_num = list(range(len(names)))
    random.seed(seed)
    random.shuffle(sel_num)
    n = len(names)
    cut = [sel_num[: int(n * 0.7)], sel_num[int(n * 0.7) : int(n * 0.8)], sel_num[int(n * 0.8) :]]
    return [[names[i] for i in part] for part in cut]


@pytest.mark.parametrize("preset,folder,label_file,sizes", [
    ("agiqa-3k", "agiqa-3k", "data.csv", (2087, 298, 597)),
    ("aigciqa-20k", "aigciqa-20k", "info_train.csv", (9800, 1400, 2800)),
])
def test_paper_split_is_dataset_general_on_the_real_label_files(preset, folder, label_file,
                                                                 sizes, label_files):
    split = make_split(load_dataset(preset, label_files / folder), "paper", 20)
    train, val, test = official_split(label_files / folder / label_file)
    assert (len(split.train), len(split.val), len(split.test)) == sizes
    assert (split.train, split.val, split.test) == (train, val, test)


def test_full_batches_only_and_the_validation_batches_the_official_loader_keeps():
    assert steps_per_epoch(2087, 8) == 260  # AGIQA-3K at batch 8: drop_last=True
    assert validation_images(298, 8) == 296
    with pytest.warns(ProtocolWarning, match="drops the last partial batch of --batch-size 8.*"
                                             "only 5 image"):
        assert steps_per_epoch(5, 8) == 1
    with pytest.warns(ProtocolWarning, match="leave 0 of the 6 validation image"):
        assert validation_images(6, 8) == 6


def test_selection_uses_raw_plcc_where_the_fitted_one_disagrees():
    """Epoch 0 predicts linearly with noise, epoch 1 monotonically but curved: the logistic
    fit favours epoch 1, the official raw SRCC + Pearson PLCC epoch 0."""
    rng = np.random.default_rng(3)
    mos = np.linspace(0, 5, 60)
    linear = mos + rng.normal(0, 0.4, 60)
    curved = np.exp(mos)
    rows, fitted = [], []
    for epoch, pred in enumerate([linear, curved]):
        rows.append({"epoch": epoch, **validation_figures(pred, mos)})
        fitted.append(stats.spearmanr(pred, mos)[0]
                      + stats.pearsonr(fit_logistic(pred, mos)[0], mos)[0])
    assert rows[0]["val_plcc"] == pytest.approx(stats.pearsonr(linear, mos)[0])
    assert fitted[1] > fitted[0]  # the fitted rule would keep epoch 1
    assert rows[0]["val_score"] > rows[1]["val_score"]
    assert select_epoch(rows) == 0
    # main_score starts at 0: an epoch at or below 0 is never selected
    assert select_epoch([{"epoch": 0, "val_srcc": -0.2, "val_plcc": 0.1}]) is None
    assert select_epoch([{"epoch": 0, "val_srcc": float("nan"), "val_plcc": 0.5},
                         {"epoch": 1, "val_srcc": 0.1, "val_plcc": 0.0}]) == 1


@pytest.mark.slow
def test_the_paper_vit_tag_is_the_checkpoint_timm_0_5_5_loaded(monkeypatch, tmp_path):
    from timm.models import get_pretrained_cfg

    from agiqa.models.agiqa_net import PAPER_VIT, create_model, pretrained_name
    from agiqa.presets import load_backbone_preset

    assert PAPER_VIT == "vit_base_patch8_224.augreg_in21k_ft_in1k"
    assert pretrained_name("vit_base_patch8_224") == PAPER_VIT
    # timm 0.5.5 (vendored by the official repository), default_cfgs['vit_base_patch8_224']:
    url_055 = ("https://storage.googleapis.com/vit_models/augreg/B_8-i21k-300ep-lr_0.001-"
               "aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz")
    assert get_pretrained_cfg(PAPER_VIT).url == url_055
    assert get_pretrained_cfg("vit_base_patch8_224").tag != "augreg_in21k_ft_in1k"

    import timm.models._builder as builder

    def unreachable(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", unreachable)
    monkeypatch.setattr(builder, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(builder, "download_cached_file", unreachable)
    # A user preset of the same name (in $AGIQA_HOME) makes the paper's ViT small.
    small = dict(load_backbone_preset("vit_base_patch8_224").architecture(), pretrained=True,
                 vit_args={"embed_dim": 16, "depth": 1, "num_heads": 2},
                 feature_blocks=[0], maniqa_dim=16, dim_mlp=16)
    user = Path(os.environ["AGIQA_HOME"]) / "presets" / "backbones"
    user.mkdir(parents=True)
    (user / "vit_base_patch8_224.json").write_text(json.dumps(small))
    with pytest.raises(ModelLoadError) as err:
        create_model("vit_base_patch8_224", 2, 8, pretrained=None)
    msg = str(err.value)
    assert PAPER_VIT in msg and "--backbone-weights" in msg and "model.safetensors" in msg
    assert f"https://huggingface.co/timm/{PAPER_VIT}" in msg


def test_tiny_never_reaches_for_weights_and_refuses_them():
    from agiqa.models.agiqa_net import create_model, resolve_pretrained

    assert resolve_pretrained("tiny", None) is False
    create_model("tiny", 2, 8, pretrained=None)  # no hub, no error
    with pytest.raises(ConfigError, match="'tiny' has no published weights"):
        resolve_pretrained("tiny", True)
    with pytest.raises(ConfigError, match="no published weights"):
        resolve_pretrained("tiny", None, "vit.safetensors")
    assert resolve_pretrained("vit_base_patch8_224", None) is True


# -- a small data set with a hand-written cache ----------------------------------------------
N_IMAGES, DIM = 50, 8


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """50 images of 32×32 whose brightness follows the MOS; vectors that carry it too."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    rows, shas, vectors = ["image,mos"], [], []
    keys = [f"img_{i:02d}.png" for i in range(N_IMAGES)]
    for i, key in enumerate(keys):
        mos = 1 + 4 * i / (N_IMAGES - 1)
        a = np.clip(rng.normal(40 * mos, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / key)
        shas.append(hashlib.sha256((root / key).read_bytes()).hexdigest())
        vectors.append(rng.normal(mos, 1.0, (2, DIM)))
        rows.append(f"{key},{mos:.4f}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    cache = root.parent / f"{root.name}-cache"
    spec = semantic_spec("synthetic/mllm", None, "float32", ["p1", "p2"], "", ["good", "bad"])
    c = SemanticCache.create(cache, spec, ["semantic_content", "coherence"], DIM, root=root)
    c.write_shard("shard-00000", ShardData(keys, shas, np.asarray(vectors, np.float16),
                                           np.zeros((N_IMAGES, 2), np.float32)))
    return root, cache


FIT = ["--dataset", "csv", "--backbone", "tiny", "--loader-workers", "0", "-q"]


def fit_args(small_set, out, *extra):
    root, cache = small_set
    return ["fit", *FIT, "--root", root, "--cache", cache, "--out", out, *extra]


@pytest.mark.slow
def test_a_fit_logs_steps_images_and_the_figures_the_selection_used(agiqa_cli, small_set, tmp_path):
    """Defaults of the official protocol on 50 images: split 35/5/10, batch 4 → 8 steps of 32
    images; validation 4 of 5 (last partial batch dropped); float32; tiny without weights."""
    out = tmp_path / "run"
    r = agiqa_cli(*fit_args(small_set, out, "--epochs", "2", "--batch-size", "4", "--lr", "3e-4",
                      "--json"))
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [0, 1]
    assert {(row["steps"], row["train_images"], row["val_images"]) for row in log} == {(8, 32, 4)}
    split = {}
    for row in csv.DictReader(open(out / "split.csv", encoding="utf-8")):
        split.setdefault(row["subset"], []).append(row["key"])
    assert [len(split[s]) for s in ("train", "val", "test")] == [35, 5, 10]
    metrics = json.loads((out / "metrics.json").read_text())
    expected = select_epoch(log)
    assert metrics["best_epoch"] == (expected if expected is not None else 1)
    improved = [row["epoch"] for row in log if row["selected"]]  # each new best so far
    assert (improved[-1] if improved else None) == expected
    for row in log:
        assert row["val_score"] == pytest.approx(row["val_srcc"] + row["val_plcc"])
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["amp"] is False and config["training"]["pretrained"] is None
    assert config["backbone_weights"] == {"pretrained": False, "timm": None, "file": None}


@pytest.mark.slow
def test_evaluate_runs_float32_by_default_and_bf16_with_amp(agiqa_cli, small_set, tmp_path,
                                                            monkeypatch):
    root, cache = small_set
    out = tmp_path / "run"
    assert agiqa_cli(*fit_args(small_set, out, "--epochs", "1", "--batch-size", "5")).exit_code == 0
    from agiqa.models import agiqa_net
    from agiqa.stages.scoring import evaluate as evaluate_module

    seen = []
    real_load = agiqa_net.load_model

    def load_and_watch(*a, **k):
        model = real_load(*a, **k)
        # dtype of what the first MANIQA layer computes, with autocast as it is at that point
        model.backbone.conv1.register_forward_hook(
            lambda mod, inp, outp: seen.append((outp.dtype, torch.is_autocast_enabled("cpu"))))
        return model

    monkeypatch.setattr(evaluate_module, "load_model", load_and_watch)
    ds = load_dataset("csv", root)
    result = evaluate_module.evaluate_model(out, ds, cache, "all", "cpu", 64, 0, False)
    assert result["images"] == N_IMAGES and result["amp"] is False
    assert seen and set(seen) == {(torch.float32, False)}
    seen.clear()
    evaluate_module.evaluate_model(out, ds, cache, "all", "cpu", 64, 0, False, amp=True)
    assert set(seen) == {(torch.bfloat16, True)}
    r = agiqa_cli("evaluate", "--model", out, "--dataset", "csv", "--root", root, "--cache", cache,
            "--split", "all", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == N_IMAGES


def _split_of(out):
    return (out / "split.csv").read_text()


@pytest.mark.slow
def test_repeats_keep_the_split_and_split_seeds_change_it(agiqa_cli, small_set, tmp_path):
    from agiqa.stages.training.fit import FitConfig, _runs

    cfg = FitConfig(dataset="csv", root=tmp_path, cache=tmp_path, out=tmp_path / "r")
    reps = _runs(replace(cfg, repeats=3))
    assert [(r.seed, r.split_seed, r.out.name) for _, r in reps] == [
        (20, 20, "seed-20"), (21, 20, "seed-21"), (22, 20, "seed-22")]
    splits = _runs(replace(cfg, split_seeds=2))
    assert [(r.seed, r.split_seed, r.out.name) for _, r in splits] == [
        (20, 20, "split-20"), (21, 21, "split-21")]
    with pytest.raises(ConfigError, match="cannot be combined"):
        replace(cfg, repeats=2, split_seeds=2)

    a = tmp_path / "repeats"
    r = agiqa_cli(*fit_args(small_set, a, "--epochs", "1", "--repeats", "2", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert _split_of(a / "seed-20") == _split_of(a / "seed-21")
    w20 = (a / "seed-20" / "model.safetensors").read_bytes()
    assert w20 != (a / "seed-21" / "model.safetensors").read_bytes()
    runs = {r["name"]: r for r in summary["runs"]}
    srcc = [runs[f"seed {s}"]["test"]["srcc"] for s in (20, 21)]
    # mean ± sample standard deviation (ddof 1) and n, as papers report a series
    assert summary["summary"]["srcc"] == {"mean": pytest.approx(np.mean(srcc)),
                                          "std": pytest.approx(np.std(srcc, ddof=1)), "n": 2}
    saved = json.loads((a / "summary.json").read_text())
    assert saved["summary"] == summary["summary"] and saved["runs"] == summary["runs"]

    b = tmp_path / "splits"
    r = agiqa_cli(*fit_args(small_set, b, "--epochs", "1", "--split-seeds", "2", "--json"))
    assert r.exit_code == 0, r.output
    assert _split_of(b / "split-20") != _split_of(b / "split-21")
    result = json.loads(r.stdout)
    assert [(x["name"], x["split_seed"]) for x in result["runs"]] == [("split 20", 20),
                                                                     ("split 21", 21)]


# -- faults ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_out_is_checked_before_any_heavy_work(agiqa_cli, small_set, tmp_path, monkeypatch):
    from agiqa.stages.training import fit as fit_module

    def heavy(*a, **k):
        raise AssertionError("decoded or read vectors before checking --out")

    monkeypatch.setattr(fit_module, "inputs_of", heavy)
    monkeypatch.setattr(SemanticCache, "read", heavy)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    r = agiqa_cli(*fit_args(small_set, foreign, "--epochs", "1"))
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: --out {foreign} is not empty and agiqa did not make it "
                                "(it holds holiday.jpg; no .agiqa-run file); choose a new or "
                                "empty folder")

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / ".agiqa-run").write_text("")  # a run folder agiqa made
    (finished / "model.safetensors").write_bytes(b"x")
    for extra in ([], ["--resume"]):
        r = agiqa_cli(*fit_args(small_set, finished, "--epochs", "1", *extra))
        assert r.exit_code == 1 and "holds a finished run" in r.output
        assert "pass --resume" not in r.output


@pytest.mark.slow
def test_nothing_is_written_into_out_before_the_model_loads(agiqa_cli, small_set, tmp_path,
                                                            monkeypatch):
    from agiqa.stages.training import fit as fit_module

    def offline(*a, **k):
        raise ModelLoadError("cannot load the ImageNet weights (offline)")

    monkeypatch.setattr(fit_module, "create_model", offline)
    out = tmp_path / "new"
    r = agiqa_cli(*fit_args(small_set, out, "--epochs", "1"))
    assert r.exit_code == 1 and "offline" in r.output
    assert not out.exists()


@pytest.mark.slow
def test_small_splits_are_refused_before_training_with_the_counts(agiqa_cli, small_set, tmp_path):
    r = agiqa_cli(*fit_args(small_set, tmp_path / "r", "--split", "random:0.9,0.06,0.04"))
    assert r.exit_code == 1
    assert "the val split has 3 image(s) (random(seed=20) of 50 images: train 45, val 3, test 2)" \
        in r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_too_small_for_the_official_batches_falls_back_with_a_warning(agiqa_cli, small_set,
                                                                      tmp_path):
    r = agiqa_cli(*fit_args(small_set, tmp_path / "r", "--epochs", "1", "--batch-size", "40",
                      "--split", "random:0.7,0.1,0.2"))
    assert r.exit_code == 0, r.output
    assert ("Warning: the official training loader drops the last partial batch of "
            "--batch-size 40, but the training split has only 35 image(s)") in r.stderr
    assert "Warning: the official validation loader drops the last partial batch" in r.stderr
    row = json.loads((tmp_path / "r" / "train_log.jsonl").read_text())
    assert (row["steps"], row["train_images"], row["val_images"]) == (1, 35, 5)


@pytest.mark.parametrize("option,value,why", [
    ("--lr", "nan", "must be a finite number > 0, got nan"),
    ("--lr", "0", "must be a finite number > 0, got 0.0"),
    ("--weight-decay", "-1", "must be a finite number ≥ 0, got -1.0"),
    ("--backbone-lr", "inf", "must be a finite number ≥ 0, got inf"),
])
@pytest.mark.slow
def test_bad_numbers_are_usage_errors(agiqa_cli, small_set, tmp_path, option, value, why):
    r = agiqa_cli(*fit_args(small_set, tmp_path / "r", option, value))
    assert r.exit_code == 64  # EX_USAGE: never mistaken for "finished, some images failed"
    assert f"Invalid value for '{option}': {why}" in r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_killed_checkpoint_write_leaves_nothing_that_breaks_resume(agiqa_cli, small_set, tmp_path,
                                                                    monkeypatch):
    """A SIGKILL while ``checkpoint.pt`` is written leaves its temporary, and a log row of an
    epoch the checkpoint does not hold; resuming cleans both."""
    from agiqa.fileio import _HOST
    from agiqa.stages.training.trainer import Trainer

    out = tmp_path / "run"
    original = Trainer._train_epoch

    def stop_in_epoch_1(self, *a):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, *a)

    monkeypatch.setattr(Trainer, "_train_epoch", stop_in_epoch_1)
    args = fit_args(small_set, out, "--epochs", "2", "--batch-size", "5")
    assert agiqa_cli(*args).exit_code == 1
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = out / f".checkpoint.pt.{_HOST}-{dead}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    log = out / "train_log.jsonl"
    row = json.loads(log.read_text().splitlines()[0])
    with open(log, "a", encoding="utf-8") as f:  # epoch 1 logged, then killed in the write
        f.write(json.dumps({**row, "epoch": 1}) + "\n")
    r = agiqa_cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert not stale.exists()
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [0, 1]


@pytest.mark.slow
def test_disk_full_while_training_is_one_error_line(agiqa_cli, small_set, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    r = agiqa_cli(*fit_args(small_set, out, "--epochs", "1", "--batch-size", "5"))
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {out / 'checkpoint.pt'}: cannot write the run "
                                "(No space left on device)")


@pytest.mark.slow
def test_a_broken_run_config_is_one_error_line(agiqa_cli, small_set, tmp_path):
    from agiqa.models.agiqa_net import create_model, load_model, save_model

    root, cache = small_set
    out = tmp_path / "model"
    save_model(create_model("tiny", 2, DIM), out, {})
    (out / "config.json").write_text('{"architecture": "ma-agiqa", "model": {')
    with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
        load_model(out)
    r = agiqa_cli("evaluate", "--model", out, "--dataset", "csv", "--root", root, "--cache", cache)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {out / 'config.json'}: not readable")


def test_metrics_errors_and_a_logistic_that_does_not_converge():
    from agiqa.errors import AgiqaError
    from agiqa.metrics import LogisticFitWarning, MetricsError, evaluate

    with pytest.raises(MetricsError, match="1 prediction.* NaN or infinite .*index 2: nan"):
        evaluate([1.0, 2.0, float("nan"), 4.0], [1, 2, 3, 4])
    assert issubclass(MetricsError, AgiqaError)
    with pytest.raises(MetricsError, match="3 predictions for 4 scores"):
        evaluate([1, 2, 3], [1, 2, 3, 4])
    with pytest.warns(LogisticFitWarning, match="did not converge on 3 predictions"):
        m = evaluate([0.1, 0.5, 0.2], [1.0, 3.0, 2.0])
    assert np.isfinite(m["srcc"])


# -- several processes -----------------------------------------------------------------------
@pytest.mark.slow
def test_rank_0_failing_after_training_stops_every_rank(small_set, tmp_path):
    """torchrun, 2 CPU processes: rank 0 fails while saving the model; rank 1 must not wait at
    a barrier for ever (the run would hang until the timeout)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import agiqa.stages.training.fit as f\n"
        "    from agiqa.errors import CheckpointError\n"
        "    def fail(*a, **k):\n"
        "        raise CheckpointError('injected failure while saving the model')\n"
        "    f.save_model = fail\n")
    root, cache = small_set
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "agiqa", *map(str, fit_args(small_set, tmp_path / "run", "--epochs", "1",
                                             "--batch-size", "5"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "injected failure while saving the model" in proc.stderr + proc.stdout
    assert "rank 0 failed after training" in proc.stderr + proc.stdout


# -- a resume continues the same run, or refuses ---------------------------------------------
def _interrupt_in_epoch(monkeypatch, epoch, seed=None):
    from agiqa.stages.training.trainer import Trainer

    original = Trainer._train_epoch

    def stop(self, *a):
        if self.epoch == epoch and (seed is None or self.cfg.seed == seed):
            raise KeyboardInterrupt
        return original(self, *a)

    monkeypatch.setattr(Trainer, "_train_epoch", stop)
    return lambda: monkeypatch.setattr(Trainer, "_train_epoch", original)


@pytest.mark.slow
def test_a_resume_that_would_change_the_run_is_refused_naming_the_options(agiqa_cli, small_set,
                                                                          tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "run"
    args = fit_args(small_set, out, "--epochs", "2", "--batch-size", "5")
    restore = _interrupt_in_epoch(monkeypatch, 1)
    assert agiqa_cli(*args).exit_code == 1
    restore()
    split_before = _split_of(out)
    root, _ = small_set
    rows = (root / "labels.csv").read_text().splitlines()
    other = tmp_path / "other.csv"  # the same images, their MOS reversed
    other.write_text("\n".join([rows[0], *(f"{a.split(',')[0]},{b.split(',')[1]}"
                                           for a, b in zip(rows[1:], rows[:0:-1], strict=True)),
                                ""]))
    for change, named in ((["--labels", other], f"labels None -> '{other}'"),
                          (["--lr", "3e-4"], "lr 1e-05 -> 0.0003"),
                          (["--split-seed", "21"], "split_seed None -> 21"),
                          (["--epochs", "1"], "epochs 2 -> 1")):
        r = agiqa_cli(*args, *change, "--resume")
        assert r.exit_code == 1, r.output
        assert "--resume:" in r.output and named in r.output and "same run" in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert _split_of(out) == split_before and (out / "checkpoint.pt").is_file()
    r = agiqa_cli(*args[:-4], "--epochs", "3", "--batch-size", "5", "--resume", "--json")  # more
    assert r.exit_code == 0, r.output
    assert [row["epoch"] for row in json.loads((out / "metrics.json").read_text())["history"]] \
        == [0, 1, 2]
    assert (out / ".agiqa-finished").is_file()


@pytest.mark.slow
def test_a_series_killed_after_a_model_was_written_resumes(agiqa_cli, small_set, tmp_path,
                                                           monkeypatch):
    """Finished is the marker written last: a run whose model.safetensors is written but not
    its metrics.json or plots is continued from its checkpoint, for a series as for one run."""
    from agiqa.stages.training import fit as fit_module

    out = tmp_path / "series"
    args = fit_args(small_set, out, "--epochs", "1", "--batch-size", "5", "--repeats", "2",
                    "--concurrent-runs", "1")
    original = fit_module.save_model

    def killed(model, folder, *a, **k):
        original(model, folder, *a, **k)
        if Path(folder).name == "seed-20":
            raise KeyboardInterrupt  # just after seed-20/model.safetensors is written

    monkeypatch.setattr(fit_module, "save_model", killed)
    assert agiqa_cli(*args).exit_code == 1
    assert (out / "seed-20" / "model.safetensors").is_file()
    assert not (out / "seed-20" / "metrics.json").exists()
    monkeypatch.setattr(fit_module, "save_model", original)
    r = agiqa_cli(*args, "--resume", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert [x["name"] for x in result["runs"] if x["error"] is None] == ["seed 20", "seed 21"]
    for name in ("seed-20", "seed-21"):
        assert (out / name / ".agiqa-finished").is_file()
        assert not (out / name / "checkpoint.pt").exists()
    assert (out / ".agiqa-finished").is_file() and (out / "summary.json").is_file()


def test_split_seeds_with_a_split_file_is_a_usage_error(agiqa_cli, small_set, tmp_path):
    split = tmp_path / "split.csv"  # a split fit would train on: 35 train, 5 val, 10 test
    subsets = ["train"] * 35 + ["val"] * 5 + ["test"] * 10
    split.write_text("key,subset\n" + "".join(f"img_{i:02d}.png,{s}\n"
                                              for i, s in enumerate(subsets)))
    r = agiqa_cli(*fit_args(small_set, tmp_path / "run", "--split", split, "--split-seeds", "2",
                            "--epochs", "1", "--batch-size", "5"))
    assert r.exit_code == 1
    assert "--split-seeds 2 draws random splits" in r.output and "--repeats N" in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--seed", "--split-seed"])
def test_a_seed_past_torchs_range_is_a_usage_error_before_any_work(agiqa_cli, small_set, tmp_path,
                                                                   flag):
    """On a data set fit could train on: refused up front, not a traceback once training starts."""
    out = tmp_path / "run"
    r = agiqa_cli(*fit_args(small_set, out, "--epochs", "1", "--batch-size", "5", flag, 2**64),
                  catch_exceptions=True)
    assert r.exit_code == 64, r.output
    assert f"'{flag}': 18446744073709551616 is not in the range" in r.output
    assert not out.exists()


def test_the_python_api_refuses_a_value_of_the_wrong_type_before_any_work(small_set, tmp_path):
    """``augment="no"`` is not taken as true, nor ``epochs=1.5`` as 1: a data set fit could train
    on, and nothing trained or written."""
    import agiqa

    root, cache = small_set
    out = tmp_path / "run"
    common = {"dataset": "csv", "root": root, "cache": cache, "out": out, "backbone": "tiny",
              "loader_workers": 0, "epochs": 1, "batch_size": 5, "progress": False}
    for bad, message in (({"augment": "no"}, "^augment= must be True or False, got 'no'$"),
                         ({"epochs": 1.5}, "^epochs= must be an integer, got 1.5$"),
                         ({"seed": "x"}, "^seed= must be an integer, got 'x'$")):
        with pytest.raises(ConfigError, match=message):
            agiqa.fit(**{**common, **bad})
        assert not out.exists()


@pytest.mark.slow
def test_evaluate_out_never_replaces_the_run_or_a_users_files(agiqa_cli, small_set, tmp_path):
    """``evaluate --out`` on the model's own folder or on a folder of the user's is refused;
    the run's predictions and the user's file are untouched."""
    root, cache = small_set
    run = tmp_path / "run"
    assert agiqa_cli(*fit_args(small_set, run, "--epochs", "1", "--batch-size", "5")).exit_code \
        == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.csv").write_text("my,data\n")
    for out in (run, mine):
        r = agiqa_cli("evaluate", "--model", run, "--dataset", "csv", "--root", root, "--cache",
                      cache, "--split", "all", "-q", "--out", out, catch_exceptions=True)
        assert r.exit_code == 1 and r.output.startswith("Error: "), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert (mine / "predictions.csv").read_text() == "my,data\n"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
