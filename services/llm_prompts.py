"""What the LLM scorer asks and how its answers are read: the question templates, their token ids, reply parsing.

Both modes ask about a (prompt, label) in Vicuna's one-turn chat format (a fresh conversation per question):
- likelihood mode: one object per question, the reply prefilled up to the rating digit (`likelihood_text`);
  `rating_token_ids` finds the context and the ids of the three rating tokens "1", "2", "3" for any tokenizer;
- rating mode (the paper's protocol): all of a request's objects in one question (`rating_text`), answered as free
  text and read with `parse_ratings`; `ratings_from_reply` maps the ratings to likelihoods (rating - 1) / 2.

Pure text and tokenizer calls: importing this module loads no model library.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a generation prompt: the tokenizer's own special tokens, minus trailing ones (BERT's [SEP])."""
    ids = list(tokenizer(text)["input_ids"])
    special = set(tokenizer.all_special_ids)
    while len(ids) > 1 and ids[-1] in special:
        ids.pop()
    return ids


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
