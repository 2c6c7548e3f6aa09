"""The LLM scorer's transformers backend (CPU and GPU): loading, rating-token logits, seeded rating-mode replies.

Sequences are left-padded and grouped by length, with position ids that count real tokens only, so a sequence's
values do not depend on the other sequences of its batch (to float tolerance). Likelihood mode runs each prompt's
shared question prefix once and its labels' suffixes against that prefix's KV cache
(`shared_prefix_rating_logits`), and where the model type allows (`rating_head`) reads only the three rating rows of
the LM head; `full_rating_logits` runs every whole question through the model's own logits, the reference. torch
and transformers are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from services.models import load_error, load_pretrained, resolve_model_source

if TYPE_CHECKING:
    import torch

    from services.llm_prompts import LikelihoodInputs
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


def _positions(mask):
    """Position ids counting real tokens only, so left padding does not shift a sequence's rotary positions."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# Model types whose causal-LM logits are exactly `lm_head(decoder(...).last_hidden_state)`, a linear map with no
# scaling or soft-capping after it (Gemma 2's final_logit_softcapping, Cohere's logit_scale or Granite's
# logits_scaling would each change the logits), so the three rating rows of lm_head give the rating logits.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def rating_head(model, candidates):
    """(decoder, (3, H) rows of the output embedding, (3,) bias rows or None) that give the rating tokens' logits
    from the decoder's last hidden state without projecting onto the whole vocabulary; None for a model outside
    PLAIN_HEAD_MODEL_TYPES or without a linear output embedding (the caller then reads the model's own logits).

    On the tiny 32-wide test model the vocabulary projection is most of a suffix forward; on Vicuna-7B it is about
    2% of the weights a suffix row reads."""
    import torch

    head = model.get_output_embeddings()
    plain = getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
    if not plain or not isinstance(head, torch.nn.Linear):
        return None
    index = candidates.to(head.weight.device)
    bias = None if head.bias is None else head.bias.index_select(0, index)
    return model.get_decoder(), head.weight.index_select(0, index), bias


def full_rating_logits(model, tokenizer, inputs: LikelihoodInputs, batch_size: int, device) -> torch.Tensor:
    """Next-token logits of the three rating tokens after each pair's whole question (prefix + suffix ids), (N, 3).

    The reference for `shared_prefix_rating_logits`: every row reads its whole question.
    """
    import torch

    seqs = [inputs.sequence(i) for i in range(len(inputs.pairs))]
    out = torch.empty(len(seqs), 3)
    candidates = torch.tensor(inputs.candidates, device=device)  # (3,)
    # Similar lengths share a batch, so little is padding; values do not depend on the grouping.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = _pad_left([seqs[i] for i in rows], pad_id(tokenizer), device)  # (B, L)
        with torch.inference_mode():
            output = model(
                input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False, logits_to_keep=1
            )
        out[rows] = output.logits[:, -1].index_select(1, candidates.to(output.logits.device)).float().cpu()
    return out


def shared_prefix_rating_logits(model, tokenizer, inputs: LikelihoodInputs, batch_size: int, device) -> torch.Tensor:
    """The logits of `full_rating_logits` (to float tolerance), each distinct prompt prefix computed once, (N, 3).

    Per group of at most `batch_size` distinct prefixes (similar lengths together): one forward over the left-padded
    prefixes keeps their KV cache; then the group's pairs, at most `batch_size` rows per forward, run their label
    suffix (left-padded too) against their prefix's cache rows, copied (index-selected) into a fresh DynamicCache.
    The attention mask is the prefix's mask followed by the suffix's, so neither padding is attended, and positions
    continue from the prefix's real length: each row sees exactly the tokens and positions of its whole question.
    Only one group's cache is held at a time. Where `rating_head` applies, the decoder runs without the LM head and
    the suffix rows' last hidden states meet the three rating rows of the output embedding only.
    """
    import torch
    from transformers import DynamicCache

    out = torch.empty(len(inputs.pairs), 3)
    pad = pad_id(tokenizer)
    candidates = torch.tensor(inputs.candidates, device=device)  # (3,)
    head = rating_head(model, candidates)
    # The prefix pass needs only the cache: the decoder alone, or the model with one position's logits.
    prefix_model, prefix_kwargs = (head[0], {}) if head is not None else (model, {"logits_to_keep": 1})
    pairs_of: dict[int, list[int]] = {}
    for i, (p, _) in enumerate(inputs.pairs):
        pairs_of.setdefault(p, []).append(i)
    prefixes = sorted(pairs_of, key=lambda p: len(inputs.prefixes[p]))
    with torch.inference_mode():
        for start in range(0, len(prefixes), batch_size):
            group = prefixes[start : start + batch_size]
            ids, mask = _pad_left([inputs.prefixes[p] for p in group], pad, device)  # (P, Lp)
            cache = prefix_model(
                input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, **prefix_kwargs
            ).past_key_values
            layers = [(layer.keys, layer.values) for layer in cache.layers]  # each (P, heads, Lp, head_dim)
            lengths = mask.sum(-1)  # (P,): real prefix tokens
            # (row in the group, pair index), similar suffix lengths together.
            rows = [(g, i) for g, p in enumerate(group) for i in pairs_of[p]]
            rows.sort(key=lambda r: len(inputs.suffixes[inputs.pairs[r[1]][1]]))
            for s0 in range(0, len(rows), batch_size):
                chunk = rows[s0 : s0 + batch_size]
                select = torch.tensor([g for g, _ in chunk], device=mask.device)  # (S,): each row's prefix
                suffixes = [inputs.suffixes[inputs.pairs[i][1]] for _, i in chunk]
                sids, smask = _pad_left(suffixes, pad, device)  # (S, Ls)
                # A fresh cache per suffix batch: the model appends the suffix's keys/values to it.
                rows_kv = [(k.index_select(0, select), v.index_select(0, select)) for k, v in layers]
                past = DynamicCache(rows_kv, config=model.config)  # each layer (S, heads, Lp, head_dim)
                attention_mask = torch.cat([mask.index_select(0, select), smask], dim=1)  # (S, Lp + Ls)
                position_ids = lengths.index_select(0, select)[:, None] + _positions(smask)  # (S, Ls)
                kwargs = dict(
                    input_ids=sids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=past,
                    use_cache=True,
                )
                if head is not None:
                    decoder, weight, bias = head
                    hidden = decoder(**kwargs).last_hidden_state[:, -1]  # (S, H)
                    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)  # (S, 3)
                else:
                    logits = model(**kwargs, logits_to_keep=1).logits[:, -1]  # (S, V)
                    logits = logits.index_select(1, candidates.to(logits.device))  # (S, 3)
                out[[i for _, i in chunk]] = logits.float().cpu()
            del cache, layers
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
