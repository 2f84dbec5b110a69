"""The typed Python API: the names of ``agiqa``, each importable and typed, and each command's
config dataclass mirroring its options."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import agiqa
from agiqa.errors import ConfigError

INIT = Path(agiqa.__file__)


def test_every_public_name_imports_and_type_checkers_see_it():
    from agiqa import (  # noqa: F401 - the names the README's API block uses
        Scorer,
        evaluate,
        extract_semantics,
        fit,
        list_presets,
        open_cache,
        score_folder,
    )

    for name in agiqa.__all__:
        assert getattr(agiqa, name) is not None, name
    # The TYPE_CHECKING imports (what type checkers and IDEs read) name every public name.
    tree = ast.parse(INIT.read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If)
                   and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.asname or a.name for node in guarded.body for a in node.names}
    assert set(agiqa.__all__) - {"__version__"} == seen
    assert (INIT.parent / "py.typed").is_file()
    with pytest.raises(AttributeError):
        agiqa.no_such_name  # noqa: B018


def test_import_agiqa_loads_no_model_library():
    code = "import sys, agiqa, agiqa.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_each_function_takes_its_config_or_its_fields():
    for fn, cfg in ((agiqa.extract_semantics, agiqa.ExtractConfig), (agiqa.fit, agiqa.FitConfig),
                    (agiqa.evaluate, agiqa.EvaluateConfig),
                    (agiqa.score_folder, agiqa.ScoreConfig),
                    (agiqa.write_report, agiqa.ReportConfig)):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].kind is params[0].POSITIONAL_ONLY
        assert params[1].kind is params[1].VAR_KEYWORD
        assert cfg.__name__ in str(params[0].annotation)
    with pytest.raises(ConfigError, match="^epochs= must be ≥ 1, got 0$"):
        agiqa.fit(dataset="csv", root=".", cache=".", out=".", epochs=0)
    with pytest.raises(ConfigError, match="not both"):
        agiqa.fit(agiqa.FitConfig(dataset="csv", root=".", cache=".", out="."), epochs=2)
    with pytest.raises(ConfigError, match="either images"):
        agiqa.extract_semantics(out="cache")
    with pytest.raises(ConfigError, match="images given twice"):
        agiqa.extract_semantics("a", images="b", out="cache")


def test_each_result_is_a_typed_dataclass_with_documented_fields_and_to_dict():
    """The results of the functions: dataclasses whose docstrings name every field, each with a
    ``to_dict()`` (what ``--json`` prints)."""
    import dataclasses

    from agiqa.report.html import ReportResult

    for cls in (agiqa.ExtractReport, agiqa.EvaluateResult, agiqa.ScoreReport, ReportResult):
        assert dataclasses.is_dataclass(cls) and callable(cls.to_dict), cls
        assert cls.__doc__, cls
    for cls in (agiqa.ExtractReport, agiqa.EvaluateResult, agiqa.ScoreReport):
        for f in dataclasses.fields(cls):
            assert f"{f.name}:" in cls.__doc__, (cls.__name__, f.name)
    result = agiqa.EvaluateResult("run", "csv", "test", 3, False,
                                  {"srcc": 0.5, "plcc": 0.4}, None)
    assert result.to_dict() == {"model": "run", "dataset": "csv", "split": "test", "images": 3,
                                "amp": False, "srcc": 0.5, "plcc": 0.4}
    assert result["srcc"] == 0.5
    signature = inspect.signature(agiqa.evaluate)
    assert "EvaluateResult" in str(signature.return_annotation)
