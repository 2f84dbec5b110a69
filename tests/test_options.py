"""Options defined once: a config dataclass field gives the Python check and the click option."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from agiqa.cli import cli
from agiqa.cli.options import config_from, config_options
from agiqa.errors import ConfigError
from agiqa.options import check_options, option
from agiqa.stages.configs import FitConfig


@dataclass
class Throwaway:
    name: str = option(help="A required name.")
    rate: float = option(0.5, min=0, max=1, max_open=True, help="A rate in [0, 1).")
    count: int = option(3, min=1, help="How many.")
    mode: str = option("a", choices=("a", "b"), help="The mode.")
    loud: bool = option(False, switch=True, help="A switch.")
    colour: bool | None = option(None, help="A pair with no default.")
    hidden: int = option(7, cli=False)

    def __post_init__(self):
        check_options(self)


@click.command()
@config_options(Throwaway)
def command(**values):
    click.echo(repr(config_from(Throwaway, values)))


def test_a_field_is_an_option_with_its_help_default_and_limits():
    runner = CliRunner()
    r = runner.invoke(command, ["--help"])
    assert r.exit_code == 0
    for text in ("--name", "A required name.", "--rate", "--count", "--mode", "[a|b]",
                 "--loud", "--colour / --no-colour", "default: 3"):
        assert text in r.output, text
    assert "--hidden" not in r.output
    r = runner.invoke(command, ["--name", "x", "--rate", "0.25", "--loud", "--no-colour"])
    assert r.exit_code == 0, r.output
    assert "rate=0.25" in r.output and "loud=True" in r.output and "colour=False" in r.output
    assert "count=3" in r.output and "hidden=7" in r.output
    for bad in (["--rate", "1"], ["--rate", "nan"], ["--count", "0"], ["--mode", "c"]):
        r = runner.invoke(command, ["--name", "x", *bad])
        assert r.exit_code == 2 and "Error" in r.output, bad
    r = runner.invoke(command, ["--count", "2"])
    assert r.exit_code == 2 and "Missing option '--name'" in r.output


def test_the_python_api_checks_the_same_limits():
    Throwaway(name="x", rate=0.0, count=1)
    with pytest.raises(ConfigError, match="--rate must be ≥ 0 and < 1, got 1"):
        Throwaway(name="x", rate=1)
    with pytest.raises(ConfigError, match="--rate must be a finite number"):
        Throwaway(name="x", rate=float("inf"))
    with pytest.raises(ConfigError, match="--count must be ≥ 1, got 0"):
        Throwaway(name="x", count=0)
    with pytest.raises(ConfigError, match="--mode must be one of a, b, got 'c'"):
        Throwaway(name="x", mode="c")


def test_every_fit_config_field_is_a_fit_option():
    """``agiqa fit`` has an option for each FitConfig field (the data set fields come from the
    shared --dataset options), so an option added to FitConfig reaches the command line."""
    r = CliRunner().invoke(cli, ["fit", "--help"])
    assert r.exit_code == 0
    from dataclasses import fields

    for f in fields(FitConfig):
        if f.name == "progress":  # set from --quiet/--json
            continue
        assert f"--{f.name.replace('_', '-')}" in r.output, f.name
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        FitConfig(dataset="csv", root=".", cache=".", out=".", lr=0)


def test_tf32_is_an_opt_in_the_defaults_leave_torch_as_the_official_code():
    import torch

    from agiqa.runtime import tf32

    assert FitConfig(dataset="csv", root=".", cache=".", out=".").tf32 is False
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32(False):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
