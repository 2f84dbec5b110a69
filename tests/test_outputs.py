"""Outputs never replace an input or a file agiqa did not write; what a report links cannot run
script; a score is a finite number or a failure; a model with NaN weights is refused once."""

import json
import threading

import pytest

from agiqa.errors import CheckpointError, ConfigError
from agiqa.report.html import link_href, write_run_report, write_score_report
from agiqa.report.sources import read_score_file


def _one_line(r, *needles, code=1):
    """One ``Error:`` line (a usage error, exit 64, is preceded by click's usage lines)."""
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("Error: ")
             or code != 64]
    assert r.exit_code == code and len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def tiny(tmp_path, make_run):
    return make_run(tmp_path / "run", tmp_path / "images", n=4)


def _score_file(tmp_path, make_images, make_score_rows):
    rows = make_score_rows(4)
    make_images(tmp_path / "imgs", [r["path"] for r in rows])
    scores = tmp_path / "S.csv"
    scores.write_text("path,score,gate_semantic_content,gate_coherence,gate_image,zero_shot\n"
                      + "".join(f"{r['path']},{r['score']},{r['gate_semantic_content']},"
                                f"{r['gate_coherence']},{r['gate_image']},{r['zero_shot']}\n"
                                for r in rows))
    return scores


# -- A: outputs --------------------------------------------------------------------------------
def test_report_never_replaces_its_score_file_or_a_model(agiqa_cli, tiny, tmp_path, make_images,
                                                         synthetic_scores):
    scores = _score_file(tmp_path, make_images, synthetic_scores)
    before = scores.read_bytes()
    r = agiqa_cli("report", scores, "--images", tmp_path / "imgs", "--out", scores,
                  catch_exceptions=True)
    _one_line(r, "--out", "does not end in .html", code=64)
    assert scores.read_bytes() == before
    model = (tiny / "model.safetensors").read_bytes()
    r = agiqa_cli("report", tiny, "--out", tiny / "model.safetensors", "--no-maps",
                  catch_exceptions=True)
    _one_line(r, "does not end in .html", code=64)
    assert (tiny / "model.safetensors").read_bytes() == model
    with pytest.raises(ConfigError, match="does not end in .html"):  # the library as well
        write_run_report(tiny, tiny / "config.json", maps=False)


def test_report_never_replaces_an_html_file_of_the_users(agiqa_cli, tiny, tmp_path, make_images,
                                                         synthetic_scores):
    mine = tmp_path / "mine.html"
    mine.write_text("<p>my notes</p>")
    r = agiqa_cli("report", tiny, "--out", mine, "--no-maps", catch_exceptions=True)
    _one_line(r, str(mine), "not a report agiqa wrote")
    assert mine.read_text() == "<p>my notes</p>"
    (tiny / "report.html").write_text("<p>mine too</p>")  # the default --out
    r = agiqa_cli("report", tiny, "--no-maps", catch_exceptions=True)
    _one_line(r, "not a report agiqa wrote")
    assert (tiny / "report.html").read_text() == "<p>mine too</p>"
    (tiny / "report.html").unlink()
    # A report agiqa wrote is replaced by the next one.
    for _ in range(2):
        assert agiqa_cli("report", tiny, "--no-maps", catch_exceptions=True).exit_code == 0
    scores = _score_file(tmp_path, make_images, synthetic_scores)
    scores.with_suffix(".html").write_text("mine")  # the default --out of a score file
    r = agiqa_cli("report", scores, "--images", tmp_path / "imgs", catch_exceptions=True)
    _one_line(r, "not a report agiqa wrote")


def test_score_folder_never_replaces_a_csv_beside_the_report(agiqa_cli, tmp_path):
    """Refused before the model is even loaded: nothing is scored, nothing written."""
    (tmp_path / "unseen").mkdir()
    mine = tmp_path / "mine.csv"
    mine.write_text("my,data\n")
    r = agiqa_cli("score-folder", tmp_path / "unseen", "--model", tmp_path / "no-model", "--out",
            tmp_path / "x.json", "--report", tmp_path / "mine.html", catch_exceptions=True)
    _one_line(r, str(mine), "not a score file agiqa wrote")
    assert mine.read_text() == "my,data\n" and not (tmp_path / "mine.html").exists()
    r = agiqa_cli("score-folder", tmp_path / "unseen", "--model", tmp_path / "no-model", "--out",
                  mine, catch_exceptions=True)
    _one_line(r, str(mine), "not a score file agiqa wrote")
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    r = agiqa_cli("score-folder", tmp_path / "unseen", "--model", tmp_path / "no-model", "--out",
            tmp_path / "notes.json", catch_exceptions=True)
    _one_line(r, "not a score file agiqa wrote")
    mine_html = tmp_path / "page.html"
    mine_html.write_text("<p>mine</p>")
    r = agiqa_cli("score-folder", tmp_path / "unseen", "--model", tmp_path / "no-model", "--report",
            mine_html, catch_exceptions=True)
    _one_line(r, "not a report agiqa wrote")


def test_score_folder_out_and_report_cannot_be_one_file(agiqa_cli, tmp_path):
    (tmp_path / "unseen").mkdir()
    same = tmp_path / "same.html"
    r = agiqa_cli("score-folder", tmp_path / "unseen", "--model", tmp_path / "m", "--out", same,
            "--report", same, catch_exceptions=True)
    _one_line(r, "--out", "does not end in .csv or .json", code=64)
    r = agiqa_cli("score-folder", tmp_path / "unseen", "--model", tmp_path / "m", "--out",
            tmp_path / "scores.txt", catch_exceptions=True)
    _one_line(r, "does not end in .csv or .json", code=64)


def test_a_score_file_agiqa_wrote_is_replaced_and_every_one_reads_back(tmp_path):
    from agiqa.stages.scoring.results import ScoreReport

    names = ["path", "score", "gate_a", "gate_b", "gate_image", "zero_shot"]
    empty = ScoreReport(failures={"x.png": "not an image"}, columns=names)
    for suffix in (".csv", ".json"):
        out = tmp_path / f"s{suffix}"
        empty.write(out)
        empty.write(out)  # its own file: replaced
        rows, _, gates = read_score_file(out, tmp_path)  # no rows: still a score file
        assert rows == [] and gates[-1] == "image"
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="not a score file agiqa wrote"):
        empty.write(tmp_path / "t.csv")


def test_import_official_never_replaces_a_run(tiny, tmp_path):
    from agiqa.models.official import import_official

    model = (tiny / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="holds no earlier import"):
        import_official(tmp_path / "whatever.pth", tiny)
    assert (tiny / "model.safetensors").read_bytes() == model


# -- H: links and scripts -----------------------------------------------------------------------
@pytest.mark.parametrize("name, href", [
    ("javascript:alert(document.title).csv", "./javascript%3Aalert%28document.title%29.csv"),
    ("scores.csv", "./scores.csv"), ("../up/s.csv", "../up/s.csv"),
    ("a b#c?.csv", "./a%20b%23c%3F.csv"), ("data:text/html,x.csv", "./data%3Atext/html%2Cx.csv"),
])
def test_links_are_relative_and_cannot_carry_a_scheme(name, href):
    assert link_href(name) == href


def test_a_score_file_named_like_a_script_link_is_no_script(tmp_path, make_images,
                                                             synthetic_scores):
    from agiqa.report.sources import ImageRow

    rows = synthetic_scores(2)
    make_images(tmp_path, [r["path"] for r in rows])
    items = [ImageRow(r["path"], tmp_path / r["path"], r["score"], [r["gate_image"]])
             for r in rows]
    out = tmp_path / "s.html"
    write_score_report(items, {}, out, ["image"], csv_href="javascript:alert(document.title).csv")
    html = out.read_text()
    assert 'href="javascript' not in html and 'href="./javascript%3A' in html
    csp = html.split('http-equiv="Content-Security-Policy" content="')[1].split('"')[0]
    script = csp.split("script-src ")[1].split(";")[0]
    assert "unsafe-inline" not in script and script.startswith("'sha256-")
    assert link_href("/etc/passwd") is None
    assert link_href("https://x.org/a.csv") == "./https%3A//x.org/a.csv"


# -- F: values are what they say -----------------------------------------------------------------
def test_a_model_with_nan_weights_is_refused_once(agiqa_cli, tiny, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from agiqa.models.agiqa_net import load_model

    state = load_file(str(tiny / "model.safetensors"))
    first = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(tiny / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite values"):
        load_model(tiny)
    (tmp_path / "unseen").mkdir()
    r = agiqa_cli("score-folder", tmp_path / "unseen", "--model", tiny, "--out",
                  tmp_path / "s.csv", catch_exceptions=True)
    _one_line(r, "model.safetensors", "NaN or infinite")
    assert not (tmp_path / "s.csv").exists()


def test_a_truncated_model_is_one_line(agiqa_cli, tiny, tmp_path):
    from agiqa.models.agiqa_net import load_model

    weights = tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated safetensors"):
        load_model(tiny)
    r = agiqa_cli("report", tiny, "--out", tmp_path / "r.html", catch_exceptions=True)
    _one_line(r, str(weights), "truncated")


def test_a_full_disk_names_the_file(tiny, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from agiqa.models.agiqa_net import load_model, save_model

    model = load_model(tiny)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot write the model "
                                              r"\(No space left on device\)"):
        save_model(model, tmp_path / "m", {})
    from agiqa.fileio import write_text

    real_fsync = __import__("os").fsync
    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(OSError) as e:
        write_text(tmp_path / "home" / "file-hashes.json", "{}")
    monkeypatch.setattr("os.fsync", real_fsync)
    assert e.value.filename == str(tmp_path / "home" / "file-hashes.json")
    assert not list((tmp_path / "home").iterdir())


# -- the Python API's edges ------------------------------------------------------------------------
class _Idle:
    """A Scorer's call guard without a model (the checks run before any model work)."""


def _bare_scorer():
    from agiqa.stages.scoring.scorer import Scorer

    s = Scorer.__new__(Scorer)
    s._busy = threading.Lock()
    return s


def test_scorer_score_takes_a_list_not_one_path(tmp_path):
    s = _bare_scorer()
    for one in ("x.png", tmp_path / "x.png"):
        with pytest.raises(ConfigError, match="takes a list of paths or images.*pass \\["):
            s.score(one)


def test_a_second_thread_on_one_scorer_is_refused_in_one_line():
    s = _bare_scorer()
    s._busy.acquire()  # another thread is scoring
    try:
        with pytest.raises(ConfigError, match="already scoring in another thread"):
            s.score(["a.png"])
        with pytest.raises(ConfigError, match="already scoring in another thread"):
            s.score_paths(["a.png"])
    finally:
        s._busy.release()


def test_every_json_score_file_reads_back(tmp_path):
    data = {"rows": [], "failures": {"a.png": "x"}, "summary": {}, "skipped_files": []}
    (tmp_path / "s.json").write_text(json.dumps(data))
    rows, failures, _ = read_score_file(tmp_path / "s.json", tmp_path)
    assert rows == [] and failures == {"a.png": "x"}


# -- G: nothing vanishes from a walk ------------------------------------------------------------
def _tree(root, make_images):
    make_images(root, ["a.png"])
    make_images(root / "locked", ["b.png"])
    make_images(root / "open", ["c.png"])


def test_an_unreadable_subfolder_is_named_not_skipped(tmp_path, monkeypatch, make_images):
    import os

    from agiqa.data.images import list_images
    from agiqa.errors import DatasetError
    from agiqa.stages.extraction.extract import ImageSource

    _tree(tmp_path / "imgs", make_images)
    locked = str(tmp_path / "imgs" / "locked")
    real = os.scandir

    def scandir(path="."):  # EACCES for one folder (the tests run as root, which reads all)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match="imgs/locked: cannot list this folder"):
        list_images(tmp_path / "imgs")  # never a silent listing of the other folders
    errors: dict[str, str] = {}
    keys, _ = list_images(tmp_path / "imgs", errors=errors)
    assert keys == ["a.png", "open/c.png"]
    assert errors == {"locked/": "cannot list this folder: Permission denied; its images are "
                                 "not scored"}
    assert ImageSource.from_folder(tmp_path / "imgs").unlisted == errors

    from agiqa.stages.scoring.results import ScoreReport

    s = _bare_scorer()
    s.vectors = type("V", (), {"cache_dir": None})()
    s._score = lambda items, folder=None: ScoreReport()
    report = s.score_folder(tmp_path / "imgs")
    assert report.failures == errors and report.exit_code == 2


def test_a_subtree_past_path_max_is_named_not_skipped(tmp_path, make_images):
    """A real tree deeper than PATH_MAX (4096 bytes): made with folder descriptors."""
    import os

    from agiqa.data.images import list_images
    from agiqa.errors import DatasetError

    root = tmp_path / "deep"
    make_images(root, ["top.png"])
    fd = os.open(root, os.O_RDONLY)
    part = "d" * 200
    try:
        for _ in range(24):
            os.mkdir(part, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("bottom.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write((root / "top.png").read_bytes())
    finally:
        os.close(fd)
    with pytest.raises(DatasetError, match="cannot list this folder"):
        list_images(root)  # never a silent listing of top.png alone
    errors: dict[str, str] = {}
    keys, _ = list_images(root, errors=errors)
    assert "top.png" in keys
    assert len(errors) == 1
    (folder, reason), = errors.items()
    assert folder.startswith(part) and folder.endswith("/") and "cannot list" in reason
    assert "name too long" in reason.lower()


# -- checkpoints and seeds -------------------------------------------------------------------------
@pytest.mark.parametrize("edit", [lambda ck: ck.pop("gen"), lambda ck: ck.pop("torch_rng"),
                                  lambda ck: ck.update(history="[1, 2"),
                                  lambda ck: ck.update(history='{"epoch": 0}'),
                                  lambda ck: ck.update(history='[{"loss": 1}]')])
def test_a_checkpoint_missing_a_field_or_with_a_bad_history_is_one_line(tmp_path, edit):
    from types import SimpleNamespace

    import torch

    from agiqa.stages.training.trainer import Trainer

    model = torch.nn.Linear(2, 1)
    optim = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=5)
    cfg = SimpleNamespace(amp=False, compile=False, out=tmp_path, seed=0, backbone_lr=None)
    trainer = Trainer(cfg, model, optim, sched, torch.Generator(), torch.device("cpu"))
    trainer._checkpoint()
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    edit(ck)
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as err:
        trainer.restore()
    assert "\n" not in str(err.value) and "not a checkpoint agiqa can resume from" in str(err.value)


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "'--seed': 18446744073709551616 is not in the range"),
    (["--seed", "-1"], "'--seed': -1 is not in the range"),
    (["--split-seed", str(2**64)], "'--split-seed'"),
    (["--repeats", "1000000000"], "'--repeats': 1000000000 is not in the range 1<=x<=1000"),
    (["--split-seeds", "1000000000"], "'--split-seeds'"),
])
def test_seeds_and_series_out_of_range_are_usage_errors(agiqa_cli, tmp_path, args, message):
    r = agiqa_cli("fit", "--dataset", "csv", "--root", tmp_path, "--cache", tmp_path, "--out",
            tmp_path / "o", *args, catch_exceptions=True)
    _one_line(r, message, code=64)


def test_a_series_whose_last_seed_overflows_is_refused(tmp_path):
    from agiqa.stages.configs import FitConfig

    with pytest.raises(ConfigError, match="last seed 18446744073709551616 is past"):
        FitConfig(dataset="csv", root=tmp_path, cache=tmp_path, out=tmp_path / "o",
                  seed=2**64 - 1, repeats=2)


def test_list_presets_of_an_unknown_kind_is_an_error():
    from agiqa.presets import list_presets

    assert "mplug-owl2" in list_presets("mllms")
    with pytest.raises(ConfigError, match="unknown preset kind 'nonsense'.*mllms"):
        list_presets("nonsense")


def test_an_image_of_no_pixels_says_so(tmp_path):
    from PIL import Image

    from agiqa.data.images import _to_rgb
    from agiqa.errors import BadImageError

    with pytest.raises(BadImageError, match=r"has no pixels \(0×0\)"):
        _to_rgb(Image.new("RGB", (0, 0)), "x")
    s = _bare_scorer()
    s.batch_size, s.prompt_names = 4, ["a"]
    rows = s.score([Image.new("RGB", (0, 0)), Image.new("RGB", (5, 0))])
    assert [r["error"] for r in rows] == ["has no pixels (0×0)", "has no pixels (5×0)"]


def test_a_full_disk_under_the_cache_names_the_manifest(tmp_path, monkeypatch):
    import errno
    import os

    from agiqa.cache.manifest import create_if_absent

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        create_if_absent(tmp_path / "home" / "manifest.json", {"a": 1})
    assert e.value.filename == str(tmp_path / "home" / "manifest.json")
    assert e.value.strerror == "No space left on device"
    assert not list((tmp_path / "home").iterdir())


def test_offline_the_first_failure_is_final(monkeypatch, tmp_path):
    """No network: one probe of the hub, then only the local cache is asked; no retries."""
    import time

    import huggingface_hub
    from huggingface_hub import constants

    import agiqa.models.mllm.recipe as recipe
    from agiqa.errors import ModelLoadError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(recipe, "_REACHABLE", None)
    probes, downloads = [], []

    class Session:
        def head(self, url, timeout=None):
            probes.append(url)
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: Session())
    real = huggingface_hub.hf_hub_download

    def download(*args, **kwargs):
        downloads.append(kwargs.get("local_files_only"))
        return real(*args, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="neither in the local Hugging Face cache nor "
                                                 "reachable.*offline"):
            recipe.identify_mllm("someone/not-a-model", require=True)
    assert time.monotonic() - start < 5
    assert len(probes) == 1 and downloads == [True, True]


class _Payload:
    """Stands for pickled code: an object that is no tensor."""


def test_a_pth_holding_code_is_refused_without_suggesting_to_run_it(agiqa_cli, tmp_path):
    import torch

    from agiqa.models.official import import_official

    torch.save({"state_dict": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as err:
        import_official(tmp_path / "evil.pth", tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "holds Python objects other than tensors" in message
    assert "weights_only" not in message and not (tmp_path / "out").exists()
    r = agiqa_cli("import-official", tmp_path / "evil.pth", "--out", tmp_path / "out",
                  catch_exceptions=True)
    _one_line(r, "evil.pth", "refuses it")
