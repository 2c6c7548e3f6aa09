"""The LLM scorer's transformers backend (CPU and GPU): loading, rating-token logits, seeded rating-mode replies.

Sequences are left-padded and grouped by length, with position ids that count real tokens only, so a sequence's
values do not depend on the other sequences of its batch (to float tolerance). torch and transformers are imported
inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from services.models import load_error, load_pretrained, resolve_model_source

if TYPE_CHECKING:
    import torch

    from services.llm_scorer import LLMConfig

OWNER = "llm scorer"


def load_tokenizer(source: str, cfg: LLMConfig):
    """The LM's tokenizer from the resolved `source` (both backends tokenize with it).

    Llama/Vicuna repos ship only a sentencepiece `tokenizer.model`, which transformers reads with the `sentencepiece`
    package; without it transformers falls back to other readers and fails with an unrelated message, so the missing
    package is named here instead.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, revision=cfg.revision)
    except (OSError, ValueError) as e:
        local = Path(source)
        cause: Exception = e
        if (local / "tokenizer.model").exists() and not (local / "tokenizer.json").exists():
            try:
                import sentencepiece  # noqa: F401
            except ImportError:
                cause = ImportError("its tokenizer is a sentencepiece tokenizer.model: pip install sentencepiece")
        raise load_error(OWNER, "tokenizer", cfg.model, cause) from None


def load_causal_lm(cfg: LLMConfig):
    """(causal LM in `cfg.dtype` on the CPU, its tokenizer) from `cfg.model`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(resolve_model_source(cfg.model, OWNER), cfg)
    model = load_pretrained(
        AutoModelForCausalLM.from_pretrained,
        cfg.model,
        OWNER,
        "causal LM",
        revision=cfg.revision,
        dtype=getattr(torch, cfg.dtype),
    )
    return model, tokenizer


def pad_id(tokenizer) -> int:
    """Padding id (masked out, so any id works): Llama's tokenizer has no pad token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _pad_left(seqs: Sequence[Sequence[int]], pad: int, device):
    """Left-padded (B, L) input ids and attention mask on `device`."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def rating_logits(model, tokenizer, items, batch_size: int, device) -> torch.Tensor:
    """Next-token logits of the three rating tokens after each context of `items` (`rating_token_ids`), (N, 3)."""
    import torch

    out = torch.empty(len(items), 3)
    # Similar lengths share a batch, so little is padding; values do not depend on the grouping.
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = _pad_left([items[i][0] for i in rows], pad_id(tokenizer), device)  # (B, L)
        # Positions count real tokens only, so left padding does not shift a sequence's rotary positions.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        with torch.inference_mode():
            output = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1)
        logits = output.logits[:, -1]  # (B, V)
        candidates = torch.tensor([items[i][1] for i in rows], device=logits.device)  # (B, 3)
        out[rows] = logits.gather(1, candidates).float().cpu()
    return out


class _SeededSampler:
    """Temperature sampling with one random stream per row, as a logits processor for greedy decoding.

    Draws each row's token from softmax(logits / T) by inverse-CDF sampling (one uniform draw from the row's own
    generator) and returns scores where only that token is finite, so greedy decoding takes it. Plain temperature
    sampling (no top-k/top-p), like the paper's FastChat code. `generate(do_sample=True)` would draw all rows from one
    global RNG, so a reply would depend on the other requests of its batch.
    """

    def __init__(self, temperature: float, seeds: Sequence[int], device):
        import torch

        self.temperature = temperature
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        cdf = (scores.float() / self.temperature).softmax(-1).cumsum(-1)  # (B, V)
        u = torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])[:, None]  # (B, 1)
        # right=True: the first token whose cumulative mass exceeds u, so a zero-probability token is never drawn.
        pick = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, pick, 0.0)  # (B, V)


def generate_replies(
    model, tokenizer, prompts: Sequence[list[int]], seeds: Sequence[int], cfg: LLMConfig, device
) -> list[str]:
    """One sampled reply per prompt (token ids), each from its own stream seeded by `seeds`, `cfg.batch_size` rows
    per generate call."""
    import torch
    from transformers import LogitsProcessorList

    replies = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        ids, mask = _pad_left([prompts[i] for i in rows], pad_id(tokenizer), device)  # (B, L)
        sampler = _SeededSampler(cfg.rating_temperature, [seeds[i] for i in rows], ids.device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=cfg.rating_max_new_tokens,
                do_sample=False,  # the sampling is _SeededSampler's
                logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=pad_id(tokenizer),
            )  # (B, L + new)
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        for i, text in zip(rows, texts, strict=True):
            replies[i] = text.strip()
    return replies
