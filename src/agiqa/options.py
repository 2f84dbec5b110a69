"""Options defined once: a config dataclass field carries its type, default, help and limits.

A stage's options are the fields of its config dataclass (``FitConfig`` …), each declared with
:func:`option`. The same declaration gives

* the Python API: the dataclass itself, checked by :func:`check_options` in ``__post_init__``;
* the command line: ``agiqa.cli.options.config_options`` turns every field into a click option
  (flag, type, default, help, range or choices) of the command.

Adding an option to a command is therefore one edit: a field of its config dataclass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from agiqa.errors import ConfigError

__all__ = ["Option", "bounds_text", "check_options", "flag_of", "option", "options_of",
           "violates"]

_KEY = "agiqa_option"


@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field shows on the command line, and its limits.

    ``flag``: the option's name (default ``--field-name``); ``flags``: more names (``-q``);
    ``choices``: the allowed strings; ``min``/``max``: bounds of a number, exclusive with
    ``min_open``/``max_open``; ``switch``: a bool as one flag (``--resume``) rather than a
    ``--x/--no-x`` pair; ``cli``: False keeps the field out of the command line;
    ``required``: the command line must give it (fields without a default always are).
    """

    help: str = ""
    flag: str | None = None
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    switch: bool = False
    cli: bool = True
    required: bool = False
    file_okay: bool = True
    dir_okay: bool = True
    metavar: str | None = None


def option(default: Any = dataclasses.MISSING, *, help: str = "",
           choices: Sequence[str] | None = None, **how: Any) -> Any:
    """A dataclass field with its command-line form (:class:`Option`); no default: required."""
    opt = Option(help=help, choices=tuple(choices) if choices is not None else None, **how)
    return dataclasses.field(default=default, metadata={_KEY: opt})


def options_of(cls_or_obj) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of a config dataclass that are options, in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls_or_obj) if _KEY in f.metadata]


def flag_of(f: dataclasses.Field, opt: Option) -> str:
    return opt.flag or "--" + f.name.replace("_", "-")


def bounds_text(opt: Option) -> str:
    """``≥ 0``, ``> 0 and < 1`` …: the bounds of a number option, in words."""
    return _bounds(opt)


def violates(opt: Option, value: float) -> bool:
    """Whether a number is out of the option's bounds (or not finite)."""
    if not math.isfinite(value):
        return True
    low_bad = opt.min is not None and (value <= opt.min if opt.min_open else value < opt.min)
    high_bad = opt.max is not None and (value >= opt.max if opt.max_open else value > opt.max)
    return low_bad or high_bad


def _bounds(opt: Option) -> str:
    low = f"{'>' if opt.min_open else '≥'} {opt.min:g}" if opt.min is not None else ""
    high = f"{'<' if opt.max_open else '≤'} {opt.max:g}" if opt.max is not None else ""
    return " and ".join(b for b in (low, high) if b)


def check_options(obj) -> None:
    """Check every option of ``obj`` against its choices and bounds (None passes).

    Raises:
        ConfigError: naming the option's flag, what it must be and what it got.
    """
    for f, opt in options_of(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        name = flag_of(f, opt)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{name} must be one of {', '.join(opt.choices)}, got {value!r}")
        if opt.min is None and opt.max is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number {_bounds(opt)}, got {value!r}")
        low_bad = opt.min is not None and (value <= opt.min if opt.min_open else value < opt.min)
        high_bad = opt.max is not None and (value >= opt.max if opt.max_open else value > opt.max)
        if low_bad or high_bad:
            raise ConfigError(f"{name} must be {_bounds(opt)}, got {value}")
