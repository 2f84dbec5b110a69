"""MANIQA's patch maps and each patch's share of the score, against the official module's
tensors (``tests/fixtures/ma_agiqa``, see tests/test_model.py; tolerance
``OfficialMaAgiqa.TOLERANCE``: 1e-5 · max(1, max|official|) per tensor)."""

import pytest
import torch

from agiqa.models.agiqa_net import load_model
from agiqa.models.official import import_official


@pytest.fixture(scope="module")
def model(official_ma_agiqa, tmp_path_factory):
    """The narrow official checkpoint imported into agiqa."""
    out = tmp_path_factory.mktemp("official") / "m"
    heads = official_ma_agiqa.model("narrow")["vit"]["num_heads"]
    import_official(official_ma_agiqa.checkpoint(), out, vit_heads=heads)
    return load_model(out)


@pytest.fixture(scope="module")
def outputs(official_ma_agiqa, model):
    """agiqa's maps and plain forward on the official inputs, and the official tensors: the
    patch heads, the gates, the score and the head's remainder written out from the official
    experts and weights."""
    official = official_ma_agiqa
    pixels, semantics = official.inputs()
    with torch.no_grad():
        maps = model.forward_maps(pixels, semantics)
        plain = model(pixels, semantics)
    sd = official.state_dict()
    v = sd["output_fc.weight"][0]
    gate = official.expected("narrow", "gating:output")
    e_a = official.expected("narrow", "fc4096_784_a2:output")
    e_b = official.expected("narrow", "fc4096_784_b2:output")
    remainder = (sd["output_fc.bias"] + gate[:, 0] * (e_a @ v) + gate[:, 1] * (e_b @ v)
                 + gate[:, 2] * (sd["fc784_784.bias"] @ v))
    return {"maps": maps, "plain": plain, "remainder": remainder,
            "f": official.expected("narrow", "fc_score:output").squeeze(-1),
            "w": official.expected("narrow", "fc_weight:output").squeeze(-1),
            "score": official.expected("narrow", "score").squeeze(-1)}


@pytest.mark.slow
def test_maps_match_the_official_forward(official_ma_agiqa, outputs):
    maps, f, w = outputs["maps"], outputs["f"], outputs["w"]
    check = official_ma_agiqa.check
    check(maps.score, "narrow", "score")
    check(maps.gates, "narrow", "gating:output")
    torch.testing.assert_close(maps.score, outputs["plain"], atol=1e-6, rtol=0)
    assert maps.patch_score.shape == maps.patch_weight.shape == (2, 28, 28)
    check(maps.patch_score.flatten(1).unsqueeze(-1), "narrow", "fc_score:output")
    check(maps.patch_weight.flatten(1).unsqueeze(-1), "narrow", "fc_weight:output")
    # MANIQA's definition of an image score from its two maps, on the official maps.
    want = (f * w).sum(1) / w.sum(1)
    tol = official_ma_agiqa.tolerance(want)
    torch.testing.assert_close(maps.maniqa_score, want, atol=tol, rtol=0)
    assert (maps.patch_weight > 0).all() and (maps.patch_weight < 1).all()
    assert (maps.patch_score >= 0).all() and (maps.patch_score > 0).any()


@pytest.mark.slow
def test_patch_contributions_add_up_to_the_score(official_ma_agiqa, outputs):
    maps, score = outputs["maps"], outputs["score"]
    tol = official_ma_agiqa.tolerance(score)
    torch.testing.assert_close(maps.contribution.sum((1, 2)) + maps.remainder, score,
                               atol=tol, rtol=0)
    torch.testing.assert_close(maps.remainder, outputs["remainder"],
                               atol=official_ma_agiqa.tolerance(outputs["remainder"]), rtol=0)
    # The patches carry a share of the score well beyond the tolerance, unevenly.
    assert maps.contribution.sum((1, 2)).abs().min() > 1000 * tol
    assert maps.contribution.flatten(1).std(1).min() > 0


@pytest.mark.slow
def test_maps_detect_a_perturbed_patch_head(official_ma_agiqa, model):
    """The check can fail: the patch-weight head's last bias 1 % off moves the weight map
    beyond the tolerance."""
    pixels, semantics = official_ma_agiqa.inputs()
    bias = model.backbone.fc_weight[3].bias
    original = bias.detach().clone()
    with torch.no_grad():
        bias.mul_(1.01)
        maps = model.forward_maps(pixels, semantics)
        bias.copy_(original)
    with pytest.raises(AssertionError, match="fc_weight:output"):
        official_ma_agiqa.check(maps.patch_weight.flatten(1).unsqueeze(-1), "narrow",
                                "fc_weight:output")


def test_forward_maps_checks_inputs(official_ma_agiqa, model):
    with pytest.raises(ValueError, match="pixels must have shape"):
        model.forward_maps(torch.zeros(1, 224, 224), torch.zeros(1, 2, 4096))
