"""Every example of README.md and docs/ runs, page by page (Sybil parses the Markdown).

The conventions (docs/development.md says them for writers):

* ```` ```python ```` blocks run in file order in one namespace per page;
* ```` ```bash ```` blocks run in ``bash -euo pipefail``, in file order, in one temporary
  folder per page (also the working folder of the page's Python blocks), with ``AGIQA_HOME``
  set to a temporary folder and ``HF_HUB_OFFLINE=1``; a block fails when its exit status is not 0;
* ```` ```text ```` / ```` ```console ```` (and other languages) are listings and do not run;
* ``<!-- skip: next "reason" -->`` skips the next block, stating why;
* a page that runs ``agiqa demo --out NAME`` (or ``run_demo("NAME")``) finds NAME filled
  with the session's finished demo beforehand, so the command reuses its model and cache; such
  a page is in the slow tier, as is one marked ``<!-- test: slow -->``;
* a page that runs ``--engine ray`` runs on a two-node Ray cluster on this machine (the
  ``ray_cluster`` fixture), joined through ``$RAY_ADDRESS``; it is in the slow tier.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import SkipTest

import pytest
from sybil import Document, Region
from sybil.evaluators.skip import Skipper
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer

import agiqa

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
SLOW = "<!-- test: slow -->"
RAY = "--engine ray"
# `agiqa demo ... --out NAME`, `python -m agiqa demo ... --out NAME`, `run_demo("NAME"`.
DEMO_OUT = re.compile(r"agiqa demo\b[^\n]*?--out[ =]([^\s;&|]+)|run_demo\(\s*[\"']([^\"']+)[\"']")
# Fence languages that look runnable but are not the conventions' `bash` or `python`.
AMBIGUOUS = {"sh", "shell", "zsh", "py", "python3", "pycon", "ipython"}
BASH_TIMEOUT = 600


class _Skips:
    """Sybil's ``skip`` directive, its reason a string literal or plain words."""

    def __init__(self) -> None:
        self.lexer = DirectiveInHTMLCommentLexer("skip")
        self.skipper = Skipper("skip")

    def __call__(self, document: Document):
        for lexed in self.lexer(document):
            action, _, reason = (lexed.lexemes["arguments"] or "").strip().partition(" ")
            reason = reason.strip()
            if reason and not reason.startswith("if"):
                try:
                    ast.literal_eval(reason)
                except (ValueError, SyntaxError):
                    reason = repr(reason)
            yield Region(lexed.start, lexed.end, (action, reason or None), self.skipper)


def _run_bash(example) -> str | None:
    env = example.namespace["__docs_env__"]
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", str(example.parsed)],
                          cwd=example.namespace["__docs_folder__"], env=env,
                          capture_output=True, text=True, timeout=BASH_TIMEOUT)
    print(proc.stdout, end="")
    print(proc.stderr, end="", file=sys.stderr)
    if proc.returncode != 0:
        return (f"exit status {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                f"--- stderr\n{proc.stderr[-4000:]}")
    return None


PARSERS = (PythonCodeBlockParser(), CodeBlockParser("bash", _run_bash), _Skips())


def fence_languages(text: str) -> list[str]:
    doc = Document(text, "page.md")
    return [r.lexemes["language"] for r in FencedCodeBlockLexer(".+")(doc)]


def demo_outputs(text: str) -> list[str]:
    """Relative folders the page's bash and Python blocks give ``agiqa demo --out`` (or
    ``run_demo``); prose and listings that mention the demo do not count."""
    doc = Document(text, "page.md")
    code = "\n".join(str(r.lexemes["source"]) for r in FencedCodeBlockLexer(".+")(doc)
                     if r.lexemes["language"] in ("bash", "python"))
    names = [a or b for a, b in DEMO_OUT.findall(code)]
    return sorted({n.strip("\"'") for n in names
                   if n and not n.strip("\"'").startswith(("/", "$", "~", "-"))})


def _page_param(page: Path):
    text = page.read_text(encoding="utf-8")
    demo = bool(demo_outputs(text))
    ray = RAY in text
    marks = [pytest.mark.slow] if SLOW in text or demo or ray else []
    if demo or ray:  # `pytest -n 2 --dist loadgroup`: the users of the session's demo and of
        # its two-node Ray cluster share one worker, so each is built once (a page may use both)
        marks.append(pytest.mark.xdist_group("demo-and-ray"))
    return pytest.param(page, id=page.relative_to(REPO).as_posix(), marks=marks)


def _shell_env(home: Path) -> dict[str, str]:
    """The test's environment for a shell block: this checkout's agiqa and Python come first."""
    src = str(Path(agiqa.__file__).resolve().parents[1])
    env = {**os.environ, "AGIQA_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(p for p in [src, os.environ.get("PYTHONPATH")] if p)}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
def test_page_examples_run(page: Path, tmp_path, monkeypatch, request):
    text = page.read_text(encoding="utf-8")
    ambiguous = sorted(set(fence_languages(text)) & AMBIGUOUS)
    assert not ambiguous, (f"{page.name}: fences {ambiguous}: write `bash` or `python` for an "
                           "example that runs, `console` or `text` for a listing")
    folder = tmp_path / "page"
    folder.mkdir()
    home = Path(os.environ["AGIQA_HOME"])
    for name in demo_outputs(text):
        shutil.copytree(request.getfixturevalue("demo_run").out, folder / name, symlinks=True)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    document = Document.parse(str(page), *PARSERS)
    env = _shell_env(home)
    if RAY in text:
        env["RAY_ADDRESS"] = request.getfixturevalue("ray_cluster").address
    document.namespace.update(__docs_folder__=folder, __docs_env__=env)
    ran, skipped = 0, []
    for example in document.examples():
        if example.region.evaluator is PARSERS[2].skipper:
            action, reason = example.parsed
            assert action in ("next", "start", "end"), f"{page.name}:{example.line}: {action}"
            assert reason or action == "end", (f"{page.name}:{example.line}: a skip states its "
                                               'reason: <!-- skip: next "the reason" -->')
        try:
            example.evaluate()
        except SkipTest as e:
            skipped.append(f"line {example.line}: {e}")
            continue
        except Exception as e:
            raise AssertionError(f"{page.relative_to(REPO)}, the example at line "
                                 f"{example.line} failed: {type(e).__name__}: {e}") from e
        ran += example.region.evaluator is not PARSERS[2].skipper
    print(f"{page.relative_to(REPO)}: {ran} example(s) ran, {len(skipped)} skipped",
          *skipped, sep="\n  ")


def test_fences_and_demo_folders_are_read_as_documented():
    page = ("Run `agiqa demo --out prose`.\n"
            "<!-- skip: next needs a GPU -->\n```bash\nagiqa demo --out demo -q\n```\n"
            "```python\nrun_demo('other', epochs=2)\n```\n```console\n$ agiqa demo --out /x\n"
            "```\n```sh\nls\n```\n")
    assert fence_languages(page) == ["bash", "python", "console", "sh"]
    assert demo_outputs(page) == ["demo", "other"]
    (skip,) = _Skips()(Document(page, "page.md"))
    assert skip.parsed == ("next", "'needs a GPU'")
    (skip,) = _Skips()(Document('<!-- skip: next "a reason" -->\n', "page.md"))
    assert skip.parsed == ("next", '"a reason"')


def test_a_failing_block_fails_its_page(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```bash\necho made > made.txt\nfalse\necho never\n```\n"
                    "```python\nraise ValueError('from the page')\n```\n")
    document = Document.parse(str(page), *PARSERS)
    document.namespace.update(__docs_folder__=tmp_path, __docs_env__=_shell_env(tmp_path))
    bash, python = document.examples()
    with pytest.raises(AssertionError, match="exit status 1"):
        bash.evaluate()
    assert (tmp_path / "made.txt").read_text() == "made\n"
    with pytest.raises(ValueError, match="from the page"):
        python.evaluate()


def test_every_page_is_in_the_site_navigation():
    nav = set(re.findall(r"[\w/-]+\.md", (REPO / "mkdocs.yml").read_text()))
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert pages <= nav, sorted(pages - nav)


def test_the_architecture_page_lists_every_module():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    tree = text[text.index("src/agiqa/\n"):text.index("\ntests/ ")]
    listed = set(re.findall(r"\b(\w+\.py)\b", tree))
    modules = {p.name for p in (REPO / "src" / "agiqa").rglob("*.py")} - {"__init__.py",
                                                                         "__main__.py"}
    assert sorted(modules - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - modules) == [], "docs/architecture.md lists modules that are gone"
