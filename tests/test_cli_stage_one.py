"""``agiqa extract-semantics`` and ``agiqa cache`` as a user runs them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from agiqa.cache import open_cache
from agiqa.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_every_command_and_version():
    import click

    result = run("--help")
    assert result.exit_code == 0
    listed = {ln.split()[0] for ln in result.output.split("Commands:\n", 1)[1].splitlines()
              if ln.strip()}
    assert listed == set(cli.commands)
    assert {"extract-semantics", "cache", "fit", "evaluate", "import-official", "score-folder",
            "demo", "presets"} <= listed
    for name, command in cli.commands.items():
        subcommands = command.commands if isinstance(command, click.Group) else {None: command}
        for sub in subcommands:
            r = run(*[a for a in (name, sub, "--help") if a])
            assert r.exit_code == 0 and "Usage: " in r.output, (name, sub, r.output)
    assert run("--version").output.strip() == "agiqa, version 0.1.0"


@pytest.mark.slow
def test_extract_exits_2_and_names_every_broken_file(tiny_llava, photo_folder, tmp_path):
    root, kinds = photo_folder
    result = run("extract-semantics", "--model", tiny_llava, "--images", root, "--out",
                 tmp_path / "c", "--quiet", "--loader-workers", "0")
    assert result.exit_code == 2, result.output
    assert "failed: zero_bytes.png: empty file (0 bytes)" in result.stderr
    assert "failed: text_as.jpg: not an image (unrecognised file format)" in result.stderr
    assert "failed: truncated.jpg: cannot decode: truncated" in result.stderr
    assert "skipped 1 file(s) that are not images (or whose names are not UTF-8): notes.txt" \
        in result.stderr
    good = sorted(k for k, v in kinds.items() if v == "ok")
    assert open_cache(tmp_path / "c").keys == good
    n = len(good) + 3
    # The counts add up to the images: each is computed, already cached or failed, once.
    assert f"{n} images: {len(good)} computed, 0 already cached, 3 failed" in result.output

    again = run("extract-semantics", "--model", tiny_llava, "--images", root, "--out",
                tmp_path / "c", "--quiet", "--json")
    report = json.loads(again.output)
    # The failed images are tried again (and fail again); the others are reused.
    assert again.exit_code == 2 and report["computed"] == 0 and report["failed"] == 3
    assert sorted(report["retried"]) == ["text_as.jpg", "truncated.jpg", "zero_bytes.png"]
    assert report["reused"] == len(good)
    assert report["computed"] + report["reused"] + report["failed"] == report["requested"] == n
    skip = run("extract-semantics", "--model", tiny_llava, "--images", root, "--out",
               tmp_path / "c", "--quiet", "--json", "--no-retry-failed")
    report = json.loads(skip.output)
    assert skip.exit_code == 2 and report["computed"] == 0 and report["failed"] == 3


@pytest.mark.slow
def test_another_model_into_the_same_cache_is_refused(tiny_llava, tiny_qwen, photo_folder,
                                                      tmp_path):
    root, _ = photo_folder
    run("extract-semantics", "--model", tiny_llava, "--images", root, "--out", tmp_path / "c", "-q")
    result = run("extract-semantics", "--model", tiny_qwen, "--images", root, "--out",
                 tmp_path / "c", "-q")
    assert result.exit_code == 1
    assert result.output.startswith("Error: cache ")
    assert "fingerprint" in result.output and "model:" in result.output


@pytest.mark.slow
def test_clean_folder_exits_0_and_cache_info(tiny_llava, tmp_path, write_photo_folder):
    write_photo_folder(tmp_path / "imgs", with_broken=False)
    result = run("extract-semantics", "--model", tiny_llava, "--images", tmp_path / "imgs",
                 "--out", tmp_path / "c", "--format", "hdf5", "-q")
    assert result.exit_code == 0, result.output
    info = json.loads(run("cache", "info", tmp_path / "c", "--json").output)
    assert info["format"] == "hdf5" and info["images"] == 11 and info["dim"] == 64
    assert [p["name"] for p in info["prompts"]] == ["semantic_content", "coherence"]
    text = run("cache", "info", tmp_path / "c").output
    assert "prompt       coherence: Evaluate if the image quality" in text


@pytest.mark.slow
def test_fuse_prompts_option_halves_the_model_calls(tiny_llava, tmp_path, write_photo_folder):
    write_photo_folder(tmp_path / "imgs", with_broken=False)
    reports = {}
    for flag in ("--no-fuse-prompts", "--fuse-prompts"):
        result = run("extract-semantics", "--model", tiny_llava, "--images", tmp_path / "imgs",
                     "--out", tmp_path / flag, "--batch-size", "4", "--loader-workers", "0",
                     "--json", flag)
        assert result.exit_code == 0, result.output
        reports[flag] = json.loads(result.stdout)
    separate, fused = reports["--no-fuse-prompts"], reports["--fuse-prompts"]
    assert separate["forward_passes"] == fused["forward_passes"] == 2 * 11
    assert separate["model_calls"] == 2 * fused["model_calls"] == 2 * 3


@pytest.mark.slow
def test_cache_verify_names_changed_and_missing_files(tiny_llava, tmp_path, write_photo_folder):
    root = tmp_path / "imgs"
    write_photo_folder(root, with_broken=False)
    run("extract-semantics", "--model", tiny_llava, "--images", root, "--out", tmp_path / "c", "-q")
    ok = run("cache", "verify", tmp_path / "c")
    assert ok.exit_code == 0 and "0 missing, 0 changed" in ok.output
    with open(root / "chelsea.png", "ab") as f:
        f.write(b"\0")
    (root / "rocket.bmp").unlink()
    bad = run("cache", "verify", tmp_path / "c")
    assert bad.exit_code == 2
    assert "changed: chelsea.png" in bad.output and "missing: rocket.bmp" in bad.output
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert "missing: rocket.bmp" in run("cache", "verify", tmp_path / "c", "--images", moved).output


def test_usage_errors(tmp_path):
    r = run("extract-semantics", "--out", tmp_path / "c")
    assert r.exit_code == 64 and "give either --images DIR or --dataset NAME --root DIR" in r.output
    r = run("extract-semantics", "--images", tmp_path / "nope", "--out", tmp_path / "c")
    assert r.exit_code == 1 and "image folder not found" in r.output
    r = run("cache", "info", tmp_path)
    expected = f"Error: {tmp_path}: not a semantic cache (no manifest.json)"
    assert r.exit_code == 1 and r.output.strip() == expected
    r = run("extract-semantics", "--model", tmp_path / "no-model", "--images", tmp_path,
            "--out", tmp_path / "c")
    assert r.exit_code == 1 and "cannot load MLLM" in r.output


@pytest.mark.slow
def test_dataset_preset_source(tiny_llava, tmp_path, write_photo_folder):
    root = tmp_path / "imgs"
    write_photo_folder(root, with_broken=False)
    (root / "labels.csv").write_text("image,mos\r\nchelsea.png,3.5\r\nrocket.bmp,1.0\r\n")
    r = run("extract-semantics", "--model", tiny_llava, "--dataset", "csv", "--root", root,
            "--labels", root / "labels.csv", "--out", tmp_path / "c", "-q")
    assert r.exit_code == 0, r.output
    assert open_cache(tmp_path / "c").keys == ["chelsea.png", "rocket.bmp"]


@pytest.mark.slow
def test_sigkill_midway_then_resume_equals_uninterrupted(tiny_llava, tmp_path, write_photo_folder):
    root = tmp_path / "imgs"
    for i in range(4):
        write_photo_folder(root / f"set{i}", with_broken=False)
    args = ["--model", str(tiny_llava), "--images", str(root), "--shard-size", "2",
            "--batch-size", "1", "--loader-workers", "0", "-q"]
    cmd = [sys.executable, "-m", "agiqa", "extract-semantics", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(list((tmp_path / "killed").glob("shard-*.zarr.zip"))) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((tmp_path / "killed").glob("shard-*.zarr.zip")))
    assert partial < 22, "the run finished before it could be killed"
    subprocess.run([*cmd, "--out", str(tmp_path / "killed")], env=env, check=True,
                   capture_output=True)
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], env=env, check=True,
                   capture_output=True)
    a, b = open_cache(tmp_path / "killed"), open_cache(tmp_path / "clean")
    assert len(a.keys) == 44 and a.keys == b.keys
    assert not list((tmp_path / "killed").glob(".*tmp"))
    np.testing.assert_array_equal(a.read(a.keys)["vectors"], b.read(b.keys)["vectors"])


def test_usage_errors_exit_64_apart_from_failed_images(tmp_path):
    r = run("extract-semantics", "--bogus")
    assert r.exit_code == 64 and "Error: No such option '--bogus'" in r.output
    assert run("cache", "verify").exit_code == 64  # a nested group's usage error too
    assert run("extract-semantics", "--batch-size", "0", "--images", tmp_path,
               "--out", tmp_path / "c").exit_code == 64
    proc = subprocess.run([sys.executable, "-m", "agiqa", "fit", "--nonsense"],
                          capture_output=True, text=True)
    assert proc.returncode == 64 and "Error: No such option" in proc.stderr


def _clean_cache(tiny_llava, tmp_path, write_photo_folder):
    root = tmp_path / "imgs"
    write_photo_folder(root, with_broken=False)
    r = run("extract-semantics", "--model", tiny_llava, "--images", root, "--out",
            tmp_path / "c", "--shard-size", "6", "-q")
    assert r.exit_code == 0, r.output
    return root


@pytest.mark.slow
def test_verify_names_a_damaged_shard_and_a_rerun_rebuilds_it(tiny_llava, tmp_path,
                                                              write_photo_folder):
    root = _clean_cache(tiny_llava, tmp_path, write_photo_folder)
    cache = open_cache(tmp_path / "c")
    before = cache.read(cache.keys)["vectors"]
    shard = cache.shard_paths()[1]
    shard.write_bytes(shard.read_bytes()[:-64])  # cut short
    bad = run("cache", "verify", tmp_path / "c")
    assert bad.exit_code == 2
    assert f"damaged shard: {shard}: unreadable shard" in bad.output
    assert "2 shards checked, 1 damaged" in bad.output
    again = run("extract-semantics", "--model", tiny_llava, "--images", root, "--out",
                tmp_path / "c", "--shard-size", "6", "-q", "--json")
    assert again.exit_code == 0 and json.loads(again.output)["shards_written"] == 1
    assert run("cache", "verify", tmp_path / "c").exit_code == 0
    np.testing.assert_array_equal(open_cache(tmp_path / "c").read(cache.keys)["vectors"], before)


@pytest.mark.slow
def test_cache_faults_are_one_error_line(tiny_llava, tmp_path, monkeypatch, write_photo_folder):
    root = _clean_cache(tiny_llava, tmp_path, write_photo_folder)
    args = ["extract-semantics", "--model", tiny_llava, "--images", root, "--out",
            tmp_path / "c", "-q"]
    import agiqa.cache.store as store

    monkeypatch.setattr(store, "_writable", lambda path: False)  # root ignores file modes
    r = run(*args)
    assert r.exit_code == 1
    assert r.output == f"Error: {tmp_path / 'c'}: cannot write the cache (permission denied)\n"
    monkeypatch.undo()
    (tmp_path / "c" / "manifest.json").write_text("[]")
    r = run("cache", "info", tmp_path / "c")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "manifest.json: damaged manifest (a JSON object is needed, found list)" in r.output


@pytest.mark.slow
def test_os_errors_are_one_error_line(tiny_llava, tmp_path, monkeypatch):
    import agiqa.cache.store as store

    def full(path, obj):
        raise OSError(28, "No space left on device", str(path))

    root = tmp_path / "imgs"
    root.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(root / "a.png")
    monkeypatch.setattr(store, "write_json", full)
    r = run("extract-semantics", "--model", tiny_llava, "--images", root, "--out",
            tmp_path / "c", "-q")
    assert r.exit_code == 1
    assert r.output == f"Error: {tmp_path / 'c' / 'manifest.json'}: No space left on device\n"


@pytest.mark.slow
def test_truncated_weights_exit_1_and_leave_no_manifest(tiny_llava, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "imgs").mkdir()
    r = run("extract-semantics", "--model", model, "--images", tmp_path / "imgs", "--out",
            tmp_path / "c", "-q")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith(f"Error: {weights}: truncated safetensors file")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "copied"])
def test_the_counts_add_up_after_a_damaged_or_copied_shard(tiny_llava, graded, tmp_path, damage):
    """Every image once: computed now, already cached, or failed, whatever the earlier shards
    hold (one cut short, or one replaced by a copy of another)."""
    root, _ = graded
    out = tmp_path / "c"
    args = ("extract-semantics", "--model", tiny_llava, "--dataset", "csv", "--root", root,
            "--out", out, "--quiet", "--json", "--loader-workers", "0", "--shard-size", "10")
    first = json.loads(run(*args).output)
    shards = open_cache(out).shard_paths()
    assert first["computed"] == first["requested"] == 30 and len(shards) == 3
    if damage == "truncated":
        shards[0].write_bytes(shards[0].read_bytes()[:-64])
    else:
        shutil.copyfile(shards[1], shards[0])
    again = json.loads(run(*args).output)
    assert again["computed"] == 10 and again["reused"] == 20 and again["failed"] == 0
    assert again["computed"] + again["reused"] + again["failed"] == again["requested"] == 30
    assert len(open_cache(out).keys) == 30
