"""Real-architecture tier: the cluster profile's rewards on models of the released widths and file layouts.

`trainer.local_models.real_width.save_real_width_models` builds BLIP-2 OPT-2.7b, CLIP ViT-L/14, Vicuna-7B (Llama-2-7B)
and SAM vit_b at their real widths with 1-2 layers and random weights, in the files the releases ship, so the rewards
load them through the code that loads the real checkpoints. Each reward is configured as deploy/cluster.yaml configures
it (model paths replaced, CPU, float32, no GPU), served for one batch over real gRPC through Ray Serve next to the
session fleet, and compared with the same reward scored in this process.

Cost on 2 shared cores: about 110 s (20 of them building the models) and 5.2 GB above the session fleet, most of it
the semantic replica: SAM's global attention over a 64 x 64 token grid and the 4096-wide LM in float32. The
in-process and served copies of a reward never coexist.
"""

import copy
import gc
import json
import math
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from deploy.fleet import DEPLOY_DIR, wait_until_ready
from services.client import RewardClient
from services.config import load_yaml
from services.registry import build_reward
from tests.conftest import random_images
from trainer.local_models.real_width import REAL_WIDTH_SAM

CLUSTER_PROFILE = DEPLOY_DIR / "cluster.yaml"
# The replicas' torch threads (the cluster profile asks for 2-4 per replica; this machine may have 2 cores). The
# in-process reference uses as many, so both run the same kernels and agree to float32 rounding.
TORCH_THREADS = 2
# Served rewards cross the wire as float32; the replica and this process compute the same float32 graph.
ATOL = 1e-5
PROMPTS = ["two green dogs in the city", "a corgi riding a surfboard"]
# SD 1.5's sample size (the models resize to 224 or 1024 px whatever the input).
IMAGE_SIZE = 512


def images(n: int) -> list[np.ndarray]:
    return random_images(np.random.default_rng(0), n, size=IMAGE_SIZE)


def replace(config: dict[str, Any], values: dict[str, Any]) -> None:
    """Sets dotted keys ("text_encoder.source") of a profile's reward config; each must exist there, so a key renamed
    in deploy/cluster.yaml fails here instead of leaving a hub id or a GPU setting in place."""
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        assert key in section, f"deploy/cluster.yaml has no {dotted!r}"
        section[key] = value


def cluster_app(name: str) -> dict[str, Any]:
    """deploy/cluster.yaml's `name` application on this CPU machine, served as `real_<name>` (the session fleet
    serves the local profile's `name`): device cpu, no GPU, one logical CPU (the fleet holds about half of the test
    cluster's 8), TORCH_THREADS threads. Everything else is the cluster profile's: reward config, batching,
    autoscaling, graceful shutdown. The caller replaces model paths and half precision."""
    app = copy.deepcopy(next(a for a in load_yaml(CLUSTER_PROFILE)["applications"] if a["name"] == name))
    app["args"].update(device="cpu", torch_threads=TORCH_THREADS)
    for deployment in app["deployments"]:
        deployment["ray_actor_options"].pop("num_gpus", None)
        deployment["ray_actor_options"]["num_cpus"] = 1
    app.update(name=f"real_{name}", route_prefix=f"/real_{name}")
    return app


def score_in_process(app: dict[str, Any], samples: list[np.ndarray], prompts: list[str], check=None):
    """The application's reward built, loaded and scored in this process: (outputs, info). `check(reward)` runs on
    the loaded reward; it is freed before returning, so it never coexists with the served copy."""
    import torch

    args = app["args"]
    threads = torch.get_num_threads()
    torch.set_num_threads(args["torch_threads"])
    try:
        reward = build_reward(args["reward"], args["reward_config"])
        reward.load(args["device"])
        outputs = reward.score(samples, prompts)
        if check is not None:
            check(reward)
        return outputs, reward.info()
    finally:
        torch.set_num_threads(threads)
        reward = None
        gc.collect()


@contextmanager
def served(app: dict[str, Any], target: str):
    """Serves one `services.serving:build_app` application of a Serve config on the session fleet's gRPC proxy, with
    its `deployments:` options, and yields a client; deleted on exit.

    A declarative deploy (`deploy.fleet.start_fleet`) replaces the whole set of declaratively deployed applications;
    `serve.run` deploys this one imperatively instead, which Serve keeps apart: the fleet's applications are not
    touched now, and a later declarative deploy does not remove this one.
    """
    from ray import serve
    from ray.serve.schema import ServeApplicationSchema

    from services.serving import RewardAppArgs, RewardDeployment

    ServeApplicationSchema.model_validate(app)  # a valid entry of a Serve config file
    assert app["import_path"] == "services.serving:build_app"
    (deployment,) = app["deployments"]
    # What build_app does, with the options the controller would apply from `deployments:`.
    bound = RewardDeployment.options(**deployment).bind(RewardAppArgs.model_validate(app["args"]).model_dump())
    client = RewardClient(target, app["name"], timeout_s=300)
    try:
        serve.run(bound, name=app["name"], route_prefix=app["route_prefix"])  # raises if the replica fails to load
        wait_until_ready(target, [app["name"]])
        yield client
    finally:
        client.close()
        serve.delete(app["name"])


def assert_served_like_in_process(results, expected, describe, info) -> None:
    """Every sample scored, finite, in the documented range, and equal to the in-process score."""
    assert (describe.min_reward, describe.max_reward) == (info.min_reward, info.max_reward)
    assert len(results) == len(expected)
    for served_result, local in zip(results, expected, strict=True):
        assert served_result.ok, served_result.error_message
        assert math.isfinite(served_result.reward)
        assert info.min_reward <= served_result.reward <= info.max_reward
        assert served_result.reward == pytest.approx(local.reward, abs=ATOL)
        assert served_result.components.keys() == local.components.keys()
        for key, value in local.components.items():
            assert served_result.components[key] == pytest.approx(value, abs=ATOL), key


@pytest.mark.slow
def test_real_width_models_have_the_released_architectures_and_files(real_width_models):
    """The builders' widths against independent sources (open_clip's ViT-L-14 config, segment_anything's vit_b,
    transformers' defaults, which are BLIP-2 OPT-2.7b's vision/Q-Former and Llama-7B's), and the release layouts."""
    import open_clip
    import sentencepiece as spm
    import torch
    from safetensors import safe_open
    from segment_anything import sam_model_registry
    from transformers import AutoTokenizer, Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig

    from services.llm_prompts import likelihood_text

    m = real_width_models
    width_keys = ("hidden_size", "intermediate_size", "num_attention_heads")

    blip2 = json.loads((m["blip2"] / "config.json").read_text())
    for key in (*width_keys, "patch_size", "image_size"):
        assert blip2["vision_config"][key] == getattr(Blip2VisionConfig(), key), key
    for key in (*width_keys, "cross_attention_frequency", "encoder_hidden_size"):
        assert blip2["qformer_config"][key] == getattr(Blip2QFormerConfig(), key), key
    opt = blip2["text_config"]
    # facebook/opt-2.7b's widths; the vocabulary as grown for <image> in Salesforce/blip2-opt-2.7b.
    widths = ("hidden_size", "ffn_dim", "num_attention_heads", "vocab_size")
    assert [opt[k] for k in widths] == [2560, 10240, 32, 50304]
    assert blip2["num_query_tokens"] == 32
    # OPT's GPT-2 BPE files, and sharded weights, as released.
    assert {"vocab.json", "merges.txt", "model.safetensors.index.json"} <= {p.name for p in m["blip2"].iterdir()}

    clip = json.loads((m["clip"] / "config.json").read_text())
    reference = open_clip.get_model_config("ViT-L-14")
    vision, text = reference["vision_cfg"], reference["text_cfg"]
    assert clip["projection_dim"] == reference["embed_dim"] == 768
    assert clip["vision_config"]["hidden_size"] == vision["width"]
    assert clip["vision_config"]["num_attention_heads"] == vision["width"] // vision.get("head_width", 64)
    assert clip["vision_config"]["intermediate_size"] == vision["width"] * vision.get("mlp_ratio", 4)
    assert (clip["vision_config"]["patch_size"], clip["vision_config"]["image_size"]) == (
        vision["patch_size"],
        vision["image_size"],
    )
    assert clip["text_config"]["hidden_size"] == text["width"]
    assert clip["text_config"]["num_attention_heads"] == text["heads"]
    assert clip["text_config"]["max_position_embeddings"] == text["context_length"]
    assert clip["text_config"]["vocab_size"] == text["vocab_size"]
    # OpenAI's weights use QuickGELU (open_clip's "ViT-L-14-quickgelu"), and each tower carries the projection width.
    assert open_clip.get_model_config("ViT-L-14-quickgelu")["quick_gelu"]
    assert {clip[t]["hidden_act"] for t in ("text_config", "vision_config")} == {"quick_gelu"}
    assert clip["text_config"]["projection_dim"] == clip["vision_config"]["projection_dim"] == 768

    llama = json.loads((m["llama"] / "config.json").read_text())
    for key in (*width_keys, "vocab_size"):
        assert llama[key] == getattr(LlamaConfig(), key), key
    files = {p.name for p in m["llama"].iterdir()}
    assert "tokenizer.model" in files and "tokenizer.json" not in files  # as lmsys/vicuna-7b-v1.5 ships
    shards = sorted(m["llama"].glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (m["llama"] / "model.safetensors.index.json").is_file()  # sharded, as released
    for shard in shards:
        with safe_open(str(shard), "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
    # transformers converts tokenizer.model (through sentencepiece) into the same ids sentencepiece gives.
    tokenizer = AutoTokenizer.from_pretrained(m["llama"])
    sp = spm.SentencePieceProcessor(model_file=str(m["llama"] / "tokenizer.model"))
    text = likelihood_text(PROMPTS[0], "traffic light")
    assert tokenizer(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]

    # SAM: every tensor has its shape in segment_anything's own vit_b (built shape-only on the meta device), whose
    # blocks 0 (windowed) and 2 (global attention) are ours 0 and 1; the relative-position tables' shapes tell head
    # width and windowed from global blocks apart. The other ten blocks are the only ones missing.
    with torch.device("meta"):
        vit_b = {k: v.shape for k, v in sam_model_registry["vit_b"]().state_dict().items()}
    ours = {
        k.replace("image_encoder.blocks.1.", "image_encoder.blocks.2."): v.shape
        for k, v in torch.load(m["sam"], map_location="cpu", weights_only=True).items()
    }
    assert ours == {k: shape for k, shape in vit_b.items() if k in ours}
    assert {k.split(".")[2] for k in vit_b.keys() - ours.keys()} == {str(i) for i in (1, *range(3, 12))}
    assert all(k.startswith("image_encoder.blocks.") for k in vit_b.keys() - ours.keys())


@pytest.mark.integration
@pytest.mark.slow
def test_caption_reward_serves_blip2_captions_in_the_clip_l14_text_space(fleet, real_width_models):
    """BLIP-2 OPT-2.7b captions, embedded by the text tower of a full CLIPModel checkpoint (the cluster profile's
    `text_encoder.kind: clip`), served and in-process alike."""
    from transformers import CLIPModel, CLIPProcessor

    from services.clip import clip_embeddings

    m = real_width_models
    app = cluster_app("caption")
    config = app["args"]["reward_config"]
    replace(config, {"captioner": str(m["blip2"]), "dtype": "float32", "text_encoder.source": str(m["clip"])})
    assert config["text_encoder"]["kind"] == "clip"
    samples, prompts = images(2), PROMPTS

    def tower_is_the_checkpoints(reward):
        # CLIPTextModelWithProjection from a CLIPModel checkpoint: the same projection and pooling as the full model
        # (a tower config without projection_dim, or a missed key, would give other embeddings).
        clip = CLIPModel.from_pretrained(m["clip"])
        _, reference = clip_embeddings(clip, CLIPProcessor.from_pretrained(m["clip"]), None, prompts, "cpu")
        np.testing.assert_allclose(reward.embed(prompts).numpy(), reference.numpy(), atol=ATOL)

    expected, info = score_in_process(app, samples, prompts, check=tower_is_the_checkpoints)
    with served(app, fleet.grpc_target) as client:
        describe = client.describe()
        results = client.score(samples, prompts)

    assert_served_like_in_process(results, expected, describe, info)
    assert [r.caption for r in results] == [o.caption for o in expected]
    assert all(r.caption for r in results)  # words of the tokenizer, not ids it cannot decode
    assert {(model.role, model.source) for model in describe.models} == {
        ("captioner", str(m["blip2"])),
        ("text_encoder:clip", str(m["clip"])),
    }
    assert json.loads(describe.config_json)["dtype"] == "float32"


@pytest.mark.integration
@pytest.mark.slow
def test_semantic_reward_serves_sam_segments_labelled_by_clip_and_rated_by_the_llm(fleet, real_width_models):
    """SAM vit_b widths -> CLIP ViT-L/14 labels -> the 4096-wide Llama on the transformers backend (likelihood mode,
    tokenizer from tokenizer.model), served and in-process alike."""
    m = real_width_models
    app = cluster_app("semantic")
    config = app["args"]["reward_config"]
    replace(
        config,
        {
            "sam.model_type": "custom",
            "sam.checkpoint": str(m["sam"]),
            # The point-prompt grid: 32 x 32 prompts take about 10 minutes per image on 2 cores (most of it in
            # post-processing the random masks); 2 x 2 take seconds, one of the profile's 64-prompt decoder batches.
            "sam.points_per_side": 2,
            "labeler.clip": str(m["clip"]),
            "llm.model": str(m["llama"]),
            "llm.backend": "transformers",  # vLLM is GPU-only
            "llm.dtype": "float32",
        },
    )
    assert config["llm"]["mode"] == "likelihood"
    config["sam"].update({k: v for k, v in REAL_WIDTH_SAM.items() if k != "model_type"})
    # Random weights predict noise IoUs and unstable masks: SAM's quality filters would drop every mask.
    config["sam"].update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    samples, prompts = images(1), PROMPTS[:1]

    expected, info = score_in_process(app, samples, prompts)
    with served(app, fleet.grpc_target) as client:
        describe = client.describe()
        results = client.score(samples, prompts)

    assert_served_like_in_process(results, expected, describe, info)
    for result, local in zip(results, expected, strict=True):
        assert result.segments, "no segment survived: the LLM and the labels were not exercised"
        assert [s.label for s in result.segments] == [s.label for s in local.segments]
        for got, want in zip(result.segments, local.segments, strict=True):
            assert got.area_fraction == pytest.approx(want.area_fraction, abs=ATOL)
            assert got.label_confidence == pytest.approx(want.label_confidence, abs=ATOL)
            assert got.likelihood == pytest.approx(want.likelihood, abs=ATOL)
            assert 0.0 < got.area_fraction <= 1.0 and 0.0 <= got.likelihood <= 1.0
        assert result.reward == pytest.approx(np.mean([s.likelihood for s in result.segments]), abs=ATOL)
        assert result.components["num_segments"] == len(result.segments)


@pytest.mark.integration
@pytest.mark.slow
def test_alignment_reward_serves_a_reward_directory_on_clip_l14(fleet, real_width_models):
    """A reward directory as `rewardfleet train-reward` writes it, on the real-width CLIP, served and in-process
    alike."""
    m = real_width_models
    app = cluster_app("alignment")
    replace(app["args"]["reward_config"], {"model_dir": str(m["alignment"])})
    samples, prompts = images(2), PROMPTS

    expected, info = score_in_process(app, samples, prompts)
    with served(app, fleet.grpc_target) as client:
        describe = client.describe()
        results = client.score(samples, prompts)

    assert_served_like_in_process(results, expected, describe, info)
    assert all(-1.0 <= r.components["clip_score"] <= 1.0 for r in results)
    assert {model.role: model.source for model in describe.models}["clip"] == str(m["alignment"] / "clip")
