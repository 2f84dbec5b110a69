"""A frozen backbone (``--backbone-lr 0``): eval mode, each image's key computed once, the
per-patch key standardisation (``--key-norm``) and the last-epoch selection."""

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from agiqa.cli import cli
from agiqa.errors import ConfigError
from agiqa.models.agiqa_net import create_model
from agiqa.models.maniqa import ManiqaBackbone
from agiqa.stages.configs import FitConfig
from agiqa.stages.training import fit as fit_module
from agiqa.stages.training.norms import fold_key_norm, key_norm

FROZEN = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
          "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q", "--backbone-lr", "0",
          "--no-augment", "--epochs", "3", "--lr", "1e-4", "--score-norm", "zscore",
          "--semantic-norm", "zscore"]


def _predictions(folder):
    with open(folder / "predictions.csv", newline="", encoding="utf-8") as f:
        return {r["key"]: float(r["score"]) for r in csv.DictReader(f)}


def _count_backbone_images(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = ManiqaBackbone.forward

    def counted(self, x):
        seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(ManiqaBackbone, "forward", counted)
    return seen


@pytest.mark.slow
def test_keys_computed_once_equal_the_frozen_backbone_run_every_step(graded, tmp_path,
                                                                    monkeypatch):
    """The head trained on keys computed once equals the head trained with the frozen backbone
    run (in eval mode) at every step; the backbone sees each image once (its key serves every
    epoch and the final scoring)."""
    root, cache = graded
    n = len((root / "labels.csv").read_text().splitlines()) - 1
    args = [str(a) for a in ["fit", *FROZEN, "--root", root, "--cache", cache]]
    seen = _count_backbone_images(monkeypatch)
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "keys")])
    assert r.exit_code == 0, r.output
    assert sum(seen) == n

    seen.clear()
    monkeypatch.setattr(fit_module, "caches_keys", lambda cfg: False)
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "steps")])
    assert r.exit_code == 0, r.output
    assert sum(seen) > 3 * n  # every epoch ran the backbone
    a, b = _predictions(tmp_path / "keys"), _predictions(tmp_path / "steps")
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    ma = json.loads((tmp_path / "keys" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "steps" / "metrics.json").read_text())
    assert ma["best_epoch"] == mb["best_epoch"]


def test_the_key_norm_folds_into_the_image_expert():
    torch.manual_seed(0)
    model = create_model("tiny", 2, 16).eval()
    keys = torch.rand(12, model.backbone.num_tokens) * 0.1 + 0.3
    sem = torch.randn(12, 2, 16)
    norm = key_norm("zscore", keys[:8])
    with torch.no_grad():
        before = model.head((keys - norm["mean"]) / norm["std"], sem)[0]
        fold_key_norm(model, norm)
        after = model.head(keys, sem)[0]
    assert (before - after).abs().max() < 1e-4 * before.abs().max()
    assert key_norm("none", keys) is None


def test_the_key_norm_needs_fixed_keys(tmp_path):
    base = dict(dataset="csv", root=tmp_path, cache=tmp_path, out=tmp_path / "o",
                key_norm="zscore")
    with pytest.raises(ConfigError, match="backbone_lr=0 and augment=False"):
        FitConfig(**base, backbone_lr=0.0)  # augmentation on: keys change every step
    with pytest.raises(ConfigError, match="backbone_lr=0 and augment=False"):
        FitConfig(**base, augment=False)  # the backbone trains
    FitConfig(**base, backbone_lr=0.0, augment=False)
    r = CliRunner().invoke(cli, ["fit", "--dataset", "csv", "--root", str(tmp_path), "--cache",
                                 str(tmp_path), "--out", str(tmp_path / "o"), "--key-norm",
                                 "zscore"])
    assert r.exit_code == 1 and "--key-norm zscore needs" in r.output


@pytest.mark.slow
def test_last_epoch_selection_and_runs_on_keys_trained_together(graded, tmp_path):
    """--selection last keeps the last epoch; runs on keys trained together equal the same
    run alone."""
    root, cache = graded
    args = [str(a) for a in ["fit", *FROZEN, "--root", root, "--cache", cache, "--key-norm",
                             "zscore", "--selection", "last", "--split-seed", "20"]]
    solo = CliRunner().invoke(cli, [*args, "--seed", "21", "--out", str(tmp_path / "solo")])
    assert solo.exit_code == 0, solo.output
    series = CliRunner().invoke(cli, [*args, "--seed", "20", "--repeats", "2",
                                      "--concurrent-runs", "2", "--out", str(tmp_path / "s")])
    assert series.exit_code == 0, series.output
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["concurrency"]["concurrent_runs"] == 2
    assert {r["name"]: r["best_epoch"] for r in summary["runs"]} == {"seed 20": 2, "seed 21": 2}
    assert json.loads((tmp_path / "solo" / "metrics.json").read_text())["selection"] == \
        "the last epoch (--selection last)"
    a, b = _predictions(tmp_path / "s" / "seed-21"), _predictions(tmp_path / "solo")
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    config = json.loads((tmp_path / "solo" / "config.json").read_text())
    assert config["key_norm"] == {"kind": "zscore", "folded_into": "head.image_expert"}
    rows = (tmp_path / "solo" / "train_log.jsonl").read_text().splitlines()
    log = [json.loads(x) for x in rows]
    assert [row["selected"] for row in log] == [False, False, True]


def test_the_vit_stats_image_key_reads_pooled_vit_features(tmp_path):
    """--image-key vit-stats: the image expert reads each ViT channel's mean and std over the
    patches (2·C·k values); the paper's default still reads MANIQA's per-patch key; the model
    saves and loads with its key, and has no patch maps."""
    from agiqa.models.agiqa_net import ModelConfig, load_model, save_model

    assert ModelConfig().image_key == "maniqa"
    torch.manual_seed(0)
    paper = create_model("tiny", 2, 16).eval()
    assert paper.head.image_expert.in_features == paper.backbone.num_tokens == 784
    torch.manual_seed(0)
    model = create_model("tiny", 2, 16, image_key="vit-stats").eval()
    vit = model.backbone.vit
    width = 2 * vit.embed_dim * len(model.config.feature_blocks)
    assert model.backbone.key_width == model.head.image_expert.in_features == width
    x, sem = torch.rand(3, 3, 224, 224) * 2 - 1, torch.randn(3, 2, 16)
    with torch.no_grad():
        feats = model.backbone.forward_vit(x)
        key = model.backbone(x)
        assert torch.allclose(key, torch.cat([feats.mean(2), feats.std(2)], 1))
        # noisier pixels: a larger spread of the features over the patches
        noisy = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
        assert model.backbone(noisy)[:, width // 2:].mean() > key[:, width // 2:].mean()
        score = model(x, sem)
    with pytest.raises(ValueError, match="no patch maps"):
        model.forward_maps(x, sem)
    save_model(model, tmp_path / "m", {})
    loaded = load_model(tmp_path / "m")
    assert loaded.config.image_key == "vit-stats"
    with torch.no_grad():
        assert torch.allclose(loaded(x, sem), score, atol=1e-5)
    with pytest.raises(ConfigError, match="image key"):
        create_model("tiny", 2, 16, image_key="nonsense")


def test_a_vit_stats_model_trains_its_backbone_under_distributed_data_parallel(tmp_path):
    """With the pooled key the MANIQA layers are unused: they are frozen, so that a trainable
    backbone trains under torchrun's DistributedDataParallel, which refuses parameters that
    never get a gradient; the ViT's get theirs."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = create_model("tiny", 2, 16, image_key="vit-stats")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("backbone.vit.", "head.")) for n in trained)
    assert any(n.startswith("backbone.vit.") for n in trained)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        for _ in range(2):  # the second step is where DDP finds a parameter without gradient
            ddp(torch.rand(2, 3, 224, 224), torch.randn(2, 2, 16)).sum().backward()
    finally:
        dist.destroy_process_group()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trained)


@pytest.mark.slow
def test_a_run_on_the_vit_stats_key_scores_its_images_as_trained(graded, tmp_path):
    """fit --image-key vit-stats with --key-norm zscore trains on keys computed once; the saved
    model, the norm folded in, scores the images themselves as the run predicted them, and
    its report shows no patch maps."""
    root, cache = graded
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, [str(a) for a in [
        "fit", *FROZEN, "--root", root, "--cache", cache, "--key-norm", "zscore",
        "--image-key", "vit-stats", "--out", run]])
    assert r.exit_code == 0, r.output
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["image_key"] == "vit-stats"
    r = CliRunner().invoke(cli, [str(a) for a in [
        "evaluate", "--model", run, "--dataset", "csv", "--root", root, "--cache", cache,
        "--split", "all", "--loader-workers", "0", "-q", "--out", tmp_path / "eval"]])
    assert r.exit_code == 0, r.output
    a, b = _predictions(run), _predictions(tmp_path / "eval")
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    r = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert "image key is vit-stats" in (tmp_path / "r.html").read_text()


def test_the_configs_choices_are_the_models():
    """configs.py repeats the models' choices so that reading options loads no torch: the
    copies must not drift."""
    from agiqa.models import maniqa, moe
    from agiqa.stages import configs

    assert configs.IMAGE_KEYS == maniqa.IMAGE_KEYS
    assert configs.FUSIONS == moe.FUSIONS
