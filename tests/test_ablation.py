"""The ablation variants of the head (--experts, --fusion), against hand computations."""

from __future__ import annotations

import pytest
import torch

from agiqa.errors import ConfigError
from agiqa.models.agiqa_net import ModelConfig, create_model, load_model, save_model
from agiqa.stages.configs import FitConfig, model_experts


def _model(**kw):
    torch.manual_seed(0)
    return create_model("tiny", num_prompts=2, semantic_dim=8, pretrained=False, **kw).eval()


def _inputs(seed=1, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 224, 224, generator=g), torch.randn(b, 2, 8, generator=g)


def test_defaults_build_the_papers_head_with_the_official_keys_and_draws(official_ma_agiqa):
    official = {name for name, _, _ in official_ma_agiqa.model("paper")["state_dict"]}
    paper = _model()
    head = {f"head.{k}" for k in paper.head.state_dict()}
    assert head == {"head.semantic_experts.0.0.weight", "head.semantic_experts.0.0.bias",
                    "head.semantic_experts.1.0.weight", "head.semantic_experts.1.0.bias",
                    "head.image_expert.weight", "head.image_expert.bias",
                    "head.gating.weight", "head.gating.bias", "head.output.weight",
                    "head.output.bias"}
    # the official modules these keys are imported from (agiqa.models.official)
    assert {"fc784_784.weight", "fc4096_784_a2.0.weight", "fc4096_784_b2.0.weight",
            "gating.weight", "output_fc.weight"} <= official
    # Naming every expert explicitly is the default model, weight for weight.
    every = _model(**model_experts("image,semantic_content,coherence", "moe",
                                   ["semantic_content", "coherence"]))
    assert every.config == paper.config
    for (k, a), (_, b) in zip(paper.state_dict().items(), every.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k


def test_image_only_ignores_the_semantic_vectors():
    m = _model(semantic_experts=[], image_expert=True)
    x, s = _inputs()
    y1, g1 = m(x, s, return_gates=True)
    y2, g2 = m(x, s * 100 + 7, return_gates=True)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert torch.equal(g1[:, :2], torch.zeros(3, 2))  # the prompts' gates: unused, zero
    assert not torch.equal(m(x.flip(-1), s), y1)  # the image still matters
    assert len(m.head.semantic_experts) == 0


def test_one_prompt_reads_only_its_own_vectors():
    m = _model(semantic_experts=[1], image_expert=True)
    x, s = _inputs()
    y = m(x, s)
    other = s.clone()
    other[:, 0] = 42.0  # the unused prompt
    assert torch.equal(m(x, other), y)
    own = s.clone()
    own[:, 1] += 1.0
    assert not torch.allclose(m(x, own), y)


def test_mean_fusion_is_the_mean_of_the_experts_scores():
    m = _model(fusion="mean")
    x, s = _inputs()
    y, gates = m(x, s, return_gates=True)
    h = m.head
    with torch.no_grad():
        key = m.backbone(x)
        experts = [h.semantic_experts[0](s[:, 0]), h.semantic_experts[1](s[:, 1]),
                   h.image_expert(key)]
        scores = torch.stack([h.output(e).squeeze(-1) for e in experts], 1)
    torch.testing.assert_close(y, scores.mean(1))
    assert torch.equal(gates, torch.full((3, 3), 1 / 3))
    assert h.gating is None


def test_concat_fusion_is_the_output_layer_on_the_concatenation():
    m = _model(fusion="concat", semantic_experts=[0])
    x, s = _inputs()
    h = m.head
    with torch.no_grad():
        key = m.backbone(x)
        cat = torch.cat([h.semantic_experts[0](s[:, 0]), h.image_expert(key)], 1)
        expected = cat @ h.output.weight[0] + h.output.bias
    torch.testing.assert_close(m(x, s), expected)
    assert h.output.in_features == 2 * h.image_expert.in_features


@pytest.mark.parametrize("kw", [dict(fusion="mean"), dict(fusion="concat"),
                                dict(semantic_experts=[0], image_expert=False)])
def test_patch_shares_add_up_for_every_variant(kw):
    m = _model(**kw)
    x, s = _inputs()
    maps = m.forward_maps(x, s)
    torch.testing.assert_close(maps.contribution.sum((1, 2)) + maps.remainder, maps.score)


def test_a_variant_saves_and_loads_like_any_model(tmp_path):
    m = _model(semantic_experts=[1], image_expert=False, fusion="concat")
    save_model(m, tmp_path, {"prompt_names": ["semantic_content", "coherence"]})
    back = load_model(tmp_path)
    assert back.config == m.config
    assert back.config.semantic_experts == [1] and back.config.fusion == "concat"
    x, s = _inputs()
    torch.testing.assert_close(back(x, s), m(x, s))


def test_experts_names_resolve_against_the_caches_prompts():
    names = ["semantic_content", "coherence"]
    assert model_experts(None, "moe", names) == {"semantic_experts": None, "image_expert": True,
                                                "fusion": "moe"}
    assert model_experts("image", "mean", names)["semantic_experts"] == []
    assert model_experts("coherence", "moe", names) == {"semantic_experts": [1],
                                                       "image_expert": False, "fusion": "moe"}
    with pytest.raises(ConfigError, match="'coherance' is not an expert.*did you mean coherence"):
        model_experts("image,coherance", "moe", names)
    with pytest.raises(ConfigError, match="distinct names"):
        FitConfig(dataset="csv", root=".", cache=".", out=".", experts="image,image")
    with pytest.raises(ConfigError, match="fusion= must be one of moe, concat, mean"):
        FitConfig(dataset="csv", root=".", cache=".", out=".", fusion="sum")
    assert ModelConfig().fusion == "moe" and ModelConfig().image_expert
