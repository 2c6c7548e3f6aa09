"""LLM likelihood scorer of the semantic segment reward: how likely is an object label to appear in a prompt's scene.

For each (prompt, labels) request, `LikelihoodScorer.score` returns {label: likelihood} with likelihood in [0, 1]:
1 = the LLM is certain the object belongs in the scene, 0.5 = it may appear, 0 = unlikely. Two modes, on the same
causal LM (Vicuna-7B v1.5 in the cluster profile, a tiny seeded Llama in tests):

- "likelihood" (ours, the default): one question per (prompt, label) in `LIKELIHOOD_TEMPLATE`, which names the label
  last and whose assistant reply is prefilled up to the rating digit. The next-token probabilities of "1", "2", "3",
  renormalised over those three, give likelihood = P(3) + 0.5 * P(2), the expectation of the rating mapping
  (r - 1) / 2. No sampling: deterministic, and a pair's value does not depend on the other pairs of the call, their
  order or the batch size (to float tolerance). Everything before the label is one prefix per prompt, tokenized and
  (transformers backend, `share_prefix`) run once per prompt; each label adds a short suffix run against that
  prefix's KV cache. On vLLM, its prefix caching shares the prefix.
- "rating" (the paper's released protocol): one generated reply per request, rating every label as `tag:score`
  (3 certain / 2 may appear / 1 unlikely), sampled at temperature 0.7 for up to 512 tokens and parsed with
  `parse_ratings`; likelihood = (rating - 1) / 2. A reply that misses a label is a `SampleFailure`. Kept so the two
  can be compared (`benchmarks/likelihood.py`).

Every question is a fresh one-turn conversation: nothing carries over between requests or calls (the paper's notebook
let one conversation grow across calls). The questions and the reply parser are in `services.llm_prompts`; the
backends in `services.llm_transformers` (CPU and GPU) and `services.llm_vllm` (GPU only, imported in `load`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from services import llm_transformers
from services.config import Config
from services.llm_prompts import likelihood_inputs, prompt_ids, rating_text, ratings_from_reply
from services.reward import SampleFailure


class LLMConfig(Config):
    """The likelihood scorer's LM, backend and mode."""

    model: str = Field(
        "lmsys/vicuna-7b-v1.5",
        description="Hub id or local directory ('~' expanded) of a causal LM (cluster profile: lmsys/vicuna-7b-v1.5).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); None for the default.")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="'transformers' (CPU and GPU) or 'vllm' (GPU only; imported only in load())."
    )
    mode: Literal["likelihood", "rating"] = Field(
        "likelihood",
        description="'likelihood' (one batched forward pass, token log-probabilities, deterministic) or 'rating' "
        "(the paper's protocol: a sampled free-text reply, parsed).",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="The weights' dtype (half precision is for GPUs)."
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Most sequences per forward pass (likelihood) / per generate call (rating); transformers backend "
        "only, vLLM schedules its own batches.",
    )
    share_prefix: bool = Field(
        True,
        description="Likelihood mode, transformers backend: run each prompt's question prefix once and the labels' "
        "suffixes against its KV cache (False: every pair's whole question in its own row, the reference path).",
    )
    rating_temperature: float = Field(0.7, gt=0, description="Rating mode: the sampling temperature (the paper: 0.7).")
    rating_max_new_tokens: int = Field(
        512, ge=1, description="Rating mode: the reply budget in generated tokens (the paper: 512)."
    )
    seed: int = Field(
        0,
        description="Seed of rating-mode sampling: each request samples from its own stream seeded by (seed, prompt, "
        "labels), so the same call repeats and a reply does not depend on the other requests of its batch.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="vLLM only: fraction of the GPU's memory vLLM may take (weights + KV cache)."
    )
    vllm_load_format: str = Field(
        "auto",
        description="vLLM only: its `load_format`; 'auto' loads the checkpoint, 'dummy' random weights (benchmarks "
        "on a GPU without the checkpoint).",
    )


def _request_seed(seed: int, prompt: str, labels: Sequence[str]) -> int:
    """A stable per-request seed (Python's hash() is salted per process)."""
    key = "\x00".join([str(seed), prompt, *labels]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:7], "little")


class LikelihoodScorer:
    """Scores (prompt, labels) requests with a causal LM; see the module docstring for the two modes."""

    def __init__(self, config: LLMConfig | None = None, *, model=None, tokenizer=None):
        """`model`/`tokenizer` inject an already-built causal LM and its tokenizer (tests); else `load` builds them."""
        self.config = config if config is not None else LLMConfig()
        if not isinstance(self.config, LLMConfig):
            raise TypeError(f"LikelihoodScorer takes an LLMConfig, got {type(self.config).__name__}")
        if (model is None) != (tokenizer is None):
            raise ValueError("llm scorer: inject `model` and `tokenizer` together")
        if model is not None and self.config.backend != "transformers":
            raise ValueError("llm scorer: an injected model runs on the 'transformers' backend")
        self.model, self.tokenizer = model, tokenizer
        # vllm.LLM, on the vllm backend.
        self.llm = None
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        """Loads the LM (unless injected) onto `device` in `config.dtype`."""
        cfg = self.config
        self.device = device
        if cfg.backend == "vllm":
            from services import llm_vllm

            self.llm, self.tokenizer = llm_vllm.load_llm(cfg, device)
            return
        import torch

        if self.model is None:
            self.model, self.tokenizer = llm_transformers.load_causal_lm(cfg)
        self.model = self.model.to(device=device, dtype=getattr(torch, cfg.dtype)).eval()

    def score(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, float] | SampleFailure]:
        """For each (prompt, labels) request: {label: likelihood in [0, 1]} for every label of the request,
        or a services.reward.SampleFailure("SCORING_FAILED", message) for that request (rating mode reply that cannot
        be parsed)."""
        if self.model is None and self.llm is None:
            raise RuntimeError("llm scorer: call load() before score()")
        if any(isinstance(labels, str) for _, labels in requests):
            raise TypeError("llm scorer: each request is (prompt, labels) with labels a sequence of str, not a str")
        requests = [(prompt, list(labels)) for prompt, labels in requests]
        if self.config.mode == "likelihood":
            # Identical (prompt, label) pairs across the whole call are computed once.
            pairs = list(dict.fromkeys((prompt, label) for prompt, labels in requests for label in labels))
            values = dict(zip(pairs, self.likelihoods(pairs), strict=True))
            return [{label: values[prompt, label] for label in labels} for prompt, labels in requests]
        return self._score_rating(requests)

    def likelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Likelihood mode for (prompt, label) pairs: P(3) + 0.5 * P(2), the ratings' probabilities renormalised."""
        if not pairs:
            return []
        inputs = likelihood_inputs(self.tokenizer, pairs)
        if self.llm is not None:
            from services import llm_vllm

            logits = llm_vllm.rating_logprobs(self.llm, inputs)  # (N, 3)
        else:
            rating_logits = (
                llm_transformers.shared_prefix_rating_logits
                if self.config.share_prefix
                else llm_transformers.full_rating_logits
            )
            logits = rating_logits(self.model, self.tokenizer, inputs, self.config.batch_size, self.device)  # (N, 3)
        # Logits or full-vocabulary log-probabilities: a softmax over the three renormalises either.
        probs = logits.float().softmax(-1)
        return (probs[:, 2] + 0.5 * probs[:, 1]).tolist()

    def _score_rating(self, requests: list[tuple[str, list[str]]]) -> list[dict[str, float] | SampleFailure]:
        """Rating mode: one sampled reply per request (identical requests share one), parsed with `parse_ratings`."""
        asked = list(dict.fromkeys((prompt, tuple(labels)) for prompt, labels in requests if labels))
        replies = dict(zip(asked, self.generate_replies(asked), strict=True))
        return [
            ratings_from_reply(replies[prompt, tuple(labels)], labels, self.config.rating_max_new_tokens)
            if labels
            else {}
            for prompt, labels in requests
        ]

    def generate_replies(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """Rating mode's sampled reply for each request, each from a fresh conversation and its own seeded stream."""
        cfg = self.config
        if not requests:
            return []
        seeds = [_request_seed(cfg.seed, prompt, labels) for prompt, labels in requests]
        prompts = [prompt_ids(self.tokenizer, rating_text(p, labels)) for p, labels in requests]
        if self.llm is not None:
            from services import llm_vllm

            return llm_vllm.generate_replies(self.llm, prompts, seeds, cfg)
        return llm_transformers.generate_replies(self.model, self.tokenizer, prompts, seeds, cfg, self.device)
