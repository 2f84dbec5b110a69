"""``agiqa score-folder`` and ``agiqa.Scorer`` with a throwaway model and an empty cache."""

import csv
import json

import pytest
from click.testing import CliRunner
from PIL import Image

import agiqa
from agiqa.cli import cli
from tests.test_fit import FIT, graded  # noqa: F401 - the shared fixture


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model_dir(graded, tmp_path_factory):  # noqa: F811
    root, cache = graded
    out = tmp_path_factory.mktemp("run") / "run"
    r = run("fit", *FIT, "--root", root, "--cache", cache, "--out", out, "--epochs", "1")
    assert r.exit_code == 0, r.output
    return out


def test_score_folder_scores_good_images_and_names_broken_ones(model_dir, photo_folder, tmp_path):
    root, kinds = photo_folder
    r = run("score-folder", root, "--model", model_dir, "--out", tmp_path / "s.csv", "-q",
            "--loader-workers", "0")
    assert r.exit_code == 2, r.output
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    good = sorted(k for k, v in kinds.items() if v == "ok")
    assert sorted(row["path"] for row in rows) == good
    assert list(rows[0]) == ["path", "score", "gate_semantic_content", "gate_coherence",
                             "gate_image", "zero_shot"]
    assert "failed: zero_bytes.png: empty file (0 bytes)" in r.stderr
    assert "failed: truncated.jpg: cannot decode" in r.stderr
    assert "failed: text_as.jpg: not an image" in r.stderr
    assert f"count {len(good)}" in r.output and "failed 3" in r.output
    # A second run finds every vector in the per-user cache.
    again = run("score-folder", root, "--model", model_dir, "--json", "-q")
    data = json.loads(again.stdout)
    by_path = {row["path"]: row["score"] for row in data["rows"]}
    assert all(abs(by_path[row["path"]] - float(row["score"])) < 1e-4 for row in rows)

    changed = tmp_path / "changed"
    changed.mkdir()
    Image.open(root / "chelsea.png").save(changed / "x.png")
    run("score-folder", changed, "--model", model_dir, "-q")
    Image.open(root / "rocket.bmp").convert("RGB").save(changed / "x.png")
    stale = run("score-folder", changed, "--model", model_dir, "-q")
    assert stale.exit_code == 2 and "failed: x.png: changed since its vectors were cached" \
        in stale.stderr

    scorer = agiqa.Scorer.from_pretrained(model_dir)
    api = scorer.score([root / "chelsea.png", Image.open(root / "chelsea.png")])
    cli_score = next(float(x["score"]) for x in rows if x["path"] == "chelsea.png")
    assert abs(api[0]["score"] - cli_score) < 1e-4
    assert abs(api[1]["score"] - cli_score) < 1e-2  # a PIL image takes the same path in memory
    assert set(api[0]) == {"path", "score", "gate_semantic_content", "gate_coherence",
                           "gate_image", "zero_shot"}


def test_model_without_semantics_is_refused(tmp_path):
    import torch

    from agiqa.models.official import import_official
    from agiqa.testing.official_reference import OfficialMAAGIQA

    torch.save(OfficialMAAGIQA(embed_dim=32, vit_dim=32, vit_heads=1, dim_mlp=32,
                               semantic_dim=16).state_dict(), tmp_path / "o.pt")
    import_official(tmp_path / "o.pt", tmp_path / "m")
    r = run("score-folder", tmp_path, "--model", tmp_path / "m")
    assert r.exit_code == 1 and "import official checkpoints with --cache CACHE" in r.output
