"""Hostile or careless input: nothing silently wrong, nothing lost, one clear line each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from agiqa.cli import cli
from agiqa.cli.common import printable
from agiqa.data.datasets import load_dataset, parse_number
from agiqa.data.images import IMAGE_EXTENSIONS, list_images
from agiqa.errors import ConfigError, DatasetError
from agiqa.fileio import atomic_path, exclusive_lock, read_json
from agiqa.presets import list_presets, load_mllm_preset


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _labelled(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png", "c.png"):
        (root / name).write_bytes(b"")
    labels = root / "labels.csv"
    labels.write_text(text)
    return labels


def _fit(tmp_path, out, *extra):
    labels = _labelled(tmp_path / "imgs", "image,mos\na.png,1\nb.png,2\nc.png,3\n")
    return run("fit", "--dataset", "csv", "--root", tmp_path / "imgs", "--labels", labels,
               "--cache", tmp_path / "cache", "--out", out, "--backbone", "tiny", *extra)


# -- ownership -------------------------------------------------------------------------------------
def test_fit_never_replaces_a_users_file_named_like_a_run_file(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text('{"my": "cfg"}')
    r = _fit(tmp_path, out)
    assert r.exit_code == 1
    assert "agiqa did not make it" in r.output and "config.json" in r.output
    assert (out / "config.json").read_text() == '{"my": "cfg"}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_second_fit_into_a_run_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".agiqa-run").write_text("")
    with exclusive_lock(out / ".agiqa-run.lock", f"--out {out}"):  # a first fit, still running
        r = _fit(tmp_path, out)
    assert r.exit_code == 1 and "in use by another agiqa process" in r.output
    assert sorted(p.name for p in out.iterdir()) == [".agiqa-run", ".agiqa-run.lock"]


# -- label files ---------------------------------------------------------------------------------
def test_a_column_named_twice_is_refused(tmp_path):
    labels = _labelled(tmp_path, "image,mos,mos\na.png,1,5\nb.png,2,4\nc.png,3,3\n")
    with pytest.raises(DatasetError, match="line 1: the header names column.*'mos' more than"):
        load_dataset("csv", tmp_path, labels)


@pytest.mark.parametrize("bad", ["4_987", "nan", "inf", "-Infinity", "1e999", "0x10", "4,5"])
def test_scores_are_numbers_by_a_strict_rule_with_the_true_line(tmp_path, bad):
    # Blank lines and a quoted line break before the bad row: the line named is its own.
    labels = _labelled(tmp_path, f'image,mos\n\na.png,1\n"b.png",2\n\n\nc.png,"{bad}"\n')
    with pytest.raises(DatasetError, match=rf"labels.csv, line 7: score '{bad}' .* not a finite"):
        load_dataset("csv", tmp_path, labels)
    assert parse_number(bad) is None
    assert [parse_number(x) for x in ("4.987", " 5 ", "-1e-3", ".5", "3.")] == \
        [4.987, 5.0, -1e-3, 0.5, 3.0]


def test_a_split_ratio_that_is_not_a_number_is_one_line(tmp_path):
    r = _fit(tmp_path, tmp_path / "r", "--split", "random:nan,0.5,0.5")
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        "Error: split ratios must be three numbers summing to 1, got 'nan,0.5,0.5'"]


# -- names and folders -------------------------------------------------------------------------
def test_names_that_are_not_utf8_are_skipped_not_fatal(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")
    bad = os.fsdecode(b"bad\xff.png")
    (tmp_path / bad).write_bytes(b"")
    images, others = list_images(tmp_path)
    assert images == ["ok.png"] and others == [bad]
    assert printable(bad) == "bad\\udcff.png"  # the plain-text output can print it


def test_plain_output_escapes_control_characters():
    assert printable("a\nb.png") == "a\\nb.png"
    assert printable("x\x1b[2Jy\r") == "x\\x1b[2Jy\\r"
    assert printable("ünïcode ok.png") == "ünïcode ok.png"


def test_linked_folders_are_followed_once_and_loops_end(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "x.png").write_bytes(b"")
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "y.jpg").write_bytes(b"")
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    images, _ = list_images(root)
    assert images == ["linked/x.png", "sub/y.jpg"]


def test_the_output_folder_inside_the_input_is_not_walked(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard-00000.h5").write_bytes(b"")
    assert list_images(tmp_path, exclude=tmp_path / "cache") == (["a.png"], [])
    assert list_images(tmp_path)[1] == ["cache/shard-00000.h5"]


def test_only_the_official_pipelines_formats_are_images():
    for ext in (".eps", ".ps", ".pdf", ".icns", ".ico"):
        assert ext not in IMAGE_EXTENSIONS, ext
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"):
        assert ext in IMAGE_EXTENSIONS, ext


def test_a_temporary_beside_a_255_byte_name_fits(tmp_path):
    target = tmp_path / ("n" * 250 + ".json")
    with atomic_path(target) as tmp:
        assert len(tmp.name.encode()) <= 255
        tmp.write_text("{}")
    assert target.read_text() == "{}"


# -- settings and presets ------------------------------------------------------------------------
def test_agiqa_home_that_is_a_file_is_named(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("AGIQA_HOME", str(home))
    r = run("presets", "list")
    assert r.exit_code == 1 and f"AGIQA_HOME {home} is a file, not a folder" in r.output


def test_a_fifo_among_the_presets_is_never_read(tmp_path, monkeypatch):
    user = tmp_path / "home" / "presets" / "mllms"
    user.mkdir(parents=True)
    os.mkfifo(user / "x.json")
    monkeypatch.setenv("AGIQA_HOME", str(tmp_path / "home"))
    assert "x" not in list_presets("mllms")  # returns: the FIFO is not opened
    r = run("presets", "list")
    assert r.exit_code == 0, r.output
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(user / "x.json")


def test_json_bombs_in_a_preset_are_one_line(tmp_path, monkeypatch):
    user = tmp_path / "home" / "presets" / "mllms"
    user.mkdir(parents=True)
    (user / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (user / "huge.json").write_text(json.dumps({"model": "x" * (2 << 20)}))
    monkeypatch.setenv("AGIQA_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="deep.json: not valid JSON .*nested too deeply"):
        load_mllm_preset("deep")
    with pytest.raises(ConfigError, match="huge.json: not valid JSON .*more than the 1048576"):
        load_mllm_preset("huge")


def test_a_run_config_nested_a_million_deep_is_refused_quickly(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("[" * 1_000_000 + "]" * 1_000_000)
    (run_dir / "model.safetensors").write_bytes(b"")
    r = run("score-folder", tmp_path, "--model", run_dir)
    assert r.exit_code == 1
    assert "config.json: not readable JSON" in r.output and "nested too deeply" in r.output


def test_a_worker_index_out_of_range_is_a_usage_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    r = run("extract-semantics", "--images", tmp_path / "imgs", "--out", tmp_path / "c",
            "--workers", "3", "--worker", "5")
    assert r.exit_code == 64, r.output
    assert "5 is not a worker index of --workers 3 (0 to 2)" in r.output


def test_a_hub_id_that_is_not_here_is_one_quick_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads both when it is first imported, maybe by an earlier test: offline
    # it answers at once, online it retries for half a minute.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    r = run("extract-semantics", "--mllm", "someone/not-here", "--images", tmp_path / "imgs",
            "--out", tmp_path / "c")
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        "Error: MLLM 'someone/not-here' is neither in the local Hugging Face cache nor reachable "
        "on the hub (offline: HF_HUB_OFFLINE is set, or the hub did not answer); download it on "
        "a connected machine (huggingface-cli download "
        "someone/not-here) into this machine's cache, or give a local folder holding it "
        "instead (extract-semantics --mllm FOLDER)"]


def test_files_agiqa_writes_have_the_users_usual_mode(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors recreates it as 0600
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"\x80\x04K\x01."])
def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path, content):
    from types import SimpleNamespace

    import torch

    from agiqa.errors import CheckpointError
    from agiqa.stages.training.trainer import Trainer

    (tmp_path / "checkpoint.pt").write_bytes(content)
    model = torch.nn.Linear(2, 1)
    optim = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=5)
    cfg = SimpleNamespace(amp=False, compile=False, out=tmp_path, seed=0, backbone_lr=None)
    trainer = Trainer(cfg, model, optim, sched, torch.Generator(), torch.device("cpu"))
    with pytest.raises(CheckpointError) as err:
        trainer.restore()
    message = str(err.value)
    assert "\n" not in message and "not a checkpoint agiqa can resume from" in message
