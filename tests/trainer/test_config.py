"""Fine-tuning config: presets load, unknown keys are rejected with the valid ones, dotted overrides apply."""

from pathlib import Path

import pytest

from trainer.config import CONFIG_DIR, FinetuneConfig, load_finetune_config

# reward_testbed.yaml configures the alignment reward's training, not fine-tuning.
PRESETS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name != "reward_testbed.yaml")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load(preset):
    config = load_finetune_config(preset)
    assert isinstance(config, FinetuneConfig)


def test_local_and_cluster_presets():
    local = load_finetune_config(CONFIG_DIR / "local.yaml")
    # The local preset fine-tunes the testbed world's model and reads its held-out images with the oracle.
    assert local.model.pretrained.endswith("world/text_to_image") and not local.run.use_gpu
    assert local.testbed.oracle and local.prompts.eval_file is not None
    cluster = load_finetune_config(CONFIG_DIR / "cluster.yaml")
    assert cluster.model.pretrained != "tiny" and cluster.run.use_gpu and cluster.optim.method == "lora"


def test_overrides_and_unknown_keys():
    weights = ["rewards.weights={caption: 1, semantic: 2}", "rewards.monitor=[]"]
    config = load_finetune_config(None, ["run.rounds=7", "optim.lr=1e-3", *weights])
    assert config.run.rounds == 7 and config.optim.lr == 1e-3
    assert config.rewards.weights == {"caption": 1, "semantic": 2} and config.rewards.primary == "caption"
    with pytest.raises(ValueError, match=r"FinetuneConfig\.optim: unknown key\(s\) \['lrr'\]; valid keys: .*'lr'"):
        load_finetune_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="selection.strategy must be one of"):
        load_finetune_config(None, ["selection.strategy=best"])
    with pytest.raises(ValueError, match="assemble fuses several rewards"):
        load_finetune_config(None, ["selection.strategy=assemble"])
    with pytest.raises(ValueError, match="beta > 0 needs optim.pretrain_data"):
        load_finetune_config(None, ["optim.beta=0.5", "optim.pretrain_data=null"])
    with pytest.raises(ValueError, match="select_by"):
        load_finetune_config(None, ["rewards.select_by=caption"])


def test_precision_and_decode_fields():
    default = load_finetune_config(None, ["model.dtype=auto"])
    assert FinetuneConfig().model.dtype == "auto" and default.model.dtype == "auto"
    with pytest.raises(ValueError, match=r"model.dtype must be one of \['auto', 'float32', 'float16', 'bfloat16'\]"):
        load_finetune_config(None, ["model.dtype=fp16"])
    assert load_finetune_config(None, ["sampling.decode_batch_size=3"]).sampling.decode_batch_size == 3
    with pytest.raises(ValueError, match="decode_batch_size must be >= 1"):
        load_finetune_config(None, ["sampling.decode_batch_size=0"])
    cluster = load_finetune_config(CONFIG_DIR / "cluster.yaml")
    # runwayml/stable-diffusion-v1-5 was deleted from the hub in 2024; this is its maintained copy.
    assert cluster.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cluster.model.dtype == "auto"
    k = cluster.sampling.samples_per_prompt
    assert cluster.sampling.decode_batch_size < cluster.sampling.prompts_per_batch * k


def test_monitored_rewards():
    default = FinetuneConfig()
    assert default.rewards.monitor == () and default.rewards.hacking_k == 2.0
    assert default.rewards.scored == ["jpeg_compressibility"]  # without a monitor, only the optimised rewards
    # The local preset optimises alignment and monitors the world's other rewards.
    assert load_finetune_config(None).rewards.scored == ["alignment", "caption", "jpeg_compressibility"]
    config = load_finetune_config(
        None,
        [
            "rewards.weights={alignment: 1, caption: 1}",
            "rewards.monitor=[semantic, jpeg_compressibility]",
            "rewards.hacking_k=3",
        ],
    )
    assert config.rewards.monitor == ("semantic", "jpeg_compressibility") and config.rewards.hacking_k == 3.0
    assert config.rewards.scored == ["alignment", "caption", "semantic", "jpeg_compressibility"]
    assert config.rewards.primary == "alignment"
    with pytest.raises(ValueError, match=r"rewards.monitor must not repeat an application, got \['semantic'\]"):
        load_finetune_config(None, ["rewards.monitor=[semantic, caption, semantic]"])
    with pytest.raises(ValueError, match=r"rewards.monitor must not name applications of rewards.weights .*'caption'"):
        load_finetune_config(None, ["rewards.weights={caption: 1}", "rewards.monitor=[semantic, caption]"])
    with pytest.raises(ValueError, match="rewards.hacking_k must be > 0"):
        load_finetune_config(None, ["rewards.hacking_k=0"])


def test_testbed_metrics_need_testbed_prompts(tmp_path):
    from trainer.finetune import check_inputs

    default = FinetuneConfig()
    assert default.testbed.oracle is False and default.testbed.fidelity_clip is None
    assert default.testbed.fidelity_renders == 16 and not default.testbed.enabled
    # Generated held-out prompts are the papers' ("two green dogs ..."): refused when the config loads.
    generated = [
        "prompts.train_file=null",
        "prompts.eval_file=null",
        "testbed.oracle=false",
        "testbed.fidelity_clip=null",
    ]
    for field in ("testbed.oracle=true", "testbed.fidelity_clip=/some/clip"):
        with pytest.raises(ValueError, match=rf"{field.split('=')[0]} needs testbed prompts .* set prompts.eval_file"):
            load_finetune_config(None, [*generated, field])
    with pytest.raises(ValueError, match="testbed.fidelity_renders must be >= 1"):
        load_finetune_config(None, ["testbed.fidelity_renders=0"])

    # A prompt file's contents are checked when the job starts, before any worker: the first bad prompt is named.
    bad = tmp_path / "bad.txt"
    bad.write_text("three green balls in the city\none red cube on the beach\ntwo green dogs in the city\n")
    config = load_finetune_config(None, [*generated, "testbed.oracle=true", f"prompts.eval_file={bad}"])
    with pytest.raises(ValueError) as error:
        check_inputs(config)
    assert str(error.value) == (
        "testbed.oracle needs testbed prompts: 1 of 3 held-out prompts do not parse as testbed prompts; the first, "
        "number 3: 'two green dogs in the city' is not a testbed prompt: object 'dogs' is not one of "
        "['ball', 'cube', 'pyramid', 'gem'] (plural with 's')"
    )
    good = tmp_path / "good.txt"
    good.write_text("three green balls in the city\none red cube on the beach\n")
    check_inputs(load_finetune_config(None, [*generated, "testbed.oracle=true", f"prompts.eval_file={good}"]))

    # fidelity_clip: `~` expanded when the config loads; a directory that does not exist fails at job start.
    clip = load_finetune_config(
        None, [*generated, f"prompts.eval_file={good}", "testbed.fidelity_clip=~/no/such/clip"]
    )
    assert clip.testbed.fidelity_clip == str(Path("~/no/such/clip").expanduser()) and clip.testbed.enabled
    with pytest.raises(FileNotFoundError, match="testbed.fidelity_clip: local model path .* does not exist"):
        check_inputs(clip)


def test_worker_resources_are_custom_and_positive():
    config = load_finetune_config(None, ["run.worker_resources={trainer_node: 1}"])
    assert config.run.worker_resources == {"trainer_node": 1.0}
    with pytest.raises(ValueError, match=r"\['GPU'\] are set by cpus_per_worker and use_gpu"):
        load_finetune_config(None, ["run.worker_resources={GPU: 1}"])
    with pytest.raises(ValueError, match="must be positive"):
        load_finetune_config(None, ["run.worker_resources={trainer_node: 0}"])
