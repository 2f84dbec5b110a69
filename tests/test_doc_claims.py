"""Claims of the documentation that the code can check: sizes from their formula, the preset
kinds, listed outputs and the rendered command line reference."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from agiqa.presets import KINDS, list_presets

REPO = Path(__file__).resolve().parents[1]
AGIQA_3K_IMAGES = 2982


def _text(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def test_the_pixel_cache_size_of_agiqa_3k_is_its_formula(tmp_path):
    from agiqa.data.pixel_cache import PixelCache

    cache = PixelCache(tmp_path)
    cache.put("ab" * 32, torch.zeros(3, 224, 224, dtype=torch.uint8))
    (entry,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    size = entry.stat().st_size
    assert size == 32 + 3 * 224 * 224 + 4  # the image's sha256, the pixels, their CRC-32
    mib = round(AGIQA_3K_IMAGES * size / 2**20)
    training = _text("docs/training.md")
    assert f"{size:,} B), {mib} MiB for\nAGIQA-3K's {AGIQA_3K_IMAGES:,} images" in training
    assert f"{round(size / 1024)} KiB per\nimage" in training


def test_the_presets_page_names_every_kind_of_the_code():
    page = _text("docs/presets.md")
    first = page.split("\n\n")[1]
    words = {4: "four", 5: "five", 6: "six"}
    assert f"one of {words[len(KINDS)]} kinds" in first
    for kind in KINDS:
        assert f"(`{kind}`)" in first, kind
    own = page[page.index("## Your own presets"):]
    assert "kinds " + ", ".join(f"`{k}`" for k in KINDS) in own.replace("\n", " ")


def test_the_list_presets_comments_are_what_it_returns():
    for page in ("README.md", "docs/api.md"):
        (shown,) = re.findall(r'list_presets\("mllms"\)\)  # (.*)', _text(page))
        assert shown == repr(list_presets("mllms")), page


def test_the_stated_tolerance_of_the_official_module_is_the_tests():
    (tolerance,) = re.findall(r"\n    TOLERANCE = (\S+)\n", _text("tests/conftest.py"))
    page = " ".join(_text("docs/checkpoints.md").split())
    assert f"within {tolerance} of each tensor's magnitude" in page


def test_the_cli_reference_shows_defaults_and_example_blocks():
    spec = importlib.util.spec_from_file_location("cli_reference",
                                                  REPO / "docs" / "hooks" / "cli_reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.on_page_markdown(_text("docs/cli.md"), page=None)
    assert hook.MARKER not in page and "Sentinel" not in page
    assert "| `--out` | directory | The cache folder (created, or resumed / appended to). | " \
           "_required |" in page
    # The examples are blocks of their own, not one paragraph with the prose around them.
    assert "Examples:\n\n```text\nagiqa score-folder ./generated --model runs/3k --out " \
           "scores.csv\n" in page
    assert "\b" not in page


def test_the_folders_the_readme_writes_are_ignored_by_git():
    """Running the README's Python block in a clone leaves no untracked folder behind."""
    outs = set(re.findall(r'\bout="([^"/]+)"', _text("README.md")))
    assert {"my-run", "unseen-cache"} <= outs
    ignored = set(_text(".gitignore").split())
    assert [o for o in sorted(outs) if f"/{o}/" not in ignored] == []


def test_the_api_pages_model_example_runs_without_autograd():
    """Its ``float(scores[0])`` would print torch's requires_grad warning under autograd."""
    block = _text("docs/api.md").split("## The model itself")[1].split("```python")[1]
    block = block.split("```")[0]
    assert "model(pixels, vectors" in block
    assert re.search(r"with torch\.no_grad\(\):[^\n]*\n    scores, gates = model\(", block)
