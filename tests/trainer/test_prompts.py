"""Prompt files, the papers' prompt generator, and the held-out split."""

import json

import pytest

from trainer.prompts import BACKGROUNDS, COLORS, COUNTS, generate_prompts, load_prompts, split_train_eval


def test_generated_prompts_are_distinct_seeded_and_in_the_papers_style():
    prompts = generate_prompts(50, seed=3)
    assert len(set(prompts)) == 50
    assert prompts == generate_prompts(50, seed=3)
    assert prompts != generate_prompts(50, seed=4)
    for p in prompts:
        count = p.split()[0]
        assert count in COUNTS and p.split()[1] in COLORS
        assert any(p.endswith(b) for b in BACKGROUNDS)
        # plural noun exactly when the count is above one
        noun = p.split()[2]
        assert noun.endswith("s") == (count != "one")
    with pytest.raises(ValueError, match="distinct combinations"):
        generate_prompts(10**6)


def test_load_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\ntwo red dogs\n\n  one cat  \n")
    assert load_prompts(text) == ["two red dogs", "one cat"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "extra": 1}) + "\n")
    assert load_prompts(jsonl) == ["a", "b"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\n{"prompt": \n', r"p\.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n{"text": "b"}\n', r"p\.jsonl:2: expected an object with a non-empty string 'prompt'"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompt_files_say_where(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def test_split_is_disjoint_seeded_and_drops_duplicates():
    prompts = generate_prompts(20) + generate_prompts(5)  # the last 5 repeat
    train, evals = split_train_eval(prompts, 4, seed=1)
    assert len(evals) == 4 and len(train) == 16
    assert not set(train) & set(evals)
    assert set(train) | set(evals) == set(prompts)
    assert (train, evals) == split_train_eval(prompts, 4, seed=1)
    with pytest.raises(ValueError, match="eval_count"):
        split_train_eval(prompts, 20)
