"""Which failed gRPC calls the fleet client sends again, and how: the one retry policy of its sync and async calls.

`retry_policy` returns tenacity's arguments, used as `tenacity.Retrying(**policy)` by the sync client and as
`tenacity.AsyncRetrying(**policy)` by the async one, so both retry the same statuses with the same backoff.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import grpc
import tenacity

# Status codes worth retrying: the server is restarting, overloaded, or a replica is gone.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Serve's proxy answers INTERNAL with Ray's ActorDiedError / ActorUnavailableError text when the replica running a
# request dies under it (killed, OOM, node lost). Scoring has no side effects, so those are retried too: Serve
# routes the retry to a live replica.
_REPLICA_LOST = ("The actor died unexpectedly", "The task may or may not have been executed on the actor")


def is_retryable(code: grpc.StatusCode | None, details: str | None) -> bool:
    """Whether a failed call may succeed if sent again (see RETRYABLE_CODES and _REPLICA_LOST)."""
    if code in RETRYABLE_CODES:
        return True
    return code == grpc.StatusCode.INTERNAL and any(marker in (details or "") for marker in _REPLICA_LOST)


def _retryable_error(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and is_retryable(error.code(), error.details())


def retry_policy(
    max_retries: int, backoff_s: float, max_backoff_s: float, on_retry: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """The tenacity arguments of every call, sync (`tenacity.Retrying`) and async (`tenacity.AsyncRetrying`).

    A call is tried up to `max_retries + 1` times while it fails with a retryable status (`is_retryable`). The n-th
    retry (n = 0, 1, ...) waits min(max_backoff_s, backoff_s * 2**n) seconds times a uniform jitter in [0.5, 1], so
    clients that failed together do not retry together. `on_retry(retry_state)` runs before each wait. The last
    error (or the first non-retryable one) is re-raised as it was.
    """
    exponential = tenacity.wait_exponential(multiplier=backoff_s, max=max_backoff_s)
    return {
        "retry": tenacity.retry_if_exception(_retryable_error),
        "stop": tenacity.stop_after_attempt(max_retries + 1),
        "wait": lambda state: exponential(state) * random.uniform(0.5, 1.0),
        "before_sleep": on_retry,
        "reraise": True,
    }
