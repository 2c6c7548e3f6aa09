"""Real-architecture tier of the fine-tuning job: Stable Diffusion 1.5 at its released widths and file layout.

`trainer.local_models.real_width.real_width_stable_diffusion` writes SD 1.5 (580M-weight UNet, VAE, CLIP ViT-L/14 text
tower, PNDM scheduler config, CLIP tokenizer) with one layer per block and random weights, in the release's directory
layout. Each test runs the cluster preset (trainer/configs/cluster.yaml: DPM-Solver, guidance 7.5, LoRA rank 8) with
`model.pretrained=<that directory>` through the job's own code on CPU: `setup_training`, `sample_images` of one 64 px
image (8 x 8 latents, 2 steps; fp32 only, below), and one `train_step`.

Every step trains on the same inputs: the latents the fp32 pipeline samples (the `reference` fixture), one fixed
noise and timestep; so each step's loss is compared with the fp32 loss of the same inputs, and the fp32 test's own
sample with the reference (bitwise).

Tolerances, relative to fp32 (half precision rounds each operation to 2^-8 of its value in bf16, 2^-11 in fp16):
- the loss (a mean over 256 squared errors, so roundings average out): one rounding of the format, bf16 0.4% and
  fp16 0.05%; measured 0.05% and 0.005%;
- the sampled latents (2 guided steps through the UNet and the text encoder): 20 roundings, bf16 8% and fp16 1%;
  measured 2.1% and 0.26% when the half dtypes sampled here; the bound now applies at small widths (see below).

Two reductions, for CPU cost (figures on 2 cores, one torch thread):
- method=full steps with SGD instead of the job's AdamW: AdamW's two fp32 moments of the 580M UNet weights put the
  fp32 full step at 10.8 GB peak RSS, 6.2 GB with SGD. SGD keeps the rest of the step (fp32 trained weights,
  autocast, loss scaling, unscale, clipping) and makes the update checkable exactly.
- no fp16 full step: torch's CPU fp16 convolution weight gradient takes 47 s for that one step at 64 px (0.7 s per
  convolution; 38 s at 32 px, 32 s at 16 px), against 1-5 s for every other step. fp16 is covered at real widths by
  the LoRA step (half frozen UNet, GradScaler) and the fp32-master full step by bf16; the fp16 full step at small
  widths by tests/trainer/test_mixed_precision.py.
- no fp32 or bf16 full step (46 s and 41 s of CI time, which runs over its 20 minutes with them): the LoRA steps
  cover every dtype at real widths, and tests/trainer/test_mixed_precision.py runs the full step in fp32, bf16 and
  fp16 at small widths.
- no half-precision sample: on a CPU without native half-precision convolution (AVX2 only, as on the AMD EPYC
  machines CI may draw), the VAE decoder's convolutions at 64 px run in torch's slow fallback: 75 s for one image in
  each half dtype (CI ran over its 20 minutes with them), against seconds with AVX-512 FP16/BF16 or AMX. The fp32
  sample here covers the job's sampler at real widths; tests/trainer/test_mixed_precision.py samples in both half
  dtypes at small widths and holds their latents to fp32's within the bound below; the half steps here still train
  on the real-width fp32 sample.

Cost: about 17 s to build the directory (2.7 GB of fp32 safetensors), then 3-9 s per test (load, sample, step)
(the half-precision steps on a CPU without native half precision included); 6.7 GB peak RSS for the module.
"""

import gc
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from transformers import CLIPTokenizer

from trainer.config import CONFIG_DIR, load_finetune_config
from trainer.local_models.real_width import real_width_stable_diffusion
from trainer.losses import denoising_loss_per_sample, reward_weighted_loss
from trainer.sampling import load_pipeline, sample_images, set_scheduler
from trainer.training import DenoisingBatch, encode_prompts, setup_training, train_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The step's loss, relative to fp32's (module docstring).
LOSS_RTOL = {"float32": 1e-5, "bfloat16": 2**-8, "float16": 2**-11}
# (dtype, method) of the steps: the LoRA step in every dtype, no full step (module docstring).
STEPS = [("float32", "lora"), ("bfloat16", "lora"), ("float16", "lora")]
PROMPT = "two green dogs in the city"
SEED = 0
RESOLUTION = 64  # 8 x 8 latents
TIMESTEP = 500
# Transformer blocks of SD 1.5's UNet at one layer per block: 3 down, 3 x 2 up (layers_per_block + 1), 1 mid; each
# has self- and cross-attention with the 4 LoRA targets (to_q, to_k, to_v, to_out.0).
LORA_LAYERS = (3 + 3 * 2 + 1) * 2 * 4
# At 8 x 8 latents the mid block runs at 1 x 1: its self-attention attends over one token, whose softmax weight is 1
# whatever the query and key, so to_q and to_k get no gradient there (at SD's 64 x 64 latents it has 64 tokens).
ONE_TOKEN_ATTENTION = "mid_block.attentions.0.transformer_blocks.0.attn1.to_"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The real-width directory; removed after the module (2.7 GB, and pytest keeps the last 3 runs' tmp dirs)."""
    path = real_width_stable_diffusion(tmp_path_factory.mktemp("real-width-sd15"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def job_config(path, dtype: str, method: str):
    """The cluster preset with the real-width directory, CPU-sized sampling, and `dtype` / `method`."""
    overrides = [
        f"model.pretrained={path}",
        f"model.resolution={RESOLUTION}",
        f"model.dtype={dtype}",
        f"optim.method={method}",
        "sampling.steps=2",
        "sampling.samples_per_prompt=1",
    ]
    return load_finetune_config(CONFIG_DIR / "cluster.yaml", overrides)


@pytest.fixture(scope="module")
def reference(sd15):
    """The fp32 pipeline's sample of PROMPT and the fp32 denoising loss of the inputs every step trains on."""
    config = job_config(sd15, "float32", "lora")
    pipe = load_pipeline(config.model)
    set_scheduler(pipe, config.sampling)
    samples = sample_images(pipe, [PROMPT], [SEED], config.sampling, RESOLUTION)
    noise = torch.randn(samples.latents.shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([TIMESTEP])
    with torch.no_grad():
        cond = encode_prompts(pipe, [PROMPT], {})
        per_sample = denoising_loss_per_sample(
            pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), samples.latents, cond, noise, timesteps
        )
        loss = reward_weighted_loss(per_sample, torch.ones(1)).item()
    del pipe
    gc.collect()
    return {"latents": samples.latents, "noise": noise, "timesteps": timesteps, "loss": loss}


def test_the_directory_has_the_release_layout_and_schedule(sd15):
    index = json.loads((sd15 / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert sorted(p.name for p in sd15.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    scheduler = PNDMScheduler.from_pretrained(sd15 / "scheduler")
    # The sampler the job swaps in keeps SD 1.5's schedule; DDIM's clip_sample comes from the hidden key (default
    # True would clip the predicted x0 to [-1, 1], which SD's latents exceed).
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        swapped = cls.from_config(scheduler.config)
        assert swapped.config.beta_schedule == "scaled_linear" and swapped.config.steps_offset == 1
        torch.testing.assert_close(swapped.betas, scheduler.betas)
    assert DDIMScheduler.from_config(scheduler.config).config.clip_sample is False
    tokenizer = CLIPTokenizer.from_pretrained(sd15 / "tokenizer")
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids


@pytest.mark.parametrize(("dtype", "method"), STEPS)
def test_the_job_samples_and_trains_a_step_at_real_widths(dtype, method, sd15, reference):
    config = job_config(sd15, dtype, method)
    setup = setup_training(config, "cpu")
    pipe, unet = setup.pipe, setup.pipe.unet
    half = DTYPES[dtype]

    # Frozen weights in model.dtype, trained ones in fp32; loss scaling for fp16 only.
    for module in (pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {half}, type(module).__name__
    assert setup.params and {p.dtype for p in setup.params} == {torch.float32}
    assert setup.scaler.is_enabled() == (dtype == "float16")
    if method == "lora":
        assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {half}
        lora_b = {n: p for n, p in unet.named_parameters() if "lora_B" in n}
        assert len(lora_b) == LORA_LAYERS
        still = {f"{ONE_TOKEN_ATTENTION}{x}.lora_B.default.weight" for x in ("q", "k")}
        assert still <= set(lora_b)
        watched = {n: p for n, p in lora_b.items() if n not in still}
    else:
        assert all(p.requires_grad for p in unet.parameters()) and len(setup.params) == len(list(unet.parameters()))
        setup.optimizer = torch.optim.SGD(setup.params, lr=config.optim.lr)  # see the module docstring
        names = (
            "conv_in.weight",
            "time_embedding.linear_1.weight",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "conv_out.weight",
        )
        watched = {n: p for n, p in unet.named_parameters() if n in names}
        assert len(watched) == len(names)
    before = {n: p.detach().clone() for n, p in watched.items()}

    # One image through the job's sampler (DPM-Solver from the PNDM config, guidance, VAE decode), in fp32 only
    # (module docstring).
    if dtype == "float32":
        samples = sample_images(pipe, [PROMPT], [SEED], config.sampling, RESOLUTION)
        assert samples.images.shape == (1, RESOLUTION, RESOLUTION, 3) and samples.images.dtype == np.uint8
        assert samples.latents.shape == (1, 4, 8, 8) and samples.latents.dtype == torch.float32
        assert torch.isfinite(samples.latents).all()
        assert torch.equal(samples.latents, reference["latents"])  # the same seed and weights give the same latents

    # One step on the fp32 sample, the same inputs for every dtype and method.
    cond = encode_prompts(pipe, [PROMPT], {})
    assert cond.shape == (1, 77, 768) and cond.dtype == half
    batch = DenoisingBatch(reference["latents"], cond, reference["noise"], reference["timesteps"])
    loss = train_step(setup, unet, batch, torch.ones(1), config.optim)
    assert np.isfinite(loss)
    # The step's loss is the base model's (a fresh adapter's B is zero), so it matches the fp32 forward's.
    assert loss == pytest.approx(reference["loss"], rel=LOSS_RTOL[dtype])
    if dtype == "float16":
        assert setup.scaler.get_scale() == 2.0**16  # no overflow, so the scaler did not skip the step

    if method == "lora":
        # A zero-initialised B gets a gradient at once (but the one-token attention's q and k); AdamW moves them.
        for name, p in watched.items():
            assert (p != before[name]).any(), name
    else:
        # SGD: the fp32 weights moved by exactly -lr x the unscaled, clipped gradient train_step left in .grad.
        for name, p in watched.items():
            assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), name
            assert torch.equal(p.detach(), before[name].add(p.grad, alpha=-config.optim.lr)), name
            assert (p != before[name]).any(), name
