"""agiqa: quality assessment of AI-generated images the MA-AGIQA way.

A multimodal LLM reads each image under quality prompts (stage one, cached once); a MANIQA
backbone and a mixture-of-experts head are trained on the cached vectors (stage two).

The Python API mirrors the command line: one function per command, each taking that command's
config dataclass or its fields as keywords (:mod:`agiqa.pipeline.api`)::

    import agiqa

    agiqa.extract_semantics(images="imgs/", out="cache/", mllm="mplug-owl2")
    agiqa.fit(dataset="csv", root="imgs/", labels="imgs/labels.csv", cache="cache/", out="run/")
    rows = agiqa.Scorer.from_pretrained("run/").score(["a.png"])

The names below are imported on first use, so that ``import agiqa`` (and the ``agiqa`` command)
stays fast; type checkers and IDEs see them through the ``TYPE_CHECKING`` imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from agiqa.cache import SemanticCache, open_cache
    from agiqa.data.datasets import Dataset, load_dataset
    from agiqa.models.agiqa_net import AgiqaNet, load_model
    from agiqa.pipeline.api import (
        EvaluateConfig,
        EvaluateResult,
        ExperimentConfig,
        ExperimentTable,
        ExtractConfig,
        FitConfig,
        FitResult,
        ReportConfig,
        ScoreConfig,
        evaluate,
        experiment,
        extract_semantics,
        fit,
        score_folder,
        write_report,
    )
    from agiqa.presets import list_presets
    from agiqa.stages.extraction.extract import ExtractReport
    from agiqa.stages.scoring.results import ScoreReport
    from agiqa.stages.scoring.scorer import Scorer

# Where each public name lives.
_WHERE = {
    "extract_semantics": "agiqa.pipeline.api", "fit": "agiqa.pipeline.api",
    "evaluate": "agiqa.pipeline.api", "score_folder": "agiqa.pipeline.api",
    "experiment": "agiqa.pipeline.api", "ExperimentTable": "agiqa.pipeline.api",
    "ExperimentConfig": "agiqa.pipeline.api",
    "ExtractConfig": "agiqa.pipeline.api", "FitConfig": "agiqa.pipeline.api",
    "EvaluateConfig": "agiqa.pipeline.api", "ScoreConfig": "agiqa.pipeline.api",
    "ReportConfig": "agiqa.pipeline.api", "EvaluateResult": "agiqa.pipeline.api",
    "write_report": "agiqa.pipeline.api",
    "FitResult": "agiqa.pipeline.api",
    "Scorer": "agiqa.stages.scoring.scorer", "ScoreReport": "agiqa.stages.scoring.results",
    "ExtractReport": "agiqa.stages.extraction.extract",
    "open_cache": "agiqa.cache", "SemanticCache": "agiqa.cache",
    "list_presets": "agiqa.presets",
    "load_dataset": "agiqa.data.datasets", "Dataset": "agiqa.data.datasets",
    "load_model": "agiqa.models.agiqa_net", "AgiqaNet": "agiqa.models.agiqa_net",
}

__all__ = ["AgiqaNet", "Dataset", "EvaluateConfig", "EvaluateResult", "ExperimentConfig",
           "ExperimentTable",
           "ExtractConfig", "ExtractReport", "FitConfig", "FitResult", "ReportConfig",
           "ScoreConfig", "ScoreReport", "Scorer", "SemanticCache", "__version__", "evaluate",
           "experiment", "extract_semantics", "fit", "list_presets", "load_dataset", "load_model",
           "open_cache", "score_folder", "write_report"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'agiqa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
