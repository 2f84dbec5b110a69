"""MANIQA's patch maps and each patch's share of the score, against the official computation."""

import pytest
import torch

from agiqa.models.agiqa_net import load_model
from agiqa.models.official import import_official
from agiqa.testing.official_reference import OfficialMAAGIQA


@pytest.fixture(scope="module")
def official_pair(tmp_path_factory):
    """A narrow official-layout module and the same weights imported into agiqa."""
    torch.manual_seed(3)
    ref = OfficialMAAGIQA(embed_dim=64, vit_dim=64, vit_heads=1, dim_mlp=64,
                          semantic_dim=32).eval()
    with torch.no_grad():  # larger output weights, so scores spread and differences show
        ref.output_fc.weight.mul_(50)
    folder = tmp_path_factory.mktemp("official")
    torch.save(ref.state_dict(), folder / "ma_agiqa.pt")
    import_official(folder / "ma_agiqa.pt", folder / "m")
    return ref, load_model(folder / "m")


def _official_patches(ref, x, s):
    """The official forward's score and its fc_score / fc_weight outputs (hooks on the
    reference module, which has no other way to give them)."""
    seen = {}
    hooks = [getattr(ref, name).register_forward_hook(
        lambda _m, _i, out, name=name: seen.__setitem__(name, out.squeeze(-1)))
        for name in ("fc_score", "fc_weight")]
    try:
        score = ref(x, s[:, 0], s[:, 1])
    finally:
        for h in hooks:
            h.remove()
    return score, seen["fc_score"], seen["fc_weight"]


@pytest.fixture(scope="module")
def outputs(official_pair):
    """One official forward (with its patch heads' outputs) and agiqa's on the same inputs."""
    ref, model = official_pair
    torch.manual_seed(4)
    x, s = torch.randn(2, 3, 224, 224), torch.randn(2, 2, 32)
    with torch.no_grad():
        score, f, w = _official_patches(ref, x, s)
        maps = model.forward_maps(x, s)
        plain = model(x, s)
        # The official head's remainder and gates, written out from its own modules.
        e_a, e_b = ref.fc4096_784_a2(s[:, 0]), ref.fc4096_784_b2(s[:, 1])
        gate = ref.gating(torch.cat([e_a, e_b, ref.fc784_784(f * w)], dim=1))
        v = ref.output_fc.weight[0]
        remainder = (ref.output_fc.bias + gate[:, 0] * (e_a @ v) + gate[:, 1] * (e_b @ v)
                     + gate[:, 2] * (ref.fc784_784.bias @ v))
    return {"score": score, "f": f, "w": w, "gate": gate, "remainder": remainder,
            "maps": maps, "plain": plain}


def test_maps_match_the_official_forward(outputs):
    maps, f, w, score = outputs["maps"], outputs["f"], outputs["w"], outputs["score"]
    assert score.std() > 1e-2
    torch.testing.assert_close(maps.score, score, atol=1e-4, rtol=0)
    torch.testing.assert_close(maps.score, outputs["plain"], atol=1e-6, rtol=0)
    assert maps.patch_score.shape == maps.patch_weight.shape == (2, 28, 28)
    torch.testing.assert_close(maps.patch_score.flatten(1), f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.patch_weight.flatten(1), w, atol=1e-5, rtol=1e-4)
    # MANIQA's definition of an image score from its two maps.
    torch.testing.assert_close(maps.maniqa_score, (f * w).sum(1) / w.sum(1), atol=1e-5, rtol=1e-4)
    assert (maps.patch_weight > 0).all() and (maps.patch_weight < 1).all()
    assert (maps.patch_score >= 0).all()


def test_patch_contributions_add_up_to_the_score(outputs):
    maps = outputs["maps"]
    torch.testing.assert_close(maps.gates, outputs["gate"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.contribution.sum((1, 2)) + maps.remainder, outputs["score"],
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(maps.remainder, outputs["remainder"], atol=1e-4, rtol=1e-4)
    # The map is not flat: patches carry different shares.
    assert maps.contribution.flatten(1).std(1).min() > 0


def test_forward_maps_checks_inputs(official_pair):
    _, model = official_pair
    with pytest.raises(ValueError, match="pixels must have shape"):
        model.forward_maps(torch.zeros(1, 224, 224), torch.zeros(1, 2, 32))
