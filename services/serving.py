"""The generic Ray Serve deployment that serves any registered reward over the `reward.v1.RewardService` gRPC API.

Each reward is its own Serve application (selected by the gRPC `application` metadata key), built by `build_app`
from the `args:` of a Serve config file:

    applications:
      - name: jpeg_compressibility
        route_prefix: /jpeg_compressibility
        import_path: services.serving:build_app
        args: {reward: jpeg_compressibility, max_batch_size: 32}

Request-level problems (no samples, too many samples or bytes, unknown option) are answered with INVALID_ARGUMENT
before any image is decoded; per-sample problems become errors on that sample's result. Samples from concurrent
requests are batched together with `@serve.batch`, so many small requests still run the model on full batches.

Every response carries the replica's `Provenance` (which reward, config and weights produced it), computed once at
start. With `auth_token_env` set, gRPC calls must carry `authorization: Bearer <token>` (checked before the request
is parsed). Replicas export Prometheus metrics through `ray.serve.metrics` (`RewardMetrics`).

No `from __future__ import annotations` here: Serve reads `build_app`'s parameter annotation to validate `args`.
"""

import asyncio
import hashlib
import hmac
import importlib.metadata
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics
from ray.serve.grpc_util import RayServegRPCContext

from protos.reward.v1 import reward_pb2
from services.codec import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_sample_image
from services.config import to_dict
from services.registry import build_reward
from services.reward import ModelSource, RewardOutput, SampleFailure

logger = logging.getLogger("ray.serve")


class RewardAppArgs(BaseModel):
    """`args` of a reward application in a Serve config file. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Registered reward name (see `services.registry.reward_names()`).
    reward: str
    # The reward's config (fields of its config dataclass); unknown keys are rejected.
    reward_config: dict[str, Any] = Field(default_factory=dict)
    # "cpu", "cuda", "cuda:N", or "auto" (cuda when the replica has a GPU).
    device: str = "auto"
    # torch intra-op threads per replica; None keeps torch's default. Set it to the replica's num_cpus.
    torch_threads: int | None = None
    # Most samples run through the model at once, gathered across concurrent requests.
    max_batch_size: int = Field(default=32, ge=1)
    # How long a partial batch waits for more samples before it runs.
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0)
    # Most samples in one ScoreRequest.
    max_samples_per_request: int = Field(default=256, ge=1)
    # Most bytes of samples (serialized: image, prompt, id) in one ScoreRequest (256 raw 512x512 images: 192 MiB).
    max_request_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # Most pixels (height * width) in one image, checked before decoding.
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # Most characters in one prompt.
    max_prompt_chars: int = Field(default=4096, ge=1)
    # Name of an environment variable of the replica holding a shared token. When set, every Score and Describe
    # call over gRPC must carry the metadata `authorization: Bearer <token>`, else it ends with UNAUTHENTICATED.
    # The variable's name goes in the config, never the token itself.
    auth_token_env: str | None = Field(default=None, min_length=1)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- provenance ---------------------------------------------------------------------------------------------------


def server_version() -> str:
    """The installed rewardfleet version ("unknown" when running from a source tree that is not installed)."""
    try:
        return importlib.metadata.version("rewardfleet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _local_files(root: Path) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime in ns) of each file: identifies weights without reading gigabytes."""
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Download tools keep lock and metadata files under dot-directories; they change without the weights changing.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            st = path.stat()
            files.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return files


def _hub_commit(repo_id: str, revision: str) -> str:
    """The commit a hub revision resolves to in the local Hugging Face cache; "" when it is not cached."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else ""


def _package_version(name: str) -> str:
    """Version of an installed Python distribution of that name (models shipped on PyPI), or ""."""
    if "/" in name:
        return ""
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ""


def model_identity(model: ModelSource) -> tuple[str, dict[str, Any]]:
    """("id@revision" or "id", the identity of its weights) of a model a reward loads.

    A local file or directory is identified by each file's relative path, size and modification time; a model
    shipped in a Python package by the package version; a hub id by its revision, resolved to a commit through the
    local cache where possible.
    """
    source, revision = model.source, model.revision
    identity: dict[str, Any] = {"role": model.role, "source": source, "revision": revision}
    local = Path(source).expanduser()
    if local.exists():
        identity["files"] = _local_files(local)
    elif version := _package_version(source):
        identity["package_version"] = revision = version
    else:
        identity["commit"] = commit = _hub_commit(source, revision)
        revision = commit or revision
    return (f"{source}@{revision}" if revision else source), identity


def build_provenance(
    reward_name: str, application: str, config: dict[str, Any], models: Sequence[ModelSource]
) -> reward_pb2.Provenance:
    """The `Provenance` of a reward: its fingerprint is SHA-256 over its config and the identities of its weights.

    Serving limits (batch size, request limits) are not part of it: they do not change a score.
    """
    model_ids, identities = [], []
    for model in models:
        if model.source:  # "" = weight-free
            model_id, identity = model_identity(model)
            model_ids.append(model_id)
            identities.append(identity)
    payload = json.dumps({"reward": reward_name, "config": config, "models": identities}, sort_keys=True, default=str)
    return reward_pb2.Provenance(
        reward_name=reward_name,
        application=application,
        model_ids=model_ids,
        fingerprint=hashlib.sha256(payload.encode()).hexdigest(),
        server_version=server_version(),
    )


# --- auth and metrics ---------------------------------------------------------------------------------------------


def load_auth_token(env_name: str | None) -> bytes | None:
    """The shared token from the environment variable `env_name`; None when auth is off. Missing or empty raises."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise RuntimeError(
            f"auth_token_env is {env_name!r} but that environment variable is unset or empty in the replica; set it "
            "in the environment of every Ray node (for example from a Kubernetes Secret)"
        )
    return token.encode()


def auth_problem(metadata: Sequence[tuple[str, Any]], token: bytes) -> str | None:
    """Why a call's metadata does not authenticate against `token`, or None when it does."""
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        return "missing token: this application requires the metadata 'authorization: Bearer <token>'"
    scheme, _, given = str(values[0]).strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "malformed authorization metadata: expected 'Bearer <token>'"
    # Constant-time comparison: the time taken does not reveal how much of the token matched.
    if not hmac.compare_digest(given.strip().encode(), token):
        return "invalid token"
    return None


def admission_problem(
    metadata: Sequence[tuple[str, Any]], token: bytes | None, app_name: str
) -> tuple[grpc.StatusCode, str] | None:
    """(status, details) when a gRPC call lacks the token or names another application; None when admitted.

    Shared by every application class (reward and assemble) so they admit calls the same way.
    """
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
    request: reward_pb2.ScoreRequest, max_samples: int, max_bytes: int, accepted_options: set[str], name: str
) -> str | None:
    """What makes a ScoreRequest as a whole invalid, or None. Checked before any image is decoded."""
    n = len(request.samples)
    if n == 0:
        return "ScoreRequest has no samples"
    if n > max_samples:
        return (
            f"ScoreRequest has {n} samples, more than the limit of {max_samples} per request; split it into several "
            "requests (the Python client does)"
        )
    # ByteSize is the samples' serialized size, computed without copying the image bytes.
    payload = sum(s.ByteSize() for s in request.samples)
    if payload > max_bytes:
        return (
            f"ScoreRequest carries {payload} bytes of samples, more than the limit of {max_bytes} bytes per request; "
            "split it into several requests"
        )
    unknown = sorted(set(request.options) - accepted_options)
    if unknown:
        return f"unknown option(s) {unknown}; reward {name!r} accepts {sorted(accepted_options)}"
    return None


# Buckets of the histograms: batch sizes up to a large max_batch_size, model time from ms (JPEG) to a minute (LLM).
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class RewardMetrics:
    """A replica's Prometheus metrics. `ray.serve.metrics` adds the application, deployment and replica tags.

    Ray's exporter prefixes each name with `ray_` and suffixes counters with `_total` (README, "Observability").
    Outside a Serve replica (in-process tests, benchmarks) recording is a no-op.
    """

    def __init__(self, reward_name: str):
        self.samples_scored = metrics.Counter(
            "rewardfleet_samples_scored", description="Samples that got a reward.", tag_keys=("reward",)
        )
        self.sample_errors = metrics.Counter(
            "rewardfleet_sample_errors",
            description="Samples answered with a per-sample error, by reward.v1.ErrorCode name.",
            tag_keys=("reward", "error_code"),
        )
        self.batch_size = metrics.Histogram(
            "rewardfleet_batch_size",
            description="Samples per model call (cross-request @serve.batch batches).",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=("reward",),
        )
        self.model_latency = metrics.Histogram(
            "rewardfleet_model_latency_seconds",
            description="Seconds the reward model took per batch (including one-by-one rescoring after a failure).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("reward",),
        )
        self.request_rejections = metrics.Counter(
            "rewardfleet_request_rejections",
            description="Requests the replica ended with a non-OK gRPC status, by status code name.",
            tag_keys=("reward", "status_code"),
        )
        for metric in (
            self.samples_scored,
            self.sample_errors,
            self.batch_size,
            self.model_latency,
            self.request_rejections,
        ):
            metric.set_default_tags({"reward": reward_name})

    def record_results(self, results: Sequence[reward_pb2.SampleResult]) -> None:
        errors = Counter(reward_pb2.ErrorCode.Name(r.error.code) for r in results if r.HasField("error"))
        if len(results) > sum(errors.values()):
            self.samples_scored.inc(len(results) - sum(errors.values()))
        for code, n in errors.items():
            self.sample_errors.inc(n, tags={"error_code": code})


def _failure_result(sample_id: str, code: str, message: str) -> reward_pb2.SampleResult:
    return reward_pb2.SampleResult(
        id=sample_id,
        reward=math.nan,
        error=reward_pb2.SampleError(code=reward_pb2.ErrorCode.Value(code), message=message),
    )


def _output_result(sample_id: str, out: RewardOutput) -> reward_pb2.SampleResult:
    result = reward_pb2.SampleResult(id=sample_id, reward=out.reward, components=out.components)
    if out.caption is not None:
        result.caption = out.caption
    for seg in out.segments:
        result.segments.add(
            label=seg.label,
            area_fraction=seg.area_fraction,
            label_confidence=seg.label_confidence,
            likelihood=seg.likelihood,
        )
    return result


class GrpcGate:
    """Admission of gRPC calls, shared by the application classes (reward and assemble).

    Needs `self._token` (bytes or None), `self.app_name` and `self.metrics` (RewardMetrics).
    """

    def _admitted(self, grpc_context: RayServegRPCContext | None) -> bool:
        """False, with the status set, when a gRPC call lacks the token or names another application.

        Calls without a gRPC context come through DeploymentHandles from inside the Ray cluster (another
        application, in-process tests): the cluster boundary is their guard, so they are not checked.
        """
        if grpc_context is None:
            return True
        problem = admission_problem(grpc_context.invocation_metadata(), self._token, self.app_name)
        if problem is not None:
            self._reject(grpc_context, *problem)
        return problem is None

    def _reject(self, grpc_context: RayServegRPCContext | None, code: grpc.StatusCode, details: str) -> None:
        self.metrics.request_rejections.inc(tags={"status_code": code.name})
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(details)


@serve.deployment(name="reward", ray_actor_options={"num_cpus": 1})
class RewardDeployment(GrpcGate):
    """Serves one registered reward; RPC methods are named after the RPCs of `reward.v1.RewardService`."""

    def __init__(self, args: RewardAppArgs | dict[str, Any]):
        # Serve passes bound arguments on as plain data: validate here whichever form arrives.
        self.args = args = RewardAppArgs.model_validate(args)
        # Before the model loads: a missing token fails the deployment at once, with the variable's name.
        self._token = load_auth_token(args.auth_token_env)
        if args.torch_threads is not None:
            import torch

            torch.set_num_threads(args.torch_threads)
        self.reward = build_reward(args.reward, args.reward_config)
        self.reward.load(resolve_device(args.device))
        self.info = self.reward.info()
        self._accepted_options = {name for name, _ in self.info.options}
        # With a single application, Serve's proxy routes every "application" value to it; check the name here so
        # a client asking for another reward never gets this one's scores.
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:  # built outside a Serve replica (in-process tests and benchmarks)
            self.app_name = self.reward.name
        self._score_batch.set_max_batch_size(args.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        # Once per replica: stat-ing weight files on every request would cost more than the JPEG reward itself.
        self.provenance = build_provenance(
            self.reward.name, self.app_name, to_dict(self.reward.config), self.info.models
        )
        self.metrics = RewardMetrics(self.reward.name)

    # --- RPCs ---------------------------------------------------------------------------------------------------

    async def Score(
        self, request: reward_pb2.ScoreRequest | bytes, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.ScoreResponse:
        if not self._admitted(grpc_context):
            return reward_pb2.ScoreResponse()
        problem = None
        if isinstance(request, bytes):  # passed through the proxy unparsed (services.grpc_proxy)
            try:
                request = reward_pb2.ScoreRequest.FromString(request)
            except Exception as e:  # protobuf's DecodeError
                request, problem = None, f"request is not a valid reward.v1.ScoreRequest message ({e})"
        problem = problem or self.request_problem(request)
        if problem is not None:
            self._reject(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            return reward_pb2.ScoreResponse(reward_name=self.reward.name, provenance=self.provenance)

        # 1. Decode off the event loop when there is codec work, so the replica keeps taking requests meanwhile.
        samples = request.samples
        if any(s.WhichOneof("image") == "encoded" for s in samples):
            decoded = await asyncio.to_thread(self._decode_all, samples)
        else:
            decoded = self._decode_all(samples)

        # 2. Each valid sample joins the cross-request batcher on its own, so batches fill across requests.
        valid = [i for i, d in enumerate(decoded) if not isinstance(d, SampleFailure)]
        outputs = await asyncio.gather(*(self._score_batch(decoded[i]) for i in valid))
        for i, out in zip(valid, outputs, strict=True):
            decoded[i] = out

        # 3. One result per sample, in order, echoing ids.
        response = reward_pb2.ScoreResponse(reward_name=self.reward.name, provenance=self.provenance)
        for sample, out in zip(samples, decoded, strict=True):
            if isinstance(out, SampleFailure):
                response.results.append(_failure_result(sample.id, out.code, out.message))
            else:
                response.results.append(_output_result(sample.id, out))
        self.metrics.record_results(response.results)
        return response

    async def Describe(
        self, request: reward_pb2.DescribeRequest, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.DescribeResponse:
        if not self._admitted(grpc_context):
            return reward_pb2.DescribeResponse()
        info, args = self.info, self.args
        return reward_pb2.DescribeResponse(
            name=self.reward.name,
            description=info.description,
            min_reward=info.min_reward,
            max_reward=info.max_reward,
            higher_is_better=info.higher_is_better,
            models=[reward_pb2.ModelInfo(role=m.role, source=m.source, revision=m.revision) for m in info.models],
            max_samples_per_request=args.max_samples_per_request,
            max_request_bytes=args.max_request_bytes,
            max_image_pixels=args.max_image_pixels,
            max_batch_size=args.max_batch_size,
            options=[reward_pb2.OptionInfo(name=n, description=d) for n, d in info.options],
            config_json=json.dumps(to_dict(self.reward.config), sort_keys=True, default=str),
            provenance=self.provenance,
        )

    # --- helpers ------------------------------------------------------------------------------------------------

    def request_problem(self, request: reward_pb2.ScoreRequest) -> str | None:
        """What makes the request as a whole invalid, or None. Checked before any image is decoded."""
        args = self.args
        return request_limit_problem(
            request, args.max_samples_per_request, args.max_request_bytes, self._accepted_options, self.reward.name
        )

    def _decode_all(self, samples) -> list[tuple[Any, str] | SampleFailure]:
        decoded: list[tuple[Any, str] | SampleFailure] = []
        for s in samples:
            prompt = s.prompt
            if not prompt.strip():
                decoded.append(SampleFailure("INVALID_PROMPT", "prompt is empty"))
                continue
            if len(prompt) > self.args.max_prompt_chars:
                decoded.append(
                    SampleFailure(
                        "INVALID_PROMPT", f"prompt has {len(prompt)} characters, limit {self.args.max_prompt_chars}"
                    )
                )
                continue
            try:
                decoded.append((decode_sample_image(s, self.args.max_image_pixels), prompt))
            except ImageError as e:
                decoded.append(SampleFailure(e.code, e.message))
        return decoded

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[Any, str]]) -> list[RewardOutput | SampleFailure]:
        self.metrics.batch_size.observe(len(items))
        start = time.perf_counter()
        # The model runs in a worker thread so the event loop keeps accepting requests and filling the next batch.
        outputs = await asyncio.to_thread(self.score_isolating, items)
        self.metrics.model_latency.observe(time.perf_counter() - start)
        return outputs

    def score_isolating(self, items: list[tuple[Any, str]]) -> list[RewardOutput | SampleFailure]:
        """Scores a batch; if the reward raises, rescore one by one so only the offending samples fail."""
        images = [image for image, _ in items]
        prompts = [prompt for _, prompt in items]
        try:
            outputs = self.reward.score(images, prompts)
            if len(outputs) != len(items):
                raise RuntimeError(f"reward returned {len(outputs)} results for {len(items)} samples")
            return outputs
        except Exception as e:
            if len(items) == 1:
                logger.warning("reward %s failed on a sample: %r", self.reward.name, e)
                return [SampleFailure("SCORING_FAILED", f"{type(e).__name__}: {e}"[:500])]
        return [self.score_isolating([item])[0] for item in items]


def build_app(args: RewardAppArgs) -> serve.Application:
    """Typed Serve application builder: `import_path: services.serving:build_app` with `args:` in the Serve YAML."""
    return RewardDeployment.bind(RewardAppArgs.model_validate(args).model_dump())
