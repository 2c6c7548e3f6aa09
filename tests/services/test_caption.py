"""Caption reward on tiny seeded models loaded from disk through the real `from_pretrained` code path."""

import numpy as np
import pytest

from services.registry import build_reward
from trainer.local_models.tiny import MINILM, save_tiny_models, tiny_blip2, tiny_clip_text

MINILM_ENCODER = {"kind": "sentence_transformers", "source": MINILM}


def random_images(rng, n):
    # Pixel noise: a 32-wide random BLIP-2 tells noise images apart, so captions differ between samples.
    return [rng.integers(0, 256, (48, 56, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_paths():
    return save_tiny_models()


def _caption(tiny_paths, text_encoder=None, **config):
    reward = build_reward(
        "caption",
        {
            "captioner": str(tiny_paths["blip2"]),
            "max_new_tokens": 8,
            "text_encoder": text_encoder or MINILM_ENCODER,
            **config,
        },
    )
    reward.load("cpu")
    return reward


@pytest.fixture(scope="module")
def minilm_reward(tiny_paths):
    return _caption(tiny_paths)


def test_every_sample_gets_a_caption_and_a_similarity(minilm_reward, rng):
    images = random_images(rng, 5)
    outputs = minilm_reward.score(images, ["two green dogs in the city"] * 5)
    assert all(o.caption and -1.0 <= o.reward <= 1.0 for o in outputs)
    assert all(o.components == {"similarity": o.reward} for o in outputs)
    assert len({o.caption for o in outputs}) >= 3  # captions depend on the image


def test_deterministic_and_independent_of_batch_composition(minilm_reward, rng):
    images = random_images(rng, 6)
    prompts = [f"a photo of {n} cats" for n in range(6)]
    batch = minilm_reward.score(images, prompts)
    assert len({o.caption for o in batch}) >= 3
    again = minilm_reward.score(images, prompts)
    reordered = minilm_reward.score(images[::-1], prompts[::-1])[::-1]
    alone = [minilm_reward.score([img], [p])[0] for img, p in zip(images, prompts, strict=True)]
    for outs in (again, reordered, alone):
        assert [o.caption for o in outs] == [o.caption for o in batch]
        np.testing.assert_allclose([o.reward for o in outs], [o.reward for o in batch], atol=1e-5)


def test_batched_generation_equals_one_by_one(minilm_reward, rng):
    images = random_images(rng, 7)
    assert minilm_reward.caption(images) == [minilm_reward.caption([img])[0] for img in images]
    # Chunked generate (a served batch larger than generate_batch_size) gives the same captions too.
    chunked = build_reward(
        "caption", {**minilm_reward.config.__dict__, "text_encoder": MINILM_ENCODER, "generate_batch_size": 3}
    )
    chunked.load("cpu")
    assert chunked.caption(images) == minilm_reward.caption(images)


def test_minilm_similarity_ranks_a_close_caption_above_an_unrelated_one(minilm_reward):
    prompt = "two green dogs playing in a city street"
    close, unrelated = minilm_reward.similarity(
        ["a couple of green puppies running on a town road", "a bowl of soup on a wooden table"], [prompt, prompt]
    )
    assert close > unrelated + 0.2
    (same,) = minilm_reward.similarity([prompt], [prompt])
    assert same == pytest.approx(1.0, abs=1e-5)


def test_clip_text_encoder_behind_the_same_config_field(tiny_paths, rng):
    reward = _caption(tiny_paths, {"kind": "clip", "source": str(tiny_paths["clip_text"])})
    outputs = reward.score(random_images(rng, 3), ["a red cube"] * 3)
    assert all(o.caption and -1.0 <= o.reward <= 1.0 for o in outputs)
    (same,) = reward.similarity(["a red cube"], ["a red cube"])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert reward.info().models[1].role == "text_encoder:clip"


def test_clip_replacement_state_dict_is_loaded(tiny_paths, tmp_path):
    from safetensors.torch import save_file

    other, tokenizer = tiny_clip_text(seed=1)
    save_file(other.state_dict(), str(tmp_path / "hps_like.safetensors"))
    reward = _caption(
        tiny_paths,
        {"kind": "clip", "source": str(tiny_paths["clip_text"]), "state_dict": str(tmp_path / "hps_like.safetensors")},
    )
    base = _caption(tiny_paths, {"kind": "clip", "source": str(tiny_paths["clip_text"])})
    texts = ["a red cube", "three blue birds"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    expected = other(**tokens).text_embeds
    expected = (expected / expected.norm(dim=-1, keepdim=True)).detach().numpy()
    np.testing.assert_allclose(reward.embed(texts).numpy(), expected, atol=1e-5)
    assert not np.allclose(base.embed(texts).numpy(), expected, atol=1e-3)


def test_float16_captioner_keeps_the_q_former_in_float32(tiny_paths, rng):
    import torch

    # transformers keeps these modules in float32 when loading in float16 (the Q-Former is unstable in half
    # precision); a `.to(dtype)` after from_pretrained would cast them too.
    reward = _caption(tiny_paths, dtype="float16")
    model = reward.model
    assert {"qformer", "query_tokens"} <= set(type(model)._keep_in_fp32_modules)
    assert model.query_tokens.dtype == torch.float32
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    assert {p.dtype for p in model.language_model.parameters()} == {torch.float16}
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.float16}
    outputs = reward.score(random_images(rng, 2), ["a red cube"] * 2)
    assert all(o.caption and -1.0 <= o.reward <= 1.0 for o in outputs)


def test_injected_modules_give_the_same_scores_as_loading_from_disk(tiny_paths, minilm_reward, rng):
    from sentence_transformers import SentenceTransformer

    from services.rewards.caption import Caption, CaptionConfig, TextEncoderConfig
    from trainer.local_models.tiny import minilm_path

    model, processor = tiny_blip2(seed=0)
    injected = Caption(
        CaptionConfig(max_new_tokens=8, text_encoder=TextEncoderConfig(**MINILM_ENCODER)),
        captioner=model,
        processor=processor,
        text_encoder=SentenceTransformer(minilm_path(), device="cpu"),
    )
    injected.load("cpu")
    images = random_images(rng, 3)
    got, want = injected.score(images, ["p"] * 3), minilm_reward.score(images, ["p"] * 3)
    assert [o.caption for o in got] == [o.caption for o in want]
    np.testing.assert_allclose([o.reward for o in got], [o.reward for o in want], atol=1e-6)


def test_missing_weights_name_the_path(tmp_path):
    missing = str(tmp_path / "no_such_blip2")
    with pytest.raises(FileNotFoundError, match="no_such_blip2"):
        build_reward("caption", {"captioner": missing}).load("cpu")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"cannot load the BLIP-2 captioner from .*empty_dir"):
        build_reward("caption", {"captioner": str(empty)}).load("cpu")


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        build_reward("caption", {"text_encoder": {"kind": "bert"}})
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_reward("caption", {"dtype": "float8"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['beams'\]"):
        build_reward("caption", {"beams": 4})


@pytest.mark.integration
def test_served_caption_matches_in_process(fleet, rng):
    from services.client import RewardClient
    from services.codec import encode_image

    served_reward = build_reward("caption", _local_caption_config())
    served_reward.load("cpu")
    images = random_images(rng, 6)
    prompts = [f"{n} green dogs in the city" for n in range(6)]
    client = RewardClient(fleet.grpc_target, "caption")
    corrupt = encode_image(images[0], "PNG")[:100]
    results = client.score([*images[:3], corrupt, *images[3:]], [*prompts[:3], "p", *prompts[3:]])
    assert results[3].error_code == "INVALID_IMAGE"
    scored = [r for r in results if r.ok]
    expected = served_reward.score(images, prompts)
    assert [r.caption for r in scored] == [o.caption for o in expected]
    np.testing.assert_allclose([r.reward for r in scored], [o.reward for o in expected], atol=1e-5)
    assert all(r.components["similarity"] == r.reward for r in scored)
    info = client.describe()
    assert info.name == "caption" and (info.min_reward, info.max_reward) == (-1.0, 1.0)
    assert [m.role for m in info.models] == ["captioner", "text_encoder:sentence_transformers"]


def _local_caption_config():
    from deploy.fleet import LOCAL_PROFILE
    from services.config import load_yaml

    app = next(a for a in load_yaml(LOCAL_PROFILE)["applications"] if a["name"] == "caption")
    return app["args"]["reward_config"]
