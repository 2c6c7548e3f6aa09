"""Can this Ray cluster place a fleet (and a fine-tuning job)? Checked before deploying, so a profile that cannot
start fails in seconds with what is missing, instead of replicas waiting in DEPLOYING until a timeout.

Ray schedules by logical resources: a replica that asks for `num_cpus: 1` on a 2-CPU node takes half of it, whatever
it really uses. The check packs every replica the config starts with (its `num_replicas`, or the autoscaling
`initial_replicas` / `min_replicas`) onto the nodes' total resources, first fit, largest first, as Ray would have to,
and names the deployments left over with the resources each replica asks for. A cluster whose autoscaler adds nodes
on demand (KubeRay) can skip the check (`--wait-for-resources`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Serve's default for a replica that names no num_cpus (ray/serve/_private/config.py).
SERVE_DEFAULT_NUM_CPUS = 1.0
# Ray names node memory "memory" in bytes; shown in GiB.
GIB = 1024**3
# Shown first, in this order.
STANDARD = ("CPU", "GPU", "memory")


@dataclass(frozen=True)
class Demand:
    """`count` replicas (or workers) of `owner`, each asking for `resources` (Ray resource name -> amount)."""

    owner: str
    count: int
    resources: dict[str, float]


class PlacementError(RuntimeError):
    """The cluster's nodes cannot hold what the config asks for."""


def replicas_at_start(deployment: dict[str, Any]) -> int:
    """How many replicas Serve starts a deployment with."""
    autoscaling = deployment.get("autoscaling_config")
    num_replicas = deployment.get("num_replicas")
    if autoscaling or num_replicas == "auto":
        autoscaling = autoscaling or {}
        initial = autoscaling.get("initial_replicas")
        return int(initial if initial is not None else autoscaling.get("min_replicas", 1))
    return int(1 if num_replicas is None else num_replicas)


def _replica_resources(deployment: dict[str, Any]) -> dict[str, float]:
    """The logical resources one replica holds: its placement group's bundles, else its actor options."""
    bundles = deployment.get("placement_group_bundles")
    if bundles:
        total: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                total[name] = total.get(name, 0.0) + float(amount)
        return total
    options = deployment.get("ray_actor_options") or {}
    num_cpus = options.get("num_cpus")
    resources = {"CPU": float(SERVE_DEFAULT_NUM_CPUS if num_cpus is None else num_cpus)}
    if options.get("num_gpus"):
        resources["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        resources["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        resources[name] = float(amount)
    return {k: v for k, v in resources.items() if v > 0}


def serve_demands(config: dict[str, Any]) -> list[Demand]:
    """The replicas a Serve config (the YAML's dict form) starts with, per deployment listed in it."""
    demands = []
    for app in config.get("applications", []):
        for deployment in app.get("deployments", []) or []:
            count = replicas_at_start(deployment)
            if count > 0:
                demands.append(Demand(f"{app['name']}/{deployment['name']}", count, _replica_resources(deployment)))
    return demands


def _amount(name: str, amount: float) -> str:
    return f"{amount / GIB:.1f} GiB" if name == "memory" else f"{amount:g}"


def _format_resources(resources: dict[str, float]) -> str:
    """{CPU 1, GPU 0.5, memory 2.0 GiB, custom ...}: the standard kinds first."""
    order = [k for k in STANDARD if k in resources] + sorted(k for k in resources if k not in STANDARD)
    return "{" + ", ".join(f"{k} {_amount(k, resources[k])}" for k in order) + "}"


def pack(demands: list[Demand], nodes: list[dict[str, float]]) -> dict[str, int]:
    """Places every replica on the first node with room for it, largest requests first; returns, per owner, how
    many replicas found no node (empty: everything fits). `nodes` are each node's total resources."""
    free = [dict(node) for node in nodes]
    units = [(d.owner, d.resources) for d in demands for _ in range(d.count)]
    # Largest first: GPUs are the scarce kind, then CPUs, then memory.
    units.sort(key=lambda u: (-u[1].get("GPU", 0.0), -u[1].get("CPU", 0.0), -u[1].get("memory", 0.0)))
    unplaced: dict[str, int] = {}
    for owner, resources in units:
        # A small tolerance: fractional requests (0.1 + 0.2 ...) must not fail on float rounding.
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in resources.items())), None)
        if node is None:
            unplaced[owner] = unplaced.get(owner, 0) + 1
            continue
        for k, v in resources.items():
            node[k] -= v
    return unplaced


def check_placement(
    demands: list[Demand], nodes: list[dict[str, float]], what: str, where: str = "on this Ray cluster"
) -> None:
    """Raises PlacementError naming every demand that does not fit on `nodes`, and why.

    Args:
        demands: replicas and workers to place together.
        nodes: each alive node's total logical resources (`ray.nodes()[i]["Resources"]`).
        what: what is being placed, for the message (e.g. "the Serve config").
        where: what `nodes` are, for the message.
    """
    unplaced = pack(demands, nodes)
    if not unplaced:
        return
    capacity: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            capacity[k] = capacity.get(k, 0.0) + v
    asked: dict[str, float] = {}
    for d in demands:
        for k, v in d.resources.items():
            asked[k] = asked.get(k, 0.0) + d.count * v
    lines = []
    for d in demands:
        if d.owner not in unplaced:
            continue
        short = sorted(k for k, v in d.resources.items() if not any(n.get(k, 0.0) + 1e-9 >= v for n in nodes))
        why = (
            f"no node has {', '.join(short)} enough for one"
            if short
            else "no node has room left for them once the rest is placed"
        )
        lines.append(
            f"  - {d.owner}: {unplaced[d.owner]} of {d.count} cannot be placed, each asks for "
            f"{_format_resources(d.resources)} ({why})"
        )
    short_overall = [
        f"{k}: {_amount(k, v)} asked, {_amount(k, capacity.get(k, 0.0))} there"
        for k, v in asked.items()
        if v > capacity.get(k, 0.0) + 1e-9
    ]
    raise PlacementError(
        f"cannot place {what} {where} ({len(nodes)} node(s), {_format_resources(capacity)} in all"
        + (f"; {'; '.join(short_overall)}" if short_overall else "")
        + "):\n"
        + "\n".join(lines)
        + "\nLower num_replicas or the ray_actor_options of these deployments, add nodes with these resources, or "
        "pass --wait-for-resources on a cluster whose autoscaler adds nodes on demand."
    )


def free_resources() -> list[dict[str, float]]:
    """The connected cluster's unused logical resources, all nodes together, as one node: an upper bound of what
    fits, so a job it rejects cannot start (a fleet or another job already holds the rest)."""
    import ray

    free = ray.available_resources()
    return [{k: float(v) for k, v in free.items() if not k.startswith(("node:", "accelerator_type", "object_store"))}]


def cluster_nodes() -> list[dict[str, float]]:
    """Total logical resources of every alive node of the connected Ray cluster (Ray's internal node:* and
    accelerator_type:* markers and the object store, which actors cannot ask for, dropped)."""
    import ray

    nodes = []
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            nodes.append(
                {
                    k: float(v)
                    for k, v in resources.items()
                    if not k.startswith(("node:", "accelerator_type", "object_store_memory"))
                }
            )
    return nodes
