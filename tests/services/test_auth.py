"""Token auth: a real Serve application deployed with `auth_token_env`, called through the real gRPC proxy."""

import json
import secrets
import time

import grpc
import pytest
from typer.testing import CliRunner

from deploy.cli import app as cli_app
from protos.reward.v1 import reward_pb2, reward_pb2_grpc
from services.auth import auth_problem, load_auth_token
from services.client import RewardClient, RewardServiceError
from services.serving import RewardAppArgs, RewardDeployment
from tests.conftest import random_images

TOKEN_ENV = "REWARDFLEET_TEST_TOKEN"
TOKEN = secrets.token_hex(16)


def deploy_reward_app(name: str, target: str, env_vars: dict[str, str], metadata=(), **args) -> None:
    """Deploys a reward application next to the session fleet and waits until its replica answers over gRPC."""
    from ray import serve

    dep = RewardDeployment.options(
        ray_actor_options={"num_cpus": 0.25, "runtime_env": {"env_vars": env_vars}}, max_ongoing_requests=16
    )
    serve.run(dep.bind(RewardAppArgs(**args).model_dump()), name=name, route_prefix=f"/{name}")
    # Right after deployment the proxy can briefly answer NOT_FOUND or UNAVAILABLE (DESIGN §5).
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        while True:
            try:
                stub.Describe(reward_pb2.DescribeRequest(), metadata=(("application", name), *metadata), timeout=10)
                return
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not answering: {e.details()}") from None
                time.sleep(0.25)


def deploy_auth_app(name: str, target: str, **args) -> None:
    """A JPEG reward application that requires TOKEN (its replica holds it in TOKEN_ENV)."""
    bearer = (("authorization", f"Bearer {TOKEN}"),)
    deploy_reward_app(
        name, target, {TOKEN_ENV: TOKEN}, bearer, reward="jpeg_compressibility", auth_token_env=TOKEN_ENV, **args
    )


@pytest.fixture(scope="module")
def auth_app(fleet):
    from ray import serve

    name = "jpeg_auth"
    deploy_auth_app(name, fleet.grpc_target, device="cpu")
    yield name
    serve.delete(name)


def _score_raw(target, application, metadata, image):
    h, w, _ = image.shape
    sample = reward_pb2.Sample(prompt="p", raw=reward_pb2.RawImage(height=h, width=w, data=image.tobytes()))
    with grpc.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        return stub.Score(
            reward_pb2.ScoreRequest(samples=[sample]), metadata=(("application", application), *metadata), timeout=30
        )


@pytest.mark.integration
@pytest.mark.parametrize(
    "metadata, message",
    [
        ((), "missing token"),
        ((("authorization", "Bearer not-the-token"),), "invalid token"),
        ((("authorization", f"Bearer {TOKEN}x"),), "invalid token"),
        ((("authorization", TOKEN),), "malformed authorization metadata"),
    ],
)
def test_calls_without_the_right_token_are_unauthenticated_and_the_server_keeps_serving(
    fleet, auth_app, rng, metadata, message
):
    (image,) = random_images(rng, 1)
    for call in (
        lambda md: _score_raw(fleet.grpc_target, auth_app, md, image),
        lambda md: RewardClient(fleet.grpc_target, auth_app, metadata=md, max_retries=0).describe(),
    ):
        with pytest.raises((grpc.RpcError, RewardServiceError)) as e:
            call(metadata)
        code = e.value.code() if isinstance(e.value, grpc.RpcError) else e.value.code
        details = e.value.details() if isinstance(e.value, grpc.RpcError) else e.value.details
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert message in details and auth_app in details
        assert TOKEN not in details
    # The replica still serves a caller with the token.
    (result,) = RewardClient(fleet.grpc_target, auth_app, token=TOKEN).score([image], "p")
    assert result.ok and result.reward < 0


@pytest.mark.integration
def test_the_right_token_scores_like_an_open_application(fleet, auth_app, rng):
    images = random_images(rng, 3)
    with_token = RewardClient(fleet.grpc_target, auth_app, token=TOKEN).score(images, "p")
    # An application without auth ignores the header.
    open_app = RewardClient(fleet.grpc_target, "jpeg_compressibility", token=TOKEN).score(images, "p")
    assert [r.reward for r in with_token] == [r.reward for r in open_app]
    info = RewardClient(fleet.grpc_target, auth_app, token=TOKEN).describe()
    assert info.provenance.application == auth_app


@pytest.mark.integration
def test_status_reports_auth_apps_as_unauthenticated_without_the_token(fleet, auth_app, monkeypatch):
    runner = CliRunner()
    without = runner.invoke(cli_app, ["status", "--output", "json"])
    rows = {r["application"]: r for r in json.loads(without.stdout)}
    assert rows[auth_app]["health"].startswith("UNAUTHENTICATED: ")
    assert without.exit_code == 1
    (unhealthy,) = [line for line in without.stderr.splitlines() if line.startswith("not healthy: ")]
    assert auth_app in unhealthy.removeprefix("not healthy: ").split(", ")

    monkeypatch.setenv("STATUS_TEST_TOKEN", TOKEN)
    with_token = runner.invoke(cli_app, ["status", "--output", "json", "--token-env", "STATUS_TEST_TOKEN"])
    rows = {r["application"]: r for r in json.loads(with_token.stdout)}
    assert rows[auth_app]["health"] == "ok"
    assert rows["jpeg_compressibility"]["health"] == "ok"


def test_auth_problem_names_missing_malformed_and_wrong_tokens():
    token = b"s3cret"
    assert auth_problem([("application", "a")], token).startswith("missing token")
    assert auth_problem([("authorization", "s3cret")], token).startswith("malformed")
    assert auth_problem([("authorization", "Basic s3cret")], token).startswith("malformed")
    assert auth_problem([("authorization", "Bearer ")], token).startswith("malformed")
    assert auth_problem([("authorization", "Bearer s3cre")], token) == "invalid token"
    assert auth_problem([("authorization", "Bearer s3cret")], token) is None
    assert auth_problem([("authorization", "bearer s3cret")], token) is None


def test_a_missing_token_variable_fails_the_replica_naming_it(monkeypatch):
    monkeypatch.delenv("REWARDFLEET_UNSET_TOKEN", raising=False)
    assert load_auth_token(None) is None
    with pytest.raises(RuntimeError, match="REWARDFLEET_UNSET_TOKEN"):
        RewardDeployment.func_or_class(
            RewardAppArgs(reward="jpeg_compressibility", auth_token_env="REWARDFLEET_UNSET_TOKEN")
        )
    monkeypatch.setenv("REWARDFLEET_UNSET_TOKEN", "  ")
    with pytest.raises(RuntimeError, match="unset or empty"):
        load_auth_token("REWARDFLEET_UNSET_TOKEN")
