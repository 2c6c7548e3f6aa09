"""Selection strategies against brute force: ties, several rewards of different scales, weights."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from services.selection import best_of_k, fuse, ranks, reward_weights, select_samples

# Small integer scores: ties are frequent.
grids = st.tuples(st.integers(1, 5), st.integers(1, 6)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=st.integers(-3, 3).map(float))
)


def assemble_select(rewards, method="borda", weights=None):
    """The assemble strategy's picks as (prompt, sample) pairs."""
    picks = select_samples(rewards, "assemble", next(iter(rewards)), weights=weights, fusion=method)
    assert all(w == 1.0 for _, _, w in picks)
    return [(g, j) for g, j, _ in picks]


def brute_rank(group, i):
    """Samples strictly better, plus equal ones with a lower index."""
    return sum(1 for j, s in enumerate(group) if s > group[i] or (s == group[i] and j < i))


def brute_best(group):
    return max(range(len(group)), key=lambda i: (group[i], -i))


@settings(max_examples=200, deadline=None)
@given(grids)
def test_ranks_and_best_of_k_match_brute_force(scores):
    r = ranks(scores)
    for g, group in enumerate(scores):
        assert [brute_rank(group, i) for i in range(len(group))] == r[g].tolist()
    assert best_of_k(scores) == [(g, brute_best(group)) for g, group in enumerate(scores)]


@settings(max_examples=200, deadline=None)
@given(grids, st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_top_fraction_keeps_the_best_winners(scores, fraction):
    winners = [(g, brute_best(group)) for g, group in enumerate(scores)]
    keep = int(np.ceil(fraction * len(scores)))
    kept = sorted(sorted(winners, key=lambda w: (-scores[w], w[0]))[:keep])
    assert best_of_k(scores, fraction) == kept


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_assemble_matches_brute_force_across_reward_scales(data):
    shape = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6)))
    ints = arrays(np.float64, shape, elements=st.integers(0, 3).map(float))
    # Three rewards on very different scales: a probability, a caption similarity, a JPEG size in kB.
    rewards = {
        "alignment": data.draw(ints) / 3,
        "caption": data.draw(ints) * 0.1 - 0.5,
        "jpeg": -data.draw(ints) * 1e3,
    }
    weights = {"alignment": 2.0, "caption": 1.0, "jpeg": 0.5}
    method = data.draw(st.sampled_from(["borda", "rrf"]))
    k = shape[1]
    expected = []
    for g in range(shape[0]):
        points = []
        for i in range(k):
            total = 0.0
            for name, scores in rewards.items():
                rank = brute_rank(scores[g], i)
                total += weights[name] * ((k - 1 - rank) if method == "borda" else 1 / (60 + rank + 1))
            points.append(total)
        expected.append((g, brute_best(points)))
    assert assemble_select(rewards, method, weights) == expected


def test_fusion_ignores_each_rewards_scale_and_offset():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 10)), rng.normal(size=(5, 10))
    for method in ("borda", "rrf"):
        base = assemble_select({"a": a, "b": b}, method)
        assert assemble_select({"a": a * 1e4 - 7, "b": b / 100 + 3}, method) == base


def test_the_fused_winner_is_the_best_sample_not_the_worst():
    # The FineRewards notebook summed argsort index lists and kept the minimum: the worst image.
    a = np.array([[0.1, 0.9, 0.5]])
    b = np.array([[1.0, 30.0, 20.0]])
    assert assemble_select({"a": a, "b": b}) == [(0, 1)]
    notebook = int(np.argmin(np.argsort(a[0]) + np.argsort(b[0])))
    assert notebook != 1


def test_missing_scores_and_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="missing \\(NaN\\) score at prompt 0, sample 1"):
        best_of_k(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="same \\(prompts, samples\\) grid"):
        fuse({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="unknown fusion 'mean'; valid: \\['borda', 'rrf'\\]"):
        fuse({"a": np.zeros((2, 3))}, "mean")
    with pytest.raises(ValueError, match="unknown reward"):
        fuse({"a": np.zeros((2, 3))}, weights={"b": 1.0})


@pytest.mark.parametrize("method", ["softmax", "minmax", "standardize"])
def test_reward_weights_sum_to_k_per_prompt(method):
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [-100.0, 0.0, 0.0, 100.0]])
    w = reward_weights(scores, method)
    np.testing.assert_allclose(w.sum(axis=1), 4.0)
    np.testing.assert_allclose(w[1], 1.0)  # equal rewards, equal weights
    assert all(np.all(np.diff(w[g]) >= -1e-12) for g in (0, 2))  # weights follow the reward order


def test_reward_weights_by_hand():
    w = reward_weights(np.array([[0.0, np.log(3.0)]]), "softmax")
    np.testing.assert_allclose(w, [[0.5, 1.5]])  # exp: 1 and 3, normalised to sum 2
    np.testing.assert_allclose(reward_weights(np.array([[1.0, 2.0, 3.0]]), "minmax"), [[0.0, 1.0, 2.0]])
    shifted = reward_weights(np.array([[10.0, 10.0 + np.log(3.0)]]), "softmax")
    np.testing.assert_allclose(shifted, w)  # offset does not matter


def test_itertools_brute_force_sanity():
    # A tie-heavy exhaustive check of ranks over every 3-sample group of values {0, 1}.
    for group in itertools.product([0.0, 1.0], repeat=3):
        r = ranks(np.array([group]))[0].tolist()
        assert sorted(r) == [0, 1, 2] and r == [brute_rank(group, i) for i in range(3)]
