"""Mixed-precision fine-tuning on CPU through the job's own setup and step (trainer/training.py: setup_training,
train_step): model.dtype is honoured for every pipeline source, bf16 and fp16 steps agree with the fp32 step, fp16
loss scaling keeps small gradients from flushing to zero, and checkpoints resume onto the worker's device.

Gradients are compared as ||g - g_fp32|| / ||g_fp32|| over every trainable weight. Half precision rounds each
operation to a relative 2^-8 (bf16) or 2^-11 (fp16) of its value; the error of a gradient grows with the depth it
flows through (the tiny UNet's ~30 layers, forward and backward). The bounds are about ten roundings of the format:
bf16 4% (10 x 2^-8), fp16 0.5% (10 x 2^-11). Measured here: bf16 0.8-1.3%, fp16 with the scaler 0.13-0.16%, fp16
without the scaler 5.3% on the LoRA gradients at SD 1.5's 64 x 64 latents, 78 of 8192 of them flushed to exact zeros
(the underflow the scaler fixes).
"""

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint, rng_state, write_checkpoint
from trainer.config import load_finetune_config
from trainer.local_models.tiny import tiny_stable_diffusion
from trainer.sampling import load_pipeline, resolve_dtype, sample_images
from trainer.training import DenoisingBatch, encode_prompts, setup_training, train_step

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative gradient error bounds against fp32 (see the module docstring), and of the loss (one rounding of the
# prediction's few thousand elements averages out: 10x tighter).
GRAD_RTOL = {"bfloat16": 0.04, "float16": 0.005}
LOSS_RTOL = {"bfloat16": 0.004, "float16": 0.0005}
# Sampled latents against fp32's (2 guided steps through the UNet and the text encoder): 20 roundings of the format,
# as at real widths (tests/trainer/test_real_architectures.py); measured here bf16 1.2%, fp16 0.17%.
LATENT_RTOL = {"bfloat16": 20 * 2**-8, "float16": 20 * 2**-11}
SAMPLE_PROMPTS, SAMPLE_SEEDS = ["two red dogs", "one cat"], [3, 4]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    """A Stable Diffusion 1.5-layout directory (model_index.json, unet/, vae/, text_encoder/, ...) written by
    diffusers' save_pretrained: what model.pretrained=<path> points at."""
    path = tmp_path_factory.mktemp("tiny-sd15")
    tiny_stable_diffusion(seed=0, image_size=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp32_sample_latents():
    """The fp32 job's sampled latents of SAMPLE_PROMPTS / SAMPLE_SEEDS, which each half dtype's sample is held to."""
    config = job_config("model.dtype=float32", "sampling.steps=2")
    setup = setup_training(config, "cpu")
    return sample_images(setup.pipe, SAMPLE_PROMPTS, SAMPLE_SEEDS, config.sampling, 16).latents


def job_config(*overrides):
    """The job's config as `rewardfleet train --set ...` builds it (the local preset with overrides)."""
    tiny = ["model.pretrained=tiny", "model.resolution=16", "optim.method=lora"]
    return load_finetune_config(None, [*tiny, *overrides])


def perturb_lora_b(setup, seed=1):
    """Non-zero LoRA B matrices (peft initialises them to zero, which zeroes every A gradient), as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in setup.pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def fixed_batch(setup, side: int, n: int = 2) -> DenoisingBatch:
    """n (latent, prompt, noise, timestep) samples, the same for every dtype; latents (n, 4, side, side)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, side, side, generator=generator)  # SD's latents are about unit variance
    noise = torch.randn(n, 4, side, side, generator=generator)
    cond = encode_prompts(setup.pipe, ["two red dogs", "one cat on the grass"][:n], {})  # (n, 16, 32) model.dtype
    return DenoisingBatch(latents, cond, noise, torch.tensor([100, 700][:n]))


def one_step(dtype: str, method: str, side: int, scaler: bool = True):
    """(loss, flat fp32 gradient as the optimizer saw it, setup) of one train_step at `dtype`."""
    config = job_config(f"model.dtype={dtype}", f"optim.method={method}")
    setup = setup_training(config, "cpu")
    if not scaler:
        setup.scaler = torch.amp.GradScaler("cpu", enabled=False)
    if method == "lora":
        perturb_lora_b(setup)
    loss = train_step(setup, setup.pipe.unet, fixed_batch(setup, side), torch.ones(2), config.optim)
    grad = torch.cat([p.grad.flatten().float() for p in setup.params])  # unscaled by train_step before clipping
    return loss, grad, setup


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


# --- model.dtype ---------------------------------------------------------------------------------------------------


def test_auto_dtype_is_fp32_on_cpu_and_explicit_dtypes_are_kept():
    assert resolve_dtype("auto", "cpu") == torch.float32
    for name, dtype in DTYPES.items():
        assert resolve_dtype(name, "cpu") == dtype


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "auto"])
@pytest.mark.parametrize("source", ["tiny", "saved"])
def test_model_dtype_is_honoured_for_every_source(dtype, source, saved_sd):
    config = job_config(f"model.dtype={dtype}", f"model.pretrained={'tiny' if source == 'tiny' else saved_sd}")
    pipe = load_pipeline(config.model)
    expected = torch.float32 if dtype == "auto" else DTYPES[dtype]  # auto is fp32 on CPU
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {expected}, type(module).__name__


# --- One training step per dtype, against fp32 ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_lora_step_agrees_with_fp32_at_sd_latent_size(dtype):
    """LoRA on the half UNet at SD 1.5's latent size (64 x 64, i.e. 512 px): the frozen weights are half, the
    adapters fp32, the step equals fp32's within the format's bound."""
    loss32, grad32, _ = one_step("float32", "lora", 64)
    loss, grad, setup = one_step(dtype, "lora", 64)
    assert {p.dtype for p in setup.params} == {torch.float32}
    assert setup.pipe.unet.conv_in.weight.dtype == DTYPES[dtype]  # the frozen base weights stay half
    assert loss == pytest.approx(loss32, rel=LOSS_RTOL[dtype])
    assert relative_error(grad, grad32) < GRAD_RTOL[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_full_step_agrees_with_fp32(dtype):
    """method=full: the whole UNet trains in fp32 under autocast, the VAE and text encoder are half. 16 x 16
    latents: CPU fp16 weight gradients of convolutions are slow."""
    loss32, grad32, _ = one_step("float32", "full", 16)
    loss, grad, setup = one_step(dtype, "full", 16)
    assert {p.dtype for p in setup.params} == {torch.float32}
    assert setup.pipe.text_encoder.dtype == DTYPES[dtype]
    assert loss == pytest.approx(loss32, rel=LOSS_RTOL[dtype])
    assert relative_error(grad, grad32) < GRAD_RTOL[dtype]


def test_fp16_loss_scaling_leaves_no_spurious_zero_gradients():
    """At 64 x 64 latents the loss's gradient per prediction element is about 2 / (4 * 64 * 64 * B): below fp16's
    smallest normal number, so without scaling LoRA gradients flush to exact zeros (and lose accuracy)."""
    _, grad32, _ = one_step("float32", "lora", 64)
    assert not (grad32 == 0).any()  # every fp32 gradient is non-zero
    _, scaled, setup = one_step("float16", "lora", 64)
    assert setup.scaler.is_enabled()
    assert int((scaled == 0).sum()) == 0
    # The same step without the scaler: the test can tell.
    _, unscaled, _ = one_step("float16", "lora", 64, scaler=False)
    assert int((unscaled == 0).sum()) > 0 and relative_error(unscaled, grad32) > GRAD_RTOL["float16"]


def test_bf16_and_fp32_need_no_scaler():
    for dtype in ("float32", "bfloat16", "auto"):
        assert not setup_training(job_config(f"model.dtype={dtype}"), "cpu").scaler.is_enabled()


# --- The user-facing command on CPU: a saved SD 1.5-layout directory, LoRA, half precision ---------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_job_samples_and_trains_a_step_from_a_saved_directory_and_the_tiny_source(
    dtype, saved_sd, fp32_sample_latents
):
    """`--set model.pretrained=<dir> --set optim.method=lora --set model.dtype=...` through the job's own setup,
    sampling and step; the saved directory holds the tiny pipeline's weights, so both sources give the same step,
    and the sample agrees with fp32's within the format's bound."""
    losses = {}
    for source in ("tiny", str(saved_sd)):
        config = job_config(f"model.dtype={dtype}", f"model.pretrained={source}", "sampling.steps=2")
        setup = setup_training(config, "cpu")
        assert setup.pipe.vae.dtype == DTYPES[dtype] and setup.pipe.unet.conv_in.weight.dtype == DTYPES[dtype]
        samples = sample_images(setup.pipe, SAMPLE_PROMPTS, SAMPLE_SEEDS, config.sampling, 16)
        assert samples.latents.dtype == torch.float32 and torch.isfinite(samples.latents).all()
        assert relative_error(samples.latents, fp32_sample_latents) <= LATENT_RTOL[dtype]
        lora_b = [p for name, p in setup.pipe.unet.named_parameters() if "lora_B" in name]
        before = [p.detach().clone() for p in lora_b]
        cond = encode_prompts(setup.pipe, samples.prompts, {})
        generator = torch.Generator().manual_seed(0)
        batch = DenoisingBatch(
            samples.latents,  # (2, 4, 8, 8) fp32, as the job stores them
            cond,
            torch.randn(samples.latents.shape, generator=generator),
            torch.tensor([10, 900]),
        )
        losses[source] = train_step(setup, setup.pipe.unet, batch, torch.tensor([1.0, 0.5]), config.optim)
        assert np.isfinite(losses[source])
        # The optimizer stepped (the fp16 scaler skipped nothing): a fresh adapter's B matrices (zero-initialised)
        # all get a gradient; its A matrices get none until B is non-zero.
        assert all((p != b).any() for p, b in zip(lora_b, before, strict=True)) and len(lora_b) == 32
    assert losses["tiny"] == losses[str(saved_sd)]


# --- Checkpoints -----------------------------------------------------------------------------------------------------


def retag_storages(path, location: str) -> None:
    """Rewrites a torch.save zip so its tensors' storages are tagged `location` (e.g. "cuda:0"), as torch.save writes
    them from that device: the tag is the only thing a CUDA save of these tensors writes differently."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    old, new = b"X\x03\x00\x00\x00cpu", b"X" + len(location).to_bytes(4, "little") + location.encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            archive.writestr(info.filename, data)


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_worker_device(tmp_path):
    """fp16 LoRA: adapters, AdamW state and the GradScaler's state round-trip; optimizer tensors saved from cuda:0
    load onto the worker's device (here the CPU) instead of cuda:0."""
    config = job_config("model.dtype=float16")
    setup = setup_training(config, "cpu")
    perturb_lora_b(setup)
    train_step(setup, setup.pipe.unet, fixed_batch(setup, 8), torch.ones(2), config.optim)
    setup.scaler.update(1024.0)  # a scale other than the initial one, as after an overflow
    write_checkpoint(tmp_path, setup, "lora", {"next_round": 1}, [rng_state()])
    retag_storages(tmp_path / "optimizer.pt", "cuda:0")
    if not torch.cuda.is_available():
        # What the old `torch.load(path)` did on a CPU worker (and on a GPU worker: every rank on cuda:0).
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "optimizer.pt", weights_only=False)

    resumed = setup_training(config, "cpu")
    assert resumed.scaler.get_scale() != 1024.0
    assert load_checkpoint(tmp_path, resumed, "lora", rank=0) == {"next_round": 1}
    for p, q in zip(resumed.params, setup.params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            saved, loaded = setup.optimizer.state[q][key], resumed.optimizer.state[p][key]
            assert loaded.device.type == "cpu"
            torch.testing.assert_close(loaded, saved, rtol=0, atol=0)
    assert resumed.scaler.state_dict() == setup.scaler.state_dict()
