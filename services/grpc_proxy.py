"""The servicer function Ray Serve's gRPC proxy loads (`grpc_options.grpc_servicer_functions`).

It registers `reward.v1.RewardService` like the generated `add_RewardServiceServicer_to_server`, except that
`Score` requests pass through the proxy as raw bytes. Serve's proxy keeps each method's request deserializer, and
with the generated one it parses every request and then pickles the parsed message to the replica: for a batch of
32 raw 512x512 images (25 MB) that cost about 80 ms of proxy CPU per request, more than the reward itself. With
bytes, the proxy forwards a buffer and the replica parses once (`services.admission.Admission.score_request`).

It also registers standard gRPC health checking (`grpc.health.v1.Health`), answered by the proxy itself rather than
routed to an application, so load balancers and Kubernetes `grpc` probes need no "application" metadata.
"""

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.reward.v1 import reward_pb2

SERVICE = "reward.v1.RewardService"
HEALTH_SERVICE = "grpc.health.v1.Health"


class ProxyHealth(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1` for the proxy: SERVING for "" (the server) and `reward.v1.RewardService` while it runs.

    It says the proxy accepts calls, like Serve's `Healthz`; whether one application answers is `Describe`'s job
    (`rewardfleet status`). Other service names get NOT_FOUND, as the health protocol asks.
    """

    SERVICES = ("", SERVICE)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        if request.service not in self.SERVICES:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}; known: {list(self.SERVICES)}"
            )
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        known = request.service in self.SERVICES
        status = health_pb2.HealthCheckResponse.SERVING if known else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        await context.write(health_pb2.HealthCheckResponse(status=status))
        # The status never changes while the proxy runs; the stream stays open until the client cancels it.
        await asyncio.Event().wait()


def add_RewardServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 (the name Serve's config expects)
    handlers = {
        # No request_deserializer: the request stays bytes until the replica.
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, response_serializer=reward_pb2.ScoreResponse.SerializeToString
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=reward_pb2.DescribeRequest.FromString,
            response_serializer=reward_pb2.DescribeResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)

    # Serve's proxy server routes every registered service to replicas, except "passthrough" services (Serve uses
    # that for server reflection), which run in the proxy. Marked before registering, as that method requires.
    add_passthrough = getattr(server, "add_passthrough_service", None)
    if add_passthrough is not None:
        add_passthrough(HEALTH_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(ProxyHealth(), server)
