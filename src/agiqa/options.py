"""Options defined once: a config dataclass field carries its type, default, help and limits.

A command's options are the fields of its config dataclass (``FitConfig`` …), each declared
with :func:`option`. The same declaration gives

* the Python API: the dataclass itself, checked by :func:`check_options` in ``__post_init__``
  (types, choices, bounds), and :func:`check_known` for keyword arguments it does not have;
* the command line: ``agiqa.cli.options.config_options`` turns every field into a click option
  or argument (flag, type, default, help, range or choices) of the command.

Adding an option to a command is therefore one edit: a field of its config dataclass.

Messages name an option as the caller wrote it: ``--batch-size`` on the command line,
``batch_size=`` from Python (:func:`cli_names` switches a block of code to the command line's
names; :func:`spell` writes a name, or a name and a value, either way).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from agiqa.errors import ConfigError, UsageError

__all__ = ["Option", "bounds_text", "check_known", "check_options", "cli_names", "cli_naming",
           "flag_of",
           "option", "options_of", "spell", "violates"]

_KEY = "agiqa_option"
_CLI_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar("agiqa_cli_names",
                                                                  default=False)


@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field shows on the command line, and its limits.

    ``flag``: the option's name (default ``--field-name``); ``flags``: more names (``-q``);
    ``choices``: the allowed strings; ``min``/``max``: bounds of a number, exclusive with
    ``min_open``/``max_open``; ``switch``: a bool as one flag (``--resume``) rather than a
    ``--x/--no-x`` pair; ``negate``: a bool set to False by this one flag (``--quiet`` for
    ``progress``); ``positional``: a click argument (``FOLDER``) rather than an option;
    ``cli``: False keeps the field out of the command line, and ``cli_reason`` says why;
    ``deprecated``: older flags still accepted, hidden from the help;
    ``required``: the command line must give it (fields without a default always are, and so
    are those named in the config class's ``REQUIRED``); ``exists``, ``file_okay``,
    ``dir_okay``: what a path must be on the command line; ``multiple``: a repeatable option
    whose values come as a tuple of strings (the config's ``__post_init__`` reads them).
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
    negate: str | None = None
    positional: bool = False
    cli: bool = True
    cli_reason: str = ""
    deprecated: tuple[str, ...] = ()
    required: bool = False
    exists: bool = False
    file_okay: bool = True
    dir_okay: bool = True
    metavar: str | None = None
    multiple: bool = False

    def __post_init__(self) -> None:
        if not self.cli and not self.cli_reason:
            raise ValueError("an option kept off the command line needs its cli_reason")


def option(default: Any = dataclasses.MISSING, *, help: str = "",
           choices: Sequence[str] | None = None, **how: Any) -> Any:
    """A dataclass field with its command-line form (:class:`Option`); no default: required."""
    opt = Option(help=help, choices=tuple(choices) if choices is not None else None, **how)
    return dataclasses.field(default=default, metadata={_KEY: opt})


def options_of(cls_or_obj) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of a config dataclass that are options, in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls_or_obj) if _KEY in f.metadata]


def flag_of(f: dataclasses.Field, opt: Option) -> str:
    if opt.positional:
        return f.name.upper()
    return opt.flag or "--" + f.name.replace("_", "-")


@contextlib.contextmanager
def cli_names() -> Iterator[None]:
    """Within the block, messages name options by their flags (``--out``), as the command
    line does; elsewhere by their Python keywords (``out=``)."""
    token = _CLI_NAMES.set(True)
    try:
        yield
    finally:
        _CLI_NAMES.reset(token)


def cli_naming() -> bool:
    """Whether messages name options as the command line does (within :func:`cli_names`)."""
    return _CLI_NAMES.get()


def spell(name: str, *value: Any) -> str:
    """An option (a field name) as the caller writes it, with a value if one is given.

    ``spell("batch_size")`` is ``batch_size=`` from Python and ``--batch-size`` on the command
    line; ``spell("augment", False)`` is ``augment=False`` or ``--no-augment``.
    """
    if not _CLI_NAMES.get():
        return f"{name}=" + (repr(value[0]) if value else "")
    flag = "--" + name.replace("_", "-")
    if not value:
        return flag
    if value[0] is True:
        return flag
    if value[0] is False:
        return "--no-" + flag[2:]
    return f"{flag} {value[0]}"


def _name(f: dataclasses.Field, opt: Option) -> str:
    return flag_of(f, opt) if _CLI_NAMES.get() else f"{f.name}="


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


def base_type(annotation: Any) -> tuple[Any, bool]:
    """The type of a field annotation without ``| None``, and whether None was allowed."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return annotation, False


@functools.cache
def field_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """Field name → (type without ``| None``, whether None is allowed), from the annotations."""
    return {name: base_type(hint) for name, hint in typing.get_type_hints(cls).items()}


_TYPE_WORDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
               Path: "a path"}


def _typed(value: Any, kind: Any) -> tuple[bool, Any]:
    """(whether ``value`` is of ``kind``, the value converted: a path from a string …)."""
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        return isinstance(value, str), value
    if kind is Path:
        ok = isinstance(value, (str, os.PathLike))
        return ok, Path(value) if ok else value
    return True, value


def check_options(obj) -> None:
    """Check every option of ``obj`` against its type, choices and bounds; convert what is
    given as the type's usual spelling (a path as a string, an integer as a float).

    Raises:
        ConfigError: naming the option (``--lr`` or ``lr=``), what it must be and what it got.
    """
    kinds = field_types(type(obj))
    required = getattr(type(obj), "REQUIRED", ())
    for f, opt in options_of(obj):
        value = getattr(obj, f.name)
        name = _name(f, opt)
        kind, nullable = kinds.get(f.name, (Any, True))
        if value is None and f.name in required:
            raise UsageError(f"{name} is required")
        if value is None:
            if not nullable:
                raise ConfigError(f"{name} is required" if f.default is dataclasses.MISSING
                                  else f"{name} must be {_TYPE_WORDS.get(kind, kind)}, got None")
            continue
        ok, value = _typed(value, kind)
        if not ok:
            raise ConfigError(f"{name} must be {_TYPE_WORDS.get(kind, kind)}, got {value!r}")
        setattr(obj, f.name, value)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{name} must be one of {', '.join(opt.choices)}, got {value!r}")
        if opt.min is None and opt.max is None:
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number {_bounds(opt)}, got {value!r}")
        if violates(opt, value):
            raise ConfigError(f"{name} must be {_bounds(opt)}, got {value}")


def check_known(cls: type, names: Iterable[str], command: str) -> None:
    """Refuse keyword arguments that are not fields of ``cls``, suggesting the close ones.

    Raises:
        ConfigError: ``unknown option 'epoch' of fit; did you mean 'epochs'?``.
    """
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else \
            f" (its options: {', '.join(known)})"
        raise ConfigError(f"unknown option {name!r} of {command}{hint}")
