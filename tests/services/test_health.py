"""Health checking through the fleet's gRPC port: standard grpc.health.v1 (answered by the proxy itself)."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_standard_health_check_answers_without_application_metadata(fleet):
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
        request = health_pb2.HealthCheckRequest(service="reward.v1.RewardService")
        assert health.Check(request, timeout=30).status == SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no.such.Service" in e.value.details()

        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == SERVING
        watch.cancel()


def test_reflection_advertises_the_reward_and_health_services(fleet):
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
        )
    names = {s.name for s in reply.list_services_response.service}
    assert {"reward.v1.RewardService", "grpc.health.v1.Health"} <= names
