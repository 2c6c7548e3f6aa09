"""The reward-weighted denoising loss against a hand computation on a tiny Stable Diffusion UNet."""

import pytest
import torch

from trainer.local_models.tiny import tiny_stable_diffusion
from trainer.losses import denoising_loss_per_sample, reward_weighted_loss


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion(seed=0)


def _batch(pipe, n, seed):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (n,), generator=g)
    tokens = pipe.tokenizer(
        [f"prompt {i}" for i in range(n)], padding="max_length", max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        text = pipe.text_encoder(tokens.input_ids)[0]  # (n, 16, 32), frozen
    return latents, noise, timesteps, text


def test_weighted_loss_equals_a_hand_computed_value(pipe):
    latents, noise, timesteps, text = _batch(pipe, 3, seed=0)
    pre_latents, pre_noise, pre_t, pre_text = _batch(pipe, 2, seed=1)
    weights = torch.tensor([0.5, 0.0, 2.5])
    beta = 0.3
    per_sample = denoising_loss_per_sample(pipe.unet, pipe.scheduler, latents, text, noise, timesteps)
    pretrain = denoising_loss_per_sample(pipe.unet, pipe.scheduler, pre_latents, pre_text, pre_noise, pre_t)
    loss = reward_weighted_loss(per_sample, weights, pretrain, beta)

    # By hand, one sample at a time: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; L = mean((eps_hat - eps)^2).
    def by_hand(x0, eps, t, cond):
        abar = pipe.scheduler.alphas_cumprod[t]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        with torch.no_grad():
            eps_hat = pipe.unet(x_t[None], t[None], cond[None]).sample[0]
        return float(((eps_hat - eps) ** 2).mean())

    model_terms = [by_hand(latents[i], noise[i], timesteps[i], text[i]) for i in range(3)]
    pre_terms = [by_hand(pre_latents[i], pre_noise[i], pre_t[i], pre_text[i]) for i in range(2)]
    expected = (0.5 * model_terms[0] + 0.0 * model_terms[1] + 2.5 * model_terms[2]) / 3 + beta * sum(pre_terms) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_gradients_reach_the_unet_not_the_frozen_text_encoder(pipe):
    latents, noise, timesteps, text = _batch(pipe, 2, seed=2)
    pipe.unet.zero_grad()
    loss = reward_weighted_loss(
        denoising_loss_per_sample(pipe.unet, pipe.scheduler, latents, text, noise, timesteps), torch.ones(2)
    )
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.unet.parameters())
    assert all(p.grad is None for p in pipe.text_encoder.parameters())


def test_beta_without_pretraining_data_and_shape_mismatch_are_errors():
    losses = torch.ones(3)
    with pytest.raises(ValueError, match="pre-training"):
        reward_weighted_loss(losses, torch.ones(3), None, beta=0.1)
    with pytest.raises(ValueError, match="must match"):
        reward_weighted_loss(losses, torch.ones(2))
