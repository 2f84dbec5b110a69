"""``agiqa presets``: what can be named on the command line."""

from __future__ import annotations

import click

from agiqa.cli.common import CONTEXT, cli, echo_json, handle_errors

# Per kind: the columns of the table (heading, key of the summary).
_COLUMNS = {
    "mllms": [("hub id", "model"), ("width", "width"), ("params", "parameters"),
              ("download", "download")],
    "prompts": [("prompts", "prompts"), ("names", "names")],
    "datasets": [("label file", "labels"), ("score range", "score_range"),
                 ("targets", "targets")],
    "backbones": [("timm model", "timm_name"), ("width", "width"),
                  ("MANIQA width", "maniqa_width")],
    "recipes": [("used by", "used_by")],
    "plans": [("runs per cell", "repeats"), ("data sets", "datasets"),
              ("variants", "variants")],
}


def _cell(value, key: str = "") -> str:
    if key == "score_range" and value:
        return f"{value[0]:g} to {value[1]:g}"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "-"
    return str(value)


def _print_kind(kind: str, rows: list[dict]) -> None:
    from agiqa.presets import KINDS

    columns = [("name", "name"), *_COLUMNS.get(kind, [])]
    table = [[_cell(r.get(key), key) + (" (user)" if key == "name" and r["source"] != "built-in"
                                   else "") for _, key in columns] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h)
              for i, (h, _) in enumerate(columns)]
    click.echo(f"{KINDS.get(kind, kind)} presets ({kind}):")
    heading = [h for h, _ in columns]
    for cells in [heading, *table]:
        click.echo(("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
                   .rstrip())


@cli.group(context_settings=CONTEXT)
def presets():
    """The named MLLMs, prompt sets, data sets, backbones, recipes and experiment plans.

    Your own presets: JSON files in $AGIQA_HOME/presets/<kind>/<name>.json (AGIQA_HOME defaults
    to ~/.cache/agiqa), in the schema of the built-in ones (plans: <name>.toml); a file named
    like a built-in preset replaces it.

    \b
    Examples:
      agiqa presets list
      agiqa presets list --kind mllms --json
      agiqa presets list --kind recipes
      agiqa presets path mllms
    """


@presets.command("list", context_settings=CONTEXT)
@click.option("--kind", "kinds", multiple=True,
              type=click.Choice(["mllms", "prompts", "datasets", "backbones", "recipes",
                                 "plans"]),
              help="Only this kind (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {kind: [preset, ...]}.")
@handle_errors
def presets_list(kinds, as_json):
    """List the presets with their hub ids, widths, score ranges and uses."""
    from agiqa.presets import agiqa_home, describe_presets

    found = describe_presets(list(kinds) or None)
    if as_json:
        echo_json(found)
        return
    for i, (kind, rows) in enumerate(found.items()):
        if i:
            click.echo()
        _print_kind(kind, rows)
    click.echo(f"\nyour own presets: {agiqa_home() / 'presets'}/<kind>/<name>.json")


@presets.command("path", context_settings=CONTEXT)
@click.argument("kind", required=False)
@handle_errors
def presets_path(kind):
    """Print the folder of your own presets (of KIND, if given), resolved: $AGIQA_HOME/presets,
    or ~/.cache/agiqa/presets when AGIQA_HOME is unset. Nothing is created.

    \b
    Example:
      mkdir -p "$(agiqa presets path mllms)"
    """
    from agiqa.presets import agiqa_home, list_presets

    folder = agiqa_home() / "presets"
    if kind is not None:
        list_presets(kind)  # an unknown kind is refused, naming the kinds
        folder = folder / kind
    click.echo(str(folder.absolute()))
