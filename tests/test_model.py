"""The model of MA-AGIQA: official parity, import, forward/backward of every backbone."""

import numpy as np
import pytest
import torch

from agiqa.models.agiqa_net import create_model, load_model
from agiqa.models.official import import_official
from agiqa.presets import list_presets
from agiqa.testing.official_reference import OfficialMAAGIQA


class NotTensors:
    """An arbitrary class: loading it would need pickle's code execution."""


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list_presets("backbones"))
def test_forward_backward_every_backbone(backbone):
    torch.manual_seed(0)
    model = create_model(backbone, num_prompts=3, semantic_dim=24).train()
    x = torch.randn(2, 3, 224, 224)
    s = torch.randn(2, 3, 24)
    scores, gates = model(x, s, return_gates=True)
    assert scores.shape == (2,) and gates.shape == (2, 4)
    scores.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(scores).all()


@pytest.mark.slow
def test_vit_runs_only_the_blocks_it_needs():
    model = create_model("vit_base_patch8_224", semantic_dim=8)
    assert len(model.backbone.vit.blocks) == 10  # blocks 10–11 pruned
    assert isinstance(model.backbone.vit.head, torch.nn.Identity)


@pytest.mark.slow
def test_reference_module_has_the_official_keys():
    from pathlib import Path

    tsv = Path(__file__).parent / "data" / "official_ma_agiqa_state_dict.tsv"
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    official = {k: s for k, s, _ in rows}
    ours = {k: "x".join(map(str, v.shape)) for k, v in OfficialMAAGIQA().state_dict().items()}
    assert ours == official


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    ref = OfficialMAAGIQA(embed_dim=64, vit_dim=64, vit_heads=1, dim_mlp=64,
                          semantic_dim=32).eval()
    with torch.no_grad():  # larger output weights, so scores spread and differences show
        ref.output_fc.weight.mul_(50)
    path = tmp_path_factory.mktemp("official") / "ma_agiqa.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.mark.slow
def test_official_checkpoint_imports_and_scores_the_same(official_ckpt, tmp_path):
    ref, path = official_ckpt
    import_official(path, tmp_path / "m")
    model = load_model(tmp_path / "m")
    torch.manual_seed(2)
    x = torch.randn(4, 3, 224, 224)
    s = torch.randn(4, 2, 32)
    with torch.no_grad():
        expected = ref(x, s[:, 0], s[:, 1])
        got = model(x, s)
    assert expected.std() > 1e-2
    assert (expected - got).abs().max() <= 1e-4
    n_official = sum(v.numel() for v in ref.state_dict().values())
    n_ours = sum(v.numel() for v in model.state_dict().values())
    assert n_ours < n_official  # unused modules dropped


def test_import_refuses_pickled_objects(tmp_path):
    from agiqa.errors import CheckpointError

    torch.save({"x": NotTensors()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        import_official(tmp_path / "evil.pt", tmp_path / "m")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an MA-AGIQA state dict"):
        import_official(tmp_path / "other.pt", tmp_path / "m")


def test_cli_import_official(official_ckpt, tmp_path):
    from click.testing import CliRunner

    from agiqa.cli import cli

    _, path = official_ckpt
    # The vectors' MLLM: an mPLUG-Owl2 folder of this checkpoint's width (config only).
    owl2 = tmp_path / "owl2"
    owl2.mkdir()
    (owl2 / "config.json").write_text('{"model_type": "mplug_owl2", "hidden_size": 32}')
    r = CliRunner().invoke(cli, ["import-official", str(path), "--out", str(tmp_path / "m"),
                                 "--mllm", str(owl2)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"imported {path} (")
    import agiqa

    assert isinstance(agiqa.load_model(tmp_path / "m"), torch.nn.Module)


def test_load_model_errors(tmp_path):
    from agiqa.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path)


def test_tab_block_keeps_the_official_reshape():
    from agiqa.models.maniqa import TABlock

    torch.manual_seed(0)
    tab = TABlock(16, drop=0.0).eval()
    x = torch.randn(1, 4, 16)
    q, k, v = tab.c_q(x), tab.c_k(x), tab.c_v(x)
    y = torch.softmax(q @ k.transpose(-2, -1) / 4, -1) @ v
    np.testing.assert_allclose(tab(x).detach(), (x + y.transpose(1, 2).reshape(1, 4, 16)).detach(),
                               atol=1e-6)
    assert not torch.allclose(tab(x), x + y)  # a transpose back would differ
