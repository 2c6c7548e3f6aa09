"""Every shipped Serve profile is valid: schema, import paths, servicer functions, reward names and configs."""

from pathlib import Path

import pytest
from ray.serve._private.utils import import_attr
from ray.serve.schema import ServeDeploySchema

from services.assemble import AssembleAppArgs
from services.config import load_yaml
from services.registry import build_reward
from services.serving import RewardAppArgs

PROFILES = sorted((Path(__file__).parents[2] / "deploy").glob("*.yaml"))


def test_profiles_exist():
    assert {p.name for p in PROFILES} >= {"local.yaml", "cluster.yaml"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_validates_and_every_reference_resolves(path):
    config = load_yaml(path)
    schema = ServeDeploySchema.model_validate(config)
    for fn in schema.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(fn)), fn
    prefixes = [app.route_prefix for app in schema.applications]
    assert len(set(prefixes)) == len(prefixes) and None not in prefixes  # NOT_FOUND over gRPC without one
    names = {app.name for app in schema.applications}
    for app in schema.applications:
        assert callable(import_attr(app.import_path)), app.import_path
        if app.import_path == "services.assemble:build_app":
            assemble = AssembleAppArgs.model_validate(app.args)
            assert {c.application for c in assemble.components} <= names - {app.name}  # its components are served
            assert [d["name"] for d in app.model_dump()["deployments"]] == ["assemble"]
            continue
        args = RewardAppArgs.model_validate(app.args)
        reward = build_reward(args.reward, args.reward_config)  # config keys and values checked; nothing loaded
        assert reward.name == args.reward == app.name
        assert [d["name"] for d in app.model_dump()["deployments"]] == ["reward"]
