"""Selecting and weighting scored samples: RAFT best-of-K, assemble rank fusion, reward weights (Lee et al.).

One module for every place that combines rewards: the fine-tuning job and any server-side combining (the
`assemble` application). Inputs are per-prompt groups: a reward's scores as an array (G, K), for G prompts with K
samples each, higher = better.

- Ranks make rewards of different scales comparable, so fusion works on ranks, never on raw scores.
- Ties are broken by sample index (the earlier sample wins), so the same scores always select the same samples.
- A NaN score means a sample was never scored. It raises: a round must fail loudly, never treat a missing score as
  a low one.

This avoids the bugs of the FineRewards notebook: every (prompt, sample) is ranked against its own group, and the
fused winner is the sample with the best fused score. The notebook added argsort index lists and kept the minimum,
which selected the worst image.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

STRATEGIES = ("raft", "assemble", "weighted")
FUSIONS = ("borda", "rrf")
WEIGHTINGS = ("softmax", "minmax", "standardize")


def _check(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"{name} must be (prompts, samples per prompt), got shape {scores.shape}")
    if np.isnan(scores).any():
        g, k = np.argwhere(np.isnan(scores))[0]
        raise ValueError(f"{name} has a missing (NaN) score at prompt {g}, sample {k}: score every sample first")
    return scores


def ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each sample within its prompt's group, (G, K) ints: 0 = best; ties go to the lower sample index."""
    scores = _check(scores)
    order = np.argsort(-scores, axis=1, kind="stable")  # (G, K): sample indices, best first
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(scores.shape[1])[None, :].repeat(len(scores), 0), axis=1)
    return out


def fuse(
    scores_by_reward: Mapping[str, np.ndarray],
    method: str = "borda",
    weights: Mapping[str, float] | None = None,
    rrf_k: float = 60.0,
) -> np.ndarray:
    """Fused score (G, K) of several rewards from their per-prompt ranks; higher = better.

    borda: sum over rewards of w * (K - 1 - rank).
    rrf (reciprocal-rank fusion): sum over rewards of w / (rrf_k + rank + 1).
    """
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; valid: {list(FUSIONS)}")
    if not scores_by_reward:
        raise ValueError("no rewards to fuse")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(scores_by_reward))
    if unknown:
        raise ValueError(f"weights for unknown reward(s) {unknown}; rewards: {sorted(scores_by_reward)}")
    shapes = {name: np.shape(s) for name, s in scores_by_reward.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"rewards must score the same (prompts, samples) grid, got {shapes}")
    fused = 0.0
    for name, scores in scores_by_reward.items():
        r = ranks(_check(scores, name)).astype(np.float64)
        k = r.shape[1]
        points = (k - 1 - r) if method == "borda" else 1.0 / (rrf_k + r + 1.0)
        fused = fused + weights.get(name, 1.0) * points
    return fused


def best_of_k(scores: np.ndarray, top_fraction: float = 1.0) -> list[tuple[int, int]]:
    """RAFT: the best sample of each prompt, as (prompt, sample) pairs in prompt order.

    With top_fraction < 1, only the winners of the best ceil(top_fraction * G) prompts (by the winner's score; ties
    go to the lower prompt index) are kept.
    """
    scores = _check(scores)
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    winners = np.argmax(scores, axis=1)  # first index among ties
    best = scores[np.arange(len(scores)), winners]  # (G,)
    keep = int(np.ceil(top_fraction * len(scores)))
    kept_prompts = sorted(np.argsort(-best, kind="stable")[:keep].tolist())
    return [(g, int(winners[g])) for g in kept_prompts]


def reward_weights(scores: np.ndarray, method: str = "softmax", temperature: float = 1.0) -> np.ndarray:
    """Per-sample loss weights (G, K) from rewards, for reward-weighted likelihood (Lee et al.); each group sums to K.

    softmax: exp(r / T) normalised within the prompt's group (shift-invariant, so the reward's offset does not
    matter). minmax: (r - min) / (max - min) within the group (a group of equal rewards gets equal weights).
    standardize: max(0, z-score) within the group (only better-than-average samples count).
    Normalising per group keeps every prompt's total weight equal to K, so easy prompts do not dominate the loss.
    """
    scores = _check(scores)
    if method not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {method!r}; valid: {list(WEIGHTINGS)}")
    k = scores.shape[1]
    if method == "softmax":
        z = (scores - scores.max(axis=1, keepdims=True)) / temperature
        w = np.exp(z)
    elif method == "minmax":
        span = scores.max(axis=1, keepdims=True) - scores.min(axis=1, keepdims=True)
        w = np.where(span > 0, (scores - scores.min(axis=1, keepdims=True)) / np.where(span > 0, span, 1), 1.0)
    else:
        std = scores.std(axis=1, keepdims=True)
        w = np.where(
            std > 0, np.maximum(0.0, (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1)), 1.0
        )
    total = w.sum(axis=1, keepdims=True)
    return np.where(total > 0, w * k / np.where(total > 0, total, 1), 1.0)


def select_samples(
    scores_by_reward: Mapping[str, np.ndarray],
    strategy: str,
    primary: str,
    *,
    weights: Mapping[str, float] | None = None,
    top_fraction: float = 1.0,
    fusion: str = "borda",
    rrf_k: float = 60.0,
    weighting: str = "softmax",
    temperature: float = 1.0,
) -> list[tuple[int, int, float]]:
    """A round's training samples as (prompt, sample, loss weight), from every reward's (G, K) scores.

    raft: each prompt's best sample by the `primary` reward (weight 1). assemble (assemble reward-ranked learning,
    FineRewards): each prompt's best by the fused per-prompt ranks of every reward, with `weights`. weighted (Lee et
    al.): every sample with a positive weight from the primary reward.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {list(STRATEGIES)}")
    if strategy == "raft":
        return [(g, j, 1.0) for g, j in best_of_k(scores_by_reward[primary], top_fraction)]
    if strategy == "assemble":
        fused = fuse(scores_by_reward, fusion, weights, rrf_k)
        return [(g, j, 1.0) for g, j in best_of_k(fused, top_fraction)]
    scores = scores_by_reward[primary]
    w = reward_weights(scores, weighting, temperature)  # (G, K), each row sums to K
    return [(g, j, float(w[g, j])) for g in range(len(scores)) for j in range(scores.shape[1]) if w[g, j] > 0]


# --- combining per-sample scores (the assemble application: samples of any prompts, NaN = not scored) ---------


def combine_weighted_sum(
    scores: dict[str, np.ndarray], weights: dict[str, float], calibration: dict[str, tuple[float, float]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted mean of calibrated scores over the components present (NaN = absent) for each sample.

    scores: name -> (N,) raw scores; calibration: name -> (center, scale). Returns the combined (N,) (NaN where no
    component is present) and name -> (N,) calibrated scores.
    """
    z = {name: (s - calibration[name][0]) / calibration[name][1] for name, s in scores.items()}
    total = sum(np.where(np.isnan(v), 0.0, weights[name] * v) for name, v in z.items())
    weight = sum(np.where(np.isnan(v), 0.0, weights[name]) for name, v in z.items())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan), z


def combine_rank_fusion(
    scores: dict[str, np.ndarray], weights: dict[str, float], groups: list[str], method: str, rrf_k: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rank fusion within each group (samples sharing a prompt), normalised to [0, 1].

    Each component ranks the group's samples it scored (NaN = absent, no points); a sample's fused score is its
    points over the most points the components present for it could give. Returns the combined (N,) and
    name -> (N,) points.
    """
    n = len(groups)
    combined = np.full(n, np.nan)
    points = {name: np.full(n, np.nan) for name in scores}
    for group in dict.fromkeys(groups):
        members = [i for i in range(n) if groups[i] == group]
        got, best = np.zeros(len(members)), np.zeros(len(members))
        for name, s in scores.items():
            present = [j for j, i in enumerate(members) if not np.isnan(s[i])]
            if not present:
                continue
            k = len(present)
            # fuse() over one reward gives its rank points: borda K-1-rank, rrf 1/(rrf_k+rank+1).
            p = fuse({name: s[[members[j] for j in present]][None, :]}, method, rrf_k=rrf_k)[0]  # (k,)
            top = (k - 1) if method == "borda" else 1.0 / (rrf_k + 1.0)
            for j, value in zip(present, p, strict=True):
                points[name][members[j]] = value
                got[j] += weights[name] * value
                best[j] += weights[name] * top
        for j, i in enumerate(members):
            if best[j] > 0:
                combined[i] = got[j] / best[j]
            elif any(not np.isnan(s[i]) for s in scores.values()):
                combined[i] = 1.0  # alone in its group (Borda gives no points to a single sample): ranked first
    return combined, points
