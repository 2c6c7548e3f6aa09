"""What the LLM scorer asks and how its answers are read: the question templates, their token ids, reply parsing.

Both modes ask about a (prompt, label) in Vicuna's one-turn chat format (a fresh conversation per question):
- likelihood mode: one object per question, the label last and the reply prefilled up to the rating digit
  (`likelihood_text`). `likelihood_inputs` tokenizes each prompt's shared prefix once and each label's suffix once,
  and `rating_tokens` finds the ids of the three rating tokens "1", "2", "3" once per tokenizer;
- rating mode (the paper's protocol): all of a request's objects in one question (`rating_text`), answered as free
  text and read with `parse_ratings`; `ratings_from_reply` maps the ratings to likelihoods (rating - 1) / 2.

Pure text and tokenizer calls: importing this module loads no model library.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from services.reward import SampleFailure

# The rating scale, as the tokens the LLM answers with: "1" unlikely, "2" may appear, "3" certain.
RATINGS = ("1", "2", "3")

# Vicuna's v1.1 conversation format (FastChat's "vicuna_v1.1", used by Vicuna v1.1 to v1.5): system line, then one
# "USER: ... ASSISTANT:" turn. `{reply}` prefills the start of the assistant's answer (empty in rating mode).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_FORMAT = VICUNA_SYSTEM + " USER: {question} ASSISTANT:{reply}"

# Likelihood mode: one object per question, named last, so that everything before it is one prefix per prompt
# (system line, scene, instructions: ~85% of the tokens) and only a short suffix differs per label. The reply is
# prefilled with " Rating:", so the next token is the digit.
LIKELIHOOD_QUESTION = (
    'Scene: "{prompt}"\n'
    "How likely is the object below to appear in this scene? "
    "Answer with one digit: 3 (certain), 2 (may appear) or 1 (unlikely).\n"
    "Object: {label}"
)
LIKELIHOOD_REPLY = " Rating:"
LIKELIHOOD_TEMPLATE = CHAT_FORMAT.format(question=LIKELIHOOD_QUESTION, reply=LIKELIHOOD_REPLY)
# The template split at the label: the prefix ends with "Object:", the suffix starts with the space before the label.
_LABEL_AT = LIKELIHOOD_TEMPLATE.index(" {label}")
LIKELIHOOD_PREFIX = LIKELIHOOD_TEMPLATE[:_LABEL_AT]
LIKELIHOOD_SUFFIX = LIKELIHOOD_TEMPLATE[_LABEL_AT:]
# The text the prefix ends with: each suffix is tokenized after it, so the join tokenizes as in the whole question.
_JOIN = "Object:"
# The text the suffix ends with, after which the rating tokens are found.
_ANSWER = "Rating:"

# Rating mode: all of a request's objects in one question, answered as free text, as in the paper's released code.
RATING_QUESTION = (
    'I will give you the description of an image and a list of tags. Description: "{prompt}". Tags: {tags}. '
    "For each tag, rate how likely it is to appear in the image: 3 means certain, 2 means it may appear, "
    "1 means unlikely. Answer with one line per tag in the format tag:score."
)
RATING_TEMPLATE = CHAT_FORMAT.format(question=RATING_QUESTION, reply="")


def likelihood_text(prompt: str, label: str) -> str:
    """The likelihood-mode input for one (prompt, label): the rating digit is the next token."""
    return likelihood_prefix(prompt) + likelihood_suffix(label)


def likelihood_prefix(prompt: str) -> str:
    """The part of the likelihood question shared by all labels of a prompt (ends with "Object:")."""
    return LIKELIHOOD_PREFIX.format(prompt=prompt)


def likelihood_suffix(label: str) -> str:
    """The per-label end of the likelihood question: " {label} ASSISTANT: Rating:"."""
    return LIKELIHOOD_SUFFIX.format(label=label)


def rating_text(prompt: str, labels: Sequence[str]) -> str:
    """The rating-mode input for one request: a fresh conversation asking for `tag:score` lines."""
    return RATING_TEMPLATE.format(prompt=prompt, tags=", ".join(labels))


@dataclass(frozen=True)
class RatingTokens:
    """How a tokenizer continues "...Rating:" with " 1" / " 2" / " 3": `lead`, the ids common to the three (Llama's
    separate "▁" before a digit; empty for BERT or GPT-2 style vocabularies), then one id per rating."""

    lead: tuple[int, ...]
    candidates: tuple[int, int, int]


# Per tokenizer (weakly referenced: an id() can be reused once a tokenizer is freed): its RatingTokens and the ids
# of the join text.
_TOKENIZER_CACHE: dict[int, tuple[weakref.ref, RatingTokens, list[int]]] = {}


def _tokens_of(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """One batched tokenizer call without special tokens."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _tokenizer_constants(tokenizer) -> tuple[RatingTokens, list[int]]:
    """(RatingTokens, ids of the join text alone), computed once per tokenizer."""
    entry = _TOKENIZER_CACHE.get(id(tokenizer))
    if entry is not None and entry[0]() is tokenizer:
        return entry[1], entry[2]
    answer, join, *rated = _tokens_of(tokenizer, [_ANSWER, _JOIN, *(f"{_ANSWER} {r}" for r in RATINGS)])
    n = 0
    while all(n < len(s) for s in rated) and rated[0][n] == rated[1][n] == rated[2][n]:
        n += 1
    candidates = tuple(s[n] if n < len(s) else None for s in rated)
    # The answer text must tokenize the same with a rating after it, and each rating be one distinct token.
    if rated[0][: len(answer)] != answer or n < len(answer) or None in candidates or len(set(candidates)) != 3:
        raise ValueError(f"llm scorer: the tokenizer has no distinct next tokens for {RATINGS} after {_ANSWER!r}")
    tokens = RatingTokens(lead=tuple(rated[0][len(answer) : n]), candidates=candidates)
    try:
        _TOKENIZER_CACHE[id(tokenizer)] = (weakref.ref(tokenizer), tokens, join)
    except TypeError:  # not weakly referenceable: recomputed each call (three short texts)
        pass
    return tokens, join


def rating_tokens(tokenizer) -> RatingTokens:
    """The ids that continue "...Rating:" with each rating, found once per tokenizer (cached)."""
    return _tokenizer_constants(tokenizer)[0]


@dataclass(frozen=True)
class LikelihoodInputs:
    """Token ids of likelihood questions for (prompt, label) pairs, each distinct prompt prefix and label suffix once.

    `prefixes[p] + suffixes[s]` for `(p, s) = pairs[i]` is pair i's question as the tokenizer splits the whole text
    `likelihood_text(prompt, label) + " 3"`, without its last token: the next token is one of `candidates`.
    """

    prefixes: list[list[int]]  # distinct prompts: BOS/[CLS] first, no trailing special token; ends with "Object:"
    suffixes: list[list[int]]  # distinct labels: no special tokens; ends with "Rating:" and the rating lead
    pairs: list[tuple[int, int]]  # per pair: (index into prefixes, index into suffixes)
    candidates: tuple[int, int, int]  # the ids of "1", "2", "3"

    def sequence(self, i: int) -> list[int]:
        """The whole question of pair i: prefix ids then suffix ids."""
        p, s = self.pairs[i]
        return self.prefixes[p] + self.suffixes[s]


def likelihood_inputs(tokenizer, pairs: Sequence[tuple[str, str]]) -> LikelihoodInputs:
    """Tokenizes likelihood questions for (prompt, label) pairs: each distinct prefix once, each distinct suffix once.

    Two batched tokenizer calls, for any tokenizer whose pieces do not span "Object:" and the space after it (true
    of sentencepiece, WordPiece and byte-level BPE, whose pieces start at a space):
    - prefixes with the tokenizer's default special tokens (Llama's BOS, BERT's [CLS]), minus trailing ones (BERT's
      [SEP]);
    - suffixes tokenized after the join text "Object:", whose own tokens are then dropped, so that the label's first
      token is the one it gets inside the whole question (Llama's "▁cup", GPT-2's "Ġcup"), and without special tokens;
      the rating lead (`rating_tokens`) is appended.
    """
    tokens, join = _tokenizer_constants(tokenizer)
    prompts = list(dict.fromkeys(p for p, _ in pairs))
    labels = list(dict.fromkeys(label for _, label in pairs))
    prefixes = prompt_ids_batch(tokenizer, [likelihood_prefix(p) for p in prompts]) if prompts else []
    joined = _tokens_of(tokenizer, [_JOIN + likelihood_suffix(label) for label in labels]) if labels else []
    suffixes = []
    for label, ids in zip(labels, joined, strict=True):
        if ids[: len(join)] != join or len(ids) == len(join):
            raise ValueError(f"llm scorer: the tokenizer merges {_JOIN!r} with the label {label!r}; cannot split it")
        suffixes.append(ids[len(join) :] + list(tokens.lead))
    prompt_index = {p: i for i, p in enumerate(prompts)}
    label_index = {label: i for i, label in enumerate(labels)}
    index = [(prompt_index[p], label_index[label]) for p, label in pairs]
    return LikelihoodInputs(prefixes=prefixes, suffixes=suffixes, pairs=index, candidates=tokens.candidates)


def prompt_ids_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of texts with the tokenizer's own special tokens, minus trailing ones (BERT's [SEP]); one call."""
    special = set(tokenizer.all_special_ids)
    out = []
    for ids in tokenizer(list(texts))["input_ids"]:
        ids = list(ids)
        while len(ids) > 1 and ids[-1] in special:
            ids.pop()
        out.append(ids)
    return out


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a generation prompt: the tokenizer's own special tokens, minus trailing ones (BERT's [SEP])."""
    return prompt_ids_batch(tokenizer, [text])[0]


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
