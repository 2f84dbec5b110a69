"""The HTML page of an experiment: its table of mean ± std, each cell's runs as a strip plot,
and links to every run's own report (or its folder).

Self-contained like the run reports (inline styles, inline SVG, no network). It reads what the
experiment passes in (an object with ``plan``, ``rows`` and ``runs``, as
:class:`agiqa.pipeline.experiment.ExperimentTable`).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any

from agiqa.fileio import write_text

__all__ = ["strip_svg", "write_experiment_report"]

_W, _H, _PAD = 220, 26, 6


def strip_svg(values: list[float], lo: float, hi: float, mean: float | None = None) -> str:
    """One row of dots (each run's value) on a line from ``lo`` to ``hi``; the mean a tick."""
    span = (hi - lo) or 1.0

    def x(v: float) -> float:
        return _PAD + (v - lo) / span * (_W - 2 * _PAD)

    dots = "".join(f'<circle cx="{x(v):.1f}" cy="{_H / 2:.1f}" r="3.5"><title>{v:.4f}</title>'
                   "</circle>" for v in values)
    tick = "" if mean is None or math.isnan(mean) else \
        f'<line class="mean" x1="{x(mean):.1f}" x2="{x(mean):.1f}" y1="3" y2="{_H - 3}"/>'
    return (f'<svg class="strip" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}">'
            f'<line class="axis" x1="{_PAD}" x2="{_W - _PAD}" y1="{_H / 2}" y2="{_H / 2}"/>'
            f"{tick}{dots}</svg>")


def _href(target: Path, page: Path) -> str | None:
    """A ``./``-relative, percent-encoded link (:func:`~agiqa.report.html.link_href`): a run
    folder named like a URL scheme stays a path."""
    from agiqa.report.html import link_href

    try:
        return link_href(Path(os.path.relpath(target, page.parent)).as_posix())
    except ValueError:  # no relative path (another drive)
        return None


def write_experiment_report(table: Any, out: Path, metric: str = "srcc") -> int:
    """Write the experiment's page to ``out``; returns its size in bytes."""
    import jinja2

    from agiqa import __version__

    out = Path(out)
    ok = [getattr(r, metric) for r in table.runs if not r.error]
    lo, hi = (min(ok), max(ok)) if ok else (0.0, 1.0)
    cells = []
    for row in table.rows:
        runs = [r for r in table.runs if (r.variant, r.train_dataset, r.test_dataset) ==
                (row.variant, row.train_dataset, row.test_dataset)]
        links = []
        for r in runs:
            run_dir = Path(r.run_dir)
            page = out.parent / "reports" / r.variant / r.train_dataset / f"{run_dir.name}.html"
            target = page if page.is_file() else run_dir
            links.append({"name": run_dir.name, "href": _href(target, out), "error": r.error,
                          "value": None if r.error else getattr(r, metric)})
        values = [getattr(r, metric) for r in runs if not r.error]
        cells.append({"row": row, "links": links,
                      "strip": strip_svg(values, lo, hi, getattr(row, f"{metric}_mean"))})
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) \
        else f"{v:.4f}"
    html = env.get_template("experiment.html.jinja").render(
        version=__version__, plan=table.plan, cells=cells, metric=metric.upper(),
        lo=lo, hi=hi, published=any(c["row"].published for c in cells),
        failed=sum(1 for r in table.runs if r.error), total=len(table.runs),
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    write_text(out, html)
    return len(html.encode("utf-8"))
