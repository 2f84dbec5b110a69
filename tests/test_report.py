"""``agiqa report`` and ``score-folder --report``: content, bounds, escaping and bad input.

Run pages are made from a real ``fit`` run (conftest's ``report_run``: a tiny backbone on
generated images, once per session); score pages of thousands of rows from synthetic rows.
"""

import csv
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from agiqa.report.html import write_run_report, write_score_report
from agiqa.report.sources import ImageRow


class _Tags(HTMLParser):
    """Element names and text of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    p = _Tags()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.mark.slow
def test_run_report_shows_test_images_by_error_with_maps(report_run, report_data, tmp_path):
    out = tmp_path / "r.html"
    result = write_run_report(report_run, out)
    page = parse(out)
    thumbs = [a for t, a in page.tags if t == "img" and a.get("class") == "thumb"]
    maps = [a for t, a in page.tags if t == "img" and a.get("class") == "map"]
    assert result.images_shown == len(thumbs) == len(report_data.test) == 5
    assert len(maps) == 3 * len(thumbs)
    assert all(a["src"].startswith("data:image/") for t, a in page.tags if t == "img")
    # Sorted by absolute error, largest first, as predictions.csv has them.
    with open(report_run / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["subset"] == "test"]
    errors = {r["key"]: abs(float(r["score"]) - float(r["mos"])) for r in rows}
    shown = [a["alt"] for a in thumbs]
    assert shown == sorted(errors, key=lambda k: -errors[k])
    text = "".join(page.text)
    assert "MA-AGIQA paper" in text and "0.8939" in text and "0.9273" in text
    assert "zero-shot scores not shown" not in text  # read from the cache the run records
    assert len(rows) == 5 and {r["key"] for r in rows} == set(report_data.test)


@pytest.mark.slow
def test_paper_figures_only_for_the_papers_data_set_and_target(report_run_align, tmp_path):
    write_run_report(report_run_align, tmp_path / "r.html", maps=False)
    assert "MA-AGIQA paper" not in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_max_images_bounds_the_run_report(report_run, agiqa_cli, tmp_path):
    r = agiqa_cli("report", report_run, "--out", tmp_path / "r.html", "--max-images", "2",
                  "--no-maps", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["images_shown"] == 2 and result["images_total"] == 5
    assert "the 2 of 5 images with the largest absolute error" in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_names_are_escaped(report_run, tricky_name, tmp_path):
    out = tmp_path / "r.html"
    write_run_report(report_run, out, maps=False)
    html = out.read_text(encoding="utf-8")
    page = parse(out)
    assert [t for t, _ in page.tags].count("script") == 1  # the page's own, nothing injected
    assert not any(t == "img" and "onerror" in a for t, a in page.tags)
    assert "<img src=q" not in html and "&lt;img src=q onerror=alert(1)&gt;&amp;amp;" in html
    assert tricky_name in "".join(page.text)  # shown as written, newline included


def test_score_report_is_bounded_and_counts_every_score(synthetic_scores, make_images,
                                                        tmp_path):
    rows = synthetic_scores(1000)
    images = tmp_path / "images"
    ordered = sorted(rows, key=lambda r: r["score"])
    shown = ordered[:5] + ordered[-5:]
    make_images(images, [r["path"] for r in shown])
    items = [ImageRow(r["path"], images / r["path"], r["score"],
                      [r["gate_semantic_content"], r["gate_coherence"], r["gate_image"]],
                      zero_shot=r["zero_shot"]) for r in rows]
    out = tmp_path / "s.html"
    result = write_score_report(items, {"bad.png": "not an image"}, out, top_k=5,
                                csv_href="s.csv", source="images")
    page = parse(out)
    thumbs = [a["alt"] for t, a in page.tags if t == "img" and a.get("class") == "thumb"]
    assert thumbs == [r["path"] for r in shown] and result.images_total == 1000
    data = next(a for t, a in page.tags if t == "script" and a.get("id") == "histogram-data")
    assert data["type"] == "application/json"
    html = out.read_text()
    blob = html.split('id="histogram-data">')[1].split("</script>")[0]
    hist = json.loads(blob)
    scores = np.array([r["score"] for r in rows])
    for i in (0, 37, 100, 200):
        assert hist["passing"][i] == int((scores >= hist["thresholds"][i]).sum())
    assert hist["passing"][0] == 1000
    assert "the 5 lowest and the 5 highest of 1000 scores" in html and 'href="./s.csv"' in html
    assert "not an image" in html and "patch maps not shown" in html


def _score_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.slow
def test_report_of_a_score_file_with_maps(report_run, synthetic_scores, make_images, agiqa_cli,
                                          tmp_path):
    rows = synthetic_scores(6)
    make_images(tmp_path / "images", [r["path"] for r in rows])
    _score_csv(tmp_path / "scores.csv", rows)
    r = agiqa_cli("report", tmp_path / "scores.csv", "--images", tmp_path / "images", "--model",
                  report_run, "--top-k", "2")
    assert r.exit_code == 0, r.output
    page = parse(tmp_path / "scores.html")
    assert sum(1 for t, a in page.tags if t == "img" and a.get("class") == "thumb") == 4
    assert sum(1 for t, a in page.tags if t == "img" and a.get("class") == "map") == 12


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[1].update(score="high"), "line 3: score 'high' is not a number"),
    (lambda rows: rows[2].update(score="nan"), "line 4: score is nan, not a finite number"),
    (lambda rows: rows[3].update(path=rows[0]["path"]), "line 5: 'img_00000.png' is listed twice"),
    (lambda rows: rows[0].update(path="../secret.png"), "escapes the image root"),
    (lambda rows: [r.pop("gate_image") for r in rows], "unexpected columns path, score"),
])
def test_a_score_csv_edited_by_hand_gets_one_line(synthetic_scores, make_images, agiqa_cli,
                                                  tmp_path,
                                                  edit, message):
    rows = synthetic_scores(4)
    make_images(tmp_path / "images", [r["path"] for r in rows])
    edit(rows)
    _score_csv(tmp_path / "scores.csv", rows)
    r = agiqa_cli("report", tmp_path / "scores.csv", "--images", tmp_path / "images")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.output


def test_a_short_row_and_a_missing_image_are_named(agiqa_cli, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "s.csv").write_text("path,score,gate_image\na.png,1.0\n")
    r = agiqa_cli("report", tmp_path / "s.csv", "--images", tmp_path / "images")
    assert r.exit_code == 1 and "line 2: 2 fields, the header has 3" in r.output
    (tmp_path / "s.csv").write_text("path,score,gate_image\na.png,1.0,0.5\n")
    r = agiqa_cli("report", tmp_path / "s.csv", "--images", tmp_path / "images")
    assert r.exit_code == 1 and "1 scored image(s) not under --images" in r.output
    r = agiqa_cli("report", tmp_path / "s.csv")
    assert r.exit_code != 0 and "--images DIR is required" in r.output


@pytest.mark.slow
def test_a_run_without_predictions_or_of_another_version(report_run, agiqa_cli, tmp_path):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(report_run, bad)
    (bad / "predictions.csv").unlink()
    r = agiqa_cli("report", bad)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "no predictions.csv" in r.output

    shutil.copy(report_run / "predictions.csv", bad / "predictions.csv")
    config = json.loads((bad / "config.json").read_text())
    config["agiqa_version"] = "0.0.7"
    (bad / "config.json").write_text(json.dumps(config))
    r = agiqa_cli("report", bad)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "written by agiqa 0.0.7" in r.output

    r = agiqa_cli("report", tmp_path)
    assert r.exit_code == 1 and "neither a run directory of fit" in r.output


@pytest.mark.slow
def test_a_run_whose_images_moved_names_the_root(report_run, report_data, agiqa_cli, tmp_path):
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(report_run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["training"]["root"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    r = agiqa_cli("report", moved, "--no-maps")
    assert r.exit_code == 1 and "pass --root DIR" in r.output
    r = agiqa_cli("report", moved, "--no-maps", "--root", report_data.root)
    assert r.exit_code == 0, r.output


def test_score_folder_report_must_be_html(agiqa_cli, tmp_path):
    r = agiqa_cli("score-folder", tmp_path, "--model", tmp_path / "m", "--report",
                  tmp_path / "s.csv")
    assert r.exit_code == 64 and "--report: " in r.output and "does not end in .html" in r.output


def test_the_heading_names_the_label_file_and_gate_names_are_whole(tmp_path, make_run):
    folder = make_run(tmp_path / "run", tmp_path / "images", n=4, dataset="csv")
    config = json.loads((folder / "config.json").read_text())
    config["training"]["labels"] = str(tmp_path / "jpeg-labels.csv")
    (folder / "config.json").write_text(json.dumps(config))
    write_run_report(folder, tmp_path / "r.html", maps=False)
    html = (tmp_path / "r.html").read_text()
    assert "Metrics on jpeg-labels.csv</h2>" in html and "Metrics on csv" not in html
    assert "text-overflow: ellipsis" not in html.split(".gate .label")[1].split("}")[0]


def test_the_experiment_page_links_are_paths_whatever_the_names(tmp_path):
    """A run folder named like a URL scheme stays a path in the experiment's page (rule H)."""
    from agiqa.report.experiment import _href

    page = tmp_path / "report.html"
    assert _href(tmp_path / "javascript:alert(1)" / "seed-20", page) == \
        "./javascript%3Aalert%281%29/seed-20"
    assert _href(tmp_path / "reports" / "a b#c.html", page) == "./reports/a%20b%23c.html"
