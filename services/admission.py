"""Admission: what every gRPC call must pass before an application does any work, written once for all of them.

Both `RewardService` implementations (a reward, `services.serving`, and `assemble`, `services.assemble`) hold an
`Admission` as `self.admission` and start each call with it:

1. the token (`auth_token_env`), checked first so an unauthenticated caller learns nothing about the deployment;
2. the application name: with a single application Serve's proxy routes every "application" value to it, so the
   name is checked here and a client asking for another reward never gets this one's scores;
3. the request as a whole: it parses (`Score` requests arrive as bytes, `services.grpc_proxy`), has samples, and
   stays within the sample, byte and option limits, all before any image is decoded.

A call that fails a check ends with UNAUTHENTICATED, NOT_FOUND or INVALID_ARGUMENT, counted in the replica's
`rewardfleet_request_rejections`. Per-sample checks (prompt, image) do not reject the call: `decode_samples` turns
them into errors on that sample's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from pydantic import Field
from ray import serve

from protos.reward.v1 import reward_pb2
from services.auth import auth_problem
from services.codec import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_sample_image
from services.config import Config
from services.metrics import RewardMetrics
from services.reward import SampleFailure
from services.shared_memory import SegmentReader, host_identity


class AdmissionArgs(Config):
    """The request limits and auth of an application: the `args` every application class shares."""

    max_samples_per_request: int = Field(default=256, ge=1, description="Most samples in one ScoreRequest.")
    max_request_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Most bytes of samples (serialized: image, prompt, id) in one ScoreRequest (256 raw 512x512 "
        "images: 192 MiB).",
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Most pixels (height * width) in one image, checked before decoding.",
    )
    shared_memory: bool = Field(
        default=True,
        description="Accept raw images that a client on this replica's host passes in POSIX shared memory "
        "(`SharedMemoryImage`, services/shared_memory.py: segments named rewardfleet_*, mapped read-only) instead of "
        "in the request. When false, such samples get SHARED_MEMORY_UNAVAILABLE and Describe reports no host.",
    )
    auth_token_env: str | None = Field(
        default=None,
        min_length=1,
        description="Name of an environment variable of the replica holding a shared token. When set, every Score "
        "and Describe call over gRPC must carry the metadata `authorization: Bearer <token>`, else it ends with "
        "UNAUTHENTICATED. The variable's name goes in the config, never the token itself.",
    )


def application_name(default: str) -> str:
    """The Serve application this replica belongs to; `default` outside a Serve replica (in-process tests)."""
    try:
        return serve.get_replica_context().app_name
    except Exception:  # RayServeException: built outside a replica
        return default


def admission_problem(
    metadata: Sequence[tuple[str, Any]], token: bytes | None, app_name: str
) -> tuple[grpc.StatusCode, str] | None:
    """(status, details) when a gRPC call lacks the token or names another application; None when admitted."""
    # The token first, so an unauthenticated caller learns nothing about the deployment, not even its name.
    if token is not None:
        problem = auth_problem(metadata, token)
        if problem is not None:
            return grpc.StatusCode.UNAUTHENTICATED, f"{app_name}: {problem}"
    asked = dict(metadata).get("application")
    if asked is None or asked == app_name:
        return None
    return grpc.StatusCode.NOT_FOUND, f"Application {asked!r} not found; this port serves {app_name!r}."


def request_limit_problem(
    request: reward_pb2.ScoreRequest,
    max_samples: int,
    max_bytes: int,
    accepted_options: set[str],
    name: str,
    wire_size: int | None = None,
) -> str | None:
    """What makes a ScoreRequest as a whole invalid, or None. Checked before any image is decoded.

    `wire_size` is the length of the bytes the request was parsed from, when it was.
    """
    n = len(request.samples)
    if n == 0:
        return "ScoreRequest has no samples"
    if n > max_samples:
        return (
            f"ScoreRequest has {n} samples, more than the limit of {max_samples} per request; split it into several "
            "requests (the Python client does)"
        )
    # The samples' serialized size. protobuf's runtime computes ByteSize by serializing (a copy of every image), so
    # requests whose bytes are within the limit skip it: parsing and re-serializing never makes a message larger
    # (canonical varints, duplicates merged, defaults dropped, unknown fields kept as they came).
    payload = None if wire_size is not None and wire_size <= max_bytes else sum(s.ByteSize() for s in request.samples)
    if payload is not None and payload > max_bytes:
        return (
            f"ScoreRequest carries {payload} bytes of samples, more than the limit of {max_bytes} bytes per request; "
            "split it into several requests"
        )
    unknown = sorted(set(request.options) - accepted_options)
    if unknown:
        return f"unknown option(s) {unknown}; reward {name!r} accepts {sorted(accepted_options)}"
    return None


@dataclass(frozen=True, kw_only=True)
class Admission:
    """The preamble of every call of one application: admit, parse, check the limits, reject.

    `reward_name` names the reward in responses and messages ("assemble" for that application); `app_name` is the
    Serve application (several applications may serve one reward with different limits).
    """

    app_name: str
    reward_name: str
    # The shared token (`services.auth.load_auth_token`); None = no auth.
    token: bytes | None
    limits: AdmissionArgs
    metrics: RewardMetrics
    # The replica's provenance, stamped on every response.
    provenance: reward_pb2.Provenance
    # Names a ScoreRequest's `options` may use.
    accepted_options: frozenset[str] = frozenset()

    def admit(self, grpc_context: Any | None) -> bool:
        """False, with the status set, when a gRPC call lacks the token or names another application.

        Calls without a gRPC context come through DeploymentHandles from inside the Ray cluster (another
        application, in-process tests): the cluster boundary is their guard, so they are not checked.
        """
        if grpc_context is None:
            return True
        problem = admission_problem(grpc_context.invocation_metadata(), self.token, self.app_name)
        if problem is not None:
            self.reject(grpc_context, *problem)
        return problem is None

    def reject(self, grpc_context: Any | None, code: grpc.StatusCode, details: str) -> None:
        """Ends the call with `code` (counted in the metrics); a call without a gRPC context just gets the response."""
        self.metrics.request_rejections.inc(tags={"status_code": code.name})
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(details)

    def request_problem(self, request: reward_pb2.ScoreRequest, wire_size: int | None = None) -> str | None:
        """What makes the request as a whole invalid under this application's limits, or None."""
        limits = self.limits
        return request_limit_problem(
            request,
            limits.max_samples_per_request,
            limits.max_request_bytes,
            self.accepted_options,
            self.reward_name,
            wire_size,
        )

    def score_request(
        self, request: reward_pb2.ScoreRequest | bytes, grpc_context: Any | None
    ) -> reward_pb2.ScoreRequest | reward_pb2.ScoreResponse:
        """The parsed, admitted, valid request; or, when the call is rejected (status set), the response to return.

        An unauthenticated or misdirected call gets an empty response, which says nothing about this application.
        """
        if not self.admit(grpc_context):
            return reward_pb2.ScoreResponse()
        problem = wire_size = None
        if isinstance(request, bytes):  # passed through the proxy unparsed (services.grpc_proxy)
            wire_size = len(request)
            try:
                request = reward_pb2.ScoreRequest.FromString(request)
            except Exception as e:  # protobuf's DecodeError
                problem = f"request is not a valid reward.v1.ScoreRequest message ({e})"
        problem = problem or self.request_problem(request, wire_size)
        if problem is not None:
            self.reject(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            return self.response()
        return request

    def response(self) -> reward_pb2.ScoreResponse:
        """A ScoreResponse with no results yet, naming the reward and carrying the replica's provenance."""
        return reward_pb2.ScoreResponse(reward_name=self.reward_name, provenance=self.provenance)

    def finish(self, response: reward_pb2.ScoreResponse) -> reward_pb2.ScoreResponse:
        """`response`, its results counted in the metrics: the last step of every answered Score call."""
        self.metrics.record_results(response.results)
        return response

    def describe(self, grpc_context: Any | None, **fields: Any) -> reward_pb2.DescribeResponse:
        """The answer to Describe: `fields` with the request limits and the provenance, once the call is admitted
        (an empty response otherwise, the status set)."""
        if not self.admit(grpc_context):
            return reward_pb2.DescribeResponse()
        limits = self.limits
        return reward_pb2.DescribeResponse(
            name=self.reward_name,
            shared_memory_host=host_identity() if limits.shared_memory else "",
            max_samples_per_request=limits.max_samples_per_request,
            max_request_bytes=limits.max_request_bytes,
            max_image_pixels=limits.max_image_pixels,
            provenance=self.provenance,
            **fields,
        )


def decode_samples(
    samples,
    max_image_pixels: int,
    max_prompt_chars: int,
    raw_views: Sequence[memoryview | None] | None = None,
    segments: SegmentReader | None = None,
) -> list[tuple[Any, str] | SampleFailure]:
    """(image, prompt) per sample, or the SampleFailure that becomes that sample's error (INVALID_PROMPT, ...).

    `raw_views` (`services.wire.raw_data_views` of the request bytes) lets raw images be read without a copy;
    `segments` reads shared-memory images (None: the application does not accept them).
    """
    decoded: list[tuple[Any, str] | SampleFailure] = []
    if raw_views is None or len(raw_views) != len(samples):
        raw_views = [None] * len(samples)
    for s, view in zip(samples, raw_views, strict=True):
        prompt = s.prompt
        if not prompt.strip():
            decoded.append(SampleFailure("INVALID_PROMPT", "prompt is empty"))
            continue
        if len(prompt) > max_prompt_chars:
            decoded.append(
                SampleFailure("INVALID_PROMPT", f"prompt has {len(prompt)} characters, limit {max_prompt_chars}")
            )
            continue
        try:
            decoded.append((decode_sample_image(s, max_image_pixels, view, segments), prompt))
        except ImageError as e:
            decoded.append(SampleFailure(e.code, e.message))
    return decoded
