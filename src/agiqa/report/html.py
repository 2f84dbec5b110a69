"""HTML reports: a trained run or an evaluation, and a scored folder, each one file.

The page is self-contained (thumbnails, maps and plots embedded as base64, styles and scripts
inline, a Content-Security-Policy that forbids every network request), so it works offline and
as an e-mail attachment. Its size is bounded whatever the number of images: a run report shows
the ``max_images`` test images with the largest absolute error; a score report shows the
``top_k`` lowest and ``top_k`` highest scores (the histogram and the threshold counts cover
every image; the full list is the linked CSV).

The patch maps are MANIQA's patch quality and patch weight, and each patch's additive share of
the final score through the image expert (:class:`agiqa.models.agiqa_net.ScoreMaps`). They are
computed when the report is made, from the model and the image files, for the shown images only.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agiqa.errors import ConfigError
from agiqa.fileio import write_text
from agiqa.options import spell
from agiqa.report.sources import (
    THUMB_SIZE,
    ImageRow,
    RunData,
    add_zero_shot,
    encode_maps,
    read_run,
    thumbnail,
)
from agiqa.runtime import resolve_device

__all__ = ["PUBLISHED", "REPORT_SUFFIXES", "ReportResult", "check_report_output", "link_href",
           "score_rows", "write_run_report", "write_score_file_report", "write_score_report"]

REPORT_SUFFIXES = (".html", ".htm")
# In every page agiqa writes, within its first few hundred bytes: how a later run knows that a
# file it would replace is one of its own reports.
_GENERATOR = b'<meta name="generator" content="agiqa report">'


def _is_report(path: Path) -> bool:
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as f:
            return os.path.isfile(path) and _GENERATOR in f.read(2048)
    except OSError:
        return False


def check_report_output(out: str | os.PathLike, option: str = "--out",
                        inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """``out`` if a report may be written there: an ``.html`` name that is none of ``inputs``,
    new or a report agiqa wrote (never a score file, a model or any file of the user's).

    Raises:
        ConfigError: naming ``option``, the file and the reason.
    """
    out = Path(out)
    if out.suffix.lower() not in REPORT_SUFFIXES:
        raise ConfigError(f"{option} {out} does not end in .html; a report is an HTML page")
    for other in inputs:
        if os.path.exists(other) and os.path.exists(out) and os.path.samefile(other, out):
            raise ConfigError(f"{option} {out} is an input of this report; choose another file")
    if (out.exists() or out.is_symlink()) and not _is_report(out):
        raise ConfigError(f"{option} {out} exists and is not a report agiqa wrote; agiqa never "
                          "replaces it: choose another file, or remove it")
    return out


def link_href(target: str) -> str | None:
    """A relative link to the file ``target`` beside the page that a browser can only read as
    a file: ``./`` first and every character that could start a scheme, a query or a fragment
    percent-encoded, so a file named ``javascript:alert(1).csv`` stays a file name. None for
    an absolute name (no link is made)."""
    from urllib.parse import quote

    if not target or target.startswith(("/", "\\")) or "\\" in target:
        return None
    path = quote(target, safe="/")
    return path if path.startswith(("./", "../")) else "./" + path

# MA-AGIQA's published figures (ACM MM 2024), for the quality MOS of each data set.
PUBLISHED: dict[str, dict[str, Any]] = {
    "agiqa-3k": {"target": "mos_quality", "srcc": 0.8939, "plcc": 0.9273},
    "aigciqa-20k": {"target": "mos", "srcc": 0.8644, "plcc": 0.9050},
}
_SLIDER_STEPS = 200  # threshold positions of the score report's slider
_HIST_BINS = 40
_FAILURES_SHOWN = 1000
_MAP_BATCH = 16


@dataclass
class ReportResult:
    """An HTML report written: its file, the images shown of those it covers, its size."""

    out: Path
    images_shown: int
    images_total: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "images_shown": self.images_shown,
                "images_total": self.images_total, "bytes": self.bytes}


# -- maps and cards ----------------------------------------------------------------------------
def _decode(rows: list[ImageRow], need_pixels: bool):
    """Each row's file decoded once: its thumbnail, and the model's 224×224 pixels."""
    from agiqa.data.images import load_image
    from agiqa.data.pixels import resize_pixels

    for r in rows:
        img, _ = load_image(r.path)
        pixels = resize_pixels(img) if need_pixels else None
        yield thumbnail(img), pixels


def _maps(model, pixels, gates: list[list[float]]) -> list[dict[str, str]]:
    """The three patch maps of each image, from its uint8 pixels and its recorded gates."""
    import torch

    from agiqa.data.pixels import normalize

    out: list[dict[str, str]] = []
    model.eval()
    dev = next(model.parameters()).device
    g = model.config.grid
    for i in range(0, len(pixels), _MAP_BATCH):
        x = normalize(torch.stack(pixels[i:i + _MAP_BATCH])).to(dev)
        gt = torch.tensor(gates[i:i + _MAP_BATCH], dtype=torch.float32, device=dev)
        with torch.no_grad():
            f, w = model.backbone.forward_patches(x)
            share = model.head.patch_contributions(f * w, gt)
        for j in range(len(x)):
            out.append(encode_maps(*(t[j].reshape(g, g).float().cpu().numpy()
                                     for t in (f, w, share))))
    return out


def _maps_note(model) -> list[str]:
    """Why a page shows no patch maps, if it shows none."""
    if model is None:
        return ["patch maps not shown (no model given)"]
    if model.config.image_key != "maniqa":
        return [f"patch maps not shown (the model's image key is {model.config.image_key}, "
                "not per patch)"]
    return []


def _cards(rows: list[ImageRow], gate_names: list[str], model) -> list[dict[str, Any]]:
    if model is not None and model.config.image_key != "maniqa":
        model = None  # its image expert reads no per-patch values: no patch maps
    decoded = list(_decode(rows, model is not None))
    maps = _maps(model, [p for _, p in decoded], [r.gates for r in rows]) \
        if model is not None else [None] * len(rows)
    scale = max((abs(g) for r in rows for g in r.gates), default=1.0) or 1.0
    cards = []
    for r, m, ((thumb, w, h), _) in zip(rows, maps, decoded, strict=True):
        cards.append({
            "name": r.name, "thumb": thumb, "width": w, "height": h, "maps": m,
            "score": r.score, "mos": r.mos, "zero_shot": r.zero_shot,
            "error": None if r.mos is None else r.score - r.mos,
            "gates": [{"name": n, "value": g, "width": round(100 * abs(g) / scale, 1),
                       "negative": g < 0} for n, g in zip(gate_names, r.gates, strict=True)],
        })
    return cards


# -- plots ------------------------------------------------------------------------------------
def _png_b64(draw) -> str:
    import base64

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plot.png"
        draw(path)
        return base64.b64encode(path.read_bytes()).decode("ascii")


def _run_plots(run: RunData) -> dict[str, str]:
    from agiqa.plots import plot_history, plot_scatter

    plots = {}
    pred = np.array([r.score for r in run.rows])
    mos = np.array([r.mos for r in run.rows])
    if len(pred) >= 2:
        title = "" if not run.metrics else \
            f"SRCC {run.metrics.get('srcc', float('nan')):.4f}  " \
            f"PLCC {run.metrics.get('plcc', float('nan')):.4f}"
        plots["scatter"] = _png_b64(lambda p: plot_scatter(pred, mos, p, title=title))
    if run.history:
        plots["curves"] = _png_b64(lambda p: plot_history(run.history, p))
    return plots


def _histogram(scores: np.ndarray) -> dict[str, Any]:
    """Bars of the score histogram and, for each slider position, how many scores reach it."""
    lo, hi = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(scores, bins=_HIST_BINS, range=(lo, hi))
    top = max(int(counts.max()), 1)
    bars = [{"x": i, "height": round(100 * int(c) / top, 2), "count": int(c),
             "lo": float(edges[i]), "hi": float(edges[i + 1])} for i, c in enumerate(counts)]
    # Rounded down to 6 decimals, as the page shows them; the counts are of those values.
    thresholds = np.floor(np.linspace(lo, hi, _SLIDER_STEPS + 1) * 1e6) / 1e6
    ordered = np.sort(scores)
    passing = len(ordered) - np.searchsorted(ordered, thresholds, side="left")
    return {"bars": bars, "bins": _HIST_BINS, "lo": lo, "hi": hi,
            "thresholds": [float(t) for t in thresholds],
            "passing": [int(p) for p in passing]}


# -- rendering ---------------------------------------------------------------------------------
def _render(context: dict[str, Any], out: Path) -> int:
    import base64
    import hashlib

    import jinja2

    from agiqa import __version__

    templates = Path(__file__).parent / "templates"
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    # The page's one script runs by its hash (Content-Security-Policy): no inline script
    # that a name or a cell might smuggle in could run.
    script = (templates / "report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csv_href = context.get("csv_href")
    html = env.get_template("report.html.jinja").render(
        script=script, script_hash=f"sha256-{digest}",
        csv_link=link_href(csv_href) if csv_href else None,
        version=__version__, thumb_size=THUMB_SIZE,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **context)
    write_text(out, html)
    return len(html.encode("utf-8"))


def _dataset_label(dataset: dict[str, Any]) -> str | None:
    """What the metrics were measured on: a preset's name, or for ``csv`` the label file."""
    name = dataset.get("name")
    if name != "csv":
        return name
    labels = dataset.get("labels")
    if labels:
        return Path(labels).name
    root = dataset.get("root")
    return f"labels.csv of {Path(root).name}" if root else "a CSV label file"


def _metrics_rows(run: RunData) -> list[dict[str, Any]]:
    name = run.dataset.get("name")
    paper = PUBLISHED.get(name or "")
    if paper and run.dataset.get("target") not in (None, paper["target"]):
        paper = None
    rows = []
    for key, label in (("srcc", "SRCC"), ("plcc", "PLCC"), ("krcc", "KRCC"), ("rmse", "RMSE")):
        if key in run.metrics:
            rows.append({"name": label, "value": run.metrics[key],
                         "paper": paper.get(key) if paper else None})
    return rows


def write_run_report(folder: Path, out: Path | None = None, root: Path | None = None,
                     cache: Path | None = None, max_images: int = 100, maps: bool = True,
                     device: str = "auto") -> ReportResult:
    """The report of a run directory (``fit``) or an evaluation folder (``evaluate --out``).

    Args:
        folder: the run or evaluation folder.
        out: the HTML file (default ``folder/report.html``).
        root: the image root, if not where the run records it.
        cache: the semantic cache for zero-shot scores, if not where the run records it.
        max_images: the images shown, those with the largest absolute error first.
        maps: compute the patch maps (needs the model; a backbone forward per shown image).
        device: where the maps are computed.
    """
    if max_images < 1:
        raise ConfigError(f"{spell('max_images')} must be at least 1, got {max_images}")
    out = check_report_output(Path(out) if out else Path(folder) / "report.html")
    run = read_run(Path(folder), root, cache)
    add_zero_shot(run)
    rows = sorted(run.rows, key=lambda r: -abs(r.score - (r.mos or 0.0)))[:max_images]
    model = None
    if maps:
        from agiqa.models.agiqa_net import load_model

        model = load_model(run.model_dir, resolve_device(device))
    gate_names = [*run.prompt_names, "image"]
    paper = any(m["paper"] is not None for m in _metrics_rows(run))
    context = {
        "dataset_label": _dataset_label(run.dataset),
        "mode": "run", "title": f"agiqa {run.kind}: {run.folder.name}", "source": str(run.folder),
        "kind": run.kind, "dataset": run.dataset, "metrics": _metrics_rows(run), "paper": paper,
        "plots": _run_plots(run), "cards": _cards(rows, gate_names, model),
        "total": len(run.rows), "gate_names": gate_names,
        "notes": run.notes + (_maps_note(model) if model is not None else []),
        "histogram": None, "failures": [], "failures_total": 0, "csv_href": None,
        "limit_note": None if len(rows) == len(run.rows) else
        f"the {len(rows)} of {len(run.rows)} images with the largest absolute error",
    }
    size = _render(context, out)
    return ReportResult(out, len(rows), len(run.rows), size)


def score_rows(rows: list[dict[str, Any]], folder: Path) -> tuple[list[ImageRow], list[str]]:
    """``score-folder``'s rows as report rows (files under ``folder``) and the gate names."""
    gates = [c for c in (rows[0] if rows else {}) if c.startswith("gate_")] or ["gate_image"]
    out = [ImageRow(name=r["path"], path=folder / r["path"], score=float(r["score"]),
                    gates=[float(r[g]) for g in gates], zero_shot=r.get("zero_shot"))
           for r in rows]
    return out, [g.removeprefix("gate_") for g in gates]


def write_score_file_report(scores: Path, images: Path, out: Path | None = None,
                            model_dir: Path | None = None, top_k: int = 100,
                            device: str = "auto") -> ReportResult:
    """The report of a ``score-folder --out`` file (CSV or JSON) of the images under ``images``.

    Raises:
        DatasetError: the file is not what score-folder writes, or an image is not there.
    """
    from agiqa.errors import DatasetError
    from agiqa.report.sources import read_score_file

    if not images.is_dir():
        raise ConfigError(f"{spell('images', str(images))}: not a folder (the folder that was "
                          "scored)")
    out = check_report_output(out or scores.with_suffix(".html"), inputs=(scores,))
    rows, failures, gate_names = read_score_file(scores, images)
    missing = [r.name for r in rows if not r.path.is_file()]
    if missing:
        raise DatasetError(f"{scores}: {len(missing)} scored image(s) not under "
                           f"{spell('images', str(images))}: "
                           f"{', '.join(repr(m) for m in missing[:3])}")
    model = None
    if model_dir is not None:
        from agiqa.models.agiqa_net import load_model

        model = load_model(model_dir, resolve_device(device))
    href = os.path.relpath(scores.resolve(), out.resolve().parent)
    return write_score_report(rows, failures, out, gate_names, model, top_k,
                              csv_href=Path(href).as_posix(), source=str(images))


def write_score_report(rows: list[ImageRow], failures: dict[str, str], out: Path,
                       gate_names: list[str] | None = None, model=None, top_k: int = 100,
                       csv_href: str | None = None, source: str = "",
                       notes: list[str] | None = None) -> ReportResult:
    """The report of a scored folder: gallery, histogram with a threshold slider, failures.

    Args:
        rows: the scored images (their ``path`` must point at the files).
        failures: image → reason for the images not scored.
        out: the HTML file.
        gate_names: the experts' names, the image expert last.
        model: the model, for the patch maps (None: no maps).
        top_k: the page shows the ``top_k`` lowest and ``top_k`` highest scores.
        csv_href: a link (relative to ``out``) to the full list of scores.
        source: what was scored, as shown in the title.
        notes: lines shown under the title.
    """
    if top_k < 1:
        raise ConfigError(f"{spell('top_k')} must be at least 1, got {top_k}")
    out = check_report_output(out, "--report")
    ordered = sorted(rows, key=lambda r: r.score)
    shown = ordered if len(ordered) <= 2 * top_k else ordered[:top_k] + ordered[-top_k:]
    gate_names = gate_names or _gate_names(rows)
    fails = sorted(failures.items())
    context = {
        "dataset_label": None,
        "mode": "scores", "title": f"agiqa scores: {source}", "source": source,
        "kind": "scores", "dataset": {}, "metrics": [], "paper": False, "plots": {},
        "cards": _cards(shown, gate_names, model), "total": len(rows),
        "notes": list(notes or []) + _maps_note(model),
        "gate_names": gate_names,
        "histogram": _histogram(np.array([r.score for r in rows], dtype=float)),
        "failures": [{"name": k, "reason": v} for k, v in fails[:_FAILURES_SHOWN]],
        "failures_total": len(fails), "csv_href": csv_href,
        "limit_note": None if len(shown) == len(rows) else
        f"the {top_k} lowest and the {top_k} highest of {len(rows)} scores",
    }
    size = _render(context, out)
    return ReportResult(out, len(shown), len(rows), size)


def _gate_names(rows: list[ImageRow]) -> list[str]:
    n = len(rows[0].gates) if rows else 1
    return [f"prompt {i + 1}" for i in range(n - 1)] + ["image"]
