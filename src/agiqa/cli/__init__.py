"""The ``agiqa`` command line: thin commands over library functions, one module per stage.

Library code raises :class:`agiqa.errors.AgiqaError`; only the CLI turns errors into
``Error: …`` lines and exit codes (0 all fine, 1 error, 2 finished with some images failed,
64 usage error).
"""

from __future__ import annotations

from agiqa.cli import (  # noqa: F401 - register
    cache,
    experiment,
    fit,
    presets,
    report,
    score,
    semantics,
)
from agiqa.cli.common import cli

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="agiqa")
