"""Closed-loop load for the multi-node tests: clients scoring back to back, every sample's outcome recorded.

`Load(target, app, clients=8).start()` runs the clients in a thread of their own (one event loop, one async
`RewardClient` each, its default retry budget), so the test's thread can kill nodes or poll Serve meanwhile;
`stop()` returns one `Call` per request. A request that fails for good (after the client's retries) is recorded
with its status, never dropped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Call:
    client: int
    sent_s: float
    done_s: float
    ids: list[str]
    # The result ids in order (empty when the call failed), the per-sample error codes, and the call's failure.
    result_ids: list[str] = field(default_factory=list)
    sample_errors: list[str] = field(default_factory=list)
    failure: str | None = None
    fingerprint: str = ""

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


class Load:
    """`clients` async clients; client i starts `i * ramp_s / clients` seconds in (0: all at once)."""

    def __init__(
        self,
        target: str,
        app: str,
        *,
        clients: int,
        samples_per_request: int = 4,
        size: int = 64,
        ramp_s: float = 0.0,
        think_s: float = 0.0,
        raw_stub: bool = False,
        **client_kwargs,
    ):
        self.target, self.app = target, app
        self.clients, self.samples_per_request = clients, samples_per_request
        self.ramp_s, self.think_s = ramp_s, think_s
        # raw_stub: plain gRPC calls, no client retries, with each response's provenance fingerprint recorded.
        self.raw_stub = raw_stub
        self.client_kwargs = client_kwargs
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(samples_per_request)]
        self.calls: list[Call] = []
        self.retries = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel = None  # the raw calls' aio channel, shared by the clients (one event loop)
        self.started_s = 0.0

    def start(self) -> Load:
        self.started_s = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 300.0) -> list[Call]:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"load clients still running {timeout_s}s after stop (a call hangs)")
        return self.calls

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))

    async def _client(self, index: int) -> None:
        from services.client import RewardClient, RewardServiceError

        await asyncio.sleep(index * self.ramp_s / max(self.clients, 1))
        client = RewardClient(self.target, self.app, **self.client_kwargs)
        prompts = ["a cube"] * self.samples_per_request
        seq = 0
        try:
            while not self._stop.is_set():
                ids = [f"{index}-{seq}-{k}" for k in range(self.samples_per_request)]
                seq += 1
                call = Call(client=index, sent_s=time.monotonic() - self.started_s, done_s=0.0, ids=ids)
                try:
                    if self.raw_stub:
                        response = await self._raw_score(client, ids, prompts)
                        call.fingerprint = response.provenance.fingerprint
                        results = response.results
                        call.result_ids = [r.id for r in results]
                        call.sample_errors = [
                            str(r.error.code) for r in results if r.HasField("error") and r.error.code != 0
                        ]
                    else:
                        results = await client.ascore(self.images, prompts, ids=ids)
                        call.result_ids = [r.id for r in results]
                        call.sample_errors = [r.error_code for r in results if r.error_code]
                except RewardServiceError as e:
                    call.failure = e.status
                except Exception as e:  # a raw call's grpc.aio.AioRpcError
                    call.failure = f"{type(e).__name__}: {getattr(e, 'code', lambda: '')()}"
                call.done_s = time.monotonic() - self.started_s
                self.calls.append(call)
                if self.think_s:
                    await asyncio.sleep(self.think_s)
        finally:
            self.retries += client.stats.retries
            await client.aclose()

    async def _raw_score(self, client, ids, prompts):
        import grpc

        from protos.reward.v1 import reward_pb2, reward_pb2_grpc

        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        request = reward_pb2.ScoreRequest(samples=client.make_samples(self.images, prompts, ids))
        return await stub.Score(request, timeout=60, metadata=(("application", self.app),))


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")
