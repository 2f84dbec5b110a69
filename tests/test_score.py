"""``agiqa score-folder`` and ``agiqa.Scorer``: paths, cache keys, cache reuse, revisions."""

import csv
import json
import shutil

import pytest
from PIL import Image

import agiqa
from agiqa.errors import BadImageError

# Each test runs the MLLM and a trained model on a CPU.
pytestmark = pytest.mark.slow

FIT = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
       "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q"]
P = 2  # the paper's prompts: P rows per image in a forward pass


@pytest.fixture(scope="module")
def model_dir(agiqa_cli, graded, tmp_path_factory):  # noqa: F811
    root, cache = graded
    out = tmp_path_factory.mktemp("run") / "run"
    # Without -q, --json alone must keep progress and epoch lines off stdout.
    r = agiqa_cli("fit", *[a for a in FIT if a != "-q"], "--root", root, "--cache", cache,
                  "--out", out, "--epochs", "1", "--json")
    assert r.exit_code == 0, r.output
    assert [x["name"] for x in json.loads(r.stdout)["runs"]] == ["seed 20"]
    return out


def test_score_folder_scores_good_images_and_names_broken_ones(agiqa_cli, model_dir, photo_folder,
                                                               tmp_path,
                                                               monkeypatch):
    root, kinds = photo_folder
    r = agiqa_cli("score-folder", root, "--model", model_dir, "--out", tmp_path / "s.csv", "-q",
                  "--loader-workers", "0")
    assert r.exit_code == 2, r.output
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    good = sorted(k for k, v in kinds.items() if v == "ok")
    assert sorted(row["path"] for row in rows) == good  # nested/deeper/... at every depth
    assert list(rows[0]) == ["path", "score", "gate_semantic_content", "gate_coherence",
                             "gate_image", "zero_shot"]
    assert "failed: zero_bytes.png: empty file (0 bytes)" in r.stderr
    assert "failed: truncated.jpg: cannot decode" in r.stderr
    assert "failed: text_as.jpg: not an image" in r.stderr
    assert f"count {len(good)}" in r.output and "failed 3" in r.output
    # From inside the folder, `score-folder .` names the same relative paths, and the
    # content-keyed per-user cache already holds every vector.
    monkeypatch.chdir(root)
    again = agiqa_cli("score-folder", ".", "--model", model_dir, "--json", "-q",
                      "--loader-workers", "0")
    data = json.loads(again.stdout)
    by_path = {row["path"]: row["score"] for row in data["rows"]}
    assert sorted(by_path) == good and data["summary"]["computed"] == 0
    assert all(abs(by_path[row["path"]] - float(row["score"])) < 1e-4 for row in rows)
    assert sorted(data["failures"]) == ["text_as.jpg", "truncated.jpg", "zero_bytes.png"]

    scorer = agiqa.Scorer.from_pretrained(model_dir)
    api = scorer.score([root / "chelsea.png", Image.open(root / "chelsea.png"),
                        root / "truncated.jpg", Image.open(root / "truncated.jpg")])
    cli_score = next(float(x["score"]) for x in rows if x["path"] == "chelsea.png")
    assert abs(api[0]["score"] - cli_score) < 1e-4
    assert abs(api[1]["score"] - cli_score) < 1e-2  # a PIL image takes the same path in memory
    keys = ["path", "score", "gate_semantic_content", "gate_coherence", "gate_image",
            "zero_shot", "error"]
    assert all(list(row) == keys for row in api)  # files and in-memory images alike
    assert api[0]["path"] == str(root / "chelsea.png") and api[1]["path"] is None
    assert api[0]["error"] is None and api[1]["error"] is None
    # A bad file is reported in its row, as score-folder reports it, not raised.
    assert "cannot decode" in api[2]["error"] and api[2]["score"] is None
    assert api[2]["gate_image"] is None and api[3]["path"] is None
    assert api[3]["error"].startswith("cannot read the image") and api[3]["score"] is None
    with pytest.raises(BadImageError, match="truncated.jpg"):
        scorer.score([root / "chelsea.png", root / "truncated.jpg"], errors="raise")


def test_a_rewritten_image_is_extracted_again_and_json_output(agiqa_cli, model_dir, photo_folder,
                                                              tmp_path):
    root, _ = photo_folder
    folder = tmp_path / "changing"
    folder.mkdir()
    Image.open(root / "chelsea.png").save(folder / "x.png")
    first = agiqa_cli("score-folder", folder, "--model", model_dir, "-q", "--out",
                      tmp_path / "a.json")
    assert first.exit_code == 0, first.output
    Image.open(root / "rocket.bmp").convert("RGB").save(folder / "x.png")
    second = agiqa_cli("score-folder", folder, "--model", model_dir, "-q", "--out",
                       tmp_path / "b.json")
    assert second.exit_code == 0, second.output
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert set(a) == {"rows", "failures", "summary", "skipped_files", "changed"}
    assert a["summary"]["computed"] == 1 and b["summary"]["computed"] == 1  # new bytes, new key
    assert b["changed"] == [] and b["summary"]["changed"] == 0  # a new key, not a changed one
    assert [r["path"] for r in b["rows"]] == ["x.png"] and b["failures"] == {}
    assert a["rows"][0]["zero_shot"] != b["rows"][0]["zero_shot"]


def test_score_folder_reuses_the_vectors_extract_semantics_wrote(agiqa_cli, model_dir, photo_folder,
                                                                tmp_path, tiny_llava,
                                                                mllm_forwards):
    root, kinds = photo_folder
    cache = tmp_path / "cache"
    r = agiqa_cli("extract-semantics", "--model", tiny_llava, "--images", root, "--out", cache,
                  "-q", "--loader-workers", "0", "--batch-size", "4")
    assert r.exit_code == 2, r.output  # the broken files
    good = sorted(k for k, v in kinds.items() if v == "ok")
    # Both prompts of a batch in one pass (rows prompt-major).
    assert len(mllm_forwards) == -(-len(good) // 4)
    assert set(mllm_forwards) <= {P * 4, P * (len(good) % 4)}
    mllm_forwards.clear()
    s = agiqa_cli("score-folder", root, "--model", model_dir, "--cache", cache, "--json",
                  "--loader-workers", "0")
    assert s.exit_code == 2, s.output
    data = json.loads(s.stdout)
    assert mllm_forwards == [] and data["summary"]["computed"] == 0
    assert sorted(row["path"] for row in data["rows"]) == good
    verify = agiqa_cli("cache", "verify", cache, "--json")
    report = json.loads(verify.stdout)
    assert report["missing"] == [] and report["changed"] == [] and report["checked"] == len(good)


def _three_images(photos, folder):
    folder.mkdir()
    for name in ("chelsea.png", "coffee.webp", "rocket.bmp"):
        Image.open(photos / name).convert("RGB").save(folder / f"{name.split('.')[0]}.png")
    return folder


def test_an_image_changed_since_extraction_is_computed_again_with_cache(agiqa_cli,
        model_dir, photo_folder, tmp_path, tiny_llava, mllm_forwards):
    photos, _ = photo_folder
    folder = _three_images(photos, tmp_path / "imgs")
    cache = tmp_path / "cache"
    r = agiqa_cli("extract-semantics", "--model", tiny_llava, "--images", folder, "--out", cache,
                  "-q",
                  "--loader-workers", "0")
    assert r.exit_code == 0, r.output
    Image.open(photos / "astronaut.jpg").convert("RGB").save(folder / "coffee.png")
    mllm_forwards.clear()
    s = agiqa_cli("score-folder", folder, "--model", model_dir, "--cache", cache, "-q",
                  "--loader-workers", "0", "--out", tmp_path / "s.json")
    assert s.exit_code == 0, s.output
    assert "recomputed 1 image(s) that changed since their vectors were cached: coffee.png" \
        in s.stderr
    assert mllm_forwards == [P]  # the changed image alone went through the MLLM
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["failures"] == {} and data["changed"] == ["coffee.png"]
    assert data["summary"]["computed"] == 1 and data["summary"]["changed"] == 1
    assert [row["path"] for row in data["rows"]] == ["chelsea.png", "coffee.png", "rocket.png"]
    verify = json.loads(agiqa_cli("cache", "verify", cache, "--json").stdout)
    assert verify["changed"] == [] and verify["missing"] == [] and verify["checked"] == 3
    # The same scores as from a cache filled with the new image from the start.
    fresh = agiqa_cli("score-folder", folder, "--model", model_dir, "--cache", tmp_path / "fresh",
                      "-q", "--loader-workers", "0", "--json")
    expected = {row["path"]: row for row in json.loads(fresh.stdout)["rows"]}
    for row in data["rows"]:
        assert abs(row["score"] - expected[row["path"]]["score"]) < 1e-4, row["path"]
        assert abs(row["zero_shot"] - expected[row["path"]]["zero_shot"]) < 1e-4, row["path"]
    mllm_forwards.clear()
    again = json.loads(agiqa_cli("score-folder", folder, "--model", model_dir, "--cache", cache,
                       "-q",
                                 "--loader-workers", "0", "--json").stdout)
    assert mllm_forwards == [] and again["changed"] == [] and again["summary"]["computed"] == 0


def test_a_changed_image_that_breaks_or_changes_again_while_recomputed_fails(agiqa_cli,
        model_dir, photo_folder, tmp_path, tiny_llava, monkeypatch):
    import agiqa.stages.scoring.vectors as score_module  # VectorProvider.recompute extracts

    photos, _ = photo_folder
    folder = _three_images(photos, tmp_path / "imgs")
    cache = tmp_path / "cache"
    assert agiqa_cli("extract-semantics", "--model", tiny_llava, "--images", folder, "--out", cache,
                     "-q", "--loader-workers", "0").exit_code == 0
    astronaut = Image.open(photos / "astronaut.jpg").convert("RGB")
    astronaut.save(folder / "coffee.png")
    astronaut.save(folder / "rocket.png")
    original = score_module.extract_semantics

    def extract_while_files_change(cfg, source, encoder):
        assert source.keys == ["coffee.png", "rocket.png"]  # only the changed files
        (folder / "coffee.png").write_text("not an image any more\n")
        report = original(cfg, source, encoder)
        Image.open(photos / "chelsea.png").convert("RGB").save(folder / "rocket.png")
        return report

    monkeypatch.setattr(score_module, "extract_semantics", extract_while_files_change)
    scorer = agiqa.Scorer.from_pretrained(model_dir, cache_dir=cache, loader_workers=0)
    report = scorer.score_folder(folder)
    assert [row["path"] for row in report.rows] == ["chelsea.png"]
    assert report.failures["coffee.png"].startswith("not an image")  # its own reason
    assert report.failures["rocket.png"] == "changed while it was being scored"
    assert report.changed == ["rocket.png"] and report.computed == 1


def test_a_new_cache_is_rooted_at_the_folder_and_batch_size_is_honoured(agiqa_cli, model_dir,
                                                                        photo_folder,
                                                                       tmp_path, mllm_forwards):
    root, kinds = photo_folder
    good = sorted(k for k, v in kinds.items() if v == "ok")
    cache = tmp_path / "new-cache"
    s = agiqa_cli("score-folder", root, "--model", model_dir, "--cache", cache, "-q", "--json",
                  "--batch-size", "3", "--loader-workers", "0")
    assert json.loads(s.stdout)["summary"]["computed"] == len(good)
    assert len(mllm_forwards) == -(-len(good) // 3) and max(mllm_forwards) == P * 3
    info = json.loads(agiqa_cli("cache", "info", cache, "--json").stdout)
    assert info["root"] == str(root.resolve()) and info["images"] == len(good)
    assert agiqa_cli("cache", "verify", cache).exit_code == 2  # only the broken files: failed
    # A project folder copied whole (the original still there): its cache scores its own
    # images, found relative to the cache, and computes nothing again.
    project = tmp_path / "project"
    shutil.copytree(root, project / "images")
    agiqa_cli("score-folder", project / "images", "--model", model_dir, "--cache",
              project / "cache", "-q", "--loader-workers", "0")  # rooted at project/images
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    mllm_forwards.clear()
    s = agiqa_cli("score-folder", copy / "images", "--model", model_dir, "--cache",
                  copy / "cache", "-q", "--json", "--loader-workers", "0")
    scored = json.loads(s.stdout)
    assert sorted(r["path"] for r in scored["rows"]) == good, scored["failures"]
    assert scored["summary"]["computed"] == 0 and mllm_forwards == []
    # PIL images are batched by batch_size too.
    mllm_forwards.clear()
    scorer = agiqa.Scorer.from_pretrained(model_dir, batch_size=2)
    images = [Image.open(root / k) for k in good[:5]]
    assert len(scorer.score(images)) == 5
    assert mllm_forwards == [P * 2, P * 2, P * 1]


def test_a_cache_of_another_mllm_is_refused(agiqa_cli, model_dir, photo_folder, tmp_path,
                                            tiny_qwen):
    root, _ = photo_folder
    other = tmp_path / "qwen-cache"
    agiqa_cli("extract-semantics", "--model", tiny_qwen, "--images", root, "--out", other, "-q",
              "--loader-workers", "0")
    s = agiqa_cli("score-folder", root, "--model", model_dir, "--cache", other)
    assert s.exit_code == 1
    error = s.output.strip().splitlines()[-1]
    assert error.startswith(f"Error: cache {other} has fingerprint")
    assert str(tiny_qwen) in error and "the model needs" in error


def _hub_repo(hub, source, commits, main):
    repo = hub / "models--agiqa-test--tiny-llava"
    for c in commits:
        shutil.copytree(source, repo / "snapshots" / c)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(main)


def test_the_recorded_revision_is_used_and_a_gone_one_is_named(agiqa_cli, model_dir, photo_folder,
                                                               tmp_path, tiny_llava,
                                                               monkeypatch):
    """A hub repository (a local hub cache, offline) whose main moved on since training."""
    from huggingface_hub import constants

    from agiqa.cache import fingerprint_of

    old, new = "a" * 40, "b" * 40
    hub = tmp_path / "hub"
    _hub_repo(hub, tiny_llava, [old, new], main=new)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["semantics"].update(model="agiqa-test/tiny-llava", revision=old)
    config["fingerprint"] = fingerprint_of(config["semantics"])
    (run_dir / "config.json").write_text(json.dumps(config))
    root, _ = photo_folder
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(root / "chelsea.png", folder)

    def score(*extra):
        return agiqa_cli("score-folder", folder, "--model", run_dir, "-q", "--loader-workers", "0",
                         *extra)

    ok = score("--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["summary"]["computed"] == 1
    shutil.rmtree(hub / "models--agiqa-test--tiny-llava" / "snapshots" / old)
    assert score().exit_code == 0  # every vector is cached: the MLLM is not needed
    shutil.copy(root / "coffee.webp", folder)
    gone = score()
    assert gone.exit_code == 1
    assert f"at revision {old}, the revision the model was trained with" in gone.output
    assert "pass --revision REV" in gone.output
    other = score("--revision", "c" * 40)
    assert other.exit_code == 1
    assert f"cannot load revision {'c' * 40}" in other.output and old in other.output
    moved = score("--revision", "main", "--json")
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.stdout)["summary"]["computed"] == 2  # vectors of another revision


def test_model_without_semantics_is_refused(agiqa_cli, official_ma_agiqa, tmp_path):
    from agiqa.models.official import import_official

    # The official module's state dict (tests/fixtures/ma_agiqa) at semantic width 16.
    import_official(official_ma_agiqa.checkpoint(semantic_dim=16), tmp_path / "m")
    r = agiqa_cli("score-folder", tmp_path, "--model", tmp_path / "m")
    assert r.exit_code == 1 and "agiqa import-official" in r.output


def test_json_output_is_json_alone_on_stdout(agiqa_cli, graded, model_dir, tmp_path, tiny_llava):  # noqa: F811
    """--json without -q: progress lines must not reach stdout (fit: the model_dir fixture)."""
    root, cache = graded
    outputs = {
        "extract-semantics": agiqa_cli("extract-semantics", "--model", tiny_llava, "--dataset",
                                       "csv",
                                       "--root", root, "--out", cache, "--loader-workers", "0",
                                       "--json"),
        "evaluate": agiqa_cli("evaluate", "--model", model_dir, "--dataset", "csv", "--root", root,
                              "--cache", cache, "--json"),
        "score-folder": agiqa_cli("score-folder", root, "--model", model_dir, "--cache", cache,
                                  "--loader-workers", "0", "--json"),
        "cache info": agiqa_cli("cache", "info", cache, "--json"),
        "cache verify": agiqa_cli("cache", "verify", cache, "--json"),
    }
    for name, r in outputs.items():
        assert r.exit_code == 0, (name, r.output)
        data = json.loads(r.stdout)
        assert isinstance(data, dict) and data, name
    assert json.loads(outputs["extract-semantics"].stdout)["reused"] == 30
    assert len(json.loads(outputs["score-folder"].stdout)["rows"]) == 30


@pytest.mark.parametrize("make", ["I;16", "I", "exif", "palette_alpha"])
def test_an_in_memory_image_scores_exactly_as_its_file(model_dir, tmp_path, real_photos, make):
    """``Scorer.score`` decodes a PIL image by the rules of files: a 16-bit or 32-bit image,
    an EXIF-rotated JPEG and a palette with transparency score as the same image saved to a
    file (not as PIL's ``convert("RGB")`` of it)."""
    import numpy as np

    photo = Image.fromarray(real_photos()["chelsea"]).resize((120, 80))
    path = tmp_path / "x.png"
    if make == "I;16":
        img = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)
        assert img.mode == "I;16"
    elif make == "I":
        img, path = Image.fromarray(np.asarray(photo.convert("L"), np.int32) * 257), \
            tmp_path / "x.tif"
    elif make == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90° on display
        path = tmp_path / "x.jpg"
        photo.save(path, quality=92, exif=exif.tobytes())
        img = Image.open(path)
    else:
        img = photo.convert("P", palette=Image.ADAPTIVE)
        img.info["transparency"] = 0
    if make != "exif":
        img.save(path)
    scorer = agiqa.Scorer.from_pretrained(model_dir, batch_size=1, loader_workers=0)
    from_file = scorer.score([path])[0]
    in_memory = scorer.score([img])[0]
    assert from_file["error"] is None and in_memory["error"] is None
    for column in ("score", "gate_image", "zero_shot"):
        assert in_memory[column] == pytest.approx(from_file[column], abs=1e-5), column


def test_evaluate_and_scoring_share_the_pixel_cache_of_fit(model_dir, graded, decoded_names):
    """The model's pixels decoded by ``evaluate`` are kept, and a second evaluate and a
    ``score-folder`` on the same images decode none of them."""
    root, cache = graded
    seen = decoded_names
    n = len(list(root.glob("*.jpg")))
    first = agiqa.evaluate(model_dir, dataset="csv", root=root, cache=cache, split="all",
                           loader_workers=0, progress=False)
    assert len(seen) == n
    seen.clear()
    again = agiqa.evaluate(model_dir, dataset="csv", root=root, cache=cache, split="all",
                           loader_workers=0, progress=False)
    assert seen == [] and again["srcc"] == first["srcc"]
    report = agiqa.Scorer.from_pretrained(model_dir, cache_dir=cache, loader_workers=0) \
        .score_folder(root)
    assert seen == [] and report.computed == 0 and len(report.rows) == n
    off = agiqa.Scorer.from_pretrained(model_dir, cache_dir=cache, loader_workers=0,
                                       pixel_cache=False).score_folder(root)
    assert len(seen) == n and [r["score"] for r in off.rows] == [r["score"] for r in report.rows]


def test_a_killed_loader_in_scoring_and_evaluate_names_the_image(model_dir, graded, tmp_path,
                                                                 kill_loader_on, deadline):
    """A loader process killed by the operating system while it reads an image: score-folder
    fails that image by name and scores the rest; evaluate stops with one line naming it.
    Neither hangs (the deadline)."""
    root, cache = graded
    victim = "coffee_2.jpg"
    kill_loader_on(victim)
    report = agiqa.Scorer.from_pretrained(model_dir, cache_dir=cache, loader_workers=2) \
        .score_folder(root)
    from agiqa.data.loader import KILLED

    assert report.failures == {victim: KILLED}
    assert len(report.rows) == len(list(root.glob("*.jpg"))) - 1
    with pytest.raises(BadImageError, match=f"{victim}: its loader process was killed"):
        agiqa.evaluate(model_dir, dataset="csv", root=root, cache=cache, split="all",
                       loader_workers=2, progress=False)


def test_a_non_finite_score_fails_its_image_and_the_csv_makes_a_report(agiqa_cli, model_dir,
                                                                        graded, tmp_path,
                                                                        monkeypatch):
    """A NaN or infinite prediction is that image's failure, never a score; `agiqa report`
    reads the CSV score-folder wrote, and the same holds for the Python API."""
    import torch

    import agiqa.stages.scoring.scorer as scorer_module

    root, _ = graded
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in sorted(root.glob("*_[03].jpg"))[:4]:
        shutil.copy(p, folder / p.name)
    real = scorer_module.predict

    def broken(*args, **kwargs):
        scores, gates = real(*args, **kwargs)
        scores = scores.clone()
        scores[0] = float("nan")
        if len(scores) > 1:
            scores[1] = float("inf")
        return scores, gates

    monkeypatch.setattr(scorer_module, "predict", broken)
    out = tmp_path / "s.csv"
    r = agiqa_cli("score-folder", folder, "--model", model_dir, "--out", out, "-q",
            "--loader-workers", "0", "--report", tmp_path / "s.html")
    assert r.exit_code == 2, r.output
    assert r.output.count("non-finite score") == 2 and "failed 2" in r.output
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(x["score"]))) for x in rows)
    again = agiqa_cli("report", out, "--images", folder, "--out", tmp_path / "again.html")
    assert again.exit_code == 0, again.output
    api = agiqa.Scorer.from_pretrained(model_dir).score([folder / p.name for p in
                                                         sorted(folder.iterdir())])
    assert sum(1 for x in api if x["error"] and "non-finite" in x["error"]) == 2
    assert all(x["score"] is None for x in api if x["error"])


def _unseen(graded, folder):
    root, _ = graded
    folder.mkdir()
    for p in sorted(root.glob("*_[03].jpg"))[:2]:
        shutil.copy(p, folder / p.name)
    return folder


def test_a_csv_of_the_users_beside_the_report_is_never_replaced(agiqa_cli, model_dir, graded,
                                                                 tmp_path):
    """With a model that scores: ``--out x.json --report mine.html`` would put the table in
    ``mine.csv``, the user's file; refused, nothing written."""
    mine = tmp_path / "mine.csv"
    mine.write_text("my,data\n")
    r = agiqa_cli("score-folder", _unseen(graded, tmp_path / "unseen"), "--model", model_dir,
                  "-q", "--loader-workers", "0", "--out", tmp_path / "x.json", "--report",
                  tmp_path / "mine.html", catch_exceptions=True)
    assert r.exit_code == 1 and "not a score file agiqa wrote" in r.output, r.output
    assert mine.read_text() == "my,data\n" and not (tmp_path / "mine.html").exists()


def test_out_and_report_of_one_name_are_refused(agiqa_cli, model_dir, graded, tmp_path):
    """With a model that scores: ``--out same.html --report same.html`` is a usage error, not
    scores written to ``same.csv`` under the line ``-> same.html``."""
    same = tmp_path / "same.html"
    r = agiqa_cli("score-folder", _unseen(graded, tmp_path / "unseen"), "--model", model_dir,
                  "-q", "--loader-workers", "0", "--out", same, "--report", same,
                  catch_exceptions=True)
    assert r.exit_code == 64 and "does not end in .csv or .json" in r.output, r.output
    assert not same.exists() and not same.with_suffix(".csv").exists()


def test_a_second_thread_scoring_with_one_scorer_is_refused_and_the_first_finishes(
        model_dir, graded, monkeypatch):
    """Two threads on one Scorer: while the first scores (held inside the model's forward),
    the second is refused in one line, and the first's scores are whole."""
    import threading

    import agiqa.stages.scoring.scorer as scorer_module
    from agiqa.errors import ConfigError

    root, cache = graded
    paths = sorted(root.glob("*.jpg"))[:3]
    scorer = agiqa.Scorer.from_pretrained(model_dir, cache_dir=cache, loader_workers=0)
    expected = [row["score"] for row in scorer.score(paths)]
    inside, go_on = threading.Event(), threading.Event()
    real = scorer_module.predict

    def held(*args, **kwargs):
        inside.set()
        go_on.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer_module, "predict", held)
    first: list = []
    a = threading.Thread(target=lambda: first.extend(scorer.score(paths)))
    a.start()
    assert inside.wait(60)
    second: list = []

    def again():
        try:
            scorer.score(paths[:1])
        except Exception as e:  # noqa: BLE001 - what the second thread met is the finding
            second.append(e)
        else:
            second.append(None)

    b = threading.Thread(target=again)
    b.start()
    b.join(10)
    refused = not b.is_alive() and second and second[0]
    go_on.set()
    a.join(60)
    b.join(60)
    assert isinstance(refused, ConfigError), second
    assert len(str(refused).splitlines()) == 1 and "another thread" in str(refused)
    assert [row["score"] for row in first] == expected
