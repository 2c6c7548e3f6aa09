"""Tokenizers trained tiny with the real ones' file layouts, for the real-width models (`real_width.py`).

The real tokenizers cannot be downloaded on CPU-only CI machines, so each is trained here on `tokenizer_corpus`
(about 1000 tokens) by the library the release used, and written in the release's layout: OPT's GPT-2 byte-level
BPE (vocab.json + merges.txt), CLIP's BPE laid out as OpenAI's `simple_tokenizer` builds it, Llama's sentencepiece
`tokenizer.model` without a tokenizer.json. The models keep the real vocabulary sizes.
"""

from __future__ import annotations

import json
from pathlib import Path


def tokenizer_corpus() -> list[str]:
    """What the tiny tokenizers are trained on: the texts the rewards feed the models (the LLM scorer's questions,
    CLIP's label prompts) and a few image prompts, so those tokenize into whole words as with the real vocabularies.
    """
    from services.llm_prompts import likelihood_text, rating_text
    from services.rewards.semantic import load_vocabulary

    labels = load_vocabulary()
    prompts = [
        "two green dogs in the city",
        "three red apples on a wooden table",
        "a corgi riding a surfboard",
        "a red disc in a blue sky",
        "a photo of a cat sitting on a sofa next to a lamp",
    ]
    questions = [likelihood_text(p, label) for p in prompts for label in labels[:5]]
    labelled = [f"a photo of a {x}." for x in labels]
    return [*questions, *(rating_text(p, labels[:8]) for p in prompts), *prompts, *labelled]


def opt_tokenizer(path: Path, vocab_size: int = 1000):
    """OPT's tokenizer layout (GPT-2 byte-level BPE in vocab.json + merges.txt; ids 0-3 are <s>, <pad>, </s>, <unk>;
    `</s>` starts every sequence), with merges trained tiny on `tokenizer_corpus` by the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    path.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(path))  # vocab.json, merges.txt
    # Salesforce/blip2-opt-2.7b's tokenizer_config.json (OPT's), without its processor fields.
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True,
        "add_prefix_space": False,
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
        "errors": "replace",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return AutoTokenizer.from_pretrained(path)


def clip_tokenizer(vocab_size: int = 1000):
    """A CLIP BPE tokenizer whose vocabulary is laid out as OpenAI's `simple_tokenizer` builds it: the 256 byte
    symbols, the same with `</w>`, one token per merge, then <|startoftext|> and <|endoftext|> as the two highest ids.
    Merges trained tiny on `tokenizer_corpus` with CLIP's normaliser and pre-tokeniser."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def llama_tokenizer(path: Path) -> None:
    """The tokenizer files of the lmsys/vicuna-7b-v1.5 repo written into `path`: `tokenizer.model`,
    tokenizer_config.json and special_tokens_map.json, no tokenizer.json (so loading it needs sentencepiece). The
    sentencepiece BPE model (Llama's trainer settings: byte fallback, split digits) is trained tiny, 1000 pieces."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())

    def token(content: str) -> dict:  # the repo's serialised AddedToken
        flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
        return {"__type": "AddedToken", "content": content, **flags}

    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token("</s>"),
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": token("<unk>"),
    }
    special_tokens = {"bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>")}
    special_tokens["pad_token"] = "<unk>"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2))
