"""Fusing the score branches: exact small cases computed by hand."""

import math

import numpy as np
import pytest
import torch

from linewatch.detector.fusion import branch_normalisation, branch_z_scores, fuse_maps, fuse_scores


def softplus(z):
    return math.log1p(math.exp(z))


def test_normalisation_is_mean_and_sample_std_per_branch():
    norm = branch_normalisation({"objects": np.array([1.0, 2.0, 3.0]), "patch": np.array([10.0, 10.0, 13.0])})
    assert norm["objects"] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert norm["patch"]["mean"] == 11.0 and norm["patch"]["std"] == pytest.approx(math.sqrt(3.0))


def test_a_branch_that_never_varies_gets_a_floor_not_a_division_by_zero():
    norm = branch_normalisation({"objects": np.array([4.0, 4.0, 4.0])})
    assert norm["objects"]["std"] == pytest.approx(4e-3)


@pytest.mark.parametrize("bad", [[1.0], [1.0, float("nan")], [[1.0, 2.0]]])
def test_normalisation_refuses_what_it_cannot_use(bad):
    with pytest.raises(ValueError, match="objects"):
        branch_normalisation({"objects": np.array(bad)})


def test_fused_score_is_the_sum_of_softplus_z():
    norm = {"objects": {"mean": 2.0, "std": 1.0}, "patch": {"mean": 10.0, "std": 2.0}}
    components = {"objects": np.array([2.0, 6.0]), "patch": np.array([10.0, 4.0])}
    # image 0: z = (0, 0) -> 2 log 2; image 1: z = (4, -3)
    want = [2 * math.log(2.0), softplus(4.0) + softplus(-3.0)]
    assert fuse_scores(components, norm, "fused") == pytest.approx(want)
    assert branch_z_scores({"objects": 6.0, "patch": 4.0}, norm) == {"objects": 4.0, "patch": -3.0}
    # one branch far above its good mean: the score is about its z, the other adds almost nothing
    assert fuse_scores({"objects": np.array([22.0]), "patch": np.array([0.0])}, norm, "fused")[0] == pytest.approx(20.0, abs=0.01)


def test_fused_map_has_the_score_rule_per_pixel_and_other_sources_pass_through():
    norm = {"objects": {"mean": 2.0, "std": 1.0}, "patch": {"mean": 10.0, "std": 2.0}}
    maps = {"objects": torch.tensor([[2.0, 6.0]]), "patch": torch.tensor([[10.0, 4.0]])}
    fused = fuse_maps(maps, norm, "fused")
    assert fused.tolist()[0] == pytest.approx([2 * math.log(2.0), softplus(4.0) + softplus(-3.0)], rel=1e-6)
    assert fuse_maps(maps, norm, "patch") is maps["patch"]
    assert fuse_maps(maps, None, "fused") is maps["objects"]  # a bank being built: no spread known yet
    assert fuse_scores({"objects": np.array([1.5])}, norm, "objects").tolist() == [1.5]
    assert branch_z_scores({"objects": 1.0}, None) == {}
