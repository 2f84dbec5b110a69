"""The model of MA-AGIQA: parity with the official module, import, forward/backward of every
backbone.

Parity is checked against ``tests/fixtures/ma_agiqa``: its ``generate.py`` ran the official
``models/MA_AGIQA.py`` (wangpuyi/MA-AGIQA at 11c0cda, with its vendored timm 0.5.5) in the
official environment and saved the score, the gates and the MANIQA tensors. agiqa loads the
same state dict through its importer and must give every one of them within
``OfficialMaAgiqa.TOLERANCE`` (tests/conftest.py): ``|agiqa − official| ≤ 1e-5 ·
max(1, max|official|)`` per tensor, float32 on a CPU.
"""

import copy

import numpy as np
import pytest
import torch

from agiqa.models.agiqa_net import AgiqaNet, ModelConfig, create_model, load_model
from agiqa.models.official import import_official, official_to_agiqa
from agiqa.presets import list_presets


class NotTensors:
    """An arbitrary class: loading it would need pickle's code execution."""


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list_presets("backbones"))
def test_forward_backward_every_backbone(backbone):
    torch.manual_seed(0)
    model = create_model(backbone, num_prompts=3, semantic_dim=24).train()
    n = 2 if backbone == "tiny" else 1  # a ViT-B/8 backward pass per image costs ~10 s on a CPU
    x = torch.randn(n, 3, 224, 224)
    s = torch.randn(n, 3, 24)
    scores, gates = model(x, s, return_gates=True)
    assert scores.shape == (n,) and gates.shape == (n, 4)
    scores.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(scores).all()


@pytest.mark.slow
def test_vit_runs_only_the_blocks_it_needs():
    model = create_model("vit_base_patch8_224", semantic_dim=8)
    assert len(model.backbone.vit.blocks) == 10  # blocks 10–11 pruned
    assert isinstance(model.backbone.vit.head, torch.nn.Identity)


@pytest.fixture(scope="module")
def imported(official_ma_agiqa, tmp_path_factory):
    """The narrow official checkpoint through ``import_official`` and ``load_model``."""
    out = tmp_path_factory.mktemp("imported") / "m"
    heads = official_ma_agiqa.model("narrow")["vit"]["num_heads"]
    import_official(official_ma_agiqa.checkpoint(), out, vit_heads=heads)
    return load_model(out)


def test_normalize_is_the_official_transform(official_ma_agiqa):
    """The fixture's uint8 images through agiqa's ``normalize`` are, byte for byte, what the
    official data transforms gave (``inputs`` checks the digest)."""
    pixels, semantics = official_ma_agiqa.inputs()
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, 224, 224)
    assert semantics.dtype == torch.float16 and semantics.shape == (2, 2, 4096)


@pytest.mark.slow
def test_official_checkpoint_imports_and_scores_the_same(official_ma_agiqa, imported):
    pixels, semantics = official_ma_agiqa.inputs()
    seen = official_ma_agiqa.record(imported, pixels, semantics)
    names = [*official_ma_agiqa.meta["hooks"], "score"]
    diffs = {name: official_ma_agiqa.check(seen[name], "narrow", name) for name in names}
    official_ma_agiqa.check(seen["gates"], "narrow", "gating:output")
    print({name: f"{d:.2g}" for name, d in diffs.items()})
    want = official_ma_agiqa.expected("narrow", "score").flatten()
    assert (want[0] - want[1]).abs() > 1000 * official_ma_agiqa.TOLERANCE  # images apart
    assert diffs["score"] <= official_ma_agiqa.TOLERANCE


@pytest.mark.slow
def test_import_drops_exactly_what_the_official_forward_never_uses(official_ma_agiqa, imported):
    """The official keys the importer drops are the parameters no gradient of the official
    score reaches (recorded by the generator); every other tensor loads unchanged."""
    official = official_ma_agiqa.state_dict()
    dropped = {k for k in official if not official_to_agiqa({k: official[k]})}
    assert dropped == set(official_ma_agiqa.model("narrow")["unused_parameters"])
    kept = official_to_agiqa(official)
    ours = imported.state_dict()
    assert set(ours) == set(kept)
    assert all(torch.equal(ours[k], kept[k]) for k in kept)


def test_swin_buffers_are_the_officials(official_ma_agiqa):
    """agiqa computes Swin's relative position indices and shift masks itself: a new model's
    equal the official constructors'."""
    narrow = official_ma_agiqa.model("narrow")
    cfg = ModelConfig(backbone="custom", vit_args=narrow["vit"],
                      maniqa_dim=narrow["ma_agiqa_kwargs"]["embed_dim"],
                      dim_mlp=narrow["ma_agiqa_kwargs"]["dim_mlp"])
    fresh = AgiqaNet(cfg).state_dict()
    buffers = official_to_agiqa({k: official_ma_agiqa.expected("narrow", f"buffers/{k}")
                                 for k in official_ma_agiqa.model("narrow")["buffers"]})
    assert len(buffers) == 12
    for key, want in buffers.items():
        assert fresh[key].dtype == want.dtype and torch.equal(fresh[key], want), key


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "backbone.vit.blocks.9.mlp.fc2.weight",
    "backbone.tablock1.0.c_v.weight",
    "backbone.swintransformer2.layers.1.blocks.1.attn.relative_position_bias_table",
    "head.image_expert.weight",
])
def test_parity_detects_a_perturbed_weight(official_ma_agiqa, imported, name):
    """The check can fail: one weight 1 % off moves the score beyond the tolerance."""
    model = copy.deepcopy(imported)
    with torch.no_grad():
        model.get_parameter(name).mul_(1.01)
    pixels, semantics = official_ma_agiqa.inputs()
    seen = official_ma_agiqa.record(model, pixels, semantics)
    with pytest.raises(AssertionError, match="narrow score"):
        official_ma_agiqa.check(seen["score"], "narrow", "score")


@pytest.mark.slow
def test_parity_detects_a_transposed_tab_block(official_ma_agiqa, imported, monkeypatch):
    """The official TABlock reshapes its output back; the natural transpose fails parity."""
    from agiqa.models.maniqa import TABlock

    def transposed(self, x):
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        return x + torch.softmax(q @ k.transpose(-2, -1) * self.norm_fact, dim=-1) @ v

    monkeypatch.setattr(TABlock, "forward", transposed)
    pixels, semantics = official_ma_agiqa.inputs()
    seen = official_ma_agiqa.record(imported, pixels, semantics)
    with pytest.raises(AssertionError, match="tablock1.1:output"):
        official_ma_agiqa.check(seen["tablock1.1:output"], "narrow", "tablock1.1:output")


@pytest.mark.slow
def test_paper_shape_matches_the_official_module(official_ma_agiqa):
    """``main.py``'s module (ViT-B/8, MANIQA width 768) against agiqa's default configuration:
    the same keys and shapes (strict load), then the same tensors on one image."""
    official = official_ma_agiqa.state_dict("paper")
    model = AgiqaNet(ModelConfig()).eval()
    model.load_state_dict(official_to_agiqa(official), strict=True)
    del official
    pixels, semantics = official_ma_agiqa.inputs("paper")
    seen = official_ma_agiqa.record(model, pixels, semantics)
    names = [*official_ma_agiqa.meta["hooks"], "score"]
    diffs = {name: official_ma_agiqa.check(seen[name], "paper", name) for name in names}
    official_ma_agiqa.check(seen["gates"], "paper", "gating:output")
    print({name: f"{d:.2g}" for name, d in diffs.items()})


def test_import_refuses_pickled_objects(tmp_path):
    from agiqa.errors import CheckpointError

    torch.save({"x": NotTensors()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        import_official(tmp_path / "evil.pt", tmp_path / "m")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an MA-AGIQA state dict"):
        import_official(tmp_path / "other.pt", tmp_path / "m")


@pytest.mark.slow
def test_cli_import_official(official_ma_agiqa, tmp_path):
    from click.testing import CliRunner

    from agiqa.cli import cli

    path = official_ma_agiqa.checkpoint()
    # The vectors' MLLM: an mPLUG-Owl2 folder of this checkpoint's width (config only).
    owl2 = tmp_path / "owl2"
    owl2.mkdir()
    (owl2 / "config.json").write_text('{"model_type": "mplug_owl2", "hidden_size": 4096}')
    r = CliRunner().invoke(cli, ["import-official", str(path), "--out", str(tmp_path / "m"),
                                 "--mllm", str(owl2), "--vit-heads", "3"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"imported {path} (")
    import agiqa

    model = agiqa.load_model(tmp_path / "m")
    assert model.config.vit_args["num_heads"] == 3 and model.config.semantic_dim == 4096


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
