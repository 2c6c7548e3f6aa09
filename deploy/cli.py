"""The `rewardfleet` command line.

rewardfleet serve                      # local Ray cluster + the local profile; Ctrl-C shuts it down
rewardfleet serve --config deploy/cluster.yaml --address auto
rewardfleet score images/ --prompt "two green dogs in the city"
rewardfleet score pairs.jsonl --app jpeg_compressibility --output json
rewardfleet describe --app jpeg_compressibility
rewardfleet status                     # applications, replicas and health of the fleet on this machine's cluster
rewardfleet rewards
rewardfleet train --with-fleet deploy/local.yaml       # fine-tune the tiny pipeline against a local fleet
rewardfleet train --config trainer/configs/cluster.yaml --address auto
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from deploy.fleet import LOCAL_PROFILE

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reward-scoring fleet for text-to-image models.")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
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
) -> None:
    """Start a Ray cluster (or join one) and serve every reward application of a Serve config over gRPC.

    A config whose replicas the cluster cannot hold fails at once, naming the deployments and what they ask for."""
    from deploy.fleet import load_serve_config, start_fleet, stop_fleet
    from deploy.placement import PlacementError

    serve_config = load_serve_config(config, grpc_port=grpc_port)
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


def read_pairs(path: Path, prompt: str | None) -> list[tuple[str, Path, str]]:
    """(id, image path, prompt) from a folder of images + one prompt, or from a JSONL of {image, prompt[, id]}."""
    if path.is_dir():
        if not prompt:
            raise typer.BadParameter("scoring a folder needs --prompt")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise typer.BadParameter(f"no {sorted(IMAGE_SUFFIXES)} files in {path}")
        return [(p.name, p, prompt) for p in files]
    if path.suffix != ".jsonl":
        raise typer.BadParameter(f"{path} is neither a folder of images nor a .jsonl file")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, row_prompt = row["image"], row.get("prompt", prompt)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise typer.BadParameter(f"{path}:{n}: expected {{'image': ..., 'prompt': ...}} ({e})") from None
        if not row_prompt:
            raise typer.BadParameter(f"{path}:{n}: no prompt (and no --prompt default)")
        image_path = (path.parent / image) if not Path(image).is_absolute() else Path(image)
        pairs.append((str(row.get("id", image)), image_path, row_prompt))
    return pairs


def score_files(
    pairs: list[tuple[str, Path, str]], target: str, application: str, chunk: int = 64, progress: bool = True
) -> list[dict]:
    """Scores image files over gRPC (files travel encoded, as they are); one row per pair, in order."""
    from tqdm import tqdm

    from services.client import RewardClient

    rows = []
    with (
        RewardClient(target, application) as client,
        tqdm(
            total=len(pairs), desc=f"scoring ({application})", unit="img", disable=not progress, file=sys.stderr
        ) as bar,
    ):
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            images = []
            for _, image_path, _ in part:
                try:
                    images.append(image_path.read_bytes())
                except OSError as e:
                    raise typer.BadParameter(f"cannot read {image_path}: {e}") from None
            results = client.score(images, [p for _, _, p in part], ids=[i for i, _, _ in part])
            for (sample_id, image_path, prompt), r in zip(part, results, strict=True):
                rows.append(
                    {
                        "id": sample_id,
                        "image": str(image_path),
                        "prompt": prompt,
                        "reward": None if math.isnan(r.reward) else r.reward,
                        "components": r.components,
                        **({"caption": r.caption} if r.caption is not None else {}),
                        **({"segments": [s.__dict__ for s in r.segments]} if r.segments else {}),
                        "error": f"{r.error_code}: {r.error_message}" if r.error_code else None,
                    }
                )
            bar.update(len(part))
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table: id, reward, components (and caption), error."""
    header = ("id", "reward", "details")
    lines = []
    for r in rows:
        details = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["components"].items()))
        if r.get("caption") is not None:
            details += f' caption="{r["caption"]}"'
        if r.get("segments"):
            details += " segments=" + ", ".join(f"{s['label']}:{s['likelihood']:.2f}" for s in r["segments"])
        if r["error"]:
            details = r["error"]
        reward = "-" if r["reward"] is None else f"{r['reward']:.4f}"
        lines.append((r["id"], reward, details))
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header[:2])]
    out = [f"{header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]}"]
    out += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in lines]
    return "\n".join(out)


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


def fleet_status(target: str | None, token: str | None, timeout_s: float) -> list[dict]:
    """One row per Serve application of the connected cluster: Serve's status and replica counts, and a Describe
    round trip over gRPC (the replica answered, through the proxy) with the provenance it reports."""
    from google.protobuf.json_format import MessageToDict
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    from services.client import RewardClient, RewardServiceError

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise RuntimeError("Ray Serve is not running on this cluster (start the fleet with `rewardfleet serve`)")
    details = ServeInstanceDetails(**client.get_serve_details())
    if target is None:
        target = f"127.0.0.1:{details.grpc_options.port}"
    rows = []
    for name, application in sorted(details.applications.items()):
        deployments = [
            {
                "name": d.name,
                "status": d.status.value,
                "running": sum(r.state.value == "RUNNING" for r in d.replicas),
                "target": d.target_num_replicas,
            }
            for d in application.deployments.values()
        ]
        row = {"application": name, "status": application.status.value, "message": application.message}
        row["deployments"] = deployments
        try:
            with RewardClient(target, name, token=token, timeout_s=timeout_s, max_retries=0) as reward_client:
                info = reward_client.describe()
            row["health"] = "ok"
            row["provenance"] = MessageToDict(info.provenance, preserving_proto_field_name=True)
        except RewardServiceError as e:
            row["health"] = f"{e.code.name if e.code else 'PROTOCOL'}: {e.details}"
        rows.append(row)
    return rows


def format_status(rows: list[dict]) -> str:
    header = ("application", "status", "replicas", "health", "fingerprint")
    lines = []
    for r in rows:
        replicas = ", ".join(f"{d['name']} {d['running']}/{d['target']}" for d in r["deployments"])
        fingerprint = r.get("provenance", {}).get("fingerprint", "")[:12]
        lines.append((r["application"], r["status"], replicas, r["health"], fingerprint))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join(
        "  ".join(f"{c:<{w}}" for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *lines]
    )


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
    import os

    import ray

    if output not in ("table", "json"):
        raise typer.BadParameter("--output must be table or json")
    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise typer.BadParameter(f"environment variable {token_env} is unset or empty")
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
    unhealthy = [r["application"] for r in rows if r["status"] != "RUNNING" or r["health"] != "ok"]
    if unhealthy:
        typer.echo(f"not healthy: {', '.join(unhealthy)}", err=True)
        raise typer.Exit(1)


@app.command("train-reward")
def train_reward_cmd(
    config: Annotated[Path | None, typer.Option(help="YAML of RewardTrainingConfig fields.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set lambda_cls=0")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train the learned alignment reward (Lee et al.) on binary feedback; evaluate it against CLIP score."""
    from services.config import apply_overrides, from_dict, load_yaml
    from trainer.reward_training import RewardTrainingConfig, format_evaluation, train_reward

    data = apply_overrides(load_yaml(config) if config else {}, set_ or [])
    try:
        cfg = from_dict(RewardTrainingConfig, data)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    evaluation = train_reward(cfg, progress=progress)
    typer.echo(format_evaluation(evaluation))
    typer.echo(f"reward written to {cfg.out_dir} (serve it with reward: alignment, model_dir: {cfg.out_dir})")


def format_rounds(rows: list[dict], rewards: list[str]) -> str:
    """One line per round: held-out mean +- SE and win rate vs the base model of each reward, and the wait share."""
    header = f"{'round':>5}  " + "  ".join(f"{name + ' (held-out)':>34}  {'win':>5}" for name in rewards)
    lines = [header + f"  {'loss':>7}  {'wait':>6}  {'round s':>7}"]
    for row in rows:
        cells = []
        for name in rewards:
            cell = f"{row[f'eval/{name}/mean']:.5g} +- {row[f'eval/{name}/se']:.2g}"
            cells.append(f"{cell:>34}  {row[f'eval/{name}/win_rate']:>5.2f}")
        loss = "-" if row.get("final") else f"{row['loss']:.4f}"
        lines.append(
            f"{row['round']:>5}  "
            + "  ".join(cells)
            + f"  {loss:>7}  {100 * row['time/wait_fraction']:>5.1f}%  {row['time/round_s']:>7.1f}"
        )
    return "\n".join(lines)


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
) -> None:
    """Fine-tune a text-to-image model with the fleet's rewards (Ray Train: sample, score, select, train).

    The job's workers (and the fleet it starts) are checked against the cluster's resources first: what cannot be
    placed fails at once, named, instead of waiting."""
    import ray

    from deploy.placement import Demand, PlacementError, check_placement, free_resources
    from trainer.config import load_finetune_config
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
        {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1.0} if cfg.run.use_gpu else {})},
    )
    try:
        if with_fleet is None and not wait_for_resources:
            where = "in the Ray cluster's free resources"
            check_placement([workers], free_resources(), "the fine-tuning job's workers", where)
        if with_fleet is not None:
            from deploy.fleet import load_serve_config, start_fleet

            serve_config = load_serve_config(with_fleet, grpc_port=int(cfg.rewards.target.rsplit(":", 1)[1]))
            # Only the applications the job queries.
            apps = [a for a in serve_config["applications"] if a["name"] in cfg.rewards.weights]
            missing = sorted(set(cfg.rewards.weights) - {a["name"] for a in apps})
            if missing:
                raise typer.BadParameter(f"{with_fleet} has no application(s) {missing}")
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
    typer.echo(f"outputs: {result.output_dir} (metrics.jsonl, tensorboard/, grids/, reward_curve.png)")
    typer.echo(f"latest checkpoint: {result.checkpoint}")


@app.command("tiny-models")
def tiny_models(
    root: Annotated[Path | None, typer.Option(help="Where to write them (default ~/.cache/rewardfleet/tiny).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False,
) -> None:
    """Write the tiny seeded models the local profile serves (done automatically on first `serve`)."""
    from trainer.local_models.tiny import TINY_ROOT, save_tiny_models

    for name, path in save_tiny_models(root or TINY_ROOT, force=force).items():
        typer.echo(f"{name}: {path}")


@app.command()
def rewards() -> None:
    """List the registered reward names."""
    from services.registry import reward_names

    for name in reward_names():
        typer.echo(name)


if __name__ == "__main__":
    app()
