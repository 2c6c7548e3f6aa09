"""LLM likelihood scorer of the semantic segment reward: how likely is an object label to appear in a prompt's scene.

For each (prompt, labels) request, `LikelihoodScorer.score` returns {label: likelihood} with likelihood in [0, 1]:
1 = the LLM is certain the object belongs in the scene, 0.5 = it may appear, 0 = unlikely. Two modes, on the same
causal LM (Vicuna-7B v1.5 in the cluster profile, a tiny seeded Llama in tests):

- "likelihood" (ours, the default): one question per (prompt, label) in `LIKELIHOOD_TEMPLATE`, whose assistant reply is
  prefilled up to the rating digit. The next-token probabilities of "1", "2", "3", renormalised over those three, give
  likelihood = P(3) + 0.5 * P(2), the expectation of the rating mapping (r - 1) / 2. One batched forward pass, no
  sampling: deterministic, and a pair's value does not depend on the other pairs of the call (to float tolerance).
- "rating" (the paper's released protocol): one generated reply per request, rating every label as `tag:score`
  (3 certain / 2 may appear / 1 unlikely), sampled at temperature 0.7 for up to 512 tokens and parsed with
  `parse_ratings`; likelihood = (rating - 1) / 2. A reply that misses a label is a `SampleFailure`. Kept so the two
  can be compared (`benchmarks/likelihood.py`).

Every question is a fresh one-turn conversation: nothing carries over between requests or calls (the paper's notebook
let one conversation grow across calls). Backends: "transformers" (CPU and GPU) and "vllm" (GPU only, imported in
`load`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.models import resolve_model_source
from services.reward import SampleFailure

if TYPE_CHECKING:
    import torch

BACKENDS = ("transformers", "vllm")
MODES = ("likelihood", "rating")
DTYPES = ("float32", "float16", "bfloat16")
# The rating scale, as the tokens the LLM answers with: "1" unlikely, "2" may appear, "3" certain.
RATINGS = ("1", "2", "3")

# Vicuna's v1.1 conversation format (FastChat's "vicuna_v1.1", used by Vicuna v1.1 to v1.5): system line, then one
# "USER: ... ASSISTANT:" turn. `{reply}` prefills the start of the assistant's answer (empty in rating mode).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_FORMAT = VICUNA_SYSTEM + " USER: {question} ASSISTANT:{reply}"

# Likelihood mode: one object per question. The reply is prefilled with " Rating:", so the next token is the digit.
LIKELIHOOD_QUESTION = (
    'Scene: "{prompt}"\n'
    "Object: {label}\n"
    "How likely is this object to appear in this scene? "
    "Answer with one digit: 3 (certain), 2 (may appear) or 1 (unlikely)."
)
LIKELIHOOD_REPLY = " Rating:"
LIKELIHOOD_TEMPLATE = CHAT_FORMAT.format(question=LIKELIHOOD_QUESTION, reply=LIKELIHOOD_REPLY)

# Rating mode: all of a request's objects in one question, answered as free text, as in the paper's released code.
RATING_QUESTION = (
    'I will give you the description of an image and a list of tags. Description: "{prompt}". Tags: {tags}. '
    "For each tag, rate how likely it is to appear in the image: 3 means certain, 2 means it may appear, "
    "1 means unlikely. Answer with one line per tag in the format tag:score."
)
RATING_TEMPLATE = CHAT_FORMAT.format(question=RATING_QUESTION, reply="")


def likelihood_text(prompt: str, label: str) -> str:
    """The likelihood-mode input for one (prompt, label): the rating digit is the next token."""
    return LIKELIHOOD_TEMPLATE.format(prompt=prompt, label=label)


def rating_text(prompt: str, labels: Sequence[str]) -> str:
    """The rating-mode input for one request: a fresh conversation asking for `tag:score` lines."""
    return RATING_TEMPLATE.format(prompt=prompt, tags=", ".join(labels))


@dataclass(frozen=True)
class LLMConfig:
    # Hub id or local directory of a causal LM (cluster profile: lmsys/vicuna-7b-v1.5). "~" is expanded.
    model: str = "lmsys/vicuna-7b-v1.5"
    # Hub revision (branch, tag or commit); None for the default.
    revision: str | None = None
    # "transformers" (CPU and GPU) or "vllm" (GPU only; imported only in load()).
    backend: str = "transformers"
    # "likelihood" (one batched forward pass, token log-probabilities, deterministic) or "rating" (the paper's
    # protocol: a sampled free-text reply, parsed).
    mode: str = "likelihood"
    # Weights' dtype: float32, float16 or bfloat16 (half precision is for GPUs).
    dtype: str = "float32"
    # Most sequences per forward pass (likelihood) / per generate call (rating); transformers backend only, vLLM
    # schedules its own batches.
    batch_size: int = 64
    # Rating mode: the paper's sampling temperature (> 0).
    rating_temperature: float = 0.7
    # Rating mode: the paper's reply budget, in generated tokens.
    rating_max_new_tokens: int = 512
    # Seed of rating-mode sampling: each request samples from its own stream seeded by (seed, prompt, labels), so the
    # same call repeats and a reply does not depend on the other requests of its batch.
    seed: int = 0
    # vLLM only: fraction of the GPU's memory vLLM may take (weights + KV cache).
    vllm_gpu_memory_utilization: float = 0.5
    # vLLM only: "auto" loads the checkpoint; "dummy" = random weights (benchmarks on a GPU without the checkpoint).
    vllm_load_format: str = "auto"

    def __post_init__(self):
        for name, valid in (("backend", BACKENDS), ("mode", MODES), ("dtype", DTYPES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "rating_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.rating_temperature > 0:
            raise ValueError(f"rating_temperature must be > 0 (the paper: 0.7), got {self.rating_temperature}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")


def _load_error(source: str, e: Exception, what: str = "causal LM") -> FileNotFoundError:
    return FileNotFoundError(
        f"llm scorer: cannot load the {what} from {source!r} ({type(e).__name__}: {e}). Set `model` to a hub id "
        "reachable from this node or to a local directory holding the weights (config + safetensors + tokenizer)."
    )


def _load_tokenizer(source: str, cfg: LLMConfig):
    """The LM's tokenizer. Llama/Vicuna repos ship only a sentencepiece `tokenizer.model`, which transformers reads
    with the `sentencepiece` package; without it transformers falls back to other readers and fails with an
    unrelated message, so the missing package is named here instead."""
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
        raise _load_error(cfg.model, cause, "tokenizer") from None


def rating_token_ids(tokenizer, texts: Sequence[str]) -> list[tuple[list[int], tuple[int, int, int]]]:
    """For each text: (context ids, ids of the tokens "1", "2", "3" that continue it), for any tokenizer.

    Tokenizes `text + " 1"`, `+ " 2"`, `+ " 3"` with the tokenizer's default special tokens: the longest common
    prefix is the context and the first differing token of each is its rating token. This keeps Llama's separate
    "▁" before a digit in the context and drops the trailing [SEP] of BERT-style tokenizers. One tokenizer call for
    all texts (per-text calls cost as much as the tiny model's forward pass).
    """
    ids = tokenizer([f"{text} {r}" for text in texts for r in RATINGS])["input_ids"]
    items = []
    for i, text in enumerate(texts):
        seqs = ids[3 * i : 3 * i + 3]
        n = 0
        while all(n < len(s) for s in seqs) and seqs[0][n] == seqs[1][n] == seqs[2][n]:
            n += 1
        candidates = tuple(s[n] if n < len(s) else None for s in seqs)
        if n == 0 or None in candidates or len(set(candidates)) != 3:
            raise ValueError(f"llm scorer: the tokenizer has no distinct next tokens for {RATINGS} after {text!r}")
        items.append((list(seqs[0][:n]), candidates))
    return items


def _request_seed(seed: int, prompt: str, labels: Sequence[str]) -> int:
    """A stable per-request seed (Python's hash() is salted per process)."""
    key = "\x00".join([str(seed), prompt, *labels]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:7], "little")


def parse_ratings(reply: str, labels: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """Parses 'tag:score' ratings (3 certain / 2 may appear / 1 unlikely) from a free-form LLM reply.

    Returns (ratings for the labels found, labels missing), both in the order of `labels` (duplicates once). Robust to
    case, whitespace, bullets and numbering ('1. cup: 3', '- Cup : 2', '**cup**: 3'), extra text, labels with spaces,
    and ':' / '=' / '-' as separator; the first rating of a label counts. Never raises on garbage.
    """
    text = reply if isinstance(reply, str) else ""
    wanted = list(dict.fromkeys(labels))
    found: dict[str, int] = {}
    # Longest labels first, each match blanked out, so "table" cannot take the rating of "dining table".
    for label in sorted(wanted, key=lambda s: len(str(s)), reverse=True):
        words = str(label).split()
        if not words:
            continue
        name = r"[\s_-]+".join(map(re.escape, words))
        pattern = rf"(?<!\w){name}[\s*\"'`]*[:=\-–—][\s*\"'`]*([123])(?!\.?\d)"
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            found[label] = int(match.group(1))
            text = text[: match.start()] + " " * (match.end() - match.start()) + text[match.end() :]
    missing = [label for label in wanted if label not in found]
    return {label: found[label] for label in wanted if label in found}, missing


def ratings_from_reply(reply: str, labels: Sequence[str], max_new_tokens: int) -> dict[str, float] | SampleFailure:
    """Rating mode's result for one request: {label: (rating - 1) / 2}, or a SampleFailure naming missing labels."""
    ratings, missing = parse_ratings(reply, labels)
    if missing:
        snippet = reply[:200] + ("..." if len(reply) > 200 else "")
        return SampleFailure(
            "SCORING_FAILED",
            f"llm scorer (rating mode, {max_new_tokens} new tokens max): the reply has no tag:score rating for "
            f"{missing}; reply: {snippet!r}",
        )
    return {label: (ratings[label] - 1) / 2 for label in labels}


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

    # --- loading ------------------------------------------------------------------------------------------------

    def load(self, device: str = "cpu") -> None:
        """Loads the LM (unless injected) onto `device` in `config.dtype`."""
        cfg = self.config
        self.device = device
        if cfg.backend == "vllm":
            self._load_vllm(device)
            return
        import torch

        dtype = getattr(torch, cfg.dtype)
        if self.model is None:
            from transformers import AutoModelForCausalLM

            source = resolve_model_source(cfg.model, "llm scorer")
            self.tokenizer = _load_tokenizer(source, cfg)
            try:
                self.model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision, dtype=dtype)
            except (OSError, ValueError) as e:
                raise _load_error(cfg.model, e) from None
        self.model = self.model.to(device=device, dtype=dtype).eval()

    def _load_vllm(self, device: str) -> None:
        """vLLM engine, GPU only. Not exercised by CI (no GPU, vllm not installed there).

        Prefix caching is off: a cached prefix was computed in another batch shape, so a value would depend on call
        history. vLLM's kernels are not batch-invariant by default either, so a pair's value can move with its batch
        at half-precision rounding; vLLM versions with `VLLM_BATCH_INVARIANT=1` remove that.
        """
        cfg = self.config
        source = resolve_model_source(cfg.model, "llm scorer")
        if not device.startswith("cuda"):
            raise ValueError(f"llm scorer: the vllm backend runs on a CUDA device only, got device {device!r}")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("llm scorer: backend 'vllm' needs vLLM: pip install 'rewardfleet[vllm]'") from e
        self.tokenizer = _load_tokenizer(source, cfg)
        self.llm = LLM(
            model=source,
            revision=cfg.revision,
            dtype=cfg.dtype,
            seed=cfg.seed,
            enable_prefix_caching=False,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            load_format=cfg.vllm_load_format,
        )

    # --- scoring ------------------------------------------------------------------------------------------------

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
        items = rating_token_ids(self.tokenizer, [likelihood_text(p, label) for p, label in pairs])
        if self.llm is not None:
            logits = self._rating_logprobs_vllm(items)  # (N, 3)
        else:
            logits = self._rating_logits(items)  # (N, 3)
        # Logits or full-vocabulary log-probabilities: a softmax over the three renormalises either.
        probs = logits.float().softmax(-1)
        return (probs[:, 2] + 0.5 * probs[:, 1]).tolist()

    def _pad_left(self, seqs: Sequence[Sequence[int]]):
        """Left-padded (B, L) input ids and attention mask on the model's device."""
        import torch

        pad = self._pad_id()
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    def _rating_logits(self, items) -> torch.Tensor:
        """Next-token logits of the three rating tokens after each context, (N, 3), transformers backend."""
        import torch

        out = torch.empty(len(items), 3)
        # Similar lengths share a batch, so little is padding; values do not depend on the grouping.
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            ids, mask = self._pad_left([items[i][0] for i in rows])  # (B, L)
            # Positions count real tokens only, so left padding does not shift a sequence's rotary positions.
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1
                ).logits[:, -1]  # (B, V)
            candidates = torch.tensor([items[i][1] for i in rows], device=logits.device)  # (B, 3)
            out[rows] = logits.gather(1, candidates).float().cpu()
        return out

    def _rating_logprobs_vllm(self, items) -> torch.Tensor:
        """Log-probabilities of the three rating tokens after each context, (N, 3), vLLM backend.

        Each candidate is appended to its context as the last prompt token, and `prompt_logprobs=0` returns the
        log-probability of every prompt token (and no alternatives): the last one is the candidate's. Three prompts
        per pair, as vLLM returns prompt log-probabilities only for the tokens given. Not exercised by CI.
        """
        import torch
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": [*context, c]} for context, candidates in items for c in candidates]
        outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        logprobs = [o.prompt_logprobs[-1][o.prompt_token_ids[-1]].logprob for o in outputs]
        return torch.tensor(logprobs).view(len(items), 3)

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
        import torch

        cfg = self.config
        if not requests:
            return []
        seeds = [_request_seed(cfg.seed, prompt, labels) for prompt, labels in requests]
        if self.llm is not None:
            from vllm import SamplingParams

            prompts = [{"prompt_token_ids": self._prompt_ids(rating_text(p, labels))} for p, labels in requests]
            params = [
                SamplingParams(temperature=cfg.rating_temperature, max_tokens=cfg.rating_max_new_tokens, seed=s)
                for s in seeds
            ]
            return [o.outputs[0].text.strip() for o in self.llm.generate(prompts, params, use_tqdm=False)]

        from transformers import LogitsProcessorList

        prompt_ids = [self._prompt_ids(rating_text(p, labels)) for p, labels in requests]
        replies = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(prompt_ids[i]))
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            ids, mask = self._pad_left([prompt_ids[i] for i in rows])  # (B, L)
            sampler = _SeededSampler(cfg.rating_temperature, [seeds[i] for i in rows], ids.device)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=cfg.rating_max_new_tokens,
                    do_sample=False,  # the sampling is _SeededSampler's
                    logits_processor=LogitsProcessorList([sampler]),
                    pad_token_id=self._pad_id(),
                )  # (B, L + new)
            texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                replies[i] = text.strip()
        return replies

    def _pad_id(self) -> int:
        """Padding id (masked out, so any id works): Llama's tokenizer has no pad token."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    def _prompt_ids(self, text: str) -> list[int]:
        """Token ids of a generation prompt: the tokenizer's own special tokens, minus trailing ones (BERT's [SEP])."""
        ids = list(self.tokenizer(text)["input_ids"])
        special = set(self.tokenizer.all_special_ids)
        while len(ids) > 1 and ids[-1] in special:
            ids.pop()
        return ids
