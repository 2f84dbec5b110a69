"""Presets: typed, shipped as data, listed, extended by the user, and mistakes caught early."""

import json

import pytest
from click.testing import CliRunner

from agiqa.cli import cli
from agiqa.errors import ConfigError
from agiqa.presets import (
    KINDS,
    agiqa_home,
    describe_presets,
    list_presets,
    load_backbone_preset,
    load_dataset_preset,
    load_mllm_preset,
    load_prompts,
    resolve_model_id,
)


def test_every_builtin_preset_loads_as_its_dataclass():
    from importlib import resources

    folders = {p.name for p in resources.files("agiqa.presets").iterdir()
               if p.is_dir() and not p.name.startswith("_")}
    assert set(KINDS) == folders == {"mllms", "prompts", "datasets", "backbones", "recipes",
                                     "plans"}
    assert {"cpu", "chat-template", "mplug-owl2-official"} <= set(list_presets("recipes"))
    with pytest.raises(ConfigError, match="unknown preset kind 'mllm'.*did you mean mllms"):
        list_presets("mllm")
    assert {"llava-1.5-7b", "qwen2-vl-2b"} <= set(list_presets("mllms"))
    assert {"agiqa-3k", "csv"} <= set(list_presets("datasets"))
    for kind, rows in describe_presets().items():
        assert rows, kind
        for row in rows:
            assert row["source"] == "built-in"
    assert load_mllm_preset("llava-1.5-7b").hidden_size == 4096
    assert load_dataset_preset("agiqa-3k").score_range == [0, 5]
    assert load_prompts("paper").names == ["semantic_content", "coherence"]


def test_a_user_backbone_preset_trains_through_fit(tmp_path, monkeypatch):
    from agiqa.models.agiqa_net import create_model, resolve_pretrained
    from agiqa.stages.training.fit import FitConfig

    home = tmp_path / "home"
    monkeypatch.setenv("AGIQA_HOME", str(home))
    (home / "presets" / "backbones").mkdir(parents=True)
    (home / "presets" / "backbones" / "mine.json").write_text(json.dumps({
        "timm_name": "vit_base_patch8_224", "feature_blocks": [0, 1], "maniqa_dim": 16,
        "dim_mlp": 16, "vit_args": {"embed_dim": 16, "depth": 2, "num_heads": 2}}))
    assert "mine" in list_presets("backbones")
    assert resolve_pretrained("mine", None) is False  # no "pretrained": random weights
    FitConfig(dataset="csv", root=".", cache=".", out=".", backbone="mine")
    model = create_model("mine", num_prompts=2, semantic_dim=8)
    assert model.config.maniqa_dim == 16 and model.config.feature_blocks == [0, 1]
    assert model.backbone.vit.embed_dim == 16
    with pytest.raises(ConfigError, match="unknown backbone preset 'mne'.*did you mean mine"):
        FitConfig(dataset="csv", root=".", cache=".", out=".", backbone="mne")


def test_presets_list_prints_hub_ids_widths_and_score_ranges(agiqa_cli):
    r = agiqa_cli("presets", "list")
    assert r.exit_code == 0, r.output
    assert "llava-hf/llava-1.5-7b-hf" in r.output and "4096" in r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("aigciqa2023"))
    assert "0 to 100" in line
    data = json.loads(agiqa_cli("presets", "list", "--json").stdout)
    assert set(data) == set(KINDS)
    mllm = {p["name"]: p for p in data["mllms"]}["qwen2.5-vl-7b"]
    assert mllm["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and mllm["width"] == 3584
    only = json.loads(agiqa_cli("presets", "list", "--kind", "backbones", "--json").stdout)
    assert list(only) == ["backbones"]
    recipes = agiqa_cli("presets", "list", "--kind", "recipes").output
    assert "fit --recipe cpu" in recipes and "extract-semantics: mplug-owl2" in recipes


def test_a_mistyped_mllm_gets_did_you_mean_and_no_hub_call(agiqa_cli, tmp_path):
    r = agiqa_cli("extract-semantics", "--model", "llava-1.5-7", "--images", tmp_path,
            "--out", tmp_path / "c")
    assert r.exit_code == 1
    assert "did you mean llava-1.5-7b" in r.output
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_model_id("./no/such/folder")
    assert resolve_model_id("llava-1.5-7b") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_model_id("someone/some-model") == "someone/some-model"
    assert resolve_model_id(tmp_path) == str(tmp_path)  # an existing folder, as given
    with pytest.raises(ConfigError, match="did you mean agiqa-3k"):
        load_dataset_preset("agiqa3k")


def test_user_presets_add_and_override(agiqa_cli, tmp_path):
    assert agiqa_home() == tmp_path / "agiqa-home"  # the autouse fixture
    folder = agiqa_home() / "presets" / "mllms"
    folder.mkdir(parents=True)
    (folder / "my-vlm.json").write_text(json.dumps(
        {"model": "me/my-vlm", "hidden_size": 1024, "revision": "abc123"}))
    (folder / "llava-1.5-7b.json").write_text(json.dumps(
        {"model": "llava-hf/llava-1.5-7b-hf", "hidden_size": 4096, "revision": "pinned"}))
    assert resolve_model_id("my-vlm") == "me/my-vlm"
    assert load_mllm_preset("llava-1.5-7b").revision == "pinned"
    prompts = agiqa_home() / "presets" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "one.json").write_text(json.dumps({"prompts": [{"name": "q", "text": "Rate."}]}))
    assert load_prompts("one").texts == ["Rate."]
    listed = {p["name"]: p for p in json.loads(agiqa_cli("presets", "list",
                                                         "--json").stdout)["mllms"]}
    assert listed["my-vlm"]["source"] == str(folder / "my-vlm.json")
    assert listed["llava-1.5-7b"]["revision"] == "pinned"
    assert "my-vlm (user)" in agiqa_cli("presets", "list", "--kind", "mllms").output


def test_unknown_and_missing_keys_are_config_errors(agiqa_cli, tmp_path):
    folder = agiqa_home() / "presets"
    (folder / "mllms").mkdir(parents=True)
    (folder / "mllms" / "typo.json").write_text(json.dumps({"model": "a/b", "hiden_size": 8}))
    with pytest.raises(ConfigError, match=r"unknown keys \['hiden_size'\]"):
        load_mllm_preset("typo")
    (folder / "datasets").mkdir()
    (folder / "datasets" / "half.json").write_text(json.dumps({"labels": "x.csv"}))
    with pytest.raises(ConfigError, match="missing keys"):
        load_dataset_preset("half")
    (folder / "backbones").mkdir()
    (folder / "backbones" / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_backbone_preset("bad")
    r = agiqa_cli("presets", "list")
    assert r.exit_code == 1 and "Error: " in r.output


def test_custom_prompt_files_json_and_txt(tmp_path):
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"prompts": [{"name": "sharp", "text": "Is it sharp?"},
                                         {"name": "clean", "text": "Is it clean?"},
                                         "Is it pleasing?"],
                             "answer_prefix": "The image is"}))
    ps = load_prompts(j)
    assert ps.names == ["sharp", "clean", "prompt3"] and ps.answer_prefix == "The image is"
    assert ps.texts[2] == "Is it pleasing?"
    t = tmp_path / "p.txt"
    t.write_text("First prompt.\n\n  Second prompt.  \n")
    ps = load_prompts(t)
    assert ps.names == ["prompt1", "prompt2"] and ps.texts == ["First prompt.", "Second prompt."]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="no prompt"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": ["a"], "extra": 1}))
    with pytest.raises(ConfigError, match="unknown keys"):
        load_prompts(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="prompt file not found"):
        load_prompts(tmp_path / "missing.txt")


def test_presets_path_prints_the_resolved_folder(agiqa_cli, monkeypatch):
    r = agiqa_cli("presets", "path")
    assert r.exit_code == 0 and r.output == f"{agiqa_home() / 'presets'}\n"
    monkeypatch.delenv("AGIQA_HOME")
    assert agiqa_cli("presets", "path").output.strip() == str(agiqa_home() / "presets")
    assert agiqa_home().is_absolute()


def test_presets_path_is_the_resolved_folder_and_the_docs_use_it(tmp_path, monkeypatch):
    from pathlib import Path



    monkeypatch.delenv("AGIQA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["presets", "path", "mllms"])
    assert r.exit_code == 0 and r.output.strip() == str(tmp_path / ".cache/agiqa/presets/mllms")
    r = CliRunner().invoke(cli, ["presets", "path", "nonsense"])
    assert r.exit_code == 1 and "unknown preset kind 'nonsense'" in r.output
    page = (Path(__file__).parents[1] / "docs" / "presets.md").read_text()
    commands = page.split("## Your own presets")[1].split("```bash")[1].split("```")[0]
    assert "$AGIQA_HOME" not in commands and "agiqa presets path" in commands
