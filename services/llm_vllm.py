"""The LLM scorer's vLLM backend (GPU only): the engine, rating-token log-probabilities, seeded rating-mode replies.

vLLM is imported inside the functions (only when `LLMConfig.backend` is "vllm"), and is not exercised by CI (no GPU,
vllm not installed there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.llm_transformers import OWNER, load_tokenizer
from services.models import resolve_model_source

if TYPE_CHECKING:
    import torch

    from services.llm_scorer import LLMConfig


def load_llm(cfg: LLMConfig, device: str):
    """(vllm.LLM, its tokenizer) for `cfg` on the CUDA `device`.

    Prefix caching is off: a cached prefix was computed in another batch shape, so a value would depend on call
    history. vLLM's kernels are not batch-invariant by default either, so a pair's value can move with its batch
    at half-precision rounding; vLLM versions with `VLLM_BATCH_INVARIANT=1` remove that.
    """
    source = resolve_model_source(cfg.model, OWNER)
    if not device.startswith("cuda"):
        raise ValueError(f"{OWNER}: the vllm backend runs on a CUDA device only, got device {device!r}")
    try:
        from vllm import LLM
    except ImportError as e:
        raise ImportError(f"{OWNER}: backend 'vllm' needs vLLM: pip install 'rewardfleet[vllm]'") from e
    tokenizer = load_tokenizer(source, cfg)
    llm = LLM(
        model=source,
        revision=cfg.revision,
        dtype=cfg.dtype,
        seed=cfg.seed,
        enable_prefix_caching=False,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        load_format=cfg.vllm_load_format,
    )
    return llm, tokenizer


def rating_logprobs(llm, items) -> torch.Tensor:
    """Log-probabilities of the three rating tokens after each context of `items` (`rating_token_ids`), (N, 3).

    Each candidate is appended to its context as the last prompt token, and `prompt_logprobs=0` returns the
    log-probability of every prompt token (and no alternatives): the last one is the candidate's. Three prompts
    per pair, as vLLM returns prompt log-probabilities only for the tokens given.
    """
    import torch
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [*context, c]} for context, candidates in items for c in candidates]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    logprobs = [o.prompt_logprobs[-1][o.prompt_token_ids[-1]].logprob for o in outputs]
    return torch.tensor(logprobs).view(len(items), 3)


def generate_replies(llm, prompts: Sequence[list[int]], seeds: Sequence[int], cfg: LLMConfig) -> list[str]:
    """One sampled reply per prompt (token ids), each with its own seed; vLLM schedules the batches."""
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=cfg.rating_temperature, max_tokens=cfg.rating_max_new_tokens, seed=s) for s in seeds
    ]
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    return [o.outputs[0].text.strip() for o in llm.generate(requests, params, use_tqdm=False)]
