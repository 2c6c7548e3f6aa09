"""Learned alignment reward vs CLIP score on the synthetic feedback testbed, with and without the augmentation.

    .venv/bin/python benchmarks/alignment_testbed.py --jobs 2       # seeds 0-4, two at a time (about 15 minutes)
    .venv/bin/python benchmarks/alignment_testbed.py --seeds 0 --set lambda_cls=1

For each seed, builds the testbed under `<testbed>_seed<N>` once (prompt split, stand-in CLIP, feedback), then trains
the reward twice on it, side by side: lambda_cls = 0.5 (prompt-classification augmentation, Lee et al.) and
lambda_cls = 0 (plain MSE). Held-out feedback uses prompts never seen in training, in early stopping or by the
stand-in CLIP. Prints accuracy and AUC of each against the CLIP-score baseline, then a table over the seeds. Each
seed runs on one CPU thread; `--jobs` runs that many seeds at once in separate processes.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from services.config import apply_overrides, from_dict, load_yaml, replace
from trainer.reward_training import RewardTrainingConfig, format_evaluation, train_reward


def run_seed(base: RewardTrainingConfig, seed: int, lambdas: tuple[float, float]) -> tuple[str, tuple]:
    """Trains with each lambda on this seed's testbed; returns (printable report, (seed, acc per lambda, CLIP acc))."""
    import torch

    torch.set_num_threads(1)  # the testbed's pretraining too: one thread per seed
    results, report = {}, []
    for lam in lambdas:
        config = replace(
            base,
            seed=seed,
            lambda_cls=lam,
            testbed=f"{base.testbed}_seed{seed}",
            out_dir=f"{base.out_dir}_seed{seed}_lambda{lam}",
        )
        results[lam] = train_reward(config, progress=False)
        report += [f"\nseed {seed}, lambda_cls = {lam}  (N = {config.num_prompts}, T = {config.temperature})"]
        report += [format_evaluation(results[lam])]
    row = (
        seed,
        *(results[lam]["learned reward"]["accuracy"] for lam in lambdas),
        results[lambdas[0]]["CLIP score"]["accuracy"],
    )
    return "\n".join(report), row


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="trainer/configs/reward_testbed.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process")
    parser.add_argument("--set", action="append", default=[], help="override a field, e.g. --set lambda_cls=1")
    args = parser.parse_args()
    base = from_dict(RewardTrainingConfig, apply_overrides(load_yaml(args.config), args.set))
    lambdas = (base.lambda_cls or 0.5, 0.0)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_seed, base, seed, lambdas) for seed in args.seeds]
        rows = []
        for future in futures:
            report, row = future.result()
            print(report, flush=True)
            rows.append(row)

    print(f"\nheld-out accuracy; gain = learned (lambda = {lambdas[0]}) - CLIP score, in points")
    print(f"{'seed':>4}  {f'lambda={lambdas[0]}':>11}  {'lambda=0':>9}  {'CLIP score':>10}  {'gain':>6}  {'aug':>6}")
    for seed, with_aug, without, clip in rows:
        gain, aug = 100 * (with_aug - clip), 100 * (with_aug - without)
        print(f"{seed:>4}  {with_aug:>11.3f}  {without:>9.3f}  {clip:>10.3f}  {gain:>+6.1f}  {aug:>+6.1f}")
    if len(rows) > 1:
        table = np.array([r[1:] for r in rows])  # (seeds, 3): lambda > 0, lambda = 0, CLIP score
        mean, gains, augs = table.mean(axis=0), 100 * (table[:, 0] - table[:, 2]), 100 * (table[:, 0] - table[:, 1])
        print(
            f"{'mean':>4}  {mean[0]:>11.3f}  {mean[1]:>9.3f}  {mean[2]:>10.3f}  {gains.mean():>+6.1f}  "
            f"{augs.mean():>+6.1f}   (SE of the mean: gain {_se(gains):.1f}, aug {_se(augs):.1f} points)"
        )


if __name__ == "__main__":
    main()
