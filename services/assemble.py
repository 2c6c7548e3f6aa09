"""The `assemble` application: one Score call, several rewards, one combined score (FineRewards' assembled reward).

    applications:
      - name: assemble
        route_prefix: /assemble
        import_path: services.assemble:build_app
        args:
          combine: weighted_sum
          components:
            - {application: caption, weight: 1.0, center: 0.3, scale: 0.2}
            - {application: alignment, weight: 1.0, center: 0.5, scale: 0.25}
            - {application: semantic, weight: 0.5, required: false, timeout_s: 10}

Each request goes to every component application concurrently, through Serve `DeploymentHandle`s (in-cluster, no
second trip through the gRPC proxy), with a timeout per component. Raw scores of different rewards are never
added; the combined reward is one of:

- `weighted_sum`: the weighted mean of calibrated scores z = (score - center) / scale. `center`/`scale` are fixed
  reference values from the config (reproducible: the same sample always gets the same score) or, when absent,
  running mean and standard deviation of the component's scores seen by this replica (adapts to a new model, but a
  sample's score then depends on what came before). Range (-inf, inf); 0 = every component at its center.
- `rank_fusion`: within each group of samples of the request that share a prompt, Borda or reciprocal-rank fusion
  of the components' ranks (trainer/selection.py, the module the fine-tuning job uses), normalised to [0, 1]:
  1 = ranked first by every component. A group of one sample scores 1.

Failures: a `required` component's failure (its per-sample error, a timeout, an unreachable application) fails the
sample with COMPONENT_FAILED and the reason; an optional one's is listed in `component_errors` and the sample is
scored from the components that answered (weights renormalised). Each result's `components` holds every component's
raw score under its application name, and its calibrated score (`name:z`) or fused rank points (`name:points`).
"""

import asyncio
import json
import math
from typing import Any, Literal

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from protos.reward.v1 import reward_pb2
from services.codec import DEFAULT_MAX_IMAGE_PIXELS
from services.selection import combine_rank_fusion, combine_weighted_sum
from services.serving import (
    GrpcGate,
    RewardMetrics,
    build_provenance,
    load_auth_token,
    request_limit_problem,
)

NAME = "assemble"


class ComponentArgs(BaseModel):
    """One component reward of `assemble`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The component's Serve application (its deployment is named "reward").
    application: str
    # Weight in the weighted mean (weighted_sum) or in the rank fusion.
    weight: float = Field(default=1.0, gt=0.0)
    # Required: a failure fails the sample. Optional: a failure is reported and the sample scored without it.
    required: bool = True
    # Seconds to wait for this component's answer to one request.
    timeout_s: float = Field(default=30.0, gt=0.0)
    # Fixed calibration z = (score - center) / scale; both or neither (then running statistics are used).
    center: float | None = None
    scale: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.center is None) != (self.scale is None):
            raise ValueError(f"component {self.application!r}: give both center and scale, or neither")
        return self


class AssembleAppArgs(BaseModel):
    """`args` of the assemble application in a Serve config file. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    components: list[ComponentArgs] = Field(min_length=1)
    # weighted_sum (of calibrated scores) or rank_fusion (within groups of samples sharing a prompt).
    combine: Literal["weighted_sum", "rank_fusion"] = "weighted_sum"
    # rank_fusion: borda or rrf, and RRF's k.
    fusion: Literal["borda", "rrf"] = "borda"
    rrf_k: float = Field(default=60.0, gt=0.0)
    # Running calibration: below this many scores seen, a component's z is 0 (its spread is not known yet).
    min_running_samples: int = Field(default=16, ge=2)
    # Request limits, as for a reward application (components may have tighter ones: keep these within theirs).
    max_samples_per_request: int = Field(default=256, ge=1)
    max_request_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # Name of an environment variable holding a shared token: gRPC calls must then send the metadata
    # "authorization: Bearer <token>" (UNAUTHENTICATED otherwise). None = no check. The components are called
    # through DeploymentHandles inside the cluster, so their own token checks do not apply to those calls.
    auth_token_env: str | None = None

    @model_validator(mode="after")
    def _distinct(self):
        names = [c.application for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"components must name distinct applications, got {names}")
        return self


class RunningStats:
    """Mean and standard deviation of a stream (Welford), for running calibration."""

    def __init__(self):
        self.n, self.mean, self._m2 = 0, 0.0, 0.0

    def update(self, values) -> None:
        for x in values:
            self.n += 1
            delta = x - self.mean
            self.mean += delta / self.n
            self._m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.n - 1)) if self.n > 1 else 0.0


@serve.deployment(name="assemble", ray_actor_options={"num_cpus": 0.5})
class AssembleDeployment(GrpcGate):
    """Combines several reward applications behind one `reward.v1.RewardService`."""

    def __init__(self, args: AssembleAppArgs | dict[str, Any]):
        self.args = AssembleAppArgs.model_validate(args)
        self._token = load_auth_token(self.args.auth_token_env)
        self.components = {c.application: c for c in self.args.components}
        self.stats = {name: RunningStats() for name in self.components}
        self._handles: dict[str, Any] = {}
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:  # outside a Serve replica
            self.app_name = NAME
        # Its own provenance covers the combining config; each response also carries every component's.
        config = self.args.model_dump(exclude={"auth_token_env"})
        self.provenance = build_provenance(NAME, self.app_name, config, models=[])
        self.metrics = RewardMetrics(NAME)

    def _handle(self, application: str):
        # Resolved on first use: the component applications may be deployed after this one.
        if application not in self._handles:
            self._handles[application] = serve.get_deployment_handle("reward", app_name=application)
        return self._handles[application]

    # --- RPCs ---------------------------------------------------------------------------------------------------

    async def Score(
        self, request: reward_pb2.ScoreRequest | bytes, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.ScoreResponse:
        if not self._admitted(grpc_context):
            return reward_pb2.ScoreResponse()
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        problem = None
        try:
            request = reward_pb2.ScoreRequest.FromString(raw)
        except Exception as e:  # protobuf's DecodeError
            problem = f"request is not a valid reward.v1.ScoreRequest message ({e})"
        problem = problem or self.request_problem(request)
        if problem is not None:
            self._reject(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            return reward_pb2.ScoreResponse(reward_name=NAME, provenance=self.provenance)

        # 1. Every component scores the whole request, concurrently, each under its own timeout.
        names = list(self.components)
        answers = await asyncio.gather(*(self._call(name, raw) for name in names))
        n = len(request.samples)
        scores = {name: np.full(n, np.nan) for name in names}
        errors: list[list[reward_pb2.ComponentError]] = [[] for _ in range(n)]
        response = reward_pb2.ScoreResponse(reward_name=NAME, provenance=self.provenance)
        for name, answer in zip(names, answers, strict=True):
            component = self.components[name]
            if isinstance(answer, str):  # the whole call failed
                for i in range(n):
                    errors[i].append(self._component_error(component, "COMPONENT_FAILED", answer))
                continue
            if len(answer.results) != n:  # it rejected the request as a whole (its limits are tighter than ours)
                message = f"answered {len(answer.results)} of {n} samples: the request exceeds its limits"
                for i in range(n):
                    errors[i].append(self._component_error(component, "COMPONENT_FAILED", message))
                continue
            if answer.HasField("provenance"):
                response.component_provenance[name].CopyFrom(answer.provenance)
            for i, result in enumerate(answer.results):
                if result.HasField("error") and result.error.code:
                    code = reward_pb2.ErrorCode.Name(result.error.code)
                    errors[i].append(self._component_error(component, code, result.error.message))
                else:
                    scores[name][i] = result.reward

        # 2. Samples a required component failed are out; the rest are combined from the components that answered.
        failed = [any(e.required for e in errs) for errs in errors]
        kept = {name: np.where(failed, np.nan, s) for name, s in scores.items()}
        weights = {name: c.weight for name, c in self.components.items()}
        if self.args.combine == "weighted_sum":
            combined, parts = combine_weighted_sum(kept, weights, self._calibration(kept))
            suffix = "z"
        else:
            groups = [s.prompt for s in request.samples]
            combined, parts = combine_rank_fusion(kept, weights, groups, self.args.fusion, self.args.rrf_k)
            suffix = "points"

        # 3. One result per sample, in order: the combined reward, every component's raw and combined part.
        for i, sample in enumerate(request.samples):
            result = reward_pb2.SampleResult(id=sample.id, reward=math.nan, component_errors=errors[i])
            for name in names:
                if not np.isnan(scores[name][i]):
                    result.components[name] = float(scores[name][i])
                    if not np.isnan(parts[name][i]):
                        result.components[f"{name}:{suffix}"] = float(parts[name][i])
            if failed[i] or np.isnan(combined[i]):
                reasons = "; ".join(
                    f"{e.component}: {reward_pb2.ErrorCode.Name(e.code)}: {e.message}" for e in errors[i]
                )
                what = "required component failed" if failed[i] else "no component could score it"
                result.error.code = reward_pb2.ErrorCode.COMPONENT_FAILED
                result.error.message = f"{what} ({reasons})"[:1000]
            else:
                result.reward = float(combined[i])
            response.results.append(result)
        self.metrics.record_results(response.results)
        return response

    async def Describe(
        self, request: reward_pb2.DescribeRequest, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.DescribeResponse:
        if not self._admitted(grpc_context):
            return reward_pb2.DescribeResponse()
        args = self.args
        parts = ", ".join(
            f"{c.application} (w={c.weight:g}, {'required' if c.required else 'optional'})" for c in args.components
        )
        if args.combine == "weighted_sum":
            description = f"Weighted mean of calibrated scores (score - center) / scale of: {parts}."
            low, high = -math.inf, math.inf
        else:
            description = f"{args.fusion} rank fusion within samples sharing a prompt, in [0, 1], of: {parts}."
            low, high = 0.0, 1.0
        return reward_pb2.DescribeResponse(
            name=NAME,
            description=description,
            min_reward=low,
            max_reward=high,
            higher_is_better=True,
            max_samples_per_request=args.max_samples_per_request,
            max_request_bytes=args.max_request_bytes,
            max_image_pixels=args.max_image_pixels,
            config_json=json.dumps(args.model_dump(), sort_keys=True),
            provenance=self.provenance,
        )

    # --- helpers ------------------------------------------------------------------------------------------------

    async def _call(self, name: str, raw: bytes) -> reward_pb2.ScoreResponse | str:
        """The component's response, or a string saying why there is none."""
        component = self.components[name]
        response = self._handle(name).Score.remote(raw)
        try:
            return await asyncio.wait_for(response, timeout=component.timeout_s)
        except TimeoutError:
            response.cancel()
            return f"no answer within {component.timeout_s:g}s"
        except Exception as e:  # the application is missing or its replica died
            return f"{type(e).__name__}: {e}"[:500]

    def _calibration(self, scores: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
        """(center, scale) per component: fixed from config, or running statistics (updated with these scores)."""
        out = {}
        for name, component in self.components.items():
            if component.center is not None:
                out[name] = (component.center, component.scale)
                continue
            stats = self.stats[name]
            stats.update(s for s in scores[name] if not np.isnan(s))
            ready = stats.n >= self.args.min_running_samples and stats.std > 0
            # Not enough data yet: z = 0 for every sample (infinite scale), i.e. the component does not move it.
            out[name] = (stats.mean, stats.std) if ready else (0.0, math.inf)
        return out

    @staticmethod
    def _component_error(component: ComponentArgs, code: str, message: str) -> reward_pb2.ComponentError:
        return reward_pb2.ComponentError(
            component=component.application,
            required=component.required,
            code=reward_pb2.ErrorCode.Value(code),
            message=message,
        )

    def request_problem(self, request: reward_pb2.ScoreRequest) -> str | None:
        """What makes the request as a whole invalid, or None (checked before any component is called)."""
        args = self.args
        return request_limit_problem(request, args.max_samples_per_request, args.max_request_bytes, set(), NAME)


def build_app(args: AssembleAppArgs) -> serve.Application:
    """Typed Serve application builder: `import_path: services.assemble:build_app`."""
    return AssembleDeployment.bind(AssembleAppArgs.model_validate(args).model_dump())
