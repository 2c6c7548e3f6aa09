"""The assemble application: one call, several served rewards, combined without adding raw scales."""

import math

import numpy as np
import pytest

from protos.reward.v1 import reward_pb2
from services.assemble import AssembleAppArgs, RunningStats
from services.client import RewardClient
from services.codec import encode_image
from services.selection import combine_rank_fusion, combine_weighted_sum
from tests.conftest import ASSEMBLE_MIXED, LIMITED, random_images


def client(fleet, app):
    return RewardClient(fleet.grpc_target, app, max_samples_per_request=8)


# --- Combining, by hand ------------------------------------------------------------------------------------------


def test_weighted_sum_is_the_weighted_mean_of_calibrated_scores_over_present_components():
    scores = {"a": np.array([1.0, 3.0, np.nan]), "b": np.array([10.0, np.nan, np.nan])}
    combined, z = combine_weighted_sum(scores, {"a": 1.0, "b": 3.0}, {"a": (1.0, 2.0), "b": (0.0, 10.0)})
    # sample 0: z_a = 0, z_b = 1 -> (1 * 0 + 3 * 1) / 4; sample 1: only a, z_a = 1; sample 2: nothing.
    np.testing.assert_allclose(combined[:2], [0.75, 1.0])
    assert math.isnan(combined[2])
    np.testing.assert_allclose(z["b"][:1], [1.0])


def test_rank_fusion_within_prompt_groups_matches_brute_force():
    groups = ["p", "p", "p", "q", "q", "r"]
    a = np.array([3.0, 1.0, 2.0, 5.0, 5.0, 0.0])
    b = np.array([0.0, 2.0, 1.0, np.nan, 1.0, 7.0])
    combined, points = combine_rank_fusion({"a": a, "b": b}, {"a": 2.0, "b": 1.0}, groups, "borda", 60.0)
    # Group p (3 samples): a ranks 0,2,1 -> points 2,0,1; b ranks 2,0,1 -> points 0,2,1. Max = 2*2 + 1*2 = 6.
    np.testing.assert_allclose(combined[:3], [(2 * 2 + 0) / 6, (0 + 2) / 6, (2 * 1 + 1) / 6])
    # Group q: a ties (the earlier sample ranks first): points 1, 0; b scored only sample 4 (alone: 0 of 0).
    np.testing.assert_allclose(combined[3:5], [(2 * 1) / (2 * 1), (2 * 0 + 1 * 0) / (2 * 1 + 1 * 0)])
    assert combined[5] == 1.0  # alone in its group
    np.testing.assert_allclose(points["a"][:3], [2, 0, 1])


def test_running_stats_and_args_validation():
    stats = RunningStats()
    stats.update([1.0, 2.0, 3.0, 4.0])
    assert stats.mean == 2.5 and stats.std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    with pytest.raises(ValueError, match="both center and scale"):
        AssembleAppArgs.model_validate({"components": [{"application": "a", "center": 1.0}]})
    with pytest.raises(ValueError, match="distinct"):
        AssembleAppArgs.model_validate({"components": [{"application": "a"}, {"application": "a"}]})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        AssembleAppArgs.model_validate({"components": [{"application": "a"}], "sum": "raw"})


# --- Served ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_assemble_equals_the_hand_combined_served_components(fleet, rng):
    images = random_images(rng, 3, size=48)
    prompts = ["a", "b", "c"]
    with client(fleet, "assemble_mixed") as c:
        combined = c.score(images, prompts)
    raw = {}
    for app in ("jpeg_compressibility", "jpeg_limited"):
        with client(fleet, app) as c:
            raw[app] = [r.reward for r in c.score(images, prompts)]
    spec = {comp["application"]: comp for comp in ASSEMBLE_MIXED["components"]}
    for i, result in enumerate(combined):
        assert result.ok, result.error_message
        z = {app: (raw[app][i] - spec[app]["center"]) / spec[app]["scale"] for app in raw}
        expected = sum(spec[app]["weight"] * z[app] for app in raw) / sum(spec[app]["weight"] for app in raw)
        assert result.reward == pytest.approx(expected, rel=1e-5)
        assert result.components["jpeg_compressibility"] == pytest.approx(raw["jpeg_compressibility"][i])
        assert result.components["jpeg_limited:z"] == pytest.approx(z["jpeg_limited"], rel=1e-5)
        assert "caption" not in result.components  # the optional component timed out ...


@pytest.mark.integration
def test_an_optional_timeout_is_reported_and_a_required_failure_fails_the_sample(fleet, rng):
    small = random_images(rng, 1, size=32)[0]
    side = int(math.sqrt(LIMITED["max_image_pixels"])) + 16  # over jpeg_limited's pixel limit, few bytes as PNG
    big = np.full((side, side, 3), 200, np.uint8)
    request = reward_pb2.ScoreRequest(
        samples=[
            reward_pb2.Sample(id="small", prompt="p", encoded=encode_image(small, "PNG")),
            reward_pb2.Sample(id="big", prompt="p", encoded=encode_image(big, "PNG")),
        ]
    )
    with client(fleet, "assemble_mixed") as c:
        stub = c._sync()[0]
        response = stub["Score"](request.SerializeToString(), timeout=60, metadata=c.metadata)
    small_result, big_result = response.results
    # Provenance: its own, and each component's that answered (caption timed out).
    assert response.provenance.reward_name == "assemble" and len(response.provenance.fingerprint) == 64
    assert set(response.component_provenance) == {"jpeg_compressibility", "jpeg_limited"}
    # ... and is reported on every sample, which is still scored.
    assert np.isfinite(small_result.reward)
    [caption] = [e for e in small_result.component_errors if e.component == "caption"]
    assert (
        not caption.required and caption.code == reward_pb2.COMPONENT_FAILED and "no answer within" in caption.message
    )
    # jpeg_limited is required and rejects the big image: that sample fails, saying which component and why.
    assert math.isnan(big_result.reward) and big_result.error.code == reward_pb2.COMPONENT_FAILED
    assert "required component failed" in big_result.error.message
    assert "jpeg_limited: IMAGE_TOO_LARGE" in big_result.error.message
    assert {(e.component, e.required) for e in big_result.component_errors} == {
        ("jpeg_limited", True),
        ("caption", False),
    }


@pytest.mark.integration
def test_a_required_timeout_fails_every_sample_with_the_reason(fleet, rng):
    with client(fleet, "assemble_required_timeout") as c:
        results = c.score(random_images(rng, 2, size=32), "p")
    for r in results:
        assert not r.ok and r.error_code == "COMPONENT_FAILED"
        assert "caption: COMPONENT_FAILED: no answer within 0.001s" in r.error_message


@pytest.mark.integration
def test_served_rank_fusion_and_the_local_profile_assemble(fleet, rng):
    images = random_images(rng, 4, size=40)
    prompts = ["same", "same", "same", "other"]
    with client(fleet, "assemble_ranks") as c:
        fused = c.score(images, prompts)
    with client(fleet, "jpeg_compressibility") as c:
        jpeg = np.array([r.reward for r in c.score(images, prompts)])
    # Both components rank by JPEG size, so the fused order within the group is jpeg's order, and best = 1.
    group = [r.reward for r in fused[:3]]
    assert np.argsort(group).tolist() == np.argsort(jpeg[:3]).tolist() and max(group) == 1.0
    assert fused[3].reward == 1.0
    with client(fleet, "assemble") as c:  # the local profile's: caption, alignment, semantic (optional)
        info = c.describe()
        results = c.score(images[:2], "two green balls in the city")
    assert "caption" in info.description and "semantic" in info.description
    for r in results:
        assert r.ok and {"caption", "alignment", "caption:z", "alignment:z"} <= set(r.components)
