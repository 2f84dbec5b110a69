"""MkDocs hook: the command line reference (``docs/cli.md``) rendered from the click commands.

mkdocs-click renders each command's help and options; two things of click 8.2+ it shows badly
are fixed on copies of the commands first: an option without a default shows as
``Sentinel.UNSET`` (here: none, or "required"), and a help paragraph that click keeps as it is
(``\\b``, the examples) runs together into one Markdown paragraph (here: a ``text`` block).
"""

from __future__ import annotations

import copy
import inspect
import textwrap

import click

MARKER = "<!-- cli-reference -->"


def _fenced(help_text: str) -> str:
    """Each ``\\b`` paragraph of a help text as a fenced ``text`` block (its heading line, such
    as ``Examples:``, kept above it)."""
    out = []
    for para in inspect.cleandoc(help_text).split("\n\n"):
        if not para.startswith("\b\n"):
            out.append(para)
            continue
        lines = para[2:].splitlines()
        head = [lines.pop(0), ""] if lines and lines[0].rstrip().endswith(":") \
            and not lines[0].startswith(" ") else []
        out.append("\n".join([*head, "```text", *textwrap.dedent("\n".join(lines)).splitlines(),
                              "```"]))
    return "\n\n".join(out)


def _unset(value) -> bool:
    return type(value).__name__ == "Sentinel" or repr(value).startswith("Sentinel.")


def _shown(param: click.Parameter) -> click.Parameter:
    """A copy of ``param`` whose default is a value: False for a flag, else None."""
    p = copy.copy(param)
    if _unset(p.default):
        p.default = False if getattr(p, "is_flag", False) else None
    return p


def documented(command: click.Command) -> click.Command:
    """A copy of ``command`` (and its subcommands) as the reference shows it."""
    doc = copy.copy(command)
    if doc.help:
        doc.help = _fenced(doc.help)
    doc.params = [_shown(p) for p in command.params]
    help_option = command.get_help_option

    def get_help_option(ctx):
        opt = help_option(ctx)
        return None if opt is None else _shown(opt)

    doc.get_help_option = get_help_option
    if isinstance(command, click.Group):
        doc.commands = {name: documented(sub) for name, sub in command.commands.items()}
    return doc


def render() -> str:
    """The Markdown of every command of ``agiqa``."""
    from mkdocs_click._docs import make_command_docs

    from agiqa.cli import cli

    return "\n".join(make_command_docs(prog_name="agiqa", command=documented(cli), depth=1,
                                       style="table", list_subcommands=True))


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
