"""Click options generated from a config dataclass (:mod:`agiqa.options`).

``@config_options(FitConfig)`` adds one click option (or argument) per option field: its flag,
type (from the annotation), default, help, and the range or choices of its
:class:`~agiqa.options.Option`, so click refuses a bad value as a usage error before the command
runs. The command receives the values under the field names; :func:`config_from` builds the
dataclass from them.

A few flags of the command line are not config fields; :data:`CLI_ONLY` names them with the
reason (``--json``: how the result is printed; ``--recipe``: where the defaults come from).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import click

from agiqa.options import (
    Option,
    base_type,
    bounds_text,
    check_known,
    cli_names,
    flag_of,
    options_of,
    violates,
)

__all__ = ["CLI_ONLY", "alias_field", "config_from", "config_options", "json_option",
           "recipe_option"]

# Click parameters that are no config field, and why.
CLI_ONLY = {
    "as_json": "output only: prints the typed result's to_dict(); the Python API returns the "
               "result itself",
    "recipe": "builds the config: a recipe preset's values, under the flags given; the Python "
              "API takes recipe= the same way",
    "list_plans": "prints the experiment plans instead of running one; in Python "
                  "agiqa.pipeline.experiment.list_plans()",
}
_ALIAS = "__alias_"


def alias_field(param_name: str) -> str | None:
    """The field a hidden deprecated flag's parameter stands for (``mllm__alias_model``)."""
    return param_name.split(_ALIAS)[0] if _ALIAS in param_name else None


def _number(opt: Option):
    """A click callback: a finite float within the option's bounds (NaN and infinity refused),
    as :func:`agiqa.options.check_options` checks it in Python."""

    def check(ctx, param, value):
        if value is not None and violates(opt, value):
            bounds = bounds_text(opt)
            raise click.BadParameter(f"must be a finite number{' ' + bounds if bounds else ''}, "
                                     f"got {value}")
        return value

    return check


def _type(opt: Option, base: Any) -> Any:
    if opt.choices is not None:
        return click.Choice(list(opt.choices))
    if base is int and opt.min is None and opt.max is None:
        return int
    if base is int:
        return click.IntRange(min=None if opt.min is None else math.ceil(opt.min),
                              max=None if opt.max is None else math.floor(opt.max),
                              min_open=opt.min_open, max_open=opt.max_open)
    if base is float:
        return float
    if base is Path:
        return click.Path(path_type=Path, exists=opt.exists, file_okay=opt.file_okay,
                          dir_okay=opt.dir_okay)
    return str


def _click_params(cls, f: dataclasses.Field, opt: Option, hint: Any) -> list[Any]:
    base, _ = base_type(hint)
    default = None if f.default is dataclasses.MISSING else f.default
    required = opt.required or f.name in getattr(cls, "REQUIRED", ()) or (
        f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if opt.positional:
        kw = {"required": required, "type": _type(opt, base)}
        if not required:
            kw["default"] = default
        return [click.argument(f.name, **kw)]
    kw: dict[str, Any] = {"help": opt.help, "required": required}
    if not required:  # click takes an explicit default of None as given
        kw["default"], kw["show_default"] = default, default is not None
    if opt.metavar:
        kw["metavar"] = opt.metavar
    hidden = [click.option(flag, f"{f.name}{_ALIAS}{flag.lstrip('-')}", hidden=True,
                           default=None, type=_type(opt, base)) for flag in opt.deprecated]
    if opt.multiple:
        return [click.option(flag_of(f, opt), *opt.flags, f.name, multiple=True, type=str,
                             default=default, help=opt.help, metavar=opt.metavar), *hidden]
    if base is bool and opt.negate:
        return [click.option(opt.negate, *opt.flags, f.name, is_flag=True, flag_value=False,
                             default=True, help=opt.help), *hidden]
    if base is bool:
        if opt.switch:
            kw["default"] = bool(default)
            return [click.option(flag_of(f, opt), *opt.flags, f.name, is_flag=True, **kw),
                    *hidden]
        flag = flag_of(f, opt)
        return [click.option(f"{flag}/--no-{flag[2:]}", *opt.flags, f.name, **kw), *hidden]
    kw["type"] = _type(opt, base)
    if base is float and opt.choices is None:
        kw["callback"] = _number(opt)
    return [click.option(flag_of(f, opt), *opt.flags, f.name, **kw), *hidden]


def config_options(cls, exclude: tuple[str, ...] = ()):
    """A decorator adding a click option (or argument) for every command-line field of ``cls``:
    arguments first, in declaration order, then the options."""
    hints = typing.get_type_hints(cls)
    fields = [(f, opt) for f, opt in options_of(cls) if opt.cli and f.name not in exclude]
    fields.sort(key=lambda fo: not fo[1].positional)
    decorators = [d for f, opt in fields for d in _click_params(cls, f, opt, hints[f.name])]

    def decorate(fn):
        for dec in reversed(decorators):
            fn = dec(fn)
        return fn

    return decorate


def json_option(help: str = "Print the result as JSON.") -> Any:
    """``--json``: print the result's ``to_dict()`` (:data:`CLI_ONLY`)."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def recipe_option(command: str) -> Any:
    """``--recipe NAME``: defaults from a recipe preset of ``command``; flags given override
    them (:data:`CLI_ONLY`)."""
    return click.option("--recipe", "recipe", default=None, metavar="NAME",
                        help=f"A recipe preset of {command} (agiqa presets list --kind recipes, "
                             "e.g. cpu): its options replace the defaults; the flags given "
                             "replace its options.")


def _given(ctx: click.Context | None, name: str) -> bool:
    if ctx is None:
        return True
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def config_from(cls, values: dict[str, Any], ctx: click.Context | None = None,
                command: str | None = None, **more: Any):
    """``cls`` built from a command's values: its option fields, plus ``more``.

    A hidden deprecated flag fills its field; ``--json`` turns progress bars off; a
    ``--recipe``'s options fill the fields whose flags were not given (``ctx`` says which).
    """
    values = dict(values)
    for name in [n for n in values if alias_field(n)]:
        value = values.pop(name)
        if value is not None:
            target = alias_field(name)
            if _given(ctx, target):
                raise click.UsageError(f"--{name.split(_ALIAS)[1]} is the earlier name of "
                                       f"--{target.replace('_', '-')}; give one")
            values[target] = value
    if values.pop("as_json", False) and "progress" in {f.name for f in dataclasses.fields(cls)}:
        values["progress"] = False
    recipe = values.pop("recipe", None)
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in values.items() if k in names}
    if recipe is not None:
        from agiqa.presets import load_options_recipe

        preset = load_options_recipe(recipe, command)
        check_known(cls, preset.options, f"recipe {recipe}")
        fields.update({k: v for k, v in preset.options.items() if not _given(ctx, k)})
    with cli_names():
        return cls(**fields, **more)
