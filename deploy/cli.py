"""The `rewardfleet` command line.

rewardfleet build-local                # build the local profile's models into ~/.cache/rewardfleet (once)
rewardfleet serve                      # local Ray cluster + the local profile; Ctrl-C shuts it down
rewardfleet serve --config deploy/cluster.yaml --address auto
rewardfleet score images/ --prompt "two green dogs in the city"
rewardfleet score pairs.jsonl --app jpeg_compressibility --output json
rewardfleet describe --app jpeg_compressibility
rewardfleet status                     # applications, replicas and health of the fleet on this machine's cluster
rewardfleet rewards
rewardfleet train --with-fleet deploy/local.yaml       # fine-tune the tiny pipeline against a local fleet
rewardfleet train --config trainer/configs/cluster.yaml --address auto
rewardfleet train --list-options       # every fine-tuning config field, its default and what it means
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from deploy.fleet import LOCAL_PROFILE, SCALED_TO_ZERO
from deploy.scoring import read_pairs, score_files
from deploy.tables import format_options, format_rounds, format_status, format_table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reward-scoring fleet for text-to-image models.")

DEFAULT_TARGET = "127.0.0.1:9000"


@app.command()
def serve(
    config: Annotated[Path, typer.Option(help="Serve config file (a deploy/ profile or your own).")] = LOCAL_PROFILE,
    num_cpus: Annotated[int | None, typer.Option(help="Logical CPUs of the local Ray cluster it starts.")] = None,
    address: Annotated[str | None, typer.Option(help="Join a running Ray cluster ('auto') instead.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="Override grpc_options.port of the config.")] = None,
    wait_for_resources: Annotated[
        bool, typer.Option(help="Skip the placement check: the cluster's autoscaler adds nodes on demand.")
    ] = False,
    build_local: Annotated[
        bool | None,
        typer.Option(
            help="Build the local profile's models (`rewardfleet build-local`) first. Default: only when serving the "
            "built-in local profile."
        ),
    ] = None,
) -> None:
    """Start a Ray cluster (or join one) and serve every reward application of a Serve config over gRPC.

    A config whose replicas the cluster cannot hold fails at once, naming the deployments and what they ask for. The
    built-in local profile's models (under ~/.cache/rewardfleet) are built first, once."""
    from deploy.fleet import load_serve_config, start_fleet, stop_fleet
    from deploy.placement import PlacementError

    serve_config = load_serve_config(config, grpc_port=grpc_port)
    if build_local is None:
        build_local = config.resolve() == LOCAL_PROFILE
    if build_local:
        build_local_cmd(progress=True)
    stop = threading.Event()
    # SIGTERM (docker stop, kill) shuts down as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            fleet = start_fleet(
                serve_config, num_cpus=num_cpus, address=address, wait_for_resources=wait_for_resources
            )
        except PlacementError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"rewardfleet serving on {fleet.grpc_target} (gRPC, reward.v1.RewardService)")
        for name in fleet.applications:
            typer.echo(f"  application: {name}")
        typer.echo("Ctrl-C to stop.")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("shutting down...")
        stop_fleet(shutdown_ray=address is None)


@app.command()
def score(
    path: Annotated[Path, typer.Argument(help="A folder of PNG/JPEG/WebP images, or a JSONL of {image, prompt}.")],
    prompt: Annotated[str | None, typer.Option(help="Prompt for every image of a folder (JSONL default).")] = None,
    app_name: Annotated[str, typer.Option("--app", help="Reward application to ask.")] = "jpeg_compressibility",
    target: Annotated[str, typer.Option(help="host:port of the fleet's gRPC proxy.")] = DEFAULT_TARGET,
    output: Annotated[str, typer.Option(help="table or json (JSON lines).")] = "table",
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Score images against prompts with one reward application, over gRPC."""
    from services.client import RewardServiceError

    if output not in ("table", "json"):
        raise typer.BadParameter("--output must be table or json")
    pairs = read_pairs(path, prompt)
    try:
        rows = score_files(pairs, target, app_name, progress=progress)
    except RewardServiceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if output == "json":
        for row in rows:
            typer.echo(json.dumps(row))
    else:
        typer.echo(format_table(rows))
    failed = sum(1 for r in rows if r["error"])
    if failed:
        typer.echo(f"{failed} of {len(rows)} samples could not be scored (see the error column)", err=True)


@app.command()
def describe(
    app_name: Annotated[str, typer.Option("--app", help="Reward application to ask.")] = "jpeg_compressibility",
    target: Annotated[str, typer.Option(help="host:port of the fleet's gRPC proxy.")] = DEFAULT_TARGET,
) -> None:
    """Print what a served reward's score means, its range, models and limits."""
    from google.protobuf.json_format import MessageToDict

    from services.client import RewardClient, RewardServiceError

    try:
        info = RewardClient(target, app_name).describe()
    except RewardServiceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(MessageToDict(info, always_print_fields_with_no_presence=True), indent=2))


@app.command()
def status(
    address: Annotated[str, typer.Option(help="Ray cluster to ask ('auto': the one on this machine).")] = "auto",
    target: Annotated[
        str | None, typer.Option(help="host:port of the gRPC proxy (default: 127.0.0.1 and Serve's gRPC port).")
    ] = None,
    token_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the token of applications that require one.")
    ] = None,
    output: Annotated[str, typer.Option(help="table or json.")] = "table",
    timeout_s: Annotated[float, typer.Option(help="Seconds to wait for each application's Describe.")] = 10.0,
) -> None:
    """List the fleet's applications: Serve status, replicas (running/target per deployment) and a Describe round
    trip over gRPC. Exits with 1 when an application is not RUNNING or does not answer."""
    import ray

    from deploy.fleet import fleet_status
    from services.auth import token_from_env

    if output not in ("table", "json"):
        raise typer.BadParameter("--output must be table or json")
    token = token_from_env(token_env, "--token-env", error=typer.BadParameter)
    connected_here = not ray.is_initialized()
    try:
        if connected_here:
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:
                typer.echo(f"error: no Ray cluster at {address!r} ({e})", err=True)
                raise typer.Exit(1) from None
        try:
            rows = fleet_status(target, token, timeout_s)
        except RuntimeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
    finally:
        if connected_here and ray.is_initialized():
            ray.shutdown()  # disconnects this driver; the cluster keeps running
    typer.echo(json.dumps(rows, indent=2) if output == "json" else format_status(rows))
    if not rows:
        typer.echo("no Serve applications are deployed", err=True)
        raise typer.Exit(1)
    unhealthy = [
        r["application"] for r in rows if r["status"] != "RUNNING" or r["health"] not in ("ok", SCALED_TO_ZERO)
    ]
    if unhealthy:
        typer.echo(f"not healthy: {', '.join(unhealthy)}", err=True)
        raise typer.Exit(1)


@app.command("train-reward")
def train_reward_cmd(
    config: Annotated[Path | None, typer.Option(help="YAML of RewardTrainingConfig fields.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set lambda_cls=0")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    list_options: Annotated[
        bool, typer.Option(help="List every config field with its default and description, and exit.")
    ] = False,
) -> None:
    """Train the learned alignment reward (Lee et al.) on binary feedback; evaluate it against CLIP score."""
    from services.config import apply_overrides, describe_fields, from_dict, load_yaml
    from trainer.reward_config import RewardTrainingConfig

    if list_options:
        typer.echo(format_options(describe_fields(RewardTrainingConfig)))
        return
    from trainer.reward_training import format_evaluation, train_reward

    data = apply_overrides(load_yaml(config) if config else {}, set_ or [])
    try:
        cfg = from_dict(RewardTrainingConfig, data)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    evaluation = train_reward(cfg, progress=progress)
    typer.echo(format_evaluation(evaluation))
    typer.echo(f"reward written to {cfg.out_dir} (serve it with reward: alignment, model_dir: {cfg.out_dir})")


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option(help="Fine-tuning preset (default trainer/configs/local.yaml).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: --set run.rounds=5 --set optim.lr=1e-3")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Join a running Ray cluster ('auto') instead.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="Logical CPUs of the local Ray cluster it starts.")] = None,
    with_fleet: Annotated[
        Path | None,
        typer.Option(help="Start the rewards the job uses from this Serve config first; stop them after."),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Stream Ray worker and replica logs to the console.")] = False,
    wait_for_resources: Annotated[
        bool, typer.Option(help="Skip the placement check: the cluster's autoscaler adds nodes on demand.")
    ] = False,
    list_options: Annotated[
        bool, typer.Option(help="List every config field (dotted, for --set) with its default and description.")
    ] = False,
) -> None:
    """Fine-tune a text-to-image model with the fleet's rewards (Ray Train: sample, score, select, train).

    The job's workers (and the fleet it starts) are checked against the cluster's resources first: what cannot be
    placed fails at once, named, instead of waiting. With --with-fleet deploy/local.yaml, the local profile's models
    the job uses are built first (`rewardfleet build-local`); another config's models must exist."""
    from trainer.config import FinetuneConfig, load_finetune_config

    if list_options:
        from services.config import describe_fields

        typer.echo(format_options(describe_fields(FinetuneConfig)))
        return
    import ray

    from deploy.placement import Demand, PlacementError, check_placement, free_resources
    from trainer.finetune import improvement_summary, run_finetune

    try:
        cfg = load_finetune_config(config, set_ or [])
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    if not ray.is_initialized():
        # Worker and replica logs stay in Ray's session log folder unless asked for; the driver prints each round.
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose)
    fleet = None
    rewards = list(cfg.rewards.weights)

    def on_round(row: dict) -> None:
        typer.echo(format_rounds([row], rewards).splitlines()[1])

    workers = Demand(
        "fine-tuning workers",
        cfg.run.num_workers,
        {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1.0} if cfg.run.use_gpu else {}), **cfg.run.worker_resources},
    )
    try:
        if with_fleet is None and not wait_for_resources:
            where = "in the Ray cluster's free resources"
            check_placement([workers], free_resources(), "the fine-tuning job's workers", where)
        if with_fleet is not None:
            from deploy.fleet import load_serve_config, start_fleet

            serve_config = load_serve_config(with_fleet, grpc_port=int(cfg.rewards.target.rsplit(":", 1)[1]))
            # Only the applications the job queries: the optimised rewards and the monitored ones.
            apps = [a for a in serve_config["applications"] if a["name"] in cfg.rewards.scored]
            missing = sorted(set(cfg.rewards.scored) - {a["name"] for a in apps})
            if missing:
                raise typer.BadParameter(f"{with_fleet} has no application(s) {missing}")
            if with_fleet.resolve() == LOCAL_PROFILE:  # its models, as `serve` builds them (the reward only if used)
                from trainer.local_models.artifacts import build_local_artifacts

                build_local_artifacts(progress=True, alignment="alignment" in cfg.rewards.scored)
            fleet = start_fleet(
                {**serve_config, "applications": apps}, wait_for_resources=wait_for_resources, also_place=[workers]
            )
            typer.echo(f"fleet up on {fleet.grpc_target}: {', '.join(fleet.applications)}")
        typer.echo(format_rounds([], rewards))  # the header; a line per round follows as the job writes it
        result = run_finetune(cfg, on_round=on_round)
    except PlacementError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        if fleet is not None:
            from deploy.fleet import stop_fleet

            stop_fleet(shutdown_ray=False)
    summary = improvement_summary(result.rows, cfg.rewards.primary)
    typer.echo(
        f"{cfg.rewards.primary}: held-out mean {summary['base_mean']:.5g} (base, SE {summary['base_se']:.2g}) -> "
        f"{summary['final_mean']:.5g} after {summary['rounds']} rounds: {summary['gain']:+.4g} "
        f"= {summary['gain_in_se']:+.1f} SE; win rate vs base {summary['final_win_rate']:.2f}"
    )
    if "final_oracle_all" in summary:
        typer.echo(
            f"testbed oracle, all four attributes right on held-out prompts: {summary['base_oracle_all']:.3f} (base) "
            f"-> {summary['final_oracle_all']:.3f}"
        )
    typer.echo(f"outputs: {result.output_dir} (metrics.jsonl, tensorboard/, grids/, reward_curve.png)")
    typer.echo(f"latest checkpoint: {result.checkpoint}")


@app.command("build-local")
def build_local_cmd(
    progress: Annotated[bool, typer.Option(help="Show a progress bar for the testbed reward's first build.")] = True,
) -> None:
    """Build the local profile's models into ~/.cache/rewardfleet, once: the tiny seeded models (seconds), the
    alignment reward trained on the synthetic testbed (a few minutes on 2 cores), and the testbed world's trained
    text-to-image model and captioner, installed from the weights shipped in the package with the fine-tuning job's
    prompt files (seconds). Later calls find them cached."""
    from trainer.local_models.artifacts import build_local_artifacts

    for name, path in build_local_artifacts(progress=progress).items():
        typer.echo(f"{name}: {path}")


@app.command()
def rewards() -> None:
    """List the registered reward names."""
    from services.registry import reward_names

    for name in reward_names():
        typer.echo(name)


if __name__ == "__main__":
    app()
