"""Denoising losses for fine-tuning the UNet: per-sample noise-prediction MSE, reward-weighted (Lee et al. 2023).

    loss = mean_i( w_i * L_denoise(x_i, z_i) ) + beta * mean_j( L_denoise(x_j, z_j) over pre-training pairs )

L_denoise is the usual diffusion objective at a random timestep: the MSE between the UNet's prediction and its
target (the noise for epsilon-prediction models like SD 1.5, the velocity for v-prediction ones), averaged over
the latent's elements, so there is one value per sample. The text encoder stays frozen. RAFT-style selection is the
special case of weights 1 on the kept samples.
"""

from __future__ import annotations


def denoising_loss_per_sample(unet, scheduler, latents, encoder_hidden_states, noise, timesteps):
    """(B,) noise-prediction MSE of each sample.

    latents, noise: (B, C, h, w); encoder_hidden_states: (B, L, D); timesteps: (B,) ints.
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
    prediction = unet(noisy, timesteps, encoder_hidden_states).sample  # (B, C, h, w)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    return ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))


def reward_weighted_loss(model_losses, weights, pretrain_losses=None, beta: float = 0.0):
    """mean(weights * model_losses) + beta * mean(pretrain_losses); model_losses and weights are (B,)."""
    if weights.shape != model_losses.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match the losses {tuple(model_losses.shape)}")
    loss = (weights.to(model_losses) * model_losses).mean()
    if beta > 0:
        if pretrain_losses is None or pretrain_losses.numel() == 0:
            raise ValueError("beta > 0 needs a batch of pre-training (image, prompt) pairs")
        loss = loss + beta * pretrain_losses.mean()
    return loss
