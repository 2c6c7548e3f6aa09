"""LLM likelihood scorer on tiny seeded Llamas (MiniLM's BERT tokenizer): both modes, the parser, loading, the shared
prefix (tokenization joins, batch invariance against the whole-question path), and what the likelihood means (a tiny
Llama trained in the test on the exact question template)."""

import sys

import pytest
import torch

from services.llm_prompts import (
    LIKELIHOOD_PREFIX,
    LIKELIHOOD_TEMPLATE,
    RATINGS,
    likelihood_inputs,
    likelihood_text,
    parse_ratings,
    rating_tokens,
    ratings_from_reply,
)
from services.llm_scorer import LikelihoodScorer, LLMConfig
from services.llm_transformers import full_rating_logits, rating_head, shared_prefix_rating_logits
from services.reward import SampleFailure
from trainer.local_models.tiny import save_tiny_models, tiny_gpt2, tiny_llama
from trainer.local_models.tokenizers import llama_tokenizer, opt_tokenizer

# Prompts of different lengths, so their padding differs within a batch.
PROMPTS = [
    "a cat",
    "two green dogs in the city",
    "a wooden table with a cup of coffee and a plate of cookies, seen from above in soft morning light",
]
LABELS = ["cup", "dining table", "whale", "dog"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def _scorer(tiny, **config) -> LikelihoodScorer:
    scorer = LikelihoodScorer(LLMConfig(**config), model=tiny[0], tokenizer=tiny[1])
    scorer.load("cpu")
    return scorer


def _values(results) -> list[float]:
    return [v for r in results for v in r.values()]


# --- parse_ratings --------------------------------------------------------------------------------------------------


def test_parse_well_formed_reply():
    ratings, missing = parse_ratings("cup:3\nplate:1\nwhale:2", ["cup", "plate", "whale"])
    assert ratings == {"cup": 3, "plate": 1, "whale": 2} and missing == []


def test_parse_bullets_numbering_case_and_extra_text():
    reply = (
        "Sure! Here are my ratings for the scene:\n"
        "1. Cup: 3 (it is a kitchen)\n"
        "- PLATE : 2\n"
        "* **Dining  Table**: 1\n"
        '  "whale" = 1\n'
        "Let me know if you need anything else."
    )
    ratings, missing = parse_ratings(reply, ["cup", "plate", "dining table", "whale"])
    assert ratings == {"cup": 3, "plate": 2, "dining table": 1, "whale": 1} and missing == []


def test_parse_partial_reply_names_the_missing_labels():
    ratings, missing = parse_ratings("cup: 3, and the plate is irrelevant. whale: 7", ["cup", "plate", "whale"])
    assert ratings == {"cup": 3} and missing == ["plate", "whale"]


def test_parse_does_not_match_inside_other_words_or_longer_labels():
    assert parse_ratings("teacup: 3\ncupboard: 2", ["cup"]) == ({}, ["cup"])
    assert parse_ratings("dining table: 3", ["table", "dining table"]) == ({"dining table": 3}, ["table"])
    assert parse_ratings("table: 1\ndining table: 3", ["table", "dining table"]) == (
        {"table": 1, "dining table": 3},
        [],
    )
    assert parse_ratings("cup: 3.5\nplate: 12", ["cup", "plate"]) == ({}, ["cup", "plate"])


@pytest.mark.parametrize("reply", ["", "3 2 1", ":::---===", "cup", "\x00\uffff(((**[", "cup:" * 1000, None])
def test_parse_garbage_never_raises(reply):
    ratings, missing = parse_ratings(reply, ["cup", "", "c++ (x)", "cup"])
    assert ratings == {} and missing == ["cup", "", "c++ (x)"]


# --- likelihood mode ------------------------------------------------------------------------------------------------


# Labels that stress the join: several words, punctuation, digits, a leading capital, non-ASCII, an empty label.
JOIN_LABELS = [*LABELS, "traffic light", "T-shirt", "hot-dog", "4x4 car", "Eiffel Tower", "café", "crème brûlée", ""]
JOIN_PROMPTS = [*PROMPTS, 'a "quoted" scene: colons, commas; and 3 digits 123', "UPPER CASE SCENE", "émigré à Paris"]


@pytest.fixture(scope="module")
def join_tokenizers(tiny, tmp_path_factory):
    """The tokenizers the joins are checked on: the tiny Llama's BERT WordPiece (MiniLM), a Llama/Vicuna
    sentencepiece tokenizer (the release's settings and files, trained tiny, read by transformers' LlamaTokenizer),
    and OPT's GPT-2 byte-level BPE (trained tiny)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("llama_tokenizer")
    llama_tokenizer(path)
    return {
        "bert": tiny[1],
        "llama": AutoTokenizer.from_pretrained(path),
        "gpt2": opt_tokenizer(tmp_path_factory.mktemp("opt_tokenizer")),
    }


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_prefix_plus_suffix_is_the_tokenization_of_the_whole_question(join_tokenizers, name):
    """prefix ids + suffix ids + a rating id == the tokenizer's own ids of the whole text ending in that rating
    (minus a trailing [SEP]), for every pair and rating: the split changes nothing the model reads."""
    tokenizer = join_tokenizers[name]
    pairs = [(p, label) for p in JOIN_PROMPTS for label in JOIN_LABELS]
    inputs = likelihood_inputs(tokenizer, pairs)
    digits = {"bert": ["1", "2", "3"], "llama": ["1", "2", "3"], "gpt2": ["Ġ1", "Ġ2", "Ġ3"]}[name]
    assert tokenizer.convert_ids_to_tokens(list(inputs.candidates)) == digits
    special = set(tokenizer.all_special_ids)
    whole = tokenizer([f"{likelihood_text(p, label)} {r}" for p, label in pairs for r in RATINGS])["input_ids"]
    for i, (p, label) in enumerate(pairs):
        for r, candidate in enumerate(inputs.candidates):
            expected = list(whole[3 * i + r])
            while expected[-1] in special:
                expected.pop()
            assert inputs.sequence(i) + [candidate] == expected, (p, label, RATINGS[r])
    # BOS / [CLS] begins each prefix; no special token anywhere else.
    first = {"bert": tokenizer.cls_token_id, "llama": tokenizer.bos_token_id, "gpt2": tokenizer.bos_token_id}[name]
    assert all(ids[0] == first and not special & set(ids[1:]) for ids in inputs.prefixes)
    assert not special & {t for ids in inputs.suffixes for t in ids}


def test_rating_tokens_keep_the_sentencepiece_space_before_the_digit(join_tokenizers):
    """Llama's tokenizer splits " 1" into "▁" and "1": the "▁" ends every suffix, "1" is the candidate."""
    tokenizer = join_tokenizers["llama"]
    tokens = rating_tokens(tokenizer)
    assert tokenizer.convert_ids_to_tokens(list(tokens.lead)) == ["▁"]
    inputs = likelihood_inputs(tokenizer, [("a cat", "cup")])
    assert tokenizer.convert_ids_to_tokens(inputs.suffixes[0]) == ["▁cup", "▁ASSISTANT", ":", "▁Rating", ":", "▁"]
    assert rating_tokens(join_tokenizers["bert"]).lead == ()


def test_rating_tokens_of_a_word_level_sentencepiece_like_tokenizer():
    """A vocabulary where "Rating:" is one piece and " 1" splits into "▁" and "1" (as in Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "▁": 2, "1": 3, "2": 4, "3": 5, "▁Rating:": 6}
    spm_like = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    spm_like.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Digits(individual_digits=True)]
    )
    spm_like.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm_like, bos_token="<s>", unk_token="<unk>")
    assert tokenizer.convert_ids_to_tokens(tokenizer("Rating: 1")["input_ids"]) == ["<s>", "▁Rating:", "▁", "1"]
    tokens = rating_tokens(tokenizer)
    assert (tokens.lead, tokens.candidates) == ((2,), (3, 4, 5))


def test_each_distinct_prefix_and_suffix_is_tokenized_once(tiny):
    """Two batched tokenizer calls per call, each text once: one for the distinct prompts' prefixes, one for the
    distinct labels' suffixes; the rating tokens are found once per tokenizer."""

    class Recording:
        """The real tokenizer, recording what it is asked to tokenize."""

        def __init__(self, tokenizer):
            self.tokenizer, self.calls = tokenizer, []

        def __call__(self, texts, **kwargs):
            self.calls.append(list(texts))
            return self.tokenizer(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    tokenizer = Recording(tiny[1])
    likelihood_inputs(tokenizer, [("a cat", "cup")])  # finds the rating tokens
    tokenizer.calls.clear()
    pairs = [("a cat", "cup"), ("a cat", "dog"), ("a dog", "cup"), ("a dog", "dog"), ("a cat", "cup")]
    inputs = likelihood_inputs(tokenizer, pairs)
    assert len(tokenizer.calls) == 2 and [len(c) for c in tokenizer.calls] == [2, 2]
    assert tokenizer.calls[0][0].startswith(LIKELIHOOD_PREFIX.format(prompt="a cat"))
    assert len(inputs.prefixes) == 2 and len(inputs.suffixes) == 2
    assert inputs.pairs == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0)]


def test_likelihoods_are_in_range_and_deterministic(tiny):
    scorer = _scorer(tiny)
    requests = [(p, LABELS) for p in PROMPTS]
    first = scorer.score(requests)
    assert [list(r) for r in first] == [LABELS] * len(PROMPTS)
    assert all(0.0 <= v <= 1.0 for v in _values(first))
    assert len(set(_values(first))) == len(PROMPTS) * len(LABELS)  # the random model still tells pairs apart
    assert scorer.score(requests) == first


def test_batched_equals_one_by_one_and_batch_composition_does_not_matter(tiny):
    requests = [(p, LABELS) for p in PROMPTS]
    batched = _values(_scorer(tiny, batch_size=64).score(requests))
    scorer = _scorer(tiny, batch_size=1)
    alone = [scorer.score([(p, [label])])[0][label] for p, labels in requests for label in labels]
    # Other groupings: batches of 5 (prompts of every length mixed), and the requests in reverse order.
    mixed = _values(_scorer(tiny, batch_size=5).score(requests))
    reverse = _values(_scorer(tiny, batch_size=3).score(requests[::-1])[::-1])
    for values in (alone, mixed, reverse):
        torch.testing.assert_close(torch.tensor(values), torch.tensor(batched), atol=1e-5, rtol=0)


# Shared-prefix and whole-question paths, and any two groupings of the same pairs, agree to this on probabilities: a
# few float32 roundings of a different reduction order (batch shapes, cache copies), far below a meaningful change,
# on any CPU (Intel or AMD kernels sum in different orders, so equality is not bitwise).
PROB_ATOL = 1e-5


def _probs(fn, tiny, pairs, batch_size, tokenizer=None):
    tokenizer = tokenizer or tiny[1]
    return fn(tiny[0], tokenizer, likelihood_inputs(tokenizer, pairs), batch_size, "cpu").softmax(-1)  # (N, 3)


# Very different prompt lengths (1 to ~70 words), so prefixes pad very differently within a group.
LONG_PROMPT = " ".join(["a long winding road through green hills past a small red farmhouse with a barn"] * 5)
INVARIANCE_PROMPTS = [*PROMPTS, "x", LONG_PROMPT]
INVARIANCE_PAIRS = [(p, label) for p in INVARIANCE_PROMPTS for label in [*LABELS, "traffic light", "T-shirt"]]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_shared_prefix_equals_the_whole_question_path(tiny, batch_size):
    reference = _probs(full_rating_logits, tiny, INVARIANCE_PAIRS, 64)
    shared = _probs(shared_prefix_rating_logits, tiny, INVARIANCE_PAIRS, batch_size)
    torch.testing.assert_close(shared, reference, atol=PROB_ATOL, rtol=0)
    assert (reference.max(0).values - reference.min(0).values > 0.01).all()  # the pairs' values differ


def test_shared_prefix_does_not_depend_on_order_duplicates_or_the_other_prompts(tiny):
    reference = _probs(full_rating_logits, tiny, INVARIANCE_PAIRS, 64)
    n = len(INVARIANCE_PAIRS)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    permuted = _probs(shared_prefix_rating_logits, tiny, [INVARIANCE_PAIRS[i] for i in perm], 5)
    torch.testing.assert_close(permuted, reference[perm], atol=PROB_ATOL, rtol=0)
    # Each pair twice (duplicates interleaved, so they fall in different suffix batches).
    doubled = _probs(shared_prefix_rating_logits, tiny, INVARIANCE_PAIRS + INVARIANCE_PAIRS[::-1], 7)
    torch.testing.assert_close(doubled, torch.cat([reference, reference.flip(0)]), atol=PROB_ATOL, rtol=0)
    # A prompt alone (the longest, the shortest): as among all the others.
    for prompt in (LONG_PROMPT, "x"):
        rows = [i for i, (p, _) in enumerate(INVARIANCE_PAIRS) if p == prompt]
        for batch_size in (1, 64):
            alone = _probs(shared_prefix_rating_logits, tiny, [INVARIANCE_PAIRS[i] for i in rows], batch_size)
            torch.testing.assert_close(alone, reference[rows], atol=PROB_ATOL, rtol=0)


def test_shared_prefix_with_a_sentencepiece_tokenizer_and_its_bos(tiny, join_tokenizers):
    """The same check with the Llama tokenizer's ids (BOS, "▁" lead) through the tiny model (its ids fit the vocab)."""
    tokenizer = join_tokenizers["llama"]
    pairs = [(p, label) for p in JOIN_PROMPTS for label in JOIN_LABELS]
    reference = _probs(full_rating_logits, tiny, pairs, 64, tokenizer)
    for batch_size in (1, 3, 64):
        shared = _probs(shared_prefix_rating_logits, tiny, pairs, batch_size, tokenizer)
        torch.testing.assert_close(shared, reference, atol=PROB_ATOL, rtol=0)


def test_the_rating_rows_of_the_head_give_the_models_own_rating_logits(tiny):
    """Llama's logits are its lm_head over the decoder's last hidden state: the three rating rows alone give the same
    rating logits (the shared-prefix path reads them so; the whole-question path reads the model's logits)."""
    model, tokenizer = tiny
    inputs = likelihood_inputs(tokenizer, INVARIANCE_PAIRS[:8])
    candidates = torch.tensor(inputs.candidates)
    decoder, weight, bias = rating_head(model, candidates)
    assert decoder is model.get_decoder() and bias is None
    torch.testing.assert_close(weight, model.lm_head.weight[candidates], atol=0, rtol=0)
    ids = torch.tensor([inputs.sequence(0)])  # (1, L)
    with torch.no_grad():
        rows = decoder(input_ids=ids).last_hidden_state[:, -1] @ weight.T  # (1, 3)
        own = model(input_ids=ids).logits[:, -1, candidates]  # (1, 3)
    torch.testing.assert_close(rows, own, atol=1e-6, rtol=1e-5)


def test_a_model_type_outside_the_plain_head_list_reads_its_own_logits():
    """GPT-2 is not in PLAIN_HEAD_MODEL_TYPES (nor would a type with soft-capped or scaled logits be): the
    shared-prefix path falls back to the model's own logits and still equals the whole-question path."""
    model, tokenizer = tiny_gpt2()
    pairs = INVARIANCE_PAIRS[:: len(INVARIANCE_PAIRS) // 24]
    inputs = likelihood_inputs(tokenizer, pairs)
    assert rating_head(model, torch.tensor(inputs.candidates)) is None
    reference = full_rating_logits(model, tokenizer, inputs, 64, "cpu").softmax(-1)
    for batch_size in (1, 5):
        shared = shared_prefix_rating_logits(model, tokenizer, inputs, batch_size, "cpu").softmax(-1)
        torch.testing.assert_close(shared, reference, atol=PROB_ATOL, rtol=0)
    assert (reference.max(0).values - reference.min(0).values > 0.01).all()


def test_scorer_shares_the_prefix_by_default_and_agrees_with_share_prefix_off(tiny):
    requests = [(p, [*LABELS, "traffic light"]) for p in INVARIANCE_PROMPTS]
    shared = _scorer(tiny, batch_size=4).score(requests)
    full = _scorer(tiny, share_prefix=False).score(requests)
    torch.testing.assert_close(torch.tensor(_values(shared)), torch.tensor(_values(full)), atol=PROB_ATOL, rtol=0)


def test_duplicate_pairs_are_computed_once(tiny):
    scorer = _scorer(tiny)
    rows = []
    # A real forward hook on the real embedding layer: counts the sequences fed to the model.
    hook = scorer.model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    try:
        results = scorer.score([("a cat", ["cup", "cup", "dog"]), ("a cat", ["dog", "whale"]), ("a dog", ["cup"])])
    finally:
        hook.remove()
    # One forward of the 2 distinct prefixes, then one of the 4 distinct pairs' label suffixes:
    # (a cat, cup), (a cat, dog), (a cat, whale), (a dog, cup).
    assert rows == [2, 4]
    assert [sorted(r) for r in results] == [["cup", "dog"], ["dog", "whale"], ["cup"]]
    assert results[0]["dog"] == results[1]["dog"]
    assert scorer.score([]) == [] and scorer.score([("a cat", [])]) == [{}]


KITCHENS = [
    "a kitchen with wooden cabinets",
    "a bright kitchen in the morning",
    "a small kitchen with a window",
    "an old kitchen at night",
    "a kitchen full of people cooking",
    "a clean white kitchen",
]
OCEANS = [
    "a calm ocean under the sun",
    "a stormy ocean at night",
    "the ocean seen from a cliff",
    "a wide ocean with big waves",
    "a grey ocean in winter",
    "an ocean far from the coast",
]
# Held out: scenes never seen in training, with the same objects.
HELD_OUT_KITCHENS = ["a modern kitchen with a red floor", "a tidy kitchen after dinner"]
HELD_OUT_OCEANS = ["the deep blue ocean at dawn", "a quiet ocean after the rain"]
KITCHEN_THINGS = ["cup", "plate"]
OCEAN_THINGS = ["whale", "volcano"]


def _train_on_template(model, tokenizer, max_steps: int = 600) -> int:
    """Teaches the tiny Llama the template's answers: kitchen things '3' in kitchens, '1' at sea, and the reverse.

    Cross-entropy over the three rating tokens after the exact scorer context (left-padded, like the scorer): the
    scorer renormalises over those three, so the rest of the vocabulary need not be trained down. The model sits on
    a plateau (scene ignored) before it learns the scene x object interaction, so it trains until the loss is small.
    Returns the steps taken.

    It trains in float64. Leaving the plateau is chaotic: in float32 a 1e-7 difference in a reduction (Intel and AMD
    kernels sum in different orders) can send the model to another solution, one that ranks held-out scenes
    differently. In float64 the CPU differences are ~1e-16, and the recipe below (seed 0, learning rate 5e-3)
    reaches the same margins with every weight perturbed by 1e-6 relative, ten orders of magnitude more than those
    differences (140 steps; mean held-out gap 0.990, 0.990 at 1e-6 and 0.963 at 1e-4).

    History: full-vocabulary cross-entropy (seed 1) needed ~260 steps to leave the plateau. Over the three tokens,
    seed 1 separates every held-out scene too (gap 0.86), seed 2 ranks one held-out scene's objects wrong (gap
    -0.015), and seed 1 at 1e-2 ranks held-out scenes wrong.
    """
    model.to(torch.float64)
    pairs, answers = [], []
    for scenes, likely, unlikely in ((KITCHENS, KITCHEN_THINGS, OCEAN_THINGS), (OCEANS, OCEAN_THINGS, KITCHEN_THINGS)):
        for scene in scenes:
            for label, answer in [(x, 2) for x in likely] + [(x, 0) for x in unlikely]:
                pairs.append((scene, label))
                answers.append(answer)
    inputs = likelihood_inputs(tokenizer, pairs)
    contexts = [inputs.sequence(i) for i in range(len(pairs))]
    candidates = torch.tensor(inputs.candidates)  # (3,)
    width = max(len(c) for c in contexts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in contexts])  # (N, L)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])  # (N, L)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    steps = 0
    while steps < max_steps:
        steps += 1
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1).logits
        loss = torch.nn.functional.cross_entropy(logits[:, -1, candidates], torch.tensor(answers))  # (N, 3) vs (N,)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.to(torch.float32).eval()  # the scorer's dtype
    return steps


def test_likelihood_means_how_likely_the_object_is_in_the_scene():
    model, tokenizer = tiny_llama(seed=0)
    assert _train_on_template(model, tokenizer) < 600
    scorer = LikelihoodScorer(model=model, tokenizer=tokenizer)
    scorer.load("cpu")
    labels = KITCHEN_THINGS + OCEAN_THINGS
    cases = [(p, KITCHEN_THINGS, OCEAN_THINGS) for p in HELD_OUT_KITCHENS]
    cases += [(p, OCEAN_THINGS, KITCHEN_THINGS) for p in HELD_OUT_OCEANS]
    results = scorer.score([(p, labels) for p, _, _ in cases])
    gaps = []
    for (_, likely, unlikely), scores in zip(cases, results, strict=True):
        assert min(scores[x] for x in likely) > max(scores[x] for x in unlikely), scores
        gaps.append(sum(scores[x] for x in likely) / 2 - sum(scores[x] for x in unlikely) / 2)
    # This recipe gives ~0.99 vs ~0.01 (mean gap 0.990; 0.963 with weights perturbed by 1e-4, see _train_on_template).
    assert sum(gaps) / len(gaps) > 0.5, results


# --- rating mode ----------------------------------------------------------------------------------------------------


def test_rating_mode_garbage_reply_is_a_sample_failure_and_repeats(tiny):
    scorer = _scorer(tiny, mode="rating", rating_max_new_tokens=12)
    requests = [("a kitchen", ["cup", "whale"]), ("a stormy ocean at night, seen from a cliff", ["whale"])]
    first = scorer.score(requests)
    assert all(isinstance(r, SampleFailure) and r.code == "SCORING_FAILED" for r in first)
    assert "cup" in first[0].message and "whale" in first[0].message
    # Fresh conversation and seeded sampling: the same call repeats, and a reply does not depend on its batch.
    assert scorer.score(requests) == first
    assert scorer.score(requests[1:]) == first[1:]
    replies = scorer.generate_replies(requests)
    assert replies[0] != replies[1]
    assert _scorer(tiny, mode="rating", rating_max_new_tokens=12, seed=1).generate_replies(requests) != replies


def test_rating_sampler_draws_from_the_temperature_softmax():
    from services.llm_transformers import _SeededSampler

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    n = 4000
    sampler = _SeededSampler(0.7, range(n), "cpu")
    picks = sampler(None, logits.expand(n, -1).clone()).argmax(-1)  # (n,): the one finite entry of each row
    freq = torch.bincount(picks, minlength=5) / n
    torch.testing.assert_close(freq, (logits / 0.7).softmax(-1), atol=0.03, rtol=0)
    assert freq[4] == 0


def test_rating_mode_maps_parsed_ratings_to_likelihoods():
    # The replies an instruction-following LLM would give (an untrained tiny model cannot).
    reply = "Sure!\n1. Cup: 3\n2. whale : 1\n3. dining table: 2"
    assert ratings_from_reply(reply, ["cup", "whale", "dining table"], 512) == {
        "cup": 1.0,
        "whale": 0.0,
        "dining table": 0.5,
    }
    failure = ratings_from_reply("whale: 3", ["whale", "cup"], 512)
    assert isinstance(failure, SampleFailure) and failure.code == "SCORING_FAILED" and "['cup']" in failure.message


# --- config, loading, backends --------------------------------------------------------------------------------------


def test_loads_from_a_local_directory_with_from_pretrained(tiny):
    path = save_tiny_models()["llama"]
    scorer = LikelihoodScorer(LLMConfig(model=str(path)))
    scorer.load("cpu")
    requests = [(p, LABELS[:2]) for p in PROMPTS]
    torch.testing.assert_close(
        torch.tensor(_values(scorer.score(requests))), torch.tensor(_values(_scorer(tiny).score(requests)))
    )


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_missing_weights_name_the_path(backend):
    scorer = LikelihoodScorer(LLMConfig(model="~/no/such/vicuna", backend=backend))
    with pytest.raises(FileNotFoundError, match="no/such/vicuna"):
        scorer.load("cuda" if backend == "vllm" else "cpu")
    assert "vllm" not in sys.modules


def test_a_sentencepiece_only_tokenizer_without_the_package_names_the_package(tmp_path):
    """Vicuna's repo has a tokenizer.model and no tokenizer.json. Without sentencepiece, transformers falls back to
    other readers and fails with a message about tiktoken; the scorer names the missing package instead."""
    import json
    import subprocess

    import sentencepiece as spm

    with open(tmp_path / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["a cat on a table", "two dogs in the city"] * 20),
            model_writer=f,
            vocab_size=30,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    code = (
        "import sys; sys.modules['sentencepiece'] = None\n"  # as if it were not installed
        "from services.llm_scorer import LikelihoodScorer, LLMConfig\n"
        f"LikelihoodScorer(LLMConfig(model={str(tmp_path)!r})).load('cpu')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr and "cannot load the tokenizer" in proc.stderr
    assert "pip install sentencepiece" in proc.stderr, proc.stderr[-2000:]


def test_uncached_hub_id_offline_is_a_file_not_found_naming_it():
    with pytest.raises(FileNotFoundError, match="rewardfleet-tests/no-such-llm"):
        LikelihoodScorer(LLMConfig(model="rewardfleet-tests/no-such-llm")).load("cpu")


def test_vllm_backend_is_not_imported_by_construction():
    LikelihoodScorer(LLMConfig(backend="vllm", mode="rating", vllm_load_format="dummy"))
    assert "vllm" not in sys.modules


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("backend", "tgi", r"backend must be one of \['transformers', 'vllm'\]"),
        ("mode", "yes_no", r"mode must be one of \['likelihood', 'rating'\]"),
        ("dtype", "int8", r"dtype must be one of"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("rating_max_new_tokens", 0, "rating_max_new_tokens must be >= 1"),
        ("rating_temperature", 0.0, "rating_temperature must be > 0"),
        ("vllm_gpu_memory_utilization", 1.5, "vllm_gpu_memory_utilization"),
    ],
)
def test_config_rejects_invalid_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        LLMConfig(**{field: value})


def test_score_before_load_and_injection_mistakes_are_errors(tiny):
    with pytest.raises(RuntimeError, match="load"):
        LikelihoodScorer().score([("a cat", ["cup"])])
    with pytest.raises(ValueError, match="together"):
        LikelihoodScorer(model=tiny[0])
    with pytest.raises(TypeError, match="not a str"):
        _scorer(tiny).score([("a cat", "cup")])
    assert "{prompt}" in LIKELIHOOD_TEMPLATE and LIKELIHOOD_TEMPLATE.endswith("Object: {label} ASSISTANT: Rating:")
    text = likelihood_text("a cat", "cup")
    assert text.startswith(LIKELIHOOD_PREFIX.format(prompt="a cat")) and 'Scene: "a cat"' in text
    assert text.endswith("(unlikely).\nObject: cup ASSISTANT: Rating:")
