"""The generic Ray Serve deployment that serves any registered reward over the `reward.v1.RewardService` gRPC API.

Each reward is its own Serve application (selected by the gRPC `application` metadata key), built by `build_app`
from the `args:` of a Serve config file:

    applications:
      - name: jpeg_compressibility
        route_prefix: /jpeg_compressibility
        import_path: services.serving:build_app
        args: {reward: jpeg_compressibility, max_batch_size: 32}

A call first passes the application's `Admission` (services/admission.py: token, application name, request limits;
INVALID_ARGUMENT before any image is decoded); per-sample problems become errors on that sample's result. Raw pixels
are read in place in the request bytes (services/wire.py), or in a client's shared memory on the replica's host
(services/shared_memory.py). Samples from concurrent requests are batched together with
`@serve.batch`, a request entering in chunks counted by their samples, so many small requests still run the model on
full batches and a large one costs one queue entry per batch. Batches are scored on a worker thread, one at a time,
or `max_concurrent_batches` at once for a reward that scores without the GIL. Every response carries the replica's
provenance (services/provenance.py), computed once at start; replicas export Prometheus metrics (services/metrics.py).

No `from __future__ import annotations` here: Serve reads `build_app`'s parameter annotation to validate `args`.
"""

import asyncio
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from protos.reward.v1 import reward_pb2
from services.admission import Admission, AdmissionArgs, application_name, decode_samples
from services.auth import load_auth_token
from services.config import from_dict, to_dict
from services.metrics import RewardMetrics
from services.provenance import build_provenance
from services.registry import build_reward
from services.reward import RewardOutput, SampleFailure
from services.shared_memory import SegmentReader
from services.wire import raw_data_views

logger = logging.getLogger("ray.serve")


class RewardAppArgs(AdmissionArgs):
    """`args` of a reward application in a Serve config file (with the request limits and auth of AdmissionArgs).

    Unknown keys are rejected.
    """

    reward: str = Field(description="Registered reward name (see `services.registry.reward_names()`).")
    reward_config: dict[str, Any] = Field(
        default_factory=dict, description="The reward's config (fields of its Config); unknown keys are rejected."
    )
    device: str = Field(
        default="auto", description='"cpu", "cuda", "cuda:N", or "auto" (cuda when the replica has a GPU).'
    )
    torch_threads: int | None = Field(
        default=None,
        description="torch intra-op threads per replica; None keeps torch's default. Set it to the replica's "
        "num_cpus.",
    )
    max_batch_size: int = Field(
        default=32,
        ge=1,
        description="Most samples run through the model at once, gathered across concurrent requests.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0.0, description="How long a partial batch waits for more samples before it runs."
    )
    max_concurrent_batches: int = Field(
        default=1,
        ge=1,
        description="Batches scored at once, each on its own worker thread (Serve's `max_concurrent_batches`). "
        "Above 1 only for a thread-safe reward that releases the GIL while it scores (jpeg_compressibility: PIL's "
        "encoder), whose batches then use several cores; a torch reward keeps 1, its intra-op threads already use "
        "the replica's CPUs.",
    )
    max_prompt_chars: int = Field(default=4096, ge=1, description="Most characters in one prompt.")


def resolve_device(device: str) -> str:
    """`device`, with "auto" resolved to "cuda" when torch sees a GPU, else "cpu".

    A CUDA device that torch cannot see fails here, naming what Ray assigned: on a node that declares logical GPUs
    (`ray start --num-gpus`) without a driver or a CUDA build of torch, the replica gets GPU ids and a
    CUDA_VISIBLE_DEVICES but no CUDA, and would otherwise fail later inside the model with torch's own message.
    """
    if device == "cpu":  # no torch import: a weight-free reward (jpeg_compressibility) never needs it
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        import os

        import ray

        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", []) if ray.is_initialized() else []
        raise RuntimeError(
            f"device {device!r}, but torch sees no CUDA device in this replica (Ray assigned it GPU ids {gpu_ids}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}, built "
            f"for CUDA {torch.version.cuda}). Install the NVIDIA driver on the node, or set `device: auto` in the "
            "profile's args to fall back to the CPU."
        )
    return device


def _replica_cpus() -> int:
    """CPUs Ray assigned to this replica (rounded up, at least 1); 1 outside a Ray worker (in-process tests)."""
    import ray

    if not ray.is_initialized():  # get_runtime_context() would start Ray
        return 1
    try:
        assigned = ray.get_runtime_context().get_assigned_resources()
    except AssertionError:  # Ray asserts it runs in a worker; a driver has no assignment
        return 1
    return max(1, math.ceil(assigned.get("CPU", 1)))


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
        self.args = args = args if isinstance(args, RewardAppArgs) else from_dict(RewardAppArgs, args)
        # Before the model loads: a missing token fails the deployment at once, with the variable's name.
        token = load_auth_token(args.auth_token_env)
        if args.torch_threads is not None:
            import torch

            torch.set_num_threads(args.torch_threads)
        self.reward = build_reward(args.reward, args.reward_config)
        self.reward.load(resolve_device(args.device))
        self.info = self.reward.info()
        self.app_name = application_name(default=self.reward.name)
        # The batcher is built per replica from its args: Serve's decorator fixes `max_concurrent_batches` when it
        # wraps, so a class-level decorator could not take it from the config.
        self._score_batch = serve.batch(
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_timeout_s,
            max_concurrent_batches=args.max_concurrent_batches,
            batch_size_fn=lambda chunks: sum(map(len, chunks)),
        )(self._score_chunks)
        # Shared-memory images (services.shared_memory) are viewed in their clients' segments, mapped once each.
        self._segments = SegmentReader() if args.shared_memory else None
        # Encoded images decode on these threads, one per CPU the replica was given.
        self._decode_threads = _replica_cpus()
        self._decode_pool = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="decode")
        # Once per replica: stat-ing weight files on every request would cost more than the JPEG reward itself.
        self.provenance = build_provenance(
            self.reward.name, self.app_name, to_dict(self.reward.config), self.info.models
        )
        self.metrics = RewardMetrics(self.reward.name)
        self.admission = Admission(
            app_name=self.app_name,
            reward_name=self.reward.name,
            token=token,
            limits=args,
            metrics=self.metrics,
            provenance=self.provenance,
            accepted_options=frozenset(name for name, _ in self.info.options),
        )

    # --- RPCs ---------------------------------------------------------------------------------------------------

    async def Score(
        self, request: reward_pb2.ScoreRequest | bytes, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.ScoreResponse:
        wire = request if isinstance(request, bytes) else None
        request = self.admission.score_request(request, grpc_context)
        if isinstance(request, reward_pb2.ScoreResponse):  # rejected; the status is set
            return request

        # 1. Decode; raw pixels are viewed in the request bytes (services.wire) or in a client's shared-memory
        #    segment (services.shared_memory), encoded images decode in parallel off the event loop, so the replica
        #    keeps taking requests meanwhile.
        samples, args = request.samples, self.args
        views = raw_data_views(wire) if wire is not None else None
        if any(s.WhichOneof("image") == "encoded" for s in samples):
            decoded = await self._decode_in_parallel(samples, views)
        else:
            decoded = decode_samples(samples, args.max_image_pixels, args.max_prompt_chars, views, self._segments)

        # 2. The valid samples join the cross-request batcher in chunks of at most max_batch_size, counted by their
        #    samples (`batch_size_fn`): batches fill across requests with one queue entry per chunk, not per sample.
        valid = [i for i, d in enumerate(decoded) if not isinstance(d, SampleFailure)]
        size = args.max_batch_size
        chunks = [valid[k : k + size] for k in range(0, len(valid), size)]
        outputs = await asyncio.gather(*(self._score_batch([decoded[i] for i in chunk]) for chunk in chunks))
        for chunk, chunk_outputs in zip(chunks, outputs, strict=True):
            for i, out in zip(chunk, chunk_outputs, strict=True):
                decoded[i] = out

        # 3. One result per sample, in order, echoing ids.
        response = self.admission.response()
        for sample, out in zip(samples, decoded, strict=True):
            if isinstance(out, SampleFailure):
                response.results.append(_failure_result(sample.id, out.code, out.message))
            else:
                response.results.append(_output_result(sample.id, out))
        return self.admission.finish(response)

    async def _decode_in_parallel(self, samples, views) -> list[tuple[Any, str] | SampleFailure]:
        """`decode_samples` over slices of the request on the decode threads (PIL releases the GIL while it
        decodes), so a request of JPEG/PNG files uses every core the replica has."""
        args, loop = self.args, asyncio.get_running_loop()
        views = views if views is not None and len(views) == len(samples) else [None] * len(samples)
        n = min(len(samples), self._decode_threads)
        bounds = [len(samples) * k // n for k in range(n + 1)]
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._decode_pool,
                    decode_samples,
                    samples[a:b],
                    args.max_image_pixels,
                    args.max_prompt_chars,
                    views[a:b],
                    self._segments,
                )
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            )
        )
        return [d for part in parts for d in part]

    async def Describe(
        self, request: reward_pb2.DescribeRequest, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.DescribeResponse:
        info = self.info
        return self.admission.describe(
            grpc_context,
            description=info.description,
            min_reward=info.min_reward,
            max_reward=info.max_reward,
            higher_is_better=info.higher_is_better,
            models=[reward_pb2.ModelInfo(role=m.role, source=m.source, revision=m.revision) for m in info.models],
            max_batch_size=self.args.max_batch_size,
            options=[reward_pb2.OptionInfo(name=n, description=d) for n, d in info.options],
            config_json=json.dumps(to_dict(self.reward.config), sort_keys=True, default=str),
            input_resolution=info.input_resolution.to_proto() if info.input_resolution else None,
        )

    # --- scoring ------------------------------------------------------------------------------------------------

    async def _score_chunks(self, chunks: list[list[tuple[Any, str]]]) -> list[list[RewardOutput | SampleFailure]]:
        """One batch of Serve's batcher (`self._score_batch`): the chunks of one or more requests, scored together."""
        items = [item for chunk in chunks for item in chunk]
        self.metrics.batch_size.observe(len(items))
        start = time.perf_counter()
        # The model runs in a worker thread so the event loop keeps accepting requests and filling the next batch.
        outputs = await asyncio.to_thread(self.score_isolating, items)
        self.metrics.model_latency.observe(time.perf_counter() - start)
        it = iter(outputs)
        return [[next(it) for _ in chunk] for chunk in chunks]

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
