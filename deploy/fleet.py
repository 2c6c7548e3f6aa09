"""Starting, stopping and checking a fleet from a Serve config file, on a local or existing Ray cluster.

This deploys the file the way `serve run config.yaml` does (the controller applies the declarative config, so the
`deployments:` overrides such as replicas and `ray_actor_options` take effect), then waits until every application
answers `Describe` over gRPC: right after deployment the proxy can briefly answer NOT_FOUND. `fleet_status` reports
each application's state and a Describe round trip (`rewardfleet status`). Starting a fleet builds no models: the
local profile's are built by `rewardfleet build-local`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from protos.reward.v1 import reward_pb2, reward_pb2_grpc
from services.config import load_yaml

DEPLOY_DIR = Path(__file__).resolve().parent
LOCAL_PROFILE = DEPLOY_DIR / "local.yaml"


@dataclass(frozen=True)
class Fleet:
    """A running fleet: where its gRPC proxy listens and which applications it serves."""

    grpc_target: str
    applications: tuple[str, ...]


def load_serve_config(
    path: str | Path = LOCAL_PROFILE, *, grpc_port: int | None = None, http_port: int | None = None
) -> dict[str, Any]:
    """Reads a Serve config file, optionally moving the proxies to other ports (tests, several fleets)."""
    config = copy.deepcopy(load_yaml(path))
    if grpc_port is not None:
        config.setdefault("grpc_options", {})["port"] = grpc_port
    if http_port is not None:
        config.setdefault("http_options", {})["port"] = http_port
    return config


def wait_until_ready(target: str, applications: list[str] | tuple[str, ...], timeout_s: float = 120.0) -> None:
    """Polls `Describe` on every application until each answers, or raises TimeoutError naming the laggards."""
    deadline = time.monotonic() + timeout_s
    pending = list(applications)
    last_error: dict[str, str] = {}
    with grpc.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        while pending:
            for app in list(pending):
                try:
                    stub.Describe(reward_pb2.DescribeRequest(), metadata=(("application", app),), timeout=10)
                    pending.remove(app)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # it answers; it wants a token we do not hold
                        pending.remove(app)
                        continue
                    last_error[app] = f"{e.code().name}: {e.details()}"
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"applications not answering on {target} after {timeout_s}s: {last_error}")
                time.sleep(0.25)


def _wait_until_running(apps: tuple[str, ...], timeout_s: float) -> None:
    """Waits for every application to be RUNNING; a failed deployment raises with Serve's own message."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    # Polled every 0.25 s at first (a small config is running in seconds), then every 2 s: each `serve.status()`
    # rebuilds every deployment's config, and Ray cloudpickles each one's request router by value, scanning
    # sys.modules. With torch imported and the test fleet's 15 deployments that took 0.3 s of CPU a call: 30 of the
    # driver's CPU-seconds over a 70 s start at a fixed 0.25 s (5 with this backoff), taken from the replicas
    # starting on the same cores.
    interval = 0.25
    while True:
        statuses = serve.status().applications
        failed = {
            # The application's message only says which deployments failed; theirs say why (the replica's error).
            a: " ".join([statuses[a].message, *(d.message for d in statuses[a].deployments.values() if d.message)])
            for a in apps
            if a in statuses and statuses[a].status == "DEPLOY_FAILED"
        }
        if failed:
            raise RuntimeError(f"Serve applications failed to deploy: {failed}")
        if all(a in statuses and statuses[a].status == "RUNNING" for a in apps):
            return
        if time.monotonic() > deadline:
            state = {a: statuses[a].status if a in statuses else "MISSING" for a in apps}
            # Serve's own word on each lagging deployment (e.g. replicas waiting for resources to be scheduled).
            why = [
                f"{a}/{name}: {d.message}"
                for a in apps
                if a in statuses
                for name, d in statuses[a].deployments.items()
                if d.message
            ]
            raise TimeoutError(f"Serve applications not running after {timeout_s}s: {state}. " + " ".join(why))
        time.sleep(interval)
        interval = min(2.0, interval * 1.5)


def start_fleet(
    config: dict[str, Any] | str | Path = LOCAL_PROFILE,
    *,
    num_cpus: int | None = None,
    address: str | None = None,
    timeout_s: float = 180.0,
    wait_for_resources: bool = False,
    also_place: list | None = None,
) -> Fleet:
    """Deploys a Serve config (dict or file) and returns when every application answers over gRPC.

    Starts a local Ray cluster with `num_cpus` logical CPUs unless Ray is already initialised or `address` names a
    running cluster ("auto" for the one on this machine).

    Before deploying, checks that the cluster's nodes can hold every replica (deploy/placement.py), together with
    `also_place` (placement Demands that will share the cluster, e.g. a fine-tuning job's workers), and raises
    PlacementError naming what does not fit. `wait_for_resources` skips the check, for a cluster whose autoscaler
    adds nodes on demand.

    Builds nothing: the models a config points at must exist. The local profile's (under ~/.cache/rewardfleet) are
    built by `rewardfleet build-local` (trainer.local_models.artifacts.build_local_artifacts).
    """
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        config = load_yaml(config)
    from deploy.placement import check_placement, cluster_nodes, serve_demands

    schema = ServeDeploySchema.model_validate(config)
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    if not wait_for_resources:
        what = "the Serve config" + (" and the fine-tuning job" if also_place else "")
        check_placement(serve_demands(config) + list(also_place or []), cluster_nodes(), what)
    serve.start(
        proxy_location=schema.proxy_location,
        http_options=schema.http_options.model_dump(),
        grpc_options=schema.grpc_options.model_dump(),
    )
    # The same call `serve run config.yaml` makes: the controller applies the whole declarative config, with its
    # `deployments:` overrides. Private API on purpose: Ray Serve has no public Python call that deploys a whole
    # ServeDeploySchema (only the dashboard's REST API, PUT /api/serve/applications/, and the `serve deploy` CLI);
    # `serve.run` takes one built application and ignores the file's per-deployment overrides.
    _get_global_client().deploy_apps(schema, _blocking=False)
    apps = tuple(app.name for app in schema.applications)
    _wait_until_running(apps, timeout_s)
    target = f"127.0.0.1:{schema.grpc_options.port}"
    # An application that scales from zero has no replica to answer yet; its first request starts one. Asking it
    # here would start them all.
    wait_until_ready(target, [a for a in apps if a not in scaled_to_zero(config)], timeout_s=timeout_s)
    return Fleet(grpc_target=target, applications=apps)


def scaled_to_zero(config: dict[str, Any]) -> set[str]:
    """The applications of a Serve config (dict form) that start with no replica (autoscaling from zero)."""
    from deploy.placement import replicas_at_start

    return {
        app["name"]
        for app in config.get("applications", [])
        if app.get("deployments") and all(replicas_at_start(d) == 0 for d in app["deployments"])
    }


def stop_fleet(shutdown_ray: bool = True) -> None:
    """Stops the fleet. `shutdown_ray`: this process started the Ray cluster, and stopping it stops every replica and
    proxy on it at once. Otherwise (a cluster it joined) Serve shuts down gracefully and the cluster stays up."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if shutdown_ray:
        # Serve's own graceful shutdown first would drain replicas that are about to be killed anyway: on a loaded
        # 2-core machine it took over a minute after Ctrl-C.
        ray.shutdown()
    else:
        serve.shutdown()


# `fleet_status`'s health of an application autoscaled to zero replicas (healthy: its next request starts one).
SCALED_TO_ZERO = "scaled to zero"


def _replicas_per_node(replicas: list[dict]) -> dict[str, int]:
    nodes: dict[str, int] = {}
    for replica in replicas:
        if replica.get("state") == "RUNNING":
            nodes[replica["node_ip"]] = nodes.get(replica["node_ip"], 0) + 1
    return dict(sorted(nodes.items()))


def fleet_status(target: str | None, token: str | None, timeout_s: float) -> list[dict]:
    """One row per Serve application of the connected cluster: Serve's status, replica counts (and running replicas
    per node), and a Describe
    round trip over gRPC (the replica answered, through the proxy) with the provenance it reports. An application
    autoscaled to zero replicas gets no round trip (it would start one) and the health `SCALED_TO_ZERO`.

    `target`: host:port of the gRPC proxy; None asks Serve for its gRPC port on 127.0.0.1.
    Raises RuntimeError when Serve is not running on the cluster.
    """
    from google.protobuf.json_format import MessageToDict
    from ray import serve
    from ray.serve.context import _get_global_client

    from services.client import RewardClient, RewardServiceError

    # serve.status() (public) has each application's and deployment's status and replica states, but neither the
    # target replica count nor the gRPC port; only the controller's instance details have those (publicly, through the
    # dashboard's REST API, GET /api/serve/applications/, which clusters started by this CLI run without).
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise RuntimeError("Ray Serve is not running on this cluster (start the fleet with `rewardfleet serve`)")
    details = client.get_serve_details()
    if target is None:
        target = f"127.0.0.1:{details['grpc_options']['port']}"
    rows = []
    for name, application in sorted(serve.status().applications.items()):
        known = details["applications"].get(name, {}).get("deployments", {})  # None if deployed since
        targets = {d: v["target_num_replicas"] for d, v in known.items()}
        deployments = [
            {
                "name": deployment,
                "status": d.status.value,
                "running": sum(n for state, n in d.replica_states.items() if state == "RUNNING"),
                "target": targets.get(deployment),
                # Running replicas per node (by node IP): where the scheduler put them.
                "nodes": _replicas_per_node(known.get(deployment, {}).get("replicas", [])),
            }
            for deployment, d in application.deployments.items()
        ]
        row = {"application": name, "status": application.status.value, "message": application.message}
        row["deployments"] = deployments
        if deployments and all(d["target"] == 0 for d in deployments):
            # Autoscaled to zero: a round trip would start a replica, so report it without one.
            row["health"] = SCALED_TO_ZERO
            rows.append(row)
            continue
        try:
            with RewardClient(target, name, token=token, timeout_s=timeout_s, max_retries=0) as reward_client:
                info = reward_client.describe()
            row["health"] = "ok"
            row["provenance"] = MessageToDict(info.provenance, preserving_proto_field_name=True)
        except RewardServiceError as e:
            row["health"] = f"{e.code.name if e.code else 'PROTOCOL'}: {e.details}"
        rows.append(row)
    return rows
