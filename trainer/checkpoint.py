"""The fine-tuning job's checkpoint: what a directory holds, and how a worker writes and restores it.

A checkpoint directory (registered with Ray Train by rank 0 after each round) holds:

    lora/pytorch_lora_weights.safetensors   the UNet's LoRA weights in diffusers' format (method=lora), or
    unet/                                   the whole UNet, save_pretrained (method=full)
    optimizer.pt                            AdamW's state
    grad_scaler.pt                          the GradScaler's state (loss scale, growth tracker); empty unless float16
    rng.pt                                  every rank's Python, NumPy and torch RNG state
    state.json                              the job state: next round, base-model held-out scores, metric history
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainer.training import TrainingSetup

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
# GradScaler state (loss scale, growth tracker); empty unless model.dtype is float16.
SCALER_FILE = "grad_scaler.pt"
RNG_FILE = "rng.pt"
LORA_DIR = "lora"
UNET_DIR = "unet"


def rng_state() -> dict:
    """This process's Python, NumPy and torch RNG state."""
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def write_checkpoint(directory: Path, setup: TrainingSetup, method: str, state: dict, rng_states: list) -> None:
    """Writes the trained weights, optimizer and scaler state, every rank's RNG state and the job state."""
    import torch

    from trainer.sampling import save_lora

    if method == "lora":
        save_lora(setup.pipe.unet, directory / LORA_DIR)
    else:
        setup.pipe.unet.save_pretrained(directory / UNET_DIR)
    torch.save(setup.optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(setup.scaler.state_dict(), directory / SCALER_FILE)
    torch.save(rng_states, directory / RNG_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state))


def load_checkpoint(directory: Path, setup: TrainingSetup, method: str, rank: int) -> dict:
    """Loads a checkpoint into `setup` (its tensors onto the setup's device, wherever they were saved from) and
    restores this rank's RNG state; returns the job state."""
    import torch

    from trainer.sampling import load_lora_into

    unet, device = setup.pipe.unet, setup.pipe.device
    if method == "lora":
        load_lora_into(unet, directory / LORA_DIR)
    else:
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(directory / UNET_DIR).state_dict())
    # Without map_location every worker would load the optimizer state onto the device it was saved from (cuda:0).
    setup.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=False))
    scaler_path = directory / SCALER_FILE
    if setup.scaler.is_enabled() and scaler_path.exists():
        state = torch.load(scaler_path, map_location="cpu", weights_only=False)
        if state:  # empty when saved by a run without loss scaling (float32 / bfloat16)
            setup.scaler.load_state_dict(state)
    rng = torch.load(directory / RNG_FILE, map_location="cpu", weights_only=False)  # set_rng_state wants CPU
    if rank < len(rng):
        random.setstate(rng[rank]["python"])
        np.random.set_state(rng[rank]["numpy"])
        torch.set_rng_state(rng[rank]["torch"])
    return json.loads((directory / STATE_FILE).read_text())
