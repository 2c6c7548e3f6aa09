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
  of the components' ranks (services/selection.py, shared with the fine-tuning job), normalised to [0, 1]:
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

import numpy as np
from pydantic import Field, model_validator
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from protos.reward.v1 import reward_pb2
from services.admission import Admission, AdmissionArgs, application_name
from services.auth import load_auth_token
from services.config import Config, from_dict
from services.metrics import RewardMetrics
from services.provenance import build_provenance
from services.selection import combine_rank_fusion, combine_weighted_sum

NAME = "assemble"


class ComponentArgs(Config):
    """One component reward of `assemble`."""

    application: str = Field(description='The component\'s Serve application (its deployment is named "reward").')
    weight: float = Field(
        default=1.0, gt=0.0, description="Weight in the weighted mean (weighted_sum) or in the rank fusion."
    )
    required: bool = Field(
        default=True,
        description="Required: a failure fails the sample. Optional: a failure is reported and the sample scored "
        "without it.",
    )
    timeout_s: float = Field(
        default=30.0, gt=0.0, description="Seconds to wait for this component's answer to one request."
    )
    center: float | None = Field(
        default=None,
        description="Fixed calibration z = (score - center) / scale; give both center and scale or neither (then "
        "running statistics are used).",
    )
    scale: float | None = Field(default=None, gt=0.0, description="Fixed calibration scale (see center).")

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.center is None) != (self.scale is None):
            raise ValueError(f"component {self.application!r}: give both center and scale, or neither")
        return self


class AssembleAppArgs(AdmissionArgs):
    """`args` of the assemble application in a Serve config file. Unknown keys are rejected.

    Its request limits (AdmissionArgs) should stay within the components' own; with `auth_token_env`, gRPC calls
    must carry the token. The components are called through DeploymentHandles inside the cluster, so their own
    token checks do not apply to those calls. The request goes to the components as it came: they read its
    shared-memory images themselves, each under its own `shared_memory`; this application's says only whether its
    Describe reports a host.
    """

    components: list[ComponentArgs] = Field(min_length=1, description="The component rewards (distinct applications).")
    combine: Literal["weighted_sum", "rank_fusion"] = Field(
        default="weighted_sum",
        description="weighted_sum (of calibrated scores) or rank_fusion (within groups of samples sharing a prompt).",
    )
    fusion: Literal["borda", "rrf"] = Field(default="borda", description="rank_fusion: borda or rrf.")
    rrf_k: float = Field(default=60.0, gt=0.0, description="rank_fusion with rrf: RRF's k.")
    min_running_samples: int = Field(
        default=16,
        ge=2,
        description="Running calibration: below this many scores seen, a component's z is 0 (its spread is not known "
        "yet).",
    )

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
class AssembleDeployment:
    """Combines several reward applications behind one `reward.v1.RewardService`."""

    def __init__(self, args: AssembleAppArgs | dict[str, Any]):
        self.args = args if isinstance(args, AssembleAppArgs) else from_dict(AssembleAppArgs, args)
        token = load_auth_token(self.args.auth_token_env)
        self.components = {c.application: c for c in self.args.components}
        self.stats = {name: RunningStats() for name in self.components}
        self._handles: dict[str, Any] = {}
        self.app_name = application_name(default=NAME)
        # Its own provenance covers the combining config; each response also carries every component's.
        config = self.args.model_dump(exclude={"auth_token_env"})
        self.provenance = build_provenance(NAME, self.app_name, config, models=[])
        self.metrics = RewardMetrics(NAME)
        self.admission = Admission(
            app_name=self.app_name,
            reward_name=NAME,
            token=token,
            limits=self.args,
            metrics=self.metrics,
            provenance=self.provenance,
        )

    def _handle(self, application: str):
        # Resolved on first use: the component applications may be deployed after this one.
        if application not in self._handles:
            self._handles[application] = serve.get_deployment_handle("reward", app_name=application)
        return self._handles[application]

    # --- RPCs ---------------------------------------------------------------------------------------------------

    async def Score(
        self, request: reward_pb2.ScoreRequest | bytes, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.ScoreResponse:
        # The components get the request as bytes, as the proxy would send it (they parse it once each).
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        request = self.admission.score_request(raw, grpc_context)
        if isinstance(request, reward_pb2.ScoreResponse):  # rejected; the status is set
            return request

        # 1. Every component scores the whole request, concurrently, each under its own timeout.
        names = list(self.components)
        answers = await asyncio.gather(*(self._call(name, raw) for name in names))
        n = len(request.samples)
        scores = {name: np.full(n, np.nan) for name in names}
        errors: list[list[reward_pb2.ComponentError]] = [[] for _ in range(n)]
        response = self.admission.response()
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
        #    A component that cannot read a sample's shared memory (another host) fails it whole, optional or not:
        #    the client resends it in the request rather than get a score missing that component.
        unreadable_code = reward_pb2.ErrorCode.SHARED_MEMORY_UNAVAILABLE
        unreadable = [any(e.code == unreadable_code for e in errs) for errs in errors]
        failed = [any(e.required for e in errs) or u for errs, u in zip(errors, unreadable, strict=True)]
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
                if unreadable[i]:
                    what = "a component cannot read the sample's shared memory; send the pixels in the request"
                    result.error.code = unreadable_code
                result.error.message = f"{what} ({reasons})"[:1000]
            else:
                result.reward = float(combined[i])
            response.results.append(result)
        return self.admission.finish(response)

    async def Describe(
        self, request: reward_pb2.DescribeRequest, grpc_context: RayServegRPCContext | None = None
    ) -> reward_pb2.DescribeResponse:
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
        return self.admission.describe(
            grpc_context,
            description=description,
            min_reward=low,
            max_reward=high,
            higher_is_better=True,
            config_json=json.dumps(args.model_dump(), sort_keys=True),
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


def build_app(args: AssembleAppArgs) -> serve.Application:
    """Typed Serve application builder: `import_path: services.assemble:build_app`."""
    return AssembleDeployment.bind(AssembleAppArgs.model_validate(args).model_dump())
