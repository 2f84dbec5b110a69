"""The GPU benchmark suite runs end to end with tiny shapes on the CPU (``--smoke``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
def test_gpu_suite_smoke_measures_every_part(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    table = (tmp_path / "gpu_suite.md").read_text()
    assert result["smoke"] is True and result["device"] == "cpu"
    versions = result["versions"]
    assert versions["torch"] and versions["transformers"] and versions["timm"]
    assert "driver" in versions
    # Stage one: both loops ran on the same images for every available family.
    for name in ("llava-1.5-7b", "qwen2.5-vl-7b", "mplug-owl2-7b"):
        row = result["stage_one"][name]
        assert "failed" not in row, row
        assert row["official"]["forward_passes_per_image"] == 4.0
        # The CLI's defaults come first; every other row says what it changed.
        assert row["runs"][0] == "agiqa" and row["agiqa"]["setting"] == "CLI defaults"
        assert row["agiqa"]["batch_size"] == 8 and not row["agiqa"]["compile"]
        assert row["agiqa"]["loader_workers"] == row["default_loader_workers"]
        other = row["runs"][2]
        assert other.endswith("_separate")
        for run in row["runs"]:
            assert row[run]["forward_passes_per_image"] == 2.0
            assert row[run]["images_per_second"] > 0 and row[run]["failed"] == 0
            assert row[run]["images"] == row["images"] == 16
            assert run == "agiqa" or row[run]["setting"].startswith("--")
        fused, separate = row[row["runs"][1]], row[other]
        assert fused["fused_prompts"] and not separate["fused_prompts"]
        assert 2 * fused["model_calls"] == separate["model_calls"]
        # Useful FLOPs, one figure for both sides: each prompt's language pass, one vision
        # pass per image; the official loop's redundant passes earn nothing.
        lang = row["flops_per_image_prompt"] - row["vision_flops_per_image"]
        assert row["useful_flops_per_image"] == pytest.approx(
            2 * lang + row["vision_flops_per_image"], rel=1e-3)
        for run in ("official", *row["runs"]):
            x = row[run]
            assert x["useful_tflops"] == pytest.approx(
                row["useful_flops_per_image"] * x["images_per_second"] / 1e12, abs=0.01)
        # The forward passes alone, on one prepared batch: the pipeline's share shows.
        only = row["model_only"]
        assert only["forward_passes_per_image"] == 2.0 and only["images_per_second"] > 0
        assert only["fused_prompts"]
        assert f"stage one {name}" in table and "CLI defaults" in table
    # Stage two: the official loop and agiqa fit, whole processes, with ratios.
    two = result["stage_two"]
    assert two["official"]["train_images_per_second"] > 0, two
    assert two["agiqa_fast"]["speedup_train_images_per_second"] > 0, two
    assert "stage two tiny" in table
    # N runs of the paper's protocol trained together, against the official loop.
    series = result["stage_two_series"]
    assert series["together"]["concurrent_runs"] == 2, series
    assert series["together"]["train_images_per_second"] > 0
    assert series["speedup_train_images_per_second_vs_official"] > 0
    assert series["ten_repeats_agiqa_3k_hours"]["official"] > 0
    assert "2 runs together" in table
    # Cache reads: every reader read the same vectors back (checked inside) and was timed.
    reads = result["cache_reads"]
    assert reads["official_torch_load"]["cold_seconds"] > 0
    assert reads["agiqa_hdf5"]["speedup_warm"] > 0
    assert "cache reads" in table
