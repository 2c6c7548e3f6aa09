"""What limits fine-tuning on the testbed world: the selection, or training on the model's own samples?

    .venv/bin/python benchmarks/self_training.py --data oracle      # best of K by the oracle (a ceiling on selection)
    .venv/bin/python benchmarks/self_training.py --data renders     # rendered scenes of the same prompts instead
    .venv/bin/python benchmarks/self_training.py --data oracle --set optim.method=lora

A diagnostic, not a fine-tuning method: the oracle is the world's evaluator, and here it picks the training data only
to bound what any reward could do. One process, no fleet: each round samples K images of each of the local preset's
training prompts with the job's sampler, keeps one per prompt (`oracle`: the one with the most attributes right;
`renders`: a fresh render of the prompt, the supervised control; `reconstructions`: the render through the VAE and
back, what decoding adds), and trains on them with the job's own
`encode_images` and `train_step` (trainer/training.py), epochs_per_round passes at the preset's batch size. After
each round the oracle reads fresh samples of the training prompts and of the first half of the held-out prompts.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("oracle", "renders", "reconstructions"), required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-seeds", type=int, default=4, help="Samples per prompt in each evaluation.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value on the preset.")
    args = parser.parse_args()

    import torch

    from trainer.config import load_finetune_config
    from trainer.local_models.oracle import attribute_accuracy, read_attributes
    from trainer.local_models.scenes import ATTRIBUTES, parse_prompt, render_image
    from trainer.prompts import load_prompts
    from trainer.sampling import sample_images
    from trainer.training import DenoisingBatch, encode_images, encode_prompts, setup_training, train_step

    torch.set_num_threads(1)
    config = load_finetune_config(None, ["optim.lr=1e-4", *args.overrides])
    setup = setup_training(config)
    pipe, optim, sampling = setup.pipe, config.optim, config.sampling
    train = load_prompts(os.path.expanduser(config.prompts.train_file))
    heldout = load_prompts(os.path.expanduser(config.prompts.eval_file))
    heldout = heldout[: len(heldout) // 2]
    k, resolution = sampling.samples_per_prompt, config.model.resolution
    generator = torch.Generator().manual_seed(config.run.seed)
    cache: dict = {}

    def accuracy(prompts: list[str], first_seed: int) -> float:
        repeated = [p for p in prompts for _ in range(args.eval_seeds)]
        pipe.unet.eval()
        samples = sample_images(
            pipe, repeated, list(range(first_seed, first_seed + len(repeated))), sampling, resolution
        )
        return attribute_accuracy(samples.images, [parse_prompt(p) for p in repeated])["all"]

    print(f"data={args.data} lr={optim.lr} method={optim.method} {len(train)} training prompts x K={k}", flush=True)
    print("| round | picks all four right | loss | training prompts | held-out prompts |\n|---:|---:|---:|---:|---:|")
    print(f"| 0 | | | {accuracy(train, 10**6):.3f} | {accuracy(heldout, 2 * 10**6):.3f} |", flush=True)
    for rnd in range(1, args.rounds + 1):
        # 1. K samples per training prompt with the job's sampler; the one with the most attributes right.
        pipe.unet.eval()
        prompts = [p for p in train for _ in range(k)]
        samples = sample_images(pipe, prompts, [rnd * 10**4 + i for i in range(len(prompts))], sampling, resolution)
        right = np.array(
            [
                sum(read_attributes(im)[a] == parse_prompt(p)[a] for a in ATTRIBUTES)
                for im, p in zip(samples.images, prompts, strict=True)
            ]
        )  # (P * K,)
        best = right.reshape(-1, k).argmax(axis=1) + np.arange(len(train)) * k  # (P,)
        images = samples.images[best]  # (P, S, S, 3)
        if args.data != "oracle":
            rng = np.random.default_rng([config.run.seed, rnd])
            images = np.stack([render_image(parse_prompt(p), rng, resolution) for p in train])
        if args.data == "reconstructions":  # the renders through the VAE and back to uint8, as samples are decoded
            with torch.no_grad():
                decoded = pipe.vae.decode(encode_images(pipe, images, len(images)) / pipe.vae.config.scaling_factor)
            images = pipe.image_processor.postprocess(decoded.sample, output_type="np")
            images = (images * 255).round().clip(0, 255).astype(np.uint8)  # (P, S, S, 3)
        picks_right = attribute_accuracy(images, [parse_prompt(p) for p in train])["all"]
        # 2. The job's training: latents of the images, epochs_per_round shuffled passes.
        latents = encode_images(pipe, images, sampling.decode_batch_size)  # (P, C, h, w)
        pipe.unet.train()
        losses = []
        for _ in range(optim.epochs_per_round):
            order = torch.randperm(len(latents), generator=generator)
            for start in range(0, len(order), optim.batch_size):
                idx = order[start : start + optim.batch_size]
                batch = DenoisingBatch(
                    latents[idx],
                    encode_prompts(pipe, [train[i] for i in idx.tolist()], cache),
                    torch.randn(latents[idx].shape, generator=generator),
                    torch.randint(
                        0, setup.noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator
                    ),
                )
                losses.append(train_step(setup, pipe.unet, batch, torch.ones(len(idx)), optim))
        print(
            f"| {rnd} | {picks_right:.3f} | {np.mean(losses):.4f} | {accuracy(train, 10**6):.3f} | "
            f"{accuracy(heldout, 2 * 10**6):.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
