"""`scenes.parse_prompt`, the exact inverse of `render_prompt`. (The rest of scenes.py is tested in test_testbed.py,
beside the testbed it builds.)"""

import pytest

from trainer.local_models.scenes import all_prompts, parse_prompt, render_prompt


def test_parse_prompt_inverts_render_prompt_on_every_prompt():
    prompts = all_prompts()
    for attrs in prompts:
        assert parse_prompt(render_prompt(attrs)) == attrs
    assert parse_prompt("three green balls in the city") == {
        "count": 3,
        "color": "green",
        "object": "ball",
        "background": "city",
    }
    assert parse_prompt("one red cube on the beach")["background"] == "beach"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("two green dogs in the city", r"object 'dogs' is not one of \['ball', 'cube', 'pyramid', 'gem'\]"),
        ("five red balls in the city", r"count 'five' is not one of \['one', 'two', 'three', 'four'\]"),
        ("one teal ball in the city", "color 'teal' is not one of"),
        ("two red balls on the moon", "background 'on the moon' is not one of"),
        ("three green ball in the city", "object 'ball' must be plural after 'three'"),
        ("one green balls in the city", "object 'balls' must be singular after 'one'"),
        # Exact inverse: render_prompt never writes capitals or stray spaces.
        ("Three green balls in the city", "count 'Three'"),
        ("three green balls  in the city", "background ' in the city'"),
        ("three green balls in the city ", "background 'in the city '"),
        ("three green balls", "expected '<count> <color> <object> <background>'"),
        ("", "expected"),
    ],
)
def test_parse_prompt_rejects_other_text_naming_it_and_what_did_not_parse(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_prompt(text)
    assert str(error.value).startswith(f"{text!r} is not a testbed prompt: ")


def test_parse_prompt_names_every_part_that_did_not_parse():
    with pytest.raises(ValueError) as error:
        parse_prompt("five teal dogs in the sky")
    assert [part.split(" ", 1)[0] for part in str(error.value).split(": ", 1)[1].split("; ")] == [
        "count",
        "color",
        "object",
        "background",
    ]
