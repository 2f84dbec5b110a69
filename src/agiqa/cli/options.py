"""Click options generated from a config dataclass (:mod:`agiqa.options`).

``@config_options(FitConfig)`` adds one click option per option field: its flag, type (from the
annotation), default, help, and the range or choices of its :class:`~agiqa.options.Option`, so
click refuses a bad value as a usage error before the command runs. The command receives the
values under the field names; :func:`config_from` builds the dataclass from them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import click

from agiqa.options import Option, bounds_text, flag_of, options_of, violates

__all__ = ["config_from", "config_options"]


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """The type of a field annotation without ``| None``, and whether None was allowed."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return annotation, False


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


def _click_option(f: dataclasses.Field, opt: Option, hint: Any) -> Any:
    base, _ = _base_type(hint)
    default = None if f.default is dataclasses.MISSING else f.default
    required = opt.required or (f.default is dataclasses.MISSING
                                and f.default_factory is dataclasses.MISSING)
    names = [flag_of(f, opt), *opt.flags, f.name]
    kw: dict[str, Any] = {"help": opt.help, "required": required}
    if not required:  # click takes an explicit default of None as given
        kw["default"], kw["show_default"] = default, default is not None
    if opt.metavar:
        kw["metavar"] = opt.metavar
    if base is bool:
        if opt.switch:
            kw["default"] = bool(default)
            return click.option(*names, is_flag=True, **kw)
        flag = flag_of(f, opt)
        names = [f"{flag}/--no-{flag[2:]}", *opt.flags, f.name]
        return click.option(*names, **kw)
    if opt.choices is not None:
        kw["type"] = click.Choice(list(opt.choices))
    elif base is int and opt.min is None and opt.max is None:
        kw["type"] = int
    elif base is int:
        kw["type"] = click.IntRange(min=None if opt.min is None else math.ceil(opt.min),
                                    max=None if opt.max is None else math.floor(opt.max),
                                    min_open=opt.min_open, max_open=opt.max_open)
    elif base is float:
        kw["type"], kw["callback"] = float, _number(opt)
    elif base is Path:
        kw["type"] = click.Path(path_type=Path, file_okay=opt.file_okay, dir_okay=opt.dir_okay)
    else:
        kw["type"] = str
    return click.option(*names, **kw)


def config_options(cls, exclude: tuple[str, ...] = ()):
    """A decorator adding a click option for every command-line option field of ``cls``."""
    hints = typing.get_type_hints(cls)
    decorators = [_click_option(f, opt, hints[f.name]) for f, opt in options_of(cls)
                  if opt.cli and f.name not in exclude]

    def decorate(fn):
        for dec in reversed(decorators):
            fn = dec(fn)
        return fn

    return decorate


def config_from(cls, values: dict[str, Any], **more: Any):
    """``cls`` built from a command's values: its option fields, plus ``more``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **more)
