"""Both HTML reports in headless Chromium: no console errors, no network, controls that work.

Needs the ``playwright`` package (the ``test`` extra) and a Chromium: ``$AGIQA_CHROMIUM`` (then
required: the tests fail without it), else ``chromium`` / ``chromium-browser`` /
``google-chrome`` on the PATH (Debian: ``apt-get install chromium``); skipped with the reason
otherwise. Playwright drives that browser; it downloads none.
"""

import os
import shutil

import pytest

from agiqa.report.html import score_rows, write_run_report, write_score_report


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    # $AGIQA_CHROMIUM names the browser and makes it required: CI sets it, so the tests fail
    # there rather than skip.
    required = os.environ.get("AGIQA_CHROMIUM")
    try:
        from playwright import sync_api
    except ImportError:
        if required:
            pytest.fail("AGIQA_CHROMIUM is set but the playwright package is not installed")
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    exe = required or _chromium()
    if exe is None or not os.path.isfile(exe):
        if required:
            pytest.fail(f"AGIQA_CHROMIUM={required}: no such file")
        pytest.skip("no Chromium found (apt-get install chromium, or set AGIQA_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page opened from a file, recording console errors, page errors, dialogs and every
    request that is not the file itself or inline data."""

    def __init__(self, browser, path, tmp_path):
        self.errors, self.requests, self.dialogs = [], [], []
        self.page = browser.new_page(viewport={"width": 1100, "height": 900})
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: r.url.startswith(("data:", "file:"))
                     or self.requests.append(r.url))
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")
        self.shot = tmp_path / f"{path.stem}.png"

    def clean(self):
        assert self.errors == [] and self.requests == [] and self.dialogs == []

    def close(self):
        self.page.screenshot(path=str(self.shot), full_page=True)
        assert self.shot.stat().st_size > 10_000
        self.page.close()


@pytest.mark.slow
def test_run_report_in_chromium(browser, report_run, report_data, tricky_name, tmp_path):
    out = tmp_path / "run.html"
    write_run_report(report_run, out)
    page = Page(browser, out, tmp_path)
    p = page.page
    assert p.locator("img.thumb").count() == len(report_data.test)
    assert p.locator("#metrics tr").count() == 5
    assert p.locator("img.map:visible").count() == 0  # maps only on demand
    p.locator(".frame").first.click()
    assert p.locator("img.map:visible").count() == 1
    p.select_option("#map-kind", "share")
    assert p.locator("img.map[data-kind=share]:visible").count() == len(report_data.test)
    assert tricky_name in p.locator(".name").all_inner_texts()  # shown as text, not markup
    page.clean()
    page.close()


def test_score_report_in_chromium(browser, synthetic_scores, make_images, tricky_name, tmp_path):
    rows = synthetic_scores(300, seed=1)
    ordered = sorted(rows, key=lambda r: r["score"])
    make_images(tmp_path / "images", [r["path"] for r in ordered[:10] + ordered[-10:]])
    items, gate_names = score_rows(rows, tmp_path / "images")
    out = tmp_path / "scores.html"
    link = "javascript:alert(document.title).csv"  # a file of that name beside the page
    write_score_report(items, {tricky_name: "not an image"}, out, gate_names, top_k=10,
                       csv_href=link, source="images")
    page = Page(browser, out, tmp_path)
    p = page.page
    # The link is a file beside the page, never script; the page's own script runs by its
    # hash (the controls below work), and no inline script is allowed.
    assert p.locator("a").first.evaluate("a => a.href") == \
        tmp_path.as_uri() + "/javascript%3Aalert%28document.title%29.csv"
    csp = p.locator("meta[http-equiv=Content-Security-Policy]").get_attribute("content")
    assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    p.evaluate("""() => { const s = document.createElement('script');
                          s.textContent = 'window.injected = 1'; document.body.append(s); }""")
    assert p.evaluate("() => window.injected") is None
    page.errors.clear()  # the refused script's CSP report
    assert p.locator("img.thumb").count() == 20
    assert p.locator("#pass-count").inner_text() == "300"
    p.locator("#threshold").fill("100")
    after = int(p.locator("#pass-count").inner_text())
    scores = [r["score"] for r in rows]
    t = float(p.locator("#threshold-value").inner_text())
    assert 0 < after < 300 and abs(after - sum(s >= t for s in scores)) <= 2
    assert p.locator("rect.bin.below").count() > 0
    first = p.locator(".card .name").first.inner_text()
    assert first == ordered[0]["path"]
    p.select_option("#order", "best")
    assert p.locator(".card .name").first.inner_text() == ordered[-1]["path"]
    assert p.locator("#failures td").first.inner_text() == tricky_name
    page.clean()
    page.close()


@pytest.mark.slow
def test_reports_of_a_trained_run_an_evaluation_and_a_scored_folder(browser, graded, agiqa_cli,
                                                                     tmp_path):
    """fit → report, evaluate --out → report, score-folder --report: each page opens clean."""
    def run(*args):
        r = agiqa_cli(*args)
        assert r.exit_code in (0, 2), r.output
        return r

    root, cache = graded
    fit = ["--dataset", "csv", "--backbone", "tiny", "--no-pretrained", "--batch-size", "6",
           "--split", "random:0.6,0.2,0.2", "--loader-workers", "0", "-q"]
    run("fit", *fit, "--root", root, "--cache", cache, "--out", tmp_path / "run", "--epochs", "1")
    run("report", tmp_path / "run")
    run("evaluate", "--model", tmp_path / "run", "--dataset", "csv", "--root", root, "--cache",
        cache, "--split", "all", "--out", tmp_path / "eval", "-q")
    run("report", tmp_path / "eval", "--max-images", "12")
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in sorted(root.glob("*_[03].jpg")):
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    r = run("score-folder", folder, "--model", tmp_path / "run", "--cache", tmp_path / "c",
            "--report", tmp_path / "scores.html", "-q", "--loader-workers", "0")
    assert r.exit_code == 2 and (tmp_path / "scores.csv").is_file()
    n_scored = len(list(folder.glob("*_*.jpg")))
    for html, thumbs in ((tmp_path / "run" / "report.html", 6),
                         (tmp_path / "eval" / "report.html", 12),
                         (tmp_path / "scores.html", n_scored)):
        page = Page(browser, html, tmp_path)
        assert page.page.locator("img.thumb").count() == thumbs
        assert page.page.locator("img.map").count() == 3 * thumbs
        page.clean()
        page.close()
    text = (tmp_path / "eval" / "report.html").read_text()
    assert "zero-shot –" not in text  # evaluate --out records the zero-shot scores
