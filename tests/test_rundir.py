"""The run folder's format: the files agiqa 0.1 wrote still load; one predictions.csv writer
and reader; the typed config.json and semantic description; evaluate --out never replaces
what agiqa did not write; the series summary and fit's printed result."""

import json
import shutil
from pathlib import Path

import pytest

from agiqa.cache import SemanticSpec, fingerprint_of
from agiqa.errors import ConfigError
from agiqa.stages import rundir
from agiqa.stages.rundir import (
    RunConfig,
    check_evaluation_out,
    check_out,
    is_finished,
    read_config,
    read_predictions,
    write_predictions,
)

RUN_V1 = Path(__file__).parent / "fixtures" / "run_v1"  # see fixtures/make_run_v1.py


@pytest.fixture
def run_v1(tmp_path) -> Path:
    """The 0.1 run folder, with weights of its recorded architecture (the fixture leaves its
    32 MB model.safetensors out)."""
    from safetensors.torch import save_file

    from agiqa.models.agiqa_net import AgiqaNet, ModelConfig

    out = tmp_path / "run_v1"
    shutil.copytree(RUN_V1, out)
    model = AgiqaNet(ModelConfig(**json.loads((out / "config.json").read_text())["model"]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    return out


def test_a_run_folder_of_the_previous_release_still_loads(run_v1):
    from agiqa.models.agiqa_net import load_model

    raw = json.loads((run_v1 / "config.json").read_text())
    config = read_config(run_v1)
    assert isinstance(config.semantics, SemanticSpec)
    assert config.semantics.model == "fixture/random-vectors"
    assert config.semantics.prompts == ("prompt a", "prompt b")
    assert config.semantics.fingerprint == raw["fingerprint"] == config.fingerprint
    assert config.gate_names == ["semantic_content", "coherence"]
    assert config.training["split"] == "random:0.5,0.25,0.25"
    assert config.to_dict() == raw  # nothing lost, nothing added
    assert load_model(run_v1).config.semantic_dim == 8

    pred = read_predictions(run_v1 / "predictions.csv", config.prompt_names)
    assert len(pred.keys) == 16 and set(pred.subsets) == {"train", "val", "test"}
    assert pred.gate_names == ["semantic_content", "coherence", "image"]
    assert pred.zero_shot == [None] * 16  # 0.1's fit wrote no zero-shot column
    assert is_finished(run_v1)
    with pytest.raises(ConfigError, match="holds a finished run"):
        check_out(run_v1, resume=True)


def test_one_predictions_writer_whose_files_the_reader_takes(tmp_path):
    path = tmp_path / "predictions.csv"
    write_predictions(path, ["a.png", "b.png"], ["test", "test"], [1.0, 2.5], [1.5, 2.0],
                      [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], ["x", "y"], [3.0, 4.0])
    header = path.read_text().splitlines()[0]
    assert header == "key,subset,mos,score,gate_x,gate_y,gate_image,zero_shot"
    p = read_predictions(path, ["x", "y"])
    assert p.keys == ["a.png", "b.png"] and p.scores == [1.5, 2.0]
    assert p.gates[1] == [0.3, 0.3, 0.4] and p.zero_shot == [3.0, 4.0]
    write_predictions(path, ["a.png"], ["train"], [1.0], [1.5], [[0.1, 0.2, 0.7]], ["x", "y"])
    assert read_predictions(path).zero_shot == [None]  # fit: empty where unknown
    from agiqa.errors import DatasetError

    with pytest.raises(DatasetError, match="unexpected columns"):
        read_predictions(path, ["x", "z"])


def test_semantic_spec_round_trips_the_recorded_dict():
    from agiqa.cache import semantic_spec

    d = semantic_spec("m", "rev", "bfloat16", ["p"], "A:", ["good", "bad"], [1, 0],
                      {"turn": "t", "pad_square": True, "pooling": "mean"})
    spec = SemanticSpec.from_dict({**d, "added_later": 1})
    assert spec.pad_square is True and spec.rating_weights == (1.0, 0.0)
    assert spec.to_dict() == {**d, "added_later": 1}
    assert SemanticSpec.from_dict(d).fingerprint == fingerprint_of(d)
    with pytest.raises(ValueError, match="not a semantic description"):
        SemanticSpec.from_dict({"prompts": []})


def test_run_config_refuses_what_is_not_a_model_config():
    from agiqa.errors import CheckpointError

    with pytest.raises(CheckpointError, match="x.json: not an MA-AGIQA model"):
        RunConfig.from_dict({"architecture": "other"}, "x.json")
    with pytest.raises(CheckpointError, match="semantics: not a semantic description"):
        RunConfig.from_dict({"architecture": "ma-agiqa", "model": {}, "semantics": {"a": 1}})


def test_evaluate_out_never_replaces_a_run_or_files_agiqa_did_not_write(run_v1, tmp_path):
    from agiqa.stages.scoring.evaluate import evaluate_model

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.csv").write_text("my,data\n")
    for out, why in ((run_v1, "the model's own folder"), (mine, "agiqa evaluate did not write"),
                     (tmp_path, None)):
        if why is None:  # another run folder than the model's
            out = tmp_path / "other-run"
            shutil.copytree(run_v1, out)
            why = "is a run or model folder"
        with pytest.raises(ConfigError, match=why):  # before any work: no data set needed
            evaluate_model(run_v1, None, tmp_path / "no-cache", out=out)
    assert (mine / "predictions.csv").read_text() == "my,data\n"
    assert (run_v1 / "predictions.csv").read_text().startswith("key,subset,mos,score,gate_")

    ours = tmp_path / "eval"
    ours.mkdir()
    (ours / rundir.EVALUATION_MARKER).write_text("")
    (ours / "predictions.csv").write_text("old\n")
    check_evaluation_out(ours, run_v1)  # an evaluation agiqa wrote may be replaced
    old = tmp_path / "eval-0.1"  # as 0.1 wrote it: no marker, its evaluation.json
    old.mkdir()
    (old / "evaluation.json").write_text(json.dumps({"agiqa_version": "0.1.0", "metrics": {}}))
    check_evaluation_out(old, run_v1)
    check_evaluation_out(tmp_path / "new", run_v1)


def test_a_series_summary_is_the_mean_and_sample_std_over_finished_runs(tmp_path):
    from agiqa.stages.training.fit import FitResult, RunResult, summarise

    runs = [RunResult("seed 20", tmp_path, 20, 20, {"srcc": 0.5}, best_epoch=3),
            RunResult("seed 21", tmp_path, 21, 20, {"srcc": 0.7}, best_epoch=4),
            RunResult("seed 22", tmp_path, 22, 20, error="the loss became nan")]
    s = summarise(runs)["srcc"]
    assert (s.mean, s.n) == (pytest.approx(0.6), 2)
    assert s.std == pytest.approx(0.1414213562, rel=1e-8)  # ddof 1, not np.std's 0.1
    assert summarise(runs[:1])["srcc"].std is None
    d = FitResult(tmp_path, runs, summarise(runs), {"concurrent_runs": 1}, 3).to_dict()
    assert d["summary"]["srcc"] == {"mean": pytest.approx(0.6), "std": s.std, "n": 2}
    assert [r["best_epoch"] for r in d["runs"]] == [3, 4, None]
    json.dumps(d)


def test_fit_prints_the_selected_epoch(tmp_path, capsys):
    from agiqa.cli.fit import print_fit_result
    from agiqa.stages.training.fit import FitResult, RunResult, summarise

    m = {"srcc": 0.5, "plcc": 0.6, "krcc": 0.4, "rmse": 0.7}
    one = [RunResult("seed 20", tmp_path, 20, 20, m, best_epoch=7)]
    print_fit_result(FitResult(tmp_path, one, summarise(one), {}))
    out = capsys.readouterr().out
    assert "selected epoch 7" in out and f"run directory: {tmp_path}" in out
    two = [*one, RunResult("seed 21", tmp_path, 21, 20, {**m, "srcc": 0.7}, best_epoch=5)]
    print_fit_result(FitResult(tmp_path, two, summarise(two), {}, 2))
    out = capsys.readouterr().out
    assert "seed 20 7" in out and "seed 21 5" in out and "(n=2)" in out
    assert "0.6000" in out and "0.1414" in out  # the mean and sample std of SRCC


def test_a_run_recorded_before_an_option_existed_resumes_under_that_options_old_value(tmp_path):
    """training.json of a run that predates --image-key: a resume with the value it trained
    with (the paper's key) continues it; another value is refused, naming the option."""
    recorded = {"epochs": 2, "lr": 1e-5, "seed": 20}
    rundir.write_training(tmp_path, recorded)
    rundir.check_resume(tmp_path, {**recorded, "image_key": "maniqa"})
    with pytest.raises(ConfigError, match="image_key 'maniqa' -> 'vit-stats'"):
        rundir.check_resume(tmp_path, {**recorded, "image_key": "vit-stats"})
