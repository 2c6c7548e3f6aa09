"""Scoring sampled images with the fleet while the trainer keeps sampling.

`BackgroundScorer.submit` sends a batch to every configured reward application (`rewards.weights` and
`rewards.monitor`) on a background thread and returns at once; the trainer samples the next batch meanwhile and
collects all results at the end of the round (`collect`). Only the time spent blocked in `collect` counts as waiting
(`wait_s`), which is what the round metrics report as the fraction of round time spent waiting on rewards.

A reward call that still fails after the client's retries, and any per-sample error on a generated image, raises
`RewardRoundError`: the round fails loudly rather than training on a missing score.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from services.auth import token_from_env
from services.client import RewardClient, RewardServiceError
from trainer.config import RewardsConfig


class RewardRoundError(RuntimeError):
    """A round's samples could not all be scored."""


class BackgroundScorer:
    def __init__(self, config: RewardsConfig):
        self.config = config
        token = token_from_env(config.token_env, "rewards.token_env", error=RewardRoundError)
        self.clients = {
            name: RewardClient(
                config.target,
                name,
                max_samples_per_request=config.max_samples_per_request,
                max_in_flight=config.max_in_flight,
                timeout_s=config.timeout_s,
                max_retries=config.max_retries,
                image_format=config.image_format,
                resize_to_input=config.resize_to_input,
                shared_memory=config.shared_memory and config.image_format == "raw",
                token=token,
            )
            for name in config.scored  # the optimised rewards and the monitored ones
        }
        # One thread per reward: each client call is blocking I/O (it fans requests out on its own pool).
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="reward")
        self._pending: list[tuple[str, Future]] = []
        self.wait_s = 0.0

    def _score(self, name: str, images: np.ndarray, prompts: list[str], ids: list[str]) -> np.ndarray:
        client = self.clients[name]
        try:
            results = client.score(list(images), prompts, ids)
        except RewardServiceError as e:
            raise RewardRoundError(f"reward {name!r} failed after retries: {e}") from e
        failed = [r for r in results if not r.ok]
        if failed:
            first = failed[0]
            raise RewardRoundError(
                f"reward {name!r} returned {len(failed)} per-sample error(s), e.g. sample {first.id}: "
                f"{first.error_code}: {first.error_message}"
            )
        return np.array([r.reward for r in results], dtype=np.float64)  # (N,)

    def submit(self, images: np.ndarray, prompts: list[str], ids: list[str]) -> None:
        """Queues (N, H, W, 3) uint8 images for every reward; returns immediately."""
        for name in self.clients:
            self._pending.append((name, self._pool.submit(self._score, name, images, prompts, ids)))

    def collect(self) -> dict[str, np.ndarray]:
        """Every reward's scores of everything submitted since the last collect, in submission order: name -> (N,)."""
        start = time.perf_counter()
        try:
            parts: dict[str, list[np.ndarray]] = {name: [] for name in self.clients}
            for name, future in self._pending:
                parts[name].append(future.result())
        finally:
            self.wait_s += time.perf_counter() - start
            pending, self._pending = self._pending, []
            for _, future in pending:
                future.cancel()
        return {name: np.concatenate(p) if p else np.zeros(0) for name, p in parts.items()}

    def check(self) -> None:
        """Describe every reward application once, so a missing one fails before any sampling."""
        for name, client in self.clients.items():
            try:
                client.describe()
            except RewardServiceError as e:
                raise RewardRoundError(
                    f"reward application {name!r} is not reachable at {self.config.target}: {e}"
                ) from e

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()
