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

    from services.llm_prompts import LikelihoodInputs
    from services.llm_scorer import LLMConfig


def load_llm(cfg: LLMConfig, device: str):
    """(vllm.LLM, its tokenizer) for `cfg` on the CUDA `device`.

    Prefix caching is on: likelihood mode's questions of one prompt share everything up to the label, so vLLM
    computes that prefix once and each pair pays only for its label suffix. The price is history dependence: a
    cached prefix's KV was computed in an earlier batch (of this call or an earlier one), in another batch shape, so
    a pair's value can move with call history at half-precision rounding. It moves with its batch at that level
    anyway: vLLM's kernels are not batch-invariant by default (versions with `VLLM_BATCH_INVARIANT=1` make a
    forward independent of its batch; whether that also covers cached prefixes was not checked). Rating mode's
    prompts share only Vicuna's system line.
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
        enable_prefix_caching=True,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        load_format=cfg.vllm_load_format,
    )
    return llm, tokenizer


def rating_logprobs(llm, inputs: LikelihoodInputs) -> torch.Tensor:
    """Log-probabilities of the three rating tokens after each pair's question (`likelihood_inputs`), (N, 3).

    One prompt per pair (its prefix ids + suffix ids) and one greedy generated step, with
    `SamplingParams(logprob_token_ids=[the 3 ids])`: vLLM returns the log-probability of exactly those ids at that
    step, whatever their rank (the sampled token's too, ignored), from the raw logits (the default logprobs_mode).
    `logprobs=k` would be unreliable (a rating token may fall outside the top k), and prompt log-probabilities
    (append each candidate, `prompt_logprobs=0`) make vLLM skip reading the prefix cache (SamplingParams sets
    `skip_reading_prefix_cache` for them, as cached positions have no logits), so nothing would be shared.
    `logprob_token_ids` is in vLLM's SamplingParams since at least 0.28 and on its main branch in late 2026 (so in
    the pinned 0.33.0 as far as the public code shows; not run here: no GPU, vllm not installed). If the installed
    vLLM lacks it, this falls back to the prompt-log-probability path: three prompts per pair, correct but unshared.
    """
    import torch
    from vllm import SamplingParams

    candidates = list(inputs.candidates)
    seqs = [inputs.sequence(i) for i in range(len(inputs.pairs))]
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=candidates)
    except TypeError:  # a vLLM without logprob_token_ids (msgspec rejects the unknown field)
        return _rating_logprobs_from_prompts(llm, seqs, candidates)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in seqs], params, use_tqdm=False)
    logprobs = []
    for output in outputs:
        step = output.outputs[0].logprobs[0]  # {token id: Logprob} of the one generated step
        missing = [c for c in candidates if c not in step]
        if missing:
            raise RuntimeError(f"llm scorer: vLLM returned no log-probability for rating token ids {missing}")
        logprobs.append([step[c].logprob for c in candidates])
    return torch.tensor(logprobs)  # (N, 3)


def _rating_logprobs_from_prompts(llm, seqs: list[list[int]], candidates: list[int]) -> torch.Tensor:
    """Fallback of `rating_logprobs`: each candidate appended as the last prompt token, whose prompt log-probability
    (`prompt_logprobs=0`: the given token's, no alternatives) is read; three prompts per pair."""
    import torch
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [*ids, c]} for ids in seqs for c in candidates]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    logprobs = [o.prompt_logprobs[-1][o.prompt_token_ids[-1]].logprob for o in outputs]
    return torch.tensor(logprobs).view(len(seqs), 3)


def generate_replies(llm, prompts: Sequence[list[int]], seeds: Sequence[int], cfg: LLMConfig) -> list[str]:
    """One sampled reply per prompt (token ids), each with its own seed; vLLM schedules the batches."""
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=cfg.rating_temperature, max_tokens=cfg.rating_max_new_tokens, seed=s) for s in seeds
    ]
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    return [o.outputs[0].text.strip() for o in llm.generate(requests, params, use_tqdm=False)]
