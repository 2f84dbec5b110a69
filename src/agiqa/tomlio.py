"""TOML reading: the standard library's ``tomllib`` (Python 3.11+) or ``tomli`` before it."""

from __future__ import annotations

import sys
from typing import Any

from agiqa.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["parse_toml", "toml_value"]


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """The table of a TOML document; a syntax error is one line naming ``source``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML ({e})") from None


def toml_value(text: str) -> Any:
    """``text`` read as a TOML value (``2``, ``true``, ``"a"``, ``[1, 2]``); anything else is
    the string itself (``tiny``, ``/data/x``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
