"""Options defined once: a config dataclass field gives the Python check and the click option."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from agiqa.cli import cli
from agiqa.cli.options import CLI_ONLY, alias_field, config_from, config_options
from agiqa.errors import ConfigError
from agiqa.options import check_options, cli_names, flag_of, option, options_of
from agiqa.stages.configs import (
    CacheInfoConfig,
    CacheVerifyConfig,
    DemoConfig,
    EvaluateConfig,
    ExperimentConfig,
    ExtractConfig,
    FitConfig,
    ImportOfficialConfig,
    ImportPtConfig,
    ReportConfig,
    ScoreConfig,
)


@dataclass
class Throwaway:
    name: str = option(help="A required name.")
    rate: float = option(0.5, min=0, max=1, max_open=True, help="A rate in [0, 1).")
    count: int = option(3, min=1, help="How many.")
    mode: str = option("a", choices=("a", "b"), help="The mode.")
    loud: bool = option(False, switch=True, help="A switch.")
    colour: bool | None = option(None, help="A pair with no default.")
    hidden: int = option(7, cli=False, cli_reason="set by the program, not the user")

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
    with pytest.raises(ConfigError, match="rate= must be ≥ 0 and < 1, got 1"):
        Throwaway(name="x", rate=1)
    with pytest.raises(ConfigError, match="rate= must be a finite number"):
        Throwaway(name="x", rate=float("inf"))
    with pytest.raises(ConfigError, match="count= must be ≥ 1, got 0"):
        Throwaway(name="x", count=0)
    with pytest.raises(ConfigError, match="mode= must be one of a, b, got 'c'"):
        Throwaway(name="x", mode="c")
    with cli_names():  # the command line names its flags
        with pytest.raises(ConfigError, match="^--count must be ≥ 1, got 0$"):
            Throwaway(name="x", count=0)
    # Types, from the annotations: no bool for an int, no string for a bool or a number.
    for bad, words in ((dict(count=1.5), "count= must be an integer, got 1.5"),
                       (dict(count=True), "count= must be an integer, got True"),
                       (dict(loud="no"), "loud= must be True or False, got 'no'"),
                       (dict(rate="0.5"), "rate= must be a number, got '0.5'"),
                       (dict(name=3), "name= must be a string, got 3"),
                       (dict(count=None), "count= must be an integer, got None")):
        with pytest.raises(ConfigError, match=f"^{re.escape(words)}$"):
            Throwaway(name="x", **{k: v for k, v in bad.items() if k != "name"}) \
                if "name" not in bad else Throwaway(**bad)
    assert Throwaway(name="x", rate=0).rate == 0.0 and isinstance(Throwaway(name="x", rate=0)
                                                                 .rate, float)


# Every command of the command line and the config its options come from.
COMMANDS = {
    ("extract-semantics",): ExtractConfig, ("fit",): FitConfig, ("evaluate",): EvaluateConfig,
    ("score-folder",): ScoreConfig, ("report",): ReportConfig, ("demo",): DemoConfig,
    ("import-official",): ImportOfficialConfig, ("cache", "info"): CacheInfoConfig,
    ("cache", "verify"): CacheVerifyConfig, ("cache", "import-pt"): ImportPtConfig,
    ("experiment",): ExperimentConfig,
}
# Commands without a config, and why.
NO_CONFIG = {("presets", "list"): "lists presets: --kind and --json only, no run to configure",
             ("presets", "path"): "prints a folder, takes no option"}


def _walk(group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _flags(param) -> str:
    names = [*param.opts, *param.secondary_opts] if isinstance(param, click.Option) else \
        [param.human_readable_name]
    return "/".join(names)


def mapping(cmd: click.Command, cls) -> list[str]:
    """Each click parameter of ``cmd`` → its field of ``cls``, one line each; an
    AssertionError where a flag is no field, its default or name differs, or a field has no
    flag and no reason."""
    fields = {f.name: (f, opt) for f, opt in options_of(cls)}
    assert {f.name for f in dataclasses.fields(cls)} == set(fields), cls
    lines, seen = [], set()
    for p in cmd.params:
        if p.name in CLI_ONLY:
            lines.append(f"  {_flags(p):42s} (command line only: {CLI_ONLY[p.name]})")
            continue
        target = alias_field(p.name)
        if target is not None:
            assert target in fields and p.hidden, p.name
            lines.append(f"  {_flags(p):42s} -> {target} (earlier name, hidden)")
            continue
        assert p.name in fields, f"{_flags(p)} is no field of {cls.__name__}"
        f, opt = fields[p.name]
        seen.add(p.name)
        if f.default is dataclasses.MISSING or f.name in getattr(cls, "REQUIRED", ()):
            assert p.required, f"{_flags(p)} must be required"
            default = "required"
        else:
            assert not p.required and p.default == f.default, \
                f"{_flags(p)} defaults to {p.default!r}, {f.name} to {f.default!r}"
            default = f"default {f.default!r}"
        if opt.negate:
            assert set(p.opts) == {opt.negate, *opt.flags}, p.opts
            how = "set to False"
        else:
            assert flag_of(f, opt) in (p.opts[0], p.human_readable_name), p.opts
            how = "same name"
        lines.append(f"  {_flags(p):42s} -> {f.name} ({how}, {default})")
    for name, (_f, opt) in fields.items():
        if name not in seen:
            assert not opt.cli and opt.cli_reason, f"{name} has no flag and no reason"
            lines.append(f"  {'(Python only)':42s} -> {name}: {opt.cli_reason}")
    return lines


def test_each_flag_is_a_config_field_of_the_same_name_and_default():
    """For every command: each click parameter is a field of its config with the same name and
    default (or a flag of the command line only, with its reason); each field has its flag, or
    says why it is for Python only. Run with -s to see the mapping."""
    commands = dict(_walk(cli))
    assert set(commands) == set(COMMANDS) | set(NO_CONFIG), sorted(commands)
    for path, cls in COMMANDS.items():
        lines = mapping(commands[path], cls)
        print(f"\nagiqa {' '.join(path)}  <-  {cls.__name__}", *lines, sep="\n")
    for path, why in NO_CONFIG.items():
        print(f"\nagiqa {' '.join(path)}: no config ({why})")


def test_a_drift_between_a_flag_and_its_field_is_caught():
    """The drifts the mapping test exists for: a default, a name, a field without a flag."""
    @dataclass(kw_only=True)
    class Fusing:
        fuse_prompts: bool = option(True, help="Fuse.")
        workers: int = option(2, min=0, help="Workers.")

    @click.command()
    @click.option("--fuse-prompts/--no-fuse-prompts", "fuse_prompts", default=None)
    @click.option("--workers", "workers", default=2)
    def drifted(fuse_prompts, workers):
        """Options written by hand."""

    with pytest.raises(AssertionError, match="defaults to None, fuse_prompts to True"):
        mapping(drifted, Fusing)

    @click.command()
    @click.option("--fuse-prompts/--no-fuse-prompts", "fuse_prompts", default=True)
    @click.option("--workers", "loader_workers", default=2)
    def renamed(fuse_prompts, loader_workers):
        """An option whose name is not the field's."""

    with pytest.raises(AssertionError, match="--workers is no field of Fusing"):
        mapping(renamed, Fusing)

    @click.command()
    @config_options(Fusing, exclude=("workers",))
    def short(**values):
        """A field left out."""

    with pytest.raises(AssertionError, match="workers has no flag and no reason"):
        mapping(short, Fusing)

    @click.command()
    @config_options(Fusing)
    def generated(**values):
        """Generated from the config: nothing to catch."""

    assert len(mapping(generated, Fusing)) == 2


def test_the_python_api_checks_types_and_names_unknown_options():
    import agiqa

    with pytest.raises(ConfigError, match="^unknown option 'epoch' of fit; did you mean "
                                          "'epochs'\\?$"):
        agiqa.fit(dataset="csv", root=".", cache=".", out=".", epoch=3)
    with pytest.raises(ConfigError, match="^augment= must be True or False, got 'no'$"):
        agiqa.fit(dataset="csv", root=".", cache=".", out=".", augment="no")
    with pytest.raises(ConfigError, match="^epochs= must be an integer, got 1.5$"):
        agiqa.fit(dataset="csv", root=".", cache=".", out=".", epochs=1.5)
    with pytest.raises(ConfigError, match="^seed= must be an integer, got 'x'$"):
        agiqa.fit(dataset="csv", root=".", cache=".", out=".", seed="x")
    with pytest.raises(ConfigError, match="^selection= must be one of paper, last, got 'best'$"):
        agiqa.fit(dataset="csv", root=".", cache=".", out=".", selection="best")
    with pytest.raises(ConfigError, match="^dataset= is required$"):
        agiqa.fit(root=".", cache=".", out=".")
    with pytest.raises(ConfigError, match="did you mean 'mllm'"):
        agiqa.extract_semantics("imgs", out="c", mlm="x")
    with pytest.raises(ConfigError, match="^report='r.txt' does not end in .html$"):
        agiqa.score_folder(".", model=".", report="r.txt")
    with pytest.raises(ConfigError, match="^key_norm='zscore' needs the backbone's keys fixed: "
                                          "add backbone_lr=0 and augment=False$"):
        agiqa.fit(dataset="csv", root=".", cache=".", out=".", key_norm="zscore")
    with pytest.warns(DeprecationWarning, match="use mllm="):
        assert ExtractConfig(out="c", model="tiny").mllm == "tiny"


def test_the_python_api_names_keywords_in_its_refusals(tmp_path):
    """Refusals raised deep in a run name the keyword in Python (``out='…'``) and the flag on
    the command line (``--out …``)."""
    import agiqa

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"^out={re.escape(repr(str(mine)))} is not empty and "
                                          "agiqa did not make it"):
        agiqa.fit(dataset="csv", root=tmp_path, labels=tmp_path / "l.csv", cache=tmp_path,
                  out=mine)
    r = CliRunner().invoke(cli, ["fit", "--dataset", "csv", "--root", str(tmp_path), "--labels",
                                 str(tmp_path / "l.csv"), "--cache", str(tmp_path), "--out",
                                 str(mine)])
    assert r.exit_code == 1 and f"Error: --out {mine} is not empty and agiqa did not make it" \
        in r.output


def test_the_experiment_api_checks_its_options_before_any_work(tmp_path):
    """``experiment()`` takes its options from the same config as ``agiqa experiment``: a
    string where a boolean belongs never turns a run into a dry run (or the reverse)."""
    import agiqa

    out = tmp_path / "exp"
    with pytest.raises(ConfigError, match="^dry_run= must be True or False, got 'no'$"):
        agiqa.experiment("cpu-demo", out=out, dry_run="no")
    with pytest.raises(ConfigError, match="^concurrent_runs= must be ≥ 1, got 0$"):
        agiqa.experiment("cpu-demo", out=out, concurrent_runs=0)
    with pytest.raises(ConfigError, match="^engine= must be one of local, ray, got 'slurm'$"):
        agiqa.experiment("cpu-demo", out=out, engine="slurm")
    with pytest.raises(ConfigError, match="did you mean 'overrides'"):
        agiqa.experiment("cpu-demo", out=out, override=["repeats=2"])
    with pytest.raises(ConfigError, match="^roots=: 'agiqa-3k' is not NAME=DIR$"):
        agiqa.experiment("cpu-demo", out=out, roots=["agiqa-3k"])
    assert not out.exists()
    config = ExperimentConfig(plan="cpu-demo", out=out, roots={"demo": tmp_path},
                              overrides=["repeats=2"])
    assert config.roots == {"demo": tmp_path} and config.overrides == ["repeats=2"]
    r = CliRunner().invoke(cli, ["experiment", "cpu-demo", "--out", str(out), "--root",
                                 "nameless"])
    assert r.exit_code == 64 and "--root: 'nameless' is not NAME=DIR" in r.output


def test_the_command_line_names_flags_where_python_names_keywords(tmp_path):
    r = CliRunner().invoke(cli, ["fit", "--dataset", "csv", "--root", str(tmp_path), "--cache",
                                 str(tmp_path), "--out", str(tmp_path / "r"), "--key-norm",
                                 "zscore"])
    assert r.exit_code == 1
    assert r.output.strip() == ("Error: --key-norm zscore needs the backbone's keys fixed: add "
                                "--backbone-lr 0 and --no-augment")
    r = CliRunner().invoke(cli, ["score-folder", str(tmp_path), "--model", str(tmp_path),
                                 "--report", str(tmp_path / "r.txt")])
    assert r.exit_code == 64 and f"Error: --report: {tmp_path / 'r.txt'} does not end in .html" \
        in r.output


def test_recipe_cpu_fills_the_options_not_given(tmp_path, monkeypatch):
    """``--recipe cpu`` (``recipe="cpu"``) is the recipe preset's options under the flags
    given, on the command line and in Python alike."""
    import agiqa.pipeline.api as api
    from agiqa.pipeline.demo import CPU_RECIPE
    from agiqa.presets import load_options_recipe

    seen = []
    monkeypatch.setattr(api, "fit_repeats", lambda cfg: seen.append(cfg) or SimpleNamespace(
        runs=[], finished=[], summary={}, out=cfg.out))
    base = ["--dataset", "csv", "--root", str(tmp_path), "--cache", str(tmp_path)]
    r = CliRunner().invoke(cli, ["fit", *base, "--out", str(tmp_path / "a"), "--recipe", "cpu",
                                 "--epochs", "3", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    api.fit(dataset="csv", root=tmp_path, cache=tmp_path, out=tmp_path / "a", recipe="cpu",
            epochs=3, batch_size=16)
    cli_cfg, py_cfg = seen
    assert cli_cfg == py_cfg
    recipe = load_options_recipe("cpu", "fit").options
    assert recipe == CPU_RECIPE and recipe["epochs"] == 200 and recipe["batch_size"] == 32
    assert cli_cfg.epochs == 3 and cli_cfg.batch_size == 16  # the flags given win
    for name, value in recipe.items():
        if name not in ("epochs", "batch_size"):
            assert getattr(cli_cfg, name) == value, name
    r = CliRunner().invoke(cli, ["fit", *base, "--out", str(tmp_path / "b"), "--recipe",
                                 "chat-template"])
    assert r.exit_code == 1 and "not a set of options of fit" in r.output
    with pytest.raises(ConfigError, match="unknown recipe preset 'cpuu'.*did you mean cpu"):
        api.fit(dataset="csv", root=".", cache=".", out=".", recipe="cpuu")


def test_the_earlier_model_flag_of_extract_semantics_still_works(tmp_path):
    r = CliRunner().invoke(cli, ["extract-semantics", "--model", str(tmp_path / "no-model"),
                                 "--images", str(tmp_path), "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "cannot load MLLM" in r.output
    r = CliRunner().invoke(cli, ["extract-semantics", "--model", "a", "--mllm", "b", "--images",
                                 str(tmp_path), "--out", str(tmp_path / "c")])
    assert r.exit_code == 64 and "--model is the earlier name of --mllm" in r.output
    options = CliRunner().invoke(cli, ["extract-semantics", "--help"]).output.split("Options:")[1]
    assert "--mllm" in options and "--model" not in options


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
