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

No `from __future__ import annotations` here: Serve reads `build_app`'s parameter annotation to validate `args`.
"""

import asyncio
import json
import logging
import math
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from protos.reward.v1 import reward_pb2
from services.codec import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_sample_image
from services.config import to_dict
from services.registry import build_reward
from services.reward import RewardOutput, SampleFailure

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


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


@serve.deployment(name="reward", ray_actor_options={"num_cpus": 1})
class RewardDeployment:
    """Serves one registered reward; RPC methods are named after the RPCs of `reward.v1.RewardService`."""

    def __init__(self, args: RewardAppArgs | dict[str, Any]):
        # Serve passes bound arguments on as plain data: validate here whichever form arrives.
        self.args = args = RewardAppArgs.model_validate(args)
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

    # --- RPCs ---------------------------------------------------------------------------------------------------

    async def Score(
        self, request: reward_pb2.ScoreRequest | bytes, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.ScoreResponse:
        if not self._addressed_to_me(grpc_context):
            return reward_pb2.ScoreResponse()
        problem = None
        if isinstance(request, bytes):  # passed through the proxy unparsed (services.grpc_proxy)
            try:
                request = reward_pb2.ScoreRequest.FromString(request)
            except Exception as e:  # protobuf's DecodeError
                request, problem = None, f"request is not a valid reward.v1.ScoreRequest message ({e})"
        problem = problem or self.request_problem(request)
        if problem is not None:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                grpc_context.set_details(problem)
            return reward_pb2.ScoreResponse(reward_name=self.reward.name)

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
        response = reward_pb2.ScoreResponse(reward_name=self.reward.name)
        for sample, out in zip(samples, decoded, strict=True):
            if isinstance(out, SampleFailure):
                response.results.append(_failure_result(sample.id, out.code, out.message))
            else:
                response.results.append(_output_result(sample.id, out))
        return response

    async def Describe(
        self, request: reward_pb2.DescribeRequest, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.DescribeResponse:
        if not self._addressed_to_me(grpc_context):
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
        )

    # --- helpers ------------------------------------------------------------------------------------------------

    def _addressed_to_me(self, grpc_context: RayServegRPCContext | None) -> bool:
        """False (and NOT_FOUND set) when the "application" metadata names another application."""
        if grpc_context is None:
            return True
        asked = dict(grpc_context.invocation_metadata()).get("application")
        if asked is None or asked == self.app_name:
            return True
        grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
        grpc_context.set_details(f"Application {asked!r} not found; this port serves {self.app_name!r}.")
        return False

    def request_problem(self, request: reward_pb2.ScoreRequest) -> str | None:
        """What makes the request as a whole invalid, or None. Checked before any image is decoded."""
        n = len(request.samples)
        if n == 0:
            return "ScoreRequest has no samples"
        if n > self.args.max_samples_per_request:
            return (
                f"ScoreRequest has {n} samples, more than the limit of {self.args.max_samples_per_request} per "
                "request; split it into several requests (the Python client does)"
            )
        # ByteSize is the samples' serialized size, computed without copying the image bytes.
        payload = sum(s.ByteSize() for s in request.samples)
        if payload > self.args.max_request_bytes:
            return (
                f"ScoreRequest carries {payload} bytes of samples, more than the limit of "
                f"{self.args.max_request_bytes} bytes per request; split it into several requests"
            )
        unknown = sorted(set(request.options) - self._accepted_options)
        if unknown:
            return f"unknown option(s) {unknown}; reward {self.reward.name!r} accepts {sorted(self._accepted_options)}"
        return None

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
        # The model runs in a worker thread so the event loop keeps accepting requests and filling the next batch.
        return await asyncio.to_thread(self.score_isolating, items)

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
